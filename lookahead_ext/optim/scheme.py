"""Probe schemes and perturbation directions of the CMLR family, as values (cmlr.txt eqs. 2-10, 115)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

PROBE_NAMES = ("g0", "g+", "g-")  # the slots of ops.combine_step_'s grads/coefs and v_coefs[1:]


@dataclass(frozen=True)
class Scheme:
    """Which gradients an inner step probes and how they combine into the direction d.

    Args:
        name: short name (shown in reprs and errors).
        probes: the probes the scheme needs, in evaluation order, from ("g0", "g+", "g-"):
            g0 = grad L(w), g+ = grad L(w + rho v_hat), g- = grad L(w - rho v_hat).
        d: ``d(rho, lam) -> (c0, c+, c-)``: d = c0 g0 + c+ g+ + c- g-.
        v_terms: the two probes whose normalised gradients enter the momentum update of
            eq. 115, weighted gamma and 1 - gamma (used by carried directions only).
        equation: where the paper states d.
    """

    name: str
    probes: tuple
    d: Callable[[float, float], tuple]
    v_terms: tuple
    equation: str

    def __post_init__(self):
        for n in self.probes + self.v_terms:
            if n not in PROBE_NAMES:
                raise ValueError(f"unknown probe {n!r}; probes are {PROBE_NAMES}")
        if not set(self.v_terms) <= set(self.probes) or len(self.v_terms) != 2:
            raise ValueError("v_terms must be two of the scheme's probes")

    @property
    def evals(self) -> int:
        """Gradient evaluations of one inner step (Table 8), the direction's g0 aside."""
        return len(self.probes)

    def coefs(self, rho: float, lam: float) -> tuple:
        """(c0, c+, c-) of d for a group's rho and lam."""
        return self.d(rho, lam)

    def coef_dict(self, rho: float, lam: float) -> dict:
        """{probe name: coefficient} over the scheme's probes."""
        return {n: c for n, c in zip(PROBE_NAMES, self.coefs(rho, lam)) if n in self.probes}

    def v_coefs(self, bv, a_first, a_other, zero) -> tuple:
        """ops.combine_step_'s v_coefs (bv, a0, a+, a-): ``a_first`` on v_terms[0],
        ``a_other`` on v_terms[1], ``zero`` on the slot no term uses."""
        slot = {self.v_terms[0]: a_first, self.v_terms[1]: a_other}
        return (bv,) + tuple(slot.get(n, zero) for n in PROBE_NAMES)


def _forward(rho, lam):   # eq. 6
    return (1.0 - lam / rho, lam / rho, 0.0)


def _central(rho, lam):   # eq. 9
    return (0.0, (rho + lam) / (2 * rho), (rho - lam) / (2 * rho))


def _central_base(rho, lam):  # eq. 8
    return (1.0, lam / (2 * rho), -lam / (2 * rho))


#: d = (1 - lam/rho) g0 + lam/rho g+ (eq. 6); FMLR's v update averages g+ and g0 (our reading).
FORWARD = Scheme("forward", ("g0", "g+"), _forward, ("g+", "g0"), "eq. 6")
#: d = (rho+lam)/2rho g+ + (rho-lam)/2rho g- (eq. 9); v from g+ and g- (eq. 115).
CENTRAL = Scheme("central", ("g+", "g-"), _central, ("g+", "g-"), "eq. 9")
#: d = g0 + lam/2rho (g+ - g-) (eq. 8).
CENTRAL_BASE = Scheme("central_base", ("g0", "g+", "g-"), _central_base, ("g+", "g-"), "eq. 8")
SCHEMES = {s.name: s for s in (FORWARD, CENTRAL, CENTRAL_BASE)}


@dataclass(frozen=True)
class Direction:
    """Where the unit perturbation v_hat of an inner step comes from.

    Args:
        name: short name.
        carried: v is a state vector carried across steps and updated by eq. 115 (else
            v = g0, a fresh gradient at w, every step).
        beta: a fixed beta of the v update (``"lagged"``: 0); None = the beta_k schedule of
            Algorithm 1, line 15.
        restarts: with ``init_v="grad"``, v restarts at g0 at the start of every cycle
            (Algorithm 1, line 4).
    """

    name: str
    carried: bool
    beta: Optional[float] = None
    restarts: bool = False


#: v = g0 = grad L(w), fresh every step (SAM, FR, LR, CLR).
GRAD = Direction("grad", carried=False)
#: the momentum v of eqs. 10/115, carried across steps (CMLR, FMLR, ML-SAM).
MOMENTUM = Direction("momentum", carried=True, restarts=True)
#: v from the previous step's probes with beta = 0 (CR at Table 8's cost).
LAGGED = Direction("lagged", carried=True, beta=0.0)
DIRECTIONS = {d.name: d for d in (GRAD, MOMENTUM, LAGGED)}


def scheme_of(x: Union[Scheme, str]) -> Scheme:
    """A Scheme, or the Scheme of that name ("forward", "central", "central_base")."""
    if isinstance(x, Scheme):
        return x
    if x not in SCHEMES:
        raise ValueError(f"unknown scheme {x!r}; expected a Scheme or one of {tuple(SCHEMES)}")
    return SCHEMES[x]


def direction_of(x: Union[Direction, str]) -> Direction:
    """A Direction, or the Direction of that name ("grad", "momentum", "lagged")."""
    if isinstance(x, Direction):
        return x
    if x not in DIRECTIONS:
        raise ValueError(f"unknown direction {x!r}; expected a Direction or one of "
                         f"{tuple(DIRECTIONS)}")
    return DIRECTIONS[x]
