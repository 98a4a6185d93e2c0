"""Part 1: throughput of the fused ops, per backend, and whole optimizer steps.

For every op of lookahead_ext.ops and every backend that ``available_backends()`` reports
usable (reference always; cpp, cuda, triton once built), over total size and tensor-list
shape (200 mixed-size tensors, or 4 equal large ones) and parameter dtype (fp32, bf16):
time per call, bytes moved (byte model below), effective GB/s, and the ratio to the same
device's streaming bandwidth measured in the same run (``torch._foreach_add_`` on CPU,
``torch._foreach_copy_`` on GPU, fp32, same shape and size).

Byte model per element (s = bytes of the parameter dtype: 4 fp32, 2 bf16; state, masters,
v and slow weights are fp32; one read or write of each operand, nothing else counted):

- perturb_(out, masters, v, scale)           read master 4 + read v 4 + write out s  = 8 + s
- combine_step_ CMLR/SGD-momentum             read g+, g- 2s; master r+w 8; momentum r+w 8;
                                              v r+w 8; write param s                  = 24 + 3s
- combine_step_ CMLR/AdamW                    g+, g- 2s; master 8; exp_avg 8; exp_avg_sq 8;
                                              v 8; param s                            = 32 + 3s
- lookahead_sync_(slow, masters, params)      slow r+w 8; master r+w 8; write param s = 16 + s
- multi_dot ||g+||^2, ||g-||^2               read g+, g- 2s                          = 2s
- nonfinite_ (g+, g-)                         read g+, g- 2s                          = 2s
- foreach_add_(a, b) (CPU ceiling)            read a, b, write a (fp32)               = 12
- foreach_copy_(a, b) (GPU ceiling)           read b, write a (fp32)                  = 8

Whole optimizer steps (optimizer side only: gradients are preset tensors, no forward or
backward): torch.optim.SGD (momentum) and AdamW with foreach=True and fused=True, next to
a CMLR inner step (mean over a K = 5 cycle, sync included), a SAM step and Lookahead(SGD),
with the same parameters.

    python -m bench.kernels              # default sweep 1M, 4M, 16M params
    python -m bench.kernels --full       # 1M -> 256M params (needs ~10 GB RAM, long)
    python -m bench.kernels --device cuda
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from . import common

BYTE_MODEL = {
    "perturb_": lambda s: 8 + s,
    "combine_step_ (CMLR, SGD-momentum)": lambda s: 24 + 3 * s,
    "combine_step_ (CMLR, AdamW)": lambda s: 32 + 3 * s,
    "lookahead_sync_": lambda s: 16 + s,
    "multi_dot (2 sq-norms)": lambda s: 2 * s,
    "nonfinite_ (2 lists)": lambda s: 2 * s,
}


def split_sizes(total: int, shape: str, seed: int = 0) -> list[int]:
    """200 tensors of log-uniform sizes (as in a CNN: biases to large kernels) or 4 equal."""
    if shape == "few4":
        return [total // 4] * 4
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.rand(200, generator=g, dtype=torch.float64) * math.log(1e4))
    sizes = (w / w.sum() * total).floor().long().clamp(min=1)
    sizes[-1] += total - int(sizes.sum())
    return [int(x) for x in sizes]


def make_lists(sizes, dtype, device, n_state=6):
    def lst(dt):
        return [torch.randn(n, dtype=dt, device=device) * 0.01 for n in sizes]
    params = lst(dtype)
    state = {name: lst(torch.float32) for name in ("master", "v", "buf", "m", "s2", "slow")}
    for t in state["s2"]:
        t.abs_()
    grads = [lst(dtype), lst(dtype)]
    return params, state, grads


def op_calls(backend, params, st, grads, device):
    """name -> zero-arg callable running the op once."""
    from lookahead_ext import ops
    from lookahead_ext.ops import BaseStep
    scale = torch.tensor(0.01, device=device)
    gp, gm = grads
    sgd = BaseStep(kind="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    adam = BaseStep(kind="adamw", lr=1e-3, weight_decay=1e-2, step=10)
    vc = tuple(torch.tensor(c, device=device) for c in (0.9, 0.0, 0.05, 0.05))
    coefs = (0.0, 1.5, -0.5)
    return {
        "perturb_": lambda: ops.perturb_(params, st["master"], st["v"], scale, backend=backend),
        "combine_step_ (CMLR, SGD-momentum)": lambda: ops.combine_step_(
            params, st["master"], (None, gp, gm), coefs, sgd, {"momentum_buffer": st["buf"]},
            st["v"], vc, backend=backend),
        "combine_step_ (CMLR, AdamW)": lambda: ops.combine_step_(
            params, st["master"], (None, gp, gm), coefs, adam,
            {"exp_avg": st["m"], "exp_avg_sq": st["s2"]}, st["v"], vc, backend=backend),
        "lookahead_sync_": lambda: ops.lookahead_sync_(st["slow"], st["master"], 0.5,
                                                       params=params, backend=backend),
        "multi_dot (2 sq-norms)": lambda: ops.multi_dot([gp, gm], [(0, 0), (1, 1)], backend=backend),
        "nonfinite_ (2 lists)": lambda: ops.nonfinite_([gp, gm], backend=backend),
    }


def usable_backends(device: str, dtype) -> list[str]:
    from lookahead_ext import ops
    out = []
    for name, status in ops.available_backends().items():
        if status != "ok" or name == "native":  # measured under its aliases "cpp" / "cuda" (result labels)
            continue
        try:
            mod = ops.resolve(name, torch.device(device), dtype)
        except Exception:
            continue
        if mod is not None:
            out.append(name)
    return out


def ceiling(sizes, device, reps):
    """The device's streaming bandwidth on these sizes (fp32), median of >= reps calls, >= 0.3 s."""
    a = [torch.randn(n, device=device) for n in sizes]
    b = [torch.randn(n, device=device) for n in sizes]
    if str(device).startswith("cuda"):
        t = common.timeit(lambda: torch._foreach_copy_(a, b), device, reps=reps, min_time=0.3)
        return "foreach_copy_", 8 * sum(sizes) / t, t
    t = common.timeit(lambda: torch._foreach_add_(a, b), device, reps=reps, min_time=0.3)
    return "foreach_add_", 12 * sum(sizes) / t, t


