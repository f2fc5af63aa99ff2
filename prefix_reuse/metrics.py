"""Reuse metrics: hit ratio, matched tokens, hits per tier, lookup latency.

Exported two ways from one set of counts: Prometheus collectors on a registry the caller can scrape (a
private registry by default, so several caches in one process never collide), and a JSON snapshot with exact
latency percentiles over a sliding window of recent lookups.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Lookups gate transfers of tens to hundreds of milliseconds; resolve the sub-millisecond range finely.
_LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0)


class PrefixReuseMetrics:
    """Counts lookups and what they found; thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None, *, prefix: str = "kvtier", window: int = 8192):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._lookups = 0
        self._tokens = 0
        self._matched = 0
        self._hits_by_tier: dict[str, int] = {}
        self._lookups_total = Counter(f"{prefix}_prefix_lookups", "Prefix lookups", registry=self.registry)
        self._tokens_total = Counter(
            f"{prefix}_prefix_lookup_tokens", "Prompt tokens looked up", registry=self.registry
        )
        self._matched_total = Counter(
            f"{prefix}_prefix_matched_tokens", "Prompt tokens found cached", registry=self.registry
        )
        self._block_hits = Counter(
            f"{prefix}_prefix_block_hits", "Cached blocks found, by tier", ["tier"], registry=self.registry
        )
        self._latency = Histogram(
            f"{prefix}_prefix_lookup_seconds",
            "Lookup latency, key computation included",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def record_lookup(
        self,
        *,
        tokens: int,
        matched_tokens: int,
        seconds: float,
        tier_blocks: Mapping[str, int] | None = None,
    ) -> None:
        if matched_tokens > tokens or tokens < 0 or matched_tokens < 0 or seconds < 0:
            raise ValueError(f"inconsistent lookup record: {matched_tokens=} {tokens=} {seconds=}")
        self._lookups_total.inc()
        self._tokens_total.inc(tokens)
        self._matched_total.inc(matched_tokens)
        self._latency.observe(seconds)
        for tier, n in (tier_blocks or {}).items():
            self._block_hits.labels(tier=tier).inc(n)
        with self._lock:
            self._lookups += 1
            self._tokens += tokens
            self._matched += matched_tokens
            self._latencies.append(seconds)
            for tier, n in (tier_blocks or {}).items():
                self._hits_by_tier[tier] = self._hits_by_tier.get(tier, 0) + n

    def snapshot(self) -> dict[str, Any]:
        """Totals since start; latency percentiles over the recent window, in milliseconds."""
        with self._lock:
            lat = np.fromiter(self._latencies, dtype=np.float64) * 1e3
            lookups, tokens, matched = self._lookups, self._tokens, self._matched
            tiers = dict(self._hits_by_tier)
        latency = (
            {
                "p50": float(np.percentile(lat, 50)),
                "p90": float(np.percentile(lat, 90)),
                "p99": float(np.percentile(lat, 99)),
                "max": float(lat.max()),
                "window": int(lat.size),
            }
            if lat.size
            else {}
        )
        return {
            "lookups": lookups,
            "tokens": tokens,
            "matched_tokens": matched,
            "hit_ratio": matched / tokens if tokens else 0.0,
            "matched_tokens_mean": matched / lookups if lookups else 0.0,
            "block_hits_by_tier": tiers,
            "lookup_latency_ms": latency,
        }

    def snapshot_json(self) -> bytes:
        return orjson.dumps(self.snapshot())

    def prometheus_text(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
