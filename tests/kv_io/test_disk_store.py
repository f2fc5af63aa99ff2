"""DiskStore: round trips, verification (corrupt, truncated, mismatched -> counted misses), slot rules,
relocation, deletion, permissions, locking, reopen, cancellation, and a random-operation model check."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_helpers import NUM_SLABS, SLAB_BYTES

from kv_io.align import ALIGN, aligned_empty
from kv_io.disk_format import HEADER_BYTES, CorruptBlockError, block_capacity
from kv_io.disk_store import (
    BlockWrite,
    DiskLocation,
    DiskRecord,
    DiskStore,
    DiskWriteError,
    StoreLockedError,
    _runs,
)
from kv_io.file_io import PosixFileIO, probe_direct_io

NS = b"model@1|bf16|bs64"


def payload(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def loc(slab: int, offset: int, n: int) -> DiskLocation:
    return DiskLocation(slab, offset, block_capacity(n))


async def open_store(directory: Path, **kw) -> DiskStore:
    return await DiskStore.open(directory, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS, **kw)


async def read_back(store: DiskStore, rec: DiskRecord) -> tuple[bool, torch.Tensor]:
    out = torch.empty(rec.length, dtype=torch.uint8)
    return await store.read(rec, out), out


async def test_write_read_round_trip(store_dir: Path) -> None:
    store = await open_store(store_dir)
    data = payload(10_000, 1)
    rec = await store.write(NS, b"k1", loc(0, 0, 10_000), data)
    assert rec == DiskRecord(NS, b"k1", loc(0, 0, 10_000), 10_000)
    assert store.get(NS, b"k1") == rec and store.records() == [rec]
    ok, out = await read_back(store, rec)
    assert ok and torch.equal(out, data)
    # A larger output buffer is fine; only the first `length` bytes are written.
    big = torch.full((20_000,), 7, dtype=torch.uint8)
    assert await store.read(rec, big)
    assert torch.equal(big[:10_000], data) and int(big[10_000:].min()) == 7
    s = store.stats()
    assert (s["writes"], s["bytes_written"], s["reads"], s["bytes_read"], s["published"]) == (1, 10_000, 2, 20_000, 1)
    await store.close()


async def test_empty_and_typed_payloads(store_dir: Path) -> None:
    store = await open_store(store_dir)
    empty = await store.write(NS, b"empty", loc(0, 0, 0), torch.empty(0, dtype=torch.uint8))
    assert (await read_back(store, empty))[0]
    halves = torch.randn(3, 100).to(torch.bfloat16)  # any dtype is stored as its bytes
    rec = await store.write(NS, b"bf16", loc(0, ALIGN, 600), halves)
    ok, out = await read_back(store, rec)
    assert ok and torch.equal(out.view(torch.bfloat16).view(3, 100), halves)
    await store.close()


async def test_write_many_and_read_many(store_dir: Path) -> None:
    store = await open_store(store_dir)
    sizes = [5_000, 8192, 1, 70_000]
    stride = block_capacity(max(sizes))
    items = [
        BlockWrite(NS, f"b{i}".encode(), DiskLocation(i % 2, (i // 2) * stride, block_capacity(n)), payload(n, i))
        for i, n in enumerate(sizes)
    ]
    recs = await store.write_many(items)
    outs = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    assert await store.read_many(recs, outs) == [True] * 4
    assert all(torch.equal(o, it.payload) for o, it in zip(outs, items, strict=True))
    with pytest.raises(ValueError, match="output buffers"):
        await store.read_many(recs, outs[:1])
    await store.close()


async def test_slot_rules(store_dir: Path) -> None:
    store = await open_store(store_dir)
    data = payload(5000, 2)
    rec = await store.write(NS, b"a", loc(0, 0, 5000), data)
    bad = {
        "out of range": DiskLocation(NUM_SLABS, 0, block_capacity(5000)),
        "multiples": DiskLocation(0, 100, block_capacity(5000)),
        "needed": DiskLocation(0, 64 * 1024, HEADER_BYTES),
        "exceeds slab": DiskLocation(0, SLAB_BYTES - ALIGN, block_capacity(5000)),
        "overlaps published": DiskLocation(0, ALIGN, block_capacity(5000)),
    }
    for message, where in bad.items():
        with pytest.raises(ValueError, match=message):
            await store.write(NS, b"b", where, data)
    with pytest.raises(ValueError, match="already published"):
        await store.write(NS, b"a", loc(1, 0, 5000), data)
    with pytest.raises(TypeError):
        await store.write("ns", b"b", loc(1, 0, 5000), data)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.write(NS, b"b", loc(1, 0, 5000), data.numpy())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.read(rec, torch.empty(5000, dtype=torch.float32))
    with pytest.raises(ValueError, match="holds"):
        await store.read(rec, torch.empty(10, dtype=torch.uint8))
    # A batch with one bad item publishes nothing and reserves nothing.
    with pytest.raises(ValueError):
        await store.write_many([(NS, b"c", loc(1, 0, 5000), data), (NS, b"d", DiskLocation(0, 0, 1), data)])
    assert store.get(NS, b"c") is None
    assert (await store.write(NS, b"c", loc(1, 0, 5000), data)).key == b"c"
    await store.close()


async def test_concurrent_writes_to_one_slot_or_key_are_refused(store_dir: Path) -> None:
    store = await open_store(store_dir)
    data = payload(5000, 3)
    first = asyncio.create_task(store.write(NS, b"x", loc(0, 0, 5000), data))
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="in flight"):
        await store.write(NS, b"y", loc(0, 0, 5000), data)
    with pytest.raises(ValueError, match="being written"):
        await store.write(NS, b"x", loc(1, 0, 5000), data)
    await first
    await store.close()


async def test_corrupt_payload_is_a_counted_miss(store_dir: Path) -> None:
    store = await open_store(store_dir)
    rec = await store.write(NS, b"k", loc(0, 2 * ALIGN, 9000), payload(9000, 4))
    with open(store.slab_path(0), "r+b") as f:
        f.seek(2 * ALIGN + HEADER_BYTES + 1234)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    ok, _ = await read_back(store, rec)
    assert not ok
    assert store.stats()["corrupt"] == 1 and store.stats()["reads"] == 0
    await store.close()


async def test_corrupt_header_is_a_counted_miss(store_dir: Path) -> None:
    store = await open_store(store_dir)
    rec = await store.write(NS, b"k", loc(1, 0, 100), payload(100, 5))
    with open(store.slab_path(1), "r+b") as f:
        f.write(b"garbage!")
    assert not (await read_back(store, rec))[0]
    assert store.stats()["corrupt"] == 1
    await store.close()


async def test_namespace_key_or_length_mismatch_is_a_miss(store_dir: Path) -> None:
    """A record that points at another block's slot (or claims another length) never returns those bytes."""
    store = await open_store(store_dir)
    rec = await store.write(NS, b"k", loc(0, 0, 5000), payload(5000, 6))
    for forged in (
        DiskRecord(b"other-tenant", b"k", rec.location, 5000),
        DiskRecord(NS, b"other-key", rec.location, 5000),
        DiskRecord(NS, b"k", rec.location, 4999),
    ):
        assert not (await read_back(store, forged))[0]
    assert store.stats()["mismatched"] == 3
    await store.close()


