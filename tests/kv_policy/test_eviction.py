"""Every eviction policy against a dumb reference or its invariants, under hypothesis-generated operations."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_policy import (
    EVICTION_POLICIES,
    ARCPolicy,
    KvtierAdaptivePolicy,
    KvtierHitDensityPolicy,
    LRUPolicy,
    ModelShape,
    PreparedTrace,
    S3FIFOPolicy,
    SyntheticTraceConfig,
    make_eviction_policy,
    replay,
    synthetic_trace,
)

SETTINGS = settings(max_examples=60, deadline=None)

# An operation: ("touch", id) stores or uses a block; ("pin", id) / ("unpin", id); ("evict", n).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("touch"), st.integers(0, 15)),
        st.tuples(st.just("pin"), st.integers(0, 15)),
        st.tuples(st.just("unpin"), st.integers(0, 15)),
        st.tuples(st.just("evict"), st.integers(1, 3)),
    ),
    max_size=120,
)


@SETTINGS
@given(ops)
def test_lru_matches_list_scan_reference(operations):
    policy = LRUPolicy()
    ref: list[int] = []  # least recent first
    pins: dict[int, int] = {}
    for t, (op, arg) in enumerate(operations):
        if op == "touch":
            if arg in policy:
                policy.access(arg, t)
                ref.remove(arg)
            else:
                policy.insert(arg, now=t)
            ref.append(arg)
        elif op == "pin" and arg in policy:
            policy.pin(arg)
            pins[arg] = pins.get(arg, 0) + 1
        elif op == "unpin" and pins.get(arg):
            policy.unpin(arg)
            pins[arg] -= 1
        elif op == "evict":
            got = policy.victims(arg)
            expected = []
            for _ in range(arg):
                # the reference: scan for the least recent unpinned block; pinned ones it passes become most recent
                while ref and pins.get(ref[0]):
                    if all(pins.get(b) for b in ref):
                        break
                    ref.append(ref.pop(0))
                cand = next((b for b in ref if not pins.get(b)), None)
                if cand is None:
                    break
                ref.remove(cand)
                expected.append(cand)
            assert got == expected
    assert set(policy) == set(ref)


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
@SETTINGS
@given(operations=ops, parents=st.lists(st.integers(-1, 14), min_size=16, max_size=16))
def test_victims_are_always_evictable(name, operations, parents):
    """Pinned blocks are never chosen; prefix-aware policies never choose a block with a cached child."""
    policy = make_eviction_policy(name, capacity=8)
    pins: dict[int, int] = {}
    for t, (op, arg) in enumerate(operations):
        if op == "touch":
            if arg in policy:
                policy.access(arg, float(t))
            else:
                parent = parents[arg] if parents[arg] < arg else None  # a forest: parents precede children
                policy.insert(arg, parent=parent, depth=arg, now=float(t), size_bytes=1 + arg % 3)
        elif op == "pin" and arg in policy:
            policy.pin(arg)
            pins[arg] = pins.get(arg, 0) + 1
        elif op == "unpin" and pins.get(arg):
            policy.unpin(arg)
            pins[arg] -= 1
        elif op == "evict":
            before = set(policy)
            children = {b: [c for c in before if policy.info(c).parent == b] for b in before}
            got = policy.victims(arg)
            assert len(got) == len(set(got)) and set(got) <= before
            gone: set[int] = set()
            for v in got:
                assert not pins.get(v), f"{name} evicted pinned block {v}"
                if policy.prefix_aware:
                    assert all(c in gone for c in children[v]), f"{name} orphaned children of {v}"
                gone.add(v)
            evictable = [b for b in before - gone if policy.evictable(b)]
            if len(got) < arg:
                assert not evictable, f"{name} stopped early with {evictable} evictable"
    assert policy.used_bytes == sum(policy.info(b).size_bytes for b in policy)


def _arc_textbook(seq: list[int], c: int) -> int:
    """ARC as Megiddo and Modha give it (cache of c pages, one page per request); returns hits."""
    t1, t2, b1, b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
    p = 0.0
    hits = 0

    def replace(x: int) -> None:
        if t1 and (len(t1) > p or (x in b2 and len(t1) == p)):
            b1[t1.popitem(last=False)[0]] = None
        else:
            b2[t2.popitem(last=False)[0]] = None

    for x in seq:
        if x in t1 or x in t2:
            hits += 1
            t1.pop(x, None)
            t2[x] = None
            t2.move_to_end(x)
            continue
        if x in b1:
            p = min(c, p + max(len(b2) / len(b1), 1))
            replace(x)
            del b1[x]
            t2[x] = None
            continue
        if x in b2:
            p = max(0, p - max(len(b1) / len(b2), 1))
            replace(x)
            del b2[x]
            t2[x] = None
            continue
        if len(t1) + len(b1) == c:
            if len(t1) < c:
                b1.popitem(last=False)
                replace(x)
            else:
                t1.popitem(last=False)
        elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
            if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
                b2.popitem(last=False)
            replace(x)
        t1[x] = None
    return hits


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 20), max_size=300), st.integers(2, 8))
def test_arc_matches_textbook_on_single_block_requests(seq, c):
    policy = ARCPolicy(capacity=c)
    hits = 0
    for t, x in enumerate(seq):
        if x in policy:
            hits += 1
            policy.access(x, t)
        else:
            if len(policy) >= c:
                policy.victims(1, incoming=x)
            policy.insert(x, now=t)
    assert hits == _arc_textbook(seq, c)


def test_registry_hot_swaps_by_name():
    assert {"lru", "lfu", "arc", "s3-fifo"} <= set(EVICTION_POLICIES)
    assert any(n.startswith("kvtier-") for n in EVICTION_POLICIES)
    for name in EVICTION_POLICIES:
        p = make_eviction_policy(name, capacity=4)
        assert p.name == name
        # hot swap: the same blocks replayed into a fresh policy of another name keep their bookkeeping
        for i in range(3):
            p.insert(i, parent=i - 1 if i else None, depth=i)
        q = make_eviction_policy("lru")
        for b in p:
            info = p.info(b)
            q.insert(b, parent=info.parent, depth=info.depth, size_bytes=info.size_bytes)
        assert set(q) == {0, 1, 2}
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_eviction_policy("nope")


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_bad_events_are_errors(name):
    p = make_eviction_policy(name, capacity=4)
    p.insert(b"k" * 16)
    with pytest.raises(ValueError, match="already cached"):
        p.insert(b"k" * 16)
    with pytest.raises(ValueError, match="not cached"):
        p.access(b"x", 0.0)
    with pytest.raises(ValueError, match="not pinned"):
        p.unpin(b"k" * 16)


def test_prefix_aware_policy_evicts_leaves_and_recovers_subtrees_stored_leaf_first():
    p = make_eviction_policy("kvtier-prefix")
    p.insert("child", parent="root", depth=1)  # demotion may store a child before its parent
    p.insert("root", depth=0)
    assert p.info("root").children == 1
    assert p.victims(1) == ["child"]
    assert p.victims(1) == ["root"]
    assert p.victims(1) == []


def test_kvtier_prefers_shared_blocks_over_one_off_ones():
    """A block that came back (even after an eviction) outlives a one-off block of the same age."""
    p = make_eviction_policy("kvtier-class")
    p.insert("shared", now=0.0)
    p.victims(1)
    p.insert("shared", now=1.0)  # seen before: the history survives the eviction
    p.insert("one-off", now=1.0)
    assert p.victims(1) == ["one-off"]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=2, max_size=2),
    st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=2, max_size=2),
)
def test_hit_density_matches_its_definition(hits, evictions):
    """density(a) = hits at ages >= a over the slot-time (x - a + 1 units) those blocks still spend."""
    p = KvtierHitDensityPolicy(capacity=64, age_buckets=6, max_uses=1)
    p._hits[:] = hits
    p._evictions[:] = evictions
    p._reconfigure()
    for c in range(2):
        for a in range(6):
            life = sum((x - a + 1) * (hits[c][x] + evictions[c][x]) for x in range(a, 6))
            want = sum(hits[c][a:]) / life if life else 0.0
            assert p._density[c, a] == pytest.approx(want)


@settings(max_examples=30, deadline=None)
@given(ops, st.lists(st.integers(-1, 14), min_size=16, max_size=16))
def test_hit_density_victim_is_the_least_dense_evictable_leaf(operations, parents):
    """With many samples the victim is the brute-force minimum of density over all evictable leaves."""
    p = KvtierHitDensityPolicy(capacity=4, samples=400)
    for t, (op, arg) in enumerate(operations):
        if op == "touch":
            if arg in p:
                p.access(arg, float(t))
            else:
                parent = parents[arg] if parents[arg] < arg else None
                p.insert(arg, parent=parent, depth=arg, now=float(t), size_bytes=2 if arg % 4 else 1)
        elif op == "pin" and arg in p:
            p.pin(arg)
        elif op == "unpin" and arg in p and p.info(arg).pins:
            p.unpin(arg)
        elif op == "evict":
            candidates = [b for b in p if p.evictable(b)]
            scores = {b: p._score(b) for b in candidates}
            got = p.victims(1)
            if candidates:
                assert got and scores[got[0]] == min(scores.values())
            else:
                assert got == []


def _shared_roots_under_one_off_tails(policy) -> int:
    """30 shared roots in rotation, each use followed by two one-off partial tails; cache of 40 blocks."""
    hits, t = 0, 0.0
    for i in range(3000):
        root = i % 30
        if root in policy:
            policy.access(root, t)
            hits += 1
        else:
            policy.insert(root, size_bytes=4, now=t)
        for k in range(2):
            policy.insert(("tail", i, k), parent=root, size_bytes=1, now=t)
        t += 1.0
        while len(policy) > 40:
            policy.victims(1)
    return hits


def test_hit_density_keeps_reused_roots_that_recency_loses():
    """Roots come back every 90 stores, beyond LRU's reach in 40 blocks; learned density keeps them."""
    assert _shared_roots_under_one_off_tails(LRUPolicy()) == 0
    assert _shared_roots_under_one_off_tails(KvtierHitDensityPolicy(capacity=40)) > 0.9 * 3000


