"""Run the whole benchmark and reproduction suite (issue 6) with one command.

    python -m bench.run_all                 # CPU suite, default sizes (~10-20 min on 2 cores)
    python -m bench.run_all --quick         # ~1 minute, tiny sizes (used by the smoke test)
    python -m bench.run_all --device cuda   # parts 1-3 on the GPU (ResNet-18 in Table 8)

Each part also runs alone: python -m bench.kernels | table8 | peers | nqm | digits.
Results: <out>/<part>_<device>.json + .md (+ .png), and <out>/summary_<device>.md (which
docs/benchmarks.md includes when the site is built).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import common

PARTS = ("kernels", "table8", "peers", "nqm", "digits")
GPU_PARTS = ("kernels", "table8", "peers")


def _md_name(part, device):
    return f"{part}_{device}.md" if part in GPU_PARTS else f"{part}.md"


def main(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--full", action="store_true", help="kernels: sweep 1M -> 256M params")
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--reps", type=int, default=0)
    args = p.parse_args(argv)
    common.setup(args)
    dev = args.device.split(":")[0]
    parts = [x for x in args.parts.split(",") if x]
    if dev == "cuda":
        parts = [x for x in parts if x in GPU_PARTS]
    os.makedirs(args.out, exist_ok=True)
    timings, skipped = {}, {}
    t_all = time.perf_counter()
    for part in parts:
        mod = __import__(f"bench.{part}", fromlist=["run"])
        t0 = time.perf_counter()
        print(f"[bench] {part} ...", file=sys.stderr, flush=True)
        try:
            mod.run(args)
        except SystemExit as exc:  # a part whose optional dependency is missing
            skipped[part] = str(exc)
            print(f"[bench] {part} skipped: {exc}", file=sys.stderr)
            continue
        timings[part] = time.perf_counter() - t0
        print(f"[bench] {part} done in {timings[part]:.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_all
    env = common.env_info(args.device)
    cmd = "python -m bench.run_all " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"Produced by `{cmd.strip()}` in {total / 60:.1f} min "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}) on {env['device']} "
            f"({env['cores']} cores, {env['torch_threads']} torch thread(s)), torch {env['torch']}, "
            f"triton {env['triton']}, CUDA {env['cuda']}; backends: "
            f"{', '.join(k for k, v in env['backends'].items() if v == 'ok')} "
            f"(optimizers run with backend={args.backend}).")
    if skipped:
        head += " Skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
    sections = []
    for part in parts:
        path = os.path.join(args.out, _md_name(part, dev))
        if part in timings and os.path.exists(path):
            body = open(path).read().split("\nEnvironment:\n")[0].strip()
            sections.append(body)
    summary = head + "\n\n" + "\n\n".join(sections) + "\n"
    with open(os.path.join(args.out, f"summary_{dev}.md"), "w") as f:
        f.write(summary)
    print(summary)
    return total


if __name__ == "__main__":
    main()
