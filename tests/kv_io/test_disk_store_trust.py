"""DiskStore's directory as a trust boundary: a symlink in place of any file it opens (slab, manifest, its
temporary file, index and its -wal / -shm, lock) is refused at open with the link's target untouched; a
directory open to others, a symlinked directory and a path that is a file are refused; the file engines do
not follow links either."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from io_helpers import NUM_SLABS, SLAB_BYTES

from kv_io.disk_format import block_capacity
from kv_io.disk_store import DiskLocation, DiskStore
from kv_io.file_io import PosixFileIO
from kv_io.private_files import UnsafePathError

NS = b"trust"
VICTIM_BYTES = b"someone else's file, which kvtier must never chmod, extend or fill"


async def open_store(directory: Path) -> DiskStore:
    return await DiskStore.open(directory, slab_bytes=SLAB_BYTES, num_slabs=NUM_SLABS)


def payload(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM_BYTES)
    os.chmod(path, 0o644)
    return path


def assert_untouched(victim: Path) -> None:
    st = victim.stat()
    assert victim.read_bytes() == VICTIM_BYTES
    assert st.st_size == len(VICTIM_BYTES)
    assert stat.S_IMODE(st.st_mode) == 0o644


async def populated(directory: Path) -> None:
    """A store with one block in slab 0, closed: every file of the layout exists."""
    store = await open_store(directory)
    await store.write(NS, b"k", DiskLocation(0, 0, block_capacity(5000)), payload(5000, 1))
    await store.close()


@pytest.mark.parametrize(
    "name", ["slab-00000.bin", "slab-00001.bin", "manifest.json", "index.sqlite3", "index.sqlite3-wal", "lock"]
)
async def test_a_symlinked_file_is_refused_and_its_target_untouched(store_dir: Path, victim: Path, name: str) -> None:
    await populated(store_dir)
    link = store_dir / name
    link.unlink(missing_ok=True)  # slab 1 was never written: it has no file yet
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        await open_store(store_dir)
    assert_untouched(victim)
    assert link.is_symlink()  # refused, not "repaired"


@pytest.mark.parametrize("name", ["manifest.json", ".manifest.json.tmp-{pid}", "lock", "index.sqlite3"])
async def test_a_symlink_planted_in_a_new_directory_is_refused(store_dir: Path, victim: Path, name: str) -> None:
    store_dir.mkdir(parents=True, mode=0o700)
    (store_dir / name.format(pid=os.getpid())).symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        await open_store(store_dir)
    assert_untouched(victim)


async def test_a_dangling_symlinked_slab_is_refused_and_nothing_is_created(store_dir: Path, tmp_path: Path) -> None:
    await populated(store_dir)
    target = tmp_path / "nowhere"
    (store_dir / "slab-00001.bin").symlink_to(target)
    with pytest.raises(UnsafePathError):
        await open_store(store_dir)
    assert not os.path.lexists(target)


async def test_a_hard_linked_slab_is_refused(store_dir: Path, tmp_path: Path) -> None:
    await populated(store_dir)
    os.link(store_dir / "slab-00000.bin", tmp_path / "second-name")
    with pytest.raises(UnsafePathError, match="hard links"):
        await open_store(store_dir)


async def test_a_directory_writable_by_others_is_refused_unchanged(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafePathError, match="writable by group or others"):
        await open_store(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777
    assert list(shared.iterdir()) == []


async def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symlink"):
        await open_store(link)
    assert list(real.iterdir()) == []


async def test_a_directory_that_is_a_file_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.write_bytes(b"not a directory")
    with pytest.raises(UnsafePathError, match="not a directory"):
        await open_store(path)
    with pytest.raises(UnsafePathError, match="cannot create cache directory"):
        await open_store(path / "disk")
    assert path.read_bytes() == b"not a directory"


async def test_a_private_directory_keeps_every_file_private(store_dir: Path) -> None:
    await populated(store_dir)
    os.chmod(store_dir / "slab-00000.bin", 0o644)  # readable by others: restricted again, not refused
    store = await open_store(store_dir)
    await store.close()
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    for p in store_dir.iterdir():
        assert stat.S_IMODE(p.lstat().st_mode) == 0o600, p.name


async def test_file_engine_does_not_follow_a_symlink(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "slab.bin"
    link.symlink_to(victim)
    fio = PosixFileIO(threads=1)
    try:
        with pytest.raises(OSError) as err:
            await fio.pwrite(link, 0, torch.zeros(4096, dtype=torch.uint8))
        assert err.value.errno == errno.ELOOP
        with pytest.raises(OSError) as err:
            await fio.pread(link, 0, torch.empty(16, dtype=torch.uint8))
        assert err.value.errno == errno.ELOOP
    finally:
        await fio.close()
    assert_untouched(victim)
