"""What is cached: block keys, the prefix index, matching strategies and reuse metrics.

Plain Python and numpy; no torch, no GPU. See README.md in this folder for the ownership map.
"""

from prefix_reuse.index import (
    BlockNode,
    IndexStats,
    InsertResult,
    PinnedError,
    PrefixReuseIndex,
    StaleNodeError,
)
from prefix_reuse.keys import BlockKeyer, RequestKeys, as_token_array
from prefix_reuse.matcher import Hit, MatchResult, PrefixMatcher
from prefix_reuse.metrics import PrefixReuseMetrics
from prefix_reuse.namespace import KeyNamespace, model_fingerprint

__all__ = [
    "BlockKeyer",
    "BlockNode",
    "Hit",
    "IndexStats",
    "InsertResult",
    "KeyNamespace",
    "MatchResult",
    "PinnedError",
    "PrefixMatcher",
    "PrefixReuseIndex",
    "PrefixReuseMetrics",
    "RequestKeys",
    "StaleNodeError",
    "as_token_array",
    "model_fingerprint",
]
