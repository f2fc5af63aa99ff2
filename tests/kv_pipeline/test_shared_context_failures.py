"""Shared contexts when things go wrong: saves that fail in persistence or do not fit leave no pin and no
record, concurrent saves of one id leave exactly one context's pins, tenants under different cache salts keep
their own contexts of the same name, and the registry file heals when damaged, migrates from the first
schema, and is refused behind a symlink."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3

import pytest
from pipeline_helpers import BLOCK, GATE_S, prompt, run

from kv_io.private_files import UnsafePathError
from kv_pipeline import ContextStoreError, RequestError, UnknownContextError
from kv_runtime.pool import PoolFullError

BLOCK_BYTES = 98_304  # qwen2-tiny, fp32, 16-token blocks


def pinned(engine) -> int:
    return engine.hierarchy.index.stats().pinned_blocks


def pin_counts(engine, tokens: list[int]) -> list[int]:
    """The pin count of each cached block of ``tokens``' prefix."""
    return [n.pin_count for n in engine.hierarchy.match(engine.keyer.request(tokens))]


async def test_failed_persist_releases_every_pin_and_keeps_the_blocks_cached(make_engine, monkeypatch):
    docs = [prompt(BLOCK * 4, seed=40 + i) for i in range(3)]
    async with make_engine() as engine:

        async def broken_persist(residencies):
            raise OSError("the disk tier is gone")

        monkeypatch.setattr(engine.service, "persist", broken_persist)
        for i, doc in enumerate(docs):
            with pytest.raises(ContextStoreError, match="could not be stored") as info:
                await engine.save_shared_context(f"c{i}", doc)
            assert isinstance(info.value.__cause__, OSError)
            assert pinned(engine) == 0  # 3 failed saves used to leave 12 blocks pinned for good
        assert engine.list_shared_contexts() == []
        with pytest.raises(UnknownContextError):
            await run(engine, [5, 6, 7], shared_context_id="c0")
        # the computed blocks stay in the cache as ordinary (unpinned, reusable) blocks
        m = (await run(engine, docs[0] + [9], max_new_tokens=1))[-1].metrics
        assert m.reused_tokens == {"ddr": 4 * BLOCK}
        assert pin_counts(engine, docs[0]) == [0] * 4

        monkeypatch.undo()  # a working disk tier again: the same save succeeds and pins once
        await engine.save_shared_context("c0", docs[0])
        assert pin_counts(engine, docs[0]) == [1] * 4 and pinned(engine) == 4


async def test_a_failed_replacement_keeps_the_previous_context(make_engine, monkeypatch):
    old, new = prompt(BLOCK * 3, seed=44), prompt(BLOCK * 2, seed=45)
    async with make_engine() as engine:
        await engine.save_shared_context("c", old)

        async def broken_persist(residencies):
            raise OSError("no space left on device")

        monkeypatch.setattr(engine.service, "persist", broken_persist)
        with pytest.raises(ContextStoreError):
            await engine.save_shared_context("c", new)
        assert engine.get_shared_context("c").tokens == tuple(old)
        assert pin_counts(engine, old) == [1] * 3 and pin_counts(engine, new) == [0] * 2
        assert pinned(engine) == 3


async def test_no_room_while_persisting_is_the_documented_error(make_engine, monkeypatch):
    async with make_engine() as engine:

        async def full(residencies):
            raise PoolFullError("no free extent of 98304 bytes")

        monkeypatch.setattr(engine.service, "persist", full)
        with pytest.raises(ContextStoreError, match="does not fit") as info:
            await engine.save_shared_context("c", prompt(BLOCK * 3, seed=65))
        assert isinstance(info.value.__cause__, PoolFullError)
        assert pinned(engine) == 0 and engine.list_shared_contexts() == []


async def test_a_cancelled_save_releases_its_pins(make_engine, monkeypatch):
    doc = prompt(BLOCK * 3, seed=66)
    async with make_engine() as engine:
        entered = asyncio.Event()

        async def stuck(residencies):
            entered.set()
            await asyncio.Event().wait()  # never set: the save is cancelled while here

        monkeypatch.setattr(engine.service, "persist", stuck)
        task = asyncio.create_task(engine.save_shared_context("c", doc))
        await asyncio.wait_for(entered.wait(), GATE_S)
        assert pin_counts(engine, doc) == [1] * 3  # pinned while it persists
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pin_counts(engine, doc) == [0] * 3 and pinned(engine) == 0
        assert engine.get_shared_context("c") is None and engine.shared_contexts.idle()


async def test_a_full_disk_tier_fails_the_save_and_releases_its_pins(make_engine):
    # two blocks of disk: a pinned context of five cannot be made durable
    async with make_engine(disk_bytes=2 * BLOCK_BYTES) as engine:
        for i in range(3):
            with pytest.raises(ContextStoreError):
                await engine.save_shared_context(f"big{i}", prompt(BLOCK * 5, seed=46 + i))
            assert pinned(engine) == 0
        assert engine.list_shared_contexts() == []


