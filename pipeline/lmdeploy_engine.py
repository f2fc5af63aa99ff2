"""``KVTierEngine`` with ``engine="lmdeploy"``: LMDeploy's PyTorch engine with kvtier installed as its KV store.

LMDeploy schedules, computes and keeps its own GPU prefix cache; kvtier's connector serves DDR and disk
under it (``kv_runtime.backends.lmdeploy_connector``). What this layer adds on top of LMDeploy's engine is
Cake's split across two requests: when the cost model finds that a prompt's prefix is on disk and that
recomputing its front while its back streams in finishes first, the front runs as its own request (LMDeploy
computes it into its GPU prefix cache) while the back comes up from disk, then the full prompt runs and finds
the front in HBM and the back in DDR.

It offers the transformers engine's API (``generate`` streams the same records, named shared contexts work the
same way through ``kv_pipeline.shared_contexts``), so kvtier's server serves either engine.

Needs a CUDA machine and LMDeploy 0.18 (``pip install 'kvtier[lmdeploy]'``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import torch

from kv_pipeline.config import KVTierConfig
from kv_pipeline.engine import GenerationOutput
from kv_pipeline.metrics import PipelineMetrics
from kv_pipeline.requests import RequestError, RequestLimits, RequestValidator
from kv_pipeline.scheduler import RequestMetrics
from kv_pipeline.shared_contexts import SharedContextAPI, SharedContexts

Prompt = str | Sequence[int] | Sequence[dict]


def engine_config(config: KVTierConfig, **options: Any):
    """LMDeploy's ``PytorchEngineConfig`` with prefix caching on and kvtier as the connector.

    ``options`` are further ``PytorchEngineConfig`` fields (``session_len``, ``cache_max_entry_count``, ...).
    ``config.hbm_bytes``, when set, sizes LMDeploy's GPU block pool (its prefix cache included).
    """
    from lmdeploy import PytorchEngineConfig

    from kv_runtime.backends.lmdeploy_connector import kv_transfer_config

    transfer = kv_transfer_config(config=config)  # every key, validated, as kv_connector_extra_config
    fields: dict[str, Any] = dict(
        enable_prefix_caching=True,
        block_size=config.block_size,
        kv_transfer_config=transfer,
        distributed_executor_backend="uni",
    )
    if config.dtype != "auto":
        fields["dtype"] = config.dtype
    if config.hbm_bytes:
        fields["num_gpu_blocks"] = config.hbm_bytes // _block_bytes(config)
    fields.update(options)
    return PytorchEngineConfig(**fields)


def _block_bytes(config: KVTierConfig) -> int:
    from kv_runtime.layout import KVLayout

    model_config = orjson.loads((Path(config.model) / "config.json").read_bytes())
    return KVLayout.from_config(
        model_config, block_size=config.block_size, dtype=config.resolve_dtype(model_config)
    ).block_bytes


class LMDeployKVTierEngine(SharedContextAPI):
    """The async API over LMDeploy, the transformers engine's: ``generate``, ``prefill``, ``prompt_logits``,
    named shared contexts, ``drain``, ``metrics_snapshot``; kvtier's server (``kv_pipeline.server``) serves it."""

    def __init__(self, config: KVTierConfig, **engine_options: Any) -> None:
        """``engine_options`` are ``PytorchEngineConfig`` fields; ``logprobs_mode`` defaults to raw logits so
        that ``prompt_logits`` returns logits."""
        if config.engine != "lmdeploy":
            raise ValueError(f"this engine runs LMDeploy; got engine={config.engine!r}")
        if not config.model:
            raise ValueError("KVTierConfig.model must name a model directory")
        self.config = config
        self.engine_options = {"logprobs_mode": "raw_logits", **engine_options}
        self.metrics = PipelineMetrics()
        self._session_ids = itertools.count(1)
        self._tokenizer = None
        self.validator = self.make_validator()
        self._started = False

    async def __aenter__(self) -> LMDeployKVTierEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("engine='lmdeploy' needs a CUDA device; use engine='hf' on this machine")
        from lmdeploy.pytorch.engine import Engine

        from kv_runtime.backends.lmdeploy_backend import LMDeployStore
        from kv_runtime.backends.lmdeploy_connector import install

        install()
        self.engine = Engine.from_pretrained(self.config.model, engine_config(self.config, **self.engine_options))
        self.engine.start_loop()
        self.instance = self.engine.create_instance()
        stores = LMDeployStore.instances()
        if len(stores) != 1:
            raise RuntimeError(f"expected one kvtier store in this process, found {len(stores)}")
        self.store = stores[0]
        try:
            self.shared_contexts = SharedContexts.open(
                self.store.service,
                self.validator,
                self.config.cache_dir,
                self.store.namespace.digest,
                self._compute_context,
                on_service=self.on_service,
            )
        except BaseException:
            self.engine.close()
            self.store.close()
            raise
        self.metrics.registry_damaged(len(self.shared_contexts.moved_aside))
        self._started = True

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("the engine is not started: use `async with engine` or `await engine.start()`")

    async def on_service(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await a coroutine of the tier service on the store's own loop thread, where it runs."""
        return await asyncio.wrap_future(self.store.io.submit(coro))

    @property
    def service(self):
        return self.store.service

    @property
    def hierarchy(self):
        return self.store.hierarchy

    @property
    def migrator(self):
        return self.store.migrator

    @property
    def keyer(self):
        return self.store.keyer

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        self.store.wait_idle()
        self.shared_contexts.close()
        self.engine.close()
        await asyncio.sleep(0.5)  # the engine's loop tasks end on this loop
        self.store.close()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        return self._tokenizer

    def make_validator(self) -> RequestValidator:
        """The same request checks as the transformers engine's, from the model's config.json and tokenizer
        (no engine needed)."""
        from kv_runtime.backends.hf_backend import encode_with

        config = SimpleNamespace(**orjson.loads((Path(self.config.model) / "config.json").read_bytes()))
        return RequestValidator(RequestLimits.from_config(config), lambda p: encode_with(self.tokenizer, p))

    # ------------------------------------------------------------------ generation

    async def _stream(self, tokens: list[int], gen_config, m: RequestMetrics) -> AsyncIterator[Any]:
        """LMDeploy's outputs for one request of its own session; what its prompt reused is added to ``m``
        (LMDeploy's cached tokens count its own GPU prefix-cache hits and the connector's loads together)."""
        from lmdeploy.messages import ResponseType

        session_id = next(self._session_ids)
        cached = 0
        try:
            async for out in self.instance.async_stream_infer(session_id, tokens, gen_config=gen_config):
                if out.status not in (ResponseType.SUCCESS, ResponseType.FINISH):
                    raise RuntimeError(f"LMDeploy answered {out.status}")
                if out.req_metrics is not None:
                    cached = max(cached, int(out.req_metrics.cached_tokens))
                yield out
        finally:
            loaded = self.store.take_reused(session_id)
            reused = m.reused_tokens
            for tier, n in loaded.items():
                reused[tier] = reused.get(tier, 0) + n
            gpu = cached - sum(loaded.values())
            if gpu > 0:
                reused["gpu"] = reused.get("gpu", 0) + gpu

    def _gen_config(
        self, max_new_tokens: int, temperature: float, seed: int | None, top_logits: int = 0, ignore_eos: bool = False
    ):
        from lmdeploy import GenerationConfig

        sampling: dict[str, Any] = {"top_k": 1} if temperature == 0 else {"temperature": temperature, "top_k": 0}
        if seed is not None:
            sampling["random_seed"] = seed
        return GenerationConfig(
            max_new_tokens=max_new_tokens, logprobs=top_logits or None, ignore_eos=ignore_eos, **sampling
        )

    def _request_tokens(self, prompt: Prompt, shared_context_id: Any, max_new_tokens: int) -> list[int]:
        tokens = self.validator.prompt(prompt)
        if shared_context_id is not None:
            self._require_started()
            tokens = list(self.shared_contexts.require(shared_context_id).tokens) + tokens
        self.validator.fits(len(tokens), max_new_tokens)
        return tokens

    async def _outputs(
        self, tokens: list[int], gen_config, m: RequestMetrics, split: bool
    ) -> AsyncIterator[tuple[list[int], Any]]:
        """``(new token ids, LMDeploy's top logits or None)`` per output; ``m`` is complete after the last.

        With ``split`` the cost model may run the prompt's front as its own request first (the module
        docstring); TTFT counts both."""
        from lmdeploy import GenerationConfig
        from lmdeploy.messages import ResponseType

        self._require_started()
        m.prompt_tokens, m.plan = len(tokens), "engine"
        t0 = time.perf_counter()
        if split:
            plan = self.store.scheduler.plan_split(tokens)
            if plan is not None:
                m.plan = "both"
                front = RequestMetrics()  # what the front reuses is not the prompt's: it is computed again
                async for _ in self._stream(tokens[: plan[0]], GenerationConfig(max_new_tokens=1), front):
                    pass
        first = None
        async for out in self._stream(tokens, gen_config, m):
            if out.token_ids and first is None:
                first = time.perf_counter()
                m.ttft_ms = (first - t0) * 1e3
            m.output_tokens += len(out.token_ids)
            if out.status is ResponseType.FINISH and first is not None:
                m.decode_ms = (time.perf_counter() - first) * 1e3
            yield out.token_ids, out.logprobs

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
        split: bool = True,
    ) -> AsyncIterator[GenerationOutput]:
        """Stream new tokens for ``prompt`` (text, chat messages or token ids), after a shared context if named,
        as the transformers engine does: :class:`GenerationOutput` records, the last carrying the metrics
        (``reused_tokens`` by where they came from: ``gpu`` for LMDeploy's own prefix cache, ``ddr``, ``disk``).
        ``ignore_eos`` generates ``max_new_tokens`` whatever the model says; ``split``: see :meth:`_outputs`."""
        check = self.validator
        session_id = check.identifier(session_id, "session_id")
        max_new_tokens = check.max_new_tokens(max_new_tokens)
        temperature, seed = check.temperature(temperature), check.seed(seed)
        ignore_eos = check.flag(ignore_eos, "ignore_eos")
        if temperature > 2:
            raise RequestError(f"temperature must be at most 2 on LMDeploy's engine, got {temperature}")
        tokens = self._request_tokens(prompt, shared_context_id, max_new_tokens)
        m = RequestMetrics()
        pending: int | None = None
        index = 0
        async for ids, _ in self._outputs(
            tokens, self._gen_config(max_new_tokens, temperature, seed, ignore_eos=ignore_eos), m, split
        ):
            for token in ids:
                if pending is not None:
                    yield GenerationOutput(pending, self.tokenizer.decode([pending]), index, False)
                    index += 1
                pending = token
        self.metrics.record(m, session_id)
        if pending is not None:
            yield GenerationOutput(pending, self.tokenizer.decode([pending]), index, True, m)

    async def prefill(self, prompt: Prompt, *, session_id: str = "default") -> RequestMetrics:
        """Process a prompt and cache its blocks; returns the request's metrics."""
        metrics = None
        async for out in self.generate(prompt, max_new_tokens=1, session_id=session_id):
            metrics = out.metrics
        assert metrics is not None
        return metrics

    async def prompt_logits(
        self, prompt: Prompt, *, k: int = 64, session_id: str = "default", split: bool = True
    ) -> tuple[dict[int, float], RequestMetrics]:
        """The ``k`` largest raw logits after the prompt's last token (``{token id: logit}``), as LMDeploy
        computed them over whatever kvtier restored (LMDeploy's PyTorch engine returns no full logits rows)."""
        check = self.validator
        session_id = check.identifier(session_id, "session_id")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RequestError(f"k must be an integer >= 1, got {k!r}")
        tokens = self._request_tokens(prompt, None, 1)
        m = RequestMetrics()
        top = None
        async for _, logprobs in self._outputs(tokens, self._gen_config(1, 0.0, None, top_logits=k), m, split):
            if logprobs:
                top = logprobs[0]
        if top is None:
            raise RuntimeError("LMDeploy returned no logits")
        self.metrics.record(m, session_id)
        return {int(t): float(v) for t, v in top.items()}, m

    async def _compute_context(self, tokens: list[int], label: str) -> None:
        """A shared context's prefill, returning once kvtier has published its blocks."""
        m = RequestMetrics()
        async for _ in self._outputs(tokens, self._gen_config(1, 0.0, None), m, split=True):
            pass
        self.metrics.record(m, label)
        await self.drain()

    # ------------------------------------------------------------------ control and inspection

    async def drain(self) -> None:
        """Wait until every transfer started so far has ended and LMDeploy has taken the reports of the saves
        (their blocks are published in kvtier's tiers and LMDeploy's leases on them are returned)."""
        self._require_started()
        await asyncio.to_thread(self.store.wait_idle)
        deadline = time.monotonic() + 5.0
        while self.store.saves_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    async def evict_gpu_prefix_cache(self) -> int:
        """Empty LMDeploy's GPU prefix cache; returns how many blocks it freed. Call between requests (blocks of
        a finished request stay leased until LMDeploy has taken kvtier's report that their saves ended, which
        :meth:`drain` waits for)."""
        await self.drain()
        freed = 0
        while True:
            n = int(self.engine.scheduler.block_trie.evict(1 << 62))
            if not n:
                return freed
            freed += n

    def metrics_snapshot(self) -> dict[str, Any]:
        return {"pipeline": self.metrics.snapshot(), "store": self.store.snapshot()}


def compare_top_logits(got: dict[int, float], ref: dict[int, float]) -> dict[str, float]:
    """How far top-k logits are from a reference: the largest difference over the tokens both list, how many
    they share, and whether the top token agrees."""
    shared = set(got) & set(ref)
    return {
        "max_abs_diff": max((abs(got[t] - ref[t]) for t in shared), default=float("inf")),
        "shared": len(shared) / max(1, len(ref)),
        "argmax_equal": float(max(got, key=got.get) == max(ref, key=ref.get)),
    }
