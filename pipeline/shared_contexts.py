"""Named shared contexts on the tier service, the same on both engines.

A context is a prefix computed once and reused by name: its token ids live in the registry
(``kv_pipeline.contexts``, SQLite next to the disk tier), its blocks in the tiers like any other, pinned in the
index while the context is pinned, and written to disk so that a restart finds them again. What differs
between the engines is only how a prefix gets computed and published (``compute``) and on which event loop
the tier service runs (``on_service``): the transformers engine runs it on the caller's loop, LMDeploy's store
on a loop thread of its own. Everything else (checks, pins, replacement, expiry, per-id ordering) is here, once.

:class:`SharedContextAPI` is the public face both engines inherit: ``save_shared_context``,
``get_shared_context``, ``list_shared_contexts``, ``shared_context_info`` and ``drop_shared_context``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from kv_pipeline.contexts import ContextRegistry, SharedContext
from kv_pipeline.requests import ContextStoreError, RequestError, RequestValidator, UnknownContextError
from kv_runtime.service import NO_ROOM, TierService
from prefix_reuse import BlockNode, PinnedError, StaleNodeError

log = logging.getLogger(__name__)

Compute = Callable[[list[int], str], Awaitable[None]]
OnService = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


class SharedContexts:
    """The contexts of one engine: registry, pins, and one save or drop at a time per id.

    ``compute(tokens, label)`` runs ``tokens`` through the engine and returns once their full blocks are
    published in the tiers; ``on_service(coro)`` awaits a coroutine of the tier service on the service's loop.
    """

    def __init__(
        self,
        service: TierService,
        validator: RequestValidator,
        registry: ContextRegistry,
        compute: Compute,
        on_service: OnService,
    ) -> None:
        self.service = service
        self.hierarchy = service.hierarchy
        self.keyer = service.keyer
        self.validator = validator
        self.registry = registry
        self._compute = compute
        self._on_service = on_service
        self._pins: dict[str, list[BlockNode]] = {}
        # One save or drop at a time per context id; an entry lives while someone holds or waits for it.
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @classmethod
    def open(
        cls,
        service: TierService,
        validator: RequestValidator,
        cache_dir: Path,
        namespace_digest: bytes,
        compute: Compute,
        on_service: OnService,
    ) -> SharedContexts:
        """The registry beside the disk tier (in memory without one), its expired and damaged records dropped
        and its pinned contexts pinned again over the blocks the disk tier recovered."""
        path = cache_dir / "contexts.sqlite3" if service.has_disk else None
        self = cls(service, validator, ContextRegistry(path, namespace_digest), compute, on_service)
        vocab = validator.limits.vocab_size
        for ctx in self.registry.all():
            if ctx.expired():
                self.registry.delete(ctx.context_id)
            elif not all(0 <= t < vocab for t in ctx.tokens):
                # a damaged record (this namespace is this model's): every request naming it would fail
                log.warning("kvtier: dropping shared context %r: token ids outside the vocabulary", ctx.context_id)
                self.registry.delete(ctx.context_id)
            elif ctx.pinned:
                self._pin_again(ctx)
        return self

    @property
    def moved_aside(self) -> list[Path]:
        """Damaged registry files moved aside when it was opened."""
        return self.registry.moved_aside

    def close(self) -> None:
        for nodes in self._pins.values():
            self.hierarchy.index.unpin(nodes)
        self._pins.clear()
        self.registry.close()

    def pinned_blocks(self) -> int:
        """Index pins the contexts hold (a block shared by two contexts counts twice, as it is pinned twice)."""
        return sum(len(nodes) for nodes in self._pins.values())

    def idle(self) -> bool:
        """No save or drop is running or waiting."""
        return not self._locks

    def _match(self, tokens: Any) -> list[BlockNode]:
        return self.hierarchy.match(self.keyer.request(list(tokens)))

    # ------------------------------------------------------------------ saving

    async def save(self, context_id: Any, content: Any, *, pin: Any, ttl: Any) -> SharedContext:
        check = self.validator
        context_id = check.identifier(context_id, "context_id")
        pin = check.flag(pin, "pin")
        ttl = check.ttl(ttl)
        tokens = check.prompt(content, "content")
        block_size = self.keyer.namespace.block_size
        if len(tokens) < block_size:
            raise RequestError(
                f"a shared context needs at least one full block ({block_size} tokens), got {len(tokens)}"
            )
        check.fits(len(tokens), 1)
        async with self._lock(context_id):
            return await self._save(context_id, tokens, pin, ttl)

    async def _save(self, context_id: str, tokens: list[int], pin: bool, ttl: float | None) -> SharedContext:
        pinned: list[BlockNode] = []
        try:
            await self._compute(tokens, f"context:{context_id}")
            rk = self.keyer.request(tokens)
            nodes = self.hierarchy.match(rk)
            if len(nodes) < rk.num_blocks:
                raise ContextStoreError(
                    f"shared context {context_id!r} does not fit the cache: {len(nodes)} of {rk.num_blocks} "
                    "blocks stored"
                )
            now = time.time()
            ctx = SharedContext(context_id, tuple(tokens), pin, now, now + ttl if ttl is not None else None)
            if pin:
                # NOTE: no await between the match and the pin; a pin on a node that left the index meanwhile
                # (another thread's eviction) is refused with StaleNodeError, a miss reported below.
                self.hierarchy.index.pin(nodes)
                pinned = nodes
                if self.service.has_disk:
                    await self._on_service(self.service.persist([n.payload for n in nodes]))
            self.registry.put(ctx)
        except BaseException as e:
            if pinned:
                self.hierarchy.index.unpin(pinned)
            if isinstance(e, (*NO_ROOM, StaleNodeError, PinnedError)):
                raise ContextStoreError(f"shared context {context_id!r} does not fit the cache: {e}") from e
            if isinstance(e, (OSError, sqlite3.Error)):
                raise ContextStoreError(f"shared context {context_id!r} could not be stored: {e}") from e
            raise
        # The new context is in place: only now does the one it replaces lose its pins.
        previous = self._pins.pop(context_id, None)
        if previous:
            self.hierarchy.index.unpin(previous)
        if pinned:
            self._pins[context_id] = pinned
        return ctx

    @contextlib.asynccontextmanager
    async def _lock(self, context_id: str) -> AsyncIterator[None]:
        entry = self._locks.get(context_id)
        if entry is None:
            entry = self._locks[context_id] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[context_id]

    def _pin_again(self, ctx: SharedContext) -> None:
        nodes = self._match(ctx.tokens)
        if nodes:
            self.hierarchy.index.pin(nodes)
            self._pins[ctx.context_id] = nodes

    # ------------------------------------------------------------------ reading and dropping

    def get(self, context_id: Any) -> SharedContext | None:
        context_id = self.validator.identifier(context_id, "context_id")
        ctx = self.registry.get(context_id)
        if ctx is not None and ctx.expired():
            self._forget(context_id)
            return None
        return ctx

    def require(self, context_id: Any) -> SharedContext:
        ctx = self.get(context_id)
        if ctx is None:
            raise UnknownContextError(f"no shared context named {context_id!r}")
        return ctx

    def all(self) -> list[SharedContext]:
        live = []
        for ctx in self.registry.all():
            if ctx.expired():
                self._forget(ctx.context_id)
            else:
                live.append(ctx)
        return live

    def info(self, context_id: Any) -> dict[str, Any]:
        ctx = self.require(context_id)
        nodes = self._match(ctx.tokens)
        tiers: dict[str, int] = {}
        for node in nodes:
            for tier in node.payload.tiers:
                tiers[tier.name.lower()] = tiers.get(tier.name.lower(), 0) + 1
        return {
            "context_id": ctx.context_id,
            "tokens": ctx.num_tokens,
            "pinned": ctx.pinned,
            "expires": ctx.expires,
            "cached_blocks": len(nodes),
            "blocks_by_tier": tiers,
        }

    async def drop(self, context_id: Any) -> bool:
        context_id = self.validator.identifier(context_id, "context_id")
        async with self._lock(context_id):
            return self._forget(context_id)

    def _forget(self, context_id: str) -> bool:
        nodes = self._pins.pop(context_id, None)
        if nodes:
            self.hierarchy.index.unpin(nodes)
        return self.registry.delete(context_id) or nodes is not None


class SharedContextAPI:
    """The shared-context methods of an engine, over its ``shared_contexts`` (set when the engine starts)."""

    shared_contexts: SharedContexts
    _require_started: Callable[[], None]  # each engine's own check that it has started

    async def save_shared_context(
        self, context_id: str, content: Any, *, pin: bool = True, ttl: float | None = None
    ) -> SharedContext:
        """Compute and store a prefix once under ``context_id``; ``pin`` keeps it from eviction, ``ttl``
        (seconds) expires it. Pinned contexts are written to the disk tier so they survive restarts.

        Saving an id again replaces that context once the new one is stored; saves (and drops) of one id run
        one at a time, in the order they were called. Raises :class:`RequestError` for bad inputs (a context
        needs at least one full block and must leave room in the model's context length for one more token),
        :class:`ContextStoreError` when the context does not fit the cache or its disk copy could not be
        written. A save that fails or is cancelled leaves no pin and no record; a context it was replacing is
        kept as it was."""
        self._require_started()
        return await self.shared_contexts.save(context_id, content, pin=pin, ttl=ttl)

    def get_shared_context(self, context_id: str) -> SharedContext | None:
        """The live context named ``context_id``, or None (never saved, dropped or expired)."""
        self._require_started()
        return self.shared_contexts.get(context_id)

    def list_shared_contexts(self) -> list[SharedContext]:
        self._require_started()
        return self.shared_contexts.all()

    def shared_context_info(self, context_id: str) -> dict[str, Any]:
        """A context's record plus where its blocks are now; :class:`UnknownContextError` if there is none."""
        self._require_started()
        return self.shared_contexts.info(context_id)

    async def drop_shared_context(self, context_id: str) -> bool:
        """Forget a context (after a save of the same id in progress); its blocks lose their pin and age out
        like any other. False if there was none."""
        self._require_started()
        return await self.shared_contexts.drop(context_id)
