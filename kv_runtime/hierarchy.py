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
taken from the block manager's candidate sets (``block_manager.py``), which the index and this class keep
current, in the order of each tier's named eviction policy (``lru`` unless configured, swappable while
serving): finding a victim never scans. Blocks recovered from disk after a restart that no
request has linked yet are the disk tier's first victims. Demotion (copying down before dropping) is a
migration and is planned by policy.

Room made by eviction is room for the allocation that asked for it. A DDR (or HBM) slot is free the moment its
block is dropped. A disk slot whose block was published in the store is free only once its record is deleted
(so no record can ever point at a slot a newer block reuses); :meth:`HierarchyManager.allocate_async` therefore
evicts, awaits those deletions and then allocates, one disk allocation at a time.

Every block that could not be cached (no room, a write error, a parent evicted meanwhile, ...) is counted per tier
and reason (:meth:`HierarchyManager.note_failure`, :meth:`HierarchyManager.stats`) and logged once per tier and
reason: no room is expected and logged at INFO, anything else is a WARNING.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_runtime.block_manager import BlockManager
from kv_runtime.events import EventKind, EventLog
from kv_runtime.pool import DDRPool, DiskPool, KVPool, PoolFullError, Slot, Tier
from kv_runtime.quota import QuotaManager, QuotaPressure
from prefix_reuse import BlockNode, PinnedError, PrefixReuseIndex, RequestKeys, StaleNodeError

log = logging.getLogger(__name__)

