"""PlanList: a tensor list that keeps its validated launch-plan column between op calls.

A fused-op call on the Triton backend needs, for every tensor list it gets, the tensors'
addresses, dtypes, sizes and contiguity (its pointer tables are built from them). For a
plain list these are read on every call (four reads per tensor). A PlanList is a ``list``
(every backend takes it as one) that remembers them: it is read in full on its first use
in an *epoch*, re-checked by two C-level maps (addresses, version counters) on its first
use in each later *step* of that epoch, and trusted for the rest of a step, so that the
hot path of an op call is O(1) in the number of tensors.

The contract of the owner (the optimizer engine owns its PlanLists):

- ``new_epoch()`` starts a new epoch: every PlanList is read in full on its next use. Call
  it whenever a tensor of a PlanList may have changed in a way that keeps its address
  (``.data =`` a view that starts at the same element, another dtype or layout at the same
  address). The engine calls it when it rebuilds its buckets (also after ``load_state_dict``).
- ``new_step()`` starts a new step of the current epoch: a PlanList checked earlier in the
  epoch is re-checked by one C-level map over its tensors' addresses and one over their
  version counters (the two reads that move when a tensor is re-pointed to other memory, ``.data =``,
  ``set_``, ``share_memory_``, ``swap_tensors``, or changed in place, ``resize_``, ``t_``,
  ``as_strided_``...): any difference reads it in full again. The engine calls it at the
  start of every step. A list's first full read takes no version counters (a probe's
  gradient list is used in one step); it is read in full once more, then re-checked.
- What a new step re-checks is the list's ``check`` (set by its owner):

  * ``"full"`` (the default): addresses and version counters, as above;
  * ``"address"``: addresses only (one map). For lists of the owner's own state tensors
    (fp32 masters, momentum, Adam moments): only the owner writes them, never resizes or
    transposes them in place, and a tensor re-pointed to other memory (``.data =``,
    ``set_``, ``load_state_dict`` replacing it) is seen;
  * ``"owner"``: nothing; the owner validates the tensors itself before each step (the
    engine's parameter lists: its per-step parameter signature reads every address and
    starts a new epoch when one moved).
- A list made with ``like=`` (a gradient list, ``like`` = its parameters' list) takes its
  tensors' dtypes and sizes from ``like``'s column when that one is checked in this epoch:
  its full read is two maps (addresses, contiguity), not four. torch ties a gradient's dtype
  and size to its parameter's (the ``.grad`` setter and autograd's accumulation check both).
- Mutating a PlanList (append, item assignment, ...) forgets its column at once.
- Copies (``copy``/``deepcopy``/pickle) are plain, unvalidated PlanLists: a deep copy has
  new tensors at new addresses and must never inherit the original's column.

Plain lists keep the exact per-call check: nothing is trusted across calls for them.
"""
from __future__ import annotations

from operator import is_

FULL, ADDRESS, OWNER = "full", "address", "owner"
CHECKS = (FULL, ADDRESS, OWNER)
_EPOCH = [0]
_STEP = [0]


def new_epoch() -> None:
    """Invalidate every PlanList's column (each is re-checked in full on its next use)."""
    _EPOCH[0] += 1
    _STEP[0] += 1


def new_step() -> None:
    """Make every PlanList re-check its tensors' addresses and version counters (one map
    each) on its next use; a list whose tensors all kept both keeps its column."""
    _STEP[0] += 1


def epoch() -> int:
    return _EPOCH[0]


def step() -> int:
    return _STEP[0]


def _forgets(name):
    base = getattr(list, name)

    def method(self, *args):
        self._col = None
        return base(self, *args)
    method.__name__ = name
    method.__doc__ = base.__doc__
    return method


class PlanList(list):
    """A list of tensors whose launch-plan column (addresses, dtypes, sizes) is cached by
    the backends for the current epoch (see the module docstring)."""

    __slots__ = ("_col", "_epoch", "_step", "_seen", "check", "like")

    def __init__(self, iterable=(), check: str = FULL, like: "PlanList | None" = None):
        super().__init__(iterable)
        if check not in CHECKS:
            raise ValueError(f"PlanList: check must be one of {CHECKS}, got {check!r}")
        self._col = None      # the validated column (kernels/_mta.py), None: read in full
        self._epoch = -1      # the epoch and step it was last checked in
        self._step = -1
        self._seen = None     # what a new step compares (see kernels/_mta.checked)
        self.check = check    # what a new step re-checks: FULL, ADDRESS or OWNER
        self.like = like      # the list whose column gives this one's dtypes and sizes

    def __reduce__(self):
        return (PlanList, (list(self),))

    def __copy__(self):
        return PlanList(self)


for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(PlanList, _name, _forgets(_name))
del _name


def twin(src: PlanList) -> PlanList:
    """A new PlanList of ``src``'s tensors that starts with ``src``'s column (a list the
    caller may mutate without touching ``src``, with nothing read again)."""
    out = PlanList(src, src.check, src.like)
    out._col, out._epoch, out._step, out._seen = src._col, src._epoch, src._step, src._seen
    return out


def reuse(old, tensors, check: str = FULL) -> PlanList:
    """``old`` itself when it is a PlanList holding exactly the objects of ``tensors`` (so it
    keeps its checked column), else a new PlanList of ``tensors`` (with ``check``). For an
    owner that rebuilds a list of the same tensors every step (e.g. optimizer state read
    per step)."""
    if type(old) is PlanList and len(old) == len(tensors) and all(map(is_, old, tensors)):
        return old
    return PlanList(tensors, check)
