"""The storage tiers, fastest first (a tiny module so that quotas and events need no pools)."""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    HBM = 0
    DDR = 1
    DISK = 2
