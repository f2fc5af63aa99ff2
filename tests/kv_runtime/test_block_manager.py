"""The block manager's candidate sets: exactly the copies eviction may take, kept current without scans.

Every test compares the incrementally kept sets with a dumb reference computed from scratch (every copy of every
indexed block, judged by the rule), under sequences of inserts, pins, leases, extra copies and evictions.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import BLOCK_TOKENS, tokens

from kv_runtime.hierarchy import HierarchyManager, Residency
from kv_runtime.pool import DDRPool, DiskPool, Tier
from prefix_reuse import BlockKeyer, KeyNamespace

KIB = 1024
NBYTES = 4 * KIB
KEYER = BlockKeyer(KeyNamespace(model_id="bm-test@1", kv_dtype="float16", block_size=BLOCK_TOKENS))


def reference_candidates(h: HierarchyManager, tier: Tier) -> set[int]:
    """The rule, from scratch: an indexed, ready, unpinned block with nothing in flight, whose copy in ``tier``
    is redundant or whose node is a leaf."""
    out = set()
    for node in list(h.index._nodes.values()):
        res: Residency = node.payload
        if tier not in res.copies or res.in_flight or node.pin_count or not node.ready:
            continue
        if len(res.copies) > 1 or node.num_children == 0:
            out.add(id(res))
    return out


def kept_candidates(h: HierarchyManager, tier: Tier) -> set[int]:
    return {id(r) for r in h.blocks._candidates[tier]}


def reference_movable(h: HierarchyManager, tier: Tier) -> set[int]:
    """What a demotion may move: every indexed, ready, unpinned block with a copy in ``tier`` and nothing in flight."""
    return {
        id(n.payload)
        for n in list(h.index._nodes.values())
        if tier in n.payload.copies and not n.payload.in_flight and not n.pin_count and n.ready
    }


def check(h: HierarchyManager) -> None:
    for tier in h.pools:
        assert kept_candidates(h, tier) == reference_candidates(h, tier)
        assert {id(r) for r in h.blocks.movable(tier)} == reference_movable(h, tier)
        by_tenant = {id(r) for (t, _), rs in h.blocks._by_tenant.items() if t is tier for r in rs}
        assert by_tenant == kept_candidates(h, tier)


def ddr_hierarchy(nblocks: int = 64) -> HierarchyManager:
    return HierarchyManager({Tier.DDR: DDRPool(nblocks * NBYTES, pin=False)})


def put_chain(h: HierarchyManager, seed: int, nblocks: int, tenant: str = ""):
    rk = KEYER.request(tokens(seed, nblocks * BLOCK_TOKENS))
    data = torch.full((nblocks, NBYTES), seed % 251, dtype=torch.uint8)
    return rk, h.put(rk, 0, data, tenant=tenant)


def test_only_leaves_and_unpinned_blocks_are_candidates():
    h = ddr_hierarchy()
    _, nodes = put_chain(h, 1, 4)
    check(h)
    assert kept_candidates(h, Tier.DDR) == {id(nodes[-1].payload)}  # interior blocks hold their only copy
    h.index.pin(nodes[-1:])
    assert kept_candidates(h, Tier.DDR) == set()
    h.index.unpin(nodes[-1:])
    assert kept_candidates(h, Tier.DDR) == {id(nodes[-1].payload)}
    check(h)


def test_eviction_takes_the_chain_tail_first_and_never_a_pinned_block():
    h = ddr_hierarchy()
    _, a = put_chain(h, 1, 3)
    _, b = put_chain(h, 2, 3)
    h.index.pin(a)  # the older chain is pinned: the victims must come from b
    freed = h.evict(Tier.DDR, 2 * NBYTES)
    assert freed == 2 * NBYTES
    assert all(n.payload.copies for n in a), "a pinned block lost its copy"
    remaining_b = [n for n in b if not n.payload.dropped]
    assert [n.depth for n in remaining_b] == [0]  # tail first: the leaf, then its parent
    assert h.evict(Tier.DDR, 10 * NBYTES) == NBYTES  # only b's root is left to take
    assert all(n.payload.copies for n in a)
    check(h)


async def test_pinned_redundant_copy_survives_eviction(tmp_path):
    disk = await DiskPool.open(tmp_path / "d", slab_bytes=64 * NBYTES * 2, num_slabs=1)
    h = HierarchyManager({Tier.DDR: DDRPool(16 * NBYTES, pin=False), Tier.DISK: disk})
    try:
        _, nodes = put_chain(h, 4, 3)
        disk_slots = h.allocate(Tier.DISK, [NBYTES] * 3, "")
        for node, slot in zip(nodes, disk_slots, strict=True):
            assert h.add_copy(node.payload, Tier.DISK, slot)
        check(h)
        assert kept_candidates(h, Tier.DDR) == {id(n.payload) for n in nodes}  # every DDR copy is redundant
        h.index.pin(nodes[:1])
        check(h)
        assert h.evict(Tier.DDR, 100 * NBYTES) == 2 * NBYTES
        assert Tier.DDR in nodes[0].payload.copies, "the pinned block's DDR copy was dropped"
        assert all(Tier.DISK in n.payload.copies for n in nodes)
        check(h)
        h.index.unpin(nodes[:1])
    finally:
        await disk.store.close()


def test_leases_of_migrations_remove_candidates_until_they_end():
    h = ddr_hierarchy()
    _, nodes = put_chain(h, 5, 2)
    leaf = nodes[-1].payload
    h.lease([leaf], (Tier.DDR,))
    assert kept_candidates(h, Tier.DDR) == set()
    assert h.evict(Tier.DDR, NBYTES) == 0
    h.unlease([leaf], slots=[leaf.copies[Tier.DDR]])
    assert kept_candidates(h, Tier.DDR) == {id(leaf)}
    check(h)


def test_tenant_eviction_takes_only_that_tenants_blocks():
    h = ddr_hierarchy()
    _, a = put_chain(h, 6, 2, tenant="a")
    _, b = put_chain(h, 7, 2, tenant="b")
    assert h.evict(Tier.DDR, 2 * NBYTES, tenant="b") == 2 * NBYTES
    assert all(n.payload.copies for n in a)
    assert all(n.payload.dropped for n in b)
    check(h)


ops = st.lists(
    st.tuples(st.sampled_from(["put", "pin", "unpin", "evict", "drop", "lease"]), st.integers(0, 7), st.integers(1, 4)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_candidate_sets_equal_the_rule_after_any_sequence(seq):
    h = ddr_hierarchy(48)
    chains: dict[int, list] = {}
    pins: list = []
    leases: list = []
    for op, seed, n in seq:
        if op == "put":
            try:
                _, nodes = put_chain(h, seed, n)
            except (MemoryError, ValueError):
                continue
            chains[seed] = nodes
        elif op == "pin" and chains.get(seed):
            live = [x for x in chains[seed] if not x.payload.dropped]
            try:
                h.index.pin(live)
            except LookupError:
                continue
            pins.append(live)
        elif op == "unpin" and pins:
            h.index.unpin(pins.pop())
        elif op == "evict":
            h.evict(Tier.DDR, n * NBYTES)
            for p in pins:
                assert all(x.payload.copies and not x.payload.dropped for x in p), "a pinned block was evicted"
            assert all(not r.dropped for r in leases)
        elif op == "drop" and chains.get(seed):
            node = chains[seed][0]
            subtree = [] if node.payload.dropped else h.index._subtree(node)
            if subtree and not any(x.pin_count or x.payload in leases for x in subtree):
                h.drop(node)
        elif op == "lease" and chains.get(seed):
            res = chains[seed][-1].payload
            if not res.dropped and Tier.DDR in res.copies:
                h.lease([res], (Tier.DDR,))
                leases.append(res)
        check(h)
    for res in leases:
        h.unlease([res], slots=[res.copies[Tier.DDR]])
    for p in pins:
        h.index.unpin(p)
    check(h)


def test_residency_events_reach_subscribers_in_order():
    h = ddr_hierarchy()
    seen = []
    unsubscribe = h.events.subscribe(seen.append)
    put_chain(h, 8, 2)
    h.evict(Tier.DDR, NBYTES)
    kinds = [e.kind.value for e in seen]
    assert kinds == ["stored", "published", "stored", "published", "dropped", "evicted"]
    assert [e.seq for e in seen] == sorted(e.seq for e in seen)
    unsubscribe()
    put_chain(h, 9, 1)
    assert len(seen) == 6
