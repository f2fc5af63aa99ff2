"""Eviction and migration policies replayed on a request trace: hit ratio per policy per capacity, and Belady.

The trace is Mooncake-format JSONL (``--trace``; default: the shared Mooncake trace beside the repository, else a
generated one). Every policy replays it at each capacity with prefix-hit semantics (a block hits only while all
earlier blocks of its request hit; then every block of the request is stored), bounded in blocks and, separately,
in bytes (the bytes of that many full blocks, so prompt-ending partial blocks take less). Two tiers: DDR at each
capacity over a disk ``--disk-factor`` times larger. The reference, replayed in the same run, is LRU below and
Belady's offline optimum and the unbounded cache above; ``gap_closed`` is the share of the LRU-to-Belady gap a
policy closes. Replays run as independent jobs in ``--jobs`` worker processes (default one per CPU), with a
progress bar on stderr; the report does not depend on how many.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from kv_benchmarks.args import positive_int
from kv_benchmarks.report import Report

REPO = Path(__file__).resolve().parents[2]
SHARED_TRACE = REPO.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
QUICK_REQUESTS = 1200
CLASSIC = ("lru", "arc", "s3-fifo")
# The kvtier policy the bars are judged on, fixed in advance (never picked after the run from the results):
# the most robust across traces (the shared one and generated ones with several sharing patterns).
FLAGSHIP = "kvtier-prefix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=None, help=f"Mooncake-format JSONL (default {SHARED_TRACE})")
    parser.add_argument("--block-tokens", type=positive_int, default=512, help="tokens per hash id of the trace")
    parser.add_argument("--capacities", default="2000,5000,20000", help="comma-separated capacities in blocks")
    parser.add_argument(
        "--bytes-per-token", type=positive_int, default=57344, help="KV bytes per token (default: Qwen2-7B shape, bf16)"
    )
    parser.add_argument("--disk-factor", type=positive_int, default=4, help="disk capacity as a multiple of DDR's")
    parser.add_argument(
        "--migration", default="write-back", choices=("write-through", "write-back", "selective"), help="two-tier"
    )
    parser.add_argument(
        "--synthetic-requests", type=positive_int, default=4000, help="size of the generated fallback trace"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="replays run at once, each in its own process (default: one per available CPU; 1 runs them in-process)",
    )


def _capacities(text: str) -> list[int]:
    try:
        caps = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--capacities must be comma-separated integers, got {text!r}") from None
    if not caps or caps[0] <= 0:
        raise ValueError("--capacities must be positive")
    return caps


def _plot(hit: dict[str, dict[str, float]], caps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per_cap in hit.items():
        style = {"belady": "k--", "unbounded": "k:"}.get(name, "-o")
        ax.plot(caps, [per_cap[str(c)] for c in caps], style, label=name, linewidth=1.5, markersize=4)
    ax.set_xscale("log")
    ax.set_xlabel("capacity (blocks)")
    ax.set_ylabel("hit ratio (blocks)")
    ax.set_title("prefix-hit ratio vs capacity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Replays run as independent jobs, in worker processes when --jobs > 1; each worker receives the prepared trace
# once (pool initializer) and returns plain results, merged by job key, so the report does not depend on the order
# in which jobs finish.
_TRACE = None


def _init_worker(prepared) -> None:
    global _TRACE
    _TRACE = prepared


def _run_job(job: tuple):
    """One replay: (kind, policy, capacity, extra) -> its ``ReplayResult``."""
    from kv_policy import (
        MigrationPolicy,
        make_eviction_policy,
        replay,
        replay_belady,
        replay_two_tier,
        replay_unbounded,
    )

    kind, name, cap, extra = job
    prepared = _TRACE
    if kind == "blocks":
        return replay(prepared, make_eviction_policy(name, capacity=cap), capacity_blocks=cap)
    if kind == "bytes":
        return replay(prepared, make_eviction_policy(name, capacity=cap), capacity_bytes=extra)
    if kind == "belady-blocks":
        return replay_belady(prepared, capacity_blocks=cap)
    if kind == "belady-bytes":
        return replay_belady(prepared, capacity_bytes=extra)
    if kind == "unbounded":
        return replay_unbounded(prepared)
    if kind == "two-tier":
        mode, disk_cap = extra
        return replay_two_tier(
            prepared,
            make_eviction_policy(name, capacity=cap),
            make_eviction_policy(name, capacity=disk_cap),
            MigrationPolicy(mode),
            fast_capacity_blocks=cap,
            slow_capacity_blocks=disk_cap,
        )
    raise ValueError(f"unknown replay job {kind!r}")


# Rough relative replay cost, to start the longest jobs first and keep the workers evenly busy to the end.
_COST = {"kvtier-adaptive": 15.0, "kvtier-lhd": 2.0}


def _cost(job: tuple) -> float:
    kind, name, cap, _ = job
    return _COST.get(name, 1.0) * (2.0 if kind == "two-tier" else 1.0) * (1.0 + cap / 20000)


def _run_jobs(prepared, jobs: list[tuple], workers: int) -> dict[tuple, object]:
    """Every job's result by job, with a progress bar on stderr (one tick per finished replay)."""
    from tqdm import tqdm

    order = sorted(jobs, key=_cost, reverse=True)
    results: dict[tuple, object] = {}
    with tqdm(total=len(jobs), desc="bench policy", unit="replay", file=sys.stderr, dynamic_ncols=True) as bar:
        if workers <= 1:
            _init_worker(prepared)
            for job in order:
                bar.set_postfix_str(f"{job[1]} {job[0]} {job[2]}")
                results[job] = _run_job(job)
                bar.update()
            _init_worker(None)
            return results
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(prepared,)) as pool:
            futures = {pool.submit(_run_job, job): job for job in order}
            for done in as_completed(futures):
                job = futures[done]
                results[job] = done.result()
                bar.set_postfix_str(f"{job[1]} {job[0]} {job[2]}")
                bar.update()
    return results


