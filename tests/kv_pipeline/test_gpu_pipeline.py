"""The transformers engine on a GPU: restored prefixes (DDR through the load stream, disk after a restart)
give the logits of a full prefill, and write-back through the save stream stores exact bytes."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    from kv_benchmarks.models import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("gpu-model"), "qwen2-tiny", dtype="float32", device="cuda")


async def _logits(engine, tokens):
    logits, metrics = await engine.prompt_logits(tokens)
    await engine.scheduler.drain()
    return logits, metrics


async def test_gpu_restore_matches_full_prefill(gpu_model_dir, tmp_path):
    from kv_pipeline import KVTierEngine

    tokens = torch.randint(0, 8000, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    longer = [*tokens, 5, 6, 7]
    kwargs = dict(
        cache_dir=tmp_path / "cache",
        ddr_bytes="256MiB",
        disk_bytes="512MiB",
        block_size=32,
        device="cuda",
        write_mode="write-through",
    )
    async with KVTierEngine.from_pretrained(gpu_model_dir, **kwargs) as engine:
        assert engine.model.device.type == "cuda"
        _, m0 = await _logits(engine, tokens)
        assert m0.reused_tokens == {}
        again, m1 = await _logits(engine, longer)
        assert m1.reused_tokens.get("ddr", 0) >= 800
        assert m1.reused_tokens["ddr"] + m1.computed_tokens == len(longer)
        reference = engine.model.prefill(torch.tensor(longer), engine.model.new_cache())
        assert torch.allclose(again, reference, atol=1e-3, rtol=1e-4)
    async with KVTierEngine.from_pretrained(gpu_model_dir, **kwargs) as engine:  # restart: prefix on disk only
        restored, m2 = await _logits(engine, longer)
        # the cost model may recompute a few front blocks while the rest streams in from disk ("both")
        assert m2.reused_tokens.get("disk", 0) >= 800
        assert m2.reused_tokens["disk"] + m2.computed_tokens == len(longer)
        assert torch.allclose(restored, reference, atol=1e-3, rtol=1e-4)
