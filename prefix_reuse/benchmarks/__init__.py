"""Benchmarks of ``prefix_reuse`` (``kvtier bench prefix``): hit ratio and matched length per workload, and the
latency of a fully cached 128K-token lookup against an index of a million blocks, next to the cost of the
prompt's chained keys alone and of one raw hash over the same bytes.

Tooling above the library, not part of it: modules here may import ``kv_benchmarks.report`` (the JSON/CSV/Markdown
writer) and the shared workloads, while ``prefix_reuse`` itself never imports this folder.
"""
