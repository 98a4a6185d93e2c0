"""Helpers shared by the tests of the production-training features (tests/test_prod_*.py)."""
import torch

import lookahead_ext as la

# every probe optimizer of the package, with a short cycle
FAMILY = [(la.SAM, {}), (la.FR, {}), (la.CR, {}), (la.LR, dict(k=2)), (la.CLR, dict(k=2)),
          (la.FMLR, dict(k=2)), (la.MLSAM, dict(k=2)), (la.CMLR, dict(k=2))]
FAMILY_IDS = [c.__name__ for c, _ in FAMILY]


def mlp(seed=0, dtype=torch.float32, width=8):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(),
                               torch.nn.Linear(width, 1)).to(dtype)


def data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def accumulated_loss(model, x, y, n: int):
    """Gradient accumulation inside one probe: the MSE of ``model`` on (x, y) as ``n`` equal
    micro-batches, each backward()-ed with weight 1/n; returns the summed (detached) loss."""
    tot = 0.0
    for xb, yb in zip(x.chunk(n), y.chunk(n)):
        loss = torch.nn.functional.mse_loss(model(xb), yb) / n
        loss.backward()
        tot = tot + loss.detach()
    return tot


def flat_state(opt):
    """Every tensor of an optimizer's state dict (cloned) plus the non-tensor leaves, so that
    two snapshots can be compared bit for bit. Engine counters are left out."""
    out = {}

    def walk(prefix, x):
        if isinstance(x, torch.Tensor):
            out[prefix] = x.detach().clone()
        elif isinstance(x, dict):
            for k, v in x.items():
                if prefix.endswith("engine") and k in ("evals", "skipped"):
                    continue
                walk(f"{prefix}/{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)
        else:
            out[prefix] = x
    walk("", opt.state_dict())
    return out


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]
