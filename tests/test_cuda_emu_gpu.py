"""What the emulated CUDA build cannot show (docs/cuda-emulation.md), on a real GPU: the host
path of the CUDA ops for CPU scalars with CUDA lists, and the device bf16 NaN payload."""
import math

import pytest
import torch

from lookahead_ext.ops import native
from lookahead_ext.ops.base_step import BaseStep

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available() or not native.available("cuda")[0],
                                                   reason="needs a GPU and the CUDA backend")]


def test_cuda_ops_accept_cpu_scalars():
    """A CPU 0-d scale / v coefficient with CUDA lists is read as a host value (as
    torch._foreach_* accept CPU scalars); the result matches a device scalar's."""
    dev = "cuda"
    base = [torch.randn(1000, device=dev)]
    d = [torch.randn(1000, device=dev)]
    out_a, out_b = [torch.empty(1000, device=dev)], [torch.empty(1000, device=dev)]
    native.perturb_(out_a, base, d, torch.tensor(0.5))
    native.perturb_(out_b, base, d, torch.tensor(0.5, device=dev))
    assert torch.equal(out_a[0], out_b[0])
    step = BaseStep("sgd", lr=0.1)
    runs = []
    for where in ("cpu", dev):
        p, m, g, v = ([t.clone() for t in base] for _ in range(4))
        vc = tuple(torch.tensor(x, device=where) for x in (0.9, 0.1, 0.2, 0.3))
        native.combine_step_(p, m, (g, g, g), (0.1, 1.0, -1.0), step, {}, v, vc)
        runs.append((p[0], v[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not math.isnan(float(runs[0][1].sum()))


def test_cuda_bf16_nan_payload_matches_cpu():
    """A NaN produced by a kernel is stored as the same bf16 bits on both devices (0x7fc0)."""
    out = {}
    for dev in ("cpu", "cuda"):
        o = [torch.zeros(8, dtype=torch.bfloat16, device=dev)]
        base = [torch.full((8,), float("inf"), device=dev)]
        d = [torch.full((8,), float("-inf"), device=dev)]
        native.perturb_(o, base, d, 1.0)  # inf + (-inf) = NaN
        out[dev] = o[0].cpu().view(torch.int16)
    assert torch.equal(out["cpu"], out["cuda"])
