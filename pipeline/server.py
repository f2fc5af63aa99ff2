"""An OpenAI-compatible HTTP server over :class:`~kv_pipeline.engine.KVTierEngine` (FastAPI + uvicorn).

    async with KVTierEngine.from_pretrained("path/to/model", cache_dir="cache") as engine:
        async with Server(engine, "127.0.0.1", 0) as server:     # uvicorn on the running loop
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x")
            ...

Routes (``build_app``):

- ``POST /v1/chat/completions``, ``POST /v1/completions``: streamed (server-sent events, ``data: {...}`` chunks
  then ``data: [DONE]``) or not. Parameters: ``max_tokens`` (``max_completion_tokens`` for chat), ``temperature``
  (OpenAI's default of 1.0; 0 is greedy), ``seed``, ``stream``, ``stream_options.include_usage``, ``user`` (the
  engine's session id) and kvtier's ``shared_context_id``. The ``model`` field is accepted whatever it names:
  the server has one model. Other OpenAI sampling fields (``top_p``, penalties) are ignored; ``n`` > 1,
  ``stop``, ``echo``, ``logprobs`` and ``best_of`` > 1 are refused (400) rather than ignored.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text, every name prefixed ``kvtier_``).
- ``POST /v1/shared_contexts`` (201), ``GET /v1/shared_contexts``, ``GET`` and ``DELETE
  /v1/shared_contexts/{id}``: named prefixes computed and stored once (``KVTierEngine.save_shared_context``).

**Usage.** Every response reports ``usage.prompt_tokens`` (the shared context's tokens included),
``completion_tokens``, ``total_tokens`` and ``usage.prompt_tokens_details.cached_tokens``: the prompt tokens
restored from kvtier's tiers instead of prefilled (the sum of the request's ``RequestMetrics.reused_tokens``).
A streamed response carries it in a last chunk (``choices: []``) when ``stream_options.include_usage`` is set.

**Shared contexts and prompts.** A request naming ``shared_context_id`` sends only what follows the context:
the engine runs the context's token ids followed by the encoding of the request's own prompt. For chat that
encoding is the model's chat template applied to the request's messages alone, with the generation prompt
(the assistant's header) at its end; a context saved from ``messages`` is the template applied to those
messages without a generation prompt. Nothing is inserted between the two.

**Errors** have OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: a refused request
(``RequestError``, a malformed body) is 400; an unknown shared context (``UnknownContextError``) 404; a
shared-context id that exists already 409 (unless ``"replace": true``); a context the cache cannot keep
(``ContextStoreError``: it does not fit, or its disk copy could not be written) 507 Insufficient Storage,
which a client should not retry unchanged; anything else 500 (logged with its traceback). An error after a
stream has started is sent as one ``data: {"error": ...}`` event before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from kv_pipeline.engine import GenerationOutput, KVTierEngine
from kv_pipeline.requests import ContextStoreError, RequestError, UnknownContextError

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256  # chat has no OpenAI default but "as many as fit"; a bounded one is safer
CONTEXT_STORE_STATUS = 507
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---------------------------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do: clients send fields this server has no use for.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    shared_context_id: str | None = None
    ignore_eos: bool = False  # generate max_tokens whatever the model says (as vLLM's and LMDeploy's servers)
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.stop:
            raise ValueError("stop: stop sequences are not supported")
        if self.logprobs:
            raise ValueError("logprobs: not supported")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionBody:
        if self.echo:
            raise ValueError("echo: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("prompt: one prompt per request (a list of several is not supported)")
            self.prompt = p[0]
        return self


class SharedContextBody(_Body):
    model_config = ConfigDict(extra="forbid")  # a typo in "pin" or "ttl" must not silently mean the default

    id: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    pin: bool = True
    ttl: float | None = None
    replace: bool = False

    @model_validator(mode="after")
    def _one_content(self) -> SharedContextBody:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' and 'prompt'")
        return self


# ---------------------------------------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _as_openai_error(e: BaseException) -> OpenAIError:
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, UnknownContextError):
        return OpenAIError(404, str(e), "not_found_error", "shared_context_not_found", "shared_context_id")
    if isinstance(e, RequestError):
        return OpenAIError(400, str(e), "invalid_request_error")
    if isinstance(e, ContextStoreError):
        return OpenAIError(CONTEXT_STORE_STATUS, str(e), "insufficient_storage", "context_store_error")
    log.error("kvtier: request failed", exc_info=e)
    return OpenAIError(500, f"internal error: {type(e).__name__}", "server_error")


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


# ---------------------------------------------------------------------------------------------- metrics


class _TierCollector:
    """The tiers' state read at scrape time from the engine's own statistics (nothing kept twice)."""

    def __init__(self, engine: KVTierEngine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        engine = self.engine
        if not engine._started:
            return
        from kv_runtime.events import EventKind
        from kv_runtime.tier import Tier

        capacity = GaugeMetricFamily("kvtier_tier_capacity_bytes", "Tier capacity", labels=["tier"])
        live = GaugeMetricFamily("kvtier_tier_bytes", "Bytes of KV blocks held per tier", labels=["tier"])
        blocks = GaugeMetricFamily("kvtier_tier_blocks", "KV blocks held per tier", labels=["tier"])
        for tier, pool in engine.hierarchy.pools.items():
            s = pool.stats()
            name = tier.name.lower()
            capacity.add_metric([name], s.capacity_bytes)
            live.add_metric([name], s.live_bytes)
            blocks.add_metric([name], s.live_blocks)
        yield from (capacity, live, blocks)

        counts = engine.hierarchy.events.counts
        for kind, metric, doc in (
            (EventKind.STORED, "kvtier_tier_saves", "Block copies stored per tier (saves, promotions, write-downs)"),
            (EventKind.EVICTED, "kvtier_tier_evictions", "Block copies evicted per tier to make room"),
            (EventKind.MISS, "kvtier_tier_misses", "Block copies found unreadable per tier and discarded"),
        ):
            family = CounterMetricFamily(metric, doc, labels=["tier"])
            for tier in engine.hierarchy.pools:
                family.add_metric([tier.name.lower()], counts.get((kind, int(tier)), 0))
            yield family

        moved = CounterMetricFamily("kvtier_transfer_blocks", "Blocks moved between tiers", labels=["direction"])
        nbytes = CounterMetricFamily("kvtier_transfer_bytes", "Bytes moved between tiers", labels=["direction"])
        for direction, s in engine.migrator.direction_stats().items():
            d = direction.lower()
            moved.add_metric([d], s["blocks"])
            nbytes.add_metric([d], s["bytes"])
        yield from (moved, nbytes)

        loads = CounterMetricFamily("kvtier_loads", "Blocks loaded (promoted) from disk into DDR")
        up = engine.migrator.direction_stats().get(f"{Tier.DISK.name}->{Tier.DDR.name}", {})
        loads.add_metric([], up.get("blocks", 0))
        yield loads
        contexts = GaugeMetricFamily("kvtier_shared_contexts", "Live named shared contexts")
        contexts.add_metric([], len(engine.list_shared_contexts()))
        yield contexts


class ServerMetrics:
    """The server's own collectors (HTTP requests, requests in flight, time to first token as the client sees
    it) and the tiers' state, in a registry of their own; ``/metrics`` serves it after the engine's."""

    def __init__(self, engine: KVTierEngine) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "kvtier_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.in_flight = Gauge(
            "kvtier_requests_in_flight", "Completion requests running or queued (queue depth)", registry=self.registry
        )
        self.http_ttft = Histogram(
            "kvtier_http_ttft_seconds",
            "Time from a completion request's arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_TierCollector(engine))


class _CountRequests:
    """ASGI middleware counting every HTTP answer by method, route template and status."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]  # an exception that escapes the app is answered 500 by Starlette's outer handler

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(scope["method"], route, str(status[0])).inc()


