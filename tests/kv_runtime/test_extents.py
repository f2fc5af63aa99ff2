"""The extent allocator against a brute-force byte map under random operations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_runtime.extents import ExtentAllocator

UNIT = 16
CAP = 64 * UNIT


def test_first_fit_and_coalescing():
    a = ExtentAllocator(CAP, UNIT)
    x, y, z = a.allocate(4 * UNIT), a.allocate(4 * UNIT), a.allocate(4 * UNIT)
    assert (x, y, z) == (0, 4 * UNIT, 8 * UNIT)
    a.free(x, 4 * UNIT)
    a.free(z, 4 * UNIT)  # merges with the tail hole
    assert list(a.free_extents()) == [(0, 4 * UNIT), (8 * UNIT, CAP - 8 * UNIT)]
    a.free(y, 4 * UNIT)  # merges both neighbours
    assert list(a.free_extents()) == [(0, CAP)]
    with pytest.raises(ValueError, match="double free"):
        a.free(0, UNIT)


def test_allocate_at_and_run():
    a = ExtentAllocator(CAP, UNIT)
    assert a.allocate_at(8 * UNIT, 2 * UNIT)
    assert not a.allocate_at(9 * UNIT, UNIT)
    assert a.allocate_run(UNIT, 8) == 0
    assert a.allocate(UNIT, below=8 * UNIT) is None
    assert a.allocate(UNIT) == 10 * UNIT


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12), st.integers(0, 50)), max_size=80))
def test_matches_byte_map(ops):
    a = ExtentAllocator(CAP, UNIT)
    owner = [None] * (CAP // UNIT)  # brute force: which allocation holds each unit
    live: list[tuple[int, int]] = []
    for is_alloc, units, pick in ops:
        if is_alloc or not live:
            size = units * UNIT
            off = a.allocate(size)
            # First fit: the lowest run of free units that is long enough.
            expected = next(
                (i * UNIT for i in range(len(owner) - units + 1) if all(o is None for o in owner[i : i + units])),
                None,
            )
            assert off == expected
            if off is not None:
                for u in range(off // UNIT, off // UNIT + units):
                    owner[u] = off
                live.append((off, size))
        else:
            off, size = live.pop(pick % len(live))
            a.free(off, size)
            for u in range(off // UNIT, (off + size) // UNIT):
                owner[u] = None
        holes = list(a.free_extents())
        # Holes are exactly the maximal runs of free units: coalesced, sorted, never adjacent.
        runs, i = [], 0
        while i < len(owner):
            if owner[i] is None:
                j = i
                while j < len(owner) and owner[j] is None:
                    j += 1
                runs.append((i * UNIT, (j - i) * UNIT))
                i = j
            else:
                i += 1
        assert holes == runs
        assert a.free_bytes == sum(s for _, s in runs)
