"""Reuse metrics: the snapshot, its JSON, the Prometheus exposition, validation, separate registries."""

from __future__ import annotations

import orjson
import pytest

from prefix_reuse import BlockKeyer, KeyNamespace, PrefixMatcher, PrefixReuseIndex, PrefixReuseMetrics

BS = 4
KEYER = BlockKeyer(KeyNamespace(model_id="test-model@0001", kv_dtype="bfloat16", block_size=BS))


def matcher_with_metrics() -> tuple[PrefixMatcher, PrefixReuseMetrics]:
    index = PrefixReuseIndex()
    # Payloads say which tier holds each block; the runtime reports tiers to the matcher through tier_of.
    index.insert(KEYER.request(range(16)), ["hbm", "hbm", "ddr", "disk"])
    metrics = PrefixReuseMetrics()
    return PrefixMatcher(index, KEYER, metrics=metrics, tier_of=lambda node: node.payload), metrics


def test_snapshot_counts_what_lookups_found() -> None:
    matcher, metrics = matcher_with_metrics()
    matcher.longest(list(range(16)))  # 16 of 16 tokens
    matcher.longest(list(range(10)))  # 8 of 10 tokens
    matcher.longest([99] * 6)  # 0 of 6
    snap = metrics.snapshot()
    assert snap["lookups"] == 3
    assert snap["tokens"] == 32
    assert snap["matched_tokens"] == 24
    assert snap["hit_ratio"] == pytest.approx(24 / 32)
    assert snap["matched_tokens_mean"] == pytest.approx(8.0)
    assert snap["block_hits_by_tier"] == {"hbm": 4, "ddr": 1, "disk": 1}
    latency = snap["lookup_latency_ms"]
    assert set(latency) >= {"p50", "p90", "p99", "max"}
    assert latency["window"] == 3
    assert 0 <= latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


def test_without_tier_of_hits_count_under_the_index() -> None:
    index = PrefixReuseIndex()
    index.insert(KEYER.request(range(8)), ["a", "b"])
    metrics = PrefixReuseMetrics()
    PrefixMatcher(index, KEYER, metrics=metrics).multi_hit([7, *range(8)])
    snap = metrics.snapshot()
    assert snap["block_hits_by_tier"] == {"index": 2}
    assert snap["matched_tokens"] == 8


def test_empty_snapshot() -> None:
    snap = PrefixReuseMetrics().snapshot()
    assert snap["lookups"] == 0
    assert snap["hit_ratio"] == 0.0
    assert snap["matched_tokens_mean"] == 0.0
    assert snap["lookup_latency_ms"] == {}


def test_json_snapshot_parses() -> None:
    matcher, metrics = matcher_with_metrics()
    matcher.longest(list(range(12)))
    parsed = orjson.loads(metrics.snapshot_json())
    assert parsed == metrics.snapshot()
    assert parsed["hit_ratio"] == 1.0


def test_prometheus_text_names_every_metric() -> None:
    matcher, metrics = matcher_with_metrics()
    matcher.longest(list(range(16)))
    text = metrics.prometheus_text().decode()
    for name in (
        "kvtier_prefix_lookups_total 1.0",
        "kvtier_prefix_lookup_tokens_total 16.0",
        "kvtier_prefix_matched_tokens_total 16.0",
        'kvtier_prefix_block_hits_total{tier="hbm"} 2.0',
        'kvtier_prefix_block_hits_total{tier="disk"} 1.0',
        "kvtier_prefix_lookup_seconds_bucket",
        "kvtier_prefix_lookup_seconds_count 1.0",
    ):
        assert name in text


@pytest.mark.parametrize(
    "record",
    [
        {"tokens": 4, "matched_tokens": 8, "seconds": 0.001},
        {"tokens": -1, "matched_tokens": 0, "seconds": 0.001},
        {"tokens": 4, "matched_tokens": -4, "seconds": 0.001},
        {"tokens": 4, "matched_tokens": 4, "seconds": -1.0},
    ],
)
def test_inconsistent_records_are_rejected(record: dict) -> None:
    metrics = PrefixReuseMetrics()
    with pytest.raises(ValueError, match="inconsistent"):
        metrics.record_lookup(**record)
    assert metrics.snapshot()["lookups"] == 0
    assert "kvtier_prefix_lookups_total 0.0" in metrics.prometheus_text().decode()


def test_two_instances_do_not_collide() -> None:
    a, b = PrefixReuseMetrics(), PrefixReuseMetrics()
    a.record_lookup(tokens=10, matched_tokens=5, seconds=1e-4, tier_blocks={"ddr": 1})
    assert a.snapshot()["lookups"] == 1
    assert b.snapshot()["lookups"] == 0
    assert "kvtier_prefix_lookups_total 0.0" in b.prometheus_text().decode()
    # Another name prefix lets two caches share one registry.
    c = PrefixReuseMetrics(a.registry, prefix="tenant_b")
    c.record_lookup(tokens=3, matched_tokens=0, seconds=1e-4)
    text = a.prometheus_text().decode()  # one registry, both caches
    assert "kvtier_prefix_lookups_total 1.0" in text
    assert "tenant_b_prefix_lookups_total 1.0" in text
