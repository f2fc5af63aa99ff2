"""Eviction policies: which cached blocks of one tier to give up when room is needed.

Every policy keeps the same bookkeeping (``BlockInfo`` per block: parent, size, depth, saved compute, pins,
cached children) in the base class and only decides the *order* of victims, so they are interchangeable by
name at runtime (``make_eviction_policy``). The caller (a tier in ``kv_runtime``, or the trace replay) says what
happened — ``insert``, ``access``, ``remove``, ``pin``/``unpin`` — and asks ``victims`` when it needs room.

Block ids are opaque hashables: the runtime passes 16-byte keys, the trace replay passes ints.

NOTE: a pinned block (in flight, or held by a named shared context) is never returned by ``victims``. Policies
keep pinned blocks in their queues and step over them when they reach the eviction end (moving them to the
protected end, as an access would), so that a pin costs O(1) and a victim search stays amortised O(1): each
pinned block is stepped over at most once per pass.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import numpy as np

from kv_policy.lifetime import LifetimePredictor

BlockId = Hashable


@dataclass(slots=True)
class BlockInfo:
    """What a policy knows about one cached block; shared by all policies."""

    parent: BlockId | None
    size_bytes: int
    depth: int
    saved_flops: float
    inserted_at: float
    last_access: float
    accesses: int = 1
    pins: int = 0
    children: int = 0
    context: Hashable | None = None


class EvictionPolicy(ABC):
    """One interface for every policy: report events, ask for victims.

    Contracts:
    - ``victims`` returns only unpinned cached blocks, forgets them, and returns them in eviction order; it
      returns fewer than asked (possibly none) when no more blocks are evictable.
    - A prefix-aware policy (``prefix_aware = True``) never returns a block that still has a cached child, so it
      never orphans a subtree: a block's KV is useless once its parent's is gone.
    - ``insert`` of a cached block and events on unknown blocks are errors (``ValueError``): they mean the
      caller's residency and the policy's disagree, which must never pass silently.
    """

    name: str = ""
    prefix_aware: bool = False

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity <= 0:
            raise ValueError(f"capacity must be positive blocks, got {capacity}")
        self.capacity = capacity
        self._blocks: dict[BlockId, BlockInfo] = {}
        self._orphans: dict[BlockId, int] = {}  # absent block -> its cached children (they wait for it)
        self.used_bytes = 0

    # -- queries -------------------------------------------------------------------------------------------------
    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[BlockId]:
        return iter(self._blocks)

    def info(self, block_id: BlockId) -> BlockInfo:
        try:
            return self._blocks[block_id]
        except KeyError:
            raise ValueError(f"block {block_id!r} is not cached under policy {self.name}") from None

    def evictable(self, block_id: BlockId) -> bool:
        """Whether ``block_id`` may be chosen now: cached, unpinned, and (prefix-aware) without cached children."""
        info = self._blocks.get(block_id)
        if info is None or info.pins:
            return False
        return not (self.prefix_aware and info.children)

    # -- events --------------------------------------------------------------------------------------------------
    def insert(
        self,
        block_id: BlockId,
        *,
        parent: BlockId | None = None,
        size_bytes: int = 1,
        depth: int = 0,
        now: float = 0.0,
        saved_flops: float = 0.0,
        context: Hashable | None = None,
    ) -> None:
        """A block was stored in this tier. ``parent`` is the previous block of its prefix (None for a root)."""
        if block_id in self._blocks:
            raise ValueError(f"block {block_id!r} is already cached under policy {self.name}")
        if size_bytes <= 0 or depth < 0:
            raise ValueError(f"size_bytes must be > 0 and depth >= 0, got {size_bytes}, {depth}")
        # Children stored before their parent (a demotion can bring a subtree down leaves first) count too.
        info = BlockInfo(parent, size_bytes, depth, saved_flops, now, now, children=self._orphans.pop(block_id, 0))
        info.context = context
        self._blocks[block_id] = info
        self.used_bytes += size_bytes
        if parent is not None:
            parent_info = self._blocks.get(parent)
            if parent_info is not None:
                parent_info.children += 1
            else:
                self._orphans[parent] = self._orphans.get(parent, 0) + 1
        self._on_insert(block_id, info)

    def access(self, block_id: BlockId, now: float) -> None:
        """A cached block was used (a hit, or re-stored by a later request)."""
        info = self.info(block_id)
        info.accesses += 1
        info.last_access = now
        self._on_access(block_id, info)

    def remove(self, block_id: BlockId) -> None:
        """The block left this tier for a reason of the caller's (corruption, explicit drop, invalidation)."""
        info = self.info(block_id)
        self._forget(block_id, info)

    def pin(self, block_id: BlockId) -> None:
        """Hold the block (pins count): it is never a victim until as many ``unpin`` calls."""
        self.info(block_id).pins += 1

    def unpin(self, block_id: BlockId) -> None:
        info = self.info(block_id)
        if info.pins == 0:
            raise ValueError(f"block {block_id!r} is not pinned")
        info.pins -= 1
        if info.pins == 0:
            self._on_unpin(block_id, info)

    def victims(self, count: int = 1, *, need_bytes: int = 0, incoming: BlockId | None = None) -> list[BlockId]:
        """Choose, forget and return up to ``count`` blocks, or as many as free ``need_bytes`` if that is more.

        ``incoming``: the block about to be stored, when known; policies that adapt on its history (ARC's ghost
        lists) adapt before choosing, as they would if they saw the miss themselves.
        """
        out: list[BlockId] = []
        freed = 0
        while len(out) < count or freed < need_bytes:
            popped = self.pop_victim(incoming)
            if popped is None:
                break
            freed += popped[1].size_bytes
            out.append(popped[0])
        return out

    def pop_victim(self, incoming: BlockId | None = None) -> tuple[BlockId, BlockInfo] | None:
        """Choose and forget one victim, returning what the policy knew of it (a demotion decision needs it)."""
        if incoming is not None:
            self._before_miss(incoming)
        victim = self._pick()
        if victim is None:
            return None
        info = self._blocks[victim]
        self._forget(victim, info)
        return victim, info

    # -- shared mechanics ------------------------------------------------------------------------------------
    def _forget(self, block_id: BlockId, info: BlockInfo) -> None:
        del self._blocks[block_id]
        self.used_bytes -= info.size_bytes
        self._on_remove(block_id, info)
        if info.children:
            self._orphans[block_id] = info.children
        if info.parent is None:
            return
        parent_info = self._blocks.get(info.parent)
        if parent_info is not None:
            parent_info.children -= 1
            if parent_info.children == 0:
                self._on_leaf(info.parent, parent_info)
        else:
            left = self._orphans[info.parent] - 1
            if left:
                self._orphans[info.parent] = left
            else:
                del self._orphans[info.parent]

    # -- what a policy decides -----------------------------------------------------------------------------
    @abstractmethod
    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None: ...

    @abstractmethod
    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None: ...

    @abstractmethod
    def _on_remove(self, block_id: BlockId, info: BlockInfo) -> None: ...

    @abstractmethod
    def _pick(self) -> BlockId | None:
        """One evictable block, still cached (the base class forgets it), or None when there is none."""

    def _before_miss(self, incoming: BlockId) -> None:
        """``incoming`` missed and is about to be stored; most policies learn of it only at ``insert``."""
        return

    def _on_unpin(self, block_id: BlockId, info: BlockInfo) -> None:
        """A block became unpinned; queue-based policies need nothing (they step over pins)."""
        return

    def _on_leaf(self, block_id: BlockId, info: BlockInfo) -> None:
        """A block lost its last cached child; only prefix-aware policies care."""
        return


