"""Stress cases of the CUDA kernels (csrc/ops_cuda.cu, multi_tensor.cuh) executed on the CPU
through HIP-CPU, against the reference: launch splitting, chunk tables, alignment, sentinel gaps
and reductions in the real build and in a small-chunk build (docs/cuda-emulation.md). The op
conformance matrix and the optimizer parity tests run on the emulated build as their "cuda_emu"
row (tests/conftest.py); this file holds what the matrix does not cover."""
import pytest
import torch

from lookahead_ext.ops import reference
from lookahead_ext.ops.base_step import BaseStep

import _cuda_emu as emu
from _compare import EXACT, assert_lists_close as _assert_lists_close
from op_db import tol

pytestmark = [pytest.mark.cuda_emu, emu.needs_emu]
STATE_TOL = tol("native", "state", torch.float32)


def param_tol(dtype):
    return tol("native", "param", dtype)


def assert_lists_close(actual, expected, t):
    _assert_lists_close(actual, expected, t, "emulated vs reference")


def test_matrix_has_the_emulated_row():
    """Guards the registration in conftest: the op matrix and optimizer parity run on the
    emulated build, and an optimizer asked for backend="cuda_emu" gets its ops."""
    from lookahead_ext import ops
    assert (emu.NAME, "cpu") in ops.backend_rows()
    assert ops.resolve(emu.NAME, torch.device("cpu"), torch.bfloat16) is emu.CUDA_EMU


# ----------------------------------------------------------------------------- stress helpers
VARIANTS = list(emu.VARIANTS)
needs_default = pytest.mark.skipif("default" not in VARIANTS, reason="the default build is not in this run")
needs_small = pytest.mark.skipif("small" not in VARIANTS, reason="the small-chunk build is not in this run")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SENTINEL = -1216.0  # exact in fp32, bf16 and fp16


def _rand(sizes, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * scale).to(dtype) for n in sizes]


def _edge_sizes(cfg):
    c = cfg["chunk"]
    return [0, 1, 3, c - 1, c, c + 1]


class Views:
    """Tensors as views at element offset `off` (0, 1, 3: misaligned for 16-byte vectors) of
    one flat buffer, separated by sentinel gaps: writes outside a view show in the gaps."""

    GAP = 5

    def __init__(self, sizes, dtype, off, seed, scale=1.0):
        total = off + sum(n + self.GAP for n in sizes)
        self.buf = torch.full((total,), SENTINEL, dtype=dtype)
        self.views, pos = [], off
        for n, t in zip(sizes, _rand(sizes, dtype, seed, scale)):
            v = self.buf[pos:pos + n]
            v.copy_(t)
            self.views.append(v)
            pos += n + self.GAP
        self.mask = torch.ones(total, dtype=torch.bool)
        pos = off
        for n in sizes:
            self.mask[pos:pos + n] = False
            pos += n + self.GAP

    def assert_gaps_untouched(self):
        gaps = self.buf[self.mask]
        assert bool((gaps == SENTINEL).all()), "a kernel wrote outside its tensor views"


def _clone(ts):
    return None if ts is None else [t.clone() for t in ts]


# ----------------------------------------------------------------------------- stress: multi_dot
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("off", [0, 1, 3])
def test_multi_dot_sizes_and_offsets(variant, dt, off):
    b = emu.backend(variant)
    cfg = emu.config(variant)
    sizes = _edge_sizes(cfg)
    x = Views(sizes, DTYPES[dt], off, 1)
    y = Views(sizes, torch.float32, 0, 2)  # another dtype, aligned: decided per list
    pairs = [(0, 0), (0, 1), (1, 1)]
    for per_tensor in (False, True):
        got = b.multi_dot([x.views, y.views], pairs, per_tensor)
        want = reference.multi_dot([x.views, y.views], pairs, per_tensor)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-4)
    x.assert_gaps_untouched()


def _table_counts(cfg, depth):
    kt = cfg[f"table{depth}"]
    return {"full": kt, "full_plus_1": kt + 1, "two_full": 2 * kt}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("count", ["full", "full_plus_1", "two_full"])
