"""The probe runtime: the probe protocol, buckets, fp32 masters and backups, restore, skip, Lookahead sync and state_dict."""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections import defaultdict
from dataclasses import replace
from collections.abc import Mapping
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..ops.base_step import ADAMW, BaseStep
from ..ops.helpers import aliasing_errors, trust_engine_calls
from ..ops.plan_lists import PlanList, new_epoch, new_step
from ._buckets import Bucket, make_buckets, param_signature, trainable
from ._grad_mode import no_grad as _no_grad
from ._slow import SlowWeightsMixin, init_slow, join_slow
from .device_flags import DeviceCounters, to_device_state, to_host_state
from .diagnostics import CosineTracking
from .groups import (advance_steps, base_step_, global_sq, inv_norm, per_parameter_steps,
                     sqrt64, state_buffer, state_buffers, sum_parts, sync_slow_, zero_filled)
from .checkpoint import (check_counter, check_layout, check_writer, checked_state,
                         checked_tensors, merged_groups, refuse, run_hooks)
from .hooks import ProbeHooks
from .validation import FAMILY_RULES, check_groups, check_real_params, validate_group
from .. import ops

ENGINE_KEY = "lookahead_ext"  # the state_dict entry of the runtime's own state
_BASE_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "step")
_HOOK_DICTS = ("_probe_pre_hooks", "_probe_post_hooks", "_probe_hooks_always_called",
               "_norm_reducers", "_grad_unscalers")


class Probe:
    """One gradient evaluation requested by the optimizer.

    ``name`` is "g0" (at w), "g+" (at w + rho v_hat) or "g-" (at w - rho v_hat). When the
    loop body runs, the parameters already hold the probe point and their .grad is None.
    Set ``probe.loss`` to the loss tensor (optional) so that a non-finite loss skips the
    update and ``optimizer.last_loss`` reports the first probe's loss.

    Args:
        index: position of the evaluation within the step (0: the first, whose loss is the
            step's loss).
        name: which gradient it is (``"g0"``, ``"g+"``, ``"g-"``).
    """

    __slots__ = ("index", "name", "loss", "_point")

    def __init__(self, index: int, name: str):
        self.index, self.name, self.loss, self._point = index, name, None, None

    def __repr__(self) -> str:
        return f"Probe({self.index}, {self.name!r})"


class _Skip(Exception):
    pass


LIGHTNING_ACCUMULATION = (
    "{name} with Lightning's accumulate_grad_batches > 1 in automatic optimization would "
    "silently drop the earlier batches' gradients (each probe re-evaluates the gradient at a "
    "new point and Lightning's closure can only run the current batch). Use "
    "accumulate_grad_batches=1 and accumulate inside training_step (loop over micro-batches, "
    "calling self.manual_backward per micro-batch in manual optimization), or a larger batch.")


def _closure_package(closure) -> str:
    """Top-level package that made ``closure`` (Lightning hands over a functools.partial of
    its precision plugin's method)."""
    while isinstance(closure, functools.partial):
        closure = closure.func
    return (getattr(closure, "__module__", None) or type(closure).__module__ or "").partition(".")[0]


def _finite_loss(loss) -> bool:
    if isinstance(loss, Tensor):
        return bool(torch.isfinite(loss.detach()).all())
    if isinstance(loss, (int, float)):
        return math.isfinite(loss)
    return True


