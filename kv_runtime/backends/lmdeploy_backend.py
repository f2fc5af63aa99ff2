"""kvtier as the external KV store of LMDeploy's PyTorch engine: DDR and disk under LMDeploy's GPU prefix cache.

LMDeploy keeps its own prefix cache in HBM; kvtier serves what fell out of it. The engine talks to a store
through its connector interface (``lmdeploy.pytorch.kv_connector.KVConnectorBase``, wrapped in
``lmdeploy_connector.py``). The connector's two roles are two objects here, as in LMDeploy and vLLM:

- the **scheduler side** (``lmdeploy_scheduler.py``, LMDeploy's paging thread) decides: hit lengths and the
  cost plan (through the tier service), which blocks a step loads and saves. Its decisions reach the worker as
  plain, serializable step metadata (:class:`StepWork`: request ids, save ids, block ids).
- the **worker side** (``lmdeploy_worker.py``, LMDeploy's model agent) moves bytes: DDR <-> the engine's cells on
  kvtier's copy streams, ordered by events on LMDeploy's compute stream, and reports completions.

Both sides drive the one :class:`~kv_runtime.service.TierService` of this module's :class:`LMDeployStore`
(one per process and configuration), which also runs kvtier's own asyncio loop in a thread: LMDeploy's threads
only submit work and poll for completions. The ids in the step metadata name leases and saves in the store's
tables, which live in this process: LMDeploy's single-process executor (TP 1) runs both sides here. This module
imports nothing from LMDeploy, so that its logic runs (and is tested) anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
import torch

from kv_runtime.config import KVTierConfig
from kv_runtime.events import EventKind
from kv_runtime.layout import LAYOUT_VERSION, KVLayout, parse_dtype
from kv_runtime.model_identity import model_identity
from kv_runtime.pool import Tier
from kv_runtime.service import Lease, TierService
from prefix_reuse import BlockKeyer, KeyNamespace, RequestKeys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineFormat:
    """What changes KV bytes in LMDeploy besides the model: block size, quantisation, TP placement."""

    block_size: int
    quant_policy: int = 0
    tp_rank: int = 0
    tp_size: int = 1


# ---------------------------------------------------------------------- step metadata (plain data)


@dataclass(frozen=True, slots=True)
class LoadOrder:
    """Load the lease of ``request_id`` into the engine's blocks ``block_ids``."""

    request_id: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SaveOrder:
    """Copy the engine's blocks ``block_ids`` out under save ``save_id``; LMDeploy leases ``logical_ids`` until
    the save is reported."""

    save_id: int
    block_ids: tuple[int, ...]
    logical_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StepWork:
    """One engine step's work for the worker side."""

    loads: tuple[LoadOrder, ...] = ()
    saves: tuple[SaveOrder, ...] = ()


# ---------------------------------------------------------------------- what both sides share


@dataclass(slots=True)
class Load:
    """A bound load: the lease the scheduler side took, and the engine's destination blocks."""

    request_id: int
    block_ids: tuple[int, ...]
    lease: Lease
    first: int  # the first block loaded (LMDeploy holds the ones before)
    started: bool = False
    session_id: int = -1  # the engine session it serves (what the store reports reuse under)
    tokens: dict[str, int] = field(default_factory=dict)  # the tokens it loads, by the tier they come from


@dataclass(slots=True)
class Save:
    save_id: int
    rk: RequestKeys
    first: int
    block_ids: tuple[int, ...]


@dataclass(slots=True)
class StoreStats:
    """Counters for the benchmark and the metrics endpoint."""

    lookups: int = 0
    hits: int = 0
    planned_recompute: int = 0
    loaded_blocks: dict[str, int] = field(default_factory=lambda: {"ddr": 0, "disk": 0})
    load_misses: int = 0
    failed_loads: int = 0
    saved_blocks: int = 0
    skipped_saves: int = 0
    load_seconds: list[float] = field(default_factory=list)


