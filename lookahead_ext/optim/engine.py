"""Former home of the probe engine: the names other modules imported from it, re-exported."""
from .family_optimizer import ProbeOptimizer
from .runtime import Probe, ProbeRuntime
from .scheme import DIRECTIONS, SCHEMES

__all__ = ["ProbeOptimizer", "ProbeRuntime", "Probe", "SCHEMES", "DIRECTIONS"]
