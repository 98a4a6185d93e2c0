"""``track_cosine``: the cosine between consecutive update directions d (cmlr.txt, Fig. 1)."""
from __future__ import annotations

import math

from ..ops.reference import linear_combination
from ._buckets import state_dtype
from .groups import global_sq


class CosineTracking:
    """Records cos(d_k, d_{k-1}) after every applied step in ``cosine_history`` (raw value;
    the previous d lives in the state as "prev_d"). The runtime calls ``_record_direction``
    from each base step while ``self._dirs`` is a list, and ``_record_cosine`` at the end."""

    def _record_direction(self, params, grads, coefs) -> None:
        """Keep d = sum c_i g_i of these params for the end of the step."""
        d = linear_combination(list(zip(coefs, grads)), params, state_dtype(params[0].dtype))
        self._dirs.append((params, d))

    def _record_cosine(self) -> None:
        if not self._dirs:
            return
        have_prev = all("prev_d" in self.state[p] for params, _ in self._dirs for p in params)
        if have_prev:
            sq = global_sq([[d, [self.state[p]["prev_d"] for p in params]]
                            for params, d in self._dirs], [(0, 1), (0, 0), (1, 1)],
                           backend=self._backend())
            dot, n0, n1 = (float(x) for x in sq)
            den = math.sqrt(n0) * math.sqrt(n1)
            self.cosine_history.append(dot / den if den > 0 else 0.0)
        for params, d in self._dirs:
            for p, x in zip(params, d):
                self.state[p]["prev_d"] = x
