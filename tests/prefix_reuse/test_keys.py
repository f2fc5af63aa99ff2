"""Block keys: stable across processes, pinned by a golden vector, namespaced, incremental, validated."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefix_reuse import BlockKeyer, KeyNamespace, PrefixReuseIndex, as_token_array

GOLDEN_NS = {"model_id": "qwen2-7b@sha256:0123", "kv_dtype": "bfloat16", "block_size": 4}
GOLDEN_TOKENS = list(range(10))
# Keys name blocks on disk: if these change, every stored block becomes unreachable. Change them only together
# with the layout version and a migration story.
GOLDEN_KEYS = ["dab75b9964037796618840991d9c1675", "7ca206d9876aee065b4769f5e34b7aab"]
GOLDEN_CHECKS = [15421787271951062815, 10296074156544925488]

BASE = {"model_id": "m@1", "kv_dtype": "bfloat16", "block_size": 4}


def test_golden_vector() -> None:
    rk = BlockKeyer(KeyNamespace(**GOLDEN_NS)).request(GOLDEN_TOKENS)
    assert [k.hex() for k in rk.keys] == GOLDEN_KEYS
    assert rk.checks == GOLDEN_CHECKS


def test_keys_stable_across_processes() -> None:
    tokens = [7, 3, 99, 100_000, 5, 5, 5, 5, 2**31 - 1, 0, 1, 2, 3]
    script = (
        "import sys\n"
        "from prefix_reuse import BlockKeyer, KeyNamespace\n"
        "ns = KeyNamespace(model_id='m@1', kv_dtype='bfloat16', block_size=4, cache_salt='tenant-a')\n"
        f"rk = BlockKeyer(ns).request({tokens!r})\n"
        "print(' '.join(k.hex() for k in rk.keys))\n"
        "print(' '.join(str(c) for c in rk.checks))\n"
    )
    # A different hash seed in the child would expose any use of Python's per-process hash().
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.split("\n")
    rk = BlockKeyer(KeyNamespace(**BASE, cache_salt="tenant-a")).request(tokens)
    assert out[0].split() == [k.hex() for k in rk.keys]
    assert [int(c) for c in out[1].split()] == rk.checks
    assert len(rk.keys) == 3


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "m@2"},
        {"kv_dtype": "float16"},
        {"quant_policy": "8"},
        {"layout_version": 2},
        {"block_size": 2},
        {"tp_size": 2},
        {"tp_size": 2, "tp_rank": 1},
        {"cache_salt": "tenant-b"},
    ],
)
def test_every_namespace_field_changes_the_keys(change: dict) -> None:
    tokens = list(range(8))
    a, b = KeyNamespace(**BASE), KeyNamespace(**{**BASE, **change})
    assert a != b
    assert a.digest != b.digest
    assert a.check_seed != b.check_seed
    ka, kb = BlockKeyer(a).request(tokens), BlockKeyer(b).request(tokens)
    assert not set(ka.keys) & set(kb.keys)


def test_tp_rank_alone_changes_the_keys() -> None:
    a = KeyNamespace(**BASE, tp_size=2, tp_rank=0)
    b = KeyNamespace(**BASE, tp_size=2, tp_rank=1)
    assert a.digest != b.digest
    assert BlockKeyer(a).request(range(4)).keys != BlockKeyer(b).request(range(4)).keys


def test_quant_policy_int_and_str_are_one_namespace() -> None:
    a, b = KeyNamespace(**BASE, quant_policy=8), KeyNamespace(**BASE, quant_policy="8")
    assert a == b
    assert a.digest == b.digest
    assert BlockKeyer(a).request(range(8)).keys == BlockKeyer(b).request(range(8)).keys


def test_two_namespaces_never_match_each_other_in_one_index() -> None:
    tokens = list(range(16))
    index = PrefixReuseIndex()
    a = BlockKeyer(KeyNamespace(**BASE, cache_salt="tenant-a"))
    b = BlockKeyer(KeyNamespace(**BASE, cache_salt="tenant-b"))
    ra, rb = a.request(tokens), b.request(tokens)
    index.insert(ra, ["a0", "a1", "a2", "a3"])
    assert index.match(rb) == []
    assert len(index.match(ra)) == 4
    index.insert(rb, ["b0", "b1"])
    assert [n.payload for n in index.match(rb)] == ["b0", "b1"]
    assert [n.payload for n in index.match(ra)] == ["a0", "a1", "a2", "a3"]
    assert index.stats().namespaces == 2


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_incremental_extend_equals_one_shot(tokens: list[int], cuts: list[int]) -> None:
    keyer = BlockKeyer(KeyNamespace(**BASE))
    whole = keyer.request(tokens)
    grown = keyer.request()
    bounds = sorted({0, len(tokens), *(c for c in cuts if c <= len(tokens))})
    for lo, hi in itertools.pairwise(bounds):
        added = grown.extend(tokens[lo:hi])
        assert added == hi // 4 - lo // 4
    assert grown.keys == whole.keys
    assert grown.checks == whole.checks
    assert grown.num_tokens == len(tokens)
    assert list(grown.tokens) == tokens


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 9])
def test_partial_block_is_never_keyed(n: int) -> None:
    rk = BlockKeyer(KeyNamespace(**BASE)).request(range(n))
    assert rk.num_blocks == len(rk.keys) == len(rk.checks) == n // 4
    assert rk.num_tokens == n
    with pytest.raises(IndexError):
        rk.block_tokens(rk.num_blocks)
    index = PrefixReuseIndex()
    with pytest.raises(ValueError, match="full blocks"):
        index.insert(rk, ["x"] * (rk.num_blocks + 1))


def test_list_int64_int32_inputs_give_equal_keys() -> None:
    tokens = [5, 0, 2**31 - 1, 17, 4, 4, 4, 4, 9]
    keyer = BlockKeyer(KeyNamespace(**BASE))
    forms = [
        tokens,
        tuple(tokens),
        np.array(tokens, dtype=np.int64),
        np.array(tokens, dtype=np.int32),
        np.array(tokens, dtype=">i4"),
        np.array(tokens, dtype=np.uint32),
        np.array(tokens, dtype=np.int64)[::-1][::-1],
    ]
    ref = keyer.request(tokens)
    for form in forms:
        rk = keyer.request(form)
        assert rk.keys == ref.keys
        assert rk.checks == ref.checks


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        (np.zeros((2, 4), dtype=np.int32), ValueError),
        (np.zeros(4, dtype=np.float32), TypeError),
        ([1.5, 2.0], TypeError),
        ([1, -1, 2], ValueError),
        (np.array([1, -1], dtype=np.int32), ValueError),
        ([2**31], ValueError),
        (np.array([2**31], dtype=np.int64), ValueError),
        (np.array([2**32 - 1], dtype=np.uint32), ValueError),
        ([2**64], TypeError),
    ],
)
def test_bad_tokens_raise(tokens: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="token ids"):
        as_token_array(tokens)
    rk = BlockKeyer(KeyNamespace(**BASE)).request([1, 2])
    with pytest.raises(error):
        rk.extend(tokens)
    assert rk.num_tokens == 2  # a rejected extend changes nothing


@pytest.mark.parametrize(
    "bad",
    [
        {"model_id": ""},
        {"kv_dtype": ""},
        {"block_size": 0},
        {"block_size": -4},
        {"block_size": 4.0},
        {"block_size": "4"},
        {"layout_version": -1},
        {"layout_version": 1.5},
        {"tp_size": 0},
        {"tp_rank": -1},
        {"tp_rank": 2, "tp_size": 2},
    ],
)
def test_bad_namespace_fields_raise(bad: dict) -> None:
    with pytest.raises(ValueError, match="KeyNamespace"):
        KeyNamespace(**{**BASE, **bad})


@pytest.mark.parametrize("field", ["block_size", "layout_version", "tp_rank", "tp_size"])
def test_bool_is_not_accepted_as_an_int_field(field: str) -> None:
    # bool is a subclass of int: without an explicit check, block_size=True would build a namespace whose
    # digest (orjson writes `true`) differs from block_size=1 while behaving as block size 1.
    values = {"block_size": True, "layout_version": True, "tp_rank": True, "tp_size": True}
    extra = {"tp_size": 2} if field == "tp_rank" else {}
    with pytest.raises((ValueError, TypeError), match="KeyNamespace"):
        KeyNamespace(**{**BASE, **extra, field: values[field]})
