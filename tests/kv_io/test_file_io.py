"""File I/O engines: POSIX round trips direct and buffered (aligned, unaligned, tails, EOF), fallback where
O_DIRECT is refused, cancellation safety, the synchronous O_DIRECT references, engine selection."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_io.align import ALIGN, aligned_empty
from kv_io.file_io import (
    FileIO,
    PosixFileIO,
    Transfer,
    kvikio_gds_available,
    make_file_io,
    probe_direct_io,
    read_direct,
    write_direct,
)


def _random(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    out = aligned_empty(t.numel())
    out.copy_(t)
    return out


@pytest.mark.parametrize("direct", [True, False])
async def test_round_trip_aligned(tmp_path: Path, direct: bool) -> None:
    fio = PosixFileIO(threads=4, direct=direct, chunk_bytes=64 * 1024)
    path = tmp_path / "f.bin"
    data = _aligned_copy(_random(300 * 1024, 1))  # several chunks
    assert await fio.pwrite(path, 8192, data) == data.numel()
    await fio.fsync(path)
    out = aligned_empty(data.numel())
    assert await fio.pread(path, 8192, out) == data.numel()
    assert torch.equal(out, data)
    stats = fio.stats()
    if direct and probe_direct_io(tmp_path):
        assert fio.uses_direct(path)
        assert stats["buffered_bytes"] == 0 and stats["direct_bytes"] == 2 * data.numel()
    if not direct:
        assert stats["direct_bytes"] == 0 and not fio.uses_direct(path)
    await fio.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(0, 3 * ALIGN),
    length=st.integers(0, 5 * ALIGN),
    shift=st.integers(0, 7),
    direct=st.booleans(),
)
def test_round_trip_any_offset_length_and_address(tmp_path: Path, offset: int, length: int, shift: int, direct: bool):
    """Unaligned offsets, lengths and buffer addresses still round-trip byte for byte (the engine sends the
    aligned body direct and the rest buffered)."""

    async def run() -> None:
        fio = PosixFileIO(threads=2, direct=direct, chunk_bytes=2 * ALIGN)
        path = tmp_path / f"h-{offset}-{length}-{shift}-{direct}.bin"
        backing = aligned_empty(length + 8)
        data = backing[shift : shift + length]
        data.copy_(_random(length, offset + length))
        assert await fio.pwrite(path, offset, data) == length
        out_backing = aligned_empty(length + 8)
        out = out_backing[shift : shift + length]
        assert await fio.pread(path, offset, out) == length
        assert torch.equal(out, data)
        assert os.path.getsize(path) == (offset + length if length else 0)
        await fio.close()

    asyncio.run(run())


async def test_read_past_end_of_file_is_short(posix_io: PosixFileIO, tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    await posix_io.pwrite(path, 0, _aligned_copy(_random(ALIGN + 100, 2)))
    out = aligned_empty(3 * ALIGN)
    assert await posix_io.pread(path, 0, out) == ALIGN + 100


async def test_missing_file_raises(posix_io: PosixFileIO, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await posix_io.pread(tmp_path / "absent.bin", 0, aligned_empty(ALIGN))


async def test_created_files_are_private(posix_io: PosixFileIO, tmp_path: Path) -> None:
    path = tmp_path / "private.bin"
    await posix_io.pwrite(path, 0, _aligned_copy(_random(ALIGN, 3)))
    assert path.stat().st_mode & 0o777 == 0o600


async def test_bad_arguments(posix_io: PosixFileIO, tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    with pytest.raises(TypeError):
        await posix_io.pwrite(path, 0, torch.zeros(4, dtype=torch.float32))
    with pytest.raises(TypeError):
        await posix_io.pwrite(path, 0, torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        await posix_io.pwrite(path, -1, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        PosixFileIO(threads=0)
    with pytest.raises(ValueError):
        PosixFileIO(chunk_bytes=1000)
    with pytest.raises(ValueError, match="unknown"):
        make_file_io("nfs")


async def test_falls_back_to_buffered_when_o_direct_is_refused(tmp_path: Path, monkeypatch, caplog) -> None:
    """Where the filesystem refuses O_DIRECT at open (EINVAL, as tmpfs on older kernels does), the engine
    warns once, counts the fallback and still moves the bytes correctly."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    fio = PosixFileIO(threads=2)
    path = tmp_path / "fallback.bin"
    data = _aligned_copy(_random(3 * ALIGN, 4))
    with caplog.at_level("WARNING", logger="kv_io.file_io"):
        await fio.pwrite(path, 0, data)
    out = aligned_empty(data.numel())
    await fio.pread(path, 0, out)
    monkeypatch.undo()
    assert torch.equal(out, data)
    assert not fio.uses_direct(path)
    assert fio.stats()["direct_fallbacks"] == 1 and fio.stats()["direct_bytes"] == 0
    assert any("O_DIRECT refused" in r.message for r in caplog.records)
    await fio.close()


async def test_cancelled_read_returns_only_after_workers_finish(tmp_path: Path) -> None:
    """A cancelled pread must not return while a worker thread still writes into the caller's buffer."""
    fio = PosixFileIO(threads=2, chunk_bytes=ALIGN)
    path = tmp_path / "c.bin"
    data = _aligned_copy(_random(64 * ALIGN, 5))
    await fio.pwrite(path, 0, data)
    out = aligned_empty(data.numel())
    task = asyncio.create_task(fio.pread(path, 0, out))
    await asyncio.sleep(0)  # the descriptors are open already, so all 64 pieces are queued now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Every piece finished before the cancellation surfaced: nothing is queued, the buffer is complete.
    assert fio._pool._work_queue.qsize() == 0
    assert torch.equal(out, data)
    await fio.close()


