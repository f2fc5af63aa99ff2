"""The transformers engine restores cached prefixes exactly: logits after restoring a prefix (from DDR, from disk
after a restart) equal a full prefill's, greedy continuations equal a no-cache baseline, and a corrupt block on
disk is a counted miss that is recomputed with the same answer.

Tolerance: fp32 on the CPU, ``atol=1e-4`` on logits (restored K/V are the same bytes, so it is usually exact).
"""

from __future__ import annotations

import torch
from pipeline_helpers import BLOCK, full_logits, greedy, prompt

from kv_io.disk_format import HEADER_BYTES
from kv_runtime import Tier
from kv_runtime.backends.hf_backend import HFModel

ATOL = 1e-4


async def _logits(engine, tokens):
    logits, metrics = await engine.prompt_logits(tokens)
    await engine.scheduler.drain()
    return logits, metrics


def test_hf_blocks_round_trip_to_full_prefill_logits(model_dir):
    """HFModel alone: cache -> block bytes -> fresh cache, then the rest, equals one full prefill at every
    position of the rest, for several lengths and split points."""
    model = HFModel(model_dir, device="cpu", block_size=BLOCK)
    for length, split_blocks in [(40, 1), (40, 2), (100, 3), (131, 8)]:
        tokens = torch.tensor(prompt(length, seed=length))
        split = split_blocks * BLOCK
        full = model.prefill_logits(tokens, model.new_cache())
        cache = model.new_cache()
        model.prefill(tokens[:split], cache)
        blocks = model.blocks_from_cache(cache, 0, split_blocks)
        assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (split_blocks, model.layout.block_bytes)
        restored = model.cache_from_blocks(blocks)
        assert restored.get_seq_length() == split
        rest = model.prefill_logits(tokens[split:], restored)
        torch.testing.assert_close(rest, full[split:], atol=ATOL, rtol=0)
        # blocks taken from the middle of a cache are the same bytes as the ones of a shorter prefill
        if split_blocks > 1:
            tail = model.blocks_from_cache(cache, 1, split_blocks - 1)
            assert torch.equal(tail, blocks[1:])


