"""Flow control for the scheduler: a fair turn for compute (the byte budget for transfers in flight is the
tier service's, ``kv_runtime.budget``). An asyncio primitive, used only from the event loop.

- :class:`FairTurn` hands the engine's single compute stream to waiting contexts round-robin: a context that
  just computed goes to the back, so one chatty session cannot starve the others, and within one context
  requests keep their order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class FairTurn:
    """One holder at a time; the next turn goes to the context that waited longest since its last turn."""

    def __init__(self) -> None:
        self._waiting: collections.OrderedDict[Hashable, collections.deque[asyncio.Future]] = collections.OrderedDict()
        self._busy = False

    @asynccontextmanager
    async def turn(self, context: Hashable) -> AsyncIterator[None]:
        if self._busy or self._waiting:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(context, collections.deque()).append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._pass_on()  # the turn was handed to us as we were cancelled: hand it on
                else:
                    self._forget(context, fut)
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._pass_on()

    def _forget(self, context: Hashable, fut: asyncio.Future) -> None:
        queue = self._waiting.get(context)
        if queue is not None and fut in queue:
            queue.remove(fut)
            if not queue:
                del self._waiting[context]

    def _pass_on(self) -> None:
        while self._waiting:
            context, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            del self._waiting[context]
            if queue:  # the context waits again, behind everyone else
                self._waiting[context] = queue
            if not fut.cancelled():
                fut.set_result(None)
                return
        self._busy = False
