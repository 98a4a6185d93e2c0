"""The emulated CUDA backend of the tests: csrc/ops_cuda.cu built against HIP-CPU
(scripts/build_cuda_emu.py) and run on CPU tensors as torch.ops.lookahead_ext_emu
(and lookahead_ext_emu_small, the small-chunk build). See docs/cuda-emulation.md.

CUDA_EMU is the "cuda_emu" row of the test matrix (tests/conftest.py registers it; users never
see it): a NativeBackend over the emulated namespace, present wherever HIP-CPU and TBB are, built
and loaded on its first op call (once per process, both variants in parallel)."""
from __future__ import annotations

import glob
import os
import sys
import threading

import pytest
import torch

from lookahead_ext.ops.native import NativeBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
try:
    import build_cuda_emu as _build
    WHY = _build.missing()
except ImportError:  # an installed package without the source tree
    _build, WHY = None, "no source tree (scripts/build_cuda_emu.py)"

NAME = "cuda_emu"
SKIP_REASON = f"emulated CUDA build unavailable: {WHY}"
# which builds the tests use (scripts/cuda_emu_mutations.py --variants small: one build per mutant)
VARIANTS = tuple(os.environ.get("LOOKAHEAD_EXT_EMU_VARIANTS", "default,small").split(","))
needs_emu = pytest.mark.skipif(WHY is not None, reason=SKIP_REASON)

# UBSan (-fsanitize=alignment) reports go to files checked after each test (conftest's fixture);
# the runtime reads UBSAN_OPTIONS at its first report, after this import
# (one folder per pytest-xdist worker: a worker clears and reads only its own reports)
UBSAN_DIR = os.path.join(_build.build_dir() if _build else ROOT, "ubsan" + os.environ.get("PYTEST_XDIST_WORKER", ""))
os.environ.setdefault("UBSAN_OPTIONS", f"print_stacktrace=1:log_path={os.path.join(UBSAN_DIR, 'report')}")

_lock = threading.Lock()
_built: dict[str, object] = {}
_error: list[str] = []


def ops(variant: str = VARIANTS[0]):
    """torch.ops namespace of a variant, built (both variants, in parallel) and loaded on first
    use in this process; pytest.fail with the compiler output when the build fails."""
    if WHY is not None:
        pytest.skip(SKIP_REASON)
    with _lock:
        if not _built and not _error:
            clear_ubsan()
            try:
                paths = _build.build(VARIANTS, log=lambda m: print(m, file=sys.stderr))
                for v, path in paths.items():
                    torch.ops.load_library(path)
                    _built[v] = getattr(torch.ops, _build.VARIANTS[v][0])
            except RuntimeError as exc:
                _error.append(str(exc))
    if _error:
        pytest.fail(_error[0][-8000:], pytrace=False)
    return _built[variant]


def config(variant: str = VARIANTS[0]) -> dict[str, int]:
    """The launch geometry the variant was compiled with (csrc/multi_tensor.cuh)."""
    vals = ops(variant).emu_config()
    keys = ("chunk", "threads", "max_blocks", "ilp", "table1", "table2", "table3", "table4", "table8")
    return dict(zip(keys, vals))


class EmuBackend(NativeBackend):
    """The csrc/ ops of one emulated variant on CPU tensors. Present wherever the build can run
    (so collecting the matrix builds nothing); the build happens at the first op call."""

    def __init__(self, variant: str):
        super().__init__(NAME if variant == "default" else f"{NAME}_{variant}",
                         _build.VARIANTS[variant][0] if _build else f"lookahead_ext_emu_{variant}", {"cpu": ()})
        self.variant = variant

    def available(self, device_type: str) -> tuple[bool, str]:
        if device_type != "cpu":
            return False, f"{self.name} has no {device_type} kernels"
        return (False, SKIP_REASON) if WHY is not None else (True, "ok")

    def _lib(self):
        lib = ops(self.variant)
        self.register_fakes()
        return lib


CUDA_EMU = EmuBackend("default")
_BACKENDS = {"default": CUDA_EMU}


def backend(variant: str = VARIANTS[0]) -> EmuBackend:
    """The ops (reference signatures) of one variant's emulated build."""
    if variant not in _BACKENDS:
        _BACKENDS[variant] = EmuBackend(variant)
    return _BACKENDS[variant]


def ubsan_reports() -> list[str]:
    """The UBSan reports written so far (each report file's text)."""
    out = []
    for f in sorted(glob.glob(os.path.join(UBSAN_DIR, "report*"))):
        with open(f) as fh:
            out.append(fh.read())
    return out


def clear_ubsan() -> None:
    os.makedirs(UBSAN_DIR, exist_ok=True)
    for f in glob.glob(os.path.join(UBSAN_DIR, "report*")):
        os.remove(f)
