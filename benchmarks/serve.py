"""The OpenAI-compatible server under load, measured by a real client: ``kvtier bench serve``.

The embedded engine's server (``kv_pipeline.server``) runs in a thread of its own with its own event loop; the
client is ``openai.AsyncOpenAI`` on the main loop, streaming, so every figure is what a client sees over HTTP:
TTFT is the time from sending a request to its first streamed chunk with text, the time between tokens the gaps
between chunks.

Two workloads, every case in the same run on the same engine:

- **Document QA**, users x rounds: each user has a long document of its own and asks one short question per
  round; the users' requests run concurrently, rounds one after the other, and DDR holds only part of the
  documents (the rest go to disk), so reuse has to come through both tiers. Cases: ``kvtier`` (the prompts as
  they are), ``no_reuse`` (the same prompts each behind a nonce of its own, so nothing is ever found again: the
  server without reuse), and ``no_reuse_plain`` (the same nonce prompts with kvtier's write-back switched off:
  no lookup finds anything and nothing is saved, the engine without kvtier). ``kvtier`` vs ``no_reuse`` is
  what reuse buys; ``no_reuse`` vs ``no_reuse_plain`` what kvtier costs where nothing is reused.
- **Fairness**: streaming decodes run while long prompts (8K tokens, fewer in quick mode) arrive one after
  another; the time between tokens of the streams is measured while the long prompts run, once with the
  scheduler's chunked prefill (``prefill_chunk_tokens``) and once prefilling each prompt whole (a chunk past
  any prompt's length). The bar: chunked p99 at most a third of whole-prompt p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kv_benchmarks.args import add_model_arguments, add_scale_arguments, positive_float, positive_int
from kv_benchmarks.report import Report

FULL = dict(
    users=8,
    rounds=4,
    document_tokens=4096,
    question_tokens=128,
    answer_tokens=32,
    streams=3,
    long_prompts=4,
    long_tokens=8192,
    stream_tokens=64,
)
QUICK = dict(
    users=4,
    rounds=3,
    document_tokens=2048,
    question_tokens=64,
    answer_tokens=16,
    streams=2,
    long_prompts=3,
    long_tokens=4096,
    stream_tokens=48,
)
DOC_QA_CASES = ("kvtier", "no_reuse", "no_reuse_plain")
FAIRNESS_CASES = ("chunked", "whole")
WHOLE_PROMPT_CHUNK = 1 << 20  # tokens: past any prompt here, so each prompt is one prefill turn
FAIRNESS_BAR = 1 / 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kv_benchmarks import serve_lmdeploy

    parser.add_argument("--engine", choices=["hf", "lmdeploy"], default="hf", help="the engine under the server")
    serve_lmdeploy.add_arguments(parser.add_argument_group("--engine lmdeploy (CUDA, LMDeploy 0.18)"))
    add_model_arguments(parser)
    add_scale_arguments(parser, FULL, QUICK)
    parser.add_argument("--block-size", type=positive_int, default=64)
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=positive_int,
        default=256,
        help="the chunked case's prefill chunk (default 256: on a CPU a chunk after a cached past runs the masked "
        "attention path, slower per token than a whole prompt's causal one)",
    )
    parser.add_argument(
        "--ddr-users", type=positive_float, default=0.5, help="DDR capacity as a share of all users' documents"
    )
    parser.add_argument("--write-mode", default="write-back", choices=["write-back", "write-through", "selective"])
    parser.add_argument("--seed", type=int, default=0)


def workload_params(args: argparse.Namespace) -> dict[str, int]:
    base = QUICK if getattr(args, "quick", False) else FULL
    return {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in base.items()}


# ---------------------------------------------------------------------------------------------- measurement


@dataclass(slots=True)
class Sample:
    """One streamed request as the client saw it."""

    case: str
    user: int
    round: int
    prompt_tokens: int
    cached_tokens: int
    output_chunks: int
    ttft_ms: float
    tpot_ms: float  # mean time between the first and the last chunk, per chunk after the first
    e2e_ms: float


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(values, dtype=float)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


async def stream_request(
    client: Any,
    model: str,
    tokens: list[int],
    max_tokens: int,
    user: str,
    *,
    stop: asyncio.Event | None = None,
    gaps: list[tuple[float, float]] | None = None,
    on_text: Callable[[int], None] | None = None,
    extra_body: dict[str, Any] | None = None,
) -> tuple[float, float, int, int, float]:
    """Stream one completion; returns (TTFT s, mean s per chunk after the first, chunks, cached tokens, total s).
    With ``gaps`` each interval between consecutive text chunks is appended to it as (start, end) clock times;
    ``on_text`` is called with the count of text chunks so far after each; with ``stop`` the stream is closed
    at the first text chunk after it is set; ``extra_body`` adds fields of the server's own (``ignore_eos``)."""
    t0 = time.perf_counter()
    first = last = None
    chunks = cached = 0
    stream = await client.completions.create(
        model=model,
        prompt=tokens,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        user=user,
        extra_body=extra_body,
    )
    try:
        async for chunk in stream:
            if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
            if not chunk.choices:
                continue
            now = time.perf_counter()
            if not chunk.choices[0].text:
                # an answer whose first token ends it (the end token streams no text): its finish is its first output
                if first is None and chunk.choices[0].finish_reason is not None:
                    first = last = now
                continue
            if first is None:
                first = now
            elif gaps is not None:
                gaps.append((last, now))
            last = now
            chunks += 1
            if on_text is not None:
                on_text(chunks)
            if stop is not None and stop.is_set():
                break
    finally:
        await stream.close()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the server streamed no text")
    tpot = (last - first) / (chunks - 1) if chunks > 1 else 0.0
    return first - t0, tpot, chunks, cached, end - t0


