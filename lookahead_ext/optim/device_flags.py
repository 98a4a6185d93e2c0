"""The device-flag mode of the probe runtime: a step's found_inf and the engine counters on the device (docs/gpu.md)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

KEYS = ("k", "steps", "cycles", "skipped", "v_ready")
_BASE_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
_F64 = torch.float64


class Scratch:
    """Persistent device tensors by name for a step's scalar arithmetic in the device-flag
    mode: each step computes into the same tensors (out= / in-place ops), so a step after
    the first allocates nothing and a captured step replays on the addresses of the
    capture. A value is valid until the same name is computed again (the next step)."""

    def __init__(self):
        self.bufs: dict = {}

    def __call__(self, key, dtype: torch.dtype, device, shape: tuple = ()) -> Tensor:
        buf = self.bufs.get(key)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.shape != shape:
            buf = self.bufs[key] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def const(self, value: float, dtype: torch.dtype, device) -> Tensor:
        """A 0-d constant (as a tensor operand of an out= op)."""
        key = ("const", value, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.device != device:
            buf = self.bufs[key] = torch.full((), value, dtype=dtype, device=device)
        return buf


class DeviceCounters:
    """The engine counters of :class:`~lookahead_ext.optim.runtime.ProbeRuntime` in one
    float64 device tensor (exact integers up to 2**53), updated by tensor ops only, and the
    step's ``found`` flag (0-d float32: 1.0 once a used probe's loss or gradient is not
    finite). ``read()`` is the only host read: the properties call it when asked.

    Args:
        engine: the host counters to start from (``ProbeRuntime._engine``).
        device: the parameters' device.
    """

    def __init__(self, engine: dict, device: torch.device):
        self.t = torch.tensor([float(engine[k]) for k in KEYS], dtype=_F64, device=device)
        self._views()
        self.found = torch.zeros((), dtype=torch.float32, device=device)
        self.warned = int(engine["skipped"])  # skips already reported by a RuntimeWarning
        # skips that need no warning (a GradScaler's overflow: lookahead_ext.amp), on the device
        self.quiet = torch.zeros((), dtype=_F64, device=device)
        self.last_found: Optional[Tensor] = None  # the last step's found (a copy, updated in place)
        self.scratch = Scratch()

    def __getstate__(self) -> dict:  # copies (deepcopy, pickle) re-create the views of t
        return {k: v for k, v in self.__dict__.items() if k not in KEYS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views()

    def _views(self) -> None:
        """0-d views of ``t``, one per counter, updated in place."""
        self.k, self.steps, self.cycles, self.skipped, self.v_ready = (self.t[i] for i in range(len(KEYS)))

    def add_flag(self, flag: Tensor, used: Optional[Tensor] = None) -> None:
        """found <- max(found, flag) (``flag``: 1.0 = not finite); ``used``: a 0-d bool, the
        probe's result counts only where it is set (a probe that the step may not use)."""
        if used is not None or flag.dtype != torch.float32 or flag.device != self.found.device:
            flag = self.scratch("flag", torch.float32, self.found.device).copy_(flag)
            if used is not None:
                flag.mul_(used)
        torch.maximum(self.found, flag, out=self.found)

    def add_loss(self, loss, used: Optional[Tensor] = None) -> None:
        """A loss tensor's non-finiteness into found (a Python number is checked on the host:
        it is already there)."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1 or loss.is_complex():
                self.add_flag(torch.logical_not(torch.isfinite(loss.detach()).all()), used)
                return
            # x - x is 0 for a finite x, NaN for NaN and +-Inf (float64 holds every loss dtype)
            x = self.scratch("loss", _F64, loss.device).copy_(loss.detach().reshape(()))
            self.add_flag(x.sub_(x).nan_to_num_(nan=1.0), used)
        elif isinstance(loss, (int, float)) and not (float("-inf") < loss < float("inf")):
            self.add_flag(torch.ones((), device=self.found.device), used)

    def applied(self) -> Tensor:
        """1.0 if the step is applied, else 0.0 (float64)."""
        dev = self.found.device
        return torch.sub(self.scratch.const(1.0, _F64, dev), self.found, out=self.scratch("applied", _F64, dev))

    def finish(self, K: int, lookahead: bool, carried: bool) -> Optional[Tensor]:
        """The end of a step (applied or not): the counters of ``ProbeRuntime._finish``.
        Returns, for a Lookahead member, the skip flag of the sync (nonzero unless this
        step completed the K-th inner step), else None."""
        app = self.applied()
        f = self.found
        self.last_found = self.scratch("last_found", f.dtype, f.device).copy_(f)
        self.steps.add_(app)
        self.skipped.sub_(app).add_(1.0)  # += 1 - app (exact: integers)
        if carried:
            torch.maximum(self.v_ready, app, out=self.v_ready)
        if not lookahead:
            return None
        self.k.add_(app)
        dev = self.t.device
        wrap = torch.ge(self.k, K, out=self.scratch("wrap", torch.bool, dev))
        self.k.masked_fill_(wrap, 0.0)
        self.cycles.add_(wrap)
        no_sync = torch.logical_not(wrap, out=self.scratch("no_wrap", torch.bool, dev))
        return self.scratch("skip_sync", torch.float32, dev).copy_(no_sync)

    def restart_cycle(self) -> None:
        """A sync outside the step (``sync()``): k <- 0, one more cycle."""
        self.k.zero_()
        self.cycles.add_(1.0)

    def read(self, engine: dict, owner: str, stacklevel: int = 3) -> dict:
        """Copy the device counters into ``engine`` (one host read) and give the RuntimeWarning
        of the skips not reported yet."""
        *values, quiet = torch.cat([self.t, self.quiet.reshape(1)]).tolist()
        for k, x in zip(KEYS, values):
            engine[k] = bool(x) if k == "v_ready" else int(x)
        new = engine["skipped"] - int(quiet) - self.warned
        if new > 0:
            self.warned += new
            warnings.warn(f"{owner}: skipped {new} update(s) since the last report (a loss or "
                          "gradient was not finite); weights and optimizer state are unchanged "
                          f"by them (skipped so far: {engine['skipped']}).",
                          RuntimeWarning, stacklevel=stacklevel)
        return engine


def base_counter(st: dict, device: torch.device, kind: str) -> Optional[float]:
    """The applied base steps of a parameter in host format (AdamW's int "step"; SGD: 1 if
    its momentum buffer exists, else 0), or None if the state holds a device counter."""
    s = st.get("step")
    if isinstance(s, Tensor):
        return None
    if s is not None:
        return float(s)
    return 1.0 if "momentum_buffer" in st else 0.0


def to_device_state(buckets, state, kind: str) -> None:
    """Give every parameter of ``buckets`` a device counter ``state[p]["step"]`` (0-d float64,
    applied base steps), shared by the parameters of a bucket with the same count (they
    advance together: one base-step call per shared counter)."""
    for b in buckets:
        shared: dict = {}
        for p in b.params:
            st = state[p]
            n = base_counter(st, p.device, kind)
            if n is None:
                continue
            t = shared.get(n)
            if t is None:
                t = shared[n] = torch.full((), n, dtype=_F64, device=p.device)
            st["step"] = t


def to_host_state(states, kind: str, engine: dict) -> None:
    """The host format of per-parameter states written in the device-flag mode (in place;
    ``engine``: host counters just read): a parameter with no applied base step has no
    base buffers (a skipped step created them), AdamW's step is an int, SGD has no "step";
    v exists only once v is formed, the fp32 masters only after an applied step."""
    for st in states:
        s = st.get("step")
        if not isinstance(s, Tensor):
            continue
        n = int(s.item())
        if n == 0:
            for name in _BASE_BUFFERS:
                st.pop(name, None)
        if kind == "adamw" and n > 0:
            st["step"] = n
        else:
            del st["step"]
        if not engine["v_ready"]:
            st.pop("v", None)
        if engine["steps"] == 0:
            st.pop("master", None)
