"""optim_db: every optimizer with its constructor kwargs (torch OptimInfo style), for the parity matrix.

An entry builds the optimizer for a parameter list and a backend name. `dtypes`: the parameter
dtypes it runs with (intersected with the row's); `closure`: step(closure) or the
zero_grad / backward / step() loop. Baselines are looked up by class name (their kwargs may
change: entries stay minimal). LookaheadBio is not here: it takes a model and a loss, not params.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import lookahead_ext as la
from lookahead_ext.optim import baselines


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: object
    kwargs: dict = field(default_factory=dict)
    inner: object = None       # Lookahead: the wrapped torch optimizer class and its kwargs
    inner_kwargs: dict = field(default_factory=dict)
    dtypes: tuple = (torch.float32, torch.bfloat16, torch.float16)
    closure: bool = True

    def make(self, params, backend: str):
        if self.inner is not None:
            return self.cls(self.inner(params, **self.inner_kwargs), backend=backend, **self.kwargs)
        return self.cls(params, backend=backend, **self.kwargs)


FP32 = (torch.float32,)
optim_db = [
    OptimInfo("CMLR", la.CMLR, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, k=3)),
    OptimInfo("CMLR_k4", la.CMLR, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, k=4), dtypes=FP32),
    OptimInfo("CMLR_adamw", la.CMLR, dict(lr=1e-2, base="adamw", weight_decay=1e-2, k=3)),
    OptimInfo("FMLR", la.FMLR, dict(lr=0.05, momentum=0.9, nesterov=True, k=2)),
    OptimInfo("FMLR_plain_k5", la.FMLR, dict(lr=0.05, k=5), dtypes=FP32),
    OptimInfo("SAM", la.SAM, dict(lr=0.05, momentum=0.5, nesterov=True)),
    OptimInfo("SAM_adamw", la.SAM, dict(lr=1e-2, base="adamw")),
    OptimInfo("CLR", la.CLR, dict(lr=0.05, k=2)),
    OptimInfo("MLSAM", la.MLSAM, dict(lr=0.05, momentum=0.9, k=3), dtypes=FP32),
    OptimInfo("LR", la.LR, dict(lr=0.05, k=3), dtypes=FP32),
    OptimInfo("FR", la.FR, dict(lr=0.05, momentum=0.9), dtypes=FP32),
    OptimInfo("CR", la.CR, dict(lr=0.05, momentum=0.9), dtypes=FP32),
    OptimInfo("LookbehindSAM", getattr(baselines, "LookbehindSAM"), dict(lr=0.05, k=2), dtypes=FP32),
    OptimInfo("GSAM", getattr(baselines, "GSAM"), dict(lr=0.05), dtypes=FP32),
    OptimInfo("CRSAM", getattr(baselines, "CRSAM"), dict(lr=0.05), dtypes=FP32),
    OptimInfo("Lookahead_SGD", la.Lookahead, dict(k=3, alpha=0.5), torch.optim.SGD, dict(lr=0.1, momentum=0.9),
              closure=False),
    # eps=1e-3: torch.optim.AdamW keeps fp16 state for fp16 params, where 1e-8 underflows
    OptimInfo("Lookahead_AdamW", la.Lookahead, dict(k=2, alpha=0.8), torch.optim.AdamW, dict(lr=1e-2, eps=1e-3),
              closure=False),
]
OPTIM_IDS = [o.name for o in optim_db]

# Parity tolerance per (row table, dtype) after the row's steps. fp32: the kernels mirror the
# reference's operation order, the norms differ in summation order only. bf16/fp16: a parameter
# cast can differ by one ulp and feeds back through the forward passes (Triton interpreter,
# measured: fp32 <= 6e-8, bf16 <= 6e-3, fp16 <= 1.3e-4 after 7 steps).
OPTIM_TOLS = {
    "native": {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
               torch.float16: dict(rtol=5e-3, atol=1e-3)},
    "triton": {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=1e-2),
               torch.float16: dict(rtol=5e-3, atol=1e-3)},
}
