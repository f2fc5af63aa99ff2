"""Both engines implement the backend protocol the tier service drives: the copies in and out of the engine."""

from __future__ import annotations

import json

import torch
from pipeline_helpers import BLOCK

from kv_runtime.backend_protocol import KVBackendProtocol, completed
from kv_runtime.backends.hf_backend import HFModel
from kv_runtime.backends.lmdeploy_backend import EngineFormat, LMDeployStore
from kv_runtime.config import KVTierConfig
from kv_runtime.pool import DDRPool


async def test_the_transformers_model_copies_blocks_out_to_ddr_and_back_in(model_dir):
    model = HFModel(model_dir, block_size=BLOCK)
    assert isinstance(model, KVBackendProtocol)
    ddr = DDRPool(8 * model.layout.block_bytes, pin=False)
    model.attach(ddr)
    cache = model.new_cache()
    model.prefill(torch.randint(2, 8000, (3 * BLOCK + 5,)), cache)
    slots = ddr.allocate_many([model.layout.block_bytes] * 3)
    await completed(model.copy_out((cache, 0), slots))
    expected = model.blocks_from_cache(cache, 0, 3)
    assert all(torch.equal(ddr.view(s), row) for s, row in zip(slots, expected, strict=True))
    dest = torch.zeros_like(expected)
    await completed(model.copy_in(slots[1:], dest[1:]))
    assert torch.equal(dest[1:], expected[1:]) and not dest[0].any()


def test_the_lmdeploy_worker_side_is_a_backend(tmp_path, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] > 0
    store = LMDeployStore(
        KVTierConfig(model=str(model_dir), engine="lmdeploy", ddr_bytes="16MiB", cache_dir=tmp_path),
        EngineFormat(block_size=BLOCK),
    )
    try:
        assert isinstance(store.worker, KVBackendProtocol)
        assert store.worker.layout.block_bytes == HFModel(model_dir, block_size=BLOCK).layout.block_bytes
    finally:
        store.close()