def test_sync_direct_references(tmp_path: Path) -> None:
    path = tmp_path / "ref.bin"
    data = _aligned_copy(_random(4 * ALIGN, 6))
    if not probe_direct_io(tmp_path):
        with pytest.raises(OSError):
            write_direct(path, 0, data)
        return
    assert write_direct(path, ALIGN, data) == data.numel()
    out = aligned_empty(data.numel())
    assert read_direct(path, ALIGN, out) == data.numel()
    assert torch.equal(out, data)
    with pytest.raises(ValueError, match="aligned"):
        read_direct(path, 100, out)
    with pytest.raises(ValueError, match="aligned"):
        read_direct(path, 0, aligned_empty(ALIGN + 8)[8:])
    with pytest.raises(TypeError):
        read_direct(path, 0, b"immutable")  # type: ignore[arg-type]


def test_auto_picks_kvikio_only_with_gds() -> None:
    fio = make_file_io("auto", threads=3)
    assert fio.name == ("kvikio" if kvikio_gds_available() else "posix")
    asyncio.run(fio.close())


class _PlainIO(FileIO):
    """The base class's batch methods over a POSIX engine's single-buffer calls (as a third-party engine)."""

    name = "plain"

    def __init__(self) -> None:
        self.inner = PosixFileIO(threads=2)

    async def pread(self, path, offset, out):
        return await self.inner.pread(path, offset, out)

    async def pwrite(self, path, offset, data):
        return await self.inner.pwrite(path, offset, data)

    async def fsync(self, path):
        await self.inner.fsync(path)

    async def close(self):
        await self.inner.close()


@pytest.mark.parametrize("engine", ["posix", "base"])
async def test_batches_run_hooks_next_to_their_io(tmp_path: Path, engine: str) -> None:
    # chunk_bytes below the transfer size: each transfer is several pieces, the hooks still run once each.
    fio = PosixFileIO(threads=3, chunk_bytes=2 * ALIGN) if engine == "posix" else _PlainIO()
    path = tmp_path / "f.bin"
    n = 4
    heads = [aligned_empty(ALIGN) for _ in range(n)]
    bodies = [_aligned_copy(_random(5 * ALIGN + 100, i)) for i in range(n)]
    slot = 8 * ALIGN

    def seal(i: int) -> None:  # fills the first buffer right before the write, as a header would be
        heads[i].fill_(i + 1)

    wrote = await fio.pwritev_many(
        [Transfer(path, i * slot, [heads[i], bodies[i]], lambda i=i: seal(i)) for i in range(n)]
    )
    assert wrote == [ALIGN + b.numel() for b in bodies]
    got: dict[int, int] = {}
    outs = [(aligned_empty(ALIGN), aligned_empty(b.numel())) for b in bodies]
    read = await fio.preadv_many(
        [Transfer(path, i * slot, list(outs[i]), lambda nbytes, i=i: got.__setitem__(i, nbytes)) for i in range(n)]
    )
    assert read == wrote and got == dict(enumerate(wrote))
    for i, (h, b) in enumerate(outs):
        assert bool((h == i + 1).all()) and torch.equal(b, bodies[i])
    await fio.close()


@pytest.mark.parametrize("engine", ["posix", "base"])
async def test_batch_errors_are_per_transfer(tmp_path: Path, engine: str) -> None:
    fio = PosixFileIO(threads=2) if engine == "posix" else _PlainIO()
    path = tmp_path / "f.bin"
    buf = _aligned_copy(_random(ALIGN, 1))
    assert await fio.pwritev_many([Transfer(path, 0, [buf])]) == [ALIGN]

    def boom(*_: object) -> None:
        raise ValueError("hook failed")

    hooked: list[int] = []
    results = await fio.preadv_many(
        [
            Transfer(tmp_path / "missing.bin", 0, [aligned_empty(ALIGN)], hooked.append),
            Transfer(path, 0, [aligned_empty(ALIGN)], boom),
            Transfer(path, 0, [aligned_empty(ALIGN)], hooked.append),
        ]
    )
    assert isinstance(results[0], FileNotFoundError) and isinstance(results[1], ValueError)
    assert results[2] == ALIGN and hooked == [ALIGN]  # a failed read does not run its hook
    written = await fio.pwritev_many([Transfer(path, 0, [buf], boom), Transfer(path, ALIGN, [buf])])
    assert isinstance(written[0], ValueError) and written[1] == ALIGN
    assert await fio.pwritev_many([]) == [] and await fio.preadv_many([]) == []
    await fio.close()


async def test_cancelled_batch_returns_only_after_workers_finish(tmp_path: Path) -> None:
    fio = PosixFileIO(threads=2)
    path = tmp_path / "f.bin"
    buf = _aligned_copy(_random(ALIGN, 2))
    await fio.pwrite(path, 0, buf)
    release = threading.Event()
    finished: list[int] = []

    def slow(nbytes: int) -> None:
        release.wait(5)
        finished.append(nbytes)

    task = asyncio.create_task(fio.preadv_many([Transfer(path, 0, [aligned_empty(ALIGN)], slow)]))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the worker that uses the buffer
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [ALIGN]
    await fio.close()
