"""Crash safety and disk-full behaviour, with a real writer process (io_crash_writer.py):

- killed with SIGKILL while writing back to back: every block it reported published is found and verifies,
  and every block the index holds verifies (no torn block is ever published);
- killed while a block is half written: that block is not published, and its torn bytes fail verification;
- file-size limit (RLIMIT_FSIZE) hit by a slab write and by the SQLite commit: DiskWriteError, nothing published;
- a limit smaller than a slab: the store opens (slabs are allocated lazily), the write that would allocate the
  first slab fails with DiskWriteError and leaves no slab file behind, and succeeds once the limit is lifted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from io_crash_writer import NAMESPACE, key_for, location_for, payload_for
from io_helpers import NUM_SLABS, SLAB_BYTES

from kv_io.disk_store import DiskRecord, DiskStore

WRITER = Path(__file__).with_name("io_crash_writer.py")


def start_writer(mode: str, directory: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WRITER.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(WRITER), mode, str(directory), str(SLAB_BYTES), str(NUM_SLABS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_until(proc: subprocess.Popen[str], prefix: str, count: int) -> list[str]:
    """Lines of the writer's stdout until `count` lines start with `prefix` (fails if it exits first)."""
    seen: list[str] = []
    while sum(line.startswith(prefix) for line in seen) < count:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"writer exited early ({proc.wait()}): {proc.stderr.read()}")
        seen.append(line.strip())
    return seen


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()


async def verify_all(store: DiskStore) -> dict[bytes, bool]:
    """Read every published block; each must verify *and* equal the payload its key determines."""
    result = {}
    for rec in store.records():
        out = torch.empty(rec.length, dtype=torch.uint8)
        i = int(rec.key.decode().split("-")[1])
        result[rec.key] = await store.read(rec, out) and torch.equal(out, payload_for(i))
    return result


@pytest.mark.parametrize("after", [1, 6])
async def test_sigkill_while_writing_loses_no_published_block(store_dir: Path, after: int) -> None:
    proc = start_writer("loop", store_dir)
    lines = read_until(proc, "published", after)
    kill(proc)  # the writer was already on its next blocks: killed mid-write
    acknowledged = {key_for(int(line.split()[1])) for line in lines if line.startswith("published")}

    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    found = {r.key for r in store.records()}
    assert acknowledged <= found
    # At most the block being committed at the kill may be published without its acknowledgement.
    assert len(found - acknowledged) <= 1
    verdicts = await verify_all(store)
    assert verdicts and all(verdicts.values())
    assert store.stats()["recovered"] == len(found)
    await store.close()


async def test_torn_block_is_never_published(store_dir: Path) -> None:
    proc = start_writer("torn", store_dir)
    read_until(proc, "torn", 1)  # header written, half the payload written, then hung
    kill(proc)

    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    assert {r.key for r in store.records()} == {key_for(i) for i in range(3)}
    assert store.get(NAMESPACE, key_for(3)) is None
    assert all((await verify_all(store)).values())
    # Even a record forged for the torn slot cannot return its bytes: the header is there, the payload fails.
    torn = DiskRecord(NAMESPACE, key_for(3), location_for(3, SLAB_BYTES), payload_for(3).numel())
    with open(store.slab_path(torn.location.slab), "rb") as f:
        f.seek(torn.location.offset)
        assert f.read(8) == b"KVTIERBK"  # the torn header did reach the file
    assert not await store.read(torn, torch.empty(torn.length, dtype=torch.uint8))
    assert store.stats()["corrupt"] == 1
    # Its slot is free for the caller's allocator.
    await store.write(NAMESPACE, key_for(3), torn.location, payload_for(3))
    assert all((await verify_all(store)).values())
    await store.close()


async def test_file_size_limit_fails_writes_and_publishes_nothing(store_dir: Path) -> None:
    proc = start_writer("fsize", store_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["slab_write"].startswith("DiskWriteError") and "File too large" in result["slab_write"]
    assert result["commit"].startswith("DiskWriteError")
    assert result["published_after_failures"] == result["published_before"]
    assert result["published_after_retry"] == sorted([*result["published_before"], "far", "near"])
    assert result["stats"]["write_errors"] == 2
    # A new process sees exactly what was published, and all of it verifies.
    store = await DiskStore.open(store_dir, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)
    assert sorted(r.key.decode() for r in store.records()) == result["published_after_retry"]
    for rec in store.records():
        assert await store.read(rec, torch.empty(rec.length, dtype=torch.uint8))
    await store.close()


def test_slab_allocation_beyond_limit_fails_one_write_and_cleans_up(store_dir: Path) -> None:
    proc = start_writer("lazy", store_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["open"] == "ok"
    assert not [name for name in result["files_after_open"] if name.startswith("slab-")]
    assert result["write"].startswith("DiskWriteError") and "cannot allocate" in result["write"]
    assert "File too large" in result["write"]
    assert result["files_after_failure"] == result["files_after_open"]  # the half-made slab file is gone
    assert result["published_after_failure"] == []
    assert result["published_after_retry"] == [key_for(0).decode()]
    assert result["slab_size_after_retry"] == SLAB_BYTES
    assert result["stats"]["write_errors"] == 1
