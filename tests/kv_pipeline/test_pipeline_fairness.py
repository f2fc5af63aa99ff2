"""Chunked prefill: a long prompt takes one compute turn per ``prefill_chunk_tokens`` chunk, so another
context's decode steps run between its chunks; the chunks give the logits of one whole prefill, cover the
prompt's computed tokens exactly, and each feeds the cost model.

The order of compute is read from the calls into the model (wrapped), never from timing."""

from __future__ import annotations

import asyncio
import itertools
import math

import pytest
import torch
from pipeline_helpers import BLOCK, GATE_S, full_logits, prompt, run, set_costs

from kv_pipeline.scheduler import DEFAULT_PREFILL_CHUNK, Request, Scheduler
from kv_runtime.config import ConfigError, KVTierConfig

ATOL = 1e-4
CHUNK = 2 * BLOCK
SLOW_PREFILL = 1e-3  # TFLOP/s: loading any cached prefix pays
FAST_LINK = (10.0, 0.0)
SLOW_DISK = (1e-3, 0.0)  # as slow as that prefill: recompute a front while the back loads


def _record_compute(model, monkeypatch) -> list[tuple[str, int]]:
    """Wrap the model's prefill and decode: each call appends ``("prefill", tokens)`` or ``("decode", 1)``."""
    calls: list[tuple[str, int]] = []
    real_prefill, real_decode = model.prefill, model.decode

    def prefill(ids, cache):
        calls.append(("prefill", ids.numel()))
        return real_prefill(ids, cache)

    def decode(token, cache):
        calls.append(("decode", 1))
        return real_decode(token, cache)

    monkeypatch.setattr(model, "prefill", prefill)
    monkeypatch.setattr(model, "decode", decode)
    return calls


def _record_observed(engine, monkeypatch) -> list[tuple[int, int]]:
    """The ``(start, end)`` of every prefill the cost model is told about."""
    cost = engine.cost
    observed: list[tuple[int, int]] = []
    real = cost.observe_prefill

    def observe_prefill(start, end, seconds):
        observed.append((start, end))
        return real(start, end, seconds)

    monkeypatch.setattr(cost, "observe_prefill", observe_prefill)
    return observed


async def _stream_then_long_prompt(engine, chunk: int, monkeypatch) -> tuple[list[tuple[str, int]], Request]:
    """A decode stream runs (context ``a``); once it has streamed two tokens a long prompt (context ``b``) arrives.
    Returns the compute calls from the long prompt's arrival on, and the long prompt's request."""
    engine.scheduler.prefill_chunk_tokens = chunk
    long_tokens = prompt(10 * CHUNK + 5, seed=41)
    streaming = Request(tokens=prompt(BLOCK + 3, seed=40), max_new_tokens=40, context="a")
    long_req = Request(tokens=long_tokens, max_new_tokens=1, context="b")
    calls = _record_compute(engine.model, monkeypatch)
    streamed = asyncio.Event()
    mark: list[int] = []

    async def stream() -> int:
        n = 0
        async for _ in engine.scheduler.generate(streaming):
            n += 1
            if n == 2:
                mark.append(len(calls))
                streamed.set()
        return n

    async def long_prompt() -> None:
        async for _ in engine.scheduler.generate(long_req):
            pass

    stream_task = asyncio.create_task(stream())
    await asyncio.wait_for(streamed.wait(), GATE_S)
    await asyncio.wait_for(long_prompt(), GATE_S)
    assert await asyncio.wait_for(stream_task, GATE_S) == streaming.max_new_tokens  # never stopped early
    await engine.scheduler.drain()
    return calls[mark[0] :], long_req


async def test_decode_steps_run_between_a_long_prompts_chunks(make_engine, monkeypatch):
    async with make_engine() as engine:
        calls, long_req = await _stream_then_long_prompt(engine, CHUNK, monkeypatch)
    n = len(long_req.tokens)
    chunks = [i for i, (kind, size) in enumerate(calls) if kind == "prefill"]
    sizes = [calls[i][1] for i in chunks]
    # every computed token once, in chunks of at most CHUNK tokens: the long prompt was new, so all of it
    assert long_req.metrics.computed_tokens == n == sum(sizes)
    assert (
        len(sizes) == math.ceil(n / CHUNK)
        and all(s <= CHUNK for s in sizes)
        and sizes[:-1] == [CHUNK] * (len(sizes) - 1)
    )
    # the other stream's decode steps ran between every two consecutive chunks
    for before, after in itertools.pairwise(chunks):
        assert any(kind == "decode" for kind, _ in calls[before + 1 : after]), calls


