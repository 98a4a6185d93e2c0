"""Shared pieces of the benchmark suite: environment record, result files, models, the
algorithm registry (Table 8's list), timing helpers."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# ----------------------------------------------------------------------------- environment
def env_info(device: str = "cpu") -> dict:
    info = dict(
        device=device,
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        allocator=_HEAP,
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        platform=platform.platform(),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    try:
        import triton  # noqa: F401
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        from lookahead_ext import ops
        info["backends"] = ops.available_backends()
    except Exception as exc:  # pragma: no cover
        info["backends"] = repr(exc)
    return info


def env_md(info: dict) -> str:
    keys = ("device", "gpu", "cpu", "cores", "torch_threads", "allocator", "torch", "cuda", "triton", "python",
            "command", "time_utc")
    return "\n".join(f"- {k}: `{info[k]}`" for k in keys if k in info and info[k] is not None)


def write_results(out_dir: str, name: str, payload: dict, md: str) -> dict:
    """bench/results/<name>.json and <name>.md (the Markdown starts with the environment)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md.rstrip() + "\n\n" + "Environment:\n\n" + env_md(payload["env"]) + "\n")
    return payload


def md_table(header: list, rows: list) -> str:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable, device="cpu", warmup: int = 2, reps: int = 5, min_time: float = 0.0) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    times.sort()
    return times[len(times) // 2]


def add_common_args(p):
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="~seconds: tiny sizes, for the smoke test")
    p.add_argument("--out", default=RESULTS, help="output folder (default bench/results)")
    p.add_argument("--backend", default="auto",
                   help="backend of the lookahead_ext optimizers (auto, reference, cpp, cuda, triton)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: timings stay stable when other work "
                        "shares the cores; 0 = torch's default)")
    return p


_HEAP = "default"  # set by setup()


def steady_heap() -> bool:
    """Pin glibc's allocator to its steady state (no trimming of the heap top, a fixed
    32 MiB mmap threshold). By default glibc hands a freed heap top back to the OS and maps
    large blocks afresh, so code that allocates every step (pytorch-optimizer's SAM clones
    every weight) pays page faults in a fresh process but not in one whose heap is already
    large: measured 75 ms vs 28 ms per ResNet-18 SAM step for the same code, depending only
    on what ran before in the process. Returns False where this is not glibc."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if not name or not hasattr(ctypes.CDLL(name), "mallopt"):
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def setup(args) -> None:
    """Apply --threads (CPU) and the steady allocator (see steady_heap) before any timing."""
    global _HEAP
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    _HEAP = "glibc, no trim, 32 MiB mmap threshold" if steady_heap() else "default"


# ----------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """A small VGG-style CNN for CIFAR-shaped inputs (3x32x32, 10 classes), ~0.3M params."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        self.c1, self.c2, self.c3 = nn.Conv2d(3, w, 3, padding=1), nn.Conv2d(w, 2 * w, 3, padding=1), \
            nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.fc = nn.Linear(4 * w * 4 * 4, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return self.fc(x.flatten(1))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (He et al. 2016; 3x3 stem, no max-pool), plain torch, ~11.2M params."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MLP(nn.Module):
    def __init__(self, din=64, hidden=64, dout=10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(din, hidden), nn.ReLU(), nn.Linear(hidden, dout))

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- algorithms
# (label, factory key, K) in Table 8's order
def table8_algorithms(ks=(2, 5, 10)) -> list[tuple[str, str, int]]:
    out = [("SGD", "SGD", 1), ("SAM", "SAM", 1), ("FR", "FR", 1), ("CR", "CR", 1),
           ("CR-SAM", "CRSAM", 1)]
    for name, key in (("Lookbehind-SAM", "LookbehindSAM"), ("GSAM", "GSAM"), ("FMLR", "FMLR"),
                      ("CMLR", "CMLR")):
        out += [(f"{name} K={k}", key, k) for k in ks]
    return out


def make_optimizer(key: str, params, k: int = 1, lr: float = 0.05, momentum: float = 0.9,
                   weight_decay: float = 5e-4, rho: float = 0.05, lam: float = 0.1,
                   backend: str = "auto", alpha: float | None = None, extra: dict | None = None):
    """One optimizer of the comparison with shared base hyperparameters (paper's: lr 0.05,
    rho 0.05, lam 0.1, alpha 0.9 for CMLR/FMLR, 0.5 for Lookbehind-SAM; CR-SAM with its
    gamma 0.1, beta 0.01; GraphSAM with beta 0.99 and re-anchor period k)."""
    import lookahead_ext as la
    from lookahead_ext.optim.baselines import CRSAM, GSAM, LookbehindSAM
    base = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if key == "SGD":
        return torch.optim.SGD(params, **base)
    eng = dict(base, backend=backend, **(extra or {}))
    if key == "SAM":
        return la.SAM(params, rho=rho, **eng)
    if key == "FR":
        return la.FR(params, rho=rho, lam=lam, **eng)
    if key == "CR":
        return la.CR(params, rho=rho, lam=lam, **eng)
    if key == "CRSAM":
        return CRSAM(params, rho=rho, **eng)
    if key == "LookbehindSAM":
        return LookbehindSAM(params, rho=rho, k=k, alpha=0.5 if alpha is None else alpha, **eng)
    if key == "GSAM":  # GraphSAM: no Lookahead; K is its re-anchor period here
        return GSAM(params, rho=rho, period=k, **eng)
    if key == "FMLR":
        return la.FMLR(params, rho=rho, lam=lam, k=k, alpha=0.9 if alpha is None else alpha, **eng)
    if key == "CMLR":
        return la.CMLR(params, rho=rho, lam=lam, k=k, alpha=0.9 if alpha is None else alpha, **eng)
    raise KeyError(key)


def inner_steps_per_update(opt) -> int:
    """Inner steps of one update (a whole Lookahead cycle for the lookahead ones, a whole
    re-anchor period for GraphSAM)."""
    if getattr(opt, "lookahead", False):
        return opt.param_groups[0]["k"]
    if "period" in opt.param_groups[0]:
        return opt.param_groups[0]["period"]
    return 1


class CountingClosure:
    """closure() = zero grads, forward, backward; counts the evaluations it performs."""

    def __init__(self, model, loss_fn, x, y):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.count = 0

    def __call__(self):
        self.count += 1
        for p in self.model.parameters():
            p.grad = None
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        return loss


def step(opt, closure) -> None:
    """One inner step of any optimizer of the comparison (torch ones: one evaluation)."""
    if isinstance(opt, torch.optim.SGD) or isinstance(opt, torch.optim.AdamW):
        closure()
        opt.step()
    else:
        opt.step(closure)
