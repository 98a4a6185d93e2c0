"""Shared helpers of the native-op tests: devices, sizes, per-dtype tolerances, comparisons."""
import pytest
import torch

from lookahead_ext.ops import native

CPP_OK, CPP_WHY = native.available("cpp")
CUDA_OK, CUDA_WHY = native.available("cuda")

needs_cpp = pytest.mark.skipif(not CPP_OK, reason=f"C++ extension not built: {CPP_WHY}")

# (device, backend) pairs: CPU always (skipped if unbuilt), CUDA when a GPU and _C_cuda exist
DEVICES = [pytest.param("cpu", "cpp", marks=needs_cpp, id="cpp"),
           pytest.param("cuda", "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not CUDA_OK, reason=f"no CUDA backend: {CUDA_WHY}")], id="cuda")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]

# sizes: empty, one, odd, a prime above 64K (several 16K chunks), a prime above 1M; many small; mixed
SIZES = {
    "edge": [0, 1, 7],
    "prime": [65537, 131],
    "large": [1_000_003],
    "many_small": [((i * 37) % 61) + 1 for i in range(300)],
    "mixed": [3, 4099, 0, 70001, 1, 257, 16],
}
SIZES["edge_mixed"] = SIZES["edge"] + SIZES["mixed"] + [65537]
SIZE_IDS = ["edge_mixed", "large", "many_small"]

# Tolerances for results held in fp32 (state, masters): the kernels and the reference do
# the same fp32 operations, up to FMA contraction and evaluation order.
STATE_TOL = dict(rtol=2e-6, atol=2e-6)
# A parameter written in its own dtype may land one unit in the last place away when the
# fp32 values differ by an ulp at a rounding boundary.
PARAM_TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6),
             torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
             torch.float16: dict(rtol=1e-3, atol=1e-6)}


def rand(sizes, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(dtype).to(device) for n in sizes]


def clone(ts):
    return None if ts is None else [t.clone() for t in ts]


def assert_lists_close(got, want, rtol, atol):
    """|got - want| <= atol + rtol |want| elementwise (NaNs must match); a cheap assert_close."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        a, b = a.detach().float().cpu().reshape(-1), b.detach().float().cpu().reshape(-1)
        nan = a.isnan() | b.isnan()
        bad = ((a - b).abs() > atol + rtol * b.abs()) & ~nan | (a.isnan() != b.isnan())
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise AssertionError(f"tensor {i}: {int(bad.sum())}/{a.numel()} elements differ beyond "
                                 f"rtol={rtol}, atol={atol}; first at {j}: got {a[j].item()!r}, "
                                 f"want {b[j].item()!r}")