class LRUPolicy(EvictionPolicy):
    """Least recently used: an ordered dict is the candidate queue (O(1) touch and pop)."""

    name = "lru"

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[BlockId, None] = OrderedDict()

    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None:
        self._order[block_id] = None

    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None:
        self._order.move_to_end(block_id)

    def _on_remove(self, block_id: BlockId, info: BlockInfo) -> None:
        del self._order[block_id]

    def _pick(self) -> BlockId | None:
        for _ in range(len(self._order)):
            block_id = next(iter(self._order))
            if not self._blocks[block_id].pins:
                return block_id
            self._order.move_to_end(block_id)  # in use: as recent as anything
        return None


class _HeapPolicy(EvictionPolicy):
    """Base for policies that order victims by a priority key (smallest evicted first).

    A heap with lazy deletion: every change pushes a fresh entry stamped with the block's version, and stale
    entries are dropped when they surface. Blocks that are not evictable when they surface (pinned, or with
    cached children under a prefix-aware policy) are parked and pushed again by ``_on_unpin`` / ``_on_leaf``.
    """

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self._heap: list[tuple] = []
        self._version: dict[BlockId, int] = {}
        self._stamp = itertools.count()

    @abstractmethod
    def _key(self, block_id: BlockId, info: BlockInfo) -> tuple: ...

    def _push(self, block_id: BlockId, info: BlockInfo) -> None:
        version = next(self._stamp)
        self._version[block_id] = version
        heapq.heappush(self._heap, (*self._key(block_id, info), version, block_id))

    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None:
        self._push(block_id, info)

    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None:
        self._push(block_id, info)

    def _on_remove(self, block_id: BlockId, info: BlockInfo) -> None:
        del self._version[block_id]

    def _on_unpin(self, block_id: BlockId, info: BlockInfo) -> None:
        if self.evictable(block_id):
            self._push(block_id, info)

    def _on_leaf(self, block_id: BlockId, info: BlockInfo) -> None:
        if self.evictable(block_id):
            self._push(block_id, info)

    def _pick(self) -> BlockId | None:
        heap, versions, blocks = self._heap, self._version, self._blocks
        prefix_aware = self.prefix_aware
        heappop = heapq.heappop
        while heap:
            entry = heappop(heap)
            block_id = entry[-1]
            if versions.get(block_id) != entry[-2]:
                continue  # stale
            info = blocks.get(block_id)  # ``evictable``, inlined: this loop runs once per victim and stale entry
            if info is not None and not info.pins and not (prefix_aware and info.children):
                return block_id
            # parked: unpin / losing the last child pushes it again
        return None


