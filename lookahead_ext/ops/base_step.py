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

Values are host scalars, or (``lr``, ``step``, ``first``) 0-d tensors on the parameters'
device: kernels take them as runtime arguments, so a new lr (an lr scheduler) never
recompiles anything. `BaseStep.kernel_args()` is the one host-side packing of them that
every fused backend (csrc/ and kernels/) reads. With a tensor field, `BaseStep.device_args()`
packs the same values into ONE float64 device tensor, computed with torch ops on the device
(no host read), and the kernels read the scalars from it. Its layout (csrc/op_args.h reads
it), ``len(hyper) + 2`` float64 entries, KernelArgs' order::

    SGD   (6): lr, weight_decay, momentum, dampening, nesterov, first
    AdamW (9): 1 - lr*weight_decay, 1 - beta1, beta2, 1 - beta2, eps, lr / bias_correction1,
               sqrt(bias_correction2), 0, 0

Every entry is the double the host path computes (same operations, same order: Python's
``beta ** step`` and ``x ** 0.5`` are ``pow`` on the CPU, so the host and device packings
are equal bit for bit there); the kernels round each to float32 exactly as they round the
host values. On CUDA, ``pow`` is the device's (within an ulp of double): the float32
values can differ from the host path's only where that ulp crosses a float32 rounding
boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

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


# BaseStep fields that may be 0-d device tensors (read on the device only)
DEVICE_FIELDS = ("lr", "step", "first")


def _check_device_field(name: str, x) -> None:
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.is_complex():
            raise ValueError(f"BaseStep.{name}: a tensor {name} must be a real tensor with one element, got "
                             f"{x.dtype} of shape {tuple(x.shape)}")


