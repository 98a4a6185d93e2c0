"""Triton kernels vs the reference ops: every op x dtype x sizes (interpreter on CPU,
compiled kernels on CUDA when a GPU is present)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lookahead_ext import ops
from lookahead_ext.ops import BaseStep
from lookahead_ext.ops import reference as R

from _triton_util import (DEVICE, DT_IDS, DTYPES, ON_GPU, SIZES, assert_close,
                          assert_lists_close, clone, gpu_only, poison, rand, randn,
                          requires_triton, T)

pytestmark = requires_triton
SIZE_IDS = list(SIZES)


# ----------------------------------------------------------------------------- harness
def test_assert_close_catches_unwritten_and_off_by_two_ulp():
    """The comparison must be able to fail: a poisoned (NaN) element, or 2 ulp off."""
    e = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), e)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, 2.0 + 2 * 2 ** -6], dtype=torch.bfloat16), e)
    assert_close(torch.tensor([1.0, 2.0 + 2 ** -6], dtype=torch.bfloat16), e)  # one ulp ok
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, 2.001]), torch.tensor([1.0, 2.0]))


def test_import_does_not_import_triton():
    code = "import sys, lookahead_ext; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unavailable_backend_raises_clear_error(monkeypatch):
    monkeypatch.setitem(ops._MODULES, "triton", "lookahead_ext.ops._no_such_triton_backend")
    with pytest.raises(ops.BackendUnavailable, match="triton"):
        ops.sq_norm([torch.ones(3)], backend="triton")


def test_supports():
    mod = T()
    assert mod.supports("triton", DEVICE, torch.float32)
    assert mod.supports("triton", DEVICE, torch.bfloat16)
    assert not mod.supports("triton", DEVICE, torch.float64)
    assert not mod.supports("triton", DEVICE, torch.int32)
    with pytest.raises(ops.BackendUnavailable):
        ops.sq_norm([torch.ones(3, dtype=torch.float64, device=DEVICE)], backend="triton")
    # auto falls back to the reference for float64
    x = [torch.ones(3, dtype=torch.float64, device=DEVICE)]
    assert float(ops.sq_norm(x, backend="auto")) == 3.0


# ----------------------------------------------------------------------------- multi_dot
PAIR_SETS = {
    "sq": ([0], [(0, 0)]),
    "two_sq": ([0, 1], [(0, 0), (1, 1)]),
    "cross": ([0, 1], [(0, 1), (1, 0), (0, 0)]),
    "three": ([0, 1, 2], [(2, 2), (0, 0), (1, 2), (1, 1)]),
}


@pytest.mark.parametrize("per_tensor", [False, True], ids=["total", "per_tensor"])
@pytest.mark.parametrize("pset", list(PAIR_SETS))
@pytest.mark.parametrize("size", SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_multi_dot(dtype, size, pset, per_tensor):
    sizes = SIZES[size]
    which, pairs = PAIR_SETS[pset]
    # list 1 is fp32 state (as v), the others in the param dtype
    lists = [randn(sizes, torch.float32 if i == 1 else dtype, seed=i) for i in range(max(which) + 1)]
    got = T().multi_dot(lists, pairs, per_tensor)
    want = R.multi_dot(lists, pairs, per_tensor)
    assert got.dtype == torch.float32 and got.device.type == DEVICE.type
    assert_close(got, want, "multi_dot", rtol=2e-5, atol=1e-5)
    again = T().multi_dot(lists, pairs, per_tensor)
    assert torch.equal(got, again), "multi_dot is not deterministic"


def test_multi_dot_mixed_dtypes_within_a_list():
    a = [torch.randn(5, device=DEVICE), torch.randn(2000, device=DEVICE).bfloat16(),
         torch.randn(3, device=DEVICE).half()]
    for per_tensor in (False, True):
        assert_close(T().multi_dot([a], [(0, 0)], per_tensor), R.multi_dot([a], [(0, 0)], per_tensor),
                     "mixed", rtol=2e-5, atol=1e-5)


def test_multi_dot_non_contiguous():
    a = [torch.randn(40, 30, device=DEVICE).t(), torch.randn(100, device=DEVICE)[::3]]
    b = [torch.randn(30, 40, device=DEVICE), torch.randn(34, device=DEVICE)]
    pairs = [(0, 0), (0, 1)]
    assert_close(T().multi_dot([a, b], pairs, True), R.multi_dot([a, b], pairs, True), "nc",
                 rtol=2e-5, atol=1e-5)


# ----------------------------------------------------------------------------- perturb_
@pytest.mark.parametrize("mode", ["tensor_scale", "float_scale", "backup", "inplace_backup"])
@pytest.mark.parametrize("size", SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_perturb(dtype, size, mode):
    sizes = SIZES[size]
    base = randn(sizes, torch.float32, seed=1)          # fp32 masters
    direction = randn(sizes, dtype, seed=2)             # grads (param dtype)
    scale = torch.tensor(-0.37, device=DEVICE) if mode != "float_scale" else 0.61
    if mode == "inplace_backup":  # fp32 params perturbed in place, backup written first
        base = [b.to(dtype) for b in base]
        out_t, out_r = clone(base), clone(base)
        bk_t, bk_r = poison(sizes, torch.float32), poison(sizes, torch.float32)
        T().perturb_(out_t, out_t, direction, scale, bk_t)
        R.perturb_(out_r, out_r, direction, scale, bk_r)
        assert_lists_close(bk_t, bk_r, "backup")
    elif mode == "backup":
        out_t, out_r = poison(sizes, dtype), poison(sizes, dtype)
        bk_t, bk_r = poison(sizes, torch.float32), poison(sizes, torch.float32)
        T().perturb_(out_t, base, direction, scale, bk_t)
        R.perturb_(out_r, base, direction, scale, bk_r)
        assert_lists_close(bk_t, bk_r, "backup")
    else:
        out_t, out_r = poison(sizes, dtype), poison(sizes, dtype)
        T().perturb_(out_t, base, direction, scale)
        R.perturb_(out_r, base, direction, scale)
    assert_lists_close(out_t, out_r, "out")


def test_perturb_non_contiguous_output_and_inputs():
    out = [torch.full((30, 40), float("nan"), device=DEVICE).t()]
    base = [torch.randn(40, 30, device=DEVICE)]
    d = [torch.randn(40, 60, device=DEVICE)[:, ::2]]
    want = [torch.empty(40, 30, device=DEVICE)]
    T().perturb_(out, base, d, 0.5)
    R.perturb_(want, base, d, 0.5)
    assert_close(out[0], want[0], "nc out")


def test_perturb_cache_is_safe_when_addresses_are_reused():
    """Same sizes re-allocated (the allocator may hand back the same addresses, with new
    contents, or different ones): results must follow the tensors, never a stale table."""
    for it in range(4):
        base = randn([1500, 3], torch.float32, seed=10 + it)
        d = randn([1500, 3], torch.float32, seed=20 + it)
        out_t, out_r = poison([1500, 3], torch.float32), poison([1500, 3], torch.float32)
        T().perturb_(out_t, base, d, float(it) + 0.5)
        R.perturb_(out_r, base, d, float(it) + 0.5)
        assert_lists_close(out_t, out_r, f"iter {it}")
        del base, d, out_t, out_r
    # same addresses, different dtype -> different table
    x = torch.zeros(64, device=DEVICE)
    T().perturb_([x], [torch.ones(64, device=DEVICE)], [torch.ones(64, device=DEVICE)], 1.0)
    assert torch.all(x == 2.0)


# ----------------------------------------------------------------------------- combine_step_
BASES_ = {
    "sgd": BaseStep(kind="sgd", lr=0.1),
    "sgd_wd_mom_first": BaseStep(kind="sgd", lr=0.05, weight_decay=0.01, momentum=0.9, first=True),
    "sgd_mom_damp": BaseStep(kind="sgd", lr=0.05, weight_decay=0.01, momentum=0.9, dampening=0.1),
    "sgd_nesterov": BaseStep(kind="sgd", lr=0.05, momentum=0.8, nesterov=True),
    "adamw_1": BaseStep(kind="adamw", lr=1e-2, weight_decay=0.1, step=1),
    "adamw_5": BaseStep(kind="adamw", lr=3e-3, weight_decay=0.0, beta1=0.6, beta2=0.99, step=5),
}
SCHEMES_ = ["central_v", "forward_v", "central_base", "g0_only"]


def _combine_inputs(sizes, dtype, base: BaseStep, scheme: str, seed=0):
    g0 = randn(sizes, dtype, seed=seed + 1)
    gp = randn(sizes, dtype, seed=seed + 2)
    gm = randn(sizes, dtype, seed=seed + 3)
    masters = randn(sizes, torch.float32, seed=seed + 4)
    state = {}
    for name in base.state_names():
        state[name] = rand(sizes, torch.float32, seed=seed + 5 + len(state))
    v = v_coefs = None
    if scheme == "central_v":  # CMLR: v_coefs as 0-d device tensors
        grads, coefs = (None, gp, gm), (0.0, 0.75, 0.25)
        v = randn(sizes, torch.float32, seed=seed + 9)
        t = lambda x: torch.tensor(x, device=DEVICE)  # noqa: E731
        v_coefs = (t(0.9), t(0.0), t(0.03), t(0.07))
    elif scheme == "forward_v":  # FMLR: floats, a zero coefficient
        grads, coefs = (g0, gp, None), (0.8, 0.2, 0.0)
        v = randn(sizes, torch.float32, seed=seed + 9)
        v_coefs = (0.5, 0.2, 0.3, 0.0)
    elif scheme == "central_base":
        grads, coefs = (g0, gp, gm), (1.0, 0.25, -0.25)
    else:
        grads, coefs = (g0, None, None), (1.0, 0.0, 0.0)
    return masters, grads, coefs, state, v, v_coefs


def _run_combine(dtype, sizes, base, scheme):
    masters, grads, coefs, state, v, v_coefs = _combine_inputs(sizes, dtype, base, scheme)
    p_t, p_r = poison(sizes, dtype), poison(sizes, dtype)
    m_t, m_r = clone(masters), clone(masters)
    s_t = {k: clone(x) for k, x in state.items()}
    s_r = {k: clone(x) for k, x in state.items()}
    v_t, v_r = clone(v), clone(v)
    T().combine_step_(p_t, m_t, grads, coefs, base, s_t, v_t, v_coefs)
    R.combine_step_(p_r, m_r, grads, coefs, base, s_r, v_r, v_coefs)
    assert_lists_close(m_t, m_r, "masters")
    assert_lists_close(p_t, p_r, "params")
    for k in state:
        assert_lists_close(s_t[k], s_r[k], k)
    if v is not None:
        assert_lists_close(v_t, v_r, "v")
    # the update changed (almost) every element, so unwritten in-place outputs would show
    # (an exact zero direction, e.g. 0.75*g+ + 0.25*g- == 0 in bf16, can happen by chance)
    for a, b in zip(m_t, masters):
        assert a.numel() == 0 or float((a == b).float().mean()) < 0.01


@pytest.mark.parametrize("case", [("adamw_1", "central_v"), ("sgd_mom_damp", "forward_v")],
                         ids=lambda c: "-".join(c))
@pytest.mark.parametrize("size", SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_combine_step_sizes(dtype, size, case):
    _run_combine(dtype, SIZES[size], BASES_[case[0]], case[1])


@pytest.mark.parametrize("scheme", SCHEMES_)
@pytest.mark.parametrize("base", list(BASES_))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_combine_step_bases(dtype, base, scheme):
    _run_combine(dtype, SIZES["mixed"], BASES_[base], scheme)


def test_combine_step_non_contiguous():
    base = BASES_["adamw_5"]
    shape = (40, 30)
    mk = lambda s: torch.randn(*shape[::-1], device=DEVICE).t() if s else torch.rand(*shape[::-1], device=DEVICE).t()  # noqa: E731
    params = [torch.empty(*shape[::-1], device=DEVICE).t()]
    masters, gp, gm, v = [mk(1)], [mk(1)], [mk(1)], [mk(1)]
    st = {"exp_avg": [mk(1)], "exp_avg_sq": [mk(0)]}
    ref = [[x.clone() for x in lst] for lst in (masters, v, st["exp_avg"], st["exp_avg_sq"])]
    p_r = [params[0].clone()]
    st_r = {"exp_avg": ref[2], "exp_avg_sq": ref[3]}
    vc = (0.9, 0.0, 0.05, 0.05)
    T().combine_step_(params, masters, (None, gp, gm), (0.0, 0.5, 0.5), base, st, v, vc)
    R.combine_step_(p_r, ref[0], (None, gp, gm), (0.0, 0.5, 0.5), base, st_r, ref[1], vc)
    assert_close(params[0], p_r[0], "params")
    assert_close(masters[0], ref[0][0], "masters")
    assert_close(v[0], ref[1][0], "v")
    assert_close(st["exp_avg_sq"][0], ref[3][0], "exp_avg_sq")


# ----------------------------------------------------------------------------- lookahead_sync_
@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.8])
@pytest.mark.parametrize("with_params", [False, True], ids=["fast_is_param", "masters+params"])
@pytest.mark.parametrize("size", SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_lookahead_sync(dtype, size, with_params, alpha):
    sizes = SIZES[size]
    slow = randn(sizes, torch.float32, seed=1)
    if with_params:  # engine: fp32 fast masters + model params written too
        fast = randn(sizes, torch.float32, seed=2)
        p_t, p_r = poison(sizes, dtype), poison(sizes, dtype)
    else:            # Lookahead wrapper: fast = the model params themselves
        fast = randn(sizes, dtype, seed=2)
        p_t = p_r = None
    s_t, s_r, f_t, f_r = clone(slow), clone(slow), clone(fast), clone(fast)
    T().lookahead_sync_(s_t, f_t, alpha, p_t)
    R.lookahead_sync_(s_r, f_r, alpha, p_r)
    assert_lists_close(s_t, s_r, "slow")
    assert_lists_close(f_t, f_r, "fast")
    if with_params:
        assert_lists_close(p_t, p_r, "params")


def test_lookahead_sync_non_contiguous():
    slow = [torch.randn(20, 30, device=DEVICE)]
    fast = [torch.randn(30, 20, device=DEVICE).t()]
    s_r, f_r = clone(slow), [fast[0].clone()]
    T().lookahead_sync_(slow, fast, 0.5)
    R.lookahead_sync_(s_r, f_r, 0.5)
    assert_close(slow[0], s_r[0], "slow")
    assert_close(fast[0], f_r[0], "fast")


# ----------------------------------------------------------------------------- nonfinite_
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
@pytest.mark.parametrize("size", SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nonfinite(dtype, size, bad):
    sizes = SIZES[size]
    a = randn(sizes, dtype, seed=1)
    b = randn(sizes, torch.float32, seed=2)
    if bad is not None:
        nonempty = [t for t in a if t.numel()]
        if not nonempty:
            pytest.skip("no element to spoil")
        nonempty[-1][-1] = float(bad)  # the very last element of the last program
    got = T().nonfinite_([a, b])
    want = R.nonfinite_([a, b])
    assert got.shape == () and got.dtype == torch.float32
    assert float(got) == float(want) == (0.0 if bad is None else 1.0)


@pytest.mark.parametrize("size", ["mixed", "many"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nonfinite_unscale(dtype, size):
    sizes = SIZES[size]
    a = randn(sizes, dtype, seed=1, scale=1000.0)
    inv = torch.tensor(1.0 / 1024.0, device=DEVICE)
    a_t, a_r = clone(a), clone(a)
    got = T().nonfinite_([a_t], inv)
    want = R.nonfinite_([a_r], inv)
    assert float(got) == float(want) == 0.0
    assert_lists_close(a_t, a_r, "unscaled")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # interpreter (numpy)
def test_nonfinite_unscale_overflow_is_flagged():
    # finite fp16 value that overflows once unscaled by 4 (the check is on the stored value)
    a = [torch.tensor([1.0, 30000.0, 2.0], dtype=torch.float16, device=DEVICE)]
    inv = torch.tensor(4.0, device=DEVICE)
    a_r = clone(a)
    assert float(T().nonfinite_([a], inv)) == float(R.nonfinite_([a_r], inv)) == 1.0
    assert torch.isinf(a[0][1])


def test_nonfinite_unscale_non_contiguous():
    a = [torch.randn(30, 20, device=DEVICE).t(), torch.randn(50, device=DEVICE)[::2].half()]
    a_r = [t.clone() for t in a]
    inv = torch.tensor(0.5, device=DEVICE)
    assert float(T().nonfinite_([a], inv)) == float(R.nonfinite_([a_r], inv)) == 0.0
    assert_lists_close(a, a_r, "unscaled in place")
    assert not a[0].is_contiguous()


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
        masters, grads, coefs, state, v, v_coefs = _combine_inputs(sizes, torch.float32, base, "central_v")
        T().combine_step_(poison(sizes, torch.float32), masters, grads, coefs, base, state, v, v_coefs)
        if i == 0:
            n0 = _n_compiled(cs._combine_kernel)
    assert _n_compiled(cs._combine_kernel) == n0


@gpu_only
def test_gpu_large_all_ops_bf16():
    sizes = [7_000_003, 1 << 22, 5]
    _run_combine(torch.bfloat16, sizes, BASES_["adamw_5"], "central_v")
    _run_combine(torch.bfloat16, sizes, BASES_["sgd_mom_damp"], "forward_v")
    lists = [randn(sizes, torch.bfloat16, seed=1), randn(sizes, torch.float32, seed=2)]
    assert_close(T().multi_dot(lists, [(0, 0), (1, 1), (0, 1)], True),
                 R.multi_dot(lists, [(0, 0), (1, 1), (0, 1)], True), "dot", rtol=1e-4, atol=1e-3)


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
    assert_lists_close(out_t, out_r, "views")
    from lookahead_ext.kernels import _mta
    p = _mta.plan([out_t, base, d, None], DEVICE)
    assert sorted(g.aligned for g in p.groups) == [False, True]


# ----------------------------------------------------------------------------- new keywords
@pytest.mark.parametrize("unscale", [False, True], ids=["check", "unscale"])
@pytest.mark.parametrize("size", ["empty", "one", "odd", "prime", "many", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nonfinite_sq_norms(dtype, size, unscale):
    sizes = SIZES[size]
    a, b = randn(sizes, dtype, seed=1), randn(sizes, torch.float32, seed=2)
    inv = torch.tensor(0.5, device=DEVICE) if unscale else None
    la, lr = [clone(a), clone(b)], [clone(a), clone(b)]
    got = T().nonfinite_(la, inv, sq_norms=True)
    want = R.nonfinite_(lr, inv, sq_norms=True)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert float(got[0]) == float(want[0]) == 0.0
    assert_close(got, want, "norms", rtol=2e-5, atol=1e-5)
    assert T().nonfinite_(la).shape == ()  # back compat
    if sum(sizes):
        a[-1][-1] = float("nan") if a[-1].numel() else 0.0
        if a[-1].numel():
            assert float(T().nonfinite_([a, b], sq_norms=True)[0]) == 1.0


@pytest.mark.parametrize("with_vsq", [False, True], ids=["plain", "v_sq_out"])
@pytest.mark.parametrize("write_masters", [True, False], ids=["wm", "no_wm"])
@pytest.mark.parametrize("size", ["one", "prime", "many", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_combine_step_new_keywords(dtype, size, write_masters, with_vsq):
    if not write_masters and dtype != torch.float32:
        pytest.skip("write_masters=False takes params of the masters' dtype")
    sizes = SIZES[size]
    base = BASES_["sgd_mom_damp"]
    masters, grads, coefs, state, v, v_coefs = _combine_inputs(sizes, dtype, base, "central_v")
    outs = {}
    for name, mod in (("t", T()), ("r", R)):
        p, m, s, vv = poison(sizes, dtype), clone(masters), {k: clone(x) for k, x in state.items()}, clone(v)
        acc = torch.zeros(1, device=DEVICE) if with_vsq else None
        mod.combine_step_(p, m, grads, coefs, base, s, vv, v_coefs, v_sq_out=acc, write_masters=write_masters)
        outs[name] = (p, m, s, vv, acc)
    (pt, mt, st, vt, at), (pr, mr, sr, vr, ar) = outs["t"], outs["r"]
    assert_lists_close(pt, pr, "params")
    assert_lists_close(mt, mr, "masters")
    assert_lists_close(vt, vr, "v")
    for k in state:
        assert_lists_close(st[k], sr[k], k)
    if not write_masters:
        assert all(torch.equal(a, b) for a, b in zip(mt, masters)), "masters must only be read"
    if with_vsq:
        assert_close(at, ar, "v_sq_out", rtol=2e-5, atol=1e-5)
        assert_close(at, T().multi_dot([vt], [(0, 0)]), "v_sq_out vs multi_dot", rtol=0, atol=0)


def test_combine_step_new_keyword_errors():
    base = BASES_["sgd"]
    masters, grads, coefs, state, v, v_coefs = _combine_inputs([5], torch.float32, base, "central_v")
    with pytest.raises(ValueError, match="needs v"):
        T().combine_step_(poison([5], torch.float32), masters, grads, coefs, base, state,
                          v_sq_out=torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="one element"):
        T().combine_step_(poison([5], torch.float32), masters, grads, coefs, base, state, v, v_coefs,
                          v_sq_out=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="write_masters=False"):
        T().combine_step_(poison([5], torch.bfloat16), masters, grads, coefs, base, state, v, v_coefs,
                          write_masters=False)
