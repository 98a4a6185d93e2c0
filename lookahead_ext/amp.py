"""Mixed precision with the multi-probe step: ``torch.amp.GradScaler`` and autocast.

A plain optimizer uses GradScaler as ``scaler.scale(loss).backward(); scaler.step(opt);
scaler.update()``. A probe optimizer evaluates the gradient several times per step, so
``scaler.step(opt)`` cannot drive it (the gradients of the earlier probes are gone by
then). Use instead::

    scaler = torch.amp.GradScaler("cuda")            # or "cpu"

    def closure():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()                # scaled backward, as usual
        return loss                                  # the unscaled loss

    loss = lookahead_ext.amp.step(opt, scaler, closure)
    scaler.update()

or call by call: ``for probe in lookahead_ext.amp.probes(opt, scaler): ...``.

What happens: a grad unscaler registered on the optimizer for the step
(``register_grad_unscaler``) unscales each probe's gradients by 1/scale inside the fused
non-finite check (``ops.nonfinite_(lists, inv_scale)``: one pass over the gradients, no
extra copy), so the update is computed from unscaled gradients. If any probe's loss or
gradient is not finite, the whole update is skipped: every weight and every optimizer
state tensor is left exactly as it was (the optimizer restores the probe-perturbed weights),
and the scaler is told that an inf was found, so ``scaler.update()`` backs the scale off
exactly as it would for a plain optimizer whose step overflowed; otherwise it records a
clean step and the growth tracker advances.

The skip warning the optimizer emits for a non-finite step is silenced here (overflow is the
scaler's normal way of probing the scale); ``opt.num_skipped`` still counts the skips. In the
optimizer's device-flag mode (``device_skip``, docs/gpu.md) the scaler's found_inf is the
optimizer's device flag itself: no host read.

This module reads two private attributes of GradScaler (``_scale`` and
``_per_optimizer_states``), the same way ``GradScaler.step`` fills them for optimizers;
tested with torch 2.13.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

__all__ = ["step", "probes", "inv_scale"]

_SKIP_MSG = r".*skipped the update.*"


def inv_scale(scaler) -> Optional[Tensor]:
    """1/scale of an enabled GradScaler as a 0-d float32 tensor (computed in fp64, as
    ``GradScaler.unscale_`` does), or None when the scaler is disabled/not yet used."""
    if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return None
    return scaler._scale.double().reciprocal().float()


def _record(scaler, optimizer, found: bool, device) -> None:
    """Tell the scaler what ``GradScaler.step(optimizer)`` would have recorded."""
    if scaler is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("lookahead_ext.amp: this optimizer already stepped since the last "
                           "scaler.update(); call scaler.update() once per step")
    dev = scaler._scale.device if scaler._scale is not None else device
    if isinstance(found, Tensor):  # the optimizer's device flag: no host read
        flag = found.to(device=dev, dtype=torch.float32).clone()
    else:
        flag = torch.full((), float(found), dtype=torch.float32, device=dev)
    state["found_inf_per_device"] = {dev: flag}
    state["stage"] = OptState.STEPPED


def _param_device(optimizer):
    for g in optimizer.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")


def _core(optimizer):
    """The probe optimizer itself, or the one a Lookahead wraps."""
    while not hasattr(optimizer, "register_grad_unscaler") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def probes(optimizer, scaler) -> Iterator:
    """Call-by-call API under a GradScaler: like ``optimizer.probes()``; in each iteration
    compute the loss, call ``scaler.scale(loss).backward()`` and set ``probe.loss = loss``.
    Call ``scaler.update()`` after the loop. Breaking out early abandons the step (the
    weights are restored) and records nothing in the scaler."""
    core = _core(optimizer)
    if hasattr(getattr(optimizer, "_base_optimizer", None), "register_grad_unscaler"):
        raise TypeError("lookahead_ext.amp.probes: timm's Lookahead (the lookahead_ prefix of "
                        "timm's create_optimizer_v2) has no probes(); build the optimizer with "
                        "lookahead_ext.create_optimizer(model, 'lookahead_<name>', lookahead_k=6) "
                        "instead (lookahead_ext.Lookahead has them)")
    if not (hasattr(core, "register_grad_unscaler") and hasattr(optimizer, "probes")):
        raise TypeError("lookahead_ext.amp.probes needs a probe optimizer (CMLR, SAM, ...) or a "
                        "Lookahead around one; for torch optimizers (and Lookahead around them) "
                        "use scaler.step(optimizer)")
    enabled = scaler is not None and scaler.is_enabled()
    it = optimizer.probes()
    # each probe's gradients are unscaled by 1/scale in the optimizer's fused check
    handle = core.register_grad_unscaler(lambda opt: inv_scale(scaler)) if enabled else None
    finished = False
    try:
        while True:
            with warnings.catch_warnings():
                if enabled:
                    warnings.filterwarnings("ignore", message=_SKIP_MSG, category=RuntimeWarning)
                try:
                    probe = next(it)
                except StopIteration:
                    finished = True
                    break
            yield probe
    finally:
        if handle is not None:
            handle.remove()
        if not finished:
            it.close()
    found = core.last_found_inf()  # a bool, or the device flag (device_skip mode: no host read)
    if enabled:
        core._quiet_skip(found)  # the scaler's overflow: no skip warning, also not a lazy one
    _record(scaler, optimizer, found, _param_device(optimizer))


def step(optimizer, scaler, closure: Callable):
    """``optimizer.step(closure)`` under a GradScaler (see the module docstring). The closure
    calls ``scaler.scale(loss).backward()`` and returns the unscaled loss. Returns the
    first probe's loss. Call ``scaler.update()`` afterwards."""
    if closure is None:
        raise RuntimeError("lookahead_ext.amp.step needs a closure")
    for probe in probes(optimizer, scaler):
        with torch.enable_grad():
            probe.loss = closure()
    return _core(optimizer).last_loss  # a Lookahead keeps no last_loss of its own