@dataclass(frozen=True)
class BaseStep:
    """The SGD / AdamW step of `combine_step_` (the math: this module's docstring).

    Args:
        kind: "sgd" or "adamw".
        lr: learning rate: a float, or a 0-d tensor on the parameters' device.
        weight_decay, momentum, dampening, nesterov, beta1, beta2, eps: host floats/bools.
        first: SGD: the momentum buffer is initialised to d at this step: a bool, or a 0-d
            tensor (nonzero: True).
        step: AdamW: the step count after this update (>= 1): an int, or a 0-d tensor (not
            checked on the host).
        args: with tensor fields, a float64 tensor of ``n_device_args`` elements that
            `device_args()` writes into (a persistent buffer: no allocation per step).
    """
    kind: str = SGD
    lr: Union[float, Tensor] = 1e-3
    weight_decay: float = 0.0
    # SGD
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    first: Union[bool, Tensor] = False  # SGD: the momentum buffer is initialised to d at this step
    # AdamW
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: Union[int, Tensor] = 1  # AdamW: step count after this update (>= 1)
    args: Optional[Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.kind!r}")
        for name in DEVICE_FIELDS:
            _check_device_field(name, getattr(self, name))
        if self.kind == ADAMW and not isinstance(self.step, Tensor) and self.step < 1:
            raise ValueError("AdamW step count must be >= 1")

    @property
    def on_device(self) -> bool:
        """Some field (lr, step, first) is a tensor: the kernels read `device_args()`."""
        return any(isinstance(getattr(self, n), Tensor) for n in DEVICE_FIELDS)

    def device(self) -> Optional[torch.device]:
        """The device of the tensor fields (None: all host numbers)."""
        for n in DEVICE_FIELDS:
            x = getattr(self, n)
            if isinstance(x, Tensor):
                return x.device
        return None

    @property
    def uses_momentum(self) -> bool:
        return self.kind == SGD and self.momentum != 0.0

    @property
    def bias_correction1(self):
        """1 - beta1**step (a float64 0-d tensor when step is a tensor)."""
        return 1.0 - _pow(self.beta1, self.step)

    @property
    def bias_correction2(self):
        """1 - beta2**step (a float64 0-d tensor when step is a tensor)."""
        return 1.0 - _pow(self.beta2, self.step)

    def state_names(self) -> tuple[str, ...]:
        """Names of the per-parameter state buffers this base step reads and writes."""
        if self.kind == ADAMW:
            return ("exp_avg", "exp_avg_sq")
        return ("momentum_buffer",) if self.uses_momentum else ()

    def kernel_args(self) -> KernelArgs:
        """The host scalars of this step in the layout of csrc/op_args.h (see KernelArgs).
        With tensor fields, the entries derived from them are 0 here (never read on the
        host): the kernels take those from `device_args()`."""
        if self.on_device:
            host = self._host_twin()
            return host.kernel_args()
        if self.kind == ADAMW:
            hyper = (1.0 - self.lr * self.weight_decay, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2,
                     self.eps, self.lr / self.bias_correction1, self.bias_correction2 ** 0.5)
            return KernelArgs(1, tuple(float(x) for x in hyper), (0, 0))
        hyper = (self.lr, self.weight_decay, self.momentum, self.dampening)
        return KernelArgs(0, tuple(float(x) for x in hyper), (int(self.nesterov), int(self.first)))

    def _host_twin(self) -> "BaseStep":
        """This step with placeholder host numbers for the tensor fields (lr 0, step 1,
        first False): the structure (kind, state buffers, momentum) without a host read."""
        from dataclasses import replace
        return replace(self, lr=0.0 if isinstance(self.lr, Tensor) else self.lr,
                       step=1 if isinstance(self.step, Tensor) else self.step,
                       first=False if isinstance(self.first, Tensor) else self.first)

    def device_entries(self, device) -> list:
        """The entries of `device_args()` as the reference backend uses them: those derived
        from a tensor field as float64 0-d tensors on `device` (views of one `device_args()`),
        the others as the host path's floats (`kernel_args()`)."""
        lr_t = isinstance(self.lr, Tensor)
        if self.kind == ADAMW:
            step_t = isinstance(self.step, Tensor)
            derived = (lr_t, False, False, False, False, lr_t or step_t, step_t, False, False)
        else:
            derived = (lr_t, False, False, False, False, isinstance(self.first, Tensor))
        k = self.kernel_args()  # host numbers (placeholders where derived)
        host = [float(x) for x in k.hyper + k.flags]
        args = self.device_args(device).unbind(0) if any(derived) else None
        return [args[i] if d else host[i] for i, d in enumerate(derived)]

    @property
    def n_device_args(self) -> int:
        """The number of entries of `device_args()` (module docstring)."""
        return 9 if self.kind == ADAMW else 6

    def device_args(self, device=None, out: Optional[Tensor] = None) -> Tensor:
        """ONE float64 tensor on `device` (default: the tensor fields' device) with the
        kernels' scalars in KernelArgs' order (module docstring), written with in-place
        device ops only (no host read, no host-to-device copy, no temporary tensor).
        ``out`` (default: the ``args`` field): a float64 tensor of ``n_device_args``
        elements to write into; without either, a new one."""
        device = torch.device(device) if device is not None else (self.device() or torch.device("cpu"))
        n = self.n_device_args
        out = self.args if out is None else out
        if out is None:
            out = torch.empty(n, dtype=torch.float64, device=device)
        elif out.dtype != torch.float64 or out.numel() != n or out.device != device:
            raise ValueError(f"BaseStep.device_args: out must be a float64 tensor of {n} elements on "
                             f"{device}, got {out.dtype} of shape {tuple(out.shape)} on {out.device}")
        e = out.view(-1).unbind(0)
        _put(e[0], self.lr)
        if self.kind == ADAMW:
            # entries 7 and 8 (zero in the end) hold the step and 1 - beta**step meanwhile
            step, bc = e[8], e[7]
            _put(step, self.step)
            if isinstance(self.lr, Tensor):
                e[0].mul_(self.weight_decay).neg_().add_(1.0)   # 1 - lr*wd (1 + -x is 1 - x exactly)
            else:
                e[0].fill_(1.0 - self.lr * self.weight_decay)
            for i, x in ((1, 1.0 - self.beta1), (2, self.beta2), (3, 1.0 - self.beta2), (4, self.eps)):
                e[i].fill_(x)
            bc.fill_(self.beta1).pow_(step).neg_().add_(1.0)    # bias_correction1
            _put(e[5], self.lr).div_(bc)                        # lr / bias_correction1
            bc.fill_(self.beta2).pow_(step).neg_().add_(1.0)    # bias_correction2
            # its square root as pow(x, 0.5) with a tensor exponent (a scalar 0.5 is sqrt)
            torch.pow(bc, e[6].fill_(0.5), out=e[6])
            bc.zero_()
            step.zero_()
            return out
        for i, x in ((1, self.weight_decay), (2, self.momentum), (3, self.dampening),
                     (4, float(bool(self.nesterov)))):
            e[i].fill_(x)
        if isinstance(self.first, Tensor):
            e[5].copy_(self.first.detach().reshape(())).ne_(0.0)
        else:
            e[5].fill_(float(bool(self.first)))
        return out


def _put(slot: Tensor, x) -> Tensor:
    """slot <- x (a tensor field: its value as a float64, exact for float32/int values; a
    host number: the host path's double)."""
    if isinstance(x, Tensor):
        return slot.copy_(x.detach().reshape(()))
    return slot.fill_(float(x))


def _pow(beta: float, step):
    """beta**step: Python's pow for a host step, torch.pow (the same C pow on the CPU) in
    float64 for a tensor step."""
    if isinstance(step, Tensor):
        s = step.detach().reshape(()).to(torch.float64)
        return torch.pow(torch.full_like(s, beta), s)
    return beta**step
