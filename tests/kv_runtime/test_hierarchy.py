"""Residency kept consistent with the prefix index; eviction under quotas never touches pinned blocks."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import BLOCK_TOKENS, block_bytes, tokens

from kv_runtime.events import EventKind
from kv_runtime.hierarchy import HierarchyManager, Residency
from kv_runtime.pool import DDRPool, Tier
from kv_runtime.quota import QuotaExceededError, QuotaManager
from prefix_reuse import PinnedError

KIB = 1024


def check_consistent(h: HierarchyManager) -> None:
    """Every indexed block has a live copy; every live slot belongs to exactly one block's copy."""
    owners: dict[int, int] = {}
    nodes = list(h.index._nodes.values())
    for node in nodes:
        res = node.payload
        assert isinstance(res, Residency) and res.node is node and not res.dropped
        assert res.copies, "an indexed block without any copy"
        for tier, slot in res.copies.items():
            assert slot.tier is tier
            assert h.pools[tier].get_block_info(slot).refs >= 1
            owners[slot.id] = owners.get(slot.id, 0) + 1
    for tier, pool in h.pools.items():
        live = {s.id for s in pool.live_slots()}
        assert live == {sid for sid in owners if h.pools[tier]._slots.get(sid) is not None}
        assert all(owners[sid] == 1 for sid in live)
        assert h.quotas.usage(tier) == sum(s.capacity for s in pool.live_slots())
    for tier in h.pools:
        assert {id(r) for r in h.blocks_in(tier)} == {id(n.payload) for n in nodes if tier in n.payload.copies}


def make(capacity=256 * KIB, **quota) -> HierarchyManager:
    q = QuotaManager(quota.get("tiers"))
    return HierarchyManager({Tier.DDR: DDRPool(capacity, pin=False)}, quotas=q)


def put_blocks(h, keyer, seed, nblocks, nbytes=8 * KIB, tenant="", start=0, rk=None):
    rk = rk or keyer.request(tokens(seed, (start + nblocks) * BLOCK_TOKENS))
    data = torch.stack([block_bytes(seed * 1000 + start + i, nbytes) for i in range(nblocks)])
    return rk, h.put(rk, start, data, tenant=tenant), data


def test_put_match_read_back_and_events(keyer):
    h = make()
    rk, nodes, data = put_blocks(h, keyer, 1, 5)
    assert [n.depth for n in h.match(rk)] == list(range(5))
    ddr = h.pools[Tier.DDR]
    for node, row in zip(nodes, data, strict=True):
        assert torch.equal(ddr.view(node.payload.copies[Tier.DDR]), row)
    events = h.events.drain()
    assert [e.kind for e in events].count(EventKind.STORED) == 5
    assert [e.kind for e in events].count(EventKind.PUBLISHED) == 5
    check_consistent(h)


def test_insert_loser_slot_is_freed(keyer):
    h = make()
    rk, _, _ = put_blocks(h, keyer, 2, 3)
    used = h.pools[Tier.DDR].live_bytes
    put_blocks(h, keyer, 2, 3, rk=rk)  # same keys: the existing nodes win
    assert h.pools[Tier.DDR].live_bytes == used
    check_consistent(h)


def test_drop_copy_of_last_copy_removes_subtree(keyer):
    h = make()
    rk, nodes, _ = put_blocks(h, keyer, 3, 4)
    h.drop_copy(nodes[1].payload, Tier.DDR)
    assert len(h.index) == 1 and h.match(rk) == nodes[:1]
    assert h.events.count(EventKind.DROPPED) == 3
    check_consistent(h)
    h.index.pin(nodes[:1])
    with pytest.raises(PinnedError):
        h.drop(nodes[0])
    check_consistent(h)


def test_quota_eviction_lru_and_pinned_never_evicted(keyer):
    h = make(tiers={Tier.DDR: 10 * 8 * KIB})
    chains = [put_blocks(h, keyer, 10 + i, 2)[1] for i in range(5)]  # 10 blocks: tier full
    h.index.pin(chains[0])  # the oldest chain is leased
    h.match(keyer.request(tokens(11, 2 * BLOCK_TOKENS)))  # chain 1 becomes most recently used
    put_blocks(h, keyer, 99, 2)  # needs 2 blocks of room
    remaining = {n.payload.key for n in h.index._nodes.values()}
    assert all(n.payload.key in remaining for n in chains[0])  # pinned: untouched
    assert all(n.payload.key in remaining for n in chains[1])  # recently used
    evicted = [n for c in chains[2:] for n in c if n.payload.key not in remaining]
    assert set(map(id, evicted)) == set(map(id, chains[2]))  # a whole chain, leaf first
    assert h.events.count(EventKind.EVICTED, Tier.DDR) == 2
    check_consistent(h)


def test_tenant_quota(keyer):
    h = make()
    h.quotas.set_tenant_quota("a", Tier.DDR, 3 * 8 * KIB)
    put_blocks(h, keyer, 20, 3, tenant="a")
    put_blocks(h, keyer, 21, 3, tenant="b")
    put_blocks(h, keyer, 22, 2, tenant="a")  # evicts a's own leaves, never b's
    assert h.quotas.usage(Tier.DDR, "a") <= 3 * 8 * KIB
    assert h.quotas.usage(Tier.DDR, "b") == 3 * 8 * KIB
    h.index.pin([n for n in h.index._nodes.values() if n.payload.tenant == "a"])
    with pytest.raises(QuotaExceededError):
        put_blocks(h, keyer, 23, 1, tenant="a")
    check_consistent(h)
