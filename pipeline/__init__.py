"""When things happen: the asyncio scheduler, the async Python API and the ``kvtier`` command.

Imports are lazy so that ``kvtier --help`` and ``kv_pipeline.config`` do not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KVTierEngine": "kv_pipeline.engine",
    "GenerationOutput": "kv_pipeline.engine",
    "KVTierConfig": "kv_pipeline.config",
    "ConfigError": "kv_pipeline.config",
    "SharedContext": "kv_pipeline.contexts",
    "RequestMetrics": "kv_pipeline.scheduler",
    "RequestError": "kv_pipeline.requests",
    "UnknownContextError": "kv_pipeline.requests",
    "ContextStoreError": "kv_pipeline.requests",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kv_pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
