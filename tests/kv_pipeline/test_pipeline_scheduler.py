"""The scheduler through the engine: plans, cancellation, failed loads, write-back per migration policy, and
the metrics it reports."""

from __future__ import annotations

import asyncio
import threading

import torch
from pipeline_helpers import (
    BLOCK,
    GATE_S,
    Gate,
    assert_released,
    cost_model,
    full_logits,
    greedy,
    prompt,
    run,
    set_costs,
)

from kv_runtime import Tier

ATOL = 1e-4
BLOCK_BYTES = 98_304

# Cost-model inputs that make a plan unambiguous (the model is tiny: 16 tokens are ~0.15 GFLOP). A prefill of
# 1 GFLOP/s makes any fast tier worth loading; a 1 MB/s disk is as slow as that prefill, so the best plan
# recomputes the front while the back streams in; a 1 B/s disk is never worth reading.
SLOW_PREFILL = 1e-3  # TFLOP/s
FAST_LINK = (10.0, 0.0)  # GB/s, latency ms
SLOW_DISK = (1e-3, 0.0)
DEAD_DISK = (1e-9, 0.0)
FAST_PREFILL = 1e6
DEAD_DDR = (1e-9, 0.0)


def _assert_idle(engine, context_pins: int = 0) -> None:
    """No lease, byte, busy slot or migration of a finished request is left behind."""
    assert_released(engine, context_pins)
    assert engine.service.loads.idle and engine.service.saves.idle


