"""The fused native ops (csrc/, backend "cpp" on CPU and "cuda" on GPU) against the
reference oracle, per op x dtype x size, plus argument errors and determinism."""
import os

import pytest
import torch

from lookahead_ext import ops
from lookahead_ext.ops import native, reference
from lookahead_ext.ops.base_step import BaseStep

from _native_util import (CPP_OK, CUDA_OK, DEVICES, DT_IDS, DTYPES, PARAM_TOL, SIZE_IDS, SIZES, STATE_TOL,
                          assert_lists_close, clone, needs_cpp, rand)


# ----------------------------------------------------------------------------- multi_dot
@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sizes", SIZE_IDS)
def test_multi_dot(device, backend, dtype, sizes):
    n = SIZES[sizes]
    a, b = rand(n, dtype, device, 1), rand(n, torch.float32, device, 2)
    pairs = [(0, 0), (0, 1), (1, 1), (1, 0)]
    for per_tensor in (False, True):
        got = native.multi_dot([a, b], pairs, per_tensor)
        want = reference.multi_dot([a, b], pairs, per_tensor)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # reference sums fp32 products with torch's cascade; ours partials in double
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=2e-5, atol=1e-4)


@needs_cpp
def test_multi_dot_exact_small():
    """Hand-checked values (independent of the reference)."""
    a = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-4.0])]
    b = [torch.tensor([0.5, 0.5, 2.0]), torch.tensor([3.0])]
    got = native.multi_dot([a, b], [(0, 0), (0, 1)], per_tensor=True)
    assert got.tolist() == [[14.0, 16.0], [7.5, -12.0]]
    assert native.multi_dot([a, b], [(0, 1)]).tolist() == [-4.5]


@needs_cpp
def test_multi_dot_deterministic_across_threads():
    x = rand(SIZES["mixed"] + [1_000_003], torch.float32, "cpu", 3)
    old = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(native.multi_dot([x], [(0, 0)], per_tensor=True))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert torch.equal(r, results[0])


# ----------------------------------------------------------------------------- perturb_
@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sizes", SIZE_IDS)
@pytest.mark.parametrize("mode", ["tensor_scale", "float_scale", "backup", "grad_dir"])
def test_perturb(device, backend, dtype, sizes, mode):
    n = SIZES[sizes]
    out_a = rand(n, dtype, device, 0)
    out_b = clone(out_a)
    base = rand(n, torch.float32, device, 1)
    ddt = dtype if mode == "grad_dir" else torch.float32  # direction = g0 in the param dtype
    direction = rand(n, ddt, device, 2)
    scale = torch.tensor(-0.37, device=device) if mode != "float_scale" else 0.61
    if mode == "backup":  # in-place on fp32-like base: out is base, backup written first
        base_a = rand(n, dtype, device, 4)
        base_b = clone(base_a)
        bk_a, bk_b = [torch.empty_like(t) for t in base_a], [torch.empty_like(t) for t in base_b]
        native.perturb_(base_a, base_a, direction, scale, backup=bk_a)
        assert_lists_close(bk_a, base_b, rtol=0, atol=0)
        # the reference follows the precision rule with a backup too: fp32 math for bf16/fp16
        want = [(b.float() + scale * d.float()).to(dtype) for b, d in zip(base_b, direction)]
        reference.perturb_(base_b, base_b, direction, scale, backup=bk_b)
        assert_lists_close(bk_b, bk_a, rtol=0, atol=0)
        assert_lists_close(base_b, want, rtol=0, atol=0)
        assert_lists_close(base_a, base_b, **PARAM_TOL[dtype])
        return
    native.perturb_(out_a, base, direction, scale)
    reference.perturb_(out_b, base, direction, scale)
    assert_lists_close(out_a, out_b, **PARAM_TOL[dtype])


