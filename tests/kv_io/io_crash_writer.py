"""A writer process for the kv_io recovery tests, run as a script and killed (or starved) on purpose.

Usage: python io_crash_writer.py MODE DIRECTORY SLAB_BYTES NUM_SLABS

Every payload is derived from its key alone (`payload_for`), so the parent can verify any block it finds
without talking to this process. Lines on stdout are the protocol ("published N", "torn N", JSON results).

Modes:
  loop     write blocks back to back, printing "published N" after each write returns; never stops.
  torn     write 3 blocks, then write the header and half the payload of block 3, print "torn 3", hang.
  fsize    run under RLIMIT_FSIZE: a slab write past the limit and a commit that cannot grow the WAL must both
           fail with DiskWriteError and publish nothing; prints one JSON line with what happened.
  lazy     open a new store under an RLIMIT_FSIZE smaller than one slab (nothing is preallocated at open), then
           write into the first slab: its allocation fails, is cleaned up, and the write fails alone; prints one
           JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from kv_io.disk_format import block_capacity
from kv_io.disk_store import DiskLocation, DiskStore, DiskWriteError
from kv_io.file_io import FileIO, PosixFileIO, Transfer

NAMESPACE = b"crash-test"


def key_for(i: int) -> bytes:
    return f"block-{i:06d}".encode()


def length_for(i: int) -> int:
    return 20_000 + 3_001 * (i % 7)  # mixed, unaligned sizes


def payload_for(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 256, (length_for(i),), dtype=torch.uint8, generator=g)


def slot_bytes() -> int:
    return block_capacity(max(length_for(i) for i in range(7)))


def location_for(i: int, slab_bytes: int) -> DiskLocation:
    per_slab = slab_bytes // slot_bytes()
    return DiskLocation(i // per_slab, (i % per_slab) * slot_bytes(), block_capacity(length_for(i)))


class _TearingIO(PosixFileIO):
    """At one slot, writes the header and only the first half of the payload, reports it, then hangs until
    killed (the store writes a block's header page and payload as one vectored request)."""

    def __init__(self, torn_offset: int) -> None:
        super().__init__(threads=2)
        self.torn_offset = torn_offset

    async def pwritev_many(self, transfers: Sequence[Transfer]) -> list[int | BaseException]:
        for t in transfers:
            if t.offset == self.torn_offset:
                t.hook()  # the header, with the checksum of the whole payload
                header, data = t.bufs
                await super().pwritev(t.path, t.offset, [header, data[: data.numel() // 2]])
                print(f"torn {t.offset}", flush=True)
                await asyncio.sleep(3600)
        return await super().pwritev_many(transfers)


async def _loop(store: DiskStore, slab_bytes: int, num_slabs: int) -> None:
    total = num_slabs * (slab_bytes // slot_bytes())
    for i in range(total):
        await store.write(NAMESPACE, key_for(i), location_for(i, slab_bytes), payload_for(i))
        print(f"published {i}", flush=True)
    await asyncio.sleep(3600)


async def _torn(directory: Path, slab_bytes: int, num_slabs: int) -> None:
    victim = 3
    fio: FileIO = _TearingIO(location_for(victim, slab_bytes).offset)
    store = await DiskStore.open(directory, slab_bytes=slab_bytes, num_slabs=num_slabs, file_io=fio)
    for i in range(victim + 1):
        await store.write(NAMESPACE, key_for(i), location_for(i, slab_bytes), payload_for(i))
        print(f"published {i}", flush=True)


async def _fsize(directory: Path, slab_bytes: int, num_slabs: int) -> dict[str, object]:
    store = await DiskStore.open(directory, slab_bytes=slab_bytes, num_slabs=num_slabs)
    wal = directory / "index.sqlite3-wal"
    near = location_for(0, slab_bytes)
    # Slab 0's file exists before the limits (slabs are allocated by their first write), so that what fails
    # below is the block write and the commit, not the slab's allocation.
    await store.write(NAMESPACE, key_for(1), location_for(1, slab_bytes), payload_for(1))
    # Publish blocks in slab 1 until the WAL is larger than slot 0's end, so that a file-size limit can let
    # the slot-0 slab write through and still stop the WAL from growing.
    i = slab_bytes // slot_bytes()
    while wal.stat().st_size < near.offset + near.capacity:
        await store.write(NAMESPACE, key_for(i), location_for(i, slab_bytes), payload_for(i))
        i += 1
    before = sorted(r.key.decode() for r in store.records())
    result: dict[str, object] = {"published_before": before}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # 1) A slab write beyond the file-size limit fails in the kernel (EFBIG; Python ignores SIGXFSZ).
    last = slab_bytes // slot_bytes() - 1  # last slot of slab 0
    far = location_for(last, slab_bytes)
    resource.setrlimit(resource.RLIMIT_FSIZE, (far.offset, hard))
    try:
        await store.write(NAMESPACE, b"far", far, payload_for(last))
        result["slab_write"] = "published"
    except DiskWriteError as e:
        result["slab_write"] = f"DiskWriteError: {e}"
    # 2) The slab write fits under the limit, but the WAL cannot grow: the commit fails, nothing is published.
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal.stat().st_size, hard))
    try:
        await store.write(NAMESPACE, b"near", near, payload_for(0))
        result["commit"] = "published"
    except DiskWriteError as e:
        result["commit"] = f"DiskWriteError: {e}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    result["published_after_failures"] = sorted(r.key.decode() for r in store.records())
    # The store stays usable: the same slots take the blocks once space is back.
    await store.write(NAMESPACE, b"near", near, payload_for(0))
    await store.write(NAMESPACE, b"far", far, payload_for(last))
    result["published_after_retry"] = sorted(r.key.decode() for r in store.records())
    result["stats"] = store.stats()
    await store.close()
    return result


async def _lazy(directory: Path, slab_bytes: int, num_slabs: int) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (slab_bytes // 2, hard))
    store = await DiskStore.open(directory, slab_bytes=slab_bytes, num_slabs=num_slabs)
    result: dict[str, object] = {"open": "ok", "files_after_open": sorted(p.name for p in directory.iterdir())}
    try:
        await store.write(NAMESPACE, key_for(0), location_for(0, slab_bytes), payload_for(0))
        result["write"] = "published"
    except DiskWriteError as e:
        result["write"] = f"DiskWriteError: {e}"
    result["files_after_failure"] = sorted(p.name for p in directory.iterdir())
    result["published_after_failure"] = [r.key.decode() for r in store.records()]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    await store.write(NAMESPACE, key_for(0), location_for(0, slab_bytes), payload_for(0))
    result["published_after_retry"] = [r.key.decode() for r in store.records()]
    result["slab_size_after_retry"] = store.slab_path(0).stat().st_size
    result["stats"] = store.stats()
    await store.close()
    return result


async def main(mode: str, directory: Path, slab_bytes: int, num_slabs: int) -> None:
    if mode == "loop":
        store = await DiskStore.open(directory, slab_bytes=slab_bytes, num_slabs=num_slabs)
        await _loop(store, slab_bytes, num_slabs)
    elif mode == "torn":
        await _torn(directory, slab_bytes, num_slabs)
    elif mode == "fsize":
        print(json.dumps(await _fsize(directory, slab_bytes, num_slabs)), flush=True)
    elif mode == "lazy":
        print(json.dumps(await _lazy(directory, slab_bytes, num_slabs)), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
