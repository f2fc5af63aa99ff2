"""Named shared contexts: computed once, reused by name, listed, inspected, dropped, expired, pinned against
eviction, durable across restarts on the disk tier, and refused with clear errors."""

from __future__ import annotations

import time

import pytest
from pipeline_helpers import BLOCK, greedy, prompt, run

from kv_runtime import Tier

BLOCK_BYTES = 98_304  # qwen2-tiny, fp32, 16-token blocks: 2 layers x (K, V) x 2 heads x 16 tokens x 64 dims x 4 B


async def test_save_reuse_list_inspect_drop(make_engine):
    doc = prompt(BLOCK * 5 + 4, seed=1)
    question = prompt(10, seed=2)
    async with make_engine() as engine:
        assert engine.model.layout.block_bytes == BLOCK_BYTES
        ctx = await engine.save_shared_context("doc", doc)
        assert (ctx.context_id, ctx.tokens, ctx.pinned, ctx.expires) == ("doc", tuple(doc), True, None)
        info = engine.shared_context_info("doc")
        assert info["cached_blocks"] == 5 and info["tokens"] == len(doc) and info["pinned"]
        assert info["blocks_by_tier"] == {"ddr": 5, "disk": 5}  # pinned contexts are persisted
        assert engine.hierarchy.index.stats().pinned_blocks == 5
        outs = await run(engine, question, shared_context_id="doc", max_new_tokens=5, session_id="s1")
        m = outs[-1].metrics
        assert m.prompt_tokens == len(doc) + len(question)
        assert m.reused_tokens == {"ddr": 5 * BLOCK}
        assert m.computed_tokens == 4 + len(question)  # the context's partial block and the new part only
        assert [o.token_id for o in outs] == greedy(engine.model, doc + question, 5)
        assert [c.context_id for c in engine.list_shared_contexts()] == ["doc"]
        assert await engine.drop_shared_context("doc")
        assert not await engine.drop_shared_context("doc")
        assert engine.list_shared_contexts() == []
        assert engine.get_shared_context("doc") is None
        assert engine.hierarchy.index.stats().pinned_blocks == 0
        with pytest.raises(KeyError, match="doc"):
            engine.shared_context_info("doc")
        with pytest.raises(KeyError, match="doc"):
            await run(engine, question, shared_context_id="doc")


async def test_saving_again_replaces_the_context(make_engine):
    async with make_engine() as engine:
        await engine.save_shared_context("c", prompt(BLOCK * 3, seed=3))
        await engine.save_shared_context("c", prompt(BLOCK * 2, seed=4))
        assert engine.shared_context_info("c")["cached_blocks"] == 2
        assert engine.hierarchy.index.stats().pinned_blocks == 2
        assert len(engine.list_shared_contexts()) == 1


async def test_ttl_expiry(make_engine, monkeypatch):
    async with make_engine() as engine:
        ctx = await engine.save_shared_context("short", prompt(BLOCK * 2, seed=5), ttl=30)
        await engine.save_shared_context("long", prompt(BLOCK * 2, seed=6), ttl=3600)
        assert ctx.expires == pytest.approx(time.time() + 30, abs=5)
        assert engine.hierarchy.index.stats().pinned_blocks == 4
        later = time.time() + 60
        monkeypatch.setattr(time, "time", lambda: later)
        assert [c.context_id for c in engine.list_shared_contexts()] == ["long"]
        assert engine.get_shared_context("short") is None
        with pytest.raises(KeyError):
            await run(engine, [5, 6, 7], shared_context_id="short")
        assert engine.hierarchy.index.stats().pinned_blocks == 2  # the expired context's pins are gone


