"""Helpers shared by the runtime tests: deterministic block bytes and token ids, and a tier service on a small
model shape."""

from __future__ import annotations

import numpy as np
import torch

BLOCK_TOKENS = 4


def block_bytes(seed: int, nbytes: int) -> torch.Tensor:
    """Deterministic, distinct bytes for one block."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8))


def tokens(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n, dtype=np.int32)


async def open_service(tmp_path, layout, keyer, model: dict, *, ddr_blocks: int, disk_blocks: int, **config):
    """A TierService of ``ddr_blocks`` DDR blocks and room for ``disk_blocks`` on disk under ``tmp_path``, whose
    cost model always loads (recomputing is very slow here); ``config`` overrides any key."""
    from kv_runtime.config import KVTierConfig
    from kv_runtime.service import TierService

    values = {
        "model": "m",
        "block_size": BLOCK_TOKENS,
        "ddr_bytes": ddr_blocks * layout.block_bytes,
        "disk_bytes": disk_blocks * 2 * layout.block_bytes,
        "cache_dir": tmp_path / "cache",
        "prefill_tflops": 1e-6,
        "ddr_gbps": 10.0,
    }
    return await TierService.open(KVTierConfig(**{**values, **config}), layout, keyer, model)
