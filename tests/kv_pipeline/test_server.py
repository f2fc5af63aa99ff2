"""`kvtier serve --engine hf`: the OpenAI-compatible server over the transformers engine, through the real
``openai`` client against uvicorn on a free local port, on the session's tiny model on the CPU.

Background write-backs are drained (``engine.scheduler.drain()``) before a request that must find the blocks
of an earlier one, so what is cached never depends on timing.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from pipeline_helpers import BLOCK, prompt

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from kv_pipeline.server import Server, warm_up  # noqa: E402


def _client(server: Server) -> openai.AsyncOpenAI:
    # No retries: a 409 or a 5xx must reach the test as it was answered.
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def _reused(engine) -> int:
    return sum(engine.metrics_snapshot()["pipeline"]["reused_tokens"].values())


@pytest.fixture
async def served(make_engine):
    async with make_engine() as engine, Server(engine) as server:
        yield engine, server, _client(server)


async def test_chat_and_completions_streamed_and_not(served):
    _, server, client = served
    models = await client.models.list()
    assert [m.id for m in models.data] == [server.app.state.kvtier.model_name]

    messages = [{"role": "user", "content": "Tell me about tiered caches."}]
    chat = await client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = await client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content  # greedy: the same answer, streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        chat.choices[0].finish_reason
    ]

    ids = prompt(3 * BLOCK + 5, seed=1)
    done = await client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0, user="s1")
    assert done.object == "text_completion"
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens <= 4
    streamed = await client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0, stream=True)
    parts = [c async for c in streamed]
    assert "".join(c.choices[0].text for c in parts) == done.choices[0].text
    assert all(c.usage is None for c in parts)  # no usage chunk unless asked for


async def test_cached_tokens_are_the_engines_reused_tokens(served):
    engine, _, client = served
    ids = prompt(5 * BLOCK + 3, seed=2)
    first = await client.completions.create(model="m", prompt=ids, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    await engine.scheduler.drain()  # the first request's blocks are written back
    before = _reused(engine)
    again = await client.completions.create(
        model="m", prompt=ids, max_tokens=2, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usage = [c async for c in again][-1].usage
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached == _reused(engine) - before
    assert cached == 5 * BLOCK  # every full block; the last prompt token is always computed


async def test_shared_contexts_over_http(served):
    engine, server, client = served
    context = prompt(4 * BLOCK, seed=3)
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        made = await http.post("/shared_contexts", json={"id": "manual", "prompt": context, "ttl": 3600})
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["id"] == "manual" and body["tokens"] == len(context) and body["pinned"] is True
        assert body["expires"] is not None

        chat_ctx = [{"role": "system", "content": "You answer questions about the manual. " * 8}]
        made = await http.post("/shared_contexts", json={"id": "chat", "messages": chat_ctx, "pin": False})
        assert made.status_code == 201 and made.json()["pinned"] is False

        listed = (await http.get("/shared_contexts")).json()["data"]
        assert sorted(c["id"] for c in listed) == ["chat", "manual"]
        info = (await http.get("/shared_contexts/manual")).json()
        assert info["cached_blocks"] == 4 and info["blocks_by_tier"]["ddr"] == 4

        # a body that is not a context: no content, both contents, an unknown field, a bad ttl
        for bad in (
            {"id": "x"},
            {"id": "x", "prompt": "a", "messages": chat_ctx},
            {"id": "x", "prompt": context, "pinned": False},
            {"id": "x", "prompt": context, "ttl": -1},
        ):
            refused = await http.post("/shared_contexts", json=bad)
            assert refused.status_code == 400, bad
            assert set(refused.json()["error"]) == {"message", "type", "param", "code"}

    with pytest.raises(openai.ConflictError):
        await client.post("/shared_contexts", body={"id": "manual", "prompt": context}, cast_to=httpx.Response)
    replaced = await client.post(
        "/shared_contexts", body={"id": "manual", "prompt": context, "replace": True}, cast_to=httpx.Response
    )
    assert replaced.status_code == 201

    await engine.scheduler.drain()
    question = prompt(BLOCK + 3, seed=4)
    answer = await client.completions.create(
        model="m", prompt=question, max_tokens=3, temperature=0, extra_body={"shared_context_id": "manual"}
    )
    assert answer.usage.prompt_tokens == len(context) + len(question)
    assert answer.usage.prompt_tokens_details.cached_tokens == len(context)

    chat = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What does it say?"}],
        max_tokens=2,
        temperature=0,
        extra_body={"shared_context_id": "chat"},
    )
    chat_tokens = engine.get_shared_context("chat").num_tokens
    assert chat.usage.prompt_tokens > chat_tokens
    assert chat.usage.prompt_tokens_details.cached_tokens == chat_tokens // BLOCK * BLOCK

    deleted = await client.delete("/shared_contexts/manual", cast_to=httpx.Response)
    assert deleted.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        await client.get("/shared_contexts/manual", cast_to=httpx.Response)
    with pytest.raises(openai.NotFoundError):
        await client.delete("/shared_contexts/manual", cast_to=httpx.Response)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.completions.create(model="m", prompt="hi", extra_body={"shared_context_id": "manual"})
    assert missing.value.body["code"] == "shared_context_not_found"


async def test_concurrent_creates_of_one_id_store_it_once(served):
    engine, server, _ = served
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        answers = await asyncio.gather(
            *(http.post("/shared_contexts", json={"id": "twin", "prompt": prompt(2 * BLOCK, seed=s)}) for s in (8, 9))
        )
    assert sorted(a.status_code for a in answers) == [201, 409]
    assert [c.context_id for c in engine.list_shared_contexts()] == ["twin"]


async def test_refused_requests_are_openai_errors(served):
    _, _, client = served
    messages = [{"role": "user", "content": "hi"}]
    for kwargs in (
        {"max_tokens": 0},  # the engine's RequestError
        {"temperature": -1},
        {"n": 2},  # refused, not ignored
        {"max_tokens": 40_000},  # past the model's context length
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="m", messages=messages, **kwargs)
        assert refused.value.body["type"] == "invalid_request_error", kwargs
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="m", prompt=[-5, 3], stream=True)  # refused before the stream


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def test_metrics_count_the_requests(served):
    _, server, client = served
    ids = prompt(2 * BLOCK + 1, seed=5)
    for _ in range(3):
        await client.completions.create(model="m", prompt=ids, max_tokens=2, temperature=0)
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="m", prompt=ids, max_tokens=0)
    async with httpx.AsyncClient(base_url=server.url) as http:
        text = (await http.get("/metrics")).text
    route = "/v1/completions"
    assert _sample(text, "kvtier_http_requests_total", route=route, status="200") == 3
    assert _sample(text, "kvtier_http_requests_total", route=route, status="400") == 1
    assert _sample(text, "kvtier_requests_in_flight") == 0
    assert _sample(text, "kvtier_ttft_seconds_count") == 3  # the engine's histogram
    assert _sample(text, "kvtier_http_ttft_seconds_count") == 3
    assert _sample(text, "kvtier_tier_capacity_bytes", tier="ddr") == 32 << 20
    assert _sample(text, "kvtier_tier_bytes", tier="ddr") > 0
    for name in ("kvtier_tier_saves_total", "kvtier_tier_evictions_total", "kvtier_loads_total"):
        assert re.search(rf"^{name}", text, re.M), name
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names and all(n.startswith("kvtier_") for n in names)


async def test_a_restarted_server_finds_a_pinned_context(make_engine):
    context = prompt(6 * BLOCK, seed=6)
    async with make_engine() as engine, Server(engine) as server:
        made = await _client(server).post(
            "/shared_contexts", body={"id": "manual", "prompt": context}, cast_to=httpx.Response
        )
        assert made.status_code == 201
    async with make_engine() as engine, Server(engine) as server:
        info = engine.shared_context_info("manual")
        assert info["blocks_by_tier"] == {"disk": 6}  # found again on disk, nothing in DDR yet
        report = await warm_up(engine, progress=False)
        assert report.promoted == 6 and not report.timed_out
        assert engine.shared_context_info("manual")["blocks_by_tier"]["ddr"] == 6
        client = _client(server)
        listed = await client.get("/shared_contexts", cast_to=httpx.Response)
        assert [c["id"] for c in listed.json()["data"]] == ["manual"]
        question = prompt(BLOCK, seed=7)
        answer = await client.completions.create(
            model="m", prompt=question, max_tokens=2, temperature=0, extra_body={"shared_context_id": "manual"}
        )
        assert answer.usage.prompt_tokens_details.cached_tokens == len(context)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "m", "--session-len", "4096"], "--session-len: not an option of --engine hf"),
        (["serve", "m", "--engine", "lmdeploy", "--device", "cpu"], "--device: not an option of --engine lmdeploy"),
        (["serve", "m", "--warm-up-seconds", "0"], "--warm-up-seconds: must be a finite number > 0"),
    ],
)
def test_serve_flags_of_the_other_engine_are_usage_errors(argv, message, capsys):
    from kv_pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
