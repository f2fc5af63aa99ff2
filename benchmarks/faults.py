"""Faults and soak: every answer still equals a full prefill when the cache's process is killed, its files are
damaged, its disk is full, requests are cancelled, and it runs for long on tiers that evict all the time.

Five phases on the embedded transformers engine (CPU, a random-weight model built locally), each counting the
faults it injected and checking every answer it got against a full prefill of the same tokens on a fresh cache
(``prompt_logits`` within ``ATOL``; greedy tokens for ``generate``):

``kill``
    a child process with a disk tier serves prompts (``faults_worker kill``) and is SIGKILLed at a seeded moment
    (after a seeded number of its progress lines plus a seeded delay); the parent then opens the same cache
    directory and asks for the prompts the child finished, the one it was writing and ones it never started.
``corrupt``
    a closed engine's cache directory gets flipped bytes in block slots, a truncated or deleted slab file, random
    bytes over ``blocks/index.sqlite3`` and ``contexts.sqlite3`` and garbage in ``blocks/manifest.json``, one
    damage per round plus one round with all of them; the reopened engine answers every prompt again.
``fullfs``
    a child process (``faults_worker fullfs``) serves requests under ``RLIMIT_FSIZE`` (SIGXFSZ ignored, so
    writes past the limit fail with EFBIG): the disk tier's writes fail, the requests must not.
``cancel``
    rounds of concurrent ``generate`` streams, a seeded subset cancelled: the task cancelled at a seeded delay
    (queued, loading, prefilling or decoding) or after a seeded number of tokens, or the stream closed after one;
    every token a stream got equals the greedy baseline's, and afterwards nothing is pinned, busy or in flight.
``soak``
    many requests (repeated prompts, shared prefixes with new tails, new prompts) on small DDR and disk tiers;
    every ``--check-every`` requests a new prompt's blocks must be found cached once write-back drained (a miss
    is a caching stall); RSS is sampled (after a garbage collection and ``malloc_trim``) and its growth over the
    second half reported per 1,000 requests.

Timing only chooses *when* a fault lands; no check depends on it. An exception the engine raises (a reopen of a
damaged directory included) is a crash: it is counted and reported with its message, never retried away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kv_benchmarks.args import add_model_arguments, add_scale_arguments
from kv_benchmarks.report import Report

ATOL = 1e-4  # fp32 on the CPU; restored K/V are the same bytes, so the difference is usually exactly 0
PHASES = ("kill", "corrupt", "fullfs", "cancel", "soak")
DAMAGES = ("flip", "truncate", "delete", "index", "contexts", "manifest", "all")
CHILD_TIMEOUT_S = 300.0  # a child that prints nothing for this long is a crash (it never decides a pass)
VOCAB_TOP = 8000  # prompt token ids in [2, VOCAB_TOP): inside every reference shape's vocabulary, no EOS

QUICK = dict(
    kills=3,
    corrupt_rounds=1,
    corrupt_prompts=6,
    fullfs_requests=40,
    requests=50,
    cancel_rounds=1,
    soak_requests=500,
    check_every=25,
)
FULL = dict(
    kills=12,
    corrupt_rounds=3,
    corrupt_prompts=10,
    fullfs_requests=150,
    requests=50,
    cancel_rounds=4,
    soak_requests=4000,
    check_every=25,
)
HELP = {
    "kills": "SIGKILLs of the writing child (phase kill)",
    "corrupt_rounds": "passes over every damage kind (phase corrupt)",
    "corrupt_prompts": "prompts cached, damaged and asked again per damage (phase corrupt)",
    "fullfs_requests": "requests served under the file-size limit (phase fullfs)",
    "requests": "concurrent generate streams per round (phase cancel)",
    "cancel_rounds": "rounds of concurrent streams (phase cancel)",
    "soak_requests": "requests of the soak (phase soak)",
    "check_every": "a caching check every this many soak requests (phase soak)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)} (default all)"
    )
    parser.add_argument(
        "--damages",
        default=",".join(DAMAGES),
        help=f"phase corrupt's damage kinds, of {', '.join(DAMAGES)} (default all)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (small: many blocks)")
    parser.add_argument("--seed", type=int, default=0)
    add_scale_arguments(parser, FULL, QUICK, HELP)


# ---------------------------------------------------------------------------------------------------- workload


def token_run(seed: int, tag: int, index: int, n: int) -> list[int]:
    """``n`` token ids, the same for the same (seed, tag, index) in every process."""
    rng = np.random.default_rng([seed, tag, index])
    return rng.integers(2, VOCAB_TOP, n).tolist()


def family_prompt(seed: int, index: int, block_size: int, families: int = 4) -> list[int]:
    """Prompt ``index``: one of ``families`` shared 4-block prefixes, then a tail of its own (1 to 3 blocks'
    worth, rarely block-aligned), so later prompts restore earlier ones' blocks."""
    prefix = token_run(seed, 1, index % families, 4 * block_size)
    n_tail = int(np.random.default_rng([seed, 2, index]).integers(1, 3 * block_size + 1))
    return prefix + token_run(seed, 3, index, n_tail)


