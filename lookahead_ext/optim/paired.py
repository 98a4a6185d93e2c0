"""Paired probes: g+ and g- of a central-difference step in one batched pass (torch.func.vmap)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from .. import ops
from ._buckets import trainable
from ._grad_mode import no_grad as _no_grad

__all__ = ["PairedClosure", "supports_paired"]

RANDOMNESS = ("same", "different", "error")
_NOTE = ("(raised inside the paired evaluation of g+ and g-: the model and loss_fn run under "
         "torch.func.vmap over the two parameter sets; see docs/paired-probes.md for what "
         "they may do, or pass closure.sequential to step() instead)")


def supports_paired(optimizer) -> bool:
    """Whether ``optimizer`` takes paired probes: every step that evaluates g+ = grad L(w +
    rho v_hat) evaluates g- = grad L(w - rho v_hat) right after it, with the same direction
    and scale. True for the family's central-difference members (CR, CMLR, CLR and any
    :class:`~lookahead_ext.optim.ProbeOptimizer` subclass with both probes in its scheme
    and the family's own step) and CRSAM; a class that writes its own step states it with a
    ``paired_probes`` class attribute."""
    flag = getattr(type(optimizer), "paired_probes", None)
    if flag is not None:
        return bool(flag)
    from .family_optimizer import ProbeOptimizer  # family_optimizer imports runtime: late
    return (isinstance(optimizer, ProbeOptimizer)
            and type(optimizer)._probe_and_commit is ProbeOptimizer._probe_and_commit
            and {"g+", "g-"} <= set(optimizer.scheme.probes))


def _forward(module, inputs, state=None):
    """module(inputs) (a tensor: one positional argument, a tuple/list: positional ones, a
    Mapping: keywords); with ``state``, functional_call over those parameters/buffers."""
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    if state is None:
        return module(*args, **kwargs)
    return functional_call(module, state, args, kwargs)


class PairedClosure:
    r"""A closure built from ``(model, loss_fn, batch)`` that a central-difference optimizer
    recognises: ``opt.step(PairedClosure(model, loss_fn, x, y))`` evaluates

    .. math::
        g^+ = \nabla L(w + \rho \hat v),\qquad g^- = \nabla L(w - \rho \hat v)

    (cmlr.txt, Algorithm 1, lines 8-11, "Parallel do") in one batched pass:
    ``torch.func.vmap`` of ``torch.func.grad_and_value`` of
    ``loss_fn(functional_call(model, params, inputs), *targets)`` over the two parameter
    sets, on the same batch. Every other probe (g0 = grad L(w) of CR's first step, of CLR
    and of CRSAM) runs as an ordinary closure. The runtime sees two probes as in sequential
    mode: NaN/Inf in either skips the update (weights and state bit-identical),
    ``max_grad_norm``, probe pre/post hooks for both probes, ``num_evals`` + 2,
    ``last_loss`` the first probe's loss (a detached tensor), restore on exceptions.

    Semantics (docs/paired-probes.md): g-'s probe pre hooks run after the pass (they cannot
    change how g- is evaluated; what g+'s pre hooks set up holds for both); BatchNorm layers
    in training mode that track running statistics update them from the g+ evaluation only
    (the g- lane's update is discarded: sequential mode under
    ``apply_batchnorm_mode(..., "first")`` when g+ is the step's first probe); random ops
    draw per ``randomness``; both lanes' activations are alive at once (twice the
    activation memory of one probe). Only ``step()`` uses the pairing; ``probes()`` and
    ordinary closures are unchanged. An optimizer without paired probes (SAM, FR, LR, FMLR,
    MLSAM, LookbehindSAM, GSAM) refuses the closure with a ValueError; a torch optimizer
    calls it as an ordinary closure.

    Args:
        model: the ``nn.Module`` whose parameters are the optimizer's trainable ones (each
            of them must be a parameter of ``model``). Not a DistributedDataParallel wrapper.
        loss_fn: ``loss_fn(output, *targets)`` -> a scalar loss tensor.
        inputs: the model's input: a tensor (``model(inputs)``), a tuple or list
            (``model(*inputs)``) or a mapping (``model(**inputs)``).
        *targets: further arguments of ``loss_fn`` after the output (e.g. the labels).
        randomness: torch.func.vmap's randomness for random ops (dropout) in the pass:
            ``"same"``: one draw shared by both probes (common random numbers, as a
            sequential step whose closure reseeds the generator before each probe);
            ``"different"``: independent draws per probe (the statistics of a sequential
            step); ``"error"``: refuse random ops. Default: ``"same"``.
    """

    def __init__(self, model: nn.Module, loss_fn, inputs, *targets, randomness: str = "same"):
        if randomness not in RANDOMNESS:
            raise ValueError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "PairedClosure cannot take a DistributedDataParallel model: DDP reduces "
                "gradients in its backward hooks, which torch.func transforms bypass. Pass the "
                "wrapped module (ddp.module) and reduce the probes' gradients with "
                "lookahead_ext.distributed.DistributedProbes.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self.randomness = randomness

    def sequential(self):
        """The ordinary closure: the loss at the current parameters, backward(), the loss.
        ``opt.step(closure.sequential)`` runs every probe one after the other."""
        with torch.enable_grad():
            loss = self.loss_fn(_forward(self.model, self.inputs), *self.targets)
            loss.backward()
        return loss

    def __call__(self):
        return self.sequential()

    # ------------------------------------------------------------------ the probe loop
    def drive_probes(self, optimizer, gen) -> None:
        """Run ``optimizer``'s probe generator (ProbeRuntime.step's seam): g+ and g- from one
        paired pass, any other probe through :meth:`sequential`."""
        self._check(optimizer)
        pending = None  # the g- lane: (gradients by parameter id, loss)
        for probe in gen:
            if probe.name == "g+":
                plus, pending = self._pair(optimizer, probe)
                probe.loss = self._hand_over(*plus)
            elif probe.name == "g-":
                if pending is None:
                    raise RuntimeError(f"{type(optimizer).__name__}: probe g- came without g+ "
                                       "before it; its class must not declare paired_probes")
                probe.loss, pending = self._hand_over(*pending), None
            else:
                probe.loss = self.sequential()
        if pending is not None:  # skipped at g+: the g- lane was evaluated all the same
            optimizer._engine["evals"] += 1

    def _check(self, optimizer) -> None:
        name = type(optimizer).__name__
        if not supports_paired(optimizer):
            raise ValueError(
                f"{name} does not take paired probes: they evaluate g+ = grad L(w + rho v_hat) "
                f"and g- = grad L(w - rho v_hat) in one pass, and {name}'s step has no such "
                "pair (SAM, FR, LR, FMLR, MLSAM, LookbehindSAM and GSAM have no g- probe). "
                "Paired probes: CR, CMLR, CLR, CRSAM. Use an ordinary closure, e.g. "
                "opt.step(closure.sequential).")
        if optimizer._grad_unscalers:
            raise ValueError(
                f"{name} has a grad unscaler (a GradScaler through lookahead_ext.amp): paired "
                "probes compute unscaled gradients and cannot take it. Use closure.sequential "
                "under the GradScaler, or bf16 autocast without a scaler.")
        ids = {id(p) for p in self.model.parameters()}
        for p in trainable(optimizer.param_groups):
            if id(p) not in ids:
                raise ValueError(
                    f"{name}: a parameter of shape {tuple(p.shape)} is not a parameter of the "
                    "PairedClosure's model: the paired pass only moves the model's parameters "
                    "to the two probe points. Give the optimizer the model's parameters only.")

    def _pair(self, optimizer, probe):
        """Both lanes' gradients and losses. The parameters hold w + rho v_hat (g+'s point);
        w - rho v_hat is written by the same op and arguments that the runtime's g- probe
        uses (ops.perturb_ from the masters), so both points equal sequential mode's."""
        buckets, direction, sign, inv = probe._point
        backend = optimizer._backend()
        lanes: dict = {}  # parameter id -> [2, *shape]: lane 0 at g+, lane 1 at g-
        with _no_grad():
            for bi, b in enumerate(buckets):
                if not b.params:
                    continue
                if not b.synced:
                    raise RuntimeError("internal error: g+ before the backup of w")
                stacked = [torch.empty((2,) + tuple(p.shape), dtype=p.dtype, device=p.device)
                           for p in b.params]
                torch._foreach_copy_([s[0] for s in stacked], [p.detach() for p in b.params])
                ops.perturb_([s[1] for s in stacked], b.masters, direction[bi],
                             inv * (-sign * b.group["rho"]), backend=backend)
                lanes.update((id(p), s) for p, s in zip(b.params, stacked))
        batched, fixed, names = {}, {}, {}
        for n, p in self.model.named_parameters():
            if id(p) in lanes:
                batched[n] = lanes[id(p)]
            elif p.requires_grad:  # not the optimizer's: at w in both lanes, as in sequential mode
                batched[n] = p.detach().expand((2,) + tuple(p.shape))
            else:
                fixed[n] = p.detach()
            names[n] = p
        tracking, owners = {}, {}  # BatchNorm buffers that a training forward updates in place
        for mn, m in self.model.named_modules():
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
                for bn, buf in m.named_buffers(recurse=False):
                    if buf is not None:
                        full = f"{mn}.{bn}" if mn else bn
                        tracking[full], owners[full] = torch.stack([buf, buf]), buf
        for n, buf in self.model.named_buffers():
            if n not in tracking:
                fixed[n] = buf

        def loss_at(params, bn_state, rest):
            out = _forward(self.model, self.inputs, (params, bn_state, rest))
            return self.loss_fn(out, *self.targets)

        try:
            with torch.enable_grad():
                grads, losses = vmap(grad_and_value(loss_at), in_dims=(0, 0, None),
                                     randomness=self.randomness)(batched, tracking, fixed)
        except Exception as exc:
            exc.add_note(_NOTE)
            raise
        with _no_grad():
            for n, buf in owners.items():  # running stats: the g+ lane's update only
                buf.copy_(tracking[n][0])
        by_lane = [{}, {}]
        for n, g in grads.items():
            p = names[n]
            for lane in (0, 1):
                by_lane[lane][n] = (p, g[lane], id(p) in lanes)
        return (by_lane[0], losses[0]), (by_lane[1], losses[1])

    @staticmethod
    def _hand_over(grads, loss):
        """Leave one lane's gradients in .grad as a backward() at that point would: set on
        the optimizer's parameters (the runtime cleared them), accumulated on the model's
        other trainable parameters. Returns the lane's loss."""
        for p, g, own in grads.values():
            if own or p.grad is None:
                p.grad = g
            else:
                p.grad = p.grad + g
        return loss
