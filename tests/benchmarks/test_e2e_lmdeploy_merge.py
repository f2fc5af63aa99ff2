"""Merging the LMDeploy benchmark's part reports (CPU: the reports are files from GPU runs)."""

from __future__ import annotations

import copy
from pathlib import Path

import orjson
import pytest

from kv_benchmarks.e2e_lmdeploy import merge

RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu" / "e2e_lmdeploy_runs"


def _load(name: str) -> dict:
    return orjson.loads((RUNS / name).read_bytes())


def test_parts_unite_and_keep_their_references():
    ttft_run, long_run = _load("run3_32k_5rounds.json"), _load("run2_64k_128k.json")
    report = merge([ttft_run, long_run])
    m = report.metrics
    assert sorted(m["ttft_ms"], key=int) == ["32768", "65536", "131072"]
    assert [r["length"] for r in report.rows] == [32768, 65536, 131072]
    assert m["tpot_ratio"] == ttft_run["metrics"]["tpot_ratio"]
    assert m["multitenant_p99_ttft_ms"] == ttft_run["metrics"]["multitenant_p99_ttft_ms"]
    assert m["raw_pinned_h2d_GBps"] == min(d["metrics"]["raw_pinned_h2d_GBps"] for d in (ttft_run, long_run))
    assert set(m["store"]) == {"run0", "run1"}
    assert report.env == ttft_run["env"]  # where it was measured, not where it was merged


def test_a_length_measured_twice_is_refused():
    with pytest.raises(ValueError, match="repeats a length"):
        merge([_load("run3_32k_5rounds.json"), _load("run1_32k_3rounds.json")])


def test_a_run_level_figure_measured_twice_is_refused():
    first = _load("run3_32k_5rounds.json")
    second = _load("run2_64k_128k.json")
    second["metrics"]["tpot_ratio"] = 1.0
    with pytest.raises(ValueError, match="tpot_ratio"):
        merge([first, second])


def test_runs_on_different_gpus_are_refused():
    other = copy.deepcopy(_load("run2_64k_128k.json"))
    other["env"]["gpu"] = "another GPU"
    with pytest.raises(ValueError, match="different GPUs"):
        merge([_load("run3_32k_5rounds.json"), other])