# ----------------------------------------------------------------------------- combine_step_
SCHEMES = {  # (which grads, d coefs, v coefficient pattern) as the engine calls them
    "central": ((False, True, True), (0.0, 1.5, -0.5), ("t", "zero", "t", "t")),   # CMLR, eq. 9/115
    "forward": ((True, True, False), (-1.0, 2.0, 0.0), ("t", "t", "t", "zero")),   # FMLR, eq. 6
    "central_base": ((True, True, True), (1.0, 1.0, -1.0), None),                 # CLR, eq. 8
    "sam": ((True, True, False), (0.0, 1.0, 0.0), None),                          # SAM: c0 = 0
    "float_vcoefs": ((False, True, True), (0.0, 0.75, 0.25), (0.8, 0.0, 0.1, 0.1)),
}
BASES = {
    "sgd_plain": BaseStep("sgd", lr=0.1),
    "sgd_mom_first": BaseStep("sgd", lr=0.05, momentum=0.9, weight_decay=1e-2, first=True),
    "sgd_mom": BaseStep("sgd", lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd_nesterov": BaseStep("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": BaseStep("adamw", lr=1e-2, weight_decay=0.1, step=1),
    "adamw_t7": BaseStep("adamw", lr=3e-3, weight_decay=0.0, beta1=0.8, beta2=0.99, eps=1e-6, step=7),
}


def _combine_case(n, dtype, device, scheme, base):
    use, coefs, vpat = SCHEMES[scheme]
    masters = rand(n, torch.float32, device, 10)
    params = [m.to(dtype) for m in masters]
    grads = tuple(rand(n, dtype, device, 20 + i) if u else None for i, u in enumerate(use))
    state = {name: [t.abs() if "sq" in name else t for t in rand(n, torch.float32, device, 30 + j, 0.1)]
             for j, name in enumerate(base.state_names())}
    v = vc = None
    if vpat is not None:
        v = rand(n, torch.float32, device, 40)
        vals = (0.9 * 0.37, 0.05 * 0.21, 0.05 * 0.19, 0.05 * 0.33)
        vc = tuple(torch.tensor(x, device=device) if p == "t" else
                   torch.zeros((), device=device) if p == "zero" else p for x, p in zip(vals, vpat))
    return params, masters, grads, coefs, state, v, vc


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("base", list(BASES))
def test_combine_step(device, backend, dtype, scheme, base, sizes="edge_mixed"):
    _run_combine(device, dtype, SIZES[sizes], scheme, BASES[base])


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("base", ["sgd_mom", "adamw"])
def test_combine_step_many_small(device, backend, dtype, base):
    _run_combine(device, dtype, SIZES["many_small"], "central", BASES[base])


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("base", ["sgd_nesterov", "adamw"])
def test_combine_step_large(device, backend, dtype, base):
    _run_combine(device, dtype, SIZES["large"], "central", BASES[base])


def _run_combine(device, dtype, n, scheme, base):
    params, masters, grads, coefs, state, v, vc = _combine_case(n, dtype, device, scheme, base)
    pa, ma, sa, va = clone(params), clone(masters), {k: clone(x) for k, x in state.items()}, clone(v)
    pb, mb, sb, vb = clone(params), clone(masters), {k: clone(x) for k, x in state.items()}, clone(v)
    native.combine_step_(pa, ma, grads, coefs, base, sa, va, vc)
    reference.combine_step_(pb, mb, grads, coefs, base, sb, vb, vc)
    assert_lists_close(ma, mb, **STATE_TOL)
    assert_lists_close(pa, pb, **PARAM_TOL[dtype])
    for k in state:
        assert_lists_close(sa[k], sb[k], **STATE_TOL)
    if v is not None:
        assert_lists_close(va, vb, **STATE_TOL)
    # the step must have changed something (guards against a no-op kernel passing)
    if any(t.numel() for t in masters):
        assert any(not torch.equal(a, b) for a, b in zip(ma, masters))


@needs_cpp
def test_combine_step_hand_checked_sgd_nesterov():
    """One element by hand: d = 1.5*2 - 0.5*4 = 1; d += wd*w; buf = 0.9*buf + d; d += 0.9*buf."""
    w, buf, v = torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0])
    p = w.clone()
    base = BaseStep("sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    native.combine_step_([p], [w], (None, [torch.tensor([2.0])], [torch.tensor([4.0])]), (0.0, 1.5, -0.5),
                         base, {"momentum_buffer": [buf]}, [v], (0.5, 0.0, 0.25, 0.125))
    d = 1.0 + 0.1 * 1.0
    b = 0.9 * 0.5 + d
    expect_w = 1.0 - 0.1 * (d + 0.9 * b)
    assert buf.item() == pytest.approx(b, rel=1e-6)
    assert w.item() == pytest.approx(expect_w, rel=1e-6) and p.item() == w.item()
    assert v.item() == pytest.approx(0.5 * 2.0 + 0.25 * 2.0 + 0.125 * 4.0, rel=1e-6)


