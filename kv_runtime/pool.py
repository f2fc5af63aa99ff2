"""Block pools, one per tier: where a block's bytes sit inside HBM, DDR or disk.

Every pool hands out :class:`Slot` handles. A slot is reference counted (the last ``free`` returns its space)
and may be *busy* (an I/O lease: a copy is reading or writing it); busy slots never move. The defragmenter
moves idle slots and updates their handles in place, so a holder's handle stays valid across compaction.

- :class:`HBMPool` mirrors an engine's paged pool: one uint8 row per layer ``[num_blocks, layer_block_bytes]``
  on the GPU, fixed-size cells addressed by block id. Fixed cells cannot fragment (any free cell fits any
  block), so its defragmenter has nothing to move.
- :class:`DDRPool` is one host allocation (pinned when CUDA is present, so copies to and from the GPU never
  go through pageable memory) carved into variable-size extents; compaction slides live extents down with
  ``memmove``.
- :class:`DiskPool` carves slab files into extents (the store creates and preallocates each file on its first
  write, and the allocator fills the lowest slabs first, so a cache uses only the files it needs); the bytes,
  their format and their durability belong to ``kv_io.disk_store.DiskStore``. Compaction moves a block only
  into a hole that does not overlap it (``DiskStore.relocate``), so a crash during defragmentation loses
  nothing: the old copy stays valid until the new one is durable.

Utilisation is live payload bytes over the bytes *spanned*: for each arena, from its start to the end of its
highest allocated extent. It measures how tightly live data is packed, which is what fragmentation costs;
occupancy (live bytes over capacity) is reported separately. Fragmentation is ``1 - sum of each arena's
largest hole / total free bytes``: 0 when every arena's free space is one hole.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import heapq
import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kv_io.align import aligned_empty, round_up
from kv_io.disk_format import ALIGN, block_capacity
from kv_io.disk_store import DiskLocation, DiskStore
from kv_runtime.extents import ExtentAllocator
from kv_runtime.layout import KVLayout
from kv_runtime.tier import Tier

if TYPE_CHECKING:
    from kv_io.disk_store import DiskRecord

HOST_ALIGN = 4096
MAX_SLAB_BYTES = 256 << 20  # slab files of a sized disk pool
log = logging.getLogger(__name__)


class PoolFullError(MemoryError):
    """No free space of the requested size in the tier (after any eviction the caller attempted)."""


class TierUnavailableError(RuntimeError):
    """The tier cannot exist on this machine (e.g. HBM without CUDA)."""


_slot_ids = itertools.count(1)


@dataclass(slots=True, eq=False)
class Slot:
    """A handle on one block's space in one tier. ``offset`` is a byte offset (DDR, disk) or a block id (HBM).

    Identity-hashed: the pool keeps exactly one handle per extent and updates it in place when defragmentation
    moves the extent.
    """

    tier: Tier
    arena: int
    offset: int
    nbytes: int
    capacity: int
    refs: int = 1
    busy: int = 0
    moving: bool = False  # a disk relocation is in flight: copies wait until it ends
    record: DiskRecord | None = None
    id: int = field(default_factory=lambda: next(_slot_ids))

    @property
    def live(self) -> bool:
        return self.refs > 0


@dataclass(slots=True, frozen=True)
class BlockInfo:
    tier: Tier
    arena: int
    offset: int
    nbytes: int
    capacity: int
    refs: int
    busy: int


@dataclass(slots=True, frozen=True)
class PoolStats:
    tier: Tier
    capacity_bytes: int
    live_bytes: int
    reserved_bytes: int
    live_blocks: int
    utilization: float
    occupancy: float
    fragmentation: float


@dataclass(slots=True, frozen=True)
class DefragReport:
    tier: Tier
    moved_blocks: int
    moved_bytes: int
    skipped_busy: int
    utilization_before: float
    utilization_after: float
    fragmentation_before: float
    fragmentation_after: float


class KVPool(abc.ABC):
    """The block manager of one tier: allocation, reference counts, statistics and compaction."""

    tier: Tier

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._slots: dict[int, Slot] = {}
        self._live_bytes = 0
        self._reserved_bytes = 0

    # ------------------------------------------------------------------ allocation

    def allocate(self, nbytes: int) -> Slot:
        """One slot for a block of ``nbytes``; raises :class:`PoolFullError` when nothing fits."""
        return self.allocate_many([nbytes])[0]

    def allocate_many(self, sizes: Sequence[int]) -> list[Slot]:
        """Slots for several blocks, all or none. Equal sizes are placed adjacently where possible, so a
        batched copy moves them with one transfer."""
        if not sizes:
            return []
        for n in sizes:
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"block sizes must be positive ints, got {n!r}")
        with self._lock:
            slots = self._allocate_locked(list(sizes))
            for s in slots:
                self._slots[s.id] = s
                self._live_bytes += s.nbytes
                self._reserved_bytes += s.capacity
            return slots

    def retain(self, slot: Slot) -> None:
        with self._lock:
            self._require_live(slot)
            slot.refs += 1

    def free(self, slot: Slot) -> bool:
        """Drop one reference; returns True when this released the space."""
        with self._lock:
            self._require_live(slot)
            if slot.refs == 1 and slot.busy:
                raise RuntimeError("cannot release a slot while a copy is using it (busy)")
            slot.refs -= 1
            if slot.refs:
                return False
            del self._slots[slot.id]
            self._live_bytes -= slot.nbytes
            self._reserved_bytes -= slot.capacity
            self._release_locked(slot)
            return True

    def acquire_io(self, slot: Slot) -> None:
        """Mark a slot busy for the duration of a copy: it neither moves nor gets released meanwhile."""
        with self._lock:
            self._require_live(slot)
            if slot.moving:
                raise RuntimeError("the slot is being relocated; wait until slot.moving is False")
            slot.busy += 1

    def release_io(self, slot: Slot) -> None:
        with self._lock:
            if slot.busy <= 0:
                raise RuntimeError("release_io without acquire_io")
            slot.busy -= 1

    def _require_live(self, slot: Slot) -> None:
        if slot.tier is not self.tier or self._slots.get(slot.id) is not slot:
            raise ValueError(f"slot {slot.id} is not a live slot of the {self.tier.name} pool")

    # ------------------------------------------------------------------ statistics

    def get_block_info(self, slot: Slot) -> BlockInfo:
        with self._lock:
            self._require_live(slot)
            return BlockInfo(slot.tier, slot.arena, slot.offset, slot.nbytes, slot.capacity, slot.refs, slot.busy)

    @property
    def live_bytes(self) -> int:
        return self._live_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self._reserved_bytes

    def live_slots(self) -> list[Slot]:
        with self._lock:
            return list(self._slots.values())

    def get_utilization(self) -> float:
        """Live payload bytes / bytes spanned (see the module docstring); 1.0 for an empty pool (nothing wasted)."""
        with self._lock:
            span = self._span_locked()
            return self._live_bytes / span if span else 1.0

    def get_occupancy(self) -> float:
        return self._live_bytes / self.capacity_bytes

    def get_fragmentation(self) -> float:
        with self._lock:
            return self._fragmentation_locked()

    def stats(self) -> PoolStats:
        with self._lock:
            span = self._span_locked()
            return PoolStats(
                tier=self.tier,
                capacity_bytes=self.capacity_bytes,
                live_bytes=self._live_bytes,
                reserved_bytes=self._reserved_bytes,
                live_blocks=len(self._slots),
                utilization=self._live_bytes / span if span else 1.0,
                occupancy=self._live_bytes / self.capacity_bytes,
                fragmentation=self._fragmentation_locked(),
            )

    # ------------------------------------------------------------------ per-tier hooks

    @abc.abstractmethod
    def _allocate_locked(self, sizes: list[int]) -> list[Slot]:
        """Tier-specific; called with the pool lock held."""

    @abc.abstractmethod
    def _release_locked(self, slot: Slot) -> None:
        """Tier-specific; called with the pool lock held."""

    @abc.abstractmethod
    def _span_locked(self) -> int:
        """Tier-specific; called with the pool lock held."""

    @abc.abstractmethod
    def _fragmentation_locked(self) -> float:
        """Tier-specific; called with the pool lock held."""

    @abc.abstractmethod
    async def defragment(self) -> DefragReport:
        """Compact the tier without losing a block; handles of moved blocks are updated in place."""


class _ExtentPool(KVPool):
    """A tier made of arenas carved into variable-size extents (DDR: one arena; disk: one per slab)."""

    def __init__(self, arena_bytes: int, num_arenas: int, align: int) -> None:
        self._arenas = [ExtentAllocator(arena_bytes, align) for _ in range(num_arenas)]
        super().__init__(sum(a.capacity for a in self._arenas))
        self.align = align

    def reserve_bytes(self, nbytes: int) -> int:
        """Bytes a block of ``nbytes`` occupies in this tier (the extent size)."""
        return self._arenas[0].size_of(nbytes)

    def _allocate_locked(self, sizes: list[int]) -> list[Slot]:
        caps = [self.reserve_bytes(n) for n in sizes]
        if len(set(caps)) == 1 and len(caps) > 1:
            for a, arena in enumerate(self._arenas):
                start = arena.allocate_run(caps[0], len(caps))
                if start is not None:
                    return [Slot(self.tier, a, start + i * caps[0], n, caps[0]) for i, n in enumerate(sizes)]
        out: list[Slot] = []
        for n, cap in zip(sizes, caps, strict=True):
            for a, arena in enumerate(self._arenas):
                off = arena.allocate(cap)
                if off is not None:
                    out.append(Slot(self.tier, a, off, n, cap))
                    break
            else:
                for s in out:
                    self._arenas[s.arena].free(s.offset, s.capacity)
                raise PoolFullError(
                    f"{self.tier.name}: no free extent of {cap} bytes "
                    f"({self.capacity_bytes - self._reserved_bytes} bytes free in holes)"
                )
        return out

    def _release_locked(self, slot: Slot) -> None:
        self._arenas[slot.arena].free(slot.offset, slot.capacity)

    def _span_locked(self) -> int:
        span = 0
        for arena in self._arenas:
            holes = list(arena.free_extents())
            if holes and holes[-1][0] + holes[-1][1] == arena.capacity:
                span += holes[-1][0]
            else:
                span += arena.capacity
        return span

    def _fragmentation_locked(self) -> float:
        free = sum(a.free_bytes for a in self._arenas)
        if not free:
            return 0.0
        return 1.0 - sum(a.largest_free for a in self._arenas) / free

    def _arena_slots(self, arena: int) -> list[Slot]:
        return sorted((s for s in self._slots.values() if s.arena == arena), key=lambda s: s.offset)

    def _report(self, moved: int, moved_bytes: int, skipped: int, before: tuple[float, float]) -> DefragReport:
        st = self.stats()
        return DefragReport(
            self.tier, moved, moved_bytes, skipped, before[0], st.utilization, before[1], st.fragmentation
        )


class DDRPool(_ExtentPool):
    """One host allocation carved into extents; pinned when CUDA is available (or when ``pin=True``)."""

    tier = Tier.DDR

    def __init__(self, capacity_bytes: int, *, pin: bool | None = None) -> None:
        super().__init__(capacity_bytes, 1, HOST_ALIGN)
        want_pin = torch.cuda.is_available() if pin is None else pin
        if want_pin and not torch.cuda.is_available():
            raise TierUnavailableError("pinned host memory needs CUDA; pass pin=False for plain host memory")
        # One allocation for the tier's life: pinning is expensive and must never happen on the hot path.
        self.buffer = aligned_empty(self.capacity_bytes, pin=want_pin, align=HOST_ALIGN)
        self.pinned = want_pin

    def view(self, slot: Slot) -> torch.Tensor:
        """The block's bytes in host memory (a view, no copy)."""
        self._require_live(slot)
        return self.buffer[slot.offset : slot.offset + slot.nbytes]

    def run_view(self, first: Slot, nbytes: int) -> torch.Tensor:
        """``nbytes`` from ``first``'s offset: several adjacent slots as one tensor, for one batched copy."""
        return self.buffer[first.offset : first.offset + nbytes]

    async def defragment(self) -> DefragReport:
        """Slide every idle extent down into the hole just below it, in offset order (memmove handles the
        overlap). Busy extents stay where they are. Runs synchronously under the pool lock, so no allocation
        interleaves with a move."""
        before = (self.get_utilization(), self.get_fragmentation())
        moved = moved_bytes = skipped = 0
        with self._lock:
            arena = self._arenas[0]
            base = self.buffer.data_ptr()
            for slot in self._arena_slots(0):
                hole = arena.hole_before(slot.offset)
                if hole is None:
                    continue
                if slot.busy:
                    skipped += 1
                    continue
                dest = hole[0]
                ctypes.memmove(base + dest, base + slot.offset, slot.nbytes)
                arena.free(slot.offset, slot.capacity)
                if not arena.allocate_at(dest, slot.capacity):
                    raise AssertionError("defragmentation lost track of free space")
                slot.offset = dest
                moved += 1
                moved_bytes += slot.nbytes
        return self._report(moved, moved_bytes, skipped, before)


