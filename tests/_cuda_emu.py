"""The emulated CUDA backend of the tests: csrc/ops_cuda.cu built against HIP-CPU
(scripts/build_cuda_emu.py) and run on CPU tensors as torch.ops.lookahead_ext_emu
(and lookahead_ext_emu_small, the small-chunk build). See docs/cuda-emulation.md.

For a backend registry: NAME, available() -> (ok, reason), backend() -> an ops object with the
reference signatures (lookahead_ext/ops/native.py's wrappers bound to the emulated ops)."""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
import threading
from types import ModuleType

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
try:
    import build_cuda_emu as _build
    WHY = _build.missing()
except ImportError:  # an installed package without the source tree
    _build, WHY = None, "no source tree (scripts/build_cuda_emu.py)"

NAME = "cuda_emu"
# which builds the tests use (scripts/cuda_emu_mutations.py --variants small: one build per mutant)
VARIANTS = tuple(os.environ.get("LOOKAHEAD_EXT_EMU_VARIANTS", "default,small").split(","))
needs_emu = pytest.mark.skipif(WHY is not None, reason=f"emulated CUDA build unavailable: {WHY}")

# UBSan (-fsanitize=alignment) reports go to files checked after each test (fixture ubsan_clean);
# the runtime reads UBSAN_OPTIONS at its first report, after this import
UBSAN_DIR = os.path.join(_build.build_dir() if _build else ROOT, "ubsan")
os.environ.setdefault("UBSAN_OPTIONS", f"print_stacktrace=1:log_path={os.path.join(UBSAN_DIR, 'report')}")

_lock = threading.Lock()
_built: dict[str, object] = {}
_error: list[str] = []


def ops(variant: str = VARIANTS[0]):
    """torch.ops namespace of a variant, built (both variants, in parallel) and loaded on first
    use in this process; pytest.fail with the compiler output when the build fails."""
    with _lock:
        if not _built and not _error:
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


def available() -> tuple[bool, str]:
    """(True, "ok") when the emulated ops can be built and loaded here, else (False, why)."""
    if WHY is not None:
        return False, WHY
    try:
        ops()
    except BaseException as exc:  # pytest.fail's Failed is a BaseException
        return False, f"build failed: {str(exc)[:500]}"
    return True, "ok"


def backend(variant: str = VARIANTS[0]) -> ModuleType:
    """An ops object with the reference signatures: a fresh copy of lookahead_ext.ops.native
    whose raw ops are the emulated ones; available()/supports() say CPU tensors of fp32/bf16/fp16."""
    from lookahead_ext.ops import native
    name = f"lookahead_ext.ops._native_{NAME}_{variant}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, native.__file__)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "lookahead_ext.ops"
    spec.loader.exec_module(mod)
    ns = ops(variant)
    mod._ops = lambda: ns
    mod.available = lambda name=NAME: available()
    mod.supports = lambda name, device, dtype: torch.device(device).type == "cpu" and dtype in native._SUPPORTED
    sys.modules[name] = mod
    return mod


def route_native(monkeypatch, variant: str = VARIANTS[0]) -> None:
    """Make lookahead_ext.ops.native (backend "cpp") call the emulated ops for this test: the
    native op tests and every optimizer with backend="cpp" then run the CUDA kernels."""
    from lookahead_ext import ops as la_ops
    from lookahead_ext.ops import native
    ns = ops(variant)
    monkeypatch.setattr(native, "_ops", lambda: ns)
    la_ops.clear_dispatch_cache()


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