async def test_truncated_slab_is_a_miss_and_dropped_on_reopen(store_dir: Path) -> None:
    store = await open_store(store_dir)
    keep = await store.write(NS, b"keep", loc(0, 0, 5000), payload(5000, 7))
    lost = await store.write(NS, b"lost", loc(0, 64 * 1024, 5000), payload(5000, 8))
    os.truncate(store.slab_path(0), 64 * 1024 + 100)  # cuts through the second block's header
    assert (await read_back(store, keep))[0]
    assert not (await read_back(store, lost))[0]
    assert store.stats()["missing"] == 1
    await store.close()

    store = await open_store(store_dir)
    assert store.records() == [keep]
    assert store.stats()["dropped_on_open"] == 1
    assert store.slab_path(0).stat().st_size == 64 * 1024 + 100  # opening changes nothing
    assert (await read_back(store, keep))[0]
    # The dropped block's slot is free again; the write re-extends the slab first.
    assert (await store.write(NS, b"lost", lost.location, payload(5000, 8))).location == lost.location
    assert store.slab_path(0).stat().st_size == SLAB_BYTES
    assert (await read_back(store, keep))[0]
    await store.close()


def adjacent_blocks(sizes: list[int], start: int = 0) -> list[DiskLocation]:
    """Slots laid end to end in slab 0 from `start`, one per payload size."""
    locs, offset = [], start
    for n in sizes:
        locs.append(loc(0, offset, n))
        offset += block_capacity(n)
    return locs


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 15), st.sampled_from([0, 100, ALIGN, 2 * ALIGN, 3 * ALIGN])),
        max_size=12,
        unique_by=lambda b: b[:2],
    ),
    limit_pages=st.integers(1, 8),
)
def test_runs_partition_a_batch_into_adjacent_requests(blocks: list[tuple[int, int, int]], limit_pages: int) -> None:
    """Every block is in exactly one run; a run is slots laid end to end with no padding between its blocks,
    within the request limit unless it is a single block, and no two consecutive runs could have been one."""
    slot = block_capacity(3 * ALIGN)
    locations = [DiskLocation(s, i * slot, block_capacity(n)) for s, i, n in blocks]
    lengths = [n for _, _, n in blocks]
    limit = limit_pages * ALIGN
    runs = _runs(locations, lengths, limit)
    assert sorted(i for r in runs for i in r.members) == list(range(len(blocks)))
    for r in runs:
        assert r.starts[0] == 0 and len(r.starts) == len(r.members)
        for a, b, start in zip(r.members, r.members[1:], r.starts[1:], strict=False):
            assert locations[b].slab == locations[a].slab == r.slab
            assert locations[b].offset == locations[a].offset + locations[a].capacity
            assert HEADER_BYTES + lengths[a] == locations[a].capacity  # no padding skipped
            assert r.offset + start == locations[b].offset
        if len(r.members) > 1:
            assert r.starts[-1] + HEADER_BYTES + lengths[r.members[-1]] <= limit


