"""Part 2: Table 8 of the paper reproduced (cmlr.txt, "Wall-clock breakdown per parameter update").

For each algorithm: forward/backward passes per update (counted by wrapping the closure, and
checked against ``opt.num_evals``), peak memory relative to SGD and time per update relative
to SGD. An *update* is one whole Lookahead cycle (K inner steps) for the multi-step methods,
one step otherwise, as in Table 8; for GSAM (GraphSAM, which has no Lookahead cycle) K steps
with the re-anchor period K (see GSAM_NOTE: Table 8's 2K cannot be GraphSAM as published).

Each algorithm runs in its own subprocess so that peak memory is that algorithm's alone:
CPU: the process's peak RSS (VmHWM) minus its RSS before the model was built (so it
counts parameters, gradients, optimizer state, activations and temporaries; the Python/torch
runtime is excluded); CUDA: torch.cuda.max_memory_allocated() minus the allocation before
the model was built.

    python -m bench.table8                    # CPU, small CNN, CIFAR-shaped random batch
    python -m bench.table8 --device cuda      # GPU, ResNet-18 (plain torch), batch 128
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import common

PAPER_COUNTS = {"SGD": 1, "SAM": 2, "FR": 2, "CR": 2, "CR-SAM": 3}
# what each row must count: Table 8's number, except GSAM, which is GraphSAM as published
# (one evaluation per step plus one per re-anchor; here an update is K steps with period K)
for _k in (2, 5, 10):
    PAPER_COUNTS.update({f"Lookbehind-SAM K={_k}": 2 * _k, f"GSAM K={_k}": 2 * _k,
                         f"FMLR K={_k}": 2 * _k, f"CMLR K={_k}": 2 * _k + 1})
EXPECTED = dict(PAPER_COUNTS, **{f"GSAM K={_k}": _k + 1 for _k in (2, 5, 10)})
GSAM_NOTE = (
    "GSAM rows: GraphSAM as published (Wang et al., ICLR 2024; YL-wang/GraphSAM), an update "
    "being K steps with the re-anchor period set to K: one evaluation per step plus one fresh "
    "gradient per re-anchor, K+1 per update (about 1 per step with the authors' per-epoch "
    "re-anchoring). Table 8's row \"GSAM (multi-step)\" with 2K evaluations cannot be GraphSAM "
    "as published: 2K is SAM's cost for K steps, the cost GraphSAM was designed to avoid.")
PARALLEL = {"CR", "CR-SAM"} | {f"CMLR K={k}" for k in (2, 5, 10)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_bytes() -> int:
    return _status_kb("VmRSS")


def _peak_rss_bytes() -> int:
    # VmHWM is this process's own high-water mark (ru_maxrss would inherit the parent's
    # peak across fork/exec on Linux)
    return _status_kb("VmHWM")


def worker(a) -> dict:
    dev = torch.device(a.device)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    import lookahead_ext  # noqa: F401  (load code before the baseline RSS is read)
    import lookahead_ext.optim.baselines  # noqa: F401
    mk = (lambda: common.ResNet18()) if a.model == "resnet18" else (lambda: common.SmallCNN(a.width))
    if dev.type == "cpu":  # map the kernels' code pages with a throwaway model and batch of 2
        F.cross_entropy(mk()(x[:2]), y[:2]).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = _rss_bytes()
    model = mk().to(dev)
    opt = common.make_optimizer(a.key, model.parameters(), k=a.k, backend=a.backend)
    closure = common.CountingClosure(model, F.cross_entropy, x, y)
    inner = common.inner_steps_per_update(opt)

    def update():
        for _ in range(inner):
            common.step(opt, closure)

    for _ in range(a.warmup):
        update()
    common.sync(dev)
    c0 = closure.count
    e0 = getattr(opt, "num_evals", None)
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        update()
        common.sync(dev)
        times.append(time.perf_counter() - t0)
    evals = (closure.count - c0) / a.reps
    if e0 is not None:
        assert opt.num_evals - e0 == closure.count - c0, "optimizer count != closure count"
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = _peak_rss_bytes() - base_mem
    times.sort()
    seen, state_bytes = set(), 0
    tensors = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    tensors += list(getattr(opt, "_slow", {}).values()) + list(getattr(opt, "_scratch", {}).values())
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            state_bytes += t.untyped_storage().nbytes()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(state_bytes=state_bytes, param_bytes=param_bytes, evals_per_update=evals,
                peak_bytes=peak, time_per_update_s=times[len(times) // 2],
                times_s=times, inner_steps=inner,
                params=sum(p.numel() for p in model.parameters()))


def run(args) -> dict:
    quick = args.quick
    model = "resnet18" if args.device.startswith("cuda") else "smallcnn"
    batch = args.batch or (128 if model == "resnet18" else (16 if quick else 64))
    ks = (2,) if quick else (2, 5, 10)
    reps = args.reps or (1 if quick else 3)
    algs = common.table8_algorithms(ks)
    rows = []
    root = os.path.dirname(common.HERE)
    from tqdm import tqdm
    for label, key, k in tqdm(algs, desc="table8", disable=quick):
        wargs = ["--worker", "--key", key, "--k", str(k), "--device", args.device,
                 "--model", model, "--batch", str(batch),
                 "--width", str(8 if quick else 32), "--reps", str(reps), "--warmup", "1",
                 "--backend", args.backend, "--threads", str(args.threads)]
        # the worker imports lookahead_ext as this process does (installed or source tree);
        # bench/ itself is found by appending the repository root
        code = (f"import sys; sys.path.append({root!r}); from bench.table8 import main; "
                f"main({wargs!r})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"table8 worker {label} failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res.update(label=label, key=key, k=k)
        rows.append(res)
    sgd = rows[0]
    for r in rows:
        r["peak_rel"] = r["peak_bytes"] / sgd["peak_bytes"]
        r["time_rel"] = r["time_per_update_s"] / sgd["time_per_update_s"]
        r["paper_count"] = PAPER_COUNTS.get(r["label"])
        r["expected_count"] = EXPECTED.get(r["label"])
        r["parallel"] = r["label"] in PARALLEL
    payload = dict(env=common.env_info(args.device), model=model, batch=batch, reps=reps,
                   backend=args.backend, rows=rows, cores=os.cpu_count(),
                   load_avg_end=list(os.getloadavg()))
    return write(payload, args.out, args.device)


def write(payload: dict, out: str, device: str) -> dict:
    """table8_<device>.md/.json/.png from a run's payload (``--render`` redoes it from the JSON)."""
    rows, sgd = payload["rows"], payload["rows"][0]
    md_rows = [(r["label"], f"{r['evals_per_update']:g}",
                f"{r['paper_count']}" + ("" if r["paper_count"] == r["expected_count"] else " (not GraphSAM)"),
                f"{r['peak_rel']:.2f}x", f"{r['state_bytes'] / r['param_bytes']:.1f}",
                f"{r['time_rel']:.2f}x",
                f"{r['time_per_update_s'] * 1e3:.1f}", "yes" if r["parallel"] else "no")
               for r in rows]
    load, cores = payload.get("load_avg_end"), payload.get("cores")
    busy = ""
    if load and cores and load[1] > cores:  # other processes held the CPUs
        busy = (f"**Timings not meaningful in this run:** load average {load[0]:.1f} / {load[1]:.1f} / "
                f"{load[2]:.1f} (1 / 5 / 15 min) on {cores} cores at its end"
                + (f" ({payload['load_note']})" if payload.get("load_note") else "")
                + ": the time columns measure contention. F/B counts and state bytes are exact.\n\n")
    md = (f"### Table 8 reproduced ({payload['model']}, batch {payload['batch']}, CIFAR-shaped random "
          f"inputs, {device}, backend={payload['backend']})\n\n{busy}"
          f"Peak memory and time per update relative to SGD (SGD: "
          f"{sgd['peak_bytes'] / 2**20:.1f} MiB above the runtime, "
          f"{sgd['time_per_update_s'] * 1e3:.1f} ms per update); median of {payload['reps']} updates. "
          "F/B counted = closure calls per update (equals opt.num_evals). State / params = bytes of "
          "optimizer-held tensors (momentum, v, slow weights, probe backups) over parameter bytes "
          "(exact count; the peak-memory column also holds activations, which dominate for a "
          f"small CNN).\n\n{GSAM_NOTE}\n\n"
          + common.md_table(["Optimizer", "F/B counted", "F/B Table 8", "Peak memory", "State / params",
                             "Time", "ms / update", "Parallel probes"], md_rows))
    name = f"table8_{device.split(':')[0]}"
    common.write_results(out, name, payload, md)
    _plot(rows, os.path.join(out, f"{name}.png"))
    return payload


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ev = [r["evals_per_update"] for r in rows]
    tr = [r["time_rel"] for r in rows]
    ax.scatter(ev, tr)
    for r in rows:
        ax.annotate(r["label"], (r["evals_per_update"], r["time_rel"]), fontsize=6)
    m = max(ev)
    ax.plot([1, m], [1, m], "k--", lw=0.8, label="time = F/B count")
    ax.set_xlabel("forward/backward passes per update (counted)")
    ax.set_ylabel("time per update / SGD")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--key", default="SGD")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--reps", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--render", action="store_true",
                   help="rewrite the .md and .png from the existing table8_<device>.json")
    a = p.parse_args(argv)
    if a.render:
        name = f"table8_{a.device.split(':')[0]}"
        with open(os.path.join(a.out, f"{name}.json")) as f:
            write(json.load(f), a.out, a.device)
        print(open(os.path.join(a.out, f"{name}.md")).read())
        return
    common.setup(a)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    payload = run(a)
    print(open(os.path.join(a.out, f"table8_{a.device.split(':')[0]}.md")).read())
    return payload


if __name__ == "__main__":
    main()
