"""Batches for Algorithm 1 line 3 read literally: one mini-batch for all K inner steps of a cycle."""
from __future__ import annotations

from typing import Iterable, Iterator


def per_cycle(batches: Iterable, optimizer) -> Iterator:
    """Yield each batch of ``batches`` for every inner step of one Lookahead cycle.

    A new batch is drawn whenever ``optimizer.cycle_position`` is 0 (the start of a cycle),
    so a skipped step (non-finite loss) or a forced ``sync()`` keeps the cycle and its batch
    aligned. One line turns a per-step loop into Algorithm 1's per-cycle sampling::

        for x, y in per_cycle(loader, opt):   # instead of: for x, y in loader:
            opt.step(closure_for(x, y))

    The iteration ends when ``batches`` is exhausted at the start of a cycle (a cycle
    that has begun is finished with its batch only if the caller keeps stepping). For
    an optimizer without a Lookahead cycle (cycle_position always 0) this is ``batches``.

    Args:
        batches: any iterable of batches (a DataLoader, a list, a generator).
        optimizer: a lookahead_ext optimizer with ``cycle_position`` (CMLR, FMLR,
            LookbehindSAM, ... or :class:`lookahead_ext.Lookahead`).
    """
    it = iter(batches)
    batch, first = None, True
    while True:
        if first or optimizer.cycle_position == 0:
            try:
                batch = next(it)
            except StopIteration:
                return
            first = False
        yield batch
