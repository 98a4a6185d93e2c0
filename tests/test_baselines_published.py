"""The baselines against independent float64 re-statements of the published updates.

Each re-statement below is written from the paper and the logic of the authors' public
code (chandar-lab/Lookbehind-SAM lookbehind.py, YL-wang/GraphSAM GraphSAM.py with the
paper's global-norm perturbation, TrustAIoT/CR-SAM utils/crsam.py): a torch.optim.SGD (with
momentum and weight decay) wrapped by per-parameter loops, as those wrappers do. Ours runs
on the same model, seed and batches for 20 steps; the fast weights must agree within 1e-9
after every step. Each test also runs a deliberately wrong variant (the bug the baseline
used to have) and requires it to miss by far more than the tolerance, so the comparison can
fail.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lookahead_ext import CRSAM, GSAM, LookbehindSAM

STEPS, TOL, MISS = 20, 1e-9, 1e-6
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    batches = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,)))
               for _ in range(STEPS)]
    return model, batches


def _backward(model, batch):
    for p in model.parameters():
        p.grad = None
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _global_norm(tensors):
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def _run_ours(opt, model, batches, record):
    out = []
    for t in range(STEPS):
        opt.step(lambda: _backward(model, batches[t]))
        out.append(record())
    return out


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _snap(params):
    return [p.detach().clone() for p in params]


# ----------------------------------------------------------------------------- Lookbehind-SAM
def _lookbehind_reference(model, batches, rho, K, alpha, wrong=False):
    """lookbehind.py's Lookbehind_SAM around torch SGD; `alpha=-1`: the adaptive alpha.
    The model's params hold the ascent point between steps; `fast` the cached params.
    wrong=True: every ascent restarts from the fast weights (Lookahead around SAM)."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, **SGD_KW)
    fast, slow = _snap(params), _snap(params)
    first, k, trace = None, 0, []
    for t in range(STEPS):
        if wrong:
            with torch.no_grad():
                for p, f in zip(params, fast):
                    p.copy_(f)
        _backward(model, batches[t])                       # ascent gradient at phi'
        with torch.no_grad():
            norm = _global_norm([p.grad for p in params]) + 1e-16
            for p in params:
                p.add_(p.grad * (rho / norm))
        _backward(model, batches[t])                       # descent gradient at the new phi'
        with torch.no_grad():
            backup = _snap(params)
            for p, f in zip(params, fast):
                p.copy_(f)
        sgd.step()
        with torch.no_grad():
            if k == 0:
                first = _snap(params)
            fast = _snap(params)
            for p, b in zip(params, backup):
                p.copy_(b)
            k += 1
            if k >= K:
                k = 0
                for i, p in enumerate(params):
                    p.copy_(fast[i])
                    if alpha == -1:
                        x, y = (first[i] - slow[i]).flatten(), (p - slow[i]).flatten()
                        cos = float(x @ y) / (max(float(x.norm()), 1e-8) * max(float(y.norm()), 1e-8))
                        a = (cos + 1.0) / 2.0
                    else:
                        a = alpha
                    p.mul_(a).add_(slow[i], alpha=1.0 - a)
                fast, slow = _snap(params), _snap(params)
        trace.append(_snap(fast))
    return trace


@pytest.mark.parametrize("alpha", [0.5, "adaptive"])
def test_lookbehind_sam_equals_published(alpha):
    rho, K = 0.05, 3
    model, batches = _setup(1)
    ref_model = copy.deepcopy(model)
    opt = LookbehindSAM(model.parameters(), rho=rho, k=K, alpha=alpha, norm_eps=1e-16, **SGD_KW)
    ours = _run_ours(opt, model, batches, lambda: _snap(model.parameters()))
    ref_alpha = -1 if alpha == "adaptive" else alpha
    ref = _lookbehind_reference(copy.deepcopy(ref_model), batches, rho, K, ref_alpha)
    diff = _max_diff(ours, ref)
    wrong = _max_diff(ours, _lookbehind_reference(copy.deepcopy(ref_model), batches, rho, K,
                                                  ref_alpha, wrong=True))
    print(f"LookbehindSAM alpha={alpha}: max diff {diff:.2e}, wrong variant {wrong:.2e}")
    assert diff < TOL
    assert wrong > MISS
    if alpha == "adaptive":
        assert len(opt.last_alphas) == 4 and all(0.0 <= a <= 1.0 for a in opt.last_alphas)
    assert opt.num_evals == 2 * STEPS


