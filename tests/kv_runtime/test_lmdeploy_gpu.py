"""kvtier's connector inside LMDeploy's real PyTorch engine (CUDA and LMDeploy 0.18 only).

One engine for the module (a reduced Qwen2 in bf16, eager mode): restores from DDR and from disk must give
the logits of LMDeploy's own full prefill, a corrupt disk block must become a recompute (counted), and the
patch must be idempotent and refuse versions it does not know.
"""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("lmdeploy") is None, reason="needs LMDeploy"),
]

TOL = 0.05  # bf16 logits through different attention paths (full prefill vs prefill over restored blocks)


def _close(got: dict[int, float], ref: dict[int, float]) -> bool:
    from kv_pipeline.lmdeploy_engine import compare_top_logits

    c = compare_top_logits(got, ref)
    return c["max_abs_diff"] <= TOL and c["argmax_equal"] == 1.0 and c["shared"] >= 0.9


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, loop):
    from kv_benchmarks.models import build_model_dir
    from kv_pipeline import KVTierEngine

    work = tmp_path_factory.mktemp("lmdeploy")
    model = build_model_dir(work / "model", "qwen2-tiny", dtype="bfloat16", device="cuda", peaked=True)
    eng = KVTierEngine.from_pretrained(
        model,
        engine="lmdeploy",
        dtype="bfloat16",
        ddr_bytes="1GiB",
        disk_bytes="1GiB",
        cache_dir=work / "cache",
        write_mode="write-through",
        engine_options={"eager_mode": True, "session_len": 8192, "num_gpu_blocks": 256},
    )
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.close())


def _prompt(seed: int, n: int = 1000) -> list[int]:
    return np.random.default_rng(seed).integers(10, 8000, size=n).tolist()


def _logits(engine, loop, tokens, *, gpu: bool = False, drop_ddr: bool = False) -> dict[int, float]:
    from kv_runtime import Tier

    engine.store.wait_idle()
    if not gpu:
        loop.run_until_complete(engine.evict_gpu_prefix_cache())
    if drop_ddr:
        engine.store.drop_tier(Tier.DDR)
    logits, _ = loop.run_until_complete(engine.prompt_logits(tokens, split=False))
    return logits


def test_install_is_idempotent_and_patches_every_import():
    import lmdeploy.pytorch.engine.engine as engine_mod
    import lmdeploy.pytorch.engine.model_agent.agent as agent_mod
    import lmdeploy.pytorch.kv_connector.factory as factory

    from kv_runtime.backends.lmdeploy_connector import install, installed

    install()
    first = factory.build_kv_connector
    install()
    assert factory.build_kv_connector is first and installed()
    assert engine_mod.build_kv_connector is first and agent_mod.build_kv_connector is first
    # the OpenAI server runs the engine in a spawned process: its entry installs the connector there first
    from lmdeploy.pytorch.engine.mp_engine.zmq_engine import ZMQMPEngine

    from kv_runtime.backends.lmdeploy_connector import _engine_process

    assert ZMQMPEngine._mp_proc is _engine_process


def test_unsupported_version_is_refused(monkeypatch):
    import lmdeploy

    from kv_runtime.backends.lmdeploy_connector import check_version

    monkeypatch.setattr(lmdeploy, "__version__", "0.17.2")
    with pytest.raises(RuntimeError, match="not supported"):
        check_version()


def test_ddr_and_disk_restores_match_full_prefill(engine, loop):
    from kv_runtime import Tier

    tokens = _prompt(1)
    store = engine.store
    ref = _logits(engine, loop, tokens)
    store.wait_idle()
    assert store.stats.saved_blocks >= len(tokens) // store.block_size - 1
    assert store.hierarchy.blocks_in(Tier.DISK), "write-through left nothing on disk"

    # This model is so small that recomputing beats loading: the cost model would rightly recompute.
    before = dict(store.stats.loaded_blocks)
    store.always_load = True
    try:
        from_ddr = _logits(engine, loop, tokens)
        assert store.stats.loaded_blocks["ddr"] > before["ddr"]
        assert _close(from_ddr, ref)
        from_disk = _logits(engine, loop, tokens, drop_ddr=True)
    finally:
        store.always_load = False
    assert store.stats.loaded_blocks["disk"] > before["disk"]
    assert _close(from_disk, ref)


def test_gpu_prefix_cache_hits_stay_lmdeploys(engine, loop):
    tokens = _prompt(2)
    engine.store.wait_idle()
    ref = _logits(engine, loop, tokens)
    before = dict(engine.store.stats.loaded_blocks)
    again = _logits(engine, loop, tokens, gpu=True)
    assert engine.store.stats.loaded_blocks == before  # LMDeploy served the prefix itself
    assert _close(again, ref)


