"""The tier service: the whole life of a request's blocks in kvtier's tiers, for whichever engine drives it.

Both engines (the embedded transformers engine in ``kv_pipeline.scheduler`` and LMDeploy's connector in
``backends/lmdeploy_*``) drive this one object; each keeps only what is its own: copying bytes in and out of
its cache, and its scheduling. For one request:

1. :meth:`TierService.lookup` — the prompt's keys against the index (blocks recovered from disk after a restart
   are linked here), the cost plan over what kvtier holds, and a lease (index pins) on the blocks the plan
   loads. Nothing else changes: a lookup that loads nothing holds nothing.
2. :meth:`TierService.load` — the leased blocks reach the engine in order through DDR: blocks already in DDR go
   as they are; disk-only blocks are promoted (each verified by the disk store) in chunks that fit the DDR
   tier, the next chunk's read overlapping the engine's copy of the current one. A chunk's pins are returned
   as soon as the engine holds its bytes, so a prefix larger than the free DDR streams through it and is
   reused in full. A block that fails verification ends the load there: the engine recomputes the rest.
3. :meth:`TierService.reserve` / :meth:`publish` (or :meth:`save`, both in one) — new full blocks get DDR
   slots (making room by eviction, demoting first under write-back), the engine copies into them, and they
   become visible in the index only then; the migration policy decides which go down to disk.
4. :meth:`TierService.release` — every pin the lease still holds goes back; a block a miss left without any
   copy leaves the index, so it can be cached again.

Disk writes never delay a load a request waits for: they wait while loads are in flight. Background work
(write-down, demotion) runs as tasks on the service's event loop, which any thread may hand work to.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kv_io.private_files import ensure_private_dir
from kv_policy import BlockInfo, CostBenefitModel, LoadPlan, MigrationPolicy, ModelShape, TierLink
from kv_runtime.budget import ByteBudget
from kv_runtime.config import ConfigError, KVTierConfig
from kv_runtime.hierarchy import ERROR, PARENT_EVICTED, HierarchyManager, Residency
from kv_runtime.hierarchy import NO_ROOM as NO_ROOM_REASON
from kv_runtime.layout import KVLayout
from kv_runtime.migrator import KVMigrator, MigrationPlan
from kv_runtime.pool import DDRPool, DiskPool, PoolFullError, Slot, Tier
from kv_runtime.quota import QuotaExceededError
from prefix_reuse import BlockKeyer, BlockNode, PinnedError, RequestKeys, StaleNodeError

log = logging.getLogger(__name__)

TIER_NAMES = {Tier.HBM: "hbm", Tier.DDR: "ddr", Tier.DISK: "disk"}
# Disk -> DDR promotion per chunk: the engine's copy of one chunk overlaps the read of the next.
LOAD_CHUNK_BYTES = 256 << 20
MAX_READ_AHEAD = 8  # promotions in flight ahead of the piece being delivered (drive queue depth)
# The prefill prior when none is configured and the engine cannot be timed at start (LMDeploy's): a GPU-class
# figure. The transformers engine refines it online from its prefills; LMDeploy's connector does not see them.
GPU_PREFILL_TFLOPS_PRIOR = 400.0
NO_ROOM = (PoolFullError, QuotaExceededError)

Sink = Callable[[int, Sequence[Residency]], Awaitable[None]]
"""``sink(offset, blocks)`` copies ``blocks``' DDR copies into the engine at block ``offset`` of the load, and
returns once the engine no longer needs the DDR slots (its copy has completed)."""


@dataclass(slots=True)
class Lease:
    """A request's hold on its matched blocks: ``nodes`` are blocks ``[first, first + len(nodes))`` of ``rk``,
    pinned until :meth:`TierService.release` (loaded chunks are returned as they land)."""

    rk: RequestKeys
    first: int
    nodes: list[BlockNode]
    plan: LoadPlan
    tenant: str = ""
    returned: set[int] = field(default_factory=set)  # positions in ``nodes`` whose pin went back already

    @property
    def load_blocks(self) -> list[BlockNode]:
        """The blocks the plan loads (the front of a "both" plan is recomputed while these load)."""
        return self.nodes[self.plan.recompute_front : self.plan.load_end]

    @property
    def choice(self) -> str:
        return self.plan.choice


@dataclass(slots=True)
class LoadResult:
    """What a load delivered: ``blocks`` from the start of the lease's load range, in order."""

    blocks: int = 0
    from_disk: int = 0
    misses: int = 0
    nbytes: int = 0
    seconds: float = 0.0


