"""Test configuration: the Triton interpreter on machines without a GPU, the markers, the `backend`
parameter (one row per backend present here, see op_db.present_rows, plus the emulated CUDA build's
row, marked cuda_emu) and model/batch/closure fixtures.

TRITON_INTERPRET must be set before any kernel is defined, hence here, at collection start."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (the README's test command runs one worker per core): the workers share the
# cores, so each takes its share of torch's intra-op threads (OpenMP threads of two workers
# spinning on the same cores slow both down); a test that needs a count sets its own.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests; the full run includes them, `-m 'not slow'` skips them")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


# the emulated CUDA build (tests/_cuda_emu.py) is one more row of the matrix, for the tests only
import _cuda_emu  # noqa: E402
from lookahead_ext import ops as _ops  # noqa: E402

_ops.register_backend(_cuda_emu.NAME, "_cuda_emu:CUDA_EMU")


def _row_param(row):
    """A row as a pytest parameter: the emulated row is marked cuda_emu (skipped where it cannot build)."""
    if row.backend != _cuda_emu.NAME:
        return []
    marks = [pytest.mark.cuda_emu]
    if _cuda_emu.WHY is not None:
        marks.append(pytest.mark.skip(reason=_cuda_emu.SKIP_REASON))
    return marks


@pytest.fixture(autouse=True)
def _cuda_emu_ubsan(request):
    """A cuda_emu test may leave no UBSan report (a misaligned vector access in the kernels)."""
    if request.node.get_closest_marker("cuda_emu") is None or _cuda_emu.WHY is not None:
        yield
        return
    before = len(_cuda_emu.ubsan_reports())
    yield
    reports = _cuda_emu.ubsan_reports()
    assert len(reports) == before, "UBSan report(s):\n" + "\n".join(reports)[-4000:]


def pytest_generate_tests(metafunc):
    """`backend` (an op_db.Row): one row per backend and device type present on this machine; with
    a `size` argument too, the row's own sizes (the Triton interpreter runs small ones)."""
    if "backend" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0]
        if "backend" in [n.strip() for n in names]:
            return  # the test chose its own backends
    from op_db import ROWS, present_rows
    rows = present_rows()
    if _cuda_emu.WHY is not None:  # shown as skipped, with the reason, rather than absent
        rows.append(ROWS[(_cuda_emu.NAME, "cpu")])
    if "size" in metafunc.fixturenames:
        cases = [pytest.param(r, s, marks=_row_param(r), id=f"{r.id}-{s}") for r in rows for s in r.sizes]
        metafunc.parametrize("backend,size", cases)
    else:
        metafunc.parametrize("backend", [pytest.param(r, marks=_row_param(r), id=r.id) for r in rows])


# ----------------------------------------------------------------------------- model / batch / closure
def small_model(dtype=torch.float32, device="cpu", seed=0, hidden=33, out=3):
    """Linear(6, hidden) - Tanh - Linear(hidden, out): odd sizes cross every kernel's vector width."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, out))
    return m.to(device=device, dtype=dtype)


def small_batch(dtype=torch.float32, device="cpu", out=3, n=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g).to(device, dtype), torch.randn(n, out, generator=g).to(device, dtype)


def mse_closure(model, x, y):
    """A closure as torch.optim documents it: forward, backward, return the loss (fp32 loss)."""
    def closure():
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        return loss
    return closure


@pytest.fixture
def model():
    return small_model()


@pytest.fixture
def batch():
    return small_batch()


@pytest.fixture
def closure(model, batch):
    return mse_closure(model, *batch)


# hypothesis profiles (tests/test_ops_fuzz.py): bounded by default, `--hypothesis-profile=deep` for long runs
try:
    from hypothesis import HealthCheck, settings as _hsettings

    _hsettings.register_profile("default", max_examples=15, deadline=None, derandomize=True,
                                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    _hsettings.register_profile("deep", max_examples=2000, deadline=None,
                                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis is a test dependency; without it the fuzz tests are not collected
    pass
