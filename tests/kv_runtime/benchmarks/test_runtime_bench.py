"""The runtime benchmark runs end to end at a tiny scale and reports every figure under its documented name."""

from __future__ import annotations

import orjson
import torch

from kv_benchmarks.report import write_report
from kv_pipeline.cli import build_parser


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
            "--out",
            str(tmp_path),
        ]
    )
    report = args.run(args)
    doc = orjson.loads(write_report(report, tmp_path)["json"].read_bytes())
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
