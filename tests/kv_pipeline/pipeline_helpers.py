"""Helpers for the kv_pipeline tests (a module of its own: every test folder has a ``conftest``)."""

from __future__ import annotations

import torch

BLOCK = 16  # tokens per block in these tests: short prompts still span many blocks


def prompt(n: int, seed: int = 0) -> list[int]:
    """``n`` random token ids in the tokenizer's range (no EOS), the same for the same seed."""
    return torch.randint(2, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
