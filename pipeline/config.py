"""The runtime's one configuration, under the name the pipeline has always exported it by.

Everything lives in ``kv_runtime.config`` (both engines read it from there); this module only re-exports it,
so ``from kv_pipeline.config import KVTierConfig`` keeps working.
"""

from __future__ import annotations

from kv_runtime.config import (
    ENGINES,
    ENV_PREFIX,
    PRESET_ENV,
    WRITE_MODES,
    ConfigError,
    KVTierConfig,
    parse_size,
    presets,
)

__all__ = ["ENGINES", "ENV_PREFIX", "PRESET_ENV", "WRITE_MODES", "ConfigError", "KVTierConfig", "parse_size", "presets"]
