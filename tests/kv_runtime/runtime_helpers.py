"""Helpers shared by the runtime tests: deterministic block bytes and token ids."""

from __future__ import annotations

import numpy as np
import torch

BLOCK_TOKENS = 4


def block_bytes(seed: int, nbytes: int) -> torch.Tensor:
    """Deterministic, distinct bytes for one block."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8))


def tokens(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n, dtype=np.int32)
