"""lookahead_ext: fused lookahead-family optimizers (CMLR, SAM, FR, CR, LR, CLR, FMLR, ML-SAM,
Lookahead, LookaheadBio) for PyTorch, with pure-PyTorch reference ops and fused C++/CUDA
and Triton backends."""
import os as _os

# Running from a source checkout: kernels/ sits beside this package and is installed as
# the subpackage lookahead_ext.kernels; make that name resolve to it here too.
_here = _os.path.dirname(_os.path.abspath(__file__))
_src_kernels = _os.path.join(_os.path.dirname(_here), "kernels")
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_src_kernels, "__init__.py")):
    __path__.append(_os.path.dirname(_here))  # noqa: F821  (module __path__)

from . import ops  # noqa: E402
from .optim import (CLR, CMLR, CR, CRSAM, FMLR, FR, GSAM, LR, MLSAM, SAM,  # noqa: E402
                    Lookahead, LookbehindSAM, PairedClosure, Probe, ProbeOptimizer)
from .bio import LookaheadBio  # noqa: E402
from ._version import __version__  # noqa: E402
from .factory import create_optimizer  # noqa: E402

__all__ = ["ops", "CMLR", "FMLR", "MLSAM", "CLR", "LR", "FR", "CR", "SAM", "Lookahead",
           "LookbehindSAM", "GSAM", "CRSAM", "PairedClosure",
           "ProbeOptimizer", "Probe", "LookaheadBio", "create_optimizer", "__version__"]
