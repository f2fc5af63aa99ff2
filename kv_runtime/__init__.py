"""Where KV lives: the model's KV layout, block pools per tier, residency, migration, quotas, defragmentation.

See README.md in this folder for the ownership map and the contracts. Names are imported on first use, so
``import kv_runtime.backends.hf_backend`` does not pull in the pools, the migrator and kv_io.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "kv_runtime.backend_protocol": ["KVBackendProtocol"],
    "kv_runtime.block_manager": ["BlockManager"],
    "kv_runtime.budget": ["ByteBudget"],
    "kv_runtime.config": ["ConfigError", "KVTierConfig"],
    "kv_runtime.service": ["Lease", "LoadResult", "TierService"],
    "kv_runtime.events": ["EventKind", "EventLog", "ResidencyEvent"],
    "kv_runtime.extents": ["ExtentAllocator"],
    "kv_runtime.hierarchy": ["HierarchyManager", "Residency"],
    "kv_runtime.layout": ["KVLayout", "KVQuant", "Segment"],
    "kv_runtime.migrator": ["DirectionStats", "KVMigrator", "MigrationHandle", "MigrationPlan", "MigrationResult"],
    "kv_runtime.pool": [
        "BlockInfo",
        "DDRPool",
        "DefragReport",
        "DiskPool",
        "HBMPool",
        "KVPool",
        "PoolFullError",
        "PoolStats",
        "Slot",
        "TierUnavailableError",
    ],
    "kv_runtime.tier": ["Tier"],
    "kv_runtime.quota": ["QuotaExceededError", "QuotaManager", "QuotaPressure"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kv_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
