"""Shared fixtures for the prefix_reuse tests: a small namespace, so chains of a few blocks stay cheap."""

from __future__ import annotations

import pytest

from prefix_reuse import BlockKeyer, KeyNamespace

BLOCK = 4


@pytest.fixture
def ns() -> KeyNamespace:
    return KeyNamespace(model_id="test-model@0001", kv_dtype="bfloat16", block_size=BLOCK)


@pytest.fixture
def keyer(ns: KeyNamespace) -> BlockKeyer:
    return BlockKeyer(ns)
