"""Longest-prefix and multi-hit matching against brute force; rolling fingerprints against direct ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefix_reuse import BlockKeyer, KeyNamespace, PrefixMatcher, PrefixReuseIndex
from prefix_reuse.fingerprint import RollingFingerprint

BS = 4
NS = KeyNamespace(model_id="test-model@0001", kv_dtype="bfloat16", block_size=BS)
KEYER = BlockKeyer(NS)
Prefix = tuple[int, ...]


def indexed(*chains: Prefix, ready: bool = True) -> tuple[PrefixReuseIndex, PrefixMatcher]:
    """An index holding each chain as its own root chain; payloads are the token prefix each block covers."""
    index = PrefixReuseIndex()
    for chain in chains:
        rk = KEYER.request(chain)
        index.insert(rk, [tuple(chain[: (i + 1) * BS]) for i in range(rk.num_blocks)], ready=ready)
    return index, PrefixMatcher(index, KEYER)


def check_hits(prompt: Prefix, result) -> None:
    """Hits are in prompt order, never overlap, and every node names exactly the slice it covers."""
    end = 0
    for hit in result.hits:
        assert hit.token_start >= end
        assert hit.num_blocks >= 1
        for j, node in enumerate(hit.nodes):
            assert node.payload == prompt[hit.token_start : hit.token_start + (j + 1) * BS]
        end = hit.token_end
    assert end <= len(prompt)
    assert result.matched_tokens == sum(h.num_tokens for h in result.hits)


tokens = st.integers(0, 5)  # a small alphabet: prompts share and repeat blocks often


@settings(max_examples=60, deadline=None)
@given(
    chains=st.lists(st.lists(tokens, min_size=BS, max_size=5 * BS).map(tuple), min_size=1, max_size=5),
    prompt=st.lists(tokens, max_size=6 * BS).map(tuple),
)
def test_longest_equals_brute_force(chains: list[Prefix], prompt: Prefix) -> None:
    _index, matcher = indexed(*chains)
    cached = {c[:end] for c in chains for end in range(BS, len(c) - len(c) % BS + 1, BS)}
    expected = 0
    while expected + BS <= len(prompt) and prompt[: expected + BS] in cached:
        expected += BS
    result = matcher.longest(prompt)
    assert result.prefix_tokens == result.matched_tokens == expected
    assert [n.payload for n in result.prefix] == [prompt[:end] for end in range(BS, expected + 1, BS)]
    assert result.keys.num_tokens == len(prompt)


@settings(max_examples=60, deadline=None)
@given(
    chains=st.lists(st.lists(tokens, min_size=BS, max_size=3 * BS).map(tuple), min_size=1, max_size=4),
    pieces=st.lists(st.tuples(st.lists(tokens, max_size=6).map(tuple), st.integers(0, 3)), max_size=4),
)
def test_multi_hit_is_exact_and_never_overlaps(chains: list[Prefix], pieces: list[tuple[Prefix, int]]) -> None:
    _index, matcher = indexed(*chains)
    # Prompts made of junk and cached chains at arbitrary, usually unaligned, offsets.
    prompt: Prefix = ()
    for junk, c in pieces:
        prompt += junk + (chains[c % len(chains)] if c < 3 else ())
    result = matcher.multi_hit(prompt)
    check_hits(prompt, result)
    for hit in result.hits:
        # Every hit is a chain from its root (check_hits has checked the payloads against the prompt).
        assert [n.depth for n in hit.nodes] == list(range(hit.num_blocks))
    # The leading hit is exactly the longest prefix.
    assert result.prefix == matcher.longest(prompt).prefix


def test_document_after_a_different_system_prompt_is_found_at_its_offset() -> None:
    system_a = tuple(range(100, 111))  # 11 tokens: the document starts unaligned
    system_b = tuple(range(200, 207))  # 7 tokens
    doc = tuple(range(500, 500 + 3 * BS))
    _index, matcher = indexed(system_a[:8], doc)
    prompt = system_b + doc + (9, 9)
    result = matcher.multi_hit(prompt)
    assert result.prefix == ()
    [hit] = result.hits
    assert hit.token_start == len(system_b)
    assert [n.payload for n in hit.nodes] == [doc[: (i + 1) * BS] for i in range(3)]
    assert hit.token_end == len(system_b) + len(doc)
    check_hits(prompt, result)
    # The longest-prefix strategy does not see it.
    assert matcher.longest(prompt).hits == []
    # Behind the cached part of another system prompt: the prefix hit, then the document at offset 11.
    prompt = system_a + doc
    result = matcher.multi_hit(prompt)
    assert [h.token_start for h in result.hits] == [0, 11]
    assert [n.payload for n in result.prefix] == [system_a[:4], system_a[:8]]
    assert [n.payload for n in result.hits[1].nodes] == [doc[: (i + 1) * BS] for i in range(3)]
    assert result.matched_tokens == 8 + len(doc)
    check_hits(prompt, result)


def test_multiple_documents_each_reported_once() -> None:
    d1 = tuple(range(300, 300 + 2 * BS))
    d2 = tuple(range(400, 400 + 3 * BS))
    _index, matcher = indexed(d1, d2)
    prompt = (1, 2, 3, *d1, 7, *d2, 8, 8, 8, 8, 8, *d1)
    result = matcher.multi_hit(prompt)
    starts = [3, 3 + len(d1) + 1, 3 + len(d1) + 1 + len(d2) + 5]
    assert [h.token_start for h in result.hits] == starts
    assert [h.num_blocks for h in result.hits] == [2, 3, 2]
    assert result.matched_tokens == len(d1) * 2 + len(d2)
    check_hits(prompt, result)
    for hit, doc in zip(result.hits, [d1, d2, d1], strict=True):
        assert [n.payload for n in hit.nodes] == [doc[: (i + 1) * BS] for i in range(len(doc) // BS)]


def test_candidate_that_diverges_reports_only_matching_blocks() -> None:
    doc = tuple(range(600, 600 + 4 * BS))
    _index, matcher = indexed(doc)
    prompt = (1, 2, *doc[: 2 * BS], 0, 0, 0, 0, *doc[3 * BS :])
    [hit] = matcher.multi_hit(prompt).hits
    assert hit.token_start == 2
    assert [n.payload for n in hit.nodes] == [doc[:BS], doc[: 2 * BS]]


def test_pending_roots_are_not_reported() -> None:
    doc = tuple(range(700, 700 + 2 * BS))
    index, matcher = indexed(doc, ready=False)
    prompt = (5, 5, 5, *doc)
    assert matcher.multi_hit(prompt).hits == []
    assert matcher.multi_hit(doc).hits == []
    index.publish([index.get(k) for k in KEYER.request(doc).keys])
    [hit] = matcher.multi_hit(prompt).hits
    assert hit.token_start == 3 and hit.num_blocks == 2


def test_removed_roots_are_no_longer_found() -> None:
    doc = tuple(range(800, 800 + 2 * BS))
    index, matcher = indexed(doc)
    prompt = (1, *doc)
    assert len(matcher.multi_hit(prompt).hits) == 1
    index.remove(index.get(KEYER.request(doc).keys[0]))
    assert matcher.multi_hit(prompt).hits == []


def test_request_keys_of_another_namespace_are_refused() -> None:
    _index, matcher = indexed(tuple(range(8)))
    other = BlockKeyer(KeyNamespace(model_id="test-model@0001", kv_dtype="bfloat16", block_size=BS, cache_salt="t"))
    with pytest.raises(ValueError, match="namespace"):
        matcher.longest(other.request(range(8)))
    with pytest.raises(ValueError, match="namespace"):
        matcher.multi_hit(other.request(range(8)))
    same = KEYER.request(range(8))
    assert matcher.longest(same).keys is same
    assert matcher.longest(same).prefix_tokens == 8


@settings(max_examples=50, deadline=None)
@given(
    toks=st.lists(st.integers(0, 2**31 - 1), max_size=60),
    width=st.integers(1, 9),
    salt=st.text(max_size=3),
)
def test_rolling_fingerprint_equals_of_block_at_every_offset(toks: list[int], width: int, salt: str) -> None:
    fp = RollingFingerprint(KeyNamespace(model_id="m@1", kv_dtype="bf16", block_size=width, cache_salt=salt))
    arr = np.array(toks, dtype=np.int32)
    rolling = fp.rolling(arr)
    assert rolling.size == max(0, len(toks) - width + 1)
    for p in range(rolling.size):
        assert int(rolling[p]) == fp.of_block(arr[p : p + width])
    # A second, longer pass reuses and grows the cached powers without changing earlier answers.
    longer = np.concatenate([arr, arr, arr])
    assert fp.rolling(longer)[: rolling.size].tolist() == rolling.tolist()


def test_of_block_needs_exactly_one_block() -> None:
    fp = RollingFingerprint(NS)
    with pytest.raises(ValueError, match="covers 4 tokens"):
        fp.of_block(np.arange(3, dtype=np.int32))


def test_rolling_is_consistent_while_another_thread_grows_the_powers(monkeypatch: pytest.MonkeyPatch) -> None:
    # One matcher serves several threads. A thread may be switched out between the two table assignments in
    # RollingFingerprint._powers; another thread's rolling() then runs in that window. Reproduce the
    # interleaving deterministically: run the second thread's call exactly there.
    fp = RollingFingerprint(NS)
    arr = np.arange(1000, 1064, dtype=np.int32)
    expected = [fp.of_block(arr[p : p + BS]) for p in range(arr.size - BS + 1)]
    fp = RollingFingerprint(NS)
    geometric = RollingFingerprint._geometric
    seen: list[list[int]] = []
    spawned: list[bool] = []

    def interleaved(base: int, n: int) -> np.ndarray:
        if base == fp._inv and not spawned:  # the first table is built, the second not yet
            spawned.append(True)
            other = threading.Thread(target=lambda: seen.append(fp.rolling(arr).tolist()))
            other.start()
            other.join()
        return geometric(base, n)

    monkeypatch.setattr(RollingFingerprint, "_geometric", staticmethod(interleaved))
    assert fp.rolling(arr).tolist() == expected
    assert seen == [expected]