class DiskPool(_ExtentPool):
    """Slab files carved into extents; bytes go through :class:`kv_io.disk_store.DiskStore`."""

    tier = Tier.DISK

    def __init__(self, store: DiskStore, slab_bytes: int, num_slabs: int) -> None:
        super().__init__(slab_bytes, num_slabs, ALIGN)
        self.store = store
        # Freed slots whose records are still published: their extents return only after the store deleted
        # the record, so a restart can never find a stale record overlapping a newer block.
        self._retiring: list[Slot] = []
        # Slots whose record the store failed to delete: their extents stay claimed (reusing them could leave
        # a record pointing at a newer block); the next reap() tries again.
        self._undeleted: list[Slot] = []
        self._reaper: asyncio.Task | None = None
        # One reap at a time: a reap() that returns has deleted every record retired before it was called,
        # including those another reap had taken off the list and was still deleting.
        self._reap_lock = asyncio.Lock()
        self.overlapping_records = 0
        self.delete_errors = 0
        self._delete_error_logged = False

    @classmethod
    async def open(
        cls, directory: Any, *, slab_bytes: int, num_slabs: int, file_io: Any = None, io_threads: int | None = None
    ) -> DiskPool:
        """Open (or create) the store and rebuild the allocator from every block it has published."""
        store = await DiskStore.open(
            directory, slab_bytes=slab_bytes, num_slabs=num_slabs, file_io=file_io, io_threads=io_threads
        )
        pool = cls(store, slab_bytes, num_slabs)
        pool.adopt_records(store.records())
        return pool

    @classmethod
    async def open_sized(
        cls, directory: Any, capacity_bytes: int, *, file_io: Any = None, io_threads: int | None = None
    ) -> DiskPool:
        """:meth:`open` with ``capacity_bytes`` split into slab files of at most ``MAX_SLAB_BYTES``."""
        if capacity_bytes <= 0:
            raise ValueError(f"disk capacity must be > 0, got {capacity_bytes}")
        slab = min(MAX_SLAB_BYTES, round_up(capacity_bytes, ALIGN))
        num_slabs = -(-capacity_bytes // slab)
        return await cls.open(directory, slab_bytes=slab, num_slabs=num_slabs, file_io=file_io, io_threads=io_threads)

    def reserve_bytes(self, nbytes: int) -> int:
        return block_capacity(nbytes)

    def _release_locked(self, slot: Slot) -> None:
        if slot.record is None:
            self._arenas[slot.arena].free(slot.offset, slot.capacity)
            return
        self._retiring.append(slot)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop in this thread: the next reap() (allocation path, close) deletes it
        if self._reaper is None or self._reaper.done():
            self._reaper = loop.create_task(self.reap())

    async def reap(self) -> int:
        """Delete the records of freed slots from the store, then return their extents; returns how many.

        When it returns, every slot retired before the call has had its record deleted and its extent returned
        (or, where the store failed to delete the record, kept claimed and counted in ``delete_errors``): an
        allocation that evicted can await this and then use the victims' extents.
        """
        done = 0
        async with self._reap_lock:
            with self._lock:
                self._retiring.extend(self._undeleted)
                self._undeleted.clear()
            while True:
                with self._lock:
                    if not self._retiring:
                        return done
                    slot = self._retiring.pop()
                try:
                    await self.store.delete(slot.record)
                except KeyError:
                    pass  # the store holds no such record (any more): nothing can point at the extent
                except Exception as exc:
                    self.delete_errors += 1
                    if not self._delete_error_logged:
                        self._delete_error_logged = True
                        log.warning(
                            "disk: deleting the record at slab %d offset %d failed; its space stays claimed "
                            "until a later delete succeeds (further failures are only counted): %s",
                            slot.arena,
                            slot.offset,
                            exc,
                        )
                    with self._lock:
                        self._undeleted.append(slot)
                    continue
                except BaseException:
                    with self._lock:
                        self._retiring.append(slot)  # cancelled mid-delete: a later reap finishes it
                    raise
                with self._lock:
                    self._arenas[slot.arena].free(slot.offset, slot.capacity)
                done += 1

    @property
    def retiring(self) -> int:
        """Freed slots whose extents are not back yet (records to delete, or whose delete failed)."""
        return len(self._retiring) + len(self._undeleted)

    def location(self, slot: Slot) -> DiskLocation:
        return DiskLocation(slot.arena, slot.offset, slot.capacity)

    def adopt_records(self, records: Sequence[DiskRecord]) -> list[Slot]:
        """Slots for blocks already on disk (after a restart): their extents become allocated again."""
        out = []
        with self._lock:
            for rec in records:
                loc = rec.location
                if not self._arenas[loc.slab].allocate_at(loc.offset, loc.capacity):
                    # Only a store that lost a delete can hold these; the first record keeps the extent.
                    self.overlapping_records += 1
                    log.warning("disk: record at slab %d offset %d overlaps another; ignored", loc.slab, loc.offset)
                    continue
                slot = Slot(Tier.DISK, loc.slab, loc.offset, rec.length, loc.capacity, record=rec)
                self._slots[slot.id] = slot
                self._live_bytes += slot.nbytes
                self._reserved_bytes += slot.capacity
                out.append(slot)
        return out

    async def defragment(self) -> DefragReport:
        """Slide every idle block down into the hole just below it, slab by slab, in offset order.

        ``DiskStore.relocate`` writes the copy durably and verifies it before it repoints the record, so the
        block stays readable throughout; when the new slot overlaps the old one a crash in the middle can
        leave a block that fails verification (a miss, never wrong bytes). The union of both slots stays
        claimed until the move ends, the slot is marked ``moving`` (migrations wait for it), and allocations
        elsewhere go on meanwhile.
        """
        before = (self.get_utilization(), self.get_fragmentation())
        moved = moved_bytes = skipped = 0
        for a, arena in enumerate(self._arenas):
            with self._lock:
                slots = self._arena_slots(a)
            for slot in slots:
                with self._lock:
                    if self._slots.get(slot.id) is not slot or slot.record is None:
                        continue
                    hole = arena.hole_before(slot.offset)
                    if hole is None:
                        continue
                    if slot.busy:
                        skipped += 1
                        continue
                    old, dest, cap = slot.offset, hole[0], slot.capacity
                    claim_end = min(old, dest + cap)
                    arena.allocate_at(dest, claim_end - dest)
                    slot.moving = True
                    slot.refs += 1  # held across the move: a drop meanwhile releases it after, at its new place
                try:
                    new_record = await self.store.relocate(slot.record, DiskLocation(a, dest, cap))
                except Exception as exc:
                    log.warning("disk: relocating a block failed, it stays in place: %s", exc)
                    with self._lock:
                        arena.free(dest, claim_end - dest)
                        slot.moving = False
                    self.free(slot)
                    continue
                with self._lock:
                    arena.free(max(old, dest + cap), old + cap - max(old, dest + cap))
                    slot.offset, slot.record, slot.moving = dest, new_record, False
                self.free(slot)
                moved += 1
                moved_bytes += slot.nbytes
        return self._report(moved, moved_bytes, skipped, before)


def blocks_view(rows: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A block-major view ``[num_blocks, num_layers, row_bytes]`` of layer rows that share one storage at a
    uniform stride (as one layer-major allocation does), or None when they do not."""
    first = rows[0]
    if not all(r.is_contiguous() for r in rows):
        return None
    storage = first.untyped_storage().data_ptr()
    if any(r.untyped_storage().data_ptr() != storage for r in rows):
        return None
    step = rows[1].storage_offset() - first.storage_offset() if len(rows) > 1 else first.numel()
    if step <= 0 or any(r.storage_offset() != first.storage_offset() + i * step for i, r in enumerate(rows)):
        return None
    n, width = first.shape
    return torch.as_strided(first, (n, len(rows), width), (width, step, 1), first.storage_offset())


class HBMPool(KVPool):
    """A paged device pool in the engine's layout: ``num_layers`` uint8 rows ``[num_blocks, layer_block_bytes]``.

    Owned by this runtime (the transformers path, benchmarks); with LMDeploy the engine's own rows are
    passed in as ``rows``. Cells are addressed by block id; ``Slot.offset`` is the id.
    """

    tier = Tier.HBM

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        *,
        device: torch.device | str | None = None,
        rows: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise TierUnavailableError("the HBM tier needs a CUDA device; none is available on this machine")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        super().__init__(num_blocks * layout.block_bytes)
        self.layout = layout
        self.num_blocks = num_blocks
        if rows is None:
            # One allocation, layer-major: layer rows are views, and blocks_view() lets a gather be one kernel.
            dev = torch.device(device or "cuda")
            storage = torch.empty(
                layout.num_layers, num_blocks, layout.layer_block_bytes, dtype=torch.uint8, device=dev
            )
            self.rows: list[torch.Tensor] = list(storage.unbind(0))
        else:
            self.rows = list(rows)
            expected = (num_blocks, layout.layer_block_bytes)
            if len(self.rows) != layout.num_layers or any(
                r.dtype != torch.uint8 or tuple(r.shape) != expected or r.device.type != "cuda" for r in self.rows
            ):
                raise ValueError(f"rows must be {layout.num_layers} CUDA uint8 tensors of shape {expected}")
        self.device = self.rows[0].device
        self._blocks = blocks_view(self.rows)
        self._free_ids = list(range(num_blocks))
        heapq.heapify(self._free_ids)

    def engine_cells(self, ids: Sequence[int]) -> list[Slot]:
        """Handles on cells the engine owns (its own block ids, e.g. LMDeploy's): for copies in and out only.

        They are not this pool's allocations (no reference counts, no quota); the engine allocates and frees
        the cells, and kvtier never registers them as copies of a block: HBM hits stay the engine's.
        """
        bb = self.layout.block_bytes
        out = []
        for i in ids:
            if isinstance(i, bool) or not 0 <= int(i) < self.num_blocks:
                raise ValueError(f"cell id {i!r} is outside this pool's {self.num_blocks} cells")
            out.append(Slot(Tier.HBM, 0, int(i), bb, bb))
        return out

    def gather(self, ids: torch.Tensor, out: torch.Tensor) -> None:
        """Blocks ``ids`` (a device int64 tensor) into ``out`` ``[len(ids), num_layers, layer_block_bytes]``,
        on the current stream: one kernel when the rows share a storage, one per layer otherwise."""
        if self._blocks is not None:
            torch.index_select(self._blocks, 0, ids, out=out)
        else:
            for layer, row in enumerate(self.rows):
                out[:, layer].copy_(row.index_select(0, ids))

    def scatter(self, ids: torch.Tensor, src: torch.Tensor) -> None:
        """The inverse of :meth:`gather`: ``src`` ``[len(ids), num_layers, layer_block_bytes]`` into cells ``ids``."""
        if self._blocks is not None:
            self._blocks.index_copy_(0, ids, src)
        else:
            for layer, row in enumerate(self.rows):
                row.index_copy_(0, ids, src[:, layer])

    def _allocate_locked(self, sizes: list[int]) -> list[Slot]:
        bb = self.layout.block_bytes
        for n in sizes:
            if n != bb:
                raise ValueError(f"HBM cells hold blocks of exactly {bb} bytes, got {n}")
        if len(sizes) > len(self._free_ids):
            raise PoolFullError(f"HBM: {len(sizes)} blocks requested, {len(self._free_ids)} free")
        return [Slot(Tier.HBM, 0, heapq.heappop(self._free_ids), bb, bb) for _ in sizes]

    def _release_locked(self, slot: Slot) -> None:
        heapq.heappush(self._free_ids, slot.offset)

    def _span_locked(self) -> int:
        if not self._slots:
            return 0
        return (max(s.offset for s in self._slots.values()) + 1) * self.layout.block_bytes

    def _fragmentation_locked(self) -> float:
        return 0.0  # fixed-size cells: any free cell fits any block

    async def defragment(self) -> DefragReport:
        """Fixed-size cells never fragment, and the engine's block tables name cells by id: nothing moves."""
        u, f = self.get_utilization(), self.get_fragmentation()
        return DefragReport(Tier.HBM, 0, 0, 0, u, u, f, f)
