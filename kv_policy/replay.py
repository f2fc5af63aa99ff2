"""Replay a request trace through eviction policies, one tier or two, with prefix-hit semantics.

Semantics (the same as the reference figures published with the shared trace): a request's block is a hit only
while every earlier block of the same request also hit; then every block of the request is accessed (if cached)
or inserted (evicting as needed). While a request is processed its blocks are pinned, as the runtime pins blocks
in flight, so a request never evicts its own prefix; a block that cannot be stored (everything else pinned) ends
the request's insertion, since its successors would be orphans.

Belady's offline optimum (evict the block whose next use is farthest; future known) is the limit, and
``unbounded`` (nothing ever evicted) the ceiling any capacity can reach.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kv_policy.cost_benefit import ModelShape
from kv_policy.eviction import EvictionPolicy
from kv_policy.trace import TraceRequest


@dataclass(slots=True)
class PreparedTrace:
    """A trace turned into per-block lists once, so that many replays share the work."""

    ids: list[tuple[int, ...]]
    times: list[float]  # seconds
    block_bytes: list[list[int]]
    block_flops: list[list[float]]
    total_blocks: int
    total_bytes: int
    total_flops: float
    distinct_blocks: int
    block_tokens: int
    bytes_per_token: int

    @classmethod
    def build(
        cls, trace: Sequence[TraceRequest], *, block_tokens: int, bytes_per_token: int, shape: ModelShape
    ) -> PreparedTrace:
        if block_tokens <= 0 or bytes_per_token <= 0:
            raise ValueError("block_tokens and bytes_per_token must be positive")
        ids, times, sizes, flops = [], [], [], []
        for r in trace:
            toks = r.block_tokens(block_tokens)
            ids.append(r.hash_ids)
            times.append(r.timestamp / 1e3)
            sizes.append([t * bytes_per_token for t in toks])
            starts = [j * block_tokens for j in range(len(toks))]
            flops.append([shape.prefill_flops(a, a + t) for a, t in zip(starts, toks, strict=True)])
        distinct = len({h for r in ids for h in r})
        return cls(
            ids,
            times,
            sizes,
            flops,
            sum(map(len, ids)),
            sum(map(sum, sizes)),
            float(sum(map(sum, flops))),
            distinct,
            block_tokens,
            bytes_per_token,
        )

    def head(self, requests: int) -> PreparedTrace:
        """The first ``requests`` requests (for quick runs)."""
        ids = self.ids[:requests]
        sizes, flops = self.block_bytes[:requests], self.block_flops[:requests]
        return PreparedTrace(
            ids,
            self.times[:requests],
            sizes,
            flops,
            sum(map(len, ids)),
            sum(map(sum, sizes)),
            float(sum(map(sum, flops))),
            len({h for r in ids for h in r}),
            self.block_tokens,
            self.bytes_per_token,
        )


@dataclass(slots=True)
class ReplayResult:
    """Figures of one replay; ratios are fractions of the trace's blocks, bytes and prefill FLOPs."""

    policy: str
    capacity_blocks: int | None
    capacity_bytes: int | None
    hit_blocks: int = 0
    hit_bytes: int = 0
    saved_flops: float = 0.0
    bytes_written: int = 0
    bytes_evicted: int = 0
    total_blocks: int = 0
    total_flops: float = 0.0
    tier_hits: dict[str, int] = field(default_factory=dict)
    bytes_moved: dict[str, int] = field(default_factory=dict)

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def saved_compute_ratio(self) -> float:
        return self.saved_flops / self.total_flops if self.total_flops else 0.0


def _prefix_hits(ids: tuple[int, ...], cached: Callable[[int], bool]) -> int:
    k = 0
    for h in ids:
        if not cached(h):
            break
        k += 1
    return k


def replay(
    trace: PreparedTrace,
    policy: EvictionPolicy,
    *,
    capacity_blocks: int | None = None,
    capacity_bytes: int | None = None,
) -> ReplayResult:
    """One tier under ``policy``, bounded in blocks or in bytes (exactly one of the two)."""
    if (capacity_blocks is None) == (capacity_bytes is None):
        raise ValueError("give exactly one of capacity_blocks and capacity_bytes")
    if (capacity_blocks or capacity_bytes or 0) <= 0:
        raise ValueError("capacity must be positive")
    res = ReplayResult(policy.name, capacity_blocks, capacity_bytes, total_blocks=trace.total_blocks)
    res.total_flops = trace.total_flops
    by_blocks = capacity_blocks is not None
    contains = policy.__contains__
    for ids, now, sizes, flops in zip(trace.ids, trace.times, trace.block_bytes, trace.block_flops, strict=True):
        k = _prefix_hits(ids, contains)
        res.hit_blocks += k
        res.hit_bytes += sum(sizes[:k])
        res.saved_flops += sum(flops[:k])
        held: list[int] = []
        parent = None
        for j, h in enumerate(ids):
            if h in policy:
                policy.access(h, now)
            else:
                size = sizes[j]
                while len(policy) >= capacity_blocks if by_blocks else policy.used_bytes + size > capacity_bytes:
                    popped = policy.pop_victim()
                    if popped is None:
                        break
                    res.bytes_evicted += popped[1].size_bytes
                if len(policy) >= capacity_blocks if by_blocks else policy.used_bytes + size > capacity_bytes:
                    break
                policy.insert(h, parent=parent, size_bytes=size, depth=j, now=now, saved_flops=flops[j])
                res.bytes_written += size
            policy.pin(h)
            held.append(h)
            parent = h
        for h in held:
            policy.unpin(h)
    res.bytes_moved = {"into_tier": res.bytes_written, "out_of_tier": res.hit_bytes}
    return res
