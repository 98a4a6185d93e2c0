"""Triton-backend specifics (kernels/; conformance to the reference is test_op_conformance.py):
lazy import, availability and dtype support, the pointer-table cache, alignment groups,
argument errors, no recompilation for new hyperparameters, GPU sizes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lookahead_ext import ops
from lookahead_ext.ops import BaseStep

from _compare import Tol, assert_close, assert_lists_close
from lookahead_ext.ops import reference as R

from op_db import combine_inputs, make

# Compiled kernels on a GPU when there is one (conftest leaves TRITON_INTERPRET unset
# then); the interpreter on CPU tensors otherwise.
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
_AVAIL = ops.available_backends().get("triton", "missing")
pytestmark = pytest.mark.skipif(_AVAIL != "ok", reason=f"triton backend unavailable: {_AVAIL}")
ULP = Tol(1e-5, 1e-6, 1.001)  # the Triton rows' "param" tolerance for bf16/fp16
F32 = Tol(1e-5, 1e-6)


def gpu_only(fn):
    """GPU test mode: compiled kernels at realistic sizes (marker `cuda`)."""
    return pytest.mark.cuda(pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled Triton kernels)")(fn))


def T():
    """The Triton backend."""
    return ops.resolve("triton", DEVICE, torch.float32)


def randn(sizes, dtype, seed=0):
    return make(sizes, dtype, DEVICE, seed=seed)


def poison(sizes, dtype):
    return [torch.full((n,), float("nan"), dtype=dtype, device=DEVICE) for n in sizes]


# ----------------------------------------------------------------------------- harness
def test_assert_close_catches_unwritten_and_off_by_two_ulp():
    """The comparison must be able to fail: a poisoned (NaN) element, or 2 ulp off."""
    e = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), e, ULP)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, 2.0 + 2 * 2 ** -6], dtype=torch.bfloat16), e, ULP)
    assert_close(torch.tensor([1.0, 2.0 + 2 ** -6], dtype=torch.bfloat16), e, ULP)  # one ulp ok
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, 2.001]), torch.tensor([1.0, 2.0]), F32)
    with pytest.raises(AssertionError):  # infinities must match
        assert_close(torch.tensor([float("inf")]), torch.tensor([float("-inf")]), F32)


def test_import_does_not_import_triton():
    code = "import sys, lookahead_ext; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unavailable_backend_raises_clear_error(monkeypatch):
    ops.register_backend("triton", "lookahead_ext.ops._no_such_triton_backend")
    try:
        with pytest.raises(ops.BackendUnavailable, match="triton"):
            ops.sq_norm([torch.ones(3)], backend="triton")
    finally:
        ops.register_backend("triton", "lookahead_ext.ops.triton_backend")


def test_supports():
    mod = T()
    assert mod.supports(DEVICE, torch.float32)
    assert mod.supports(DEVICE, torch.bfloat16)
    assert not mod.supports(DEVICE, torch.float64)
    assert not mod.supports(DEVICE, torch.int32)
    assert isinstance(mod, ops.Backend)
    with pytest.raises(ops.BackendUnavailable):
        ops.sq_norm([torch.ones(3, dtype=torch.float64, device=DEVICE)], backend="triton")
    # auto falls back to the reference for float64
    x = [torch.ones(3, dtype=torch.float64, device=DEVICE)]
    assert float(ops.sq_norm(x, backend="auto")) == 3.0


def test_perturb_cache_is_safe_when_addresses_are_reused():
    """Same sizes re-allocated (the allocator may hand back the same addresses, with new
    contents, or different ones): results must follow the tensors, never a stale table."""
    for it in range(4):
        base = randn([1500, 3], torch.float32, seed=10 + it)
        d = randn([1500, 3], torch.float32, seed=20 + it)
        out_t, out_r = poison([1500, 3], torch.float32), poison([1500, 3], torch.float32)
        T().perturb_(out_t, base, d, float(it) + 0.5)
        R.perturb_(out_r, base, d, float(it) + 0.5)
        assert_lists_close(out_t, out_r, F32, f"iter {it}")
        del base, d, out_t, out_r
    # same addresses, different dtype -> different table
    x = torch.zeros(64, device=DEVICE)
    T().perturb_([x], [torch.ones(64, device=DEVICE)], [torch.ones(64, device=DEVICE)], 1.0)
    assert torch.all(x == 2.0)


def test_tables_are_reused_for_the_same_tensors():
    from lookahead_ext.kernels import _mta
    base, d = randn([300, 5], torch.float32, seed=1), randn([300, 5], torch.float32, seed=2)
    out = poison([300, 5], torch.float32)
    T().perturb_(out, base, d, 0.1)
    n = len(_mta._CACHE)
    key_hits = [k for k in _mta._CACHE]
    T().perturb_(out, base, d, 0.2)  # new scale: same table, no new entry
    assert len(_mta._CACHE) == n and list(_mta._CACHE) == key_hits


def test_mismatched_sizes_are_rejected():
    with pytest.raises(ValueError, match="size mismatch"):
        T().perturb_([torch.empty(3, device=DEVICE)], [torch.empty(4, device=DEVICE)],
                     [torch.empty(3, device=DEVICE)], 1.0)
    with pytest.raises(ValueError, match="same length"):
        T().lookahead_sync_([torch.empty(3, device=DEVICE)], [], 0.5)


def test_empty_lists():
    assert float(T().nonfinite_([[]])) == 0.0
    assert T().multi_dot([[]], [(0, 0)]).shape == (1,)
    T().perturb_([], [], [], 1.0)
    T().lookahead_sync_([], [], 0.5)


def test_interpreted_kernels_call_no_repatching_device_function():
    """Under the interpreter, a jit device function called from a kernel as itself re-patches
    triton.language at every call (~1.4 ms); the kernels call them through _mta.device_fn /
    _mta.helper (tl.zeros as tl.full). Counted over one launch of every op, with the combine
    kernel's d/v terms and device scalars in use."""
    if ON_GPU:
        pytest.skip("the interpreter's device-function calls")
    from triton.runtime import interpreter
    calls = []
    orig = interpreter.InterpretedFunction.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.fn.__name__)
        return orig(self, *args, **kwargs)
    t = T()
    sizes = [3, 1030]
    masters, grads, coefs, state, v, vc = combine_inputs(sizes, torch.float32, DEVICE, "central", BaseStep(
        "adamw", lr=1e-2, step=3))
    params = [m.bfloat16() for m in masters]
    x, y = randn(sizes, torch.float32, 1), randn(sizes, torch.bfloat16, 2)
    mp = pytest.MonkeyPatch()
    mp.setattr(interpreter.InterpretedFunction, "__call__", counting)
    try:
        t.combine_step_(params, masters, grads, coefs, BaseStep("adamw", lr=1e-2, step=3), state, v, vc,
                        torch.zeros(1, device=DEVICE), True)
        t.multi_dot([x, y], [(0, 0), (0, 1)], True)
        t.nonfinite_([x, y], torch.tensor(0.5, device=DEVICE), True)
        t.perturb_(poison(sizes, torch.float32), x, x, 0.5)
        t.lookahead_sync_(randn(sizes, torch.float32, 3), x, 0.5)
    finally:
        mp.undo()
    assert calls == [], sorted(set(calls))


