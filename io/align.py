"""Alignment for O_DIRECT: the one number every layer of kv_io agrees on, and aligned host memory.

O_DIRECT transfers bypass the page cache and so move whole logical blocks between the device and the caller's
memory: offsets, lengths and buffer addresses must all be multiples of the logical block size. 4096 covers the
filesystems and NVMe devices this project targets (512-byte devices accept it too).
"""

from __future__ import annotations

import torch

ALIGN = 4096


def round_up(n: int, multiple: int = ALIGN) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def aligned_empty(nbytes: int, *, pin: bool = False, align: int = ALIGN) -> torch.Tensor:
    """A 1-D uint8 host tensor of `nbytes` whose first byte sits on an `align` boundary.

    torch's CPU allocator only promises 64-byte alignment, so this over-allocates by `align` bytes and slices
    to the first aligned address. The slice keeps the whole allocation alive.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    raw = torch.empty(nbytes + align, dtype=torch.uint8, pin_memory=pin)
    start = (-raw.data_ptr()) % align
    return raw[start : start + nbytes]


def is_aligned(value: int | torch.Tensor, align: int = ALIGN) -> bool:
    """True when an offset/length, or a tensor's first byte, sits on an `align` boundary."""
    if isinstance(value, torch.Tensor):
        value = value.data_ptr()
    return value % align == 0