NO_ROOM = "no_room"
"""A cache failure's reason: the tier (or the tenant's quota) had no room after eviction. Expected under load."""
WRITE_ERROR = "write_error"  # the tier's copy could not be written (a disk I/O error)
REFUSED = "refused"  # the store refused the write (its slot or name still in use)
PARENT_EVICTED = "parent_evicted"  # the chain's parent left the index before the blocks were published
ERROR = "error"  # anything else (a bug): logged with its traceback, once
DISK_ALLOCATION_TRIES = 3  # evict-and-reap rounds of one disk allocation before it gives up


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
        eviction: Mapping[Tier, str] | None = None,
    ) -> None:
        if not pools:
            raise ValueError("a hierarchy needs at least one tier")
        self.pools: dict[Tier, KVPool] = {Tier(t): p for t, p in pools.items()}
        for tier, pool in self.pools.items():
            if pool.tier is not tier:
                raise ValueError(f"pool for {tier.name} is a {pool.tier.name} pool")
        self.quotas = quotas or QuotaManager()
        self.events = events or EventLog()
        self.blocks = BlockManager(self.pools, self.quotas, eviction)
        self.index = PrefixReuseIndex(on_release=self._released, on_change=self._nodes_changed)
        self._lock = threading.RLock()
        # One disk allocation at a time: the extents its eviction frees (once their records are deleted) are its.
        self._disk_room = asyncio.Lock()
        # Blocks that could not be cached, per (tier, reason); the first of each is logged.
        self.failures: Counter[tuple[Tier, str]] = Counter()
        self._failures_logged: set[tuple[Tier, str]] = set()
        self.recovered_evicted = 0
        self._free_when_idle: list[tuple[Slot, str]] = []  # discarded copies whose slot a read still uses
        self.quotas.on_pressure(self._evict_for_quota)

    # ------------------------------------------------------------------ allocation under quota

    def pool(self, tier: Tier) -> KVPool:
        return self.blocks.pool(tier)

    def allocate(self, tier: Tier, sizes: Sequence[int], tenant: str) -> list[Slot]:
        """Slots for blocks of ``sizes`` bytes, counted against quotas; evicts to make room if needed.

        For the disk tier use :meth:`allocate_async`: here a disk victim's extent returns only after its record
        is deleted, later, so an allocation that has to evict on disk fails with :class:`PoolFullError`."""
        with self._lock:
            return self.blocks.allocate(tier, sizes, tenant, self.evict)

    async def allocate_async(self, tier: Tier, sizes: Sequence[int], tenant: str) -> list[Slot]:
        """:meth:`allocate` for the event loop; on disk the eviction's room is this allocation's.

        A full disk tier evicts, awaits the deletion of the victims' records (``DiskPool.reap``) and allocates in
        their extents, holding the tier's allocation lock throughout so that no other disk allocation takes them
        meanwhile. Raises :class:`PoolFullError` only when eviction finds nothing more to free.
        """
        pool = self.pool(tier)
        if not isinstance(pool, DiskPool):
            return self.allocate(tier, sizes, tenant)
        need = self.blocks.reserve_total(pool, sizes)
        async with self._disk_room:
            for attempt in range(DISK_ALLOCATION_TRIES):
                await pool.reap()
                with self._lock:
                    try:
                        return self.blocks.allocate(tier, sizes, tenant)
                    except PoolFullError:
                        if attempt == DISK_ALLOCATION_TRIES - 1:
                            raise
                    # Room a quota eviction freed may still be retiring (it returns with the next reap): only
                    # when nothing is, evict; nothing left to evict means no room.
                    if not pool.retiring and not self.evict(tier, need):
                        raise PoolFullError(f"{tier.name}: no room for {need} bytes and nothing left to evict")
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ blocks that could not be cached

    def note_failure(self, tier: Tier, reason: str, blocks: int, detail: object = None) -> None:
        """Count ``blocks`` that could not be cached in ``tier`` for ``reason``; log the first of each (tier,
        reason): no room at INFO (expected when the tier is full of pinned or in-flight blocks), anything else
        as a WARNING, with the traceback only for an unexpected exception (``ERROR``)."""
        tier = Tier(tier)
        key = (tier, reason)
        with self._lock:
            self.failures[key] += blocks
            first = key not in self._failures_logged
            self._failures_logged.add(key)
        if not first:
            return
        what = f"kvtier: {blocks} blocks not cached in {tier.name} ({reason})"
        more = "; further ones are only counted (hierarchy stats, cache_failures)"
        if reason == NO_ROOM:
            log.info("%s: %s%s", what, detail, more)
        elif reason == ERROR and isinstance(detail, BaseException):
            log.warning("%s%s", what, more, exc_info=detail)
        else:
            log.warning("%s: %s%s", what, detail, more)

    def stats(self) -> dict[str, Any]:
        """Plain counters: blocks resident per tier, blocks not cached per tier and reason, recovered blocks
        waiting for a request and those evicted, the disk pool's retiring slots and failed deletes."""
        with self._lock:
            failures: dict[str, dict[str, int]] = {}
            for (tier, reason), n in sorted(self.failures.items()):
                failures.setdefault(tier.name.lower(), {})[reason] = n
            out: dict[str, Any] = {
                "blocks": {t.name.lower(): len(self.blocks.resident(t)) for t in self.pools},
                "cache_failures": failures,
                "recovered": {
                    "waiting": self.blocks.num_recovered(Tier.DISK) if Tier.DISK in self.pools else 0,
                    "evicted": self.recovered_evicted,
                },
            }
        disk = self.pools.get(Tier.DISK)
        if isinstance(disk, DiskPool):
            out["disk"] = {
                "retiring": disk.retiring,
                "delete_errors": disk.delete_errors,
                "overlapping_records": disk.overlapping_records,
            }
        return out

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
        if Tier.DISK in self.pools and self.blocks.num_recovered(Tier.DISK) and len(nodes) < rk.num_blocks:
            ns = rk.namespace.digest
            slots: list[Slot] = []
            with self._lock:
                for i in range(len(nodes), rk.num_blocks):
                    slot = self.blocks.claim_recovered(Tier.DISK, (ns, disk_key(rk.keys[i], rk.checks[i])))
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
        """Remember every block the disk pool holds (after a restart) until a request links it; returns how many.

        They are eviction candidates meanwhile, the disk tier's first victims (``block_manager.py``), so blocks
        of another cache salt or model, which no request here will ever name, make room for new ones."""
        pool = self.pool(Tier.DISK)
        with self._lock:
            known = {id(r.copies.get(Tier.DISK)) for r in self.blocks.resident(Tier.DISK)}
            for slot in pool.live_slots():
                if slot.record is not None and id(slot) not in known:
                    self.blocks.recover(Tier.DISK, (bytes(slot.record.namespace), bytes(slot.record.key)), slot)
            return self.blocks.num_recovered(Tier.DISK)

    def claim_recovered(self, res: Residency) -> bool:
        """Link a recovered disk record of ``res``'s block as its disk copy (a block computed again whose copy
        survived a restart, its chain's earlier blocks having been evicted): no write needed, and the store
        would refuse a second record of the same name. Returns whether there was one."""
        node = res.node
        if node is None or Tier.DISK not in self.pools or not self.blocks.num_recovered(Tier.DISK):
            return False
        name = (bytes(node.namespace), disk_key(node.key, node.check))
        with self._lock:
            slot = self.blocks.claim_recovered(Tier.DISK, name)
        if slot is None:
            return False
        if slot.nbytes != res.nbytes:  # not this block after all (another layout under the same name)
            with self._lock:
                self.blocks.recover(Tier.DISK, name, slot)
            return False
        try:
            self.quotas.reserve(Tier.DISK, res.tenant, slot.capacity)
        except MemoryError:
            with self._lock:
                self.blocks.recover(Tier.DISK, name, slot)
            return False
        if self.add_copy(res, Tier.DISK, slot):
            self.events.emit(EventKind.RECOVERED, res.key, Tier.DISK, res.nbytes, res.tenant)
        return True

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

    def drop_copy(self, res: Residency, tier: Tier, *, kind: EventKind = EventKind.REMOVED) -> bool:
        """Free one tier's copy; returns whether it went. Dropping the last copy removes the block (and its
        subtree) from the index.

        A copy another migration is reading (its slot is busy) stays: it is redundant, so an eviction candidate
        once that copy ends. (Freeing it here would fail with the copy already forgotten: a slot lost for good.)
        """
        with self._lock:
            if tier not in res.copies:
                return False
            if len(res.copies) == 1 and res.node is not None:
                self.index.remove(res.node)  # raises PinnedError for leased blocks; _released frees the slot
                return True
            slot = res.copies[tier]
            if slot.busy:
                return False
            del res.copies[tier]
            self.blocks.update(res)
        self.events.emit(kind, res.key, tier, res.nbytes, res.tenant)
        self.free_slot(slot, res.tenant)
        return True

    def discard_invalid(self, res: Residency, tier: Tier) -> None:
        """A copy proved unreadable: forget it (a miss, counted); never hand its bytes out. Its slot is freed
        at once, or when the last migration still reading it (another request's promotion) ends."""
        with self._lock:
            slot = res.copies.pop(tier, None)
            if slot is None:
                return
            self.blocks.update(res)
            last = not res.copies
            busy = bool(slot.busy)
            if busy:
                self._free_when_idle.append((slot, res.tenant))
        self.events.emit(EventKind.MISS, res.key, tier, res.nbytes, res.tenant)
        if not busy:
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
            idle = [(s, t) for s, t in self._free_when_idle if not s.busy] if self._free_when_idle else ()
            if idle:
                self._free_when_idle = [(s, t) for s, t in self._free_when_idle if s.busy]
        for slot, tenant in idle:
            self.free_slot(slot, tenant)
        self.index.unpin([r.node for r in residencies if r.node is not None])
        del tiers  # the tiers are implied by the slots; kept for symmetry with lease()

    # ------------------------------------------------------------------ eviction

    def evict(self, tier: Tier, needed_bytes: int, tenant: str | None = None, *, include_recovered: bool = True) -> int:
        """Free at least ``needed_bytes`` in ``tier`` (of ``tenant`` if given: least recently used first).

        Victims are the tier's policy's choices among the block manager's candidates (amortised O(1) each for
        LRU): never a pinned block, one with a
        migration in flight, or the only copy of a block that others hang under. A redundant copy (another tier
        holds the block) is simply dropped; a leaf's only copy goes with its node, and its parent, now a leaf,
        is the next victim. Recovered blocks no request has linked go first (``include_recovered``, and no
        ``tenant``: they count against no tenant's quota). Returns the bytes freed (on disk: retiring until
        their records are deleted, see :meth:`allocate_async`).
        """
        freed = 0
        deferred = 0
        with self._lock:
            if include_recovered and tenant is None:
                freed = self._evict_recovered(tier, needed_bytes)
            while freed < needed_bytes:
                # The tier's policy picks (the victim leaves it; one that stays goes back through update or
                # defer); quota pressure on a tenant takes that tenant's least recently used candidate.
                res = self.blocks.next_victim(tier) if tenant is None else self.blocks.first_candidate(tier, tenant)
                if res is None:
                    break
                slot = res.copies[tier]
                node = res.node
                assert node is not None  # candidates are indexed blocks
                if node.pin_count or res.in_flight:  # pinned since the set was last told: never a victim
                    self.blocks.update(res)
                    continue
                if slot.busy or slot.moving:  # defragmentation is moving it: it goes when that ends
                    self.blocks.defer(res, tier)
                    if deferred >= self.blocks.num_candidates(tier):
                        break
                    deferred += 1
                    continue
                if len(res.copies) > 1:
                    self.drop_copy(res, tier, kind=EventKind.EVICTED)
                else:
                    parent = node.parent
                    if parent is not None and isinstance(parent.payload, Residency):
                        self.blocks.pending_next = (parent.payload, tier)  # if it becomes a candidate: next
                    try:
                        self.index.remove(node)
                    except (PinnedError, StaleNodeError):  # a lease raced us; the index has the truth
                        self.blocks.pending_next = None
                        self.blocks.update(res)
                        if self.blocks.is_candidate(res, tier):
                            self.blocks.defer(res, tier)
                            if deferred >= self.blocks.num_candidates(tier):
                                break
                            deferred += 1
                        continue
                    self.events.emit(EventKind.EVICTED, res.key, tier, res.nbytes, res.tenant)
                    if parent is not None and isinstance(parent.payload, Residency):
                        self.blocks.to_front(parent.payload, tier)  # clears pending_next
                freed += slot.capacity
        return freed

    def set_eviction_policy(self, tier: Tier, name: str) -> None:
        """Order ``tier``'s victims by the named policy (``kv_policy.EVICTION_POLICIES``) from now on, while
        serving: the new policy is built from the tier's current copies under the lock eviction takes, so no
        eviction sees a half-built policy and no block is lost. A ``ValueError`` for an unknown name or tier."""
        with self._lock:
            self.blocks.set_policy(Tier(tier), name)

    def eviction_policies(self) -> dict[str, str]:
        """Each tier's eviction policy by name, e.g. ``{"ddr": "lru", "disk": "lru"}``."""
        with self._lock:
            return {t.name.lower(): self.blocks.policy_name(t) for t in self.pools}

    def _evict_recovered(self, tier: Tier, needed_bytes: int) -> int:
        """Free recovered, unlinked slots of ``tier``, first victims first, until ``needed_bytes``; the caller
        holds the lock. They hold no quota, so their slots go straight back to the pool."""
        freed = deferred = 0
        pool = self.pools[tier]
        while freed < needed_bytes:
            first = self.blocks.first_recovered(tier)
            if first is None:
                break
            name, slot = first
            if slot.busy or slot.moving:  # defragmentation is moving it
                if deferred >= self.blocks.num_recovered(tier):
                    break
                deferred += 1
                self.blocks.defer_recovered(tier, name)
                continue
            self.blocks.claim_recovered(tier, name)
            pool.free(slot)
            self.recovered_evicted += 1
            self.events.emit(EventKind.EVICTED, name[1], tier, slot.nbytes, "")
            freed += slot.capacity
        return freed

    def _evict_for_quota(self, pressure: QuotaPressure) -> int:
        # Recovered blocks count against no quota: dropping them relieves none.
        return self.evict(pressure.tier, pressure.needed_bytes, pressure.tenant, include_recovered=False)

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
