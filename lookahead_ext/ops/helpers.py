"""Helpers shared by every backend of the fused ops: precision rule, argument checks, linear combinations."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

TensorList = Sequence[Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic happens in: float64 for float64 tensors, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(ts: TensorList, dtype: torch.dtype) -> list[Tensor]:
    """The tensors of `ts` in `dtype` (the same objects where they already have it)."""
    return [t if t.dtype == dtype else t.to(dtype) for t in ts]


def check_same_length(op: str, lists) -> int:
    """Length shared by the tensor lists of one op call (raises ValueError otherwise)."""
    n = len(lists[0]) if lists else 0
    for lst in lists:
        if len(lst) != n:
            raise ValueError(f"{op}: all tensor lists must have the same length")
    return n


def check_scale(scale) -> None:
    """perturb_'s `scale`: a float or a one-element tensor read as a scalar (0-d or [1])."""
    if isinstance(scale, Tensor) and scale.numel() != 1:
        raise ValueError(f"perturb_: scale must be a float or a tensor with one element, "
                         f"got shape {tuple(scale.shape)}")


def linear_combination(terms: Sequence[tuple[object, Optional[TensorList]]], like: TensorList, cdt) -> list[Tensor]:
    """sum_k coef_k * lists_k (elementwise over the list) in dtype `cdt`, skipping None lists
    and float zero coefficients; zeros shaped like `like` when no term remains."""
    acc = None
    for coef, lst in terms:
        if lst is None or (not isinstance(coef, Tensor) and coef == 0.0):
            continue
        x = upcast(lst, cdt)
        c = coef.to(cdt) if isinstance(coef, Tensor) else float(coef)
        term = torch._foreach_mul(x, c)
        acc = term if acc is None else torch._foreach_add(acc, term)
    if acc is None:
        acc = [torch.zeros_like(t, dtype=cdt) for t in like]
    return acc


def check_combine_extras(params, masters, v, v_sq_out, write_masters: bool) -> None:
    """Validate combine_step_'s v_sq_out / write_masters (shared by every backend)."""
    if v_sq_out is not None:
        if v is None:
            raise ValueError("combine_step_: v_sq_out needs v (it accumulates sum v_new^2)")
        if not isinstance(v_sq_out, Tensor) or v_sq_out.dtype != torch.float32 or v_sq_out.numel() != 1:
            raise ValueError("combine_step_: v_sq_out must be a float32 tensor with one element, got "
                             f"{getattr(v_sq_out, 'dtype', type(v_sq_out))} {tuple(getattr(v_sq_out, 'shape', ()))}")
        if params and v_sq_out.device != params[0].device:
            raise ValueError(f"combine_step_: v_sq_out is on {v_sq_out.device}, params on {params[0].device}")
    if not write_masters:
        for i, (p, m) in enumerate(zip(params, masters)):
            if p.dtype != m.dtype:
                raise ValueError(f"combine_step_: write_masters=False needs params of the masters' dtype "
                                 f"({m.dtype}); params[{i}] is {p.dtype}")