def _load_everything(n: int) -> LoadPlan:
    return LoadPlan("load", n, 0, n, {}, 0.0, float("inf"), 0.0, float("inf"))


def _check_host_memory(ddr_bytes: int) -> None:
    """A DDR tier is allocated (and pinned, where there is CUDA) whole at start: a size beyond this machine's
    memory is a configuration mistake, refused before the allocation rather than failing inside it."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if ddr_bytes > total:
        raise ConfigError(
            f"ddr_bytes: {ddr_bytes / 2**30:.1f} GiB asked, this machine has {total / 2**30:.1f} GiB of memory"
        )


class TierService:
    """kvtier's tiers, index, migrator, cost model and migration policy behind one request lifecycle."""

    def __init__(
        self,
        hierarchy: HierarchyManager,
        migrator: KVMigrator,
        cost: CostBenefitModel,
        policy: MigrationPolicy,
        keyer: BlockKeyer,
        *,
        max_inflight_bytes: int = 256 << 20,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.hierarchy = hierarchy
        self.migrator = migrator
        self.cost = cost
        self.policy = policy
        self.keyer = keyer
        self.block_size = keyer.block_size
        self.loads = ByteBudget(max_inflight_bytes)
        self.saves = ByteBudget(max_inflight_bytes)
        self.loop = loop or asyncio.get_running_loop()  # where its transfers and background work run
        self._loads_running = 0
        self._loads_idle = asyncio.Event()
        self._loads_idle.set()
        self._background: set[asyncio.Future | Future] = set()
        self._lock = threading.Lock()

    # ================================================================== building the tiers from one configuration

    @classmethod
    async def open(
        cls,
        config: KVTierConfig,
        layout: KVLayout,
        keyer: BlockKeyer,
        model_config: Any,
        *,
        device: torch.device | str = "cpu",
        calibrate_prefill: Callable[[], float] | None = None,
    ) -> TierService:
        """The tiers the configuration asks for (DDR, and disk when ``disk_bytes`` > 0, recovered after a
        restart), the migrator, the cost model with the configured or measured priors, and the migration policy.
        Called on the event loop the service will run its transfers on."""
        config.check_engine()
        _check_host_memory(config.ddr_bytes)
        # NOTE: a normal tensor, even where the loop runs under inference mode (LMDeploy's): any thread may
        # then write into it, and copies into it under inference mode are allowed too.
        with torch.inference_mode(False):
            pools: dict[Tier, Any] = {Tier.DDR: DDRPool(config.ddr_bytes)}
        if config.disk_bytes:
            ensure_private_dir(config.cache_dir)  # the top directory too: it also holds contexts and hashes
            pools[Tier.DISK] = await DiskPool.open_sized(
                Path(config.cache_dir) / "blocks", config.disk_bytes, io_threads=config.io_threads
            )
        eviction = config.eviction_policies()
        hierarchy = HierarchyManager(
            pools, eviction={t: eviction[t.name.lower()] for t in pools if t.name.lower() in eviction}
        )
        if Tier.DISK in pools:
            hierarchy.adopt_disk()
        device = torch.device(device)
        if config.prefill_tflops:
            tflops = config.prefill_tflops
        elif calibrate_prefill is not None:
            tflops = await asyncio.to_thread(calibrate_prefill)
        else:
            tflops = GPU_PREFILL_TFLOPS_PRIOR
        cost = CostBenefitModel(
            ModelShape.from_config(model_config),
            bytes_per_token=layout.bytes_per_token,
            tiers=[
                TierLink("ddr", config.ddr_gbps or measure_ddr_link_gbps(device), 0.05),
                TierLink("disk", config.disk_gbps, 0.5),
            ],
            prefill_tflops=tflops,
        )
        return cls(
            hierarchy,
            KVMigrator(hierarchy),
            cost,
            MigrationPolicy(config.write_mode),
            keyer,
            max_inflight_bytes=config.max_inflight_bytes,
            loop=asyncio.get_running_loop(),
        )

    async def close(self) -> None:
        """Wait for background work, then close the disk tier."""
        await self.drain()
        disk = self.hierarchy.pools.get(Tier.DISK)
        if disk is not None:
            await disk.reap()
            await disk.store.close()

    @property
    def has_disk(self) -> bool:
        return Tier.DISK in self.hierarchy.pools

    # ================================================================== 1. lookup

    def lookup(
        self,
        rk: RequestKeys,
        *,
        first: int = 0,
        limit: int | None = None,
        tenant: str = "",
        allow_both: bool = True,
        load_all: bool = False,
    ) -> Lease:
        """Blocks ``[first, limit)`` of ``rk`` that kvtier holds, the cost plan over them, and pins on the blocks
        from ``first`` to the plan's load end. ``first`` blocks are already in the engine (its own cache);
        ``load_all`` loads every held block whatever the cost model says (benchmarks of pure loads)."""
        for _ in range(3):
            matched = self.hierarchy.match(rk, tenant=tenant)
            end = len(matched) if limit is None else min(len(matched), limit)
            held: list[BlockNode] = []
            for node in matched[first:end]:
                # NOTE: a block whose only copy proved unreadable while leased stays in the index without copies
                # until its last lease goes (release): it is not a hit, and neither is anything after it.
                if not node.payload.copies:
                    break
                held.append(node)
            if load_all:
                plan = _load_everything(len(held))
            else:
                tiers = [TIER_NAMES[n.payload.fastest] for n in held]
                plan = self.cost.plan(tiers, self.block_size, start_block=first, allow_both=allow_both)
            chosen = held[: plan.load_end]
            try:
                self.hierarchy.index.pin(chosen)
            except StaleNodeError:  # evicted between match and pin: look again
                continue
            return Lease(rk, first, chosen, plan, tenant)
        return Lease(rk, first, [], _load_everything(0), tenant)

    def release(self, lease: Lease, positions: Sequence[int] | None = None) -> None:
        """Return the lease's pins (all that are left, or those at ``positions``); blocks left without a copy by a
        miss leave the index so that they can be cached again."""
        with self._lock:
            todo = range(len(lease.nodes)) if positions is None else positions
            todo = [i for i in todo if i not in lease.returned]
            lease.returned.update(todo)
        nodes = [lease.nodes[i] for i in todo]
        if not nodes:
            return
        self.hierarchy.index.unpin(nodes)
        for node in nodes:
            res: Residency = node.payload
            if not res.copies and not res.dropped and not node.pin_count:
                try:
                    self.hierarchy.drop(node)
                except (PinnedError, StaleNodeError):  # still leased below, or gone: its last lease drops it
                    continue

    # ================================================================== 2. loads

    async def load(self, lease: Lease, sink: Sink) -> LoadResult:
        """Deliver the lease's load range to ``sink`` in order, through DDR, in chunks that fit (see the module
        docstring). Returns how many blocks from the range's start were delivered; never raises for a miss or
        an I/O error (those end the load; the engine recomputes the rest).

        The load is split once into pieces: each run of blocks already in DDR is one piece (one copy into the
        engine, nothing to make room for), disk blocks go in chunks of at most a quarter of the DDR tier. The
        promotions of up to ``depth`` pieces run ahead of the one being delivered, so the drive's queue stays
        full; together they use at most half of the DDR tier. A promotion that finds no room is retried once
        the pieces before it have been delivered and released, in halves if need be."""
        nodes = lease.load_blocks
        result = LoadResult()
        if not nodes:
            return result
        base = lease.plan.recompute_front
        block_bytes = nodes[0].payload.nbytes
        ddr = self.hierarchy.pool(Tier.DDR)
        per = max(1, min(LOAD_CHUNK_BYTES, ddr.capacity_bytes // 4) // block_bytes)
        depth = max(1, min(MAX_READ_AHEAD, ddr.capacity_bytes // 2 // (per * block_bytes)))
        pieces = self._pieces(nodes, per)
        self._loads_running += 1
        self._loads_idle.clear()
        start = time.perf_counter()
        came_up: set[int] = set()  # blocks this load promoted from disk
        ahead: collections.deque[asyncio.Future] = collections.deque()
        try:
            issued = 0
            for k, (lo, hi) in enumerate(pieces):
                issued = max(issued, k)
                while issued < len(pieces) and len(ahead) < depth:
                    a, b = pieces[issued]
                    ahead.append(asyncio.ensure_future(self._promote(nodes[a:b])))
                    issued += 1
                promoted, misses, no_room = await ahead.popleft() if ahead else await self._promote(nodes[lo:hi])
                result.misses += misses
                came_up |= promoted
                pos, freed_ahead = lo, False
                while True:  # deliver the piece; blocks still on disk only are promoted again
                    good = pos
                    while good < hi and Tier.DDR in nodes[good].payload.copies:
                        good += 1
                    if good > pos:
                        await sink(pos, [n.payload for n in nodes[pos:good]])
                        # The engine holds these blocks now: their pins go, so their DDR copies may make room.
                        self.release(lease, range(base + pos, base + good))
                        result.from_disk += sum(id(n.payload) in came_up for n in nodes[pos:good])
                        result.blocks = pos = good
                    if pos == hi or Tier.DISK not in nodes[pos].payload.copies:
                        break  # done, or a miss (corrupt, truncated, I/O error) discarded the block
                    size = hi - pos
                    while True:  # earlier pieces have made room by now; halve until something fits
                        promoted, misses, no_room = await self._promote(nodes[pos : pos + size])
                        result.misses += misses
                        came_up |= promoted
                        if not no_room or size == 1:
                            break
                        size = max(1, size // 2)
                    if no_room and not freed_ahead:
                        # Our own read-ahead holds the room: give it up (those blocks come up again later).
                        freed_ahead = True
                        issued = k + 1
                        await self._cancel(ahead)
                        self.release(lease, range(base + hi, base + len(nodes)))
                        continue
                    if no_room or not promoted:
                        break  # not one block fits, or nothing came up: the engine recomputes the rest
                if result.blocks < hi:
                    break
        except Exception:
            log.warning(
                "kvtier: loading %d blocks failed after %d; the engine recomputes the rest",
                len(nodes),
                result.blocks,
                exc_info=True,
            )
        finally:
            await self._cancel(ahead)
            self._loads_running -= 1
            if not self._loads_running:
                self._loads_idle.set()
        result.seconds = time.perf_counter() - start
        self.loaded(lease, result)
        return result

    def in_ddr(self, lease: Lease) -> bool:
        """Every block the lease loads is in DDR already: an engine may copy them in one go, on its own thread,
        and report the load with :meth:`loaded` once its copy has completed (no promotion, no chunking)."""
        return all(Tier.DDR in n.payload.copies for n in lease.load_blocks)

    def loaded(self, lease: Lease, result: LoadResult) -> None:
        """After a load (``result.blocks`` delivered): learn the link's speed, consider write-down per policy."""
        nodes = lease.load_blocks
        if nodes:
            result.nbytes = result.blocks * nodes[0].payload.nbytes
        if result.blocks:
            self.cost.observe_transfer("disk" if result.from_disk else "ddr", result.nbytes, result.seconds)
            self.after_use([n.payload for n in nodes[: result.blocks]])

    @staticmethod
    async def _cancel(futures: collections.deque[asyncio.Future]) -> None:
        """Cancel promotions still running ahead and wait until each has returned what it held."""
        pending = list(futures)
        futures.clear()
        for fut in pending:
            fut.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    @staticmethod
    def _pieces(nodes: Sequence[BlockNode], per: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` pieces of a load: each run of blocks already in DDR whole, the rest in chunks of ``per``."""
        out: list[tuple[int, int]] = []
        pos, n = 0, len(nodes)
        while pos < n:
            end = pos
            if Tier.DDR in nodes[pos].payload.copies:
                while end < n and Tier.DDR in nodes[end].payload.copies:
                    end += 1
            else:
                while end < n and end - pos < per and Tier.DDR not in nodes[end].payload.copies:
                    end += 1
            out.append((pos, end))
            pos = end
        return out

    async def _promote(self, chunk: Sequence[BlockNode]) -> tuple[set[int], int, bool]:
        """The chunk's disk-only blocks up to DDR, verified; ``(ids of those promoted, misses, ran out of room)``."""
        up = [n.payload for n in chunk if Tier.DDR not in n.payload.copies and Tier.DISK in n.payload.copies]
        if not up:
            return set(), 0, False
        try:
            result = await self.migrator.migrate(MigrationPlan(Tier.DISK, Tier.DDR, up))
        except NO_ROOM:
            return set(), 0, True
        return {id(r) for r in result.moved}, len(result.missed), False

    async def prefetch(self, nodes: Sequence[BlockNode]) -> int:
        """Promote these (pinned by the caller) blocks' disk-only copies to DDR ahead of their use; returns how
        many came up. Bounded like a load, so a prefetch never floods DDR or the disk queue."""
        up = [n.payload for n in nodes if Tier.DDR not in n.payload.copies and Tier.DISK in n.payload.copies]
        if not up:
            return 0
        async with self.loads.hold(sum(r.nbytes for r in up)):
            try:
                result = await self.migrator.migrate(MigrationPlan(Tier.DISK, Tier.DDR, up))
            except NO_ROOM as e:
                log.info("kvtier: prefetch of %d blocks found no room in DDR: %s", len(up), e)
                return 0
        return len(result.moved)

    # ================================================================== 3. saves

    def saved_prefix(self, rk: RequestKeys) -> int:
        """How many leading blocks of ``rk`` kvtier holds already (they are not saved again)."""
        return len(self.hierarchy.index.match(rk))

    def reserve(self, count: int, block_bytes: int, tenant: str = "") -> list[Slot] | None:
        """DDR slots for ``count`` new blocks (evicting to make room), or None when there is no room."""
        try:
            return self.hierarchy.allocate(Tier.DDR, [block_bytes] * count, tenant)
        except NO_ROOM as e:
            self.hierarchy.note_failure(Tier.DDR, NO_ROOM_REASON, count, e)
            return None

    def publish(self, rk: RequestKeys, first: int, slots: Sequence[Slot], tenant: str = "") -> list[BlockNode]:
        """The engine's copy into ``slots`` has completed: index blocks ``[first, first + len(slots))`` and
        start the write-down the migration policy asks for. Returns the nodes (empty if the chain's parent was
        evicted meanwhile: nothing to hang them on, the slots are freed)."""
        try:
            nodes = self.hierarchy.insert(rk, first, Tier.DDR, slots, tenant=tenant, ready=True)
        except ValueError as e:
            self.abort(slots, tenant)
            self.hierarchy.note_failure(Tier.DDR, PARENT_EVICTED, len(slots), e)
            return []
        if self.has_disk:
            due = [n.payload for n in nodes if self.policy.on_store(self.block_info(n.payload)).write]
            if due:
                self.spawn(self.write_down(due))
        return nodes

    def abort(self, slots: Sequence[Slot], tenant: str = "") -> None:
        """Give back slots reserved for a save that did not happen."""
        for slot in slots:
            self.hierarchy.free_slot(slot, tenant)

    async def save(
        self,
        rk: RequestKeys,
        first: int,
        count: int,
        block_bytes: int,
        copy_out: Callable[[Sequence[Slot]], Awaitable[None]],
        tenant: str = "",
    ) -> list[BlockNode]:
        """:meth:`make_room`, :meth:`reserve`, ``copy_out(slots)`` (the engine's copy into them), :meth:`publish`."""
        if count <= 0:
            return []
        # NOTE: demotions take their own share of the save budget; making room while holding this save's
        # share would deadlock whenever the two together exceed the budget.
        await self.make_room(count * block_bytes, tenant)
        async with self.saves.hold(count * block_bytes):
            slots = self.reserve(count, block_bytes, tenant)
            if slots is None:
                return []
            try:
                await copy_out(slots)
            except BaseException:
                self.abort(slots, tenant)
                raise
            return self.publish(rk, first, slots, tenant)

    # ================================================================== write-down, demotion, persistence

    def after_use(self, residencies: Sequence[Residency]) -> None:
        """Selective write-down: a block used again may now deserve a disk copy."""
        if not self.has_disk:
            return
        due = [
            r
            for r in residencies
            if r.node is not None
            and Tier.DISK not in r.copies
            and Tier.DDR in r.copies
            and self.policy.on_access(self.block_info(r), in_next_tier=False).write
        ]
        if due:
            self.spawn(self.write_down(due))

    async def write_down(self, residencies: Sequence[Residency], *, keep_source: bool = True) -> int:
        """DDR -> disk, after every load in flight: a save never delays a load a request waits for. Returns
        how many blocks were written."""
        await self._loads_idle.wait()
        todo = [r for r in residencies if not r.dropped and Tier.DDR in r.copies and Tier.DISK not in r.copies]
        if not todo:
            return 0
        async with self.saves.hold(sum(r.nbytes for r in todo)):
            try:
                result = await self.migrator.migrate(MigrationPlan(Tier.DDR, Tier.DISK, todo, keep_source=keep_source))
            except NO_ROOM as e:
                self.hierarchy.note_failure(Tier.DISK, NO_ROOM_REASON, len(todo), e)
                return 0
            except Exception as e:  # counted, never left to kill a background task without a trace
                self.hierarchy.note_failure(Tier.DISK, ERROR, len(todo), e)
                return 0
        if result.moved:
            log.info("kvtier: %d blocks written to disk", len(result.moved))
        return len(result.moved)

    async def persist(self, residencies: Sequence[Residency]) -> None:
        """Make sure these blocks have a disk copy (named shared contexts must survive restarts); raises
        ``OSError`` if any could not be written, so a caller never believes it durable."""
        await self.write_down(residencies)
        missing = sum(Tier.DISK not in r.copies for r in residencies)
        if missing:
            raise OSError(f"{missing} of {len(residencies)} blocks could not be written to the disk tier")

    async def make_room(self, nbytes: int, tenant: str = "") -> None:
        """Before DDR drops blocks to fit ``nbytes``: demote the unpinned blocks the migration policy wants kept
        (write-back, or selective for blocks used enough) to disk, oldest first. What is left to drop is
        dropped by the hierarchy's own eviction when the slots are allocated."""
        pool = self.hierarchy.pool(Tier.DDR)
        if not self.has_disk or pool.free_bytes >= nbytes:
            return
        victims, freed = [], 0
        # The walk is bounded (four times the bytes asked for): a policy that keeps nothing must not turn every
        # save into a scan of DDR.
        for r in self.hierarchy.oldest_movable(Tier.DDR, 4 * nbytes):
            if freed >= nbytes - pool.free_bytes:
                break
            if Tier.DISK in r.copies:  # dropping it loses nothing
                freed += r.nbytes
            elif self.policy.on_evict(r.key, self.block_info(r), in_next_tier=False).action == "demote":
                victims.append(r)
                freed += r.nbytes
        if victims:
            await self.write_down(victims, keep_source=False)

    def block_info(self, r: Residency) -> BlockInfo:
        """What the migration policy sees of a block."""
        node = r.node
        now = time.monotonic()
        if node is None:
            return BlockInfo(None, r.nbytes, 0, 0.0, now, now)
        bs = self.block_size
        return BlockInfo(
            parent=node.parent.key if node.parent is not None else None,
            size_bytes=r.nbytes,
            depth=node.depth,
            saved_flops=self.cost.shape.prefill_flops(node.depth * bs, (node.depth + 1) * bs),
            inserted_at=node.last_access,
            last_access=node.last_access,
            accesses=node.hits + 1,
            pins=node.pin_count,
            children=node.num_children,
            context=r.tenant,
        )

    # ================================================================== background work

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a background task on the service's loop, from any thread."""
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        future = self.loop.create_task(coro) if on_loop else asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._lock:
            self._background.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: asyncio.Future | Future) -> None:
        with self._lock:
            self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("kvtier: background transfer failed", exc_info=future.exception())

    def busy(self) -> bool:
        """Background work or loads are running."""
        with self._lock:
            return bool(self._background) or self._loads_running > 0

    async def drain(self) -> None:
        """Wait for every background transfer (write-down, demotion) started so far, and those they start.
        Runs on the service's loop."""
        while True:
            with self._lock:
                pending = [f if isinstance(f, asyncio.Future) else asyncio.wrap_future(f) for f in self._background]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    def set_eviction_policy(self, tier: Tier | str, name: str) -> None:
        """Order ``tier``'s victims (``Tier`` or its name: ``ddr``, ``disk``) by the named eviction policy from
        now on, while serving (``HierarchyManager.set_eviction_policy``). A ``ValueError`` for an unknown
        policy or a tier this service has not."""
        if isinstance(tier, str):
            try:
                tier = Tier[tier.upper()]
            except KeyError:
                raise ValueError(
                    f"unknown tier {tier!r}; this service has {self.hierarchy.eviction_policies()}"
                ) from None
        self.hierarchy.set_eviction_policy(tier, name)

    # ================================================================== inspection

    def snapshot(self) -> dict[str, Any]:
        """Tiers, transfers and the cost model, as plain data. ``cache_failures`` counts the blocks each tier
        could not cache, by reason (``hierarchy.py``: no_room, write_error, refused, parent_evicted, error)."""
        stats = self.hierarchy.stats()
        return {
            "blocks": stats["blocks"],
            "cache_failures": stats["cache_failures"],
            "recovered": stats["recovered"],
            **({"disk": stats["disk"]} if "disk" in stats else {}),
            "eviction_policy": self.hierarchy.eviction_policies(),
            "transfers": self.migrator.direction_stats(),
            "cost_model": {
                "prefill_tflops": self.cost.prefill_flops_per_s / 1e12,
                "links": {
                    n: {"GBps": t.bandwidth_gbps, "latency_ms": t.latency_ms} for n, t in self.cost.tiers.items()
                },
            },
        }


def measure_ddr_link_gbps(device: torch.device, nbytes: int = 64 << 20) -> float:
    """The DDR tier's link as the engine sees it: a pinned host-to-device copy on a GPU, a host copy on a CPU."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    dst.copy_(src, non_blocking=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return nbytes / (time.perf_counter() - start) / 1e9
