"""The prefix index: a tree of cached blocks, one node per block, found by chained key.

Every node is reachable in O(1) through a flat ``key -> node`` map, and also sits in a tree (parent link,
children as an intrusive sibling list) because eviction and removal must respect prefix structure: a block is
useless once its parent is gone, so only leaves are evicted and removing a node removes its subtree.

Invariants, kept under one readers-writer lock (lookups share it, changes take it alone):

- A node is *visible* to matching only once it is ``ready``: an inserter that still has bytes in flight
  inserts it pending and publishes it after the copy completed and was verified.
- A match is confirmed on every block: the key (XXH3-128 of the whole prefix), the parent link (the node
  found must hang under the node matched for the previous block) and the independent XXH64 confirmation hash.
- A node is *evictable* exactly when it is ready, unpinned and has no children. The evictable set is kept as
  an insertion-ordered dict updated on every transition, least recently used first, so a caller walks victims
  in O(1) each without scanning the tree.
- The index owns nodes; the runtime owns payloads. Every payload the index drops (an insert that lost a race,
  a removed node) is handed to ``on_release`` exactly once.
- Every node whose pin state (pinned or not), leaf state or readiness changed in a write is handed to
  ``on_change`` once that write has released the lock, so the runtime can keep its per-tier eviction candidates
  current without scanning. The callback sees the nodes' state as it is when it runs, never a stale copy.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from prefix_reuse.fingerprint import RollingFingerprint
from prefix_reuse.keys import RequestKeys
from prefix_reuse.namespace import KeyNamespace
from prefix_reuse.rwlock import RWLock


class StaleNodeError(LookupError):
    """A node passed back to the index is no longer in it (removed since it was matched)."""


class PinnedError(RuntimeError):
    """Removal reached a node that is pinned by a lease."""


@dataclass(slots=True, eq=False)
class BlockNode:
    """One cached block. Identity-hashed: the index keeps exactly one node per key."""

    key: bytes
    check: int
    namespace: bytes
    depth: int
    parent: BlockNode | None
    payload: Any
    ready: bool = False
    pin_count: int = 0
    num_children: int = 0
    first_child: BlockNode | None = None
    next_sibling: BlockNode | None = None
    prev_sibling: BlockNode | None = None
    last_access: float = 0.0
    hits: int = 0
    anchor: int | None = None  # rolling fingerprint, set on chain roots only

    @property
    def is_leaf(self) -> bool:
        return self.num_children == 0

    def children(self) -> Iterator[BlockNode]:
        child = self.first_child
        while child is not None:
            yield child
            child = child.next_sibling


@dataclass(slots=True)
class InsertResult:
    """Nodes for the inserted range, and for each whether this call created it (False: an existing node won)."""

    nodes: list[BlockNode] = field(default_factory=list)
    inserted: list[bool] = field(default_factory=list)

    @property
    def num_inserted(self) -> int:
        return sum(self.inserted)


@dataclass(slots=True, frozen=True)
class IndexStats:
    blocks: int
    ready_blocks: int
    pinned_blocks: int
    leaves: int
    evictable_blocks: int
    namespaces: int
    chain_roots: int
    verification_failures: int
    insert_conflicts: int


class PrefixReuseIndex:
    """Longest-prefix match, insert, publish, remove, pin and eviction candidates over chained block keys."""

    def __init__(
        self,
        *,
        on_release: Callable[[Any], None] | None = None,
        on_change: Callable[[list[BlockNode]], None] | None = None,
    ) -> None:
        self._on_release = on_release
        self._on_change = on_change
        self._changed: list[BlockNode] = []  # nodes whose candidacy may have changed in the current write
        self._lock = RWLock()
        self._nodes: dict[bytes, BlockNode] = {}
        self._evictable: dict[BlockNode, None] = {}
        self._anchors: dict[bytes, dict[int, list[BlockNode]]] = {}
        self._fingerprints: dict[bytes, RollingFingerprint] = {}
        self._anchor_version = 0
        self._counter_lock = threading.Lock()
        self._ready = 0
        self._pinned = 0
        self._leaves = 0
        self._verification_failures = 0
        self._insert_conflicts = 0

    # ------------------------------------------------------------------ reads (shared lock)

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, key: bytes) -> BlockNode | None:
        with self._lock.read():
            return self._nodes.get(key)

    def match(self, rk: RequestKeys, *, start_block: int = 0, parent: BlockNode | None = None) -> list[BlockNode]:
        """Longest run of ready, verified nodes for ``rk``'s blocks from ``start_block`` on.

        ``parent`` is the node matched for block ``start_block - 1`` (required when ``start_block > 0``).
        """
        with self._lock.read():
            return self._match_locked(rk.keys, rk.checks, rk.namespace.digest, start_block, parent)

    def match_keys(
        self, keys: Iterable[tuple[bytes, int]], namespace: KeyNamespace, parent: BlockNode | None = None
    ) -> list[BlockNode]:
        """Like :meth:`match` over a lazy stream of ``(key, check)``: stops hashing at the first miss."""
        out: list[BlockNode] = []
        ns = namespace.digest
        with self._lock.read():
            nodes = self._nodes
            for key, check in keys:
                node = nodes.get(key)
                if node is None or not node.ready:
                    break
                if node.parent is not parent or node.check != check or node.namespace != ns:
                    self._count_verification_failure()
                    break
                out.append(node)
                parent = node
        return out

    def _match_locked(
        self, keys: list[bytes], checks: list[int], ns: bytes, start: int, parent: BlockNode | None
    ) -> list[BlockNode]:
        if start and parent is None:
            raise ValueError("match from start_block > 0 needs the node of the block before it")
        out: list[BlockNode] = []
        nodes = self._nodes
        for i in range(start, len(keys)):
            node = nodes.get(keys[i])
            if node is None or not node.ready:
                break
            if node.parent is not parent or node.check != checks[i] or node.namespace != ns:
                self._count_verification_failure()
                break
            out.append(node)
            parent = node
        return out

    @property
    def anchor_version(self) -> int:
        """Changes whenever a chain root is added or removed (lets matchers cache the anchor table)."""
        return self._anchor_version

    def anchors(self, namespace: KeyNamespace) -> tuple[int, dict[int, list[BlockNode]]]:
        """Version and a copy of the fingerprint -> chain-root map of a namespace (for multi-hit matching)."""
        with self._lock.read():
            table = self._anchors.get(namespace.digest, {})
            return self._anchor_version, {fp: list(roots) for fp, roots in table.items()}

    def evictable(self, limit: int | None = None) -> list[BlockNode]:
        """Up to ``limit`` ready, unpinned leaves, least recently touched first; O(1) per candidate returned.

        A leaf whose last child was just removed joins at the most-recent end: the index keeps the candidate
        *set*; ranking victims by cost and reuse is the eviction policy's job. The list is a snapshot, so the
        caller may remove what it walks.
        """
        with self._lock.read():
            if limit is None:
                return list(self._evictable)
            return list(islice(self._evictable, limit))

    def stats(self) -> IndexStats:
        with self._lock.read():
            return IndexStats(
                blocks=len(self._nodes),
                ready_blocks=self._ready,
                pinned_blocks=self._pinned,
                leaves=self._leaves,
                evictable_blocks=len(self._evictable),
                namespaces=len({n.namespace for n in self._iter_roots()}),
                chain_roots=sum(len(r) for t in self._anchors.values() for r in t.values()),
                verification_failures=self._verification_failures,
                insert_conflicts=self._insert_conflicts,
            )

    def _iter_roots(self) -> Iterator[BlockNode]:
        for table in self._anchors.values():
            for roots in table.values():
                yield from roots

    def _count_verification_failure(self) -> None:
        with self._counter_lock:
            self._verification_failures += 1

    # ------------------------------------------------------------------ writes (exclusive lock)

    def insert(
        self,
        rk: RequestKeys,
        payloads: Sequence[Any],
        *,
        start_block: int = 0,
        ready: bool = True,
        now: float | None = None,
    ) -> InsertResult:
        """Insert blocks ``[start_block, start_block + len(payloads))`` of ``rk``.

        The chain must connect: block ``start_block - 1`` must already be indexed. Where a node already exists
        (another inserter won the race, or the block was cached earlier) the existing node is kept and the
        offered payload is released. A key whose existing node fails confirmation (a hash collision) stops
        the insert there: the rest of the payloads are released and the result is shorter than ``payloads``.
        """
        end = start_block + len(payloads)
        if start_block < 0 or end > rk.num_blocks:
            raise ValueError(f"blocks [{start_block}, {end}) are outside the request's {rk.num_blocks} full blocks")
        ns = rk.namespace
        now = time.monotonic() if now is None else now
        result = InsertResult()
        released: list[Any] = []
        with self._lock.write():
            parent: BlockNode | None = None
            if start_block:
                parent = self._nodes.get(rk.keys[start_block - 1])
                if parent is None or parent.check != rk.checks[start_block - 1]:
                    raise ValueError("insert must extend an indexed chain: block start_block - 1 is not cached")
            for offset, payload in enumerate(payloads):
                i = start_block + offset
                key, check = rk.keys[i], rk.checks[i]
                node = self._nodes.get(key)
                if node is not None:
                    if node.parent is not parent or node.check != check or node.namespace != ns.digest:
                        self._verification_failures += 1
                        released.extend(payloads[offset:])
                        break
                    self._insert_conflicts += 1
                    released.append(payload)
                    result.nodes.append(node)
                    result.inserted.append(False)
                else:
                    node = BlockNode(key, check, ns.digest, i, parent, payload, last_access=now)
                    self._attach(node, ns, rk)
                    if ready:
                        self._set_ready(node)
                    result.nodes.append(node)
                    result.inserted.append(True)
                parent = node
            changed = self._take_changed()
        self._notify(changed)
        self._release(released)
        return result

    def publish(self, nodes: Iterable[BlockNode]) -> None:
        """Make pending nodes visible to matching; their bytes must be complete and verified by now."""
        nodes = list(nodes)
        with self._lock.write():
            for node in nodes:  # all or none
                self._require_attached(node)
            for node in nodes:
                if not node.ready:
                    self._set_ready(node)
            changed = self._take_changed()
        self._notify(changed)

    def remove(self, node: BlockNode) -> list[BlockNode]:
        """Remove ``node`` and its whole subtree (descendants are unreachable without it).

        Raises :class:`PinnedError` and removes nothing if any node in the subtree is pinned.
        """
        with self._lock.write():
            self._require_attached(node)
            subtree = self._subtree(node)
            if node.pin_count or (len(subtree) > 1 and any(n.pin_count for n in subtree)):
                raise PinnedError("cannot remove a subtree that holds pinned blocks")
            for n in reversed(subtree):  # leaves first, so every detach is of a leaf
                self._detach(n)
            changed = self._take_changed()
        self._release([n.payload for n in subtree])  # first: the removed nodes' payloads learn they are gone
        self._notify(changed)
        return subtree

    def pin(self, nodes: Sequence[BlockNode]) -> None:
        """Take a lease on every node (all or none): pinned nodes are never evicted or removed."""
        with self._lock.write():
            for node in nodes:
                self._require_attached(node)
            for node in nodes:
                self._pin_locked(node)
            changed = self._take_changed()
        self._notify(changed)

    def match_and_pin(self, rk: RequestKeys) -> list[BlockNode]:
        """Longest match and a lease on it in one step, so nothing can be evicted in between."""
        with self._lock.write():
            nodes = self._match_locked(rk.keys, rk.checks, rk.namespace.digest, 0, None)
            for node in nodes:
                self._pin_locked(node)
            changed = self._take_changed()
        self._notify(changed)
        return nodes

    def unpin(self, nodes: Sequence[BlockNode]) -> None:
        with self._lock.write():
            for node, count in Counter(nodes).items():
                if node.pin_count < count:
                    raise ValueError("unpin of a node that is not pinned (or more times than it is pinned)")
            for node in nodes:
                node.pin_count -= 1
                if node.pin_count == 0:
                    self._pinned -= 1
                    self._refresh_evictable(node)
                    self._changed.append(node)
            changed = self._take_changed()
        self._notify(changed)

    def touch(self, nodes: Iterable[BlockNode], now: float | None = None) -> None:
        """Record a use: access time, hit count, and most-recently-used position among candidates."""
        now = time.monotonic() if now is None else now
        with self._lock.write():
            for node in nodes:
                node.last_access = now
                node.hits += 1
                if node in self._evictable:
                    self._evictable.pop(node)
                    self._evictable[node] = None

    # ------------------------------------------------------------------ internals (exclusive lock held)

    def _pin_locked(self, node: BlockNode) -> None:
        if node.pin_count == 0:
            self._pinned += 1
            self._evictable.pop(node, None)
            self._changed.append(node)
        node.pin_count += 1

    def _take_changed(self) -> list[BlockNode]:
        changed, self._changed = self._changed, []
        return changed

    def _notify(self, changed: list[BlockNode]) -> None:
        # Outside the lock, like _release: the runtime's callback takes locks of its own.
        if changed and self._on_change is not None:
            self._on_change(changed)

    def _require_attached(self, node: BlockNode) -> None:
        if self._nodes.get(node.key) is not node:
            raise StaleNodeError("the node is no longer in the index")

    def _attach(self, node: BlockNode, ns: KeyNamespace, rk: RequestKeys) -> None:
        self._nodes[node.key] = node
        parent = node.parent
        if parent is None:
            fp = self._fingerprints.get(ns.digest)
            if fp is None:
                fp = self._fingerprints[ns.digest] = RollingFingerprint(ns)
            node.anchor = fp.of_block(rk.block_tokens(0))
            self._anchors.setdefault(ns.digest, {}).setdefault(node.anchor, []).append(node)
            self._anchor_version += 1
        else:
            if parent.num_children == 0:
                self._leaves -= 1
                self._evictable.pop(parent, None)
                self._changed.append(parent)
            parent.num_children += 1
            node.next_sibling = parent.first_child
            if parent.first_child is not None:
                parent.first_child.prev_sibling = node
            parent.first_child = node
        self._leaves += 1

    def _detach(self, node: BlockNode) -> None:
        del self._nodes[node.key]
        self._evictable.pop(node, None)
        self._leaves -= 1
        if node.ready:
            self._ready -= 1
        parent = node.parent
        if parent is None:
            table = self._anchors[node.namespace]
            roots = table[node.anchor]
            roots.remove(node)
            if not roots:
                del table[node.anchor]
                if not table:
                    del self._anchors[node.namespace]
            self._anchor_version += 1
            return
        if node.prev_sibling is not None:
            node.prev_sibling.next_sibling = node.next_sibling
        else:
            parent.first_child = node.next_sibling
        if node.next_sibling is not None:
            node.next_sibling.prev_sibling = node.prev_sibling
        node.prev_sibling = node.next_sibling = None
        parent.num_children -= 1
        if parent.num_children == 0:
            self._leaves += 1
            self._refresh_evictable(parent)
            self._changed.append(parent)

    def _set_ready(self, node: BlockNode) -> None:
        node.ready = True
        self._ready += 1
        self._refresh_evictable(node)
        self._changed.append(node)

    def _refresh_evictable(self, node: BlockNode) -> None:
        if node.ready and node.pin_count == 0 and node.num_children == 0:
            self._evictable[node] = None

    def _subtree(self, root: BlockNode) -> list[BlockNode]:
        """Pre-order list of ``root``'s subtree (parents before children)."""
        if root.first_child is None:  # a leaf: what eviction removes, one at a time
            return [root]
        out, stack = [], [root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children())
        return out

    def _release(self, payloads: list[Any]) -> None:
        # Outside the lock: release callbacks belong to the runtime and may take locks of their own.
        if self._on_release is not None:
            for payload in payloads:
                self._on_release(payload)
