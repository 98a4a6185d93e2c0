"""BatchNorm running statistics during the probe passes of a multi-probe step.

A probe optimizer runs the model 2-3 times per step, at perturbed weights. Left alone,
every pass updates the BatchNorm running mean/var (and ``num_batches_tracked``), so the
running statistics move 2-3 times per step and partly at weights the model never takes.
``apply_batchnorm_mode(model, optimizer, mode)`` decides which passes may update them:

- ``"first"`` (default): only the first evaluation of each step (probe index 0; all its
  micro-batches when it accumulates gradients) updates the running stats;
- ``"never"``: no evaluation inside an optimizer step updates them (they stay frozen;
  update them yourself, e.g. with ``torch.optim.swa_utils.update_bn``);
- ``"always"``: every evaluation updates them (PyTorch's behaviour without the helper).

In every mode the layers normalise with the batch statistics in training mode, as usual;
only the running-stat update is suppressed, by running the layer as if
``track_running_stats`` were False for that call (the buffers are not touched at all).
Forward passes outside an optimizer step and layers in eval mode are never affected. Works with ``nn.SyncBatchNorm`` and with any
``_BatchNorm`` subclass; for a plain torch optimizer or ``Lookahead`` the helper is a no-op.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BN_MODES", "apply_batchnorm_mode", "BatchNormProbeMode"]

BN_MODES = ("first", "never", "always")


class BatchNormProbeMode:
    """Handle returned by :func:`apply_batchnorm_mode`; ``remove()`` undoes it. ``mode`` may
    be changed at any time.

    It registers two probe hooks on the optimizer (which ``step(closure)``, ``probes()``,
    ``lookahead_ext.amp`` and ``lookahead_ext.distributed`` all run): before each probe that
    must not update the running stats, the BatchNorm layers in training mode get
    ``track_running_stats = False``; after the probe (also when the step is abandoned
    during it) the flags are restored. No forward hooks, so a ``torch.compile``d model sees
    just two variants of each BatchNorm layer (tracking or not) and never recompiles beyond
    them.

    Args:
        model: the module whose ``_BatchNorm`` layers (``nn.SyncBatchNorm`` included) are
            governed.
        optimizer: the probe optimizer whose probes are watched.
        mode: ``"first"`` (default: only each step's first evaluation updates the running
            stats), ``"never"`` or ``"always"`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, optimizer, mode: str = "first"):
        if mode not in BN_MODES:
            raise ValueError(f"mode must be one of {BN_MODES}, got {mode!r}")
        self.mode, self.optimizer = mode, optimizer
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self._frozen: list = []
        self._handles = []
        if hasattr(optimizer, "register_probe_pre_hook"):  # plain torch optimizers: nothing to do
            self._handles = [optimizer.register_probe_pre_hook(self._before),
                             optimizer.register_probe_hook(self._after, always_call=True)]

    def _freeze(self, probe) -> bool:
        if self.mode == "always":
            return False
        return self.mode == "never" or probe.index > 0

    def _before(self, optimizer, probe) -> None:
        if self._freeze(probe):
            for m in self.layers:
                if m.training and m.track_running_stats:
                    m.track_running_stats = False
                    self._frozen.append(m)

    def _after(self, optimizer, probe, params) -> None:
        for m in self._frozen:
            m.track_running_stats = True
        self._frozen = []

    def remove(self) -> None:
        self._after(None, None, None)  # removed mid-probe: unfreeze now
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_batchnorm_mode(model: nn.Module, optimizer, mode: str = "first") -> BatchNormProbeMode:
    """Apply a BatchNorm probe mode ("first", "never", "always") to every BatchNorm layer of
    ``model`` for the steps of ``optimizer``. Returns a handle (also a context manager).

    Args:
        model: the module whose BatchNorm layers (any ``_BatchNorm``) follow the mode.
        optimizer: the probe optimizer (or a Lookahead around one) whose probes are counted.
        mode: "first" (only each step's first evaluation updates the running stats),
            "never" or "always" (see the module docstring). Default: "first".
    """
    return BatchNormProbeMode(model, optimizer, mode)
