"""kv_policy: what should happen to cached KV — eviction, migration, load-or-recompute, lifetime prediction.

Plain Python and numpy, no torch and no other kvtier package: every decision can be replayed on traces.
"""

from kv_policy.cost_benefit import CostBenefitModel, LoadPlan, ModelShape, TierLink
from kv_policy.eviction import (
    EVICTION_POLICIES,
    ARCPolicy,
    BlockInfo,
    EvictionPolicy,
    KvtierAdaptivePolicy,
    KvtierClassPolicy,
    KvtierHitDensityPolicy,
    KvtierPrefixPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    make_eviction_policy,
)
from kv_policy.lifetime import LifetimePredictor
from kv_policy.migration import EvictDecision, MigrationPolicy, Promotion, WriteDecision
from kv_policy.replay import PreparedTrace, ReplayResult, replay, replay_belady, replay_two_tier, replay_unbounded
from kv_policy.trace import SyntheticTraceConfig, TraceRequest, parse_request, read_trace, synthetic_trace, write_trace

__all__ = [
    "EVICTION_POLICIES",
    "ARCPolicy",
    "BlockInfo",
    "CostBenefitModel",
    "EvictDecision",
    "EvictionPolicy",
    "KvtierAdaptivePolicy",
    "KvtierClassPolicy",
    "KvtierHitDensityPolicy",
    "KvtierPrefixPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "LifetimePredictor",
    "LoadPlan",
    "MigrationPolicy",
    "ModelShape",
    "PreparedTrace",
    "Promotion",
    "ReplayResult",
    "S3FIFOPolicy",
    "SyntheticTraceConfig",
    "TierLink",
    "TraceRequest",
    "WriteDecision",
    "make_eviction_policy",
    "parse_request",
    "read_trace",
    "replay",
    "replay_belady",
    "replay_two_tier",
    "replay_unbounded",
    "synthetic_trace",
    "write_trace",
]
