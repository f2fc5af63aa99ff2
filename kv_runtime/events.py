"""Residency changes as data: small records that metrics, tests and external indexers read.

Every change of where a block lives (a copy added to or dropped from a tier, a block published, evicted,
found corrupt) is appended to an :class:`EventLog` as a :class:`ResidencyEvent`. Consumers pull them with
``drain()`` in their own time instead of the runtime calling into them, so the runtime never waits on a
consumer and never reaches across module boundaries; counters per kind and tier survive draining.
"""

from __future__ import annotations

import enum
import itertools
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple


class EventKind(enum.Enum):
    STORED = "stored"  # a tier gained a valid copy
    REMOVED = "removed"  # a tier's copy was dropped (demotion, eviction of a redundant copy)
    PUBLISHED = "published"  # the block became visible to matching
    EVICTED = "evicted"  # a copy was dropped to make room under a quota or a full pool
    DROPPED = "dropped"  # the block left the index; every copy was freed
    MISS = "miss"  # a copy turned out unreadable (corrupt, truncated, I/O error) and was discarded
    RECOVERED = "recovered"  # a block found on disk after a restart was adopted into the index

    # NOTE: members are singletons compared by identity; Enum's own hash (of the name, in Python code) ran twice
    # per eviction through the counters' keys.
    __hash__ = object.__hash__


class ResidencyEvent(NamedTuple):
    """One residency change (a tuple: immutable and cheap to make on the eviction path)."""

    seq: int
    kind: EventKind
    key: bytes
    tier: int | None  # a Tier value; None for block-level events (published, dropped)
    nbytes: int
    tenant: str


class EventLog:
    """A bounded queue of residency events plus running counts; thread-safe."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self._events: deque[ResidencyEvent] = deque(maxlen=maxlen)
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.counts: Counter[tuple[EventKind, int | None]] = Counter()
        self._subscribers: tuple[Callable[[ResidencyEvent], None], ...] = ()

    def subscribe(self, callback: Callable[[ResidencyEvent], None]) -> Callable[[], None]:
        """Call ``callback`` with every event from now on, in order, on the thread that emits it (an eviction
        policy keeps its own state current this way); returns the function that unsubscribes it. A callback
        must be quick and must not emit events itself."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def emit(self, kind: EventKind, key: bytes, tier: int | None, nbytes: int, tenant: str) -> None:
        with self._lock:
            event = ResidencyEvent(next(self._seq), kind, key, None if tier is None else int(tier), nbytes, tenant)
            self._events.append(event)
            self.counts[(kind, event.tier)] += 1
            subscribers = self._subscribers
        for callback in subscribers:
            callback(event)

    def drain(self) -> list[ResidencyEvent]:
        """Every event not drained before, oldest first (the oldest are dropped when the queue is full)."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
            return out

    def count(self, kind: EventKind, tier: int | None = None) -> int:
        """Events of ``kind`` so far; for one tier, or over all tiers when ``tier`` is None."""
        with self._lock:
            if tier is not None:
                return self.counts[(kind, int(tier))]
            return sum(n for (k, _), n in self.counts.items() if k is kind)
