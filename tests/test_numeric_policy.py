"""The numeric policy (docs/tolerances.md): torch's order and fused multiply-adds, bitwise across backends; the tolerance table."""
from __future__ import annotations

import os
import re
from fractions import Fraction

import pytest
import torch

from lookahead_ext import ops
from lookahead_ext.ops.base_step import BaseStep

import _cuda_emu
from _compare import Tol, assert_close
from op_db import DTYPES, DT_IDS, ROWS, TOLS, op_db
from optim_db import OPTIM_TOLS
from test_op_conformance import _flat, _get

CPP_OK = ops.available_backends()["cpp"] == "ok"
needs_cpp = pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
# torch's CPU kernels have fused multiply-adds only where its vector ISA has FMA
TORCH_FMA = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "SVE256", "SVE", "NEON")
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "tolerances.md")
N = 4099  # 8-wide vector bodies and a scalar tail

# values at the numeric edges: near float max, denormals, signed zeros, inf, nan
EDGES = [3e38, -3e38, 1e38, -1e38, 3.4e38, 1e-40, -1e-42, 1.4e-45, 0.0, -0.0, float("inf"), float("-inf"),
         float("nan")]


def _data(seed: int, scale: float = 1.0, edges: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g) * scale
    if edges:
        e = torch.tensor(EDGES)
        x[: len(e)] = e
        x[-len(e):] = e.flip(0)  # the scalar tail too
    return x


def _bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal bits, except that any NaN matches any NaN (its payload is not specified)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan_g, nan_w = got.isnan(), want.isnan()
    assert torch.equal(nan_g, nan_w), f"{what}: NaN at {int((nan_g != nan_w).sum())} other places"
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    diff = (got.view(ints) != want.view(ints)) & ~nan_g
    if bool(diff.any()):
        j = int(diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())}/{got.numel()} elements differ; first at {j}: "
                             f"got {got[j].item()!r}, want {want[j].item()!r}")


def sqrt_tol(lr: float, steps: int) -> Tol:
    """torch's CPU float32 sqrt is not correctly rounded (torch 2.13 with MKL: ~15% of values one
    ulp off); the kernels' sqrtf is. AdamW's denominator may thus differ by one ulp: each update
    u (|u| <~ 3 lr) by |u| 2^-23 and a rounding, the weight by that per step plus two of its
    ulps. The state (m, s, which never read w) and everything else stay bitwise."""
    return Tol(0.0, 3 * lr * steps * 2.0 ** -22, ulps=2)


def _equal(got, want, what, sqrt_outputs=(), lr=0.0, steps=3):
    for i, (g, w) in enumerate(zip(got, want)):
        if i in sqrt_outputs:
            assert_close(g, w, sqrt_tol(lr, steps), f"{what} output {i}")
        else:
            _bitwise(g, w, f"{what} output {i}")


@pytest.fixture(params=["base", "avx2"])
def isa(request, monkeypatch):
    """The C++ kernels of one instruction set (LOOKAHEAD_EXT_CPU_ISA is read per call)."""
    if not CPP_OK:
        pytest.skip("C++ extension not built")
    monkeypatch.setenv("LOOKAHEAD_EXT_CPU_ISA", request.param)
    try:
        torch.ops.lookahead_ext.cpu_isa()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return request.param


# ----------------------------------------------------------------------------- torch's own kernels
def _rn(x) -> float:
    """x rounded to float32 (through float64: a double rounding, off only at exact float64 ties,
    which random float32 inputs do not hit)."""
    return float(torch.tensor(float(x), dtype=torch.float64).to(torch.float32))


def _fma(a, b, c) -> float:
    """a * b + c rounded once to float32 (exact rational arithmetic)."""
    return _rn(Fraction(a) * Fraction(b) + Fraction(c))


