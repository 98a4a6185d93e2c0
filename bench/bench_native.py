"""Benchmark the fused native ops (cpp on CPU, cuda on GPU) against the reference path.

Workload: N float32 parameters (default 64M) in 200 tensors of mixed sizes (log-uniform),
the optimizer-side work of one CMLR inner step (SGD momentum base) as the engine runs it
for float32 parameters, and the Lookahead sync. Both backends run the same op sequence
(the reference implements the same contract), side by side in the same run.

Bytes = the traffic each op must move (fp32, 4 B per element per stream; a write-only
output counts 4 B: the fused CPU kernels stream it with non-temporal stores, no
read-for-ownership, on calls of >= 8M elements):

  row                      what                                        B/elem
  perturb+ (backup)        masters = w; p = w + s v (p is w, in place)   16  read w, v; write p, masters
  nonfinite+norm(g+)       NaN/Inf flag and ||g+||^2, one read            4  read g+
  perturb-                 p = masters - s v                             12  read masters, v; write p
  nonfinite+norm(g-)       NaN/Inf flag and ||g-||^2, one read            4  read g-
  combine_step_ (engine)   d, SGD momentum step on w (read from the      32  read g+ g- w buf v;
                           masters), v update, ||v_new||^2 (v_sq_out),       write buf v p
                           w_new to p only (write_masters=False)
  inner step (engine)      the five rows above: no separate ||v|| or     68
                           gradient-norm pass (||v|| comes from the
                           previous combine_step_'s v_sq_out)
  -- the single ops, as before --
  sq_norm(v)               ||v||^2                                         4  read v
  multi_dot(g+,g-)         ||g+||^2, ||g-||^2                             8  read g+, g-
  combine_step_ (masters)  as above with write_masters=True, no v_sq     36  + write masters
  lookahead_sync_          slow += a(fast - slow); fast = p = slow        20  read slow fast; write slow fast p

GB/s = bytes / time (the minimum traffic; the reference path moves more). The same run
measures torch._foreach_add_ (CPU; 12 B/elem: a += b in place, no write-allocate) or
torch._foreach_copy_ (CUDA; 8 B/elem) on two extra lists of the same tensors as the
machine's attainable bandwidth, re-measured between rows (the best is used for "% of bw").

Threads: --threads N sets torch.set_num_threads (0: torch's default, one per core); the
kernels use the same OpenMP thread count. Compare % of bw only between runs of one thread
count: a read-only stream (the nonfinite/norm rows) saturates at a lower bandwidth than a
read-modify-write stream on this machine (2 threads: ~35 vs ~53 GB/s).

    python bench/bench_native.py                    # CPU, 64M params
    python bench/bench_native.py --numel 8e6        # quick
    python bench/bench_native.py --threads 1        # one core
    python bench/bench_native.py --device cuda      # GPU (needs lookahead_ext._C_cuda)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lookahead_ext import ops  # noqa: E402
from lookahead_ext.ops.base_step import BaseStep  # noqa: E402
from lookahead_ext.optim.scheme import CENTRAL  # noqa: E402


def sizes_for(numel: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * 12.0)  # 1 : e^12 spread
    s = (w / w.sum() * numel).floor().long().clamp(min=1)
    s[0] += numel - int(s.sum())
    return [int(x) for x in s]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    # the minimum: the least disturbed run (shared machines add noise, never remove it)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--numel", type=float, default=64e6)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fused = "cpp" if device.type == "cpu" else "cuda"
    ok = ops.available_backends()[fused]
    if ok != "ok":
        sys.exit(f"backend {fused!r} unavailable: {ok}")
    numel = int(args.numel)
    sizes = sizes_for(numel, args.tensors)
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or platform.machine())
    cores = os.cpu_count()
    print(f"device: {device.type} ({dev_name}); cores: {cores}; torch threads: {torch.get_num_threads()}; "
          f"torch {torch.__version__}; {numel / 1e6:.1f}M fp32 params in {len(sizes)} tensors "
          f"(min {min(sizes)}, max {max(sizes)})")

    torch.manual_seed(0)
    mk = lambda: [torch.randn(n, device=device) for n in sizes]  # noqa: E731
    params, masters, v, buf, gp, gm, slow = mk(), mk(), mk(), mk(), mk(), mk(), mk()
    bw_a, bw_b = mk(), mk()  # the bandwidth reference's own tensors
    state = {"momentum_buffer": buf}
    base = BaseStep("sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4)
    rho, lam, beta, gamma = 0.05, 0.1, 0.9, 0.5
    coefs = CENTRAL.coefs(rho, lam)  # CMLR's d (eq. 9)
    v_sq0 = ops.sq_norm(v).reshape(1)

    def inner(backend):
        """One CMLR inner step as the engine runs it for float32 parameters."""
        v_sq = [v_sq0.clone()]  # ||v||^2 carried from the previous step's combine_step_

        def run():
            inv_v = 1.0 / (v_sq[0][0].sqrt() + 1e-12)  # 0-d, on the device
            ops.perturb_(params, params, v, inv_v * rho, backup=masters, backend=backend)
            sp = ops.nonfinite_([gp], sq_norms=True, backend=backend)  # closure(): g+ checked
            ops.perturb_(params, masters, v, inv_v * -rho, backend=backend)
            sm = ops.nonfinite_([gm], sq_norms=True, backend=backend)  # closure(): g- checked
            ip, im = 1.0 / (sp[1].sqrt() + 1e-12), 1.0 / (sm[1].sqrt() + 1e-12)
            vc = (beta * inv_v, torch.zeros_like(ip), (1 - beta) * gamma * ip, (1 - beta) * (1 - gamma) * im)
            nxt = torch.zeros(1, device=device)
            ops.combine_step_(params, masters, (None, gp, gm), coefs, base, state, v, vc, v_sq_out=nxt,
                              write_masters=False, backend=backend)
            v_sq[0] = nxt
        return run

    def pieces(backend):
        inv_v = 1.0 / (ops.sq_norm(v, backend=backend).sqrt() + 1e-12)
        vc = (beta * inv_v, torch.zeros_like(inv_v), 0.05 * inv_v, 0.05 * inv_v)
        acc = torch.zeros(1, device=device)
        return {
            "perturb+ (backup)": (lambda: ops.perturb_(params, params, v, inv_v * rho, backup=masters,
                                                       backend=backend), 16),
            "nonfinite+norm(g+)": (lambda: ops.nonfinite_([gp], sq_norms=True, backend=backend), 4),
            "perturb-": (lambda: ops.perturb_(params, masters, v, inv_v * -rho, backend=backend), 12),
            "combine_step_ (engine)": (lambda: ops.combine_step_(
                params, masters, (None, gp, gm), coefs, base, state, v, vc, v_sq_out=acc.zero_(),
                write_masters=False, backend=backend), 32),
            "inner step (engine)": (inner(backend), 68),
            "sq_norm(v)": (lambda: ops.sq_norm(v, backend=backend), 4),
            "multi_dot(g+,g-)": (lambda: ops.multi_dot([gp, gm], [(0, 0), (1, 1)], backend=backend), 8),
            "combine_step_ (masters)": (lambda: ops.combine_step_(params, masters, (None, gp, gm), coefs, base,
                                                                  state, v, vc, backend=backend), 36),
            "lookahead_sync_": (lambda: ops.lookahead_sync_(slow, masters, 0.9, params=params, backend=backend), 20),
        }

    if device.type == "cpu":
        bw_name, bw_fn, bw_bytes = "torch._foreach_add_", lambda: torch._foreach_add_(bw_a, bw_b), 12
    else:
        bw_name, bw_fn, bw_bytes = "torch._foreach_copy_", lambda: torch._foreach_copy_(bw_a, bw_b), 8
    bw_t = timeit(bw_fn, device, args.repeats)
    bw = bw_bytes * numel / bw_t / 1e9
    print(f"bandwidth reference: {bw_name}: {bw_t * 1e3:.1f} ms, {bw:.2f} GB/s ({bw_bytes} B/elem)")

    rows = []
    ref, fus = pieces("reference"), pieces(fused)
    bw_times = [bw_t]
    hdr = (f"{'op':<24} {'B/elem':>6} {'reference ms':>13} {'ref GB/s':>9} {fused + ' ms':>10} {'speedup':>8} "
           f"{fused + ' GB/s':>10} {'% of bw':>8}")
    print(hdr)
    for name in ref:
        tr = timeit(ref[name][0], device, args.repeats)
        tf = timeit(fus[name][0], device, args.repeats)
        b = fus[name][1]
        gbs = b * numel / tf / 1e9
        row = dict(op=name, bytes_per_elem=b, reference_ms=tr * 1e3, fused_ms=tf * 1e3, speedup=tr / tf,
                   fused_gbs=gbs, reference_gbs=b * numel / tr / 1e9, pct_of_bandwidth=100 * gbs / bw)
        rows.append(row)
        bw_times.append(timeit(bw_fn, device, 2))  # re-measured between rows: best of all
        print(f"{name:<24} {b:>6} {tr * 1e3:>13.1f} {b * numel / tr / 1e9:>9.2f} {tf * 1e3:>10.1f} {tr / tf:>7.2f}x "
              f"{gbs:>10.2f} {100 * gbs / bw:>7.0f}%")

    bw_best = bw_bytes * numel / min(bw_times) / 1e9
    if bw_best > bw * 1.05:
        print(f"(bandwidth re-measured between rows: best {bw_best:.2f} GB/s; % of bw below uses it)")
        bw = bw_best
        for r in rows:
            r["pct_of_bandwidth"] = 100 * r["fused_gbs"] / bw
    meta = dict(device=device.type, device_name=dev_name, cores=cores, torch_threads=torch.get_num_threads(),
                torch=torch.__version__, numel=numel, tensors=len(sizes), fused_backend=fused,
                command="python " + " ".join(sys.argv), bandwidth_op=bw_name, bandwidth_gbs=bw,
                bandwidth_bytes_per_elem=bw_bytes, date=time.strftime("%Y-%m-%d %H:%M:%S"), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"native_{device.type}_{numel // 1_000_000}M")
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(f"# bench_native: {device.type} ({dev_name}), {cores} cores, torch {torch.__version__}\n\n")
        f.write(f"`{meta['command']}` ({meta['date']}); {numel / 1e6:.1f}M fp32 params in {len(sizes)} tensors; "
                f"{bw_name}: {bw:.2f} GB/s\n\n")
        f.write(f"| op | B/elem | reference ms | reference GB/s | {fused} ms | speedup | {fused} GB/s | "
                f"% of {bw_name} |\n")
        f.write("|---|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['op']} | {r['bytes_per_elem']} | {r['reference_ms']:.1f} | {r['reference_gbs']:.2f} | "
                    f"{r['fused_ms']:.1f} | {r['speedup']:.2f}x | {r['fused_gbs']:.2f} | "
                    f"{r['pct_of_bandwidth']:.0f}% |\n")
        f.write("\nBytes per element: the docstring of bench/bench_native.py (the minimum traffic; "
                "a write-only output counts once).\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
