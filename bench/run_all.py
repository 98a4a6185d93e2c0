"""Run the whole benchmark and reproduction suite (issue 6) with one command.

    python -m bench.run_all                 # CPU suite, default sizes (~10-20 min on 2 cores)
    python -m bench.run_all --quick         # ~1 minute, tiny sizes (used by the smoke test)
    python -m bench.run_all --device cuda   # parts 1-3 on the GPU (ResNet-18 in Table 8)
    python -m bench.run_all --readme        # also rewrite README.md's bench section

Each part also runs alone: python -m bench.kernels | table8 | peers | nqm | digits.
Results: <out>/<part>_<device>.json + .md (+ .png), and <out>/summary_<device>.md.
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
    p.add_argument("--readme", action="store_true", help="rewrite README.md's bench section")
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
    if args.readme:
        _update_readme(summary, args.out, dev)
    print(summary)
    return total


def _update_readme(summary, out, dev):
    root = os.path.dirname(common.HERE)
    readme = os.path.join(root, "README.md")
    text = open(readme).read()
    a, b = "<!-- section:bench -->", "<!-- /section:bench -->"
    i, j = text.index(a) + len(a), text.index(b)
    rel = os.path.relpath(out, root)
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    intro = (
        "\n## Benchmarks\n\n"
        "The suite in `bench/` (issue 6) measures the fused ops, reproduces Table 8, compares "
        "with pytorch-optimizer and checks the paper's claims at small scale. One command runs "
        "the CPU suite; each part runs alone too:\n\n"
        "```bash\n"
        "python -m bench.run_all            # CPU suite (add --readme to refresh this section)\n"
        "python -m bench.run_all --quick    # ~1 min smoke run\n"
        "python -m bench.run_all --device cuda --backend auto   # GPU: parts 1-3, ResNet-18\n"
        "python -m bench.kernels --full --out bench/results/full   # 1M -> 256M sweep (committed there)\n"
        "python -m bench.table8 | bench.peers | bench.nqm | bench.digits\n"
        "```\n\n"
        "Part 3 needs the bench-only extra `pip install pytorch-optimizer`. The paper's baselines "
        "are `from lookahead_ext.optim.baselines import LookbehindSAM, GSAM, CRSAM` (docstrings give "
        "our reading of each paper). Every number below was produced by the command named in the "
        f"first line; JSON, Markdown and plots ({', '.join(pngs)}) are in `{rel}/`.\n\n")
    text = text[:i] + intro + summary.replace("### ", "#### ") + "\n" + text[j:]
    with open(readme, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