class ProbeRuntime(ProbeHooks, CosineTracking, SlowWeightsMixin, Optimizer):
    """Base of every probe optimizer: runs an algorithm that evaluates the gradient at
    several points per step, written as a generator ``_probe_and_commit(buckets)`` (see
    docs/extending.md; :class:`~lookahead_ext.optim.ProbeOptimizer` is the CMLR family's).

    What the runtime guarantees to every algorithm:

    - Parameters are bucketed by (param group, device, dtype). float32/float64 buckets
      back w up into scratch "masters" fused with their first perturbation; bf16/fp16
      buckets keep persistent float32 masters in the state (the parameter is cast(master)).
    - Each probe's gradients are read once for the NaN/Inf check and their squared norm.
      A non-finite loss or gradient skips the whole update: weights restored bit for bit,
      no state change (``num_skipped`` grows), a RuntimeWarning, no further probes.
    - A parameter whose .grad is None after every probe of a step is left untouched; one
      without .grad in some probes has a zero gradient there.
    - Breaking out of ``probes()`` (or an exception in the loop body) restores w exactly.
    - Lookahead members (``lookahead = True``) sync slow weights after every K-th step.

    Param-group keys it reads: the base step's (base, lr, momentum, dampening, nesterov,
    weight_decay, betas, eps), rho (probe radius), and from param_groups[0]: k, alpha,
    norm_eps, backend, reset_base_state.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        defaults: the default hyperparameters of the subclass (checked against its
            ``_hyper_rules``, as every param group is).
        track_cosine: record the cosine between consecutive update directions in
            ``cosine_history`` (diagnostics). Default: False.
        device_skip: the device-flag mode (docs/gpu.md): the NaN/Inf checks accumulate
            into a device flag read by the fused ops, the counters live on the device, and
            the step makes no host read. None: on for CUDA parameters where the class
            supports it without extra evaluations (``device_skip_default``); True: on where
            the class supports it (any device, e.g. CPU tensors in tests); False: off.
            Settable later as the attribute of that name. Default: None.
    """

    lookahead = False
    _stepping = False  # a step is in progress (see _check_reentry)
    # class-level defaults: an optimizer pickled before the device-flag mode existed loads
    device_skip: Optional[bool] = None
    skip_check_every: Optional[int] = None
    _dev = None
    _dev_steps = 0
    _last_found = None
    _warned_no_grad = False  # the "no gradient at all" warning is given once (see _capture)

    def __init__(self, params, defaults: dict, track_cosine: bool = False,
                 device_skip: Optional[bool] = None):
        self._validate(defaults)
        self._init_hooks()
        super().__init__(params, defaults)
        for g in self.param_groups:
            self._validate(g)
            check_real_params(g["params"], type(self).__name__)
        self._engine = dict(k=0, steps=0, cycles=0, evals=0, skipped=0, v_ready=False)
        self._scratch: dict = {}
        self._plan: Optional[tuple] = None  # (signature, buckets): see _step_buckets
        self._missing = False
        self._probe_sq: dict = {}
        self._clip: dict = {}  # probe name -> clip factor < 1 (max_grad_norm): see _clip_probe
        self._grad_norms: list = []
        self._last_norms: Optional[list] = None  # see last_grad_norm
        self._last_found: Optional[Tensor] = None  # device-flag mode: the last step's found_inf
        self._slow: dict = {}
        self.last_loss = None
        self.track_cosine = bool(track_cosine)
        self.cosine_history: list[float] = []
        self._dirs: Optional[list] = None
        self._closure_kind: Optional[str] = None  # top-level module of step()'s closure
        self._warned_outside = False  # see _outside_gradients
        self._handed_back: dict = {}  # see _hand_back
        if device_skip not in (None, True, False):
            raise ValueError(f"device_skip must be None, True or False, got {device_skip!r}")
        self.device_skip = device_skip
        #: device-flag mode: read the device counters (and warn about skips) every this many
        #: steps; None = only when a counter is read (num_steps, num_skipped, state_dict, ...)
        self.skip_check_every: Optional[int] = None
        self._dev: Optional[DeviceCounters] = None  # the device-flag mode's state, see _enter_mode
        self._dev_steps = 0  # steps taken in the device-flag mode (for skip_check_every)
        if self.lookahead:
            init_slow(trainable(self.param_groups), self._slow)

    #: the hyperparameter rules of the param groups (optim/validation.py)
    _hyper_rules = FAMILY_RULES

    def _validate(self, g: dict) -> None:
        validate_group(g, self._hyper_rules)

    #: max_grad_norm scales d's coefficients (True) instead of the gradients (see _clip_probe)
    _clip_as_coefficient = False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_engine"):
            self._validate(self.param_groups[-1])
            check_real_params(self.param_groups[-1]["params"], type(self).__name__)
            if self.lookahead:
                init_slow(trainable([self.param_groups[-1]]), self._slow)

    # ------------------------------------------------------------------ properties
    def _glob(self, key):
        return self.param_groups[0][key]

    def _backend(self) -> str:
        return self._glob("backend")

    def _counters(self) -> dict:
        """The engine counters, read from the device in the device-flag mode (a host read,
        which also gives the RuntimeWarning of skips not reported yet)."""
        if self._dev is not None:
            self._dev.read(self._engine, type(self).__name__, stacklevel=4)
        return self._engine

    @property
    def num_evals(self) -> int:
        """Forward/backward passes (gradient evaluations) performed so far."""
        return self._engine["evals"]

    @property
    def num_steps(self) -> int:
        """Inner steps applied (skipped steps excluded)."""
        return self._counters()["steps"]

    @property
    def num_skipped(self) -> int:
        """Updates skipped because a loss or gradient was not finite."""
        return self._counters()["skipped"]

    @property
    def cycle_position(self) -> int:
        """Index k of the next inner step within the current Lookahead cycle."""
        return self._counters()["k"]

    # ------------------------------------------------------------------ device-flag mode
    def _device_skip_supported(self) -> bool:
        """Whether this optimizer's step runs in the device-flag mode (the CMLR family's
        own step does; others keep the host path)."""
        return False

    def device_skip_default(self) -> bool:
        """Whether ``device_skip=None`` turns the device-flag mode on for CUDA parameters
        (members whose probe schedule needs no extra evaluation in that mode)."""
        return self._device_skip_supported()

    @property
    def device_skip_active(self) -> bool:
        """Whether the last step ran in the device-flag mode."""
        return self._dev is not None

    def _wants_device(self, buckets) -> bool:
        ds = self.device_skip
        if ds is False or not self._device_skip_supported():
            return False
        if ds is None:
            return self.device_skip_default() and any(
                b.params and b.params[0].device.type == "cuda" for b in buckets)
        return True

    def _enter_mode(self, buckets) -> None:
        """Start the step in the mode it runs in (converting counters and per-parameter
        state when the mode changes) and clear the device flag."""
        if not self._wants_device(buckets):
            if self._dev is not None:
                self._leave_device()
            return
        if self._dev is None:
            dev = next((b.params[0].device for b in buckets if b.params), torch.device("cpu"))
            self._dev = DeviceCounters(self._engine, dev)
        to_device_state(buckets, self.state, self._glob("base"))
        self._dev.found.zero_()

    def _leave_device(self) -> None:
        """Back to the host path: counters and per-parameter state in host format."""
        eng = self._counters()
        to_host_state(self.state.values(), self._glob("base"), eng)
        self._dev = None

    def last_found_inf(self):
        """Whether the last step was skipped: the device-flag mode's found_inf (0-d float32
        on the parameters' device, 1.0 = skipped; no host read; one persistent tensor that
        each step overwrites), else a bool. None before the first step. E.g. for a
        GradScaler (lookahead_ext.amp)."""
        return self._last_found

    def _quiet_skip(self, found) -> None:
        """A skip that its caller reports (a GradScaler's overflow): no RuntimeWarning for
        it. Device-flag mode: ``found`` is last_found_inf(), counted on the device."""
        if isinstance(found, Tensor) and self._dev is not None:
            self._dev.quiet.add_(found.to(self._dev.quiet.device, torch.float64))

    # ------------------------------------------------------------------ the step
    def step(self, closure=None):
        """Perform one inner step. ``closure`` computes the loss at the current parameters,
        calls backward() and returns the loss; the optimizer sets the parameters to each
        probe point and zeroes the grads before each call. Returns the loss of the first
        evaluation."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure: it evaluates the gradient at "
                "several points per step. Pass `closure` (computes the loss, calls backward(), "
                "returns the loss), or drive the step call by call: "
                "`for probe in opt.probes(): loss = compute(); loss.backward(); probe.loss = loss`.")
        self._check_reentry("step()")
        gen = self._update()  # torch's step wrapper runs the step hooks around this call
        self._closure_kind = _closure_package(closure)
        try:
            drive = getattr(closure, "drive_probes", None)  # paired.PairedClosure runs the loop
            if drive is not None:
                drive(self, gen)
            else:
                for probe in gen:
                    with torch.enable_grad():
                        probe.loss = closure()
        finally:
            gen.close()
            self._closure_kind = None
        return self.last_loss

    def probes(self) -> Iterator[Probe]:
        """Call-by-call API: iterate, and in each iteration compute the loss at the current
        parameters and call backward() (several backward() calls accumulate, as usual, e.g.
        for gradient accumulation over micro-batches). Optionally set ``probe.loss``.

        The update is applied when the loop ends. Breaking out early (or an exception in
        the loop body) abandons the step and restores the weights exactly. torch's step
        pre hooks run when the iteration starts and its post hooks after the update (not
        for an abandoned step), as around ``step()``.
        """
        self._check_reentry("probes()")
        self._run_step_hooks(post=False)
        yield from self._update()
        self._run_step_hooks(post=True)

    def _check_reentry(self, what: str) -> None:
        """RuntimeError if a step is in progress: a step started from a closure (or a probe's
        loop body) would commit from the probe point. Raised before anything is touched; the
        error then abandons the outer step, which restores the weights exactly."""
        if self._stepping:
            raise RuntimeError(
                f"{type(self).__name__}.{what} was called while a step is in progress (from inside "
                "the closure or a probe's loop body?). The parameters hold a probe point there, "
                "not the weights: the closure must only compute the loss and call backward(). "
                "The outer step is abandoned; weights and optimizer state are unchanged.")

    def _update(self) -> Iterator[Probe]:
        check_groups(self.param_groups, self._hyper_rules)  # edited since? refuse before any write
        self._stepping = True
        trusted = trust_engine_calls(True)  # off while user code runs: see _probe
        try:
            yield from self._update_steps()
        finally:
            trust_engine_calls(trusted)
            self._stepping = False
            self._mark_versions()

    def _update_steps(self) -> Iterator[Probe]:
        self.last_loss = None
        self._missing = False  # set by _probe: some parameter had no gradient in some probe
        self._probe_sq: dict = {}  # set by _probe: global ||g||^2 of each probe's gradients
        # (through the norm reducers: _probe_inv, not _norm_inv, turns one into 1/||g||)
        self._clip, self._grad_norms = {}, []  # set by _probe: see _clip_probe
        self._dirs = [] if self.track_cosine else None
        buckets = self._step_buckets()
        self._enter_mode(buckets)
        committed = skipped = False
        try:
            yield from self._probe_and_commit(buckets)
            committed = True
        except _Skip:
            committed = skipped = True  # weights already restored
            self._dirs = None
            self._grad_norms = []
        finally:
            if not committed:
                with torch.no_grad():
                    self._restore(buckets)
        dev = self._dev
        if committed:
            self._last_found = skipped
        if dev is not None and committed:
            self._last_found = dev.last_found
            if self._dirs is not None and dev.last_found.item():  # track_cosine reads the host
                self._dirs = None
        if self._dirs is not None:
            with torch.no_grad():
                self._record_cosine()
        self._dirs = None
        if committed:
            self._last_norms = self._grad_norms
        self._opt_called = True  # lets torch lr schedulers know a step happened
        if dev is not None and committed:
            self._dev_steps += 1
            every = self.skip_check_every
            if every and self._dev_steps % every == 0:
                self._counters()

    def _probe_and_commit(self, buckets):
        """The algorithm: a generator that ``yield from``s ``self._probe(...)`` for each
        gradient it needs, then updates the weights and calls ``self._finish``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ buckets
    def _step_buckets(self) -> list[Bucket]:
        """This step's buckets, rebuilt only when the parameters changed (param_signature):
        building them costs more than the fused ops on small models; load_state_dict drops
        the plan."""
        # anything may have been re-pointed since the last step: plan lists re-check their
        # tensors' addresses and versions (new_step), or everything on a new plan (new_epoch)
        new_step()
        groups = self.param_groups
        sig = param_signature(groups)
        plan = self._plan
        if plan is None or plan[0] != sig:
            new_epoch()
            # the step's op calls skip the per-call aliasing check (trust_engine_calls): what
            # they write is these parameters or the optimizer's own buffers
            aliasing_errors(f"{type(self).__name__}.step", (("params", trainable(groups)),))
            with torch.no_grad():
                plan = self._plan = (sig, make_buckets(groups, self.state, self._scratch))
            if self.lookahead:  # the cycle covers the parameters that require grad now
                self._slow = join_slow(trainable(groups), self._slow)
        for b in plan[1]:
            b.synced, b.perturbed = b.low_precision, False
            if b.low_precision:
                self._adopt_edits(b)
        return plan[1]

    @staticmethod
    def _adopt_edits(b: Bucket) -> None:
        """A low-precision parameter written by anything but this optimizer since its last
        step (load_state_dict, an init, clamp_: its version counter moved) keeps the edit:
        each element that differs from cast(master) re-seeds its master from the
        parameter. Reading the counters costs no device work (no host sync on CUDA);
        edits through ``p.data`` do not move them (see docs/training.md, Rules)."""
        versions = [p._version for p in b.params]
        if versions == b.versions:
            return
        old = b.versions or [None] * len(versions)
        with torch.no_grad():
            for p, m, v, u in zip(b.params, b.masters, versions, old):
                if v != u:
                    m.copy_(torch.where(p != m.to(p.dtype), p.to(m.dtype), m))

    def _mark_versions(self) -> None:
        """Record the version counters of the low-precision params after this optimizer's
        own writes (see _adopt_edits)."""
        if self._plan is not None:
            for b in self._plan[1]:
                if b.low_precision:
                    b.versions = [p._version for p in b.params]

    def _restore(self, buckets) -> None:
        """Put the params back at w (a no-op for buckets never perturbed this step)."""
        for b in buckets:
            if b.params and b.perturbed:
                torch._foreach_copy_(b.params, b.masters)
                b.perturbed = False

    def _ensure_synced(self, buckets) -> None:
        """Make the masters hold w (for buckets whose fused backup has not happened)."""
        for b in buckets:
            if b.params and not b.synced:
                if b.perturbed:  # cannot happen: perturbing syncs first
                    raise RuntimeError("internal error: perturbed before backup")
                torch._foreach_copy_(b.masters, b.params)
                b.synced = True

    def _skip(self, buckets, why: str):
        with torch.no_grad():
            self._restore(buckets)
            for b in buckets:
                for p in b.params:
                    p.grad = None
        self._engine["skipped"] += 1
        warnings.warn(f"{type(self).__name__}: skipped the update ({why}); weights and "
                      f"optimizer state are unchanged (skipped so far: {self._engine['skipped']}).",
                      RuntimeWarning, stacklevel=4)
        raise _Skip()

    # ------------------------------------------------------------------ norms, grads, state
    def _norm_inv(self, sq):
        """1 / (||x|| + norm_eps) from a global squared norm, after the registered norm
        reducers (see groups.inv_norm: a float on the CPU, a 0-d tensor elsewhere)."""
        if self._norm_reducers:
            sq = self._reduce_norm(torch.tensor(sq, dtype=torch.float32)
                                   if isinstance(sq, float) else sq)
        return inv_norm(sq, self._glob("norm_eps"), self._dev is not None, *self._into("inv_v"))

    def _into(self, key) -> tuple:
        """(Scratch, key) for a device-flag step's scalar into a persistent buffer, else ()."""
        return () if self._dev is None else (self._dev.scratch, key)

    def _probe_inv(self, name: str):
        """1 / (||g|| + norm_eps) of probe ``name``'s gradient: its global squared norm from
        the probe's fused check, already through the norm reducers (see _clip_probe)."""
        return inv_norm(self._probe_sq[name], self._glob("norm_eps"), self._dev is not None,
                        *self._into(("inv", name)))

    def _global_sq(self, lists_per_bucket, pairs) -> Tensor:
        """groups.global_sq with this optimizer's backend."""
        return global_sq(lists_per_bucket, pairs, self._backend())

    _sum_parts = staticmethod(sum_parts)

    @staticmethod
    def _dense(buckets, grads):
        """Per-bucket gradient lists with None replaced by zeros (groups.zero_filled)."""
        return [zero_filled(gl, b.params) for gl, b in zip(grads, buckets)]

    def _state_buffer(self, p: Tensor, name: str, st: Optional[dict] = None) -> Tensor:
        """A persistent per-parameter buffer in ``self.state[p]`` (saved by state_dict),
        zeros on first use (``st``: ``self.state[p]`` if the caller holds it)."""
        if st is None:
            st = self.state[p]
        return st[name] if name in st else state_buffer(p, st, name)  # the usual case inline

    # ------------------------------------------------------------------ one probe
    def _probe(self, buckets, index, name, direction=None, sign=0.0, inv_vnorm=None,
               release_direction=False, used=None):
        """Put every bucket's params at w + sign*rho*inv_vnorm*direction (``direction``: per
        bucket, a tensor list; none = at w), yield a Probe, then capture and return the
        gradients (per bucket, a list with None for params without grad), count the
        evaluation and skip the update on non-finite values. ``release_direction``: the
        caller's last use of ``direction``: its per-bucket lists are emptied once the probe
        point is written, before the probe's backward. ``used`` (device-flag mode): a 0-d
        bool tensor, the probe's loss and gradients count towards the skip only where it
        is set (a probe the step may not need); None = always.

        In the device-flag mode nothing is read on the host: the loss and gradient checks
        go into the device flag and the step goes on with the remaining probes."""
        backend = self._backend()
        if not self._probe_sq and self._grads_from_outside(buckets):
            self._outside_gradients()  # the step's first probe: nothing is changed yet
        with _no_grad():
            for bi, b in enumerate(buckets):
                if not b.params:
                    continue
                if direction is None or sign == 0.0:
                    self._restore([b])
                else:
                    if self._dev is not None:  # (into a persistent buffer: no allocation)
                        scale = torch.mul(inv_vnorm, sign * b.group["rho"],
                                          out=self._dev.scratch(("scale", bi), inv_vnorm.dtype, inv_vnorm.device))
                    else:
                        scale = inv_vnorm * (sign * b.group["rho"])
                    if b.synced:
                        ops.perturb_(b.params, b.masters, direction[bi], scale, backend=backend)
                    else:  # fused: masters <- params (w), params <- w + scale*direction
                        ops.perturb_(b.params, b.params, direction[bi], scale,
                                     backup=b.masters, backend=backend)
                        b.synced = True
                    b.perturbed = True
                if not self._probe_sq:  # a probe's capture (it fills _probe_sq) left them None
                    for p in b.params:
                        p.grad = None
        if release_direction:
            for dl in direction:
                dl.clear()
        probe = Probe(index, name)
        probe._point = (buckets, direction, sign, inv_vnorm)  # paired.py mirrors g+ to g-
        if self._probe_pre_hooks:
            self._run_probe_pre_hooks(probe)
        if self._probe_hooks_always_called:
            evaluated = False
            try:
                trust_engine_calls(False)  # the loop body is user code: its op calls are checked
                yield probe
                trust_engine_calls(True)
                evaluated = True
            finally:
                if not evaluated:
                    self._run_probe_hooks(probe, [p for b in buckets for p in b.params], True)
        else:
            trust_engine_calls(False)
            yield probe
            trust_engine_calls(True)
        probe._point = None  # a Probe kept by the caller must not keep the direction alive
        self._engine["evals"] += 1
        if self._probe_post_hooks:
            self._run_probe_hooks(probe, [p for b in buckets for p in b.params], False)
        if index == 0:
            self.last_loss = probe.loss
        if self._dev is not None:
            if probe.loss is not None:
                self._dev.add_loss(probe.loss, used)
        elif probe.loss is not None and not _finite_loss(probe.loss):
            self._skip(buckets, f"non-finite loss at probe {name}")
        return self._capture(buckets, name, backend, used)

    def _hand_back(self, pairs) -> None:
        """Leave a probe's gradient in .grad, as after a normal backward(): ``pairs`` of
        (params, gradients). Remembered (tensor and version), so that the next step can tell
        them from gradients computed outside it."""
        handed = self._handed_back = {}
        for params, grads in pairs:
            for p, gr in zip(params, grads):
                p.grad = gr if gr.dtype == p.dtype else gr.to(p.dtype)
                handed[p] = (weakref.ref(p.grad), p.grad._version)  # weak: zero_grad frees it

    def _grads_from_outside(self, buckets) -> bool:
        """Whether some parameter holds a gradient this optimizer did not hand back
        unchanged (host-only: tensor identity and version counter)."""
        handed = self._handed_back
        if handed is None:  # a copy (deepcopy/pickle): its grads' origin is unknown, no warning
            return False
        for b in buckets:
            for p in b.params:
                g = p.grad
                if g is not None:
                    h = handed.get(p)
                    if h is None or h[0]() is not g or h[1] != g._version:
                        return True
        return False

    def _outside_gradients(self) -> None:
        """The parameters hold gradients when a step starts: a backward() ran outside it
        (the torch habit backward-clip-step, or a framework accumulating earlier batches).
        Every probe evaluates its own gradient, so those are discarded: say so once, and
        refuse Lightning's automatic accumulation (its closure can only run the last batch)."""
        name = type(self).__name__
        if self._closure_kind in ("pytorch_lightning", "lightning"):
            raise ValueError(LIGHTNING_ACCUMULATION.format(name=name))
        if not self._warned_outside:
            self._warned_outside = True
            warnings.warn(
                f"{name}.step(): the parameters already hold gradients when the step starts "
                "(a backward() outside the closure, or gradients accumulated over earlier "
                "batches). They are discarded: each probe evaluates its own gradient. Clip "
                "with the max_grad_norm option, accumulate inside the closure (or per probe "
                "of opt.probes()), and zero with set_to_none=True.", RuntimeWarning, stacklevel=5)

    def _capture(self, buckets, name, backend, used=None):
        grads, checks, missing = [], {}, False
        for b in buckets:
            # dtypes and sizes from the params' column (a gradient's are its parameter's):
            # the Triton backend reads two maps of this list, not four
            gl = PlanList(like=b.params)
            complete = True
            for p in b.params:
                g = p.grad
                if g is None:
                    complete = False
                elif g.layout is not torch.strided or g.is_complex():
                    kind = "complex" if g.is_complex() else "sparse"
                    with torch.no_grad():
                        self._restore(buckets)
                    raise RuntimeError(f"{type(self).__name__} does not support {kind} "
                                       f"gradients (parameter of shape {tuple(p.shape)})")
                gl.append(g)
                p.grad = None  # keep this probe's gradient; the next probe starts from zero
            missing = missing or not complete
            grads.append(gl)
            # one fused check per (device, dtype); the usual single bucket per kind checks
            # gl itself, whose column the base step then finds kept (read once per probe)
            checks.setdefault(b.kind, []).append(gl if complete else PlanList([g for g in gl if g is not None]))
        checks = {kind: lists[0] if len(lists) == 1 else PlanList([g for lst in lists for g in lst])
                  for kind, lists in checks.items()}
        self._missing = self._missing or missing
        if not self._warned_no_grad and not any(checks.values()) and any(b.params for b in buckets):
            self._warned_no_grad = True
            warnings.warn(f"{type(self).__name__}: probe {name} left no gradient on any parameter "
                          "(does the closure call backward()?). Parameters without a gradient "
                          "are not updated, yet num_steps counts the step. Warned once.",
                          RuntimeWarning, stacklevel=4)
        inv_scale = self._grad_inv_scale() if self._grad_unscalers else None
        # one read per gradient: NaN/Inf flag and the squared norm, per (device, dtype)
        parts = []
        for j, flat in enumerate(checks.values()):
            if not flat:
                continue
            out = None
            if self._dev is not None:  # the result into a persistent buffer
                out = self._dev.scratch(("check", name, j), torch.float64 if flat[0].dtype == torch.float64
                                        else torch.float32, flat[0].device, (2,))
            res = ops.nonfinite_([flat], inv_scale, sq_norms=True, backend=backend, out=out)
            if self._dev is not None:  # into the device flag: no host read
                self._dev.add_flag(res[0], used)
                parts.append((res, None))
                continue
            if res.device.type == "cpu":  # one host read of [flag, ||g||^2] (see inv_norm)
                flag, sq = res.tolist()
                parts.append((res, sq if res.dtype == torch.float32 else None))
            else:  # reading the flag syncs; the norm stays on the device
                flag = res[0].item()
                parts.append((res, None))
            if flag:
                self._skip(buckets, f"non-finite gradient at probe {name}")
        if len(parts) == 1 and parts[0][1] is not None:  # the usual CPU case: a float
            self._probe_sq[name] = parts[0][1]
        else:
            self._probe_sq[name] = sum_parts([res[1:] for res, _ in parts], 1)[0]
        self._clip_probe(name, grads, used)
        return grads

    def _clip_on_device(self, name, grads, sq, used) -> None:
        """_clip_probe in the device-flag mode: the norm in float64 as on the host path;
        the clip factor min(1, max_grad_norm / (norm + 1e-6)) stays on the device and scales
        the gradients in place (an unclipped probe is multiplied by exactly 1). A probe the
        step may not use (``used``) reports norm 0 (a max over norms ignores it)."""
        S = self._dev.scratch
        norm = sqrt64(sq, S, ("norm", name))
        f64, dev = torch.float64, norm.device
        self._grad_norms.append(norm if used is None else torch.where(
            used, norm, S.const(0.0, f64, dev), out=S(("norm_used", name), f64, dev)))
        max_norm = self.param_groups[0].get("max_grad_norm")
        if not max_norm:
            return
        # min(1, max_norm / (norm + 1e-6)), as the tensor ops max_norm / t (a reciprocal and
        # a multiply) and clamp compute it
        c = torch.add(norm, 1e-6, out=S(("clip", name), torch.float64, norm.device))
        c.reciprocal_().mul_(max_norm).clamp_(max=1.0)
        with _no_grad():
            flat = [g for gl in grads for g in gl if g is not None]
            if flat:
                torch._foreach_mul_(flat, S(("clip", name, flat[0].dtype), flat[0].dtype, flat[0].device).copy_(c))
        c2 = torch.mul(c, c, out=S(("clip2", name), torch.float64, norm.device))
        self._probe_sq[name] = S(("clipped_sq", name), torch.float64, norm.device).copy_(sq.reshape(())).mul_(c2)

    def _clip_probe(self, name, grads, used=None) -> None:
        """Record probe ``name``'s global gradient norm (unscaled, before clipping) and, under
        ``max_grad_norm``, clip it by torch.nn.utils.clip_grad_norm_'s factor
        min(1, max_grad_norm / (norm + 1e-6)). The family's own step applies the factor as
        the coefficient of that gradient in d (no extra pass: its direction and v update
        use normalised gradients, which clipping leaves unchanged); an optimizer that
        overrides ``_probe_and_commit`` gets the gradients scaled in place (one pass)."""
        sq = self._probe_sq[name]
        if self._norm_reducers:  # e.g. a sum over shards (FSDP2): once per probe, kept global
            sq = self._probe_sq[name] = self._reduce_norm(
                torch.tensor(sq, dtype=torch.float32) if isinstance(sq, float) else sq)
        if self._dev is not None:
            self._clip_on_device(name, grads, sq, used)
            return
        norm = math.sqrt(sq) if isinstance(sq, float) else sq.sqrt()
        self._grad_norms.append(norm)
        max_norm = self.param_groups[0].get("max_grad_norm")
        if not max_norm:
            return
        c = max_norm / (float(norm) + 1e-6)  # a host read of the norm on CUDA
        if c >= 1.0:
            return
        if self._clip_as_coefficient:
            self._clip[name] = c
        else:
            with _no_grad():
                torch._foreach_mul_([g for gl in grads for g in gl if g is not None], c)
            self._probe_sq[name] = self._probe_sq[name] * (c * c)

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The largest global gradient norm among the last step's probes, unscaled (under a
        GradScaler) and before clipping: max_grad_norm clipped that step iff it exceeds
        max_grad_norm. NaN for a skipped step, None before the first step."""
        norms = self._last_norms
        if norms is None:
            return None
        if isinstance(self._last_found, Tensor) and self._last_found.item():
            return math.nan  # device-flag mode (the host path keeps no norms of a skipped step)
        return max(float(n) for n in norms) if norms else math.nan

    # ------------------------------------------------------------------ commit
    @staticmethod
    def _keep_masks(buckets, probes: dict) -> list[list[bool]]:
        """Per bucket, per parameter: True if it has a gradient in at least one probe."""
        return [[any(probes[n][bi][i] is not None for n in probes) for i in range(len(b.params))]
                for bi, b in enumerate(buckets)]

    def _gather(self, buckets, probes: dict, kept=None):
        """Drop params without a gradient in every probe (restored to w, left untouched) and
        zero-fill missing gradients of the others. Returns (kept buckets, {name: dense grads}).
        ``kept``: the keep masks if already computed."""
        self._ensure_synced(buckets)
        if not self._missing:  # every parameter has a gradient in every probe (the usual case)
            return buckets, dict(probes)
        kept = self._keep_masks(buckets, probes) if kept is None else kept
        self._restore([b.select([not x for x in keep]) for b, keep in zip(buckets, kept)])
        sel = [b.select(keep) for b, keep in zip(buckets, kept)]
        filled = {n: self._dense(sel, [[g for g, kk in zip(gl, keep) if kk]
                                       for gl, keep in zip(probes[n], kept)])
                  for n in probes}
        return sel, filled

    def _base_step(self, b: Bucket, grads, coefs, v, v_coefs, backend, v_sq_out=None) -> None:
        """ops.combine_step_ over one bucket: d = c0*g0 + c+*g+ + c-*g- (``grads``, ``coefs``:
        3-tuples, None for an unused gradient), the torch SGD/AdamW step with d (per-parameter
        base state created/advanced, groups.per_parameter_steps), the optional v update
        (``v_coefs = (bv, a0, a+, a-)``, ``v_sq_out``: see ops.combine_step_). fp32/fp64
        buckets write the new w to the params only (their masters are scratch)."""
        g = b.group
        self._ensure_synced([b])
        states = [self.state[p] for p in b.params]
        betas = g.get("betas", (0.9, 0.999))  # base="sgd" groups carry none
        lr = g["lr"]
        if not (self._dev is not None and isinstance(lr, Tensor)):  # device mode: read on the device
            lr = float(lr)
        template = BaseStep(kind=self._glob("base"), lr=lr,
                            weight_decay=g["weight_decay"], momentum=g["momentum"],
                            dampening=g["dampening"], nesterov=g["nesterov"],
                            beta1=betas[0], beta2=betas[1], eps=g["eps"])
        if self._dev is not None:
            self._base_step_on_device(b, states, grads, coefs, template, v, v_coefs, backend, v_sq_out)
            return
        ages = per_parameter_steps(states, template)
        # Mixed ages split the bucket: a fused ||v||^2 would sum per age group, and differ in
        # the last bit from the multi_dot pass over the bucket that the next step runs when
        # it has no carried value (after load_state_dict or a copy). Take that pass here.
        split_sq = v_sq_out is not None and len(ages) > 1
        for base, idx in ages:
            sel = (lambda lst: lst) if idx is None else \
                (lambda lst: None if lst is None else [lst[i] for i in idx])  # noqa: E731
            params, pstates = sel(b.params), sel(states)
            sgrads = tuple(sel(x) for x in grads)
            if self._dirs is not None:
                self._record_direction(params, sgrads, coefs)
            bufs = state_buffers(params, pstates, base.state_names())
            if idx is None:  # the whole bucket: its kept lists (launch-plan columns persist)
                bufs = {name: b.kept(name, lst) for name, lst in bufs.items()}
            base_step_(params, sel(b.masters), sgrads, coefs, base, bufs, sel(v), v_coefs,
                       v_sq_out=None if split_sq else v_sq_out, write_masters=b.low_precision,
                       backend=backend)
            advance_steps(pstates, base)
        if split_sq:
            v_sq_out.add_(global_sq([[v]], [(0, 0)], backend))
        if not b.low_precision:
            b.synced = False

    def _base_step_on_device(self, b, states, grads, coefs, template, v, v_coefs, backend,
                             v_sq_out) -> None:
        """_base_step in the device-flag mode: one combine_step_ per shared device counter
        of applied base steps (device_flags.to_device_state; AdamW's step and SGD's first
        flag come from it), skipped on the device flag; then the counters advance by 1 unless
        the step is skipped (in place when every holder advances, else the advanced
        parameters get a new counter)."""
        dev = self._dev
        found = dev.found
        if found.device != b.params[0].device:
            found = found.to(b.params[0].device)
        shared: dict = {}
        for i, st in enumerate(states):
            shared.setdefault(id(st["step"]), (st["step"], []))[1].append(i)
        split_sq = v_sq_out is not None and len(shared) > 1
        app = None
        S = dev.scratch
        for j, (cnt, idx) in enumerate(shared.values()):
            # the counters' derived scalars and the packed kernel arguments in persistent buffers
            if template.kind == ADAMW:
                base = replace(template, step=torch.add(cnt, 1.0, out=S(("step", j), cnt.dtype, cnt.device)))
            elif template.uses_momentum:
                base = replace(template, first=torch.eq(cnt, 0, out=S(("first", j), torch.bool, cnt.device)))
            else:
                base = template
            if base.on_device:
                base = replace(base, args=S(("base_args", j), torch.float64, cnt.device, (base.n_device_args,)))
            sel = (lambda lst: lst) if len(shared) == 1 else \
                (lambda lst: None if lst is None else PlanList([lst[i] for i in idx]))  # noqa: E731
            params, pstates = sel(b.params), sel(states)
            if self._dirs is not None:
                self._record_direction(params, tuple(sel(x) for x in grads), coefs)
            base_step_(params, sel(b.masters), tuple(sel(x) for x in grads), coefs, base,
                       state_buffers(params, pstates, base.state_names()), sel(v), v_coefs,
                       v_sq_out=None if split_sq else v_sq_out, write_masters=b.low_precision,
                       backend=backend, skip_if=found)
            if app is None:
                app = dev.applied() if found is dev.found else 1.0 - found.to(torch.float64)
            if self._missing:  # a parameter without gradient keeps its (shared) counter
                new = cnt + app
                for st in pstates:
                    st["step"] = new
            else:
                cnt.add_(app)
        if split_sq:
            v_sq_out.add_(global_sq([[v]], [(0, 0)], backend))
        if not b.low_precision:
            b.synced = False

    def _finish(self, buckets, k: Optional[int] = None) -> None:
        """Bookkeeping at the end of an applied inner step, then the Lookahead sync after
        the K-th one. ``buckets``: all buckets of the step (params without gradients too:
        they are synced as well). Call once, at the end of ``_probe_and_commit``."""
        eng = self._engine
        k = eng["k"] if k is None else k
        for b in buckets:
            b.perturbed = False
        for b in self._plan[1]:
            if b.pending:  # new fp32 masters join the state with the first applied step
                for p, m in zip(b.params, b.masters):  # (device-flag mode: now; see to_host_state)
                    self.state[p].setdefault("master", m)
                b.pending = False
        if self._dev is not None:
            skip_sync = self._dev.finish(self._glob("k"), self.lookahead,
                                         getattr(self, "direction", None) is not None
                                         and self.direction.carried)
            if skip_sync is not None:
                self._sync_buckets(buckets, skip_sync)
            return
        eng["steps"] += 1
        eng["k"] = k + 1
        if not self.lookahead:
            eng["k"] = 0
        elif eng["k"] >= self._glob("k"):
            self._sync_buckets(buckets)

    # ------------------------------------------------------------------ lookahead
    def _sync_buckets(self, buckets, skip_if: Optional[Tensor] = None) -> None:
        """slow <- slow + alpha (fast - slow), fast <- slow (Algorithm 1, line 18); restarts
        the cycle. The fast weights are the fp32 masters of bf16/fp16 buckets, else the
        params (their masters are scratch). ``skip_if`` (device-flag mode): a device flag,
        nonzero = no sync (the counters were advanced by DeviceCounters.finish)."""
        alpha, backend = self._glob("alpha"), self._backend()
        for b in buckets:
            if b.params:
                sync_slow_(b.kept("slow", [self._slow[p] for p in b.params]),
                           b.masters if b.low_precision else b.params, alpha, b.params, backend,
                           skip_if=skip_if)
        if skip_if is not None:
            return
        self._engine["k"] = 0
        self._engine["cycles"] += 1
        if self._glob("reset_base_state"):
            for p in trainable(self.param_groups):
                for name in _BASE_STATE:
                    self.state[p].pop(name, None)

    def _slow_map(self) -> dict:
        if not self.lookahead:
            raise RuntimeError(f"{type(self).__name__} has no slow weights (not a lookahead optimizer)")
        return self._slow

    @torch.no_grad()
    def _sync_now(self) -> None:
        self._slow_map()
        self._check_reentry("sync()")
        self._sync_buckets(self._step_buckets())
        if self._dev is not None:  # the host counters are a stale copy: restart on the device
            self._dev.restart_cycle()
        self._mark_versions()

    # ------------------------------------------------------------------ copy, state dict
    def __getstate__(self) -> dict:
        """Everything but the hooks (as torch.optim: a copy starts without hooks) and the
        per-step caches (rebuilt on the next step), so ``copy.deepcopy`` and pickling give
        an optimizer that goes on exactly as this one."""
        state = {k: v for k, v in self.__dict__.items()
                 if not (k.startswith("_optimizer_") or k in _HOOK_DICTS)}
        state.update(_plan=None, _scratch={}, _handed_back=None)  # weakrefs: see _hand_back
        if isinstance(state.get("last_loss"), Tensor):  # a graph's output: keep the value
            state["last_loss"] = state["last_loss"].detach()
        if "_v_sq" in state:
            state["_v_sq"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_probe_pre_hooks" not in self.__dict__:  # unpickled (torch's load_state_dict
            self._init_hooks()                        # also comes here: keep its hooks)

    def state_dict(self) -> dict:
        """torch.optim's "state" and "param_groups" plus a "lookahead_ext" entry: the
        writer's class name, the engine counters (cycle position, steps, evaluations, skips),
        the slow weights by parameter index and the cosine history. ``backend`` stays in
        the groups as a record of the run; :meth:`load_state_dict` ignores it."""
        if self._dev is not None:  # the host format (a copy: the run goes on on the device)
            from copy import copy
            eng = self._counters()
            saved = self.state
            self.state = defaultdict(dict, {p: copy(st) for p, st in saved.items()})
            try:
                to_host_state(self.state.values(), self._glob("base"), eng)
                sd = super().state_dict()
            finally:
                self.state = saved
        else:
            sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd[ENGINE_KEY] = dict(optimizer=type(self).__name__, engine=dict(self._engine),
                              slow={index[id(p)]: s.clone() for p, s in self._slow.items()},
                              cosine_history=list(self.cosine_history))
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict written by ``state_dict()`` of the same class, for the same
        parameter layout (groups, sizes, shapes); checked first (checkpoint.py): a refused
        one raises StateDictError (a ValueError) and changes nothing. The hyperparameters
        come from the state dict, ``backend`` stays this optimizer's. Tensors go to the
        parameter's device in its state dtype (fp32 for bf16/fp16 parameters, unlike
        torch.optim's cast to the parameter dtype)."""
        owner = type(self).__name__
        state_dict = run_hooks(self, state_dict)
        ids = check_layout(owner, state_dict, self.param_groups)
        extra = check_writer(owner, state_dict, ENGINE_KEY, owner)
        groups = merged_groups(owner, state_dict["param_groups"], self.param_groups, self._validate)
        state = checked_state(owner, ids, state_dict["state"])
        slow = checked_tensors(owner, ids, extra.get("slow", {}), "slow weights") \
            if self.lookahead else {}
        engine = extra.get("engine")
        if not isinstance(engine, Mapping) or set(self._engine) - set(engine):
            refuse(owner, f"the state dict's engine counters must be a dict with keys {sorted(self._engine)}")
        check_counter(owner, "cycle position", engine["k"], groups[0]["k"] if self.lookahead else 1)
        # commit: nothing below raises
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        self._engine = dict(engine)
        self._dev = None  # host format loaded: the next step converts it if in device mode
        self._slow = slow
        self.cosine_history = list(extra.get("cosine_history", []))
        self._scratch = {}
        self._plan = None  # low-precision masters live in the state
        if "_v_sq" in self.__dict__:  # the carried ||v||^2 was of the old v tensors
            self._v_sq = None
        run_hooks(self, None, post=True)
