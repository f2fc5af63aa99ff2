"""Variable-size extents inside one arena (a host allocation or a slab file).

Blocks of different sizes (full precision next to int8/int4 quantised) share a tier, so slots are extents,
not fixed cells. Free space is a list of extents sorted by offset; allocation is first-fit (lowest offset
first, which keeps live data packed towards the start and the tail free), and freeing coalesces with both
neighbours, so two adjacent holes are never listed apart. Every extent is a multiple of ``align`` bytes and
starts on an ``align`` boundary (4096: O_DIRECT and page-granular pinned copies need it).

Not thread-safe by itself: the pool that owns an allocator serialises calls to it.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator


def align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


class ExtentAllocator:
    """First-fit allocation of aligned extents in ``[0, capacity)``, with coalescing frees."""

    __slots__ = ("_sizes", "_starts", "align", "capacity")

    def __init__(self, capacity: int, align: int = 4096) -> None:
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align must be a power of two, got {align}")
        if capacity < align:
            raise ValueError(f"arena capacity {capacity} is smaller than one {align}-byte unit")
        self.align = align
        self.capacity = capacity // align * align
        self._starts: list[int] = [0]
        self._sizes: list[int] = [self.capacity]

    def size_of(self, nbytes: int) -> int:
        """Bytes an extent for ``nbytes`` of payload occupies."""
        if nbytes <= 0:
            raise ValueError(f"an extent needs a positive size, got {nbytes}")
        return align_up(nbytes, self.align)

    # ------------------------------------------------------------------ queries

    @property
    def free_bytes(self) -> int:
        return sum(self._sizes)

    @property
    def largest_free(self) -> int:
        return max(self._sizes, default=0)

    def free_extents(self) -> Iterator[tuple[int, int]]:
        """``(offset, size)`` of every hole, by offset."""
        return zip(self._starts, self._sizes, strict=True)

    def hole_before(self, offset: int) -> tuple[int, int] | None:
        """``(start, size)`` of the hole that ends exactly at ``offset``, if there is one."""
        i = bisect_left(self._starts, offset) - 1
        if i >= 0 and self._starts[i] + self._sizes[i] == offset:
            return self._starts[i], self._sizes[i]
        return None

    def is_free(self, offset: int, size: int) -> bool:
        i = bisect_right(self._starts, offset) - 1
        return i >= 0 and self._starts[i] + self._sizes[i] >= offset + size

    # ------------------------------------------------------------------ changes

    def allocate(self, size: int, *, below: int | None = None) -> int | None:
        """Offset of a new extent of ``size`` bytes (already aligned), or None when no hole fits.

        ``below`` restricts the search to holes that can hold the extent entirely below that offset.
        """
        for i, (start, hole) in enumerate(zip(self._starts, self._sizes, strict=True)):
            if below is not None and start + size > below:
                return None
            if hole >= size:
                self._take(i, start, size)
                return start
        return None

    def allocate_run(self, size: int, count: int) -> int | None:
        """Start of ``count`` adjacent extents of ``size`` bytes in one hole (one copy moves them all)."""
        total = size * count
        for i, (start, hole) in enumerate(zip(self._starts, self._sizes, strict=True)):
            if hole >= total:
                self._take(i, start, total)
                return start
        return None

    def allocate_at(self, offset: int, size: int) -> bool:
        """Claim ``[offset, offset + size)`` if it lies inside one hole (recovery after restart, relocation)."""
        if offset % self.align or size % self.align:
            raise ValueError(f"extent ({offset}, {size}) is not {self.align}-aligned")
        i = bisect_right(self._starts, offset) - 1
        if i < 0 or self._starts[i] + self._sizes[i] < offset + size:
            return False
        start, hole = self._starts[i], self._sizes[i]
        # Split the hole into what lies before and after the claimed range.
        before, after = offset - start, start + hole - (offset + size)
        del self._starts[i], self._sizes[i]
        if after:
            self._starts.insert(i, offset + size)
            self._sizes.insert(i, after)
        if before:
            self._starts.insert(i, start)
            self._sizes.insert(i, before)
        return True

    def free(self, offset: int, size: int) -> None:
        """Return an extent, merging it with adjacent holes."""
        if offset < 0 or offset + size > self.capacity:
            raise ValueError(f"extent ({offset}, {size}) lies outside the arena of {self.capacity} bytes")
        i = bisect_left(self._starts, offset)
        if (i < len(self._starts) and self._starts[i] < offset + size) or (
            i > 0 and self._starts[i - 1] + self._sizes[i - 1] > offset
        ):
            raise ValueError(f"double free: extent ({offset}, {size}) overlaps a hole")
        merge_prev = i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset
        merge_next = i < len(self._starts) and self._starts[i] == offset + size
        if merge_prev and merge_next:
            self._sizes[i - 1] += size + self._sizes[i]
            del self._starts[i], self._sizes[i]
        elif merge_prev:
            self._sizes[i - 1] += size
        elif merge_next:
            self._starts[i] = offset
            self._sizes[i] += size
        else:
            self._starts.insert(i, offset)
            self._sizes.insert(i, size)

    def _take(self, i: int, start: int, size: int) -> None:
        if self._sizes[i] == size:
            del self._starts[i], self._sizes[i]
        else:
            self._starts[i] = start + size
            self._sizes[i] -= size
