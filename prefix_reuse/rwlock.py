"""A readers-writer lock: lookups share the index, structural changes take it alone.

The engine's scheduler thread, its workers and the asyncio loop all read the index at once; only inserts,
removals, pins and publication need exclusive access. Writers are preferred (a waiting writer holds back new
readers) so a stream of lookups can never starve an insert.
"""

from __future__ import annotations

import threading


class RWLock:
    __slots__ = ("_cond", "_read", "_readers", "_write", "_writer", "_writers_waiting")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        # NOTE: plain context-manager objects, not @contextmanager generators: the lock is taken on every
        # lookup, pin and eviction, and a generator frame per use costs more than the lock itself.
        self._read = _Shared(self)
        self._write = _Exclusive(self)

    def read(self) -> _Shared:
        return self._read

    def write(self) -> _Exclusive:
        return self._write


class _Shared:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        with lock._cond:
            while lock._writer or lock._writers_waiting:
                lock._cond.wait()
            lock._readers += 1

    def __exit__(self, *exc: object) -> None:
        lock = self._lock
        with lock._cond:
            lock._readers -= 1
            if not lock._readers:
                lock._cond.notify_all()


class _Exclusive:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        with lock._cond:
            lock._writers_waiting += 1
            while lock._writer or lock._readers:
                lock._cond.wait()
            lock._writers_waiting -= 1
            lock._writer = True

    def __exit__(self, *exc: object) -> None:
        lock = self._lock
        with lock._cond:
            lock._writer = False
            lock._cond.notify_all()