def engine_options(
    cache_dir: Path, *, ddr_bytes: int, disk_bytes: int, block_size: int, write_mode: str
) -> dict[str, Any]:
    return {
        "cache_dir": cache_dir,
        "ddr_bytes": ddr_bytes,
        "disk_bytes": disk_bytes,
        "block_size": block_size,
        "device": "cpu",
        "write_mode": write_mode,
    }


def block_bytes_of(model_dir: Path, block_size: int) -> int:
    from kv_runtime import KVLayout

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return KVLayout.from_config(config, block_size=block_size).block_bytes


# ---------------------------------------------------------------------------------------------------- checks


def full_prefill_logits(model: Any, tokens: list[int]) -> Any:
    """The reference: the prompt's last logits from a full prefill on a fresh cache, straight through the model."""
    import torch

    return model.prefill(torch.tensor(tokens), model.new_cache())


def greedy_baseline(model: Any, tokens: list[int], n: int) -> list[int]:
    """The reference for ``generate``: a full prefill, then greedy decoding, straight through the model."""
    import torch

    cache = model.new_cache()
    out = [int(torch.argmax(model.prefill(torch.tensor(tokens), cache)))]
    while len(out) < n:
        out.append(int(torch.argmax(model.decode(out[-1], cache))))
    return out


@dataclass(slots=True)
class Checked:
    ok: bool
    diff: float
    reused: int  # prompt tokens restored from the tiers
    metrics: Any


async def check_logits(engine: Any, tokens: list[int]) -> Checked:
    """One request through the cache, its logits compared with a full prefill of the same tokens."""
    logits, metrics = await engine.prompt_logits(tokens)
    reference = full_prefill_logits(engine.model, tokens)
    diff = float((logits.float() - reference.float()).abs().max())
    return Checked(bool(diff <= ATOL), diff, sum(metrics.reused_tokens.values()), metrics)


def leftovers(engine: Any) -> dict[str, int]:
    """What no finished request may leave behind: index pins (besides named contexts'), blocks with a migration
    in flight, slots busy with a copy."""
    hierarchy = engine.hierarchy
    context_pins = engine.shared_contexts.pinned_blocks()
    pinned = hierarchy.index.stats().pinned_blocks - context_pins
    in_flight = sum(1 for tier in hierarchy.pools for r in hierarchy.blocks_in(tier) if r.in_flight)
    busy = sum(1 for pool in hierarchy.pools.values() for s in pool.live_slots() if s.busy)
    return {"pinned_blocks": pinned, "in_flight_blocks": in_flight, "busy_slots": busy}


def disk_write_failures(engine: Any) -> int:
    """Blocks whose disk copy could not be written: the tiers' ``cache_failures`` for the disk (write errors),
    or, where the service does not count them, the migrator's failed transfers into the disk tier."""
    snapshot = engine.service.snapshot()
    if "cache_failures" in snapshot:
        return int(snapshot["cache_failures"].get("disk", {}).get("write_error", 0))
    return int(sum(v["failures"] for k, v in snapshot["transfers"].items() if str(k).endswith("disk")))


def settle_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's ``malloc_trim``, where there is one), so
    that the resident set sampled next is what is live, not what an earlier phase freed and the allocator kept."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident set (psutil where installed, else /proc/self/statm)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    name: str
    faults_injected: int = 0
    requests: int = 0
    wrong_answers: int = 0
    crashes: int = 0
    leaked_pins: int = 0
    caching_stalls: int = 0
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def count(self, checked: Checked, what: str) -> None:
        self.requests += 1
        if not checked.ok:
            self.wrong_answers += 1
            self.errors.append(f"wrong answer: {what}, max |logits - full prefill| = {checked.diff:.3g}")

    def crash(self, what: str, exc: BaseException | str) -> None:
        self.crashes += 1
        self.errors.append(f"crash: {what}: {exc if isinstance(exc, str) else describe(exc)}")

    def summary(self) -> dict[str, Any]:
        return {
            "faults_injected": self.faults_injected,
            "requests": self.requests,
            "wrong_answers": self.wrong_answers,
            "crashes": self.crashes,
            "leaked_pins": self.leaked_pins,
            "caching_stalls": self.caching_stalls,
            "seconds": round(self.seconds, 1),
            **self.detail,
            "errors": self.errors[:20],
        }


@dataclass
class Bench:
    model_dir: Path
    work: Path
    block_size: int
    block_bytes: int
    seed: int
    params: dict[str, int]
    damages: tuple[str, ...] = DAMAGES

    def log(self, msg: str) -> None:
        print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def engine(self, cache_dir: Path, *, ddr_blocks: int, disk_blocks: int, write_mode: str) -> Any:
        from kv_pipeline import KVTierEngine

        opts = engine_options(
            cache_dir,
            ddr_bytes=ddr_blocks * self.block_bytes,
            disk_bytes=disk_blocks * self.block_bytes,
            block_size=self.block_size,
            write_mode=write_mode,
        )
        return KVTierEngine.from_pretrained(self.model_dir, **opts)


