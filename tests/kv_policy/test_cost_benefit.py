"""The load-or-recompute model on cases with known answers."""

from __future__ import annotations

import pytest

from kv_policy import CostBenefitModel, ModelShape, TierLink

SHAPE = ModelShape.qwen2_7b()
BPT = SHAPE.kv_bytes_per_token_bf16  # 57,344 bytes per token
BLOCK = 512


def model(**tiers: tuple[float, float]) -> CostBenefitModel:
    links = [TierLink(name, bw, lat) for name, (bw, lat) in tiers.items()]
    return CostBenefitModel(SHAPE, bytes_per_token=BPT, tiers=links, prefill_tflops=500.0)


def test_flops_are_linear_plus_quadratic_attention():
    linear = SHAPE.linear_flops_per_token
    assert SHAPE.prefill_flops(0, 1) == pytest.approx(linear + 4 * 28 * 28 * 128 * 1)
    # the same number of tokens costs more later in the prompt
    assert SHAPE.prefill_flops(30_000, 31_000) > SHAPE.prefill_flops(0, 1_000)
    assert SHAPE.prefill_flops(0, 4096) == pytest.approx(SHAPE.prefill_flops(0, 1024) + SHAPE.prefill_flops(1024, 4096))
    assert BPT == 56 * 1024


def test_fast_tier_is_always_loaded():
    m = model(ddr=(50.0, 0.05))
    for blocks in (1, 4, 64, 256):
        plan = m.plan(["ddr"] * blocks, BLOCK)
        # every block is loaded, except that on long prefixes the GPU recomputes the first few while the rest
        # streams in (still Cake's rule: the front costs less to compute than its share of the transfer)
        assert plan.choice in ("load", "both") and plan.load_end == blocks
        assert plan.load_blocks["ddr"] >= 0.9 * blocks
        assert plan.predicted_ms < plan.recompute_all_ms / 10
    assert m.plan(["ddr"] * 4, BLOCK).choice == "load"


def test_slow_tier_only_past_break_even():
    # a slow, high-latency disk: short prefixes are cheaper to recompute, long ones (quadratic) to load
    m = model(disk=(1.5, 40.0))
    short = m.plan(["disk"] * 1, BLOCK)
    assert short.choice == "recompute" and short.load_blocks == {}
    long = m.plan(["disk"] * 256, BLOCK)
    assert long.choice in ("load", "both") and long.load_blocks["disk"] > 0
    # the break-even length lies where loading starts to win, and loading wins from there on
    choices = [m.plan(["disk"] * n, BLOCK).choice != "recompute" for n in range(1, 257, 5)]
    first = choices.index(True)
    assert all(choices[first:])


def test_split_point_balances_compute_and_load():
    m = model(disk=(1.5, 0.2))
    n = 128
    plan = m.plan(["disk"] * n, BLOCK)
    assert plan.choice == "both" and 0 < plan.split_point < plan.load_end == n
    s = plan.split_point
    front = m.recompute_seconds(0, s * BLOCK)
    back = m.load_seconds("disk", (n - s) * BLOCK)
    # one block either way would unbalance it: the split sits where the two sides cross
    assert m.recompute_seconds(0, (s - 1) * BLOCK) <= m.load_seconds("disk", (n - s + 1) * BLOCK)
    assert m.recompute_seconds(0, (s + 1) * BLOCK) >= m.load_seconds("disk", (n - s - 1) * BLOCK)
    assert plan.predicted_ms == pytest.approx(max(front, back) * 1e3)
    assert plan.predicted_ms < min(plan.recompute_all_ms, plan.best_load_ms)


def test_mixed_tiers_load_ddr_front_and_stream_disk_back():
    m = model(ddr=(50.0, 0.05), disk=(1.5, 0.2))
    plan = m.plan(["ddr"] * 32 + ["disk"] * 96, BLOCK)
    assert plan.load_blocks.get("ddr", 0) + plan.load_blocks.get("disk", 0) == plan.load_end - plan.recompute_front
    assert plan.predicted_ms <= min(plan.recompute_all_ms, plan.best_load_ms, plan.best_both_ms) + 1e-9


def test_links_and_throughput_learn_online():
    m = model(disk=(10.0, 5.0))
    for nbytes in (1e6, 5e7, 2e8, 1e6, 5e7, 2e8) * 5:  # true link: 2 GB/s, 0.3 ms
        m.observe_transfer("disk", int(nbytes), 0.3e-3 + nbytes / 2e9)
    assert m.tiers["disk"].bandwidth_gbps == pytest.approx(2.0, rel=0.02)
    assert m.tiers["disk"].latency_ms == pytest.approx(0.3, rel=0.05)
    for _ in range(80):
        m.observe_prefill(0, 8192, SHAPE.prefill_flops(0, 8192) / 2e14)
    assert m.prefill_flops_per_s == pytest.approx(2e14, rel=0.01)


def test_bad_inputs_are_clear_errors():
    m = model(ddr=(50.0, 0.05))
    with pytest.raises(ValueError, match="unknown tier"):
        m.plan(["nvme"], BLOCK)
    with pytest.raises(ValueError):
        TierLink("x", 0.0, 1.0)
    with pytest.raises(ValueError):
        CostBenefitModel(SHAPE, bytes_per_token=BPT, tiers=[])
