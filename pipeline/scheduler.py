"""The request scheduler of the embedded engine: lookup, plan, load, compute, write-back, for one model.

The tier service (``kv_runtime.service``) owns the life of the blocks; this module owns what is the
engine's: the order of compute on its one stream, and the copies in and out of its cache. For each request:

1. **Lookup and lease.** ``TierService.lookup`` matches the prompt against the index and the cost model picks
   how many leading blocks to load, and where a slow tier holds them, how many front blocks to recompute
   *while* the back streams in (``both``). At least the last prompt token is always computed: its logits
   start decoding.
2. **Load.** ``TierService.load`` starts at once as a task and streams the blocks through DDR (disk-only
   ones promoted and verified in chunks that fit); each chunk is copied into a buffer on the model's device,
   overlapping the front's compute and other requests' compute.
3. **Compute.** The engine's compute is one stream; contexts take turns on it round-robin (``FairTurn``), per
   prefill chunk (``prefill_chunk_tokens``) and per decode step, so no session starves and no stream waits
   longer than one chunk behind a long prompt. A block that failed to load (corrupt, missing, I/O
   error) and everything after it is recomputed: the answer is the same, only slower.
4. **Write-back.** After prefill, the prompt's new full blocks are copied into DDR slots and published
   (``TierService.save``) off the critical path; disk writes follow the migration policy and yield to loads.

Whatever happens to a request (success, error, cancellation), its lease is returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_pipeline.flow import FairTurn
from kv_runtime.backend_protocol import completed
from kv_runtime.backends.hf_backend import HFModel
from kv_runtime.config import KVTierConfig
from kv_runtime.hierarchy import Residency
from kv_runtime.pool import Slot, Tier
from kv_runtime.service import Lease, LoadResult, TierService

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK: int = KVTierConfig.model_fields["prefill_chunk_tokens"].default


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
    """Runs requests against one engine and the tier service."""

    def __init__(
        self,
        model: HFModel,
        service: TierService,
        *,
        on_request_done: Callable[[RequestMetrics], None] | None = None,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        """``prefill_chunk_tokens``: tokens per prefill turn (``KVTierConfig.prefill_chunk_tokens``)."""
        if prefill_chunk_tokens <= 0:
            raise ValueError(f"prefill_chunk_tokens must be > 0, got {prefill_chunk_tokens}")
        self.model = model
        self.service = service
        self.block_size = service.block_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.turn = FairTurn()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-compute")
        self._on_done = on_request_done
        self._cuda = model.device.type == "cuda"
        # Loads into the engine and write-back out of it run on the model's copy streams, ordered by events.
        model.attach(service.hierarchy.pool(Tier.DDR))

    # ------------------------------------------------------------------ lifecycle

    async def drain(self) -> None:
        """Wait for every write-back still running."""
        await self.service.drain()

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
        rk = self.service.keyer.request(req.tokens)
        # The last prompt token is always computed: its logits are the first output.
        lease = self.service.lookup(rk, limit=(len(req.tokens) - 1) // self.block_size, tenant=req.tenant)
        try:
            m.plan = lease.choice
            m.matched_tokens = lease.plan.matched_blocks * self.block_size
            load_task = asyncio.create_task(self._load(lease, m)) if lease.load_blocks else None
            generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
            try:
                cache, logits = await self._prefill(req, lease, load_task, t0)
            except BaseException:
                if load_task is not None:
                    load_task.cancel()
                    await asyncio.gather(load_task, return_exceptions=True)
                raise
            computed = await self._run_compute(self._record_event) if self._cuda else None
            self.service.spawn(self._write_back(rk, cache, req.tenant, computed))
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
            self.service.release(lease)
            if self._on_done is not None:
                self._on_done(m)

    @staticmethod
    def _record_event() -> torch.cuda.Event:
        """An event on the compute thread's current stream: the prefill's kernels are queued before it."""
        event = torch.cuda.Event()
        event.record()
        return event

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(torch.argmax(logits))
        # NOTE: shifted by the maximum and in float64 first, so that any finite temperature, however small,
        # gives a distribution (logits / 1e-300 in float32 is inf - inf = NaN for softmax; shifted, the best
        # token's 0 stays 0 and the others go to -inf).
        shifted = logits.double() - logits.max().double()
        probs = torch.softmax(shifted / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    async def _prefill(
        self, req: Request, lease: Lease, load_task: asyncio.Task | None, t0: float | None
    ) -> tuple[Any, torch.Tensor]:
        """Front recompute, then the loaded blocks, then the rest of the prompt; returns cache and last logits."""
        m, bs = req.metrics, self.block_size
        tokens = torch.tensor(req.tokens, dtype=torch.long)
        front = lease.plan.recompute_front * bs
        cache = self.model.new_cache()
        compute_s = 0.0
        if front:
            compute_s += (await self._prefill_chunks(req, tokens, 0, front, cache, t0))[1]
            t0 = None  # the queue ended with the front's first turn
        loaded = 0
        if load_task is not None:
            blocks = await load_task
            loaded = blocks.shape[0]
            if loaded:
                cache = await self._run_compute(self.model.cache_from_blocks, blocks, cache)
        done = front + loaded * bs
        logits, seconds = await self._prefill_chunks(req, tokens, done, len(req.tokens), cache, t0)
        m.compute_ms = (compute_s + seconds) * 1e3
        m.computed_tokens = len(req.tokens) - loaded * bs
        return cache, logits

    async def _prefill_chunks(
        self, req: Request, tokens: torch.Tensor, start: int, end: int, cache: Any, t0: float | None
    ) -> tuple[torch.Tensor, float]:
        """Prefill ``tokens[start:end]`` into ``cache`` in chunks of ``prefill_chunk_tokens``, each its own
        compute turn; returns the last chunk's logits and the seconds computed. With ``t0`` (the request's
        start), the request's first turn ends its ``queue_ms``.

        NOTE: one turn per chunk, not per prefill, so that other contexts' decode steps run between the chunks:
        a stream then waits at most one chunk behind a long prompt, not its whole prefill. The model's prefill
        appends to the cache at its current length, so the chunks give the logits one prefill would. The cost
        model learns from every chunk (its prefill cost grows with the start position, which it accounts for).
        """
        cost = self.service.cost
        chunk = self.prefill_chunk_tokens
        seconds = 0.0
        logits: torch.Tensor | None = None
        for lo in range(start, end, chunk):
            hi = min(lo + chunk, end)
            async with self.turn.turn(req.context):
                if t0 is not None:
                    req.metrics.queue_ms = (time.perf_counter() - t0) * 1e3
                    t0 = None
                began = time.perf_counter()
                logits = await self._run_compute(self.model.prefill, tokens[lo:hi], cache)
                took = time.perf_counter() - began
            seconds += took
            cost.observe_prefill(lo, hi, took)
        assert logits is not None, "a prefill range is never empty"
        return logits, seconds

    # ------------------------------------------------------------------ loads

    async def _load(self, lease: Lease, m: RequestMetrics) -> torch.Tensor:
        """The bytes of the longest loadable run of the lease's load range, in order, as ``[n, block_bytes]`` on
        the model's device (the service streams them through DDR; a block that fails verification ends it)."""
        planned = len(lease.load_blocks)
        out = torch.empty((planned, self.model.layout.block_bytes), dtype=torch.uint8, device=self.model.device)

        async def sink(offset: int, blocks: Sequence[Residency]) -> None:
            slots = [r.copies[Tier.DDR] for r in blocks]
            await completed(self.model.copy_in(slots, out[offset : offset + len(blocks)]))

        result: LoadResult = await self.service.load(lease, sink)
        m.load_ms = result.seconds * 1e3
        m.bytes_loaded = result.nbytes
        m.load_misses += result.misses
        bs = self.block_size
        if result.from_disk:
            m.reused_tokens["disk"] = m.reused_tokens.get("disk", 0) + result.from_disk * bs
        if result.blocks > result.from_disk:
            m.reused_tokens["ddr"] = m.reused_tokens.get("ddr", 0) + (result.blocks - result.from_disk) * bs
        if result.blocks < planned:
            log.warning("loaded %d of %d planned blocks; recomputing the rest", result.blocks, planned)
        return out[: result.blocks]

    # ------------------------------------------------------------------ write-back

    async def _write_back(self, rk: Any, cache: Any, tenant: str, computed: Any = None) -> None:
        """The prompt's new full blocks into DDR slots, published; then written down per policy (the service)."""
        first = self.service.saved_prefix(rk)
        count = rk.num_blocks - first

        async def copy_out(slots: Sequence[Slot]) -> None:
            # On a CPU the copy itself runs here: off the event loop.
            await completed(await asyncio.to_thread(self.model.copy_out, (cache, first), slots, after=computed))

        await self.service.save(rk, first, count, self.model.layout.block_bytes, copy_out, tenant)