def test_multi_dot_table_splits(variant, count):
    """Exactly full launch tables, one more tensor, two tables; per-tensor results in order."""
    cfg = emu.config(variant)
    n = _table_counts(cfg, 2)[count]
    sizes = [(i * 7) % 13 + 1 for i in range(n)]
    sizes[n // 2] = 0  # an empty tensor inside the list
    a, c = _rand(sizes, torch.float32, 3), _rand(sizes, torch.bfloat16, 4)
    got = emu.backend(variant).multi_dot([a, c], [(0, 1), (1, 1)], per_tensor=True)
    torch.testing.assert_close(got, reference.multi_dot([a, c], [(0, 1), (1, 1)], per_tensor=True),
                               rtol=2e-5, atol=1e-5)


@needs_small
def test_one_tensor_over_max_blocks_small_build():
    """One tensor of more than kMaxBlocks chunks: split across launches mid-tensor (slot 0
    carries it on, block_base advances), every chunk counted once."""
    cfg = emu.config("small")
    n = cfg["chunk"] * (2 * cfg["max_blocks"] + 1) + 3
    b = emu.backend("small")
    sizes = [5, n, 2, n]
    a = _rand(sizes, torch.float32, 5)
    got = b.multi_dot([a], [(0, 0)], per_tensor=True)
    torch.testing.assert_close(got, reference.multi_dot([a], [(0, 0)], per_tensor=True), rtol=2e-5, atol=1e-5)
    # every element once: an in-place op that is not idempotent
    x = Views(sizes, torch.float32, 1, 6)
    want = [t.clone() for t in x.views]
    d = _rand(sizes, torch.float32, 7)
    b.perturb_(x.views, x.views, d, 0.5)
    reference.perturb_(want, want, d, 0.5)
    assert_lists_close(x.views, want, param_tol(torch.float32))
    x.assert_gaps_untouched()
    flag = b.nonfinite_([x.views], torch.tensor(0.5), sq_norms=True)
    want_flag = reference.nonfinite_([want], torch.tensor(0.5), sq_norms=True)
    assert_lists_close(x.views, want, EXACT)
    torch.testing.assert_close(flag, want_flag, rtol=2e-5, atol=1e-5)


# ----------------------------------------------------------------------------- stress: perturb_
# the dtype handling is the same code in every geometry: the small build (cheap) runs the 27
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v == "small"] or VARIANTS[:1])
@pytest.mark.parametrize("ot", list(DTYPES))
@pytest.mark.parametrize("bt", list(DTYPES))
@pytest.mark.parametrize("dt", list(DTYPES))
def test_perturb_every_dtype_triple(variant, ot, bt, dt):
    """Every (out, base, direction) dtype triple the CPU op accepts, at edge sizes and offsets."""
    b = emu.backend(variant)
    sizes = _edge_sizes(emu.config(variant))
    out = Views(sizes, DTYPES[ot], 1, 1)
    base = Views(sizes, DTYPES[bt], 3, 2)
    direction = _rand(sizes, DTYPES[dt], 3)
    want = _clone(out.views)
    scale = torch.tensor(-0.37)
    b.perturb_(out.views, base.views, direction, scale)
    reference.perturb_(want, base.views, direction, scale)
    assert_lists_close(out.views, want, param_tol(DTYPES[ot]))
    out.assert_gaps_untouched()
    base.assert_gaps_untouched()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("count", ["full", "full_plus_1", "two_full"])
@pytest.mark.parametrize("off", [0, 1, 3])
def test_perturb_in_place_with_backup_tables_and_offsets(variant, count, off):
    """In place (out is base) with a backup: each element visited exactly once, backup exact."""
    cfg = emu.config(variant)
    n = _table_counts(cfg, 4)[count]
    sizes = [cfg["chunk"] + 3 if i % 5 == 0 else (i * 5) % 11 for i in range(n)]
    x = Views(sizes, torch.bfloat16, off, 8)
    orig = _clone(x.views)
    bk = Views(sizes, torch.bfloat16, (off + 1) % 4, 9)
    d = _rand(sizes, torch.float32, 10)
    b = emu.backend(variant)
    b.perturb_(x.views, x.views, d, 0.61, backup=bk.views)
    want = _clone(orig)
    reference.perturb_(want, want, d, 0.61)
    assert_lists_close(x.views, want, param_tol(torch.bfloat16))
    assert_lists_close(bk.views, orig, EXACT)
    x.assert_gaps_untouched()
    bk.assert_gaps_untouched()


