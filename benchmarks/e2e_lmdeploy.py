"""End to end on LMDeploy: long-context TTFT per tier, decode overhead, a multi-tenant workload, correctness.

Runs ``kvtier bench e2e --engine lmdeploy`` on a CUDA machine with LMDeploy 0.18. A Qwen2-7B-shape model with
random weights (bf16) is built once per run. Every figure is measured in the same run as its reference:

- Per prompt length (32K, 64K, 128K by default; the last 128 tokens of every prompt are new): TTFT from
  scratch; with the prefix in LMDeploy's GPU prefix cache; with it only in kvtier's DDR tier (LMDeploy's GPU
  cache emptied first); only on disk (DDR copies dropped; reads are O_DIRECT, so the page cache is bypassed,
  not dropped), loaded in full; and on disk with the cost model's plan (load, recompute, or Cake's split of
  recomputing the front while the back streams in). The DDR bar is the GPU-cache-hit TTFT plus 1.2x the
  prefix's bytes over the raw pinned host-to-device bandwidth measured in this run.
- Logits after a DDR and a disk restore against LMDeploy's own full prefill of the same prompt.
- Decode time per output token with the connector on vs an engine without it (a subprocess, so that each
  engine has the GPU to itself), and a multi-tenant workload: sessions cycling through 32K contexts whose
  working set exceeds LMDeploy's GPU block pool but fits in DDR, with kvtier vs LMDeploy's prefix cache alone.
  The first round (every context seen once) warms both up and is not counted.

``--parts`` picks what a run measures (``ttft``: the per-length rows; ``tpot`` and ``multitenant``: against the
engine without the connector), so that the full scale can be split over runs that each fit a time limit;
``--merge A.json B.json ...`` then combines their reports into one without running anything (each figure keeps
the references of the run that measured it).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from kv_benchmarks.args import positive_float, positive_int
from kv_benchmarks.report import Report

NEW_TOKENS = 128
TOP_LOGITS = 64  # LMDeploy returns the top-k raw logits of a generated token (no full rows while generating)
FULL = dict(
    lengths="32768,65536,131072", mt_sessions=10, mt_rounds=5, hbm_blocks=2600, tpot_prompt=4096, tpot_tokens=256
)
QUICK = dict(lengths="8192,16384", mt_sessions=6, mt_rounds=2, hbm_blocks=700, tpot_prompt=1024, tpot_tokens=64)
PARTS = ("ttft", "tpot", "multitenant")
CASES = ("scratch", "gpu_prefix_cache", "ddr", "disk", "disk_split")  # the columns of ttft_ms[length]
_T0 = time.perf_counter()


def _say(message: str) -> None:
    """Progress on stdout with the seconds since start: a long run shows where its time goes."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", help=f"default {value} ({QUICK[name]} quick)")
    parser.add_argument("--lmdeploy-shape", default="qwen2-7b", help="shape of the built model")
    parser.add_argument("--ddr-gib", type=positive_float, default=40.0, help="kvtier DDR tier (pinned host memory)")
    parser.add_argument("--disk-gib", type=positive_float, default=40.0, help="kvtier disk tier")
    parser.add_argument("--concurrency", type=positive_int, default=2, help="clients of the multi-tenant workload")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, of {','.join(PARTS)}")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="combine reports of earlier runs")


