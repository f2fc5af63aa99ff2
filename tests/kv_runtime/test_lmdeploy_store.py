"""The scheduler role of ``LMDeployStore`` on CPU: no CUDA, no LMDeploy.

The store is built from a tiny Qwen2-style config (2 layers, 2 KV heads of 64 dims, float16, 16-token blocks:
16 KiB per block). Blocks are placed in kvtier's tiers directly through the store's hierarchy, under the
store's own keys, as the worker role would after a save (DDR) or a write-down (disk).

Cost model numbers used below (``prefill_tflops=1e-3`` is a 1 GFLOP/s "GPU"): recomputing one block costs
about 38 ms, loading it from DDR about 0.1 ms (latency), so the cost model loads; with the default 400 TFLOP/s
recomputing a block costs about 0.1 us and the cost model recomputes.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from runtime_helpers import tokens

from kv_runtime.backends.lmdeploy_backend import EngineFormat, LMDeployStore, LoadOrder, StepWork
from kv_runtime.config import KVTierConfig
from kv_runtime.migrator import MigrationPlan
from kv_runtime.pool import Tier

BS = 16
BLOCK_BYTES = 2 * 2 * 2 * 64 * BS * 2  # layers * (K, V) * kv_heads * head_dim * tokens * fp16
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
    "vocab_size": 1000,
    "torch_dtype": "float16",
}
SLOW_GPU = {"prefill_tflops": 1e-3}  # recompute ~38 ms per block: loading from DDR wins
PROMPT = 100  # tokens; max_step 99 -> 96 tokens (6 blocks) considered by a lookup


class Stores:
    """Builds stores over one model directory and closes every one it built."""

    def __init__(self, tmp_path) -> None:
        self.model = tmp_path / "qwen2-tiny"
        self.model.mkdir()
        (self.model / "config.json").write_text(json.dumps(CONFIG))
        (self.model / "model.safetensors").write_bytes(b"weights")  # the store hashes them into the model's identity
        self.cache_dir = tmp_path / "cache"
        self.open: list[LMDeployStore] = []

    def settings(self, **extra) -> KVTierConfig:
        base = {"model": str(self.model), "engine": "lmdeploy", "ddr_bytes": 4 << 20, "cache_dir": str(self.cache_dir)}
        return KVTierConfig.from_plain({**base, **extra})

    def __call__(self, fmt: EngineFormat | None = None, *, disk: bool = False, **extra) -> LMDeployStore:
        if disk:
            extra.setdefault("disk_bytes", 4 << 20)
        store = LMDeployStore(self.settings(**extra), fmt or EngineFormat(block_size=BS))
        self.open.append(store)
        return store

    def close(self, store: LMDeployStore) -> None:
        self.open.remove(store)
        store.close()


@pytest.fixture
def stores(tmp_path):
    s = Stores(tmp_path)
    yield s
    for store in list(s.open):
        s.close(store)


def place(store: LMDeployStore, toks, nblocks: int, *, disk: int = 0, keep_ddr: bool = False, seed: int = 0):
    """Index blocks ``[0, nblocks)`` of ``toks`` in DDR (ready), under ``store``'s keys; the last ``disk`` of them
    are then written to disk (really: the bytes go through the disk store) and, unless ``keep_ddr``, dropped from
    DDR. Returns the index nodes."""
    rk = store.keyer.request(toks[: nblocks * store.block_size])
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (nblocks, store.layout.block_bytes), dtype=torch.uint8, generator=gen)
    nodes = store.hierarchy.put(rk, 0, data)
    if disk:

        async def write_down():
            plan = MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes[-disk:]], keep_source=keep_ddr)
            return await store.migrator.migrate(plan)

        result = store.io.run(write_down())
        assert len(result.moved) == disk
    assert [sorted(n.payload.copies) for n in nodes] == [
        sorted({Tier.DDR} if i < nblocks - disk else ({Tier.DDR, Tier.DISK} if keep_ddr else {Tier.DISK}))
        for i in range(nblocks)
    ]
    return nodes


def step(store: LMDeployStore, running, producer: bool = True):
    """``step_work`` as ``(load request ids, ((save id, logical ids), ...))``, or None."""
    work: StepWork | None = store.scheduler.step_work(running, producer=producer)
    if work is None:
        return None
    return tuple(o.request_id for o in work.loads), tuple((o.save_id, o.logical_ids) for o in work.saves)


def pins(nodes) -> list[int]:
    return [n.pin_count for n in nodes]


# ====================================================================== settings


def test_layout_of_the_test_model(stores):
    store = stores()
    assert store.layout.block_bytes == BLOCK_BYTES == 16384
    assert store.dtype == torch.float16 and store.block_size == BS
    assert Tier.DISK not in store.hierarchy.pools
    assert Tier.DISK in stores(disk=True).hierarchy.pools


def test_io_threads_reach_the_disk_tier(stores):
    store = stores(disk=True, io_threads=3)
    assert store.hierarchy.pools[Tier.DISK].store.file_io.threads == 3


def test_the_store_reads_its_settings_from_the_one_configuration(stores):
    """The connector's settings arrive as plain data and become the same KVTierConfig the other engine uses."""
    store = stores(write_mode="write-back", cache_salt="tenant-a", prefill_tflops=12.5, ddr_gbps=10.0)
    assert store.config == KVTierConfig.from_plain(store.config.to_plain())
    config = store.config
    assert (config.engine, config.write_mode, config.cache_salt) == ("lmdeploy", "write-back", "tenant-a")
    assert store.service.policy.mode == "write-back"
    assert store.cost.prefill_flops_per_s == 12.5e12 and store.cost.tiers["ddr"].bandwidth_gbps == 10.0
    with pytest.raises(ValueError, match="ddr_bytes"):
        stores(ddr_bytes=0)