# ---------------------------------------------------------------------------------------------- text


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of chat messages through the model's chat template (the same fallback format as the engine's
    ``encode`` where the tokenizer has none), with the assistant's header at the end if asked."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    else:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Detokenizer:
    """Incremental decoding: text is emitted only once it no longer ends in an incomplete character, and
    decoding looks back a few tokens only (tokenizers merge spaces and bytes across token boundaries)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- the app


@dataclass(slots=True)
class _Job:
    """One completion request as the engine runs it."""

    kind: Literal["chat", "text"]
    prompt: list[int] | str
    max_tokens: int
    body: _Sampling
    id: str
    created: int


def _usage(metrics: Any) -> dict[str, Any]:
    prompt = metrics.prompt_tokens
    completion = metrics.output_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(sum(metrics.reused_tokens.values()))},
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


class _App:
    """The routes' state: the engine, the served model's name, metrics, one lock for creating contexts."""

    def __init__(self, engine: KVTierEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = ServerMetrics(engine)
        # NOTE: one lock for every create, so "does the id exist" and the save that follows are one step; saves
        # are rare and the engine serializes saves of one id anyway.
        self.create_lock = asyncio.Lock()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def _finish_reason(self, metrics: Any, last_token: int | None, max_tokens: int) -> str:
        stop = self.tokenizer.eos_token_id
        if last_token is not None and last_token == stop:
            return "stop"
        return "length" if metrics.output_tokens >= max_tokens else "stop"

    # ------------------------------------------------------------------ completions

    def chat_job(self, body: ChatCompletionBody) -> _Job:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = chat_prompt_ids(self.tokenizer, messages, add_generation_prompt=True)
        except Exception as e:  # a template that refuses these messages (roles out of order, ...)
            raise OpenAIError(400, f"messages: the chat template refused them: {e}", "invalid_request_error") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = max_tokens if max_tokens is not None else DEFAULT_CHAT_MAX_TOKENS
        return self._job("chat", prompt, max_tokens, body, "chatcmpl")

    def text_job(self, body: CompletionBody) -> _Job:
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        return self._job("text", body.prompt, max_tokens, body, "cmpl")

    @staticmethod
    def _job(kind: Any, prompt: Any, max_tokens: int, body: _Sampling, prefix: str) -> _Job:
        return _Job(kind, prompt, max_tokens, body, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    async def _start(self, job: _Job) -> tuple[AsyncIterator[GenerationOutput], GenerationOutput]:
        """The engine's stream and its first token: every refusal (``RequestError``, an unknown context) comes
        out of the first step, before a response has started."""
        body = job.body
        stream = self.engine.generate(
            job.prompt,
            max_new_tokens=job.max_tokens,
            shared_context_id=body.shared_context_id,
            session_id=body.user if body.user is not None else "default",
            temperature=body.temperature,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    async def complete(self, job: _Job) -> JSONResponse:
        arrived = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            stream, out = await self._start(job)
            self.metrics.http_ttft.observe(time.perf_counter() - arrived)
            async with contextlib.aclosing(stream):
                detok = _Detokenizer(self.tokenizer)
                detok.add(out.token_id)
                async for out in stream:
                    detok.add(out.token_id)
        finally:
            self.metrics.in_flight.dec()
        metrics = out.metrics
        finish = self._finish_reason(metrics, out.token_id, job.max_tokens)
        text = detok.text()
        if job.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return JSONResponse(
            {
                "id": job.id,
                "object": obj,
                "created": job.created,
                "model": self.model_name,
                "choices": [choice],
                "usage": _usage(metrics),
            }
        )

    async def complete_streamed(self, job: _Job) -> StreamingResponse:
        arrived = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            stream, first = await self._start(job)
        except BaseException:
            self.metrics.in_flight.dec()
            raise
        self.metrics.http_ttft.observe(time.perf_counter() - arrived)
        return StreamingResponse(self._events(job, stream, first), media_type="text/event-stream", headers=_SSE_HEADERS)

    def _chunk(self, job: _Job, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        chunk: dict[str, Any] = {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": self.model_name,
            "choices": [choice] if choice is not None else [],
        }
        if usage is not None:
            chunk["usage"] = usage
        return _sse(chunk)

    def _delta(self, job: _Job, text: str, finish: str | None, *, first: bool = False) -> bytes:
        if job.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish is not None and not text:
                delta = {}
            return self._chunk(job, {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})
        return self._chunk(job, {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})

    async def _events(self, job: _Job, stream: AsyncIterator[GenerationOutput], out: GenerationOutput) -> Any:
        try:
            async with contextlib.aclosing(stream):
                detok = _Detokenizer(self.tokenizer)
                if job.kind == "chat":
                    yield self._delta(job, "", None, first=True)
                text = detok.add(out.token_id)
                if text:
                    yield self._delta(job, text, None)
                async for out in stream:
                    text = detok.add(out.token_id)
                    if text:
                        yield self._delta(job, text, None)
            metrics = out.metrics
            yield self._delta(job, "", self._finish_reason(metrics, out.token_id, job.max_tokens))
            if job.body.include_usage:
                yield self._chunk(job, None, _usage(metrics))
        except Exception as e:
            yield _sse(_as_openai_error(e).body())
        finally:
            self.metrics.in_flight.dec()
        yield _sse("[DONE]")

    # ------------------------------------------------------------------ shared contexts

    def context_record(self, ctx: Any) -> dict[str, Any]:
        return {
            "id": ctx.context_id,
            "object": "shared_context",
            "tokens": ctx.num_tokens,
            "pinned": ctx.pinned,
            "expires": ctx.expires,
        }

    async def create_context(self, body: SharedContextBody) -> JSONResponse:
        engine = self.engine
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            try:
                content: Any = chat_prompt_ids(self.tokenizer, messages, add_generation_prompt=False)
            except Exception as e:
                raise OpenAIError(400, f"messages: the chat template refused them: {e}", "invalid_request_error") from e
        else:
            content = body.prompt
        async with self.create_lock:
            if not body.replace and engine.get_shared_context(body.id) is not None:
                raise OpenAIError(
                    409,
                    f'a shared context named {body.id!r} exists; send "replace": true to replace it',
                    "conflict_error",
                    "shared_context_exists",
                    "id",
                )
            ctx = await engine.save_shared_context(body.id, content, pin=body.pin, ttl=body.ttl)
        return JSONResponse(self.context_record(ctx), status_code=201)


def build_app(engine: KVTierEngine, *, model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over a started engine (routes in the module docstring). ``model_name`` is
    what ``/v1/models`` and responses name (default: the model directory's name)."""
    state = _App(engine, model_name or Path(str(engine.config.model)).name)
    app = FastAPI(title="kvtier", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kvtier = state

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestError)
    @app.exception_handler(ContextStoreError)
    async def _engine_error(_: Request, e: Exception) -> JSONResponse:
        return _as_openai_error(e).response()

    @app.exception_handler(RequestValidationError)
    async def _bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return OpenAIError(400, message, "invalid_request_error", None, param).response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return OpenAIError(e.status_code, str(e.detail), type_).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return _as_openai_error(e).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody) -> Response:
        job = state.chat_job(body)
        return await (state.complete_streamed(job) if body.stream else state.complete(job))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Response:
        job = state.text_job(body)
        return await (state.complete_streamed(job) if body.stream else state.complete(job))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "kvtier"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = engine.metrics.prometheus_text() + generate_latest(state.metrics.registry)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/shared_contexts", status_code=201)
    async def create_context(body: SharedContextBody) -> JSONResponse:
        return await state.create_context(body)

    @app.get("/v1/shared_contexts")
    async def list_contexts() -> dict[str, Any]:
        return {"object": "list", "data": [state.context_record(c) for c in engine.list_shared_contexts()]}

    @app.get("/v1/shared_contexts/{context_id}")
    async def get_context(context_id: str) -> dict[str, Any]:
        info = engine.shared_context_info(context_id)
        return {"id": info.pop("context_id"), "object": "shared_context", **info}

    @app.delete("/v1/shared_contexts/{context_id}")
    async def delete_context(context_id: str) -> dict[str, Any]:
        if not await engine.drop_shared_context(context_id):
            raise UnknownContextError(f"no shared context named {context_id!r}")
        return {"id": context_id, "object": "shared_context.deleted", "deleted": True}

    app.add_middleware(_CountRequests, metrics=state.metrics)
    return app