@pytest.mark.skipif(not TORCH_FMA, reason="torch's CPU kernels have no FMA on this CPU")
def test_torch_cpu_kernels_fuse_where_the_policy_says():
    """The premise of the policy: on this CPU, torch's add(alpha=), lerp and addcmul round once
    (a fused multiply-add), addcdiv rounds value * t1 first, then / t2, then the sum."""
    n = 67
    a, b, c = _data(1, edges=False)[:n], _data(2, edges=False)[:n], _data(3, edges=False)[:n] * 1e-3
    q = b.abs() + 0.5
    s, w_small, w_big = 0.3, 0.1, 0.9
    S, Ws, Wb = _rn(s), _rn(w_small), _rn(w_big)
    A, B, C, Q = a.tolist(), b.tolist(), c.tolist(), q.tolist()
    cases = {
        "add(alpha)": (torch.add(a, b, alpha=s), [_fma(S, B[i], A[i]) for i in range(n)],
                       [_rn(A[i] + _rn(S * B[i])) for i in range(n)]),
        "lerp small w": (torch.lerp(a, b, w_small), [_fma(Ws, _rn(B[i] - A[i]), A[i]) for i in range(n)],
                         [_rn(A[i] + _rn(Ws * _rn(B[i] - A[i]))) for i in range(n)]),
        "lerp large w": (torch.lerp(a, b, w_big), [_fma(_rn(Wb - 1), _rn(B[i] - A[i]), B[i]) for i in range(n)],
                         [_rn(B[i] - _rn(_rn(B[i] - A[i]) * _rn(1 - Wb))) for i in range(n)]),
        "addcmul": (torch.addcmul(c, a, b, value=s), [_fma(_rn(S * A[i]), B[i], C[i]) for i in range(n)],
                    [_rn(C[i] + _rn(_rn(S * A[i]) * B[i])) for i in range(n)]),
        "addcdiv": (torch.addcdiv(c, a, q, value=s), [_rn(C[i] + _rn(_rn(S * A[i]) / Q[i])) for i in range(n)],
                    [_rn(C[i] + _rn(S * _rn(A[i] / Q[i]))) for i in range(n)]),
    }
    for name, (got, policy, other) in cases.items():
        assert got.tolist() == policy, f"torch's {name} no longer rounds as the policy says"
        assert policy != other, f"{name}: the sample cannot tell the two roundings apart"


# ----------------------------------------------------------------------------- ops: cpp == reference
def _run_perturb(backend, scale, out_dtype=torch.float32):
    b, d = _data(10), _data(11, scale=3e38 / 4)
    out = torch.empty(N, dtype=out_dtype)
    ops.perturb_([out], [b], [d], scale, backend=backend)
    return [out]


def _run_sync(backend, alpha):
    slow, fast = _data(12, scale=1e38), _data(13, scale=3e38 / 4)
    ops.lookahead_sync_([slow], [fast], alpha, backend=backend)
    return [slow, fast]


def _run_combine(backend, base_kw, steps=3, param_dtype=torch.float32, scale=1.0, with_v=True):
    """A few combine_step_ calls with all three gradient terms and v: masters, state, v, params."""
    w = _data(20, scale=scale)
    p = w.to(param_dtype)
    names = ("exp_avg", "exp_avg_sq") if base_kw["kind"] == "adamw" else ("momentum_buffer",)
    state = {n: [torch.zeros(N)] for n in names}
    v = [_data(21)] if with_v else None
    for t in range(steps):
        grads = [[_data(30 + 3 * t + j, scale=scale)] for j in range(3)]
        kw = dict(base_kw, step=t + 1) if base_kw["kind"] == "adamw" else dict(base_kw, first=t == 0)
        base = BaseStep(**kw)
        st = state if base.state_names() else {}
        ops.combine_step_([p], [w], grads, (0.25, 0.7, -0.45), base, st, v=v,
                          v_coefs=(0.9, 0.05, 0.3, -0.2) if with_v else None, backend=backend)
    return [w, p] + [s[0] for s in state.values()] + (v or [])


