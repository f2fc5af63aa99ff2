"""The LMDeploy side of the backend: kvtier's ``KVConnectorBase``, and the one explicit patch that installs it.

    from kv_runtime.backends.lmdeploy_connector import install, kv_transfer_config
    install()
    engine_config = PytorchEngineConfig(enable_prefix_caching=True,
                                        kv_transfer_config=kv_transfer_config(model_dir, ddr_bytes=16 << 30))

``install()`` wraps LMDeploy's connector factory (``build_kv_connector``) so that the name ``"KVTierConnector"``
builds this connector and every other name still goes to LMDeploy's own factory; it replaces the function in
the factory module and in every LMDeploy module that imported it by name (the engine and the model agent).
Calling it again changes nothing. LMDeploy versions other than 0.18 are refused with a clear message: the
connector interface it implements is 0.18's.

The connector itself is thin: it translates LMDeploy's objects (``SchedulerSequence``, its step snapshot, its
outputs) into plain values for the store's scheduler side (scheduler role) or worker side (worker role), which
hold all of the logic; a step's metadata carries the scheduler side's plain ``StepWork`` to the worker.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

CONNECTOR_NAME = "KVTierConnector"
SUPPORTED = ((0, 18),)  # LMDeploy minor versions whose connector interface this implements
_PATCHED_MODULES = (
    "lmdeploy.pytorch.kv_connector",
    "lmdeploy.pytorch.kv_connector.factory",
    "lmdeploy.pytorch.engine.engine",
    "lmdeploy.pytorch.engine.model_agent.agent",
)


def check_version() -> str:
    """LMDeploy's version if this connector supports it; a RuntimeError that says what to do otherwise."""
    try:
        import lmdeploy
    except ImportError as e:
        raise RuntimeError("the LMDeploy backend needs LMDeploy 0.18: pip install 'kvtier[lmdeploy]'") from e
    version = getattr(lmdeploy, "__version__", "0")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts not in SUPPORTED:
        wanted = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
        raise RuntimeError(
            f"LMDeploy {version} is not supported by kvtier's connector (supported: {wanted}); its "
            "KVConnectorBase interface differs. Install a supported LMDeploy or use engine='hf'."
        )
    return version


def kv_transfer_config(model: str | None = None, *, role: str = "kv_both", config: Any = None, **settings: Any):
    """LMDeploy's ``KVTransferConfig`` selecting kvtier.

    The store's settings are a ``KVTierConfig``: ``config`` (default: the defaults) with ``model`` and
    ``settings`` (configuration keys, e.g. ``ddr_bytes="16GiB"``) on top, and ``engine="lmdeploy"``. They are
    validated here, so a bad value fails with its message before LMDeploy starts any worker, and travel as plain
    data (``to_plain()``; the engine process rebuilds them with ``KVTierConfig.from_plain``).
    """
    from lmdeploy.messages import KVTransferConfig

    from kv_runtime.config import KVTierConfig

    changes = {**settings, "engine": "lmdeploy"}
    if model is not None:
        changes["model"] = str(model)
    checked = (config if config is not None else KVTierConfig()).replace(**changes).check_engine()
    return KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role=role, kv_connector_extra_config=checked.to_plain())


_MP_PROC: Any = None  # LMDeploy's engine-subprocess entry, before install() wrapped it


def _engine_process(*args: Any, **kwargs: Any) -> Any:
    """LMDeploy's engine subprocess (spawned, as its OpenAI server runs the engine): registers the connector
    there too, then runs LMDeploy's own entry. Module level, so that the spawned process imports this module."""
    from kv_runtime.logs import log_to_stderr

    log_to_stderr()
    install()
    return _MP_PROC(*args, **kwargs)


def install() -> None:
    """Register kvtier's connector with LMDeploy's PyTorch engine, in this process and in the engine
    subprocesses LMDeploy spawns. Idempotent."""
    check_version()
    import importlib

    global _MP_PROC
    mp_engine = importlib.import_module("lmdeploy.pytorch.engine.mp_engine.zmq_engine").ZMQMPEngine
    if _MP_PROC is None:
        _MP_PROC = mp_engine.__dict__["_mp_proc"].__func__
        mp_engine._mp_proc = staticmethod(_engine_process)
    factory = importlib.import_module("lmdeploy.pytorch.kv_connector.factory")
    original = factory.build_kv_connector
    if getattr(original, "__kvtier__", False):
        return

    def build_kv_connector(role, cache_config, **kwargs):
        transfer = cache_config.kv_transfer_config
        if transfer is not None and transfer.is_kv_transfer_instance and transfer.kv_connector == CONNECTOR_NAME:
            return _connector_class()(role, cache_config, **kwargs)
        return original(role, cache_config, **kwargs)

    build_kv_connector.__kvtier__ = True  # type: ignore[attr-defined]
    build_kv_connector.__wrapped__ = original  # type: ignore[attr-defined]
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "build_kv_connector", None) is original:
            module.build_kv_connector = build_kv_connector


def installed() -> bool:
    factory = sys.modules.get("lmdeploy.pytorch.kv_connector.factory")
    return factory is not None and getattr(factory.build_kv_connector, "__kvtier__", False)


_CLASS: type | None = None


