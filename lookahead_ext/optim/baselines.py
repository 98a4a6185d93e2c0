"""The CMLR paper's baselines as their authors published them: Lookbehind-SAM, GraphSAM (GSAM), CR-SAM."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops
from ..ops.reference import _up
from ._buckets import state_dtype
from ._grad_mode import no_grad as _no_grad
from .engine import ProbeOptimizer
from .validation import CRSAM_RULES, GSAM_RULES, check_values

__all__ = ["LookbehindSAM", "GSAM", "CRSAM"]

_COS_EPS = 1e-8  # torch.nn.CosineSimilarity's eps, which the Lookbehind code uses for alpha


def _axpy_(dst, src, scale) -> None:
    """dst += scale * src (scale a float or a 0-d tensor; src upcast to dst's dtype)."""
    torch._foreach_add_(dst, torch._foreach_mul(_up(src, dst[0].dtype), scale))


def _no_keys(cls, kw, keys) -> None:
    for key in keys:
        if key in kw:
            raise TypeError(f"{cls.__name__} has no {key!r}")


def _device_coefs(like, *coefs):
    """The combine_step_ v coefficients as 0-d tensors when ``like`` is one (CUDA: no host
    sync), else floats."""
    if isinstance(like, Tensor):
        return tuple(c if isinstance(c, Tensor) else torch.full_like(like, c) for c in coefs)
    return coefs


class LookbehindSAM(ProbeOptimizer):
    r"""Lookbehind-SAM: K ascent steps back, one interpolated step forward.

    Each ``step(closure)`` is one inner step k of a K-step cycle. Three sets of weights:
    the slow weights :math:`\phi`, the fast weights :math:`w` (the model's parameters
    between steps) and the ascent point :math:`\phi'` (optimizer state). At k = 0,
    :math:`\phi' = w = \phi`; then, per inner step,

    .. math::
        g_a &= \nabla L(\phi')                                       && \text{(ascent gradient)} \\
        \phi' &\leftarrow \phi' + \rho\, g_a / (\lVert g_a \rVert + \epsilon) && \text{(the ascent accumulates)} \\
        w &\leftarrow \mathrm{base\_step}(w, \nabla L(\phi'))           && \text{(descent gradient, applied to } w)

    and after the K-th step :math:`\phi \leftarrow \alpha w + (1 - \alpha) \phi`,
    :math:`w \leftarrow \phi`. 2 evaluations per inner step, 2K per cycle (Table 8). Norms
    are global over all parameters. The base optimizer (SGD momentum / AdamW state) carries
    across cycles, as the authors' wrapped ``torch.optim`` optimizer does.

    Adaptive alpha (``alpha="adaptive"``, the authors' ``--alpha -1``): per parameter tensor,
    :math:`\alpha = (\cos(w_1 - \phi, w_K - \phi) + 1) / 2`, with :math:`w_1` the fast weights
    after the cycle's first descent step and the cosine of torch.nn.CosineSimilarity
    (eps 1e-8). The alphas of the last sync are in ``last_alphas``.

    Reference: G. Mordido, P. Malviya, A. Baratin, S. Chandar, "Lookbehind-SAM: k steps
    back, 1 step forward", ICML 2024; code chandar-lab/Lookbehind-SAM (``lookbehind.py``,
    ``Lookbehind_SAM``; README for the adaptive alpha). Where the code and this class
    differ: none in the update; the code evaluates :math:`\nabla L(\phi')` twice at the
    same point across consecutive inner steps (descent of step k, ascent of step k+1) and
    so do we (the closure may draw a new batch in between); its ascent norm adds 1e-16,
    ours ``norm_eps`` (1e-12).

    Args:
        params: parameters or param groups.
        lr: learning rate of the base optimizer.
        rho: ascent step size (per param group).
        k: inner steps per cycle K (default 5, the CMLR paper's best for Lookbehind-SAM).
        alpha: interpolation factor in (0, 1], or ``"adaptive"`` (or -1, the authors'
            spelling). Default 0.5 (the paper uses {0.2, 0.5, 0.8}).
        **kw: base-optimizer keywords of :class:`ProbeOptimizer` (base, momentum,
            weight_decay, betas, eps, nesterov, dampening, norm_eps, backend, ...).
    """

    direction, scheme, lookahead = "grad", "forward", True

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.05, k: int = 5,
                 alpha=0.5, **kw):
        _no_keys(type(self), kw, ("lam",))
        adaptive = alpha == "adaptive" or (not isinstance(alpha, str) and alpha == -1)
        super().__init__(params, lr=lr, rho=rho, lam=rho, k=k, alpha=0.5 if adaptive else alpha, **kw)
        self.defaults["adaptive_alpha"] = adaptive
        for g in self.param_groups:
            g.setdefault("adaptive_alpha", adaptive)
        self.last_alphas: list[float] = []

    def _ascent(self, b, k: int) -> list[Tensor]:
        """phi' of each parameter at the start of this step: w at k = 0 (the cycle starts at
        phi' = w = phi) or for a parameter that joins mid-cycle, else the state's (read only:
        the state changes only when the step is applied, see _probe_and_commit)."""
        w = b.masters if b.synced else b.params
        out = []
        for p, wp in zip(b.params, w):
            a = self.state[p].get("ascent") if (k and p in self.state) else None
            out.append(a if a is not None else
                       wp.detach().to(state_dtype(p.dtype)).clone(memory_format=torch.contiguous_format))
        return out

    def _offsets(self, buckets, ascent) -> list:
        """(phi' - w) / rho per bucket: _probe puts the params at w + rho * offset = phi'."""
        out = []
        for b, a in zip(buckets, ascent):
            if not b.params:
                out.append([])
                continue
            w = b.masters if b.synced else b.params
            d = torch._foreach_sub(a, _up(w, a[0].dtype))
            torch._foreach_div_(d, b.group["rho"])
            out.append(d)
        return out

    def _probe_and_commit(self, buckets):
        k = self._engine["k"]
        with _no_grad():
            ascent = [self._ascent(b, k) for b in buckets]
            off = self._offsets(buckets, ascent)
        ga = yield from self._probe(buckets, 0, "g0", off, +1.0, 1.0)
        with _no_grad():
            inv = self._probe_inv("g0")
            ascent = [torch._foreach_mul(a, 1.0) if a else a for a in ascent]  # new tensors: a skip
            for a, b, g in zip(ascent, buckets, self._dense(buckets, ga)):  # leaves the state
                if a:
                    _axpy_(a, g, inv * b.group["rho"])
            off = self._offsets(buckets, ascent)
        gd = yield from self._probe(buckets, 1, "g+", off, +1.0, 1.0)
        with _no_grad():
            kept, filled = self._gather(buckets, {"g0": ga, "g+": gd})
            for a, b in zip(ascent, buckets):  # the step is applied: phi' joins the state
                for p, ap in zip(b.params, a):
                    self.state[p]["ascent"] = ap
            backend = self._backend()
            for b, g in zip(kept, filled["g+"]):
                self._base_step(b, (None, g, None), (0.0, 1.0, 0.0), None, None, backend)
                if k == 0 and self._glob("adaptive_alpha"):  # w_1, for the adaptive alpha
                    for p, w in zip(b.params, b.masters if b.low_precision else b.params):
                        self._state_buffer(p, "first").copy_(w)
            self._finish(buckets, k)

    def _sync_buckets(self, buckets) -> None:
        if not self._glob("adaptive_alpha"):
            return super()._sync_buckets(buckets)
        backend, alphas = self._backend(), []
        for b in buckets:
            if not b.params:
                continue
            fast = b.masters if b.low_precision else b.params
            slow = [self._slow[p] for p in b.params]
            first = [self.state[p].get("first", f) for p, f in zip(b.params, fast)]
            x, y = torch._foreach_sub(first, slow), torch._foreach_sub(fast, slow)
            dots = ops.multi_dot([x, y], [(0, 1), (0, 0), (1, 1)], per_tensor=True, backend=backend)
            for i, (xy, xx, yy) in enumerate(zip(*dots.tolist())):
                cos = xy / (max(math.sqrt(xx), _COS_EPS) * max(math.sqrt(yy), _COS_EPS))
                a = (cos + 1.0) / 2.0
                alphas.append(a)
                ops.lookahead_sync_([slow[i]], [fast[i]], a,
                                    params=[b.params[i]] if b.low_precision else None, backend=backend)
        self.last_alphas = alphas
        super()._sync_buckets([])  # the cycle bookkeeping only