BASES = {
    "sgd": dict(kind="sgd", lr=0.1),
    "sgd_mom_wd": dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": dict(kind="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    "sgd_dampening": dict(kind="sgd", lr=0.5, momentum=0.9, dampening=0.1),
    "adamw": dict(kind="adamw", lr=1e-2, weight_decay=1e-2),
}
CASES = {
    "perturb_float_scale": lambda be: _run_perturb(be, 1.5),
    "perturb_tensor_scale": lambda be: _run_perturb(be, torch.tensor(1.5)),
    "perturb_bf16_out": lambda be: _run_perturb(be, -1.25, torch.bfloat16),
    "perturb_fp16_out": lambda be: _run_perturb(be, 0.37, torch.float16),
    "sync_small_alpha": lambda be: _run_sync(be, 0.3),
    "sync_large_alpha": lambda be: _run_sync(be, 0.8),
    **{f"combine_{k}": (lambda be, kw=kw: _run_combine(be, kw)) for k, kw in BASES.items()},
    **{f"combine_{k}_1e38": (lambda be, kw=kw: _run_combine(be, kw, scale=1e38 / 3)) for k, kw in BASES.items()},
    "combine_adamw_bf16_params": lambda be: _run_combine(be, BASES["adamw"], param_dtype=torch.bfloat16),
    "combine_sgd_fp16_params": lambda be: _run_combine(be, BASES["sgd_mom_wd"], param_dtype=torch.float16),
}


def _ieee_sqrt(xs):
    """Correctly rounded float32 square roots (a float64 sqrt rounds correctly to float32)."""
    return [x.double().sqrt().to(x.dtype) for x in xs]


@pytest.mark.parametrize("case", list(CASES))
def test_cpp_equals_reference_bitwise(isa, case, monkeypatch):
    """fp32 arithmetic in the policy's order: the C++ kernels of every instruction set give the
    reference's bits, at the edges too (overflow to inf, denormals, signed zeros, inf, nan). The
    reference's square root is made IEEE, as the kernels' (torch's is not, see sqrt_tol)."""
    got = CASES[case]("cpp")
    monkeypatch.setattr(torch, "_foreach_sqrt", _ieee_sqrt)
    want = CASES[case]("reference")
    _equal(got, want, f"{isa} {case}")


@pytest.mark.cuda_emu
@pytest.mark.skipif(_cuda_emu.WHY is not None, reason=_cuda_emu.SKIP_REASON)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_emu_equals_reference_bitwise(case, monkeypatch):
    """The CUDA kernels (la_math.h with --fmad=false semantics, run on the CPU through HIP-CPU)
    give the reference's bits too."""
    got = CASES[case](_cuda_emu.NAME)
    monkeypatch.setattr(torch, "_foreach_sqrt", _ieee_sqrt)
    want = CASES[case]("reference")
    _equal(got, want, f"cuda_emu {case}")


def test_reference_float_and_tensor_scale_agree():
    """perturb_'s float scale and 0-d tensor scale are one formula (product rounded, then sum)."""
    _bitwise(_run_perturb("reference", 0.37)[0], _run_perturb("reference", torch.tensor(0.37))[0], "perturb")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_overflow_is_ieee_inf(backend):
    """An exact result beyond float max is inf (never NaN, never a clamped 3.4e38); a product that
    overflows inside the formula overflows as in torch (perturb_ rounds scale * dir first)."""
    if backend == "cpp" and not CPP_OK:
        pytest.skip("C++ extension not built")
    b = torch.tensor([3e38, -3e38, 3e38, 1.0])
    d = torch.tensor([3e38, -3e38, -3e38, 3e38])
    out = torch.empty(4)
    ops.perturb_([out], [b], [d], 1.5, backend=backend)
    # 3e38 + 4.5e38 -> inf; 3e38 - 4.5e38 is -1.5e38 exactly, but 1.5 * -3e38 overflows first
    assert out.tolist() == [float("inf"), float("-inf"), float("-inf"), float("inf")]
    ob = torch.empty(4, dtype=torch.bfloat16)
    ops.perturb_([ob], [torch.tensor([3.4e38, 3.2e38, -3.4e38, 0.0])], [torch.ones(4)], 0.0, backend=backend)
    assert ob.float().tolist() == torch.tensor([3.4e38, 3.2e38, -3.4e38, 0.0]).to(torch.bfloat16).float().tolist()
    assert ob[0].float().item() == float("inf")  # rounds to nearest: past bf16's max, not clamped


