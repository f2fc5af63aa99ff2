"""Soak: many distinct prompts through small DDR and disk tiers, the way an engine drives the tier service.

Each request is what the transformers engine does with one prompt: ``lookup``, ``load`` of whatever the plan
loads, ``release``, then ``save`` of the prompt's new full blocks (the engine's copy is a fill of the DDR slots),
with the background write-down the migration policy asks for. After every request the background work is drained
and the new prompt's blocks are checked where the write mode says they must be: so a tier that stops caching
fails at the request where it stopped, whatever the machine's speed. Restarts reopen the same cache directory
under another cache salt: the blocks recovered there are foreign, and must make room for the new ones.

``SOAK_REQUESTS`` (environment) makes the soaks longer; the default keeps the file within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from runtime_helpers import BLOCK_TOKENS

from kv_io.disk_store import DiskWriteError
from kv_runtime.config import KVTierConfig
from kv_runtime.layout import KVLayout
from kv_runtime.pool import DiskPool, Tier
from kv_runtime.service import TierService
from prefix_reuse import BlockKeyer, KeyNamespace, RequestKeys

MODEL = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
    "vocab_size": 1000,
}
LAYOUT = KVLayout.from_config(MODEL, block_size=BLOCK_TOKENS, dtype=torch.float16)
BB = LAYOUT.block_bytes  # 4 KiB
PROMPT_BLOCKS = 3
REQUESTS = int(os.environ.get("SOAK_REQUESTS", "150"))


def keyer(salt: str = "") -> BlockKeyer:
    return BlockKeyer(KeyNamespace(model_id="soak@1", kv_dtype="float16", block_size=BLOCK_TOKENS, cache_salt=salt))


def prompt(seed: int, blocks: int = PROMPT_BLOCKS) -> np.ndarray:
    """A distinct prompt of ``blocks`` full blocks and one more token (the engine never caches the last one)."""
    return np.random.default_rng(seed).integers(0, 50_000, blocks * BLOCK_TOKENS + 1, dtype=np.int32)


async def open_service(cache_dir, *, ddr_blocks: int, disk_blocks: int, salt: str = "", **config) -> TierService:
    cfg = KVTierConfig(
        model="m",
        block_size=BLOCK_TOKENS,
        ddr_bytes=ddr_blocks * BB,
        disk_bytes=disk_blocks * 2 * BB,  # a disk slot is the payload plus a 4 KiB header page
        cache_dir=cache_dir,
        prefill_tflops=1e-6,  # recomputing is very slow here: the cost model loads whatever is held
        ddr_gbps=10.0,
        cache_salt=salt,
        **config,
    )
    return await TierService.open(cfg, LAYOUT, keyer(salt), MODEL)


@dataclass
class Engine:
    """Drives one service like an engine: one request at a time, background work drained after each."""

    svc: TierService
    keyer: BlockKeyer
    loaded: int = 0
    from_disk: int = 0
    requests: int = 0
    history: list[RequestKeys] = field(default_factory=list)

    async def request(self, tokens: np.ndarray, tenant: str = "", *, drain: bool = True) -> RequestKeys:
        svc = self.svc
        rk = self.keyer.request(tokens)
        ddr = svc.hierarchy.pool(Tier.DDR)
        lease = svc.lookup(rk, limit=rk.num_blocks, tenant=tenant)
        try:
            if lease.load_blocks:

                async def sink(offset, blocks) -> None:
                    for r in blocks:
                        ddr.view(r.copies[Tier.DDR]).sum()  # the engine reads the bytes

                result = await svc.load(lease, sink)
                self.loaded += result.blocks
                self.from_disk += result.from_disk
        finally:
            svc.release(lease)
        first = svc.saved_prefix(rk)

        async def copy_out(slots) -> None:
            for i, slot in enumerate(slots):
                ddr.view(slot).fill_((first + i) % 251)

        save = svc.save(rk, first, rk.num_blocks - first, BB, copy_out, tenant)
        if not drain:  # the engine's way: the save runs in the background while the next request starts
            svc.spawn(save)
            self.history.append(rk)
            return rk
        await save
        await svc.drain()
        self.requests += 1
        self.history.append(rk)
        return rk

    def copies(self, rk: RequestKeys) -> list[set[Tier]]:
        """Where each indexed block of ``rk`` has a copy (the indexed prefix only)."""
        return [set(n.payload.copies) for n in self.svc.hierarchy.index.match(rk)]

    def failures(self) -> dict:
        return self.svc.snapshot()["cache_failures"]


def check_slots(svc: TierService) -> None:
    """No slot lost: every live slot of a tier is a resident block's copy there (or, on disk, a recovered block
    waiting for a request), so a tier can never fill up with slots nobody holds."""
    for tier, pool in svc.hierarchy.pools.items():
        held = {id(r.copies[tier]) for r in svc.hierarchy.blocks_in(tier)}
        if tier is Tier.DISK:
            held |= {id(slot) for slot in svc.hierarchy.blocks._recovered[tier].values()}
        live = {id(s) for s in pool.live_slots()}
        assert live == held, f"{tier.name}: {len(live - held)} slots held by no block"


def check_cached(engine: Engine, rk: RequestKeys, mode: str, step: int) -> None:
    """The prompt just saved is cached where ``mode`` says: in DDR always (the tiers have room for one
    prompt), and on disk too under write-through."""
    copies = engine.copies(rk)
    assert len(copies) == rk.num_blocks, f"request {step}: {len(copies)} of {rk.num_blocks} blocks cached"
    assert all(Tier.DDR in c for c in copies), f"request {step}: not all in DDR: {copies}"
    if mode == "write-through":
        assert all(Tier.DISK in c for c in copies), f"request {step}: not all on disk: {copies}"


def check_demoted(engine: Engine, step: int) -> None:
    """Write-back: the prompt DDR had to give up three requests ago was demoted, not dropped."""
    if len(engine.history) <= 3:
        return
    old = engine.history[-4]
    copies = engine.copies(old)
    assert len(copies) == old.num_blocks, f"request {step}: an evicted prompt kept {len(copies)} blocks"
    assert all(Tier.DISK in c or Tier.DDR in c for c in copies)
    assert any(Tier.DISK in c for c in copies), f"request {step}: nothing of an evicted prompt went to disk"


@pytest.mark.parametrize("mode", ["write-through", "selective", "write-back"])
async def test_a_full_disk_tier_keeps_caching_new_prompts(tmp_path, mode):
    """DDR holds two prompts, disk about three: from the fourth request on, every save evicts in both tiers."""
    svc = await open_service(tmp_path / "cache", ddr_blocks=8, disk_blocks=10, write_mode=mode)
    engine = Engine(svc, keyer())
    try:
        for i in range(REQUESTS):
            rk = await engine.request(prompt(10_000 + i))
            check_cached(engine, rk, mode, i)
            if mode == "write-back":
                check_demoted(engine, i)
        snap = svc.snapshot()
        assert snap["cache_failures"] == {}, snap["cache_failures"]
        disk = svc.hierarchy.pool(Tier.DISK)
        if mode != "selective":  # one-off prompts never go down under selective
            assert snap["blocks"]["disk"] >= 6 and disk.retiring == 0
        assert snap["disk"]["delete_errors"] == 0
    finally:
        await svc.close()


async def test_selective_reuse_writes_down_and_reloads_from_a_full_disk(tmp_path):
    """Prompts come back (every third request repeats one of the last few): reused blocks go down to disk,
    come back from it once DDR dropped them, and new ones keep getting cached on the full disk."""
    svc = await open_service(tmp_path / "cache", ddr_blocks=8, disk_blocks=10, write_mode="selective")
    engine = Engine(svc, keyer())
    rng = np.random.default_rng(7)
    try:
        for i in range(REQUESTS):
            seed = 20_000 + i
            if i % 3 == 2:
                seed = 20_000 + int(rng.integers(max(0, i - 6), i))
            rk = await engine.request(prompt(seed))
            check_cached(engine, rk, "selective", i)
        assert engine.from_disk > 0 and engine.loaded > 0
        assert svc.snapshot()["cache_failures"] == {}
    finally:
        await svc.close()


async def test_after_a_restart_under_another_salt_the_recovered_blocks_make_room(tmp_path):
    """A previous run filled the disk under salt "a"; a new service under salt "b" over the same directory
    can never use those blocks, and its new prompts must still get onto disk (the foreign blocks are evicted,
    the oldest before any block of this run)."""
    cache = tmp_path / "cache"
    first = await open_service(cache, ddr_blocks=8, disk_blocks=10, salt="a", write_mode="write-through")
    try:
        engine = Engine(first, keyer("a"))
        for i in range(6):
            await engine.request(prompt(30_000 + i))
        assert first.snapshot()["blocks"]["disk"] >= 9  # the disk is full of salt "a"
    finally:
        await first.close()
    for salt in ("b", "c"):  # and once more: the restart before left its blocks too
        svc = await open_service(cache, ddr_blocks=8, disk_blocks=10, salt=salt, write_mode="write-through")
        try:
            waiting = svc.snapshot()["recovered"]["waiting"]
            assert waiting >= 9
            engine = Engine(svc, keyer(salt))
            for i in range(max(8, REQUESTS // 4)):
                rk = await engine.request(prompt(40_000 + i))
                check_cached(engine, rk, "write-through", i)
            snap = svc.snapshot()
            assert snap["recovered"] == {"waiting": 0, "evicted": waiting}
            assert snap["cache_failures"] == {}
        finally:
            await svc.close()


async def test_a_restart_under_the_same_salt_reuses_recovered_blocks_before_evicting_them(tmp_path):
    cache = tmp_path / "cache"
    svc = await open_service(cache, ddr_blocks=8, disk_blocks=10, write_mode="write-through")
    try:
        engine = Engine(svc, keyer())
        kept = [await engine.request(prompt(50_000 + i)) for i in range(3)]
    finally:
        await svc.close()
    svc = await open_service(cache, ddr_blocks=8, disk_blocks=10, write_mode="write-through")
    try:
        engine = Engine(svc, keyer())
        await engine.request(prompt(50_002))  # named again: linked, loaded from disk, no longer a first victim
        assert engine.from_disk == PROMPT_BLOCKS
        for i in range(2):  # two new prompts: room comes from the recovered blocks nobody named
            await engine.request(prompt(60_000 + i))
        assert [len(engine.copies(rk)) for rk in kept] == [0, 0, PROMPT_BLOCKS]
        assert svc.snapshot()["recovered"]["evicted"] == 2 * PROMPT_BLOCKS
    finally:
        await svc.close()


async def test_a_block_computed_again_links_its_record_that_survived_a_restart(tmp_path):
    """The first block's record is gone (evicted before the restart), the others survived: the prompt is a
    miss, is computed again, and its write-down links the surviving records instead of writing them again
    (the store refuses a second record of one name)."""
    cache = tmp_path / "cache"
    svc = await open_service(cache, ddr_blocks=8, disk_blocks=10, write_mode="write-through")
    try:
        engine = Engine(svc, keyer())
        rk = await engine.request(prompt(70_000))
        name = (rk.namespace.digest, rk.keys[0] + rk.checks[0].to_bytes(8, "little"))
    finally:
        await svc.close()
    store = (await DiskPool.open_sized(cache / "blocks", 10 * 2 * BB)).store
    try:
        await store.delete(store.get(*name))
    finally:
        await store.close()
    svc = await open_service(cache, ddr_blocks=8, disk_blocks=10, write_mode="write-through")
    try:
        engine = Engine(svc, keyer())
        assert svc.snapshot()["recovered"]["waiting"] == PROMPT_BLOCKS - 1
        rk = await engine.request(prompt(70_000))
        assert engine.loaded == 0
        assert engine.copies(rk) == [{Tier.DDR, Tier.DISK}] * PROMPT_BLOCKS
        assert svc.hierarchy.pool(Tier.DISK).store.stats()["writes"] == 1  # only the first block was written
        assert svc.snapshot()["cache_failures"] == {}
    finally:
        await svc.close()


async def test_blocks_not_cached_are_counted_per_tier_and_reason_and_logged_once(tmp_path, caplog, monkeypatch):
    svc = await open_service(tmp_path / "cache", ddr_blocks=8, disk_blocks=10, write_mode="write-through")
    engine = Engine(svc, keyer())
    try:
        store = svc.hierarchy.pool(Tier.DISK).store

        async def failing_write(items):
            raise DiskWriteError("injected: the drive is gone")

        monkeypatch.setattr(store, "write_many", failing_write)
        with caplog.at_level(logging.INFO, logger="kv_runtime"):
            for i in range(2):
                await engine.request(prompt(80_000 + i))
        assert svc.snapshot()["cache_failures"] == {"disk": {"write_error": 2 * PROMPT_BLOCKS}}
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "not cached" in r.getMessage()]
        assert len(warned) == 1 and warned[0].exc_info is None

        # Every DDR block pinned (a lease held by a long request): a new prompt finds no room there.
        monkeypatch.undo()
        held = svc.lookup(engine.history[-1])
        other = svc.lookup(engine.history[-2])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kv_runtime"):
            await engine.request(prompt(80_100, blocks=4))
            await engine.request(prompt(80_101, blocks=4))
        svc.release(held)
        svc.release(other)
        assert svc.snapshot()["cache_failures"]["ddr"] == {"no_room": 8}
        no_room = [r for r in caplog.records if "(no_room)" in r.getMessage()]
        assert len(no_room) == 1 and no_room[0].levelno == logging.INFO and no_room[0].exc_info is None
        rk = await engine.request(prompt(80_102))  # the leases went back: caching resumes
        check_cached(engine, rk, "write-through", 0)
    finally:
        await svc.close()


async def test_two_write_downs_of_one_block_write_it_once_and_lose_no_slot(tmp_path):
    """A demotion (make_room) and a write-down (another request saved the same prompt) of the same blocks at
    once: one write each, the demotion's DDR copies drop only once nothing reads them, no slot is lost."""
    svc = await open_service(tmp_path / "cache", ddr_blocks=8, disk_blocks=10, write_mode="selective")
    try:
        rk = keyer().request(prompt(90_000))
        nodes = svc.hierarchy.put(rk, 0, torch.zeros((PROMPT_BLOCKS, BB), dtype=torch.uint8))
        blocks = [n.payload for n in nodes]
        written = await asyncio.gather(svc.write_down(blocks, keep_source=False), svc.write_down(blocks))
        assert sorted(written) == [0, PROMPT_BLOCKS]
        assert all(Tier.DISK in r.copies for r in blocks)
        assert svc.hierarchy.pool(Tier.DISK).store.stats()["writes"] == PROMPT_BLOCKS
        assert svc.snapshot()["cache_failures"] == {}
        check_slots(svc)
    finally:
        await svc.close()


