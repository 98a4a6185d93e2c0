#!/usr/bin/env python
"""Mutation check of the emulated CUDA tests (not part of CI): each known kernel bug is
injected, one at a time, into a copy of csrc/; the emulated libraries are rebuilt from the copy
and tests/test_cuda_emu.py must fail. Prints one row per mutant: caught or MISSED, and by what.

    python scripts/cuda_emu_mutations.py [--only NAME ...] [--variants small default] [--full] [--keep]

By default each mutant gets the small-chunk build only (one compile) and the stress tests
(-x); --variants default small builds both, --full runs the whole module (the native matrix
re-run too). Needs what the tests need (HIP-CPU, TBB, g++): see docs/cuda-emulation.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (file under csrc/, original text, mutated text)
MUTANTS = {
    "split tensor keeps a stale slot 0": (
        "multi_tensor.cuh", "for (int d = 0; d < DEPTH; ++d) tab.addr[d][0] = tab.addr[d][nt - 1];", ""),
    "split tensor keeps a stale tensor_id": (
        "multi_tensor.cuh", "tab.tensor_id[0] = tab.tensor_id[nt - 1];", ""),
    "block_base not advanced": ("multi_tensor.cuh", "tab.block_base = global;", ""),
    "chunk length not clamped": ("multi_tensor.cuh", "l.len = rest < kChunk ? rest : kChunk;", "l.len = kChunk;"),
    "vector path on a partial tail": ("multi_tensor.cuh", "return s.vec && i + kILP <= len;", "return s.vec;"),
    "alignment check always true": (
        "multi_tensor.cuh", "return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;", "return true;"),
    "block_sum: first barrier removed": (
        "ops_cuda.cu", "  buf[threadIdx.x] = v;\n  __syncthreads();\n", "  buf[threadIdx.x] = v;\n"),
    "block_sum: loop barrier removed": (
        "ops_cuda.cu", "    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];\n    __syncthreads();\n",
        "    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];\n"),
    "NaN flag written by thread 0 only": ("ops_cuda.cu", "if (bad) *flag = 1.0f;", "if (bad && threadIdx.x == 0) *flag = 1.0f;"),
    "per-tensor range search off by one": ("ops_cuda.cu", "if (a[mid] < x) lo = mid + 1;", "if (a[mid] <= x) lo = mid + 1;"),
    "grads read with the params' dtype": (
        "ops_cuda.cu", "cg = gdt == at::kBFloat16 ? 1 : gdt == at::kHalf ? 2 : 0;", "cg = cp;"),
}


def run_one(name: str, full: bool, variants: list[str], workdir: str, log) -> tuple[str, float, str]:
    rel, old, new = MUTANTS[name]
    csrc = os.path.join(workdir, "csrc")
    shutil.rmtree(csrc, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
    path = os.path.join(csrc, rel)
    with open(path) as fh:
        text = fh.read()
    if text.count(old) != 1:
        return "STALE (pattern not found once: update MUTANTS)", 0.0, ""
    with open(path, "w") as fh:
        fh.write(text.replace(old, new))
    env = dict(os.environ, LOOKAHEAD_EXT_EMU_CSRC=csrc, LOOKAHEAD_EXT_EMU_BUILD=os.path.join(workdir, "build"),
               LOOKAHEAD_EXT_EMU_VARIANTS=",".join(variants))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_cuda_emu.py", "-x"]
    if not full:
        cmd += ["-k", "not test_emu_"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=os.path.join(ROOT, "tests"), env=env, capture_output=True, text=True)
    secs = time.time() - t0
    out = p.stdout + p.stderr
    log.write(f"===== {name}\n{out[-6000:]}\n")
    if p.returncode == 0:
        return "MISSED", secs, ""
    if "build failed" in out:
        return "BUILD FAILED (mutant does not compile)", secs, ""
    first = next((ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
    if not first and p.returncode < 0:
        first = f"test process killed by signal {-p.returncode}"
    return "caught", secs, first[:140]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(MUTANTS))
    ap.add_argument("--variants", nargs="+", default=["small"], choices=["small", "default"])
    ap.add_argument("--full", action="store_true", help="run the whole test module, not only the stress tests")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (mutant sources and logs)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import build_cuda_emu
    why = build_cuda_emu.missing()
    if why:
        print(why, file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="cuda_emu_mut_")
    missed = 0
    with open(os.path.join(workdir, "log.txt"), "w") as log:
        print(f"{'mutant':40s} {'result':8s} {'secs':>5s}  first failing test")
        for name in args.only or MUTANTS:
            verdict, secs, first = run_one(name, args.full, args.variants, workdir, log)
            missed += verdict != "caught"
            print(f"{name:40s} {verdict:8s} {secs:5.0f}  {first}", flush=True)
    print(f"{len(args.only or MUTANTS) - missed}/{len(args.only or MUTANTS)} mutants caught; log: {workdir}/log.txt")
    if not args.keep:
        shutil.rmtree(os.path.join(workdir, "csrc"), ignore_errors=True)
        shutil.rmtree(os.path.join(workdir, "build"), ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