async def test_adjacent_blocks_move_as_one_request_and_verify_one_by_one(store_dir: Path) -> None:
    """With a request size that spans several blocks, a batch of adjacent blocks is read and written in runs;
    a corrupt block inside a run is a miss on its own, and its neighbours still verify."""
    fio = PosixFileIO(threads=2, chunk_bytes=8 * ALIGN)
    store = await open_store(store_dir, file_io=fio)
    sizes = [ALIGN, 2 * ALIGN, ALIGN, 3 * ALIGN, 100]  # the last one's slot has padding: it ends its run
    locations = adjacent_blocks(sizes)
    assert [r.members for r in _runs(locations, sizes, fio.chunk_bytes)] == [[0, 1, 2], [3, 4]]
    datas = [payload(n, 40 + i) for i, n in enumerate(sizes)]
    items = [(NS, b"b%d" % i, lo, d) for i, (lo, d) in enumerate(zip(locations, datas, strict=True))]
    recs = await store.write_many(items)
    outs = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    assert await store.read_many(recs, outs) == [True] * 5
    assert all(torch.equal(o, d) for o, d in zip(outs, datas, strict=True))
    with open(store.slab_path(0), "r+b") as f:
        f.seek(locations[1].offset + HEADER_BYTES + 7)
        f.write(b"\xff\x00\xff")
    assert await store.read_many(recs, outs) == [True, False, True, True, True]
    assert store.stats()["corrupt"] == 1
    await store.close()
    await fio.close()


async def test_truncation_inside_a_run_misses_only_the_cut_blocks(store_dir: Path) -> None:
    fio = PosixFileIO(threads=2, chunk_bytes=16 * ALIGN)
    store = await open_store(store_dir, file_io=fio)
    sizes = [ALIGN] * 4
    locations = adjacent_blocks(sizes)
    assert len(_runs(locations, sizes, fio.chunk_bytes)) == 1
    recs = await store.write_many([(NS, b"t%d" % i, lo, payload(ALIGN, i)) for i, lo in enumerate(locations)])
    os.truncate(store.slab_path(0), locations[2].offset + HEADER_BYTES + 10)  # cuts the third block's payload
    outs = [torch.empty(ALIGN, dtype=torch.uint8) for _ in sizes]
    assert await store.read_many(recs, outs) == [True, True, False, False]
    assert store.stats()["missing"] == 2
    await store.close()
    await fio.close()


async def test_missing_slab_file_is_a_miss(store_dir: Path) -> None:
    store = await open_store(store_dir, file_io=PosixFileIO(threads=2))
    rec = await store.write(NS, b"k", loc(1, 0, 5000), payload(5000, 9))
    await store.close()
    os.unlink(store.slab_path(1))
    fresh = PosixFileIO(threads=2)
    store2 = await open_store(store_dir, file_io=fresh)
    assert store2.records() == []  # the slab was recreated empty: the row pointed past its end
    assert store2.stats()["dropped_on_open"] == 1
    await store2.close()
    # A slab file that does not exist (never written, or vanished): reading from it is a miss, not an exception.
    store3 = await open_store(store_dir, file_io=fresh)
    assert not store3.slab_path(0).exists()  # never written: never created
    forged = DiskRecord(NS, b"k", DiskLocation(0, 0, rec.location.capacity), 5000)
    assert not (await read_back(store3, forged))[0]
    assert store3.stats()["missing"] == 1
    await store3.close()
    await fresh.close()


