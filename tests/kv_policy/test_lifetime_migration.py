"""Lifetime prediction from the past only, and the migration decisions each write mode makes."""

from __future__ import annotations

import math

import pytest

from kv_policy import BlockInfo, LifetimePredictor, MigrationPolicy


def test_periodic_key_is_predicted_at_its_period():
    p = LifetimePredictor()
    for t in range(0, 100, 10):
        p.observe("ctx", float(t))
    assert p.expected_gap("ctx") == pytest.approx(10.0)
    assert p.next_use("ctx", 92.0) == pytest.approx(100.0)
    assert p.next_use("unknown", 92.0) == math.inf


def test_reuse_probability_learns_that_shared_blocks_return_and_one_offs_do_not():
    p = LifetimePredictor(horizon_gaps=2.0)
    t = 0.0
    for i in range(300):  # every step: one shared block used again, one one-off block used once
        t += 1.0
        p.observe("shared", t)
        p.observe(("one-off", i), t)
    assert p.reuse_probability("shared") > 0.9
    assert p.reuse_probability(("one-off", 0)) < 0.1
    assert p.next_use(("one-off", 0), t) == math.inf  # idle far past its horizon


def test_memory_is_bounded():
    p = LifetimePredictor(max_keys=50)
    for i in range(500):
        p.observe(i, float(i))
    assert len(p) == 50


def _info(accesses: int) -> BlockInfo:
    return BlockInfo(None, 10, 0, 0.0, 0.0, 0.0, accesses=accesses)


def test_write_modes():
    wt, wb, sel = MigrationPolicy("write-through"), MigrationPolicy("write-back"), MigrationPolicy("selective")
    assert wt.on_store(_info(1)).write and not wb.on_store(_info(1)).write and not sel.on_store(_info(1)).write
    assert sel.on_access(_info(2), in_next_tier=False).write
    assert not sel.on_access(_info(2), in_next_tier=True).write
    assert wb.on_evict("b", _info(1), in_next_tier=False).action == "demote"
    assert wb.on_evict("b", _info(1), in_next_tier=True).action == "drop"
    assert sel.on_evict("b", _info(1), in_next_tier=False).action == "drop"
    assert sel.on_evict("b", _info(3), in_next_tier=False).action == "demote"
    with pytest.raises(ValueError):
        MigrationPolicy("sometimes")  # type: ignore[arg-type]


def test_prefetch_promotes_blocks_due_within_the_horizon_soonest_first():
    pred = LifetimePredictor()
    for t in (0.0, 10.0, 20.0):
        pred.observe("every10", t)
    for t in (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0):
        pred.observe("every2", t)
    mig = MigrationPolicy("selective", predictor=pred, prefetch_horizon_s=5.0)
    got = mig.prefetch(["every10", "every2", "never"], 20.5, source="disk", target="ddr")
    assert [p.block_id for p in got] == ["every2"]
    assert got[0].source == "disk" and got[0].target == "ddr" and got[0].deadline == pytest.approx(22.0)
    mig_late = MigrationPolicy("selective", predictor=pred, prefetch_horizon_s=20.0)
    assert [p.block_id for p in mig_late.prefetch(["every10", "every2"], 20.5, source="disk", target="ddr")] == [
        "every2",
        "every10",
    ]
