"""The async Python API: one engine object over a model and its KV tiers.

    async with KVTierEngine.from_pretrained("path/to/model", ddr_bytes="2GiB") as engine:
        await engine.save_shared_context("manual", open("manual.txt").read(), pin=True)
        async for out in engine.generate("How do I reset it?", shared_context_id="manual", max_new_tokens=64):
            print(out.text, end="")
        print(out.metrics.ttft_ms, out.metrics.reused_tokens)

``generate`` streams :class:`GenerationOutput` records, the last one carrying the request's metrics, as
LMDeploy's and vLLM's async engines stream theirs. Shared contexts are computed once, pinned if asked, and
reused by name without resending or re-prefilling them; with a disk tier they survive restarts.

Every method checks its inputs first (``kv_pipeline.requests``): a request the engine cannot serve as given
raises :class:`~kv_pipeline.requests.RequestError` before anything runs; a shared context that cannot be kept
raises :class:`~kv_pipeline.requests.ContextStoreError` and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kv_pipeline.config import KVTierConfig
from kv_pipeline.metrics import PipelineMetrics
from kv_pipeline.requests import (
    RequestLimits,
    RequestValidator,
)
from kv_pipeline.scheduler import Request, RequestMetrics, Scheduler
from kv_pipeline.shared_contexts import SharedContextAPI, SharedContexts
from kv_policy import CostBenefitModel, ModelShape
from kv_runtime import HierarchyManager, KVMigrator
from kv_runtime.backends.hf_backend import HFModel
from kv_runtime.layout import LAYOUT_VERSION
from kv_runtime.model_identity import model_identity
from kv_runtime.service import TierService
from prefix_reuse import BlockKeyer, KeyNamespace

Prompt = str | Sequence[int] | Sequence[dict]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    """One streamed token; ``metrics`` is set on the last one."""

    token_id: int
    text: str
    index: int
    finished: bool
    metrics: RequestMetrics | None = None


class KVTierEngine(SharedContextAPI):
    """A model with kvtier's KV tiers underneath. Use as ``async with``; one per model and cache directory."""

    def __new__(cls, config: KVTierConfig, **engine_options: Any):
        """``engine="lmdeploy"`` gives LMDeploy's engine with kvtier as its KV store (same async API)."""
        if cls is KVTierEngine and config.engine == "lmdeploy":
            from kv_pipeline.lmdeploy_engine import LMDeployKVTierEngine

            return LMDeployKVTierEngine(config, **engine_options)
        return super().__new__(cls)

    def __init__(self, config: KVTierConfig, **engine_options: Any) -> None:
        if not config.model:
            raise ValueError("KVTierConfig.model must name a model directory")
        if engine_options:
            raise ValueError(f"engine options {sorted(engine_options)} apply to engine='lmdeploy' only")
        self.config = config
        self.metrics = PipelineMetrics()
        self._started = False

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        config: KVTierConfig | None = None,
        *,
        engine_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> KVTierEngine:
        """From a model directory; ``overrides`` are configuration keys (e.g. ``ddr_bytes="2GiB"``),
        ``engine_options`` further LMDeploy engine settings when ``engine="lmdeploy"``."""
        if config is None:
            config = KVTierConfig.load(model=str(model), **overrides)
        else:
            config = config.replace(model=str(model), **overrides)
        return cls(config, **(engine_options or {}))

    async def __aenter__(self) -> KVTierEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config.check_engine("hf")
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = await asyncio.to_thread(
            HFModel, cfg.model, device=device, dtype=cfg.dtype, block_size=cfg.block_size
        )
        layout = self.model.layout
        self.namespace = KeyNamespace(
            model_id=model_identity(cfg),
            kv_dtype=str(layout.dtype).removeprefix("torch."),
            block_size=cfg.block_size,
            quant_policy="none",
            layout_version=LAYOUT_VERSION,
            cache_salt=cfg.cache_salt,
        )
        self.keyer = BlockKeyer(self.namespace)
        self.service = await TierService.open(
            cfg,
            layout,
            self.keyer,
            self.model.config,
            device=self.model.device,
            calibrate_prefill=self._calibrate_prefill_tflops,
        )
        self.validator = RequestValidator(RequestLimits.from_config(self.model.config), self.model.encode)
        self.scheduler = Scheduler(self.model, self.service, prefill_chunk_tokens=cfg.prefill_chunk_tokens)
        try:
            self.shared_contexts = SharedContexts.open(
                self.service,
                self.validator,
                cfg.cache_dir,
                self.namespace.digest,
                self._compute_context,
                self.on_service,
            )
        except BaseException:
            await self.scheduler.close()
            await self.service.close()
            raise
        self.metrics.registry_damaged(len(self.shared_contexts.moved_aside))
        self._started = True

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    async def on_service(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await a coroutine of the tier service (it runs on this engine's loop)."""
        return await coro

    @property
    def hierarchy(self) -> HierarchyManager:
        return self.service.hierarchy

    @property
    def migrator(self) -> KVMigrator:
        return self.service.migrator

    @property
    def cost(self) -> CostBenefitModel:
        return self.service.cost

    def _calibrate_prefill_tflops(self) -> float:
        """Measure this machine's prefill throughput once (the model learns it online after that)."""
        n = 4 * self.config.block_size
        ids = torch.randint(0, self.model.config.vocab_size, (n,))
        self.model.prefill(ids[: self.config.block_size], self.model.new_cache())  # warm-up
        start = time.perf_counter()
        self.model.prefill(ids, self.model.new_cache())
        seconds = time.perf_counter() - start
        return ModelShape.from_config(self.model.config).prefill_flops(0, n) / seconds / 1e12

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.scheduler.close()
        self.shared_contexts.close()
        await self.service.close()

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("the engine is not started: use `async with engine` or `await engine.start()`")

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 32,
        shared_context_id: str | None = None,
        session_id: str = "default",
        temperature: float = 0.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> AsyncIterator[GenerationOutput]:
        """Stream new tokens for ``prompt`` (text, chat messages or token ids), after a shared context if named.

        Raises :class:`RequestError` for inputs it refuses (see ``kv_pipeline.requests``), among them a prompt
        whose tokens (the shared context's included) plus ``max_new_tokens`` exceed the model's context length,
        and :class:`UnknownContextError` for a shared context that does not exist (or expired)."""
        self._require_started()
        req = self._request(
            prompt,
            max_new_tokens=max_new_tokens,
            shared_context_id=shared_context_id,
            session_id=session_id,
            temperature=temperature,
            seed=seed,
            ignore_eos=ignore_eos,
        )
        index = 0
        pending: int | None = None
        # NOTE: closing the scheduler's stream here, not when it is garbage-collected, returns the request's
        # leases as soon as the caller closes or cancels this stream.
        async with contextlib.aclosing(self.scheduler.generate(req)) as tokens_out:
            async for token in tokens_out:
                if pending is not None:
                    yield GenerationOutput(pending, self.model.tokenizer.decode([pending]), index, False)
                    index += 1
                pending = token
        self.metrics.record(req.metrics, req.context)
        if pending is not None:
            text = self.model.tokenizer.decode([pending])
            yield GenerationOutput(pending, text, index, True, req.metrics)

    async def prefill(self, prompt: Prompt, *, session_id: str = "default") -> RequestMetrics:
        """Process a prompt and cache its blocks without streaming; returns the request's metrics."""
        self._require_started()
        return (await self._run(self._request(prompt, max_new_tokens=1, session_id=session_id))).metrics

    async def prompt_logits(
        self, prompt: Prompt, *, session_id: str = "default"
    ) -> tuple[torch.Tensor, RequestMetrics]:
        """The logits after the prompt's last token, computed through the cache (restored prefix + the rest)."""
        self._require_started()
        req = await self._run(self._request(prompt, max_new_tokens=1, session_id=session_id, keep_logits=True))
        assert req.logits is not None
        return req.logits, req.metrics

    def _request(
        self,
        prompt: Any,
        *,
        max_new_tokens: Any,
        session_id: Any,
        shared_context_id: Any = None,
        temperature: Any = 0.0,
        seed: Any = None,
        ignore_eos: Any = False,
        keep_logits: bool = False,
    ) -> Request:
        """A checked request: every argument validated (``RequestError``), the shared context's tokens first."""
        check = self.validator
        session = check.identifier(session_id, "session_id")
        max_new = check.max_new_tokens(max_new_tokens)
        temperature = check.temperature(temperature)
        seed = check.seed(seed)
        tokens = check.prompt(prompt)
        if shared_context_id is not None:
            tokens = list(self.shared_contexts.require(shared_context_id).tokens) + tokens
        check.fits(len(tokens), max_new)
        return Request(
            tokens=tokens,
            max_new_tokens=max_new,
            context=session,
            temperature=temperature,
            seed=seed,
            stop_token=None if check.flag(ignore_eos, "ignore_eos") else self.model.tokenizer.eos_token_id,
            keep_logits=keep_logits,
        )

    async def drain(self) -> None:
        """Wait until every write-back and transfer started so far has ended (their blocks are published)."""
        self._require_started()
        await self.scheduler.drain()

    async def _compute_context(self, tokens: list[int], label: str) -> None:
        """A shared context's prefill, returning once its blocks are published."""
        await self._run(Request(tokens=tokens, max_new_tokens=1, context=label))
        await self.drain()

    async def _run(self, req: Request) -> Request:
        """Run a request to its end without streaming; its metrics are recorded under its session."""
        async with contextlib.aclosing(self.scheduler.generate(req)) as tokens_out:
            async for _ in tokens_out:
                pass
        self.metrics.record(req.metrics, req.context)
        return req

    # ------------------------------------------------------------------ inspection

    def set_eviction_policy(self, tier: str, name: str) -> None:
        """Order ``tier``'s (``ddr``, ``disk``) victims by the named eviction policy (``kv_policy``'s
        ``EVICTION_POLICIES``) from now on, while serving: no request fails and no block is lost."""
        self._require_started()
        self.service.set_eviction_policy(tier, name)

    def metrics_snapshot(self) -> dict[str, Any]:
        """Requests, TTFT (overall and per session), prefix reuse, tiers and transfers, as plain data."""
        self._require_started()
        return {
            "pipeline": self.metrics.snapshot(),
            "index": asdict(self.hierarchy.index.stats()),
            "tiers": {t.name.lower(): asdict(p.stats()) for t, p in self.hierarchy.pools.items()},
            "transfers": self.migrator.direction_stats(),
            "cost_model": self.service.snapshot()["cost_model"],
        }