def test_adaptive_switches_to_the_expert_that_wins():
    """Starting under LRU, which never hits here, it hands the victims to hit density and keeps most of its hits."""
    lhd = _shared_roots_under_one_off_tails(KvtierHitDensityPolicy(capacity=40))
    adaptive = KvtierAdaptivePolicy(capacity=40, experts=("lru", "kvtier-lhd"))
    hits = _shared_roots_under_one_off_tails(adaptive)
    assert adaptive.leader == "kvtier-lhd"
    scores = adaptive.scores()
    assert scores["kvtier-lhd"] > 10 * scores["lru"]
    assert hits >= 0.9 * lhd


def test_adaptive_under_a_fixed_leader_is_that_expert_exactly():
    """Followers see exactly the tier's events, so a leader that never changes evicts as that policy alone."""
    trace = list(synthetic_trace(SyntheticTraceConfig(requests=400, seed=3)))
    prepared = PreparedTrace.build(trace, block_tokens=512, bytes_per_token=1, shape=ModelShape.qwen2_7b())
    cap = prepared.distinct_blocks // 10
    alone = replay(prepared, S3FIFOPolicy(capacity=cap), capacity_blocks=cap)
    adaptive = KvtierAdaptivePolicy(capacity=cap, experts=("s3-fifo", "lru", "kvtier-prefix"), margin=1e9)
    assert replay(prepared, adaptive, capacity_blocks=cap).hit_blocks == alone.hit_blocks
    assert adaptive.leader == "s3-fifo"


