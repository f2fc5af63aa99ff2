"""The request scheduler: lookup, plan, prefetch, compute, write-back, for one engine.

For each request:

1. **Lookup and lease.** The prompt's keys are matched against the index (blocks recovered from disk after a
   restart are linked here) and every matched block is pinned for the request's lifetime, so nothing it may
   load is evicted under it.
2. **Plan.** The cost–benefit model sees which tier holds each matched block and picks how many leading
   blocks to load, and where a slow tier holds them, how many front blocks to recompute *while* the back
   streams in (``both``). At least the last prompt token is always computed: its logits start decoding.
3. **Prefetch.** Loads start at once as tasks (disk -> DDR through the migrator, which verifies every block;
   DDR -> engine), bounded by the load budget, and overlap the front's compute and other requests' compute.
4. **Compute.** The engine's compute is one stream; contexts take turns on it round-robin (``FairTurn``), per
   prefill and per decode step, so no session starves. A block that failed to load (corrupt, missing, I/O
   error) and everything after it is recomputed: the answer is the same, only slower.
5. **Write-back.** After prefill, the prompt's new full blocks are copied to DDR and published off the
   critical path; disk writes follow the migration policy (write-through, write-back on demotion, or
   selective) and always yield to loads: a save waits while loads are in flight.

Whatever happens to a request (success, error, cancellation), its leases are returned.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_io.cuda import CopyStream, wait_event
from kv_pipeline.flow import ByteBudget, FairTurn
from kv_policy import BlockInfo, CostBenefitModel, LoadPlan, MigrationPolicy
from kv_runtime import HierarchyManager, KVMigrator, MigrationPlan, Residency, Tier
from kv_runtime.backends.hf_backend import HFModel
from kv_runtime.pool import DDRPool, PoolFullError
from kv_runtime.quota import QuotaExceededError
from prefix_reuse import BlockKeyer, BlockNode, PinnedError, RequestKeys, StaleNodeError

log = logging.getLogger(__name__)

TIER_NAMES = {Tier.HBM: "hbm", Tier.DDR: "ddr", Tier.DISK: "disk"}


@dataclass(slots=True)
class RequestMetrics:
    """What one request cost and where its prefix came from."""

    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    queue_ms: float = 0.0
    load_ms: float = 0.0
    compute_ms: float = 0.0
    plan: str = "recompute"
    matched_tokens: int = 0
    reused_tokens: dict[str, int] = field(default_factory=dict)
    computed_tokens: int = 0
    bytes_loaded: int = 0
    load_misses: int = 0
    output_tokens: int = 0
    decode_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Request:
    tokens: list[int]
    max_new_tokens: int
    context: Hashable
    tenant: str = ""
    temperature: float = 0.0
    seed: int | None = None
    stop_token: int | None = None
    keep_logits: bool = False  # keep the prompt's last logits in ``logits`` (correctness checks)
    logits: torch.Tensor | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


class Scheduler:
    """Runs requests against one engine and one tier hierarchy."""

    def __init__(
        self,
        model: HFModel,
        keyer: BlockKeyer,
        hierarchy: HierarchyManager,
        migrator: KVMigrator,
        cost: CostBenefitModel,
        migration_policy: MigrationPolicy,
        *,
        max_inflight_bytes: int,
        on_request_done: Callable[[RequestMetrics], None] | None = None,
    ) -> None:
        self.model = model
        self.keyer = keyer
        self.hierarchy = hierarchy
        self.migrator = migrator
        self.cost = cost
        self.policy = migration_policy
        self.loads = ByteBudget(max_inflight_bytes)
        self.saves = ByteBudget(max_inflight_bytes)
        self.turn = FairTurn()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-compute")
        self._background: set[asyncio.Task] = set()
        self._loads_idle = asyncio.Event()
        self._loads_idle.set()
        self._loads_running = 0
        self._on_done = on_request_done
        self.block_size = keyer.block_size
        # On GPU, loads into the engine and write-back out of it run on their own streams, ordered by events.
        self._cuda = model.device.type == "cuda"
        self._load_stream = CopyStream(model.device) if self._cuda else None
        self._save_stream = CopyStream(model.device) if self._cuda else None

    # ------------------------------------------------------------------ lifecycle

    async def drain(self) -> None:
        """Wait for every write-back still running."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        self._compute.shutdown(wait=True)

    async def _run_compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    # ------------------------------------------------------------------ one request

    async def generate(self, req: Request) -> AsyncIterator[int]:
        """Stream the request's new tokens; ``req.metrics`` is complete when the iterator ends."""
        if not req.tokens:
            raise ValueError("a request needs at least one prompt token")
        t0 = time.perf_counter()
        m = req.metrics
        m.prompt_tokens = len(req.tokens)
        rk = self.keyer.request(req.tokens)
        nodes = self._lookup_and_lease(rk, req.tenant)
        try:
            plan = self._plan(nodes, len(req.tokens))
            m.plan = plan.choice
            m.matched_tokens = len(nodes) * self.block_size
            load_nodes = nodes[plan.recompute_front : plan.load_end]
            load_task = asyncio.create_task(self._load(load_nodes, m)) if load_nodes else None
            generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
            try:
                cache, logits = await self._prefill(req, plan, load_task, t0)
            except BaseException:
                if load_task is not None:
                    load_task.cancel()
                    await asyncio.gather(load_task, return_exceptions=True)
                raise
            computed = await self._run_compute(self._record_event) if self._cuda else None
            self._spawn(self._write_back(rk, cache, req.tenant, computed))
            if req.keep_logits:
                req.logits = logits
            token = self._sample(logits, req.temperature, generator)
            m.ttft_ms = (time.perf_counter() - t0) * 1e3
            yield token
            m.output_tokens = 1
            t_dec = time.perf_counter()
            while m.output_tokens < req.max_new_tokens and token != req.stop_token:
                async with self.turn.turn(req.context):
                    logits = await self._run_compute(self.model.decode, token, cache)
                token = self._sample(logits, req.temperature, generator)
                m.output_tokens += 1
                yield token
            m.decode_ms = (time.perf_counter() - t_dec) * 1e3
        finally:
            self._unlease(nodes)
            if self._on_done is not None:
                self._on_done(m)

    @staticmethod
    def _record_event() -> torch.cuda.Event:
        """An event on the compute thread's current stream: the prefill's kernels are queued before it."""
        event = torch.cuda.Event()
        event.record()
        return event

    def _lookup_and_lease(self, rk: RequestKeys, tenant: str) -> list[BlockNode]:
        for _ in range(3):
            nodes = self.hierarchy.match(rk, tenant=tenant)
            # NOTE: a block whose only copy proved unreadable while leased stays in the index without copies
            # until its last lease goes (see _unlease): it is not a hit, and neither is anything after it.
            nodes = list(itertools.takewhile(lambda node: node.payload.copies, nodes))
            try:
                self.hierarchy.index.pin(nodes)
                return nodes
            except StaleNodeError:  # evicted between match and pin: look again
                continue
        return []

    def _unlease(self, nodes: Sequence[BlockNode]) -> None:
        if not nodes:
            return
        self.hierarchy.index.unpin(nodes)
        for node in nodes:  # drop blocks left without a copy by a miss, so that they can be cached again
            if not node.payload.copies and not node.payload.dropped and not node.pin_count:
                try:
                    self.hierarchy.drop(node)
                except PinnedError:  # something below is still leased: its lease's end drops it
                    continue

    def _plan(self, nodes: Sequence[BlockNode], num_tokens: int) -> LoadPlan:
        # The last prompt token is always computed: its logits are the first output.
        usable = min(len(nodes), (num_tokens - 1) // self.block_size)
        tiers = [TIER_NAMES[node.payload.fastest] for node in nodes[:usable]]
        return self.cost.plan(tiers, self.block_size)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    async def _prefill(
        self, req: Request, plan: LoadPlan, load_task: asyncio.Task | None, t0: float
    ) -> tuple[Any, torch.Tensor]:
        """Front recompute, then the loaded blocks, then the rest of the prompt; returns cache and last logits."""
        m, bs = req.metrics, self.block_size
        tokens = torch.tensor(req.tokens, dtype=torch.long)
        front = plan.recompute_front * bs
        cache = self.model.new_cache()
        compute_s = 0.0
        async with self.turn.turn(req.context):
            m.queue_ms = (time.perf_counter() - t0) * 1e3
            if front:
                start = time.perf_counter()
                await self._run_compute(self.model.prefill, tokens[:front], cache)
                compute_s += time.perf_counter() - start
                self.cost.observe_prefill(0, front, time.perf_counter() - start)
        loaded = 0
        if load_task is not None:
            try:
                blocks = await load_task
            except Exception:  # a failed load (I/O error, no room in DDR, ...) is recomputed, never fatal
                log.warning(
                    "loading %d blocks failed; recomputing them", plan.load_end - plan.recompute_front, exc_info=True
                )
                blocks = None
            loaded = 0 if blocks is None else blocks.shape[0]
            if loaded:
                cache = await self._run_compute(self.model.cache_from_blocks, blocks, cache)
        done = front + loaded * bs
        async with self.turn.turn(req.context):
            start = time.perf_counter()
            logits = await self._run_compute(self.model.prefill, tokens[done:], cache)
            compute_s += time.perf_counter() - start
            self.cost.observe_prefill(done, len(req.tokens), time.perf_counter() - start)
        m.compute_ms = compute_s * 1e3
        m.computed_tokens = len(req.tokens) - loaded * bs
        return cache, logits

    # ------------------------------------------------------------------ loads

    async def _load(self, nodes: Sequence[BlockNode], m: RequestMetrics) -> torch.Tensor:
        """The bytes of the longest loadable run of ``nodes``, in order, as ``[n, block_bytes]`` host uint8.

        Disk-only blocks are first promoted to DDR through the migrator, which verifies each one; a block
        that fails is discarded (a miss) and ends the run: everything after it is recomputed.
        """
        residencies: list[Residency] = [n.payload for n in nodes]
        nbytes = sum(r.nbytes for r in residencies)
        self._loads_running += 1
        self._loads_idle.clear()
        start = time.perf_counter()
        try:
            async with self.loads.hold(nbytes):
                on_disk = [r for r in residencies if Tier.DDR not in r.copies and Tier.DISK in r.copies]
                if on_disk:
                    result = await self.migrator.migrate(MigrationPlan(Tier.DISK, Tier.DDR, on_disk))
                    m.load_misses += len(result.missed)
                usable: list[Residency] = []
                for r in residencies:
                    if Tier.DDR not in r.copies:
                        break
                    usable.append(r)
                out = await self._from_ddr(usable)
        finally:
            self._loads_running -= 1
            if not self._loads_running:
                self._loads_idle.set()
        seconds = time.perf_counter() - start
        m.load_ms = seconds * 1e3
        m.bytes_loaded = int(out.numel())
        from_disk = {id(r) for r in on_disk}
        for r in usable:
            tier = "disk" if id(r) in from_disk else "ddr"
            m.reused_tokens[tier] = m.reused_tokens.get(tier, 0) + self.block_size
        if usable:
            self.cost.observe_transfer("disk" if on_disk else "ddr", out.numel(), seconds)
        if len(usable) < len(residencies):
            log.warning("loaded %d of %d planned blocks; recomputing the rest", len(usable), len(residencies))
        self._after_use(usable)
        return out

    async def _from_ddr(self, residencies: Sequence[Residency]) -> torch.Tensor:
        """Blocks' DDR copies gathered for the engine: on GPU straight from the pinned slots into device
        memory on the load stream (the host waits on its event, the device never stalls); on CPU a copy."""
        pool = self.hierarchy.pool(Tier.DDR)
        assert isinstance(pool, DDRPool)
        out = torch.empty(
            (len(residencies), self.model.layout.block_bytes), dtype=torch.uint8, device=self.model.device
        )
        if self._load_stream is None:
            for i, r in enumerate(residencies):
                out[i].copy_(pool.view(r.copies[Tier.DDR]))
            return out
        with self._load_stream.use():
            for i, r in enumerate(residencies):
                out[i].copy_(pool.view(r.copies[Tier.DDR]), non_blocking=True)
            done = self._load_stream.record()
        await wait_event(done)
        return out

    def _after_use(self, residencies: Sequence[Residency]) -> None:
        """Selective write-down: a block used again may now deserve a disk copy."""
        if Tier.DISK not in self.hierarchy.pools:
            return
        due = [
            r
            for r in residencies
            if r.node is not None
            and Tier.DISK not in r.copies
            and self.policy.on_access(self._info(r), in_next_tier=False).write
        ]
        if due:
            self._spawn(self._write_down(due))

    # ------------------------------------------------------------------ write-back

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    async def _write_back(self, rk: RequestKeys, cache: Any, tenant: str, computed: Any = None) -> None:
        """Copy the prompt's new full blocks into DDR slots and publish them; then write down per policy.

        On GPU the blocks are gathered on the save stream after ``computed`` (an event recorded on the compute
        stream after the prefill that wrote them), then copied into the pinned slots on the same stream; they
        are published only once that stream's event has completed.
        """
        first = len(self.hierarchy.index.match(rk))
        count = rk.num_blocks - first
        if count <= 0:
            return
        block_bytes = self.model.layout.block_bytes
        # NOTE: demotions take their own share of the save budget; making room while holding this request's
        # share would deadlock whenever the two together exceed the budget.
        await self._make_room(Tier.DDR, count * block_bytes, tenant)
        async with self.saves.hold(count * block_bytes):
            try:
                slots = self.hierarchy.allocate(Tier.DDR, [block_bytes] * count, tenant)
            except (PoolFullError, QuotaExceededError) as e:
                log.info("not caching %d blocks: %s", count, e)
                return
            try:
                await self._to_ddr(cache, first, slots, computed)
                nodes = self.hierarchy.insert(rk, first, Tier.DDR, slots, tenant=tenant, ready=True)
            except ValueError:  # the chain's parent was evicted meanwhile: nothing to hang these on
                self._free(slots, tenant)
                return
            except BaseException:
                self._free(slots, tenant)
                raise
        if Tier.DISK in self.hierarchy.pools:
            due = [n.payload for n in nodes if self.policy.on_store(self._info(n.payload)).write]
            if due:
                await self._write_down(due)

    async def _to_ddr(self, cache: Any, first: int, slots: Sequence[Any], computed: Any) -> None:
        pool = self.hierarchy.pool(Tier.DDR)
        assert isinstance(pool, DDRPool)
        if self._save_stream is None:
            blocks = await asyncio.to_thread(self.model.blocks_from_cache, cache, first, len(slots))
            for slot, row in zip(slots, blocks, strict=True):
                pool.view(slot).copy_(row)
            return
        stream = self._save_stream.stream
        with self._save_stream.use():
            self._save_stream.wait(computed)
            # NOTE: decoding replaces the cache's tensors (it concatenates); marking the ones read here as used
            # by this stream keeps the allocator from recycling them before the gather has run.
            for layer in cache.layers:
                layer.keys.record_stream(stream)
                layer.values.record_stream(stream)
            blocks = self.model.blocks_from_cache(cache, first, len(slots))
            for slot, row in zip(slots, blocks, strict=True):
                pool.view(slot).copy_(row, non_blocking=True)
            blocks.record_stream(stream)
            done = self._save_stream.record()
        await wait_event(done)

    def _free(self, slots: Sequence[Any], tenant: str) -> None:
        for slot in slots:
            self.hierarchy.free_slot(slot, tenant)

    async def persist(self, residencies: Sequence[Residency]) -> None:
        """Make sure these blocks have a disk copy (named shared contexts must survive restarts).

        Raises ``OSError`` if any block could not be written, so a caller never believes it durable."""
        await self._write_down(residencies)
        missing = sum(Tier.DISK not in r.copies for r in residencies)
        if missing:
            raise OSError(f"{missing} of {len(residencies)} blocks could not be written to the disk tier")

    async def _write_down(self, residencies: Sequence[Residency], *, keep_source: bool = True) -> None:
        """DDR -> disk, after every load in flight: a save never delays a load a request waits for."""
        await self._loads_idle.wait()
        todo = [r for r in residencies if not r.dropped and Tier.DDR in r.copies and Tier.DISK not in r.copies]
        if todo:
            async with self.saves.hold(sum(r.nbytes for r in todo)):
                await self.migrator.migrate(MigrationPlan(Tier.DDR, Tier.DISK, todo, keep_source=keep_source))

    async def _make_room(self, tier: Tier, nbytes: int, tenant: str) -> None:
        """Demote least recently used DDR blocks that the policy wants kept (write-back) before the
        hierarchy's own eviction drops what is left to drop."""
        pool = self.hierarchy.pool(tier)
        if tier is not Tier.DDR or Tier.DISK not in self.hierarchy.pools or pool.free_bytes >= nbytes:
            return
        victims, freed = [], 0
        for r in self.hierarchy.blocks_in(Tier.DDR):
            if freed >= nbytes - pool.free_bytes:
                break
            node = r.node
            if node is None or node.pin_count or r.in_flight or Tier.DISK in r.copies:
                continue
            if self.policy.on_evict(r.key, self._info(r), in_next_tier=False).action == "demote":
                victims.append(r)
                freed += r.nbytes
        if victims:
            await self._write_down(victims, keep_source=False)

    def _info(self, r: Residency) -> BlockInfo:
        node = r.node
        now = time.monotonic()
        if node is None:
            return BlockInfo(None, r.nbytes, 0, 0.0, now, now)
        return BlockInfo(
            parent=node.parent.key if node.parent is not None else None,
            size_bytes=r.nbytes,
            depth=node.depth,
            saved_flops=self.cost.shape.prefill_flops(node.depth * self.block_size, (node.depth + 1) * self.block_size),
            inserted_at=node.last_access,
            last_access=node.last_access,
            accesses=node.hits + 1,
            pins=node.pin_count,
            children=node.num_children,
            context=r.tenant,
        )


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background write-back failed", exc_info=task.exception())