# ---------------------------------------------------------------------------------------------- the server


class BackgroundServer:
    """The engine and its OpenAI-compatible server on an event loop in a thread of their own, so that the
    client's loop never shares a turn with the engine's. ``call(fn)`` runs ``fn(engine)`` on the server's loop
    (between cases, to switch the scheduler's settings)."""

    def __init__(self, engine_factory: Callable[[], Any]) -> None:
        self._factory = engine_factory
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.base_url = ""
        self.snapshot: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._main, name="kvtier-bench-server", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to the caller by start() or stop()
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        from kv_pipeline.server import Server

        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        async with self._factory() as engine:
            self.engine = engine
            async with Server(engine, "127.0.0.1", 0) as server:
                self.base_url = server.base_url
                self._ready.set()
                await self._stopped.wait()
            await engine.drain()
            self.snapshot = engine.metrics_snapshot()

    def start(self) -> BackgroundServer:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[Any], Any]) -> Any:
        async def run() -> Any:
            out = fn(self.engine)
            return await out if asyncio.iscoroutine(out) else out

        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()
        if self._error is not None:
            raise self._error


async def _no_write_back(*_args: Any, **_kwargs: Any) -> None:
    """The plain engine's write-back: nothing saved."""


def _set_write_back(engine: Any, on: bool) -> None:
    # NOTE: an instance attribute over the method: the scheduler spawns ``self._write_back(...)`` after each
    # prefill, so the plain case saves nothing while everything else (HTTP, lookup, compute) stays the same.
    if on:
        vars(engine.scheduler).pop("_write_back", None)
    else:
        engine.scheduler._write_back = _no_write_back


# ---------------------------------------------------------------------------------------------- workloads