def test_missing_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has no config\.json"):
        LMDeployStore(KVTierConfig(model=str(tmp_path)), EngineFormat(block_size=BS))


def test_shared_store_per_settings_and_format(stores):
    fmt = EngineFormat(block_size=BS)
    built = []
    try:
        a = LMDeployStore.shared(stores.settings(), fmt)
        built.append(a)
        assert LMDeployStore.shared(stores.settings(), EngineFormat(block_size=BS)) is a
        variants = [
            (stores.settings(ddr_bytes=2 << 20), fmt),
            (stores.settings(cache_salt="x"), fmt),
            (stores.settings(), EngineFormat(block_size=32)),
            (stores.settings(), EngineFormat(block_size=BS, quant_policy=8)),
        ]
        for settings, f in variants:
            other = LMDeployStore.shared(settings, f)
            built.append(other)
            assert other is not a
            assert LMDeployStore.shared(settings, f) is other
        assert len({id(s) for s in built}) == 5
        assert all(s in LMDeployStore.instances() for s in built)
    finally:
        for s in built:
            s.close()
    assert not any(s in LMDeployStore.instances() for s in built)


# ====================================================================== namespaces


FORMAT_VARIANTS = {
    "dtype": ({"dtype": "float32"}, EngineFormat(block_size=BS)),
    "block_size": ({}, EngineFormat(block_size=32)),
    "quant_policy": ({}, EngineFormat(block_size=BS, quant_policy=8)),
    "tp": ({}, EngineFormat(block_size=BS, tp_rank=1, tp_size=2)),
    "cache_salt": ({"cache_salt": "tenant-b"}, EngineFormat(block_size=BS)),
}


@pytest.mark.parametrize("variant", list(FORMAT_VARIANTS))
def test_namespace_changes_with_format(stores, variant):
    extra, fmt = FORMAT_VARIANTS[variant]
    toks = tokens(1, 4 * 32)
    base = stores()
    other = stores(fmt, **extra)
    assert base.namespace.digest != other.namespace.digest
    assert base.keyer.request(toks).keys[0] != other.keyer.request(toks).keys[0]
    expected = {
        "dtype": ("kv_dtype", "float16", "float32"),
        "block_size": ("block_size", 16, 32),
        "quant_policy": ("quant_policy", "0", "8"),
        "tp": ("tp_rank", 0, 1),
        "cache_salt": ("cache_salt", "", "tenant-b"),
    }[variant]
    name, was, now = expected
    assert (getattr(base.namespace, name), getattr(other.namespace, name)) == (was, now)