# ----------------------------------------------------------------------------- GPU mode
def _n_compiled(fn) -> int:
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        return len(getattr(fn, "cache", {}).get(torch.cuda.current_device(), {}))
    return sum(len(v[0]) for v in caches.values())


@gpu_only
def test_new_hyperparameters_do_not_recompile():
    from lookahead_ext.kernels import combine_step as cs
    sizes = [1000, 3]
    for i, lr in enumerate([0.1, 0.05, 0.01]):
        base = BaseStep(kind="adamw", lr=lr, weight_decay=0.01 * (i + 1), step=i + 1)
        masters, grads, coefs, state, v, v_coefs = combine_inputs(sizes, torch.float32, DEVICE, "central", base)
        T().combine_step_(poison(sizes, torch.float32), masters, grads, coefs, base, state, v, v_coefs)
        if i == 0:
            n0 = _n_compiled(cs._combine_kernel)
    assert _n_compiled(cs._combine_kernel) == n0


def test_misaligned_views_are_handled():
    """Views at odd element offsets (unaligned pointers) go to their own, unhinted launch."""
    flat = torch.randn(20000, device=DEVICE)
    views = [flat[1:5001], flat[5001:5003], flat[6000:10096]]  # offsets 1 (4 B), 5001, 6000
    base = [torch.randn(v.numel(), device=DEVICE) for v in views] + [torch.randn(3000, device=DEVICE)]
    d = randn([v.numel() for v in base], torch.float32, seed=3)
    out_t = [v for v in views] + [torch.full((3000,), float("nan"), device=DEVICE)]
    out_r = [v.clone() for v in out_t]
    T().perturb_(out_t, base, d, 0.25)
    R.perturb_(out_r, base, d, 0.25)
    assert_lists_close(out_t, out_r, F32, "views")
    from lookahead_ext.kernels import _mta
    p = _mta.plan([out_t, base, d, None], DEVICE)
    assert sorted(g.aligned for g in p.groups) == [False, True]


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_auto_on_cuda_resolves_to_a_fused_backend():
    impl = ops.resolve("auto", torch.device("cuda"), torch.float32)
    assert impl is not R or ops.available_backends()["triton"] != "ok"
