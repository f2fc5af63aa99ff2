"""The disk tier's bytes: slab files holding blocks, and a SQLite (WAL) table saying which are published. It
survives restarts: a new process that opens the directory finds every published block.

Directory layout (the directory is 0o700, every file in it 0o600; see `kv_io.private_files`)::

    manifest.json       format version and geometry (slab size, slab count), written atomically
    index.sqlite3       one row per published block (+ -wal / -shm while open)
    slab-00000.bin ...  slab files, created and preallocated on the first write into them; a block occupies
                        one ALIGN-aligned slot of a slab
    lock                flock'd while a process has the store open (one writer per directory)

Which slot a block goes to is the caller's decision (the runtime's disk allocator); the store checks that a
slot is in range, aligned, large enough and does not overlap a published block or a write in flight.

The directory is a trust boundary: it is checked by `ensure_private_dir`, and every file kvtier opens there
goes through `open_private` (never follows a symlink, refuses another user's or a shared file); the SQLite
files, which SQLite opens itself, are checked with `check_private_file` first.

Space: `open` refuses (`DiskCapacityError`) a size the filesystem cannot hold before it creates anything, and
a slab file is created and preallocated only when the first write lands in it, so a small cache makes few
files. A preallocation that fails (ENOSPC, EFBIG) removes what it created and fails that write
(`DiskWriteError`); it never stops the store.

Crash safety rests on one ordering: a block's header and payload are written and made durable (fdatasync of
the slab) *before* its row is committed, and SQLite commits with synchronous=FULL. A process killed at any
point therefore leaves either a committed row whose bytes are on disk, or no row at all: torn writes are never
published. Every read verifies the header (magic, version, namespace, key, length, header checksum) and the
payload checksum, so a corrupt, truncated or reused slot is a miss, never wrong KV.

Metadata heals itself: every slot carries a self-describing, checksummed header, so the index is a cache of
what the slabs hold. An index that SQLite cannot read or whose schema is not this one, and a manifest that is
not a JSON object of this format, are moved aside (`<name>.damaged-<unix time>`), and the index is rebuilt by
walking the slab files (`_scan_slab`). Only a readable manifest with other settings is an error.
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
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiofiles
import orjson
import torch

from kv_io.align import ALIGN, aligned_empty, round_up
from kv_io.disk_format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    MAX_NAME_BYTES,
    BlockHeader,
    CorruptBlockError,
    as_bytes_view,
    block_capacity,
    decode_header,
    encode_header,
    payload_checksum,
)
from kv_io.file_io import FileIO, Transfer, first_error, make_file_io, settle
from kv_io.private_files import check_private_file, ensure_private_dir, open_private, private_opener

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DB_NAME = "index.sqlite3"
LOCK_NAME = "lock"
FORMAT_NAME = "kvtier-disk-store"
DAMAGED_TAG = ".damaged-"
"""A damaged metadata file is renamed to `<name>.damaged-<unix time>` (kept for inspection, never read again)."""
RESERVE_MIN_BYTES = 64 << 20
RESERVE_MAX_BYTES = 1 << 30
"""Free space `open` leaves to the rest of the filesystem: 1% of it, within these bounds (the index, logs and
other programs need room too; a cache that fills its filesystem to the last byte breaks more than itself)."""
_SCAN_CHUNK = 16 << 20
"""Bytes a rebuild reads from a slab at a time."""

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
_SELECT_ROWS = "SELECT namespace, key, slab, offset, capacity, length, checksum FROM blocks ORDER BY slab, offset"


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


class DiskCapacityError(ValueError):
    """The requested store is larger than its filesystem's free space (less a reserve). Raised by `open`
    before anything is created."""


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


async def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write a small JSON file so that readers see the old or the new content, never a mix: temp file, fsync,
    rename over the target, fsync the directory (the rename itself must be durable too)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    async with aiofiles.open(tmp, "wb", opener=private_opener) as f:
        await f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        await f.flush()
        await asyncio.to_thread(os.fsync, f.fileno())
    await asyncio.to_thread(os.replace, tmp, path)
    await asyncio.to_thread(_fsync_dir, path.parent)


async def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` (opened with `open_private`'s checks). Raises ValueError (orjson's
    JSONDecodeError is one) when the file is not valid JSON or not an object, UnsafePathError for a path
    kvtier refuses."""
    async with aiofiles.open(path, "rb", opener=private_opener) as f:
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


