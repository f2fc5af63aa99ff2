"""Named shared contexts: prefixes computed once and reused by name, durable across restarts.

The registry keeps each context's token ids, pin flag and expiry in SQLite (WAL) next to the disk tier, so a
new process knows its contexts again; their blocks come back from the disk tier's own recovery. Token ids are
stored as little-endian int32 bytes, never pickled.

Contexts are keyed by ``(namespace, context_id)``: the namespace digest covers the model, the KV layout and the
cache salt, so tenants sharing a cache directory under different salts each have their own "manual".

The file lives in the cache directory, a trust boundary (``kv_io.private_files``): its directory must be
private, and the database and its ``-wal``/``-shm``/``-journal`` files are checked before SQLite opens them (a
symlink or another user's file is refused with ``UnsafePathError``, never followed). A registry SQLite cannot
read, or one of a schema this version does not know, is moved aside (``contexts.sqlite3.damaged-<unix time>``,
with its WAL) and a fresh one is created: a lost registry costs the contexts' names, never a start. The
schema of earlier versions (keyed by ``context_id`` alone) is migrated in place.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kv_io.private_files import check_private_file, ensure_private_dir, open_private

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # PRAGMA user_version: 2 is keyed by (namespace, context_id); 0, the first, by context_id
_COLUMNS = frozenset({"namespace", "context_id", "tokens", "pinned", "created", "expires"})
_CREATE = """
CREATE TABLE contexts (
    namespace BLOB NOT NULL,
    context_id TEXT NOT NULL,
    tokens BLOB NOT NULL,
    pinned INTEGER NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    PRIMARY KEY (namespace, context_id)
)
"""
_FIELDS = "context_id, tokens, pinned, created, expires"
# Files SQLite opens next to the database by name; the WAL and a rollback journal hold committed data.
_KEPT_SIDE_FILES = ("-wal", "-journal")
_SIDE_FILES = (*_KEPT_SIDE_FILES, "-shm")


class RegistryDamagedError(sqlite3.DatabaseError):
    """The registry file is a database SQLite can read, but not a context registry this version knows."""


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    """A file that is not a database, a corrupt one, or a foreign schema; not a lock, a full disk, a permission
    (those are ``OperationalError``s: moving a healthy registry aside for them would lose it)."""
    if isinstance(error, RegistryDamagedError):
        return True
    name = getattr(error, "sqlite_errorname", None)  # Python >= 3.11
    if name is not None:
        return name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))
    return not isinstance(error, sqlite3.OperationalError)


@dataclass(frozen=True, slots=True)
class SharedContext:
    """A named prefix. ``expires`` is a wall-clock time (seconds since the epoch), or None for no TTL."""

    context_id: str
    tokens: tuple[int, ...]
    pinned: bool
    created: float
    expires: float | None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (time.time() if now is None else now) >= self.expires


class ContextRegistry:
    """Context records of one namespace; in memory only when ``path`` is None.

    ``moved_aside`` lists the damaged registry files this instance moved out of the way when it opened.
    """

    def __init__(self, path: Path | None, namespace: bytes) -> None:
        self.namespace = namespace
        self.path = path
        self.moved_aside: list[Path] = []
        self._lock = threading.Lock()
        self._db = self._open(path)

    # ------------------------------------------------------------------ opening

    def _open(self, path: Path | None) -> sqlite3.Connection:
        if path is None:
            db = sqlite3.connect(":memory:", check_same_thread=False)
            self._prepare(db, self._schema(db))
            return db
        ensure_private_dir(path.parent)
        try:
            return self._connect(path)
        except sqlite3.DatabaseError as e:
            if not _is_damage(e):
                raise
            self._move_aside(path, e)
        return self._connect(path)  # a fresh file: failing again is not damage, it is raised

    def _connect(self, path: Path) -> sqlite3.Connection:
        """Open ``path`` after checking it and its side files: each must be a private regular file of this user
        (``UnsafePathError`` otherwise, before SQLite touches anything)."""
        files = [path, *(Path(f"{path}{suffix}") for suffix in _SIDE_FILES)]
        present = [check_private_file(f) for f in files]
        if not present[0]:
            os.close(open_private(path, os.O_RDWR, create=True))  # created 0o600, not with SQLite's umask mode
        for f, there in zip(files, present, strict=True):
            if there:
                os.close(open_private(f, os.O_RDONLY))  # checked once open, and group/other bits removed
        db = sqlite3.connect(str(path), check_same_thread=False)
        try:
            # Read-only checks first: a file found damaged is moved aside exactly as it was.
            (result,) = db.execute("PRAGMA quick_check(1)").fetchone()
            if result != "ok":
                raise RegistryDamagedError(f"integrity check failed: {result}")
            schema = self._schema(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._prepare(db, schema)
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _schema(db: sqlite3.Connection) -> str:
        """``"empty"``, ``"current"`` or ``"first"`` (keyed by id alone); any other schema is damage."""
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if not tables:
            return "empty"
        if tables != {"contexts"}:
            raise RegistryDamagedError(f"unexpected tables {sorted(tables)}")
        info = db.execute("PRAGMA table_info(contexts)").fetchall()  # (cid, name, type, notnull, default, pk)
        columns = {row[1] for row in info}
        key = [row[1] for row in sorted(info, key=lambda row: row[5]) if row[5]]
        if columns != _COLUMNS:
            raise RegistryDamagedError(f"the contexts table has columns {sorted(columns)}")
        if version == SCHEMA_VERSION and key == ["namespace", "context_id"]:
            return "current"
        if version == 0 and key == ["context_id"]:
            return "first"
        raise RegistryDamagedError(f"unknown registry schema (version {version}, key {key})")

    @staticmethod
    def _prepare(db: sqlite3.Connection, schema: str) -> None:
        """Create the table in an empty database; migrate the first schema."""
        if schema == "empty":
            _transaction(db, _CREATE, f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif schema == "first":
            # The first schema keyed contexts by id alone (one tenant's save replaced another's): re-key every
            # row by (namespace, context_id), all in one transaction.
            _transaction(
                db,
                "ALTER TABLE contexts RENAME TO contexts_v1",
                _CREATE,
                "INSERT OR IGNORE INTO contexts (namespace, context_id, tokens, pinned, created, expires)"
                " SELECT namespace, context_id, tokens, pinned, created, expires FROM contexts_v1",
                "DROP TABLE contexts_v1",
                f"PRAGMA user_version = {SCHEMA_VERSION}",
            )
            log.info("kvtier: shared-context registry migrated to schema %d (namespace, id)", SCHEMA_VERSION)

    def _move_aside(self, path: Path, error: sqlite3.DatabaseError) -> None:
        """Rename the damaged registry (and its WAL or journal, so the pair still opens together) to
        ``<name>.damaged-<unix time>``; the shared-memory index is derived and simply removed."""
        stamp = int(time.time())
        target, n = path.with_name(f"{path.name}.damaged-{stamp}"), 0
        while any(os.path.lexists(f"{target}{s}") for s in ("", *_KEPT_SIDE_FILES)):
            n += 1
            target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        os.rename(path, target)
        for suffix in _KEPT_SIDE_FILES:
            if os.path.lexists(f"{path}{suffix}"):
                os.rename(f"{path}{suffix}", f"{target}{suffix}")
        if os.path.lexists(f"{path}-shm"):
            os.unlink(f"{path}-shm")
        log.warning(
            "kvtier: the shared-context registry %s is damaged (%s); moved it to %s and started an empty one "
            "(the contexts' names are lost, their blocks age out)",
            path,
            error,
            target.name,
        )
        self.moved_aside.append(target)

    # ------------------------------------------------------------------ records

    def put(self, ctx: SharedContext) -> None:
        """Store ``ctx`` in this namespace, replacing the namespace's context of the same id (only that one)."""
        blob = np.asarray(ctx.tokens, dtype="<i4").tobytes()
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO contexts (namespace, context_id, tokens, pinned, created, expires)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self.namespace, ctx.context_id, blob, int(ctx.pinned), ctx.created, ctx.expires),
            )

    def get(self, context_id: str) -> SharedContext | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_FIELDS} FROM contexts WHERE namespace = ? AND context_id = ?",
                (self.namespace, context_id),
            ).fetchone()
        return None if row is None else _context(row)

    def all(self) -> list[SharedContext]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_FIELDS} FROM contexts WHERE namespace = ? ORDER BY created", (self.namespace,)
            ).fetchall()
        return [ctx for ctx in map(_context, rows) if ctx is not None]

    def delete(self, context_id: str) -> bool:
        with self._lock, self._db:
            cur = self._db.execute(
                "DELETE FROM contexts WHERE namespace = ? AND context_id = ?", (self.namespace, context_id)
            )
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _transaction(db: sqlite3.Connection, *statements: str) -> None:
    """Run ``statements`` in one transaction (Python's sqlite3 would commit each DDL statement on its own)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql in statements:
            db.execute(sql)
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _context(row: tuple) -> SharedContext | None:
    """A record as stored, or None (logged) for a row that does not decode: one bad row must not hide the rest."""
    context_id, blob, pinned, created, expires = row
    try:
        if not isinstance(context_id, str) or not isinstance(blob, bytes) or len(blob) % 4:
            raise ValueError("malformed row")
        tokens = tuple(int(t) for t in np.frombuffer(blob, dtype="<i4"))
        expiry = None if expires is None else float(expires)
        return SharedContext(context_id, tokens, bool(pinned), float(created), expiry)
    except (TypeError, ValueError) as e:
        log.warning("kvtier: skipping an unreadable shared-context record %r: %s", context_id, e)
        return None