async def test_pinned_context_survives_ddr_pressure(make_engine):
    """A pinned context is the least recently used entry in a full DDR tier, yet under pressure from other
    prompts the unpinned blocks go and the context's stay: the same blocks in the same slots, all of them
    reused by its next request."""
    doc = prompt(BLOCK * 4, seed=7)
    others = [prompt(BLOCK * 6 + 1, seed=100 + i) for i in range(4)]
    # 12 blocks of DDR and no disk: four are the context's; each other prompt brings six new blocks, so from
    # the second one on, room is made only by evicting
    async with make_engine(ddr_bytes=12 * BLOCK_BYTES, disk_bytes=0) as engine:
        ddr = engine.hierarchy.pool(Tier.DDR)
        assert ddr.capacity_bytes == 12 * BLOCK_BYTES
        await engine.save_shared_context("pinned", doc)

        # matched once, now: a match is a use, and the context must stay the least recently used entry
        nodes = engine.hierarchy.match(engine.keyer.request(doc))
        slots = [n.payload.copies[Tier.DDR] for n in nodes]
        assert len(nodes) == 4

        def context_resident() -> bool:
            """The context's blocks are still indexed, each in the DDR slot it was written to."""
            live = {id(slot) for slot in ddr.live_slots()}
            return all(
                not n.payload.dropped and n.payload.copies.get(Tier.DDR) is slot and id(slot) in live
                for n, slot in zip(nodes, slots, strict=True)
            )

        for i, other in enumerate(others):
            live_before = ddr.stats().live_blocks
            m = (await run(engine, other, max_new_tokens=1))[-1].metrics
            assert m.reused_tokens == {}
            if i:
                assert live_before + 6 > 12  # this prompt's blocks fit only by evicting others
            # the context keeps its blocks, in the same slots: the unpinned blocks went instead
            assert context_resident()
            assert engine.hierarchy.index.stats().pinned_blocks == 4
            assert len(engine.hierarchy.match(engine.keyer.request(other))) == 6  # (already the newest)

        assert engine.shared_context_info("pinned")["blocks_by_tier"] == {"ddr": 4}
        assert engine.shared_context_info("pinned")["cached_blocks"] == 4
        question = prompt(5, seed=8)
        outs = await run(engine, question, shared_context_id="pinned", max_new_tokens=1)
        m = outs[-1].metrics
        assert m.reused_tokens == {"ddr": 4 * BLOCK} and m.computed_tokens == len(question)
        assert [o.token_id for o in outs] == greedy(engine.model, doc + question, 1)
        # the newest unpinned prompt survived; the earliest was evicted meanwhile and is recomputed
        assert (await run(engine, others[-1], max_new_tokens=1))[-1].metrics.reused_tokens == {"ddr": 6 * BLOCK}
        outs = await run(engine, others[0], max_new_tokens=1)
        assert outs[-1].metrics.reused_tokens == {}
        assert context_resident()


async def test_context_survives_restart_from_disk(make_engine):
    doc = prompt(BLOCK * 5 + 2, seed=9)
    question = prompt(7, seed=10)
    async with make_engine(write_mode="selective") as engine:
        await engine.save_shared_context("manual", doc, ttl=3600)
        baseline = greedy(engine.model, doc + question, 4)
    async with make_engine(write_mode="selective") as engine:
        (ctx,) = engine.list_shared_contexts()
        assert ctx.context_id == "manual" and ctx.tokens == tuple(doc) and ctx.expires is not None
        info = engine.shared_context_info("manual")
        assert info["cached_blocks"] == 5 and info["blocks_by_tier"] == {"disk": 5}
        assert engine.hierarchy.index.stats().pinned_blocks == 5  # pinned again at start
        outs = await run(engine, question, shared_context_id="manual", max_new_tokens=4)
        m = outs[-1].metrics
        assert m.reused_tokens.get("disk", 0) > 0 and m.load_misses == 0
        assert sum(m.reused_tokens.values()) + m.computed_tokens == len(doc) + len(question)
        assert [o.token_id for o in outs] == baseline


async def test_context_too_large_for_the_tiers(make_engine):
    async with make_engine(ddr_bytes=2 * BLOCK_BYTES, disk_bytes=0) as engine:
        with pytest.raises(RuntimeError, match="does not fit"):
            await engine.save_shared_context("big", prompt(BLOCK * 5, seed=11))
        assert engine.list_shared_contexts() == []
        assert engine.hierarchy.index.stats().pinned_blocks == 0


async def test_bad_context_inputs(make_engine):
    async with make_engine() as engine:
        with pytest.raises(ValueError, match="context_id must be a non-empty str"):
            await engine.save_shared_context("", prompt(BLOCK))
        for ttl in (0, -1.5):
            with pytest.raises(ValueError, match="ttl"):
                await engine.save_shared_context("t", prompt(BLOCK), ttl=ttl)
        with pytest.raises(ValueError, match="at least one full block"):
            await engine.save_shared_context("short", prompt(BLOCK - 1))
        with pytest.raises(KeyError, match="nope"):
            engine.shared_context_info("nope")
        with pytest.raises(KeyError, match="nope"):
            await run(engine, [1, 2, 3], shared_context_id="nope")
        assert not await engine.drop_shared_context("nope")
        assert engine.list_shared_contexts() == []
    with pytest.raises(RuntimeError, match="not started"):
        engine.list_shared_contexts()