def optimizer_steps(device, total, reps, backend):
    """Optimizer-side step time with preset gradients (no forward/backward)."""
    import lookahead_ext as la
    sizes = split_sizes(total, "mixed200")
    out = []

    def params_and_grads():
        ps = [torch.nn.Parameter(torch.randn(n, device=device) * 0.01) for n in sizes]
        gs = [torch.randn(n, device=device) * 0.01 for n in sizes]
        return ps, gs

    def torch_step(make):
        ps, gs = params_and_grads()
        opt = make(ps)

        def fn():
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
        return fn

    cases = [
        ("torch.optim.SGD(momentum) foreach", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True)),
        ("torch.optim.SGD(momentum) fused", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True)),
        ("torch.optim.AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        ("torch.optim.AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        (f"Lookahead(SGD foreach, k=5) [{backend}]",
         lambda ps: la.Lookahead(torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True), k=5,
                                 backend=backend)),
    ]
    for name, make in cases:
        try:
            t = common.timeit(torch_step(make), device, warmup=2, reps=reps * 5)
            out.append(dict(name=name, s_per_step=t))
        except Exception as exc:  # e.g. fused not supported on this device/torch
            out.append(dict(name=name, s_per_step=None, error=f"{type(exc).__name__}: {exc}"))

    def probe_step(make, steps_per_call):
        ps, gs = params_and_grads()
        opt = make(ps)

        def fn():
            for _ in range(steps_per_call):
                for _probe in opt.probes():
                    for p, g in zip(ps, gs):
                        p.grad = g
        return fn

    for name, make, n in [
        (f"SAM (SGD momentum) [{backend}]", lambda ps: la.SAM(ps, lr=0.01, momentum=0.9, backend=backend), 1),
        (f"CMLR inner step, K=5 mean (SGD momentum) [{backend}]",
         lambda ps: la.CMLR(ps, lr=0.01, momentum=0.9, k=5, backend=backend), 5),
        (f"CMLR inner step, K=5 mean (AdamW) [{backend}]",
         lambda ps: la.CMLR(ps, lr=1e-3, base="adamw", k=5, backend=backend), 5),
    ]:
        t = common.timeit(probe_step(make, n), device, warmup=1, reps=max(3, reps))
        out.append(dict(name=name, s_per_step=t / n))
    base = next(r["s_per_step"] for r in out if r["name"].startswith("torch.optim.SGD(momentum) foreach"))
    for r in out:
        r["rel_to_sgd_foreach"] = None if r["s_per_step"] is None else r["s_per_step"] / base
    return out


