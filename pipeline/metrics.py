"""Pipeline metrics: per-request records aggregated into Prometheus collectors and a JSON snapshot.

TTFT percentiles are kept per context as well as overall, so fairness across sessions is visible: a context
whose p99 runs away from the others is being starved.

Per-context records are bounded: every distinct session id would otherwise grow memory and the snapshot for
the life of the process. The :data:`MAX_CONTEXTS` most recently recorded contexts are kept (least recently
recorded dropped first), each with its last :data:`CONTEXT_WINDOW` TTFTs; the totals, plan and reuse counts
and the Prometheus collectors are exact whatever the number of contexts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict, deque
from collections.abc import Hashable
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kv_pipeline.scheduler import RequestMetrics

MAX_CONTEXTS = 256  # per-context TTFT records kept (the most recently recorded contexts)
CONTEXT_WINDOW = 256  # TTFTs kept per context
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _pcts(values: Any) -> dict[str, float]:
    arr = np.fromiter(values, dtype=np.float64)
    if not arr.size:
        return {}
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "count": int(arr.size)}


class PipelineMetrics:
    """Thread-safe aggregation of :class:`RequestMetrics`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        window: int = 4096,
        max_contexts: int = MAX_CONTEXTS,
        context_window: int = CONTEXT_WINDOW,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._window = window
        self._max_contexts = max_contexts
        self._context_window = context_window
        self._ttft: deque[float] = deque(maxlen=window)
        self._ttft_by_context: OrderedDict[Hashable, deque[float]] = OrderedDict()  # least recently recorded first
        self._contexts_dropped = 0
        self._events: dict[str, int] = defaultdict(int)
        self._totals: dict[str, float] = defaultdict(float)
        self._plans: dict[str, int] = defaultdict(int)
        self._reused: dict[str, int] = defaultdict(int)
        self._requests = Counter("kvtier_requests", "Requests completed", ["plan"], registry=self.registry)
        self._ttft_hist = Histogram(
            "kvtier_ttft_seconds", "Time to first token", buckets=_TTFT_BUCKETS, registry=self.registry
        )
        self._reused_tokens = Counter(
            "kvtier_reused_tokens", "Prompt tokens restored from a tier", ["tier"], registry=self.registry
        )
        self._computed_tokens = Counter("kvtier_computed_tokens", "Prompt tokens prefilled", registry=self.registry)
        self._loaded_bytes = Counter("kvtier_loaded_bytes", "KV bytes loaded into the engine", registry=self.registry)
        self._load_misses = Counter(
            "kvtier_load_misses", "Blocks that failed verification on load", registry=self.registry
        )
        self._registry_damaged = Counter(
            "kvtier_context_registry_damaged",
            "Damaged shared-context registries moved aside and replaced by an empty one",
            registry=self.registry,
        )

    def record(self, m: RequestMetrics, context: Hashable) -> None:
        self._requests.labels(plan=m.plan).inc()
        self._ttft_hist.observe(m.ttft_ms / 1e3)
        self._computed_tokens.inc(m.computed_tokens)
        self._loaded_bytes.inc(m.bytes_loaded)
        self._load_misses.inc(m.load_misses)
        for tier, n in m.reused_tokens.items():
            self._reused_tokens.labels(tier=tier).inc(n)
        with self._lock:
            self._ttft.append(m.ttft_ms)
            per_context = self._ttft_by_context.get(context)
            if per_context is None:
                per_context = self._ttft_by_context[context] = deque(maxlen=self._context_window)
                while len(self._ttft_by_context) > self._max_contexts:
                    self._ttft_by_context.popitem(last=False)
                    self._contexts_dropped += 1
            else:
                self._ttft_by_context.move_to_end(context)
            per_context.append(m.ttft_ms)
            self._plans[m.plan] += 1
            for tier, n in m.reused_tokens.items():
                self._reused[tier] += n
            for name in ("prompt_tokens", "computed_tokens", "bytes_loaded", "load_misses", "output_tokens"):
                self._totals[name] += getattr(m, name)
            self._totals["requests"] += 1

    def registry_damaged(self, count: int = 1) -> None:
        """``count`` damaged shared-context registries were moved aside at start."""
        if count:
            self._registry_damaged.inc(count)
            with self._lock:
                self._events["context_registry_damaged"] += count

    def snapshot(self) -> dict[str, Any]:
        """Plain data. ``ttft_ms_by_context`` holds the most recently recorded contexts only (at most
        ``MAX_CONTEXTS``); ``contexts_dropped`` counts those dropped from it to keep it bounded."""
        with self._lock:
            return {
                "requests": int(self._totals["requests"]),
                "ttft_ms": _pcts(self._ttft),
                "ttft_ms_by_context": {str(c): _pcts(v) for c, v in self._ttft_by_context.items()},
                "contexts_dropped": self._contexts_dropped,
                "context_registry_damaged": self._events["context_registry_damaged"],
                "plan_counts": dict(self._plans),
                "reused_tokens": dict(self._reused),
                "totals": {k: v for k, v in self._totals.items() if k != "requests"},
            }

    def snapshot_json(self) -> bytes:
        return orjson.dumps(self.snapshot())

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)
