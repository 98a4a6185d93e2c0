"""Adapters for training frameworks that step the optimizer without a closure (HF Trainer, Lightning).

Hugging Face ``Trainer`` calls ``training_step`` (forward + backward) once per micro-batch
and then, separately, ``optimizer.step()``. A probe optimizer needs the forward/backward
inside its step, so :class:`ProbeTrainerMixin` runs the whole probe step in the training
step of an update's last micro-batch, over all of that update's micro-batches, and wraps
the optimizer in :class:`DeferredStep`, whose ``step()`` without a closure is a no-op (the
update already happened). Lightning passes a closure in both optimization modes; what it
needs is a fp16 precision plugin that steps with it (:class:`ProbeMixedPrecision`) and a
refusal of the set-ups that would silently train wrong (:func:`check_lightning`,
:class:`ProbeLightningCallback`). See docs/training.md.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.optim import Optimizer

from . import amp
from .optim.runtime import LIGHTNING_ACCUMULATION

__all__ = ["DeferredStep", "ProbeTrainerMixin", "needs_closure", "check_lightning",
           "ProbeMixedPrecision", "ProbeLightningCallback"]


def probe_optimizer(optimizer):
    """The probe optimizer inside ``optimizer`` (itself, or the one a Lookahead or a
    framework's wrapper holds), or None.

    Args:
        optimizer: any optimizer; wrappers are unwrapped through their ``optimizer``
            attribute (lookahead_ext.Lookahead, accelerate's AcceleratedOptimizer,
            Lightning's LightningOptimizer, :class:`DeferredStep`).
    """
    while optimizer is not None:
        if hasattr(optimizer, "register_grad_unscaler"):  # not "probes": Lookahead delegates those
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def needs_closure(optimizer) -> bool:
    """Whether ``optimizer.step()`` must be given a closure: a probe optimizer, or a
    Lookahead around one.

    Args:
        optimizer: any optimizer, possibly wrapped (see :func:`probe_optimizer`).
    """
    return probe_optimizer(optimizer) is not None


class DeferredStep(Optimizer):
    """Wraps a probe optimizer for a framework that calls ``step()`` after its own
    backward: ``step(closure)`` runs the probe step, ``step()`` does nothing. Shares the
    wrapped optimizer's ``param_groups`` and ``state`` (lr schedulers work on it) and
    delegates ``state_dict``/``load_state_dict``.

    ``fast_weights``: when set (a list of tensors in ``param_groups`` order, as
    :class:`ProbeTrainerMixin` does while it saves a checkpoint whose model file holds the
    slow weights), ``state_dict()`` carries them under "fast_weights" and
    ``load_state_dict`` copies them back into the parameters, so that a run resumed from
    that checkpoint continues from the exact fast weights.

    Args:
        optimizer: the probe optimizer (or a :class:`lookahead_ext.Lookahead` around one) to
            wrap.
    """

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.fast_weights = None
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state

    def add_param_group(self, param_group):
        if hasattr(self, "optimizer") and not any(param_group is g for g in self.optimizer.param_groups):
            self.optimizer.add_param_group(param_group)

    def step(self, closure=None):
        if closure is None:
            return None
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self):
        sd = self.optimizer.state_dict()
        if self.fast_weights is not None:
            sd = dict(sd)
            sd["fast_weights"] = {i: t.clone() for i, t in enumerate(self.fast_weights)}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        fast = state_dict.pop("fast_weights", None)
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        if fast is not None:
            with torch.no_grad():
                for i, p in enumerate(self._params()):
                    p.copy_(fast[i])

    def __getattr__(self, name):  # num_evals, last_loss, last_grad_norm, slow_weights(), ...
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)


def _hand_over(scaler, probe_opt, stepped) -> None:
    """``amp.probes`` recorded this step's overflow flag for the probe optimizer; the
    framework will call ``scaler.step(stepped)``. Move the record to ``stepped`` as
    "unscaled", so that ``scaler.step`` neither unscales again nor refuses, calls
    ``stepped.step()`` (a no-op) only if nothing overflowed, and ``scaler.update()`` backs
    off or grows the scale from it (same private state amp.py reads)."""
    from torch.amp.grad_scaler import OptState

    states = scaler._per_optimizer_states
    st = states.pop(id(probe_opt))
    st["stage"] = OptState.UNSCALED
    states[id(stepped)] = st


class ProbeTrainerMixin:
    """Mix into ``transformers.Trainer`` (``class T(ProbeTrainerMixin, Trainer)``) to train
    with a probe optimizer (CMLR, SAM, ... or a Lookahead around one) passed as
    ``optimizers=(opt, scheduler)`` or built by ``create_optimizer``. Any other optimizer
    is left to the Trainer, untouched.

    - One probe step per optimizer update, run at the update's last micro-batch: each
      probe is the Trainer's own ``training_step`` (forward, loss scaling for
      accumulation, ``accelerator.backward``) over all of the update's
      ``gradient_accumulation_steps`` micro-batches, so accumulation equals one big batch.
      The training loss of the update is reported at its last micro-batch (0 at the others).
    - ``TrainingArguments.max_grad_norm`` (> 0) becomes the optimizer's ``max_grad_norm``
      (every probe clipped by its global norm inside the step; 0 or None: no clipping),
      and the logged ``grad_norm`` is ``opt.last_grad_norm``: this trainer's accelerator
      ``clip_grad_norm_`` returns it instead of clipping the leftover gradients.
    - fp16 (the accelerator's GradScaler): every probe's backward is scaled, the
      gradients are unscaled inside the optimizer's fused check, an overflow in any probe
      skips the update (weights and state untouched) and the scaler backs off; the
      Trainer then skips the lr scheduler, as for a plain optimizer.
    - Evaluation/prediction run on the slow weights of a lookahead optimizer; so do
      ``save_model`` and the model file of every checkpoint, whose optimizer file also
      carries the fast weights (:class:`DeferredStep`) so that resuming is exact.
    """

    def create_optimizer(self, *args, **kwargs):
        opt = super().create_optimizer(*args, **kwargs)
        if not isinstance(opt, DeferredStep) and needs_closure(opt):
            self.optimizer = DeferredStep(opt)
        return self.optimizer

    def _deferred(self):
        """The DeferredStep this trainer steps itself, or None (a plain optimizer)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, DeferredStep):
            opt = getattr(opt, "optimizer", None)  # AcceleratedOptimizer -> DeferredStep
        return opt

    def training_step(self, model, inputs, num_items_in_batch=None):
        deferred = self._deferred()
        if deferred is None:
            return super().training_step(model, inputs, num_items_in_batch)
        pending = self.__dict__.setdefault("_probe_micro_batches", [])
        pending.append(inputs)
        n = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if len(pending) < n:
            return torch.zeros((), device=self.args.device)
        batches = list(pending)
        pending.clear()
        return self._probe_step(deferred, model, batches, num_items_in_batch)

    def _probe_step(self, deferred, model, batches, num_items_in_batch):
        self._install_grad_norm()
        opt = deferred.optimizer
        max_norm = self.args.max_grad_norm
        if max_norm is not None and max_norm > 0 and not math.isfinite(max_norm):
            raise ValueError(f"max_grad_norm must be finite, got {max_norm}")
        probe_optimizer(opt).param_groups[0]["max_grad_norm"] = (
            max_norm if max_norm and max_norm > 0 else None)

        def closure():  # one probe: every micro-batch of this update, as the Trainer runs it
            total = None
            for j, mb in enumerate(batches):
                last = j == len(batches) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super(ProbeTrainerMixin, self).training_step(model, mb, num_items_in_batch)
                total = loss if total is None else total + loss
            return total

        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            for probe in amp.probes(opt, scaler):
                with torch.enable_grad():
                    probe.loss = closure()
            _hand_over(scaler, opt, deferred)
            loss = probe_optimizer(opt).last_loss
        else:
            loss = opt.step(closure)
        return loss.detach() if loss is not None else torch.zeros((), device=self.args.device)

    def _install_grad_norm(self) -> None:
        """The Trainer clips (and logs the norm) after training_step; with a probe
        optimizer the clipping already happened per probe, so this trainer's accelerator
        ``clip_grad_norm_`` reports the step's ``last_grad_norm`` instead."""
        acc = self.accelerator
        if getattr(acc.clip_grad_norm_, "_probe_trainer", False):
            return
        plain = acc.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, norm_type=2):
            deferred = self._deferred()
            if deferred is None:
                return plain(parameters, max_norm, norm_type)
            norm = probe_optimizer(deferred).last_grad_norm
            return torch.tensor(math.nan if norm is None else norm)

        clip_grad_norm_._probe_trainer = True
        acc.clip_grad_norm_ = clip_grad_norm_

    # -- slow weights for evaluation and saving -------------------------------------------
    @contextlib.contextmanager
    def _on_slow_weights(self, keep_fast=False):
        """The model on the slow weights (a lookahead optimizer), else unchanged.
        ``keep_fast``: the optimizer's state_dict carries the fast weights meanwhile."""
        deferred = self._deferred()
        opt = None if deferred is None else deferred.optimizer
        # ProbeOptimizer.lookahead is False for SAM, FR, CR (no slow weights); Lookahead has them
        has_slow = hasattr(opt, "slow_weights") and getattr(opt, "lookahead", True)
        if not has_slow or self.__dict__.get("_on_slow"):
            yield
            return
        if keep_fast:
            deferred.fast_weights = [p.detach().clone() for p in deferred._params()]
        try:
            with opt.slow_weights():
                self._on_slow = True
                yield
        finally:
            self._on_slow = False
            deferred.fast_weights = None

    def evaluation_loop(self, *args, **kwargs):
        with self._on_slow_weights():
            return super().evaluation_loop(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        with self._on_slow_weights():
            return super().save_model(*args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        with self._on_slow_weights(keep_fast=True):
            return super()._save_checkpoint(*args, **kwargs)


# -- PyTorch Lightning ----------------------------------------------------------------------
def check_lightning(trainer, pl_module) -> None:
    """Refuse, with a clear error, Lightning set-ups that would train a probe optimizer
    wrong: automatic optimization with ``accumulate_grad_batches > 1``, and Lightning's
    own fp16 ``MixedPrecision`` plugin (it calls the closure once, then
    ``scaler.step(opt)`` without it). Without this check the first would fail at the
    first optimizer step (the optimizer finds the earlier batches' gradients and
    Lightning's closure) and the second at the first step too (no closure).

    Args:
        trainer: the ``pytorch_lightning.Trainer`` (its optimizers are checked).
        pl_module: the LightningModule (its ``automatic_optimization`` is read).

    Raises:
        ValueError: naming the optimizer and the setting to change.
    """
    from pytorch_lightning.plugins.precision import MixedPrecision

    for opt in trainer.optimizers:
        if not needs_closure(opt):
            continue
        name = type(opt).__name__
        n = trainer.accumulate_grad_batches
        if pl_module.automatic_optimization and n != 1:
            raise ValueError(LIGHTNING_ACCUMULATION.format(name=name))
        plugin = trainer.precision_plugin
        if (isinstance(plugin, MixedPrecision) and plugin.scaler is not None
                and not isinstance(plugin, __getattr__("ProbeMixedPrecision"))):
            raise ValueError(f"{name} under precision='16-mixed' needs "
                             "plugins=[lookahead_ext.integrations.ProbeMixedPrecision('16-mixed', "
                             "device)] in place of the precision flag: Lightning's plugin steps "
                             "the optimizer without the closure")


def _lightning_classes():
    """ProbeMixedPrecision and ProbeLightningCallback, built on first use (Lightning is optional)."""
    import pytorch_lightning as pl
    from pytorch_lightning.plugins.precision import MixedPrecision
    from pytorch_lightning.utilities import GradClipAlgorithmType

    class ProbeMixedPrecision(MixedPrecision):
        """Lightning's ``MixedPrecision`` ("16-mixed", "bf16-mixed") for probe optimizers:
        ``plugins=[ProbeMixedPrecision("16-mixed", "cpu" or "cuda")]``.

        With fp16's GradScaler the probe step runs through :func:`lookahead_ext.amp.probes`:
        Lightning's closure (training_step and the scaled backward) runs once per probe,
        each probe's gradients are unscaled in the optimizer's fused check, an overflow in
        any probe skips the update and the scale backs off. ``gradient_clip_val`` (norm)
        becomes the optimizer's ``max_grad_norm`` (the unscaled norm of every probe);
        clipping by value is refused. Other optimizers, and bf16, take Lightning's path."""

        def _probing(self, optimizer) -> bool:
            return self.scaler is not None and hasattr(optimizer, "probes")

        def optimizer_step(self, optimizer, model, closure, **kwargs):
            if not self._probing(optimizer):
                return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
            first = None
            for probe in amp.probes(optimizer, self.scaler):
                with torch.enable_grad():
                    out = closure()
                self._after_closure(model, optimizer)  # hooks and clip_gradients below
                probe.loss = out
                first = out if probe.index == 0 else first
            self.scaler.update()
            return first

        def clip_gradients(self, optimizer, clip_val=0.0,
                           gradient_clip_algorithm=GradClipAlgorithmType.NORM):
            if not self._probing(optimizer):
                return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
            if not clip_val or clip_val <= 0:
                return
            if gradient_clip_algorithm != GradClipAlgorithmType.NORM:
                raise ValueError(f"{type(optimizer).__name__} under fp16 clips by norm only "
                                 "(gradient_clip_algorithm='norm')")
            optimizer.param_groups[0]["max_grad_norm"] = float(clip_val)  # read by each capture

    class ProbeLightningCallback(pl.Callback):
        """``callbacks=[ProbeLightningCallback()]``: :func:`check_lightning` at fit start."""

        def on_fit_start(self, trainer, pl_module):
            check_lightning(trainer, pl_module)

    return {"ProbeMixedPrecision": ProbeMixedPrecision,
            "ProbeLightningCallback": ProbeLightningCallback}


def __getattr__(name):
    if name in ("ProbeMixedPrecision", "ProbeLightningCallback"):
        if name not in globals():  # built once: isinstance checks need the one class
            globals().update(_lightning_classes())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
