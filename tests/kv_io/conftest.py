"""Shared fixtures for the kv_io tests: a POSIX engine per test and a small store geometry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kv_io.file_io import PosixFileIO


@pytest.fixture
async def posix_io() -> AsyncIterator[PosixFileIO]:
    fio = PosixFileIO(threads=4, chunk_bytes=64 * 1024)
    yield fio
    await fio.close()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "disk"
