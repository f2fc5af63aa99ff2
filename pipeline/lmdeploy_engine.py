"""``KVTierEngine`` with ``engine="lmdeploy"``: LMDeploy's PyTorch engine with kvtier installed as its KV store.

LMDeploy schedules, computes and keeps its own GPU prefix cache; kvtier's connector serves DDR and disk
under it (``kv_runtime.backends.lmdeploy_connector``). What this layer adds on top of LMDeploy's engine is
Cake's split across two requests: when the cost model finds that a prompt's prefix is on disk and that
recomputing its front while its back streams in finishes first, the front runs as its own request (LMDeploy
computes it into its GPU prefix cache) while the back comes up from disk, then the full prompt runs and finds
the front in HBM and the back in DDR.

Needs a CUDA machine and LMDeploy 0.18 (``pip install 'kvtier[lmdeploy]'``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import torch

from kv_pipeline.config import KVTierConfig
from kv_pipeline.metrics import PipelineMetrics
from kv_pipeline.requests import RequestError, RequestLimits, RequestValidator
from kv_pipeline.scheduler import RequestMetrics

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


class LMDeployKVTierEngine:
    """The async API over LMDeploy: ``generate``, ``prefill``, ``prompt_logits``, ``metrics_snapshot``."""

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
        self._started = True

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        self.store.wait_idle()
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

    async def _stream(self, tokens: list[int], gen_config) -> AsyncIterator[Any]:
        session_id = next(self._session_ids)
        async for out in self.instance.async_stream_infer(session_id, tokens, gen_config=gen_config):
            yield out

    async def generate(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 32,
        session_id: str = "default",
        split: bool = True,
        top_logits: int = 0,
    ) -> AsyncIterator[tuple[list[int], RequestMetrics, Any]]:
        """Stream ``(new token ids, metrics, top logits or None)``; metrics are complete on the last item.

        With ``split`` the cost model may run the prompt's front as its own request first (see the module
        docstring); TTFT counts both. ``top_logits=K`` asks LMDeploy for the K largest raw logits of each new
        token (``{token id: logit}`` per token); LMDeploy's PyTorch engine returns no full logits rows while
        generating.
        """
        check = self.validator
        session_id = check.identifier(session_id, "session_id")
        max_new_tokens = check.max_new_tokens(max_new_tokens)
        if not isinstance(top_logits, int) or isinstance(top_logits, bool) or top_logits < 0:
            raise RequestError(f"top_logits must be an integer >= 0, got {top_logits!r}")
        tokens = check.prompt(prompt)
        check.fits(len(tokens), max_new_tokens)
        from lmdeploy import GenerationConfig
        from lmdeploy.messages import ResponseType

        m = RequestMetrics(prompt_tokens=len(tokens), plan="engine")
        t0 = time.perf_counter()
        if split:
            plan = self.store.scheduler.plan_split(tokens)
            if plan is not None:
                front, _ = plan
                m.plan = "both"
                async for _ in self._stream(tokens[:front], GenerationConfig(max_new_tokens=1)):
                    pass
        gen = GenerationConfig(max_new_tokens=max_new_tokens, logprobs=top_logits or None)
        first = None
        async for out in self._stream(tokens, gen):
            if out.status not in (ResponseType.SUCCESS, ResponseType.FINISH):
                raise RuntimeError(f"LMDeploy answered {out.status}")
            if out.token_ids and first is None:
                first = time.perf_counter()
                m.ttft_ms = (first - t0) * 1e3
            m.output_tokens += len(out.token_ids)
            if out.status is ResponseType.FINISH and first is not None:
                m.decode_ms = (time.perf_counter() - first) * 1e3
            yield out.token_ids, m, out.logprobs
        self.metrics.record(m, session_id)

    async def prefill(self, prompt: Prompt, *, session_id: str = "default") -> RequestMetrics:
        metrics = None
        async for _, m, _ in self.generate(prompt, max_new_tokens=1, session_id=session_id):
            metrics = m
        assert metrics is not None
        return metrics

    async def prompt_logits(
        self, prompt: Prompt, *, k: int = 64, session_id: str = "default", split: bool = True
    ) -> tuple[dict[int, float], RequestMetrics]:
        """The ``k`` largest raw logits after the prompt's last token (``{token id: logit}``), as LMDeploy
        computed them over whatever kvtier restored."""
        top = metrics = None
        async for _, m, logprobs in self.generate(
            prompt, max_new_tokens=1, session_id=session_id, split=split, top_logits=k
        ):
            metrics = m
            if logprobs:
                top = logprobs[0]
        if top is None or metrics is None:
            raise RuntimeError("LMDeploy returned no logits")
        return {int(t): float(v) for t, v in top.items()}, metrics

    # ------------------------------------------------------------------ control and inspection

    async def evict_gpu_prefix_cache(self) -> int:
        """Empty LMDeploy's GPU prefix cache; returns how many blocks it freed. Call between requests.

        Blocks of a finished request stay leased until LMDeploy has taken kvtier's report that their saves
        ended (on its next step), so this first waits for the saves and for those reports."""
        self.store.wait_idle()
        deadline = time.monotonic() + 5.0
        while self.store.saves_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
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