# ----------------------------------------------------------------------------- stress: combine_step_
_BASES = {"sgd_nesterov": BaseStep("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
          "adamw": BaseStep("adamw", lr=1e-2, weight_decay=0.1, beta1=0.8, step=3)}


def _combine(b, sizes, pt, gt, base, off, with_v=True, seed=0):
    masters = Views(sizes, torch.float32, off, seed + 1)
    params = Views(sizes, pt, (off + 1) % 4, seed + 2)
    for p, m in zip(params.views, masters.views):
        p.copy_(m)
    g0 = _rand(sizes, gt, seed + 3)
    gp, gm = _rand(sizes, gt, seed + 4), _rand(sizes, gt, seed + 5)
    state = {name: Views(sizes, torch.float32, off, seed + 6 + j, 0.1) for j, name in enumerate(base.state_names())}
    for name, s in state.items():
        if "sq" in name:
            for t in s.views:
                t.abs_()
    v = Views(sizes, torch.float32, 3, seed + 9) if with_v else None
    vc = (torch.tensor(0.33), 0.02, torch.tensor(0.05), torch.tensor(-0.04)) if with_v else None
    ref = [_clone(params.views), _clone(masters.views), {k: _clone(s.views) for k, s in state.items()},
           _clone(v.views) if with_v else None]
    vsq_a, vsq_b = (torch.zeros(1), torch.zeros(1)) if with_v else (None, None)
    coefs = (0.1, 1.5, -0.5)
    b.combine_step_(params.views, masters.views, (g0, gp, gm), coefs, base, {k: s.views for k, s in state.items()},
                    v.views if with_v else None, vc, vsq_a)
    reference.combine_step_(ref[0], ref[1], (g0, gp, gm), coefs, base, ref[2], ref[3], vc, vsq_b)
    assert_lists_close(masters.views, ref[1], STATE_TOL)
    assert_lists_close(params.views, ref[0], param_tol(pt))
    for k, s in state.items():
        assert_lists_close(s.views, ref[2][k], STATE_TOL)
    for x in [masters, params, *state.values()] + ([v] if with_v else []):
        x.assert_gaps_untouched()
    if with_v:
        assert_lists_close(v.views, ref[3], STATE_TOL)
        torch.testing.assert_close(vsq_a, vsq_b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v == "small"] or VARIANTS[:1])
