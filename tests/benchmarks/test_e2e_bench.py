"""The end-to-end benchmark and the demo run at a tiny scale and report every documented figure."""

from __future__ import annotations

import orjson

from kv_benchmarks.report import write_report
from kv_pipeline.cli import build_parser, main

TINY = [
    "--sessions",
    "2",
    "--turns",
    "2",
    "--system-tokens",
    "64",
    "--document-tokens",
    "256",
    "--turn-tokens",
    "64",
    "--block-size",
    "32",
]


def test_e2e_bench_reports_cached_and_baseline(tmp_path):
    args = build_parser().parse_args(["bench", "e2e", "--quick", "--work-dir", str(tmp_path / "w"), *TINY])
    report = args.run(args)
    doc = orjson.loads(write_report(report, tmp_path)["json"].read_bytes())
    m = doc["metrics"]
    for name in ("ttft_p50_ms", "ttft_p99_ms", "requests_per_s"):
        assert m[name]["cached"] > 0 and m[name]["baseline"] > 0, name
    assert m["ttft_speedup_p50"] > 0
    assert set(m["plan_share"]) == {"load", "recompute", "both"}
    assert abs(sum(m["plan_share"].values()) - 1.0) < 1e-9
    assert m["logits_max_abs_diff"] < 1e-3  # fp32 on CPU: restored-prefix prefill equals the full one
    assert m["first_token_agreement"] == 1.0
    assert m["reused_tokens"]["ddr"] + m["reused_tokens"]["disk"] > 0  # later turns reuse the shared prefix
    assert len(doc["rows"]) == 4


def test_demo_writes_report_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--work-dir", str(tmp_path / "w"), *TINY]) == 0
    for name in ("demo.json", "demo.csv", "demo.md", "demo.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "TTFT p50" in printed and "from scratch" in printed