class GSAM(ProbeOptimizer):
    r"""GraphSAM: SAM whose perturbation is a moving average of past update gradients.

    The perturbation direction :math:`g_h` is re-anchored to a fresh gradient every
    ``period`` steps and otherwise built from the *previous step's* update gradient
    :math:`g_s` (the gradient at the perturbed point), so most steps cost one evaluation:

    .. math::
        g_h &\leftarrow \nabla L(w) && \text{if } t \bmod \mathrm{period} = 0 \text{ (1 extra evaluation)} \\
        g_s &= \nabla L(w + \rho\, g_h / \lVert g_h \rVert)                  && \text{(1 evaluation)} \\
        w &\leftarrow \mathrm{base\_step}(w, g_s) \\
        g_h &\leftarrow \beta\, g_h + (1 - \beta)\, g_s / \lVert g_s \rVert   && \text{(for step } t + 1)

    with t the number of applied steps and global norms over all parameters (the paper's
    perturbation). period + 1 evaluations per ``period`` steps. The anchor is the raw
    gradient, as in the released code. GraphSAM's rho schedule
    (:math:`\rho \leftarrow \rho\, \gamma^{\mathrm{epoch}/\lambda}`) is not built in: set
    ``param_groups[i]["rho"]`` between steps.

    Reference: Y. Wang, K. Zhou, N. Liu, Y. Wang, X. Wang, "Efficient Sharpness-Aware
    Minimization for Molecular Graph Transformer Models", ICLR 2024; code YL-wang/GraphSAM
    (``GraphSAM.py``). Quirks of the released code, not offered as options (see
    docs/baselines.md): ``adaptive=True`` by default (ASAM's |w|-scaled perturbation,
    which the paper does not use), and a per-tensor clip of the perturbation to ``radius``
    which, because the code divides by the norm of the zeroed gradient (1e-12 on torch 1.x;
    torch 2 raises), sets every tensor's perturbation to norm ``radius`` on the non-anchor
    steps; its moving average also normalises g_s per tensor. The CMLR paper's Table 8 row
    "GSAM (multi-step), 2K evaluations" cannot be this algorithm (about 1 per step).

    Args:
        params: parameters or param groups.
        lr: learning rate of the base optimizer.
        rho: perturbation radius (per param group; README example 0.05).
        beta: smoothing of the moving average (README example 0.99).
        period: re-anchor period in steps (the authors re-anchor at each epoch's first step).
        **kw: base-optimizer keywords of :class:`ProbeOptimizer`.
    """

    direction, scheme, lookahead = "momentum", "forward", False
    _hyper_rules = GSAM_RULES

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.05, beta: float = 0.99,
                 period: int = 100, **kw):
        _no_keys(type(self), kw, ("lam", "k", "alpha", "beta_start", "beta_end", "gamma", "init_v"))
        check_values(dict(beta=beta, period=period), GSAM_RULES)
        super().__init__(params, lr=lr, rho=rho, lam=rho, k=1, alpha=1.0, **kw)
        self.defaults.update(beta=beta, period=period)
        for g in self.param_groups:
            g.setdefault("beta", beta)
            g.setdefault("period", period)

    def evals_per_update(self) -> float:
        """Mean evaluations per step: (period + 1) / period."""
        period = self._glob("period")
        return (period + 1) / period

    def _probe_and_commit(self, buckets):
        eng = self._engine
        anchor = not eng["v_ready"] or eng["steps"] % self._glob("period") == 0
        probes, idx = {}, 0
        if anchor:
            probes["g0"] = yield from self._probe(buckets, 0, "g0")
            idx = 1
        with _no_grad():
            gh = [[self._v(p) for p in b.params] for b in buckets]
            if anchor:
                for v, g in zip(gh, self._dense(buckets, probes["g0"])):
                    if v:
                        torch._foreach_copy_(v, g)
                inv = self._probe_inv("g0")
            else:
                inv = self._norm_inv(self._v_norm_sq(gh))
        probes["g+"] = yield from self._probe(buckets, idx, "g+", gh, +1.0, inv)
        with _no_grad():
            kept, filled = self._gather(buckets, probes)
            beta = self._glob("beta")
            a_s = (1.0 - beta) * self._probe_inv("g+")
            bv, zero = _device_coefs(a_s, beta, 0.0)
            v_sq, written, backend = self._v_sq_accumulator(kept), [], self._backend()
            for b, g in zip(kept, filled["g+"]):
                if not b.params:
                    continue
                v = [self._v(p) for p in b.params]
                written.extend(v)
                self._base_step(b, (None, g, None), (0.0, 1.0, 0.0), v, (bv, zero, a_s, zero),
                                backend, v_sq_out=v_sq)
            eng["v_ready"] = True
            if v_sq is not None:
                self._v_sq = (v_sq[0], [(t, t._version) for t in written])
            self._finish(buckets)


