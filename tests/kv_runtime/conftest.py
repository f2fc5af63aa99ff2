"""Shared fixtures: a small model layout (8 KiB blocks) and a namespace; helpers are in runtime_helpers.py."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import BLOCK_TOKENS

from kv_runtime.layout import KVLayout
from prefix_reuse import BlockKeyer, KeyNamespace

SMALL_CONFIG = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256}


@pytest.fixture
def layout() -> KVLayout:
    # 2 (K,V) * 2 heads * 64 dims * 4 tokens * 2 bytes = 2 KiB per layer-block, 8 KiB per block.
    return KVLayout.from_config(SMALL_CONFIG, block_size=BLOCK_TOKENS, dtype=torch.float16)


@pytest.fixture
def ns() -> KeyNamespace:
    return KeyNamespace(model_id="runtime-test@0001", kv_dtype="float16", block_size=BLOCK_TOKENS)


@pytest.fixture
def keyer(ns: KeyNamespace) -> BlockKeyer:
    return BlockKeyer(ns)
