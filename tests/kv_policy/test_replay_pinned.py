"""Replay figures pinned to the last digit: speed-ups of the policies or the replay must not change a decision.

The figures were computed before any optimisation of the replay loops, on two small traces: a generated one
(always available) and the first 400 requests of the shared Mooncake trace (when it sits beside the repository).
Per (policy, capacity): one-tier hit blocks and bytes written, hit blocks under the equivalent byte capacity,
and two-tier (disk 4x, write-back) DDR hits, disk hits and bytes written to disk; Belady: hit blocks bounded in
blocks and in bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kv_policy import (
    EVICTION_POLICIES,
    MigrationPolicy,
    ModelShape,
    PreparedTrace,
    SyntheticTraceConfig,
    make_eviction_policy,
    read_trace,
    replay,
    replay_belady,
    replay_two_tier,
    synthetic_trace,
)

SHAPE = ModelShape.qwen2_7b()
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
FULL_BLOCK_BYTES = 512 * 57344

SHARED400 = {
    ("lru", 300): (85, 293582700544, 85, 85, 127, 281224265728),
    ("lfu", 300): (113, 292760616960, 113, 113, 127, 280384978944),
    ("arc", 300): (113, 292760616960, 113, 113, 127, 280384978944),
    ("s3-fifo", 300): (118, 292613816320, 118, 118, 122, 280279638016),
    ("kvtier-prefix", 300): (95, 293289099264, 95, 95, 114, 281322094592),
    ("kvtier-class", 300): (123, 292467015680, 123, 123, 115, 280657821696),
    ("kvtier-lhd", 300): (70, 294023102464, 70, 70, 160, 284680159232),
    ("kvtier-adaptive", 300): (95, 293289099264, 95, 95, 115, 281556975616),
    ("belady", 300): (551, 551),
    ("lru", 1200): (146, 291810082816, 146, 146, 405, 246696181760),
    ("lfu", 1200): (174, 290987999232, 174, 174, 342, 246588260352),
    ("arc", 1200): (174, 290987999232, 174, 174, 342, 246588260352),
    ("s3-fifo", 1200): (174, 290987999232, 174, 174, 342, 250673676288),
    ("kvtier-prefix", 1200): (145, 291821092864, 145, 145, 403, 246603571200),
    ("kvtier-class", 1200): (162, 291321970688, 163, 162, 353, 256168779776),
    ("kvtier-lhd", 1200): (183, 290705408000, 153, 183, 343, 245458526208),
    ("kvtier-adaptive", 1200): (145, 291821092864, 145, 145, 403, 253246873600),
    ("belady", 1200): (551, 551),
}
SYNTH300 = {
    ("lru", 200): (2703, 186060865536, 2778, 2835, 2315, 111314165760),
    ("lfu", 200): (3349, 166007898112, 3349, 3394, 1681, 111760244736),
    ("arc", 200): (2830, 176841785344, 2872, 3047, 2134, 112952025088),
    ("s3-fifo", 200): (3336, 166301499392, 3329, 3382, 1747, 110672027648),
    ("kvtier-prefix", 200): (3289, 168855830528, 3289, 3289, 1894, 111112429568),
    ("kvtier-class", 200): (3278, 169178791936, 3278, 3278, 1904, 110437146624),
    ("kvtier-lhd", 200): (3390, 165890457600, 3386, 3390, 1917, 114342043648),
    ("kvtier-adaptive", 200): (3289, 168855830528, 3289, 3289, 1894, 111112429568),
    ("belady", 200): (4758, 4758),
    ("lru", 800): (5051, 117123284992, 5063, 5051, 1071, 69859155968),
    ("lfu", 800): (4872, 122378747904, 4874, 4883, 1239, 65778040832),
    ("arc", 800): (5001, 118591291392, 4992, 5002, 1120, 75667300352),
    ("s3-fifo", 800): (5081, 115038715904, 5083, 5122, 1000, 78372331520),
    ("kvtier-prefix", 800): (5172, 113570709504, 5172, 5172, 950, 71212015616),
    ("kvtier-class", 800): (5118, 115156156416, 5118, 5118, 1004, 80724697088),
    ("kvtier-lhd", 800): (5077, 116359921664, 5085, 5077, 1045, 70243131392),
    ("kvtier-adaptive", 800): (5172, 113570709504, 5172, 5172, 950, 71212015616),
    ("belady", 800): (6122, 6122),
}


def _prepare(trace) -> PreparedTrace:
    return PreparedTrace.build(trace, block_tokens=512, bytes_per_token=57344, shape=SHAPE)


def _figures(pt: PreparedTrace, name: str, cap: int) -> tuple:
    if name == "belady":
        return (
            replay_belady(pt, capacity_blocks=cap).hit_blocks,
            replay_belady(pt, capacity_bytes=cap * FULL_BLOCK_BYTES).hit_blocks,
        )
    one = replay(pt, make_eviction_policy(name, capacity=cap), capacity_blocks=cap)
    by_bytes = replay(pt, make_eviction_policy(name, capacity=cap), capacity_bytes=cap * FULL_BLOCK_BYTES)
    two = replay_two_tier(
        pt,
        make_eviction_policy(name, capacity=cap),
        make_eviction_policy(name, capacity=4 * cap),
        MigrationPolicy("write-back"),
        fast_capacity_blocks=cap,
        slow_capacity_blocks=4 * cap,
    )
    return (
        one.hit_blocks,
        one.bytes_written,
        by_bytes.hit_blocks,
        two.tier_hits["ddr"],
        two.tier_hits["disk"],
        two.bytes_moved["ddr_to_disk"],
    )


@pytest.fixture(scope="module")
def synthetic() -> PreparedTrace:
    return _prepare(list(synthetic_trace(SyntheticTraceConfig(requests=300, seed=2))))


@pytest.fixture(scope="module")
def shared_head() -> PreparedTrace:
    if not SHARED.exists():
        pytest.skip("the shared Mooncake trace sits beside the repository")
    return _prepare(read_trace(SHARED, limit=400))


def test_pins_cover_every_registered_policy():
    for pins in (SYNTH300, SHARED400):
        assert {n for n, _ in pins} == {*EVICTION_POLICIES, "belady"}


@pytest.mark.parametrize(("name", "cap"), list(SYNTH300))
def test_generated_trace_figures_unchanged(synthetic, name, cap):
    assert _figures(synthetic, name, cap) == SYNTH300[(name, cap)]


@pytest.mark.parametrize(("name", "cap"), list(SHARED400))
def test_shared_trace_head_figures_unchanged(shared_head, name, cap):
    assert _figures(shared_head, name, cap) == SHARED400[(name, cap)]