@pytest.mark.parametrize("variant", list(FORMAT_VARIANTS))
def test_blocks_on_disk_are_not_matched_under_another_format(stores, variant):
    """Blocks written to disk under one format survive a restart for that format only."""
    extra, fmt = FORMAT_VARIANTS[variant]
    toks = tokens(2, PROMPT)
    writer = stores(disk=True)
    place(writer, toks, 4, disk=4)
    stores.close(writer)

    other = stores(fmt, disk=True, **extra)
    other.always_load = True
    assert other.hierarchy.match(other.keyer.request(toks[:96])) == []
    assert other.scheduler.lookup(1, toks, 0, PROMPT - 1) == (0, False)
    stores.close(other)

    same = stores(disk=True)
    same.always_load = True
    assert same.scheduler.lookup(1, toks, 0, PROMPT - 1) == (64, True)
    assert [sorted(n.payload.copies) for n in same.hierarchy.match(same.keyer.request(toks[:64]))] == [[Tier.DISK]] * 4


# ====================================================================== lookup


def test_lookup_without_a_match(stores):
    store = stores(**SLOW_GPU)
    place(store, tokens(3, PROMPT), 4)
    assert store.scheduler.lookup(1, tokens(4, PROMPT), 0, PROMPT - 1) == (0, False)
    assert (store.stats.lookups, store.stats.hits, store.stats.planned_recompute) == (0, 0, 0)