async def test_io_error_is_a_counted_miss(store_dir: Path) -> None:
    class FailingReads(PosixFileIO):
        async def preadv_many(self, transfers):
            return [OSError(5, "Input/output error") for _ in transfers]

    fio = FailingReads(threads=2)
    store = await open_store(store_dir, file_io=fio)
    rec = await store.write(NS, b"k", loc(0, 0, 5000), payload(5000, 10))
    assert not (await read_back(store, rec))[0]
    assert store.stats()["io_errors"] == 1
    await store.close()
    await fio.close()


async def test_failed_fsync_publishes_nothing(store_dir: Path) -> None:
    class FailingSync(PosixFileIO):
        async def fsync(self, path):
            raise OSError(28, "No space left on device")

    fio = FailingSync(threads=2)
    store = await open_store(store_dir, file_io=fio)
    with pytest.raises(DiskWriteError, match="No space"):
        await store.write(NS, b"k", loc(0, 0, 5000), payload(5000, 11))
    assert store.records() == [] and store.stats()["write_errors"] == 1
    await store.close()
    store = await open_store(store_dir)
    assert store.records() == []
    # The slot was released: writing there works.
    await store.write(NS, b"k", loc(0, 0, 5000), payload(5000, 11))
    await store.close()
    await fio.close()


async def test_delete(store_dir: Path) -> None:
    store = await open_store(store_dir)
    rec = await store.write(NS, b"k", loc(0, 0, 5000), payload(5000, 12))
    await store.delete(rec)
    assert store.get(NS, b"k") is None and store.records() == []
    with pytest.raises(KeyError):
        await store.delete(rec)
    again = await store.write(NS, b"k2", rec.location, payload(5000, 13))  # slot reusable
    # The stale record of the deleted block now points at another block's bytes: a miss.
    assert not (await read_back(store, rec))[0]
    await store.close()
    store = await open_store(store_dir)
    assert store.records() == [again]
    await store.close()


@pytest.mark.parametrize(
    ("new_slab", "new_offset"),
    [(1, 0), (0, 96 * 1024), (0, 16 * 1024)],  # other slab, same slab apart, same slab overlapping itself
)
async def test_relocate(store_dir: Path, new_slab: int, new_offset: int) -> None:
    store = await open_store(store_dir)
    data = payload(30_000, 14)
    rec = await store.write(NS, b"k", loc(0, 32 * 1024, 30_000), data)
    moved = await store.relocate(rec, loc(new_slab, new_offset, 30_000))
    assert moved.location == loc(new_slab, new_offset, 30_000)
    assert store.get(NS, b"k") == moved and store.records() == [moved]
    ok, out = await read_back(store, moved)
    assert ok and torch.equal(out, data)
    assert store.stats()["relocations"] == 1
    # The old slot (the part not covered by the new one) is free; the new one is occupied.
    with pytest.raises(ValueError, match="overlaps"):
        await store.write(NS, b"other", moved.location, data)
    await store.close()
    store = await open_store(store_dir)
    assert store.records() == [moved]
    assert (await read_back(store, moved))[0]
    await store.close()


async def test_relocate_refusals(store_dir: Path) -> None:
    store = await open_store(store_dir)
    a = await store.write(NS, b"a", loc(0, 0, 5000), payload(5000, 15))
    b = await store.write(NS, b"b", loc(1, 0, 5000), payload(5000, 16))
    with pytest.raises(ValueError, match="overlaps"):
        await store.relocate(a, b.location)
    with pytest.raises(KeyError):
        await store.relocate(DiskRecord(NS, b"zz", a.location, 5000), loc(0, 64 * 1024, 5000))
    # A block that does not verify cannot be moved; it stays published where it was for the caller to drop.
    with open(store.slab_path(0), "r+b") as f:
        f.seek(HEADER_BYTES)
        f.write(b"\0" * 16)
    with pytest.raises(CorruptBlockError):
        await store.relocate(a, loc(0, 64 * 1024, 5000))
    assert store.get(NS, b"a") == a
    assert await store.relocate(b, b.location) == b
    # After a failed move the target slot is free again and the old slot still belongs to `a`.
    await store.write(NS, b"c", loc(0, 64 * 1024, 5000), payload(5000, 17))
    with pytest.raises(ValueError, match="overlaps"):
        await store.write(NS, b"d", a.location, payload(5000, 17))
    await store.close()


async def test_permissions_private(store_dir: Path) -> None:
    store = await open_store(store_dir)
    await store.write(NS, b"k", loc(0, 0, 5000), payload(5000, 18))
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in store_dir.iterdir())
    assert {"manifest.json", "index.sqlite3", "index.sqlite3-wal", "lock", "slab-00000.bin"} <= set(names)
    for p in store_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
    await store.close()


