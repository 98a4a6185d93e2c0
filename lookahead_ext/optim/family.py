"""The CMLR family (cmlr.txt): each member is a Scheme, a Direction and a Lookahead flag on ProbeOptimizer."""
from __future__ import annotations

from .family_optimizer import ProbeOptimizer
from .scheme import CENTRAL, CENTRAL_BASE, FORWARD, GRAD, LAGGED, MOMENTUM

_NO_CYCLE = dict(k=1, alpha=1.0)


class CMLR(ProbeOptimizer):
    r"""Central-difference Momentum Lookahead Regularization (cmlr.txt, Algorithm 1).

    Each ``step(closure)`` is one inner step k of a K-step cycle:

    .. math::
        v_0 &= g_0 = \nabla L(w_{t,0})                                  &\text{(line 4)}\\
        \hat v_k &= v_k / \|v_k\|                                        &\text{(line 6)}\\
        g_k^\pm &= \nabla L(w_{t,k} \pm \rho \hat v_k)                  &\text{(lines 9-10)}\\
        d_k &= \tfrac{\rho+\lambda}{2\rho} g_k^+ + \tfrac{\rho-\lambda}{2\rho} g_k^-
                                                                         &\text{(eq. 9, line 12)}\\
        w_{t,k+1} &= \mathcal{A}(w_{t,k}, \eta, d_k)                    &\text{(line 13)}\\
        v_{k+1} &= \beta_k \hat v_k + (1-\beta_k)\big(\gamma \tfrac{g_k^+}{\|g_k^+\|}
                   + (1-\gamma)\tfrac{g_k^-}{\|g_k^-\|}\big),\;
                   \beta_k = \beta_s + (\beta_e-\beta_s)\tfrac{k}{K-1}  &\text{(eq. 115, lines 15-16)}\\
        w_{t+1} &= w_t + \alpha (w_{t,K} - w_t),\; w_{t+1,0} = w_{t+1}  &\text{(lines 18, 2)}

    with norms over all parameters of all groups, :math:`\mathcal{A}` the SGD or AdamW
    step of torch.optim, and gamma = 1/2 giving eq. 10. 2K+1 evaluations per cycle
    (``init_v="grad"``; 2K with ``"carry"``, which keeps v across cycles). The base
    optimizer's state is kept across cycles (``reset_base_state=True`` clears it). Line 3
    uses one mini-batch for the K inner steps: feed the same batch while
    ``cycle_position`` runs 0..K-1 to follow it literally. Defaults are the paper's.

    Args:
        params: parameters or param-group dicts.
        lr, base, momentum, dampening, nesterov, weight_decay, betas, eps: the base step
            :math:`\mathcal{A}` (torch.optim.SGD / AdamW semantics; see ProbeOptimizer).
            Defaults: 1e-3, "sgd", 0, 0, False, None (torch's), (0.9, 0.999), 1e-8.
        rho: perturbation radius rho. Default: 0.05.
        lam: regularisation strength lambda. Default: 0.1.
        k: inner steps K per cycle. Default: 10.
        alpha: slow-weight step alpha. Default: 0.9.
        beta_start, beta_end: beta_s, beta_e. Defaults: 0.9, 0.99.
        gamma: weight of g+ in the v update. Default: 0.5.
        init_v: "grad" (v_0 = g_0 each cycle) or "carry". Default: "grad".
        norm_eps: ||x|| + norm_eps in every norm. Default: 1e-12.
        backend: fused-op backend. Default: "auto".
        reset_base_state: clear the base state at each sync. Default: False.
        track_cosine: record cos(d_k, d_{k-1}). Default: False.
    """

    scheme, direction, lookahead = CENTRAL, MOMENTUM, True


