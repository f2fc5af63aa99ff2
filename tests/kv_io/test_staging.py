"""StagingPool: bounded, reused, aligned buffers with backpressure, cancellation-safe waiting, strict release."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_io.align import ALIGN, aligned_empty, is_aligned
from kv_io.staging import StagingPool


def test_buffers_are_aligned_distinct_and_sized() -> None:
    pool = StagingPool(10_000, 3, pin=False)
    bufs = [pool.try_acquire() for _ in range(3)]
    assert all(b is not None for b in bufs)
    assert len({b.data_ptr() for b in bufs}) == 3
    for b in bufs:
        assert b.dtype == torch.uint8 and b.dim() == 1 and b.numel() == 10_000
        assert is_aligned(b)
    # Distinct buffers do not overlap: writing one leaves the others untouched.
    for i, b in enumerate(bufs):
        b.fill_(i)
    for i, b in enumerate(bufs):
        assert int(b.min()) == int(b.max()) == i
    assert not pool.pinned and pool.buffer_bytes == 10_000 and pool.num_buffers == 3


def test_bounded_and_reused() -> None:
    pool = StagingPool(ALIGN, 2, pin=False)
    a, b = pool.try_acquire(), pool.try_acquire()
    assert pool.in_use == 2
    assert pool.try_acquire() is None
    pool.release(a)
    assert pool.in_use == 1
    again = pool.try_acquire()
    assert again is not None and again.data_ptr() == a.data_ptr()
    pool.release(again)
    pool.release(b)
    assert pool.in_use == 0


def test_release_errors() -> None:
    pool = StagingPool(ALIGN, 1, pin=False)
    buf = pool.try_acquire()
    pool.release(buf)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(buf)
    with pytest.raises(ValueError, match="does not belong"):
        pool.release(aligned_empty(ALIGN))
    with pytest.raises(TypeError):
        pool.release(b"not a tensor")  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        StagingPool(0, 1)
    with pytest.raises(ValueError):
        StagingPool(ALIGN, 0)
    if not torch.cuda.is_available():
        assert StagingPool(ALIGN, 1).pinned is False
        with pytest.raises(ValueError, match="CUDA"):
            StagingPool(ALIGN, 1, pin=True)


async def test_backpressure_waits_until_release() -> None:
    pool = StagingPool(ALIGN, 1, pin=False)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    pool.release(held)
    got = await asyncio.wait_for(waiter, 5)
    assert got.data_ptr() == held.data_ptr()
    assert pool.in_use == 1


async def test_waiters_served_in_order_and_try_acquire_does_not_jump_the_queue() -> None:
    pool = StagingPool(ALIGN, 1, pin=False)
    held = await pool.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        async with pool.lease():
            order.append(i)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(take(i)) for i in range(4)]
    await asyncio.sleep(0)
    pool.release(held)
    assert pool.try_acquire() is None  # the buffer belongs to the first waiter
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3]
    assert pool.in_use == 0


async def test_cancelled_waiter_loses_no_buffer() -> None:
    pool = StagingPool(ALIGN, 1, pin=False)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.release(held)  # handed to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.in_use == 0
    assert pool.try_acquire() is not None


async def test_lease_releases_on_error() -> None:
    pool = StagingPool(ALIGN, 1, pin=False)
    with pytest.raises(RuntimeError):
        async with pool.lease():
            raise RuntimeError("boom")
    assert pool.in_use == 0


async def test_release_from_another_thread_wakes_waiter() -> None:
    pool = StagingPool(ALIGN, 1, pin=False)
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    t = threading.Thread(target=pool.release, args=(held,))
    t.start()
    t.join()
    assert (await asyncio.wait_for(waiter, 5)).data_ptr() == held.data_ptr()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=60), st.integers(1, 4))
def test_never_more_than_num_buffers_in_use(ops: list[bool], n: int) -> None:
    """Random acquire/release sequences against a counter: in_use tracks it, never exceeds the bound."""
    pool = StagingPool(ALIGN, n, pin=False)
    held: list[torch.Tensor] = []
    for acquire in ops:
        if acquire:
            buf = pool.try_acquire()
            assert (buf is None) == (len(held) == n)
            if buf is not None:
                assert all(buf.data_ptr() != h.data_ptr() for h in held)
                held.append(buf)
        elif held:
            pool.release(held.pop(0))
        assert pool.in_use == len(held) <= n
