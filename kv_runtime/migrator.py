"""Executes migration plans: batched copies of blocks between tiers, as asyncio tasks.

A plan moves many blocks in one direction. The migrator leases them (index pins, busy source slots), claims
destination slots under quota, moves the bytes, and only then registers the new copies: a block's copy in a
tier exists for everybody else exactly when its bytes are complete. Whatever happens — success, an I/O miss,
an exception, cancellation — every lease and every uncommitted slot is returned, and no slot is returned while
a copy (a DMA on the GPU, a read or write in an I/O thread) may still touch it.

How bytes move:

- HBM -> DDR: blocks are gathered out of the engine's layer rows into a preallocated device staging buffer
  (one kernel per chunk when the rows share a storage) on a gather stream, then copied to the pinned DDR
  slots on a dedicated copy stream; two staging buffers alternate so the gather of chunk i+1 overlaps the
  DMA of chunk i. Destination slots of a batch are adjacent where the pool allows, so a chunk is one copy.
- DDR -> HBM: the mirror image (DMA into staging, then scatter into the rows).
- DDR <-> disk: through ``kv_io.disk_store.DiskStore``; the payload is read into / written from the DDR slot.
- HBM <-> disk: through the same device path into pinned staging buffers, then the disk store.

No device-wide synchronisation anywhere: ordering is by CUDA events, and completion is observed by polling
the final event from asyncio (``kv_io.cuda.wait_event``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_io.cuda import CopyStream, require_cuda, wait_event
from kv_io.disk_store import BlockWrite, DiskWriteError
from kv_io.staging import StagingPool
from kv_runtime.hierarchy import REFUSED, WRITE_ERROR, HierarchyManager, Residency, disk_key
from kv_runtime.pool import DDRPool, DiskPool, HBMPool, Slot, Tier

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 << 20
DISK_GROUPS = 4  # concurrent store calls per plan: one's fdatasync and commit overlap the others' I/O
STAGING_BUFFERS = 4  # pinned chunks in flight between HBM and disk


class Outcome(enum.Enum):
    """What happened to one block of a plan."""

    OK = "ok"  # the destination copy is complete and registered
    MISS = "miss"  # the source copy was unreadable (corrupt, truncated, I/O error): discarded, counted
    FAILED = "failed"  # the destination could not be written (e.g. a disk write error): the source stays


@dataclass(slots=True)
class MigrationPlan:
    """Copy ``blocks`` from ``src`` to ``dst``; drop the source copies afterwards unless ``keep_source``.

    ``after`` is an optional CUDA event (e.g. recorded on the engine's compute stream after it wrote the
    blocks): device work of this plan waits for it, without the host waiting.
    """

    src: Tier
    dst: Tier
    blocks: Sequence[Residency]
    keep_source: bool = True
    after: Any = None


@dataclass(slots=True)
class MigrationResult:
    src: Tier
    dst: Tier
    moved: list[Residency] = field(default_factory=list)
    missed: list[Residency] = field(default_factory=list)  # the source copy was unreadable: discarded
    failed: list[Residency] = field(default_factory=list)  # the destination could not be written
    skipped: list[Residency] = field(default_factory=list)  # dropped meanwhile, or already in dst
    nbytes: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(slots=True)
class DirectionStats:
    """Totals of one direction. ``seconds`` is the time during which at least one of its plans was moving
    bytes: plans that overlap (a disk load reads all its chunks at once) count once, so ``gbps`` is what the
    direction delivered rather than bytes over a sum of overlapping durations."""

    blocks: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    plans: int = 0
    misses: int = 0
    failures: int = 0
    cancelled: int = 0
    active: int = 0
    busy_since: float = 0.0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def begin(self, now: float) -> None:
        """A plan of this direction starts moving bytes at ``now``."""
        if self.active == 0:
            self.busy_since = now
        self.active += 1

    def end(self, now: float) -> None:
        """A plan that began has ended (done, failed or cancelled) at ``now``."""
        self.active -= 1
        if self.active == 0:
            self.seconds += now - self.busy_since


class MigrationHandle:
    """A running plan: ``await handle`` (or ``handle.result()``) for its :class:`MigrationResult`."""

    __slots__ = ("plan", "task")

    def __init__(self, plan: MigrationPlan, task: asyncio.Task[MigrationResult]) -> None:
        self.plan = plan
        self.task = task

    def __await__(self):
        return self.task.__await__()

    async def result(self) -> MigrationResult:
        return await self.task

    def done(self) -> bool:
        return self.task.done()

    def cancel(self) -> bool:
        return self.task.cancel()


def _runs(slots: Sequence[Slot]) -> list[tuple[int, int]]:
    """``(first index, count)`` of maximal runs of slots whose payloads are adjacent in memory."""
    runs: list[tuple[int, int]] = []
    for i, s in enumerate(slots):
        if runs:
            j, m = runs[-1]
            prev = slots[i - 1]
            if s.arena == prev.arena and s.offset == prev.offset + prev.nbytes and s.nbytes == prev.nbytes:
                runs[-1] = (j, m + 1)
                continue
        runs.append((i, 1))
    return runs


class KVMigrator:
    """Runs :class:`MigrationPlan` s against a :class:`HierarchyManager`; keeps bandwidth per direction."""

    def __init__(
        self,
        hierarchy: HierarchyManager,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        staging: StagingPool | None = None,
        disk_groups: int = DISK_GROUPS,
    ) -> None:
        self.hierarchy = hierarchy
        self.chunk_bytes = chunk_bytes
        self._staging = staging
        if disk_groups < 1:
            raise ValueError(f"disk_groups must be >= 1, got {disk_groups}")
        self.disk_groups = disk_groups
        self._device: dict[str, Any] | None = None
        self._engine_pool: HBMPool | None = None
        self._submit_lock = threading.Lock()
        self._writing: dict[int, asyncio.Future] = {}  # id(block) -> the end of the plan writing it to disk
        self.stats: dict[str, DirectionStats] = {}

    # ------------------------------------------------------------------ public

    def migrate(self, plan: MigrationPlan) -> MigrationHandle:
        """Start executing ``plan``; returns at once with a handle on the task."""
        src, dst = Tier(plan.src), Tier(plan.dst)
        if src is dst:
            raise ValueError(f"a migration needs two different tiers, got {src.name} -> {dst.name}")
        for tier in (src, dst):
            self.hierarchy.pool(tier)
        if Tier.HBM in (src, dst):
            require_cuda("a migration to or from HBM")
        for r in plan.blocks:
            if not isinstance(r, Residency):
                raise TypeError(f"plans carry Residency records, got {type(r).__name__}")
        return MigrationHandle(plan, asyncio.get_running_loop().create_task(self._run(plan)))

    def copy_engine_cells(
        self, to_host: bool, cells: Sequence[Slot], ddr_slots: Sequence[Slot], *, after: Any = None
    ) -> torch.cuda.Event:
        """Queue a copy between cells the engine owns (``HBMPool.engine_cells``) and DDR slots; returns the
        event that completes with it. Callable from any thread; nothing waits on the host.

        No residency changes here: the caller registers DDR slots it filled (a save) or tells the engine its
        cells are ready (a load) once the event has completed. ``after`` must be an event recorded on the
        engine's compute stream by the caller's thread: copies out wait for the forward that wrote the cells,
        copies in wait for earlier kernels that may still read the recycled cells.
        """
        require_cuda("copies to or from engine cells")
        if len(cells) != len(ddr_slots) or not cells:
            raise ValueError(f"{len(cells)} cells and {len(ddr_slots)} DDR slots: need as many, at least one")
        return self._submit_device_copy(to_host, list(cells), self._host_pieces(list(ddr_slots)), after)

    def attach_engine_pool(self, pool: HBMPool) -> None:
        """Use ``pool`` (an engine's own device cells) for device copies when the hierarchy has no HBM tier of
        its own, as with LMDeploy, whose GPU prefix cache is the HBM tier."""
        if Tier.HBM in self.hierarchy.pools:
            raise ValueError("this hierarchy has an HBM tier of its own")
        if self._device is not None:
            raise RuntimeError("device copies have already started on another pool")
        self._engine_pool = pool

    def _hbm(self) -> HBMPool:
        pool = self.hierarchy.pools.get(Tier.HBM) or self._engine_pool
        if pool is None:
            raise ValueError("no HBM tier and no engine pool attached: nothing to copy to or from on the device")
        return pool

    def direction_stats(self) -> dict[str, dict[str, float]]:
        return {
            k: {
                "blocks": v.blocks,
                "bytes": v.nbytes,
                "seconds": v.seconds,
                "GBps": v.gbps,
                "plans": v.plans,
                "misses": v.misses,
                "failures": v.failures,
                "cancelled": v.cancelled,
            }
            for k, v in self.stats.items()
        }

    # ------------------------------------------------------------------ one plan

    async def _run(self, plan: MigrationPlan) -> MigrationResult:
        hier = self.hierarchy
        src, dst = Tier(plan.src), Tier(plan.dst)
        result = MigrationResult(src, dst)
        stats = self.stats.setdefault(f"{src.name}->{dst.name}", DirectionStats())
        blocks: list[Residency] = []
        elsewhere: list[asyncio.Future] = []  # writes of some of these blocks that other plans have in flight
        for r in plan.blocks:
            if r.dropped or src not in r.copies or dst in r.copies:
                result.skipped.append(r)
            elif dst is Tier.DISK and id(r) in self._writing:
                result.skipped.append(r)
                elsewhere.append(self._writing[id(r)])
            else:
                blocks.append(r)
        if dst is Tier.DISK:
            # A block computed again whose record survived a restart already has its disk copy: link it.
            linked = [r for r in blocks if hier.claim_recovered(r)]
            if linked:
                result.moved += linked
                blocks = [r for r in blocks if Tier.DISK not in r.copies]
            # NOTE: one write per block at a time. Two requests that saved the same prompt both ask for its
            # write-down; the store would refuse the second record of one name (a spurious failure), so the
            # later plan waits for the earlier one's write instead.
            done = asyncio.get_running_loop().create_future()
            for r in blocks:
                self._writing[id(r)] = done
            try:
                if blocks:
                    await self._run_blocks(plan, result, blocks, stats)
            finally:
                for r in blocks:
                    if self._writing.get(id(r)) is done:
                        del self._writing[id(r)]
                done.set_result(None)
            if elsewhere:
                await asyncio.wait(elsewhere)  # never cancels them: they are other plans'
        elif blocks:
            await self._run_blocks(plan, result, blocks, stats)
        if not plan.keep_source:
            for r in result.moved:
                hier.drop_copy(r, src)
        return result

    async def _run_blocks(
        self, plan: MigrationPlan, result: MigrationResult, blocks: list[Residency], stats: DirectionStats
    ) -> None:
        """Lease ``blocks``, claim their destination slots, move the bytes, commit; fills ``result``."""
        hier = self.hierarchy
        src, dst = result.src, result.dst
        src_slots = [r.copies[src] for r in blocks]
        while any(s.moving for s in src_slots):  # a disk relocation is in flight: let it finish
            await asyncio.sleep(0.001)
        hier.lease(blocks, (src,))
        n = len(blocks)
        dst_pool = hier.pool(dst)
        dst_slots: list[Slot | None] = [None] * n
        busy = [False] * n
        try:
            for tenant in dict.fromkeys(r.tenant for r in blocks):
                idx = [i for i, r in enumerate(blocks) if r.tenant == tenant]
                got = await hier.allocate_async(dst, [blocks[i].nbytes for i in idx], tenant)
                for i, slot in zip(idx, got, strict=True):
                    dst_slots[i] = slot
            for i, slot in enumerate(dst_slots):
                dst_pool.acquire_io(slot)
                busy[i] = True
            start = time.perf_counter()
            stats.begin(start)
            try:
                ok = await self._transfer(src, dst, blocks, src_slots, dst_slots, plan.after)
            finally:
                end = time.perf_counter()
                stats.end(end)
            result.seconds = end - start
            for i, r in enumerate(blocks):
                slot, dst_slots[i] = dst_slots[i], None
                dst_pool.release_io(slot)
                busy[i] = False
                if ok[i] is not Outcome.OK:
                    hier.free_slot(slot, r.tenant)
                    (result.missed if ok[i] is Outcome.MISS else result.failed).append(r)
                elif hier.add_copy(r, dst, slot):
                    result.moved.append(r)
                    result.nbytes += r.nbytes
                else:
                    result.skipped.append(r)
            stats.plans += 1
            stats.blocks += len(result.moved)
            stats.nbytes += result.nbytes
            stats.misses += len(result.missed)
            stats.failures += len(result.failed)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        finally:
            # Everything not committed above goes back: the transfer has ended (or was drained) by now.
            for i, slot in enumerate(dst_slots):
                if slot is None:
                    continue
                if busy[i]:
                    dst_pool.release_io(slot)
                hier.free_slot(slot, blocks[i].tenant)
            hier.unlease(blocks, slots=src_slots)
        for r in result.missed:
            hier.discard_invalid(r, src)

    async def _transfer(
        self,
        src: Tier,
        dst: Tier,
        blocks: list[Residency],
        src_slots: list[Slot],
        dst_slots: list[Slot],
        after: Any,
    ) -> list[Outcome]:
        """Move the bytes; returns per block whether its destination copy is complete and valid."""
        pools = self.hierarchy.pools
        n = len(blocks)
        if src is Tier.DDR and dst is Tier.DISK:
            ddr = pools[Tier.DDR]
            return await self._disk_write(blocks, dst_slots, [ddr.view(s) for s in src_slots])
        if src is Tier.DISK and dst is Tier.DDR:
            ddr = pools[Tier.DDR]
            return await self._disk_read(src_slots, [ddr.view(s) for s in dst_slots])
        if src is Tier.HBM and dst is Tier.DDR:
            await self._device_copy(True, src_slots, self._host_pieces(dst_slots), after)
            return [Outcome.OK] * n
        if src is Tier.DDR and dst is Tier.HBM:
            await self._device_copy(False, dst_slots, self._host_pieces(src_slots), after)
            return [Outcome.OK] * n
        if src is Tier.HBM and dst is Tier.DISK:
            return await self._hbm_disk(True, blocks, src_slots, dst_slots, after)
        if src is Tier.DISK and dst is Tier.HBM:
            return await self._hbm_disk(False, blocks, dst_slots, src_slots, after)
        raise ValueError(f"no path from {src.name} to {dst.name}")

    # ------------------------------------------------------------------ disk

    async def _disk_write(
        self, blocks: list[Residency], slots: list[Slot], payloads: list[torch.Tensor]
    ) -> list[Outcome]:
        """Batched writes, durable before published. The batch is split into a few concurrent groups so that
        one group's durability barrier and commit overlap another's I/O; each group is all or nothing."""
        disk: DiskPool = self.hierarchy.pools[Tier.DISK]
        items = []
        for r, slot, payload in zip(blocks, slots, payloads, strict=True):
            if r.node is None:
                raise ValueError("a block must be indexed before it is written to disk")
            items.append(BlockWrite(r.node.namespace, disk_key(r.node.key, r.node.check), disk.location(slot), payload))

        async def group(lo: int, hi: int) -> list[Outcome]:
            try:
                records = await disk.store.write_many(items[lo:hi])
            except DiskWriteError as exc:
                self.hierarchy.note_failure(Tier.DISK, WRITE_ERROR, hi - lo, exc)
                return [Outcome.FAILED] * (hi - lo)
            except ValueError as exc:  # the store refused: a slot or a name still in use (it wrote nothing)
                self.hierarchy.note_failure(Tier.DISK, REFUSED, hi - lo, exc)
                return [Outcome.FAILED] * (hi - lo)
            for slot, record in zip(slots[lo:hi], records, strict=True):
                slot.record = record  # set at once: freeing the slot later deletes the record
            return [Outcome.OK] * (hi - lo)

        return await self._grouped(len(items), group)

    async def _disk_read(self, slots: list[Slot], outs: list[torch.Tensor]) -> list[Outcome]:
        """Batched, verified reads in a few concurrent groups; a block that fails verification is a miss."""
        disk: DiskPool = self.hierarchy.pools[Tier.DISK]

        async def group(lo: int, hi: int) -> list[Outcome]:
            got = await disk.store.read_many([s.record for s in slots[lo:hi]], outs[lo:hi])
            return [Outcome.OK if ok else Outcome.MISS for ok in got]

        return await self._grouped(len(slots), group)

    async def _grouped(self, n: int, group) -> list[Outcome]:
        # gather() waits for every group even when cancelled: each store call finishes its own I/O first.
        step = -(-n // min(self.disk_groups, n))
        parts = await asyncio.gather(*(group(lo, min(n, lo + step)) for lo in range(0, n, step)))
        return [o for part in parts for o in part]

    # ------------------------------------------------------------------ device

    def _host_pieces(self, slots: list[Slot]) -> list[tuple[int, torch.Tensor]]:
        """``(first block index, host tensor)`` per run of adjacent DDR slots."""
        ddr: DDRPool = self.hierarchy.pools[Tier.DDR]
        return [(i, ddr.run_view(slots[i], sum(s.nbytes for s in slots[i : i + m]))) for i, m in _runs(slots)]

    def _cuda(self) -> dict[str, Any]:
        """Streams and the double device staging buffer, created once on first use."""
        if self._device is None:
            hbm: HBMPool = self._hbm()
            bb = hbm.layout.block_bytes
            per = max(1, self.chunk_bytes // bb)
            self._device = {
                "copy": CopyStream(hbm.device),
                "gather": CopyStream(hbm.device),
                "per_chunk": per,
                "stage": [torch.empty(per * bb, dtype=torch.uint8, device=hbm.device) for _ in range(2)],
                # Last use of each staging buffer, kept across plans: submissions of concurrent plans
                # interleave on the same two streams, and these events order their reuse of the buffers.
                "free": [None, None],
            }
        return self._device

    async def _device_copy(
        self,
        to_host: bool,
        hbm_slots: list[Slot],
        pieces: list[tuple[int, torch.Tensor]],
        after: Any,
    ) -> None:
        """Gather+DMA (to_host) or DMA+scatter between HBM cells and host runs; returns once it has ended."""
        final = self._submit_device_copy(to_host, hbm_slots, pieces, after)
        try:
            await wait_event(final)
        except asyncio.CancelledError:
            # The DMA cannot be recalled: wait for this one event (not the device) before slots are released.
            final.synchronize()
            raise

    def _submit_device_copy(
        self,
        to_host: bool,
        hbm_slots: list[Slot],
        pieces: list[tuple[int, torch.Tensor]],
        after: Any,
    ) -> torch.cuda.Event:
        """Queue the copy chunk by chunk on the two streams; returns the event of its last chunk.

        Thread-safe: the engine's threads submit copies of engine cells while kvtier's loop submits its own,
        and they share the staging buffers."""
        with self._submit_lock:
            return self._submit_device_copy_locked(to_host, hbm_slots, pieces, after)

    def _submit_device_copy_locked(
        self,
        to_host: bool,
        hbm_slots: list[Slot],
        pieces: list[tuple[int, torch.Tensor]],
        after: Any,
    ) -> torch.cuda.Event:
        dev = self._cuda()
        hbm: HBMPool = self._hbm()
        layout = hbm.layout
        bb, per = layout.block_bytes, dev["per_chunk"]
        copy, gather = dev["copy"], dev["gather"]
        n = len(hbm_slots)
        if after is None:
            # Without an explicit dependency, order after everything queued so far on the caller's stream
            # (the engine wrote the blocks there, or reads the cells we overwrite): an event, not a sync.
            after = torch.cuda.current_stream(hbm.device).record_event()
        ids_host = torch.tensor([s.offset for s in hbm_slots], dtype=torch.int64)
        if torch.cuda.is_available():
            ids_host = ids_host.pin_memory()
        with gather.use():
            ids = ids_host.to(hbm.device, non_blocking=True)
        # Host pieces split at chunk boundaries: (chunk, byte offset in the chunk, host tensor).
        plan: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(-(-n // per))]
        for first, host in pieces:
            count = host.numel() // bb
            i = first
            while i < first + count:
                c = i // per
                take = min(first + count, (c + 1) * per) - i
                plan[c].append(((i - c * per) * bb, host[(i - first) * bb : (i - first + take) * bb]))
                i += take
        free = dev["free"]
        final = None
        for c, chunk_pieces in enumerate(plan):
            k = min(per, n - c * per)
            buf = dev["stage"][c % 2][: k * bb]
            blocks3 = buf.view(k, layout.num_layers, layout.layer_block_bytes)
            chunk_ids = ids[c * per : c * per + k]
            if to_host:
                with gather.use():
                    gather.wait(after)
                    gather.wait(free[c % 2])
                    hbm.gather(chunk_ids, blocks3)
                    ready = gather.record()
                copy.wait(ready)
                for off, host in chunk_pieces:
                    final = copy.copy(host, buf[off : off + host.numel()])
                free[c % 2] = final
            else:
                copy.wait(free[c % 2])
                for off, host in chunk_pieces:
                    landed = copy.copy(buf[off : off + host.numel()], host)
                with gather.use():
                    gather.wait(after)
                    gather.wait(landed)
                    hbm.scatter(chunk_ids, blocks3)
                    final = free[c % 2] = gather.record()
        return final

    async def _hbm_disk(
        self, to_disk: bool, blocks: list[Residency], hbm_slots: list[Slot], disk_slots: list[Slot], after: Any
    ) -> list[Outcome]:
        """HBM <-> disk through pinned staging buffers. Chunks run concurrently, bounded by the staging pool,
        so the device copy of one chunk overlaps the disk I/O of the next."""
        staging = self._staging_pool()
        bb = self._hbm().layout.block_bytes
        per = max(1, staging.buffer_bytes // bb)

        async def chunk(part: slice) -> list[Outcome]:
            k = part.stop - part.start
            async with staging.lease() as buf:
                views = [buf[j * bb : (j + 1) * bb] for j in range(k)]
                if to_disk:
                    await self._device_copy(True, hbm_slots[part], [(0, buf[: k * bb])], after)
                    return await self._disk_write(blocks[part], disk_slots[part], views)
                got = await self._disk_read(disk_slots[part], views)
                # Blocks that missed are not copied up; the rest go in one batch.
                keep = [j for j in range(k) if got[j] is Outcome.OK]
                if keep:
                    pieces = [(i, views[j]) for i, j in enumerate(keep)]
                    await self._device_copy(False, [hbm_slots[part][j] for j in keep], pieces, after)
                return got

        parts = [slice(lo, min(len(blocks), lo + per)) for lo in range(0, len(blocks), per)]
        results = await asyncio.gather(*(chunk(p) for p in parts))
        return [o for r in results for o in r]

    def _staging_pool(self) -> StagingPool:
        if self._staging is None:
            bb = self._hbm().layout.block_bytes
            per = max(1, self.chunk_bytes // bb)
            self._staging = StagingPool(per * bb, STAGING_BUFFERS)
        return self._staging
