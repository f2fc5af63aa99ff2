"""The model's identity hashes every weight byte, remembers file hashes safely, and takes a revision."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prefix_reuse import model_fingerprint


def model(tmp_path: Path, name: str = "m", weights: bytes = b"w" * 10_000) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "model.safetensors").write_bytes(weights)
    return d


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its mtime put back


def test_a_changed_middle_byte_changes_the_identity(tmp_path):
    d = model(tmp_path, weights=os.urandom(5 << 20))
    before = model_fingerprint(d)
    flip_middle_byte(d / "model.safetensors")
    assert model_fingerprint(d) != before


def test_a_copy_elsewhere_with_the_same_bytes_is_the_same_model(tmp_path):
    a, b = model(tmp_path / "a"), model(tmp_path / "b")
    assert model_fingerprint(a) == model_fingerprint(b)


def test_revision_and_config_are_part_of_the_identity(tmp_path):
    d = model(tmp_path)
    plain = model_fingerprint(d)
    assert model_fingerprint(d, revision="step-1000") != plain
    (d / "config.json").write_text('{"hidden_size": 16}')
    assert model_fingerprint(d) != plain


def test_weights_in_subfolders_and_every_format_count(tmp_path):
    d = model(tmp_path)
    plain = model_fingerprint(d)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.bin").write_bytes(b"lora")
    assert model_fingerprint(d) != plain


def test_the_memo_is_used_while_a_file_is_unchanged_and_ignored_once_it_changes(tmp_path):
    d = model(tmp_path, weights=os.urandom(1 << 20))
    memo: dict[str, list] = {}
    first = model_fingerprint(d, memo=memo)
    (key,) = memo
    assert model_fingerprint(d, memo=memo) == first
    memo[key][5] = "00" * 16  # a remembered hash is what a restart uses: proven by planting another one
    assert model_fingerprint(d, memo=memo) != first
    flip_middle_byte(d / "model.safetensors")  # ctime moves even though size and mtime do not
    changed = model_fingerprint(d, memo=memo)
    assert memo[key][5] != "00" * 16
    flip_middle_byte(d / "model.safetensors")
    assert model_fingerprint(d, memo=memo) == first != changed


def test_a_directory_without_config_or_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        model_fingerprint(tmp_path)