async def test_a_context_larger_than_the_cache_is_refused_with_nothing_pinned(make_engine):
    async with make_engine(ddr_bytes=2 * BLOCK_BYTES, disk_bytes=0) as engine:
        for i in range(3):
            with pytest.raises(ContextStoreError, match="does not fit"):
                await engine.save_shared_context(f"big{i}", prompt(BLOCK * 5, seed=50 + i))
        assert pinned(engine) == 0 and engine.list_shared_contexts() == []
        # what fits is still saved
        await engine.save_shared_context("small", prompt(BLOCK * 2, seed=53))
        assert pinned(engine) == 2


async def test_concurrent_saves_of_one_id_leave_one_contexts_pins(make_engine):
    first, second = prompt(BLOCK * 3, seed=54), prompt(BLOCK * 3, seed=55)
    async with make_engine() as engine:
        await asyncio.gather(engine.save_shared_context("c", first), engine.save_shared_context("c", second))
        # the saves ran one after the other, in call order: the second replaced the first
        assert engine.get_shared_context("c").tokens == tuple(second)
        assert pin_counts(engine, second) == [1] * 3 and pin_counts(engine, first) == [0] * 3
        assert pinned(engine) == 3

        # the same content saved twice at once is pinned once
        await asyncio.gather(*(engine.save_shared_context("d", first) for _ in range(3)))
        assert pin_counts(engine, first) == [1] * 3 and pinned(engine) == 6

        # a drop issued while a save of the id runs waits for it, then removes it
        save = engine.save_shared_context("e", prompt(BLOCK * 2, seed=56))
        await asyncio.gather(save, engine.drop_shared_context("e"))
        assert engine.get_shared_context("e") is None and pinned(engine) == 6
        assert engine.shared_contexts.idle()  # no per-id state outlives its saves


async def test_two_cache_salts_over_one_cache_dir_keep_both_contexts(make_engine):
    doc_a, doc_b = prompt(BLOCK * 2, seed=57), prompt(BLOCK * 3, seed=58)
    async with make_engine(cache_salt="tenant-a") as a:
        await a.save_shared_context("manual", doc_a)
    async with make_engine(cache_salt="tenant-b") as b:
        assert b.list_shared_contexts() == []  # tenant A's context is not visible to B
        await b.save_shared_context("manual", doc_b)
        assert await b.drop_shared_context("manual")
        await b.save_shared_context("manual", doc_b)
    async with make_engine(cache_salt="tenant-a") as a:
        (ctx,) = a.list_shared_contexts()
        assert ctx.tokens == tuple(doc_a)
        assert pinned(a) == 2  # pinned again at start, from the disk tier
    async with make_engine(cache_salt="tenant-b") as b:
        (ctx,) = b.list_shared_contexts()
        assert ctx.tokens == tuple(doc_b) and pinned(b) == 3


def _registry(engine_or_dir) -> str:
    return str(engine_or_dir / "contexts.sqlite3")


