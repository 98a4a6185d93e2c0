"""Build lookahead_ext's compiled parts; the metadata is in pyproject.toml.

The Python package, the Triton kernels (kernels/, installed as lookahead_ext.kernels) and
the fused C++ (always) and CUDA (when available) extensions, compiled against the torch
that is importable at build time (hence `pip install --no-build-isolation .`).

Environment:
  LOOKAHEAD_EXT_NO_CUDA=1   never build the CUDA extension
  LOOKAHEAD_EXT_NO_CPP=1    build no extension at all (pure-Python install, reference ops)
  TORCH_CUDA_ARCH_LIST      honoured by torch.utils.cpp_extension for the CUDA build
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Commands that compile; metadata and sdist commands must work without torch.
_COMPILING = {"build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel",
              "bdist_egg"}

NO_TORCH_MESSAGE = """
lookahead_ext: torch is not importable in this build environment, so the fused C++/CUDA
extension cannot be compiled. This is pip's build isolation (the default): build against the
torch you already have instead:

    pip install --no-build-isolation .          (or: pip wheel --no-build-isolation .)

(install torch first). To install the pure-Python package on purpose (reference ops only,
3-13x slower per op), set LOOKAHEAD_EXT_NO_CPP=1.
"""


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("LOOKAHEAD_EXT_NO_CPP"):
        return [], {}, {}
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if _COMPILING.intersection(sys.argv[1:]):
            sys.exit(NO_TORCH_MESSAGE)
        return [], {}, {}  # egg_info / sdist / dist_info: no compiler, no torch needed
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # Python's stable ABI: the extensions use only PyModule_Create (csrc/pymodule*.cpp; the ops
    # are registered through torch's C++ library, not through Python), so one wheel serves every
    # CPython from torch's minimum on. torch >= 2.6 supports it (no libtorch_python, and it
    # defines Py_LIMITED_API as its min_supported_cpython, which gives the wheel's tag).
    min_py = getattr(cpp_extension, "min_supported_cpython", None)
    abi = dict(py_limited_api=True) if min_py else {}
    # no errno from sqrtf and no FP-trap assumptions: lets the kernels' loops vectorize.
    # -ffp-contract=off: GCC contracts a*b+c by default, so the AVX2 kernels (FMA) and the
    # baseline ones (none) would round differently; the fused multiply-adds torch's kernels
    # have are explicit in la_math.h (docs/tolerances.md, "Numeric policy")
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if os.name != "nt":
        cxx += ["-fopenmp"]
    exts = [CppExtension("lookahead_ext._C", [s for s in cpp if not s.endswith("_cuda.cpp")],
                         include_dirs=[os.path.join(HERE, "csrc")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], **abi)]
    want_cuda = (not _flag("LOOKAHEAD_EXT_NO_CUDA") and cu and torch.version.cuda is not None
                 and (shutil.which("nvcc") or os.environ.get("CUDA_HOME")))
    if want_cuda:
        exts.append(CUDAExtension(
            "lookahead_ext._C_cuda", [s for s in cpp if s.endswith("_cuda.cpp")] + cu,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++20", "-ffp-contract=off"],
                                # --fmad=false: no multiply-add contraction but the explicit
                                # fma_rn of la_math.h, as the CPU kernels (numeric policy)
                                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--fmad=false"]}, **abi))
    else:
        print("lookahead_ext: building the CPU extension only (torch without CUDA, no nvcc, "
              "or LOOKAHEAD_EXT_NO_CUDA set)")
    options = {"bdist_wheel": {"py_limited_api": f"cp{int(min_py[2:4], 16)}{int(min_py[4:6], 16)}"}} if min_py else {}

    class BuildExt(BuildExtension):
        def copy_extensions_to_source(self):
            """In-place builds: also delete the extension's copies with another suffix.

            Python imports `_C.cpython-3XX-*.so` before `_C.abi3.so`, so a stale copy built
            without (or with another) py_limited_api would shadow the new build.
            """
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                package, _, name = ext.name.rpartition(".")
                folder = build_py.get_package_dir(package)
                keep = os.path.basename(self.get_ext_filename(ext.name))
                for path in glob.glob(os.path.join(folder, name + ".*.so")):
                    if os.path.basename(path) != keep:
                        os.remove(path)

    return exts, {"build_ext": BuildExt.with_options(use_ninja=True)}, options


ext_modules, cmdclass, options = _extensions()

setup(
    packages=find_packages(include=["lookahead_ext", "lookahead_ext.*"]) + ["lookahead_ext.kernels"],
    package_dir={"lookahead_ext.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
    zip_safe=False,
)
