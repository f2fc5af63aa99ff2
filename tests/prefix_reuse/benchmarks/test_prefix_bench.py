"""The prefix benchmark runs end to end at a tiny scale and reports every figure under its documented name."""

from __future__ import annotations

import orjson

from kv_benchmarks.report import write_report
from kv_pipeline.cli import build_parser


def test_prefix_bench_writes_all_figures(tmp_path):
    args = build_parser().parse_args(
        [
            "bench",
            "prefix",
            "--quick",
            "--index-blocks",
            "20000",
            "--lookup-tokens",
            "8192",
            "--repeats",
            "20",
            "--out",
            str(tmp_path),
        ]
    )
    report = args.run(args)
    paths = write_report(report, tmp_path)
    doc = orjson.loads(paths["json"].read_bytes())
    m = doc["metrics"]
    for name in ("lookup_128k_p50_ms", "lookup_128k_p99_ms", "indexed_blocks", "bytes_per_indexed_block"):
        assert m[name] > 0, name
    assert m["indexed_blocks"] >= 20000
    assert m["lookup_128k_p50_ms"] <= m["lookup_128k_p99_ms"]
    assert (
        set(m["hit_ratio"])
        == set(m["matched_tokens_mean"])
        == {"shared_system_prompt", "multi_turn", "documents_longest", "documents_multi_hit", "disjoint"}
    )
    assert m["hit_ratio"]["disjoint"] == 0.0
    assert m["hit_ratio"]["shared_system_prompt"] > 0.5
    assert m["hit_ratio"]["documents_multi_hit"] > m["hit_ratio"]["documents_longest"]
    assert doc["reference"]["keys_only_128k_p50_ms"] > 0
    assert {"env", "reference", "metrics"} <= set(doc)
    assert paths["csv"].read_text().startswith("workload,")
    assert "lookup_128k_p99_ms" in paths["md"].read_text()