def _connector_class() -> type:
    """Defined on first use: the base class lives in LMDeploy, which this module does not import eagerly."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from lmdeploy.pytorch.kv_connector.base import (
        KVConnectorBase,
        KVConnectorMetadata,
        KVConnectorOutput,
        KVConnectorResult,
        KVConnectorRole,
        KVLoadResult,
        KVSaveBlockLease,
    )

    from kv_runtime.backends.lmdeploy_backend import EngineFormat, LMDeployStore, StepWork
    from kv_runtime.config import KVTierConfig

    @dataclass(frozen=True)
    class KVTierMetadata(KVConnectorMetadata):
        """One step's work for the worker side (plain data), and the logical blocks LMDeploy leases to saves."""

        work: StepWork = field(default_factory=StepWork)

        def get_save_block_leases(self) -> tuple[KVSaveBlockLease, ...]:
            return tuple(
                KVSaveBlockLease(operation_id=s.save_id, logical_block_ids=s.logical_ids) for s in self.work.saves
            )

    class KVTierConnector(KVConnectorBase):
        """kvtier's DDR and disk tiers under LMDeploy's GPU prefix cache (both roles, one process)."""

        def __init__(
            self,
            role: KVConnectorRole,
            cache_config: Any,
            *,
            global_rank: int = 0,
            tp_rank: int = 0,
            tp_size: int = 1,
            kv_head_replica_num: int = 1,
        ) -> None:
            super().__init__(role)
            transfer = cache_config.kv_transfer_config
            if tp_size != 1:
                raise ValueError("kvtier's LMDeploy connector supports tp=1 (the single-process executor) only")
            if cache_config.states_shapes or cache_config.window_size > 1:
                raise ValueError("kvtier's LMDeploy connector does not support linear-attention or window caches")
            if cache_config.kernel_block_size != cache_config.block_size:
                raise ValueError("kvtier's LMDeploy connector needs kernel_block_size == block_size")
            self.role = role
            self.cache_config = cache_config
            self.consumer = transfer.is_kv_consumer
            self.producer = transfer.is_kv_producer
            fmt = EngineFormat(
                block_size=cache_config.block_size,
                quant_policy=int(cache_config.quant_policy),
                tp_rank=tp_rank,
                tp_size=tp_size,
            )
            config = KVTierConfig.from_plain(transfer.kv_connector_extra_config)
            self.store = LMDeployStore.shared(config, fmt)
            self.scheduler = self.store.scheduler
            self.worker = self.store.worker

        # -- scheduler role
        @staticmethod
        def _plain(request) -> bool:
            return request.history_multimodals.empty() and len(request.history_embeddings) == 0

        def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
            if not self.consumer or not self._plain(request):
                return 0, False
            return self.scheduler.lookup(
                int(request.seq_id),
                request.all_ids,
                int(num_computed_tokens),
                int(request.get_prefix_cache_max_match_step()),
            )

        def update_state_after_alloc(self, request, block_ids: Sequence[int], num_external_tokens: int) -> None:
            self.scheduler.bind(int(request.seq_id), block_ids, int(num_external_tokens), int(request.session_id))

        def build_connector_meta(self, step_input) -> KVTierMetadata | None:
            running = []
            if self.producer and step_input.connector_token_lens:
                for seq, n, ids, logical in zip(
                    step_input.running,
                    step_input.connector_token_lens,
                    step_input.connector_block_ids,
                    step_input.connector_logical_block_ids,
                    strict=True,
                ):
                    if self._plain(seq):
                        running.append((int(seq.seq_id), seq.all_ids, int(n), ids, logical))
            work = self.scheduler.step_work(running, producer=self.producer)
            if work is None:
                return None
            return KVTierMetadata(work=work)

        def on_new_request(self, request) -> None:
            self.scheduler.new_request(int(request.seq_id))

        def update_connector_output(self, connector_output: KVConnectorOutput) -> KVConnectorResult:
            results, saves = self.scheduler.finish(
                connector_output.finished_receiving or set(),
                connector_output.invalid_block_ids,
                connector_output.completed_save_ids or set(),
            )
            return KVConnectorResult(
                load_results=tuple(KVLoadResult(request_id=r, success=ok) for r, ok in results),
                completed_save_ids=saves,
            )

        def finish_transfers_after_worker_drain(self) -> None:
            self.scheduler.drain()

        def request_finished(self, request) -> None:
            self.scheduler.request_finished(int(request.seq_id))

        # -- worker role
        def register_kv_caches(self, kv_caches: Mapping[str, Any]) -> None:
            rows = []
            for name, value in kv_caches.items():
                rows.extend([value] if torch.is_tensor(value) else list(value))
                if not rows:
                    raise ValueError(f"KV cache {name!r} has no rows")
            self.worker.register(rows, self.cache_config.num_gpu_blocks)

        def start_load_kv(self) -> None:
            meta = self._get_connector_metadata()
            if meta.work.loads:
                self.worker.start_loads(meta.work.loads, torch.cuda.current_stream().record_event())

        def start_save_kv(self) -> None:
            meta = self._get_connector_metadata()
            if meta.work.saves:
                # Recorded on the compute stream after this step's forward was queued: saves copy only after it.
                self.worker.start_saves(meta.work.saves, torch.cuda.current_stream().record_event())

        def get_finished(self) -> KVConnectorOutput:
            loads, saves = self.worker.poll()
            invalid = {b for ids in loads.values() for b in ids}
            return KVConnectorOutput(
                completed_save_ids=saves or None, finished_receiving=set(loads) or None, invalid_block_ids=invalid
            )

        def shutdown(self) -> None:
            if self.role is KVConnectorRole.WORKER:
                self.worker.wait_idle()

    _CLASS = KVTierConnector
    return _CLASS