# ---------------------------------------------------------------------------------------------- running it


class _Uvicorn(uvicorn.Server):
    """uvicorn on a loop it does not own: on SIGINT/SIGTERM (when ``signals``) it stops serving and returns,
    so the caller closes its engine; it never re-raises the signal or replaces the loop's handlers for good."""

    def __init__(self, config: uvicorn.Config, *, signals: bool) -> None:
        super().__init__(config)
        self._signals = signals

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        if not self._signals:
            yield
            return
        import signal

        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
                installed.append(sig)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


class Server:
    """``build_app(engine)`` served by uvicorn as a task on the running loop (the engine's loop).

        async with Server(engine, "127.0.0.1", 0) as server:   # port 0: any free port
            print(server.base_url)                            # http://127.0.0.1:PORT/v1

    ``start`` returns once the socket accepts connections; ``stop`` stops accepting, lets requests in
    progress finish (up to ``graceful_seconds``) and returns when uvicorn has exited. The engine stays the
    caller's: it is neither started nor closed here."""

    def __init__(
        self,
        engine: KVTierEngine,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        model_name: str | None = None,
        log_level: str = "warning",
        graceful_seconds: float = 5.0,
        signals: bool = False,
    ) -> None:
        self.engine = engine
        self.host = host
        self.app = build_app(engine, model_name=model_name)
        self._requested_port = port
        self.port: int | None = None
        self._config = uvicorn.Config(
            self.app,
            log_level=log_level,
            log_config=None,  # leave the host process's logging as it is
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=graceful_seconds,
        )
        self._server = _Uvicorn(self._config, signals=signals)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What ``openai.AsyncOpenAI(base_url=...)`` takes."""
        return self.url + "/v1"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="kvtier-http")
        # uvicorn has no started event: look at its flag between the loop's turns (startup is a few of them).
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()  # its error, if it failed to start
                raise RuntimeError("the HTTP server exited before it started")
            await asyncio.sleep(0.005)

    async def wait(self) -> None:
        """Until the server stops (``stop``, or a signal when ``signals``)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        task, self._task = self._task, None
        await task

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def serve_in_background(engine: KVTierEngine, host: str = "127.0.0.1", port: int = 0, **options: Any) -> Server:
    """``async with serve_in_background(engine, host, port) as server:`` — the same as ``Server(...)``."""
    return Server(engine, host, port, **options)