def test_adaptive_scores_prefix_hits_only():
    """A shadow counts a block only if its parent is None or hit just before it there."""
    p = KvtierAdaptivePolicy(capacity=4, experts=("lru",), window=1, decay=0.0)
    p.insert("a")
    assert p.scores() == {"lru": 0.0}
    p.access("a", 1.0)
    assert p.scores() == {"lru": 1.0}
    p.insert("b", parent="a", now=2.0)
    p.access("b", 3.0)  # a was not used just before: no prefix hit
    assert p.scores() == {"lru": 0.0}
    p.access("a", 4.0)
    p.access("b", 5.0)
    assert p.scores() == {"lru": 1.0}


def test_adaptive_rejects_bad_configurations():
    for kwargs in ({"experts": ()}, {"experts": ("lru", "lru")}, {"experts": ("kvtier-adaptive",)}, {"window": 0}):
        with pytest.raises(ValueError):
            KvtierAdaptivePolicy(capacity=4, **kwargs)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        KvtierAdaptivePolicy(capacity=4, experts=("nope",))
    assert KvtierAdaptivePolicy(experts=("kvtier-prefix", "kvtier-lhd")).prefix_aware
    assert not KvtierAdaptivePolicy(experts=("kvtier-prefix", "lru")).prefix_aware