class CRSAM(ProbeOptimizer):
    r"""CR-SAM: SAM with a finite-difference curvature regulariser.

    One update, with :math:`\epsilon = \rho\, g_0 / (\lVert g_0 \rVert + \epsilon_n)` (global
    norm):

    .. math::
        g_0 = \nabla L(w),\quad g_+ = \nabla L(w + \epsilon),\quad g_- = \nabla L(w - \epsilon)
        \quad \text{(3 evaluations)} \\
        d = g_+ + \gamma\,(g_+ + g_- - 2 g_0) + \beta\,(g_+ - g_-),\qquad
        w \leftarrow \mathrm{base\_step}(w, d)

    :math:`\gamma (g_+ + g_- - 2g_0)` is the gradient of the second difference (the
    curvature term), :math:`\beta (g_+ - g_-)` the gradient of the first difference;
    gamma = beta = 0 is SAM. 3 evaluations per update (Table 8); g+ and g- could run in
    parallel.

    Reference: T. Wu, T. Luo, D. C. Wunsch II, "CR-SAM: Curvature Regularized
    Sharpness-Aware Minimization", AAAI 2024; code TrustAIoT/CR-SAM (``utils/crsam.py``,
    ``third_step``; defaults of ``crsam_train.py``: rho 0.1, gamma 0.1, beta 0.01; the
    class itself defaults to beta 0.1).

    Args:
        params: parameters or param groups.
        lr: learning rate of the base optimizer.
        rho: perturbation radius (default 0.1).
        gamma: weight of the curvature term (default 0.1; per param group).
        beta: weight of the first-difference term (default 0.01; per param group).
        **kw: base-optimizer keywords of :class:`ProbeOptimizer`.
    """

    direction, scheme, lookahead = "grad", "central_base", False
    _hyper_rules = CRSAM_RULES
    paired_probes = True  # g+ then g- with one direction: optim/paired.py may batch them

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.1, gamma: float = 0.1,
                 beta: float = 0.01, **kw):
        _no_keys(type(self), kw, ("k", "alpha", "lam", "curv"))
        check_values(dict(beta=beta), CRSAM_RULES)
        super().__init__(params, lr=lr, rho=rho, lam=rho, k=1, alpha=1.0, gamma=gamma, **kw)
        self.defaults["beta"] = beta
        for g in self.param_groups:
            g.setdefault("beta", beta)

    def evals_per_update(self) -> int:
        return 3

    def _probe_and_commit(self, buckets):
        g0 = yield from self._probe(buckets, 0, "g0")
        with _no_grad():
            direction = self._dense(buckets, g0)
            inv = self._probe_inv("g0")
        gp = yield from self._probe(buckets, 1, "g+", direction, +1.0, inv)
        gm = yield from self._probe(buckets, 2, "g-", direction, -1.0, inv)
        with _no_grad():
            kept, filled = self._gather(buckets, {"g0": g0, "g+": gp, "g-": gm})
            backend = self._backend()
            for bi, b in enumerate(kept):
                if not b.params:
                    continue
                gamma, beta = b.group["gamma"], b.group["beta"]
                grads = tuple(filled[n][bi] for n in ("g0", "g+", "g-"))
                self._base_step(b, grads, (-2.0 * gamma, 1.0 + gamma + beta, gamma - beta),
                                None, None, backend)
            self._finish(buckets)