# ----------------------------------------------------------------------------- lookahead_sync_
@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sizes", SIZE_IDS)
@pytest.mark.parametrize("alpha", [0.9, 0.2])
@pytest.mark.parametrize("with_params", [False, True])
def test_lookahead_sync(device, backend, dtype, sizes, alpha, with_params):
    n = SIZES[sizes]
    slow = rand(n, torch.float32, device, 1)
    # engine: fast = fp32 masters + params; Lookahead wrapper: fast = the params themselves
    fast = rand(n, torch.float32 if with_params else dtype, device, 2)
    params = rand(n, dtype, device, 3) if with_params else None
    sa, fa, qa = clone(slow), clone(fast), clone(params)
    sb, fb, qb = clone(slow), clone(fast), clone(params)
    native.lookahead_sync_(sa, fa, alpha, qa)
    reference.lookahead_sync_(sb, fb, alpha, qb)
    assert_lists_close(sa, sb, **STATE_TOL)
    assert_lists_close(fa, fb, **PARAM_TOL[fast[0].dtype if fast else dtype])
    if with_params:
        assert_lists_close(qa, qb, **PARAM_TOL[dtype])


# ----------------------------------------------------------------------------- nonfinite_
@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sizes", SIZE_IDS)
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
def test_nonfinite(device, backend, dtype, sizes, bad):
    n = SIZES[sizes]
    xs = rand(n, dtype, device, 5)
    if bad is not None and sum(n):
        big = max(range(len(n)), key=lambda i: n[i])
        xs[big].view(-1)[n[big] // 2 + 1 if n[big] > 1 else 0] = float(bad)
    expect = 1.0 if bad is not None and sum(n) else 0.0
    got = native.nonfinite_([xs[:3], xs[3:]])
    assert got.shape == () and got.dtype == torch.float32 and got.item() == expect
    assert reference.nonfinite_([xs[:3], xs[3:]]).item() == expect


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nonfinite_unscale(device, backend, dtype):
    n = SIZES["mixed"] + [1_000_003]
    xs = rand(n, dtype, device, 6, scale=1024.0)
    a, b = clone(xs), clone(xs)
    inv = torch.tensor(1.0 / 1024.0, device=device)
    assert native.nonfinite_([a], inv).item() == 0.0
    assert reference.nonfinite_([b], inv).item() == 0.0
    assert_lists_close(a, b, rtol=0, atol=0)  # one multiply, one rounding: exact
    # overflow after unscale (inv > 1) is caught on the stored values
    big = [torch.full((5,), 60000.0, dtype=dtype, device=device)]
    res = native.nonfinite_([big], torch.tensor(1e35, device=device)).item()
    assert res == 1.0


# ----------------------------------------------------------------------------- arguments
@needs_cpp
def test_raw_op_rejects_noncontiguous():
    x = torch.randn(8, 6).t()
    with pytest.raises(RuntimeError, match="not contiguous"):
        torch.ops.lookahead_ext.lookahead_sync_([torch.randn(6, 8)], [x], 0.5, [])
    with pytest.raises(RuntimeError, match="not contiguous"):
        torch.ops.lookahead_ext.multi_dot([x], 1, [0, 0], False)


@needs_cpp
def test_raw_op_rejects_mismatches():
    a, b = torch.randn(5), torch.randn(6)
    with pytest.raises(RuntimeError, match="elements"):
        torch.ops.lookahead_ext.lookahead_sync_([a], [b], 0.5, [])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lookahead_ext.lookahead_sync_([a.half()], [a], 0.5, [])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.lookahead_ext.multi_dot([a.double()], 1, [0, 0], False)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_wrappers_handle_noncontiguous(dtype):
    """Transposed / channels-last / strided tensors go through contiguous stand-ins."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (3, 4, 5, 6)]

    def mk(dt):
        out = []
        for s in shapes:
            t = torch.randn(*s, generator=g).to(dt)
            out.append(t.t() if t.dim() == 2 else t.to(memory_format=torch.channels_last))
        return out

    slow, fast, params = mk(torch.float32), mk(torch.float32), mk(dtype)
    assert not any(t.is_contiguous() for t in params)
    a = (clone(slow), clone(fast), clone(params))
    b = (clone(slow), clone(fast), clone(params))
    native.lookahead_sync_(*a[:2], 0.7, a[2])
    reference.lookahead_sync_(*b[:2], 0.7, b[2])
    for x, y in zip(a, b):
        assert_lists_close(x, y, **PARAM_TOL[x[0].dtype])
    grads = (None, mk(dtype), mk(dtype))
    base = BaseStep("sgd", lr=0.1, momentum=0.9)
    st_a, st_b = {"momentum_buffer": mk(torch.float32)}, None
    st_b = {"momentum_buffer": clone(st_a["momentum_buffer"])}
    pa, ma, pb, mb = clone(params), clone(fast), clone(params), clone(fast)
    native.combine_step_(pa, ma, grads, (0.0, 0.6, 0.4), base, st_a)
    reference.combine_step_(pb, mb, grads, (0.0, 0.6, 0.4), base, st_b)
    assert_lists_close(ma, mb, **STATE_TOL)
    assert_lists_close(pa, pb, **PARAM_TOL[dtype])
    assert_lists_close(st_a["momentum_buffer"], st_b["momentum_buffer"], **STATE_TOL)
    got = native.multi_dot([params, grads[1]], [(0, 1)])
    torch.testing.assert_close(got, reference.multi_dot([params, grads[1]], [(0, 1)]), rtol=2e-5, atol=1e-4)
    out_a, out_b = clone(params), clone(params)
    native.perturb_(out_a, fast, grads[1], torch.tensor(0.3))
    reference.perturb_(out_b, fast, grads[1], torch.tensor(0.3))
    assert_lists_close(out_a, out_b, **PARAM_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs the CUDA backend")
def test_raw_cuda_op_rejects_cpu_tensor():
    a = torch.randn(5, device="cuda")
    with pytest.raises(RuntimeError, match="is on cpu"):
        torch.ops.lookahead_ext.lookahead_sync_([a], [torch.randn(5)], 0.5, [])
    with pytest.raises(RuntimeError, match="is on cpu"):  # a CPU first tensor: no CUDAGuard(cpu) assert
        torch.ops.lookahead_ext.lookahead_sync_([torch.randn(5)], [a], 0.5, [])


@pytest.mark.parametrize("device,backend", DEVICES)
def test_raw_ops_validate_alike_on_every_device(device, backend):
    """CPU and CUDA reject the same bad raw-op inputs with the same errors, before any write."""
    lib = torch.ops.lookahead_ext
    x = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match="list_sizes sum"):  # also without sq_norms
        lib.nonfinite_([x], torch.tensor(2.0, device=device), [2], False)
    assert torch.equal(x, torch.ones(4, device=device))  # nothing was unscaled
    s = [torch.ones(4, device=device)]
    with pytest.raises(RuntimeError, match="share memory"):
        lib.lookahead_sync_(s, s, 0.5, [])
    lib.lookahead_sync_([], s, 0.5, [])  # empty slow: validated, then nothing to do (no error)
    assert torch.equal(s[0], torch.ones(4, device=device))
    p, m, g, v = ([torch.randn(6, device=device)] for _ in range(4))
    sgd = (p, m, [], g, [], [0.0, 1.0, 0.0], v, [], v, [], [0.5, 0.0, 0.1, 0.0], 0, [0.1, 0.0, 0.9, 0.0],
           [0, 0, 0, 1, 0])
    with pytest.raises(RuntimeError, match="share memory"):  # momentum buffer is v
        lib.combine_step_(*sgd)
    adam = (p, m, [], g, [], [0.0, 1.0, 0.0], [torch.zeros(6, device=device)], [torch.zeros(6, device=device)],
            [], [], [0.0] * 4, 1, [1.0, 0.1, 0.999, 0.001, 1e-8, 0.1, 0.1], [0, 0])
    with pytest.raises(RuntimeError, match="flags must have 5 entries"):
        lib.combine_step_(*adam)


# ----------------------------------------------------------------------------- dispatch
@needs_cpp
def test_auto_picks_cpp_on_cpu_and_reference_for_fp64():
    assert ops.resolve("auto", torch.device("cpu"), torch.float32) is native
    assert ops.resolve("auto", torch.device("cpu"), torch.bfloat16) is native
    assert ops.resolve("auto", torch.device("cpu"), torch.float64) is reference
    assert not native.supports("cpp", torch.device("cpu"), torch.float64)
    assert not native.supports("cpp", torch.device("meta"), torch.float32)
    with pytest.raises(ops.BackendUnavailable, match="float64"):
        ops.resolve("cpp", torch.device("cpu"), torch.float64)


@needs_cpp
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_both_cpu_isas_match_reference(isa, monkeypatch):
    """The baseline and AVX2 builds of the kernels (chosen at run time) both match."""
    monkeypatch.setenv("LOOKAHEAD_EXT_CPU_ISA", isa)
    try:
        assert torch.ops.lookahead_ext.cpu_isa() == isa
    except RuntimeError as exc:
        pytest.skip(str(exc))
    for dtype in DTYPES:
        n = SIZES["mixed"]
        test_combine_step("cpu", "cpp", dtype, "central", "adamw")
        test_combine_step("cpu", "cpp", dtype, "forward", "sgd_nesterov")
        test_lookahead_sync("cpu", "cpp", dtype, "mixed", 0.9, True)
        test_perturb("cpu", "cpp", dtype, "mixed", "grad_dir")
        test_multi_dot("cpu", "cpp", dtype, "mixed")
        test_nonfinite("cpu", "cpp", dtype, "mixed", "nan")
        assert n


@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
def test_combine_accepts_aliased_read_only_grads():
    """g0 and gp may be the same tensors (read-only inputs); the result equals the reference."""
    outs = {}
    for name, mod in (("ref", reference), ("cpp", native)):
        torch.manual_seed(0)
        p = [torch.randn(1001), torch.randn(37)]
        m = [t.clone() for t in p]
        g = [torch.randn_like(t) for t in p]
        mod.combine_step_(p, m, (g, g, None), (0.5, 0.25, 0.0), BaseStep(lr=0.1), {})
        outs[name] = p
    for a, b in zip(outs["ref"], outs["cpp"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_combine_params_may_be_their_own_masters(base):
    """fp32 params passed as their own masters (LookaheadBio does this) update like the reference."""
    outs = {}
    for name, mod in (("ref", reference), ("cpp", native)):
        torch.manual_seed(1)
        p = [torch.randn(4099), torch.randn(5)]
        g = [torch.randn_like(t) for t in p]
        bs = BaseStep(kind=base, lr=0.05, momentum=0.9 if base == "sgd" else 0.0, first=True)
        st = {n: [torch.zeros_like(t) for t in p] for n in bs.state_names()}
        mod.combine_step_(p, p, (None, g, None), (0.0, 1.0, 0.0), bs, st)
        outs[name] = p
    for a, b in zip(outs["ref"], outs["cpp"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- fused reductions
def _lists_for_norms(n, dtype, device):
    """Two lists as the engine passes probe gradients: one in the param dtype, one mixing it
    with float32 (nonfinite_ takes per-tensor dtypes)."""
    xs = rand(n, dtype, device, 7)
    ys = rand(n, torch.float32, device, 8)
    mixed = [y if i % 2 else x for i, (x, y) in enumerate(zip(xs, ys))]
    return [xs, mixed]


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sizes", SIZE_IDS)
@pytest.mark.parametrize("unscale", [False, True], ids=["check", "unscale"])
def test_nonfinite_sq_norms(device, backend, dtype, sizes, unscale):
    n = SIZES[sizes]
    lists = _lists_for_norms(n, dtype, device)
    a, b = [clone(lst) for lst in lists], [clone(lst) for lst in lists]
    inv = torch.tensor(0.5, device=device) if unscale else None
    got = native.nonfinite_(a, inv, sq_norms=True)
    want = reference.nonfinite_(b, inv, sq_norms=True)
    assert got.shape == (3,) and got.dtype == torch.float32 and got.device.type == device
    assert got[0].item() == want[0].item() == 0.0
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=2e-5, atol=1e-4)
    for x, y in zip(a, b):
        assert_lists_close(x, y, rtol=0, atol=0)  # the unscaled values themselves
    if device == "cpu" and sum(n):  # the norms are multi_dot's, bitwise (same lanes, partials)
        for i, lst in enumerate(a):
            if len({t.dtype for t in lst}) == 1:
                assert torch.equal(got[1 + i], native.multi_dot([lst], [(0, 0)])[0])
    # back compat: without sq_norms the 0-d flag
    assert native.nonfinite_(a).shape == ()


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_sq_norms_flags_bad_values(device, backend, bad):
    xs = rand([70001, 5, 3], torch.float32, device, 9)
    xs[0][65536 + 17] = float(bad)  # in a later chunk of the first tensor
    got = native.nonfinite_([xs[:1], xs[1:]], sq_norms=True)
    want = reference.nonfinite_([xs[:1], xs[1:]], sq_norms=True)
    assert got[0].item() == want[0].item() == 1.0
    assert not torch.isfinite(got[1]) and torch.isfinite(got[2])
    torch.testing.assert_close(got[2:].cpu(), want[2:].cpu(), rtol=2e-5, atol=1e-4)


@needs_cpp
def test_nonfinite_sq_norms_empty_and_hand_checked():
    assert native.nonfinite_([[], []], sq_norms=True).tolist() == [0.0, 0.0, 0.0]
    a = [torch.tensor([1.0, 2.0]), torch.tensor([], dtype=torch.float32)]
    b = [torch.tensor([3.0], dtype=torch.bfloat16)]
    assert native.nonfinite_([a, b, []], sq_norms=True).tolist() == [0.0, 5.0, 9.0, 0.0]
    assert reference.nonfinite_([a, b, []], sq_norms=True).tolist() == [0.0, 5.0, 9.0, 0.0]
    assert native.nonfinite_([a, b], torch.tensor(2.0), sq_norms=True).tolist() == [0.0, 20.0, 36.0]


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("sizes", SIZE_IDS)
@pytest.mark.parametrize("case", [("central", "sgd_mom"), ("forward", "adamw"), ("float_vcoefs", "sgd_nesterov")],
                         ids=lambda c: "-".join(c))
def test_combine_v_sq_out(device, backend, dtype, sizes, case):
    scheme, base = case[0], BASES[case[1]]
    params, masters, grads, coefs, state, v, vc = _combine_case(SIZES[sizes], dtype, device, scheme, base)
    runs = {}
    for name, mod in (("cpp", native), ("ref", reference)):
        p, m, s, vv = clone(params), clone(masters), {k: clone(x) for k, x in state.items()}, clone(v)
        acc = torch.zeros(1, device=device)
        mod.combine_step_(p, m, grads, coefs, base, s, vv, vc, v_sq_out=acc)
        runs[name] = (p, m, vv, acc)
    (pa, ma, va, acc_a), (pb, mb, vb, acc_b) = runs["cpp"], runs["ref"]
    assert_lists_close(va, vb, **STATE_TOL)
    assert_lists_close(pa, pb, **PARAM_TOL[dtype])
    torch.testing.assert_close(acc_a.cpu(), acc_b.cpu(), rtol=2e-5, atol=1e-4)
    if device == "cpu":  # bitwise multi_dot([v], [(0, 0)]) of the stored v
        assert torch.equal(acc_a, native.multi_dot([va], [(0, 0)]))
    # it adds: a second call on top of a non-zero accumulator
    p, m, s, vv = clone(params), clone(masters), {k: clone(x) for k, x in state.items()}, clone(v)
    acc = torch.full((1,), 1.5, device=device)
    native.combine_step_(p, m, grads, coefs, base, s, vv, vc, v_sq_out=acc)
    assert acc.item() == pytest.approx(1.5 + acc_a.item(), rel=1e-6)


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("sizes", SIZE_IDS)
@pytest.mark.parametrize("base", ["sgd_mom", "adamw"])
@pytest.mark.parametrize("with_vsq", [False, True], ids=["plain", "v_sq_out"])
def test_combine_write_masters_false(device, backend, sizes, base, with_vsq):
    """fp32 params distinct from their (scratch) masters: w_new goes to params only."""
    base = BASES[base]
    params, masters, grads, coefs, state, v, vc = _combine_case(SIZES[sizes], torch.float32, device, "central", base)
    params = [torch.full_like(t, float("nan")) for t in params]  # every element must be written
    runs = {}
    for name, mod, wm in (("cpp", native, False), ("ref", reference, False), ("cpp_wm", native, True)):
        p, m, s, vv = clone(params), clone(masters), {k: clone(x) for k, x in state.items()}, clone(v)
        acc = torch.zeros(1, device=device) if with_vsq else None
        mod.combine_step_(p, m, grads, coefs, base, s, vv, vc, v_sq_out=acc, write_masters=wm)
        runs[name] = (p, m, s, vv, acc)
    pa, ma, sa, va, acc_a = runs["cpp"]
    pb, mb, sb, vb, acc_b = runs["ref"]
    assert_lists_close(ma, masters, rtol=0, atol=0)  # masters only read
    assert_lists_close(mb, masters, rtol=0, atol=0)
    assert_lists_close(pa, pb, **STATE_TOL)
    for k in state:
        assert_lists_close(sa[k], sb[k], **STATE_TOL)
    assert_lists_close(va, vb, **STATE_TOL)
    if with_vsq:
        torch.testing.assert_close(acc_a.cpu(), acc_b.cpu(), rtol=2e-5, atol=1e-4)
    if device == "cpu":  # the same w_new as write_masters=True stores into the masters
        assert_lists_close(pa, runs["cpp_wm"][1], rtol=0, atol=0)
        assert_lists_close(pa, runs["cpp_wm"][0], rtol=0, atol=0)


@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
def test_combine_write_masters_false_params_are_masters():
    """params that are their own masters are still updated with write_masters=False."""
    outs = {}
    for name, mod in (("ref", reference), ("cpp", native)):
        torch.manual_seed(2)
        p = [torch.randn(4099), torch.randn(5)]
        g = [torch.randn_like(t) for t in p]
        v = [torch.randn_like(t) for t in p]
        acc = torch.zeros(1)
        mod.combine_step_(p, p, (None, g, None), (0.0, 1.0, 0.0), BaseStep(lr=0.1), {}, v, (0.5, 0.0, 0.1, 0.0),
                          v_sq_out=acc, write_masters=False)
        outs[name] = (p, acc)
    for a, b in zip(outs["ref"][0], outs["cpp"][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs["ref"][1], outs["cpp"][1], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICES)
@pytest.mark.parametrize("mod", ["native", "reference"])
def test_combine_new_keyword_errors(device, backend, mod):
    mod = native if mod == "native" else reference
    params, masters, grads, coefs, state, v, vc = _combine_case([5, 3], torch.float32, device, "central",
                                                               BASES["sgd_mom"])
    call = lambda **kw: mod.combine_step_(clone(params), clone(masters), grads, coefs, BASES["sgd_mom"],  # noqa: E731
                                          {k: clone(x) for k, x in state.items()}, kw.pop("v", clone(v)), vc, **kw)
    with pytest.raises(ValueError, match="needs v"):
        mod.combine_step_(clone(params), clone(masters), grads, coefs, BASES["sgd_mom"],
                          {k: clone(x) for k, x in state.items()}, v_sq_out=torch.zeros(1, device=device))
    with pytest.raises(ValueError, match="float32 tensor with one element"):
        call(v_sq_out=torch.zeros(1, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="float32 tensor with one element"):
        call(v_sq_out=torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="is on meta"):
        call(v_sq_out=torch.zeros(1, device="meta"))
    bf = [t.bfloat16() for t in params]
    with pytest.raises(ValueError, match="write_masters=False"):
        mod.combine_step_(bf, clone(masters), grads, coefs, BASES["sgd_mom"],
                          {k: clone(x) for k, x in state.items()}, clone(v), vc, write_masters=False)


@needs_cpp
def test_raw_combine_rejects_bad_new_arguments():
    p, m, g, v, b = ([torch.randn(6)] for _ in range(5))
    op = torch.ops.lookahead_ext.combine_step_
    args = (p, m, [], g, [], [0.0, 1.0, 0.0], b, [], v, [], [0.5, 0.0, 0.1, 0.0], 0, [0.1, 0.0, 0.9, 0.0],
            [0, 0, 0, 1, 0])
    with pytest.raises(RuntimeError, match="v_sq_out must be a float32"):
        op(*args, torch.zeros(1, dtype=torch.float64), True)
    with pytest.raises(RuntimeError, match="v_sq_out needs v"):
        op(*args[:8], [], *args[9:], torch.zeros(1), True)
    with pytest.raises(RuntimeError, match="write_masters=False"):
        op([p[0].half()], *args[1:], None, False)
    with pytest.raises(RuntimeError, match="v_coefs tensors must be float32"):
        op(*args[:9], [torch.zeros(2), None, None, None], *args[10:])
    with pytest.raises(RuntimeError, match="list_sizes sum"):
        torch.ops.lookahead_ext.nonfinite_([torch.zeros(3)], None, [2], True)


# ----------------------------------------------------------------------------- streaming stores
@pytest.fixture
def nt_modes():
    """Run a body with streaming stores forced on and off (the per-call threshold)."""
    if not CPP_OK:
        pytest.skip("C++ extension not built")
    set_min = torch.ops.lookahead_ext.set_cpu_nt_min
    old = set_min(0)
    set_min(old)

    def run(body):
        outs = []
        for nt in (0, 1 << 62):  # always / never
            set_min(nt)
            try:
                outs.append(body())
            finally:
                set_min(old)
        return outs
    return run


def _misaligned(n, dtype, seed):
    """Contiguous tensors at odd element offsets (unaligned heads and tails for NT stores)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, k in enumerate(n):
        buf = torch.randn(k + 3, generator=g).to(dtype)
        out.append(buf[i % 3:i % 3 + k])
    return out


NT_SIZES = [1, 7, 4099, 70001, 0, 65536 * 2 + 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nt_stores_bitwise_equal_regular(nt_modes, dtype):
    n = NT_SIZES
    w, d, slow = rand(n, torch.float32, "cpu", 1), rand(n, dtype, "cpu", 2), rand(n, torch.float32, "cpu", 3)
    q0 = _misaligned(n, dtype, 4)
    base = BASES["sgd_mom"]
    params, masters, grads, coefs, state, v, vc = _combine_case(n, dtype, "cpu", "central", base)

    def body():
        res = {}
        out = clone(q0)
        native.perturb_(out, w, d, torch.tensor(0.3))  # out is written only: streamed
        res["perturb"] = out
        inp, bk = clone(q0), [torch.empty_like(t) for t in q0]
        native.perturb_(inp, inp, d, -0.7, backup=bk)  # in place; the backup is streamed
        res["perturb_inplace"], res["backup"] = inp, bk
        s, f, q = clone(slow), clone(w), clone(q0)
        native.lookahead_sync_(s, f, 0.6, q)
        res["sync"] = s + f + q
        for wm in (True, False):
            p = clone(params) if wm else [t.float().clone() for t in params]
            m, st, vv, acc = clone(masters), {k: clone(x) for k, x in state.items()}, clone(v), torch.zeros(1)
            native.combine_step_(p, m, grads, coefs, base, st, vv, vc, v_sq_out=acc, write_masters=wm)
            res[f"combine{wm}"] = p + m + vv + st["momentum_buffer"] + [acc]
        return res

    nt, regular = nt_modes(body)
    for k in nt:
        assert len(nt[k]) == len(regular[k])
        for a, b in zip(nt[k], regular[k]):
            assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num()), k


# ----------------------------------------------------------------------------- dispatch cache
@needs_cpp
def test_dispatch_cache_follows_module_table(monkeypatch):
    x = [torch.ones(3)]
    assert ops.sq_norm(x, backend="cpp").item() == 3.0  # cached: cpp -> native
    monkeypatch.setitem(ops._MODULES, "cpp", "lookahead_ext.ops._no_such_native")
    with pytest.raises(ops.BackendUnavailable, match="cpp"):
        ops.sq_norm(x, backend="cpp")
    monkeypatch.undo()
    assert ops.sq_norm(x, backend="cpp").item() == 3.0
    ops.clear_dispatch_cache()
    assert ops._impl("auto", x[0]) is native
