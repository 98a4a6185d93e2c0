#!/usr/bin/env python
"""Build the emulated CUDA ops: csrc/ops_cuda.cu compiled with g++ against AMD's HIP-CPU.

The kernels of ops_cuda.cu / multi_tensor.cuh run on the CPU (HIP-CPU: blocks in parallel
through TBB, a block's threads as fibers), registered for CPU tensors as
torch.ops.<namespace> (csrc/emu/register_emu.cpp). Two variants, built in parallel:

  default  torch.ops.lookahead_ext_emu        the real launch geometry (kChunk 65536, ...)
  small    torch.ops.lookahead_ext_emu_small  tiny chunks and launches: multi-launch splits
                                              and tensors over kMaxBlocks chunks on small sizes

Both are compiled with -fsanitize=alignment (a misaligned vector access becomes a UBSan
report). Libraries are cached under the build directory keyed by a hash of the sources,
flags, compiler and torch version: a rerun with unchanged sources builds nothing.

    python scripts/build_cuda_emu.py [--variant default small] [--build-dir DIR]

Environment: LOOKAHEAD_EXT_HIP_CPU (HIP-CPU folder; default ../shared/third_party/hip-cpu
beside the repository), LOOKAHEAD_EXT_EMU_BUILD (build directory; default build/cuda_emu),
CXX (compiler; default g++). Exit status 0 when built, 2 when HIP-CPU, TBB or the compiler is
missing (the tests skip then), 1 when the build fails.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes.util
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LOOKAHEAD_EXT_EMU_CSRC: another copy of csrc/ (scripts/cuda_emu_mutations.py builds mutants)
CSRC = os.environ.get("LOOKAHEAD_EXT_EMU_CSRC") or os.path.join(ROOT, "csrc")
SOURCE = os.path.join(CSRC, "emu", "register_emu.cpp")

# name -> (op namespace, -D overrides of multi_tensor.cuh's launch geometry)
VARIANTS = {
    "default": ("lookahead_ext_emu", {}),
    # 64-element chunks, 4 threads (x 8 elements each: 2 steps per chunk), 5 blocks per launch
    "small": ("lookahead_ext_emu_small", {"LA_CUDA_CHUNK": 64, "LA_CUDA_THREADS": 4, "LA_CUDA_MAX_BLOCKS": 5}),
}


def hip_cpu_dir() -> str:
    return os.environ.get("LOOKAHEAD_EXT_HIP_CPU") or os.path.join(os.path.dirname(ROOT), "shared", "third_party",
                                                                   "hip-cpu")


def build_dir() -> str:
    return os.environ.get("LOOKAHEAD_EXT_EMU_BUILD") or os.path.join(ROOT, "build", "cuda_emu")


def missing() -> str | None:
    """Why the emulated build cannot run here (None: it can)."""
    hip = hip_cpu_dir()
    if not os.path.isfile(os.path.join(hip, "include", "hip", "hip_runtime.h")):
        return (f"HIP-CPU not found at {hip} (set LOOKAHEAD_EXT_HIP_CPU to a checkout of "
                "https://github.com/ROCm/HIP-CPU)")
    if not (os.path.isfile("/usr/include/tbb/tbb.h") or os.path.isfile("/usr/include/oneapi/tbb.h")
            or os.environ.get("TBB_ROOT")) or ctypes.util.find_library("tbb") is None:
        return "TBB not found (Debian/Ubuntu: apt-get install libtbb-dev)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return f"C++ compiler {os.environ.get('CXX', 'g++')!r} not found"
    return None


def command(variant: str, out: str, src: str = SOURCE, csrc: str = CSRC) -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths
    ns, defs = VARIANTS[variant]
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g0", "-fPIC", "-shared", "-w",
           # no interposition between the two variants' inline functions (different kChunk)
           "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wl,-Bsymbolic",
           "-fsanitize=alignment", "-DNDEBUG", "-ffp-contract=off",  # numeric policy
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-DLA_EMU_NS={ns}"]
    cmd += [f"-D{k}={v}" for k, v in defs.items()]
    cmd += ["-I", os.path.join(csrc, "emu", "include"), "-I", os.path.join(hip_cpu_dir(), "include"), "-I", csrc]
    for inc in include_paths():
        cmd += ["-I", inc]
    cmd += [src, "-o", out]
    for lib in library_paths():
        cmd += ["-L", lib, f"-Wl,-rpath,{lib}"]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch", "-ltbb", "-lpthread"]
    return cmd


def _key(variant: str, csrc: str) -> str:
    import torch
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True))
    for f in files:
        if os.path.isfile(f) and f.endswith((".h", ".cuh", ".cu", ".cpp")):
            h.update(os.path.relpath(f, csrc).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    h.update(" ".join(command(variant, "OUT", "SRC", "CSRC")).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def _compile(cmd: list[str], out: str) -> tuple[int, float, str]:
    t0 = time.time()
    tmp = out + f".tmp{os.getpid()}"
    p = subprocess.run([tmp if a == out else a for a in cmd], capture_output=True, text=True)
    if p.returncode == 0:
        os.replace(tmp, out)  # atomic: a concurrent test run never loads a half-written file
    return p.returncode, time.time() - t0, p.stdout + p.stderr


def build(variants=("default", "small"), csrc: str = CSRC, out_dir: str | None = None,
          log=print) -> dict[str, str]:
    """Build (or reuse) each variant in parallel; return {variant: path of the .so}.
    Raises RuntimeError with the compiler output when a build fails."""
    out_dir = out_dir or build_dir()
    os.makedirs(out_dir, exist_ok=True)
    # one builder at a time per build directory (parallel test processes wait, then reuse)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(variants, csrc, out_dir, log)


def _build_locked(variants, csrc, out_dir, log) -> dict[str, str]:
    src = os.path.join(csrc, "emu", "register_emu.cpp")
    paths, jobs = {}, {}
    with cf.ThreadPoolExecutor(max_workers=len(variants)) as pool:
        for v in variants:
            path = os.path.join(out_dir, f"lookahead_ext_emu_{v}_{_key(v, csrc)}.so")
            paths[v] = path
            if os.path.isfile(path):
                log(f"cuda_emu: {v}: cached {path}")
                continue
            jobs[pool.submit(_compile, command(v, path, src, csrc), path)] = v
        errors = []
        for fut in cf.as_completed(jobs):
            rc, secs, text = fut.result()
            v = jobs[fut]
            log(f"cuda_emu: {v}: {'built' if rc == 0 else 'FAILED'} in {secs:.0f} s")
            if rc != 0:
                errors.append(f"{v}:\n{text[-6000:]}")
    if errors:
        raise RuntimeError("emulated CUDA build failed:\n" + "\n".join(errors))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--build-dir")
    args = ap.parse_args(argv)
    why = missing()
    if why:
        print(why, file=sys.stderr)
        return 2
    try:
        paths = build(tuple(args.variant), out_dir=args.build_dir)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    for v, p in paths.items():
        print(f"{v}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
