"""What the API accepts: bad requests refused with RequestError before anything runs (a property test throws
random requests at a started engine), prompt + max_new_tokens bounded by the model's context length, and
per-session state bounded however many sessions come and go."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_helpers import BLOCK, assert_released, prompt, run

from kv_pipeline import ContextStoreError, KVTierEngine, RequestError, UnknownContextError
from kv_pipeline.metrics import MAX_CONTEXTS, PipelineMetrics
from kv_pipeline.scheduler import RequestMetrics

VOCAB = 8192  # qwen2-tiny
SHORT_CONTEXT = 64  # positions of the short-context model below


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kv_benchmarks.models import build_model_dir

    return build_model_dir(
        tmp_path_factory.mktemp("kvp-short"), "qwen2-tiny", peaked=True, max_position_embeddings=SHORT_CONTEXT
    )


async def test_bad_inputs_are_refused_with_clear_messages(make_engine):
    async with make_engine() as engine:
        cases = [
            ({"prompt": None}, "prompt must be text"),
            ({"prompt": 42}, "prompt must be text"),
            ({"prompt": b"abc"}, "prompt is bytes"),
            ({"prompt": bytearray(b"ab")}, "prompt is bytearray"),
            ({"prompt": ""}, "prompt is empty"),
            ({"prompt": []}, "prompt is an empty list"),
            ({"prompt": ["1", "2"]}, r"prompt\[0\] is str"),
            ({"prompt": [1.0, 2.0]}, r"prompt\[0\] is float"),
            ({"prompt": [5, True]}, r"prompt\[1\] is bool"),
            ({"prompt": [-1]}, "outside the model's vocabulary"),
            ({"prompt": [VOCAB]}, r"token id 8192, outside the model's vocabulary \[0, 8192\)"),
            ({"prompt": [2**40]}, "outside the model's vocabulary"),
            ({"prompt": np.zeros((2, 2), dtype=np.int64)}, "1-D integer array"),
            ({"prompt": np.array([1.5])}, "1-D integer array"),
            ({"prompt": [{"role": "user"}]}, r"\['content'\] must be str"),
            ({"prompt": [{"content": "hi"}]}, r"\['role'\] must be a non-empty str"),
            ({"prompt": "a\ud800b"}, "lone surrogate"),
            ({"max_new_tokens": "5"}, "max_new_tokens must be an integer"),
            ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer"),
            ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
            ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
            ({"max_new_tokens": 10**9}, "exceed the model's context length of 32768"),
            ({"temperature": float("nan")}, "temperature must be finite"),
            ({"ignore_eos": 1}, "ignore_eos must be True or False"),
            ({"temperature": float("inf")}, "temperature must be finite"),
            ({"temperature": -0.5}, "temperature must be finite and >= 0"),
            ({"temperature": "0.7"}, "temperature must be a real number"),
            ({"seed": 2**64}, r"seed must lie in \[0, 2\*\*64\)"),
            ({"seed": -1}, "seed must lie"),
            ({"seed": 1.5}, "seed must be an integer"),
            ({"session_id": 7}, "session_id must be str"),
            ({"session_id": None}, "session_id must be str"),
            ({"session_id": ""}, "session_id must be a non-empty str"),
            ({"shared_context_id": 3}, "context_id must be str"),
        ]
        for overrides, message in cases:
            kwargs = {"prompt": [5, 6, 7], "max_new_tokens": 2, **overrides}
            with pytest.raises(RequestError, match=message):
                await run(engine, kwargs.pop("prompt"), **kwargs)
        for bad in (None, [VOCAB], "", b"x"):
            with pytest.raises(RequestError):
                await engine.prefill(bad)
            with pytest.raises(RequestError):
                await engine.prompt_logits(bad)
        with pytest.raises(RequestError, match="session_id"):
            await engine.prefill([1, 2], session_id=3)
        with pytest.raises(UnknownContextError):
            await run(engine, [5, 6], shared_context_id="nobody")
        # nothing of a refused request ran: no request counted, no block cached, nothing held
        assert engine.metrics_snapshot()["pipeline"]["requests"] == 0
        assert engine.hierarchy.index.stats().blocks == 0
        assert_released(engine)

        # what is accepted: tuples, NumPy and torch integer ids, chat messages, tiny positive temperatures
        for good in ((5, 6, 7), np.array([5, 6, 7], dtype=np.int32), torch.tensor([5, 6, 7]), [np.int64(5), 6]):
            assert len(await run(engine, good, max_new_tokens=2)) == 2
        outs = await run(engine, [{"role": "user", "content": "hello"}], max_new_tokens=2)
        assert len(outs) == 2
        for temperature in (1e-300, 5e-324, 1e300, 1):
            outs = await run(engine, [5, 6, 7], max_new_tokens=3, temperature=temperature, seed=2**64 - 1)
            assert all(0 <= o.token_id < VOCAB for o in outs)


async def test_ignore_eos_generates_past_the_end_token(make_engine):
    """The end token stops a stream, unless ``ignore_eos``: then it runs to ``max_new_tokens``."""
    async with make_engine() as engine:
        prompt = list(range(10, 80))
        (first,) = [o.token_id async for o in engine.generate(prompt, max_new_tokens=1)]
        engine.model.tokenizer.eos_token_id = first  # the greedy first token now ends the answer
        stopped = [o async for o in engine.generate(prompt, max_new_tokens=6)]
        forced = [o async for o in engine.generate(prompt, max_new_tokens=6, ignore_eos=True)]
    assert [o.token_id for o in stopped] == [first]
    assert len(forced) == 6 and forced[0].token_id == first and forced[-1].metrics.output_tokens == 6


async def test_prompt_plus_max_new_tokens_is_bounded_by_the_context_length(short_model_dir, tmp_path):
    engine = KVTierEngine.from_pretrained(
        short_model_dir, cache_dir=tmp_path / "c", ddr_bytes="8MiB", disk_bytes=0, block_size=BLOCK, device="cpu"
    )
    async with engine:
        tokens = prompt(40, seed=70)
        with pytest.raises(RequestError, match=r"40 prompt tokens \+ max_new_tokens=25 exceed .* 64 tokens"):
            await run(engine, tokens, max_new_tokens=SHORT_CONTEXT - 40 + 1)
        with pytest.raises(RequestError, match="context length"):
            await engine.prefill(prompt(SHORT_CONTEXT, seed=71))  # no room for the one new token
        assert engine.metrics_snapshot()["pipeline"]["requests"] == 0
        outs = await run(engine, tokens, max_new_tokens=SHORT_CONTEXT - 40)  # exactly the context length
        assert 1 <= len(outs) <= SHORT_CONTEXT - 40 and outs[-1].finished
        # a shared context's tokens count too
        await engine.save_shared_context("ctx", prompt(32, seed=72))
        with pytest.raises(RequestError, match="48 prompt tokens"):
            await run(engine, prompt(16, seed=73), shared_context_id="ctx", max_new_tokens=17)
        assert len(await run(engine, prompt(16, seed=73), shared_context_id="ctx", max_new_tokens=2)) >= 1
        with pytest.raises(RequestError, match="context length"):
            await engine.save_shared_context("long", prompt(SHORT_CONTEXT, seed=74))
        assert engine.hierarchy.index.stats().pinned_blocks == 2


def test_per_session_records_are_bounded_and_aggregates_exact():
    metrics = PipelineMetrics()
    sessions = 3000
    for i in range(sessions):
        metrics.record(RequestMetrics(prompt_tokens=10, ttft_ms=float(i), plan="recompute"), f"s{i}")
    snap = metrics.snapshot()
    by_context = snap["ttft_ms_by_context"]
    assert len(by_context) == MAX_CONTEXTS == 256
    assert set(by_context) == {f"s{i}" for i in range(sessions - MAX_CONTEXTS, sessions)}  # the most recent
    assert snap["contexts_dropped"] == sessions - MAX_CONTEXTS
    assert snap["requests"] == sessions and snap["totals"]["prompt_tokens"] == 10 * sessions
    assert snap["ttft_ms"]["count"] == sessions and snap["plan_counts"] == {"recompute": sessions}
    size = len(orjson.dumps(snap))
    for i in range(sessions, 2 * sessions):
        metrics.record(RequestMetrics(ttft_ms=1.0), f"s{i}")
    assert len(orjson.dumps(metrics.snapshot())) <= size * 1.1  # flat, not growing with the sessions seen
    assert len(metrics._ttft_by_context) == MAX_CONTEXTS
    # recording a kept session again makes it the most recent: it is not the next one dropped
    oldest = next(iter(metrics.snapshot()["ttft_ms_by_context"]))
    metrics.record(RequestMetrics(ttft_ms=2.0), oldest)
    metrics.record(RequestMetrics(ttft_ms=2.0), "newcomer")
    kept = metrics.snapshot()["ttft_ms_by_context"]
    assert oldest in kept and kept[oldest]["count"] == 2 and "newcomer" in kept


async def test_many_sessions_leave_no_per_session_state_in_the_engine(make_engine):
    engine = make_engine(disk_bytes=0)
    engine.metrics = PipelineMetrics(max_contexts=16)  # the engine's records, with a bound small enough to pass
    async with engine:
        sessions = 40
        for start in range(0, sessions, 20):
            await asyncio.gather(
                *(
                    run(engine, [5, 6, i % 100 + 2], max_new_tokens=1, session_id=f"user-{i}")
                    for i in range(start, start + 20)
                )
            )
        snap = engine.metrics_snapshot()["pipeline"]
        assert snap["requests"] == sessions and snap["ttft_ms"]["count"] == sessions
        kept = set(snap["ttft_ms_by_context"])  # the 16 recorded last: all of the second round (any 16 of them)
        assert len(kept) == 16 and kept <= {f"user-{i}" for i in range(20, sessions)}
        assert snap["contexts_dropped"] == sessions - 16
        assert engine.scheduler.turn._waiting == {} and not engine.scheduler.turn._busy
        assert_released(engine)


# ---------------------------------------------------------------------------------------------- property


_ids = st.lists(st.integers(-3, VOCAB + 3), max_size=40)
_prompts = st.one_of(
    st.text(max_size=40),
    _ids,
    _ids.map(tuple),
    st.lists(st.integers(2, VOCAB - 1), min_size=BLOCK, max_size=3 * BLOCK),  # often valid context contents
    st.lists(
        st.one_of(
            st.integers(0, VOCAB - 1), st.booleans(), st.floats(), st.text(max_size=2), st.binary(max_size=2), st.none()
        ),
        max_size=6,
    ),
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "", 3]), "content": st.one_of(st.text(max_size=20), st.none())}
        ),
        max_size=3,
    ),
    st.binary(max_size=8),
    st.none(),
    st.floats(),
    st.integers(),
    _ids.map(lambda ids: np.array(ids, dtype=np.int64)),
)
_ints = st.one_of(st.integers(-2, 4), st.just(10**9), st.booleans(), st.floats(), st.text(max_size=2), st.none())
_reals = st.one_of(st.floats(), st.integers(-2, 3), st.booleans(), st.text(max_size=3), st.none())
_seeds = st.one_of(st.none(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=2))
_names = st.one_of(st.sampled_from(["default", "s1", "ctx", ""]), st.text(max_size=4), st.integers(), st.none())
_calls = st.one_of(
    st.fixed_dictionaries(
        {
            "method": st.just("generate"),
            "prompt": _prompts,
            "max_new_tokens": _ints,
            "temperature": _reals,
            "seed": _seeds,
            "session_id": _names,
            "shared_context_id": st.one_of(st.none(), _names),
        }
    ),
    st.fixed_dictionaries(
        {"method": st.sampled_from(["prefill", "prompt_logits"]), "prompt": _prompts, "session_id": _names}
    ),
    st.fixed_dictionaries(
        {
            "method": st.just("save_shared_context"),
            "context_id": _names,
            "content": _prompts,
            "pin": st.one_of(st.booleans(), st.integers(0, 1), st.none()),
            "ttl": st.one_of(st.none(), _reals),
        }
    ),
    st.fixed_dictionaries(
        {
            "method": st.sampled_from(["drop_shared_context", "shared_context_info", "get_shared_context"]),
            "context_id": _names,
        }
    ),
)


async def _call(engine: KVTierEngine, call: dict) -> None:
    """One request; asserts what a result must be. Only the documented errors may escape."""
    call = dict(call)
    method = call.pop("method")
    if method == "generate":
        outs = await run(engine, call.pop("prompt"), **call)
        assert 1 <= len(outs) <= call["max_new_tokens"] and outs[-1].finished and outs[-1].metrics is not None
        assert all(0 <= o.token_id < VOCAB for o in outs)
    elif method == "prefill":
        assert (await engine.prefill(**call)).prompt_tokens >= 1
    elif method == "prompt_logits":
        logits, _ = await engine.prompt_logits(**call)
        assert logits.shape[-1] >= VOCAB and bool(torch.isfinite(logits).all())
    elif method == "save_shared_context":
        ctx = await engine.save_shared_context(call.pop("context_id"), call.pop("content"), **call)
        got = engine.get_shared_context(ctx.context_id)
        assert ctx.num_tokens >= BLOCK and (got == ctx or ctx.expired())  # (a tiny ttl may be over already)
    elif method == "drop_shared_context":
        assert isinstance(await engine.drop_shared_context(**call), bool)
    else:
        getattr(engine, method)(**call)


def _context_pins(engine: KVTierEngine) -> int:
    """Distinct blocks the live pinned contexts hold (contexts may share a prefix)."""
    nodes = set()
    for ctx in engine.list_shared_contexts():
        if ctx.pinned:
            nodes.update(id(n) for n in engine.hierarchy.match(engine.keyer.request(list(ctx.tokens))))
    return len(nodes)


def test_random_requests_get_a_result_or_a_documented_error(make_engine):
    loop = asyncio.new_event_loop()
    engine = make_engine()
    loop.run_until_complete(engine.start())
    outcomes: dict[str, int] = {}
    try:
        loop.run_until_complete(engine.save_shared_context("ctx", prompt(BLOCK * 2, seed=80)))

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(call=_calls)
        def one(call: dict) -> None:
            try:
                loop.run_until_complete(_call(engine, call))
                outcome = "result"
            except (RequestError, ContextStoreError) as e:
                assert str(e)  # a message, always
                outcome = type(e).__name__
            loop.run_until_complete(engine.scheduler.drain())
            # whatever happened, nothing is held beyond the live contexts' pins
            assert_released(engine, _context_pins(engine))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        one()
    finally:
        loop.run_until_complete(engine.close())
        loop.close()
    assert outcomes.get("RequestError", 0) > 0  # the strategies do reach the refusals