# ----------------------------------------------------------------------------- base step vs torch.optim
def _torch_run(cls, w0, grads, foreach, **hp):
    p = torch.nn.Parameter(w0.clone())
    opt = cls([p], foreach=foreach, **hp)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    st = opt.state[p]
    return [p.detach()] + [st[k] for k in ("exp_avg", "exp_avg_sq", "momentum_buffer") if k in st]


def _ours(backend, kind, w0, grads, **hp):
    """combine_step_ with d = g0 (c0 = 1): the family's base step, as torch.optim takes it."""
    w = w0.clone()
    p = w.clone()
    names = ("exp_avg", "exp_avg_sq") if kind == "adamw" else ("momentum_buffer",)
    state = {n: [torch.zeros(N)] for n in names}
    for t, g in enumerate(grads):
        if kind == "adamw":
            base = BaseStep("adamw", lr=hp["lr"], weight_decay=hp["weight_decay"], eps=hp.get("eps", 1e-8),
                            beta1=0.9, beta2=0.999, step=t + 1)
        else:
            base = BaseStep("sgd", lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.0),
                            momentum=hp.get("momentum", 0.0), dampening=hp.get("dampening", 0.0),
                            nesterov=hp.get("nesterov", False), first=t == 0)
        st = state if base.state_names() else {}
        ops.combine_step_([p], [w], [[g.clone()], None, None], (1.0, 0.0, 0.0), base, st, backend=backend)
    return [w] + [s[0] for s in state.values() if base.state_names()]


# (name, torch class, hyper-parameters, scale of w, scale of the gradients)
TORCH_CASES = [
    ("sgd_1e38", "sgd", dict(lr=2.0, momentum=0.9, weight_decay=0.5), 1e38, 1e38),
    ("sgd_nesterov_1e38", "sgd", dict(lr=2.0, momentum=0.9, nesterov=True, weight_decay=0.5), 1e38, 1e38),
    ("sgd_dampening", "sgd", dict(lr=0.5, momentum=0.9, dampening=0.1), 1.0, 1.0),
    ("adamw", "adamw", dict(lr=1e-2, weight_decay=1e-2), 1.0, 1.0),
    # g^2 overflows where ((1 - beta2) g) g does not
    ("adamw_g1e20", "adamw", dict(lr=1.0, weight_decay=1e-2), 1.0, 1e20),
    # -step_size * m overflows where m / denom does not
    ("adamw_step_1e38", "adamw", dict(lr=1e30, weight_decay=0.0), 1e38, 1e10),
    ("adamw_w1e38", "adamw", dict(lr=1e-2, weight_decay=0.5), 3e38, 1.0),
]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_base_step_equals_torch_optim(backend, case, foreach, monkeypatch):
    """The family's SGD / AdamW base step gives torch.optim's bits (weights and state), 1e38 included
    (the C++ AdamW weights: up to torch's sqrt rounding, sqrt_tol)."""
    if backend == "cpp" and not CPP_OK:
        pytest.skip("C++ extension not built")
    if not TORCH_FMA:
        pytest.skip("torch's CPU kernels have no FMA on this CPU: the policy follows the FMA builds")
    _, kind, hp, ws, gs = case
    w0 = _data(40, scale=ws, edges=False)
    grads = [_data(41 + t, scale=gs, edges=False) for t in range(3)]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.SGD
    want = _torch_run(cls, w0, grads, foreach, **hp)
    isas = ("base", "avx2") if backend == "cpp" else (None,)
    for isa in isas:
        if isa:
            monkeypatch.setenv("LOOKAHEAD_EXT_CPU_ISA", isa)
            try:
                torch.ops.lookahead_ext.cpu_isa()
            except RuntimeError:
                continue
        got = _ours(backend, kind, w0, grads, **hp)
        sqrt_outputs = (0,) if kind == "adamw" and backend == "cpp" else ()  # the reference is torch's ops
        _equal(got, want, f"{backend} {isa} {case[0]}", sqrt_outputs, lr=hp["lr"], steps=len(grads))


