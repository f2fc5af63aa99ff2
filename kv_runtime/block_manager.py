"""The block manager: slots per tier under quota, and per tier the set of copies that eviction may take.

A copy of a block in a tier is an eviction *candidate* exactly when

- the block is in the index, ready, not pinned by a lease (a request, a named context) and has no migration in
  flight, and
- dropping the copy loses nothing another block depends on: either another tier still holds the block, or the
  block is an index leaf (nothing below it in the tree needs it as a parent).

The candidate sets are kept current as blocks gain and lose users: the index reports every node whose pin, leaf
or ready state changed (``PrefixReuseIndex(on_change=...)``), and the hierarchy reports every change of copies
and in-flight counts. So finding a victim never scans: it is the first entry of the tier's set, O(1).

Beside them each tier keeps the *movable* copies (the same without the leaf rule): what a demotion may move
down, since moving a block's only copy to a lower tier keeps the chain whole.

Each set is ordered least recently used first (a use moves a block to the back). This ordering is the mechanism's
default; ranking victims by a named policy plugs in on top of the same sets. Sets are kept per tier and per
tier and tenant, so that quota pressure on one tenant finds that tenant's victims without walking the others'.

Blocks *recovered* from disk after a restart and not yet named by any request (the index needs a request's tokens
to link them) form one more set per tier, keyed by their on-disk name. They are that tier's first victims: their
last use was before this process started, so they are older than any block used since, and among themselves they
go in the order the store listed them (slab, offset). This is what keeps a tier that a previous run (or another
cache salt, or another model) filled from refusing every new block. A recovered block a request links becomes
an ordinary block and leaves this set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from kv_runtime.pool import DDRPool, DiskPool, KVPool, PoolFullError, Slot
from kv_runtime.quota import QuotaManager
from kv_runtime.tier import Tier

if TYPE_CHECKING:
    from collections.abc import Callable

    from kv_runtime.hierarchy import Residency


class BlockManager:
    """Slots of every tier (allocation under quota, reference counts through the pools) and the candidate sets.

    Not locked on its own: the hierarchy calls it under its lock.
    """

    def __init__(self, pools: Mapping[Tier, KVPool], quotas: QuotaManager) -> None:
        self.pools = dict(pools)
        self.quotas = quotas
        # Every block holding a copy in a tier, and the subset that eviction may take, oldest use first.
        self._resident: dict[Tier, dict[Residency, None]] = {t: {} for t in self.pools}
        self._candidates: dict[Tier, OrderedDict[Residency, None]] = {t: OrderedDict() for t in self.pools}
        self._movable: dict[Tier, OrderedDict[Residency, None]] = {t: OrderedDict() for t in self.pools}
        self._by_tenant: dict[tuple[Tier, str], OrderedDict[Residency, None]] = {}
        # Recovered slots no request has linked yet, by (namespace digest, disk key), first victims first.
        self._recovered: dict[Tier, OrderedDict[tuple[bytes, bytes], Slot]] = {t: OrderedDict() for t in self.pools}

    # ------------------------------------------------------------------ slots

    def pool(self, tier: Tier) -> KVPool:
        try:
            return self.pools[tier]
        except KeyError:
            raise ValueError(f"this hierarchy has no {Tier(tier).name} tier") from None

    def allocate(
        self, tier: Tier, sizes: Sequence[int], tenant: str, make_room: Callable[[Tier, int], int] | None = None
    ) -> list[Slot]:
        """Slots for blocks of ``sizes`` bytes, counted against quotas; ``make_room(tier, bytes)`` is asked
        once to free space when the pool is full (without it, a full pool raises :class:`PoolFullError`)."""
        pool = self.pool(tier)
        reserve = self.reserve_total(pool, sizes)
        self.quotas.reserve(tier, tenant, reserve)
        try:
            try:
                return pool.allocate_many(sizes)
            except PoolFullError:
                if make_room is None:
                    raise
                make_room(tier, reserve)
                return pool.allocate_many(sizes)
        except BaseException:
            self.quotas.release(tier, tenant, reserve)
            raise

    def free_slot(self, slot: Slot, tenant: str) -> None:
        """Drop one reference to a slot; its quota is returned when its space is."""
        capacity = slot.capacity
        if self.pools[slot.tier].free(slot):
            self.quotas.release(slot.tier, tenant, capacity)

    @staticmethod
    def reserve_size(pool: KVPool, nbytes: int) -> int:
        """The bytes a block of ``nbytes`` takes in ``pool`` (extents are aligned; HBM cells are exact)."""
        return pool.reserve_bytes(nbytes) if isinstance(pool, (DDRPool, DiskPool)) else nbytes

    @classmethod
    def reserve_total(cls, pool: KVPool, sizes: Sequence[int]) -> int:
        return sum(cls.reserve_size(pool, n) for n in sizes)

    # ------------------------------------------------------------------ recovered blocks

    def recover(self, tier: Tier, name: tuple[bytes, bytes], slot: Slot) -> None:
        """A slot found in ``tier`` after a restart, named ``(namespace digest, disk key)``: a candidate (the
        first victims, see the module docstring) until a request claims it."""
        self._recovered[tier][name] = slot

    def claim_recovered(self, tier: Tier, name: tuple[bytes, bytes]) -> Slot | None:
        """Take a recovered slot out of the set (a request links it into the index), or None."""
        return self._recovered[tier].pop(name, None)

    def first_recovered(self, tier: Tier) -> tuple[tuple[bytes, bytes], Slot] | None:
        """The next recovered victim of ``tier``, O(1), or None."""
        rec = self._recovered[tier]
        return next(iter(rec.items())) if rec else None

    def defer_recovered(self, tier: Tier, name: tuple[bytes, bytes]) -> None:
        """A recovered slot that cannot go now (defragmentation is moving it) goes to the back of the set."""
        self._recovered[tier].move_to_end(name)

    def num_recovered(self, tier: Tier) -> int:
        return len(self._recovered.get(tier, ()))

    def is_recovered(self, tier: Tier, slot: Slot) -> bool:
        rec = self._recovered.get(tier)
        return rec is not None and slot.record is not None and rec.get(_name(slot)) is slot

    # ------------------------------------------------------------------ residency and candidacy

    def update(self, res: Residency) -> None:
        """Recompute where ``res`` is resident and where it is a candidate, after any change to it."""
        if res.dropped:
            self.forget(res)
            return
        for tier in self.pools:
            slot = res.copies.get(tier)
            if slot is None:
                self._resident[tier].pop(res, None)
                self._movable[tier].pop(res, None)
                self._uncandidate(res, tier)
                continue
            self._resident[tier][res] = None
            if self._is_movable(res):
                if res not in self._movable[tier]:
                    self._movable[tier][res] = None
            else:
                self._movable[tier].pop(res, None)
            if self._is_movable(res) and (len(res.copies) > 1 or res.node.num_children == 0):
                if res not in self._candidates[tier]:
                    self._candidates[tier][res] = None
                    self._tenant_set(tier, res.tenant)[res] = None
            elif res in self._candidates[tier]:
                self._uncandidate(res, tier)

    def forget(self, res: Residency, tiers: Iterable[Tier] | None = None) -> None:
        """``res`` left the index: it is nowhere resident and no candidate (``tiers``: where it had copies,
        if known; every tier otherwise)."""
        for tier in self.pools if tiers is None else tiers:
            self._resident[tier].pop(res, None)
            self._movable[tier].pop(res, None)
            self._uncandidate(res, tier)

    def touch(self, res: Residency) -> None:
        """A use: ``res`` moves to the most recently used end of each set it is in."""
        for tier in res.copies:
            movable = self._movable.get(tier)
            if movable is not None and res in movable:
                movable.move_to_end(res)
            cands = self._candidates.get(tier)
            if cands is not None and res in cands:
                cands.move_to_end(res)
                self._tenant_set(tier, res.tenant).move_to_end(res)

    def first_candidate(self, tier: Tier, tenant: str | None = None) -> Residency | None:
        """The least recently used candidate of ``tier`` (of ``tenant`` if given), O(1)."""
        cands = self._candidates[tier] if tenant is None else self._by_tenant.get((tier, tenant))
        if not cands:
            return None
        return next(iter(cands))

    def defer(self, res: Residency, tier: Tier) -> None:
        """Move a candidate that cannot go right now (its slot is busy) to the back of the tier's sets."""
        if res in self._candidates[tier]:
            self._candidates[tier].move_to_end(res)
            self._tenant_set(tier, res.tenant).move_to_end(res)

    def to_front(self, res: Residency, tier: Tier) -> None:
        """Make ``res`` the next victim of ``tier`` (a parent whose last child was just evicted)."""
        if res in self._candidates[tier]:
            self._candidates[tier].move_to_end(res, last=False)
            self._tenant_set(tier, res.tenant).move_to_end(res, last=False)

    def candidates(self, tier: Tier) -> Iterator[Residency]:
        """The tier's candidates, least recently used first (the caller holds the hierarchy's lock)."""
        return iter(self._candidates[tier])

    def resident(self, tier: Tier) -> list[Residency]:
        return list(self._resident[tier])

    def num_candidates(self, tier: Tier) -> int:
        return len(self._candidates[tier])

    def is_candidate(self, res: Residency, tier: Tier) -> bool:
        return res in self._candidates.get(tier, ())

    def movable(self, tier: Tier) -> Iterator[Residency]:
        """The tier's unpinned, idle copies, least recently used first: what a demotion may move down (the
        caller holds the hierarchy's lock)."""
        return iter(self._movable[tier])

    @staticmethod
    def _is_movable(res: Residency) -> bool:
        node = res.node
        return node is not None and not res.in_flight and not node.pin_count and node.ready

    def _uncandidate(self, res: Residency, tier: Tier) -> None:
        cands = self._candidates[tier]
        if res not in cands:
            return
        del cands[res]
        key = (tier, res.tenant)
        per_tenant = self._by_tenant.get(key)
        if per_tenant is not None:
            per_tenant.pop(res, None)
            if not per_tenant:
                del self._by_tenant[key]

    def _tenant_set(self, tier: Tier, tenant: str) -> OrderedDict[Residency, None]:
        key = (tier, tenant)
        cands = self._by_tenant.get(key)
        if cands is None:
            cands = self._by_tenant[key] = OrderedDict()
        return cands


def _name(slot: Slot) -> tuple[bytes, bytes]:
    return (bytes(slot.record.namespace), bytes(slot.record.key))
