"""Build lookahead_ext: the Python package, the Triton kernels (kernels/ installed as
lookahead_ext.kernels) and the fused C++ (always) and CUDA (when available) extensions.

Environment:
  LOOKAHEAD_EXT_NO_CUDA=1   never build the CUDA extension
  LOOKAHEAD_EXT_NO_CPP=1    build no extension at all (pure-Python install)
  TORCH_CUDA_ARCH_LIST      honoured by torch.utils.cpp_extension for the CUDA build
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("LOOKAHEAD_EXT_NO_CPP"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("lookahead_ext: torch not importable at build time; building without extensions "
              "(use `pip install --no-build-isolation .` with torch installed)")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    # no errno from sqrtf and no FP-trap assumptions: lets the kernels' loops vectorize
    cxx = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math"]
    if os.name != "nt":
        cxx += ["-fopenmp"]
    exts = [CppExtension("lookahead_ext._C", [s for s in cpp if not s.endswith("_cuda.cpp")],
                         include_dirs=[os.path.join(HERE, "csrc")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    want_cuda = (not _flag("LOOKAHEAD_EXT_NO_CUDA") and cu and torch.version.cuda is not None
                 and (shutil.which("nvcc") or os.environ.get("CUDA_HOME")))
    if want_cuda:
        exts.append(CUDAExtension(
            "lookahead_ext._C_cuda", [s for s in cpp if s.endswith("_cuda.cpp")] + cu,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                # --fmad=false: no multiply-add contraction, as the CPU
                                # kernels, the Triton kernels and the reference
                                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--fmad=false"]}))
    else:
        print("lookahead_ext: building the CPU extension only (torch without CUDA, no nvcc, "
              "or LOOKAHEAD_EXT_NO_CUDA set)")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="lookahead_ext",
    version="0.1.0",
    description="Fused lookahead-family optimizers (CMLR, SAM, Lookahead, LookaheadBio) for PyTorch",
    python_requires=">=3.9",
    packages=find_packages(include=["lookahead_ext", "lookahead_ext.*"]) + ["lookahead_ext.kernels"],
    package_dir={"lookahead_ext.kernels": "kernels"},
    install_requires=["torch>=2.1", "tqdm", "numpy"],
    extras_require={"triton": ["triton"], "demo": ["scikit-learn", "matplotlib"],
                    "test": ["pytest", "scikit-learn", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