async def test_a_whole_prefill_holds_the_turn_for_the_whole_prompt(make_engine, monkeypatch):
    """The contrast: with a chunk past the prompt's length the long prompt is one call, one turn."""
    async with make_engine() as engine:
        calls, long_req = await _stream_then_long_prompt(engine, 1 << 20, monkeypatch)
    prefills = [size for kind, size in calls if kind == "prefill"]
    assert prefills == [len(long_req.tokens)]


async def test_chunked_prefill_gives_a_whole_prefills_logits(make_engine, monkeypatch):
    tokens = prompt(7 * BLOCK + 9, seed=42)
    async with make_engine() as engine:
        reference = full_logits(engine.model, tokens)
        engine.scheduler.prefill_chunk_tokens = 24  # not a multiple of the block: chunks straddle blocks
        observed = _record_observed(engine, monkeypatch)
        logits, m = await engine.prompt_logits(tokens)
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        assert m.computed_tokens == len(tokens)
        assert observed == [(lo, min(lo + 24, len(tokens))) for lo in range(0, len(tokens), 24)]
        await engine.scheduler.drain()

        # a cached prefix loaded, then the rest in chunks after it
        longer = tokens + prompt(3 * BLOCK + 7, seed=43)
        reference = full_logits(engine.model, longer)
        observed.clear()
        set_costs(engine, prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=FAST_LINK)
        logits, m = await engine.prompt_logits(longer)
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        loaded = sum(m.reused_tokens.values())
        assert m.plan == "load" and loaded == 7 * BLOCK
        assert observed == [(lo, min(lo + 24, len(longer))) for lo in range(loaded, len(longer), 24)]
        assert sum(end - start for start, end in observed) == m.computed_tokens


async def test_a_recomputed_front_is_chunked_too(make_engine, monkeypatch):
    """A "both" plan (front recomputed while the back loads from disk): the front and the rest are chunked, and
    the chunks tile exactly the tokens not loaded."""
    tokens = prompt(10 * BLOCK + 5, seed=44)
    async with make_engine() as engine:  # write-through: the prefix reaches disk
        reference = full_logits(engine.model, tokens)
        await run(engine, tokens, max_new_tokens=1)
    async with make_engine() as engine:  # restarted: the prefix is on disk only
        engine.scheduler.prefill_chunk_tokens = BLOCK
        set_costs(engine, prefill_tflops=SLOW_PREFILL, ddr=FAST_LINK, disk=SLOW_DISK)
        front = engine.cost.plan(["disk"] * 10, BLOCK).recompute_front
        assert 0 < front < 10
        observed = _record_observed(engine, monkeypatch)
        logits, m = await engine.prompt_logits(tokens)
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        assert m.plan == "both" and m.reused_tokens == {"disk": (10 - front) * BLOCK}
        expected = [(b * BLOCK, (b + 1) * BLOCK) for b in range(front)] + [(10 * BLOCK, len(tokens))]
        assert observed == expected
        assert sum(end - start for start, end in observed) == m.computed_tokens


def test_prefill_chunk_tokens_is_a_bounded_positive_count():
    assert KVTierConfig().prefill_chunk_tokens == DEFAULT_PREFILL_CHUNK == 512
    assert KVTierConfig(prefill_chunk_tokens=64).prefill_chunk_tokens == 64
    assert KVTierConfig.load(env={"KVTIER_PREFILL_CHUNK_TOKENS": "128"}).prefill_chunk_tokens == 128
    for bad, message in ((0, "must be > 0"), (True, "expected an integer"), (1 << 30, "must be <=")):
        with pytest.raises(ConfigError, match=f"prefill_chunk_tokens: {message}"):
            KVTierConfig(prefill_chunk_tokens=bad)


def test_scheduler_refuses_a_chunk_of_no_tokens():
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        Scheduler(None, None, prefill_chunk_tokens=0)  # type: ignore[arg-type]


async def test_the_configured_chunk_size_reaches_the_scheduler(make_engine):
    async with make_engine(prefill_chunk_tokens=48) as engine:
        assert engine.scheduler.prefill_chunk_tokens == 48
