"""``kvtier demo``: the main job, on any machine.

Builds a small random-weight Qwen2-architecture model locally (no downloads), then runs a multi-turn
long-context streaming workload through kvtier on the transformers engine (CPU unless a GPU is there):
several sessions share a system prompt and a document and grow turn by turn, with more sessions than DDR
holds, so restored prefixes come from DDR and from disk. Every request is also prefilled from scratch in the
same run, so the speed-up shown is measured. Writes ``demo.json``, ``demo.csv``, ``demo.md`` and ``demo.png``.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import asdict
from pathlib import Path

from kv_benchmarks import e2e
from kv_benchmarks.report import Report, write_report
from kv_benchmarks.workload import plot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("kvtier-demo"), help="report directory")
    parser.add_argument("--quick", action="store_true", help="a smaller workload")
    e2e.add_workload_arguments(parser)
    parser.set_defaults(work_dir=Path("kvtier-demo/work"))


def main(args: argparse.Namespace) -> int:
    print("kvtier demo: building a random-weight model and running a multi-session long-context workload")
    print("(each request is served through kvtier and, for reference, prefilled from scratch)\n")
    results, summary, _snapshot, config = asyncio.run(e2e.run_streaming(args, progress=True))
    rows = [asdict(r) for r in results]
    print(
        "\n| session.turn | prompt tokens | TTFT kvtier (ms) | TTFT from scratch (ms) | plan | from DDR | from disk |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.session}.{r.turn} | {r.prompt_tokens} | {r.ttft_cached_ms:.0f} | {r.ttft_baseline_ms:.0f} "
            f"| {r.plan} | {r.reused_ddr} | {r.reused_disk} |"
        )
    p50 = summary["ttft_p50_ms"]
    print(
        f"\nTTFT p50: {p50['cached']:.0f} ms with kvtier vs {p50['baseline']:.0f} ms from scratch "
        f"({summary['ttft_speedup_p50']:.1f}x); p99 {summary['ttft_p99_ms']['cached']:.0f} vs "
        f"{summary['ttft_p99_ms']['baseline']:.0f} ms"
    )
    print(
        f"prompt tokens restored: {summary['reused_tokens']['ddr']} from DDR, {summary['reused_tokens']['disk']} "
        f"from disk; computed {summary['computed_tokens']} of {summary['prompt_tokens']}"
    )
    print(
        f"correctness: max |logits(kvtier) - logits(full prefill)| = {summary['logits_max_abs_diff']:.2e}, "
        f"first tokens equal in {summary['first_token_agreement']:.0%} of requests"
    )
    report = Report("demo", summary, {"baseline": "full prefill from scratch, same run"}, rows, [], config)
    paths = write_report(report, args.out)
    plot(results, args.out / "demo.png")
    print("\nwrote " + ", ".join(str(p) for p in [*paths.values(), args.out / "demo.png"]))
    return 0