@pytest.mark.parametrize("pt", list(DTYPES))
@pytest.mark.parametrize("gt", list(DTYPES))
@pytest.mark.parametrize("base", list(_BASES))
def test_combine_every_param_grad_dtype_pair(variant, pt, gt, base):
    """Every (params, grads) dtype pair the CPU op accepts (fp32 params with bf16/fp16 grads
    included: review item 2), edge sizes, lists at different offsets."""
    b = emu.backend(variant)
    _combine(b, _edge_sizes(emu.config(variant)), DTYPES[pt], DTYPES[gt], _BASES[base], 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("count", ["full", "full_plus_1", "two_full"])
@pytest.mark.parametrize("off", [0, 1, 3])
def test_combine_tables_and_offsets(variant, count, off):
    cfg = emu.config(variant)
    n = _table_counts(cfg, 8)[count]
    sizes = [cfg["chunk"] + 1 if i % 7 == 3 else (i * 3) % 10 for i in range(n)]
    _combine(emu.backend(variant), sizes, torch.bfloat16, torch.bfloat16, _BASES["adamw"], off, seed=20)


# ----------------------------------------------------------------------------- stress: lookahead_sync_
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ft", list(DTYPES))
@pytest.mark.parametrize("count", ["full", "full_plus_1"])
@pytest.mark.parametrize("off", [0, 1, 3])
def test_lookahead_sync_tables_and_offsets(variant, ft, count, off):
    cfg = emu.config(variant)
    n = _table_counts(cfg, 3)[count]
    sizes = (_edge_sizes(cfg) * (n // 6 + 1))[:n]
    slow = Views(sizes, torch.float32, off, 1)
    fast = Views(sizes, DTYPES[ft], (off + 1) % 4, 2)
    params = Views(sizes, torch.float16, 3, 3)
    ref = [_clone(slow.views), _clone(fast.views), _clone(params.views)]
    emu.backend(variant).lookahead_sync_(slow.views, fast.views, 0.3, params.views)
    reference.lookahead_sync_(ref[0], ref[1], 0.3, ref[2])
    assert_lists_close(slow.views, ref[0], STATE_TOL)
    assert_lists_close(fast.views, ref[1], param_tol(DTYPES[ft]))
    assert_lists_close(params.views, ref[2], param_tol(torch.float16))
    for x in (slow, fast, params):
        x.assert_gaps_untouched()


# ----------------------------------------------------------------------------- stress: nonfinite_
def _positions(sizes, cfg):
    """(tensor, index) where a bad value goes: first, chunk boundaries, tail, last element."""
    c = cfg["chunk"]
    out = []
    for t, n in enumerate(sizes):
        for i in {0, c - 1, c, n - 1, n - 2, c // 2 + 1}:
            if 0 <= i < n:
                out.append((t, i))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("off", [0, 1])
def test_nonfinite_caught_anywhere_in_mixed_dtype_lists(variant, bad, off):
    """One bad value at each position of a mixed-dtype list is flagged (by whichever thread
    and block holds it); sq_norms per list agree with the reference; nothing else written."""
    cfg = emu.config(variant)
    sizes = _edge_sizes(cfg)[1:]
    b = emu.backend(variant)
    lists = [Views(sizes, dt, off + k, 30 + k) for k, dt in enumerate(DTYPES.values())]
    flat = [(li, t) for li in range(3) for t in range(len(sizes))]
    clean = b.nonfinite_([x.views for x in lists], sq_norms=True)
    assert float(clean[0]) == 0.0
    k = 0
    for li, t in flat:
        for _, i in [p for p in _positions(sizes, cfg) if p[0] == t]:
            view = lists[li].views[t]
            old = view[i].item()
            view[i] = float(bad)
            k += 1  # the plain check and the sq_norms pass take turns
            got = b.nonfinite_([x.views for x in lists], sq_norms=k % 2 == 0)
            assert float(got.reshape(-1)[0]) == 1.0, (li, t, i)
            view[i] = old
    for x in lists:
        x.assert_gaps_untouched()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("off", [0, 1, 3])
def test_nonfinite_unscale_sq_norms_mixed_lists(variant, off):
    """Unscale in place (each element once) and per-list squared norms of mixed-dtype lists,
    empty lists and more tensors than one table."""
    cfg = emu.config(variant)
    kt = cfg["table1"]
    sizes_a = _edge_sizes(cfg)
    sizes_b = [(i * 3) % 7 for i in range(kt + 2)]
    la = [Views(sizes_a, torch.float32, off, 40), Views(sizes_a, torch.bfloat16, off, 41)]
    lb = Views(sizes_b, torch.float16, off, 42)
    lists = [la[0].views + la[1].views, [], lb.views]
    want = [_clone(x) for x in lists]
    inv = torch.tensor(0.25)
    got = emu.backend(variant).nonfinite_(lists, inv, sq_norms=True)
    ref = reference.nonfinite_(want, inv, sq_norms=True)
    for g, w in zip(lists, want):
        assert_lists_close(g, w, EXACT)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-5)
    for x in (*la, lb):
        x.assert_gaps_untouched()


@needs_default
def test_emulated_reductions_are_deterministic():
    """Fixed partial slots and fixed-order sums: bitwise equal across runs."""
    x = _rand([70001, 3, 131072 + 5], torch.float32, 50)
    b = emu.backend("default")
    r = [b.multi_dot([x], [(0, 0)], per_tensor=True) for _ in range(3)]
    s = [b.nonfinite_([x], sq_norms=True) for _ in range(3)]
    assert all(torch.equal(r[0], y) for y in r[1:]) and all(torch.equal(s[0], y) for y in s[1:])


# ----------------------------------------------------------------------------- launches per op
def _launches(fn) -> int:
    ns = emu.ops("default")
    n0 = ns.emu_launches()
    fn()
    return ns.emu_launches() - n0


@needs_default
@pytest.mark.parametrize("n", [3, 60])
def test_nonfinite_sq_norms_launches_do_not_grow_with_tensors(n):
    """Review item 3: sq_norms over mixed-dtype lists is one element launch per dtype, one
    per-tensor reduction per dtype and one for the list sums, whatever the number of tensors
    (it was a multi_dot, 3 launches and a pinned copy, per tensor of a mixed list)."""
    b = emu.backend("default")
    mixed = [torch.randn(5 + i).to(dt) for i in range(n // 3) for dt in DTYPES.values()]
    lists = [mixed, [torch.randn(4) for _ in range(n)]]
    assert _launches(lambda: b.nonfinite_(lists, torch.tensor(0.5), sq_norms=True)) == 3 + 3 + 1
    assert _launches(lambda: b.nonfinite_(lists)) == 3


@needs_default
def test_multi_dot_launches():
    """One element launch per pair, then one per-tensor and one total reduction (no host copy
    of chunk offsets in between: review item 1)."""
    b = emu.backend("default")
    x = _rand([7, 70000, 3], torch.float32, 60)
    y = _rand([7, 70000, 3], torch.bfloat16, 61)
    assert _launches(lambda: b.multi_dot([x, y], [(0, 0), (0, 1), (1, 1)])) == 3 + 2
