"""The policy benchmark runs end to end on a small generated trace and reports every figure under its name."""

from __future__ import annotations

import orjson

from kv_benchmarks.report import write_report
from kv_pipeline.cli import build_parser
from kv_policy import SyntheticTraceConfig, synthetic_trace, write_trace


def test_policy_bench_writes_all_figures(tmp_path):
    trace = tmp_path / "trace.jsonl"
    write_trace(synthetic_trace(SyntheticTraceConfig(requests=300, seed=2)), trace)
    out = tmp_path / "out"
    args = build_parser().parse_args(
        ["bench", "policy", "--quick", "--trace", str(trace), "--capacities", "200,800,3000", "--out", str(out)]
    )
    paths = write_report(args.run(args), out)
    doc = orjson.loads(paths["json"].read_bytes())
    m = doc["metrics"]
    hit = m["hit_ratio"]
    assert {"lru", "lfu", "arc", "s3-fifo", "belady", "unbounded"} <= set(hit)
    assert any(name.startswith("kvtier-") for name in hit)
    for name, per_cap in hit.items():
        assert set(per_cap) == {"200", "800", "3000"}, name
        assert all(0.0 < v <= hit["unbounded"]["200"] + 1e-12 for v in per_cap.values()), name
    assert hit["lru"]["200"] <= hit["lru"]["3000"]
    for key in ("hit_ratio_byte_capacity", "saved_compute", "bytes_moved", "gap_closed", "two_tier", "bars"):
        assert m[key], key
    assert m["gap_closed"]["lru"]["800"] == 0.0
    assert m["two_tier"]["lru"]["200"]["hit_ratio"] >= hit["lru"]["200"]
    assert set(m["migration_modes"]) == {"write-through", "write-back", "selective"}
    assert m["bars"]["best_kvtier_policy"] == "kvtier-prefix"  # fixed in advance, not picked from the results
    assert set(m["bars"]["per_kvtier_policy"]) == {n for n in hit if n.startswith("kvtier-")}
    assert all(r > 0 for r in m["bars"]["ratio_to_lru"].values())
    assert doc["reference"]["belady_hit_ratio"] == hit["belady"]
    assert (out / "policy.png").stat().st_size > 0
    assert paths["csv"].read_text().startswith("policy,")
    assert "hit_ratio.belady.200" in paths["md"].read_text()


def test_policy_bench_figures_do_not_depend_on_worker_processes(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    write_trace(synthetic_trace(SyntheticTraceConfig(requests=150, seed=5)), trace)
    reports = {}
    for jobs in ("1", "2"):
        out = str(tmp_path / f"out-{jobs}")
        args = build_parser().parse_args(
            ["bench", "policy", "--trace", str(trace), "--capacities", "100,400", "--jobs", jobs, "--out", out]
        )
        reports[jobs] = args.run(args)
        progress = capsys.readouterr().err
        assert "bench policy" in progress and "100%" in progress  # a progress bar on stderr, one tick per replay
    serial, parallel = reports["1"], reports["2"]
    assert serial.metrics == parallel.metrics
    assert serial.reference == parallel.reference
    assert serial.rows == parallel.rows
