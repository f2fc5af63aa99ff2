"""Self-healing metadata: an index that is not a database, has another schema or user_version, or is missing,
and a manifest that is not a manifest, are moved aside and rebuilt; the index from the slabs' block headers.
Blocks written before come back with the same bytes, a block that fails verification is not republished, a
key found twice keeps its first copy, and overlapping slots are never both published. A manifest with other
settings stays an error."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_helpers import NUM_SLABS, SLAB_BYTES

import kv_io.disk_store as disk_store
from kv_io.align import ALIGN
from kv_io.disk_format import HEADER_BYTES, block_capacity
from kv_io.disk_store import DiskLocation, DiskRecord, DiskStore

NS = b"rebuild"


def payload_for(key: bytes, n: int) -> torch.Tensor:
    """Every payload is a function of its key: any block found on disk can be checked for being right."""
    seed = int.from_bytes(key[-4:].rjust(4, b"\0"), "little") * 7919 + n
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


async def open_store(directory: Path) -> DiskStore:
    return await DiskStore.open(directory, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)


async def write(store: DiskStore, key: bytes, slab: int, offset: int, n: int) -> DiskRecord:
    return await store.write(NS, key, DiskLocation(slab, offset, block_capacity(n)), payload_for(key, n))


async def layout(directory: Path) -> list[DiskRecord]:
    """Blocks of mixed sizes in both slabs: adjacent runs, gaps, an empty payload, a slab's last slot."""
    store = await open_store(directory)
    sizes = [5000, 8192, 0, 70_000, 1, 3 * ALIGN]
    records, offset = [], 0
    for i, n in enumerate(sizes):
        records.append(await write(store, f"a{i}".encode(), 0, offset, n))
        offset += block_capacity(n) + (ALIGN if i % 2 else 0)
    records.append(await write(store, b"b0", 1, 3 * ALIGN, 20_000))
    last = SLAB_BYTES - block_capacity(10_000)
    records.append(await write(store, b"b1", 1, last, 10_000))
    await store.close()
    return records


def plain(records: list[DiskRecord]) -> set[tuple[bytes, bytes, int, int, int]]:
    return {(r.namespace, r.key, r.location.slab, r.location.offset, r.length) for r in records}


async def assert_all_read_back(store: DiskStore) -> None:
    for rec in store.records():
        out = torch.empty(rec.length, dtype=torch.uint8)
        assert await store.read(rec, out), rec
        assert torch.equal(out, payload_for(rec.key, rec.length)), rec


def damaged(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f"{name}.damaged-"))


def random_bytes_index(directory: Path) -> None:
    (directory / "index.sqlite3").write_bytes(random.Random(7).randbytes(16 * 1024))


def wrong_columns_index(directory: Path) -> None:
    path = directory / "index.sqlite3"
    path.unlink()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE blocks (id INTEGER PRIMARY KEY, payload BLOB)")
    db.execute("INSERT INTO blocks VALUES (1, x'00')")
    db.commit()
    db.close()


def wrong_user_version_index(directory: Path) -> None:
    db = sqlite3.connect(directory / "index.sqlite3")
    db.execute("PRAGMA user_version=7")
    db.close()


def truncated_header_index(directory: Path) -> None:
    path = directory / "index.sqlite3"
    data = path.read_bytes()
    path.write_bytes(b"SQLite format 3\0" + bytes(len(data) - 16))  # right magic, zeroed header and pages


@pytest.mark.parametrize(
    "damage", [random_bytes_index, wrong_columns_index, wrong_user_version_index, truncated_header_index]
)
async def test_a_damaged_index_is_moved_aside_and_rebuilt(store_dir: Path, damage) -> None:
    written = await layout(store_dir)
    damage(store_dir)
    before = (store_dir / "index.sqlite3").read_bytes()
    store = await open_store(store_dir)
    assert plain(store.records()) == plain(written)
    s = store.stats()
    assert (s["metadata_rebuilds"], s["rebuilt_blocks"], s["recovered"]) == (1, len(written), len(written))
    [aside] = damaged(store_dir, "index.sqlite3")
    assert (store_dir / aside).read_bytes() == before  # moved aside byte for byte
    await assert_all_read_back(store)
    # The rebuilt index is a normal one: writes, deletes and a reopen work without another rebuild.
    await store.delete(store.get(NS, b"a0"))
    extra = await write(store, b"c0", 1, 12 * ALIGN, 100)
    await store.close()
    store = await open_store(store_dir)
    assert plain(store.records()) == plain([r for r in written if r.key != b"a0"] + [extra])
    assert store.stats()["metadata_rebuilds"] == 0
    await store.close()