# ----------------------------------------------------------------------------- GraphSAM
def _graphsam_reference(model, batches, rho, beta, period, fresh=False):
    """GraphSAM.py's loop with the paper's global-norm perturbation eps = rho g_h/||g_h||
    (adaptive off, no radius clip): re-anchor g_h to the gradient every `period` steps,
    else g_h <- beta g_h + (1 - beta) g_s/||g_s|| with g_s the previous step's update
    gradient. fresh=True: the invented variant (a fresh gradient feeds the average at
    every step, 2 evaluations per step)."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, **SGD_KW)
    gh, gs, trace, evals = None, None, [], 0
    for t in range(STEPS):
        if t % period == 0 or fresh:
            _backward(model, batches[t])
            evals += 1
        with torch.no_grad():
            if t % period == 0 or fresh:
                g = [p.grad.clone() for p in params]
                if t % period == 0:
                    gh = g
                else:
                    n = _global_norm(g) + 1e-12
                    nh = _global_norm(gh) + 1e-12
                    gh = [beta * h / nh + (1 - beta) * x / n for h, x in zip(gh, g)]
            else:
                n = _global_norm(gs) + 1e-12
                gh = [beta * h + (1 - beta) * s / n for h, s in zip(gh, gs)]
            scale = rho / (_global_norm(gh) + 1e-12)
            backup = _snap(params)
            for p, h in zip(params, gh):
                p.add_(h * scale)
        _backward(model, batches[t])
        evals += 1
        with torch.no_grad():
            gs = [p.grad.clone() for p in params]
            for p, b in zip(params, backup):
                p.copy_(b)
        sgd.step()
        trace.append(_snap(params))
    return trace, evals


def test_gsam_equals_published_graphsam():
    rho, beta, period = 0.05, 0.9, 6
    model, batches = _setup(2)
    ref_model = copy.deepcopy(model)
    opt = GSAM(model.parameters(), rho=rho, beta=beta, period=period, **SGD_KW)
    ours = _run_ours(opt, model, batches, lambda: _snap(model.parameters()))
    ref, evals = _graphsam_reference(copy.deepcopy(ref_model), batches, rho, beta, period)
    diff = _max_diff(ours, ref)
    wrong = _max_diff(ours, _graphsam_reference(copy.deepcopy(ref_model), batches, rho, beta,
                                                period, fresh=True)[0])
    print(f"GSAM: max diff {diff:.2e}, fresh-g0 variant {wrong:.2e}")
    assert diff < TOL
    assert wrong > MISS
    assert opt.num_evals == evals == STEPS + math.ceil(STEPS / period)


# ----------------------------------------------------------------------------- CR-SAM
def _crsam_reference(model, batches, rho, gamma, beta):
    """crsam.py's first/second/third_step around torch SGD."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, **SGD_KW)
    trace = []
    for t in range(STEPS):
        _backward(model, batches[t])
        with torch.no_grad():
            scale = rho / (_global_norm([p.grad for p in params]) + 1e-12)
            orig = [p.grad.clone() for p in params]
            e_w = [p.grad * scale for p in params]
            for p, e in zip(params, e_w):
                p.add_(e)
        _backward(model, batches[t])
        with torch.no_grad():
            worst = [p.grad.clone() for p in params]
            for p, e in zip(params, e_w):
                p.sub_(e * 2.0)
        _backward(model, batches[t])
        with torch.no_grad():
            best = [p.grad.clone() for p in params]
            for p, e in zip(params, e_w):
                p.add_(e)
            for p, w, b, o in zip(params, worst, best, orig):
                p.grad = w + gamma * (w + b - 2 * o) + beta * (w - b)
        sgd.step()
        trace.append(_snap(params))
    return trace


def test_crsam_equals_published():
    model, batches = _setup(3)
    ref_model = copy.deepcopy(model)
    opt = CRSAM(model.parameters(), **SGD_KW)  # the defaults: rho 0.1, gamma 0.1, beta 0.01
    assert (opt.defaults["rho"], opt.defaults["gamma"], opt.defaults["beta"]) == (0.1, 0.1, 0.01)
    ours = _run_ours(opt, model, batches, lambda: _snap(model.parameters()))
    diff = _max_diff(ours, _crsam_reference(copy.deepcopy(ref_model), batches, 0.1, 0.1, 0.01))
    wrong = _max_diff(ours, _crsam_reference(copy.deepcopy(ref_model), batches, 0.1, 0.1, 0.0))
    print(f"CRSAM: max diff {diff:.2e}, beta dropped {wrong:.2e}")
    assert diff < TOL
    assert wrong > MISS
    assert opt.num_evals == 3 * STEPS


# ----------------------------------------------------------------------------- mixed dtypes
class _Mixed(torch.nn.Module):
    """A float32 layer and a bfloat16 layer: two (device, dtype) buckets."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 8)
        self.b = torch.nn.Linear(8, 3).to(torch.bfloat16)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).to(torch.bfloat16)).float()


@pytest.mark.parametrize("cls,kw", [(GSAM, dict(period=3)), (CRSAM, {}), (LookbehindSAM, dict(k=2)),
                                    (LookbehindSAM, dict(k=2, alpha="adaptive"))])
def test_mixed_fp32_bf16_auto_matches_reference(cls, kw):
    """backend="auto" (fused CPU ops, one call per (device, dtype) bucket, norms summed
    over the buckets) equals the reference backend on a float32 + bfloat16 model."""
    torch.manual_seed(0)
    m1 = _Mixed()
    m2 = copy.deepcopy(m1)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    runs = []
    for m, backend in ((m1, "auto"), (m2, "reference")):
        opt = cls(m.parameters(), backend=backend, **SGD_KW, **kw)
        losses = [float(opt.step(lambda: _backward(m, (x, y))).detach()) for _ in range(6)]
        assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)
        runs.append(opt)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-2, atol=1e-3)


def test_gsam_global_norm_spans_dtype_buckets():
    """The perturbation of the non-anchor step is rho g_h/||g_h|| with ||g_h|| over both the
    float32 and the bfloat16 bucket: the params hold w + rho g_h/||g_h|| in the probe."""
    torch.manual_seed(0)
    m = _Mixed()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt = GSAM(m.parameters(), rho=0.05, period=10, **SGD_KW)
    opt.step(lambda: _backward(m, (x, y)))          # anchor step
    params = list(m.parameters())
    w = [opt.state[p]["master"].clone() if p.dtype == torch.bfloat16 else p.detach().clone()
         for p in params]
    gh = [opt.state[p]["v"].clone() for p in params]
    n = math.sqrt(sum(float((h.double() ** 2).sum()) for h in gh))
    for probe in opt.probes():
        for p, wi, h in zip(params, w, gh):
            expect = (wi.double() + 0.05 * h.double() / n).to(p.dtype)
            tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(p.detach(), expect, rtol=tol, atol=tol * 1e-3)
        _backward(m, (x, y))
    assert opt.num_evals == 3
