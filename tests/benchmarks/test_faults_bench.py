"""The fault and soak benchmark at a tiny scale: every phase reports its figures, and the answers it checked equal
a full prefill, with nothing left pinned.

The bench runs once for the module (two child processes and a model build dominate its time); each phase's bars
are then asserted in a test of its own, so that a phase failing for a known reason is marked there alone.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from kv_benchmarks.faults import DAMAGES, PHASES, judge
from kv_benchmarks.report import write_report
from kv_pipeline.cli import build_parser

# one damage at a time where it shows that undamaged blocks survive, then everything at once (flipped bytes, a cut
# slab, random bytes over both SQLite files, garbage in the manifest)
DAMAGES_RUN = ("truncate", "delete", "all")
TINY = [
    "--damages",
    ",".join(DAMAGES_RUN),
    "--kills",
    "1",
    "--corrupt-rounds",
    "1",
    "--corrupt-prompts",
    "2",
    "--fullfs-requests",
    "6",
    "--requests",
    "8",
    "--cancel-rounds",
    "1",
    "--soak-requests",
    "30",
    "--check-every",
    "10",
]
PHASE_FIGURES = ("faults_injected", "requests", "wrong_answers", "crashes", "leaked_pins", "caching_stalls")


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("faults")
    args = build_parser().parse_args(["bench", "faults", "--work-dir", str(tmp / "w"), *TINY])
    report = args.run(args)
    return orjson.loads(write_report(report, Path(tmp / "out"))["json"].read_bytes())


def test_faults_reports_every_figure(doc):
    m = doc["metrics"]
    for name in (*PHASE_FIGURES, "rss_growth_mib_per_1k_requests", "bars", "verdict", "phases"):
        assert name in m, name
    assert list(m["phases"]) == list(PHASES)
    for name in PHASE_FIGURES:  # the headline figures are the phases' sums
        assert m[name] == sum(p[name] for p in m["phases"].values()), name
    assert m["bars"] == judge(m)
    failed = [n for n, v in m["bars"].items() if v["met"] is False]
    assert m["verdict"] == ("all bars met" if not failed else "not met: " + ", ".join(failed))
    assert doc["notes"][0] == f"Verdict: {m['verdict']}."
    assert [r["phase"] for r in doc["rows"]] == list(PHASES)


def _phase(doc: dict, name: str) -> dict:
    p = doc["metrics"]["phases"][name]
    assert p["requests"] > 0 and p["faults_injected"] >= 0
    assert p["wrong_answers"] == 0, p["errors"]
    assert p["leaked_pins"] == 0, p["errors"]
    return p


def test_kill_answers_after_sigkill_equal_full_prefill(doc):
    p = _phase(doc, "kill")
    assert p["faults_injected"] == 1  # the child was killed, not left to finish
    assert p["crashes"] == 0, p["errors"]
    assert p["prompts_checked"] == p["requests"]


def test_corrupt_slabs_give_misses_never_wrong_answers(doc):
    p = _phase(doc, "corrupt")
    assert set(p["by_damage"]) == set(DAMAGES_RUN) and set(DAMAGES_RUN) <= set(DAMAGES)
    for kind in DAMAGES_RUN:
        assert p["by_damage"][kind]["faults"] > 0, kind
    for kind in ("truncate", "delete"):
        assert p["by_damage"][kind]["crashes"] == 0, (kind, p["errors"])
    # a cut slab loses the blocks past the cut, not those before it
    assert p["by_damage"]["truncate"]["restored_tokens"] > 0


def test_corrupt_metadata_reopens_without_a_crash(doc):
    p = doc["metrics"]["phases"]["corrupt"]
    assert p["by_damage"]["all"]["crashes"] == 0, p["errors"]
    assert p["crashes"] == 0 and p["caching_stalls"] == 0, p["errors"]


def test_fullfs_keeps_answering_with_disk_writes_failing(doc):
    p = _phase(doc, "fullfs")
    assert p["crashes"] == 0, p["errors"]
    assert p["faults_injected"] == p["disk_write_failures"] > 0  # the limit did refuse writes
    # and once space is back, blocks are written again
    assert p["disk_write_failures_after_space_back"] == 0
    assert p["disk_blocks_at_end"] > p["disk_blocks_when_space_came_back"]


def test_cancel_leaves_no_pin_and_completed_streams_are_right(doc):
    p = _phase(doc, "cancel")
    assert p["crashes"] == 0, p["errors"]
    assert p["faults_injected"] == p["outcomes"]["cancelled"] + p["outcomes"]["closed"] > 0
    assert sum(p["outcomes"][k] for k in ("completed", "cancelled", "closed")) == sum(p["planned"].values())


def test_soak_caches_new_prompts_and_restores_old_ones(doc):
    p = _phase(doc, "soak")
    assert p["crashes"] == 0 and p["caching_stalls"] == 0, p["errors"]
    assert p["kinds"]["cache_check"] == 3
    assert p["tokens_restored"] > 0
    assert p["rss_growth_mib_per_1k_requests"] is not None
    assert doc["metrics"]["rss_growth_mib_per_1k_requests"] == p["rss_growth_mib_per_1k_requests"]


def test_bars_are_judged_on_the_figures():
    clean = dict.fromkeys(("wrong_answers", "crashes", "leaked_pins", "caching_stalls"), 0)
    bars = judge({**clean, "rss_growth_mib_per_1k_requests": 4.9})
    assert all(v["met"] for v in bars.values())
    bars = judge({**clean, "crashes": 1, "rss_growth_mib_per_1k_requests": 5.0})
    assert [n for n, v in bars.items() if v["met"] is False] == ["crashes", "rss_growth_mib_per_1k_requests"]
    assert judge({**clean, "rss_growth_mib_per_1k_requests": None})["rss_growth_mib_per_1k_requests"]["met"] is None
