"""Flow control: the byte budget bounds bytes in flight, the fair turn serves contexts round-robin."""

from __future__ import annotations

import asyncio

from kv_pipeline.flow import FairTurn


async def _serve(turn: FairTurn, context: str, label: str, log: list[str], started: asyncio.Event | None = None):
    async with turn.turn(context):
        log.append(label)
        if started is not None:
            started.set()
        await asyncio.sleep(0)


async def test_round_robin_serves_the_lone_context_before_the_chatty_ones_second_turn():
    turn = FairTurn()
    log: list[str] = []
    gate = asyncio.Event()

    async def first() -> None:
        async with turn.turn("X"):
            log.append("X")
            await gate.wait()

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(_serve(turn, "A", f"A{i}", log)) for i in range(5)]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(_serve(turn, "B", "B0", log)))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(holder, *tasks)
    assert log[:4] == ["X", "A0", "B0", "A1"]
    assert log[4:] == ["A2", "A3", "A4"]  # within a context, requests keep their order


async def test_many_contexts_each_get_a_turn_before_anyone_gets_a_second():
    turn = FairTurn()
    log: list[str] = []
    gate = asyncio.Event()

    async def first() -> None:
        async with turn.turn("X"):
            await gate.wait()

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(_serve(turn, c, f"{c}{i}", log)) for i in range(3) for c in "CDE"]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(holder, *tasks)
    firsts = [label[0] for label in log[:3]]
    assert sorted(firsts) == ["C", "D", "E"]
    assert len(log) == 9


async def test_cancelled_waiter_does_not_lose_the_turn():
    turn = FairTurn()
    log: list[str] = []
    gate = asyncio.Event()

    async def first() -> None:
        async with turn.turn("X"):
            await gate.wait()

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
    doomed = asyncio.create_task(_serve(turn, "A", "A0", log))
    after = asyncio.create_task(_serve(turn, "B", "B0", log))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(holder, after), timeout=5)
    assert doomed.cancelled()
    assert log == ["B0"]
    async with asyncio.timeout(5):  # the turn is free again
        async with turn.turn("C"):
            pass


async def test_waiter_cancelled_as_the_turn_is_handed_to_it_passes_it_on():
    turn = FairTurn()
    log: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with turn.turn("X"):
            await release.wait()

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
    doomed = asyncio.create_task(_serve(turn, "A", "A0", log))
    after = asyncio.create_task(_serve(turn, "B", "B0", log))
    await asyncio.sleep(0)
    release.set()
    await holder  # the turn is now handed to A's future, A has not resumed yet
    doomed.cancel()
    await asyncio.wait_for(asyncio.gather(after, return_exceptions=True), timeout=5)
    await asyncio.gather(doomed, return_exceptions=True)
    assert "B0" in log
    async with asyncio.timeout(5):
        async with turn.turn("C"):
            pass