class LFUPolicy(_HeapPolicy):
    """Least frequently used, ties broken by least recent; no ageing (the classic baseline)."""

    name = "lfu"

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self._clock = itertools.count()

    def _key(self, block_id: BlockId, info: BlockInfo) -> tuple:
        return (info.accesses, next(self._clock))


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo and Modha): recency list T1, frequency list T2, ghosts B1/B2.

    NOTE: classic ARC sees the missing block before it replaces. Callers that name it (``victims(incoming=...)``,
    as the trace replay does) get the paper's algorithm exactly; otherwise the target ``p`` adapts when the
    ghost-hit block is inserted and steers the next replacement. ``capacity`` (blocks) sizes the ghost lists and
    bounds ``p``; without it, the number of cached blocks at each decision stands in.
    """

    name = "arc"

    def __init__(self, capacity: int | None = None) -> None:
        super().__init__(capacity)
        self._t1: OrderedDict[BlockId, None] = OrderedDict()
        self._t2: OrderedDict[BlockId, None] = OrderedDict()
        self._b1: OrderedDict[BlockId, None] = OrderedDict()
        self._b2: OrderedDict[BlockId, None] = OrderedDict()
        self._p = 0.0
        self._adapted_for: BlockId | None = None  # the ghost hit p already adapted to
        self._incoming_in_b2 = False

    def _c(self) -> int:
        return self.capacity or max(1, len(self._blocks))

    def _adapt(self, block_id: BlockId) -> None:
        if self._adapted_for == block_id:
            return
        c = self._c()
        if block_id in self._b1:
            self._p = min(float(c), self._p + max(1.0, len(self._b2) / max(1, len(self._b1))))
        elif block_id in self._b2:
            self._p = max(0.0, self._p - max(1.0, len(self._b1) / max(1, len(self._b2))))
        else:
            return
        self._adapted_for = block_id

    def _before_miss(self, incoming: BlockId) -> None:
        self._adapt(incoming)
        self._incoming_in_b2 = incoming in self._b2

    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None:
        self._adapt(block_id)
        self._adapted_for = None
        self._incoming_in_b2 = False
        if block_id in self._b1:
            del self._b1[block_id]
            self._t2[block_id] = None
        elif block_id in self._b2:
            del self._b2[block_id]
            self._t2[block_id] = None
        else:
            self._t1[block_id] = None
        self._trim_ghosts()

    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None:
        if block_id in self._t1:
            del self._t1[block_id]
        self._t2[block_id] = None
        self._t2.move_to_end(block_id)

    def _on_remove(self, block_id: BlockId, info: BlockInfo) -> None:
        if block_id in self._t1:
            del self._t1[block_id]
            self._b1[block_id] = None
        else:
            del self._t2[block_id]
            self._b2[block_id] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        """The paper's bounds: |T1| + |B1| <= c and all four lists <= 2c (oldest ghosts go first)."""
        c = self._c()
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while self._b2 and len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c:
            self._b2.popitem(last=False)

    def _pick_from(self, queue: OrderedDict[BlockId, None]) -> BlockId | None:
        for _ in range(len(queue)):
            block_id = next(iter(queue))
            if not self._blocks[block_id].pins:
                return block_id
            queue.move_to_end(block_id)
        return None

    def _pick(self) -> BlockId | None:
        from_t1 = self._t1 and (len(self._t1) > self._p or (self._incoming_in_b2 and len(self._t1) == self._p))
        first, second = (self._t1, self._t2) if from_t1 else (self._t2, self._t1)
        victim = self._pick_from(first)
        return victim if victim is not None else self._pick_from(second)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO with lazy promotion, a ghost FIFO.

    New blocks enter the small queue (10% of capacity) unless the ghost remembers them; a block used again while
    in the small queue moves to main when it reaches the head, otherwise it is evicted into the ghost. Main
    reinserts a block that was used since its last pass (frequency capped at 3, decremented per pass).
    """

    name = "s3-fifo"

    def __init__(self, capacity: int | None = None, small_fraction: float = 0.1) -> None:
        super().__init__(capacity)
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        self.small_fraction = small_fraction
        self._small: OrderedDict[BlockId, None] = OrderedDict()
        self._main: OrderedDict[BlockId, None] = OrderedDict()
        self._ghost: OrderedDict[BlockId, None] = OrderedDict()
        self._freq: dict[BlockId, int] = {}

    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None:
        self._freq[block_id] = 0
        if block_id in self._ghost:
            del self._ghost[block_id]
            self._main[block_id] = None
        else:
            self._small[block_id] = None

    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None:
        self._freq[block_id] = min(3, self._freq[block_id] + 1)

    def _on_remove(self, block_id: BlockId, info: BlockInfo) -> None:
        del self._freq[block_id]
        if block_id in self._small:
            del self._small[block_id]
            self._ghost[block_id] = None
            limit = self.capacity or max(1, len(self._blocks))
            while len(self._ghost) > limit:
                self._ghost.popitem(last=False)
        else:
            del self._main[block_id]

    def _pick(self) -> BlockId | None:
        capacity = self.capacity or max(1, len(self._blocks))
        # Each block is stepped over at most a few times (frequency <= 3), so this loop is amortised O(1).
        budget = 4 * (len(self._small) + len(self._main)) + 1
        while budget > 0:
            budget -= 1
            if self._small and (len(self._small) >= self.small_fraction * capacity or not self._main):
                block_id = next(iter(self._small))
                if self._blocks[block_id].pins or self._freq[block_id] > 0:  # in use counts as used
                    del self._small[block_id]
                    self._freq[block_id] = 0
                    self._main[block_id] = None
                else:
                    return block_id
            elif self._main:
                block_id = next(iter(self._main))
                if self._blocks[block_id].pins:
                    self._main.move_to_end(block_id)
                elif self._freq[block_id] > 0:
                    self._freq[block_id] -= 1
                    self._main.move_to_end(block_id)
                else:
                    return block_id
            else:
                return None
        return None


class KvtierPrefixPolicy(_HeapPolicy):
    """A policy for prefix KV: leaves first, recency credited by learned reuse, history beyond residency.

    What it uses that a generic cache cannot:
    - prefix structure: only blocks without cached children are candidates (``prefix_aware``), so a subtree is
      never orphaned and the trunk shared by many prompts outlives its branches; a request's own blocks share
      one time, and the deepest goes first;
    - reuse history that survives eviction (a ``LifetimePredictor`` keyed by ``context`` and block id): a prompt
      seen before comes back as a shared block, not as a stranger;
    - the learned ``P(reused | uses so far)`` and the typical gap before a reuse: a block's priority is its last
      use plus ``mix x typical gap x P(reuse)``, a credit in time (GreedyDual style: static until the next
      event, so the heap needs no rescans). One-off tails lose their credit where the trace shows they are
      one-off, and keep it where, as in multi-turn chat, new blocks come back with the next turn;
    - tokens per block: a block shorter than the longest seen is where a prompt ended inside it (only an exact
      repeat reuses it), so its credit shrinks with the tokens it holds.
    """

    name = "kvtier-prefix"
    prefix_aware = True

    def __init__(
        self, capacity: int | None = None, *, predictor: LifetimePredictor | None = None, mix: float = 16.0
    ) -> None:
        super().__init__(capacity)
        if mix < 0:
            raise ValueError("mix must be >= 0")
        self.predictor = predictor if predictor is not None else LifetimePredictor()
        self.mix = mix
        self._full_bytes = 0

    def _history_key(self, block_id: BlockId, info: BlockInfo) -> Hashable:
        return block_id if info.context is None else (info.context, block_id)

    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None:
        self._full_bytes = max(self._full_bytes, info.size_bytes)
        self.predictor.observe(self._history_key(block_id, info), info.last_access)
        super()._on_insert(block_id, info)

    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None:
        self.predictor.observe(self._history_key(block_id, info), info.last_access)
        super()._on_access(block_id, info)

    def _key(self, block_id: BlockId, info: BlockInfo) -> tuple:
        key = self._history_key(block_id, info)
        credit = self.mix * self.predictor.typical_first_gap() * self.predictor.reuse_probability(key)
        if info.size_bytes < self._full_bytes:
            credit *= info.size_bytes / self._full_bytes
        return (info.last_access + credit, -info.depth)


class KvtierClassPolicy(KvtierPrefixPolicy):
    """The strict variant: every block used once (in its whole remembered history) goes before any used twice.

    Victim order: (min(uses, max_class), partial before full, last use, deeper first). Strongest where one-off
    prompts dominate; weak on multi-turn traces, where fresh blocks return with the next turn.
    """

    name = "kvtier-class"

    def __init__(
        self, capacity: int | None = None, *, predictor: LifetimePredictor | None = None, max_class: int = 2
    ) -> None:
        super().__init__(capacity, predictor=predictor)
        if max_class < 1:
            raise ValueError("max_class must be >= 1")
        self.max_class = max_class

    def _key(self, block_id: BlockId, info: BlockInfo) -> tuple:
        uses = self.predictor.uses(self._history_key(block_id, info))
        return (min(uses, self.max_class), info.size_bytes >= self._full_bytes, info.last_access, -info.depth)


class KvtierHitDensityPolicy(EvictionPolicy):
    """Least hit density (after Beckmann et al., NSDI'18), learned online, over prefix-safe leaves.

    A block's value is the hits it can still be expected to earn per slot-time it will still occupy. Both are
    learned from this tier's own past: per class, histograms of the age (events since the block's last use) at
    which blocks were hit and at which they were evicted, aged by ``decay`` at every reconfiguration. From them,
    for every (class, age): hit density = expected further hits / expected further lifetime. The victim is the
    lowest-density leaf among ``samples`` random evictable leaves (random sampling keeps the choice O(samples)
    although every block's density moves with its age).

    What it uses that a generic cache cannot:
    - prefix structure: only blocks without cached children are candidates, so a subtree is never orphaned;
    - use counts that survive eviction (a bounded history): a prefix stored again is classed by all its uses;
    - tokens per block: a prompt-ending partial block (shorter than the longest seen) is its own class, since
      only an exact repeat of the prompt can reuse it, and it learns its (low) density separately.

    Classes: ``min(uses, max_uses)`` x (partial or full). Ages are counted in events (insert or access) in
    units of ``capacity / 32``; until the first reconfiguration the order is plain recency.
    """

    name = "kvtier-lhd"
    prefix_aware = True

    def __init__(
        self,
        capacity: int | None = None,
        *,
        samples: int = 32,
        age_buckets: int = 512,
        max_uses: int = 4,
        decay: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__(capacity)
        if samples < 1 or age_buckets < 2 or max_uses < 1 or not 0.0 < decay <= 1.0:
            raise ValueError("samples >= 1, age_buckets >= 2, max_uses >= 1 and decay in (0, 1] required")
        span = capacity if capacity is not None else 2048  # sizes the age unit and the learning period
        self.samples = samples
        self.max_uses = max_uses
        self.decay = decay
        self._age_unit = max(1, span // 32)
        self._period = max(256, span // 2)
        self._buckets = age_buckets
        classes = 2 * max_uses
        self._hits = np.zeros((classes, age_buckets))
        self._evictions = np.zeros((classes, age_buckets))
        self._density: np.ndarray | None = None
        self._density_rows: list[list[float]] | None = None  # the same, as Python floats for the victim search
        self._clock = 0
        self._next_reconfigure = self._period
        self._uses: OrderedDict[BlockId, int] = OrderedDict()  # history beyond residency, least recent first
        self._max_history = max(65536, 16 * span)
        self._stamp: dict[BlockId, tuple[int, int]] = {}  # block -> (clock at its last use, its class then)
        self._leaves: list[BlockId] = []  # blocks without cached children, for O(1) random sampling
        self._leaf_pos: dict[BlockId, int] = {}
        self._rng = random.Random(seed)
        self._full_bytes = 0

    # -- learning ------------------------------------------------------------------------------------------
    def _age(self, since: int) -> int:
        return min((self._clock - since) // self._age_unit, self._buckets - 1)

    def _use(self, block_id: BlockId, info: BlockInfo) -> None:
        uses = self._uses.pop(block_id, 0) + 1
        self._uses[block_id] = uses
        if len(self._uses) > self._max_history:
            self._uses.popitem(last=False)
        partial = info.size_bytes < self._full_bytes
        self._stamp[block_id] = (self._clock, 2 * (min(uses, self.max_uses) - 1) + partial)
        self._clock += 1
        if self._clock >= self._next_reconfigure:
            self._next_reconfigure += self._period
            self._reconfigure()

    def _reconfigure(self) -> None:
        """Hit density per (class, age): hits still to come over slot-time still to spend, summed from the top."""
        events = self._hits + self._evictions
        hits_after = np.cumsum(self._hits[:, ::-1], axis=1)[:, ::-1]
        events_after = np.cumsum(events[:, ::-1], axis=1)[:, ::-1]
        lifetime_after = np.cumsum(events_after[:, ::-1], axis=1)[:, ::-1]
        self._density = np.divide(hits_after, lifetime_after, out=np.zeros_like(hits_after), where=lifetime_after > 0)
        self._density_rows = self._density.tolist()
        self._hits *= self.decay
        self._evictions *= self.decay

    def _score(self, block_id: BlockId) -> float:
        since, cls = self._stamp[block_id]
        age = self._age(since)
        return -age if self._density is None else float(self._density[cls, age])

    # -- leaf set ------------------------------------------------------------------------------------------
    def _add_leaf(self, block_id: BlockId) -> None:
        if block_id not in self._leaf_pos:
            self._leaf_pos[block_id] = len(self._leaves)
            self._leaves.append(block_id)

    def _drop_leaf(self, block_id: BlockId) -> None:
        pos = self._leaf_pos.pop(block_id, None)
        if pos is None:
            return
        last = self._leaves.pop()
        if last != block_id:
            self._leaves[pos] = last
            self._leaf_pos[last] = pos

    # -- events --------------------------------------------------------------------------------------------
    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None:
        self._full_bytes = max(self._full_bytes, info.size_bytes)
        self._use(block_id, info)
        if not info.children:
            self._add_leaf(block_id)
        if info.parent is not None and info.parent in self._blocks:
            self._drop_leaf(info.parent)

    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None:
        since, cls = self._stamp[block_id]
        self._hits[cls, self._age(since)] += 1
        self._use(block_id, info)

    def _on_remove(self, block_id: BlockId, info: BlockInfo) -> None:
        since, cls = self._stamp.pop(block_id)
        self._evictions[cls, self._age(since)] += 1
        self._drop_leaf(block_id)

    def _on_leaf(self, block_id: BlockId, info: BlockInfo) -> None:
        self._add_leaf(block_id)

    def _pick(self) -> BlockId | None:
        # NOTE: the hot loop of every replay that runs this policy (alone or as an expert), so ``_score`` and
        # ``randrange`` are inlined: ``randrange(n)`` draws ``_randbelow(n)``, i.e. ``getrandbits(n.bit_length())``
        # until below ``n``; drawing the same way keeps the random stream, hence every victim, unchanged.
        leaves = self._leaves
        n = len(leaves)
        if not n:
            return None
        blocks, stamp = self._blocks, self._stamp
        clock, unit, top = self._clock, self._age_unit, self._buckets - 1
        density = self._density_rows
        getrandbits = self._rng.getrandbits
        bits = n.bit_length()
        best, best_score = None, math.inf
        for _ in range(self.samples):
            r = getrandbits(bits)
            while r >= n:
                r = getrandbits(bits)
            block_id = leaves[r]
            if not blocks[block_id].pins:
                since, cls = stamp[block_id]
                age = (clock - since) // unit
                if age > top:
                    age = top
                score = -age if density is None else density[cls][age]
                if score < best_score:
                    best, best_score = block_id, score
        if best is None:  # every sample pinned: scan (rare; only when most leaves are in flight)
            for block_id in leaves:
                if not blocks[block_id].pins:
                    score = self._score(block_id)
                    if score < best_score:
                        best, best_score = block_id, score
        return best


def _insert_as(policy: EvictionPolicy, block_id: BlockId, info: BlockInfo, now: float) -> None:
    """Store ``block_id`` in another policy as ``info`` describes it (a follower or a shadow)."""
    policy.insert(
        block_id,
        parent=info.parent,
        size_bytes=info.size_bytes,
        depth=info.depth,
        now=now,
        saved_flops=info.saved_flops,
        context=info.context,
    )


@dataclass(slots=True)
class _Shadow:
    """One expert replaying the tier's block stream alone, at the tier's capacity, to count the hits it would have."""

    policy: EvictionPolicy
    score: float = 0.0  # decayed hits of past windows
    window_hits: int = 0
    tip: BlockId | None = None  # the last block that hit here; its child is the only block that can hit next


class KvtierAdaptivePolicy(EvictionPolicy):
    """Evicts as the expert that would have hit most lately: online selection among several policies.

    No single order wins on every trace: recency (LRU), scan resistance (S3-FIFO), frequency adaptation (ARC),
    prefix credit (``kvtier-prefix``, ``kvtier-class``) and hit density (``kvtier-lhd``) each lead somewhere.
    This policy keeps, per expert:
    - a *follower*: the expert fed exactly this tier's events (insert, access, remove, pin, the missing block
      before a victim is chosen), so it orders the blocks actually cached and can name a victim at any moment;
    - a *shadow*: the same expert replaying the same block stream alone at the tier's capacity (ids, parents,
      sizes, pins; it evicts for itself), which counts the hits that expert would have had with prefix-hit
      semantics: a block counts only if its parent is None or is the block that hit just before it there.

    The first expert leads at the start. Every ``window`` stores and uses, each expert's score decays by
    ``decay`` and gains its shadow's hits in the window; an expert whose score exceeds the leader's by more than
    the factor ``1 + margin`` becomes the leader. The memory is long and the margin wide on purpose: a switch
    has a price the shadows do not show (the new leader inherits a cache another policy filled), so the leader
    changes only on a lasting lead. The leader's follower names the victim; if it has none (a prefix-aware
    expert whose leaves are all pinned), the other followers are asked in turn. Everything is learned from past
    events only.

    ``prefix_aware`` holds only when every expert is prefix-aware (the default mix includes classic policies,
    which may orphan a subtree as they would alone). Cost: two policies' bookkeeping per expert on every event.
    ``capacity`` (blocks) sizes the shadows; without it, the most blocks this tier has held so far.
    """

    name = "kvtier-adaptive"

    def __init__(
        self,
        capacity: int | None = None,
        *,
        experts: tuple[str, ...] = ("kvtier-prefix", "kvtier-class", "kvtier-lhd", "s3-fifo", "lru"),
        window: int | None = None,
        decay: float = 0.99,
        margin: float = 0.1,
    ) -> None:
        super().__init__(capacity)
        if not experts or len(set(experts)) != len(experts) or self.name in experts:
            raise ValueError(f"experts must be distinct registered policies other than {self.name}, got {experts}")
        if (window is not None and window < 1) or not 0.0 <= decay < 1.0 or margin < 0:
            raise ValueError("window >= 1, decay in [0, 1) and margin >= 0 required")
        self.experts = experts
        self.window = window if window is not None else max(256, capacity or 0)
        self.decay = decay
        self.margin = margin
        self._followers = [make_eviction_policy(e, capacity=capacity) for e in experts]
        self._shadows = [_Shadow(make_eviction_policy(e, capacity=capacity)) for e in experts]
        self.prefix_aware = all(f.prefix_aware for f in self._followers)
        self._shadow_capacity = capacity or 0
        self._events = 0
        self._leader = 0  # index into experts

    @property
    def leader(self) -> str:
        """The expert whose follower names the victims now."""
        return self.experts[self._leader]

    def scores(self) -> dict[str, float]:
        """Each expert's decayed shadow hits, on which the choice of leader rests."""
        return {e: s.score for e, s in zip(self.experts, self._shadows, strict=True)}

    # -- shadows -------------------------------------------------------------------------------------------
    def _replay_shadows(self, block_id: BlockId, info: BlockInfo) -> None:
        if self.capacity is None:
            self._shadow_capacity = max(self._shadow_capacity, len(self._blocks))
        cap = self._shadow_capacity
        for shadow in self._shadows:
            policy = shadow.policy
            if block_id in policy:
                hit = info.parent is None or info.parent == shadow.tip
                shadow.window_hits += hit
                shadow.tip = block_id if hit else None
                policy.access(block_id, info.last_access)
                continue
            shadow.tip = None
            if len(policy) >= cap:
                policy.victims(len(policy) - cap + 1, incoming=block_id)
            if len(policy) < cap:
                _insert_as(policy, block_id, info, info.last_access)
        self._events += 1
        if self._events % self.window == 0:
            self._elect()

    def _elect(self) -> None:
        for shadow in self._shadows:
            shadow.score = self.decay * shadow.score + shadow.window_hits
            shadow.window_hits = 0
        shadows = self._shadows
        best = max(range(len(shadows)), key=lambda i: shadows[i].score)
        if shadows[best].score > (1.0 + self.margin) * shadows[self._leader].score:
            self._leader = best

    # -- events --------------------------------------------------------------------------------------------
    def _on_insert(self, block_id: BlockId, info: BlockInfo) -> None:
        for follower in self._followers:
            _insert_as(follower, block_id, info, info.inserted_at)
        self._replay_shadows(block_id, info)

    def _on_access(self, block_id: BlockId, info: BlockInfo) -> None:
        for follower in self._followers:
            follower.access(block_id, info.last_access)
        self._replay_shadows(block_id, info)

    def _on_remove(self, block_id: BlockId, info: BlockInfo) -> None:
        for follower in self._followers:
            if block_id in follower:  # the follower that named the victim has already forgotten it
                follower.remove(block_id)

    def pin(self, block_id: BlockId) -> None:
        super().pin(block_id)
        for follower in self._followers:
            follower.pin(block_id)
        for shadow in self._shadows:
            if block_id in shadow.policy:
                shadow.policy.pin(block_id)

    def unpin(self, block_id: BlockId) -> None:
        super().unpin(block_id)
        for follower in self._followers:
            follower.unpin(block_id)
        for shadow in self._shadows:
            # a shadow that stored the block after the tier pinned it holds fewer pins: it lets go first
            if block_id in shadow.policy and shadow.policy.info(block_id).pins:
                shadow.policy.unpin(block_id)

    def _before_miss(self, incoming: BlockId) -> None:
        for follower in self._followers:
            follower._before_miss(incoming)

    def _pick(self) -> BlockId | None:
        leader = self._followers[self._leader]
        for follower in (leader, *(f for f in self._followers if f is not leader)):
            popped = follower.pop_victim()
            if popped is not None:
                return popped[0]
        return None


EVICTION_POLICIES: dict[str, Callable[..., EvictionPolicy]] = {
    cls.name: cls
    for cls in (
        LRUPolicy,
        LFUPolicy,
        ARCPolicy,
        S3FIFOPolicy,
        KvtierPrefixPolicy,
        KvtierClassPolicy,
        KvtierHitDensityPolicy,
        KvtierAdaptivePolicy,
    )
}


def make_eviction_policy(name: str, **kwargs: object) -> EvictionPolicy:
    """A fresh policy by registered name (hot swap: the caller replays its cached blocks into it)."""
    try:
        factory = EVICTION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(EVICTION_POLICIES)}") from None
    return factory(**kwargs)
