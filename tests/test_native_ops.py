"""Native-backend specifics (csrc/ via backend "native"; conformance to the reference is
test_op_conformance.py): hand-checked values, thread determinism, raw-op argument errors,
streaming stores, both CPU ISAs, dispatch, opcheck of the registered torch ops."""
import pytest
import torch

from lookahead_ext import ops
from lookahead_ext.ops import native, reference
from lookahead_ext.ops.base_step import BaseStep

from _compare import EXACT, assert_lists_close
from op_db import BASES, DTYPES, DT_IDS, TOLS, combine_inputs, make, op_db, present_rows
from test_op_conformance import run_sample

CPP_OK = ops.available_backends()["cpp"] == "ok"
CUDA_OK = ops.available_backends()["cuda"] == "ok"
needs_cpp = pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
# the native rows present here: CPU (when built), CUDA (when built and a GPU exists)
NATIVE_DEVICES = [r.device for r in present_rows() if r.backend == "native"]
STATE_TOL = TOLS["native"]["state"][torch.float32]


def clone(ts):
    return None if ts is None else [t.clone() for t in ts]


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
    x = [torch.randn(n, generator=torch.Generator().manual_seed(3)) for n in [3, 4099, 0, 70001, 1, 257, 16, 1_000_003]]
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


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs the CUDA backend")
def test_raw_cuda_op_rejects_cpu_tensor():
    a = torch.randn(5, device="cuda")
    with pytest.raises(RuntimeError, match="is on cpu"):
        torch.ops.lookahead_ext.lookahead_sync_([a], [torch.randn(5)], 0.5, [])
    with pytest.raises(RuntimeError, match="is on cpu"):  # a CPU first tensor: no CUDAGuard(cpu) assert
        torch.ops.lookahead_ext.lookahead_sync_([torch.randn(5)], [a], 0.5, [])


@pytest.mark.parametrize("device", NATIVE_DEVICES)
def test_raw_ops_validate_alike_on_every_device(device):
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
    assert ops.resolve("auto", torch.device("cpu"), torch.float32) is native.NATIVE
    assert ops.resolve("auto", torch.device("cpu"), torch.bfloat16) is native.NATIVE
    assert ops.resolve("auto", torch.device("cpu"), torch.float64) is reference
    assert not native.NATIVE.supports(torch.device("cpu"), torch.float64)
    assert not native.NATIVE.supports(torch.device("meta"), torch.float32)
    assert ops.resolve("native", torch.device("cpu"), torch.float32) is native.NATIVE
    assert ops.resolve("cpp", torch.device("cpu"), torch.float32) is native.NATIVE
    with pytest.raises(ops.BackendUnavailable, match="cuda"):  # the alias "cuda" is CUDA tensors only
        ops.resolve("cuda", torch.device("cpu"), torch.float32)
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
    row = next(r for r in present_rows() if r.id == "native-cpu")
    sizes = [3, 4099, 0, 70001, 1, 257, 16]  # vector bodies, scalar tails, several 16K chunks
    for op in op_db:
        for dtype in DTYPES:
            for sample in op.sample_inputs(row, dtype, sizes):  # one sample per code path
                run_sample(native.NATIVE, op.name, sample, row)


@needs_cpp
@pytest.mark.parametrize("sizes", ["edge_mixed", "many_small"])
@pytest.mark.parametrize("base", ["sgd_mom", "adamw"])
@pytest.mark.parametrize("with_vsq", [False, True], ids=["plain", "v_sq_out"])
def test_combine_write_masters_false_bitwise(sizes, base, with_vsq):
    """On CPU, write_masters=False stores the same w_new (bitwise) as write_masters=True stores
    into the masters (the comparison with the reference is in test_op_conformance.py)."""
    device = "cpu"
    base = BASES[base]
    masters, grads, coefs, state, v, vc = combine_inputs(sizes, torch.float32, device, "central", base)
    runs = {}
    for wm in (False, True):
        p = [torch.full_like(t, float("nan")) for t in masters]  # every element must be written
        m, s, vv = clone(masters), {k: clone(x) for k, x in state.items()}, clone(v)
        acc = torch.zeros(1, device=device) if with_vsq else None
        native.combine_step_(p, m, grads, coefs, base, s, vv, vc, v_sq_out=acc, write_masters=wm)
        runs[wm] = (p, m, s, vv, acc)
    pa, ma = runs[False][:2]
    assert_lists_close(ma, masters, EXACT, "masters only read")
    assert_lists_close(pa, runs[True][1], EXACT, "w_new")  # the same w_new as write_masters=True stores
    assert_lists_close(pa, runs[True][0], EXACT, "params")
    for k in state:
        assert_lists_close(runs[False][2][k], runs[True][2][k], EXACT, k)
    if with_vsq:
        assert torch.equal(runs[False][4], runs[True][4])


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