async def test_a_missing_index_is_rebuilt_from_the_slabs(store_dir: Path) -> None:
    written = await layout(store_dir)
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (store_dir / name).unlink(missing_ok=True)
    store = await open_store(store_dir)
    assert plain(store.records()) == plain(written)
    assert store.stats()["metadata_rebuilds"] == 1 and damaged(store_dir, "index.sqlite3") == []
    await assert_all_read_back(store)
    await store.close()


@pytest.mark.parametrize(
    "text",
    [
        b"{not json",
        b"",
        b"\xff\xfe garbage",
        b"[1, 2, 3]",
        b'"kvtier-disk-store"',
        b'{"format": "kvtier-disk-store", "format_version": 1}',
        b'{"format": "kvtier-disk-store", "format_version": 1, "align": 4096, "header_bytes": 4096, '
        b'"slab_bytes": "262144", "num_slabs": 2}',
    ],
)
async def test_a_damaged_manifest_is_moved_aside_and_rewritten(store_dir: Path, text: bytes) -> None:
    written = await layout(store_dir)
    (store_dir / "manifest.json").write_bytes(text)
    store = await open_store(store_dir)
    assert plain(store.records()) == plain(written)
    assert store.stats()["metadata_rebuilds"] == 1
    [aside] = damaged(store_dir, "manifest.json")
    assert (store_dir / aside).read_bytes() == text  # kept as it was, for a look
    await assert_all_read_back(store)
    await store.close()
    # The rewritten manifest guards the geometry again.
    with pytest.raises(ValueError, match="slab_bytes"):
        await DiskStore.open(store_dir, slab_bytes=2 * SLAB_BYTES, num_slabs=NUM_SLABS)


async def test_a_readable_manifest_with_other_settings_is_still_an_error(store_dir: Path) -> None:
    await layout(store_dir)
    manifest = store_dir / "manifest.json"
    other = manifest.read_text().replace('"format": "kvtier-disk-store"', '"format": "someone-else"')
    manifest.write_text(other)
    with pytest.raises(ValueError, match="someone-else"):
        await open_store(store_dir)
    assert manifest.read_text() == other and damaged(store_dir, "manifest.json") == []


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_a_block_that_fails_verification_is_not_republished(store_dir: Path) -> None:
    written = await layout(store_dir)
    by_key = {r.key: r for r in written}
    payload_hit, header_hit = by_key[b"a3"], by_key[b"b0"]
    flip(disk_store_slab(store_dir, 0), payload_hit.location.offset + HEADER_BYTES + 12_345)
    flip(disk_store_slab(store_dir, 1), header_hit.location.offset + 20)  # inside the namespace/key bytes
    random_bytes_index(store_dir)
    store = await open_store(store_dir)
    assert plain(store.records()) == plain([r for r in written if r.key not in (b"a3", b"b0")])
    await assert_all_read_back(store)
    # Their slots are free: the allocator may put the blocks back.
    await write(store, b"a3", 0, payload_hit.location.offset, payload_hit.length)
    await store.close()


def disk_store_slab(directory: Path, slab: int) -> Path:
    return directory / f"slab-{slab:05d}.bin"


async def test_a_key_found_twice_keeps_its_first_copy(store_dir: Path) -> None:
    store = await open_store(store_dir)
    first = await write(store, b"dup", 0, 8 * ALIGN, 6000)
    await store.delete(first)  # the bytes stay in slab 0; only the row goes
    second = await write(store, b"dup", 1, 0, 6000)
    other = await write(store, b"other", 1, block_capacity(6000), 50)
    await store.close()
    random_bytes_index(store_dir)
    store = await open_store(store_dir)
    assert plain(store.records()) == plain([first, other])  # slab 0 comes first
    assert second not in store.records()
    await assert_all_read_back(store)
    await store.close()


async def test_overlapping_slots_are_never_both_published(store_dir: Path) -> None:
    store = await open_store(store_dir)
    big = await write(store, b"big", 0, 0, 5 * ALIGN)  # a slot of 6 pages
    await store.delete(big)
    inner = await write(store, b"inner", 0, 2 * ALIGN, 100)  # its header lands inside big's payload
    # big's header is intact and still decodes; its payload no longer matches its checksum.
    await store.close()
    random_bytes_index(store_dir)
    store = await open_store(store_dir)
    assert plain(store.records()) == plain([inner])
    await assert_all_read_back(store)
    await store.close()


