"""The runtime benchmark runs end to end at a tiny scale and reports every figure under its documented name."""

from __future__ import annotations

import orjson
import torch

from kv_benchmarks.report import write_report
from kv_pipeline.cli import build_parser
from kv_runtime.benchmarks import runtime as runtime_bench


def test_runtime_bench_writes_all_figures(tmp_path):
    args = build_parser().parse_args(
        [
            "bench",
            "runtime",
            "--quick",
            "--disk-blocks",
            "4",
            "--repeats",
            "1",
            "--pool-mib",
            "48",
            "--batches",
            "4",
            "--disk-dir",
            str(tmp_path / "disk"),
            "--evict-blocks",
            "1600",
            "--evict-pinned",
            "160",
            "--evict-calls",
            "20",
            "--out",
            str(tmp_path),
        ]
    )
    report = args.run(args)
    paths = write_report(report, tmp_path)
    doc = orjson.loads(paths["json"].read_bytes())
    m = doc["metrics"]
    names = ["disk_read_ratio", "disk_write_ratio", "disk_read_GBps"]
    if torch.cuda.is_available():
        names += ["d2h_ratio", "h2d_ratio", "d2h_GBps", "h2d_GBps"]
    else:
        assert any("skipped" in n for n in doc["notes"])
    for name in names:
        assert m[name] > 0, name
    assert 0 < m["pool_utilization_before_defrag"] <= m["pool_utilization_after_defrag"] <= 1
    assert m["pool_utilization_after_defrag"] >= 0.95
    assert doc["reference"]["raw_disk_read_GBps"] > 0 and doc["reference"]["raw_disk_write_GBps"] > 0
    assert "O_DIRECT" in doc["reference"]["page_cache"]
    assert all("intact: True" in n for n in doc["notes"] if n.startswith("churn"))
    assert m["evict_us_p50"] > 0 and m["evict_blocks_evicted"] == 20
    assert doc["reference"]["evict_setup"]["blocks"] == 1600 and doc["reference"]["evict_setup"]["pinned"] == 160
    assert "evict_us_p99" in paths["md"].read_text()


def test_runtime_bench_eviction_figure_at_quick_scale():
    """The quick eviction section: 100K blocks, 10K pinned, 500 timed calls, each freeing one victim."""
    args = build_parser().parse_args(["bench", "runtime", "--quick"])
    blocks, pinned, calls = runtime_bench.evict_settings(args)
    assert (blocks, pinned, calls) == (100_000, 10_000, 500)
    metrics: dict = {}
    ref: dict = {}
    rows: list = []
    notes: list = []
    runtime_bench.evict_part(blocks, pinned, calls, args.evict_chain, args.seed, metrics, ref, rows, notes)
    for name in ("evict_us_p50", "evict_us_p99", "evict_us_max"):
        assert metrics[name] > 0, name
    assert metrics["evict_us_p50"] <= metrics["evict_us_p99"] <= metrics["evict_us_max"]
    assert metrics["evict_blocks_evicted"] == calls
    assert metrics["evict_bar"] in ("evict_us_p99 <= 20: met", "evict_us_p99 <= 20: not met")
    assert ref["dict_pop_insert_us_p50"] > 0 and ref["dict_pop_insert_us_p99"] > 0
    setup = ref["evict_setup"]
    assert (setup["blocks"], setup["pinned"], setup["calls"]) == (blocks, pinned, calls)
    assert setup["setup_s"] > 0 and setup["reserved_bytes"] >= setup["payload_bytes"]
    (row,) = [r for r in rows if r["figure"] == "evict"]
    assert row["evicted"] == calls and row["freed_bytes"] >= calls * setup["reserved_bytes"]
    assert any("every pinned block kept: True" in n for n in notes)