def _default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> Report:
    from kv_policy import (
        EVICTION_POLICIES,
        ModelShape,
        PreparedTrace,
        SyntheticTraceConfig,
        read_trace,
        synthetic_trace,
    )

    caps = _capacities(args.capacities)
    notes: list[str] = []
    limit = QUICK_REQUESTS if args.quick else None
    trace_path = args.trace if args.trace is not None else (SHARED_TRACE if SHARED_TRACE.exists() else None)
    if trace_path is not None:
        trace = read_trace(trace_path, limit=limit)
        source = str(trace_path)
    else:
        n = min(args.synthetic_requests, QUICK_REQUESTS) if args.quick else args.synthetic_requests
        trace = list(synthetic_trace(SyntheticTraceConfig(requests=n, block_tokens=args.block_tokens, seed=args.seed)))
        source = f"synthetic ({n} requests, seed {args.seed}): the shared trace was not found at {SHARED_TRACE}"
        notes.append(f"Trace generated, not read: {source}.")
    if args.quick:
        notes.append(f"--quick: the first {len(trace)} requests of the trace only.")
    shape = ModelShape.qwen2_7b()
    prepared = PreparedTrace.build(
        trace, block_tokens=args.block_tokens, bytes_per_token=args.bytes_per_token, shape=shape
    )
    full_block_bytes = args.block_tokens * args.bytes_per_token
    names = list(EVICTION_POLICIES)
    best_kvtier = FLAGSHIP
    modes = ("write-through", "write-back", "selective")

    jobs: list[tuple] = [("unbounded", "unbounded", 0, None)]
    for cap in caps:
        cap_bytes = cap * full_block_bytes
        disk_cap = args.disk_factor * cap
        jobs += [("blocks", n, cap, None) for n in names]
        jobs += [("bytes", n, cap, cap_bytes) for n in names]
        jobs += [("belady-blocks", "belady", cap, None), ("belady-bytes", "belady", cap, cap_bytes)]
        jobs += [("two-tier", n, cap, (args.migration, disk_cap)) for n in names]
        jobs += [("two-tier", best_kvtier, cap, (m, disk_cap)) for m in modes if m != args.migration]
        jobs.append(("belady-blocks", "belady", (1 + args.disk_factor) * cap, None))
    jobs = list(dict.fromkeys(jobs))  # a two-tier Belady capacity may equal a one-tier one: replay it once
    workers = min(args.jobs if args.jobs is not None else _default_jobs(), len(jobs))
    done = _run_jobs(prepared, jobs, workers)

    hit: dict[str, dict[str, float]] = {n: {} for n in [*names, "belady", "unbounded"]}
    hit_bytes_cap: dict[str, dict[str, float]] = {n: {} for n in [*names, "belady"]}
    saved: dict[str, dict[str, float]] = {n: {} for n in hit}
    moved: dict[str, dict[str, dict[str, int]]] = {n: {} for n in hit}
    rows = []
    unbounded = done[("unbounded", "unbounded", 0, None)]
    for cap in caps:
        key = str(cap)
        cap_bytes = cap * full_block_bytes
        results = {n: done[("blocks", n, cap, None)] for n in names}
        results["belady"] = done[("belady-blocks", "belady", cap, None)]
        results["unbounded"] = unbounded
        for n, r in results.items():
            hit[n][key] = r.hit_ratio
            saved[n][key] = r.saved_compute_ratio
            moved[n][key] = dict(r.bytes_moved)
        for n in names:
            hit_bytes_cap[n][key] = done[("bytes", n, cap, cap_bytes)].hit_ratio
        hit_bytes_cap["belady"][key] = done[("belady-bytes", "belady", cap, cap_bytes)].hit_ratio

    gap: dict[str, dict[str, float]] = {n: {} for n in names}
    for cap in caps:
        key = str(cap)
        span = hit["belady"][key] - hit["lru"][key]
        for n in names:
            gap[n][key] = (hit[n][key] - hit["lru"][key]) / span if span > 1e-12 else 0.0

    two_tier: dict[str, dict[str, dict]] = {n: {} for n in names}
    migration_modes: dict[str, dict[str, dict]] = {}
    for cap in caps:
        disk_cap = args.disk_factor * cap
        for n in names:
            r = done[("two-tier", n, cap, (args.migration, disk_cap))]
            two_tier[n][str(cap)] = {
                "hit_ratio": r.hit_ratio,
                "ddr_hit_ratio": r.tier_hits["ddr"] / prepared.total_blocks,
                "disk_hit_ratio": r.tier_hits["disk"] / prepared.total_blocks,
                "saved_compute": r.saved_compute_ratio,
                "bytes_moved": r.bytes_moved,
            }
    kvtier_names = [n for n in names if n.startswith("kvtier-")]
    for mode in modes:
        migration_modes[mode] = {}
        for cap in caps:
            r = done[("two-tier", best_kvtier, cap, (mode, args.disk_factor * cap))]
            migration_modes[mode][str(cap)] = {
                "hit_ratio": r.hit_ratio,
                "disk_hit_ratio": r.tier_hits["disk"] / prepared.total_blocks,
                "ddr_to_disk_bytes": r.bytes_moved["ddr_to_disk"],
            }
    two_tier_belady = {
        str(c): done[("belady-blocks", "belady", (1 + args.disk_factor) * c, None)].hit_ratio for c in caps
    }

    small = [c for c in caps if c < prepared.distinct_blocks / 4]

    def bars_of(name: str) -> dict:
        ratio = {str(c): hit[name][str(c)] / max(hit["lru"][str(c)], 1e-12) for c in caps}
        return {
            "never_below_best_classic": all(
                hit[name][str(c)] >= max(hit[n][str(c)] for n in CLASSIC) - 1e-12 for c in caps
            ),
            "ratio_to_lru": ratio,
            "small_capacity_1_5x_lru": all(ratio[str(c)] >= 1.5 for c in small) if small else None,
        }

    bars = {"best_kvtier_policy": best_kvtier, "small_capacities": small, **bars_of(best_kvtier)}
    bars["per_kvtier_policy"] = {n: bars_of(n) for n in kvtier_names}

    for cap in caps:
        key = str(cap)
        for n in [*names, "belady", "unbounded"]:
            rows.append(
                {
                    "policy": n,
                    "capacity_blocks": cap,
                    "hit_ratio": hit[n][key],
                    "hit_ratio_byte_capacity": hit_bytes_cap.get(n, {}).get(key, ""),
                    "saved_compute": saved[n][key],
                    "gap_closed": gap.get(n, {}).get(key, ""),
                    "bytes_into_tier": moved[n][key]["into_tier"],
                    "bytes_out_of_tier": moved[n][key]["out_of_tier"],
                    "two_tier_hit_ratio": two_tier.get(n, {}).get(key, {}).get("hit_ratio", ""),
                    "two_tier_disk_hit_ratio": two_tier.get(n, {}).get(key, {}).get("disk_hit_ratio", ""),
                }
            )

    plot_path = Path(args.out) / "policy.png"
    _plot(hit, caps, plot_path)
    notes += [
        f"Trace: {source}; {len(trace)} requests, {prepared.total_blocks} blocks, "
        f"{prepared.distinct_blocks} distinct, {args.block_tokens} tokens per block.",
        "Prefix-hit semantics: a block hits only while every earlier block of its request hit; every block of a "
        "request is then stored (pinned while the request is processed).",
        f"Byte capacities: capacity x {full_block_bytes} bytes (one full block at {args.bytes_per_token} bytes per "
        "token); a prompt-ending partial block occupies only its tokens' bytes.",
        f"Two tiers: DDR at the capacity over a disk {args.disk_factor}x larger, same policy in both, migration "
        f"{args.migration}; migration_modes compares the three write modes for {best_kvtier}; "
        "two_tier_belady is single-tier Belady at DDR+disk capacity.",
        "saved_compute: share of the trace's prefill FLOPs (linear + quadratic attention, Qwen2-7B shape) the hits "
        "save. gap_closed: (policy - lru) / (belady - lru).",
        f"Bars are judged on {FLAGSHIP}, fixed before the run; bars.per_kvtier_policy gives every kvtier policy's.",
        f"Plot: {plot_path}.",
    ]
    metrics = {
        "hit_ratio": hit,
        "hit_ratio_byte_capacity": hit_bytes_cap,
        "saved_compute": saved,
        "bytes_moved": moved,
        "gap_closed": gap,
        "two_tier": two_tier,
        "two_tier_belady": two_tier_belady,
        "migration_modes": migration_modes,
        "bars": bars,
    }
    reference = {
        "lru_hit_ratio": hit["lru"],
        "belady_hit_ratio": hit["belady"],
        "unbounded_hit_ratio": unbounded.hit_ratio,
        "total_blocks": prepared.total_blocks,
        "distinct_blocks": prepared.distinct_blocks,
        "requests": len(trace),
    }
    config = {
        "trace": source,
        "block_tokens": args.block_tokens,
        "capacities": caps,
        "bytes_per_token": args.bytes_per_token,
        "disk_factor": args.disk_factor,
        "migration": args.migration,
        "quick": args.quick,
        "plot": str(plot_path),
    }
    return Report("policy", metrics, reference, rows, notes, config)