@pytest.mark.parametrize("chunk", [ALIGN, 3 * ALIGN, 16 << 20])
async def test_the_walk_does_not_depend_on_its_read_window(store_dir: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(disk_store, "_SCAN_CHUNK", chunk)
    written = await layout(store_dir)
    random_bytes_index(store_dir)
    store = await open_store(store_dir)
    assert plain(store.records()) == plain(written)
    await assert_all_read_back(store)
    await store.close()


async def test_a_magic_inside_a_payload_is_not_a_block(store_dir: Path) -> None:
    # A payload that contains what looks like a header at a page boundary: the walk jumps past the verified
    # block that holds it, and a forged header alone (without a matching payload checksum) is never published.
    store = await open_store(store_dir)
    inner = await write(store, b"inner", 1, 0, 1000)
    await store.close()
    with open(disk_store_slab(store_dir, 1), "rb") as f:
        forged_slot = f.read(block_capacity(1000))
    data = torch.zeros(3 * ALIGN, dtype=torch.uint8)
    data[ALIGN : ALIGN + len(forged_slot)] = torch.frombuffer(bytearray(forged_slot), dtype=torch.uint8)
    store = await open_store(store_dir)
    outer = await store.write(NS, b"outer", DiskLocation(0, 0, block_capacity(data.numel())), data)
    await store.delete(store.get(NS, b"inner"))
    await store.close()
    random_bytes_index(store_dir)
    store = await open_store(store_dir)
    found = {r.key: r for r in store.records()}
    assert found[b"outer"] == outer and found[b"inner"] == inner  # not the copy inside "outer"
    assert len(found) == 2
    await store.close()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(st.integers(0, NUM_SLABS - 1), st.integers(0, 40), st.integers(0, 3 * ALIGN), st.booleans()),
        min_size=1,
        max_size=25,
    )
)
def test_a_rebuild_finds_every_live_block_and_only_correct_ones(tmp_path_factory, ops) -> None:
    """Random writes (into any free slot) and deletes, then a rebuild: every block published at the end is
    found again, and every block found reads back as its key's payload (deleted ones may come back: their
    key still names their content)."""
    directory = tmp_path_factory.mktemp("rebuild") / "disk"

    async def run() -> None:
        store = await open_store(directory)
        for i, (slab, page, n, delete) in enumerate(ops):
            location = DiskLocation(slab, page * ALIGN, block_capacity(n))
            if location.offset + location.capacity > SLAB_BYTES:
                continue
            for rec in store.records():  # make room: the caller owns slots, so free the overlapping ones
                r = rec.location
                if (
                    r.slab == slab
                    and r.offset < location.offset + location.capacity
                    and location.offset < r.offset + r.capacity
                ):
                    await store.delete(rec)
            rec = await write(store, f"k{i:04d}".encode(), slab, location.offset, n)
            if delete:
                await store.delete(rec)
        live = plain(store.records())
        await store.close()
        random_bytes_index(directory)
        store = await open_store(directory)
        found = plain(store.records())
        assert live <= found
        await assert_all_read_back(store)
        await store.close()

    asyncio.run(run())


async def test_the_damaged_file_is_never_overwritten(store_dir: Path, monkeypatch) -> None:
    await layout(store_dir)
    monkeypatch.setattr(disk_store.time, "time", lambda: 1_700_000_000.0)
    for round_ in range(2):
        (store_dir / "index.sqlite3").write_bytes(bytes([round_]) * 4096)
        store = await open_store(store_dir)
        await store.close()
    names = damaged(store_dir, "index.sqlite3")
    assert names == ["index.sqlite3.damaged-1700000000", "index.sqlite3.damaged-1700000000.1"]
    assert [(store_dir / n).read_bytes()[:1] for n in names] == [b"\0", b"\1"]
    assert os.path.exists(store_dir / "index.sqlite3")


async def test_an_index_with_a_corrupt_page_is_rebuilt(store_dir: Path) -> None:
    store = await open_store(store_dir)
    written = []
    for slab in range(NUM_SLABS):
        for page in range(SLAB_BYTES // ALIGN):
            written.append(await write(store, f"s{slab}p{page:03d}-{'x' * 200}".encode(), slab, page * ALIGN, 0))
    await store.close()
    path = store_dir / "index.sqlite3"
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) >= 4 * page_size  # the table and its index span several pages
    data[2 * page_size : 3 * page_size] = random.Random(3).randbytes(page_size)  # a page past the schema's
    path.write_bytes(bytes(data))
    store = await open_store(store_dir)
    assert store.stats()["metadata_rebuilds"] == 1
    assert plain(store.records()) == plain(written)
    await store.close()
