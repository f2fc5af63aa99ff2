"""DiskStore and disk space: a size the filesystem cannot hold is refused before anything is created, slab
files are created by the first write into them, and a slab allocation that fails (ENOSPC) fails that write
only, leaving no partial slab behind. (The same with a real file-size limit: test_disk_recovery.py.)"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
import torch
from io_helpers import NUM_SLABS, SLAB_BYTES

from kv_io.disk_format import block_capacity
from kv_io.disk_store import (
    RESERVE_MIN_BYTES,
    DiskCapacityError,
    DiskLocation,
    DiskRecord,
    DiskStore,
    DiskWriteError,
)

NS = b"space"


def payload(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def loc(slab: int, offset: int, n: int) -> DiskLocation:
    return DiskLocation(slab, offset, block_capacity(n))


def slab_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("slab-"))


def fake_free_space(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> None:
    """os.statvfs reports a 1 GiB filesystem with `free_bytes` available."""
    frsize = 4096

    def statvfs(path: object) -> os.statvfs_result:
        blocks = (1 << 30) // frsize
        avail = free_bytes // frsize
        return os.statvfs_result((frsize, frsize, blocks, avail, avail, 1000, 1000, 1000, 0, 255))

    monkeypatch.setattr(os, "statvfs", statvfs)


async def test_a_size_larger_than_the_filesystem_is_refused_before_anything_exists(store_dir: Path) -> None:
    fs = os.statvfs(store_dir.parent.parent)
    free = fs.f_bavail * fs.f_frsize
    slab = 1 << 30
    num = free // slab + 16  # at least 16 GiB more than the filesystem has free
    with pytest.raises(DiskCapacityError) as err:
        await DiskStore.open(store_dir, slab_bytes=slab, num_slabs=num)
    message = str(err.value)
    assert f"{slab * num} bytes" in message and "bytes free" in message and str(store_dir) in message
    assert isinstance(err.value, ValueError)  # a configuration error, like the other refusals of `open`
    assert not store_dir.exists() and not store_dir.parent.exists()


async def test_the_check_counts_what_slab_files_already_hold(store_dir: Path, monkeypatch) -> None:
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    for slab in range(NUM_SLABS):
        await store.write(NS, f"k{slab}".encode(), loc(slab, 0, 5000), payload(5000, slab))
    await store.close()
    before = sorted(p.name for p in store_dir.iterdir())
    # Only the reserve is free: the existing store needs nothing more and opens.
    fake_free_space(monkeypatch, RESERVE_MIN_BYTES)
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    assert len(store.records()) == NUM_SLABS
    await store.close()
    # Two more slabs do not fit: refused before the manifest's geometry is even looked at, nothing created.
    with pytest.raises(DiskCapacityError, match=f"need {2 * SLAB_BYTES} more bytes"):
        await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS + 2)
    assert sorted(p.name for p in store_dir.iterdir()) == before
    # A new directory is judged by the filesystem it would be created on.
    fresh = store_dir.parent / "fresh"
    fake_free_space(monkeypatch, RESERVE_MIN_BYTES + SLAB_BYTES)
    with pytest.raises(DiskCapacityError, match=str(store_dir.parent)):
        await DiskStore.open(fresh, slab_bytes=SLAB_BYTES, num_slabs=2)
    assert not fresh.exists()
    store = await DiskStore.open(fresh, slab_bytes=SLAB_BYTES, num_slabs=1)
    await store.close()


async def test_slab_files_are_created_by_their_first_write(store_dir: Path) -> None:
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=4)
    assert slab_files(store_dir) == []
    assert store.stats()["slabs_allocated"] == 0
    a = await store.write(NS, b"a", loc(0, 0, 5000), payload(5000, 1))
    assert slab_files(store_dir) == ["slab-00000.bin"]
    assert store.slab_path(0).stat().st_size == SLAB_BYTES  # preallocated whole on creation
    b = await store.write(NS, b"b", loc(2, 0, 5000), payload(5000, 2))
    assert slab_files(store_dir) == ["slab-00000.bin", "slab-00002.bin"]
    assert store.stats()["slabs_allocated"] == 2
    await store.close()
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=4)
    assert slab_files(store_dir) == ["slab-00000.bin", "slab-00002.bin"]  # opening creates none
    assert store.records() == [a, b]
    # A read from a slab that has no file yet is a miss.
    never = DiskLocation(3, 0, block_capacity(5000))
    assert not await store.read(DiskRecord(NS, b"c", never, 5000), torch.empty(5000, dtype=torch.uint8))
    assert store.stats()["missing"] == 1
    await store.close()


async def test_concurrent_first_writes_create_a_slab_once(store_dir: Path, monkeypatch) -> None:
    calls = []
    real = os.posix_fallocate

    def counting(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", counting)
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    step = block_capacity(5000)
    writes = [store.write(NS, f"k{i}".encode(), loc(0, i * step, 5000), payload(5000, i)) for i in range(4)]
    records = await asyncio.gather(*writes)
    assert calls == [SLAB_BYTES]
    for i, rec in enumerate(records):
        out = torch.empty(5000, dtype=torch.uint8)
        assert await store.read(rec, out) and torch.equal(out, payload(5000, i))
    await store.close()


def no_space(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


async def test_a_failed_slab_allocation_fails_the_write_and_leaves_no_file(store_dir: Path, monkeypatch) -> None:
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    kept = await store.write(NS, b"kept", loc(0, 0, 5000), payload(5000, 1))
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskWriteError, match="No space left on device") as err:
        await store.write_many(
            [(NS, b"x", loc(0, 16384, 5000), payload(5000, 2)), (NS, b"y", loc(1, 0, 10), payload(10, 3))]
        )
    assert "cannot allocate" in str(err.value) and "slab-00001.bin" in str(err.value)
    assert slab_files(store_dir) == ["slab-00000.bin"]  # the slab it tried to make is gone
    assert store.records() == [kept]  # the whole batch failed: nothing of it published
    assert store.stats()["write_errors"] == 1 and store.stats()["slabs_allocated"] == 1
    # Writes into the existing slab need no allocation and still work; so does slab 1 once space is back.
    assert await store.write(NS, b"x", loc(0, 16384, 5000), payload(5000, 2))
    monkeypatch.undo()
    y = await store.write(NS, b"y", loc(1, 0, 10), payload(10, 3))
    assert store.slab_path(1).stat().st_size == SLAB_BYTES
    assert await store.read(y, torch.empty(10, dtype=torch.uint8))
    await store.close()


async def test_a_failed_re_extension_keeps_a_short_slab_and_its_blocks(store_dir: Path, monkeypatch) -> None:
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    kept = await store.write(NS, b"kept", loc(0, 0, 5000), payload(5000, 1))
    await store.close()
    short = kept.location.capacity
    os.truncate(store.slab_path(0), short)
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    assert store.records() == [kept]
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskWriteError, match="No space"):
        await store.write(NS, b"x", loc(0, 16384, 5000), payload(5000, 2))
    assert store.slab_path(0).stat().st_size == short  # cut back to what it was, not removed
    out = torch.empty(5000, dtype=torch.uint8)
    assert await store.read(kept, out) and torch.equal(out, payload(5000, 1))
    monkeypatch.undo()
    await store.write(NS, b"x", loc(0, 16384, 5000), payload(5000, 2))
    assert store.slab_path(0).stat().st_size == SLAB_BYTES
    assert await store.read(kept, out) and torch.equal(out, payload(5000, 1))
    await store.close()