def _words(encode: Callable[[str], list[int]], rng: np.random.Generator, n: int) -> list[int]:
    from kv_benchmarks.models import synthetic_text

    out: list[int] = []
    while len(out) < n:
        out += encode(" " + synthetic_text(rng, max(16, n // 2)))
    return out[:n]


def build_doc_qa(encode: Callable[[str], list[int]], p: dict[str, int], seed: int) -> list[list[list[int]]]:
    """``prompts[round][user]``: the user's document followed by that round's question."""
    rng = np.random.default_rng(seed)
    docs = [_words(encode, rng, p["document_tokens"]) for _ in range(p["users"])]
    return [[doc + _words(encode, rng, p["question_tokens"]) for doc in docs] for _ in range(p["rounds"])]


async def run_doc_qa(
    client: Any,
    model: str,
    case: str,
    prompts: list[list[list[int]]],
    answer_tokens: int,
    nonce: Callable,
    between_rounds: Callable[[], Any],
    extra_body: dict[str, Any] | None = None,
    concurrency: int | None = None,
) -> tuple[list[Sample], float]:
    """Every round's users concurrently (at most ``concurrency`` requests at a time, in user order), rounds one
    after the other; returns the samples and the time the rounds took.

    ``between_rounds`` runs (untimed) after each round: the users' time to read their answers, in which the
    server finishes writing the round's blocks back. A round then finds what the previous one saved whatever
    the machine's speed, so which requests hit does not depend on timing."""
    samples: list[Sample] = []
    gate = asyncio.Semaphore(concurrency or max(1, max(len(row) for row in prompts)))

    async def one(r: int, u: int, tokens: list[int]) -> None:
        async with gate:
            await timed(r, u, tokens)

    async def timed(r: int, u: int, tokens: list[int]) -> None:
        tokens = nonce() + tokens
        ttft, tpot, chunks, cached, total = await stream_request(
            client, model, tokens, answer_tokens, f"{case}-{u}", extra_body=extra_body
        )
        samples.append(Sample(case, u, r, len(tokens), cached, chunks, ttft * 1e3, tpot * 1e3, total * 1e3))

    elapsed = 0.0
    for r, row in enumerate(prompts):
        start = time.perf_counter()
        await asyncio.gather(*(one(r, u, tokens) for u, tokens in enumerate(row)))
        elapsed += time.perf_counter() - start
        await between_rounds()
    return samples, elapsed


async def run_fairness(
    client: Any, model: str, case: str, p: dict[str, int], encode: Callable, seed: int
) -> tuple[list[float], list[Sample]]:
    """Streams decode while the long prompts arrive one after another; returns the streams' gaps between
    tokens while the long prompts ran (seconds), and the long prompts' samples."""
    rng = np.random.default_rng(seed)
    longs = [_words(encode, rng, p["long_tokens"]) for _ in range(p["long_prompts"])]
    shorts = [_words(encode, rng, 64) for _ in range(p["streams"])]
    done = asyncio.Event()
    gaps: list[tuple[float, float]] = []
    decoding = [asyncio.Event() for _ in shorts]
    window: list[float] = []

    async def stream(i: int) -> None:
        def seen(chunks: int) -> None:
            if chunks >= 2:  # past its prefill: decoding
                decoding[i].set()

        while not done.is_set():  # a stream that ends (its length or an end token) is followed by another
            await stream_request(
                client, model, [int(rng.integers(2, 1000))] + shorts[i], p["stream_tokens"], f"{case}-s{i}",
                stop=done, gaps=gaps, on_text=seen,
            )  # fmt: skip

    async def long_prompts() -> list[Sample]:
        out = []
        for e in decoding:
            await e.wait()  # every stream is decoding now
        window.append(time.perf_counter())
        for k, tokens in enumerate(longs):
            ttft, _, chunks, cached, total = await stream_request(client, model, tokens, 1, f"{case}-long")
            out.append(Sample(case, -1, k, len(tokens), cached, chunks, ttft * 1e3, 0.0, total * 1e3))
        window.append(time.perf_counter())
        done.set()
        return out

    tasks = [asyncio.create_task(stream(i)) for i in range(len(shorts))]
    try:
        samples = await long_prompts()
    finally:
        done.set()
        await asyncio.gather(*tasks)
    # the gaps that overlap the long prompts' run (the one a whole prefill makes ends after it)
    start, end = window
    return [b - a for a, b in gaps if b >= start and a <= end], samples


# ---------------------------------------------------------------------------------------------- the run


def _kv_bytes_per_token(model_dir: Path, block_size: int) -> int:
    from kv_runtime import KVLayout

    config = json.loads((model_dir / "config.json").read_text())
    return KVLayout.from_config(config, block_size=block_size).bytes_per_token


async def _client_main(server: BackgroundServer, p: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    import openai

    engine = server.engine
    encode = engine.model.encode
    model = "kvtier"
    nonce_rng = np.random.default_rng(args.seed + 1)
    vocab = int(engine.model.config.vocab_size)

    def fresh() -> list[int]:
        # a nonce as the first block: no block key of the prompt is ever seen again
        return nonce_rng.integers(2, vocab - 1, args.block_size).tolist()

    prompts = build_doc_qa(encode, p, args.seed)
    out: dict[str, Any] = {"doc_qa": {}, "fairness": {}, "long": {}}

    async def drained() -> None:
        await asyncio.to_thread(server.call, lambda e: e.drain())

    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", timeout=600, max_retries=0) as client:
        # a warm-up request (first compute, first HTTP connection), not measured
        await stream_request(client, model, fresh() + prompts[0][0][:64], 2, "warm-up")
        server.call(lambda e: setattr(e.scheduler, "prefill_chunk_tokens", args.prefill_chunk_tokens))
        for case in DOC_QA_CASES:
            server.call(lambda e, on=case != "no_reuse_plain": _set_write_back(e, on))
            nonce = (lambda: []) if case == "kvtier" else fresh
            out["doc_qa"][case] = await run_doc_qa(client, model, case, prompts, p["answer_tokens"], nonce, drained)
        server.call(lambda e: _set_write_back(e, True))
        for k, case in enumerate(FAIRNESS_CASES):
            chunk = args.prefill_chunk_tokens if case == "chunked" else WHOLE_PROMPT_CHUNK
            server.call(lambda e, c=chunk: setattr(e.scheduler, "prefill_chunk_tokens", c))
            gaps, longs = await run_fairness(client, model, case, p, encode, args.seed + 10 + k)
            out["fairness"][case] = gaps
            out["long"][case] = longs
            server.call(lambda e: e.drain())
    return out


def run_bench(args: argparse.Namespace) -> Report:
    from kv_benchmarks.models import build_model_dir
    from kv_pipeline.engine import KVTierEngine

    p = workload_params(args)
    model_dir = args.model or build_model_dir(args.work_dir / f"model-{args.shape}", args.shape, peaked=True)
    per_token = _kv_bytes_per_token(model_dir, args.block_size)
    doc_bytes = (p["document_tokens"] + p["question_tokens"] + args.block_size) * per_token
    ddr_bytes = max(int(args.ddr_users * p["users"] * doc_bytes), 8 * args.block_size * per_token)
    disk_bytes = 4 * p["users"] * doc_bytes + 4 * p["long_prompts"] * p["long_tokens"] * per_token
    cache_dir = args.work_dir / "serve-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # every run starts cold

    def engine() -> Any:
        return KVTierEngine.from_pretrained(
            model_dir,
            cache_dir=cache_dir,
            ddr_bytes=ddr_bytes,
            disk_bytes=disk_bytes,
            block_size=args.block_size,
            write_mode=args.write_mode,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            device="cpu",
        )

    t0 = time.perf_counter()
    server = BackgroundServer(engine).start()
    try:
        results = asyncio.run(_client_main(server, p, args))
    finally:
        server.stop()
    seconds = time.perf_counter() - t0

    metrics: dict[str, Any] = {"ttft_ms": {}, "requests_per_s": {}, "tpot_ms": {}, "inter_token_p99_ms": {}}
    cached_tokens: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for case, (samples, wall) in results["doc_qa"].items():
        metrics["ttft_ms"][case] = percentiles([s.ttft_ms for s in samples])
        metrics["requests_per_s"][case] = len(samples) / wall
        metrics["tpot_ms"][case] = float(np.mean([s.tpot_ms for s in samples if s.output_chunks > 1] or [0.0]))
        cached_tokens[case] = sum(s.cached_tokens for s in samples)
        rows += [asdict(s) for s in samples]
    for case, gaps in results["fairness"].items():
        metrics["inter_token_p99_ms"][case] = percentiles([g * 1e3 for g in gaps])["p99"] if gaps else None
        metrics["ttft_ms"][f"long_{case}"] = percentiles([s.ttft_ms for s in results["long"][case]])
        rows += [asdict(s) for s in results["long"][case]]
    kv_samples = results["doc_qa"]["kvtier"][0]
    metrics["kv_bytes_per_request"] = float(np.mean([s.prompt_tokens * per_token for s in kv_samples]))
    metrics["cached_tokens"] = cached_tokens
    metrics["speedup_p50"] = metrics["ttft_ms"]["no_reuse"]["p50"] / metrics["ttft_ms"]["kvtier"]["p50"]
    metrics["no_reuse_overhead"] = {
        "ttft_p50_ratio": metrics["ttft_ms"]["no_reuse"]["p50"] / metrics["ttft_ms"]["no_reuse_plain"]["p50"],
        "tpot_ratio": metrics["tpot_ms"]["no_reuse"] / metrics["tpot_ms"]["no_reuse_plain"]
        if metrics["tpot_ms"]["no_reuse_plain"]
        else float("nan"),
    }
    chunked, whole = metrics["inter_token_p99_ms"]["chunked"], metrics["inter_token_p99_ms"]["whole"]
    # None where a case saw no gap overlap its long prompts (a stream between two requests the whole time)
    measured = chunked is not None and whole is not None and whole > 0
    metrics["fairness_ratio"] = chunked / whole if measured else None
    met = metrics["fairness_ratio"] <= FAIRNESS_BAR if measured else None
    metrics["fairness_bar"] = {"bar": "chunked p99 inter-token <= 1/3 of whole-prompt p99", "met": met}
    metrics["gaps_measured"] = {case: len(g) for case, g in results["fairness"].items()}
    metrics["seconds"] = seconds
    reference = {
        "no_reuse": "the same prompts, each behind a nonce block of its own: nothing is found again",
        "no_reuse_plain": "those nonce prompts with the scheduler's write-back switched off: kvtier saves nothing",
        "whole": f"each long prompt prefilled in one turn (prefill_chunk_tokens={WHOLE_PROMPT_CHUNK})",
        "ttft_p50_ms_no_reuse": metrics["ttft_ms"]["no_reuse"]["p50"],
    }
    reqs = sum(len(s) for s, _ in results["doc_qa"].values())
    notes = [
        f"Fairness bar (chunked p99 <= 1/3 whole p99): {'met' if met else 'not met'} "
        f"({chunked:.1f} vs {whole:.1f} ms, ratio {metrics['fairness_ratio']:.3f})."
        if measured
        else "Fairness bar: not measured (no stream's gap between tokens overlapped a long prompt in one case).",
        f"Reuse: TTFT p50 {metrics['ttft_ms']['kvtier']['p50']:.1f} ms with kvtier vs "
        f"{metrics['ttft_ms']['no_reuse']['p50']:.1f} ms without ({metrics['speedup_p50']:.2f}x); "
        f"the first round of every user is a cold prefill in every case.",
        f"{reqs} document-QA requests over HTTP (openai.AsyncOpenAI, streaming), {p['users']} users x "
        f"{p['rounds']} rounds, {p['document_tokens']}-token documents; {p['long_prompts']} long prompts of "
        f"{p['long_tokens']} tokens per fairness case against {p['streams']} streams; {seconds:.0f} s in all.",
        f"Tiers: DDR {ddr_bytes / 2**20:.0f} MiB ({args.ddr_users:g} of the users' documents), "
        f"disk {disk_bytes / 2**20:.0f} MiB, {args.write_mode}; chunked prefill {args.prefill_chunk_tokens} tokens.",
        "TTFT: from sending the request to the first streamed chunk with text, on the client; the time between "
        "tokens is between consecutive text chunks of the streams while the long prompts ran.",
    ]
    config = {
        **p,
        "block_size": args.block_size,
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
        "model": str(model_dir),
        "kv_bytes_per_token": per_token,
        "ddr_bytes": ddr_bytes,
        "disk_bytes": disk_bytes,
        "write_mode": args.write_mode,
        "quick": bool(getattr(args, "quick", False)),
    }
    return Report("serve", metrics, reference, rows, notes, config)


def run(args: argparse.Namespace) -> Report:
    if args.engine == "lmdeploy":
        from kv_benchmarks import serve_lmdeploy

        return serve_lmdeploy.run(args)
    return run_bench(args)