def run(args) -> dict:
    common.setup(args)
    device = args.device
    if args.quick:
        totals, shapes, dtypes, reps = [1 << 18], ["mixed200", "few4"], [torch.float32], 1
    elif args.full:
        totals = [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]
        shapes, dtypes, reps = ["mixed200", "few4"], [torch.float32, torch.bfloat16], 3
    else:
        totals = [1 << 20, 1 << 22, 1 << 24]
        shapes, dtypes, reps = ["mixed200", "few4"], [torch.float32, torch.bfloat16], 3
    rows, ceil_rows = [], []
    from tqdm import tqdm
    combos = [(n, sh, dt) for n in totals for sh in shapes for dt in dtypes]
    ceil_cache = {}
    for total, shape, dtype in tqdm(combos, desc="kernels", disable=args.quick):
        sizes = split_sizes(total, shape)
        if (total, shape) not in ceil_cache:
            ceil_cache[(total, shape)] = cname, cbw, ct = ceiling(sizes, device, reps)
            ceil_rows.append(dict(total=total, shape=shape, op=cname, gbps=cbw / 1e9, s=ct))
        cname, cbw, ct = ceil_cache[(total, shape)]
        params, st, grads = make_lists(sizes, dtype, device)
        s = torch.empty((), dtype=dtype).element_size()
        for backend in usable_backends(device, dtype):
            for op, fn in op_calls(backend, params, st, grads, device).items():
                try:
                    t = common.timeit(fn, device, warmup=1, reps=reps)
                except Exception as exc:
                    rows.append(dict(op=op, backend=backend, total=total, shape=shape,
                                     dtype=str(dtype).replace("torch.", ""),
                                     error=f"{type(exc).__name__}: {exc}"))
                    continue
                nbytes = BYTE_MODEL[op](s) * total
                rows.append(dict(op=op, backend=backend, total=total, shape=shape,
                                 dtype=str(dtype).replace("torch.", ""), s_per_call=t,
                                 bytes=nbytes, gbps=nbytes / t / 1e9,
                                 frac_of_ceiling=nbytes / t / cbw, ceiling_op=cname,
                                 ceiling_gbps=cbw / 1e9))
        del params, st, grads
    steps_total = (1 << 18) if args.quick else (1 << 22)
    steps = optimizer_steps(device, steps_total, 1 if args.quick else 3, args.backend)
    payload = dict(env=common.env_info(device), byte_model={k: f"{v(4)} B/elem fp32, {v(2)} B/elem bf16"
                                                           for k, v in BYTE_MODEL.items()},
                   full_sweep=bool(args.full), ceilings=ceil_rows, ops=rows,
                   optimizer_steps=dict(total_params=steps_total, rows=steps))
    md = _markdown(payload, totals)
    name = f"kernels_{device.split(':')[0]}"
    common.write_results(args.out, name, payload, md)
    _plot(payload, os.path.join(args.out, name + ".png"))
    return payload


def _fmt_n(n):
    return f"{n / (1 << 20):g}M" if n >= 1 << 20 else f"{n / 1024:g}K"


