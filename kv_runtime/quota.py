"""Capacity per tier and per tenant (or named shared context), with eviction callbacks under pressure.

A reservation that would exceed a limit first asks the registered eviction callbacks, in order, to free
bytes; it fails with :class:`QuotaExceededError` only if they could not. Which blocks go is the callbacks'
decision (the hierarchy's default evicts least recently used unpinned copies; a policy may register its own):
this class only counts bytes.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kv_runtime.tier import Tier


class QuotaExceededError(MemoryError):
    """A tier or tenant limit would be exceeded and eviction could not free enough."""


@dataclass(slots=True, frozen=True)
class QuotaPressure:
    """What an eviction callback is asked to relieve: free ``needed_bytes`` in ``tier`` (of ``tenant`` if set)."""

    tier: Tier
    tenant: str | None
    needed_bytes: int
    limit_bytes: int
    used_bytes: int


EvictionCallback = Callable[[QuotaPressure], int]


class QuotaManager:
    """Byte limits per tier and per (tenant, tier); usage counted by reservations and releases."""

    def __init__(self, tier_capacity: Mapping[Tier, int] | None = None) -> None:
        self._lock = threading.RLock()
        self._tier_limit: dict[Tier, int] = {}
        self._tenant_limit: dict[tuple[str, Tier], int] = {}
        self._used: defaultdict[tuple[str, Tier], int] = defaultdict(int)
        self._tier_used: defaultdict[Tier, int] = defaultdict(int)
        self._callbacks: list[EvictionCallback] = []
        self.evictions_requested = 0
        for tier, cap in (tier_capacity or {}).items():
            self.set_tier_capacity(tier, cap)

    def set_tier_capacity(self, tier: Tier, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"capacity must be >= 0, got {nbytes}")
        with self._lock:
            self._tier_limit[Tier(tier)] = nbytes

    def set_tenant_quota(self, tenant: str, tier: Tier, nbytes: int) -> None:
        """Limit one tenant or named context in one tier."""
        if not isinstance(tenant, str):
            raise TypeError(f"tenant must be a str, got {type(tenant).__name__}")
        if nbytes < 0:
            raise ValueError(f"quota must be >= 0, got {nbytes}")
        with self._lock:
            self._tenant_limit[(tenant, Tier(tier))] = nbytes

    def on_pressure(self, callback: EvictionCallback) -> None:
        """Register an eviction callback; it returns the bytes it freed (through :meth:`release`)."""
        self._callbacks.append(callback)

    def usage(self, tier: Tier, tenant: str | None = None) -> int:
        with self._lock:
            return self._tier_used[tier] if tenant is None else self._used[(tenant, tier)]

    def limit(self, tier: Tier, tenant: str | None = None) -> int | None:
        with self._lock:
            return self._tier_limit.get(tier) if tenant is None else self._tenant_limit.get((tenant, tier))

    def reserve(self, tier: Tier, tenant: str, nbytes: int) -> None:
        """Count ``nbytes`` against the tier and the tenant, evicting through the callbacks if needed."""
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative size ({nbytes})")
        with self._lock:
            for scope in (tenant, None):
                limit = self.limit(tier, scope)
                if limit is None:
                    continue
                if nbytes > limit:
                    who = f"tenant {scope!r}" if scope is not None else "the tier"
                    raise QuotaExceededError(f"{nbytes} bytes exceed the {tier.name} limit of {who} ({limit})")
                for callback in self._callbacks:
                    used = self.usage(tier, scope)
                    if used + nbytes <= limit:
                        break
                    self.evictions_requested += 1
                    callback(QuotaPressure(tier, scope, used + nbytes - limit, limit, used))
                used = self.usage(tier, scope)
                if used + nbytes > limit:
                    who = f"tenant {scope!r}" if scope is not None else "the tier"
                    raise QuotaExceededError(
                        f"{tier.name}: {who} uses {used} of {limit} bytes; {nbytes} more do not fit after eviction"
                    )
            self._used[(tenant, tier)] += nbytes
            self._tier_used[tier] += nbytes

    def release(self, tier: Tier, tenant: str, nbytes: int) -> None:
        with self._lock:
            if self._used[(tenant, tier)] < nbytes:
                raise ValueError(f"release of {nbytes} bytes exceeds {tenant!r}'s usage in {tier.name}")
            self._used[(tenant, tier)] -= nbytes
            self._tier_used[tier] -= nbytes
