#!/usr/bin/env python
"""Compile-check every csrc/*.cu with nvcc for sm_80 and sm_90, even against a CPU-only torch.

A CPU-only torch wheel ships the c10/cuda and ATen headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h: csrc/stub provides an empty one, searched after the
real include directories. Objects go to a temporary directory and are discarded.

    python scripts/check_cuda_compile.py [--arch 80 90] [--nvcc PATH] [-j N]

Exit status 0 when every file compiles; 2 when nvcc is not found (tests skip on that).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc(explicit: str | None = None) -> str | None:
    for cand in (explicit, os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def command(nvcc: str, src: str, out: str, archs: list[str]) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths
    cmd = [nvcc, "-c", src, "-o", out, "-std=c++20", "-O2", "--expt-relaxed-constexpr", "--fmad=false",
           "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DTORCH_EXTENSION_NAME=_C_cuda", "-I", os.path.join(ROOT, "csrc")]
    for inc in include_paths():
        cmd += ["-I", inc]
    cmd += ["-I", os.path.join(ROOT, "csrc", "stub")]  # last: a real generated header wins
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["80", "90"])
    ap.add_argument("--nvcc")
    ap.add_argument("-j", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)", file=sys.stderr)
        return 2
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {}
        with cf.ThreadPoolExecutor(max_workers=max(1, args.j)) as pool:
            for src in sources:
                cmd = command(nvcc, src, os.path.join(tmp, os.path.basename(src) + ".o"), args.arch)
                jobs[pool.submit(_run, cmd)] = src
            for fut in cf.as_completed(jobs):
                rc, secs, log = fut.result()
                name = os.path.relpath(jobs[fut], ROOT)
                print(f"{'ok  ' if rc == 0 else 'FAIL'} {name} (sm_{', sm_'.join(args.arch)}; {secs:.0f}s)")
                if rc != 0:
                    failed += 1
                    print(log[-6000:], file=sys.stderr)
    print(f"{len(sources) - failed}/{len(sources)} CUDA sources compile with {nvcc}")
    return 1 if failed else 0


def _run(cmd):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, time.time() - t0, p.stdout + p.stderr


if __name__ == "__main__":
    sys.exit(main())
