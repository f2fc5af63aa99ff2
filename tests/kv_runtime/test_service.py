"""The tier service both engines drive: leases, loads of any size through DDR, saves, demotion, release.

The service is built from a configuration by ``TierService.open`` over a small model config (32 KiB blocks of
4 tokens), with a real DDR pool and a real disk tier; the "engine" is a sink that copies the DDR bytes out.
"""

from __future__ import annotations

import pytest
import runtime_helpers
import torch
from runtime_helpers import BLOCK_TOKENS, block_bytes, tokens

from kv_io.disk_format import HEADER_BYTES
from kv_io.private_files import UnsafePathError
from kv_runtime.config import ConfigError
from kv_runtime.layout import KVLayout
from kv_runtime.migrator import MigrationPlan
from kv_runtime.pool import DDRPool, Tier
from kv_runtime.service import TierService
from prefix_reuse import BlockKeyer, KeyNamespace

MODEL = {
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "vocab_size": 1000,
}
LAYOUT = KVLayout.from_config(MODEL, block_size=BLOCK_TOKENS, dtype=torch.float16)
BB = LAYOUT.block_bytes  # 32 KiB
KEYER = BlockKeyer(KeyNamespace(model_id="svc-test@1", kv_dtype="float16", block_size=BLOCK_TOKENS))


async def open_service(tmp_path, *, ddr_blocks: int, disk_blocks: int = 64, **config) -> TierService:
    return await runtime_helpers.open_service(
        tmp_path, LAYOUT, KEYER, MODEL, ddr_blocks=ddr_blocks, disk_blocks=disk_blocks, **config
    )


async def on_disk_only(svc: TierService, seed: int, nblocks: int):
    """A chain of ``nblocks`` whose only copies are on disk (written through DDR in small groups)."""
    rk = KEYER.request(tokens(seed, nblocks * BLOCK_TOKENS))
    data = torch.stack([block_bytes(seed * 1000 + i, BB) for i in range(nblocks)])
    nodes = []
    for lo in range(0, nblocks, 2):
        part = svc.hierarchy.put(rk, lo, data[lo : lo + 2])
        await svc.migrator.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in part], keep_source=False))
        nodes += part
    assert all(set(n.payload.copies) == {Tier.DISK} for n in nodes)
    return rk, nodes, data


class Sink:
    """The engine: copies each chunk's DDR bytes out, and records how much DDR the service was using then."""

    def __init__(self, svc: TierService, n: int) -> None:
        self.ddr: DDRPool = svc.hierarchy.pool(Tier.DDR)
        self.out = torch.zeros((n, BB), dtype=torch.uint8)
        self.chunks: list[tuple[int, int]] = []
        self.peak_live = 0

    async def __call__(self, offset, blocks) -> None:
        self.chunks.append((offset, len(blocks)))
        self.peak_live = max(self.peak_live, self.ddr.live_bytes)
        for i, r in enumerate(blocks):
            self.out[offset + i].copy_(self.ddr.view(r.copies[Tier.DDR]))


async def test_a_disk_prefix_larger_than_ddr_streams_through_it_in_full(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=8)
    try:
        rk, nodes, data = await on_disk_only(svc, 1, 24)  # three times the DDR tier
        lease = svc.lookup(rk)
        assert lease.choice == "load" and len(lease.load_blocks) == 24
        assert all(n.pin_count == 1 for n in nodes)
        sink = Sink(svc, 24)
        result = await svc.load(lease, sink)
        assert (result.blocks, result.from_disk, result.misses) == (24, 24, 0)  # every block reused
        assert torch.equal(sink.out, data)
        assert [o for o, _ in sink.chunks] == sorted(o for o, _ in sink.chunks)  # in order
        assert len(sink.chunks) > 1 and sink.peak_live <= 8 * BB
        assert all(n.pin_count == 0 for n in nodes), "delivered chunks keep no pin"
        svc.release(lease)
        assert all(Tier.DISK in n.payload.copies for n in nodes)  # the disk copies stay
    finally:
        await svc.close()


async def test_ddr_blocks_go_to_the_engine_in_one_piece(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=32)
    try:
        rk = KEYER.request(tokens(2, 12 * BLOCK_TOKENS))
        data = torch.stack([block_bytes(2000 + i, BB) for i in range(12)])
        svc.hierarchy.put(rk, 0, data)
        lease = svc.lookup(rk)
        sink = Sink(svc, 12)
        result = await svc.load(lease, sink)
        assert (result.blocks, result.from_disk) == (12, 0)
        assert sink.chunks == [(0, 12)]  # already in DDR: no chunking, one copy
        assert torch.equal(sink.out, data)
        svc.release(lease)
    finally:
        await svc.close()


