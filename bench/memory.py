"""Peak memory of a training step per optimizer: live tensor bytes, tracked storage by storage.

What is measured: the bytes of every tensor storage alive, sampled after each operation
of the step (a TorchDispatchMode sees every op's outputs; a weakref on each storage sees
it freed). At the start of the measured step every tensor alive in the process (weights,
.grad, optimizer state, the lookahead engine's scratch and slow weights, the batch) is
registered as well, so the numbers are totals, in units of the model's parameter bytes P:

- ``between``: live at the start of a step, before its zero_grad (so the previous step's
  .grad is still there: the last probe's gradient for ours, as documented);
- ``peak``: the largest total during the step (forward, backward, optimizer).

Not counted: allocator caching/fragmentation and temporaries private to one fused kernel
(none of our CPU kernels allocate any), Python objects. Deterministic: no allocator, RSS
or timing involved. The step with the largest peak over a whole cycle is reported (CMLR's
k = 0 step evaluates one gradient more).

    python bench/memory.py [--quick]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lookahead_ext as la  # noqa: E402
from bench.common import RESULTS, env_info, md_table, write_results  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Live tensor-storage bytes: ``current`` and ``peak`` since entering."""

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.current = self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._freed, key)

    def _freed(self, key) -> None:
        self.current -= self.live.pop(key, 0)

    def track_all_alive(self) -> None:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
            warnings.simplefilter("ignore")
            alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        for t in alive:
            if not t.is_meta:
                self.track(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


def model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def optimizers():
    """name -> (factory(params), how a step is driven: "plain" (backward, step()), "closure"
    (step(closure)) or "backward+closure" (pytorch_optimizer's SAM: the first gradient by
    backward() before step(closure), as its docstring asks))."""
    from pytorch_optimizer import SAM as PoSAM
    sgd = dict(lr=0.01, momentum=0.9)
    return {
        "torch SGD (momentum)": (lambda p: torch.optim.SGD(p, **sgd), "plain"),
        "torch AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-3), "plain"),
        "pytorch_optimizer SAM (SGD)": (lambda p: PoSAM(p, torch.optim.SGD, rho=0.05, **sgd),
                                        "backward+closure"),
        "SAM (SGD)": (lambda p: la.SAM(p, **sgd), "closure"),
        "CMLR (SGD)": (lambda p: la.CMLR(p, k=5, **sgd), "closure"),
        "CMLR (AdamW)": (lambda p: la.CMLR(p, lr=1e-3, base="adamw", k=5), "closure"),
    }


def measure(make, style: str, width: int, depth: int, batch: int, steps: int) -> dict:
    net = model(width, depth)
    opt = make(net.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, width, generator=g), torch.randint(0, 10, (batch,), generator=g)
    pbytes = sum(p.numel() * p.element_size() for p in net.parameters())

    def closure():
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    def one_step():
        opt.zero_grad(set_to_none=True)
        if style != "closure":
            closure()
        if style == "plain":
            opt.step()
        else:
            opt.step(closure)

    for _ in range(2):  # state created
        one_step()
    between = peak = 0
    for _ in range(steps):
        with LiveBytes() as mode:
            mode.track_all_alive()
            start = mode.current
            one_step()
            peak = max(peak, mode.peak)
            between = max(between, start)
    return dict(params=sum(p.numel() for p in net.parameters()), param_bytes=pbytes,
                between=between / pbytes, peak=peak / pbytes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args(argv)
    width, depth, batch, steps = (64, 2, 8, 5) if a.quick else (1024, 4, 32, 5)
    rows, res = [], {}
    for name, (make, style) in optimizers().items():
        r = measure(make, style, width, depth, batch, steps)
        res[name] = r
        rows.append([name, f"{r['between']:.2f}", f"{r['peak']:.2f}"])
        print(f"{name:30s} between {r['between']:.2f} P   peak {r['peak']:.2f} P", flush=True)
    n = next(iter(res.values()))["params"]
    md = (f"Live tensor bytes in units of the parameter bytes P ({n / 1e6:.2f}M fp32 parameters: "
          f"MLP {depth}x{width}, batch {batch}; the largest over {steps} consecutive steps, i.e. "
          "a whole CMLR cycle of K = 5). Measured by bench/memory.py (see its docstring).\n\n"
          + md_table(["optimizer", "start of a step (before zero_grad)", "peak in a step"], rows))
    if not a.quick:
        write_results(a.out, "memory_cpu", dict(env=env_info(), width=width, depth=depth,
                                                batch=batch, results=res), md)
    print(md)
    return res


if __name__ == "__main__":
    main()
