"""Load or recompute: predicted prefill time of a prefix range against the time to load its KV from each tier.

Recompute time of tokens ``[a, b)`` = FLOPs / measured prefill throughput, where FLOPs are the linear part
(2 x the weights each token passes through) plus attention, which is quadratic in position: token ``t`` reads
``t + 1`` keys and values in every layer. So the last blocks of a long prompt cost the most to recompute, and a
slow tier pays off only past a break-even length. Load time from a tier = bytes / bandwidth + latency, both
fitted online to observed transfers (exponentially weighted least squares), and throughput is fitted to
observed prefills, so the model follows the machine it runs on.

The plan considers, for a prefix of ``N`` matched blocks: recompute all; load the first ``k`` (tiers in
parallel) and recompute the rest after; and Cake's both-at-once: recompute the front ``[0, s)`` on the GPU while
``[s, k)`` streams in, then recompute ``[k, N)``. It returns the fastest as a ``LoadPlan``.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(slots=True, frozen=True)
class ModelShape:
    """The numbers of a model config that set prefill FLOPs (decoder-only transformer, gated MLP)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive")

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config, as an object or as the dict of its ``config.json``."""

        def get(name: str, default: Any = None) -> Any:
            value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
            return default if value is None else value

        heads = get("num_attention_heads")
        return cls(
            layers=get("num_hidden_layers"),
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size"),
            heads=heads,
            kv_heads=get("num_key_value_heads", heads),
            head_dim=get("head_dim", get("hidden_size") // heads),
            vocab=get("vocab_size"),
        )

    @classmethod
    def qwen2_7b(cls) -> ModelShape:
        return cls(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064)

    @property
    def linear_flops_per_token(self) -> float:
        """2 FLOPs per weight per token: Q, K, V, O projections and the three MLP matrices, every layer.

        The LM head is left out: a cached prefix never needs logits.
        """
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return 2.0 * self.layers * (attn + mlp)

    @property
    def kv_bytes_per_token_bf16(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    def prefill_flops(self, a: int, b: int) -> float:
        """FLOPs to compute tokens ``[a, b)`` given the KV of ``[0, a)``: linear plus QK^T and AV per layer."""
        if not 0 <= a <= b:
            raise ValueError(f"need 0 <= a <= b, got {a}, {b}")
        pairs = (b * (b + 1) - a * (a + 1)) / 2  # sum over t in [a, b) of (t + 1) attended positions
        return self.linear_flops_per_token * (b - a) + 4.0 * self.layers * self.heads * self.head_dim * pairs


class _WeightedFit:
    """Exponentially weighted least squares of ``y = c0 + c1 * x``: latency and seconds-per-byte of a link."""

    __slots__ = ("alpha", "n", "sx", "sxx", "sxy", "sy")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        keep = 1.0 - self.alpha
        self.n = keep * self.n + 1.0
        self.sx = keep * self.sx + x
        self.sy = keep * self.sy + y
        self.sxx = keep * self.sxx + x * x
        self.sxy = keep * self.sxy + x * y

    def solve(self) -> tuple[float, float] | None:
        """(intercept, slope), or None while the sizes seen are too alike to separate latency from bandwidth."""
        var = self.n * self.sxx - self.sx * self.sx
        if self.n < 2 or var <= 1e-9 * self.sxx * self.n:
            return None
        slope = (self.n * self.sxy - self.sx * self.sy) / var
        intercept = (self.sy - slope * self.sx) / self.n
        if slope <= 0:
            return None
        return max(0.0, intercept), slope


@dataclass(slots=True)
class TierLink:
    """How fast KV comes back into the engine from one tier; fitted to observed transfers."""

    name: str
    bandwidth_gbps: float
    latency_ms: float
    _fit: _WeightedFit = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.bandwidth_gbps <= 0 or self.latency_ms < 0:
            raise ValueError(f"tier {self.name}: bandwidth must be > 0 and latency >= 0")

    def seconds(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency_ms / 1e3 + nbytes / (self.bandwidth_gbps * 1e9)


@dataclass(slots=True, frozen=True)
class LoadPlan:
    """What to do with a matched prefix of ``matched_blocks`` blocks, and the times that led there.

    Blocks ``[0, recompute_front)`` are recomputed while ``[recompute_front, load_end)`` load (``load_blocks``
    counts them per tier); ``[load_end, matched_blocks)`` are recomputed afterwards.
    """

    choice: Literal["load", "recompute", "both"]
    matched_blocks: int
    recompute_front: int
    load_end: int
    load_blocks: dict[str, int]
    predicted_ms: float
    recompute_all_ms: float
    best_load_ms: float
    best_both_ms: float

    @property
    def split_point(self) -> int:
        return self.recompute_front

    @property
    def recompute_blocks(self) -> int:
        return self.recompute_front + self.matched_blocks - self.load_end


class CostBenefitModel:
    """Predicts recompute and load times and chooses a ``LoadPlan``; learns throughput and links online."""

    def __init__(
        self,
        shape: ModelShape,
        *,
        bytes_per_token: int,
        tiers: Sequence[TierLink],
        prefill_tflops: float = 500.0,
        alpha: float = 0.1,
    ) -> None:
        if bytes_per_token <= 0 or prefill_tflops <= 0 or not 0 < alpha <= 1:
            raise ValueError("bytes_per_token and prefill_tflops must be > 0, alpha in (0, 1]")
        if not tiers or len({t.name for t in tiers}) != len(tiers):
            raise ValueError("tiers must be a non-empty list with distinct names")
        self.shape = shape
        self.bytes_per_token = bytes_per_token
        self.tiers = {t.name: t for t in tiers}
        self.prefill_flops_per_s = prefill_tflops * 1e12
        self.alpha = alpha
        for t in tiers:
            t._fit = _WeightedFit(alpha)

    # -- learning -----------------------------------------------------------------------------------------------
    def observe_prefill(self, start_token: int, end_token: int, seconds: float) -> None:
        """A prefill of ``[start_token, end_token)`` took ``seconds``: move the throughput estimate towards it."""
        if seconds <= 0 or end_token <= start_token:
            return
        measured = self.shape.prefill_flops(start_token, end_token) / seconds
        self.prefill_flops_per_s += self.alpha * (measured - self.prefill_flops_per_s)

    def observe_transfer(self, tier: str, nbytes: int, seconds: float) -> None:
        """A load of ``nbytes`` from ``tier`` took ``seconds``: refit that tier's latency and bandwidth."""
        link = self._tier(tier)
        if nbytes <= 0 or seconds <= 0:
            return
        link._fit.add(float(nbytes), seconds)
        solved = link._fit.solve()
        if solved is None:  # one size only so far: keep the latency, attribute the rest to bandwidth
            per_byte = max(seconds - link.latency_ms / 1e3, seconds * 0.05) / nbytes
            link.bandwidth_gbps += self.alpha * (1.0 / per_byte / 1e9 - link.bandwidth_gbps)
        else:
            intercept, slope = solved
            link.latency_ms, link.bandwidth_gbps = intercept * 1e3, 1.0 / slope / 1e9

    def _tier(self, tier: str) -> TierLink:
        try:
            return self.tiers[tier]
        except KeyError:
            raise ValueError(f"unknown tier {tier!r}; known: {sorted(self.tiers)}") from None

    # -- predictions ---------------------------------------------------------------------------------------------
    def recompute_seconds(self, start_token: int, end_token: int) -> float:
        return self.shape.prefill_flops(start_token, end_token) / self.prefill_flops_per_s

    def load_seconds(self, tier: str, tokens: int) -> float:
        return self._tier(tier).seconds(tokens * self.bytes_per_token)

    def plan(
        self, block_tiers: Sequence[str], block_tokens: int, *, start_block: int = 0, allow_both: bool = True
    ) -> LoadPlan:
        """Choose for a matched prefix whose block ``i`` is held (fastest copy) by tier ``block_tiers[i]``.

        ``start_block`` blocks before these are already in the engine (its own GPU prefix cache): positions,
        and so the quadratic attention cost, start there. ``allow_both=False`` leaves Cake's split out, for an
        engine that cannot compute the front of a prompt while the back of the same prompt loads.
        """
        if block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        if start_block < 0:
            raise ValueError(f"start_block must be >= 0, got {start_block}")
        n = len(block_tiers)
        for t in set(block_tiers):
            self._tier(t)
        names = list(self.tiers)
        # counts[name][i] = blocks of tier `name` among the first i
        counts = {name: [0] * (n + 1) for name in names}
        for i, t in enumerate(block_tiers):
            for name in names:
                counts[name][i + 1] = counts[name][i] + (name == t)

        def compute(a: int, b: int) -> float:
            return self.recompute_seconds((start_block + a) * block_tokens, (start_block + b) * block_tokens)

        def load(s: int, k: int) -> float:
            return max(self.load_seconds(name, (counts[name][k] - counts[name][s]) * block_tokens) for name in names)

        recompute_all = compute(0, n)
        best_load, best_load_k = recompute_all, 0
        best_both, best_both_sk = float("inf"), (0, 0)
        for k in range(1, n + 1):
            tail = compute(k, n)
            t_load = load(0, k) + tail
            if t_load < best_load:
                best_load, best_load_k = t_load, k
            if not allow_both:
                continue
            # Cake split: the front's compute grows with s, the loads of [s, k) shrink; find where they cross.
            s = bisect.bisect_left(range(k), True, key=lambda x, k=k: compute(0, x) >= load(x, k))
            for cand in (s - 1, s):
                if 1 <= cand < k:
                    t_both = max(compute(0, cand), load(cand, k)) + tail
                    if t_both < best_both:
                        best_both, best_both_sk = t_both, (cand, k)
        if best_both < best_load:
            s, k, choice, predicted = *best_both_sk, "both", best_both
        elif best_load_k > 0:
            s, k, choice, predicted = 0, best_load_k, "load", best_load
        else:
            s, k, choice, predicted = 0, 0, "recompute", recompute_all
        loads = {name: counts[name][k] - counts[name][s] for name in names if counts[name][k] > counts[name][s]}
        return LoadPlan(
            choice=choice,  # type: ignore[arg-type]
            matched_blocks=n,
            recompute_front=s,
            load_end=k,
            load_blocks=loads,
            predicted_ms=predicted * 1e3,
            recompute_all_ms=recompute_all * 1e3,
            best_load_ms=best_load * 1e3,
            best_both_ms=best_both * 1e3 if best_both_sk != (0, 0) else float("inf"),
        )