# -- space -----------------------------------------------------------------------------------------------------


def _slab_name(slab: int) -> str:
    return f"slab-{slab:05d}.bin"


def _slab_number(name: str) -> int | None:
    """The slab a file name is the slab file of, or None."""
    digits = name[5:-4]
    if name.startswith("slab-") and name.endswith(".bin") and digits.isdigit() and _slab_name(int(digits)) == name:
        return int(digits)
    return None


def _existing_ancestor(path: Path) -> Path:
    """`path` or its nearest ancestor that exists: where the filesystem a new directory would land on is."""
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _reserve_bytes(fs: os.statvfs_result) -> int:
    return min(RESERVE_MAX_BYTES, max(RESERVE_MIN_BYTES, fs.f_blocks * fs.f_frsize // 100))


def _check_capacity(directory: Path, slab_bytes: int, num_slabs: int) -> None:
    """Raise DiskCapacityError unless the filesystem holding `directory` has room for the slabs that do not
    exist yet (and the missing tails of short ones), plus a reserve. It only looks (statvfs, a listing of the
    directory, sizes of the slab files that are regular files): it runs before anything is created.

    NOTE: this is a check, not a reservation: slabs are allocated lazily, so space taken by others later makes
    a write fail (DiskWriteError), never the store.
    """
    requested = slab_bytes * num_slabs
    where = _existing_ancestor(directory)
    fs = os.statvfs(where)
    free = fs.f_bavail * fs.f_frsize
    reserve = _reserve_bytes(fs)
    if requested + reserve <= free:
        return  # fits even if no slab file exists yet: no need to look at them
    held = 0
    # Absent, or not a directory: nothing held (a non-directory is refused right after this).
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            slab = _slab_number(entry.name)
            if slab is not None and slab < num_slabs and entry.is_file(follow_symlinks=False):
                held += min(entry.stat(follow_symlinks=False).st_size, slab_bytes)
    needed = requested - held
    if needed + reserve > free:
        raise DiskCapacityError(
            f"{directory}: {num_slabs} slabs of {slab_bytes} bytes ({requested} bytes, {held} of them already in "
            f"slab files) need {needed} more bytes, but the filesystem at {where} has {free} bytes free, of "
            f"which {reserve} are kept in reserve; choose a smaller disk size or another directory"
        )


# -- rebuilding the index from the slabs -----------------------------------------------------------------------


class _SlabReader:
    """Reads of one slab file through a window of `_SCAN_CHUNK` bytes (buffered pread: a rebuild reads each
    byte about once, front to back). Offsets handed in are ALIGN-aligned."""

    __slots__ = ("_buf", "_fd", "_start", "size")

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self.size = size
        self._start = 0
        self._buf = b""

    def _load(self, offset: int, n: int) -> None:
        want = min(max(_SCAN_CHUNK, n), self.size - offset)
        parts = []
        pos = offset
        while want > 0:
            got = os.pread(self._fd, want, pos)
            if not got:
                break  # the file shrank under us: what is missing reads as absent
            parts.append(got)
            pos += len(got)
            want -= len(got)
        self._buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self._start = offset

    def view(self, offset: int, n: int) -> memoryview:
        """Up to `n` bytes at `offset` (fewer only at the end of the file)."""
        if offset < self._start or offset + n > self._start + len(self._buf):
            self._load(offset, n)
        i = offset - self._start
        return memoryview(self._buf)[i : i + n]

    def next_magic(self, offset: int) -> int | None:
        """The first ALIGN-aligned offset >= `offset` at which `MAGIC` starts, or None."""
        while offset + HEADER_BYTES <= self.size:
            if offset < self._start or offset + HEADER_BYTES > self._start + len(self._buf):
                self._load(offset, HEADER_BYTES)
            j = self._buf.find(MAGIC, offset - self._start)
            while j >= 0 and (self._start + j) % ALIGN:
                j = self._buf.find(MAGIC, round_up(self._start + j + 1) - self._start)
            if j >= 0:
                return self._start + j
            end = self._start + len(self._buf)
            offset = max(offset + ALIGN, end - end % ALIGN)
        return None


def _scan_slab(fd: int, size: int, slab_bytes: int) -> Iterator[tuple[int, BlockHeader]]:
    """The verified blocks of one slab file, in file order: (offset, header).

    At each ALIGN-aligned offset (found by searching for `MAGIC`, so empty space costs a memchr), a header that
    decodes and whose payload's checksum matches is a block, and the walk jumps past its slot; anything else
    advances one page. A published slot is therefore never overlapped by another published slot: a block whose
    bytes lie inside an earlier verified block's slot was overwritten by it and fails its checksum anyway.
    """
    reader = _SlabReader(fd, size)
    offset = 0
    while (offset := reader.next_magic(offset)) is not None:
        try:
            hdr = decode_header(reader.view(offset, HEADER_BYTES))
        except CorruptBlockError:
            offset += ALIGN
            continue
        end = offset + HEADER_BYTES + hdr.payload_len
        if end > size or offset + block_capacity(hdr.payload_len) > slab_bytes:
            offset += ALIGN  # truncated, or a slot this geometry cannot hold
            continue
        payload = reader.view(offset, HEADER_BYTES + hdr.payload_len)[HEADER_BYTES:]
        if payload_checksum(payload) != hdr.checksum:
            offset += ALIGN
            continue
        yield offset, hdr
        offset += block_capacity(hdr.payload_len)


# -- the index's schema ----------------------------------------------------------------------------------------


def _schema_signature(db: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
    """The columns of `blocks` and its indexes (name, uniqueness, columns): what this build's queries rely on."""
    columns = db.execute("PRAGMA table_info(blocks)").fetchall()
    indexes = sorted(
        (name, unique, [r[0] for r in db.execute("SELECT name FROM pragma_index_info(?)", (name,))])
        for _, name, unique, *_ in db.execute("PRAGMA index_list(blocks)")
    )
    return columns, indexes


@functools.cache
def _expected_schema() -> tuple[list[Any], list[Any]]:
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(_SCHEMA)
        return _schema_signature(db)
    finally:
        db.close()


def _schema_problem(db: sqlite3.Connection) -> str | None:
    """Why an existing index is not this build's, or None (a database without the table is a new one)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    columns, indexes = _schema_signature(db)
    if version not in (0, FORMAT_VERSION):
        return f"user_version {version}, expected {FORMAT_VERSION}"
    if not columns and not indexes and version == 0:
        return None
    if (columns, indexes) != _expected_schema():
        return "its blocks table is not this format's"
    return None


def _manifest_damage(found: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why a JSON object is not a readable manifest at all (it is then rebuilt), or None. A manifest of another
    format or version, or with other settings, is readable: comparing it with the request is an error, not
    damage."""
    if "format" not in found or "format_version" not in found:
        return "no format or format_version"
    if found["format"] != FORMAT_NAME or found["format_version"] != FORMAT_VERSION:
        return None
    bad = [k for k, v in expected.items() if type(found.get(k)) is not type(v)]
    return f"missing or malformed {', '.join(bad)}" if bad else None


def _is_damage(e: sqlite3.DatabaseError) -> bool:
    """True when SQLite says the file itself is bad (not a database, corrupt), not that I/O or locking failed."""
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


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

        Before anything is created, `slab_bytes * num_slabs` (less what slab files already hold) is checked
        against the filesystem's free space: DiskCapacityError if it cannot fit. No slab file is created here;
        existing ones are checked (`open_private`) and measured. UnsafePathError (a PermissionError) for a
        directory or file kvtier must not use.

        Recovery: every committed row is a durable block; rows that point outside a slab file that has since
        shrunk (truncation) or outside the geometry are dropped (counted in `stats()["dropped_on_open"]`). A
        damaged index or manifest is moved aside and the index rebuilt from the slabs' headers
        (`stats()["metadata_rebuilds"]`, `["rebuilt_blocks"]`); a manifest with other settings raises ValueError.
        """
        if not isinstance(slab_bytes, int) or slab_bytes < block_capacity(0) or slab_bytes % ALIGN:
            raise ValueError(f"slab_bytes must be a positive multiple of {ALIGN}, got {slab_bytes!r}")
        if not isinstance(num_slabs, int) or num_slabs <= 0:
            raise ValueError(f"num_slabs must be a positive int, got {num_slabs!r}")
        if file_io is not None and io_threads is not None:
            raise ValueError("io_threads sets the store's own file engine; it cannot apply to a given file_io")
        _check_capacity(Path(directory), slab_bytes, num_slabs)
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
        # Slabs whose file exists at full size; the others are created (or re-extended) by their first write.
        self._slab_ready = [False] * num_slabs
        self._slab_lock = asyncio.Lock()
        self._write_error_kinds: set[int | str] = set()
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
                "metadata_rebuilds",
                "rebuilt_blocks",
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
        created = not os.path.lexists(self.directory)
        # The directory holds every tenant's KV: only its owner may enter it, and nobody else may write there.
        ensure_private_dir(self.directory)
        self._lock_fd = open_private(self.directory / LOCK_NAME, os.O_RDWR, create=True)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{self.directory} is open in another DiskStore") from None
        await self._check_manifest()
        sizes = await asyncio.to_thread(self._measure_slabs)
        rows = await self._db_call(self._open_index, sizes)
        await self._load_records(rows, sizes)
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
        if not os.path.lexists(path):  # lexists: a planted symlink is refused by read_json, not replaced
            await write_json_atomic(path, expected)
            return
        try:
            found = await read_json(path)
        except ValueError as e:  # orjson.JSONDecodeError is a ValueError
            found, damage = {}, str(e)
        else:
            damage = _manifest_damage(found, expected)
        if damage is not None:
            await asyncio.to_thread(self._move_aside, path, damage)
            await write_json_atomic(path, expected)
            return
        if found.get("format") != FORMAT_NAME or found.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.directory} holds format {found.get('format')!r} version {found.get('format_version')!r}; "
                f"this build reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
            )
        mismatched = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: on disk {a!r}, requested {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"{self.directory} was created with other settings ({detail})")

    def _move_aside(self, path: Path, why: str) -> None:
        """Rename a damaged metadata file (and its SQLite -wal / -shm) to `<name>.damaged-<unix time>`."""
        stamp = f"{path.name}{DAMAGED_TAG}{int(time.time())}"
        target, n = stamp, 0
        while any(os.path.lexists(self.directory / f"{target}{s}") for s in ("", "-wal", "-shm")):
            n += 1
            target = f"{stamp}.{n}"
        # NOTE: the companions keep SQLite's naming (<db>-wal beside <db>), so the damaged index can still be
        # opened with the sqlite3 shell for a post-mortem.
        for suffix in ("", "-wal", "-shm"):
            src = self.directory / f"{path.name}{suffix}"
            if os.path.lexists(src):
                os.replace(src, self.directory / f"{target}{suffix}")
        _fsync_dir(self.directory)
        self._stats["metadata_rebuilds"] += 1
        log.warning("%s is damaged (%s): moved aside to %s and rebuilt", path, why, target)

    def slab_path(self, slab: int) -> Path:
        if not 0 <= slab < self.num_slabs:
            raise ValueError(f"slab {slab} out of range [0, {self.num_slabs})")
        return self.directory / _slab_name(slab)

    def _measure_slabs(self) -> list[int]:
        """Check every slab file that exists (`open_private`: a symlink or a foreign, shared or linked file
        raises UnsafePathError) and return each slab's size, 0 where there is none. Creates nothing: a slab
        file is made, or a short one re-extended, by the first write into it (`_ensure_slabs`)."""
        sizes: list[int] = []
        for slab in range(self.num_slabs):
            path = self.slab_path(slab)
            try:
                fd = open_private(path, os.O_RDONLY)
            except FileNotFoundError:
                sizes.append(0)
                continue
            try:
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size < self.slab_bytes:
                log.warning("%s is %d bytes, expected %d: its next write re-extends it", path, size, self.slab_bytes)
            sizes.append(size)
        self._slab_ready = [size >= self.slab_bytes for size in sizes]
        return sizes

    async def _ensure_slabs(self, slabs: Iterable[int]) -> None:
        """Create and preallocate the slab files of `slabs` that are missing or short. OSError (nothing left
        behind) when the filesystem cannot hold one."""
        todo = sorted({s for s in slabs if not self._slab_ready[s]})
        if not todo:
            return
        loop = asyncio.get_running_loop()
        async with self._slab_lock:  # two batches landing in one new slab create it once
            for slab in todo:
                if self._slab_ready[slab]:
                    continue
                (result,), cancelled = await settle([loop.run_in_executor(None, self._allocate_slab, slab)])
                if not isinstance(result, BaseException):
                    self._slab_ready[slab] = True
                if cancelled:
                    raise asyncio.CancelledError
                if isinstance(result, BaseException):
                    raise result

    def _allocate_slab(self, slab: int) -> None:
        """Create (or re-extend) one slab file to `slab_bytes`, durably. On failure a file this call created is
        removed, and a short one it extended is cut back to its old size (its blocks stay).

        Preallocation (posix_fallocate) reserves the slab's blocks at once, so a later block write cannot fail
        for lack of space in the middle of a slab, and O_DIRECT writes never extend the file.
        """
        path = self.slab_path(slab)
        existed = os.path.lexists(path)
        fd = open_private(path, os.O_RDWR, create=True)
        try:
            size = os.fstat(fd).st_size
            if size < self.slab_bytes:
                try:
                    os.posix_fallocate(fd, 0, self.slab_bytes)
                    os.fsync(fd)
                except OSError as e:
                    if existed:
                        os.ftruncate(fd, size)
                    else:
                        os.unlink(path)
                    raise OSError(e.errno, f"cannot allocate {path} ({self.slab_bytes} bytes): {e.strerror}") from e
        finally:
            os.close(fd)
        if not existed:
            _fsync_dir(self.directory)  # the file's name must be durable before any row points into it

    @staticmethod
    def _durable(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is durable when it returns, so "published" survives power loss, not only a crash.
        db.execute("PRAGMA synchronous=FULL")

    def _open_index(self, sizes: list[int]) -> list[Any]:
        """On the SQLite thread: open the index and return its rows. A damaged one (not a database, corrupt,
        another schema) is moved aside and rebuilt from the slabs, and so is a missing or empty one while slab
        files exist."""
        path = self.directory / DB_NAME
        # SQLite opens these itself (following links): check them first, and take group/other bits away. Nobody
        # else can create entries in the private directory afterwards.
        existed = False
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            if check_private_file(self.directory / name):
                os.close(open_private(self.directory / name, os.O_RDONLY))
                existed = existed or name == DB_NAME
        damage = None
        if existed:
            try:
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                # Read-only checks first, before WAL mode is set: a damaged file is moved aside as it was.
                (check,) = self._db.execute("PRAGMA quick_check(1)").fetchone()
                damage = f"integrity check: {check}" if check != "ok" else _schema_problem(self._db)
                if damage is None and _schema_signature(self._db)[0]:
                    self._durable(self._db)
                    self._db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                    return self._db.execute(_SELECT_ROWS).fetchall()
            except sqlite3.DatabaseError as e:
                if not _is_damage(e):
                    raise
                damage = str(e)
            if damage is not None:
                self._db.close()
                self._db = None
                self._move_aside(path, damage)
        if self._db is None:
            # SQLite gives its -wal and -shm files the database file's permissions, so creating it 0o600 first
            # keeps all three private.
            os.close(open_private(path, os.O_RDWR, create=True))
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._durable(self._db)
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        if damage is None:
            if not any(sizes):
                return []
            self._stats["metadata_rebuilds"] += 1
            log.warning("%s has slab files but no index of them: rebuilding it from their headers", self.directory)
        return self._rebuild_index(sizes)

    def _rebuild_index(self, sizes: list[int]) -> list[Any]:
        """Publish every block the slab files hold (`_scan_slab`), in one transaction; returns the rows.

        A key found twice keeps its first copy. Rebuilt blocks may include ones deleted before (a delete only
        drops the row): a key names its content, so such a block is still correct KV, and the runtime's
        eviction reclaims it like any other.
        """
        rows: list[tuple[Any, ...]] = []
        seen: set[tuple[bytes, bytes]] = set()
        duplicates = 0
        for slab, size in enumerate(sizes):
            if size < HEADER_BYTES:
                continue
            path = self.slab_path(slab)
            fd = open_private(path, os.O_RDONLY)
            try:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for offset, hdr in _scan_slab(fd, size, self.slab_bytes):
                    ident = (hdr.namespace, hdr.key)
                    if ident in seen:
                        duplicates += 1
                        continue
                    seen.add(ident)
                    capacity = block_capacity(hdr.payload_len)
                    rows.append((*ident, slab, offset, capacity, hdr.payload_len, _signed64(hdr.checksum)))
            except OSError as e:
                log.warning("rebuilding the index: reading %s failed (%s); the rest of it is not recovered", path, e)
            finally:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # a one-off walk: leave the cache alone
                os.close(fd)
        self._tx([("INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)])
        self._stats["rebuilt_blocks"] += len(rows)
        log.warning(
            "rebuilt the index of %s from its slab files: %d blocks (%d duplicate keys skipped)",
            self.directory,
            len(rows),
            duplicates,
        )
        return rows

    async def _db_call(self, fn: Any, *args: Any) -> Any:
        """Run `fn` on the store's single SQLite thread and wait for it even if cancelled."""
        loop = asyncio.get_running_loop()
        (result,), cancelled = await settle([loop.run_in_executor(self._db_pool, fn, *args)])
        if isinstance(result, BaseException):
            raise result
        if cancelled:
            raise asyncio.CancelledError
        return result

    async def _load_records(self, rows: list[Any], sizes: list[int]) -> None:
        dropped: list[tuple[bytes, bytes]] = []
        for ns, key, slab, offset, capacity, length, checksum in sorted(rows, key=lambda r: (r[2], r[3])):
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
        """Counters since open: successful reads/writes and their bytes, misses by cause, metadata rebuilt on
        open (`metadata_rebuilds`, `rebuilt_blocks`), and gauges: `published` blocks, `slabs_allocated` (slab
        files that exist at full size)."""
        return {**self._stats, "published": len(self._records), "slabs_allocated": sum(self._slab_ready)}

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
        each touched slab once (one barrier per slab per batch, not per block). A slab without its file gets it
        first (`_ensure_slabs`). Any failure becomes DiskWriteError. Returns the payload checksums (computed here
        unless given).

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
        slabs = sorted({it.location.slab for it, _ in blocks})
        try:
            await self._ensure_slabs(slabs)  # a slab's first write creates and preallocates its file
            results = await self._file_io.pwritev_many(transfers)
        except Exception as e:  # CancelledError is not an Exception: it propagates
            results = [e]
        err = first_error(results)
        if err is None:
            synced, cancelled = await settle(self._file_io.fsync(self.slab_path(s)) for s in slabs)
            if cancelled:
                raise asyncio.CancelledError
            err = first_error(synced)
        if err is None:
            return sums
        self._stats["write_errors"] += 1
        # A full or failing drive fails every write: the first of each kind is worth a warning, the rest are
        # counted (write_errors) and logged at DEBUG.
        kind = getattr(err, "errno", None) or type(err).__name__
        first = kind not in self._write_error_kinds
        self._write_error_kinds.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, "disk write failed, nothing published: %s", err)
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
