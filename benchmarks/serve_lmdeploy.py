"""`kvtier bench serve --engine lmdeploy`: the server over LMDeploy's engine, measured by the ``openai`` client (CUDA).

Every figure is what a client sees: ``openai.AsyncOpenAI`` streams completions over HTTP and times the first
chunk with text (TTFT) and the gaps after it (TPOT). Document QA as in ``kvtier bench serve``: users x rounds,
each user a long document of its own plus one short question per round, rounds one after the other; LMDeploy's
GPU block pool holds only ``--pool-documents`` of the users' documents, so a user's next round finds its
document evicted from HBM. Cases, all in one run on one model:

- ``kvtier``: kvtier's server (``kv_pipeline.server``) over LMDeploy's engine with kvtier's connector; the DDR tier
  holds every document.
- ``lmdeploy``: LMDeploy alone, as its users run it: LMDeploy's own OpenAI server (``api_server``) on the same
  engine settings, its GPU prefix cache only.
- ``gpu_hit``: kvtier's server, ``--gpu-users`` new users whose documents fit the GPU pool: LMDeploy's own
  prefix-cache hits through the same server (rounds after the first).
- ``no_reuse`` / ``no_reuse_lmdeploy``: the first round's prompts each behind a nonce of its own (nothing is
  ever found again), through kvtier's server and through LMDeploy's.

Requests go one at a time by default (``--concurrency``), users interleaved: every TTFT is the request's own,
not a queue's behind other users' prefills in a pool that holds a few documents.

The bars: a DDR hit's p50 TTFT (``kvtier``'s rounds after the first) at most the GPU hit's p50 plus 1.2x the
document's KV bytes over the raw pinned host-to-device bandwidth measured in this run; p50 speed-up against
LMDeploy alone at least 6x; with no reuse, TTFT and TPOT within 3% of LMDeploy alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kv_benchmarks.args import positive_float, positive_int
from kv_benchmarks.report import Report

FULL = dict(
    users=10, rounds=3, document_tokens=32768, question_tokens=128, answer_tokens=32, gpu_users=3, concurrency=1
)
QUICK = dict(users=6, rounds=2, document_tokens=8192, question_tokens=64, answer_tokens=16, gpu_users=2, concurrency=1)
BLOCK = 64
TOKENIZER_VOCAB = 8192  # kv_benchmarks.models trains tokenizers of at most this many tokens
SPEEDUP_BAR = 6.0
NO_REUSE_BAR = 1.03


def add_arguments(group: Any) -> None:
    """Its own options; the workload sizes (``--users``, ``--document-tokens``, ...) are ``bench serve``'s, with
    this module's defaults (``FULL``, ``QUICK``)."""
    group.add_argument("--lmdeploy-shape", default="qwen2-7b", help="shape of the built model")
    group.add_argument("--ddr-gib", type=positive_float, default=40.0, help="kvtier's DDR tier (pinned host memory)")
    group.add_argument("--pool-documents", type=positive_float, default=4.0, help="LMDeploy's GPU pool, in documents")
    group.add_argument(
        "--gpu-users", type=positive_int, help="users of the GPU-hit case (their documents fit the pool)"
    )


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _documents(tokenizer: Any, n: int, tokens: int, seed: int) -> list[str]:
    """``n`` texts of about ``tokens`` tokens each (cut at a token boundary of this tokenizer)."""
    from kv_benchmarks.models import synthetic_text

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = tokenizer.encode(synthetic_text(rng, tokens), add_special_tokens=False)
        while len(ids) < tokens:
            ids += tokenizer.encode(" " + synthetic_text(rng, tokens // 4), add_special_tokens=False)
        out.append(tokenizer.decode(ids[:tokens]))
    return out


def _prompts(tokenizer: Any, docs: list[str], rounds: int, question_tokens: int, seed: int) -> list[list[str]]:
    qs = _documents(tokenizer, rounds * len(docs), question_tokens, seed + 1)
    return [[doc + " " + qs[r * len(docs) + u] for u, doc in enumerate(docs)] for r in range(rounds)]


def _engine_options(p: dict[str, Any], pool_blocks: int) -> dict[str, Any]:
    return dict(
        session_len=p["document_tokens"] + p["question_tokens"] + p["answer_tokens"] + 1024,
        num_gpu_blocks=pool_blocks,
        max_batch_size=16,
        eager_mode=False,
    )


# ---------------------------------------------------------------------------------------------- the servers


class _LMDeployServer:
    """LMDeploy's own OpenAI server in a process of its own (LMDeploy alone), on the same engine settings."""

    def __init__(self, model_dir: Path, options: dict[str, Any], log: Path) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [
            sys.executable,
            "-m",
            "kv_benchmarks.serve_lmdeploy",
            str(model_dir),
            str(self.port),
            json.dumps(options),
        ]
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                    self.model = json.loads(r.read())["data"][0]["id"]
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"LMDeploy's server did not start: see {log}") from None
                time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _lmdeploy_server_main(argv: list[str]) -> None:
    """The ``lmdeploy`` case's server process: LMDeploy's ``api_server`` with prefix caching, no connector."""
    from lmdeploy import PytorchEngineConfig
    from lmdeploy.serve.openai.api_server import serve

    model_dir, port, options = argv[0], int(argv[1]), json.loads(argv[2])
    config = PytorchEngineConfig(enable_prefix_caching=True, block_size=BLOCK, dtype="bfloat16", **options)
    serve(model_dir, backend="pytorch", backend_config=config, server_name="127.0.0.1", server_port=port)


# ---------------------------------------------------------------------------------------------- the run


async def _cases(base_url: str, model: str, cases: dict[str, list[list[str]]], p: dict[str, Any], drain) -> dict:
    import openai

    from kv_benchmarks.serve import run_doc_qa, stream_request

    nonce_rng = np.random.default_rng(99)
    out = {}
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=1200, max_retries=0) as client:
        await stream_request(client, model, "warm up the server and its first connection", 2, "warm-up")
        for case, prompts in cases.items():
            nonce = (lambda: f"{int(nonce_rng.integers(1 << 62))} ") if case.startswith("no_reuse") else (lambda: "")
            _say(f"case {case}: {len(prompts[0])} users x {len(prompts)} rounds")
            # every answer runs to answer_tokens (random weights end some at once): TPOT has tokens to measure
            out[case] = await run_doc_qa(
                client, model, case, prompts, p["answer_tokens"], nonce, drain,
                extra_body={"ignore_eos": True}, concurrency=p["concurrency"],
            )  # fmt: skip
    return out


