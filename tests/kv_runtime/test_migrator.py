"""The migrator between host memory and disk: round trips, restart recovery, corrupt and truncated slabs,
disk full, write errors, cancellation, and disk defragmentation."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
import torch
from runtime_helpers import BLOCK_TOKENS, block_bytes, tokens

from kv_io.file_io import FileIO, make_file_io
from kv_runtime.events import EventKind
from kv_runtime.hierarchy import HierarchyManager
from kv_runtime.migrator import DirectionStats, KVMigrator, MigrationPlan
from kv_runtime.pool import DDRPool, DiskPool, PoolFullError, Tier

KIB = 1024
NBYTES = 8 * KIB
SLAB = 256 * KIB


class HookedIO(FileIO):
    """A real file engine with hooks to fail or hold writes."""

    def __init__(self) -> None:
        self.inner = make_file_io("posix")
        self.name = self.inner.name
        self.fail_writes = False
        self.hold: asyncio.Event | None = None
        self.writing = asyncio.Event()

    async def pread(self, path, offset, out):
        return await self.inner.pread(path, offset, out)

    async def pwrite(self, path, offset, data):
        self.writing.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await self.inner.pwrite(path, offset, data)

    async def fsync(self, path):
        await self.inner.fsync(path)

    async def close(self):
        await self.inner.close()


async def open_hierarchy(directory, *, num_slabs=2, file_io=None):
    disk = await DiskPool.open(directory, slab_bytes=SLAB, num_slabs=num_slabs, file_io=file_io)
    h = HierarchyManager({Tier.DDR: DDRPool(512 * KIB, pin=False), Tier.DISK: disk})
    return h, KVMigrator(h)


def fill(h, keyer, seed, n):
    rk = keyer.request(tokens(seed, n * BLOCK_TOKENS))
    data = torch.stack([block_bytes(seed * 100 + i, NBYTES) for i in range(n)])
    return rk, h.put(rk, 0, data), data


def no_leaks(h: HierarchyManager) -> None:
    """No lease, no busy slot, no slot without an owner, quotas equal to what the pools hold."""
    for node in h.index._nodes.values():
        assert node.pin_count == 0 and node.payload.in_flight == 0
    owned = {id(s) for n in h.index._nodes.values() for s in n.payload.copies.values()}
    for tier, pool in h.pools.items():
        for s in pool.live_slots():
            assert s.busy == 0 and id(s) in owned
        assert h.quotas.usage(tier) == sum(s.capacity for s in pool.live_slots())


async def test_ddr_disk_round_trip_and_demotion(tmp_path, keyer):
    h, mig = await open_hierarchy(tmp_path)
    _, nodes, data = fill(h, keyer, 1, 6)
    res = [n.payload for n in nodes]
    out = await mig.migrate(MigrationPlan(Tier.DDR, Tier.DISK, res, keep_source=False))
    assert len(out.moved) == 6 and out.nbytes == 6 * NBYTES
    assert all(r.tiers == [Tier.DISK] for r in res)
    assert h.pools[Tier.DDR].live_bytes == 0
    back = await mig.migrate(MigrationPlan(Tier.DISK, Tier.DDR, res))
    assert len(back.moved) == 6
    ddr = h.pools[Tier.DDR]
    for r, row in zip(res, data, strict=True):
        assert r.tiers == [Tier.DDR, Tier.DISK]
        assert torch.equal(ddr.view(r.copies[Tier.DDR]), row)
    stats = mig.direction_stats()
    assert stats["DDR->DISK"]["bytes"] == stats["DISK->DDR"]["bytes"] == 6 * NBYTES
    assert h.events.count(EventKind.STORED, Tier.DISK) == 6
    assert h.events.count(EventKind.REMOVED, Tier.DDR) == 6
    no_leaks(h)
    await h.pools[Tier.DISK].store.close()


def test_direction_seconds_count_overlapping_plans_once():
    stats = DirectionStats()
    stats.begin(0.0)
    stats.begin(1.0)  # overlaps the first plan
    stats.end(2.0)
    stats.end(3.0)
    stats.begin(5.0)  # after an idle gap, which is not counted
    stats.end(6.0)
    assert stats.seconds == 4.0
    stats.nbytes = 8 * 10**9
    assert stats.gbps == 2.0


async def test_concurrent_plans_report_their_common_time(tmp_path, keyer):
    h, mig = await open_hierarchy(tmp_path)
    chains = [fill(h, keyer, 20 + i, 3) for i in range(2)]
    plans = [MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes]) for _, nodes, _ in chains]
    results = await asyncio.gather(*(mig.migrate(p) for p in plans))
    seconds = mig.direction_stats()["DDR->DISK"]["seconds"]
    assert max(r.seconds for r in results) <= seconds <= sum(r.seconds for r in results)
    no_leaks(h)
    await h.pools[Tier.DISK].store.close()


async def test_restart_finds_every_block_verified(tmp_path, keyer):
    h, mig = await open_hierarchy(tmp_path)
    chains = [fill(h, keyer, 10 + i, 4) for i in range(3)]
    for _, nodes, _ in chains:
        await mig.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes]))
    await h.pools[Tier.DISK].store.close()

    h2, mig2 = await open_hierarchy(tmp_path)  # a new process: empty index, the disk tier reopened
    assert h2.adopt_disk() == 12
    assert h2.pools[Tier.DISK].live_bytes == 12 * NBYTES
    for seed, (_, _, data) in zip(range(10, 13), chains, strict=True):
        nodes = h2.match(keyer.request(tokens(seed, 4 * BLOCK_TOKENS)))
        assert len(nodes) == 4 and all(n.payload.tiers == [Tier.DISK] for n in nodes)
        out = await mig2.migrate(MigrationPlan(Tier.DISK, Tier.DDR, [n.payload for n in nodes]))
        assert len(out.moved) == 4
        for n, row in zip(nodes, data, strict=True):
            assert torch.equal(h2.pools[Tier.DDR].view(n.payload.copies[Tier.DDR]), row)
    assert h2.events.count(EventKind.RECOVERED) == 12
    # A different tenant salt never finds them.
    other = keyer.namespace.__class__(model_id="runtime-test@0001", kv_dtype="float16", block_size=4, cache_salt="x")
    from prefix_reuse import BlockKeyer

    assert h2.match(BlockKeyer(other).request(tokens(10, 4 * BLOCK_TOKENS))) == []
    no_leaks(h2)
    await h2.pools[Tier.DISK].store.close()


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
async def test_damaged_slab_is_a_counted_miss(tmp_path, keyer, damage):
    h, mig = await open_hierarchy(tmp_path, num_slabs=1)
    _, nodes, data = fill(h, keyer, 3, 4)
    res = [n.payload for n in nodes]
    await mig.migrate(MigrationPlan(Tier.DDR, Tier.DISK, res, keep_source=False))
    victim = res[2].copies[Tier.DISK]
    slab = h.pools[Tier.DISK].store.slab_path(0)
    if damage == "corrupt":
        with open(slab, "r+b") as f:
            f.seek(victim.offset + 4096 + 100)
            f.write(b"\xff" * 64)
    else:
        os.truncate(slab, victim.offset + 4096 + 10)
    out = await mig.migrate(MigrationPlan(Tier.DISK, Tier.DDR, res))
    assert [r in out.missed for r in res] == [False, False, True, damage == "truncate"]
    for r, row in zip(res[:2], data, strict=False):
        assert torch.equal(h.pools[Tier.DDR].view(r.copies[Tier.DDR]), row)
    # The only copy was bad: the block and the one after it (unreachable without it) left the index, their
    # slots freed; nothing wrong was handed out.
    assert res[2].dropped and res[3].dropped and not res[3].copies
    assert len(h.match(keyer.request(tokens(3, 4 * BLOCK_TOKENS)))) == 2
    assert h.events.count(EventKind.MISS, Tier.DISK) == 1  # block 3 had already left with block 2
    stats = h.pools[Tier.DISK].store.stats()
    assert stats["corrupt"] + stats["missing"] == len(out.missed)
    await h.pools[Tier.DISK].reap()
    no_leaks(h)
    await h.pools[Tier.DISK].store.close()


async def test_disk_full_raises_and_releases(tmp_path, keyer):
    h, mig = await open_hierarchy(tmp_path, num_slabs=1)
    _, nodes, _ = fill(h, keyer, 4, 30)  # 30 blocks of 12 KiB slots > one 256 KiB slab
    with pytest.raises(PoolFullError):
        await mig.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes]))
    assert h.pools[Tier.DISK].live_bytes == 0
    no_leaks(h)
    await h.pools[Tier.DISK].store.close()


async def test_write_error_is_a_failure_not_a_crash(tmp_path, keyer):
    io = HookedIO()
    h, mig = await open_hierarchy(tmp_path, file_io=io)
    _, nodes, _ = fill(h, keyer, 5, 3)
    io.fail_writes = True
    out = await mig.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes], keep_source=False))
    assert len(out.failed) == 3 and not out.moved
    assert all(n.payload.tiers == [Tier.DDR] for n in nodes)  # the source stays
    assert mig.direction_stats()["DDR->DISK"]["failures"] == 3
    no_leaks(h)
    await h.pools[Tier.DISK].store.close()
    await io.close()


async def test_cancellation_releases_every_slot_and_lease(tmp_path, keyer):
    io = HookedIO()
    h, mig = await open_hierarchy(tmp_path, file_io=io)
    _, nodes, _ = fill(h, keyer, 6, 5)
    io.hold = asyncio.Event()
    handle = mig.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes]))
    await io.writing.wait()
    assert all(n.pin_count == 1 for n in nodes)  # leased while in flight
    assert h.pools[Tier.DISK].live_bytes == 5 * NBYTES
    handle.cancel()
    io.hold.set()
    with pytest.raises(asyncio.CancelledError):
        await handle
    await h.pools[Tier.DISK].reap()
    assert h.pools[Tier.DISK].live_bytes == 0
    assert h.pools[Tier.DISK].store.stats()["published"] == 0
    assert all(n.payload.tiers == [Tier.DDR] for n in nodes)
    assert mig.direction_stats()["DDR->DISK"]["cancelled"] == 1
    no_leaks(h)
    await h.pools[Tier.DISK].store.close()
    await io.close()


async def test_disk_defragmentation_keeps_every_block(tmp_path, keyer):
    h, mig = await open_hierarchy(tmp_path, num_slabs=1)
    chains = [fill(h, keyer, 20 + i, 3) for i in range(5)]
    for _, nodes, _ in chains:
        await mig.migrate(MigrationPlan(Tier.DDR, Tier.DISK, [n.payload for n in nodes], keep_source=False))
    for _, nodes, _ in chains[::2]:
        h.drop(nodes[0])  # holes between the survivors
    disk = h.pools[Tier.DISK]
    await disk.reap()
    assert disk.get_fragmentation() > 0
    report = await disk.defragment()
    assert report.moved_blocks > 0 and report.fragmentation_after == 0.0
    assert report.utilization_after > report.utilization_before
    for _, nodes, data in chains[1::2]:
        out = await mig.migrate(MigrationPlan(Tier.DISK, Tier.DDR, [n.payload for n in nodes]))
        assert len(out.moved) == 3
        for n, row in zip(nodes, data, strict=True):
            assert torch.equal(h.pools[Tier.DDR].view(n.payload.copies[Tier.DDR]), row)
    no_leaks(h)
    await disk.store.close()
