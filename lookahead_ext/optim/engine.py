"""Former home of the probe engine, kept so that ``from lookahead_ext.optim.engine import ProbeOptimizer`` still works."""
from .family_optimizer import ProbeOptimizer
from .runtime import Probe, ProbeRuntime
from .scheme import DIRECTIONS, SCHEMES

__all__ = ["ProbeOptimizer", "ProbeRuntime", "Probe", "SCHEMES", "DIRECTIONS"]