class Child:
    """A worker process (``faults_worker``). It starts warm: its imports and one model load are done before it
    prints ``warm`` and waits for ``go`` on stdin, so that its slow start overlaps the parent's own work and the
    moment it is told to go is the moment it opens the cache."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path

    @classmethod
    async def spawn(cls, mode: str, config: dict[str, Any], stderr_path: Path) -> Child:
        stderr_path.parent.mkdir(parents=True, exist_ok=True)
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kv_benchmarks.faults_worker",
                mode,
                json.dumps(config),
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                stdin=asyncio.subprocess.PIPE,
            )
        return cls(proc, stderr_path)

    async def readline(self) -> str | None:
        """The child's next line, or None at its end (or after ``CHILD_TIMEOUT_S`` of silence)."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), CHILD_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None
        return line.decode().strip() if line else None

    async def go(self) -> bool:
        """Wait until the child is warm, then let it open the cache; False if it ended first."""
        while (line := await self.readline()) not in (None, "warm"):
            pass
        if line is None:
            return False
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        with contextlib.suppress(ConnectionError):
            await self.proc.stdin.drain()
        return True

    def kill(self) -> bool:
        """SIGKILL, unless asyncio already reported its exit; True when the signal was sent.

        ``os.kill``, not ``Process.send_signal``: the latter polls the child first (``Popen.poll``, a
        ``waitpid``), which reaps a child that has just exited before asyncio's own watcher can, and the watcher
        then reports exit status 255 for it. A signal to an exited, unreaped child is harmless.
        """
        if self.proc.returncode is not None:
            return False
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    async def wait(self) -> int:
        return await self.proc.wait()

    def stderr_tail(self, n: int = 600) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(text[-n:].split())


# ------------------------------------------------------------------ a. SIGKILL mid-write

KILL_DDR_BLOCKS, KILL_DISK_BLOCKS = 48, 384


async def phase_kill(b: Bench) -> PhaseResult:
    res = PhaseResult("kill")
    cache = b.work / "kill" / "cache"
    shutil.rmtree(cache.parent, ignore_errors=True)
    rng = np.random.default_rng([b.seed, 0xA])
    seed = b.seed + 11
    finished: list[int] = []  # prompts whose request a child completed before it died
    restored = checked_prompts = 0

    async def spawn(r: int, start: int) -> Child:
        config = {
            "model": str(b.model_dir),
            "cache_dir": str(cache),
            "ddr_bytes": KILL_DDR_BLOCKS * b.block_bytes,
            "disk_bytes": KILL_DISK_BLOCKS * b.block_bytes,
            "block_size": b.block_size,
            "seed": seed,
            "start": start,
        }
        return await Child.spawn("kill", config, b.work / "kill" / f"child-{r}.stderr")

    start = 0
    child = await spawn(0, start) if b.params["kills"] else None
    for r in range(b.params["kills"]):
        assert child is not None
        lines_before_kill = int(rng.integers(0, 8))
        delay_s = float(rng.uniform(0.0, 0.25))
        done: list[int] = []
        killed = False
        try:
            if await child.go():
                while (line := await child.readline()) not in (None, "ready"):
                    pass
                while line is not None and len(done) < lines_before_kill:
                    line = await child.readline()
                    if line is not None and line.startswith("done "):
                        done.append(int(line.split()[1]))
                if line is not None:
                    await asyncio.sleep(delay_s)
                    killed = child.kill()
                while (line := await child.readline()) is not None:  # lines printed before the kill landed
                    if line.startswith("done "):
                        done.append(int(line.split()[1]))
        finally:
            child.kill()  # whatever happened above, no child outlives its round
            rc = await child.wait()
        if killed and rc == -signal.SIGKILL:
            res.faults_injected += 1
        elif rc != 0:
            res.crash(
                f"kill round {r}: the writing child", f"ended before the kill, status {rc}: {child.stderr_tail()}"
            )
        finished += done
        last = max(done, default=start - 1)
        # the prompts this child finished, the one it was in (or about to start), one it never reached, and
        # a few of earlier rounds' prompts
        ask = list(range(start, last + 3))
        earlier = [p for p in finished if p < start]
        if earlier:
            ask += rng.choice(earlier, size=min(4, len(earlier)), replace=False).tolist()
        start = last + 3
        # the next round's child warms up while this round's prompts are checked (it opens the cache on "go")
        child = await spawn(r + 1, start) if r + 1 < b.params["kills"] else None
        wrong_before = res.wrong_answers
        try:
            async with b.engine(
                cache, ddr_blocks=KILL_DDR_BLOCKS, disk_blocks=KILL_DISK_BLOCKS, write_mode="write-through"
            ) as engine:
                for p in ask:
                    checked = await check_logits(engine, family_prompt(seed, p, b.block_size))
                    res.count(checked, f"kill round {r}, prompt {p}")
                    restored += checked.reused
                    checked_prompts += 1
                await engine.scheduler.drain()
                res.leaked_pins += sum(leftovers(engine).values())
        except Exception as exc:  # a reopen after the kill that raises is a crash: counted, reported
            res.crash(f"kill round {r}: reopening the cache after the kill", exc)
        b.log(
            f"kill {r + 1}/{b.params['kills']}: child {'killed' if killed else f'ended ({rc})'} after "
            f"{len(done)} prompts (+{delay_s * 1e3:.0f} ms); asked {len(ask)}, "
            f"{res.wrong_answers - wrong_before} wrong"
        )
    res.detail = {
        "prompts_finished_by_children": len(finished),
        "prompts_checked": checked_prompts,
        "tokens_restored_after_kills": restored,
    }
    return res


