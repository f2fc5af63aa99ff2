"""KVLayout: exact sizes from model configs (Qwen2-7B shape, quantised caches, tensor parallelism), clear errors."""

from __future__ import annotations

import pytest
import torch

from kv_runtime.layout import KVLayout, KVQuant

QWEN2_7B = {
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_size": 3584,
    "torch_dtype": "bfloat16",
}


def test_qwen2_7b_shape_matches_lmdeploy_pool():
    layout = KVLayout.from_config(QWEN2_7B, block_size=64)
    assert layout.head_dim == 128
    assert layout.layer_block_bytes == 131072  # 2 (K,V) * 4 heads * 128 dims * 64 tokens * 2 bytes
    assert layout.block_bytes == 28 * 131072 == int(3.5 * 2**20)
    assert layout.bytes_per_token == 56 * 1024  # 56 KiB per token, as measured
    segs = layout.segments()
    assert [s.name for s in segs] == ["k", "v"]
    assert sum(s.nbytes for s in segs) == layout.layer_block_bytes
    assert segs[1].offset == segs[0].nbytes and segs[0].shape == (64, 4, 128)


def test_transformers_config_object():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584, torch_dtype="bfloat16"
    )
    assert KVLayout.from_config(cfg).layer_block_bytes == 131072


@pytest.mark.parametrize(
    ("quant", "per_head_token"),
    [
        # K + V payload, then K and V (scale, zero) pairs in bf16: one pair per token and head.
        (8, 128 + 128 + 4 + 4),
        (4, 64 + 64 + 4 + 4),
    ],
)
def test_quantised_sizes(quant, per_head_token):
    layout = KVLayout.from_config(QWEN2_7B, quant=quant)
    assert layout.quant is KVQuant(quant)
    assert layout.layer_block_bytes == per_head_token * 4 * 64
    segs = layout.segments()
    assert [s.name for s in segs] == ["k", "v", "k_scales_zeros", "v_scales_zeros"]
    assert segs[-1].offset + segs[-1].nbytes == layout.layer_block_bytes
    assert segs[2].shape == (64, 4, 1, 2) and segs[2].dtype == torch.bfloat16
    assert segs[0].dtype == torch.uint8


def test_group_size_multiplies_scales():
    full = KVLayout.from_config(QWEN2_7B, quant="int8", group_size=32)
    # 4 groups per head: 4 (scale, zero) pairs for K and for V.
    assert full.layer_block_bytes == (128 + 128 + 4 * 4 + 4 * 4) * 4 * 64


def test_tensor_parallel_split_and_replication():
    assert KVLayout.from_config(QWEN2_7B, tp_size=2, tp_rank=1).num_kv_heads == 2
    assert KVLayout.from_config(QWEN2_7B, tp_size=8).num_kv_heads == 1  # replicated: 8 ranks over 4 heads
    with pytest.raises(ValueError, match="split evenly"):
        KVLayout.from_config({**QWEN2_7B, "num_key_value_heads": 6}, tp_size=4)


def test_fallbacks_head_dim_and_kv_heads():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}
    layout = KVLayout.from_config(cfg, dtype=torch.float16, block_size=16)
    assert (layout.num_kv_heads, layout.head_dim) == (8, 64)
    assert layout.block_bytes == 2 * 2 * 8 * 64 * 16 * 2
    assert KVLayout.from_config({**cfg, "head_dim": 32}, dtype="float32").head_dim == 32


SMALL = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}


@pytest.mark.parametrize(
    ("cfg", "kwargs", "match"),
    [
        ({"num_attention_heads": 8, "hidden_size": 512}, {}, "num_hidden_layers"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8}, {"dtype": "float16"}, "head_dim or hidden_size"),
        ({"num_hidden_layers": 2, "num_attention_heads": 7, "hidden_size": 512}, {"dtype": "float16"}, "divisible"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}, {}, "dtype"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}, {"dtype": "int8"}, "unsupported"),
        (
            {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512},
            {"dtype": "float16", "quant": 2},
            "quant",
        ),
        ({"num_hidden_layers": 0, "num_attention_heads": 8, "hidden_size": 512}, {"dtype": "float16"}, "positive"),
        (
            {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512},
            {"dtype": "float16", "block_size": 0},
            "positive",
        ),
        (
            {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512},
            {"dtype": "float16", "group_size": 48},
            "divide",
        ),
    ],
)
def test_bad_configs_raise_clear_errors(cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVLayout.from_config(cfg, **kwargs)


def test_not_a_config():
    with pytest.raises(TypeError):
        KVLayout.from_config("Qwen2-7B")
