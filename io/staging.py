"""Bounded pool of reusable, 4096-aligned host buffers.

Every disk transfer and every host<->device copy passes through host memory. Allocating (and, with CUDA,
pinning) that memory per transfer costs far more than the copy itself, so the pool allocates all of its buffers
once, up front, as views into a single allocation, and hands them out and takes them back. When all buffers are
in use, `acquire()` waits: that is the backpressure that keeps a burst of transfers from growing host memory
without bound.

Buffers start on a 4096-byte boundary and are spaced by a multiple of 4096 bytes, so a buffer can be the target
of an O_DIRECT read or the source of an O_DIRECT write as it is.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import torch

from kv_io.align import aligned_empty, round_up


class StagingPool:
    """A fixed set of `num_buffers` host buffers of `buffer_bytes` each, reused forever.

    Invariant: every buffer index is in exactly one of three places — the free list, handed to a waiting
    `acquire()` whose result is not yet consumed, or held by a caller. `in_use` counts the last two. Waiters are
    served first-come first-served, and `try_acquire()` never jumps the queue.

    `release()` is thread-safe (a CUDA completion callback or a worker thread may return a buffer); waiters are
    woken on their own event loop.
    """

    __slots__ = ("_all", "_by_ptr", "_free", "_held", "_lock", "_waiters", "buffer_bytes", "num_buffers", "pinned")

    def __init__(self, buffer_bytes: int, num_buffers: int, *, pin: bool | None = None) -> None:
        if not isinstance(buffer_bytes, int) or buffer_bytes <= 0:
            raise ValueError(f"buffer_bytes must be a positive int, got {buffer_bytes!r}")
        if not isinstance(num_buffers, int) or num_buffers <= 0:
            raise ValueError(f"num_buffers must be a positive int, got {num_buffers!r}")
        cuda = torch.cuda.is_available()
        if pin is None:
            pin = cuda
        elif pin and not cuda:
            raise ValueError("pin=True needs CUDA (pinned host memory is page-locked through the CUDA driver)")
        self.buffer_bytes = buffer_bytes
        self.num_buffers = num_buffers
        self.pinned = bool(pin)
        # NOTE: one allocation carved into views: pinning is expensive per call and fragments the driver's
        # page-locked pool, and a single region keeps every buffer's address stable for the pool's lifetime.
        stride = round_up(buffer_bytes)
        region = aligned_empty(stride * num_buffers, pin=self.pinned)
        self._all = tuple(region[i * stride : i * stride + buffer_bytes] for i in range(num_buffers))
        self._by_ptr = {buf.data_ptr(): i for i, buf in enumerate(self._all)}
        self._free: deque[int] = deque(range(num_buffers))
        self._held: set[int] = set()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[int]]] = deque()
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Buffers not on the free list (held by callers or being handed to a waiter)."""
        with self._lock:
            return len(self._held)

    def try_acquire(self) -> torch.Tensor | None:
        """A free buffer now, or None when none is free (or others are already waiting for one)."""
        with self._lock:
            if not self._free or self._waiters:
                return None
            idx = self._free.popleft()
            self._held.add(idx)
        return self._all[idx]

    async def acquire(self) -> torch.Tensor:
        """A free buffer, waiting while all are in use. Cancellation while waiting loses no buffer."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free and not self._waiters:
                idx = self._free.popleft()
                self._held.add(idx)
                return self._all[idx]
            fut: asyncio.Future[int] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            idx = await fut
        except asyncio.CancelledError:
            # The waiter is absent when a buffer was already handed over: it is returned below or by _deliver.
            with self._lock, suppress(ValueError):
                self._waiters.remove((loop, fut))
            if fut.done() and not fut.cancelled():
                self._give_back(fut.result())
            raise
        return self._all[idx]

    def release(self, buf: torch.Tensor) -> None:
        """Return a buffer obtained from this pool. Raises ValueError for a foreign or already released buffer."""
        if not isinstance(buf, torch.Tensor):
            raise TypeError(f"release() takes a tensor from this pool, got {type(buf).__name__}")
        idx = self._by_ptr.get(buf.data_ptr())
        if idx is None or buf.device.type != "cpu":
            raise ValueError("release() of a buffer that does not belong to this pool")
        with self._lock:
            if idx not in self._held:
                raise ValueError("release() of a buffer that is not in use (released twice?)")
            self._give_back_locked(idx)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[torch.Tensor]:
        """`async with pool.lease() as buf:` — acquire, and release on every exit path."""
        buf = await self.acquire()
        try:
            yield buf
        finally:
            self.release(buf)

    def _give_back(self, idx: int) -> None:
        with self._lock:
            self._give_back_locked(idx)

    def _give_back_locked(self, idx: int) -> None:
        """Hand `idx` to the oldest live waiter, or put it on the free list. Caller holds the lock."""
        while self._waiters:
            loop, fut = self._waiters.popleft()
            if fut.done() or loop.is_closed():
                continue
            loop.call_soon_threadsafe(self._deliver, fut, idx)
            return
        self._held.discard(idx)
        self._free.append(idx)

    def _deliver(self, fut: asyncio.Future[int], idx: int) -> None:
        # Runs on the waiter's loop; the waiter may have been cancelled after it was chosen.
        if fut.cancelled():
            self._give_back(idx)
        else:
            fut.set_result(idx)