def _params(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    p = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    p["lengths"] = [int(x) for x in str(p["lengths"]).split(",")]
    for k in ("mt_sessions", "mt_rounds", "hbm_blocks", "tpot_prompt", "tpot_tokens"):
        p[k] = int(p[k])
    p["mt_length"] = 8192 if args.quick else 32768
    p["parts"] = [x for x in str(args.parts).split(",") if x]
    unknown = set(p["parts"]) - set(PARTS)
    if unknown or not p["parts"]:
        raise ValueError(f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {args.parts!r}")
    return p


def _rand(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(100, vocab - 100, size=n).tolist()


def _contexts(seed: int, sessions: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 7)
    return [_rand(rng, length - NEW_TOKENS, vocab) for _ in range(sessions)]


def _engine_options(p: dict[str, Any]) -> dict[str, Any]:
    return dict(
        session_len=max(p["lengths"]) + 1024,
        num_gpu_blocks=p["hbm_blocks"],
        max_batch_size=8,
        eager_mode=False,
    )


async def _ttft(stream, *, max_new_tokens: int = 1) -> tuple[float, Any]:
    """Seconds to the first generated token, and the last output (its logits, if asked for)."""
    t0 = time.perf_counter()
    first = None
    last = None
    async for out in stream:
        if out.token_ids and first is None:
            first = time.perf_counter() - t0
        last = out
    if first is None:
        raise RuntimeError("no token came back")
    return first, last


async def _multitenant(run_one, contexts, rounds: int, concurrency: int, vocab: int, seed: int) -> dict[str, Any]:
    """Sessions cycle through their contexts; round 0 warms up and is not counted."""
    rng = np.random.default_rng(seed + 11)
    order = [(r, s) for r in range(rounds) for s in range(len(contexts))]
    prompts = {(r, s): contexts[s] + _rand(rng, NEW_TOKENS, vocab) for r, s in order}
    warm = [key for key in order if key[0] == 0]
    timed = [key for key in order if key[0] > 0]
    for key in warm:
        await run_one(prompts[key])
    queue = list(timed)
    ttfts: list[float] = []

    async def client() -> None:
        while queue:
            key = queue.pop(0)
            ttfts.append(await run_one(prompts[key]))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(ttfts),
        "ttft_p50_ms": float(np.percentile(ttfts, 50) * 1e3),
        "ttft_p99_ms": float(np.percentile(ttfts, 99) * 1e3),
        "requests_per_s": len(ttfts) / wall,
        "ttfts_ms": [round(x * 1e3, 1) for x in ttfts],  # in completion order
    }


async def _tpot(run_decode, prompt: list[int], tokens: int, repeats: int = 3) -> float:
    """Median seconds per output token after the first, over ``repeats`` runs of the same request."""
    out = []
    for _ in range(repeats):
        out.append(await run_decode(prompt, tokens))
    return statistics.median(out)


# ---------------------------------------------------------------------------------------------- baseline engine


async def _baseline(model_dir: str, p: dict[str, Any], seed: int, concurrency: int, vocab: int) -> dict[str, Any]:
    """LMDeploy with its own GPU prefix cache only (no connector): TPOT and the multi-tenant workload."""
    from lmdeploy import PytorchEngineConfig
    from lmdeploy.pytorch.engine import Engine

    engine = Engine.from_pretrained(
        model_dir,
        PytorchEngineConfig(
            enable_prefix_caching=True, dtype="bfloat16", logprobs_mode="raw_logits", **_engine_options(p)
        ),
    )
    engine.start_loop()
    inst = engine.create_instance()
    ids = iter(range(1, 1 << 30))
    run_one, run_decode = _runners(lambda toks, gen: inst.async_stream_infer(next(ids), toks, gen_config=gen))
    rng = np.random.default_rng(seed + 3)
    await run_one(_rand(rng, 2048, vocab))  # warm-up
    out: dict[str, Any] = {}
    if "tpot" in p["parts"]:
        out["tpot_s"] = await _tpot(run_decode, _rand(rng, p["tpot_prompt"], vocab), p["tpot_tokens"])
        _say(f"baseline: {out['tpot_s'] * 1e3:.2f} ms per output token")
    if "multitenant" in p["parts"]:
        contexts = _contexts(seed, p["mt_sessions"], p["mt_length"], vocab)
        out["multitenant"] = await _multitenant(run_one, contexts, p["mt_rounds"], concurrency, vocab, seed)
        _say(f"baseline: multi-tenant {out['multitenant']}")
    engine.close()
    return out


def _runners(stream_fn):
    from lmdeploy import GenerationConfig

    async def run_one(tokens: list[int]) -> float:
        seconds, _ = await _ttft(stream_fn(tokens, GenerationConfig(max_new_tokens=8)))
        return seconds

    async def run_decode(tokens: list[int], n: int) -> float:
        first = None
        count = 0
        async for out in stream_fn(tokens, GenerationConfig(max_new_tokens=n, ignore_eos=True)):
            if out.token_ids and first is None:
                first = time.perf_counter()
            count += len(out.token_ids)
        if first is None or count < 2:
            raise RuntimeError("decode produced fewer than 2 tokens")
        return (time.perf_counter() - first) / (count - 1)

    return run_one, run_decode


# ---------------------------------------------------------------------------------------------- kvtier engine


def _raw_h2d_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """One pinned host buffer to one device buffer, median of ``repeats`` (the DDR bar's bandwidth)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            dev.copy_(host, non_blocking=True)
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times[1:]) / 1e9


def _raw_disk_read_gbps(directory: Path, nbytes: int = 1 << 30) -> float:
    """An O_DIRECT read of a file in the cache directory: the disk tier's raw speed (the cost model's prior)."""
    from kv_io.align import aligned_empty
    from kv_io.file_io import read_direct, write_direct

    path = directory / "raw-read.bin"
    buf = aligned_empty(nbytes)
    buf.fill_(7)
    write_direct(path, 0, buf)
    start = time.perf_counter()
    read_direct(path, 0, buf)
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / seconds / 1e9


async def _kvtier(model_dir: Path, work: Path, p: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kv_pipeline.config import KVTierConfig
    from kv_pipeline.lmdeploy_engine import LMDeployKVTierEngine

    cache_dir = work / "lmdeploy-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    disk_gbps = _raw_disk_read_gbps(cache_dir)
    h2d_gbps = _raw_h2d_gbps()
    _say(f"raw pinned H2D {h2d_gbps:.1f} GB/s, raw O_DIRECT read {disk_gbps:.2f} GB/s")
    config = KVTierConfig(
        model=str(model_dir),
        engine="lmdeploy",
        dtype="bfloat16",
        ddr_bytes=int(args.ddr_gib * 2**30),
        disk_bytes=int(args.disk_gib * 2**30),
        cache_dir=cache_dir,
        write_mode="write-through",
    )
    eng = LMDeployKVTierEngine(config, **_engine_options(p))
    await eng.start()
    _say("kvtier engine started")
    store = eng.store
    for link, gbps in (("disk", disk_gbps), ("ddr", h2d_gbps)):
        store.cost.tiers[link].bandwidth_gbps = gbps
    from lmdeploy import GenerationConfig

    def stream(tokens: list[int], gen) -> Any:
        return eng._stream(tokens, gen)

    rng = np.random.default_rng(args.seed)
    await _ttft(stream(_rand(rng, 2048, vocab), GenerationConfig(max_new_tokens=1)))  # warm-up
    out: dict[str, Any] = {"raw_pinned_h2d_GBps": h2d_gbps, "raw_disk_read_GBps": disk_gbps}
    if "ttft" in p["parts"]:
        out["rows"] = [await _length_row(eng, stream, rng, length, vocab, h2d_gbps) for length in p["lengths"]]
    run_one, run_decode = _runners(stream)
    await eng.evict_gpu_prefix_cache()  # also waits for every save and write-down of the cases above
    if "tpot" in p["parts"]:
        out["tpot_s"] = await _tpot(run_decode, _rand(rng, p["tpot_prompt"], vocab), p["tpot_tokens"])
        _say(f"kvtier: {out['tpot_s'] * 1e3:.2f} ms per output token")
    store.wait_idle()
    if "multitenant" in p["parts"]:
        contexts = _contexts(args.seed, p["mt_sessions"], p["mt_length"], vocab)
        out["multitenant"] = await _multitenant(run_one, contexts, p["mt_rounds"], args.concurrency, vocab, args.seed)
        _say(f"kvtier: multi-tenant {out['multitenant']}")
    out["store"] = store.snapshot()
    await eng.close()
    torch.cuda.empty_cache()
    return out


async def _length_row(eng, stream, rng, length: int, vocab: int, h2d_gbps: float) -> dict[str, Any]:
    """Every TTFT case of one prompt length, and the logits after a DDR and a disk restore."""
    from lmdeploy import GenerationConfig

    from kv_pipeline.lmdeploy_engine import compare_top_logits
    from kv_runtime import Tier

    store = eng.store

    async def case(tokens: list[int], *, gpu: bool = False, ddr: bool = True, logits: bool = False) -> tuple:
        store.wait_idle()
        if not gpu:
            await eng.evict_gpu_prefix_cache()
        if not ddr:
            store.drop_tier(Tier.DDR)
        gen = GenerationConfig(max_new_tokens=1, logprobs=TOP_LOGITS if logits else None)
        before = store.snapshot()["loaded_blocks"]
        seconds, last = await _ttft(stream(tokens, gen))
        after = store.snapshot()["loaded_blocks"]
        loaded = {k: after[k] - before[k] for k in after}
        out_logits = {int(k): float(v) for k, v in last.logprobs[0].items()} if logits and last.logprobs else None
        return seconds * 1e3, loaded, out_logits

    prefix = _rand(rng, length - NEW_TOKENS, vocab)
    prompts = [prefix + _rand(rng, NEW_TOKENS, vocab) for _ in range(5)]
    t: dict[str, float] = {}
    t["scratch"], _, ref_logits = await case(prompts[0], logits=True)
    store.cost.prefill_flops_per_s = store.cost.shape.prefill_flops(0, length) / (t["scratch"] / 1e3)
    _, _, gpu_logits = await case(prompts[0], gpu=True, logits=True)  # LMDeploy's own prefix-cache path
    t["gpu_prefix_cache"], _, _ = await case(prompts[1], gpu=True)
    t["ddr"], ddr_loaded, _ = await case(prompts[2])
    _say(f"{length}: scratch {t['scratch']:.0f} ms, GPU cache {t['gpu_prefix_cache']:.0f} ms, DDR {t['ddr']:.0f} ms")
    store.always_load = True
    t["disk"], disk_loaded, _ = await case(prompts[3], ddr=False)
    _say(f"{length}: disk {t['disk']:.0f} ms")
    _, _, ddr_logits = await case(prompts[0], logits=True)
    _, _, disk_logits = await case(prompts[0], ddr=False, logits=True)
    store.always_load = False
    store.wait_idle()
    await eng.evict_gpu_prefix_cache()
    store.drop_tier(Tier.DDR)
    split_out = None
    t0 = time.perf_counter()
    async for out in eng.generate(prompts[4], max_new_tokens=1, split=True):
        split_out = out.metrics
    t["disk_split"] = (time.perf_counter() - t0) * 1e3
    plan = split_out.plan if split_out is not None else "none"
    _say(f"{length}: disk with the cost model's plan ({plan}) {t['disk_split']:.0f} ms")
    cmp_ddr, cmp_disk = compare_top_logits(ddr_logits, ref_logits), compare_top_logits(disk_logits, ref_logits)
    cmp_gpu = compare_top_logits(gpu_logits, ref_logits)
    prefix_bytes = (len(prefix) // store.block_size) * store.block_size * store.layout.bytes_per_token
    return {
        "length": length,
        **{f"ttft_{k}_ms": v for k, v in t.items()},
        "raw_pinned_h2d_GBps": h2d_gbps,
        "ddr_bar_ms": t["gpu_prefix_cache"] + 1.2 * prefix_bytes / (h2d_gbps * 1e9) * 1e3,
        "ddr_blocks_loaded": ddr_loaded["ddr"],
        "disk_blocks_loaded": disk_loaded["disk"],
        "disk_load_GBps": disk_loaded["disk"] * store.layout.block_bytes / (t["disk"] / 1e3) / 1e9,
        "split_plan": plan,
        "logits_ref_top": max(ref_logits.values()),
        "argmax_equal_ddr": cmp_ddr["argmax_equal"],
        "argmax_equal_disk": cmp_disk["argmax_equal"],
        "top_shared_ddr": cmp_ddr["shared"],
        "top_shared_disk": cmp_disk["shared"],
        "logits_max_abs_diff_ddr": cmp_ddr["max_abs_diff"],
        "logits_max_abs_diff_disk": cmp_disk["max_abs_diff"],
        # the same prefix-hit path with LMDeploy's own GPU cache: what its bytes give, for comparison
        "logits_max_abs_diff_gpu_prefix_cache": cmp_gpu["max_abs_diff"],
        "logits_ddr_vs_gpu_prefix_cache": compare_top_logits(ddr_logits, gpu_logits)["max_abs_diff"],
        "logits_disk_vs_gpu_prefix_cache": compare_top_logits(disk_logits, gpu_logits)["max_abs_diff"],
    }


def _model(work: Path, shape: str, lengths: list[int]) -> Path:
    from kv_benchmarks.models import build_model_dir

    return build_model_dir(
        work / f"model-{shape}-bf16",
        shape,
        dtype="bfloat16",
        device="cuda",
        max_position_embeddings=max(lengths) + 4096,
    )


def run(args: argparse.Namespace) -> Report:
    if args.merge:
        return merge([orjson.loads(path.read_bytes()) for path in args.merge])
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("bench e2e --engine lmdeploy needs a CUDA device and LMDeploy 0.18")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` shows where a stuck run waits
    p = _params(args)
    work = Path(args.work_dir)
    model_dir = _model(work, args.lmdeploy_shape, p["lengths"])
    _say(f"model directory {model_dir}")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    base: dict[str, Any] = {}
    if {"tpot", "multitenant"} & set(p["parts"]):
        # The engine without the connector runs first, in its own process: each engine has the GPU to itself.
        baseline_out = work / "lmdeploy-baseline.json"
        cmd = [sys.executable, "-m", "kv_benchmarks.e2e_lmdeploy", str(model_dir), json.dumps(p), str(args.seed)]
        cmd += [str(args.concurrency), str(vocab), str(baseline_out)]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        base = json.loads(baseline_out.read_text())
    ours = asyncio.run(_kvtier(model_dir, work, p, args))
    config = {**p, "shape": args.lmdeploy_shape, "ddr_gib": args.ddr_gib, "disk_gib": args.disk_gib}
    config["concurrency"] = args.concurrency
    return _report(ours, base, config)


def _report(ours: dict[str, Any], base: dict[str, Any], config: dict[str, Any]) -> Report:
    """The figures of one run under the metric names of ``e2e_lmdeploy.json``, each next to its reference."""
    metrics: dict[str, Any] = {"raw_pinned_h2d_GBps": ours["raw_pinned_h2d_GBps"]}
    reference: dict[str, Any] = {
        "raw_pinned_h2d_GBps": "one pinned 1 GiB buffer to the GPU, median of 5, in the run that measured the row",
        "raw_disk_read_GBps": ours["raw_disk_read_GBps"],
    }
    notes = []
    rows = ours.get("rows", [])
    if rows:
        metrics["ttft_ms"] = {str(r["length"]): {c: r[f"ttft_{c}_ms"] for c in CASES} for r in rows}
        metrics["logits_max_abs_diff"] = {
            str(r["length"]): {t: r[f"logits_max_abs_diff_{t}"] for t in ("ddr", "disk")} for r in rows
        }
        metrics["bars"] = {str(r["length"]): _bars(r) for r in rows}
        reference["scratch"] = "the same engine, a prompt it has never seen (full prefill)"
        reference["gpu_prefix_cache"] = "LMDeploy's own GPU prefix cache holding the prefix"
        reference["logits"] = (
            f"LMDeploy's full prefill of the same prompt: the first generated token's top-{TOP_LOGITS} raw logits "
            "(bf16); max abs difference over the token ids both list"
        )
        notes += [
            f"Prompt lengths {', '.join(str(r['length']) for r in rows)}; the last {NEW_TOKENS} tokens are new.",
            "disk: O_DIRECT reads bypass the page cache (not dropped); every DDR copy is dropped first and "
            "LMDeploy's GPU prefix cache emptied; 'disk' loads in full, 'disk_split' follows the cost model "
            "(plan in the rows).",
        ]
    if "tpot_s" in ours:
        metrics["tpot_ratio"] = ours["tpot_s"] / base["tpot_s"]
        reference["tpot_s"] = {"kvtier": ours["tpot_s"], "lmdeploy": base["tpot_s"]}
        notes.append(
            f"Decode: a {config['tpot_prompt']}-token prompt, {config['tpot_tokens']} output tokens, median of 3 "
            "runs, against the same engine without the connector (its own process)."
        )
    if "multitenant" in ours:
        mt, mt_base = ours["multitenant"], base["multitenant"]
        for key, name in (("ttft_p99_ms", "p99_ttft_ms"), ("ttft_p50_ms", "p50_ttft_ms")):
            metrics[f"multitenant_{name}"] = {"kvtier": mt[key], "lmdeploy": mt_base[key]}
        metrics["multitenant_requests_per_s"] = {"kvtier": mt["requests_per_s"], "lmdeploy": mt_base["requests_per_s"]}
        metrics["multitenant_p99_speedup"] = mt_base["ttft_p99_ms"] / mt["ttft_p99_ms"]
        reference["multitenant"] = "the same workload on LMDeploy without the connector (its GPU prefix cache only)"
        notes.append(
            f"LMDeploy's GPU pool: {config['hbm_blocks']} blocks; multi-tenant: {config['mt_sessions']} sessions x "
            f"{config['mt_length']}-token contexts, {config['mt_rounds']} rounds (the first one warms up and is not "
            f"counted), {config['concurrency']} clients."
        )
    metrics["store"] = ours["store"]
    return Report("e2e_lmdeploy", metrics, reference, rows, notes, config)


def _bars(row: dict[str, Any]) -> dict[str, bool]:
    """This benchmark's bars for one length. Logits: kvtier's restores must give exactly what LMDeploy's own prefix
    cache gives for the same prompt (the same prefix-hit path over the same bytes), and so differ from the full
    prefill by no more than that path does (bf16 through a different attention split)."""
    fastest = min(row["ttft_scratch_ms"], row["ttft_disk_ms"])
    bars = {
        "ddr_within_bar": row["ttft_ddr_ms"] <= row["ddr_bar_ms"],
        "disk_split_within_1.1x_of_faster": row["ttft_disk_split_ms"] <= 1.1 * fastest,
        "disk_split_beats_both": row["ttft_disk_split_ms"] < fastest,
    }
    if "logits_max_abs_diff_gpu_prefix_cache" in row:
        tiers = ("ddr", "disk")
        bars["logits_equal_to_gpu_prefix_cache_path"] = all(
            row[f"logits_{t}_vs_gpu_prefix_cache"] == 0.0 and row[f"argmax_equal_{t}"] == 1.0 for t in tiers
        )
        bars["logits_within_gpu_prefix_cache_tolerance"] = all(
            row[f"logits_max_abs_diff_{t}"] <= row["logits_max_abs_diff_gpu_prefix_cache"] for t in tiers
        )
    return bars


def merge(docs: list[dict[str, Any]]) -> Report:
    """One report from runs that each measured some parts on the same machine.

    Per-length figures (rows, ``ttft_ms``, ``logits_max_abs_diff``) are united and their bars judged again from
    the rows (so every run is held to the current bars), a length measured twice
    is refused; run-level figures (decode, multi-tenant) come from the one run that measured them;
    ``raw_pinned_h2d_GBps`` is the lowest of the runs (each row keeps its own run's, which its DDR bar used).
    """
    if len({doc["env"].get("gpu") for doc in docs}) != 1:
        raise ValueError("runs measured on different GPUs do not merge")
    metrics: dict[str, Any] = {"raw_pinned_h2d_GBps": min(d["metrics"]["raw_pinned_h2d_GBps"] for d in docs)}
    reference: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, doc in enumerate(docs):
        m = doc["metrics"]
        lengths = [str(r["length"]) for r in doc["rows"]]
        if set(lengths) & {str(r["length"]) for r in rows}:
            raise ValueError(f"run {i} repeats a length already measured: {lengths}")
        rows += doc["rows"]
        for key in ("ttft_ms", "logits_max_abs_diff"):
            metrics.setdefault(key, {}).update(m.get(key, {}))
        metrics.setdefault("bars", {}).update({str(r["length"]): _bars(r) for r in doc["rows"]})
        for key, value in m.items():
            if key in ("raw_pinned_h2d_GBps", "ttft_ms", "logits_max_abs_diff", "bars", "store"):
                continue
            if key in metrics:
                raise ValueError(f"{key} was measured by more than one run")
            metrics[key] = value
        metrics.setdefault("store", {})[f"run{i}"] = m["store"]
        reference.update({k: v for k, v in doc["reference"].items() if k != "raw_disk_read_GBps"})
        reference.setdefault("raw_disk_read_GBps", {})[f"run{i}"] = doc["reference"]["raw_disk_read_GBps"]
        notes += [f"run{i} ({', '.join(doc['config']['parts'])}): {n}" for n in doc["notes"]]
    rows.sort(key=lambda r: r["length"])
    config = {"runs": [doc["config"] for doc in docs]}
    return Report("e2e_lmdeploy", metrics, reference, rows, notes, config, env=docs[0]["env"])


def _baseline_main(argv: list[str]) -> None:
    model_dir, p_json, seed, concurrency, vocab, out = argv
    result = asyncio.run(_baseline(model_dir, json.loads(p_json), int(seed), int(concurrency), int(vocab)))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _baseline_main(sys.argv[1:])
