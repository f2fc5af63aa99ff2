"""DDR pool: allocation, reference counts, statistics, and defragmentation that never loses a byte."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_helpers import block_bytes

from kv_runtime.layout import KVLayout
from kv_runtime.pool import DDRPool, HBMPool, PoolFullError, Tier, TierUnavailableError

KIB = 1024


def test_allocate_free_refcounts_and_info():
    pool = DDRPool(64 * KIB, pin=False)
    a = pool.allocate(8 * KIB)
    b = pool.allocate(3 * KIB)  # occupies a 4 KiB extent
    info = pool.get_block_info(b)
    assert (info.tier, info.offset, info.nbytes, info.capacity, info.refs) == (Tier.DDR, 8 * KIB, 3 * KIB, 4 * KIB, 1)
    pool.retain(a)
    assert not pool.free(a)  # one reference left
    assert pool.free(a)
    with pytest.raises(ValueError, match="not a live slot"):
        pool.free(a)
    assert pool.live_bytes == 3 * KIB
    # Span is [0, 12 KiB): the hole left by `a` counts against utilisation.
    assert pool.get_utilization() == pytest.approx(3 / 12)
    assert pool.get_fragmentation() == pytest.approx(1 - 52 / 60)
    assert pool.get_occupancy() == pytest.approx(3 / 64)


def test_batch_is_adjacent_and_all_or_nothing():
    pool = DDRPool(64 * KIB, pin=False)
    slots = pool.allocate_many([8 * KIB] * 4)
    assert [s.offset for s in slots] == [0, 8 * KIB, 16 * KIB, 24 * KIB]
    with pytest.raises(PoolFullError):
        pool.allocate_many([16 * KIB] * 3)
    assert pool.live_bytes == 32 * KIB  # nothing of the failed batch stayed allocated
    with pytest.raises(ValueError):
        pool.allocate(0)


def test_busy_slot_cannot_be_released():
    pool = DDRPool(16 * KIB, pin=False)
    s = pool.allocate(4 * KIB)
    pool.acquire_io(s)
    with pytest.raises(RuntimeError, match="busy"):
        pool.free(s)
    pool.release_io(s)
    assert pool.free(s)


async def test_defrag_keeps_every_byte_and_skips_busy_slots():
    pool = DDRPool(256 * KIB, pin=False)
    sizes = [8 * KIB, 4352, 2 * KIB + 100] * 10  # full precision, int8-ish and int4-ish blocks
    slots = [pool.allocate(n) for n in sizes]
    for i, s in enumerate(slots):
        pool.view(s).copy_(block_bytes(i, s.nbytes))
    keep = [(i, s) for i, s in enumerate(slots) if i % 3 != 1]
    for i, s in enumerate(slots):
        if i % 3 == 1:
            pool.free(s)
    busy = keep[3][1]
    pool.acquire_io(busy)
    busy_offset = busy.offset
    before = pool.get_utilization()
    report = await pool.defragment()
    assert report.moved_blocks > 0 and report.skipped_busy == 1
    assert busy.offset == busy_offset
    assert report.utilization_after > before
    for i, s in keep:
        assert torch.equal(pool.view(s), block_bytes(i, s.nbytes)), i
    pool.release_io(busy)
    report = await pool.defragment()
    assert report.fragmentation_after == 0.0
    assert pool.get_utilization() == pytest.approx(sum(s.nbytes for _, s in keep) / sum(s.capacity for _, s in keep))
    for i, s in keep:
        assert torch.equal(pool.view(s), block_bytes(i, s.nbytes)), i


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "free", "defrag"]), st.integers(1, 20_000), st.integers(0, 99)), max_size=60
    )
)
async def test_random_churn_against_byte_map(ops):
    pool = DDRPool(128 * KIB, pin=False)
    live = []  # (seed, slot)
    seed = 0
    for op, size, pick in ops:
        if op == "alloc":
            try:
                s = pool.allocate(size)
            except PoolFullError:
                assert pool.free_bytes < pool.reserve_bytes(size) or pool.get_fragmentation() > 0
                continue
            seed += 1
            pool.view(s).copy_(block_bytes(seed, size))
            live.append((seed, s))
        elif op == "free" and live:
            _, s = live.pop(pick % len(live))
            pool.free(s)
        elif op == "defrag":
            await pool.defragment()
            assert pool.get_fragmentation() == 0.0
        # Brute force: no two live extents overlap, and every block still holds its own bytes.
        used = torch.zeros(pool.capacity_bytes, dtype=torch.int32)
        for k, s in live:
            used[s.offset : s.offset + s.capacity] += 1
            assert torch.equal(pool.view(s), block_bytes(k, s.nbytes))
        assert int(used.max()) <= 1
        assert pool.live_bytes == sum(s.nbytes for _, s in live)


def test_hbm_unavailable_without_cuda(layout: KVLayout, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TierUnavailableError, match="CUDA"):
        HBMPool(layout, 8)
    with pytest.raises(TierUnavailableError, match="pin=False"):
        DDRPool(64 * KIB, pin=True)
