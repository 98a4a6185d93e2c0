#!/usr/bin/env python
"""Host cost per fused-op call on 200 tensors: Triton with the kernel launches stubbed out,
the native backend, and torch._foreach_add_ as the yardstick.

Each op is called as the engine calls it in a CMLR inner step (perturb_ with the backup,
nonfinite_ with sq_norms, combine_step_ with SGD momentum + v + v_sq_out and
write_masters=False, lookahead_sync_, sq_norm). Regimes for the Triton backend:

  plain               plain lists, the same tensors every call (a direct user call: every
                      tensor's pointer, dtype, size and contiguity read per call, and the
                      aliasing check)
  planlist            PlanLists (lookahead_ext.ops.plan_lists) within one step: the
                      engine's persistent launch plans, O(1) per list
  planlist_new_step   PlanLists with a new step before every call (each list re-checked as
                      the engine's are: params and fp32 backups not at all, state lists by
                      address; the gradient lists, made with like=params, by address and
                      version)
  planlist_new_epoch  PlanLists with a new epoch before every call (each list re-read)
  build               tensors never seen before (the plan built from scratch)
  step                one CMLR inner step's calls as the engine issues them (a new step;
                      the state lists rebuilt and kept by plan_lists.reuse; new gradient
                      lists per probe, made with like=params, each read once), per op call

The PlanList regimes and the step are the engine's own calls, which skip the per-call
aliasing check (ops.helpers.trust_engine_calls: the engine checks its parameters once per
bucket plan); the plain regime is a user's call, checked.

With launches stubbed, the Triton numbers are pure host cost (table lookup/build, argument
preparation, scalar handling) and independent of the device; the native backend and
torch._foreach_add_ run their real kernels on tiny tensors (their host cost plus a little
work). Timings: per call, the best over --repeats of the mean over --calls calls, in this thread's
CPU time by default (host cost on a shared machine; --clock wall for perf_counter).

    python bench/host_overhead.py                 # the device present (cuda if available)
    python bench/host_overhead.py --device cpu --out bench/results
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a source checkout too

import torch  # noqa: E402

OPS = ("perturb", "nonfinite", "combine", "lookahead_sync", "sq_norm")


def _sizes(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(1, 2048, (n,), generator=g)]


class _Stub:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def stubbed_launches():
    """Replace every Triton kernel object the wrappers launch by a no-op stub."""
    from lookahead_ext.ops import triton_backend
    k = triton_backend._kernels()
    names = [(k._mta, "segsum_kernel"), (k._mta, "segmax_kernel"), (k.multi_dot, "_dot_kernel"),
             (k.perturb, "_perturb_kernel"), (k.combine_step, "_combine_kernel"),
             (k.lookahead_sync, "_sync_kernel"), (k.nonfinite, "_nonfinite_kernel")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in names]
    try:
        for mod, name in names:
            setattr(mod, name, _Stub())
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


class Buffers:
    """The lists one CMLR inner step hands to the ops (fp32 params); `wrap` = PlanList for
    the engine's persistent lists."""

    def __init__(self, sizes, device, wrap=list):
        mk = lambda **kw: wrap([torch.randn(s, device=device) for s in sizes], **kw)  # noqa: E731
        self.wrap = wrap
        if wrap is list:
            self.params, self.masters, self.v, self.mom = mk(), mk(), mk(), mk()
            self.gp, self.gm = mk(), mk()
        else:  # as the engine makes them (optim/_buckets.py, ProbeRuntime._capture)
            from lookahead_ext.ops.plan_lists import ADDRESS, OWNER
            self.params, self.masters = mk(check=OWNER), mk(check=OWNER)  # fp32: scratch masters
            self.v, self.mom = mk(check=ADDRESS), mk(check=ADDRESS)
            self.gp, self.gm = mk(like=self.params), mk(like=self.params)
        self.slow = mk()
        self.scale = torch.tensor(0.01, device=device) if device.type == "cuda" else 0.01

    def regrad(self):
        """A new step's lists as the engine makes them: gradient tensor objects at the old
        addresses (as the caching allocator gives), the state lists rebuilt from the
        optimizer state (plan_lists.reuse keeps the previous PlanList of the same tensors)."""
        kw = {} if self.wrap is list else {"like": self.params}
        self.gp = self.wrap([g.detach() for g in self.gp], **kw)
        self.gm = self.wrap([g.detach() for g in self.gm], **kw)
        if self.wrap is not list:
            from lookahead_ext.ops.plan_lists import ADDRESS, reuse
            self.v = reuse(self.v, list(self.v), check=ADDRESS)
            self.mom = reuse(self.mom, list(self.mom), check=ADDRESS)


