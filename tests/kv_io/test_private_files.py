"""The cache directory's trust boundary: what kvtier refuses to open or use, and what it creates."""

from __future__ import annotations

import os
import stat

import pytest

from kv_io.private_files import (
    UnsafePathError,
    check_private_file,
    ensure_private_dir,
    open_private,
)


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_created_directories_are_private(tmp_path):
    d = ensure_private_dir(tmp_path / "a" / "b")
    assert mode(d) == 0o700 and mode(d.parent) == 0o700


def test_existing_readable_directory_is_restricted(tmp_path):
    d = tmp_path / "c"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    ensure_private_dir(d)
    assert mode(d) == 0o700


@pytest.mark.parametrize("bad_mode", [0o777, 0o770, 0o702])
def test_directory_writable_by_others_is_refused(tmp_path, bad_mode):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, bad_mode)
    with pytest.raises(UnsafePathError, match="writable by group or others"):
        ensure_private_dir(d)
    assert mode(d) == bad_mode  # refused, not silently changed


def test_read_only_directory_is_refused_not_repaired(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    with pytest.raises(UnsafePathError, match="read-only"):
        ensure_private_dir(d)
    assert mode(d) == 0o500


def test_symlinked_directory_and_file_instead_of_directory_are_refused(tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UnsafePathError, match="symlink"):
        ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        ensure_private_dir(tmp_path / "file")


def test_open_private_creates_0600_and_refuses_symlinks(tmp_path):
    fd = open_private(tmp_path / "f", os.O_RDWR, create=True)
    os.close(fd)
    assert mode(tmp_path / "f") == 0o600
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o644)
    (tmp_path / "slab").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        open_private(tmp_path / "slab", os.O_RDWR, create=True)
    with pytest.raises(UnsafePathError, match="symlink"):
        check_private_file(tmp_path / "slab")
    assert victim.read_bytes() == b"precious" and mode(victim) == 0o644


def test_open_private_refuses_hard_links_fifos_and_open_files(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"x")
    os.link(outside, tmp_path / "hard")
    with pytest.raises(UnsafePathError, match="hard links"):
        open_private(tmp_path / "hard", os.O_RDWR)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UnsafePathError, match="regular file"):
        open_private(tmp_path / "fifo", os.O_RDWR | os.O_NONBLOCK)
    # Read-only, without O_NONBLOCK: refused at once, not blocked waiting for a writer.
    with pytest.raises(UnsafePathError, match="regular file"):
        open_private(tmp_path / "fifo", os.O_RDONLY)
    shared = tmp_path / "shared"
    shared.write_bytes(b"x")
    os.chmod(shared, 0o666)
    with pytest.raises(UnsafePathError, match="writable by group or others"):
        open_private(shared, os.O_RDONLY)
    assert check_private_file(tmp_path / "absent") is False