class _LoopThread:
    """kvtier's own asyncio loop in a daemon thread: LMDeploy's threads submit transfers and never block."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kvtier-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # LMDeploy allocates its cache (and builds this store) under inference mode; copies into those tensors
        # must run under it too, and inference mode is per thread.
        with torch.inference_mode():
            self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.submit(coro).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class LMDeployStore:
    """The tier service for LMDeploy in this process, the tables both connector roles share, and the roles."""

    _instances: ClassVar[dict[str, LMDeployStore]] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def shared(cls, config: KVTierConfig, fmt: EngineFormat) -> LMDeployStore:
        """The one store of this process for this configuration (the scheduler and worker connectors meet here)."""
        key = f"{config.digest()}:{fmt}"
        with cls._instances_lock:
            store = cls._instances.get(key)
            if store is None:
                store = cls._instances[key] = cls(config, fmt)
            return store

    @classmethod
    def instances(cls) -> list[LMDeployStore]:
        with cls._instances_lock:
            return list(cls._instances.values())

    def __init__(self, config: KVTierConfig, fmt: EngineFormat) -> None:
        from kv_runtime.backends.lmdeploy_scheduler import LMDeploySchedulerSide
        from kv_runtime.backends.lmdeploy_worker import LMDeployWorkerSide

        self.config = config = config.replace(engine="lmdeploy").check_engine("lmdeploy")
        self.format = fmt
        model_dir = Path(config.model)
        if not (model_dir / "config.json").exists():
            raise ValueError(f"kvtier connector: {model_dir} has no config.json")
        model_config = orjson.loads((model_dir / "config.json").read_bytes())
        self.dtype = parse_dtype(config.resolve_dtype(model_config))
        self.layout = KVLayout.from_config(
            model_config,
            block_size=fmt.block_size,
            dtype=self.dtype,
            quant=fmt.quant_policy,
            tp_size=fmt.tp_size,
            tp_rank=fmt.tp_rank,
        )
        self.block_size = fmt.block_size
        self.namespace = KeyNamespace(
            model_id=model_identity(config),
            kv_dtype=str(self.dtype).removeprefix("torch."),
            block_size=fmt.block_size,
            quant_policy=str(fmt.quant_policy),
            layout_version=LAYOUT_VERSION,
            tp_rank=fmt.tp_rank,
            tp_size=fmt.tp_size,
            cache_salt=config.cache_salt,
        )
        self.keyer = BlockKeyer(self.namespace)
        self.io = _LoopThread()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:  # a store that fails to open leaves no thread running and no disk tier open
            self.service: TierService = self.io.run(
                TierService.open(
                    config.replace(block_size=fmt.block_size), self.layout, self.keyer, model_config, device=device
                )
            )
        except BaseException:
            self.io.stop()
            raise
        self.stats = StoreStats()
        # Benchmarks measure pure loads with this set: every matched block is loaded, whatever the cost model says.
        self.always_load = False
        self.lock = threading.Lock()
        self.loads: dict[int, Load] = {}  # bound loads by request id, until paging takes their result
        self.saves: dict[int, Save] = {}  # saves by id, until paging takes their completion
        # Tokens loaded per engine session and tier, until the engine takes them (``take_reused``).
        self.reused: dict[int, dict[str, int]] = {}
        self.scheduler = LMDeploySchedulerSide(self)
        self.worker = LMDeployWorkerSide(self)

    @property
    def hierarchy(self):
        return self.service.hierarchy

    @property
    def migrator(self):
        return self.service.migrator

    @property
    def cost(self):
        return self.service.cost

    # ================================================================== control

    def wait_idle(self, timeout: float = 600.0) -> None:
        """Block until every transfer started so far has ended (benchmarks, shutdown)."""
        self.worker.wait_idle(timeout)

    def take_reused(self, session_id: int) -> dict[str, int]:
        """The tokens kvtier loaded for an engine session, by tier (``ddr``, ``disk``), forgotten once taken."""
        with self.lock:
            return self.reused.pop(session_id, {})

    def saves_in_flight(self) -> int:
        """Saves whose completion LMDeploy has not taken yet (it still leases their blocks)."""
        with self.lock:
            return len(self.saves)

    def drop_tier(self, tier: Tier) -> int:
        """Drop every unpinned copy in ``tier`` that has a copy elsewhere (benchmarks: "only on disk")."""
        dropped = 0
        for r in self.hierarchy.blocks_in(tier):
            node = r.node
            if node is None or node.pin_count or r.in_flight or len(r.copies) < 2:
                continue
            self.hierarchy.drop_copy(r, tier)
            dropped += 1
        return dropped

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        service = self.service.snapshot()
        return {
            "lookups": s.lookups,
            "hits": s.hits,
            "planned_recompute": s.planned_recompute,
            "loaded_blocks": dict(s.loaded_blocks),
            "load_misses": s.load_misses,
            "failed_loads": s.failed_loads,
            "saved_blocks": s.saved_blocks,
            "skipped_saves": s.skipped_saves,
            "disk_writes": self.hierarchy.events.count(EventKind.STORED, Tier.DISK),
            "blocks": service["blocks"],
            "migrations": service["transfers"],
            "cost_model": service["cost_model"],
        }

    def close(self) -> None:
        """Wait for transfers, close the disk tier and the loop thread."""
        try:
            self.wait_idle(timeout=120)
        finally:
            try:
                self.io.run(self.service.close())
            finally:
                self.io.stop()
                with self._instances_lock:
                    for key, store in list(self._instances.items()):
                        if store is self:
                            del self._instances[key]
