"""The long-context streaming workload shared by ``kvtier demo`` and ``kvtier bench e2e``.

Several sessions (browser tabs, chats, agents) share one system prompt and one document; each grows turn by
turn with its own questions and answers. Requests arrive round-robin across sessions, so by the time a session
comes back its history may have left the fast tier: more contexts than DDR holds, the rest on disk.

Each request is served twice in the same run: through kvtier, and from scratch on the same model object
(a full prefill, the reference), so the speed-up is measured, never assumed. The first greedy token of both
is recorded too; with a peaked-logits model they must agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kv_benchmarks.models import synthetic_text


@dataclass(frozen=True, slots=True)
class Turn:
    session: int
    turn: int
    tokens: list[int]


@dataclass(slots=True)
class TurnResult:
    session: int
    turn: int
    prompt_tokens: int
    ttft_cached_ms: float
    ttft_baseline_ms: float
    plan: str
    reused_ddr: int
    reused_disk: int
    computed_tokens: int
    load_misses: int
    first_token_cached: int
    first_token_baseline: int
    logits_max_abs_diff: float


def _tokens(encode: Callable[[str], list[int]], rng: np.random.Generator, n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out += encode(" " + synthetic_text(rng, max(16, n // 2)))
    return out[:n]


def build_turns(
    encode: Callable[[str], list[int]],
    *,
    sessions: int,
    turns: int,
    system_tokens: int,
    document_tokens: int,
    turn_tokens: int,
    seed: int = 0,
) -> list[Turn]:
    """Round-robin turns of ``sessions`` sessions sharing a system prompt and a document."""
    if min(sessions, turns, system_tokens, document_tokens, turn_tokens) <= 0:
        raise ValueError("sessions, turns and all token counts must be positive")
    rng = np.random.default_rng(seed)
    shared = _tokens(encode, rng, system_tokens) + _tokens(encode, rng, document_tokens)
    histories = [list(shared) for _ in range(sessions)]
    out = []
    for t in range(turns):
        for s in range(sessions):
            histories[s] += _tokens(encode, rng, turn_tokens)  # the user's turn (and the previous answer)
            out.append(Turn(s, t, list(histories[s])))
    return out


async def run_turns(
    engine, turns: list[Turn], *, on_done: Callable[[TurnResult], None] | None = None
) -> list[TurnResult]:
    """Serve every turn through ``engine`` and from scratch on the same model; returns per-turn results."""
    import asyncio

    model = engine.model
    results = []
    for turn in turns:
        logits_cached, m = await engine.prompt_logits(turn.tokens, session_id=f"session-{turn.session}")
        start = time.perf_counter()
        logits_full = await asyncio.to_thread(model.prefill, torch.tensor(turn.tokens), model.new_cache())
        baseline_ms = (time.perf_counter() - start) * 1e3
        await engine.scheduler.drain()  # write-back completes between turns, as it would while the user reads
        r = TurnResult(
            session=turn.session,
            turn=turn.turn,
            prompt_tokens=len(turn.tokens),
            ttft_cached_ms=m.ttft_ms,
            ttft_baseline_ms=baseline_ms,
            plan=m.plan,
            reused_ddr=m.reused_tokens.get("ddr", 0),
            reused_disk=m.reused_tokens.get("disk", 0),
            computed_tokens=m.computed_tokens,
            load_misses=m.load_misses,
            first_token_cached=int(torch.argmax(logits_cached)),
            first_token_baseline=int(torch.argmax(logits_full)),
            logits_max_abs_diff=float((logits_cached - logits_full).abs().max()),
        )
        results.append(r)
        if on_done is not None:
            on_done(r)
    return results


def summarize(results: list[TurnResult]) -> dict:
    """TTFT percentiles with and without the cache, speed-up, plan shares, reuse per tier, correctness."""
    cached = np.array([r.ttft_cached_ms for r in results])
    base = np.array([r.ttft_baseline_ms for r in results])
    n = len(results)
    plans = {p: sum(r.plan == p for r in results) / n for p in ("load", "recompute", "both")}
    return {
        "ttft_p50_ms": {"cached": float(np.percentile(cached, 50)), "baseline": float(np.percentile(base, 50))},
        "ttft_p99_ms": {"cached": float(np.percentile(cached, 99)), "baseline": float(np.percentile(base, 99))},
        "ttft_speedup_p50": float(np.percentile(base, 50) / np.percentile(cached, 50)),
        "requests_per_s": {"cached": float(n / (cached.sum() / 1e3)), "baseline": float(n / (base.sum() / 1e3))},
        "plan_share": plans,
        "reused_tokens": {
            "ddr": int(sum(r.reused_ddr for r in results)),
            "disk": int(sum(r.reused_disk for r in results)),
        },
        "prompt_tokens": int(sum(r.prompt_tokens for r in results)),
        "computed_tokens": int(sum(r.computed_tokens for r in results)),
        "load_misses": int(sum(r.load_misses for r in results)),
        "logits_max_abs_diff": float(max(r.logits_max_abs_diff for r in results)),
        "first_token_agreement": float(sum(r.first_token_cached == r.first_token_baseline for r in results) / n),
        "requests": n,
    }


def plot(results: list[TurnResult], path) -> None:
    """TTFT per request, with and without kvtier, and where each restored prefix came from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(results))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[2, 1])
    ax1.plot(x, [r.ttft_baseline_ms for r in results], "o-", label="from scratch (full prefill)")
    ax1.plot(x, [r.ttft_cached_ms for r in results], "s-", label="kvtier")
    ax1.set_ylabel("TTFT (ms)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("Time to first token per request (sessions round-robin, growing turn by turn)")
    ddr = np.array([r.reused_ddr for r in results])
    disk = np.array([r.reused_disk for r in results])
    comp = np.array([r.computed_tokens for r in results])
    ax2.bar(x, ddr, label="restored from DDR")
    ax2.bar(x, disk, bottom=ddr, label="restored from disk")
    ax2.bar(x, comp, bottom=ddr + disk, label="computed")
    ax2.set_ylabel("prompt tokens")
    ax2.set_xlabel("request (session.turn)")
    ax2.set_xticks(x, [f"{r.session}.{r.turn}" for r in results], rotation=90, fontsize=7)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
