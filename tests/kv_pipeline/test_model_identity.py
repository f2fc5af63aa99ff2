"""A model edited in one middle layer is never served the original's KV (the weights are hashed in full)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import orjson
import torch
from pipeline_helpers import BLOCK, full_logits, prompt

from kv_pipeline import KVTierEngine
from kv_runtime.model_identity import MEMO_NAME


def scale_tensor_in_place(weights: Path, name: str, factor: float) -> None:
    """Rewrite one tensor's bytes inside a safetensors file (same size, same ends: only its middle changes)."""
    raw = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])[name]
    start, end = (8 + n + o for o in meta["data_offsets"])
    dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[meta["dtype"]]
    t = torch.frombuffer(bytearray(raw[start:end]), dtype=dtype) * factor
    raw[start:end] = t.view(torch.uint8).numpy().tobytes()
    weights.write_bytes(bytes(raw))


async def test_edited_middle_layer_gets_no_hit_and_its_own_logits(model_dir: Path, tmp_path: Path) -> None:
    edited = tmp_path / "edited" / model_dir.name  # the same directory name, elsewhere
    shutil.copytree(model_dir, edited)
    scale_tensor_in_place(edited / "model.safetensors", "model.layers.1.mlp.down_proj.weight", 1.5)
    tokens = prompt(4 * BLOCK + 3, seed=7)
    settings = dict(cache_dir=tmp_path / "cache", ddr_bytes="32MiB", disk_bytes="32MiB", block_size=BLOCK)
    settings.update(device="cpu", write_mode="write-through")

    async with KVTierEngine.from_pretrained(model_dir, **settings) as original:
        await original.prefill(tokens)
        await original.scheduler.drain()
        _, again = await original.prompt_logits(tokens)
        assert sum(again.reused_tokens.values()) == 4 * BLOCK  # the cache works for the same model
        original_logits = full_logits(original.model, tokens)

    async with KVTierEngine.from_pretrained(edited, **settings) as other:
        logits, m = await other.prompt_logits(tokens)
        assert m.reused_tokens == {} or sum(m.reused_tokens.values()) == 0
        reference = full_logits(other.model, tokens)
        assert torch.allclose(logits, reference, atol=1e-5)
        assert (reference - original_logits).abs().max() > 1e-3  # the edit changes the answer
        assert other.namespace.model_id != original.namespace.model_id

    memo = orjson.loads((tmp_path / "cache" / MEMO_NAME).read_bytes())
    assert len(memo) == 2  # both models' weight files remembered: a restart rehashes neither


async def test_model_revision_separates_caches(model_dir: Path, tmp_path: Path) -> None:
    tokens = prompt(3 * BLOCK + 1, seed=8)
    settings = dict(cache_dir=tmp_path / "cache", ddr_bytes="32MiB", disk_bytes="32MiB", block_size=BLOCK)
    settings.update(device="cpu", write_mode="write-through")
    async with KVTierEngine.from_pretrained(model_dir, model_revision="a", **settings) as a:
        await a.prefill(tokens)
        await a.scheduler.drain()
    async with KVTierEngine.from_pretrained(model_dir, model_revision="b", **settings) as b:
        _, m = await b.prompt_logits(tokens)
        assert sum(m.reused_tokens.values()) == 0
    async with KVTierEngine.from_pretrained(model_dir, model_revision="a", **settings) as a2:
        _, m = await a2.prompt_logits(tokens)
        assert sum(m.reused_tokens.values()) == 3 * BLOCK
