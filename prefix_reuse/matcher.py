"""Matching strategies over the index: longest prefix (the default) and multi-hit.

*Longest prefix* is what an engine can reuse as is: the leading blocks whose KV was computed with exactly this
prefix. *Multi-hit* also reports cached chunks found anywhere else in the prompt, at any token offset (a
document placed after a different system prompt): the index's chain roots carry a rolling fingerprint, the
matcher fingerprints every offset of the prompt in one vectorised pass, and each candidate is confirmed with
its chained keys and confirmation hashes before it is reported. Hits do not overlap; each is reported with its
token position. Whether a position-shifted chunk's KV can be reused (it was computed under another prefix) is
the runtime's decision, not the matcher's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from prefix_reuse.fingerprint import RollingFingerprint
from prefix_reuse.index import BlockNode, PrefixReuseIndex
from prefix_reuse.keys import BlockKeyer, RequestKeys, TokenIds
from prefix_reuse.metrics import PrefixReuseMetrics


@dataclass(slots=True, frozen=True)
class Hit:
    """A run of cached blocks found at ``token_start`` of the prompt."""

    token_start: int
    nodes: tuple[BlockNode, ...]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return len(self.nodes)

    @property
    def num_tokens(self) -> int:
        return len(self.nodes) * self.block_size

    @property
    def token_end(self) -> int:
        return self.token_start + self.num_tokens


@dataclass(slots=True)
class MatchResult:
    """What a lookup found: the prompt's keys and the hits, in prompt order (a prefix hit starts at 0)."""

    keys: RequestKeys
    hits: list[Hit] = field(default_factory=list)

    @property
    def prefix(self) -> tuple[BlockNode, ...]:
        """Nodes of the leading hit, the part an engine can reuse directly."""
        return self.hits[0].nodes if self.hits and self.hits[0].token_start == 0 else ()

    @property
    def prefix_tokens(self) -> int:
        return len(self.prefix) * self.keys.block_size

    @property
    def matched_tokens(self) -> int:
        return sum(h.num_tokens for h in self.hits)


class PrefixMatcher:
    """Looks prompts up in one namespace of an index and records what it found."""

    def __init__(
        self,
        index: PrefixReuseIndex,
        keyer: BlockKeyer,
        *,
        metrics: PrefixReuseMetrics | None = None,
        tier_of: Callable[[BlockNode], str] | None = None,
    ) -> None:
        self.index = index
        self.keyer = keyer
        self.metrics = metrics
        self._tier_of = tier_of
        self._fingerprint = RollingFingerprint(keyer.namespace)
        self._anchor_cache: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.uint64))

    def _keys(self, tokens: TokenIds | RequestKeys) -> RequestKeys:
        if isinstance(tokens, RequestKeys):
            if tokens.namespace != self.keyer.namespace:
                raise ValueError("the request's keys belong to another namespace than this matcher's")
            return tokens
        return self.keyer.request(tokens)

    def longest(self, tokens: TokenIds | RequestKeys) -> MatchResult:
        """The longest cached prefix (keys computed here unless ``tokens`` already are keys)."""
        start = time.perf_counter()
        rk = self._keys(tokens)
        nodes = self.index.match(rk)
        result = MatchResult(rk, [Hit(0, tuple(nodes), rk.block_size)] if nodes else [])
        self._record(result, time.perf_counter() - start)
        return result

    def multi_hit(self, tokens: TokenIds | RequestKeys) -> MatchResult:
        """Every cached chunk of the prompt: the prefix hit, then chain roots found at any later offset."""
        start = time.perf_counter()
        rk = self._keys(tokens)
        bs = rk.block_size
        prefix = self.index.match(rk)
        hits = [Hit(0, tuple(prefix), bs)] if prefix else []
        covered = len(prefix) * bs
        toks = rk.tokens
        anchors = self._anchors()
        if anchors.size and toks.size - covered >= bs:
            rolling = self._fingerprint.rolling(toks[covered:])
            for p in (np.flatnonzero(np.isin(rolling, anchors)) + covered).tolist():
                if p < covered:
                    continue
                nodes = self.index.match_keys(self.keyer.iter_keys(toks, p), self.keyer.namespace)
                if nodes:
                    hits.append(Hit(p, tuple(nodes), bs))
                    covered = p + len(nodes) * bs
        result = MatchResult(rk, hits)
        self._record(result, time.perf_counter() - start)
        return result

    def _anchors(self) -> np.ndarray:
        # One (version, table) pair replaced in one assignment: concurrent refreshes cannot mix them.
        cached_version, fps = self._anchor_cache
        if self.index.anchor_version != cached_version:
            version, table = self.index.anchors(self.keyer.namespace)
            fps = np.fromiter(table, dtype=np.uint64, count=len(table))
            self._anchor_cache = (version, fps)
        return fps

    def _record(self, result: MatchResult, seconds: float) -> None:
        if self.metrics is None:
            return
        tiers: dict[str, int] = {}
        if self._tier_of is not None:
            for hit in result.hits:
                for node in hit.nodes:
                    tier = self._tier_of(node)
                    tiers[tier] = tiers.get(tier, 0) + 1
        else:
            tiers["index"] = sum(h.num_blocks for h in result.hits)
        self.metrics.record_lookup(
            tokens=result.keys.num_tokens,
            matched_tokens=result.matched_tokens,
            seconds=seconds,
            tier_blocks=tiers,
        )
