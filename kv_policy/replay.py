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
from kv_policy.eviction import BlockInfo, EvictionPolicy
from kv_policy.migration import MigrationPolicy
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
    # Bound methods, looked up once: this loop makes several policy calls per block use of the trace.
    contains, access, insert = policy.__contains__, policy.access, policy.insert
    pin, unpin, pop_victim = policy.pin, policy.unpin, policy.pop_victim
    for ids, now, sizes, flops in zip(trace.ids, trace.times, trace.block_bytes, trace.block_flops, strict=True):
        k = _prefix_hits(ids, contains)
        res.hit_blocks += k
        res.hit_bytes += sum(sizes[:k])
        res.saved_flops += sum(flops[:k])
        held: list[int] = []
        parent = None
        for j, h in enumerate(ids):
            if contains(h):
                access(h, now)
            else:
                size = sizes[j]
                while len(policy) >= capacity_blocks if by_blocks else policy.used_bytes + size > capacity_bytes:
                    popped = pop_victim(h)
                    if popped is None:
                        break
                    res.bytes_evicted += popped[1].size_bytes
                if len(policy) >= capacity_blocks if by_blocks else policy.used_bytes + size > capacity_bytes:
                    break
                insert(h, parent=parent, size_bytes=size, depth=j, now=now, saved_flops=flops[j])
                res.bytes_written += size
            pin(h)
            held.append(h)
            parent = h
        for h in held:
            unpin(h)
    res.bytes_moved = {"into_tier": res.bytes_written, "out_of_tier": res.hit_bytes}
    return res


def replay_unbounded(trace: PreparedTrace) -> ReplayResult:
    """Nothing is ever evicted: the hit ratio no capacity can exceed."""
    res = ReplayResult("unbounded", None, None, total_blocks=trace.total_blocks, total_flops=trace.total_flops)
    seen: set[int] = set()
    for ids, sizes, flops in zip(trace.ids, trace.block_bytes, trace.block_flops, strict=True):
        k = _prefix_hits(ids, seen.__contains__)
        res.hit_blocks += k
        res.hit_bytes += sum(sizes[:k])
        res.saved_flops += sum(flops[:k])
        for h, size in zip(ids[k:], sizes[k:], strict=True):
            if h not in seen:
                seen.add(h)
                res.bytes_written += size
    res.bytes_moved = {"into_tier": res.bytes_written, "out_of_tier": res.hit_bytes}
    return res


def replay_belady(
    trace: PreparedTrace, *, capacity_blocks: int | None = None, capacity_bytes: int | None = None
) -> ReplayResult:
    """Belady's offline optimum: on a miss, evict the cached block whose next use is farthest in the future.

    With a byte capacity, blocks are evicted farthest-first until the new one fits (the classic rule; with
    unequal sizes it is a strong limit, not a proven optimum).
    """
    if (capacity_blocks is None) == (capacity_bytes is None):
        raise ValueError("give exactly one of capacity_blocks and capacity_bytes")
    never = 1 << 62
    flat = [h for ids in trace.ids for h in ids]
    next_use = [never] * len(flat)
    last: dict[int, int] = {}
    for i in range(len(flat) - 1, -1, -1):
        next_use[i] = last.get(flat[i], never)
        last[flat[i]] = i
    res = ReplayResult("belady", capacity_blocks, capacity_bytes, total_blocks=trace.total_blocks)
    res.total_flops = trace.total_flops
    cached: dict[int, tuple[int, int]] = {}  # block -> (its next use, its bytes)
    heap: list[tuple[int, int]] = []  # (-next use, block), lazily deleted
    used = 0
    i = 0
    for ids, sizes, flops in zip(trace.ids, trace.block_bytes, trace.block_flops, strict=True):
        k = _prefix_hits(ids, cached.__contains__)
        res.hit_blocks += k
        res.hit_bytes += sum(sizes[:k])
        res.saved_flops += sum(flops[:k])
        for h, size in zip(ids, sizes, strict=True):
            nu = next_use[i]
            i += 1
            if h in cached:
                used -= cached[h][1]
            else:
                res.bytes_written += size
                while heap and (len(cached) >= capacity_blocks if capacity_blocks else used + size > capacity_bytes):
                    neg, victim = heapq.heappop(heap)
                    entry = cached.get(victim)
                    if entry is not None and entry[0] == -neg:
                        del cached[victim]
                        used -= entry[1]
                        res.bytes_evicted += entry[1]
            cached[h] = (nu, size)
            used += size
            heapq.heappush(heap, (-nu, h))
    res.bytes_moved = {"into_tier": res.bytes_written, "out_of_tier": res.hit_bytes}
    return res


