"""The block manager: slots per tier under quota, and per tier the set of copies that eviction may take.

A copy of a block in a tier is an eviction *candidate* exactly when

- the block is in the index, ready, not pinned by a lease (a request, a named context) and has no migration in
  flight, and
- dropping the copy loses nothing another block depends on: either another tier still holds the block, or the
  block is an index leaf (nothing below it in the tree needs it as a parent).

The candidate sets are kept current as blocks gain and lose users: the index reports every node whose pin, leaf
or ready state changed (``PrefixReuseIndex(on_change=...)``), and the hierarchy reports every change of copies
and in-flight counts. So finding a victim never scans.

Beside them each tier keeps the *movable* copies (the same without the leaf rule): what a demotion may move
down, since moving a block's only copy to a lower tier keeps the chain whole.

Which candidate goes first is each tier's :class:`kv_policy.EvictionPolicy`, chosen by name (``set_policy``,
``lru`` by default). This class is the bridge from what the tier sees to the policy: the policy holds exactly the
tier's *eligible* copies (candidates, plus copies that would be candidates but for a pin or a migration in
flight), is told of every use (``access``), and holds a pinned or in-flight copy as pinned (``pin``/``unpin``),
so a block keeps its history (its frequency, say) while a request uses it. LRU, whose only history is the last
use, holds just the candidates (``ORDER_ONLY``). Either way the policy's unpinned blocks are exactly the tier's
candidates, and ``pop_victim`` is the next victim. A parent whose last child an eviction just took is
the next victim, whatever the policy: the policy gave up that chain's tail, and the parent's last use was no
later than its child's. Such parents wait in a queue of their own, outside the policy, until they go (or a use
or a pin hands them to the policy): a chain's eviction then costs the policy nothing per block.

Each tier also keeps its candidates least recently used first (a use moves a block to the back), per tier and
per tier and tenant: quota pressure on one tenant takes that tenant's least recently used candidates without
walking the others', and a policy swapped in is filled in this order.

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

from kv_policy.eviction import EVICTION_POLICIES, EvictionPolicy, make_eviction_policy
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

    def __init__(
        self, pools: Mapping[Tier, KVPool], quotas: QuotaManager, policies: Mapping[Tier, str] | None = None
    ) -> None:
        self.pools = dict(pools)
        self.quotas = quotas
        # Every block holding a copy in a tier, and the subset that eviction may take, oldest use first.
        self._resident: dict[Tier, dict[Residency, None]] = {t: {} for t in self.pools}
        self._candidates: dict[Tier, OrderedDict[Residency, None]] = {t: OrderedDict() for t in self.pools}
        self._movable: dict[Tier, OrderedDict[Residency, None]] = {t: OrderedDict() for t in self.pools}
        self._by_tenant: dict[tuple[Tier, str], OrderedDict[Residency, None]] = {}
        # Recovered slots no request has linked yet, by (namespace digest, disk key), first victims first.
        self._recovered: dict[Tier, OrderedDict[tuple[bytes, bytes], Slot]] = {t: OrderedDict() for t in self.pools}
        # Each tier's eviction policy, and the copies it holds (True: held pinned, in use or in flight).
        self._policies: dict[Tier, EvictionPolicy] = {}
        self._held: dict[Tier, dict[Residency, bool | str]] = {t: {} for t in self.pools}
        # Parents whose last child an eviction just took: the tier's next victims, before the policy's (held as
        # NEXT, outside the policy). ``pending_next``: (parent, tier) of the block the hierarchy is evicting.
        self._next: dict[Tier, OrderedDict[Residency, None]] = {t: OrderedDict() for t in self.pools}
        self.pending_next: tuple[Residency, Tier] | None = None
        self._keeps_pinned: dict[Tier, bool] = {}
        self._clock = 0  # a logical clock of uses, the policies' ``now``
        for tier in self.pools:
            name = (policies or {}).get(tier, DEFAULT_POLICY)
            self._policies[tier] = make_policy(name)
            self._keeps_pinned[tier] = name not in ORDER_ONLY

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
                if res in self._held[tier]:
                    self._hold(res, tier, None)
                continue
            self._resident[tier][res] = None
            node = res.node
            movable = self._is_movable(res)
            if movable:
                if res not in self._movable[tier]:
                    self._movable[tier][res] = None
            else:
                self._movable[tier].pop(res, None)
            eligible = node is not None and node.ready and (len(res.copies) > 1 or node.num_children == 0)
            if movable and eligible:
                if res not in self._candidates[tier]:
                    self._candidates[tier][res] = None
                    self._tenant_set(tier, res.tenant)[res] = None
            elif res in self._candidates[tier]:
                self._uncandidate(res, tier)
            # How the tier's policy holds it: not at all (None), pinned (True) or as a candidate (False).
            want = None if not eligible or (not movable and not self._keeps_pinned[tier]) else not movable
            if self._held[tier].get(res) is not want:
                self._hold(res, tier, want)

    def forget(self, res: Residency, tiers: Iterable[Tier] | None = None) -> None:
        """``res`` left the index: it is nowhere resident and no candidate (``tiers``: where it had copies,
        if known; every tier otherwise)."""
        for tier in self.pools if tiers is None else tiers:
            self._resident[tier].pop(res, None)
            self._movable[tier].pop(res, None)
            self._uncandidate(res, tier)
            if res in self._held[tier]:
                self._hold(res, tier, None)

    def touch(self, res: Residency) -> None:
        """A use: ``res`` moves to the most recently used end of each set it is in, and each tier's policy that
        holds it is told."""
        self._clock += 1
        for tier in res.copies:
            held = self._held.get(tier)
            if held is not None and res in held:
                if held[res] is NEXT:  # used again: no longer the chain's next victim, a block of the policy's
                    self._hold(res, tier, None)
                    self._hold(res, tier, False)
                else:
                    self._policies[tier].access(res, self._clock)
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

    def next_victim(self, tier: Tier) -> Residency | None:
        """Take the next victim of ``tier`` out of its policy: a parent :meth:`to_front` named, else the
        policy's choice; None when there is no candidate. Amortised O(1) per victim for LRU.

        The victim stays a candidate until its copy goes (``update``/``forget``); one that cannot go now goes
        back through :meth:`defer` (or :meth:`update`, if it was pinned meanwhile)."""
        nxt = self._next[tier]
        if nxt:
            res, _ = nxt.popitem(last=False)
            del self._held[tier][res]
            return res
        popped = self._policies[tier].pop_victim()
        if popped is None:
            return None
        res = popped[0]
        del self._held[tier][res]
        return res

    def defer(self, res: Residency, tier: Tier) -> None:
        """Move a candidate that cannot go right now (its slot is busy) to the back of the tier's sets (its
        policy takes it again as a new block)."""
        if res in self._candidates[tier]:
            self._candidates[tier].move_to_end(res)
            self._tenant_set(tier, res.tenant).move_to_end(res)
            if res in self._held[tier]:
                self._hold(res, tier, None)
            self.update(res)

    def to_front(self, res: Residency, tier: Tier) -> None:
        """Make ``res`` the next victim of ``tier`` (a parent whose last child was just evicted): it leaves the
        policy for the tier's queue of next victims (``pending_next`` saves it the trip through the policy)."""
        self.pending_next = None
        if res in self._candidates[tier]:
            self._candidates[tier].move_to_end(res, last=False)
            self._tenant_set(tier, res.tenant).move_to_end(res, last=False)
            if self._held[tier].get(res) is not NEXT:
                self._hold(res, tier, None)
                self._held[tier][res] = NEXT
                self._next[tier][res] = None

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

    # ------------------------------------------------------------------ eviction policies

    def policy(self, tier: Tier) -> EvictionPolicy:
        """The policy that orders ``tier``'s victims (the caller holds the hierarchy's lock to use it)."""
        return self._policies[tier]

    def policy_name(self, tier: Tier) -> str:
        return self._policies[tier].name

    def set_policy(self, tier: Tier, name: str) -> EvictionPolicy:
        """Order ``tier``'s victims by the policy named ``name`` from now on (the caller holds the lock eviction
        takes). The new policy is filled with the tier's candidates, least recently used first, then (if it
        holds them) the pinned eligible copies, pinned; it is built in full before it replaces the old one, so no
        block is lost and no candidate is missed. What the old policy learned beyond the order of recency
        (frequencies, ghosts) does not carry over. O(blocks in the tier)."""
        self.pool(tier)  # a tier this hierarchy has
        policy = make_policy(name)
        old = self._policies[tier], self._held[tier], self._keeps_pinned[tier]
        nexts = dict.fromkeys(self._next[tier], NEXT)  # the next victims stay next, outside any policy
        self._policies[tier], self._held[tier], self._keeps_pinned[tier] = policy, nexts, name not in ORDER_ONLY
        try:
            self._clock += 1
            held = self._held[tier]
            for res in list(self._candidates[tier]):
                if res not in held:
                    self._hold(res, tier, False)
            for res in list(self._resident[tier]):
                if res not in held:
                    self.update(res)  # an eligible pinned copy, for a policy that holds them
        except BaseException:
            self._policies[tier], self._held[tier], self._keeps_pinned[tier] = old
            raise
        return policy

    def _hold(self, res: Residency, tier: Tier, want: bool | None) -> None:
        """Hold ``res`` in ``tier``'s policy as ``want`` says: not at all (None), pinned (True) or unpinned; a
        next victim (``NEXT``) stays one while it is a candidate."""
        held = self._held[tier]
        state = held.get(res)
        if state is NEXT:
            if want is False:
                return
            del self._next[tier][res]
            del held[res]
            state = None
        policy = self._policies[tier]
        if want is None:
            if state is not None:
                policy.remove(res)
                del held[res]
            return
        if state is None:
            pending = self.pending_next
            if not want and pending is not None and pending[0] is res and pending[1] is tier:
                held[res] = NEXT  # the parent of a block being evicted, about to be the next victim
                self._next[tier][res] = None
                return
            self._insert(policy, res)
            if want:
                policy.pin(res)
        elif want:
            policy.pin(res)
        else:
            policy.unpin(res)
        held[res] = want

    def _insert(self, policy: EvictionPolicy, res: Residency) -> None:
        # NOTE: no parent: the candidate rule already keeps a block's only copy while others hang under it, and
        # a redundant copy may go before its children (the chain stays whole in the other tier).
        node = res.node
        policy.insert(res, size_bytes=res.nbytes or 1, depth=node.depth if node is not None else 0, now=self._clock)

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


NEXT = "next"
"""How the block manager holds a tier's next victim (a parent whose last child just went): outside the policy."""

DEFAULT_POLICY = "lru"
"""Each tier's eviction policy unless the configuration names another."""

ORDER_ONLY = frozenset({"lru"})
"""Policies whose order is the last use alone. A block that a request releases is as recent as any, which taking
it in again as a new block gives exactly: these policies hold only candidates, so they never step over pins."""


def policy_names() -> list[str]:
    """The names :meth:`BlockManager.set_policy` accepts."""
    return sorted(EVICTION_POLICIES)


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by name; a ``ValueError`` naming the known ones for an unknown name."""
    if name not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(policy_names())}")
    return make_eviction_policy(name)


def _name(slot: Slot) -> tuple[bytes, bytes]:
    return (bytes(slot.record.namespace), bytes(slot.record.key))
