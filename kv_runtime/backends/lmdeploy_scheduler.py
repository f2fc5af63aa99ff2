"""The scheduler side of kvtier's LMDeploy connector (LMDeploy's paging thread): it decides, the worker moves.

- ``lookup``: the prompt's keys against the index past the blocks LMDeploy already holds, and the cost plan,
  through ``TierService.lookup``; the blocks to load are leased from here on, so nothing they need is evicted
  before the load ends.
- ``bind``: LMDeploy allocated destination blocks for the hit; the load is bound to them.
- ``step_work``: the loads to start in this step, and the saves of the prompt blocks the step's forward
  completes (only blocks kvtier does not hold yet), as plain :class:`StepWork`; LMDeploy leases the saved blocks
  until the save reports.
- ``finish``: worker progress back to paging; a load with a bad block fails as a whole and LMDeploy recomputes
  (it never publishes a partly loaded prefix).
- ``plan_split``: Cake's split across two requests (``kv_pipeline.lmdeploy_engine``): the back of a prefix on
  disk comes up to DDR while the front is recomputed as its own request.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from kv_policy import LoadPlan
from kv_runtime.backends.lmdeploy_backend import Load, LoadOrder, Save, SaveOrder, StepWork
from kv_runtime.pool import Tier
from kv_runtime.service import Lease
from prefix_reuse import RequestKeys

if TYPE_CHECKING:
    from kv_runtime.backends.lmdeploy_backend import LMDeployStore

log = logging.getLogger(__name__)

HINT_TTL_S = 120.0
# What one more LMDeploy request costs at least: a request whose whole prompt is in LMDeploy's GPU prefix cache
# took 40-61 ms to its first token at 32K tokens on an H200 (docs/design.md).
SPLIT_REQUEST_MS = 50.0


class LMDeploySchedulerSide:
    """Hit lengths, bindings and step work for LMDeploy's scheduler; state per request between its calls."""

    def __init__(self, store: LMDeployStore) -> None:
        self.store = store
        self.service = store.service
        self.block_size = store.block_size
        self._lock = store.lock
        self._lookups: dict[int, Lease] = {}
        self._pending: dict[int, Load] = {}  # bound, not yet handed to a step
        self._failed: set[int] = set()
        self._next_save: dict[int, int] = {}
        self._save_ids = itertools.count()
        self._recompute_hints: dict[bytes, float] = {}
        self._prefetching: dict[bytes, Future] = {}

    # ------------------------------------------------------------------ lookup and bind

    def lookup(self, request_id: int, tokens: np.ndarray, num_computed: int, max_step: int) -> tuple[int | None, bool]:
        """Tokens kvtier can load past the ``num_computed`` LMDeploy holds; ``(None, False)`` while a prefetch
        of them is still coming up from disk. ``max_step`` is LMDeploy's deepest allowed hit."""
        bs = self.block_size
        token_len = max(0, int(max_step)) // bs * bs
        if token_len < bs or num_computed >= token_len or request_id in self._failed:
            return 0, False
        with self._lock:
            prev = self._lookups.get(request_id)
        if prev is not None:
            remote = (prev.first + len(prev.nodes)) * bs
            if remote > num_computed:
                return remote - num_computed, True
            self._drop_lookup(request_id)
        rk = self.service.keyer.request(tokens[:token_len])
        if self._consume_hint(rk):
            return 0, False
        first = int(num_computed) // bs
        if self._prefetch_pending(rk, first):
            return None, False
        lease = self.service.lookup(rk, first=first, allow_both=False, load_all=self.store.always_load)
        if lease.plan.matched_blocks == 0:
            return 0, False
        stats = self.store.stats
        stats.lookups += 1
        if not lease.nodes:
            stats.planned_recompute += 1
            return 0, False
        with self._lock:
            self._lookups[request_id] = lease
        stats.hits += 1
        if log.isEnabledFor(logging.INFO):  # the count walks the chosen blocks: only when it is logged
            on_disk = sum(Tier.DDR not in n.payload.copies for n in lease.nodes)
            log.info("kvtier: request %d loads %d blocks (%d from disk)", request_id, len(lease.nodes), on_disk)
        return (first + len(lease.nodes)) * bs - int(num_computed), True

    def bind(self, request_id: int, block_ids: Sequence[int], num_external_tokens: int, session_id: int = -1) -> None:
        """LMDeploy allocated ``block_ids`` for the last ``num_external_tokens`` of a positive lookup of the
        engine session ``session_id`` (whose loaded tokens per tier the store then reports)."""
        if num_external_tokens <= 0:
            return
        bs = self.block_size
        with self._lock:
            lease = self._lookups.pop(request_id)
            if request_id in self._pending or request_id in self.store.loads:
                raise RuntimeError(f"request {request_id} already has a load")
        remote = lease.first + len(lease.nodes)
        local_tokens = remote * bs - int(num_external_tokens)
        if local_tokens < 0 or local_tokens % bs:
            self.service.release(lease)
            raise ValueError(f"load bounds must be block aligned: {local_tokens} tokens before the load")
        first = local_tokens // bs
        skip = first - lease.first  # LMDeploy may have more (or fewer) blocks of its own than at lookup
        if skip < 0 or len(block_ids) != remote - first:
            self.service.release(lease)
            raise ValueError(f"{len(block_ids)} destination blocks for blocks [{first}, {remote}) of the lookup")
        if skip:
            self.service.release(lease, range(skip))
            lease = Lease(lease.rk, first, lease.nodes[skip:], _shifted(lease, skip), lease.tenant)
        from_ddr = sum(Tier.DDR in n.payload.copies for n in lease.nodes)
        tiers = {"ddr": from_ddr * bs, "disk": (len(lease.nodes) - from_ddr) * bs}
        with self._lock:
            self._pending[request_id] = Load(
                request_id, tuple(int(b) for b in block_ids), lease, first, session_id=session_id, tokens=tiers
            )

    # ------------------------------------------------------------------ one step

    def step_work(
        self,
        running: Sequence[tuple[int, np.ndarray, int, Sequence[int], Sequence[int]]],
        producer: bool = True,
    ) -> StepWork | None:
        """Loads to start and saves to take for one engine step, or None when there is nothing to do or poll.

        ``running``: per request ``(request_id, tokens, token_len after this step, block ids, logical ids)``.
        """
        saves = self._plan_saves(running) if producer and running else ()
        with self._lock:
            if not saves and not self._pending and not self.store.loads and not self.store.saves:
                return None  # the common decode step: nothing to start, nothing to poll
            loads = tuple(LoadOrder(r, load.block_ids) for r, load in self._pending.items())
            self.store.loads.update(self._pending)
            self._pending.clear()
        return StepWork(loads, saves)

    def _plan_saves(self, running) -> tuple[SaveOrder, ...]:
        bs = self.block_size
        out = []
        for request_id, tokens, token_len, block_ids, logical_ids in running:
            full = int(token_len) // bs
            start = self._next_save.get(request_id, 0)
            if full <= start:
                continue
            if full > len(block_ids) or full > len(logical_ids):
                raise RuntimeError(f"request {request_id} has fewer blocks than its {full * bs}-token save boundary")
            rk = self.service.keyer.request(tokens[: full * bs])
            held = self.service.saved_prefix(rk)  # dedupe: blocks kvtier holds already are not saved again
            first = min(max(start, held), full)
            self._next_save[request_id] = full
            self.store.stats.skipped_saves += first - start
            if first == full:
                continue
            save_id = next(self._save_ids)
            physical = tuple(int(b) for b in block_ids[first:full])
            with self._lock:
                self.store.saves[save_id] = Save(save_id, rk, first, physical)
            out.append(SaveOrder(save_id, physical, tuple(int(b) for b in logical_ids[first:full])))
        return tuple(out)

    def finish(self, finished_loads: set[int], invalid_block_ids: set[int], completed_saves: set[int]):
        """Worker progress -> ``(load results as (request_id, success), save ids done)`` for paging."""
        results = []
        with self._lock:
            for request_id in sorted(finished_loads):
                load = self.store.loads.pop(request_id, None)
                if load is None:
                    continue
                failed = not invalid_block_ids.isdisjoint(load.block_ids)
                if failed:
                    self._failed.add(request_id)
                    self._next_save[request_id] = load.first  # its recomputed blocks are saved again
                else:
                    self._next_save[request_id] = load.first + len(load.block_ids)
                    reused = self.store.reused.setdefault(load.session_id, {})
                    for tier, n in load.tokens.items():
                        reused[tier] = reused.get(tier, 0) + n
                results.append((request_id, not failed))
            done = {s for s in completed_saves if s in self.store.saves}
            for s in done:
                del self.store.saves[s]
        return tuple(results), frozenset(done)

    # ------------------------------------------------------------------ request lifecycle

    def request_finished(self, request_id: int) -> None:
        """Drop scheduler state of a finished request; pins of a load not yet started are returned here."""
        self._drop_lookup(request_id)
        with self._lock:
            load = self._pending.pop(request_id, None)
            self._failed.discard(request_id)
            self._next_save.pop(request_id, None)
        if load is not None:
            self.service.release(load.lease)

    def new_request(self, request_id: int) -> None:
        self.request_finished(request_id)

    def _drop_lookup(self, request_id: int) -> None:
        with self._lock:
            lease = self._lookups.pop(request_id, None)
        if lease is not None:
            self.service.release(lease)

    def drain(self) -> None:
        """Workers were drained: forget transfers whose completions will never come.

        Loads that started return their pins when their copies end (the worker side); loads handed to a step
        that never started them, and loads not handed out yet, return them here."""
        with self._lock:
            loads = list(self._pending.values())
            loads += [load for load in self.store.loads.values() if not load.started]
            self._pending.clear()
            self.store.loads.clear()
            self.store.saves.clear()
        for load in loads:
            self.service.release(load.lease)

    # ------------------------------------------------------------------ Cake's split, across two requests

    def plan_split(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """For a prompt whose prefix sits on disk: ``(front_tokens, loaded_end_tokens)`` if the cost model says
        to recompute the front while the back loads, else None.

        Starts the back's disk -> DDR promotion at once and tells the next lookup of the front alone to
        recompute it. The caller then runs the front as its own request (LMDeploy computes it into its GPU
        prefix cache) and then the full prompt, whose lookup finds the back in DDR, or waits (lookup pending)
        for the promotion to end.
        """
        bs = self.block_size
        usable = (len(tokens) - 1) // bs
        rk = self.service.keyer.request(np.asarray(tokens[: usable * bs], dtype=np.int64))
        lease = self.service.lookup(rk)
        plan = lease.plan
        # The split costs LMDeploy one more request (queued, scheduled and finished on its own): only a gain
        # larger than that is worth it, which in practice means blocks coming up from disk.
        if lease.choice != "both" or plan.best_load_ms - plan.best_both_ms < SPLIT_REQUEST_MS:
            self.service.release(lease)
            return None
        s, k = lease.plan.recompute_front, lease.plan.load_end
        self.service.release(lease, range(s))  # the front is recomputed: only the back stays leased
        now = time.monotonic()
        with self._lock:
            for key in rk.keys[:s]:
                self._recompute_hints[key] = now + HINT_TTL_S
        future = self.store.io.submit(self._promote(lease, s, k))
        keys = [n.key for n in lease.nodes[s:k]]
        with self._lock:
            for key in keys:
                self._prefetching[key] = future
        future.add_done_callback(lambda _f: self._prefetch_done(keys))
        return s * bs, k * bs

    async def _promote(self, lease: Lease, s: int, k: int) -> None:
        try:
            await self.service.prefetch(lease.nodes[s:k])
        finally:
            self.service.release(lease)

    def _prefetch_done(self, keys: list[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._prefetching.pop(key, None)

    def prefetching(self) -> list[Future]:
        """Promotions started by :meth:`plan_split` that have not ended."""
        with self._lock:
            return list(set(self._prefetching.values()))

    def _prefetch_pending(self, rk: RequestKeys, first: int) -> bool:
        with self._lock:
            return bool(self._prefetching) and any(key in self._prefetching for key in rk.keys[first:])

    def _consume_hint(self, rk: RequestKeys) -> bool:
        if not rk.keys:
            return False
        now = time.monotonic()
        with self._lock:
            if not self._recompute_hints:
                return False
            for key in [k for k, deadline in self._recompute_hints.items() if deadline < now]:
                del self._recompute_hints[key]
            if rk.keys[-1] not in self._recompute_hints:
                return False
            for key in rk.keys:
                self._recompute_hints.pop(key, None)
        return True


def _shifted(lease: Lease, skip: int) -> LoadPlan:
    """The lease's plan seen from ``skip`` blocks further on (LMDeploy computed those itself meanwhile)."""
    plan = lease.plan
    return replace(plan, matched_blocks=plan.matched_blocks - skip, recompute_front=0, load_end=plan.load_end - skip)
