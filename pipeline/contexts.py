"""Named shared contexts: prefixes computed once and reused by name, durable across restarts.

The registry keeps each context's token ids, pin flag and expiry in SQLite (WAL) next to the disk tier, so a
new process knows its contexts again; their blocks come back from the disk tier's own recovery. Token ids are
stored as little-endian int32 bytes, never pickled.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    context_id TEXT PRIMARY KEY,
    namespace BLOB NOT NULL,
    tokens BLOB NOT NULL,
    pinned INTEGER NOT NULL,
    created REAL NOT NULL,
    expires REAL
)
"""


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
    """Context records of one namespace; in memory only when ``path`` is None."""

    def __init__(self, path: Path | None, namespace: bytes) -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(":memory:" if path is None else str(path), check_same_thread=False)
        if path is not None:
            path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def put(self, ctx: SharedContext) -> None:
        blob = np.asarray(ctx.tokens, dtype="<i4").tobytes()
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO contexts VALUES (?, ?, ?, ?, ?, ?)",
                (ctx.context_id, self.namespace, blob, int(ctx.pinned), ctx.created, ctx.expires),
            )

    def get(self, context_id: str) -> SharedContext | None:
        with self._lock:
            row = self._db.execute(
                "SELECT context_id, tokens, pinned, created, expires FROM contexts"
                " WHERE context_id = ? AND namespace = ?",
                (context_id, self.namespace),
            ).fetchone()
        return None if row is None else _context(row)

    def all(self) -> list[SharedContext]:
        with self._lock:
            rows = self._db.execute(
                "SELECT context_id, tokens, pinned, created, expires FROM contexts WHERE namespace = ?"
                " ORDER BY created",
                (self.namespace,),
            ).fetchall()
        return [_context(r) for r in rows]

    def delete(self, context_id: str) -> bool:
        with self._lock, self._db:
            cur = self._db.execute(
                "DELETE FROM contexts WHERE context_id = ? AND namespace = ?", (context_id, self.namespace)
            )
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _context(row: tuple) -> SharedContext:
    context_id, blob, pinned, created, expires = row
    tokens = tuple(int(t) for t in np.frombuffer(blob, dtype="<i4"))
    return SharedContext(context_id, tokens, bool(pinned), created, expires)