async def test_engine_restores_from_ddr_and_disk_with_full_prefill_logits(make_engine):
    cases = [(BLOCK * 2 + 3, 5), (BLOCK * 5, 1), (BLOCK * 9 + 7, BLOCK + 2)]  # (prefix length, extra tokens)
    prompts = [(prompt(n, seed=i), prompt(extra, seed=100 + i)) for i, (n, extra) in enumerate(cases)]
    references = []
    async with make_engine() as engine:
        for prefix, extra in prompts:
            longer = prefix + extra
            reference = full_logits(engine.model, longer)
            references.append(reference)
            first, m0 = await _logits(engine, prefix)
            assert m0.plan == "recompute" and m0.computed_tokens == len(prefix)
            torch.testing.assert_close(first, full_logits(engine.model, prefix), atol=ATOL, rtol=0)
            again, m1 = await _logits(engine, longer)
            reusable = min(len(prefix) // BLOCK, (len(longer) - 1) // BLOCK) * BLOCK
            assert m1.plan == "load"
            assert m1.reused_tokens == {"ddr": reusable}
            assert m1.computed_tokens == len(longer) - reusable
            assert m1.bytes_loaded == reusable // BLOCK * engine.model.layout.block_bytes
            torch.testing.assert_close(again, reference, atol=ATOL, rtol=0)
    async with make_engine() as engine:  # restart: DDR is empty, the prefixes are on disk only
        for (prefix, extra), reference in zip(prompts, references, strict=True):
            restored, m2 = await _logits(engine, prefix + extra)
            disk = m2.reused_tokens.get("disk", 0)
            assert disk > 0 and "ddr" not in m2.reused_tokens
            assert disk + m2.computed_tokens == len(prefix) + len(extra)
            assert m2.load_misses == 0
            torch.testing.assert_close(restored, reference, atol=ATOL, rtol=0)


async def test_greedy_continuations_equal_the_no_cache_baseline(make_engine):
    tokens = prompt(BLOCK * 6 + 5, seed=7)
    async with make_engine() as engine:
        baseline = greedy(engine.model, tokens, 8)
        assert len(set(baseline)) > 1  # a real continuation, not one token repeated
        runs = []
        for _ in range(2):  # first from scratch, then with the prefix from DDR
            outs = [out async for out in engine.generate(tokens, max_new_tokens=8)]
            await engine.scheduler.drain()
            runs.append(outs)
        assert runs[1][-1].metrics.reused_tokens["ddr"] == BLOCK * 6
        for outs in runs:
            assert [o.token_id for o in outs] == baseline
            assert [o.index for o in outs] == list(range(8))
            assert [o.finished for o in outs] == [False] * 7 + [True]
            assert all(o.metrics is None for o in outs[:-1]) and outs[-1].metrics.output_tokens == 8
    async with make_engine() as engine:  # from disk
        outs = [out async for out in engine.generate(tokens, max_new_tokens=8)]
        assert outs[-1].metrics.reused_tokens["disk"] > 0
        assert [o.token_id for o in outs] == baseline


def _corrupt(engine, tokens: list[int], block: int) -> None:
    """Flip payload bytes of the prompt's ``block`` in its disk slab file (DDR must not hold it)."""
    store = engine.hierarchy.pool(Tier.DISK).store
    key = engine.keyer.request(tokens).keys[block]
    (record,) = [r for r in store.records() if bytes(r.key).startswith(key)]
    path = store.slab_path(record.location.slab)
    with path.open("r+b") as f:
        f.seek(record.location.offset + HEADER_BYTES + 1000)
        data = f.read(8)
        f.seek(record.location.offset + HEADER_BYTES + 1000)
        f.write(bytes(b ^ 0xFF for b in data))


async def test_corrupt_disk_block_is_a_counted_miss_and_recomputed(make_engine):
    tokens = prompt(BLOCK * 8 + 3, seed=11)
    async with make_engine() as engine:
        baseline = greedy(engine.model, tokens, 6)
        reference = full_logits(engine.model, tokens)
        await engine.prefill(tokens)
        await engine.scheduler.drain()
    for block in (5, 0):  # a block in the middle of the prefix, then its very first block
        async with make_engine() as engine:
            assert not engine.hierarchy.blocks_in(Tier.DDR)
            _corrupt(engine, tokens, block)
            logits, m = await _logits(engine, tokens)
            torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
            assert m.load_misses == 1
            assert m.reused_tokens.get("disk", 0) == block * BLOCK  # the blocks before the bad one still load
            assert m.computed_tokens == len(tokens) - block * BLOCK
            assert engine.hierarchy.pool(Tier.DISK).store.stats()["corrupt"] == 1
            snap = engine.metrics_snapshot()
            assert snap["pipeline"]["totals"]["load_misses"] == 1
            assert snap["transfers"]["DISK->DDR"]["misses"] == 1
            assert b"kvtier_load_misses_total 1.0" in engine.metrics.prometheus_text()
            # the bad block left the index with the request's lease and was cached again from the recompute
            outs = [out async for out in engine.generate(tokens, max_new_tokens=6)]
            await engine.scheduler.drain()
            assert [o.token_id for o in outs] == baseline
            assert outs[-1].metrics.load_misses == 0
            assert outs[-1].metrics.reused_tokens.get("ddr", 0) >= block * BLOCK
            again, m = await _logits(engine, tokens)
            assert m.reused_tokens == {"ddr": 8 * BLOCK} and m.computed_tokens == 3
            torch.testing.assert_close(again, reference, atol=ATOL, rtol=0)


async def test_corrupt_block_demoted_by_a_tiny_ddr_is_recomputed(make_engine):
    first, other = prompt(BLOCK * 4 + 3, seed=12), prompt(BLOCK * 6 + 3, seed=13)
    # write-back with 8 blocks of DDR: the second prompt demotes the first one's blocks to disk
    async with make_engine(write_mode="write-back", ddr_bytes=8 * 98_304) as engine:
        reference = full_logits(engine.model, first)
        await engine.prefill(first)
        await engine.scheduler.drain()
        await engine.prefill(other)
        await engine.scheduler.drain()
        rk = engine.keyer.request(first)
        nodes = engine.hierarchy.match(rk)
        disk_only = [i for i, n in enumerate(nodes) if set(n.payload.copies) == {Tier.DISK}]
        assert disk_only, "the tiny DDR should have demoted some of the first prompt's blocks"
        _corrupt(engine, first, disk_only[0])
        logits, m = await _logits(engine, first)
        torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)
        assert m.load_misses == 1
        assert sum(m.reused_tokens.values()) <= disk_only[0] * BLOCK
        assert engine.hierarchy.pool(Tier.DISK).store.stats()["corrupt"] == 1


async def test_io_threads_reach_the_disk_tier(make_engine):
    async with make_engine(io_threads=3) as engine:
        assert engine.hierarchy.pools[Tier.DISK].store.file_io.threads == 3
