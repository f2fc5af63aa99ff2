"""The prefix index against a brute-force reference: a dict from token prefix to {payload, ready, pins}."""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefix_reuse import BlockKeyer, KeyNamespace, PinnedError, PrefixReuseIndex, StaleNodeError

BS = 4
NS = KeyNamespace(model_id="test-model@0001", kv_dtype="bfloat16", block_size=BS)
KEYER = BlockKeyer(NS)
# Three distinct blocks: chains share prefixes often, so inserts collide, branch and extend each other.
BLOCKS = [(1, 2, 3, 4), (5, 6, 7, 8), (1, 2, 3, 5)]
Prefix = tuple[int, ...]


@dataclass(slots=True)
class RefBlock:
    payload: int
    ready: bool
    pins: int = 0


def flat(blocks: list[tuple[int, ...]]) -> Prefix:
    return tuple(t for b in blocks for t in b)


chains = st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4).map(flat)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[int] = []
        self.index = PrefixReuseIndex(on_release=self.released.append)
        self.ref: dict[Prefix, RefBlock] = {}
        self.lru: OrderedDict[Prefix, None] = OrderedDict()  # expected evictable order, oldest first
        self.expected_released: list[int] = []
        self.removed = []  # nodes taken out of the index, for stale-node checks
        self.payloads = itertools.count()

    # ---------------------------------------------------------------- reference helpers

    def node(self, prefix: Prefix):
        node = self.index.get(KEYER.request(prefix).keys[-1])
        assert node is not None and node.payload == self.ref[prefix].payload
        return node

    def children(self, prefix: Prefix) -> list[Prefix]:
        return [p for p in self.ref if len(p) == len(prefix) + BS and p[: len(prefix)] == prefix]

    def ref_evictable(self, prefix: Prefix) -> bool:
        b = self.ref.get(prefix)
        return b is not None and b.ready and b.pins == 0 and not self.children(prefix)

    def settle(self, order: list[Prefix]) -> None:
        """Drop candidates that stopped being evictable; append new ones in the order the operation saw them."""
        for p in [p for p in self.lru if not self.ref_evictable(p)]:
            del self.lru[p]
        for p in order:
            if p not in self.lru and self.ref_evictable(p):
                self.lru[p] = None

    def ref_match(self, prompt: Prefix) -> list[Prefix]:
        out = []
        for end in range(BS, len(prompt) - len(prompt) % BS + 1, BS):
            b = self.ref.get(prompt[:end])
            if b is None or not b.ready:
                break
            out.append(prompt[:end])
        return out

    # ---------------------------------------------------------------- rules

    @rule(chain=chains, start=st.integers(0, 3), count=st.integers(1, 4), ready=st.booleans())
    def insert(self, chain: Prefix, start: int, count: int, ready: bool) -> None:
        n = len(chain) // BS
        start = min(start, n - 1)
        count = min(count, n - start)
        rk = KEYER.request(chain)
        payloads = [next(self.payloads) for _ in range(count)]
        if start and chain[: start * BS] not in self.ref:
            before = self.index.stats()
            with pytest.raises(ValueError, match="extend an indexed chain"):
                self.index.insert(rk, payloads, start_block=start, ready=ready)
            assert self.index.stats() == before
            return
        result = self.index.insert(rk, payloads, start_block=start, ready=ready)
        expected_inserted, order = [], []
        for i, payload in enumerate(payloads):
            p = chain[: (start + i + 1) * BS]
            if p in self.ref:
                self.expected_released.append(payload)
                expected_inserted.append(False)
            else:
                self.ref[p] = RefBlock(payload, ready)
                expected_inserted.append(True)
            order.append(p)
        assert result.inserted == expected_inserted
        assert [n.payload for n in result.nodes] == [self.ref[p].payload for p in order]
        assert [n.depth for n in result.nodes] == list(range(start, start + count))
        self.settle(order)

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        prefixes = data.draw(st.lists(st.sampled_from(sorted(self.ref)), min_size=1, max_size=3))
        self.index.publish([self.node(p) for p in prefixes])
        for p in prefixes:
            self.ref[p].ready = True
        self.settle(prefixes)

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        prefix = data.draw(st.sampled_from(sorted(self.ref)))
        node = self.node(prefix)
        subtree = [p for p in self.ref if p[: len(prefix)] == prefix]
        if any(self.ref[p].pins for p in subtree):
            before = self.index.stats()
            with pytest.raises(PinnedError):
                self.index.remove(node)
            assert self.index.stats() == before
            return
        removed = self.index.remove(node)
        assert {n.payload for n in removed} == {self.ref[p].payload for p in subtree}
        assert len(removed) == len(subtree)
        for p in subtree:
            self.expected_released.append(self.ref.pop(p).payload)
        self.removed.extend(removed)
        self.settle([prefix[:-BS]] if len(prefix) > BS else [])

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        prefixes = data.draw(st.lists(st.sampled_from(sorted(self.ref)), min_size=1, max_size=3))
        self.index.pin([self.node(p) for p in prefixes])
        for p in prefixes:
            self.ref[p].pins += 1
        self.settle([])

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        prefixes = data.draw(st.lists(st.sampled_from(sorted(self.ref)), min_size=1, max_size=3))
        nodes = [self.node(p) for p in prefixes]
        need = Counter(prefixes)
        if any(self.ref[p].pins < k for p, k in need.items()):
            if all(self.ref[p].pins > 0 for p in prefixes):
                return  # more unpins than pins of one node in one call: test_unpin_more_times_than_pinned
            before = self.index.stats()
            with pytest.raises(ValueError, match="not pinned"):
                self.index.unpin(nodes)
            assert self.index.stats() == before
            return
        self.index.unpin(nodes)
        for p in prefixes:
            self.ref[p].pins -= 1
        self.settle(prefixes)

    @precondition(lambda self: self.ref)
    @rule(data=st.data())
    def touch(self, data: st.DataObject) -> None:
        prefixes = data.draw(st.lists(st.sampled_from(sorted(self.ref)), min_size=1, max_size=3))
        nodes = [self.node(p) for p in prefixes]
        hits = [n.hits for n in nodes]
        self.index.touch(nodes, now=1e9)
        for p in prefixes:
            if p in self.lru:
                self.lru.move_to_end(p)
        assert all(n.last_access == 1e9 for n in nodes)
        assert all(n.hits > h for n, h in zip(nodes, hits, strict=True))

    @rule(chain=chains, tail=st.integers(0, BS - 1))
    def match(self, chain: Prefix, tail: int) -> None:
        prompt = chain + tuple(range(100, 100 + tail))  # a trailing partial block never matches
        got = self.index.match(KEYER.request(prompt))
        assert [n.payload for n in got] == [self.ref[p].payload for p in self.ref_match(prompt)]
        assert [n.depth for n in got] == list(range(len(got)))

    @rule(chain=chains)
    def match_and_pin(self, chain: Prefix) -> None:
        got = self.index.match_and_pin(KEYER.request(chain))
        expected = self.ref_match(chain)
        assert [n.payload for n in got] == [self.ref[p].payload for p in expected]
        for p in expected:
            self.ref[p].pins += 1
        self.settle([])

    @precondition(lambda self: self.removed)
    @rule(data=st.data())
    def stale_nodes_are_refused(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(self.removed))
        with pytest.raises(StaleNodeError):
            self.index.pin([node])
        with pytest.raises(StaleNodeError):
            self.index.publish([node])
        with pytest.raises(StaleNodeError):
            self.index.remove(node)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def evictable_is_ready_unpinned_leaves_in_lru_order(self) -> None:
        expected = {p for p in self.ref if self.ref_evictable(p)}
        assert set(self.lru) == expected
        assert [n.payload for n in self.index.evictable()] == [self.ref[p].payload for p in self.lru]
        assert [n.payload for n in self.index.evictable(2)] == [self.ref[p].payload for p in self.lru][:2]

    @invariant()
    def stats_equal_reference(self) -> None:
        s = self.index.stats()
        assert s.blocks == len(self.index) == len(self.ref)
        assert s.ready_blocks == sum(b.ready for b in self.ref.values())
        assert s.pinned_blocks == sum(b.pins > 0 for b in self.ref.values())
        assert s.leaves == sum(not self.children(p) for p in self.ref)
        assert s.evictable_blocks == len(self.lru)
        assert s.chain_roots == sum(len(p) == BS for p in self.ref)
        assert s.namespaces == (1 if self.ref else 0)
        assert s.verification_failures == 0

    @invariant()
    def pins_equal_reference(self) -> None:
        for p, b in self.ref.items():
            assert self.node(p).pin_count == b.pins

    @invariant()
    def every_dropped_payload_released_once(self) -> None:
        assert len(self.released) == len(set(self.released))
        assert Counter(self.released) == Counter(self.expected_released)
        assert not set(self.released) & {b.payload for b in self.ref.values()}


IndexMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestIndexAgainstReference = IndexMachine.TestCase


# -------------------------------------------------------------------- direct cases


def test_insert_must_extend_an_indexed_chain() -> None:
    index = PrefixReuseIndex()
    rk = KEYER.request(range(12))
    with pytest.raises(ValueError, match="extend an indexed chain"):
        index.insert(rk, ["b1"], start_block=1)
    index.insert(rk, ["b0"])
    with pytest.raises(ValueError, match="extend an indexed chain"):
        index.insert(rk, ["b2"], start_block=2)
    with pytest.raises(ValueError, match="outside"):
        index.insert(rk, ["x"] * 4)
    with pytest.raises(ValueError, match="outside"):
        index.insert(rk, ["x"], start_block=-1)
    assert [n.payload for n in index.match(rk)] == ["b0"]
    index.insert(rk, ["b1", "b2"], start_block=1)
    assert [n.payload for n in index.match(rk)] == ["b0", "b1", "b2"]


def test_match_from_a_later_block_needs_its_parent() -> None:
    index = PrefixReuseIndex()
    rk = KEYER.request(range(12))
    nodes = index.insert(rk, ["b0", "b1", "b2"]).nodes
    assert index.match(rk, start_block=1, parent=nodes[0]) == nodes[1:]
    with pytest.raises(ValueError, match="block before"):
        index.match(rk, start_block=1)
    # The wrong parent fails the link check: counted, nothing reported.
    assert index.match(rk, start_block=2, parent=nodes[0]) == []
    assert index.stats().verification_failures == 1


