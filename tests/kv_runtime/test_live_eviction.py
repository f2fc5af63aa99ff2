"""The running tiers evict through named policies of ``kv_policy.eviction``, swappable while serving.

Each test would fail if the behaviour were absent: a policy whose order differs from LRU evicts what it says;
a swap loses no block and fails no request; a pinned block is never a victim under any policy; and after any
sequence of operations each tier's policy holds exactly the tier's eligible copies, its unpinned ones exactly the
candidates (compared with the rule computed from scratch).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import pytest
import runtime_helpers
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_helpers import BLOCK_TOKENS, block_bytes, tokens

from kv_policy.eviction import EVICTION_POLICIES
from kv_runtime.block_manager import ORDER_ONLY
from kv_runtime.config import ConfigError, KVTierConfig
from kv_runtime.hierarchy import HierarchyManager, Residency
from kv_runtime.layout import KVLayout
from kv_runtime.migrator import MigrationPlan
from kv_runtime.pool import DDRPool, DiskPool, Tier
from kv_runtime.service import TierService
from prefix_reuse import BlockKeyer, KeyNamespace

KIB = 1024
NBYTES = 4 * KIB
KEYER = BlockKeyer(KeyNamespace(model_id="live-evict@1", kv_dtype="float16", block_size=BLOCK_TOKENS))
POLICIES = sorted(EVICTION_POLICIES)


def ddr_hierarchy(nblocks: int, policy: str = "lru") -> HierarchyManager:
    return HierarchyManager({Tier.DDR: DDRPool(nblocks * NBYTES, pin=False)}, eviction={Tier.DDR: policy})


def put_chain(h: HierarchyManager, seed: int, nblocks: int, tenant: str = ""):
    rk = KEYER.request(tokens(seed, nblocks * BLOCK_TOKENS))
    data = torch.full((nblocks, NBYTES), seed % 251, dtype=torch.uint8)
    return rk, h.put(rk, 0, data, tenant=tenant)


def reference_eligible(h: HierarchyManager, tier: Tier) -> tuple[set[int], set[int]]:
    """From scratch: the copies in ``tier`` that would be candidates but for pins and migrations in flight, and
    the candidates among them (unpinned, nothing in flight)."""
    eligible, candidates = set(), set()
    for node in list(h.index._nodes.values()):
        res: Residency = node.payload
        if tier not in res.copies or not node.ready or not (len(res.copies) > 1 or node.num_children == 0):
            continue
        eligible.add(id(res))
        if not res.in_flight and not node.pin_count:
            candidates.add(id(res))
    return eligible, candidates


def check(h: HierarchyManager) -> None:
    for tier in h.pools:
        policy = h.blocks.policy(tier)
        eligible, candidates = reference_eligible(h, tier)
        nexts = {id(r) for r in h.blocks._next[tier]}  # parents of evicted blocks, the next victims
        assert nexts <= candidates
        # LRU holds only the candidates (a released block is as recent as any); the others keep pinned ones too
        assert {id(b) for b in policy} == (candidates if policy.name in ORDER_ONLY else eligible) - nexts
        assert {id(b) for b in policy if not policy.info(b).pins} == candidates - nexts
        assert {id(r) for r in h.blocks._candidates[tier]} == candidates


def alive(nodes) -> bool:
    return all(not n.payload.dropped and Tier.DDR in n.payload.copies for n in nodes)


# ---------------------------------------------------------------------- the named policy decides


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_the_named_policy_picks_the_victim_not_lru(policy):
    """Block 0 is used often but long ago: LRU gives it up first, LFU keeps it and gives up a block used once."""
    h = ddr_hierarchy(8, policy)
    chains = [put_chain(h, seed, 1) for seed in range(8)]
    for _ in range(3):
        h.match(chains[0][0])
    for rk, _ in chains[1:]:
        h.match(rk)
    assert h.evict(Tier.DDR, NBYTES) == NBYTES
    gone = [seed for seed, (_, nodes) in enumerate(chains) if not alive(nodes)]
    if policy == "lru":
        assert gone == [0]
    else:
        assert len(gone) == 1 and gone != [0], "LFU evicted the most frequently used block"
    assert h.eviction_policies() == {"ddr": policy}
    check(h)


def test_a_full_tier_under_lfu_keeps_its_frequently_used_blocks():
    h = ddr_hierarchy(8, "lfu")
    hot = [put_chain(h, seed, 1) for seed in range(4)]
    for _ in range(3):
        for rk, _ in hot:
            h.match(rk)
    for seed in range(100, 120):  # a scan of one-off blocks, each newer than every hot block's last use
        put_chain(h, seed, 1)
        check(h)
    assert all(alive(nodes) for _, nodes in hot)


def test_a_swap_keeps_the_order_of_recency_and_the_pins():
    h = ddr_hierarchy(8, "lfu")
    chains = [put_chain(h, seed, 1) for seed in range(6)]
    for rk, _ in reversed(chains):  # recency now: 5, 4, ..., 0 (0 most recent)
        h.match(rk)
    h.index.pin(chains[5][1])
    h.set_eviction_policy(Tier.DDR, "lru")
    check(h)
    assert h.eviction_policies() == {"ddr": "lru"}
    assert h.evict(Tier.DDR, NBYTES) == NBYTES
    assert not alive(chains[4][1]) and alive(chains[5][1])  # the least recent unpinned block went
    h.index.unpin(chains[5][1])
    check(h)
    with pytest.raises(ValueError, match=r"known: .*lru"):
        h.set_eviction_policy(Tier.DDR, "no-such-policy")
    assert h.eviction_policies() == {"ddr": "lru"}
    with pytest.raises(ValueError, match="DISK"):
        h.set_eviction_policy(Tier.DISK, "lru")


# ---------------------------------------------------------------------- pinned blocks are never victims


@pytest.mark.parametrize("policy", POLICIES)
def test_no_policy_ever_chooses_a_pinned_block(policy):
    h = ddr_hierarchy(16, policy)
    chains = [put_chain(h, seed, 1)[1] for seed in range(16)]
    pinned = chains[:12]
    for nodes in pinned:
        h.match(KEYER.request(tokens(0, BLOCK_TOKENS)))  # some accesses, so frequencies differ
        h.index.pin(nodes)
    seen = []
    unsubscribe = h.events.subscribe(seen.append)
    for seed in range(100, 140):  # fill the tier again and again: only the 4 unpinned slots turn over
        put_chain(h, seed, 1)
        check(h)
    unsubscribe()
    assert all(alive(nodes) for nodes in pinned)
    pinned_keys = {n.payload.key for nodes in pinned for n in nodes}
    evicted = [e.key for e in seen if e.kind.value == "evicted"]
    assert len(evicted) == 40 and not pinned_keys & set(evicted)
    for nodes in pinned:
        h.index.unpin(nodes)
    check(h)


# ---------------------------------------------------------------------- hot swap while serving

MODEL = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 1000,
}
LAYOUT = KVLayout.from_config(MODEL, block_size=BLOCK_TOKENS, dtype=torch.float16)
BB = LAYOUT.block_bytes


async def open_service(tmp_path, *, ddr_blocks: int, disk_blocks: int, **config) -> TierService:
    return await runtime_helpers.open_service(
        tmp_path, LAYOUT, KEYER, MODEL, ddr_blocks=ddr_blocks, disk_blocks=disk_blocks, **config
    )


class Sink:
    def __init__(self, svc: TierService, n: int) -> None:
        self.ddr: DDRPool = svc.hierarchy.pool(Tier.DDR)
        self.out = torch.zeros((n, BB), dtype=torch.uint8)

    async def __call__(self, offset, blocks) -> None:
        for i, r in enumerate(blocks):
            self.out[offset + i].copy_(self.ddr.view(r.copies[Tier.DDR]))


def resident(svc: TierService) -> dict[Tier, set[bytes]]:
    return {t: {r.key for r in svc.hierarchy.blocks_in(t)} for t in svc.hierarchy.pools}


async def test_swapping_policies_mid_workload_loses_no_block_and_fails_no_request(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=12, disk_blocks=64, eviction_policy="ddr=lfu,disk=lru")
    try:
        assert svc.snapshot()["eviction_policy"] == {"ddr": "lfu", "disk": "lru"}
        prompts = []
        for seed in range(6):
            rk = KEYER.request(tokens(seed, 4 * BLOCK_TOKENS))
            data = torch.stack([block_bytes(seed * 100 + i, BB) for i in range(4)])
            nodes = svc.hierarchy.put(rk, 0, data[:2])  # DDR holds 12 blocks: later puts evict earlier ones
            await svc.migrator.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes]))
            nodes += svc.hierarchy.put(rk, 2, data[2:])
            await svc.migrator.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes[2:]]))
            prompts.append((rk, data))
        swaps = [("ddr", "arc"), ("disk", "s3-fifo"), ("ddr", "kvtier-prefix"), ("disk", "lfu"), ("ddr", "lru")]
        for step, (rk, data) in enumerate(prompts * 2):
            lease = svc.lookup(rk)  # a request holds its blocks while the policy changes under it
            tier, name = swaps[step % len(swaps)]
            before = resident(svc)
            svc.set_eviction_policy(tier, name)
            assert resident(svc) == before, "a swap lost or added a block"
            assert svc.snapshot()["eviction_policy"][tier] == name
            check(svc.hierarchy)
            sink = Sink(svc, 4)
            result = await svc.load(lease, sink)
            assert (result.blocks, result.misses) == (4, 0)
            assert torch.equal(sink.out, data)
            svc.release(lease)
            check(svc.hierarchy)
        for rk, _ in prompts:  # every prompt still hits in full after all the swaps
            lease = svc.lookup(rk)
            assert len(lease.nodes) == 4
            svc.release(lease)
        with pytest.raises(ValueError, match="known"):
            svc.set_eviction_policy("ddr", "no-such-policy")
        with pytest.raises(ValueError, match="tier"):
            svc.set_eviction_policy("tape", "lru")
    finally:
        await svc.close()


def test_the_configuration_names_each_tiers_policy():
    assert KVTierConfig().eviction_policies() == {"hbm": "lru", "ddr": "lru", "disk": "lru"}
    assert KVTierConfig(eviction_policy="ARC").eviction_policies()["disk"] == "arc"
    assert KVTierConfig(eviction_policy="ddr=lfu").eviction_policies() == {"ddr": "lfu"}
    with pytest.raises(ConfigError, match=r"known: .*kvtier-prefix.*lru"):
        KVTierConfig(eviction_policy="mru")
    with pytest.raises(ConfigError, match="tier=name"):
        KVTierConfig(eviction_policy="tape=lru")


# ---------------------------------------------------------------------- the policy follows every operation

OPS = ["put", "access", "pin", "unpin", "lease", "unlease", "copy", "evict", "evict_disk", "drop", "swap"]
ops = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 5), st.integers(1, 3), st.sampled_from(POLICIES)),
    min_size=1,
    max_size=30,
)


async def replay_ops(seq, directory: Path) -> None:
    disk = await DiskPool.open(directory / "d", slab_bytes=32 * NBYTES * 2, num_slabs=1)
    h = HierarchyManager({Tier.DDR: DDRPool(24 * NBYTES, pin=False), Tier.DISK: disk})
    chains: dict[int, tuple] = {}
    pins: list = []
    leases: list = []
    try:
        for op, seed, n, name in seq:
            live = [x for x in chains[seed][1] if not x.payload.dropped] if seed in chains else []
            if op == "put":
                with contextlib.suppress(MemoryError, ValueError):
                    chains[seed] = put_chain(h, seed, n)
            elif op == "access" and seed in chains:
                h.match(chains[seed][0])
            elif op == "pin" and live:
                try:
                    h.index.pin(live)
                except LookupError:
                    continue
                pins.append(live)
            elif op == "unpin" and pins:
                h.index.unpin(pins.pop())
            elif op == "lease" and live and Tier.DDR in live[-1].payload.copies:
                h.lease([live[-1].payload], (Tier.DDR,))
                leases.append(live[-1].payload)
            elif op == "unlease" and leases:
                res = leases.pop()
                h.unlease([res], slots=[res.copies[Tier.DDR]])
            elif op == "copy" and live:
                res = live[0].payload
                if Tier.DISK not in res.copies and not res.in_flight:
                    try:
                        (slot,) = h.allocate(Tier.DISK, [NBYTES], "")
                    except MemoryError:
                        continue
                    h.add_copy(res, Tier.DISK, slot)
            elif op == "evict":
                h.evict(Tier.DDR, n * NBYTES)
            elif op == "evict_disk":
                h.evict(Tier.DISK, n * NBYTES)
            elif op == "drop" and live:
                subtree = h.index._subtree(live[0])
                if not any(x.pin_count or x.payload.in_flight for x in subtree):
                    h.drop(live[0])
            elif op == "swap":
                h.set_eviction_policy(Tier.DDR if n % 2 else Tier.DISK, name)
            for p in pins:
                assert all(x.payload.copies and not x.payload.dropped for x in p), "a pinned block was evicted"
            assert all(not r.dropped for r in leases), "a leased block was evicted"
            check(h)
        while leases:
            res = leases.pop()
            h.unlease([res], slots=[res.copies[Tier.DDR]])
        for p in pins:
            h.index.unpin(p)
        check(h)
    finally:
        await disk.store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_each_policy_holds_exactly_the_tiers_candidates_after_any_sequence(seq):
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(replay_ops(seq, Path(d)))
