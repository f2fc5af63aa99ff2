"""Residency of every cached block across HBM, DDR and disk, kept in step with the prefix index.

The index's node payload *is* the block's :class:`Residency`: which tiers hold a valid copy (their slots),
its tenant and how many migrations are using it. There is no second table to keep consistent; the index
hands every payload it drops to :meth:`HierarchyManager._released`, which frees every slot of it.

Invariants:

- A block in the index has at least one valid copy; when its last copy goes, its node (and subtree, which is
  unreachable without it) leaves the index.
- A copy is registered only after its bytes are complete (the migrator adds it once the copy's event or I/O
  finished), and a node is published only then.
- Pinned nodes (leases held by requests or named contexts) and blocks with migrations in flight are never
  evicted; their slots are busy and never move or get freed under a copy.
- Every byte of every slot is counted against the tier's and the tenant's quota while the slot is held.

Eviction here is mechanism: drop redundant copies (another tier still has the block) and unreferenced leaves,
least recently used first, taken from the block manager's candidate sets (``block_manager.py``), which the index
and this class keep current: finding a victim never scans. Demotion (copying down before dropping) is a
migration and is planned by policy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kv_runtime.block_manager import BlockManager
from kv_runtime.events import EventKind, EventLog
from kv_runtime.pool import DDRPool, KVPool, Slot, Tier
from kv_runtime.quota import QuotaManager, QuotaPressure
from prefix_reuse import BlockNode, PinnedError, PrefixReuseIndex, RequestKeys, StaleNodeError


def disk_key(key: bytes, check: int) -> bytes:
    """The name of a block on disk: its chained key plus its confirmation hash, so a block found after a
    restart is confirmed as fully as one matched in memory."""
    return key + check.to_bytes(8, "little")


@dataclass(slots=True, eq=False)
class Residency:
    """Where one block lives: the payload of its index node."""

    key: bytes
    nbytes: int
    tenant: str
    copies: dict[Tier, Slot] = field(default_factory=dict)
    in_flight: int = 0
    node: BlockNode | None = None
    dropped: bool = False

    @property
    def tiers(self) -> list[Tier]:
        return sorted(self.copies)

    @property
    def fastest(self) -> Tier | None:
        return min(self.copies, default=None)


class HierarchyManager:
    """Residency, allocation under quota, and eviction across the tiers it is given."""

    def __init__(
        self,
        pools: Mapping[Tier, KVPool],
        *,
        quotas: QuotaManager | None = None,
        events: EventLog | None = None,
    ) -> None:
        if not pools:
            raise ValueError("a hierarchy needs at least one tier")
        self.pools: dict[Tier, KVPool] = {Tier(t): p for t, p in pools.items()}
        for tier, pool in self.pools.items():
            if pool.tier is not tier:
                raise ValueError(f"pool for {tier.name} is a {pool.tier.name} pool")
        self.quotas = quotas or QuotaManager()
        self.events = events or EventLog()
        self.blocks = BlockManager(self.pools, self.quotas)
        self.index = PrefixReuseIndex(on_release=self._released, on_change=self._nodes_changed)
        self._lock = threading.RLock()
        # Blocks found on disk after a restart, not yet linked into the index (that needs a request's keys).
        self._recovered: dict[tuple[bytes, bytes], Slot] = {}
        self.quotas.on_pressure(self._evict_for_quota)

    # ------------------------------------------------------------------ allocation under quota

    def pool(self, tier: Tier) -> KVPool:
        return self.blocks.pool(tier)

    def allocate(self, tier: Tier, sizes: Sequence[int], tenant: str) -> list[Slot]:
        """Slots for blocks of ``sizes`` bytes, counted against quotas; evicts to make room if needed."""
        with self._lock:
            return self.blocks.allocate(tier, sizes, tenant, self.evict)

    def free_slot(self, slot: Slot, tenant: str) -> None:
        """Drop one reference to a slot; its quota is returned when its space is."""
        self.blocks.free_slot(slot, tenant)

    # ------------------------------------------------------------------ blocks in and out of the index

    def insert(
        self,
        rk: RequestKeys,
        start_block: int,
        tier: Tier,
        slots: Sequence[Slot],
        *,
        tenant: str,
        ready: bool = True,
    ) -> list[BlockNode]:
        """Index blocks ``[start_block, start_block + len(slots))`` of ``rk`` with one copy each in ``tier``.

        The slots' bytes must already be complete when ``ready``; otherwise publish the nodes later. Where a
        block is already indexed the existing node wins and the offered slot is freed.
        """
        residencies = [Residency(rk.keys[start_block + i], s.nbytes, tenant, {tier: s}) for i, s in enumerate(slots)]
        result = self.index.insert(rk, residencies, start_block=start_block, ready=ready)
        with self._lock:
            for node, inserted in zip(result.nodes, result.inserted, strict=False):
                if inserted:
                    res: Residency = node.payload
                    res.node = node
                    self.blocks.update(res)
                    self.events.emit(EventKind.STORED, res.key, tier, res.nbytes, tenant)
                    if ready:
                        self.events.emit(EventKind.PUBLISHED, res.key, None, res.nbytes, tenant)
        return result.nodes

    def put(self, rk: RequestKeys, start_block: int, blocks: torch.Tensor, *, tenant: str = "") -> list[BlockNode]:
        """Copy host bytes ``[n, block_bytes]`` into DDR slots and index them as ready (the host path)."""
        pool = self.pool(Tier.DDR)
        if not isinstance(pool, DDRPool):
            raise TypeError("put() needs a DDR pool")
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.device.type != "cpu":
            raise ValueError("blocks must be a host uint8 tensor [num_blocks, block_bytes]")
        slots = self.allocate(Tier.DDR, [blocks.shape[1]] * blocks.shape[0], tenant)
        for slot, row in zip(slots, blocks, strict=True):
            pool.view(slot).copy_(row)
        return self.insert(rk, start_block, Tier.DDR, slots, tenant=tenant, ready=True)

    def publish(self, nodes: Sequence[BlockNode]) -> None:
        pending = [n for n in nodes if not n.ready]
        self.index.publish(pending)  # the index reports them ready: they become candidates
        for node in pending:
            res: Residency = node.payload
            self.events.emit(EventKind.PUBLISHED, res.key, None, res.nbytes, res.tenant)

    def match(self, rk: RequestKeys, *, tenant: str = "") -> list[BlockNode]:
        """Longest cached prefix of ``rk``, extended by blocks recovered from disk after a restart.

        Recovered blocks are linked into the index here, the first time a request names their keys (the
        index needs the request's tokens to confirm them); the disk read verifies their bytes later.
        """
        nodes = self.index.match(rk)
        if self._recovered and len(nodes) < rk.num_blocks:
            ns = rk.namespace.digest
            slots: list[Slot] = []
            with self._lock:
                for i in range(len(nodes), rk.num_blocks):
                    slot = self._recovered.pop((ns, disk_key(rk.keys[i], rk.checks[i])), None)
                    if slot is None:
                        break
                    slots.append(slot)
            if slots:
                for slot in slots:
                    self.quotas.reserve(Tier.DISK, tenant, slot.capacity)
                added = self.insert(rk, len(nodes), Tier.DISK, slots, tenant=tenant, ready=True)
                for node in added:
                    res: Residency = node.payload
                    self.events.emit(EventKind.RECOVERED, res.key, Tier.DISK, res.nbytes, tenant)
                nodes = nodes + added
        if nodes:
            self.index.touch(nodes)
            with self._lock:
                for node in nodes:
                    self.blocks.touch(node.payload)
        return nodes

    def adopt_disk(self) -> int:
        """Remember every block the disk pool holds (after a restart) until a request links it; returns how many."""
        pool = self.pool(Tier.DISK)
        with self._lock:
            known = {id(r.copies.get(Tier.DISK)) for r in self.blocks.resident(Tier.DISK)}
            for slot in pool.live_slots():
                if slot.record is not None and id(slot) not in known:
                    self._recovered[(bytes(slot.record.namespace), bytes(slot.record.key))] = slot
            return len(self._recovered)

    # ------------------------------------------------------------------ copies

    def add_copy(self, res: Residency, tier: Tier, slot: Slot) -> bool:
        """Register a complete copy; returns False (and frees the slot) if the block was dropped meanwhile."""
        with self._lock:
            if res.dropped or tier in res.copies:
                self.free_slot(slot, res.tenant)
                return False
            res.copies[tier] = slot
            self.blocks.update(res)
        self.events.emit(EventKind.STORED, res.key, tier, res.nbytes, res.tenant)
        return True

    def drop_copy(self, res: Residency, tier: Tier, *, kind: EventKind = EventKind.REMOVED) -> None:
        """Free one tier's copy. Dropping the last copy removes the block (and its subtree) from the index."""
        with self._lock:
            if tier not in res.copies:
                return
            if len(res.copies) == 1 and res.node is not None:
                self.index.remove(res.node)  # raises PinnedError for leased blocks; _released frees the slot
                return
            slot = res.copies.pop(tier)
            self.blocks.update(res)
        self.events.emit(kind, res.key, tier, res.nbytes, res.tenant)
        self.free_slot(slot, res.tenant)

    def discard_invalid(self, res: Residency, tier: Tier) -> None:
        """A copy proved unreadable: forget it (a miss, counted); never hand its bytes out."""
        with self._lock:
            slot = res.copies.pop(tier, None)
            self.blocks.update(res)
            last = not res.copies
        if slot is None:
            return
        self.events.emit(EventKind.MISS, res.key, tier, res.nbytes, res.tenant)
        self.free_slot(slot, res.tenant)
        if last and res.node is not None and res.node.pin_count == 0:
            self.index.remove(res.node)

    def drop(self, node: BlockNode) -> None:
        """Remove a block (and its subtree) from the index and free every copy."""
        self.index.remove(node)

    # ------------------------------------------------------------------ leases

    def lease(self, residencies: Sequence[Residency], tiers: Sequence[Tier] = ()) -> None:
        """Pin blocks for a migration: their nodes cannot be evicted, their slots in ``tiers`` cannot move."""
        nodes = [r.node for r in residencies if r.node is not None]
        self.index.pin(nodes)
        with self._lock:
            for r in residencies:
                r.in_flight += 1
                self.blocks.update(r)
                for t in tiers:
                    if t in r.copies:
                        self.pools[t].acquire_io(r.copies[t])

    def unlease(self, residencies: Sequence[Residency], tiers: Sequence[Tier] = (), slots: Sequence[Slot] = ()) -> None:
        """Undo :meth:`lease`; ``slots`` are the exact source slots leased (copies may have changed since)."""
        with self._lock:
            for slot in slots:
                self.pools[slot.tier].release_io(slot)
            for r in residencies:
                r.in_flight -= 1
                self.blocks.update(r)
        self.index.unpin([r.node for r in residencies if r.node is not None])
        del tiers  # the tiers are implied by the slots; kept for symmetry with lease()

    # ------------------------------------------------------------------ eviction

    def evict(self, tier: Tier, needed_bytes: int, tenant: str | None = None) -> int:
        """Free at least ``needed_bytes`` in ``tier`` (of ``tenant`` if given), least recently used first.

        Victims come from the block manager's candidate set, O(1) each: never a pinned block, one with a
        migration in flight, or the only copy of a block that others hang under. A redundant copy (another tier
        holds the block) is simply dropped; a leaf's only copy goes with its node, and its parent, now a leaf,
        is the next victim. Returns the bytes freed.
        """
        freed = 0
        deferred = 0
        with self._lock:
            while freed < needed_bytes:
                res = self.blocks.first_candidate(tier, tenant)
                if res is None:
                    break
                slot = res.copies[tier]
                node = res.node
                assert node is not None  # candidates are indexed blocks
                if node.pin_count or res.in_flight:  # pinned since the set was last told: never a victim
                    self.blocks.update(res)
                    continue
                if slot.busy or slot.moving:  # defragmentation is moving it: it goes when that ends
                    if deferred >= self.blocks.num_candidates(tier):
                        break
                    deferred += 1
                    self.blocks.defer(res, tier)
                    continue
                if len(res.copies) > 1:
                    self.drop_copy(res, tier, kind=EventKind.EVICTED)
                else:
                    parent = node.parent
                    try:
                        self.index.remove(node)
                    except (PinnedError, StaleNodeError):  # a lease raced us; the index has the truth
                        self.blocks.update(res)
                        if self.blocks.is_candidate(res, tier):
                            if deferred >= self.blocks.num_candidates(tier):
                                break
                            deferred += 1
                            self.blocks.defer(res, tier)
                        continue
                    self.events.emit(EventKind.EVICTED, res.key, tier, res.nbytes, res.tenant)
                    if parent is not None and isinstance(parent.payload, Residency):
                        self.blocks.to_front(parent.payload, tier)
                freed += slot.capacity
        return freed

    def _evict_for_quota(self, pressure: QuotaPressure) -> int:
        return self.evict(pressure.tier, pressure.needed_bytes, pressure.tenant)

    # ------------------------------------------------------------------ index callbacks

    def _released(self, payload: object) -> None:
        """The index dropped a payload (a removed node, or an insert that lost to an existing node)."""
        if not isinstance(payload, Residency):
            return
        with self._lock:
            payload.dropped = True
            copies, payload.copies = payload.copies, {}
            self.blocks.forget(payload, copies)
        if payload.node is not None:
            self.events.emit(EventKind.DROPPED, payload.key, None, payload.nbytes, payload.tenant)
        for slot in copies.values():
            self.free_slot(slot, payload.tenant)

    # ------------------------------------------------------------------ inspection

    def residency(self, node: BlockNode) -> Residency:
        if not isinstance(node.payload, Residency):
            raise TypeError("the node's payload is not a residency record of this hierarchy")
        return node.payload

    def _nodes_changed(self, nodes: list[BlockNode]) -> None:
        """The index changed these nodes' pin, leaf or ready state: their candidacy follows."""
        with self._lock:
            for node in nodes:
                if isinstance(node.payload, Residency):
                    self.blocks.update(node.payload)

    def oldest_movable(self, tier: Tier, nbytes: int) -> list[Residency]:
        """Unpinned, idle copies of ``tier``, least recently used first, up to ``nbytes`` of them: what a
        demotion may move down (moving a block's only copy to a lower tier keeps its chain whole)."""
        out, total = [], 0
        with self._lock:
            for r in self.blocks.movable(tier):
                if total >= nbytes:
                    break
                out.append(r)
                total += r.nbytes
        return out

    def blocks_in(self, tier: Tier) -> list[Residency]:
        with self._lock:
            return self.blocks.resident(tier)
