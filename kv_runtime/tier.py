"""The storage tiers, fastest first (a tiny module so that quotas and events need no pools)."""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    HBM = 0
    DDR = 1
    DISK = 2

    # NOTE: Enum hashes members by name in Python code; tiers key the dicts on every eviction and copy, and
    # an int's hash is both consistent with IntEnum's equality and computed in C.
    __hash__ = int.__hash__
