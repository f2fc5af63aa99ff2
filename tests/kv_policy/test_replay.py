"""Replay semantics against brute-force references, and the published reference points on the shared trace."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_policy import (
    EVICTION_POLICIES,
    LRUPolicy,
    MigrationPolicy,
    ModelShape,
    PreparedTrace,
    SyntheticTraceConfig,
    TraceRequest,
    make_eviction_policy,
    read_trace,
    replay,
    replay_belady,
    replay_two_tier,
    replay_unbounded,
    synthetic_trace,
)

SHAPE = ModelShape.qwen2_7b()
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"


@st.composite
def chained_traces(draw) -> list[TraceRequest]:
    """Small traces whose ids are chained: a request extends a random earlier one (or starts fresh)."""
    n = draw(st.integers(1, 25))
    out: list[TraceRequest] = []
    next_id = 0
    for i in range(n):
        if out and draw(st.booleans()):
            base = out[draw(st.integers(0, len(out) - 1))].hash_ids
            prefix = base[: draw(st.integers(1, len(base)))]
        else:
            prefix = ()
        fresh = draw(st.integers(0 if prefix else 1, 4))
        ids = prefix + tuple(range(next_id, next_id + fresh))
        next_id += fresh
        out.append(TraceRequest(float(i), len(ids) * 4 - draw(st.integers(0, 3)), 1, ids))
    return out


def _prepare(trace):
    return PreparedTrace.build(trace, block_tokens=4, bytes_per_token=2, shape=SHAPE)


def _brute_lru(trace, cap):
    """List-scan LRU; a request's own blocks are held while it runs (a request longer than the cache stops)."""
    cache: list[int] = []  # least recent first
    hits = 0
    for r in trace:
        for h in r.hash_ids:
            if h not in cache:
                break
            hits += 1
        held: list[int] = []
        for h in r.hash_ids:
            if h in cache:
                cache.remove(h)
            elif len(cache) >= cap:
                free = [b for b in cache if b not in held]
                if not free:
                    break
                cache.remove(free[0])
            cache.append(h)
            held.append(h)
    return hits


def _brute_belady(trace, cap):
    flat = [h for r in trace for h in r.hash_ids]
    cache: set[int] = set()
    hits = pos = 0
    for r in trace:
        for h in r.hash_ids:
            if h not in cache:
                break
            hits += 1
        for h in r.hash_ids:
            pos += 1
            if h not in cache and len(cache) >= cap:

                def next_use(b, start=pos):
                    rest = flat[start:]
                    return rest.index(b) if b in rest else len(flat)

                cache.remove(max(sorted(cache), key=next_use))
            cache.add(h)
    return hits


@settings(max_examples=60, deadline=None)
@given(chained_traces(), st.integers(1, 12))
def test_lru_replay_matches_brute_force(trace, cap):
    res = replay(_prepare(trace), LRUPolicy(), capacity_blocks=cap)
    assert res.hit_blocks == _brute_lru(trace, cap)
    assert res.hit_blocks <= replay_unbounded(_prepare(trace)).hit_blocks


@settings(max_examples=60, deadline=None)
@given(chained_traces(), st.integers(1, 12))
def test_belady_matches_brute_force(trace, cap):
    assert replay_belady(_prepare(trace), capacity_blocks=cap).hit_blocks == _brute_belady(trace, cap)


@settings(max_examples=30, deadline=None)
@given(chained_traces(), st.integers(1, 12), st.sampled_from(sorted(EVICTION_POLICIES)))
def test_every_policy_within_unbounded_and_capacity(trace, cap, name):
    pt = _prepare(trace)
    res = replay(pt, make_eviction_policy(name, capacity=cap), capacity_blocks=cap)
    assert 0 <= res.hit_blocks <= replay_unbounded(pt).hit_blocks
    assert 0.0 <= res.saved_compute_ratio <= 1.0
    by_bytes = replay(pt, make_eviction_policy(name, capacity=cap), capacity_bytes=cap * 8)
    assert by_bytes.hit_blocks <= replay_unbounded(pt).hit_blocks


def test_unbounded_is_one_minus_distinct_share_on_chained_ids():
    pt = _prepare(list(synthetic_trace(SyntheticTraceConfig(requests=300, block_tokens=4, seed=3))))
    assert replay_unbounded(pt).hit_blocks == pt.total_blocks - pt.distinct_blocks


def test_two_tier_hits_split_by_tier_and_bytes_follow_the_write_mode():
    pt = _prepare(list(synthetic_trace(SyntheticTraceConfig(requests=400, block_tokens=4, seed=5))))
    single = replay(pt, LRUPolicy(), capacity_blocks=100)
    results = {}
    for mode in ("write-through", "write-back", "selective"):
        r = replay_two_tier(
            pt, LRUPolicy(), LRUPolicy(), MigrationPolicy(mode), fast_capacity_blocks=100, slow_capacity_blocks=400
        )
        assert r.tier_hits["ddr"] + r.tier_hits["disk"] == r.hit_blocks
        # DDR holds what the single tier holds; past a disk hit the prefix goes on, so DDR can only hit more
        assert r.tier_hits["ddr"] >= single.hit_blocks
        assert r.hit_blocks >= single.hit_blocks
        assert r.bytes_moved["disk_to_ddr"] == 0 or r.tier_hits["disk"] > 0
        results[mode] = r
    assert results["write-through"].bytes_moved["ddr_to_disk"] >= results["selective"].bytes_moved["ddr_to_disk"]
    assert results["write-back"].tier_hits["disk"] > 0


@pytest.mark.skipif(not SHARED.exists(), reason="the shared Mooncake trace sits beside the repository")
def test_reference_points_on_the_shared_trace():
    pt = PreparedTrace.build(read_trace(SHARED), block_tokens=512, bytes_per_token=57344, shape=SHAPE)
    for cap, lru, belady in ((2000, 0.144, 0.379), (5000, 0.279, 0.526), (20000, 0.572, 0.640)):
        assert replay(pt, LRUPolicy(), capacity_blocks=cap).hit_ratio == pytest.approx(lru, abs=1e-3)
        assert replay_belady(pt, capacity_blocks=cap).hit_ratio == pytest.approx(belady, abs=1e-3)
    assert replay_unbounded(pt).hit_ratio == pytest.approx(0.640, abs=1e-3)