async def test_a_demotion_keeps_a_ddr_copy_that_another_copy_is_reading(tmp_path):
    svc = await open_service(tmp_path / "cache", ddr_blocks=8, disk_blocks=10, write_mode="write-back")
    try:
        rk = keyer().request(prompt(91_000))
        nodes = svc.hierarchy.put(rk, 0, torch.zeros((PROMPT_BLOCKS, BB), dtype=torch.uint8))
        ddr = svc.hierarchy.pool(Tier.DDR)
        reading = nodes[1].payload.copies[Tier.DDR]
        ddr.acquire_io(reading)  # another migration's source
        await svc.write_down([n.payload for n in nodes], keep_source=False)
        assert [set(n.payload.copies) for n in nodes] == [{Tier.DISK}, {Tier.DDR, Tier.DISK}, {Tier.DISK}]
        check_slots(svc)
        ddr.release_io(reading)
        assert svc.hierarchy.evict(Tier.DDR, BB) == ddr.reserve_bytes(BB)  # a redundant copy: the next victim
        assert ddr.live_bytes == 0
        check_slots(svc)
    finally:
        await svc.close()


@pytest.mark.parametrize("mode", ["write-through", "write-back"])
async def test_concurrent_requests_with_background_saves_lose_no_slot(tmp_path, mode):
    """Two requests at a time, their saves (and write-downs, demotions) in the background, a third of the
    prompts repeated: after each pair every tier's slots are still all held by blocks, and a new prompt is
    cached."""
    svc = await open_service(tmp_path / "cache", ddr_blocks=16, disk_blocks=24, write_mode=mode)
    engine = Engine(svc, keyer())
    rng = np.random.default_rng(11)
    try:
        for i in range(0, REQUESTS, 2):
            seeds = [
                92_000 + i + j if (i + j) % 3 else 92_000 + int(rng.integers(max(0, i - 8), i + 1)) for j in (0, 1)
            ]
            await asyncio.gather(*(engine.request(prompt(s, blocks=2 + s % 3), drain=False) for s in seeds))
            await svc.drain()
            check_slots(svc)
            rk = await engine.request(prompt(1_000_000 + i))
            check_cached(engine, rk, mode, i)
        failures = svc.snapshot()["cache_failures"]
        assert not {"error", "refused", "write_error"} & {r for t in failures.values() for r in t}, failures
    finally:
        await svc.close()
