"""Hyperparameters of the base optimizer step that `combine_step_` applies to d.

The base step is the one of `torch.optim.SGD` or `torch.optim.AdamW` (amsgrad=False,
maximize=False), fed the combined direction d in place of the gradient:

SGD (torch.optim.SGD semantics)::

    d   <- d + weight_decay * w
    buf <- d                                        if first (momentum buffer created now)
    buf <- momentum * buf + (1 - dampening) * d     otherwise
    d   <- d + momentum * buf  if nesterov  else  buf      (only when momentum != 0)
    w   <- w - lr * d

AdamW (torch.optim.AdamW semantics, decoupled weight decay)::

    w   <- w * (1 - lr * weight_decay)
    m   <- m + (1 - beta1) * (d - m)
    s   <- beta2 * s + (1 - beta2) * d * d
    w   <- w - lr / (1 - beta1**step) * m / (sqrt(s) / sqrt(1 - beta2**step) + eps)

All values are host scalars: kernels take them as runtime arguments, so a new lr
(an lr scheduler) never recompiles anything. `BaseStep.kernel_args()` is the one host-side
packing of them that every fused backend (csrc/ and kernels/) reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

SGD = "sgd"
ADAMW = "adamw"
BASES = (SGD, ADAMW)


class KernelArgs(NamedTuple):
    """The base step as the kernels take it (derived in double precision on the host).

    kind: 0 = SGD, 1 = AdamW. hyper, SGD: (lr, weight_decay, momentum, dampening);
    AdamW: (1 - lr*weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / bias_correction1,
    sqrt(bias_correction2)). flags, SGD: (nesterov, first); AdamW: (0, 0).
    """
    kind: int
    hyper: tuple
    flags: tuple


@dataclass(frozen=True)
class BaseStep:
    kind: str = SGD
    lr: float = 1e-3
    weight_decay: float = 0.0
    # SGD
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first: bool = False  # SGD: the momentum buffer is initialised to d at this step
    # AdamW
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: int = 1  # AdamW: step count after this update (>= 1)

    def __post_init__(self):
        if self.kind not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.kind!r}")
        if self.kind == ADAMW and self.step < 1:
            raise ValueError("AdamW step count must be >= 1")

    @property
    def uses_momentum(self) -> bool:
        return self.kind == SGD and self.momentum != 0.0

    @property
    def bias_correction1(self) -> float:
        return 1.0 - self.beta1**self.step

    @property
    def bias_correction2(self) -> float:
        return 1.0 - self.beta2**self.step

    def state_names(self) -> tuple[str, ...]:
        """Names of the per-parameter state buffers this base step reads and writes."""
        if self.kind == ADAMW:
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.uses_momentum else ()

    def kernel_args(self) -> KernelArgs:
        """The host scalars of this step in the layout of csrc/op_args.h (see KernelArgs)."""
        if self.kind == ADAMW:
            hyper = (1.0 - self.lr * self.weight_decay, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2,
                     self.eps, self.lr / self.bias_correction1, self.bias_correction2 ** 0.5)
            return KernelArgs(1, tuple(float(x) for x in hyper), (0, 0))
        hyper = (self.lr, self.weight_decay, self.momentum, self.dampening)
        return KernelArgs(0, tuple(float(x) for x in hyper), (int(self.nesterov), int(self.first)))
