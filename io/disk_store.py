"""The disk tier's bytes: preallocated slab files holding blocks, and a SQLite (WAL) table saying which are
published. It survives restarts: a new process that opens the directory finds every published block.

Directory layout (the directory is 0o700, every file in it 0o600)::

    manifest.json       format version and geometry (slab size, slab count), written atomically
    index.sqlite3       one row per published block (+ -wal / -shm while open)
    slab-00000.bin ...  preallocated slab files; a block occupies one ALIGN-aligned slot of a slab
    lock                flock'd while a process has the store open (one writer per directory)

Which slot a block goes to is the caller's decision (the runtime's disk allocator); the store checks that a
slot is in range, aligned, large enough and does not overlap a published block or a write in flight.

Crash safety rests on one ordering: a block's header and payload are written and made durable (fdatasync of
the slab) *before* its row is committed, and SQLite commits with synchronous=FULL. A process killed at any
point therefore leaves either a committed row whose bytes are on disk, or no row at all: torn writes are never
published. Every read verifies the header (magic, version, namespace, key, length, header checksum) and the
payload checksum, so a corrupt, truncated or reused slot is a miss, never wrong KV.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiofiles
import orjson
import torch

from kv_io.align import ALIGN, aligned_empty
from kv_io.disk_format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAX_NAME_BYTES,
    CorruptBlockError,
    as_bytes_view,
    block_capacity,
    decode_header,
    encode_header,
    payload_checksum,
)
from kv_io.file_io import FileIO, Transfer, first_error, make_file_io, settle

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DB_NAME = "index.sqlite3"
LOCK_NAME = "lock"
FORMAT_NAME = "kvtier-disk-store"
DIR_MODE = 0o700
FILE_MODE = 0o600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    namespace BLOB NOT NULL,
    key BLOB NOT NULL,
    slab INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    capacity INTEGER NOT NULL,
    length INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS blocks_slot ON blocks (slab, offset);
"""


@dataclass(frozen=True, slots=True)
class DiskLocation:
    """A slot: `capacity` bytes at `offset` in slab file `slab` (offset and capacity multiples of ALIGN)."""

    slab: int
    offset: int
    capacity: int


@dataclass(frozen=True, slots=True)
class DiskRecord:
    """A published block: who it is, where it is, and its payload length in bytes."""

    namespace: bytes
    key: bytes
    location: DiskLocation
    length: int


class BlockWrite(NamedTuple):
    """One item of `DiskStore.write_many` (a plain 4-tuple in this order works as well)."""

    namespace: bytes
    key: bytes
    location: DiskLocation
    payload: torch.Tensor


class DiskWriteError(Exception):
    """A write could not be made durable (ENOSPC, EFBIG, EIO, ...). Nothing of it was published."""


class StoreLockedError(RuntimeError):
    """Another open DiskStore (in this or another process) holds the directory."""


def _signed64(v: int) -> int:
    # SQLite integers are signed 64-bit; checksums are unsigned.
    return v - (1 << 64) if v >= 1 << 63 else v


def _unsigned64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags, FILE_MODE)


async def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write a small JSON file so that readers see the old or the new content, never a mix: temp file, fsync,
    rename over the target, fsync the directory (the rename itself must be durable too)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    async with aiofiles.open(tmp, "wb", opener=_private_opener) as f:
        await f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        await f.flush()
        await asyncio.to_thread(os.fsync, f.fileno())
    await asyncio.to_thread(os.replace, tmp, path)
    await asyncio.to_thread(_fsync_dir, path.parent)


async def read_json(path: Path) -> dict[str, Any]:
    async with aiofiles.open(path, "rb") as f:
        data = orjson.loads(await f.read())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