def _markdown(payload, totals):
    rows = [r for r in payload["ops"] if "gbps" in r]
    big = max(totals)
    sel = [r for r in rows if r["total"] == big]
    t = common.md_table(
        ["op", "backend", "shape", "dtype", "time / call (ms)", "bytes (MB)", "GB/s",
         "vs " + (sel[0]["ceiling_op"] if sel else "ceiling")],
        [(r["op"], r["backend"], r["shape"], r["dtype"], f"{r['s_per_call'] * 1e3:.2f}",
          f"{r['bytes'] / 1e6:.0f}", f"{r['gbps']:.2f}", f"{r['frac_of_ceiling']:.2f}") for r in sel])
    ceil = common.md_table(["params", "shape", "ceiling op", "GB/s"],
                           [(_fmt_n(c["total"]), c["shape"], c["op"], f"{c['gbps']:.2f}")
                            for c in payload["ceilings"]])
    st = payload["optimizer_steps"]
    steps = common.md_table(["optimizer (optimizer side only)", "ms / step", "vs SGD foreach"],
                            [(r["name"], "n/a" if r["s_per_step"] is None else f"{r['s_per_step'] * 1e3:.2f}",
                              "n/a" if r["rel_to_sgd_foreach"] is None else f"{r['rel_to_sgd_foreach']:.2f}x")
                             for r in st["rows"]])
    note = "" if payload["full_sweep"] else (
        f"Default sweep stops at {_fmt_n(big)} params; `--full` runs 1M -> 256M.")
    return (f"### Fused-op throughput ({payload['env']['device']}, {_fmt_n(big)} params)\n\n"
            f"{note} Byte model: see bench/kernels.py. All sizes are in the JSON.\n\n{t}\n\n"
            f"Streaming ceiling measured in the same run:\n\n{ceil}\n\n"
            f"### Whole optimizer steps ({_fmt_n(st['total_params'])} params in 200 tensors, fp32)\n\n"
            f"{steps}\n")


def _plot(payload, path):
    """Roofline-style: effective GB/s of each op against total size, with the device's
    measured streaming ceiling; fp32 and bf16 panels, 200 mixed tensors (solid) and 4 large (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops_rows = [r for r in payload["ops"] if "gbps" in r]
    dtypes = sorted({r["dtype"] for r in ops_rows}) or ["float32"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.5), squeeze=False)
    colors = {}
    for ax, dt in zip(axes[0], dtypes):
        for shape, style in (("mixed200", "-"), ("few4", "--")):
            rows = [r for r in ops_rows if r["dtype"] == dt and r["shape"] == shape]
            for op, be in sorted({(r["op"], r["backend"]) for r in rows}):
                rr = sorted([r for r in rows if r["op"] == op and r["backend"] == be], key=lambda r: r["total"])
                c = colors.setdefault((op, be), f"C{len(colors) % 10}")
                ax.plot([r["total"] for r in rr], [r["gbps"] for r in rr], style, color=c, marker="o", ms=3,
                        label=f"{op} [{be}]" if shape == "mixed200" else None)
            cr = sorted([c for c in payload["ceilings"] if c["shape"] == shape], key=lambda c: c["total"])
            if cr:
                ax.plot([c["total"] for c in cr], [c["gbps"] for c in cr], style, color="k", marker="s", ms=4,
                        label=f"ceiling: torch.{cr[0]['op']} fp32 (measured)" if shape == "mixed200" else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("total parameters (solid: 200 mixed tensors, dashed: 4 tensors)")
        ax.set_ylabel("effective GB/s (byte model)")
        ax.set_title(f"fused ops vs streaming bandwidth, params {dt}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(out, device="cpu"):
    """Redraw the plot from the JSON of a previous run (no new measurement)."""
    import json
    name = f"kernels_{device.split(':')[0]}"
    with open(os.path.join(out, name + ".json")) as f:
        _plot(json.load(f), os.path.join(out, name + ".png"))


def main(argv=None):
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--full", action="store_true", help="sweep 1M -> 256M params")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    a = p.parse_args(argv)
    if a.replot:
        return replot(a.out, a.device)
    run(a)
    print(open(os.path.join(a.out, f"kernels_{a.device.split(':')[0]}.md")).read())


if __name__ == "__main__":
    main()