# ------------------------------------------------------------------ b. damaged slabs and metadata

CORRUPT_DDR_BLOCKS, CORRUPT_DISK_BLOCKS = 64, 160


def _block_starts(slab: Path) -> list[int]:
    """Offsets of the slots in a slab file that start with a block header (its magic)."""
    from kv_io.align import ALIGN
    from kv_io.disk_format import MAGIC

    data = np.fromfile(slab, dtype=np.uint8)
    pages = data[: data.size // ALIGN * ALIGN].reshape(-1, ALIGN)[:, : len(MAGIC)]
    magic = np.frombuffer(MAGIC, dtype=np.uint8)
    return [int(i) * ALIGN for i in np.flatnonzero((pages == magic).all(axis=1))]


def _random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def damage(cache: Path, kind: str, rng: np.random.Generator, block_bytes: int) -> list[str]:
    """Damage a closed engine's cache directory; returns one line per fault injected."""
    from kv_io.disk_format import HEADER_BYTES

    blocks = cache / "blocks"
    slab = blocks / "slab-00000.bin"
    done: list[str] = []
    kinds = ("flip", "truncate", "index", "contexts", "manifest") if kind == "all" else (kind,)
    starts = _block_starts(slab) if slab.exists() else []
    for k in kinds:
        if k == "flip" and starts:
            chosen = rng.choice(len(starts), size=min(3, len(starts)), replace=False)
            with slab.open("r+b") as f:
                for j, i in enumerate(sorted(chosen.tolist())):
                    # the first flip lands in a header, the others in payloads
                    where = int(rng.integers(0, 64)) if j == 0 else HEADER_BYTES + int(rng.integers(0, block_bytes))
                    f.seek(starts[i] + where)
                    byte = f.read(1)
                    f.seek(starts[i] + where)
                    f.write(bytes([byte[0] ^ 0xFF]))
                    done.append(f"flipped byte {starts[i] + where} of {slab.name}")
        elif k == "truncate" and starts:
            at = starts[len(starts) // 2] + HEADER_BYTES + block_bytes // 2
            os.truncate(slab, at)
            done.append(f"truncated {slab.name} to {at} bytes ({len(starts) - len(starts) // 2} blocks cut)")
        elif k == "delete" and slab.exists():
            slab.unlink()
            done.append(f"deleted {slab.name}")
        elif k == "index":
            path = blocks / "index.sqlite3"
            path.write_bytes(_random_bytes(rng, max(4096, path.stat().st_size if path.exists() else 0)))
            done.append("random bytes over blocks/index.sqlite3")
        elif k == "contexts":
            path = cache / "contexts.sqlite3"
            path.write_bytes(_random_bytes(rng, max(4096, path.stat().st_size if path.exists() else 0)))
            done.append("random bytes over contexts.sqlite3")
        elif k == "manifest":
            (blocks / "manifest.json").write_bytes(b'{"format": "kvtier-disk-st\x00\xff' + _random_bytes(rng, 64))
            done.append("garbage in blocks/manifest.json")
    return done


async def phase_corrupt(b: Bench) -> PhaseResult:
    res = PhaseResult("corrupt")
    rng = np.random.default_rng([b.seed, 0xB])
    n = b.params["corrupt_prompts"]
    by_kind: dict[str, dict[str, int]] = {}
    for rnd in range(b.params["corrupt_rounds"]):
        for d, kind in enumerate(b.damages):
            seed = b.seed + 1000 + 100 * rnd + d
            cache = b.work / "corrupt" / f"{kind}-{rnd}"
            shutil.rmtree(cache, ignore_errors=True)
            prompts = [family_prompt(seed, i, b.block_size) for i in range(n)]
            context_tokens = token_run(seed, 4, 0, 3 * b.block_size + 5)
            question = token_run(seed, 5, 0, 7)
            stats = by_kind.setdefault(kind, {"faults": 0, "wrong": 0, "crashes": 0, "restored_tokens": 0})
            wrong0, crashes0 = res.wrong_answers, res.crashes

            def make(cache: Path = cache) -> Any:
                return b.engine(
                    cache, ddr_blocks=CORRUPT_DDR_BLOCKS, disk_blocks=CORRUPT_DISK_BLOCKS, write_mode="write-through"
                )

            try:
                async with make() as engine:
                    for i, p in enumerate(prompts):
                        res.count(await check_logits(engine, p), f"{kind} round {rnd}: caching prompt {i}")
                    await engine.save_shared_context("manual", context_tokens, pin=True)
                    await engine.scheduler.drain()
            except Exception as exc:
                res.crash(f"{kind} round {rnd}: caching before the damage", exc)
                continue
            faults = damage(cache, kind, rng, b.block_bytes)
            res.faults_injected += len(faults)
            stats["faults"] += len(faults)
            try:
                async with make() as engine:
                    for i, p in enumerate(prompts):
                        checked = await check_logits(engine, p)
                        res.count(checked, f"{kind} round {rnd}: prompt {i} after the damage")
                        stats["restored_tokens"] += checked.reused
                    ctx = engine.get_shared_context("manual")
                    if ctx is not None:
                        # a context that survived must be the one saved, and answer as a full prefill does
                        outs = [
                            o async for o in engine.generate(question, shared_context_id="manual", max_new_tokens=4)
                        ]
                        got = [o.token_id for o in outs]
                        want = greedy_baseline(engine.model, context_tokens + question, 4)
                        res.requests += 1
                        if list(ctx.tokens) != context_tokens or got != want:
                            res.wrong_answers += 1
                            res.errors.append(f"wrong answer: {kind} round {rnd}: the shared context after the damage")
                    # the damaged store still takes new blocks and serves them
                    fresh = token_run(seed, 6, 0, 5 * b.block_size + 3)
                    res.count(await check_logits(engine, fresh), f"{kind} round {rnd}: a new prompt")
                    await engine.scheduler.drain()
                    again = await check_logits(engine, fresh)
                    res.count(again, f"{kind} round {rnd}: the new prompt again")
                    if again.reused == 0:
                        res.caching_stalls += 1
                        res.errors.append(f"caching stall: {kind} round {rnd}: a new prompt was not cached")
                    await engine.scheduler.drain()
                    res.leaked_pins += sum(leftovers(engine).values())
            except Exception as exc:  # until damaged metadata heals itself, a reopen may raise: a crash
                res.crash(f"{kind} round {rnd}: reopening the damaged cache", exc)
            stats["wrong"] += res.wrong_answers - wrong0
            stats["crashes"] += res.crashes - crashes0
            b.log(
                f"corrupt {kind} (round {rnd + 1}/{b.params['corrupt_rounds']}): {len(faults)} faults, "
                f"{res.wrong_answers - wrong0} wrong, {res.crashes - crashes0} crashes"
            )
    res.detail = {"by_damage": by_kind}
    return res


# ------------------------------------------------------------------ c. a full filesystem


def fullfs_config(b: Bench) -> dict[str, Any]:
    return {
        "model": str(b.model_dir),
        "cache_dir": str(b.work / "fullfs" / "cache"),
        "block_size": b.block_size,
        "block_bytes": b.block_bytes,
        "seed": b.seed + 21,
        "requests": b.params["fullfs_requests"],
    }


async def phase_fullfs(b: Bench, child: Child | None = None) -> PhaseResult:
    """``child``: a ``fullfs`` worker spawned (and warming up) earlier, or None to spawn one now."""
    res = PhaseResult("fullfs")
    shutil.rmtree(b.work / "fullfs" / "cache", ignore_errors=True)
    if child is None:
        child = await Child.spawn("fullfs", fullfs_config(b), b.work / "fullfs" / "child.stderr")
    outcome: dict[str, Any] | None = None
    try:
        if await child.go():
            while (line := await child.readline()) is not None:
                if line.startswith("{"):
                    outcome = json.loads(line)
                elif line:
                    b.log(f"fullfs: {line}")
    finally:
        child.kill()  # silent past the timeout, or the phase was interrupted
        rc = await child.wait()
    if outcome is None or rc != 0:
        res.crash("the child serving under a file-size limit", f"exit status {rc}: {child.stderr_tail()}")
    if outcome is not None:
        res.requests = outcome["requests"]
        res.wrong_answers = outcome["wrong_answers"]
        res.crashes += outcome["crashes"]
        res.leaked_pins = outcome["leaked_pins"]
        res.faults_injected = outcome["disk_write_failures"]
        res.errors += outcome["errors"]
        res.detail = {
            k: v
            for k, v in outcome.items()
            if k not in {"requests", "wrong_answers", "crashes", "errors", "leaked_pins"}
        }
        if res.faults_injected == 0:
            res.errors.append("no disk write failed under the limit: the phase injected nothing")
    return res


# ------------------------------------------------------------------ d. concurrent requests with cancellations

CANCEL_DDR_BLOCKS, CANCEL_DISK_BLOCKS = 128, 384
CANCEL_NEW_TOKENS = 8
CANCEL_MODES = ("complete", "cancel_at_time", "cancel_at_token", "close")
CANCEL_SPREAD_S_PER_STREAM = 0.15  # timed cancels fall in [0, this x streams) s: about a round on 2 cores


async def phase_cancel(b: Bench) -> PhaseResult:
    res = PhaseResult("cancel")
    cache = b.work / "cancel" / "cache"
    shutil.rmtree(cache.parent, ignore_errors=True)
    rng = np.random.default_rng([b.seed, 0xD])
    seed = b.seed + 31
    n = b.params["requests"]
    modes = dict.fromkeys(CANCEL_MODES, 0)
    outcomes = {
        "completed": 0,
        "cancelled": 0,
        "closed": 0,
        "cancelled_before_first_token": 0,
        "cancelled_mid_stream": 0,
    }
    async with b.engine(
        cache, ddr_blocks=CANCEL_DDR_BLOCKS, disk_blocks=CANCEL_DISK_BLOCKS, write_mode="write-through"
    ) as engine:
        for f in range(4):  # the shared prefixes are cached, so streams load (and pin) blocks
            res.count(await check_logits(engine, family_prompt(seed, f, b.block_size)), f"warm-up prompt {f}")
        await engine.scheduler.drain()
        for rnd in range(b.params["cancel_rounds"]):
            prompts = [family_prompt(seed, 4 + rnd * n + i, b.block_size) for i in range(n)]
            baselines = [greedy_baseline(engine.model, p, CANCEL_NEW_TOKENS) for p in prompts]
            plan = rng.choice(CANCEL_MODES, size=n, p=[0.4, 0.2, 0.2, 0.2]).tolist()
            # a timed cancel lands anywhere in the round (queued, loading, prefilling, decoding); the others
            # after a seeded number of tokens
            cancel_after_s = rng.uniform(0.0, CANCEL_SPREAD_S_PER_STREAM * n, size=n).tolist()
            after_tokens = rng.integers(1, CANCEL_NEW_TOKENS, size=n).tolist()
            got: list[list[int]] = [[] for _ in range(n)]
            for m in plan:
                modes[m] += 1

            async def stream(i: int) -> str:
                gen = engine.generate(prompts[i], max_new_tokens=CANCEL_NEW_TOKENS, session_id=f"s{i % 8}")  # noqa: B023
                try:
                    async for out in gen:
                        got[i].append(out.token_id)  # noqa: B023
                        if len(got[i]) == after_tokens[i]:  # noqa: B023
                            if plan[i] == "close":  # noqa: B023
                                return "closed"
                            if plan[i] == "cancel_at_token":  # noqa: B023
                                # raised at the stream's next await, inside the engine, mid-decode
                                asyncio.current_task().cancel()  # type: ignore[union-attr]
                finally:
                    await gen.aclose()
                return "completed"

            tasks = [asyncio.create_task(stream(i)) for i in range(n)]
            loop = asyncio.get_running_loop()
            timers = [
                loop.call_later(cancel_after_s[i], tasks[i].cancel) for i in range(n) if plan[i] == "cancel_at_time"
            ]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for t in timers:
                t.cancel()
            for i, r in enumerate(results):
                res.requests += 1
                if isinstance(r, asyncio.CancelledError):
                    outcomes["cancelled"] += 1
                    outcomes["cancelled_before_first_token"] += not got[i]
                    outcomes["cancelled_mid_stream"] += bool(got[i])
                elif isinstance(r, BaseException):
                    res.crash(f"cancel round {rnd}: stream {i}", r)
                    continue
                else:
                    outcomes[r] += 1
                complete = r == "completed"
                if (got[i] != baselines[i]) if complete else (got[i] != baselines[i][: len(got[i])]):
                    res.wrong_answers += 1
                    res.errors.append(
                        f"wrong answer: cancel round {rnd}, stream {i} ({plan[i]}): {got[i]} != {baselines[i]}"
                    )
            # a timed cancel that came after its stream ended injected nothing: count those that took effect
            ended_early = sum(isinstance(r, asyncio.CancelledError) or r == "closed" for r in results)
            res.faults_injected += ended_early
            await engine.scheduler.drain()
            left = leftovers(engine)
            res.leaked_pins += sum(left.values())
            if any(left.values()):
                res.errors.append(f"leak after cancel round {rnd}: {left}")
            b.log(
                f"cancel round {rnd + 1}/{b.params['cancel_rounds']}: {n} streams, "
                f"{ended_early} cancelled or closed, {res.wrong_answers} wrong so far, "
                f"left behind {left}"
            )
        res.count(await check_logits(engine, prompts[0]), "a prompt after the cancellations")
    res.detail = {"planned": modes, "outcomes": outcomes}
    return res


# ------------------------------------------------------------------ e. a long soak on small tiers

SOAK_DDR_BLOCKS, SOAK_DISK_BLOCKS = 24, 96
SOAK_FAMILIES = 8


async def phase_soak(b: Bench) -> PhaseResult:
    res = PhaseResult("soak")
    cache = b.work / "soak" / "cache"
    shutil.rmtree(cache.parent, ignore_errors=True)
    rng = np.random.default_rng([b.seed, 0xE])
    seed = b.seed + 41
    total, every = b.params["soak_requests"], b.params["check_every"]
    kinds = {"repeat": 0, "shared_prefix": 0, "new": 0, "cache_check": 0, "generate": 0}
    history: list[list[int]] = []
    samples: list[tuple[int, int]] = []
    restored = 0
    sample_every = max(1, min(10, total // 30))  # RSS samples: enough in the second half for a slope
    started = time.perf_counter()
    async with b.engine(
        cache, ddr_blocks=SOAK_DDR_BLOCKS, disk_blocks=SOAK_DISK_BLOCKS, write_mode="write-back"
    ) as engine:

        async def soak_request(i: int) -> None:
            nonlocal history, restored
            u = rng.random()
            if u < 0.4 and history:
                kinds["repeat"] += 1  # recent prompts more often than old ones
                tokens = history[max(0, len(history) - 1 - int(rng.geometric(0.15)))]
            elif u < 0.75:
                kinds["shared_prefix"] += 1
                tokens = family_prompt(seed, 10_000 + i, b.block_size, families=SOAK_FAMILIES)
            else:
                kinds["new"] += 1
                tokens = token_run(seed, 8, i, int(rng.integers(b.block_size, 8 * b.block_size)))
            history = [*history[-255:], tokens]
            if i % 7 == 3:
                kinds["generate"] += 1
                outs = [o async for o in engine.generate(tokens, max_new_tokens=4, session_id=f"s{i % 4}")]
                res.requests += 1
                if [o.token_id for o in outs] != greedy_baseline(engine.model, tokens, 4):
                    res.wrong_answers += 1
                    res.errors.append(f"wrong answer: soak request {i}: greedy tokens differ")
                restored += sum((outs[-1].metrics.reused_tokens if outs[-1].metrics else {}).values())
            else:
                checked = await check_logits(engine, tokens)
                res.count(checked, f"soak request {i}")
                restored += checked.reused

        for i in range(total):
            try:
                if every and i % every == every - 1:
                    kinds["cache_check"] += 1
                    tokens = token_run(seed, 7, i, int(rng.integers(3 * b.block_size, 7 * b.block_size)))
                    res.count(await check_logits(engine, tokens), f"soak request {i}: a new prompt")
                    await engine.scheduler.drain()
                    rk = engine.keyer.request(tokens)
                    found = len(engine.hierarchy.match(rk))
                    if found < rk.num_blocks:
                        res.caching_stalls += 1
                        res.errors.append(f"caching stall: soak request {i}: {found} of {rk.num_blocks} blocks cached")
                    history.append(tokens)
                else:
                    await soak_request(i)
            except Exception as exc:  # a request that raises is a crash; the soak goes on
                res.crash(f"soak request {i}", exc)
            if i % sample_every == 0 or i == total - 1:
                settle_memory()
                samples.append((i, rss_bytes()))
            if (i + 1) % 100 == 0:
                b.log(
                    f"soak {i + 1}/{total}: {res.wrong_answers} wrong, {res.caching_stalls} stalls, "
                    f"RSS {samples[-1][1] / 2**20:.0f} MiB, {(i + 1) / (time.perf_counter() - started):.1f} req/s"
                )
        await engine.scheduler.drain()
        left = leftovers(engine)
        res.leaked_pins += sum(left.values())
        if any(left.values()):
            res.errors.append(f"leak after the soak: {left}")
        snapshot = engine.service.snapshot()
    second = [(i, rss) for i, rss in samples if i >= total // 2]
    growth = None
    if len(second) >= 3:
        slope = np.polyfit([i for i, _ in second], [rss for _, rss in second], 1)[0]  # bytes per request
        growth = float(slope * 1000 / 2**20)
    res.detail = {
        "rss_growth_mib_per_1k_requests": growth,
        "rss_window_requests": [total // 2, total],
        "rss_mib": {
            "start": samples[0][1] / 2**20,
            "half": second[0][1] / 2**20 if second else None,
            "end": samples[-1][1] / 2**20,
        },
        "kinds": kinds,
        "tokens_restored": restored,
        "tiers_blocks": {"ddr": SOAK_DDR_BLOCKS, "disk": SOAK_DISK_BLOCKS},
        "transfers": {
            k: {"blocks": v["blocks"], "misses": v["misses"], "failures": v["failures"]}
            for k, v in snapshot["transfers"].items()
        },
    }
    return res


RUNNERS = {
    "kill": phase_kill,
    "corrupt": phase_corrupt,
    "fullfs": phase_fullfs,
    "cancel": phase_cancel,
    "soak": phase_soak,
}


# ---------------------------------------------------------------------------------------------------- report

BARS = {
    "wrong_answers": "== 0",
    "crashes": "== 0",
    "leaked_pins": "== 0",
    "caching_stalls": "== 0",
    "rss_growth_mib_per_1k_requests": "< 5",
}


def judge(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each bar met or not (None: not measured in this run)."""
    out: dict[str, Any] = {}
    for name, bar in BARS.items():
        value = metrics.get(name)
        met = None if value is None else (value < 5 if bar == "< 5" else value == 0)
        out[name] = {"bar": bar, "value": value, "met": met}
    return out


def params_of(args: argparse.Namespace) -> dict[str, int]:
    base = QUICK if args.quick else FULL
    return {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}


async def run_phases(args: argparse.Namespace) -> tuple[list[PhaseResult], dict[str, Any]]:
    from kv_benchmarks.models import build_model_dir

    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise ValueError(f"unknown phases {unknown}; known: {', '.join(PHASES)}")
    damages = tuple(d.strip() for d in args.damages.split(",") if d.strip())
    unknown = sorted(set(damages) - set(DAMAGES))
    if unknown:
        raise ValueError(f"unknown damages {unknown}; known: {', '.join(DAMAGES)}")
    model_dir = args.model or build_model_dir(args.work_dir / f"model-{args.shape}", args.shape, peaked=True)
    work = args.work_dir / "faults"
    block_bytes = block_bytes_of(model_dir, args.block_size)
    b = Bench(model_dir, work, args.block_size, block_bytes, args.seed, params_of(args), damages)
    results = []
    fullfs_child = None
    try:
        for name in phases:
            if name != "kill" and "fullfs" in phases and fullfs_child is None:
                # the full-filesystem child starts once no other child is starting, so that its slow start
                # overlaps the phases that run in this process
                shutil.rmtree(work / "fullfs", ignore_errors=True)
                fullfs_child = await Child.spawn("fullfs", fullfs_config(b), work / "fullfs" / "child.stderr")
            b.log(f"phase {name}")
            start = time.perf_counter()
            res = await (phase_fullfs(b, fullfs_child) if name == "fullfs" else RUNNERS[name](b))
            res.seconds = time.perf_counter() - start
            b.log(
                f"phase {name} done in {res.seconds:.0f} s: {res.faults_injected} faults, {res.requests} requests, "
                f"{res.wrong_answers} wrong, {res.crashes} crashes, {res.leaked_pins} leaked, "
                f"{res.caching_stalls} stalls"
            )
            results.append(res)
    finally:
        if fullfs_child is not None and fullfs_child.kill():
            await fullfs_child.wait()
    config = {
        "model": str(model_dir),
        "block_size": args.block_size,
        "block_bytes": b.block_bytes,
        "seed": args.seed,
        "phases": phases,
        "damages": list(damages),
        **b.params,
        "atol": ATOL,
    }
    return results, config


def run(args: argparse.Namespace) -> Report:
    start = time.perf_counter()
    results, config = asyncio.run(run_phases(args))
    by_name = {r.name: r for r in results}
    soak = by_name.get("soak")
    metrics: dict[str, Any] = {
        name: sum(getattr(r, name) for r in results)
        for name in ("faults_injected", "requests", "wrong_answers", "crashes", "leaked_pins", "caching_stalls")
    }
    metrics["rss_growth_mib_per_1k_requests"] = soak.detail["rss_growth_mib_per_1k_requests"] if soak else None
    metrics["bars"] = judge(metrics)
    failed = [n for n, v in metrics["bars"].items() if v["met"] is False]
    metrics["verdict"] = "all bars met" if not failed else "not met: " + ", ".join(failed)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    metrics["phases"] = {r.name: r.summary() for r in results}
    rows = [
        {k: v for k, v in {"phase": r.name, **r.summary()}.items() if not isinstance(v, (dict, list))} for r in results
    ]
    notes = [f"Verdict: {metrics['verdict']}."]
    for r in results:
        for e in r.errors[:5]:
            notes.append(f"{r.name}: {e}")
        if len(r.errors) > 5:
            notes.append(f"{r.name}: ... and {len(r.errors) - 5} more (faults.json, metrics.phases.{r.name}.errors)")
    if soak is not None and soak.detail["rss_growth_mib_per_1k_requests"] is not None:
        lo, hi = soak.detail["rss_window_requests"]
        notes.append(
            f"RSS growth is the slope of the resident set (sampled after a garbage collection and malloc_trim) "
            f"over soak requests {lo}-{hi} ({hi - lo} requests; a short window, as in --quick, resolves "
            "allocator steps of about 1 MiB only coarsely)."
        )
    notes.append(
        f"Every answer is compared with a full prefill of the same tokens on a fresh cache (logits within {ATOL} "
        "abs; greedy tokens for generate). A crash is an exception the engine raised (a reopen included) or a "
        "child process that died on its own."
    )
    reference = {"baseline": "full prefill of the same tokens on a fresh cache, same model, same run", "atol": ATOL}
    return Report("faults", metrics, reference, rows, notes, config)
