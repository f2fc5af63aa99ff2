"""The on-disk block format: one fixed-size header, then the payload, in a slot of a slab file.

Slot layout (all integers little-endian)::

    offset 0            HEADER_BYTES (4096)                          capacity
    | header ........... | payload (payload_len bytes) | zero padding |

    header: magic (8s) | format version (u32) | namespace length (u16) | key length (u16)
            | payload length (u64) | payload xxh3_64 (u64) | namespace | key | header xxh3_64 (u64)

The header occupies a whole 4096-byte page so the payload starts on an O_DIRECT boundary and can be read
straight into an aligned buffer without a bounce copy. The header carries its own checksum so a torn or stale
header is told apart from a corrupt payload, and it names its namespace and key so a slot that was reused, or a
metadata row that points at the wrong slot, is detected on read instead of returning another block's bytes.
Self-describing and checksummed, headers also make the slabs their own index: a store whose index is lost or
damaged rebuilds it by walking the slabs' aligned offsets (`disk_store._scan_slab`).

Nothing here is pickle or any other self-describing object format: decoding never runs code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kv_io.align import ALIGN, round_up

__all__ = [
    "ALIGN",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_NAME_BYTES",
    "BlockHeader",
    "CorruptBlockError",
    "as_bytes_view",
    "block_capacity",
    "decode_header",
    "encode_header",
    "payload_checksum",
]

MAGIC = b"KVTIERBK"
FORMAT_VERSION = 1
HEADER_BYTES = 4096
MAX_NAME_BYTES = 1024
"""Longest namespace and longest key a header can carry (both fit in one page with room to spare)."""

_FIXED = struct.Struct("<8sIHHQQ")
_HEADER_SUM = struct.Struct("<Q")


class CorruptBlockError(Exception):
    """A block's header (or payload) fails verification: bad magic, unknown version, bad checksum or bounds."""


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A decoded, self-consistent header. Whether it is the *expected* block is the reader's check."""

    version: int
    namespace: bytes
    key: bytes
    payload_len: int
    checksum: int


def block_capacity(payload_bytes: int) -> int:
    """Bytes a slot must reserve for a payload: header plus payload, rounded up to ALIGN."""
    if not isinstance(payload_bytes, int) or payload_bytes < 0:
        raise ValueError(f"payload_bytes must be a non-negative int, got {payload_bytes!r}")
    return HEADER_BYTES + round_up(payload_bytes)


def as_bytes_view(data: object) -> memoryview:
    """A zero-copy byte view of a host tensor, numpy array, bytes-like or memoryview."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise TypeError(f"expected a host tensor, got one on {data.device}")
        if not data.is_contiguous():
            raise ValueError("expected a contiguous tensor")
        data = data.reshape(-1).view(torch.uint8).numpy()
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("expected a C-contiguous array")
        data = data.reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


def payload_checksum(data: object) -> int:
    """xxh3_64 of the payload bytes (fast enough to check on every read at disk bandwidth)."""
    return xxhash.xxh3_64_intdigest(as_bytes_view(data))


def encode_header(namespace: bytes, key: bytes, payload_len: int, checksum: int) -> bytes:
    """The HEADER_BYTES-long header for a block (zero-padded to a full page)."""
    for name, value in (("namespace", namespace), ("key", key)):
        if not isinstance(value, bytes):
            raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
        if len(value) > MAX_NAME_BYTES:
            raise ValueError(f"{name} is {len(value)} bytes; at most {MAX_NAME_BYTES} fit in a block header")
    if not isinstance(payload_len, int) or payload_len < 0:
        raise ValueError(f"payload_len must be a non-negative int, got {payload_len!r}")
    if not isinstance(checksum, int) or not 0 <= checksum < 2**64:
        raise ValueError(f"checksum must be an unsigned 64-bit int, got {checksum!r}")
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, len(namespace), len(key), payload_len, checksum) + namespace + key
    body += _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(body))
    return body.ljust(HEADER_BYTES, b"\0")


def decode_header(buf: object) -> BlockHeader:
    """Parse and verify a header. Raises CorruptBlockError on bad magic, version, bounds or header checksum."""
    view = as_bytes_view(buf)
    if len(view) < _FIXED.size + _HEADER_SUM.size:
        raise CorruptBlockError(f"header truncated: {len(view)} bytes")
    magic, version, ns_len, key_len, payload_len, checksum = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptBlockError(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise CorruptBlockError(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    if ns_len > MAX_NAME_BYTES or key_len > MAX_NAME_BYTES:
        raise CorruptBlockError(f"name lengths out of bounds ({ns_len}, {key_len})")
    end = _FIXED.size + ns_len + key_len
    if len(view) < end + _HEADER_SUM.size:
        raise CorruptBlockError("header truncated before its checksum")
    (stored_sum,) = _HEADER_SUM.unpack_from(view, end)
    if xxhash.xxh3_64_intdigest(view[:end]) != stored_sum:
        raise CorruptBlockError("header checksum mismatch")
    namespace = bytes(view[_FIXED.size : _FIXED.size + ns_len])
    key = bytes(view[_FIXED.size + ns_len : end])
    return BlockHeader(version, namespace, key, payload_len, checksum)
