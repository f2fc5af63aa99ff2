"""Migration between tiers: write a block down now or later, demote or drop on eviction, promote ahead of use.

Decisions are plain data (``WriteDecision``, ``EvictDecision``, ``Promotion``) that the runtime carries out; this
module never moves bytes and never calls into another package.

Modes for copying a block from a fast tier (DDR) to the next one (disk):
- ``write-through``: at store time, so an eviction is a free drop;
- ``write-back``: only when the block is evicted from the fast tier (a demotion), so one-off blocks that die
  in DDR never cost disk bandwidth, but an eviction costs a write;
- ``selective``: at its ``min_uses``-th use (a block used twice is a shared prefix, not a one-off tail), and at
  eviction only if it reached ``min_uses`` or the lifetime predictor expects it back.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

from kv_policy.eviction import BlockInfo
from kv_policy.lifetime import LifetimePredictor

WriteMode = Literal["write-through", "write-back", "selective"]
WRITE_MODES: tuple[str, ...] = ("write-through", "write-back", "selective")


@dataclass(slots=True, frozen=True)
class WriteDecision:
    """Copy the block to the next tier now (``write``), or not yet."""

    write: bool
    reason: str


@dataclass(slots=True, frozen=True)
class EvictDecision:
    """What happens to a block leaving the fast tier: ``demote`` (copy down first) or ``drop``."""

    action: Literal["demote", "drop"]
    reason: str


@dataclass(slots=True, frozen=True)
class Promotion:
    """Bring ``block_id`` from ``source`` into ``target`` before ``deadline`` (predicted next use)."""

    block_id: Hashable
    source: str
    target: str
    deadline: float


class MigrationPolicy:
    """Write, demotion and prefetch decisions for one pair of tiers."""

    def __init__(
        self,
        mode: WriteMode = "selective",
        *,
        min_uses: int = 2,
        predictor: LifetimePredictor | None = None,
        min_reuse_probability: float = 0.3,
        prefetch_horizon_s: float = 1.0,
    ) -> None:
        if mode not in WRITE_MODES:
            raise ValueError(f"mode must be one of {WRITE_MODES}, got {mode!r}")
        if min_uses < 1 or not 0.0 <= min_reuse_probability <= 1.0 or prefetch_horizon_s < 0:
            raise ValueError("min_uses >= 1, min_reuse_probability in [0, 1], prefetch_horizon_s >= 0 required")
        self.mode = mode
        self.min_uses = min_uses
        self.predictor = predictor
        self.min_reuse_probability = min_reuse_probability
        self.prefetch_horizon_s = prefetch_horizon_s

    def on_store(self, info: BlockInfo) -> WriteDecision:
        """A block was stored in the fast tier."""
        if self.mode == "write-through":
            return WriteDecision(True, "write-through")
        if self.mode == "selective" and info.accesses >= self.min_uses:
            return WriteDecision(True, f"used {info.accesses} times")
        return WriteDecision(False, self.mode)

    def on_access(self, info: BlockInfo, *, in_next_tier: bool) -> WriteDecision:
        """A block in the fast tier was used again; selective mode writes it down at its ``min_uses``-th use."""
        if self.mode == "selective" and not in_next_tier and info.accesses == self.min_uses:
            return WriteDecision(True, f"reached {self.min_uses} uses")
        return WriteDecision(False, "already below" if in_next_tier else self.mode)

    def on_evict(self, block_id: Hashable, info: BlockInfo, *, in_next_tier: bool) -> EvictDecision:
        """A block leaves the fast tier: demote it, or drop it (a copy below exists, or it is not worth one)."""
        if in_next_tier:
            return EvictDecision("drop", "copy already below")
        if self.mode == "write-back":
            return EvictDecision("demote", "write-back")
        if self.mode == "write-through":
            return EvictDecision("drop", "write-through copy was lost below")
        if info.accesses >= self.min_uses:
            return EvictDecision("demote", f"used {info.accesses} times")
        if self.predictor is not None:
            p = self.predictor.reuse_probability(block_id)
            if p >= self.min_reuse_probability:
                return EvictDecision("demote", f"predicted reuse {p:.2f}")
        return EvictDecision("drop", "one-off block")

    def prefetch(self, candidates: Iterable[Hashable], now: float, *, source: str, target: str) -> list[Promotion]:
        """Promotions for the candidates (blocks held only in ``source``) predicted back within the horizon.

        Soonest first, so a bandwidth-limited mover serves the most urgent. Needs a predictor; without one
        nothing is promoted ahead of use.
        """
        if self.predictor is None:
            return []
        out = []
        for block_id in candidates:
            due = self.predictor.next_use(block_id, now)
            if due - now <= self.prefetch_horizon_s:
                out.append(Promotion(block_id, source, target, due))
        out.sort(key=lambda p: p.deadline)
        return out