def replay_two_tier(
    trace: PreparedTrace,
    fast: EvictionPolicy,
    slow: EvictionPolicy,
    migration: MigrationPolicy,
    *,
    fast_capacity_blocks: int,
    slow_capacity_blocks: int,
) -> ReplayResult:
    """DDR (``fast``) over disk (``slow``): a prefix block hits DDR, else disk (then it is promoted), else misses.

    Every block of a request ends up in DDR, as in one tier; ``migration`` decides which blocks are written to
    disk at store time or on a later use, and which evicted ones are demoted rather than dropped. Reported:
    hits per tier and bytes moved per direction (disk reads are promotions; DDR reads are hits served).
    """
    if fast_capacity_blocks <= 0 or slow_capacity_blocks <= 0:
        raise ValueError("capacities must be positive")
    res = ReplayResult(fast.name, fast_capacity_blocks, None, total_blocks=trace.total_blocks)
    res.total_flops = trace.total_flops
    moved = {"ddr_to_disk": 0, "disk_to_ddr": 0, "ddr_to_engine": 0}
    hits = {"ddr": 0, "disk": 0}

    def write_down(h: int, info: BlockInfo) -> None:
        if h in slow:
            return
        while len(slow) >= slow_capacity_blocks:
            if slow.pop_victim() is None:
                return
        slow.insert(h, parent=info.parent, size_bytes=info.size_bytes, depth=info.depth, now=info.last_access)
        moved["ddr_to_disk"] += info.size_bytes

    for ids, now, sizes, flops in zip(trace.ids, trace.times, trace.block_bytes, trace.block_flops, strict=True):
        k = 0
        for h in ids:
            if h in fast:
                hits["ddr"] += 1
            elif h in slow:
                hits["disk"] += 1
            else:
                break
            k += 1
        res.hit_blocks += k
        res.hit_bytes += sum(sizes[:k])
        res.saved_flops += sum(flops[:k])
        held: list[int] = []
        parent = None
        for j, h in enumerate(ids):
            size = sizes[j]
            if h in slow:
                slow.access(h, now)
            if h in fast:
                fast.access(h, now)
                if j < k:
                    moved["ddr_to_engine"] += size
                if migration.on_access(fast.info(h), in_next_tier=h in slow).write:
                    write_down(h, fast.info(h))
            else:
                while len(fast) >= fast_capacity_blocks:
                    popped = fast.pop_victim(h)
                    if popped is None:
                        break
                    victim, info = popped
                    if migration.on_evict(victim, info, in_next_tier=victim in slow).action == "demote":
                        write_down(victim, info)
                if len(fast) >= fast_capacity_blocks:
                    break
                from_disk = h in slow and j < k
                fast.insert(h, parent=parent, size_bytes=size, depth=j, now=now, saved_flops=flops[j])
                if from_disk:
                    moved["disk_to_ddr"] += size
                    moved["ddr_to_engine"] += size
                else:
                    res.bytes_written += size
                    if migration.on_store(fast.info(h)).write:
                        write_down(h, fast.info(h))
            fast.pin(h)
            held.append(h)
            parent = h
        for h in held:
            fast.unpin(h)
    res.tier_hits = hits
    res.bytes_moved = moved
    return res
