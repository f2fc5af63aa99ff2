"""The worker side of kvtier's LMDeploy connector (LMDeploy's model agent): it moves bytes, the scheduler decides.

- ``register``: the engine's cache rows (one uint8 row ``[num_blocks, layer_block_bytes]`` per layer) become an
  ``HBMPool`` of engine-owned cells; nothing is allocated in HBM by kvtier.
- ``start_loads``: a load whose blocks are all in DDR is queued DDR -> the engine's cells right there, on
  LMDeploy's thread, on kvtier's copy streams after an event recorded on the compute stream, and ``poll``
  reports it once that copy's event has completed (the hot path: no thread hop). Any other load runs
  ``TierService.load`` on kvtier's loop: disk-only blocks come up to DDR in chunks (each verified), each copied
  the same way. Either way a load is reported only after its last copy's event has completed, so LMDeploy
  publishes the prefix only once its bytes are there.
- ``start_saves``: each :class:`SaveOrder` reserves DDR slots and queues cells -> DDR behind an event recorded
  on the compute stream after the forward that wrote the blocks (never racing the forward); ``poll`` publishes
  it in the index (``TierService.publish``, which writes down per the migration policy) once its event has
  completed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from kv_runtime.backend_protocol import completed
from kv_runtime.backends.lmdeploy_backend import Load, LoadOrder, Save, SaveOrder
from kv_runtime.hierarchy import Residency
from kv_runtime.pool import HBMPool, Slot, Tier
from kv_runtime.service import LoadResult

if TYPE_CHECKING:
    from kv_runtime.backends.lmdeploy_backend import LMDeployStore

log = logging.getLogger(__name__)


class LMDeployWorkerSide:
    """Copies between kvtier's DDR tier and LMDeploy's cells (LMDeploy's backend, ``KVBackendProtocol``);
    completions since the last poll."""

    def __init__(self, store: LMDeployStore) -> None:
        self.store = store
        self.service = store.service
        self.layout = store.layout
        self.hbm: HBMPool | None = None
        self._lock = store.lock
        self._done_loads: dict[int, tuple[int, ...]] = {}
        self._done_saves: set[int] = set()
        self._loading: set[Future] = set()
        self._copying: list[tuple[torch.cuda.Event, Load, float]] = []  # DDR loads queued on LMDeploy's thread
        self._saving: list[tuple[torch.cuda.Event, Save, list[Slot]]] = []

    def register(self, rows: Sequence[torch.Tensor], num_blocks: int) -> None:
        """The engine's cache rows (in layer order) become engine-owned cells for kvtier's copies."""
        layout = self.layout
        flat = []
        for i, row in enumerate(rows):
            if not row.is_cuda or not row.is_contiguous():
                raise ValueError(f"cache row {i} must be a contiguous CUDA tensor")
            nbytes = row.numel() * row.element_size()
            if nbytes % num_blocks:
                raise ValueError(f"cache row {i} ({nbytes} bytes) does not split into {num_blocks} blocks")
            flat.append(row.view(torch.uint8).view(num_blocks, nbytes // num_blocks))
        widths = sorted({r.shape[1] for r in flat})
        if len(flat) != layout.num_layers or widths != [layout.layer_block_bytes]:
            raise ValueError(
                f"unsupported LMDeploy cache layout: kvtier expects {layout.num_layers} rows (one per layer) of "
                f"{layout.layer_block_bytes} bytes per block ({self.store.dtype}, quant_policy "
                f"{self.store.format.quant_policy}); the engine registered {len(flat)} rows of {widths} bytes per block"
            )
        self.hbm = HBMPool(layout, num_blocks, device=flat[0].device, rows=flat)
        self.service.migrator.attach_engine_pool(self.hbm)

    # ------------------------------------------------------------------ loads

    def start_loads(self, orders: Sequence[LoadOrder], ready: torch.cuda.Event) -> None:
        """Start these loads; ``ready`` was recorded on the compute stream (copies into recycled cells wait for
        the kernels queued before it). :meth:`poll` reports each once all of its copies have completed."""
        for order in orders:
            with self._lock:
                load = self.store.loads.get(order.request_id)
            if load is None:
                continue
            load.started = True
            if self.hbm is not None and self.service.in_ddr(load.lease):
                try:
                    slots = [n.payload.copies[Tier.DDR] for n in load.lease.load_blocks]
                    event = self.copy_in(slots, load.block_ids, after=ready)
                except Exception:
                    log.warning("kvtier load for request %d failed to start", load.request_id, exc_info=True)
                    self._report(load, LoadResult(), time.perf_counter())
                    continue
                with self._lock:
                    self._copying.append((event, load, time.perf_counter()))
                continue
            future = self.store.io.submit(self._load(load, ready))
            with self._lock:
                self._loading.add(future)
            future.add_done_callback(self._load_ended)

    async def _load(self, load: Load, ready: torch.cuda.Event) -> None:
        """One load, reported whatever happens: the blocks it did not deliver are invalid (LMDeploy recomputes)."""

        async def sink(offset: int, blocks: Sequence[Residency]) -> None:
            slots = [r.copies[Tier.DDR] for r in blocks]
            await completed(self.copy_in(slots, load.block_ids[offset : offset + len(blocks)], after=ready))

        start = time.perf_counter()
        result = LoadResult()
        try:
            result = await self.service.load(load.lease, sink)
        except Exception:
            log.warning("kvtier load for request %d failed to start", load.request_id, exc_info=True)
        finally:
            self._report(load, result, start)

    # ------------------------------------------------------------------ the backend protocol

    def copy_in(self, ddr_slots: Sequence[Slot], dest: Sequence[int], *, after: Any = None) -> torch.cuda.Event:
        """DDR slots into the engine's cache blocks ``dest`` on kvtier's copy streams, after ``after``."""
        return self.service.migrator.copy_engine_cells(False, self._cells(dest), ddr_slots, after=after)

    def copy_out(self, src: Sequence[int], ddr_slots: Sequence[Slot], *, after: Any = None) -> torch.cuda.Event:
        """The engine's cache blocks ``src`` into DDR slots on kvtier's copy streams, after ``after``."""
        return self.service.migrator.copy_engine_cells(True, self._cells(src), ddr_slots, after=after)

    def _cells(self, block_ids: Sequence[int]) -> list[Slot]:
        if self.hbm is None:
            raise RuntimeError("the engine registered no KV cache rows")
        return self.hbm.engine_cells(block_ids)

    def _report(self, load: Load, result: LoadResult, start: float) -> None:
        """A load has ended (its copies have completed): return its lease and report what it delivered."""
        self.service.release(load.lease)
        stats = self.store.stats
        ok = result.blocks
        stats.load_misses += result.misses
        if ok:
            stats.loaded_blocks["disk"] += result.from_disk
            stats.loaded_blocks["ddr"] += ok - result.from_disk
            stats.load_seconds.append(time.perf_counter() - start)
        if ok < len(load.block_ids):
            stats.failed_loads += 1
            log.warning("kvtier loaded %d of %d blocks for request %d", ok, len(load.block_ids), load.request_id)
        with self._lock:
            self._done_loads[load.request_id] = load.block_ids[ok:]

    def _load_ended(self, future: Future) -> None:
        with self._lock:
            self._loading.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("kvtier load failed", exc_info=future.exception())

    # ------------------------------------------------------------------ saves

    def start_saves(self, orders: Sequence[SaveOrder], ready: torch.cuda.Event) -> None:
        """Queue the engine cells -> DDR copies of these saves behind ``ready`` (recorded on the compute stream
        after the forward that wrote them); :meth:`poll` publishes them once their events have completed."""
        for order in orders:
            with self._lock:
                save = self.store.saves.get(order.save_id)
            if save is None:
                continue
            slots = self.service.reserve(len(save.block_ids), self.layout.block_bytes)
            if slots is None:
                with self._lock:
                    self._done_saves.add(save.save_id)
                continue
            try:
                event = self.copy_out(save.block_ids, slots, after=ready)
            except Exception:
                log.warning("kvtier save %d failed to start", save.save_id, exc_info=True)
                self.service.abort(slots)
                with self._lock:
                    self._done_saves.add(save.save_id)
                continue
            with self._lock:
                self._saving.append((event, save, slots))

    def _publish(self, save: Save, slots: list[Slot]) -> None:
        """A save's bytes are in DDR: index them, report the save, make room ahead of the next one."""
        nodes = self.service.publish(save.rk, save.first, slots)
        self.store.stats.saved_blocks += len(nodes)
        with self._lock:
            self._done_saves.add(save.save_id)
        if self.service.has_disk:
            self.service.spawn(self.service.make_room(len(slots) * self.layout.block_bytes))

    # ------------------------------------------------------------------ completions

    def poll(self) -> tuple[dict[int, tuple[int, ...]], set[int]]:
        """Completions since the last poll: ``({request_id: invalid block ids}, {save ids})``.

        Called by the engine every step while transfers are in flight: saves whose events have completed are
        published here, without waiting on anything."""
        self._reap()
        with self._lock:
            loads, self._done_loads = self._done_loads, {}
            saves, self._done_saves = self._done_saves, set()
        return loads, saves

    def _reap(self) -> None:
        """Finish the DDR loads and publish the saves whose events have completed (each exactly once, whichever
        thread gets it)."""
        with self._lock:
            copied = [c for c in self._copying if c[0].query()]
            self._copying = [c for c in self._copying if c not in copied]
            done = [c for c in self._saving if c[0].query()]
            self._saving = [c for c in self._saving if c not in done]
        for _, load, start in copied:
            result = LoadResult(blocks=len(load.block_ids), seconds=time.perf_counter() - start)
            self.service.loaded(load.lease, result)
            self._report(load, result, start)
        for _, save, slots in done:
            self._publish(save, slots)

    def wait_idle(self, timeout: float = 600.0) -> None:
        """Block until every transfer started so far has ended (benchmarks, shutdown).

        Finished copies are reaped here too: an idle engine stops polling, and their write-downs still have to
        start. Their reports wait for the engine's next :meth:`poll`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                loading = list(self._loading)
                copies = [c[0] for c in self._saving] + [c[0] for c in self._copying]
            for event in copies:
                event.synchronize()
            self._reap()
            for f in loading + self.store.scheduler.prefetching():
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            self.store.io.submit(self.service.drain()).result(timeout=max(0.0, deadline - time.monotonic()))
            with self._lock:
                idle = not self._loading and not self._saving and not self._copying
            if idle and not self.service.busy() and not self.store.scheduler.prefetching():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"kvtier transfers still running after {timeout:.0f} s")