def _chain(payloads: list[str]) -> tuple[PrefixReuseIndex, list, list]:
    released: list = []
    index = PrefixReuseIndex(on_release=released.append)
    rk = KEYER.request(range(4 * len(payloads)))
    return index, index.insert(rk, payloads).nodes, released


def test_collision_on_check_stops_match_and_is_counted() -> None:
    index, nodes, released = _chain(["b0", "b1", "b2", "b3"])
    rk = KEYER.request(range(16))
    nodes[2].check ^= 1  # as if another prefix's block had hashed to this key
    assert index.match(rk) == nodes[:2]
    assert index.stats().verification_failures == 1
    assert index.match_and_pin(rk) == nodes[:2]
    assert index.stats().verification_failures == 2
    index.unpin(nodes[:2])
    # match_keys (the multi-hit path) confirms the same way.
    assert index.match_keys(KEYER.iter_keys(rk.tokens), NS) == nodes[:2]
    assert index.stats().verification_failures == 3
    # An insert over the colliding node keeps what is confirmed, then releases every remaining payload.
    result = index.insert(rk, ["n0", "n1", "n2", "n3"])
    assert result.nodes == nodes[:2]
    assert result.inserted == [False, False]
    assert sorted(released) == ["n0", "n1", "n2", "n3"]
    assert index.stats().verification_failures == 4
    assert len(index) == 4


def test_collision_on_parent_link_stops_match() -> None:
    index, nodes, _ = _chain(["b0", "b1", "b2"])
    other = index.insert(KEYER.request(range(50, 54)), ["x0"]).nodes[0]
    rk = KEYER.request(range(12))
    true_parent = nodes[2].parent
    nodes[2].parent = other  # the key is found, but it hangs under another prefix
    try:
        assert index.match(rk) == nodes[:2]
        assert index.stats().verification_failures == 1
    finally:
        nodes[2].parent = true_parent
    assert index.match(rk) == nodes


def test_collision_across_namespaces_is_refused() -> None:
    index, nodes, _ = _chain(["b0", "b1"])
    other_ns = KeyNamespace(model_id="other@1", kv_dtype="bfloat16", block_size=BS)
    rk = KEYER.request(range(8))
    nodes[0].namespace = other_ns.digest  # a key collision between tenants
    assert index.match(rk) == []
    assert index.stats().verification_failures == 1


def test_pending_nodes_are_invisible_until_published() -> None:
    released: list = []
    index = PrefixReuseIndex(on_release=released.append)
    rk = KEYER.request(range(12))
    nodes = index.insert(rk, ["b0", "b1", "b2"], ready=False).nodes
    assert index.match(rk) == []
    assert index.evictable() == []
    index.publish(nodes[1:])
    assert index.match(rk) == []  # the head is still in flight
    index.publish(nodes[:1])
    assert index.match(rk) == nodes
    assert index.evictable() == [nodes[2]]
    assert released == []


def test_pinned_subtree_is_not_removed() -> None:
    index, nodes, released = _chain(["b0", "b1", "b2"])
    index.pin([nodes[2]])
    with pytest.raises(PinnedError):
        index.remove(nodes[0])
    assert len(index) == 3 and released == []
    index.unpin([nodes[2]])
    with pytest.raises(ValueError, match="not pinned"):
        index.unpin([nodes[2]])
    assert index.remove(nodes[1]) == nodes[1:]
    assert sorted(released) == ["b1", "b2"]
    assert index.evictable() == [nodes[0]]


def test_unpin_more_times_than_pinned_is_refused() -> None:
    # One lease, two releases in one call: the index must refuse it whole, not drive the count below zero
    # (a negative count reads as pinned to remove() while the node sits in the evictable set).
    index, nodes, _ = _chain(["b0"])
    index.pin(nodes)
    with pytest.raises(ValueError, match="not pinned"):
        index.unpin([nodes[0], nodes[0]])
    assert nodes[0].pin_count == 1
    assert index.stats().pinned_blocks == 1
    assert index.evictable() == []


def test_duplicate_pins_and_unpins_balance() -> None:
    index, nodes, released = _chain(["b0"])
    index.pin([nodes[0], nodes[0]])
    assert nodes[0].pin_count == 2 and index.evictable() == []
    index.unpin([nodes[0], nodes[0]])
    assert nodes[0].pin_count == 0 and index.evictable() == nodes
    assert index.remove(nodes[0]) == nodes
    assert released == ["b0"]
