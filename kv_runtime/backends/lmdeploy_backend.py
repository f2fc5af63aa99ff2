"""kvtier as the external KV store of LMDeploy's PyTorch engine: DDR and disk under LMDeploy's GPU prefix cache.

LMDeploy keeps its own prefix cache in HBM; kvtier serves what fell out of it. The engine talks to a store
through its connector interface (``lmdeploy.pytorch.kv_connector.KVConnectorBase``, wrapped in
``lmdeploy_connector.py``); this module is the store behind both of the connector's roles, and imports
nothing from LMDeploy, so that its logic runs (and is tested) anywhere.

Scheduler role (LMDeploy's paging thread):

- ``lookup``: the prompt's keys against the prefix index, past the blocks LMDeploy already holds; the
  cost model chooses how many blocks to load (or none: recompute). Matched blocks are pinned from here on,
  so nothing they need is evicted before the load ends.
- ``bind``: LMDeploy allocated destination blocks for the hit; the load is bound to them.
- ``step_work``: the loads to start in this step, and the saves of the prompt blocks the step's forward
  completes (only blocks kvtier does not hold yet); LMDeploy leases the saved blocks until the save reports.
- ``finish``: worker progress back to paging; a load with a bad block fails as a whole and LMDeploy
  recomputes (it never publishes a partly loaded prefix).

Worker role (LMDeploy's model agent, same process):

- ``register``: the engine's cache rows (one uint8 row ``[num_blocks, layer_block_bytes]`` per layer) become
  an ``HBMPool`` of engine-owned cells; nothing is allocated in HBM by kvtier.
- ``start_loads``: disk-only blocks come up to DDR first (each verified), then DDR -> the engine's cells on
  kvtier's copy streams, after an event recorded on the compute stream; completion is reported only after
  the copy's own event has completed, so LMDeploy publishes the prefix only once its bytes are there.
- ``start_saves``: an event on the compute stream after the forward that wrote the blocks, then cells ->
  pinned DDR slots on kvtier's streams (never racing the forward), publish in the index, and write down to
  disk per the migration policy.

Transfers run as asyncio tasks on kvtier's own event loop thread; LMDeploy's threads only submit work and
poll for completions. Only LMDeploy's single-process executor (TP 1) is supported: both roles share this
store in one process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson
import torch
import xxhash

from kv_io.cuda import wait_event
from kv_io.file_io import DEFAULT_THREADS
from kv_policy import BlockInfo, CostBenefitModel, MigrationPolicy, ModelShape, TierLink
from kv_runtime.hierarchy import HierarchyManager, Residency
from kv_runtime.layout import LAYOUT_VERSION, KVLayout, parse_dtype
from kv_runtime.migrator import KVMigrator, MigrationPlan
from kv_runtime.pool import DDRPool, DiskPool, HBMPool, PoolFullError, Slot, Tier
from kv_runtime.quota import QuotaExceededError
from prefix_reuse import BlockKeyer, BlockNode, KeyNamespace, RequestKeys, StaleNodeError, model_fingerprint

log = logging.getLogger(__name__)

LOAD_CHUNK_BYTES = 256 << 20  # disk -> DDR -> HBM in chunks: one chunk's copy up overlaps the later ones' reads
HINT_TTL_S = 120.0
WRITE_MODES = ("write-through", "selective")


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """What the connector needs from ``kv_connector_extra_config`` (sizes in bytes, already parsed)."""

    model: str
    dtype: str = "auto"
    ddr_bytes: int = 8 << 30
    disk_bytes: int = 0
    cache_dir: str = "kvtier-cache"
    write_mode: str = "write-through"
    cache_salt: str = ""
    prefill_tflops: float = 400.0
    ddr_gbps: float = 25.0
    disk_gbps: float = 1.5
    io_threads: int = DEFAULT_THREADS

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> StoreSettings:
        known = set(cls.__slots__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kvtier connector: unknown settings {unknown}; known: {sorted(known)}")
        if not extra.get("model"):
            raise ValueError("kvtier connector: kv_connector_extra_config['model'] must name the model directory")
        s = cls(**extra)
        for name in ("ddr_bytes", "disk_bytes"):
            value = getattr(s, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"kvtier connector: {name} must be a byte count >= 0, got {value!r}")
        for name in ("prefill_tflops", "ddr_gbps", "disk_gbps"):
            value = getattr(s, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"kvtier connector: {name} must be a number > 0, got {value!r}")
        if isinstance(s.io_threads, bool) or not isinstance(s.io_threads, int) or s.io_threads <= 0:
            raise ValueError(f"kvtier connector: io_threads must be a positive int, got {s.io_threads!r}")
        if s.ddr_bytes == 0:
            raise ValueError("kvtier connector: ddr_bytes must be > 0 (loads reach the GPU through pinned DDR)")
        if s.write_mode not in WRITE_MODES:
            raise ValueError(
                f"kvtier connector: write_mode must be one of {WRITE_MODES}, got {s.write_mode!r} (write-back "
                "demotes on DDR eviction, which this connector does not do: its DDR eviction drops LRU blocks)"
            )
        return s

    def digest(self) -> str:
        return xxhash.xxh3_64_hexdigest(orjson.dumps({k: getattr(self, k) for k in self.__slots__}))


@dataclass(frozen=True, slots=True)
class EngineFormat:
    """What changes KV bytes in LMDeploy besides the model: block size, quantisation, TP placement."""

    block_size: int
    quant_policy: int = 0
    tp_rank: int = 0
    tp_size: int = 1


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


@dataclass(slots=True)
class _Lookup:
    """A positive lookup, its blocks pinned, waiting for LMDeploy to allocate destinations."""

    rk: RequestKeys
    first: int  # first block to load (LMDeploy holds the ones before)
    nodes: list[BlockNode]  # blocks [first, first + len(nodes)), pinned


@dataclass(slots=True)
class _Load:
    request_id: int
    block_ids: tuple[int, ...]
    nodes: list[BlockNode]  # pinned until the load ends
    first: int
    started: float = 0.0


@dataclass(slots=True)
class _Save:
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
    disk_writes: int = 0
    load_seconds: list[float] = field(default_factory=list)


class LMDeployStore:
    """DDR and disk tiers, the prefix index and the cost model, shared by the connector's two roles."""

    _instances: ClassVar[dict[str, LMDeployStore]] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def shared(cls, settings: StoreSettings, fmt: EngineFormat) -> LMDeployStore:
        """The one store of this process for these settings (the scheduler and worker connectors meet here)."""
        key = f"{settings.digest()}:{fmt}"
        with cls._instances_lock:
            store = cls._instances.get(key)
            if store is None:
                store = cls._instances[key] = cls(settings, fmt)
            return store

    @classmethod
    def instances(cls) -> list[LMDeployStore]:
        with cls._instances_lock:
            return list(cls._instances.values())

    def __init__(self, settings: StoreSettings, fmt: EngineFormat) -> None:
        self.settings = settings
        self.format = fmt
        model_dir = Path(settings.model)
        if not (model_dir / "config.json").exists():
            raise ValueError(f"kvtier connector: {model_dir} has no config.json")
        config = orjson.loads((model_dir / "config.json").read_bytes())
        dtype = settings.dtype
        if dtype in ("auto", ""):
            dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
        self.dtype = parse_dtype(dtype)
        self.layout = KVLayout.from_config(
            config,
            block_size=fmt.block_size,
            dtype=self.dtype,
            quant=fmt.quant_policy,
            tp_size=fmt.tp_size,
            tp_rank=fmt.tp_rank,
        )
        self.block_size = fmt.block_size
        self.namespace = KeyNamespace(
            model_id=model_fingerprint(model_dir),
            kv_dtype=str(self.dtype).removeprefix("torch."),
            block_size=fmt.block_size,
            quant_policy=str(fmt.quant_policy),
            layout_version=LAYOUT_VERSION,
            tp_rank=fmt.tp_rank,
            tp_size=fmt.tp_size,
            cache_salt=settings.cache_salt,
        )
        self.keyer = BlockKeyer(self.namespace)
        self.cost = CostBenefitModel(
            ModelShape.from_config(config),
            bytes_per_token=self.layout.bytes_per_token,
            tiers=[TierLink("ddr", settings.ddr_gbps, 0.1), TierLink("disk", settings.disk_gbps, 1.0)],
            prefill_tflops=settings.prefill_tflops,
        )
        self.policy = MigrationPolicy(settings.write_mode)
        self.io = _LoopThread()
        pools: dict[Tier, Any] = {}
        try:  # a store that fails to open leaves no thread running and no disk tier open
            pools[Tier.DDR] = DDRPool(settings.ddr_bytes)
            if settings.disk_bytes:
                pools[Tier.DISK] = self.io.run(
                    DiskPool.open_sized(
                        Path(settings.cache_dir) / "blocks", settings.disk_bytes, io_threads=settings.io_threads
                    )
                )
            self.hierarchy = HierarchyManager(pools)
            if Tier.DISK in pools:
                self.hierarchy.adopt_disk()
        except BaseException:
            if Tier.DISK in pools:
                self.io.run(pools[Tier.DISK].store.close())
            self.io.stop()
            raise
        self.migrator = KVMigrator(self.hierarchy)
        self.stats = StoreStats()
        self.hbm: HBMPool | None = None
        # Benchmarks measure pure loads with this set: every matched block is loaded, whatever the cost model says.
        self.always_load = False
        self._lock = threading.Lock()
        # scheduler role
        self._lookups: dict[int, _Lookup] = {}
        self._pending_loads: dict[int, _Load] = {}
        self._inflight_loads: dict[int, _Load] = {}
        self._failed: set[int] = set()
        self._next_save: dict[int, int] = {}
        self._saves: dict[int, _Save] = {}
        self._save_ids = itertools.count()
        self._recompute_hints: dict[bytes, float] = {}
        self._prefetching: dict[bytes, Future] = {}
        # worker role: completions since the last poll
        self._done_loads: dict[int, tuple[int, ...]] = {}
        self._done_saves: set[int] = set()
        self._copying: list[tuple[torch.cuda.Event, _Load, int, int]] = []  # (event, load, blocks ok, from disk)
        self._saving: list[tuple[torch.cuda.Event, _Save, list[Slot]]] = []
        self._background: set[Future] = set()

    # ================================================================== scheduler role

    def lookup(self, request_id: int, tokens: np.ndarray, num_computed: int, max_step: int) -> tuple[int | None, bool]:
        """Tokens kvtier can load past the ``num_computed`` LMDeploy holds; ``(None, False)`` while a prefetch
        of them is still coming up from disk. ``max_step`` is LMDeploy's deepest allowed hit."""
        bs = self.block_size
        token_len = max(0, int(max_step)) // bs * bs
        if token_len < bs or num_computed >= token_len or request_id in self._failed:
            return 0, False
        with self._lock:
            prev = self._lookups.get(request_id)
        if prev is not None:
            remote = (prev.first + len(prev.nodes)) * bs
            if remote > num_computed:
                return remote - num_computed, True
            self._drop_lookup(request_id)
        rk = self.keyer.request(tokens[:token_len])
        if self._consume_hint(rk):
            return 0, False
        first = int(num_computed) // bs
        nodes = self._match(rk)
        if len(nodes) <= first:
            return 0, False
        candidates = nodes[first:]
        if self._prefetch_pending(candidates):
            return None, False
        self.stats.lookups += 1
        if self.always_load:
            load_end = len(candidates)
        else:
            tiers = [self._tier_name(n) for n in candidates]
            load_end = self.cost.plan(tiers, bs, start_block=first, allow_both=False).load_end
        if load_end == 0:
            self.stats.planned_recompute += 1
            return 0, False
        chosen = candidates[:load_end]
        try:
            self.hierarchy.index.pin(chosen)
        except StaleNodeError:  # evicted between match and pin: recompute this time
            return 0, False
        with self._lock:
            self._lookups[request_id] = _Lookup(rk, first, chosen)
        self.stats.hits += 1
        if log.isEnabledFor(logging.INFO):  # the count walks the chosen blocks: only when it is logged
            on_disk = sum(Tier.DDR not in n.payload.copies for n in chosen)
            log.info("kvtier: request %d loads %d blocks (%d from disk)", request_id, len(chosen), on_disk)
        return (first + len(chosen)) * bs - int(num_computed), True

    def _match(self, rk: RequestKeys) -> list[BlockNode]:
        """The longest run of matched blocks that kvtier holds in DDR or on disk."""
        out = []
        for node in self.hierarchy.match(rk):
            copies = node.payload.copies
            if Tier.DDR not in copies and Tier.DISK not in copies:
                break
            out.append(node)
        return out

    @staticmethod
    def _tier_name(node: BlockNode) -> str:
        return "ddr" if Tier.DDR in node.payload.copies else "disk"

    def bind(self, request_id: int, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """LMDeploy allocated ``block_ids`` for the last ``num_external_tokens`` of a positive lookup."""
        if num_external_tokens <= 0:
            return
        bs = self.block_size
        with self._lock:
            lk = self._lookups.pop(request_id)
            if request_id in self._pending_loads or request_id in self._inflight_loads:
                raise RuntimeError(f"request {request_id} already has a load")
        remote = lk.first + len(lk.nodes)
        local_tokens = remote * bs - int(num_external_tokens)
        if local_tokens < 0 or local_tokens % bs:
            self.hierarchy.index.unpin(lk.nodes)
            raise ValueError(f"load bounds must be block aligned: {local_tokens} tokens before the load")
        first = local_tokens // bs
        skip = first - lk.first  # LMDeploy may have more (or fewer) blocks of its own than at lookup
        if skip < 0 or len(block_ids) != remote - first:
            self.hierarchy.index.unpin(lk.nodes)
            raise ValueError(f"{len(block_ids)} destination blocks for blocks [{first}, {remote}) of the lookup")
        if skip:
            self.hierarchy.index.unpin(lk.nodes[:skip])
        with self._lock:
            self._pending_loads[request_id] = _Load(
                request_id, tuple(int(b) for b in block_ids), lk.nodes[skip:], first
            )

    def step_work(
        self,
        running: Sequence[tuple[int, np.ndarray, int, Sequence[int], Sequence[int]]],
        producer: bool = True,
    ) -> tuple[tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]] | None:
        """Loads to start and saves to take for one engine step, or None when there is nothing to do or poll.

        ``running``: per request ``(request_id, tokens, token_len after this step, block ids, logical ids)``.
        Returns ``(load request ids, ((save_id, logical block ids to lease), ...))``.
        """
        saves = self._plan_saves(running) if producer and running else []
        if not saves and not self._pending_loads and not self._inflight_loads and not self._saves:
            return None  # the common decode step: nothing to start, nothing to poll
        with self._lock:
            loads = tuple(self._pending_loads)
            self._inflight_loads.update(self._pending_loads)
            self._pending_loads.clear()
            if not loads and not saves and not self._inflight_loads and not self._saves:
                return None
        return loads, tuple(saves)

    def _plan_saves(self, running) -> list[tuple[int, tuple[int, ...]]]:
        bs = self.block_size
        out = []
        for request_id, tokens, token_len, block_ids, logical_ids in running:
            full = int(token_len) // bs
            start = self._next_save.get(request_id, 0)
            if full <= start:
                continue
            if full > len(block_ids) or full > len(logical_ids):
                raise RuntimeError(f"request {request_id} has fewer blocks than its {full * bs}-token save boundary")
            rk = self.keyer.request(tokens[: full * bs])
            held = len(self.hierarchy.index.match(rk))  # dedupe: blocks kvtier holds already are not saved again
            first = min(max(start, held), full)
            self._next_save[request_id] = full
            self.stats.skipped_saves += first - start
            if first == full:
                continue
            save_id = next(self._save_ids)
            with self._lock:
                self._saves[save_id] = _Save(save_id, rk, first, tuple(int(b) for b in block_ids[first:full]))
            out.append((save_id, tuple(int(b) for b in logical_ids[first:full])))
        return out

    def finish(self, finished_loads: set[int], invalid_block_ids: set[int], completed_saves: set[int]):
        """Worker progress -> ``(load results as (request_id, success), save ids done)`` for paging."""
        results = []
        with self._lock:
            for request_id in sorted(finished_loads):
                load = self._inflight_loads.pop(request_id, None)
                if load is None:
                    continue
                failed = not invalid_block_ids.isdisjoint(load.block_ids)
                if failed:
                    self._failed.add(request_id)
                    self._next_save[request_id] = load.first  # its recomputed blocks are saved again
                else:
                    self._next_save[request_id] = load.first + len(load.block_ids)
                results.append((request_id, not failed))
            done = {s for s in completed_saves if s in self._saves}
            for s in done:
                del self._saves[s]
        return tuple(results), frozenset(done)

    def request_finished(self, request_id: int) -> None:
        """Drop scheduler state of a finished request; pins of a load not yet started are returned here."""
        self._drop_lookup(request_id)
        with self._lock:
            load = self._pending_loads.pop(request_id, None)
            self._failed.discard(request_id)
            self._next_save.pop(request_id, None)
        if load is not None:
            self.hierarchy.index.unpin(load.nodes)

    def new_request(self, request_id: int) -> None:
        self.request_finished(request_id)

    def _drop_lookup(self, request_id: int) -> None:
        with self._lock:
            lk = self._lookups.pop(request_id, None)
        if lk is not None:
            self.hierarchy.index.unpin(lk.nodes)

    def drain(self) -> None:
        """Workers were drained: forget transfers whose completions will never come.

        Loads that started are unpinned when their copies end (``_load_done``); loads handed to a step that
        never started them, and loads not handed out yet, are unpinned here."""
        with self._lock:
            loads = list(self._pending_loads.values())
            loads += [load for load in self._inflight_loads.values() if not load.started]
            self._pending_loads.clear()
            self._inflight_loads.clear()
            self._saves.clear()
        for load in loads:
            self.hierarchy.index.unpin(load.nodes)

    # ------------------------------------------------------------------ Cake's split, across two requests

    def plan_split(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """For a prompt whose prefix sits on disk: ``(front_tokens, loaded_end_tokens)`` if the cost model says
        to recompute the front while the back loads, else None.

        Starts the back's disk -> DDR promotion at once and tells the next lookup of the front alone to
        recompute it. The caller then runs the front as its own request (LMDeploy computes it into its GPU
        prefix cache) and then the full prompt, whose lookup finds the back in DDR, or waits (lookup pending)
        for the promotion to end.
        """
        bs = self.block_size
        usable = (len(tokens) - 1) // bs
        rk = self.keyer.request(np.asarray(tokens[: usable * bs], dtype=np.int64))
        nodes = self._match(rk)
        if not nodes:
            return None
        plan = self.cost.plan([self._tier_name(n) for n in nodes], bs)
        if plan.choice != "both":
            return None
        s, k = plan.recompute_front, plan.load_end
        back = [n.payload for n in nodes[s:k] if Tier.DDR not in n.payload.copies]
        try:
            self.hierarchy.index.pin(nodes[s:k])
        except StaleNodeError:
            return None
        now = time.monotonic()
        with self._lock:
            for key in rk.keys[:s]:
                self._recompute_hints[key] = now + HINT_TTL_S
        future = self.io.submit(self._promote(back, nodes[s:k]))
        with self._lock:
            for node in nodes[s:k]:
                self._prefetching[node.key] = future
        future.add_done_callback(lambda _f, keys=[n.key for n in nodes[s:k]]: self._prefetch_done(keys))
        return s * bs, k * bs

    async def _promote(self, residencies: list[Residency], pinned: list[BlockNode]) -> None:
        try:
            if residencies:
                await self.migrator.migrate(MigrationPlan(Tier.DISK, Tier.DDR, residencies))
        finally:
            self.hierarchy.index.unpin(pinned)

    def _prefetch_done(self, keys: list[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._prefetching.pop(key, None)

    def _prefetch_pending(self, nodes: Sequence[BlockNode]) -> bool:
        with self._lock:
            return bool(self._prefetching) and any(n.key in self._prefetching for n in nodes)

    def _consume_hint(self, rk: RequestKeys) -> bool:
        if not rk.keys:
            return False
        now = time.monotonic()
        with self._lock:
            if not self._recompute_hints:
                return False
            for key in [k for k, deadline in self._recompute_hints.items() if deadline < now]:
                del self._recompute_hints[key]
            if rk.keys[-1] not in self._recompute_hints:
                return False
            for key in rk.keys:
                self._recompute_hints.pop(key, None)
        return True

    # ================================================================== worker role

    def register(self, rows: Sequence[torch.Tensor], num_blocks: int) -> None:
        """The engine's cache rows (in layer order) become engine-owned cells for kvtier's copies."""
        layout = self.layout
        flat = []
        for i, row in enumerate(rows):
            if not row.is_cuda or not row.is_contiguous():
                raise ValueError(f"cache row {i} must be a contiguous CUDA tensor")
            nbytes = row.numel() * row.element_size()
            if nbytes % num_blocks:
                raise ValueError(f"cache row {i} ({nbytes} bytes) does not split into {num_blocks} blocks")
            flat.append(row.view(torch.uint8).view(num_blocks, nbytes // num_blocks))
        widths = sorted({r.shape[1] for r in flat})
        if len(flat) != layout.num_layers or widths != [layout.layer_block_bytes]:
            raise ValueError(
                f"unsupported LMDeploy cache layout: kvtier expects {layout.num_layers} rows (one per layer) of "
                f"{layout.layer_block_bytes} bytes per block ({self.dtype}, quant_policy {self.format.quant_policy}); "
                f"the engine registered {len(flat)} rows of {widths} bytes per block"
            )
        self.hbm = HBMPool(layout, num_blocks, device=flat[0].device, rows=flat)
        self.migrator.attach_engine_pool(self.hbm)

    def start_loads(self, request_ids: Sequence[int], ready: torch.cuda.Event) -> None:
        """Start the loads bound to these requests; ``ready`` was recorded on the compute stream.

        Blocks all in DDR are queued onto kvtier's copy streams right here, on the engine's thread; a load
        that needs the disk first goes to kvtier's loop. Either way :meth:`poll` finds it done by its events.
        """
        for request_id in request_ids:
            with self._lock:
                load = self._inflight_loads.get(request_id)
            if load is None:
                continue
            load.started = time.perf_counter()
            residencies = [n.payload for n in load.nodes]
            if all(Tier.DDR in r.copies for r in residencies):
                try:
                    event = self._copy_in(load, 0, residencies, ready)
                except Exception:
                    log.warning("kvtier load for request %d failed to start", load.request_id, exc_info=True)
                    self._load_done(load, 0, 0)
                    continue
                with self._lock:
                    self._copying.append((event, load, len(residencies), 0))
            else:
                self._spawn(self._load_from_disk(load, residencies, ready))

    def _copy_in(self, load: _Load, lo: int, residencies: Sequence[Residency], ready: torch.cuda.Event):
        assert self.hbm is not None
        cells = self.hbm.engine_cells(load.block_ids[lo : lo + len(residencies)])
        return self.migrator.copy_engine_cells(False, cells, [r.copies[Tier.DDR] for r in residencies], after=ready)

    async def _load_from_disk(self, load: _Load, residencies: list[Residency], ready: torch.cuda.Event) -> None:
        """Disk -> DDR (verified) in chunks whose reads are all issued at once, so the drive's queue never drains
        between chunks; each chunk is queued up to the engine's cells as soon as it is in DDR, in order. A block
        that fails ends the load there (the rest is reported invalid: LMDeploy recomputes)."""
        ok = from_disk = 0
        event = None
        per = max(1, LOAD_CHUNK_BYTES // self.layout.block_bytes)
        starts = range(0, len(residencies), per)
        reads = [asyncio.ensure_future(self._read_up(residencies[lo : lo + per])) for lo in starts]
        failed = False
        try:
            for lo, read in zip(starts, reads, strict=True):
                chunk = residencies[lo : lo + per]
                from_disk += await read
                good = 0
                for r in chunk:
                    if Tier.DDR not in r.copies:
                        break
                    good += 1
                if good:
                    event = self._copy_in(load, lo, chunk[:good], ready)
                ok = lo + good
                if good < len(chunk):
                    break
        except Exception:
            log.warning("kvtier load for request %d failed; LMDeploy recomputes it", load.request_id, exc_info=True)
            failed = True
        # Reads past a failed block still end before the load is reported: nothing of it runs behind it.
        await asyncio.gather(*reads, return_exceptions=True)
        if failed:
            if event is not None:
                await wait_event(event)  # never report while a copy into the engine's cells may still run
            self._load_done(load, 0, from_disk)
            return
        if event is None:
            self._load_done(load, 0, from_disk)
            return
        with self._lock:
            self._copying.append((event, load, ok, from_disk))

    async def _read_up(self, chunk: list[Residency]) -> int:
        """The chunk's disk-only blocks up to DDR (verified); returns how many came up."""
        up = [r for r in chunk if Tier.DDR not in r.copies]
        if not up:
            return 0
        result = await self.migrator.migrate(MigrationPlan(Tier.DISK, Tier.DDR, up))
        self.stats.load_misses += len(result.missed)
        return len(result.moved)

    def _load_done(self, load: _Load, ok: int, from_disk: int) -> None:
        """The load's copies have ended: release its pins, learn from it, report it."""
        self.hierarchy.index.unpin(load.nodes)
        seconds = time.perf_counter() - load.started
        if ok:
            self.cost.observe_transfer("disk" if from_disk else "ddr", ok * self.layout.block_bytes, seconds)
            self.stats.loaded_blocks["disk"] += from_disk
            self.stats.loaded_blocks["ddr"] += ok - from_disk
            self.stats.load_seconds.append(seconds)
            if Tier.DISK in self.hierarchy.pools:
                self._write_down_used([n.payload for n in load.nodes[:ok]])
        if ok < len(load.block_ids):
            self.stats.failed_loads += 1
            log.warning("kvtier loaded %d of %d blocks for request %d", ok, len(load.block_ids), load.request_id)
        with self._lock:
            self._done_loads[load.request_id] = load.block_ids[ok:]

    def start_saves(self, save_ids: Sequence[int], ready: torch.cuda.Event) -> None:
        """Queue the engine cells -> DDR copies of these saves behind ``ready`` (recorded on the compute stream
        after the forward that wrote them); :meth:`poll` publishes them once their events have completed."""
        assert self.hbm is not None
        for save_id in save_ids:
            with self._lock:
                save = self._saves.get(save_id)
            if save is None:
                continue
            n = len(save.block_ids)
            try:
                slots = self.hierarchy.allocate(Tier.DDR, [self.layout.block_bytes] * n, "")
            except (PoolFullError, QuotaExceededError) as e:
                log.info("kvtier: not caching %d blocks: %s", n, e)
                with self._lock:
                    self._done_saves.add(save_id)
                continue
            try:
                event = self.migrator.copy_engine_cells(True, self.hbm.engine_cells(save.block_ids), slots, after=ready)
            except Exception:
                log.warning("kvtier save %d failed to start", save_id, exc_info=True)
                self._free(slots)
                with self._lock:
                    self._done_saves.add(save_id)
                continue
            with self._lock:
                self._saving.append((event, save, slots))

    def poll(self) -> tuple[dict[int, tuple[int, ...]], set[int]]:
        """Completions since the last poll: ``({request_id: invalid block ids}, {save ids})``.

        Called by the engine every step while transfers are in flight: copies whose events have completed are
        finished here (loads reported, saves published), without waiting on anything."""
        self._reap()
        with self._lock:
            loads, self._done_loads = self._done_loads, {}
            saves, self._done_saves = self._done_saves, set()
        return loads, saves

    def _reap(self) -> None:
        """Finish the copies whose events have completed (each exactly once, whichever thread gets it)."""
        with self._lock:
            copying = [c for c in self._copying if c[0].query()]
            saving = [c for c in self._saving if c[0].query()]
            self._copying = [c for c in self._copying if c not in copying]
            self._saving = [c for c in self._saving if c not in saving]
        for _, load, ok, from_disk in copying:
            self._load_done(load, ok, from_disk)
        for _, save, slots in saving:
            self._publish(save, slots)

    def _publish(self, save: _Save, slots: list[Slot]) -> None:
        """A save's bytes are in DDR: index them, report the save, write down per policy."""
        try:
            nodes = self.hierarchy.insert(save.rk, save.first, Tier.DDR, slots, tenant="", ready=True)
            self.stats.saved_blocks += len(slots)
        except ValueError:  # the chain's parent was evicted meanwhile: nothing to hang these on
            self._free(slots)
            nodes = []
        with self._lock:
            self._done_saves.add(save.save_id)
        if Tier.DISK in self.hierarchy.pools and nodes:
            now = time.monotonic()
            due = [
                node.payload
                for node in nodes
                if self.policy.on_store(BlockInfo(None, node.payload.nbytes, node.depth, 0.0, now, now)).write
            ]
            if due:
                self._spawn(self._write_down(due))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        future = self.io.submit(coro)
        with self._lock:
            self._background.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("kvtier transfer failed", exc_info=future.exception())

    def _write_down_used(self, residencies: Sequence[Residency]) -> None:
        """Selective write-down: a block used again may now deserve a disk copy."""
        now = time.monotonic()
        due = []
        for r in residencies:
            node = r.node
            if node is None or Tier.DISK in r.copies or Tier.DDR not in r.copies:
                continue
            info = BlockInfo(None, r.nbytes, node.depth, 0.0, now, now, accesses=node.hits + 1)
            if self.policy.on_access(info, in_next_tier=False).write:
                due.append(r)
        if due:
            self._spawn(self._write_down(due))

    async def _write_down(self, residencies: Sequence[Residency]) -> None:
        result = await self.migrator.migrate(MigrationPlan(Tier.DDR, Tier.DISK, list(residencies)))
        self.stats.disk_writes += len(result.moved)
        log.info("kvtier: %d blocks written to disk", len(result.moved))

    def _free(self, slots: Sequence[Slot]) -> None:
        for slot in slots:
            self.hierarchy.free_slot(slot, "")

    # ================================================================== control

    def wait_idle(self, timeout: float = 600.0) -> None:
        """Block until every transfer started so far has ended (benchmarks, shutdown).

        Finished copies are reaped here too: an idle engine stops polling, and their write-downs still have to
        start. Their reports wait for the engine's next :meth:`poll`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = list(self._background) + list(self._prefetching.values())
                copies = [c[0] for c in self._copying] + [c[0] for c in self._saving]
            for event in copies:
                event.synchronize()
            self._reap()
            if not pending and not copies:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"kvtier transfers still running after {timeout:.0f} s")
            for f in pending:
                f.result(timeout=max(0.0, deadline - time.monotonic()))

    def saves_in_flight(self) -> int:
        """Saves whose completion LMDeploy has not taken yet (it still leases their blocks)."""
        with self._lock:
            return len(self._saves)

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
        return {
            "lookups": s.lookups,
            "hits": s.hits,
            "planned_recompute": s.planned_recompute,
            "loaded_blocks": dict(s.loaded_blocks),
            "load_misses": s.load_misses,
            "failed_loads": s.failed_loads,
            "saved_blocks": s.saved_blocks,
            "skipped_saves": s.skipped_saves,
            "disk_writes": s.disk_writes,
            "blocks": {t.name.lower(): len(self.hierarchy.blocks_in(t)) for t in self.hierarchy.pools},
            "migrations": self.migrator.direction_stats(),
            "cost_model": {
                "prefill_tflops": self.cost.prefill_flops_per_s / 1e12,
                "links": {k: [v.bandwidth_gbps, v.latency_ms] for k, v in self.cost.tiers.items()},
            },
        }

    def close(self) -> None:
        """Wait for transfers, close the disk tier and the loop thread."""
        try:
            self.wait_idle(timeout=120)
        finally:
            disk = self.hierarchy.pools.get(Tier.DISK)
            if disk is not None:
                self.io.run(disk.reap())
                self.io.run(disk.store.close())
            self.io.stop()
            with self._instances_lock:
                for key, store in list(self._instances.items()):
                    if store is self:
                        del self._instances[key]
