"""Quotas per tier and per tenant; eviction callbacks run under pressure, and a reservation fails cleanly."""

from __future__ import annotations

import pytest

from kv_runtime.pool import Tier
from kv_runtime.quota import QuotaExceededError, QuotaManager


def test_tier_and_tenant_limits_with_eviction_callback():
    q = QuotaManager({Tier.DDR: 100})
    q.set_tenant_quota("a", Tier.DDR, 60)
    calls = []

    def evict(p):
        calls.append((p.tier, p.tenant, p.needed_bytes))
        q.release(p.tier, p.tenant or "b", 30)
        return 30

    q.on_pressure(evict)
    q.reserve(Tier.DDR, "a", 50)
    q.reserve(Tier.DDR, "b", 40)
    assert q.usage(Tier.DDR) == 90 and not calls
    q.reserve(Tier.DDR, "b", 20)  # tier over by 10: evicts 30 of b's bytes
    assert calls == [(Tier.DDR, None, 10)]
    assert q.usage(Tier.DDR, "b") == 30 and q.usage(Tier.DDR) == 80
    q.reserve(Tier.DDR, "a", 10)
    assert q.usage(Tier.DDR, "a") == 60
    with pytest.raises(QuotaExceededError):
        q.reserve(Tier.DDR, "a", 61)  # larger than the tenant's whole quota


def test_failed_reservation_counts_nothing():
    q = QuotaManager({Tier.DISK: 10})
    q.on_pressure(lambda p: 0)
    q.reserve(Tier.DISK, "t", 8)
    with pytest.raises(QuotaExceededError, match="after eviction"):
        q.reserve(Tier.DISK, "t", 4)
    assert q.usage(Tier.DISK) == 8
    with pytest.raises(ValueError):
        q.release(Tier.DISK, "t", 9)
    with pytest.raises(ValueError):
        q.set_tier_capacity(Tier.DISK, -1)
