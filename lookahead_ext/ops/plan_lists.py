"""PlanList: a tensor list that keeps its validated launch-plan column between op calls.

A fused-op call on the Triton backend needs, for every tensor list it gets, the tensors'
addresses, dtypes, sizes and contiguity (its pointer tables are built from them). For a
plain list these are read on every call (four reads per tensor). A PlanList is a ``list``
(every backend takes it as one) that remembers them: it is checked in full on its first
use in an *epoch*, and trusted for the rest of that epoch, so that the hot path of an
op call is O(1) in the number of tensors.

The contract of the owner (the optimizer engine owns its PlanLists):

- ``new_epoch()`` starts a new epoch; call it whenever a tensor of a PlanList may have been
  re-pointed (``.data =``, ``set_``, ``resize_``, ``share_memory_``, ``swap_tensors``,
  state replaced in place...). The engine calls it at the start of every step, so anything
  user code does between steps is seen; within a step the engine's own lists do not move.
- Mutating a PlanList (append, item assignment, ...) forgets its column at once.
- Copies (``copy``/``deepcopy``/pickle) are plain, unvalidated PlanLists: a deep copy has
  new tensors at new addresses and must never inherit the original's column.

Plain lists keep the exact per-call check: nothing is trusted across calls for them.
"""
from __future__ import annotations

_EPOCH = [0]


def new_epoch() -> None:
    """Invalidate every PlanList's column (each is re-checked in full on its next use)."""
    _EPOCH[0] += 1


def epoch() -> int:
    return _EPOCH[0]


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

    __slots__ = ("_col", "_epoch")

    def __init__(self, iterable=()):
        super().__init__(iterable)
        self._col = None
        self._epoch = -1

    def __reduce__(self):
        return (PlanList, (list(self),))

    def __copy__(self):
        return PlanList(self)


for _name in ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(PlanList, _name, _forgets(_name))
del _name
