"""When, and whether, a prefix will be used again, learned online from its own past and from its peers'.

Each key (a block, a chain, a session or a named context: the caller chooses) keeps a small record: how often it
was used, when last, and an exponentially weighted mean of the gaps between uses. Two population statistics,
also learned only from the past, fill in what one key's history cannot tell:

- ``P(use k+1 | used k times)``: of the keys that reached ``k`` uses, the share that reached ``k + 1``. Keys used
  once are mostly one-off prompt tails; keys used several times are shared prefixes. The estimate counts only
  keys whose fate is settled (used again, or idle for longer than the horizon), so it is not biased low by keys
  that are simply young.
- the mean gap before a key's second use, the prior for keys seen once.

Nothing here looks ahead: every figure is updated at ``observe`` time from what already happened.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

_MAX_CLASS = 4  # use counts 1, 2, 3, 4+ share statistics past this


@dataclass(slots=True)
class _History:
    uses: int
    first: float
    last: float
    mean_gap: float  # EWMA of gaps; nan until a second use


class LifetimePredictor:
    """Per-key inter-arrival statistics plus population reuse probabilities; bounded memory (``max_keys``)."""

    def __init__(self, *, gap_alpha: float = 0.3, max_keys: int = 1_000_000, horizon_gaps: float = 4.0) -> None:
        if not 0 < gap_alpha <= 1 or max_keys <= 0 or horizon_gaps <= 0:
            raise ValueError("gap_alpha in (0, 1], max_keys > 0 and horizon_gaps > 0 required")
        self.gap_alpha = gap_alpha
        self.max_keys = max_keys
        self.horizon_gaps = horizon_gaps
        self._keys: OrderedDict[Hashable, _History] = OrderedDict()  # least recently used first
        self._pending: OrderedDict[Hashable, None] = OrderedDict()  # used, fate (used again or not) unsettled
        # again[k]: keys settled by a (k+1)-th use within the horizon;
        # dead[k]: settled by idling past the horizon after their k-th use.
        self._again = [0] * (_MAX_CLASS + 2)
        self._dead = [0] * (_MAX_CLASS + 2)
        self._first_gap_sum = 0.0
        self._first_gap_n = 0
        self._gap_sum = 0.0
        self._gap_n = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def observe(self, key: Hashable, now: float) -> None:
        """``key`` was used at ``now`` (seconds, monotonic)."""
        h = self._keys.get(key)
        if h is None:
            self._keys[key] = _History(1, now, now, math.nan)
        else:
            gap = max(0.0, now - h.last)
            if key in self._pending:
                self._again[min(h.uses, _MAX_CLASS)] += 1
            if h.uses == 1:
                self._first_gap_sum += gap
                self._first_gap_n += 1
            self._gap_sum += gap
            self._gap_n += 1
            h.mean_gap = gap if math.isnan(h.mean_gap) else h.mean_gap + self.gap_alpha * (gap - h.mean_gap)
            h.uses += 1
            h.last = now
            self._keys.move_to_end(key)
        self._pending[key] = None
        self._pending.move_to_end(key)
        self._settle(now)

    def _settle(self, now: float) -> None:
        """Count keys idle past their horizon as not used again (oldest first, amortised O(1)); bound memory."""
        while self._pending:
            key = next(iter(self._pending))
            h = self._keys.get(key)
            if h is not None and now - h.last <= self.horizon(h):
                break
            del self._pending[key]
            if h is not None:
                self._dead[min(h.uses, _MAX_CLASS)] += 1
        while len(self._keys) > self.max_keys:
            key, _ = self._keys.popitem(last=False)
            self._pending.pop(key, None)

    def horizon(self, h: _History) -> float:
        """How long a key may idle before it counts as dead: a few of its own (or the typical) gaps."""
        gap = h.mean_gap if not math.isnan(h.mean_gap) else self.typical_first_gap()
        return self.horizon_gaps * max(gap, 1e-3)

    def typical_first_gap(self) -> float:
        """Mean gap between a key's first and second use so far (the prior for keys seen once)."""
        if self._first_gap_n:
            return self._first_gap_sum / self._first_gap_n
        return self._gap_sum / self._gap_n if self._gap_n else 1.0

    def uses(self, key: Hashable) -> int:
        h = self._keys.get(key)
        return h.uses if h is not None else 0

    def reuse_probability(self, key: Hashable) -> float:
        """P(another use) for a key with this many uses, from settled keys of the same class (Laplace-smoothed)."""
        h = self._keys.get(key)
        cls = min(h.uses, _MAX_CLASS) if h is not None else 1
        return (self._again[cls] + 1) / (self._again[cls] + self._dead[cls] + 2)

    def expected_gap(self, key: Hashable) -> float:
        """Expected time between uses of ``key``: its own EWMA gap, else the population's first-reuse gap."""
        h = self._keys.get(key)
        if h is None or math.isnan(h.mean_gap):
            return self.typical_first_gap()
        return h.mean_gap

    def next_use(self, key: Hashable, now: float) -> float:
        """Predicted time of the next use (``inf`` when the key is unknown or has idled past its horizon)."""
        h = self._keys.get(key)
        if h is None or now - h.last > self.horizon(h):
            return math.inf
        return max(now, h.last + self.expected_gap(key))

    def forget(self, key: Hashable) -> None:
        self._keys.pop(key, None)
        self._pending.pop(key, None)
