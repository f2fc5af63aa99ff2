"""Dedicated CUDA copy streams and completion events.

Copies between the GPU and host memory run on their own stream, so they overlap with the engine's compute
stream instead of queueing behind it. Ordering is expressed with events, never with a device-wide
synchronisation: a copy may first wait (on the device) for an event recorded on another stream — e.g. the
compute stream that produced the blocks — and every copy records an event that consumers wait on, either on
the device (``stream.wait_event``) or from asyncio by polling ``event.query()``.

Host memory in a copy must be pinned: a pageable source or destination silently turns an asynchronous copy
into a staged synchronous one at a third of the bandwidth, so it is refused here.

Importable without CUDA; every function that needs a device raises a clear RuntimeError when there is none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_POLL_MIN_S = 20e-6
_POLL_MAX_S = 200e-6


def cuda_available() -> bool:
    return torch.cuda.is_available()


def require_cuda(what: str = "this operation") -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA device, and none is available on this machine")


def _check_pair(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.numel() * dst.element_size() != src.numel() * src.element_size():
        raise ValueError(f"copy size mismatch: {tuple(dst.shape)} {dst.dtype} <- {tuple(src.shape)} {src.dtype}")
    for t, role in ((dst, "destination"), (src, "source")):
        if t.device.type == "cpu" and not t.is_pinned():
            raise ValueError(f"the host {role} of a CUDA copy must be pinned memory (pageable memory is slow)")


class CopyStream:
    """A dedicated CUDA stream for copies; each copy records and returns its completion event."""

    def __init__(self, device: torch.device | str | int | None = None, *, priority: int = 0) -> None:
        require_cuda("CopyStream")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device, priority=priority)

    @contextmanager
    def use(self) -> Iterator[torch.cuda.Stream]:
        """Run kernels (gathers, scatters) on this stream inside the block."""
        with torch.cuda.stream(self.stream):
            yield self.stream

    def wait(self, event: torch.cuda.Event | None) -> None:
        """Make later work on this stream wait (on the device, not the host) for ``event``."""
        if event is not None:
            self.stream.wait_event(event)

    def record(self) -> torch.cuda.Event:
        """An event that completes when everything queued so far on this stream has finished."""
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, after: torch.cuda.Event | None = None) -> torch.cuda.Event:
        """Queue ``dst.copy_(src)`` on this stream, after ``after`` if given; returns the completion event.

        Tensors are byte-reinterpreted when their dtypes differ (sizes must match). Device tensors are
        marked as used by this stream, so the caching allocator does not recycle them before the copy ends.
        """
        _check_pair(dst, src)
        if dst.dtype != src.dtype:
            dst, src = dst.view(torch.uint8).view(-1), src.view(torch.uint8).view(-1)
        with torch.cuda.stream(self.stream):
            self.wait(after)
            dst.copy_(src.view(dst.shape) if src.shape != dst.shape else src, non_blocking=True)
            for t in (dst, src):
                if t.is_cuda:
                    t.record_stream(self.stream)
            return self.record()


async def wait_event(event: torch.cuda.Event, *, max_interval_s: float = _POLL_MAX_S) -> None:
    """Await a CUDA event from asyncio without blocking the loop or synchronising the device.

    Polls ``event.query()`` with a short, growing interval: a copy that is almost done is noticed within
    tens of microseconds, a long one costs a few thousand cheap queries per second at most.
    """
    delay = _POLL_MIN_S
    while not event.query():
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_interval_s)