def op_call(op: str, b: Buffers, backend: str):
    from lookahead_ext import ops
    from lookahead_ext.ops import BaseStep
    dev = b.params[0].device
    if op == "perturb":
        return lambda: ops.perturb_(b.params, b.params, b.v, b.scale, backup=b.masters, backend=backend)
    if op == "nonfinite":
        return lambda: ops.nonfinite_([b.gp], None, sq_norms=True, backend=backend)
    if op == "combine":
        base = BaseStep(kind="sgd", lr=1e-6, momentum=0.9)
        if dev.type == "cuda":
            t = lambda x: torch.tensor(x, device=dev)  # noqa: E731
            vc = (t(0.9), t(0.0), t(0.05), t(0.05))
        else:
            vc = (0.9, 0.0, 0.05, 0.05)
        v_sq = torch.zeros(1, device=dev)

        def fn():
            ops.combine_step_(b.params, b.masters, (None, b.gp, b.gm), (0.0, 0.6, 0.4), base,
                              {"momentum_buffer": b.mom}, b.v, vc, v_sq_out=v_sq,
                              write_masters=False, backend=backend)
        return fn
    if op == "lookahead_sync":
        return lambda: ops.lookahead_sync_(b.slow, b.params, 0.5, backend=backend)
    if op == "sq_norm":
        return lambda: ops.sq_norm(b.gp, backend=backend)
    raise ValueError(op)


def step_calls(b: Buffers, backend: str):
    """One CMLR inner step's op calls as the engine makes them: a new step, and gradient
    lists that are new PlanLists (prepared untimed by `before`: autograd makes them).
    Returns (before, step, number of op calls)."""
    from lookahead_ext import ops
    from lookahead_ext.ops.plan_lists import new_step
    perturb_p = op_call("perturb", b, backend)
    nonfinite = op_call("nonfinite", b, backend)
    combine = op_call("combine", b, backend)

    def step():
        new_step()
        perturb_p()
        nonfinite()
        ops.perturb_(b.params, b.masters, b.v, b.scale, backend=backend)
        ops.nonfinite_([b.gm], None, sq_norms=True, backend=backend)
        combine()
    return b.regrad, step, 5


def per_call_us(fn, calls: int, repeats: int, before=None, sync=None, clock=time.thread_time) -> float:
    """Best over `repeats` of the mean time per call (us) on `clock`; `before` runs untimed.
    The default clock is this thread's CPU time: the host cost, unaffected by other
    processes taking the CPU (a shared machine); --clock wall uses perf_counter."""
    best = float("inf")
    for _ in range(repeats):
        total = 0.0
        for _ in range(calls):
            if before is not None:
                before()
            t = clock()
            fn()
            total += clock() - t
        if sync is not None:
            sync()
        best = min(best, total / calls)
    return best * 1e6


@contextlib.contextmanager
def engine_calls():
    """The engine's own op calls: no per-call aliasing check (trust_engine_calls)."""
    from lookahead_ext.ops.helpers import trust_engine_calls
    prev = trust_engine_calls(True)
    try:
        yield
    finally:
        trust_engine_calls(prev)