async def test_a_corrupt_block_ends_the_load_there_and_is_a_counted_miss(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=8)
    try:
        rk, nodes, data = await on_disk_only(svc, 3, 6)
        store = svc.hierarchy.pool(Tier.DISK).store
        slot = nodes[3].payload.copies[Tier.DISK]
        loc = svc.hierarchy.pool(Tier.DISK).location(slot)
        with store.slab_path(loc.slab).open("r+b") as f:
            f.seek(loc.offset + HEADER_BYTES + 100)
            f.write(b"\xff" * 8)
        lease = svc.lookup(rk)
        sink = Sink(svc, 6)
        result = await svc.load(lease, sink)
        assert (result.blocks, result.misses) == (3, 1)
        assert torch.equal(sink.out[:3], data[:3])
        svc.release(lease)
        assert nodes[3].payload.dropped or not nodes[3].payload.copies  # never handed out again
        assert len(svc.lookup(rk).nodes) == 3
    finally:
        await svc.close()


async def test_lookup_pins_only_what_it_loads_and_release_returns_it(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=16, prefill_tflops=1e9)  # recompute is free: nothing loads
    try:
        rk = KEYER.request(tokens(4, 4 * BLOCK_TOKENS))
        nodes = svc.hierarchy.put(rk, 0, torch.zeros((4, BB), dtype=torch.uint8))
        lease = svc.lookup(rk)
        assert lease.choice == "recompute" and lease.nodes == [] and all(n.pin_count == 0 for n in nodes)
        svc.cost.prefill_flops_per_s = 1.0  # now recomputing is hopeless
        lease = svc.lookup(rk, first=1)
        assert lease.choice == "load" and [n.pin_count for n in nodes] == [0, 1, 1, 1]
        svc.release(lease)
        svc.release(lease)  # twice is harmless
        assert [n.pin_count for n in nodes] == [0, 0, 0, 0]
    finally:
        await svc.close()


async def test_published_saves_are_visible_and_aborted_ones_leave_nothing(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=16, write_mode="write-through")
    try:
        rk = KEYER.request(tokens(5, 3 * BLOCK_TOKENS))
        slots = svc.reserve(3, BB)
        assert slots is not None and svc.saved_prefix(rk) == 0  # reserved is not visible
        nodes = svc.publish(rk, 0, slots)
        assert svc.saved_prefix(rk) == 3 and [n.depth for n in nodes] == [0, 1, 2]
        await svc.drain()
        assert all(Tier.DISK in n.payload.copies for n in nodes)  # write-through went down
        live = svc.hierarchy.pool(Tier.DDR).live_bytes
        svc.abort(svc.reserve(2, BB))
        assert svc.hierarchy.pool(Tier.DDR).live_bytes == live
        assert svc.reserve(100, BB) is None  # no room: not cached, not an error
    finally:
        await svc.close()


async def test_write_back_demotes_interior_blocks_before_dropping_anything(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=4, write_mode="write-back")
    try:
        rk = KEYER.request(tokens(6, 4 * BLOCK_TOKENS))
        nodes = svc.hierarchy.put(rk, 0, torch.stack([block_bytes(6000 + i, BB) for i in range(4)]))
        await svc.make_room(3 * BB)
        assert all(Tier.DISK in n.payload.copies for n in nodes[:3])  # the chain's interior went down too
        assert svc.hierarchy.pool(Tier.DDR).free_bytes >= 3 * BB
        assert len(svc.lookup(rk).nodes) == 4  # nothing was lost
    finally:
        await svc.close()


async def test_the_configuration_sizes_the_tiers(tmp_path):
    svc = await open_service(tmp_path, ddr_blocks=8, disk_blocks=0)
    try:
        assert set(svc.hierarchy.pools) == {Tier.DDR} and not svc.has_disk
        assert svc.hierarchy.pool(Tier.DDR).capacity_bytes == 8 * BB
        assert svc.cost.tiers["ddr"].bandwidth_gbps == 10.0
    finally:
        await svc.close()
    with pytest.raises(ValueError, match="ddr_bytes"):
        await open_service(tmp_path, ddr_blocks=0)


async def test_a_load_with_little_room_left_retries_until_every_block_came_through(tmp_path):
    """Another request pins most of DDR: read-ahead finds no room, and the load retries (in halves) once the
    pieces before have been delivered, still reusing every block."""
    svc = await open_service(tmp_path, ddr_blocks=8)
    try:
        busy = KEYER.request(tokens(7, 6 * BLOCK_TOKENS))
        held = svc.hierarchy.put(busy, 0, torch.zeros((6, BB), dtype=torch.uint8))
        svc.hierarchy.index.pin(held)  # 6 of 8 DDR blocks are another request's
        rk, _, data = await on_disk_only(svc, 8, 7)
        lease = svc.lookup(rk)
        sink = Sink(svc, 7)
        result = await svc.load(lease, sink)
        assert (result.blocks, result.from_disk, result.misses) == (7, 7, 0)
        assert torch.equal(sink.out, data)
        assert all(Tier.DDR in n.payload.copies for n in held), "a pinned block lost its DDR copy"
        svc.hierarchy.index.unpin(held)
        svc.release(lease)
    finally:
        await svc.close()


async def test_a_ddr_tier_larger_than_the_machine_and_an_open_cache_directory_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"ddr_bytes: .* GiB asked, this machine has"):
        await open_service(tmp_path, ddr_blocks=(1 << 60) // BB)
    shared = tmp_path / "cache"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(UnsafePathError, match="writable by group or others"):
        await open_service(tmp_path, ddr_blocks=8)
    assert not (shared / "blocks").exists()  # refused before anything was created in it
