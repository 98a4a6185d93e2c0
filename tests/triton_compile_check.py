"""Compile every Triton kernel of lookahead_ext.kernels for a CUDA target WITHOUT a GPU
(Triton's frontend, LLVM and the bundled ptxas run on any machine), in representative
constexpr variants, and check that full, aligned chunks get 128-bit vector loads.

Run in a process where TRITON_INTERPRET is unset (the interpreter replaces the JIT):
    python tests/triton_compile_check.py [--arch 90] [--verbose]
Prints one line per variant and "OK" at the end; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lookahead_ext.kernels import _mta, combine_step, lookahead_sync, multi_dot, nonfinite, perturb  # noqa: E402

F32 = "fp32"
PI64, PF32 = "*i64", "*fp32"


def compile_kernel(jitfn, types: dict, consts: dict, arch: int, num_warps: int = 4):
    sig = {}
    for p in jitfn.params:
        sig[p.name] = "constexpr" if p.is_constexpr else types[p.name]
    src = ASTSource(fn=jitfn, signature=sig, constexprs=dict(consts))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "enable_fp_fusion": _mta.CONFIG.fp_fusion})


def vec_loads(ptx: str) -> int:
    return len(re.findall(r"ld\.global[.\w]*\.v[24]\.", ptx))


def variants():
    tbl = {"table": PI64, "work": PI64}
    for full, aligned in ((True, True), (False, False)):
        fa = dict(FULL=full, ALIGNED=aligned, BLOCK=1024, ITERS=8)
        tag = f"full={full},aligned={aligned}"
        yield ("perturb bf16<-fp32+bf16*s " + tag, perturb._perturb_kernel,
               dict(tbl, scale_ptr=PF32, scale_val=F32),
               dict(OUT_DT=tl.bfloat16, BASE_DT=tl.float32, DIR_DT=tl.bfloat16, BACKUP_DT=tl.float32,
                    HAS_BACKUP=False, SCALE_PTR=True, **fa), full and aligned)
        yield ("perturb fp32 in place + backup " + tag, perturb._perturb_kernel,
               dict(tbl, scale_ptr=PF32, scale_val=F32),
               dict(OUT_DT=tl.float32, BASE_DT=tl.float32, DIR_DT=tl.float32, BACKUP_DT=tl.float32,
                    HAS_BACKUP=True, SCALE_PTR=False, **fa), full and aligned)
        ctypes = dict(tbl, **{k: F32 for k in ("c0", "cp", "cm", "bv_val", "a0_val", "ap_val", "am_val",
                                                "lr", "weight_decay", "momentum", "one_minus_dampening",
                                                "decay_factor", "lerp_w", "beta2", "one_minus_beta2",
                                                "step_size", "bc2_sqrt", "eps")},
                      **{k: PF32 for k in ("bv_ptr", "a0_ptr", "ap_ptr", "am_ptr", "skip_ptr", "vsq_parts")}, base_ptr="*fp64")
        common = dict(G0_DT=tl.bfloat16, GP_DT=tl.bfloat16, GM_DT=tl.bfloat16)
        yield ("combine adamw + v (CMLR) bf16 " + tag, combine_step._combine_kernel, ctypes,
               dict(P_DT=tl.bfloat16, **common, D0=False, DP=True, DM=True, HAS_V=True, V0=False,
                    VP=True, VM=True, BV_PTR=True, A0_PTR=True, AP_PTR=True, AM_PTR=True, VB=True,
                    ADAM=True, HAS_WD=True, MOMENTUM=False, NESTEROV=False, FIRST=False, WRITE_W=True,
                    HAS_SKIP=False, DEV_BASE=False, VSQ=True, **fa),
               full and aligned)
        yield ("combine sgd nesterov fp32 " + tag, combine_step._combine_kernel, ctypes,
               dict(P_DT=tl.float32, G0_DT=tl.float32, GP_DT=tl.float32, GM_DT=tl.float32,
                    D0=True, DP=True, DM=False, HAS_V=False, V0=False, VP=False, VM=False,
                    BV_PTR=False, A0_PTR=False, AP_PTR=False, AM_PTR=False, VB=False,
                    ADAM=False, HAS_WD=True, MOMENTUM=True, NESTEROV=True, FIRST=False,
                    WRITE_W=False, HAS_SKIP=False, DEV_BASE=False, VSQ=False, **fa),  # write_masters=False (fp32 params)
               full and aligned)
        yield ("combine sgd first-step fp16 " + tag, combine_step._combine_kernel, ctypes,
               dict(P_DT=tl.float16, G0_DT=tl.float16, GP_DT=tl.float16, GM_DT=tl.float16,
                    D0=True, DP=False, DM=False, HAS_V=False, V0=False, VP=False, VM=False,
                    BV_PTR=False, A0_PTR=False, AP_PTR=False, AM_PTR=False, VB=False,
                    ADAM=False, HAS_WD=False, MOMENTUM=True, NESTEROV=False, FIRST=True, WRITE_W=True,
                    HAS_SKIP=False, DEV_BASE=False, VSQ=False, **fa),
               full and aligned)
        # the capturable step (device_skip=True): skip flag and BaseStep scalars read on device
        yield ("combine adamw skip_if + device base bf16 " + tag, combine_step._combine_kernel, ctypes,
               dict(P_DT=tl.bfloat16, **common, D0=False, DP=True, DM=True, HAS_V=False, V0=False,
                    VP=False, VM=False, BV_PTR=False, A0_PTR=True, AP_PTR=True, AM_PTR=True, VB=False,
                    ADAM=True, HAS_WD=True, MOMENTUM=False, NESTEROV=False, FIRST=False, WRITE_W=True,
                    HAS_SKIP=True, DEV_BASE=True, VSQ=False, **fa),
               full and aligned)
        yield ("multi_dot xx,yy,xy bf16/fp32 " + tag, multi_dot._dot_kernel,
               dict(tbl, partials=PF32, n_cols="i64", row_xx="i64", row_yy="i64", row_xy="i64"),
               dict(X_DT=tl.bfloat16, Y_DT=tl.float32, HAS_Y=True, DO_XX=True, DO_YY=True, DO_XY=True,
                    **fa), full and aligned)
        yield ("lookahead_sync + params bf16 " + tag, lookahead_sync._sync_kernel,
               dict(tbl, alpha=F32, skip_ptr=PF32),
               dict(SLOW_DT=tl.float32, FAST_DT=tl.float32, P_DT=tl.bfloat16, HAS_P=True, HAS_SKIP=True, **fa),
               full and aligned)
        yield ("nonfinite unscale fp16 " + tag, nonfinite._nonfinite_kernel,
               dict(tbl, flags=PF32, sq_parts=PF32, inv_ptr=PF32),
               dict(X_DT=tl.float16, UNSCALE=True, SQ=True, **fa), full and aligned)
    yield ("segsum", _mta.segsum_kernel,
           dict(src=PF32, dst=PF32, seg=PI64, n_src_cols="i64", n_segs="i64", skip_ptr=PF32),
           dict(ACC=True, HAS_SKIP=True, BLOCK=1024), False)
    yield ("segmax", _mta.segmax_kernel, dict(src=PF32, dst=PF32, n="i64"), dict(BLOCK=1024), False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    failures = 0
    for name, fn, types, consts, want_vec in variants():
        t = time.perf_counter()
        try:
            k = compile_kernel(fn, types, consts, args.arch)
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}")
            failures += 1
            continue
        ptx = k.asm["ptx"]
        nv = vec_loads(ptx)
        ok = nv > 0 or not want_vec
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {nv} vector loads, {k.n_regs if hasattr(k, 'n_regs') else '?'} regs, "
              f"{time.perf_counter() - t:.1f}s" + ("" if ok else " (expected 128-bit vector loads)"))
        if args.verbose:
            print(ptx[:3000])
    print("OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
