"""On-disk block header: round trip, sizes, and detection of every kind of header damage."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_io.disk_format import (
    ALIGN,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    MAX_NAME_BYTES,
    CorruptBlockError,
    block_capacity,
    decode_header,
    encode_header,
    payload_checksum,
)

names = st.binary(max_size=64)


@settings(max_examples=60, deadline=None)
@given(names, names, st.integers(0, 2**40), st.integers(0, 2**64 - 1))
def test_round_trip(namespace: bytes, key: bytes, length: int, checksum: int) -> None:
    raw = encode_header(namespace, key, length, checksum)
    assert len(raw) == HEADER_BYTES == ALIGN
    h = decode_header(raw)
    assert (h.namespace, h.key, h.payload_len, h.checksum, h.version) == (
        namespace,
        key,
        length,
        checksum,
        FORMAT_VERSION,
    )
    # Decodes the same from a uint8 tensor (how the store reads it).
    assert decode_header(torch.frombuffer(bytearray(raw), dtype=torch.uint8)) == h


@settings(max_examples=60, deadline=None)
@given(names, names, st.data())
def test_any_flipped_byte_is_detected(namespace: bytes, key: bytes, data: st.DataObject) -> None:
    raw = bytearray(encode_header(namespace, key, 12345, 678))
    used = 32 + len(namespace) + len(key) + 8  # fixed fields, names, header checksum
    pos = data.draw(st.integers(0, used - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptBlockError):
        decode_header(bytes(raw))


def test_specific_damage_is_named() -> None:
    good = encode_header(b"ns", b"key", 10, 20)
    with pytest.raises(CorruptBlockError, match="magic"):
        decode_header(b"XXXXXXXX" + good[8:])
    with pytest.raises(CorruptBlockError, match="version"):
        decode_header(good[:8] + struct.pack("<I", FORMAT_VERSION + 1) + good[12:])
    with pytest.raises(CorruptBlockError, match="truncated"):
        decode_header(good[:16])
    with pytest.raises(CorruptBlockError):
        decode_header(bytes(HEADER_BYTES))  # an all-zero (never written) slot
    assert good[: len(MAGIC)] == MAGIC


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(TypeError):
        encode_header("ns", b"k", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_header(b"n" * (MAX_NAME_BYTES + 1), b"k", 1, 1)
    with pytest.raises(ValueError):
        encode_header(b"n", b"k", -1, 1)
    with pytest.raises(ValueError):
        encode_header(b"n", b"k", 1, 2**64)


def test_block_capacity() -> None:
    assert block_capacity(0) == HEADER_BYTES
    assert block_capacity(1) == HEADER_BYTES + ALIGN
    assert block_capacity(ALIGN) == HEADER_BYTES + ALIGN
    assert block_capacity(3_670_016) == HEADER_BYTES + 3_670_016  # a Qwen2-7B block: already aligned
    with pytest.raises(ValueError):
        block_capacity(-1)


def test_payload_checksum_is_xxh3_of_the_bytes_for_any_dtype() -> None:
    t = torch.arange(100, dtype=torch.bfloat16)
    raw = t.view(torch.uint8).numpy().tobytes()
    assert payload_checksum(t) == xxhash.xxh3_64_intdigest(raw) == payload_checksum(raw)
    with pytest.raises(ValueError):
        payload_checksum(torch.zeros(4, 4)[:, 0])


def test_no_pickle_in_kv_io() -> None:
    """The format never deserialises objects: no module of the package imports pickle."""
    import pathlib

    import kv_io

    for path in pathlib.Path(kv_io.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "from pickle" not in text, path