@pytest.mark.parametrize("dtype", DTYPES, ids=[DT_IDS[d] for d in DTYPES])
def test_nt_stores_bitwise_equal_regular(nt_modes, dtype):
    n = NT_SIZES
    w, d, slow = make(n, torch.float32, "cpu", 1), make(n, dtype, "cpu", 2), make(n, torch.float32, "cpu", 3)
    q0 = _misaligned(n, dtype, 4)
    base = BASES["sgd_mom"]
    masters, grads, coefs, state, v, vc = combine_inputs(n, dtype, "cpu", "central", base)
    params = [m.to(dtype) for m in masters]

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
    ops.register_backend("cpp", "lookahead_ext.ops._no_such_native", alias_of="native", devices=("cpu",))
    try:
        with pytest.raises(ops.BackendUnavailable, match="cpp"):
            ops.sq_norm(x, backend="cpp")
    finally:
        ops.register_backend("cpp", "lookahead_ext.ops.native:NATIVE", alias_of="native", devices=("cpu",))
    assert ops.sq_norm(x, backend="cpp").item() == 3.0
    ops.clear_dispatch_cache()
    assert ops._impl("auto", x[0]) is native.NATIVE


# ----------------------------------------------------------------------------- opcheck
def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    n = [5, 1, 70000]
    P = [r(k, dtype=torch.bfloat16) for k in n]
    W, G1, G2, B1, V, S = ([r(k) for k in n] for _ in range(6))
    ops = torch.ops.lookahead_ext
    return [
        (ops.multi_dot.default, (W + G1, 2, [0, 0, 0, 1], False)),
        (ops.multi_dot.default, (W + G1, 2, [1, 1], True)),
        (ops.perturb_.default, (P, W, V, torch.tensor(0.3, device=device), -1.0, [])),
        (ops.combine_step_.default, (P, W, [], [g.bfloat16() for g in G1], [g.bfloat16() for g in G2],
                                     [0.0, 1.5, -0.5], B1, [], V, [torch.rand((), device=device), None, torch.rand((), device=device), torch.rand((), device=device)], [0.0, 0.25, 0.0, 0.0],
                                     0, [0.1, 0.0, 0.9, 0.0], [1, 0, 0, 1, 1])),
        (ops.lookahead_sync_.default, (S, W, 0.5, P)),
        (ops.nonfinite_.default, (G1, torch.tensor(0.5, device=device))),
        (ops.nonfinite_.default, (G2, None)),
        (ops.nonfinite_.default, (G1 + G2, torch.tensor(0.5, device=device), [2, 4], True)),
        (ops.nonfinite_.default, (P, None, [], True)),
        (ops.combine_step_.default, (S, W, [], G1, G2, [0.0, 1.5, -0.5], B1, [], V,
                                     [torch.rand((), device=device) for _ in range(4)], [0.0] * 4, 0,
                                     [0.1, 0.0, 0.9, 0.0], [0, 0, 0, 1, 1], torch.zeros(1, device=device), False)),
    ]


@pytest.mark.parametrize("device", NATIVE_DEVICES)
def test_opcheck_registered_ops(device):
    for op, args in _opcheck_cases(device):
        # schema + fake (meta) kernels + autograd registration + functionalization
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_autograd_registration"))


@needs_cpp
def test_cpu_isa_reported():
    assert torch.ops.lookahead_ext.cpu_isa() in ("base", "avx2")
    assert native.NATIVE.available("cpu") == (True, "ok")


@needs_cpp
def test_cpu_and_meta_tensors_in_one_call_raise():
    """The dispatcher sends a call with any meta tensor to the fake kernels: a CPU tensor among
    them must raise (as the reference does), not return uninitialised memory or do nothing."""
    cpu, meta = torch.ones(3), torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="different devices"):
        native.multi_dot([[cpu, meta]], [(0, 0)])
    with pytest.raises(RuntimeError, match="different devices"):
        native.nonfinite_([[cpu], [meta]], sq_norms=True)
    with pytest.raises(RuntimeError, match="different devices"):
        native.lookahead_sync_([cpu], [meta], 0.5)
    with pytest.raises(RuntimeError, match="different devices"):
        native.perturb_([cpu], [meta], [torch.ones(3)], 0.5)  # direction apart from out (aliasing rules)
    with pytest.raises(RuntimeError, match="different devices"):
        native.combine_step_([cpu], [meta], (None, [torch.ones(3)], None), (0.0, 1.0, 0.0), BaseStep(lr=0.1), {})
    with pytest.raises(RuntimeError):  # the reference raises too
        reference.multi_dot([[cpu, meta]], [(0, 0)])
    # all-meta calls still trace (shapes only)
    assert native.multi_dot([[meta]], [(0, 0)]).device.type == "meta"


# a second instance of the native wrappers over the same torch ops, registered as a new backend
TWIN = native.NativeBackend("native_twin", "lookahead_ext", {"cpu": ("lookahead_ext._C",)})


@needs_cpp
def test_a_registered_backend_becomes_a_row_of_the_matrix():
    """The registry is extensible: one register_backend call gives a backend= name, an
    available_backends entry and a row that the conformance body runs."""
    ops.register_backend("native_twin", "test_native_ops:TWIN")
    try:
        assert "native_twin" in ops.BACKENDS and ops.available_backends()["native_twin"] == "ok"
        assert ("native_twin", "cpu") in ops.backend_rows()
        assert ops.sq_norm([torch.ones(3)], backend="native_twin").item() == 3.0
        row = next(r for r in present_rows() if r.backend == "native_twin")
        for op in op_db:
            for sample in op.sample_inputs(row, torch.float32, "one"):
                run_sample(TWIN, op.name, sample, row)
    finally:
        ops.unregister_backend("native_twin")
    assert "native_twin" not in ops.BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.sq_norm([torch.ones(3)], backend="native_twin")
