"""The child processes of ``kvtier bench faults``, run as ``python -m kv_benchmarks.faults_worker MODE CONFIG``.

``CONFIG`` is one JSON object. Lines on stdout are the protocol; logs go to stderr. Every child first imports
everything and loads the model once, prints ``warm`` and waits for a ``go`` line on stdin before it touches the
cache directory: its slow start overlaps the parent's work, and the parent decides when it opens the cache.

``kill``
    open an engine with a disk tier (write-through) on ``cache_dir``, print ``ready``, then serve prompts
    ``start``, ``start + 1``, ... (``faults.family_prompt``) one after the other until the parent SIGKILLs it,
    printing ``done I`` as each request returns, its write-back still running in the background.
``fullfs``
    open an engine, serve a few requests, then lower ``RLIMIT_FSIZE`` so that writes past it fail with EFBIG
    (SIGXFSZ ignored): the requests before it created (and preallocated) the first slab file, so its slots
    beyond the limit, and the growth of its SQLite write-ahead log, become unwritable. Serve ``requests``
    requests under the limit and a quarter as many (at least 4) once it is lifted, each checked against a full
    prefill; print progress lines, then one JSON line.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kv_benchmarks.faults import (
    check_logits,
    describe,
    disk_write_failures,
    engine_options,
    family_prompt,
    leftovers,
    token_run,
)

FULLFS_DDR_BLOCKS, FULLFS_DISK_BLOCKS = 16, 160
FULLFS_LIMIT_BLOCKS = 24  # writes past this many blocks' worth of bytes into any file fail


def _engine(cfg: dict[str, Any], **opts: Any) -> Any:
    from kv_pipeline import KVTierEngine

    return KVTierEngine.from_pretrained(cfg["model"], **engine_options(Path(cfg["cache_dir"]), **opts))


async def kill(cfg: dict[str, Any]) -> int:
    opts = dict(ddr_bytes=cfg["ddr_bytes"], disk_bytes=cfg["disk_bytes"], block_size=cfg["block_size"])
    async with _engine(cfg, write_mode="write-through", **opts) as engine:
        print("ready", flush=True)
        # Never ends on its own: the parent's SIGKILL always lands while it writes, however slow the machine.
        for i in itertools.count(cfg["start"]):
            await engine.prefill(family_prompt(cfg["seed"], i, cfg["block_size"]))
            print(f"done {i}", flush=True)
    return 0


async def fullfs(cfg: dict[str, Any]) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    bs, block_bytes, seed = cfg["block_size"], cfg["block_bytes"], cfg["seed"]
    rng = np.random.default_rng([seed, 0xC])
    out: dict[str, Any] = {"requests": 0, "wrong_answers": 0, "crashes": 0, "errors": []}
    history: list[list[int]] = []
    restored = 0

    async def one(engine: Any, i: int) -> None:
        nonlocal history, restored
        u = rng.random()
        if u < 0.3 and history:
            tokens = history[int(rng.integers(0, len(history)))]
        elif u < 0.7:
            tokens = family_prompt(seed, i, bs)
        else:
            tokens = token_run(seed, 9, i, int(rng.integers(bs, 8 * bs)))
        history = [*history[-63:], tokens]
        out["requests"] += 1
        try:
            checked = await check_logits(engine, tokens)
        except Exception as exc:  # the request raised: a crash, counted; the child goes on
            out["crashes"] += 1
            out["errors"].append(f"crash: request {i}: {describe(exc)}")
            return
        restored += checked.reused
        if not checked.ok:
            out["wrong_answers"] += 1
            out["errors"].append(f"wrong answer: request {i}, max |logits - full prefill| = {checked.diff:.3g}")

    opts = dict(ddr_bytes=FULLFS_DDR_BLOCKS * block_bytes, disk_bytes=FULLFS_DISK_BLOCKS * block_bytes, block_size=bs)
    async with _engine(cfg, write_mode="write-through", **opts) as engine:
        for i in range(4):
            await one(engine, i)
        await engine.scheduler.drain()
        before = disk_write_failures(engine)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = FULLFS_LIMIT_BLOCKS * block_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        print(f"file-size limit {limit} bytes: serving {cfg['requests']} requests", flush=True)
        for i in range(4, 4 + cfg["requests"]):
            await one(engine, i)
            if (i - 3) % 20 == 0:
                print(
                    f"{i - 3}/{cfg['requests']} under the limit: {out['wrong_answers']} wrong, "
                    f"{disk_write_failures(engine) - before} disk block writes refused",
                    flush=True,
                )
        await engine.scheduler.drain()
        under = disk_write_failures(engine) - before
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        disk_blocks_before = engine.service.snapshot()["blocks"].get("disk", 0)
        after = max(4, cfg["requests"] // 4)
        for i in range(4 + cfg["requests"], 4 + cfg["requests"] + after):
            await one(engine, i)
        await engine.scheduler.drain()
        snapshot = engine.service.snapshot()
        out.update(
            limit_bytes=limit,
            disk_write_failures=under,
            disk_write_failures_after_space_back=disk_write_failures(engine) - before - under,
            disk_blocks_when_space_came_back=disk_blocks_before,
            disk_blocks_at_end=snapshot["blocks"].get("disk", 0),
            cache_failures=snapshot.get("cache_failures", {}),
            requests_after_space_back=after,
            tokens_restored=restored,
            leaked_pins=sum(leftovers(engine).values()),
        )
    print(json.dumps(out), flush=True)
    return 0


def warm_up(cfg: dict[str, Any]) -> None:
    """Import everything and load the model once, before the parent says go: the slow part of a start."""
    from kv_pipeline import KVTierEngine  # noqa: F401
    from kv_runtime.backends.hf_backend import HFModel

    HFModel(cfg["model"], device="cpu", block_size=cfg["block_size"])


def main(argv: list[str]) -> int:
    mode, cfg = argv[0], json.loads(argv[1])
    warm_up(cfg)
    print("warm", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 0  # the parent went away or changed its mind
    return asyncio.run({"kill": kill, "fullfs": fullfs}[mode](cfg))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