class FMLR(ProbeOptimizer):
    r"""Forward-difference Momentum Lookahead Regularization.

    FR's two probes (eq. 6) with CMLR's momentum direction inside Lookahead:

    .. math::
        g_0 = \nabla L(w),\; g^+ = \nabla L(w + \rho \hat v),\;
        d = (1 - \tfrac{\lambda}{\rho}) g_0 + \tfrac{\lambda}{\rho} g^+          \quad\text{(eq. 6)}\\
        v \leftarrow \beta_k \hat v + (1-\beta_k)\big(\gamma \tfrac{g^+}{\|g^+\|}
                     + (1-\gamma) \tfrac{g_0}{\|g_0\|}\big)                        \quad\text{(eq. 115, g_0 for g^-)}

    The paper gives no algorithm for FMLR; this is our reading: the forward-difference
    analogue of eq. 10 (v_0 = g_0 is the k = 0 probe at w itself, so no extra
    evaluation). 2K evaluations per cycle (Table 8). Then the Lookahead step (line 18).

    Args:
        params: parameters or param-group dicts.
        lr, base, momentum, dampening, nesterov, weight_decay, betas, eps: the base step
            (see CMLR). Defaults: 1e-3, "sgd", 0, 0, False, None, (0.9, 0.999), 1e-8.
        rho, lam: radius and regularisation strength. Defaults: 0.05, 0.1.
        k, alpha: cycle length K and slow-weight step. Defaults: 10, 0.9.
        beta_start, beta_end, gamma: the v update. Defaults: 0.9, 0.99, 0.5.
        init_v: "grad" or "carry" (v_0 = g_0 every cycle or carried). Default: "grad".
        anchor: ``"g0"``: every inner step probes w and w + rho v_hat (Table 8's 2K);
            ``"g+"``: the text's reading (cmlr.txt, lines 286-301: "d_k = g_k^+ (k >= 1) in
            FMLR"): from k = 1 on the anchor is g+ itself, so d = g+ and v is updated from
            g+ alone (ML-SAM); k = 0 keeps the probe at w (v_0 = g_0). K+1 evaluations per
            cycle. Default: ``"g0"``.
        norm_eps, backend, reset_base_state, track_cosine, beta_schedule, total_steps: as
            for CMLR.
    """

    scheme, direction, lookahead = FORWARD, MOMENTUM, True

    def __init__(self, params, lr: float = 1e-3, anchor: str = "g0", **kw):
        if anchor not in ("g0", "g+"):
            raise ValueError(f"anchor must be 'g0' or 'g+', got {anchor!r}")
        super().__init__(params, lr=lr, **kw)
        self.defaults["anchor"] = anchor
        for g in self.param_groups:
            g.setdefault("anchor", anchor)

    def evals_per_update(self) -> int:
        if self.param_groups[0].get("anchor") == "g+":
            return self._glob("k") + 1
        return super().evals_per_update()


class MLSAM(FMLR):
    r"""Momentum Lookahead SAM: FMLR with lambda = rho in every param group (also for a
    per-group or scheduled rho), so :math:`d = g^+ = \nabla L(w + \rho \hat v)` (eq. 6 with
    lambda = rho; the anchor g_0 only feeds the v update). 2K evaluations per cycle.

    Args:
        params: parameters or param-group dicts.
        lr: base-step learning rate. Default: 1e-3.
        rho: perturbation radius (lambda follows it). Default: 0.05.
        **kw: base, momentum, dampening, nesterov, weight_decay, betas, eps, k, alpha,
            beta_start, beta_end, gamma, init_v, norm_eps, backend, reset_base_state,
            track_cosine: as for FMLR. ``lam`` is not accepted.
    """

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.05, **kw):
        if "lam" in kw:
            raise TypeError("MLSAM fixes lam = rho; use FMLR for another lam")
        super().__init__(params, lr=lr, rho=rho, lam=rho, **kw)

    def _lam(self, group: dict) -> float:
        return group["rho"]  # lam = rho in every group, also for a per-group or scheduled rho


class CLR(ProbeOptimizer):
    r"""Central-difference Lookahead Regularization: CR (eq. 8) with a fresh gradient
    direction every inner step, inside Lookahead:

    .. math::
        g_0 = \nabla L(w),\; g^\pm = \nabla L(w \pm \rho g_0/\|g_0\|),\;
        d = g_0 + \tfrac{\lambda}{2\rho}(g^+ - g^-)                   \quad\text{(eq. 8)}

    then the base step and, every K steps, the Lookahead step (line 18). 3K evaluations
    per cycle (Table 7: "computes all three gradients per inner-loop step").

    Args:
        params: parameters or param-group dicts.
        lr, base, momentum, dampening, nesterov, weight_decay, betas, eps: the base step
            (see CMLR).
        rho, lam: radius and regularisation strength. Defaults: 0.05, 0.1.
        k, alpha: cycle length K and slow-weight step. Defaults: 10, 0.9.
        norm_eps, backend, reset_base_state, track_cosine: as for CMLR.
        beta_start, beta_end, gamma, init_v: accepted, unused (no carried v).
    """

    scheme, direction, lookahead = CENTRAL_BASE, GRAD, True