# ---------------------------------------------------------------------------------------------- warm-up


@dataclass(frozen=True, slots=True)
class WarmUpReport:
    """What a warm-up promoted: blocks (and bytes) brought from disk into DDR, of the ``candidates`` it chose;
    ``timed_out`` when the time bound stopped it first."""

    candidates: int
    promoted: int
    promoted_bytes: int
    seconds: float
    timed_out: bool


def _warm_candidates(engine: KVTierEngine) -> list[Any]:
    """Disk-only blocks worth having in DDR, best first: pinned shared contexts' blocks (in context order),
    then other indexed blocks by hits and recency, as many as fit DDR's free bytes (a warm-up never evicts).
    Blocks found on disk after a restart but not yet named by any request are not in the index and cannot be
    confirmed, so they are not candidates."""
    import numpy as np

    from kv_runtime.tier import Tier

    chosen: list[Any] = []
    seen: set[int] = set()

    def want(node: Any) -> bool:
        r = node.payload
        return id(node) not in seen and Tier.DDR not in r.copies and Tier.DISK in r.copies and not r.dropped

    for ctx in engine.list_shared_contexts():
        if not ctx.pinned:
            continue
        for node in engine.hierarchy.match(engine.keyer.request(np.asarray(ctx.tokens, dtype=np.int32))):
            if want(node):
                seen.add(id(node))
                chosen.append(node)
    hot = [r.node for r in engine.hierarchy.blocks_in(Tier.DISK) if r.node is not None and want(r.node)]
    # Shallow blocks first among equals: a chain is only useful from its start.
    hot.sort(key=lambda n: (-n.hits, -n.last_access, n.depth))
    chosen += hot
    free = engine.hierarchy.pool(Tier.DDR).free_bytes
    out, total = [], 0
    for node in chosen:
        if total + node.payload.nbytes > free:
            break
        out.append(node)
        total += node.payload.nbytes
    return out


