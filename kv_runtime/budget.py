"""A byte budget for transfers in flight (an asyncio primitive, used from the tier service's event loop).

It bounds the bytes a direction may have in flight (loads, saves), so a burst of requests cannot claim every
staging buffer or flood the disk queue; a transfer larger than the whole budget is let through alone rather
than deadlocking.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    """At most ``limit`` bytes in flight. A waiter proceeds as soon as its bytes fit, so a small transfer may
    pass a large one that is still waiting for room."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"a byte budget needs a positive limit, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self._cond = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        nbytes = min(max(nbytes, 0), self.limit)
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight + nbytes <= self.limit)
            self.in_flight += nbytes
        try:
            yield
        finally:
            async with self._cond:
                self.in_flight -= nbytes
                self._cond.notify_all()

    @property
    def idle(self) -> bool:
        return self.in_flight == 0