# ----------------------------------------------------------------------------- the published table
BEGIN, END = "<!-- tolerance-table:begin (generated by tests/test_numeric_policy.py) -->", "<!-- tolerance-table:end -->"
_KIND_TEXT = {"state": "fp32 state, masters, v, slow weights", "param": "a tensor in its own dtype",
              "reduce": "fp32 reduction (dot products, norms)", "unscaled": "values unscaled in place",
              "exact": "copies, flags, backups"}


def _fmt(t) -> str:
    if t.rtol == 0 and t.atol == 0 and not t.ulps:
        return "exact"
    s = f"rtol {t.rtol:g}, atol {t.atol:g}"
    return s + (f", {t.ulps:g} ulp" if t.ulps else "")


def _op_kinds(row) -> dict:
    """{op: {kind: dtypes written}} from the conformance samples themselves."""
    out = {}
    for op in op_db:
        kinds = out.setdefault(op.name, {})
        for dt in DTYPES:
            for s in op.sample_inputs(row, dt, [3]):
                for path, kind in s.writes:
                    kinds.setdefault(kind, set()).update(t.dtype for t in _flat(_get(s.args, path)))
                if s.ret:
                    kinds.setdefault(s.ret, set()).add(torch.float32)
    return out


def render_table() -> str:
    lines = ["| op | output | backends | " + " | ".join(DT_IDS[d] for d in DTYPES) + " |",
             "|---|---|---|" + "---|" * len(DTYPES)]
    for table in TOLS:
        backends = ", ".join(sorted({f"{r.backend} ({r.device})" for r in ROWS.values() if r.tol == table}))
        row = next(r for r in ROWS.values() if r.tol == table and r.device == "cpu")
        for op, kinds in _op_kinds(row).items():
            for kind in sorted(kinds):
                cells = ["-" if dt not in kinds[kind] else "exact" if kind == "exact" else _fmt(TOLS[table][kind][dt])
                         for dt in DTYPES]
                lines.append(f"| `{op}` | {_KIND_TEXT[kind]} | {backends} | " + " | ".join(cells) + " |")
    lines += ["", "| optimizer trajectories vs `reference` | backends | " + " | ".join(DT_IDS[d] for d in DTYPES) + " |",
              "|---|---|" + "---|" * len(DTYPES)]
    for table, per_dt in OPTIM_TOLS.items():
        backends = ", ".join(sorted({f"{r.backend} ({r.device})" for r in ROWS.values() if r.tol == table}))
        cells = [f"rtol {per_dt[d]['rtol']:g}, atol {per_dt[d]['atol']:g}" for d in DTYPES]
        lines.append(f"| `test_optim_parity.py` | {backends} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_published_tolerance_table_is_the_tests_own():
    """docs/tolerances.md carries the table rendered from op_db.TOLS / optim_db.OPTIM_TOLS."""
    text = open(DOC).read()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    assert m, f"docs/tolerances.md lacks the {BEGIN} ... {END} block"
    new = render_table()
    assert m.group(1) == new, "docs/tolerances.md's table is stale; paste between the markers:\n" + new