async def test_plans_ddr_load_and_disk(make_engine):
    tokens = prompt(BLOCK * 10 + 5, seed=20)  # 10 full blocks before the last token, 5 tokens after them
    async with make_engine() as engine:
        first = (await run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert (first.plan, first.matched_tokens, first.computed_tokens) == ("recompute", 0, len(tokens))
        set_costs(engine, prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=FAST_LINK)
        m = (await run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert m.plan == "load" and m.matched_tokens == 10 * BLOCK
        assert m.reused_tokens == {"ddr": 10 * BLOCK} and m.computed_tokens == 5 < len(tokens)
        assert m.bytes_loaded == 10 * BLOCK_BYTES and m.load_misses == 0
        assert m.load_ms > 0 and m.compute_ms > 0 and m.ttft_ms >= m.queue_ms
        # a DDR hit that the model says is slower to load than to recompute is recomputed
        set_costs(engine, prefill_tflops=FAST_PREFILL, ddr=DEAD_DDR, disk=DEAD_DISK)
        m = (await run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert (m.plan, m.matched_tokens, m.reused_tokens, m.computed_tokens) == (
            "recompute",
            10 * BLOCK,
            {},
            len(tokens),
        )
        assert m.bytes_loaded == 0
        assert engine.metrics_snapshot()["pipeline"]["plan_counts"] == {"recompute": 2, "load": 1}

    async def disk_only(**costs):  # a restart: the prefix (written through) is on disk only
        async with make_engine() as engine:
            set_costs(engine, **costs)
            expected = cost_model(engine).plan(["disk"] * 10, BLOCK)
            m = (await run(engine, tokens, max_new_tokens=1))[-1].metrics
            assert engine.metrics_snapshot()["pipeline"]["plan_counts"] == {m.plan: 1}
            assert m.matched_tokens == 10 * BLOCK and m.load_misses == 0
            return m, expected

    # a fast disk and a slow prefill: load all of it
    m, _ = await disk_only(prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=FAST_LINK)
    assert (m.plan, m.reused_tokens, m.computed_tokens) == ("load", {"disk": 10 * BLOCK}, 5)
    # a disk as slow as the prefill: recompute a front while the back loads, then the last 5 tokens
    m, expected = await disk_only(prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=SLOW_DISK)
    front = expected.recompute_front
    assert (expected.choice, expected.load_end) == ("both", 10) and 0 < front < 10
    assert m.plan == "both"
    assert m.reused_tokens == {"disk": (10 - front) * BLOCK}
    assert m.computed_tokens == front * BLOCK + 5
    # a disk too slow to be worth reading: recompute everything, read nothing
    m, _ = await disk_only(prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=DEAD_DISK)
    assert (m.plan, m.reused_tokens, m.computed_tokens, m.bytes_loaded) == ("recompute", {}, len(tokens), 0)


async def test_a_prompt_within_one_block_always_computes_its_last_token(make_engine):
    tokens = prompt(BLOCK * 2, seed=21)  # exactly two blocks: the second holds the last token
    async with make_engine() as engine:
        await run(engine, tokens, max_new_tokens=1)
        logits, m = await engine.prompt_logits(tokens)
        assert m.reused_tokens == {"ddr": BLOCK} and m.computed_tokens == BLOCK
        torch.testing.assert_close(logits, full_logits(engine.model, tokens), atol=ATOL, rtol=0)


async def test_closing_the_stream_mid_generation_releases_everything(make_engine):
    tokens = prompt(BLOCK * 6 + 3, seed=22)
    async with make_engine() as engine:
        await engine.save_shared_context("ctx", prompt(BLOCK * 2, seed=23))
        await run(engine, tokens, max_new_tokens=1)
        stream = engine.generate(tokens, max_new_tokens=50)
        got = [await anext(stream), await anext(stream)]
        # The six loaded blocks' pins went back as soon as they were in the model's cache: only the context's stay.
        assert engine.hierarchy.index.stats().pinned_blocks == 2
        await stream.aclose()
        await engine.scheduler.drain()
        _assert_idle(engine, context_pins=2)
        outs = await run(engine, tokens, max_new_tokens=2)
        assert [o.token_id for o in outs] == [o.token_id for o in got]
        _assert_idle(engine, context_pins=2)


async def test_cancelling_requests_keeps_the_engine_serving(make_engine, monkeypatch):
    """Cancelled while decoding, during its prefill, and while waiting behind that prefill with its disk load
    in flight: each of those three ends cancelled and returns everything it held at once; a fourth request,
    never cancelled, completes with the answer it would have had alone; and both cached prefixes still serve
    afterwards."""
    cached = prompt(BLOCK * 8 + 3, seed=24)
    in_prefill = prompt(BLOCK * 8 + 3, seed=25)
    waiting = prompt(BLOCK * 8 + 3, seed=26)
    survivor = prompt(BLOCK * 3 + 2, seed=27)
    async with make_engine() as engine:  # write-through: both prefixes reach disk
        for p in (cached, waiting):
            await run(engine, p, max_new_tokens=1)
    async with make_engine() as engine:  # restarted: both prefixes are on disk only
        model = engine.model
        references = {"cached": full_logits(model, cached), "waiting": full_logits(model, waiting)}
        expected_survivor = greedy(model, survivor, 4)
        loads_pay = dict(prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=FAST_LINK)  # a cached prefix is loaded

        decode_gate, prefill_gate = Gate(), Gate()
        read_held, read_open = asyncio.Event(), asyncio.Event()
        hold_reads = False
        real_prefill, real_decode = model.prefill, model.decode
        store = engine.hierarchy.pool(Tier.DISK).store
        real_read = store.read_many
        decodes = 0

        def prefill(ids, cache):
            if ids.tolist() == in_prefill:
                prefill_gate.hold()
            return real_prefill(ids, cache)

        def decode(token, cache):
            nonlocal decodes
            decodes += 1
            if decodes == 2:  # the first request's second decode step (it runs alone until then)
                decode_gate.hold()
            return real_decode(token, cache)

        async def read_many(records, outs):
            if hold_reads:
                read_held.set()
                await asyncio.wait_for(read_open.wait(), GATE_S)
            return await real_read(records, outs)

        monkeypatch.setattr(model, "prefill", prefill)
        monkeypatch.setattr(model, "decode", decode)
        monkeypatch.setattr(store, "read_many", read_many)

        tasks: list[asyncio.Task] = []

        def start(p, session) -> asyncio.Task:
            async def consume():
                return [out async for out in engine.generate(p, max_new_tokens=40, session_id=session)]

            tasks.append(asyncio.create_task(consume()))
            return tasks[-1]

        async def cancel(task: asyncio.Task, gate: Gate | None = None) -> None:
            task.cancel()
            if gate is not None:
                gate.open()  # the compute thread finishes the step nobody waits for any more
            await asyncio.wait([task])
            assert task.cancelled(), "the request carried on after it was cancelled"
            assert_released(engine)  # at once, while the others still run

        try:
            set_costs(engine, **loads_pay)
            decoding = start(cached, "decoding")
            await decode_gate.entered()  # its prefix loaded from disk; now in its second decode step
            await cancel(decoding, decode_gate)

            prefilling = start(in_prefill, "prefilling")
            await prefill_gate.entered()  # its prefill holds the compute turn
            set_costs(engine, **loads_pay)
            hold_reads = True
            behind = start(waiting, "behind")
            completes = start(survivor, "completes")
            await asyncio.wait_for(read_held.wait(), GATE_S)  # leased, its disk read in flight, queued for compute
            assert engine.hierarchy.index.stats().pinned_blocks > 0
            await cancel(behind)
            hold_reads = False
            read_open.set()
            await cancel(prefilling, prefill_gate)
            outs = await asyncio.wait_for(completes, GATE_S)

            assert [o.token_id for o in outs][:4] == expected_survivor
            assert outs[-1].finished and outs[-1].metrics.plan == "recompute"
            assert engine.metrics_snapshot()["pipeline"]["requests"] == 1  # the survivor: no cancelled request counts
        finally:  # a failure above must not leave the compute thread or a read held
            for gate in (decode_gate, prefill_gate):
                gate.open()
            read_open.set()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        await engine.scheduler.drain()
        _assert_idle(engine)
        monkeypatch.undo()
        # both prefixes still serve in full: the first request's load had completed (that prefix is in DDR now),
        # the cancelled load left its prefix intact
        reused = []
        for tokens, reference in ((cached, references["cached"]), (waiting, references["waiting"])):
            set_costs(engine, **loads_pay)
            logits, m = await engine.prompt_logits(tokens)
            assert (m.plan, m.computed_tokens, m.load_misses) == ("load", 3, 0)
            assert sum(m.reused_tokens.values()) == 8 * BLOCK
            torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
            reused.append(m.reused_tokens)
            await engine.scheduler.drain()
            _assert_idle(engine)
        assert reused[0] == {"ddr": 8 * BLOCK}


async def test_failed_load_falls_back_to_recompute(make_engine, monkeypatch):
    tokens = prompt(BLOCK * 6 + 3, seed=27)
    async with make_engine() as engine:
        reference = full_logits(engine.model, tokens)
        await run(engine, tokens, max_new_tokens=1)

        def broken(*args, **kwargs):
            raise OSError("device went away")

        monkeypatch.setattr(engine.model, "copy_in", broken)  # the engine's copy out of DDR fails
        logits, m = await engine.prompt_logits(tokens)
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        assert m.reused_tokens == {} and m.computed_tokens == len(tokens)
        monkeypatch.undo()
        await engine.scheduler.drain()
        _assert_idle(engine)
        logits, m = await engine.prompt_logits(tokens)
        assert m.reused_tokens == {"ddr": 6 * BLOCK}


async def test_disk_prefix_larger_than_ddr_is_still_answered(make_engine):
    """A prefix on disk larger than the free DDR is still reused in full (streamed up through DDR), not
    recomputed because it cannot all sit in DDR at once."""
    tokens = prompt(BLOCK * 8 + 3, seed=28)
    async with make_engine() as engine:
        reference = full_logits(engine.model, tokens)
        await run(engine, tokens, max_new_tokens=1)
    async with make_engine(ddr_bytes=3 * BLOCK_BYTES) as engine:  # 8 blocks on disk, room for 3 in DDR
        set_costs(engine, prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=FAST_LINK)  # loading all of it pays
        logits, m = await engine.prompt_logits(tokens)
        await engine.scheduler.drain()
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        assert m.matched_tokens == 8 * BLOCK and m.load_misses == 0
        assert m.reused_tokens.get("disk", 0) + m.reused_tokens.get("ddr", 0) == 8 * BLOCK
        assert m.computed_tokens == 3
        _assert_idle(engine)


async def test_both_plan_loads_the_back_while_the_front_is_recomputed(make_engine, monkeypatch):
    """A "both" plan overlaps: the disk read of the back is in flight while the front's prefill runs. The
    front's prefill waits (on the compute thread) until a disk read has started, and the disk read waits until
    the front's prefill has started; if either ran after the other, one of them would give up after
    ``GATE_S`` and the test fails."""
    tokens = prompt(BLOCK * 10 + 5, seed=36)
    async with make_engine() as engine:
        reference = full_logits(engine.model, tokens)
        await run(engine, tokens, max_new_tokens=1)  # write-through: the prefix reaches disk
    async with make_engine() as engine:  # restarted: the prefix is on disk only
        set_costs(engine, prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=SLOW_DISK)
        plan = cost_model(engine).plan(["disk"] * 10, BLOCK)
        assert plan.choice == "both" and 0 < plan.recompute_front < plan.load_end == 10
        front_tokens = plan.recompute_front * BLOCK

        model = engine.model
        store = engine.hierarchy.pool(Tier.DISK).store
        real_prefill, real_read = model.prefill, store.read_many
        front_running, read_running = threading.Event(), threading.Event()
        prefills: list[int] = []
        seen: dict[str, bool] = {}

        def prefill(ids, cache):
            prefills.append(ids.numel())
            if len(prefills) == 1:  # the front, on the compute thread
                front_running.set()
                seen["read during front"] = read_running.wait(GATE_S)
            return real_prefill(ids, cache)

        async def read_many(records, outs):
            read_running.set()
            seen.setdefault("front during read", await asyncio.to_thread(front_running.wait, GATE_S))
            return await real_read(records, outs)

        monkeypatch.setattr(model, "prefill", prefill)
        monkeypatch.setattr(store, "read_many", read_many)
        logits, m = await engine.prompt_logits(tokens)
        monkeypatch.undo()
        await engine.scheduler.drain()

        assert seen.get("front during read"), "the front's prefill did not start while the disk read ran"
        assert seen.get("read during front"), "no disk read started while the front's prefill ran"
        assert m.plan == "both" and m.load_misses == 0
        assert prefills[0] == front_tokens and sum(prefills) == m.computed_tokens == front_tokens + 5
        assert m.reused_tokens == {"disk": 10 * BLOCK - front_tokens}
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        _assert_idle(engine)


async def test_write_back_publishes_the_prompts_full_blocks(make_engine):
    tokens = prompt(BLOCK * 5 + 7, seed=29)
    async with make_engine(write_mode="write-back") as engine:
        await run(engine, tokens, max_new_tokens=3)
        nodes = engine.hierarchy.match(engine.keyer.request(tokens))
        assert len(nodes) == 5
        assert all(n.ready and Tier.DDR in n.payload.copies for n in nodes)
        assert engine.hierarchy.pool(Tier.DISK).store.stats()["published"] == 0  # write-back: only on demotion


async def test_write_through_reaches_disk(make_engine):
    tokens = prompt(BLOCK * 5 + 7, seed=30)
    async with make_engine(write_mode="write-through") as engine:
        await run(engine, tokens, max_new_tokens=1)
        assert engine.hierarchy.pool(Tier.DISK).store.stats()["published"] == 5
        nodes = engine.hierarchy.match(engine.keyer.request(tokens))
        assert all(set(n.payload.copies) == {Tier.DDR, Tier.DISK} for n in nodes)


async def test_selective_writes_down_on_the_second_use(make_engine):
    tokens = prompt(BLOCK * 5 + 7, seed=31)
    async with make_engine(write_mode="selective") as engine:
        store = engine.hierarchy.pool(Tier.DISK).store
        await run(engine, tokens, max_new_tokens=1)
        assert store.stats()["published"] == 0
        m = (await run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert m.reused_tokens == {"ddr": 5 * BLOCK}
        assert store.stats()["published"] == 5


async def test_write_back_demotes_to_disk_under_ddr_pressure(make_engine):
    # 8 blocks of DDR; transfers limited to 4 blocks in flight, so a write-back that must demote first
    # needs its budget twice over
    first, second = prompt(BLOCK * 4 + 3, seed=32), prompt(BLOCK * 6 + 3, seed=33)
    async with make_engine(write_mode="write-back", ddr_bytes=8 * BLOCK_BYTES, max_inflight_bytes=4 * BLOCK_BYTES) as e:
        reference = full_logits(e.model, first)
        await run(e, first, max_new_tokens=1)
        async with asyncio.timeout(30):
            await run(e, second, max_new_tokens=1)
        assert e.hierarchy.pool(Tier.DISK).store.stats()["published"] >= 2  # demoted, not dropped
        logits, m = await e.prompt_logits(first)
        await e.scheduler.drain()
        assert m.reused_tokens.get("disk", 0) > 0
        assert sum(m.reused_tokens.values()) == 4 * BLOCK
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        _assert_idle(e)


async def test_metrics_snapshot_and_prometheus(make_engine):
    a, b = prompt(BLOCK * 3 + 1, seed=34), prompt(BLOCK * 2 + 5, seed=35)
    async with make_engine() as engine:
        for p, session in ((a, "tab-a"), (a, "tab-a"), (b, "tab-b")):
            await run(engine, p, max_new_tokens=2, session_id=session)
        snap = engine.metrics_snapshot()
        pipe = snap["pipeline"]
        assert pipe["requests"] == 3
        assert pipe["ttft_ms_by_context"]["tab-a"]["count"] == 2
        assert pipe["ttft_ms_by_context"]["tab-b"]["count"] == 1
        assert 0 < pipe["ttft_ms"]["p50"] <= pipe["ttft_ms"]["p99"]
        assert pipe["plan_counts"] == {"recompute": 2, "load": 1}
        assert pipe["reused_tokens"] == {"ddr": 3 * BLOCK}
        assert pipe["totals"]["prompt_tokens"] == 2 * len(a) + len(b)
        assert pipe["totals"]["computed_tokens"] == 2 * len(a) + len(b) - 3 * BLOCK
        assert pipe["totals"]["output_tokens"] == 6
        assert snap["index"]["blocks"] == 5
        assert snap["tiers"]["ddr"]["live_blocks"] == 5
        assert snap["transfers"]["DDR->DISK"]["blocks"] == 5
        assert snap["cost_model"]["prefill_tflops"] > 0
        text = engine.metrics.prometheus_text().decode()
        assert "kvtier_ttft_seconds_count 3.0" in text
        assert 'kvtier_requests_total{plan="load"} 1.0' in text
        assert f'kvtier_reused_tokens_total{{tier="ddr"}} {float(3 * BLOCK)}' in text
        assert f"kvtier_computed_tokens_total {float(2 * len(a) + len(b) - 3 * BLOCK)}" in text
        assert engine.metrics.snapshot_json().startswith(b'{"requests":3')
