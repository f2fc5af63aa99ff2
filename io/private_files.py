"""The cache directory as a trust boundary: every directory and file kvtier keeps there is its own and private.

A cache directory holds every tenant's KV and the metadata that says what it is. Whoever else can write into
it can plant a symlink (kvtier would then chmod, extend and fill the link's target with blocks) or swap a
file under a running engine. So the rules are:

- a directory kvtier creates is 0o700; an existing one must be a real directory (not a symlink), owned by the
  effective user and writable by nobody else, else :class:`UnsafePathError`. Group/other read or search bits
  on a directory the user owns are removed (logged);
- every file is opened with ``O_NOFOLLOW | O_CLOEXEC``, created 0o600, and once open must be a regular file
  owned by the user with one link and no group/other write bit; a symlink, a FIFO, a hard link or another
  user's file is refused, never followed or "fixed".

Once a directory passes, nobody else can create entries in it, so a later open by path (SQLite's, KvikIO's)
cannot be redirected either.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SAFE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(PermissionError):
    """A path in the cache directory that kvtier refuses to use (symlink, foreign owner, open to others)."""


def ensure_private_dir(path: Path | str) -> Path:
    """Create ``path`` (and missing parents) 0o700, or check an existing one; returns it.

    Refuses (:class:`UnsafePathError`) a symlink, a non-directory, a directory owned by another user or
    writable by group or others, and a directory its owner cannot write (a read-only cache is a
    configuration mistake, not something to repair behind the user's back).
    """
    path = Path(path)
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            pass  # created concurrently: checked below like any existing directory
        except OSError as e:
            raise UnsafePathError(f"cannot create cache directory {p}: {e.strerror}") from e
    try:
        st = os.lstat(path)
    except OSError as e:
        raise UnsafePathError(f"cannot use cache directory {path}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path} is a symlink; kvtier keeps its cache only in a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UnsafePathError(
            f"{path} is writable by group or others (mode {mode:o}); kvtier needs a directory only its owner "
            "can write (chmod 700 it or choose another cache_dir)"
        )
    if not mode & stat.S_IWUSR:
        raise UnsafePathError(f"{path} is read-only (mode {mode:o}); the cache directory must be writable")
    if mode != DIR_MODE:
        log.warning("restricting %s from mode %o to %o (no access for group or others)", path, mode, DIR_MODE)
        os.chmod(path, DIR_MODE, follow_symlinks=False)
    return path


def open_private(path: Path | str, flags: int, *, create: bool = False) -> int:
    """``os.open`` for a file inside a private directory: never follows a symlink, creates 0o600, and checks
    what it opened (regular file, owned by this user, one link, not writable by others). Returns the fd;
    raises :class:`UnsafePathError` for a file it refuses, ``OSError`` for everything else."""
    flags |= SAFE_FLAGS | (os.O_CREAT if create else 0)
    # O_NONBLOCK until the checks passed: opening a FIFO read-only or write-only would otherwise block until
    # someone opened its other end, before it could be refused. (It changes nothing for a regular file.)
    nonblock = not flags & os.O_NONBLOCK
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, FILE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symlink; kvtier does not follow links in its cache") from e
        raise
    try:
        st = os.fstat(fd)
        _check_file(path, st)
        if nonblock:
            os.set_blocking(fd, True)
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)  # this user's own file: nobody else reads tenants' KV
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_opener(path: str, flags: int) -> int:
    """An ``opener=`` for ``open()`` / ``aiofiles.open()`` with :func:`open_private`'s checks."""
    return open_private(path, flags, create=bool(flags & os.O_CREAT))


def check_private_file(path: Path | str) -> bool:
    """True if ``path`` exists and passes :func:`open_private`'s checks, False if it does not exist; raises
    :class:`UnsafePathError` for a file kvtier must not touch (for paths a library opens itself, like SQLite's)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{path} is a symlink; kvtier does not follow links in its cache")
    _check_file(path, st)
    return True


def _check_file(path: Path | str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_nlink != 1:
        raise UnsafePathError(f"{path} has {st.st_nlink} hard links; kvtier's files have exactly one")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise UnsafePathError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def write_private_atomic(path: Path | str, data: bytes) -> None:
    """Replace a small private file so that readers see the old or the new bytes, never a mix: a temp file
    beside it (O_EXCL, 0o600), fsync, rename over the target, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a killed writer with this pid; unlink never follows a link
    fd = open_private(tmp, os.O_WRONLY | os.O_EXCL, create=True)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_private(path: Path | str) -> bytes | None:
    """A private file's bytes (:func:`open_private`'s checks), or None if it does not exist."""
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()
