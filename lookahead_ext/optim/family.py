"""The CMLR family (cmlr.txt): every member is the one engine with a different spec.

Forward/backward passes per update, as in Table 8 (counted by ``opt.num_evals``):

=========  ==========  ==========  =========  ==============================================
class      direction   scheme      lookahead  evals per update
=========  ==========  ==========  =========  ==============================================
SAM        grad        forward*    no         2            (*lam = rho: d = g+, eq. 2)
FR         grad        forward     no         2            (eq. 6)
CR         lagged      central     no         2            (eq. 9; 3 on the very first step)
LR         grad        forward     yes        2K per cycle
CLR        grad        cent._base  yes        3K per cycle (eq. 8, fresh direction each step)
FMLR       momentum    forward     yes        2K per cycle (v_0 = g_0 is the k = 0 probe at w)
MLSAM      momentum    forward*    yes        2K per cycle (*FMLR with lam = rho)
CMLR       momentum    central     yes        2K+1 per cycle (init_v="grad"), 2K ("carry")
=========  ==========  ==========  =========  ==============================================

Where the text and Table 8 disagree we make the table's cost true:

- CR: eq. 8 needs grad L(w) for both the direction and the anchor (3 evaluations). Table 8
  gives CR 2 evaluations, so CR uses eq. 9 (the anchor is (g+ + g-)/2, as in CMLR) and the
  direction v of the *previous* step, v = (g+/||g+|| + g-/||g-||)/2 (eq. 10 with beta = 0).
  Only the first step evaluates grad L(w) to start v.
- FMLR/ML-SAM: the paper gives no algorithm; we use FR's two probes (w and w + rho v_hat)
  with the CMLR momentum direction, v_0 = g_0 at k = 0 (the k = 0 probe at w itself, so no
  extra evaluation), and the momentum update of eq. 115 over the normalised g+ and g0
  (gamma weighs g+). 2 evaluations per inner step = 2K.
- CMLR: the "+1" of 2K+1 is line 4's g_0 = grad L(w_{t,0}) at the start of each cycle;
  with init_v="carry" v is carried across cycles instead (2K per cycle after the first).
- CLR: eq. 8 with a fresh g0 direction every inner step = 3K (Table 7: "computes all
  three gradients per inner-loop step without momentum").

SAM and ML-SAM tie lam to rho in every param group (also for a per-group or scheduled
rho), so their d is exactly g+.
"""
from __future__ import annotations

from .engine import ProbeOptimizer

_NO_CYCLE = dict(k=1, alpha=1.0)


class CMLR(ProbeOptimizer):
    """Central-difference Momentum Lookahead Regularization (Algorithm 1).

    Each ``step(closure)`` is one inner step k of a K-step cycle:

    1. (k = 0, ``init_v="grad"``) g0 = grad L(w), v = g0   (line 4; ``"carry"`` keeps v)
    2. v_hat = v / ||v||, the norm over all parameters of all groups          (line 6)
    3. g+ = grad L(w + rho v_hat), g- = grad L(w - rho v_hat)                  (lines 9-10)
    4. d = (rho+lam)/(2 rho) g+ + (rho-lam)/(2 rho) g-                          (eq. 9)
    5. w <- base optimizer step with d (torch.optim.SGD or AdamW semantics)    (line 13)
    6. v <- beta_k v_hat + (1-beta_k)(gamma g+/||g+|| + (1-gamma) g-/||g-||)   (eq. 115)
    7. after the K-th step: slow <- slow + alpha (fast - slow), fast <- slow   (line 18)

    The base optimizer's state is kept across cycles (``reset_base_state=True`` clears it).
    The data are the closure's: Algorithm 1 (line 3) uses one mini-batch for all K inner
    steps; feed the same batch while ``cycle_position`` runs 0..K-1 to follow it literally.
    Defaults are the paper's: rho = 0.05, lam = 0.1, K = 10, alpha = 0.9, beta 0.9 -> 0.99,
    gamma = 0.5.
    """

    direction, scheme, lookahead = "momentum", "central", True


class FMLR(ProbeOptimizer):
    """Forward-difference Momentum Lookahead Regularization (see module docstring).

    ``anchor="g0"`` (default): every inner step probes w and w + rho v_hat (Table 8's 2K).
    ``anchor="g+"``: the text's reading (cmlr.txt, lines 286-301: "d_k = g_k^+ (k >= 1) in
    FMLR"): from k = 1 on the anchor is g+ itself, so d = g+ and v is updated from g+ alone
    (ML-SAM); k = 0 keeps the probe at w (v_0 = g_0). K+1 evaluations per cycle.
    """

    direction, scheme, lookahead = "momentum", "forward", True

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
    """Momentum Lookahead SAM: FMLR with lam = rho, so d = g+ (the anchor vanishes)."""

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.05, **kw):
        if "lam" in kw:
            raise TypeError("MLSAM fixes lam = rho; use FMLR for another lam")
        super().__init__(params, lr=lr, rho=rho, lam=rho, **kw)

    def _lam(self, group: dict) -> float:
        return group["rho"]  # lam = rho in every group, also for a per-group or scheduled rho


class CLR(ProbeOptimizer):
    """Central-difference Lookahead Regularization: CR (eq. 8) with a fresh gradient
    direction each inner step, inside Lookahead. 3 evaluations per inner step."""

    direction, scheme, lookahead = "grad", "central_base", True


class LR(ProbeOptimizer):
    """Lookahead Regularization: FR (eq. 6) inside Lookahead."""

    direction, scheme, lookahead = "grad", "forward", True


class FR(ProbeOptimizer):
    """Forward-difference gradient regularization (eq. 6):
    d = (1 - lam/rho) grad L(w) + lam/rho grad L(w + rho g/||g||). lam = rho is SAM."""

    direction, scheme, lookahead = "grad", "forward", False

    def __init__(self, params, lr: float = 1e-3, **kw):
        for key in ("k", "alpha"):
            if key in kw:
                raise TypeError(f"{type(self).__name__} has no lookahead cycle ({key!r})")
        super().__init__(params, lr=lr, **_NO_CYCLE, **kw)


class SAM(FR):
    """Sharpness-Aware Minimization (eq. 2): d = grad L(w + rho g/||g||), g = grad L(w)."""

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.05, **kw):
        if "lam" in kw:
            raise TypeError("SAM has no lam (it is FR with lam = rho)")
        super().__init__(params, lr=lr, rho=rho, lam=rho, **kw)

    def _lam(self, group: dict) -> float:
        return group["rho"]  # lam = rho in every group: d = g+ exactly (coefficient 0 on g0)


class CR(FR):
    """Central-difference gradient regularization at Table 8's cost of 2 evaluations
    (see module docstring): d from eq. 9, direction from the previous step's probes."""

    direction, scheme, lookahead = "lagged", "central", False