class _Extents:
    """Occupied byte ranges per slab: published blocks and writes in flight, kept sorted and disjoint.

    Invariant: within a slab no two ranges overlap, so the only candidates for overlapping a new range are its
    predecessor and successor by start offset (two bisects, no scan).
    """

    __slots__ = ("_owners", "_starts")

    def __init__(self, num_slabs: int) -> None:
        self._starts: list[list[int]] = [[] for _ in range(num_slabs)]
        self._owners: list[dict[int, tuple[int, object]]] = [{} for _ in range(num_slabs)]

    def conflict(self, slab: int, start: int, end: int) -> object | None:
        """The owner of a range overlapping [start, end), or None."""
        starts, owners = self._starts[slab], self._owners[slab]
        i = bisect.bisect_right(starts, start)
        if i > 0:
            prev_end, owner = owners[starts[i - 1]]
            if prev_end > start:
                return owner
        if i < len(starts) and starts[i] < end:
            return owners[starts[i]][1]
        return None

    def add(self, slab: int, start: int, end: int, owner: object) -> None:
        other = self.conflict(slab, start, end)
        if other is not None:
            raise ValueError(f"slot [{start}, {end}) of slab {slab} overlaps {_describe(other)}")
        bisect.insort(self._starts[slab], start)
        self._owners[slab][start] = (end, owner)

    def remove(self, slab: int, start: int) -> None:
        starts = self._starts[slab]
        del starts[bisect.bisect_left(starts, start)]
        del self._owners[slab][start]

    def set_owner(self, slab: int, start: int, owner: object) -> None:
        end, _ = self._owners[slab][start]
        self._owners[slab][start] = (end, owner)


def _describe(owner: object) -> str:
    if isinstance(owner, DiskRecord):
        return f"published block {owner.namespace!r}/{owner.key!r} at {owner.location}"
    return "a write in flight"


_IN_FLIGHT = object()


class _Run(NamedTuple):
    """Blocks of one batch that lie end to end in a slab, moved as one request: `members` are batch indices in
    file order, `starts` their byte offsets from `offset`."""

    slab: int
    offset: int
    members: list[int]
    starts: list[int]


def _runs(locations: Sequence[DiskLocation], lengths: Sequence[int], limit: int) -> list[_Run]:
    """Group a batch's blocks into runs of file-adjacent slots, each run at most `limit` bytes (a lone block
    may exceed it).

    A block joins the run before it when its slot starts where that run's last slot ends and that last block
    fills its slot (no padding between them to skip). Fewer, larger requests keep the drive's queue fuller for
    the same number of I/O threads; `limit` is the file engine's request size, so a run is one request.
    """
    runs: list[_Run] = []
    order = sorted(range(len(locations)), key=lambda i: (locations[i].slab, locations[i].offset))
    for i in order:
        loc = locations[i]
        if runs:
            run = runs[-1]
            last = run.members[-1]
            prev = locations[last]
            end = run.starts[-1] + HEADER_BYTES + lengths[last]
            if (
                prev.slab == loc.slab
                and prev.offset + prev.capacity == loc.offset
                and HEADER_BYTES + lengths[last] == prev.capacity
                and end + HEADER_BYTES + lengths[i] <= limit
            ):
                run.members.append(i)
                run.starts.append(end)
                continue
        runs.append(_Run(loc.slab, loc.offset, [i], [0]))
    return runs