async def warm_up(
    engine: KVTierEngine, *, seconds: float = 30.0, chunk_blocks: int = 16, progress: bool = True
) -> WarmUpReport:
    """Promote disk blocks into DDR before serving (``_warm_candidates``), ``chunk_blocks`` at a time through
    ``TierService.prefetch`` (bounded like loads), for at most ``seconds``; a tqdm bar on stderr if
    ``progress``. Each chunk is pinned while it moves (a node evicted meanwhile is skipped)."""
    from kv_runtime.tier import Tier
    from prefix_reuse import PinnedError, StaleNodeError

    start = time.monotonic()
    deadline = start + seconds
    nodes = _warm_candidates(engine)
    promoted = promoted_bytes = 0
    timed_out = False
    bar = None
    if progress and nodes:
        from tqdm import tqdm

        bar = tqdm(total=len(nodes), desc="kvtier warm-up", unit="block")
    try:
        for i in range(0, len(nodes), chunk_blocks):
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            chunk = []
            for node in nodes[i : i + chunk_blocks]:
                try:
                    engine.hierarchy.index.pin([node])
                except (StaleNodeError, PinnedError):
                    continue
                chunk.append(node)
            try:
                moved = await asyncio.wait_for(engine.on_service(engine.service.prefetch(chunk)), timeout=left)
            except asyncio.TimeoutError:
                timed_out = True
                break
            finally:
                engine.hierarchy.index.unpin(chunk)
            promoted += moved
            promoted_bytes += sum(n.payload.nbytes for n in chunk if Tier.DDR in n.payload.copies)
            if bar is not None:
                bar.update(len(nodes[i : i + chunk_blocks]))
    finally:
        if bar is not None:
            bar.close()
    report = WarmUpReport(len(nodes), promoted, promoted_bytes, time.monotonic() - start, timed_out)
    log.info("kvtier: warm-up promoted %d of %d blocks in %.1f s", promoted, len(nodes), report.seconds)
    return report


# ---------------------------------------------------------------------------------------------- the command


async def serve_forever(
    config: Any,
    host: str,
    port: int,
    *,
    warm_up_seconds: float | None = None,
    log_level: str = "info",
    engine_options: dict[str, Any] | None = None,
) -> None:
    """``kvtier serve``: start the engine ``config.engine`` names (``engine_options``: LMDeploy's engine
    settings), warm up if asked, serve until SIGINT/SIGTERM, close."""
    async with KVTierEngine(config, **(engine_options or {})) as engine:
        if warm_up_seconds is not None:
            await warm_up(engine, seconds=warm_up_seconds)
        server = Server(engine, host, port, log_level=log_level, signals=True)
        await server.start()
        print(f"kvtier: serving {server.app.state.kvtier.model_name} at {server.base_url}", flush=True)
        try:
            await server.wait()
        finally:
            await server.stop()
