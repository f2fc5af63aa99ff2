"""The byte budget bounds bytes in flight; an oversize transfer passes alone; cancelled waiters leave nothing."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_runtime.budget import ByteBudget


def test_budget_needs_a_positive_limit():
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)


@settings(max_examples=25, deadline=None)
@given(limit=st.integers(1, 100), sizes=st.lists(st.integers(0, 150), min_size=1, max_size=12))
def test_budget_never_exceeds_its_limit(limit, sizes):
    async def main() -> None:
        budget = ByteBudget(limit)
        peak = 0
        done = []

        async def holder(i: int, n: int) -> None:
            nonlocal peak
            async with budget.hold(n):
                peak = max(peak, budget.in_flight)
                assert budget.in_flight <= limit
                if n >= limit:  # an oversize transfer passes, but alone
                    assert budget.in_flight == limit
                for _ in range(i % 3 + 1):
                    await asyncio.sleep(0)
            done.append(i)

        await asyncio.gather(*(holder(i, n) for i, n in enumerate(sizes)))
        assert sorted(done) == list(range(len(sizes)))
        assert budget.idle
        assert peak <= limit

    asyncio.run(main())


async def test_budget_waiter_cancelled_leaves_no_bytes_behind():
    budget = ByteBudget(10)
    release = asyncio.Event()

    async def big() -> None:
        async with budget.hold(10):
            await release.wait()

    holder = asyncio.create_task(big())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(budget.hold(5).__aenter__())
    await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    assert budget.in_flight == 0
    async with budget.hold(10):
        assert budget.in_flight == 10