async def test_existing_directory_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    store = await open_store(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    await store.close()


async def test_io_threads_size_the_stores_own_engine(store_dir: Path) -> None:
    store = await open_store(store_dir, io_threads=3)
    assert store.file_io.threads == 3
    await store.close()
    with pytest.raises(ValueError, match="io_threads"):
        await open_store(store_dir, file_io=PosixFileIO(threads=2), io_threads=3)


async def test_one_open_store_per_directory(store_dir: Path) -> None:
    store = await open_store(store_dir)
    with pytest.raises(StoreLockedError):
        await open_store(store_dir)
    await store.close()
    again = await open_store(store_dir)
    await again.close()


async def test_manifest_guards_geometry_and_version(store_dir: Path) -> None:
    store = await open_store(store_dir)
    await store.close()
    with pytest.raises(ValueError, match="slab_bytes"):
        await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES * 2, num_slabs=NUM_SLABS)
    manifest = store_dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ValueError, match="version 99"):
        await open_store(store_dir)
    with pytest.raises(ValueError):
        await DiskStore.open(store_dir, slab_bytes=1000, num_slabs=1)
    with pytest.raises(TypeError, match="open"):
        DiskStore()


async def test_cancelled_write_publishes_nothing_and_frees_its_slot(store_dir: Path) -> None:
    store = await open_store(store_dir)
    data = payload(200_000, 19)
    where = loc(0, 0, 200_000)
    task = asyncio.create_task(store.write(NS, b"k", where, data))
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.get(NS, b"k") is None
    rec = await store.write(NS, b"k", where, data)
    assert (await read_back(store, rec))[0]
    await store.close()
    store = await open_store(store_dir)
    assert store.records() == [rec]
    await store.close()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(st.sampled_from(["write", "delete", "relocate", "reopen"]), st.integers(0, 7), st.integers(0, 9000)),
        min_size=1,
        max_size=25,
    )
)
def test_random_operations_match_a_dict_model(tmp_path_factory: pytest.TempPathFactory, ops) -> None:
    """Writes, deletes, relocations and reopenings against a plain dict of key -> bytes: the store publishes
    exactly the model's keys, each reads back the model's bytes, and slots follow the caller's choices."""
    directory = tmp_path_factory.mktemp("model") / "store"
    slot = block_capacity(9000)
    slots = [(s, i * slot) for s in range(NUM_SLABS) for i in range(SLAB_BYTES // slot)]

    async def run() -> None:
        store = await open_store(directory)
        model: dict[bytes, torch.Tensor] = {}
        for n, (op, k, size) in enumerate(ops):
            key = f"k{k}".encode()
            rec = store.get(NS, key)
            used = {(r.location.slab, r.location.offset) for r in store.records()}
            free = [s for s in slots if s not in used]
            if op == "write" and rec is None and free:
                s, off = free[0]
                data = payload(size, n)
                await store.write(NS, key, DiskLocation(s, off, block_capacity(size)), data)
                model[key] = data
            elif op == "delete" and rec is not None:
                await store.delete(rec)
                del model[key]
            elif op == "relocate" and rec is not None and free:
                s, off = free[-1]
                await store.relocate(rec, DiskLocation(s, off, rec.location.capacity))
            elif op == "reopen":
                await store.close()
                store = await open_store(directory)
            assert {r.key for r in store.records()} == set(model)
        for key, data in model.items():
            rec = store.get(NS, key)
            ok, out = await read_back(store, rec)
            assert ok and torch.equal(out, data)
        await store.close()

    asyncio.run(run())


async def test_aligned_blocks_bypass_the_page_cache(store_dir: Path) -> None:
    """Headers fill a page and slots are aligned, so an aligned payload in an aligned buffer (a staging-pool
    buffer) moves entirely through O_DIRECT where the filesystem supports it."""
    fio = PosixFileIO(threads=2)
    store = await open_store(store_dir, file_io=fio)
    data = aligned_empty(8 * ALIGN)
    data.copy_(payload(8 * ALIGN, 20))
    rec = await store.write(NS, b"k", loc(0, 0, data.numel()), data)
    out = aligned_empty(data.numel())
    assert await store.read(rec, out) and torch.equal(out, data)
    stats = fio.stats()
    if probe_direct_io(store_dir):
        assert stats["buffered_bytes"] == 0
        assert stats["direct_bytes"] == 2 * (HEADER_BYTES + data.numel())
    else:
        assert stats["direct_fallbacks"] >= 1
    await store.close()
    await fio.close()