def _kvtier_cases(model_dir: Path, p: dict[str, Any], options: dict[str, Any], ddr_bytes: int, cases) -> dict:
    """kvtier's server over LMDeploy's engine on an event loop in a thread of its own (the client's loop never
    shares a turn with the engine's, as LMDeploy's server runs in a process of its own)."""
    from kv_benchmarks.serve import BackgroundServer
    from kv_pipeline.config import KVTierConfig
    from kv_pipeline.lmdeploy_engine import LMDeployKVTierEngine

    config = KVTierConfig(model=str(model_dir), engine="lmdeploy", dtype="bfloat16", ddr_bytes=ddr_bytes, disk_bytes=0)
    server = BackgroundServer(lambda: LMDeployKVTierEngine(config, **options)).start()

    async def drained() -> None:
        await asyncio.to_thread(server.call, lambda e: e.drain())

    try:
        out = asyncio.run(_cases(server.base_url, "kvtier", cases, p, drained))
    finally:
        server.stop()
    out["snapshot"] = server.snapshot
    return out


def run(args: argparse.Namespace) -> Report:
    import torch
    from transformers import AutoTokenizer

    from kv_benchmarks.e2e_lmdeploy import _raw_h2d_gbps
    from kv_benchmarks.models import build_model_dir
    from kv_benchmarks.serve import percentiles
    from kv_runtime import KVLayout

    if not torch.cuda.is_available():
        raise RuntimeError("bench serve --engine lmdeploy needs a CUDA device and LMDeploy 0.18")
    base = QUICK if args.quick else FULL
    p = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in base.items()}
    work = Path(args.work_dir)
    # the local tokenizer's vocabulary: every generated token streams text, so the client sees each one
    model_dir = build_model_dir(
        work / f"model-{args.lmdeploy_shape}-bf16-vocab{TOKENIZER_VOCAB}",
        args.lmdeploy_shape,
        dtype="bfloat16",
        device="cuda",
        max_position_embeddings=p["document_tokens"] + 4096,
        vocab_size=TOKENIZER_VOCAB,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_token = KVLayout.from_config(
        json.loads((model_dir / "config.json").read_text()), block_size=BLOCK, dtype=torch.bfloat16
    ).bytes_per_token
    request_tokens = p["document_tokens"] + p["question_tokens"] + p["answer_tokens"]
    pool_blocks = int(args.pool_documents * request_tokens / BLOCK) + 64
    options = _engine_options(p, pool_blocks)
    docs = _documents(tokenizer, p["users"] + p["gpu_users"], p["document_tokens"], args.seed)
    qa = _prompts(tokenizer, docs[: p["users"]], p["rounds"], p["question_tokens"], args.seed)
    gpu_qa = _prompts(tokenizer, docs[p["users"] :], p["rounds"], p["question_tokens"], args.seed + 5)
    h2d = _raw_h2d_gbps()
    _say(f"raw pinned H2D {h2d:.1f} GB/s; GPU pool {pool_blocks} blocks ({args.pool_documents:g} documents)")

    lmd = _LMDeployServer(model_dir, options, work / "lmdeploy-server.log")
    try:

        async def nothing() -> None:
            return None

        alone = asyncio.run(_cases(lmd.base_url, lmd.model, {"lmdeploy": qa, "no_reuse_lmdeploy": qa[:1]}, p, nothing))
    finally:
        lmd.stop()
    torch.cuda.empty_cache()
    ddr_bytes = int(args.ddr_gib * 2**30)
    ours = _kvtier_cases(model_dir, p, options, ddr_bytes, {"kvtier": qa, "gpu_hit": gpu_qa, "no_reuse": qa[:1]})
    snapshot = ours.pop("snapshot")
    engine_side = snapshot.get("pipeline", {})
    results = {**alone, **ours}

    metrics: dict[str, Any] = {"ttft_ms": {}, "requests_per_s": {}, "tpot_ms": {}, "cached_tokens": {}}
    rows = []
    for case, (samples, wall) in results.items():
        metrics["ttft_ms"][case] = percentiles([s.ttft_ms for s in samples])
        metrics["requests_per_s"][case] = len(samples) / wall
        metrics["tpot_ms"][case] = float(np.mean([s.tpot_ms for s in samples if s.output_chunks > 1] or [0.0]))
        metrics["cached_tokens"][case] = sum(s.cached_tokens for s in samples)
        rows += [asdict(s) for s in samples]
    for case in ("kvtier", "gpu_hit", "lmdeploy"):  # the rounds after the first: every document seen once
        later = [s.ttft_ms for s in results[case][0] if s.round > 0]
        metrics["ttft_ms"][f"{case}_later_rounds"] = percentiles(later)
    kv_bytes = request_tokens * per_token
    metrics["kv_bytes_per_request"] = float(np.mean([s.prompt_tokens for s in results["kvtier"][0]]) * per_token)
    metrics["raw_pinned_h2d_GBps"] = h2d
    hit, gpu = metrics["ttft_ms"]["kvtier_later_rounds"]["p50"], metrics["ttft_ms"]["gpu_hit_later_rounds"]["p50"]
    document_bytes = p["document_tokens"] // BLOCK * BLOCK * per_token
    bound = gpu + 1.2 * document_bytes / (h2d * 1e9) * 1e3
    metrics["ddr_hit_bar_ms"] = bound
    metrics["speedup_p50"] = metrics["ttft_ms"]["lmdeploy"]["p50"] / metrics["ttft_ms"]["kvtier"]["p50"]
    metrics["no_reuse_overhead"] = {
        "ttft_p50_ratio": metrics["ttft_ms"]["no_reuse"]["p50"] / metrics["ttft_ms"]["no_reuse_lmdeploy"]["p50"],
        "tpot_ratio": metrics["tpot_ms"]["no_reuse"] / metrics["tpot_ms"]["no_reuse_lmdeploy"],
    }
    over = metrics["no_reuse_overhead"]
    metrics["bars"] = {
        "ddr_hit_within_pcie_bound": hit <= bound,
        "speedup_at_least_6x": metrics["speedup_p50"] >= SPEEDUP_BAR,
        "no_reuse_within_3pct": over["ttft_p50_ratio"] <= NO_REUSE_BAR and over["tpot_ratio"] <= NO_REUSE_BAR,
    }
    metrics["store"] = snapshot.get("store", {})
    # the engine's own view of the kvtier server's requests (TTFT from the engine's call, plans, reuse by tier)
    metrics["engine"] = {k: engine_side.get(k) for k in ("ttft_ms", "plan_counts", "reused_tokens")}
    metrics["engine_ttft_ms_by_user"] = engine_side.get("ttft_ms_by_context", {})
    reference = {
        "lmdeploy": "LMDeploy's own api_server, same engine settings, its GPU prefix cache only (no connector)",
        "gpu_hit": f"{p['gpu_users']} users whose documents fit LMDeploy's GPU pool, through kvtier's server",
        "raw_pinned_h2d_GBps": h2d,
        "document_kv_bytes": document_bytes,
    }
    notes = [
        f"DDR hit p50 (rounds after the first) {hit:.1f} ms vs GPU hit p50 {gpu:.1f} ms + 1.2 x "
        f"{document_bytes / 1e9:.2f} GB / {h2d:.1f} GB/s = {bound:.1f} ms: "
        f"{'met' if metrics['bars']['ddr_hit_within_pcie_bound'] else 'not met'}.",
        f"p50 TTFT {metrics['ttft_ms']['kvtier']['p50']:.0f} ms with kvtier vs "
        f"{metrics['ttft_ms']['lmdeploy']['p50']:.0f} ms LMDeploy alone ({metrics['speedup_p50']:.2f}x, bar 6x).",
        f"No reuse: TTFT p50 ratio {over['ttft_p50_ratio']:.3f}, TPOT ratio {over['tpot_ratio']:.3f} (bar 1.03).",
        f"{p['users']} users x {p['rounds']} rounds, {p['document_tokens']}-token documents, {p['concurrency']} "
        f"request(s) at a time; KV {kv_bytes / 2**30:.2f} GiB per request; GPU pool {pool_blocks} blocks.",
    ]
    config = {**p, "pool_documents": args.pool_documents, "pool_blocks": pool_blocks, "ddr_gib": args.ddr_gib,
              "shape": args.lmdeploy_shape, "engine_options": options, "model": str(model_dir)}  # fmt: skip
    return Report("serve_lmdeploy", metrics, reference, rows, notes, config)


if __name__ == "__main__":
    _lmdeploy_server_main(sys.argv[1:])
