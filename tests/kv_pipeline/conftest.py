"""Shared fixtures: one random-weight Qwen2-shaped model directory per test session (peaked logits, so greedy
tokens are stable), and a factory for engines on it with small 16-token blocks (96 KiB each) on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import BLOCK


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kv_benchmarks.models import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("kvp-model"), "qwen2-tiny", peaked=True)


@pytest.fixture
def make_engine(model_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """``make_engine(**overrides)``: an engine (not started) on the session's model with a per-test cache dir."""
    from kv_pipeline import KVTierEngine

    def make(**overrides: Any) -> KVTierEngine:
        kwargs: dict[str, Any] = {
            "cache_dir": tmp_path / "cache",
            "ddr_bytes": "32MiB",
            "disk_bytes": "32MiB",
            "block_size": BLOCK,
            "device": "cpu",
            "write_mode": "write-through",
        }
        kwargs.update(overrides)
        return KVTierEngine.from_pretrained(model_dir, **kwargs)

    return make