def measure(device: torch.device, n: int, calls: int, repeats: int, ops_: list, clock) -> dict:
    from lookahead_ext import ops
    from lookahead_ext.ops.plan_lists import PlanList, new_epoch, new_step
    sizes = _sizes(n)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    yardstick = lambda: per_call_us(lambda: sum(range(1000)), calls, repeats, clock=clock)  # noqa: E731
    res: dict = {"tensors": n, "elements": sum(sizes), "ops": {}, "python_sum_range_1000_first": yardstick()}
    plain, planned = Buffers(sizes, device), Buffers(sizes, device, PlanList)
    avail = ops.available_backends()
    native = "cuda" if device.type == "cuda" else "cpp"
    for op in ops_:
        row = {}
        if avail.get("triton") == "ok":
            with stubbed_launches():
                fn = op_call(op, plain, "triton")
                fn()
                row["triton_plain"] = per_call_us(fn, calls, repeats, clock=clock)
                fn = op_call(op, planned, "triton")
                with engine_calls():
                    fn()
                    row["triton_planlist"] = per_call_us(fn, calls, repeats, clock=clock)
                    row["triton_planlist_new_step"] = per_call_us(fn, calls, repeats, before=new_step,
                                                                  clock=clock)
                    row["triton_planlist_new_epoch"] = per_call_us(fn, calls, repeats, before=new_epoch,
                                                                   clock=clock)
                fresh = []

                def new_buffers():  # tensors never seen before (allocated untimed)
                    fresh.append(op_call(op, Buffers(sizes, device), "triton"))

                def build():
                    fresh.pop()()
                row["triton_build"] = per_call_us(build, max(2, calls // 20), repeats,
                                                  before=new_buffers, clock=clock)
            if device.type == "cuda":  # the same PlanList calls with their real launches
                fn = op_call(op, planned, "triton")
                with engine_calls():
                    fn()
                    row["triton_planlist_launched"] = per_call_us(fn, calls, repeats, sync=sync,
                                                                  clock=clock)
        if avail.get(native) == "ok":
            fn = op_call(op, plain, native)
            fn()
            row[native] = per_call_us(fn, calls, repeats, sync=sync, clock=clock)
        res["ops"][op] = row
    if avail.get("triton") == "ok":
        with stubbed_launches(), engine_calls():
            before, step, n_calls = step_calls(planned, "triton")
            step()
            res["triton_step_per_call"] = per_call_us(step, calls, repeats, before=before,
                                                      clock=clock) / n_calls
    dst = [torch.zeros(s, device=device) for s in sizes]
    torch._foreach_add_(dst, 1.0)
    res["foreach_add_"] = per_call_us(lambda: torch._foreach_add_(dst, 1.0), calls, repeats, sync=sync,
                                       clock=clock)
    res["python_sum_range_1000"] = yardstick()
    return res


COLUMNS = {
    "triton_plain": "Triton, plain lists (a user's call: every tensor read, aliasing checked)",
    "triton_planlist": "Triton, PlanLists within a step (the engine's persistent plans)",
    "triton_planlist_new_step": "Triton, PlanLists re-checked as the engine's are (a new step before every call)",
    "triton_planlist_new_epoch": "Triton, PlanLists read in full (a new epoch before every call)",
    "triton_build": "Triton, tensors never seen (plan built)",
    "triton_planlist_launched": "Triton, PlanLists, real launches (CUDA: compiled kernels, host time)",
    "cpp": "native CPU backend (real kernels, tiny tensors)",
    "cuda": "native CUDA backend (real launches, host time)",
}


def to_md(res: dict, info: dict) -> str:
    cols = [k for k in COLUMNS if any(k in row for row in res["ops"].values())]
    lines = [f"# Host cost per fused-op call ({res['tensors']} tensors, {res['elements']} elements)", "",
             *[f"- {k}: `{v}`" for k, v in info.items()], "",
             "Triton columns: kernel launches stubbed out (host cost only). us per call:", "",
             *[f"- `{c}`: {COLUMNS[c]}" for c in cols], "",
             "| op | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for op, row in res["ops"].items():
        lines.append(f"| {op} | " + " | ".join(f"{row[c]:.1f}" if c in row else "-" for c in cols) + " |")
    lines.append("")
    if "triton_step_per_call" in res:
        lines.append("One CMLR inner step as the engine issues it (new step, perturb+, check g+, perturb-, "
                     "check g-, combine; state lists kept, new gradient PlanLists per probe), Triton stubbed: "
                     f"{res['triton_step_per_call']:.1f} us per op call")
    lines += [f"torch._foreach_add_ on the same {res['tensors']} tensors: {res['foreach_add_']:.1f} us per call",
              f"Python speed reference (CPU load yardstick: about 10 us on an idle modern core), "
              f"sum(range(1000)): {res['python_sum_range_1000_first']:.1f} us before the runs, "
              f"{res['python_sum_range_1000']:.1f} us after", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: host cost without thread-pool wake-ups)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (default); wall: perf_counter")
    ap.add_argument("--out", default=None, help="folder for host_overhead_<device>.json/.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cpu":  # CPU tensors reach the Triton kernels only under the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import platform
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            (platform.processor() or platform.machine()) + f" ({os.cpu_count()} cores)",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"unavailable ({type(exc).__name__})"
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    info["clock"] = args.clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    res = measure(device, args.tensors, args.calls, args.repeats, args.ops.split(","), clock)
    md = to_md(res, info)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"host_overhead_{device.type}"
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump({"env": info, **res}, f, indent=1)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write(md)
    return res


if __name__ == "__main__":
    main()
