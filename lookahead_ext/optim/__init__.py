"""Optimizers of lookahead_ext (torch.optim.Optimizer subclasses)."""
from .runtime import Probe, ProbeRuntime
from .family_optimizer import ProbeOptimizer
from .scheme import CENTRAL, CENTRAL_BASE, FORWARD, GRAD, LAGGED, MOMENTUM, Direction, Scheme
from .family import CLR, CMLR, CR, FMLR, FR, LR, MLSAM, SAM
from .lookahead import Lookahead
from .baselines import CRSAM, GSAM, LookbehindSAM
from .paired import PairedClosure, supports_paired

__all__ = ["ProbeRuntime", "ProbeOptimizer", "Probe", "Scheme", "Direction", "FORWARD", "CENTRAL",
           "CENTRAL_BASE", "GRAD", "MOMENTUM", "LAGGED", "CMLR", "FMLR", "MLSAM", "CLR", "LR",
           "FR", "CR", "SAM", "Lookahead", "LookbehindSAM", "GSAM", "CRSAM",
           "PairedClosure", "supports_paired"]