@pytest.mark.parametrize("damage", ["random bytes", "foreign schema", "foreign table", "truncated"])
async def test_a_damaged_registry_is_moved_aside_and_replaced(make_engine, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    doc = prompt(BLOCK * 2, seed=60)
    async with make_engine() as engine:
        await engine.save_shared_context("doc", doc)
    path = _registry(cache)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    if damage == "random bytes":
        with open(path, "wb") as f:
            f.write(os.urandom(8192))
    elif damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(1000)
    else:
        os.unlink(path)
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE contexts (x)" if damage == "foreign schema" else "CREATE TABLE other (x)")
        db.commit()
        db.close()
        os.chmod(path, 0o600)
    with open(path, "rb") as f:
        damaged_bytes = f.read()

    with caplog.at_level(logging.WARNING, logger="kv_pipeline"):
        async with make_engine() as engine:
            assert engine.list_shared_contexts() == []
            assert pinned(engine) == 0
            assert engine.metrics_snapshot()["pipeline"]["context_registry_damaged"] == 1
            assert b"kvtier_context_registry_damaged_total 1.0" in engine.metrics.prometheus_text()
            await engine.save_shared_context("fresh", doc)
    (aside,) = [p for p in os.listdir(cache) if p.startswith("contexts.sqlite3.damaged-")]
    assert aside.removeprefix("contexts.sqlite3.damaged-").isdigit()
    with open(cache / aside, "rb") as f:
        assert f.read() == damaged_bytes  # kept as it was, for whoever wants to look at it
    assert any("damaged" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    async with make_engine() as engine:  # the fresh registry works across a restart
        assert [c.context_id for c in engine.list_shared_contexts()] == ["fresh"]
        assert engine.metrics_snapshot()["pipeline"]["context_registry_damaged"] == 0


async def test_the_first_schema_is_migrated_in_place(make_engine, tmp_path):
    cache = tmp_path / "cache"
    doc = prompt(BLOCK * 3, seed=61)
    async with make_engine() as engine:
        ctx = await engine.save_shared_context("old", doc)
        digest = engine.namespace.digest
    path = _registry(cache)
    db = sqlite3.connect(path)
    db.executescript(
        "DROP TABLE contexts; PRAGMA user_version = 0;"
        "CREATE TABLE contexts (context_id TEXT PRIMARY KEY, namespace BLOB NOT NULL, tokens BLOB NOT NULL,"
        " pinned INTEGER NOT NULL, created REAL NOT NULL, expires REAL)"
    )
    blob = b"".join(t.to_bytes(4, "little") for t in doc)
    db.execute("INSERT INTO contexts VALUES (?, ?, ?, 1, ?, NULL)", ("old", digest, blob, ctx.created))
    db.commit()
    db.close()
    async with make_engine() as engine:
        (got,) = engine.list_shared_contexts()
        assert (got.context_id, got.tokens, got.pinned) == ("old", tuple(doc), True)
        assert pinned(engine) == 3
        assert engine.metrics_snapshot()["pipeline"]["context_registry_damaged"] == 0
    db = sqlite3.connect(path)
    key = [r[1] for r in sorted(db.execute("PRAGMA table_info(contexts)"), key=lambda r: r[5]) if r[5]]
    assert key == ["namespace", "context_id"]
    assert db.execute("PRAGMA user_version").fetchone() == (2,)
    db.close()


async def test_a_record_with_ids_outside_the_vocabulary_is_dropped_at_start(make_engine, tmp_path, caplog):
    doc = prompt(BLOCK * 2, seed=63)
    async with make_engine() as engine:
        await engine.save_shared_context("good", doc)
        await engine.save_shared_context("bad", prompt(BLOCK * 2, seed=64))
    db = sqlite3.connect(_registry(tmp_path / "cache"))
    db.execute("UPDATE contexts SET tokens = ? WHERE context_id = 'bad'", ((9000).to_bytes(4, "little") * BLOCK,))
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="kv_pipeline"):
        async with make_engine() as engine:
            assert [c.context_id for c in engine.list_shared_contexts()] == ["good"]
            assert pinned(engine) == 2
    assert any("outside the vocabulary" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("suffix", ["", "-wal"])
async def test_a_symlinked_registry_is_refused_and_its_target_untouched(make_engine, tmp_path, suffix):
    cache = tmp_path / "cache"
    async with make_engine():
        pass
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"not kvtier's file")
    os.chmod(target, 0o644)
    link = _registry(cache) + suffix
    if os.path.exists(link):
        os.unlink(link)
    os.symlink(target, link)
    with pytest.raises(UnsafePathError, match="symlink"):
        async with make_engine():
            pass
    assert target.read_bytes() == b"not kvtier's file"
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert os.path.islink(link)
    assert not [p for p in os.listdir(cache) if ".damaged-" in p]  # refused, never "healed" by moving it
    os.unlink(link)
    async with make_engine() as engine:  # the refused start released everything it had opened
        assert engine.list_shared_contexts() == []


async def test_the_registry_file_is_private(make_engine, tmp_path):
    async with make_engine() as engine:
        await engine.save_shared_context("doc", prompt(BLOCK, seed=62))
        mode = os.stat(_registry(tmp_path / "cache")).st_mode & 0o777
        assert mode == 0o600


async def test_shared_context_errors_are_documented_types(make_engine):
    async with make_engine() as engine:
        with pytest.raises(UnknownContextError, match="no shared context named 'nope'") as info:
            engine.shared_context_info("nope")
        assert isinstance(info.value, KeyError) and isinstance(info.value, RequestError)
        assert str(info.value) == "no shared context named 'nope'"
        for bad in (None, 3, b"id", "", "x" * 2000, "a\x00b", "\ud800"):
            with pytest.raises(RequestError, match="context_id"):
                await engine.save_shared_context(bad, prompt(BLOCK))
            with pytest.raises(RequestError, match="context_id"):
                await engine.drop_shared_context(bad)
        for pin in (1, None, "yes"):
            with pytest.raises(RequestError, match="pin"):
                await engine.save_shared_context("c", prompt(BLOCK), pin=pin)
        for ttl in ("10", float("nan"), float("inf"), True, 0):
            with pytest.raises(RequestError, match="ttl"):
                await engine.save_shared_context("c", prompt(BLOCK), ttl=ttl)
        assert pinned(engine) == 0 and engine.list_shared_contexts() == []
