"""Comparison of op results with explicit tolerances (rtol, atol, ulps of the dtype); NaN and inf must match."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    """|actual - expected| <= atol + rtol |expected| + ulps * ulp_dtype(max(|actual|, |expected|))."""
    rtol: float
    atol: float
    ulps: float = 0.0


EXACT = Tol(0.0, 0.0)
_MANT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_TINY = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24, torch.float32: 2.0 ** -149}


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at |x| (x float32)."""
    _, e = torch.frexp(x.abs().float())
    u = torch.ldexp(torch.ones_like(x, dtype=torch.float32), (e - 1 - _MANT[dtype]).to(torch.int32))
    return torch.clamp(u, min=_TINY[dtype])


def assert_close(actual, expected, tol: Tol, what: str = "") -> None:
    """Elementwise |a - e| <= bound (see Tol); equal dtypes and shapes; NaN where and only where
    the expected value is NaN (a poisoned, unwritten output fails); infinities equal."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    if actual.numel() == 0:
        return
    a = actual.detach().float().cpu().reshape(-1)
    e = expected.detach().float().cpu().reshape(-1)
    nan_a, nan_e = a.isnan(), e.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())} NaN)"
    a, e = a[~nan_a], e[~nan_e]
    inf = e.isinf() | a.isinf()
    assert torch.equal(a[inf], e[inf]), f"{what}: infinities differ"
    a, e = a[~inf], e[~inf]
    bound = tol.atol + tol.rtol * e.abs()
    if tol.ulps:
        bound = bound + tol.ulps * ulp(torch.maximum(a.abs(), e.abs()), actual.dtype)
    err = (a - e).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{a.numel()} elements off beyond {tol}; first at {j}: "
                             f"got {a[j].item()!r}, want {e[j].item()!r}")


def assert_lists_close(actual, expected, tol: Tol, what: str = "") -> None:
    """assert_close over two tensor lists (or lists of lists), one comparison per dtype: the
    tensors of a dtype are concatenated (a message names the flat index within them)."""
    assert len(actual) == len(expected), (what, len(actual), len(expected))
    groups: dict = {}
    for i, (a, e) in enumerate(zip(actual, expected)):
        if isinstance(a, (list, tuple)):
            assert_lists_close(a, e, tol, f"{what}[{i}]")
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, (f"{what}[{i}]", a.shape, e.shape, a.dtype, e.dtype)
        ga, ge = groups.setdefault(a.dtype, ([], []))
        ga.append(a.detach().reshape(-1))
        ge.append(e.detach().reshape(-1))
    for dt, (ga, ge) in groups.items():
        assert_close(torch.cat(ga), torch.cat(ge), tol, f"{what} ({dt} tensors, concatenated)")