class LR(ProbeOptimizer):
    r"""Lookahead Regularization: FR inside Lookahead. Each inner step takes FR's
    d = (1 - λ/ρ) g_0 + λ/ρ ∇L(w + ρ g_0/‖g_0‖) (eq. 6) into the base step; every K
    steps the Lookahead step φ ← φ + α(w − φ), w ← φ (Algorithm 1, line 18). 2K
    evaluations per cycle.

    Args:
        params: parameters or param-group dicts.
        rho: perturbation radius rho. Default: 0.05.
        lam: weight lambda of the finite difference in eq. 6. Default: 0.1.
        k: inner steps K per cycle. Default: 10.
        alpha: slow-weight step alpha. Default: 0.9.
        lr, base, momentum, dampening, nesterov, weight_decay, betas, eps, norm_eps, backend, reset_base_state, track_cosine: as for CMLR.
        beta_start, beta_end, gamma, init_v: accepted, unused (no carried v).
    """

    scheme, direction, lookahead = FORWARD, GRAD, True


class FR(ProbeOptimizer):
    r"""Forward-difference gradient regularization (eq. 6), no Lookahead:

    .. math::
        d = (1 - \tfrac{\lambda}{\rho}) \nabla L(w)
            + \tfrac{\lambda}{\rho} \nabla L(w + \rho g/\|g\|),\; g = \nabla L(w)   \quad\text{(eq. 6)}

    then the base step. lambda = rho is SAM. 2 evaluations per step.

    Args:
        params: parameters or param-group dicts.
        lr, base, momentum, dampening, nesterov, weight_decay, betas, eps: the base step
            (see CMLR).
        rho, lam: radius and regularisation strength. Defaults: 0.05, 0.1.
        norm_eps, backend, track_cosine: as for CMLR.
        beta_start, beta_end, gamma, init_v, reset_base_state: accepted, unused.
        k, alpha: not accepted (no Lookahead cycle).
    """

    scheme, direction, lookahead = FORWARD, GRAD, False

    def __init__(self, params, lr: float = 1e-3, **kw):
        for key in ("k", "alpha"):
            if key in kw:
                raise TypeError(f"{type(self).__name__} has no lookahead cycle ({key!r})")
        super().__init__(params, lr=lr, **_NO_CYCLE, **kw)


class SAM(FR):
    r"""Sharpness-Aware Minimization (eq. 2):

    .. math::
        d = \nabla L(w + \hat\varepsilon),\quad
        \hat\varepsilon = \rho \frac{\nabla L(w)}{\|\nabla L(w)\|}          \quad\text{(eq. 2)}

    then the base step: FR with lambda = rho in every param group, so the coefficient of
    grad L(w) in d is exactly 0. 2 evaluations per step.

    Args:
        params: parameters or param-group dicts.
        lr: base-step learning rate. Default: 1e-3.
        rho: perturbation radius. Default: 0.05.
        **kw: base, momentum, dampening, nesterov, weight_decay, betas, eps, norm_eps,
            backend, track_cosine: as for FR. ``lam``, ``k`` and ``alpha`` are not accepted.
    """

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.05, **kw):
        if "lam" in kw:
            raise TypeError("SAM has no lam (it is FR with lam = rho)")
        super().__init__(params, lr=lr, rho=rho, lam=rho, **kw)

    def _lam(self, group: dict) -> float:
        return group["rho"]  # lam = rho in every group: d = g+ exactly (coefficient 0 on g0)


class CR(FR):
    r"""Central-difference gradient regularization at Table 8's cost of 2 evaluations.

    .. math::
        g^\pm = \nabla L(w \pm \rho \hat v),\;
        d = \tfrac{\rho+\lambda}{2\rho} g^+ + \tfrac{\rho-\lambda}{2\rho} g^-    \quad\text{(eq. 9)}\\
        v \leftarrow \gamma \tfrac{g^+}{\|g^+\|} + (1-\gamma)\tfrac{g^-}{\|g^-\|}
                                                                 \quad\text{(eq. 10 with } \beta = 0)

    Eq. 8 needs grad L(w) for both the direction and the anchor (3 evaluations); Table 8
    gives CR 2, so CR takes eq. 9's anchor (g+ + g-)/2 and the direction v of the
    *previous* step. Only the very first step evaluates grad L(w) to start v (3 then).

    Args:
        params: parameters or param-group dicts.
        lr, base, momentum, dampening, nesterov, weight_decay, betas, eps: the base step
            (see CMLR).
        rho, lam: radius and regularisation strength. Defaults: 0.05, 0.1.
        gamma: weight of g+ in v. Default: 0.5.
        norm_eps, backend, track_cosine: as for CMLR.
        beta_start, beta_end, init_v, reset_base_state: accepted, unused.
        k, alpha: not accepted (no Lookahead cycle).
    """

    scheme, direction, lookahead = CENTRAL, LAGGED, False