def _run_buffers(run: _Run, headers: Sequence[torch.Tensor], payloads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Header page and payload of every block of `run`, in file order (empty payloads left out)."""
    return [b for i in run.members for b in (headers[i], payloads[i]) if b.numel()]


def _seal(run: list[tuple[BlockWrite, memoryview, memoryview, int]], sums: list[int | None]) -> None:
    """Before a run is written (on the writing thread): each block's payload checksum unless known, then its
    header."""
    for it, payload, header, i in run:
        if sums[i] is None:
            sums[i] = payload_checksum(payload)
        header[:] = encode_header(it.namespace, it.key, len(payload), sums[i])


def _sum_read(
    run: list[tuple[memoryview | torch.Tensor, int, int, int]],
    sums: list[int | None],
    got: list[int | BaseException],
    n: int,
) -> None:
    """Once a run was read (`n` bytes, on the reading thread): how many bytes of each block arrived, and the
    payload checksum of each block that arrived whole. Items are (payload, start in the run, header + payload
    bytes, batch index).

    A block read straight into GPU memory is verified through one device-to-host copy; the fast path for
    disk -> HBM is disk -> pinned staging (verified) -> HBM.
    """
    for payload, start, full, i in run:
        got[i] = min(full, max(0, n - start))
        if got[i] == full:
            sums[i] = payload_checksum(payload.cpu() if isinstance(payload, torch.Tensor) else payload)


class DiskStore:
    """Slab files plus a SQLite index of published blocks; reads verified, writes durable before publication.

    Use from one event loop. Coroutines may run concurrently: every slot touched by a write is reserved until
    the write publishes or fails, and all I/O of a call finishes before the call returns, even on cancellation
    (a cancelled write publishes nothing; a cancelled read leaves no worker writing into its buffer).
    """

    def __init__(self) -> None:
        raise TypeError("use `await DiskStore.open(directory, slab_bytes=..., num_slabs=...)`")

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        slab_bytes: int,
        num_slabs: int,
        file_io: FileIO | None = None,
        io_threads: int | None = None,
    ) -> DiskStore:
        """Open (creating if absent) a store, recover its published blocks, and lock the directory.

        The store moves bytes through `file_io`, or through an engine of its own (`make_file_io`, `io_threads`
        threads) that it closes with itself.

        Recovery: every committed row is a durable block; rows that point outside a slab file that has since
        shrunk (truncation) or outside the geometry are dropped (counted in `stats()["dropped_on_open"]`).
        """
        if not isinstance(slab_bytes, int) or slab_bytes < block_capacity(0) or slab_bytes % ALIGN:
            raise ValueError(f"slab_bytes must be a positive multiple of {ALIGN}, got {slab_bytes!r}")
        if not isinstance(num_slabs, int) or num_slabs <= 0:
            raise ValueError(f"num_slabs must be a positive int, got {num_slabs!r}")
        if file_io is not None and io_threads is not None:
            raise ValueError("io_threads sets the store's own file engine; it cannot apply to a given file_io")
        self = object.__new__(cls)
        self.directory = Path(directory)
        self.slab_bytes = slab_bytes
        self.num_slabs = num_slabs
        self._owns_file_io = file_io is None
        self._file_io = make_file_io(threads=io_threads) if file_io is None else file_io
        self._db_pool = ThreadPoolExecutor(1, thread_name_prefix="kv_io-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._records: dict[tuple[bytes, bytes], DiskRecord] = {}
        self._checksums: dict[tuple[bytes, bytes], int] = {}
        self._pending: set[tuple[bytes, bytes]] = set()
        self._extents = _Extents(num_slabs)
        self._stats = dict.fromkeys(
            (
                "reads",
                "writes",
                "bytes_read",
                "bytes_written",
                "corrupt",
                "missing",
                "mismatched",
                "io_errors",
                "write_errors",
                "deletes",
                "relocations",
                "recovered",
                "dropped_on_open",
            ),
            0,
        )
        self._closed = False
        try:
            await self._open_files()
        except BaseException:
            await self._shutdown()
            raise
        return self

    # -- opening -------------------------------------------------------------------------------------------------

    async def _open_files(self) -> None:
        created = not self.directory.exists()
        self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        mode = self.directory.stat().st_mode & 0o777
        if mode != DIR_MODE:
            # The directory holds every tenant's KV; nobody else may list or read it.
            log.warning("tightening %s from %o to %o", self.directory, mode, DIR_MODE)
            os.chmod(self.directory, DIR_MODE)
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{self.directory} is open in another DiskStore") from None
        await self._check_manifest()
        sizes = await asyncio.to_thread(self._prepare_slabs)
        await self._db_call(self._open_db)
        await self._load_records(sizes)
        if created:
            await asyncio.to_thread(_fsync_dir, self.directory.parent)

    async def _check_manifest(self) -> None:
        path = self.directory / MANIFEST_NAME
        expected = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "align": ALIGN,
            "header_bytes": HEADER_BYTES,
            "slab_bytes": self.slab_bytes,
            "num_slabs": self.num_slabs,
        }
        if not path.exists():
            await write_json_atomic(path, expected)
            return
        found = await read_json(path)
        if found.get("format") != FORMAT_NAME or found.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.directory} holds format {found.get('format')!r} version {found.get('format_version')!r}; "
                f"this build reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        mismatched = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: on disk {a!r}, requested {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"{self.directory} was created with other settings ({detail})")

    def slab_path(self, slab: int) -> Path:
        if not 0 <= slab < self.num_slabs:
            raise ValueError(f"slab {slab} out of range [0, {self.num_slabs})")
        return self.directory / f"slab-{slab:05d}.bin"

    def _prepare_slabs(self) -> list[int]:
        """Create missing slab files and re-extend short ones; returns each slab's size *before* extension.

        Preallocation (posix_fallocate) reserves the blocks up front, so a later block write cannot fail for
        lack of space in the middle of a slab, and O_DIRECT writes never extend the file.
        """
        sizes: list[int] = []
        touched = False
        for slab in range(self.num_slabs):
            path = self.slab_path(slab)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            try:
                st = os.fstat(fd)
                if st.st_mode & 0o777 != FILE_MODE:
                    os.fchmod(fd, FILE_MODE)
                sizes.append(st.st_size)
                if st.st_size < self.slab_bytes:
                    if st.st_size:
                        log.warning("%s is %d bytes, expected %d: re-extending", path, st.st_size, self.slab_bytes)
                    try:
                        os.posix_fallocate(fd, 0, self.slab_bytes)
                        os.fsync(fd)
                    except OSError as e:
                        raise DiskWriteError(f"cannot preallocate {path} ({self.slab_bytes} bytes): {e}") from e
                    touched = True
            finally:
                os.close(fd)
        if touched:
            _fsync_dir(self.directory)
        return sizes

    def _open_db(self) -> None:
        path = self.directory / DB_NAME
        # SQLite gives its -wal and -shm files the database file's permissions, so creating it 0o600 first
        # keeps all three private.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is durable when it returns, so "published" survives power loss, not only a crash.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        self._db = db

    async def _db_call(self, fn: Any, *args: Any) -> Any:
        """Run `fn` on the store's single SQLite thread and wait for it even if cancelled."""
        loop = asyncio.get_running_loop()
        (result,), cancelled = await settle([loop.run_in_executor(self._db_pool, fn, *args)])
        if isinstance(result, BaseException):
            raise result
        if cancelled:
            raise asyncio.CancelledError
        return result

    async def _load_records(self, sizes: list[int]) -> None:
        rows = await self._db_call(
            lambda: self._db.execute(
                "SELECT namespace, key, slab, offset, capacity, length, checksum FROM blocks ORDER BY slab, offset"
            ).fetchall()
        )
        dropped: list[tuple[bytes, bytes]] = []
        for ns, key, slab, offset, capacity, length, checksum in rows:
            reason = self._location_problem(DiskLocation(slab, offset, capacity), length)
            if reason is None and offset + capacity > sizes[slab]:
                reason = f"slab file is {sizes[slab]} bytes (truncated)"
            if reason is None and self._extents.conflict(slab, offset, offset + capacity) is not None:
                reason = "overlaps another published block"
            if reason is not None:
                log.warning("dropping disk block %r/%r at slab %d offset %d: %s", ns, key, slab, offset, reason)
                dropped.append((ns, key))
                continue
            rec = DiskRecord(bytes(ns), bytes(key), DiskLocation(slab, offset, capacity), length)
            self._publish_in_memory(rec, _unsigned64(checksum))
        if dropped:
            await self._db_call(self._tx, [("DELETE FROM blocks WHERE namespace=? AND key=?", dropped)])
        self._stats["recovered"] = len(self._records)
        self._stats["dropped_on_open"] = len(dropped)
        self._stats["missing"] += len(dropped)

    def _tx(self, statements: Iterable[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Run statements in one transaction (all or nothing)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back on its own (e.g. after a failed write of the WAL).
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # -- queries -------------------------------------------------------------------------------------------------

    def records(self) -> list[DiskRecord]:
        """Every published block, ordered by slab and offset."""
        return sorted(self._records.values(), key=lambda r: (r.location.slab, r.location.offset))

    @property
    def file_io(self) -> FileIO:
        """The file engine that moves this store's bytes."""
        return self._file_io

    def get(self, namespace: bytes, key: bytes) -> DiskRecord | None:
        return self._records.get((namespace, key))

    def stats(self) -> dict[str, int]:
        """Counters since open: successful reads/writes and their bytes, misses by cause, and `published`."""
        return {**self._stats, "published": len(self._records)}

    # -- validation ----------------------------------------------------------------------------------------------

    def _location_problem(self, loc: DiskLocation, length: int) -> str | None:
        if not 0 <= loc.slab < self.num_slabs:
            return f"slab {loc.slab} out of range [0, {self.num_slabs})"
        if loc.offset < 0 or loc.offset % ALIGN or loc.capacity % ALIGN:
            return f"offset {loc.offset} and capacity {loc.capacity} must be non-negative multiples of {ALIGN}"
        if loc.capacity < block_capacity(length):
            return f"capacity {loc.capacity} < {block_capacity(length)} needed for a {length}-byte payload"
        if loc.offset + loc.capacity > self.slab_bytes:
            return f"slot [{loc.offset}, {loc.offset + loc.capacity}) exceeds slab size {self.slab_bytes}"
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("DiskStore is closed")

    @staticmethod
    def _check_name(what: str, value: object) -> None:
        if not isinstance(value, bytes):
            raise TypeError(f"{what} must be bytes, got {type(value).__name__}")
        if len(value) > MAX_NAME_BYTES:
            raise ValueError(f"{what} is {len(value)} bytes; at most {MAX_NAME_BYTES}")

    @staticmethod
    def _payload_bytes(payload: object) -> torch.Tensor:
        if not isinstance(payload, torch.Tensor):
            raise TypeError(f"payload must be a torch.Tensor, got {type(payload).__name__}")
        if payload.device.type != "cpu":
            raise TypeError(f"payload must be in host memory (stage device blocks first), got {payload.device}")
        if not payload.is_contiguous():
            raise ValueError("payload must be contiguous")
        return payload.reshape(-1).view(torch.uint8)

    def _check_out(self, record: DiskRecord, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous():
            raise TypeError(f"out must be a contiguous 1-D uint8 tensor, got {out.dtype} {tuple(out.shape)}")
        if out.numel() < record.length:
            raise ValueError(f"out holds {out.numel()} bytes, the block has {record.length}")
        if out.device.type == "cuda" and self._file_io.name != "kvikio":
            raise TypeError("reading straight into a CUDA tensor needs the kvikio engine; read into host memory")

    # -- writes --------------------------------------------------------------------------------------------------

    async def write(self, namespace: bytes, key: bytes, location: DiskLocation, payload: torch.Tensor) -> DiskRecord:
        """Write one block and publish it once durable. DiskWriteError (nothing published) on I/O failure;
        ValueError for a bad or occupied slot or a key that is already published or being written."""
        (rec,) = await self.write_many([BlockWrite(namespace, key, location, payload)])
        return rec

    async def write_many(
        self, items: Sequence[BlockWrite | tuple[bytes, bytes, DiskLocation, torch.Tensor]]
    ) -> list[DiskRecord]:
        """Write blocks concurrently, one durability barrier (fdatasync per touched slab), one SQLite transaction.

        All or nothing: if any block fails to become durable, DiskWriteError is raised and none is published.
        """
        self._check_open()
        items = [BlockWrite(*it) for it in items]
        prepared: list[tuple[BlockWrite, torch.Tensor]] = []
        try:
            for it in items:
                self._check_name("namespace", it.namespace)
                self._check_name("key", it.key)
                data = self._payload_bytes(it.payload)
                problem = self._location_problem(it.location, data.numel())
                if problem is not None:
                    raise ValueError(f"bad location for {it.namespace!r}/{it.key!r}: {problem}")
                ident = (it.namespace, it.key)
                if ident in self._records or ident in self._pending:
                    raise ValueError(f"block {it.namespace!r}/{it.key!r} is already published or being written")
                loc = it.location
                self._extents.add(loc.slab, loc.offset, loc.offset + loc.capacity, _IN_FLIGHT)
                self._pending.add(ident)
                prepared.append((it, data))
        except BaseException:
            self._unreserve(it for it, _ in prepared)
            raise
        try:
            return await self._write_prepared(prepared)
        finally:
            self._unreserve(it for it, _ in prepared if (it.namespace, it.key) not in self._records)

    def _unreserve(self, items: Iterable[BlockWrite]) -> None:
        for it in items:
            self._pending.discard((it.namespace, it.key))
            self._extents.remove(it.location.slab, it.location.offset)

    async def _write_prepared(self, prepared: list[tuple[BlockWrite, torch.Tensor]]) -> list[DiskRecord]:
        sums = await self._write_durable(prepared)
        records = [DiskRecord(it.namespace, it.key, it.location, data.numel()) for it, data in prepared]
        rows = [
            (r.namespace, r.key, r.location.slab, r.location.offset, r.location.capacity, r.length, _signed64(c))
            for r, c in zip(records, sums, strict=True)
        ]
        await self._commit(
            [("INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)],
            undo=[("DELETE FROM blocks WHERE namespace=? AND key=?", [(r.namespace, r.key) for r in records])],
        )
        for r, c in zip(records, sums, strict=True):
            self._publish_in_memory(r, c)
            self._pending.discard((r.namespace, r.key))
        self._stats["writes"] += len(records)
        self._stats["bytes_written"] += sum(r.length for r in records)
        return records

    async def _write_durable(
        self, blocks: list[tuple[BlockWrite, torch.Tensor]], checksums: list[int] | None = None
    ) -> list[int]:
        """Write blocks, header pages and payloads of file-adjacent blocks as one request (`_runs`), then fdatasync
        each touched slab once (one barrier per slab per batch, not per block). Any failure becomes
        DiskWriteError. Returns the payload checksums (computed here unless given).

        A run's checksums and headers are computed on the pool thread that then writes it (`_seal`), so the
        checksums of some blocks overlap the writes of others, and a block costs the event loop no wake-up of
        its own.
        """
        # NOTE: headers get one small aligned allocation per batch rather than staging-pool buffers: a batch
        # holding part of a bounded pool while waiting for the rest could deadlock against another batch.
        headers = aligned_empty(HEADER_BYTES * len(blocks)).split(HEADER_BYTES) if blocks else ()
        sums: list[int | None] = [None] * len(blocks) if checksums is None else list(checksums)
        payloads = [data for _, data in blocks]
        locations = [it.location for it, _ in blocks]
        transfers = []
        for run in _runs(locations, [p.numel() for p in payloads], self._file_io.chunk_bytes):
            members = [
                (blocks[i][0], as_bytes_view(payloads[i]), memoryview(headers[i].numpy()), i) for i in run.members
            ]
            seal = functools.partial(_seal, members, sums)
            transfers.append(Transfer(self.slab_path(run.slab), run.offset, _run_buffers(run, headers, payloads), seal))
        try:
            results = await self._file_io.pwritev_many(transfers)
        except Exception as e:  # CancelledError is not an Exception: it propagates
            results = [e]
        err = first_error(results)
        if err is None:
            slabs = sorted({it.location.slab for it, _ in blocks})
            synced, cancelled = await settle(self._file_io.fsync(self.slab_path(s)) for s in slabs)
            if cancelled:
                raise asyncio.CancelledError
            err = first_error(synced)
        if err is None:
            return sums
        self._stats["write_errors"] += 1
        log.error("disk write failed, nothing published: %s", err)
        raise DiskWriteError(f"disk write failed: {err}") from err

    async def _commit(self, statements: list[tuple[str, Sequence[Sequence[Any]]]], *, undo: list[Any]) -> None:
        """Commit a transaction. If the caller was cancelled while it committed, roll it back with `undo`
        (so a cancelled call has published nothing) and re-raise the cancellation."""
        loop = asyncio.get_running_loop()
        (result,), cancelled = await settle([loop.run_in_executor(self._db_pool, self._tx, statements)])
        if isinstance(result, sqlite3.Error):
            self._stats["write_errors"] += 1
            raise DiskWriteError(f"publishing failed: {result}") from result
        if isinstance(result, BaseException):
            raise result
        if cancelled:
            await self._db_call(self._tx, undo)
            raise asyncio.CancelledError

    def _publish_in_memory(self, rec: DiskRecord, checksum: int) -> None:
        loc = rec.location
        ident = (rec.namespace, rec.key)
        if self._extents.conflict(loc.slab, loc.offset, loc.offset + loc.capacity) is _IN_FLIGHT:
            self._extents.set_owner(loc.slab, loc.offset, rec)
        else:
            self._extents.add(loc.slab, loc.offset, loc.offset + loc.capacity, rec)
        self._records[ident] = rec
        self._checksums[ident] = checksum

    # -- reads ---------------------------------------------------------------------------------------------------

    async def read(self, record: DiskRecord, out: torch.Tensor) -> bool:
        """Read and verify one block into out[:record.length]. False (logged, counted) for any miss."""
        (ok,) = await self.read_many([record], [out])
        return ok

    async def read_many(self, records: Sequence[DiskRecord], outs: Sequence[torch.Tensor]) -> list[bool]:
        """Read blocks concurrently; each result is True only if header and payload checksum verified."""
        self._check_open()
        if len(records) != len(outs):
            raise ValueError(f"{len(records)} records but {len(outs)} output buffers")
        for rec, out in zip(records, outs, strict=True):
            if not isinstance(rec, DiskRecord):
                raise TypeError(f"expected DiskRecord, got {type(rec).__name__}")
            problem = self._location_problem(rec.location, rec.length)
            if problem is not None:
                raise ValueError(f"record {rec.namespace!r}/{rec.key!r} has a bad location: {problem}")
            self._check_out(rec, out)
        return await self._read_verified(records, outs, count=True)

    async def _read_verified(
        self, records: Sequence[DiskRecord], outs: Sequence[torch.Tensor], *, count: bool
    ) -> list[bool]:
        # File-adjacent blocks are one request (`_runs`); each block's checksum runs on the pool thread that read
        # its run, as soon as the run's bytes have landed, overlapping the reads of other runs.
        headers = aligned_empty(HEADER_BYTES * len(records)).split(HEADER_BYTES) if records else ()
        sums: list[int | None] = [None] * len(records)
        got: list[int | BaseException] = [0] * len(records)
        views = [out[: rec.length] for rec, out in zip(records, outs, strict=True)]
        summed = [as_bytes_view(v) if v.device.type == "cpu" else v for v in views]
        lengths = [rec.length for rec in records]
        runs = _runs([rec.location for rec in records], lengths, self._file_io.chunk_bytes)
        transfers = []
        for run in runs:
            members = [
                (summed[i], start, HEADER_BYTES + lengths[i], i)
                for i, start in zip(run.members, run.starts, strict=True)
            ]
            check = functools.partial(_sum_read, members, sums, got)
            transfers.append(Transfer(self.slab_path(run.slab), run.offset, _run_buffers(run, headers, views), check))
        for run, result in zip(runs, await self._file_io.preadv_many(transfers), strict=True):
            if isinstance(result, BaseException):
                for i in run.members:
                    got[i] = result
        ok = []
        for rec, header, n, actual in zip(records, headers, got, sums, strict=True):
            verdict = self._verdict(rec, header, n, actual)
            if verdict is not None:
                log.warning("disk block %r/%r at %s is a miss (%s)", rec.namespace, rec.key, rec.location, verdict)
            if count:
                if verdict is None:
                    self._stats["reads"] += 1
                    self._stats["bytes_read"] += rec.length
                else:
                    self._stats[verdict] += 1
            ok.append(verdict is None)
        return ok

    def _verdict(
        self, rec: DiskRecord, header: torch.Tensor, got: int | BaseException, actual: int | None
    ) -> str | None:
        """None when a block read (`got` bytes or an error, payload checksum `actual`) verified, else the reason
        it is a miss (a stats counter). An error other than OSError is raised."""
        if isinstance(got, FileNotFoundError):
            return "missing"
        if isinstance(got, OSError):
            return "io_errors"
        if isinstance(got, BaseException):
            raise got
        if got < HEADER_BYTES + rec.length:
            return "missing"  # short read: the slab file was truncated under the block
        verdict, expected = self._check_header(rec, header)
        if verdict is not None:
            return verdict
        return None if actual == expected else "corrupt"

    def _check_header(self, rec: DiskRecord, header: torch.Tensor) -> tuple[str | None, int | None]:
        """Before the payload checksum: (reason the read is a miss, None) or (None, payload checksum expected).

        A reason is also the name of the stats counter it increments.
        """
        try:
            hdr = decode_header(header)
        except CorruptBlockError:
            return "corrupt", None
        if hdr.namespace != rec.namespace or hdr.key != rec.key or hdr.payload_len != rec.length:
            return "mismatched", None
        ident = (rec.namespace, rec.key)
        if self._records.get(ident) == rec and self._checksums[ident] != hdr.checksum:
            return "mismatched", None  # a self-consistent but older block of the same key in this slot
        return None, hdr.checksum

    # -- delete and relocate -------------------------------------------------------------------------------------

    def _published(self, record: DiskRecord) -> DiskRecord:
        current = self._records.get((record.namespace, record.key))
        if current != record:
            raise KeyError(f"{record.namespace!r}/{record.key!r} at {record.location} is not a published block")
        return current

    async def delete(self, record: DiskRecord) -> None:
        """Unpublish a block (its row is removed durably); afterwards its slot may be reused by the caller."""
        self._check_open()
        rec = self._published(record)
        ident = (rec.namespace, rec.key)
        await self._db_call(self._tx, [("DELETE FROM blocks WHERE namespace=? AND key=?", [ident])])
        del self._records[ident]
        del self._checksums[ident]
        self._extents.remove(rec.location.slab, rec.location.offset)
        self._stats["deletes"] += 1

    async def relocate(self, record: DiskRecord, new_location: DiskLocation) -> DiskRecord:
        """Move a published block to another slot (defragmentation): read and verify it, write it at the new
        slot, make that durable, read it back and verify, then in one transaction point the row at the new slot.

        The new slot may overlap the block's own old slot (sliding a block down a slab). Until the commit the
        old row stays published; a crash in between leaves at worst a row whose bytes fail verification (a
        miss), never wrong data. Raises CorruptBlockError when the block itself does not verify (delete it),
        DiskWriteError when the copy cannot be made durable (the block stays where it was).
        """
        self._check_open()
        rec = self._published(record)
        problem = self._location_problem(new_location, rec.length)
        if problem is not None:
            raise ValueError(f"bad relocation target: {problem}")
        old, new = rec.location, new_location
        if (old.slab, old.offset) == (new.slab, new.offset) and old.capacity == new.capacity:
            return rec
        ident = (rec.namespace, rec.key)
        if ident in self._pending:
            raise ValueError(f"block {rec.namespace!r}/{rec.key!r} is already being moved")
        overlapping = (
            old.slab == new.slab and old.offset < new.offset + new.capacity and new.offset < old.offset + old.capacity
        )
        # Reserve the target; an overlapping move holds the union of both slots so nothing else can land in
        # either part while the copy is in flight.
        if overlapping:
            start = min(old.offset, new.offset)
            end = max(old.offset + old.capacity, new.offset + new.capacity)
            self._extents.remove(old.slab, old.offset)
            try:
                self._extents.add(new.slab, start, end, _IN_FLIGHT)
            except ValueError:
                self._extents.add(old.slab, old.offset, old.offset + old.capacity, rec)
                raise
        else:
            start = new.offset
            self._extents.add(new.slab, new.offset, new.offset + new.capacity, _IN_FLIGHT)
        self._pending.add(ident)
        moved = False
        try:
            moved_rec = await self._copy(rec, new)
            moved = True
            return moved_rec
        finally:
            self._pending.discard(ident)
            self._extents.remove(new.slab, start)
            if overlapping:
                kept = moved_rec if moved else rec
                k = kept.location
                self._extents.add(k.slab, k.offset, k.offset + k.capacity, kept)
            elif moved:
                self._extents.remove(old.slab, old.offset)
                self._extents.add(new.slab, new.offset, new.offset + new.capacity, moved_rec)

    async def _copy(self, rec: DiskRecord, new: DiskLocation) -> DiskRecord:
        buf = aligned_empty(max(rec.length, 1))
        (ok,) = await self._read_verified([rec], [buf], count=True)
        if not ok:
            raise CorruptBlockError(f"{rec.namespace!r}/{rec.key!r} at {rec.location} does not verify")
        checksum = self._checksums[(rec.namespace, rec.key)]
        payload = buf[: rec.length]
        await self._write_durable([(BlockWrite(rec.namespace, rec.key, new, payload), payload)], [checksum])
        moved = DiskRecord(rec.namespace, rec.key, new, rec.length)
        (ok,) = await self._read_verified([moved], [buf], count=False)
        if not ok:
            self._stats["write_errors"] += 1
            raise DiskWriteError(f"relocated copy of {rec.namespace!r}/{rec.key!r} at {new} does not verify")
        ident = (rec.namespace, rec.key)
        old = rec.location
        move = "UPDATE blocks SET slab=?, offset=?, capacity=? WHERE namespace=? AND key=?"
        await self._commit(
            [(move, [(new.slab, new.offset, new.capacity, *ident)])],
            undo=[(move, [(old.slab, old.offset, old.capacity, *ident)])],
        )
        self._records[ident] = moved
        self._stats["relocations"] += 1
        return moved

    # -- closing -------------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the index, the file engine (if the store created it) and release the directory. Idempotent.
        Calls still in flight must have finished."""
        if self._closed:
            return
        self._closed = True
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._db_pool, self._db.close)
            self._db = None
        self._db_pool.shutdown(wait=True)
        if self._owns_file_io:
            await self._file_io.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