def test_corrupt_disk_block_is_recomputed_and_counted(engine, loop):
    from kv_runtime import Tier

    tokens = _prompt(3)
    store = engine.store
    ref = _logits(engine, loop, tokens)
    store.wait_idle()
    nodes = store.hierarchy.match(store.keyer.request(np.asarray(tokens[:640], dtype=np.int32)))
    slot = nodes[2].payload.copies[Tier.DISK]
    path = store.hierarchy.pool(Tier.DISK).store.slab_path(slot.arena)
    with open(path, "r+b") as f:  # overwrite payload bytes of the third block on disk
        f.seek(slot.offset + 4096 + 100)
        f.write(b"\xff" * 64)
    misses = store.stats.load_misses
    store.always_load = True
    try:
        got = _logits(engine, loop, tokens, drop_ddr=True)
    finally:
        store.always_load = False
    assert store.stats.load_misses > misses
    assert _close(got, ref)


def test_generate_streams_tokens(engine, loop):
    async def collect():
        out, metrics = [], None
        async for o in engine.generate(_prompt(4, 300), max_new_tokens=8):
            out.append(o.token_id)
            metrics = o.metrics
        return out, metrics

    tokens, metrics = loop.run_until_complete(collect())
    assert len(tokens) == 8 and metrics.output_tokens == 8 and metrics.ttft_ms > 0


def test_reuse_is_reported_by_tier(engine, loop):
    """``reused_tokens`` says where a prompt's prefix came from: nothing, LMDeploy's GPU cache, kvtier's DDR."""
    tokens = _prompt(21, 640)  # 10 blocks; LMDeploy matches at most up to the last token: 9 blocks
    store = engine.store
    cold = loop.run_until_complete(engine.prefill(tokens))
    warm = loop.run_until_complete(engine.prefill(tokens))
    loop.run_until_complete(engine.evict_gpu_prefix_cache())
    store.always_load = True
    try:
        ddr = loop.run_until_complete(engine.prefill(tokens))
        # both: the front in LMDeploy's cache (a shorter prompt's blocks), the rest loaded from DDR
        loop.run_until_complete(engine.evict_gpu_prefix_cache())
        loop.run_until_complete(engine.prefill(tokens[:320]))
        loop.run_until_complete(engine.drain())
        loaded = store.stats.loaded_blocks["ddr"]
        both = loop.run_until_complete(engine.prefill(tokens + _prompt(24, 60)))
        loaded = store.stats.loaded_blocks["ddr"] - loaded
    finally:
        store.always_load = False
    assert sum(cold.reused_tokens.values()) == 0
    assert warm.reused_tokens == {"gpu": 576}
    assert ddr.reused_tokens == {"ddr": 576, "disk": 0}
    # LMDeploy's own count covers its cache and the connector's loads: kvtier's part is what it loaded
    assert loaded > 0 and both.reused_tokens["ddr"] == 64 * loaded and both.reused_tokens["disk"] == 0
    assert both.reused_tokens.get("gpu", 0) >= 320 and sum(both.reused_tokens.values()) == 640


def test_shared_context_on_lmdeploy(engine, loop):
    from kv_pipeline import UnknownContextError

    document = _prompt(22, 512)
    question = _prompt(23, 40)

    async def ask() -> tuple[list[int], object]:
        gen = engine.generate(question, shared_context_id="doc", max_new_tokens=4, split=False)
        outs = [o async for o in gen]
        return [o.token_id for o in outs], outs[-1].metrics

    ctx = loop.run_until_complete(engine.save_shared_context("doc", document, pin=True))
    assert ctx.num_tokens == 512 and [c.context_id for c in engine.list_shared_contexts()] == ["doc"]
    info = engine.shared_context_info("doc")
    assert info["cached_blocks"] == 8 and info["blocks_by_tier"].get("disk") == 8  # pinned: written down
    first, m1 = loop.run_until_complete(ask())
    assert m1.prompt_tokens == 552 and m1.reused_tokens.get("gpu", 0) >= 512
    loop.run_until_complete(engine.evict_gpu_prefix_cache())
    engine.store.always_load = True
    try:
        again, m2 = loop.run_until_complete(ask())
    finally:
        engine.store.always_load = False
    assert m2.reused_tokens.get("ddr", 0) + m2.reused_tokens.get("disk", 0) >= 512
    assert again == first
    assert loop.run_until_complete(engine.drop_shared_context("doc"))
    with pytest.raises(UnknownContextError):
        loop.run_until_complete(ask())