def test_lookup_hit_in_ddr_pins_until_request_finished(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(5, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(1, toks, 16, PROMPT - 1) == (48, True)  # blocks [1, 4): LMDeploy holds block 0
    assert pins(nodes) == [0, 1, 1, 1]
    assert (store.stats.lookups, store.stats.hits) == (1, 1)
    # LMDeploy asks again while it waits for blocks: same answer, no second pin
    assert store.scheduler.lookup(1, toks, 16, PROMPT - 1) == (48, True)
    assert pins(nodes) == [0, 1, 1, 1]
    store.scheduler.request_finished(1)
    assert pins(nodes) == [0, 0, 0, 0]


def test_lookup_of_the_whole_prefix(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(6, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(1, toks, 0, PROMPT - 1) == (64, True)
    assert pins(nodes) == [1, 1, 1, 1]
    # a shorter prompt sharing two blocks
    other = toks.copy()
    other[40:] += 1
    assert store.scheduler.lookup(2, other, 0, PROMPT - 1) == (32, True)
    assert pins(nodes) == [2, 2, 1, 1]


def test_pinned_blocks_are_not_evicted(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(7, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(1, toks, 32, PROMPT - 1) == (32, True)
    assert pins(nodes) == [0, 0, 1, 1]
    assert store.hierarchy.evict(Tier.DDR, 1 << 30) == 0  # leaves pinned, their parents have children
    assert [len(n.payload.copies) for n in nodes] == [1, 1, 1, 1]
    store.scheduler.request_finished(1)
    assert store.hierarchy.evict(Tier.DDR, 1 << 30) == 4 * BLOCK_BYTES


@pytest.mark.parametrize("num_computed", [64, 80, 96, 200])
def test_lookup_past_the_hit_is_zero(stores, num_computed):
    store = stores(**SLOW_GPU)
    toks = tokens(8, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(1, toks, num_computed, PROMPT - 1) == (0, False)
    assert pins(nodes) == [0, 0, 0, 0]
    assert store.stats.hits == 0


@pytest.mark.parametrize(
    ("max_step", "expected", "pinned"),
    [
        (40, (32, True), [1, 1, 0, 0]),  # 40 tokens -> 2 whole blocks
        (48, (48, True), [1, 1, 1, 0]),
        (63, (48, True), [1, 1, 1, 0]),
        (64, (64, True), [1, 1, 1, 1]),
        (15, (0, False), [0, 0, 0, 0]),  # not one whole block
        (0, (0, False), [0, 0, 0, 0]),
    ],
)
def test_max_step_caps_the_hit_to_whole_blocks(stores, max_step, expected, pinned):
    store = stores(**SLOW_GPU)
    toks = tokens(9, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(1, toks, 0, max_step) == expected
    assert pins(nodes) == pinned


def test_cost_model_recomputes_a_cheap_prefix(stores):
    store = stores(prefill_tflops=1e6)  # recompute is (much) faster than 0.1 ms of DDR latency
    toks = tokens(10, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(1, toks, 0, PROMPT - 1) == (0, False)
    assert (store.stats.lookups, store.stats.hits, store.stats.planned_recompute) == (1, 0, 1)
    assert pins(nodes) == [0, 0, 0, 0]
    store.always_load = True
    assert store.scheduler.lookup(2, toks, 0, PROMPT - 1) == (64, True)
    assert (store.stats.lookups, store.stats.hits, store.stats.planned_recompute) == (2, 1, 1)
    assert pins(nodes) == [1, 1, 1, 1]


def test_cost_model_recomputes_a_slow_disk_prefix(stores):
    # 16 KiB at 1 KB/s takes 16 s per block; recomputing it takes ~38 ms
    store = stores(disk=True, disk_gbps=1e-6, **SLOW_GPU)
    toks = tokens(11, PROMPT)
    nodes = place(store, toks, 4, disk=4)
    assert store.scheduler.lookup(1, toks, 0, PROMPT - 1) == (0, False)
    assert store.stats.planned_recompute == 1
    assert pins(nodes) == [0, 0, 0, 0]
    store.always_load = True
    assert store.scheduler.lookup(2, toks, 0, PROMPT - 1) == (64, True)
    assert pins(nodes) == [1, 1, 1, 1]
    store.scheduler.request_finished(2)


def test_cost_model_loads_the_ddr_part_of_a_mixed_prefix(stores):
    store = stores(disk=True, disk_gbps=1e-6, **SLOW_GPU)
    toks = tokens(12, PROMPT)
    nodes = place(store, toks, 4, disk=2)  # blocks 0, 1 in DDR; 2, 3 on disk only
    assert store.scheduler.lookup(1, toks, 0, PROMPT - 1) == (32, True)
    assert pins(nodes) == [1, 1, 0, 0]
    assert (store.stats.hits, store.stats.planned_recompute) == (1, 0)


def test_fast_disk_prefix_is_loaded(stores):
    store = stores(disk=True, **SLOW_GPU)  # 1.5 GB/s, 1 ms: far below ~38 ms per block
    toks = tokens(13, PROMPT)
    nodes = place(store, toks, 4, disk=4)
    assert store.scheduler.lookup(1, toks, 0, PROMPT - 1) == (64, True)
    assert pins(nodes) == [1, 1, 1, 1]


# ====================================================================== bind and step_work


def test_bind_then_step_work_starts_the_load(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(14, PROMPT)
    nodes = place(store, toks, 4)
    assert step(store, []) is None
    assert store.scheduler.lookup(7, toks, 16, PROMPT - 1) == (48, True)
    assert step(store, []) is None  # a lookup alone starts nothing
    store.scheduler.bind(7, [10, 11, 12], 48)
    assert step(store, []) == ((7,), ())
    assert store.loads[7].block_ids == (10, 11, 12)
    assert store.loads[7].first == 1
    assert step(store, []) == ((), ())  # in flight: LMDeploy keeps polling, nothing new to start
    assert pins(nodes) == [0, 1, 1, 1]
    assert store.scheduler.finish({7}, set(), set()) == (((7, True),), frozenset())
    assert step(store, []) is None


def test_bind_with_more_local_blocks_releases_the_skipped_ones(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(15, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(7, toks, 16, PROMPT - 1) == (48, True)
    store.scheduler.bind(7, [21, 22], 32)  # LMDeploy found block 1 in its own cache meanwhile
    assert pins(nodes) == [0, 0, 1, 1]
    assert step(store, []) == ((7,), ())
    assert (store.loads[7].first, store.loads[7].block_ids) == (2, (21, 22))


def test_bind_of_nothing_keeps_the_lookup(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(16, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(7, toks, 0, PROMPT - 1) == (64, True)
    store.scheduler.bind(7, [], 0)
    assert step(store, []) is None
    assert pins(nodes) == [1, 1, 1, 1]
    store.scheduler.request_finished(7)
    assert pins(nodes) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("block_ids", "n", "message"),
    [
        ([1, 2, 3], 40, "block aligned: 24 tokens before the load"),
        ([1, 2], 48, r"2 destination blocks for blocks \[1, 4\)"),
        ([1, 2, 3, 4], 64, r"4 destination blocks for blocks \[0, 4\)"),  # more than the lookup found
    ],
)
def test_bad_bind_is_refused_and_unpins(stores, block_ids, n, message):
    store = stores(**SLOW_GPU)
    toks = tokens(17, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(7, toks, 16, PROMPT - 1) == (48, True)
    with pytest.raises(ValueError, match=message):
        store.scheduler.bind(7, block_ids, n)
    assert pins(nodes) == [0, 0, 0, 0]
    assert step(store, []) is None


# ====================================================================== saves


def _running(request_id, toks, token_len, nblocks=7, base=100):
    return (request_id, toks, token_len, list(range(base, base + nblocks)), list(range(nblocks)))


def test_saves_full_blocks_once_per_request(stores):
    store = stores()
    toks = tokens(20, 112)
    assert step(store, [_running(1, toks, 15)]) is None  # not one full block yet
    assert step(store, [_running(1, toks, 40)]) == ((), ((0, (0, 1)),))
    assert store.saves[0].block_ids == (100, 101) and store.saves[0].first == 0
    assert step(store, [_running(1, toks, 70)]) == ((), ((1, (2, 3)),))
    assert store.saves[1].block_ids == (102, 103) and store.saves[1].first == 2
    assert step(store, [_running(1, toks, 79)]) == ((), ())  # nothing new; saves still in flight
    assert store.saves_in_flight() == 2
    assert store.scheduler.finish(set(), set(), {0, 1, 99}) == ((), frozenset({0, 1}))
    assert store.scheduler.finish(set(), set(), {0, 1}) == ((), frozenset())  # reported once
    assert store.saves_in_flight() == 0
    assert step(store, [_running(1, toks, 79)]) is None
    assert store.stats.skipped_saves == 0


def test_saves_are_tracked_per_request(stores):
    store = stores()
    a, b = tokens(21, 112), tokens(22, 112)
    work = step(store, [_running(1, a, 48), _running(2, b, 32, base=200)])
    assert work == ((), ((0, (0, 1, 2)), (1, (0, 1))))
    assert store.saves[1].block_ids == (200, 201)
    work = step(store, [_running(1, a, 50), _running(2, b, 64, base=200)])
    assert work == ((), ((2, (2, 3)),))
    store.scheduler.request_finished(2)  # a request that ends and comes back (same id) starts over
    assert step(store, [_running(2, b, 64, base=200)]) == ((), ((3, (0, 1, 2, 3)),))


def test_no_saves_when_not_a_producer(stores):
    store = stores()
    assert step(store, [_running(1, tokens(23, 112), 64)], producer=False) is None
    assert store.saves_in_flight() == 0


def test_blocks_kvtier_holds_are_not_saved_again(stores):
    store = stores()
    toks = tokens(24, 112)
    place(store, toks, 3)
    assert step(store, [_running(1, toks, 48)]) is None
    assert store.stats.skipped_saves == 3
    assert step(store, [_running(1, toks, 80)]) == ((), ((0, (3, 4)),))
    assert store.saves[0].first == 3 and store.saves[0].block_ids == (103, 104)
    assert store.stats.skipped_saves == 3


def test_partially_held_prompt_saves_only_the_rest(stores):
    store = stores()
    toks = tokens(25, 112)
    place(store, toks, 3)
    assert step(store, [_running(1, toks, 80)]) == ((), ((0, (3, 4)),))
    assert store.saves[0].first == 3 and store.saves[0].block_ids == (103, 104)


def test_partially_held_prompt_counts_the_skipped_blocks(stores):
    store = stores()
    toks = tokens(25, 112)
    place(store, toks, 3)
    assert step(store, [_running(1, toks, 80)]) == ((), ((0, (3, 4)),))
    assert store.stats.skipped_saves == 3


@pytest.mark.parametrize(("nblocks", "nlogical"), [(3, 7), (7, 3)])
def test_fewer_blocks_than_the_save_boundary_is_an_error(stores, nblocks, nlogical):
    store = stores()
    toks = tokens(26, 112)
    running = (1, toks, 64, list(range(nblocks)), list(range(nlogical)))
    with pytest.raises(RuntimeError, match="request 1 has fewer blocks than its 64-token save boundary"):
        step(store, [running])
    assert store.saves_in_flight() == 0


# ====================================================================== finish, request_finished, drain


def _start_load(store, request_id, toks, num_computed, block_ids):
    n, _ = store.scheduler.lookup(request_id, toks, num_computed, PROMPT - 1)
    store.scheduler.bind(request_id, block_ids, n)
    assert step(store, []) == ((request_id,), ())


def test_load_with_invalid_blocks_fails_and_refuses_later_lookups(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(30, PROMPT)
    place(store, toks, 4)
    _start_load(store, 7, toks, 16, [10, 11, 12])
    assert store.scheduler.finish({7}, {11, 500}, set()) == (((7, False),), frozenset())
    assert store.scheduler.finish({7}, set(), set()) == ((), frozenset())  # reported once
    assert store.scheduler.lookup(7, toks, 16, PROMPT - 1) == (0, False)
    assert store.scheduler.lookup(8, toks, 16, PROMPT - 1) == (48, True)  # other requests still load
    store.scheduler.new_request(7)  # the id is reused for a new request: lookups are allowed again
    assert store.scheduler.lookup(7, toks, 16, PROMPT - 1) == (48, True)


def test_load_with_invalid_blocks_of_another_request_succeeds(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(31, PROMPT)
    place(store, toks, 4)
    _start_load(store, 7, toks, 0, [10, 11, 12, 13])
    assert store.scheduler.finish({7, 9}, {14, 99}, set()) == (((7, True),), frozenset())
    assert store.stats.failed_loads == 0


def test_failed_worker_load_is_reported_unpinned_and_recomputed_blocks_are_saved(stores, caplog):
    """On CPU the worker cannot copy into engine cells: the load fails as a whole, through the real path
    (start_loads -> poll -> finish), and releases its pins."""
    store = stores(**SLOW_GPU)
    toks = tokens(32, PROMPT)
    nodes = place(store, toks, 4)
    _start_load(store, 7, toks, 16, [10, 11, 12])
    assert pins(nodes) == [0, 1, 1, 1]
    store.worker.start_loads([LoadOrder(7, (10, 11, 12)), LoadOrder(8, (20,))], ready=None)
    store.wait_idle()  # the load runs on kvtier's loop; 8 was never bound, so it is ignored
    assert "failed" in caplog.text
    assert store.worker.poll() == ({7: (10, 11, 12)}, set())
    assert pins(nodes) == [0, 0, 0, 0]
    assert store.stats.failed_loads == 1
    assert store.scheduler.finish({7}, {10, 11, 12}, set()) == (((7, False),), frozenset())
    # kvtier lost blocks [1, 4) (say, unreadable): LMDeploy recomputes them and they are saved again
    store.hierarchy.drop(nodes[1])
    assert step(store, [(7, toks, 64, [0, 10, 11, 12], [0, 1, 2, 3])]) == ((), ((0, (1, 2, 3)),))
    assert store.saves[0].block_ids == (10, 11, 12)


def test_clean_load_is_not_saved_back(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(33, PROMPT)
    nodes = place(store, toks, 4)
    _start_load(store, 7, toks, 16, [10, 11, 12])
    assert store.scheduler.finish({7}, set(), set()) == (((7, True),), frozenset())
    store.hierarchy.index.unpin(nodes[1:])  # what the worker does when the copies have completed
    store.hierarchy.drop(nodes[0])  # kvtier forgets the prefix: only the request's own state prevents re-saves
    assert step(store, [(7, toks, 64, [0, 10, 11, 12], [0, 1, 2, 3])]) is None
    assert step(store, [(7, toks, 80, [0, 10, 11, 12, 13], [0, 1, 2, 3, 4])]) == ((), ((0, (4,)),))


def test_request_finished_releases_a_bound_load_not_started(stores):
    store = stores(**SLOW_GPU)
    toks = tokens(34, PROMPT)
    nodes = place(store, toks, 4)
    assert store.scheduler.lookup(7, toks, 0, PROMPT - 1) == (64, True)
    store.scheduler.bind(7, [10, 11, 12, 13], 64)
    assert pins(nodes) == [1, 1, 1, 1]
    store.scheduler.request_finished(7)
    assert pins(nodes) == [0, 0, 0, 0]
    assert step(store, []) is None
    store.scheduler.request_finished(7)  # twice is harmless
    assert pins(nodes) == [0, 0, 0, 0]


def test_drain_forgets_transfers_and_unpins_pending_loads(stores):
    store = stores(**SLOW_GPU)
    a, b = tokens(35, PROMPT), tokens(36, PROMPT)
    place(store, a, 4)
    nodes_b = place(store, b, 4, seed=1)
    _start_load(store, 1, a, 0, [10, 11, 12, 13])  # in flight
    assert store.scheduler.lookup(2, b, 32, PROMPT - 1) == (32, True)
    store.scheduler.bind(2, [20, 21], 32)  # bound, not started
    assert step(store, [_running(3, tokens(37, 112), 32)]) == ((2,), ((0, (0, 1)),))
    assert pins(nodes_b) == [0, 0, 1, 1]
    store.scheduler.lookup(4, b, 0, PROMPT - 1)
    store.scheduler.bind(4, [30, 31, 32, 33], 64)
    assert pins(nodes_b) == [1, 1, 2, 2]
    store.scheduler.drain()
    assert pins(nodes_b) == [0, 0, 0, 0]  # request 4's pending load and request 2's never-started one released
    assert store.saves_in_flight() == 0
    assert step(store, []) is None
    assert store.scheduler.finish({1, 2}, set(), {0}) == ((), frozenset())


# ====================================================================== Cake's split


def _split_store(stores, toks, *, disk_gbps: float, disk_latency_ms: float = 0.0, prefill_tflops: float = 1e-3):
    store = stores(disk=True, prefill_tflops=prefill_tflops)
    nodes = place(store, toks, 8, disk=8)
    link = store.cost.tiers["disk"]
    link.bandwidth_gbps, link.latency_ms = disk_gbps, disk_latency_ms
    return store, nodes


def test_plan_split_without_a_match(stores):
    store = stores(disk=True, **SLOW_GPU)
    assert store.scheduler.plan_split(tokens(40, 129).tolist()) is None


def test_plan_split_none_when_loading_wins(stores):
    toks = tokens(41, 129)
    store, nodes = _split_store(stores, toks, disk_gbps=25.0)  # a 16 KiB block loads in < 1 us
    assert store.cost.plan(["disk"] * 8, BS).choice == "load"
    assert store.scheduler.plan_split(toks.tolist()) is None
    assert pins(nodes) == [0] * 8 and not store.scheduler._recompute_hints and not store.scheduler._prefetching


def test_plan_split_none_when_recompute_wins(stores):
    toks = tokens(42, 129)
    store, nodes = _split_store(stores, toks, disk_gbps=1.5, disk_latency_ms=1.0, prefill_tflops=400.0)
    assert store.cost.plan(["disk"] * 8, BS).choice == "recompute"
    assert store.scheduler.plan_split(toks.tolist()) is None
    assert pins(nodes) == [0] * 8 and not store.scheduler._recompute_hints


def test_plan_split_none_when_the_split_gains_less_than_a_request(stores):
    """Per block ~38 ms to compute, 6 ms to load: the best split (compute 1 block while 7 load) beats loading all
    by a few ms only, less than the extra request it takes on LMDeploy."""
    from kv_runtime.backends.lmdeploy_scheduler import SPLIT_REQUEST_MS

    toks = tokens(44, 8 * BS + 1)
    store, nodes = _split_store(stores, toks, disk_gbps=BLOCK_BYTES / 0.006 / 1e9)
    plan = store.cost.plan(["disk"] * 8, BS)
    assert plan.choice == "both" and 0 < plan.best_load_ms - plan.best_both_ms < SPLIT_REQUEST_MS
    assert store.scheduler.plan_split(toks.tolist()) is None
    assert pins(nodes) == [0] * 8 and not store.scheduler._recompute_hints and not store.scheduler._prefetching


def test_plan_split_front_recomputes_while_back_loads(stores):
    """Per block: ~38 ms to compute (more further in: attention), 40 ms to load from disk. Recompute all ~319 ms,
    load all 320 ms; computing the front 4 blocks (~155 ms) while the back 4 load (160 ms) beats both."""
    toks = tokens(43, 8 * BS + 1)
    store, nodes = _split_store(stores, toks, disk_gbps=BLOCK_BYTES / 0.040 / 1e9)
    assert store.scheduler.plan_split(toks.tolist()) == (4 * BS, 8 * BS)
    store.wait_idle()
    # the back came up to DDR (the disk copies stay); the front stays on disk; the promotion's pins are gone
    assert [sorted(n.payload.copies) for n in nodes] == [[Tier.DISK]] * 4 + [[Tier.DDR, Tier.DISK]] * 4
    assert pins(nodes) == [0] * 8 and not store.scheduler._prefetching
    # the front as its own request is recomputed (the hint), without consulting the cost model
    assert store.scheduler.lookup(1, toks[: 4 * BS], 0, 4 * BS - 1) == (0, False)
    assert store.stats.planned_recompute == 0
    # then the full prompt, its front now in LMDeploy's cache, loads the back from DDR
    assert store.scheduler.lookup(2, toks, 4 * BS, 8 * BS) == (4 * BS, True)
    assert pins(nodes) == [0] * 4 + [1] * 4
    assert store.hierarchy.pools[Tier.DDR].live_bytes == 4 * BLOCK_BYTES


def test_plan_split_back_pending_makes_lookup_wait(stores):
    toks = tokens(44, 8 * BS + 1)
    store, nodes = _split_store(stores, toks, disk_gbps=BLOCK_BYTES / 0.040 / 1e9)
    hold = asyncio.Event()

    async def blocked(*args):
        await hold.wait()

    store.scheduler._promote = blocked  # the promotion is still running when LMDeploy asks
    try:
        assert store.scheduler.plan_split(toks.tolist()) == (4 * BS, 8 * BS)
        assert store.scheduler.lookup(2, toks, 4 * BS, 8 * BS) == (None, False)
        assert pins(nodes) == [0] * 4 + [1] * 4  # held by plan_split for the promotion
        assert store.stats.lookups == 0
    finally:
        store.io.loop.call_soon_threadsafe(hold.set)
    store.wait_idle()
    assert not store.scheduler._prefetching
    store.hierarchy.index.unpin(nodes[4:])  # the stand-in promotion does not release them


def test_a_store_that_fails_to_open_leaves_no_thread(stores):
    import threading

    stores.cache_dir.write_text("a file where the cache directory should be")

    def io_threads() -> int:
        return sum(t.name == "kvtier-io" and t.is_alive() for t in threading.enumerate())

    before = io_threads()
    with pytest.raises(OSError):
        stores(disk=True)
    assert io_threads() == before


def test_a_completed_save_is_published_and_found_by_the_next_lookup(stores):
    """The worker's publication of a save (after its copy's event) indexes the blocks: the next lookup of the
    prompt loads them. The copy itself needs CUDA; here the save's DDR slots are filled on the host."""
    store = stores(**SLOW_GPU)
    toks = tokens(45, PROMPT)
    work = store.scheduler.step_work([_running(1, toks, 64)])
    (order,) = work.saves
    save = store.saves[order.save_id]
    slots = store.service.reserve(len(order.block_ids), BLOCK_BYTES)
    ddr = store.hierarchy.pool(Tier.DDR)
    for i, slot in enumerate(slots):
        ddr.view(slot).fill_(i + 1)
    store.worker._publish(save, slots)
    assert store.worker.poll() == ({}, {order.save_id})
    assert store.stats.saved_blocks == 4
    assert store.scheduler.lookup(2, toks, 0, PROMPT - 1) == (64, True)
    lease = store.scheduler._lookups[2]
    assert [int(ddr.view(n.payload.copies[Tier.DDR])[0]) for n in lease.nodes] == [1, 2, 3, 4]
    store.scheduler.request_finished(2)
