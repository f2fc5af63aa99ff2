"""The scheduler through the engine: plans, cancellation, failed loads, write-back per migration policy, and
the metrics it reports."""

from __future__ import annotations

import asyncio

import torch
from pipeline_helpers import BLOCK, prompt

from kv_runtime import Tier

ATOL = 1e-4
BLOCK_BYTES = 98_304


def _full_logits(model, tokens: list[int]) -> torch.Tensor:
    return model.prefill(torch.tensor(tokens), model.new_cache())


async def _run(engine, prompt_, **kwargs):
    outs = [out async for out in engine.generate(prompt_, **kwargs)]
    await engine.scheduler.drain()
    return outs


def _assert_idle(engine, context_pins: int = 0) -> None:
    """No lease, byte or migration of a finished request is left behind."""
    assert engine.hierarchy.index.stats().pinned_blocks == context_pins
    assert engine.scheduler.loads.idle and engine.scheduler.saves.idle
    assert all(r.in_flight == 0 for t in engine.hierarchy.pools for r in engine.hierarchy.blocks_in(t))


async def test_plans_ddr_load_and_disk(make_engine):
    tokens = prompt(BLOCK * 10 + 5, seed=20)
    async with make_engine() as engine:
        first = (await _run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert (first.plan, first.matched_tokens, first.computed_tokens) == ("recompute", 0, len(tokens))
        m = (await _run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert m.plan == "load" and m.matched_tokens == 10 * BLOCK
        assert m.reused_tokens == {"ddr": 10 * BLOCK} and m.computed_tokens == 5 < len(tokens)
        assert m.load_ms > 0 and m.compute_ms > 0 and m.ttft_ms >= m.queue_ms
    async with make_engine() as engine:  # the prefix is on disk only: the cost model chooses
        m = (await _run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert m.plan in ("load", "both", "recompute")
        assert m.matched_tokens == 10 * BLOCK
        assert m.reused_tokens.get("disk", 0) + m.computed_tokens == len(tokens)
        if m.plan == "recompute":
            assert m.reused_tokens == {}
        else:
            assert m.reused_tokens["disk"] > 0
        assert engine.metrics_snapshot()["pipeline"]["plan_counts"] == {m.plan: 1}


async def test_a_prompt_within_one_block_always_computes_its_last_token(make_engine):
    tokens = prompt(BLOCK * 2, seed=21)  # exactly two blocks: the second holds the last token
    async with make_engine() as engine:
        await _run(engine, tokens, max_new_tokens=1)
        logits, m = await engine.prompt_logits(tokens)
        assert m.reused_tokens == {"ddr": BLOCK} and m.computed_tokens == BLOCK
        torch.testing.assert_close(logits, _full_logits(engine.model, tokens), atol=ATOL, rtol=0)


async def test_closing_the_stream_mid_generation_releases_everything(make_engine):
    tokens = prompt(BLOCK * 6 + 3, seed=22)
    async with make_engine() as engine:
        await engine.save_shared_context("ctx", prompt(BLOCK * 2, seed=23))
        await _run(engine, tokens, max_new_tokens=1)
        stream = engine.generate(tokens, max_new_tokens=50)
        got = [await anext(stream), await anext(stream)]
        assert engine.hierarchy.index.stats().pinned_blocks == 2 + 6  # the request's lease is held
        await stream.aclose()
        await engine.scheduler.drain()
        _assert_idle(engine, context_pins=2)
        outs = await _run(engine, tokens, max_new_tokens=2)
        assert [o.token_id for o in outs] == [o.token_id for o in got]
        _assert_idle(engine, context_pins=2)


async def test_cancelling_requests_keeps_the_engine_serving(make_engine):
    tokens = prompt(BLOCK * 8 + 3, seed=24)
    async with make_engine() as engine:
        await _run(engine, tokens, max_new_tokens=1)

        async def consume(p):
            return [out async for out in engine.generate(p, max_new_tokens=40)]

        # cancel one while it waits for its turn behind another, one during its prefill, one while decoding
        tasks = [asyncio.create_task(consume(prompt(BLOCK * 8 + 3, seed=s))) for s in (24, 25, 26)]
        await asyncio.sleep(0)
        tasks[2].cancel()
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        await asyncio.sleep(0.05)
        tasks[0].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, (asyncio.CancelledError, list)) for r in results)
        await engine.scheduler.drain()
        _assert_idle(engine)
        logits, m = await engine.prompt_logits(tokens)
        assert m.reused_tokens == {"ddr": 8 * BLOCK}
        torch.testing.assert_close(logits, _full_logits(engine.model, tokens), atol=ATOL, rtol=0)
        _assert_idle(engine)


async def test_failed_load_falls_back_to_recompute(make_engine, monkeypatch):
    tokens = prompt(BLOCK * 6 + 3, seed=27)
    async with make_engine() as engine:
        reference = _full_logits(engine.model, tokens)
        await _run(engine, tokens, max_new_tokens=1)

        async def broken(*args, **kwargs):
            raise OSError("device went away")

        monkeypatch.setattr(engine.scheduler, "_from_ddr", broken)
        logits, m = await engine.prompt_logits(tokens)
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        assert m.reused_tokens == {} and m.computed_tokens == len(tokens)
        monkeypatch.undo()
        await engine.scheduler.drain()
        _assert_idle(engine)
        logits, m = await engine.prompt_logits(tokens)
        assert m.reused_tokens == {"ddr": 6 * BLOCK}


async def test_disk_prefix_larger_than_ddr_is_still_answered(make_engine):
    tokens = prompt(BLOCK * 8 + 3, seed=28)
    async with make_engine() as engine:
        reference = _full_logits(engine.model, tokens)
        await _run(engine, tokens, max_new_tokens=1)
    async with make_engine(ddr_bytes=3 * BLOCK_BYTES) as engine:  # 8 blocks on disk, room for 3 in DDR
        logits, m = await engine.prompt_logits(tokens)
        await engine.scheduler.drain()
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        assert sum(m.reused_tokens.values()) + m.computed_tokens == len(tokens)
        _assert_idle(engine)


async def test_write_back_publishes_the_prompts_full_blocks(make_engine):
    tokens = prompt(BLOCK * 5 + 7, seed=29)
    async with make_engine(write_mode="write-back") as engine:
        await _run(engine, tokens, max_new_tokens=3)
        nodes = engine.hierarchy.match(engine.keyer.request(tokens))
        assert len(nodes) == 5
        assert all(n.ready and Tier.DDR in n.payload.copies for n in nodes)
        assert engine.hierarchy.pool(Tier.DISK).store.stats()["published"] == 0  # write-back: only on demotion


async def test_write_through_reaches_disk(make_engine):
    tokens = prompt(BLOCK * 5 + 7, seed=30)
    async with make_engine(write_mode="write-through") as engine:
        await _run(engine, tokens, max_new_tokens=1)
        assert engine.hierarchy.pool(Tier.DISK).store.stats()["published"] == 5
        nodes = engine.hierarchy.match(engine.keyer.request(tokens))
        assert all(set(n.payload.copies) == {Tier.DDR, Tier.DISK} for n in nodes)


async def test_selective_writes_down_on_the_second_use(make_engine):
    tokens = prompt(BLOCK * 5 + 7, seed=31)
    async with make_engine(write_mode="selective") as engine:
        store = engine.hierarchy.pool(Tier.DISK).store
        await _run(engine, tokens, max_new_tokens=1)
        assert store.stats()["published"] == 0
        m = (await _run(engine, tokens, max_new_tokens=1))[-1].metrics
        assert m.reused_tokens == {"ddr": 5 * BLOCK}
        assert store.stats()["published"] == 5


async def test_write_back_demotes_to_disk_under_ddr_pressure(make_engine):
    # 8 blocks of DDR; transfers limited to 4 blocks in flight, so a write-back that must demote first
    # needs its budget twice over
    first, second = prompt(BLOCK * 4 + 3, seed=32), prompt(BLOCK * 6 + 3, seed=33)
    async with make_engine(write_mode="write-back", ddr_bytes=8 * BLOCK_BYTES, max_inflight_bytes=4 * BLOCK_BYTES) as e:
        reference = _full_logits(e.model, first)
        await _run(e, first, max_new_tokens=1)
        async with asyncio.timeout(30):
            await _run(e, second, max_new_tokens=1)
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
            await _run(engine, p, max_new_tokens=2, session_id=session)
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
