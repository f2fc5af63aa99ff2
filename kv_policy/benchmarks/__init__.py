"""Benchmarks of ``kv_policy`` (``kvtier bench policy``): every eviction policy replayed on a Mooncake-format
trace at several capacities, one and two tiers, with LRU, Belady's offline optimum and the unbounded cache as
the references replayed in the same run.

Tooling above the library, not part of it: modules here may import ``kv_benchmarks.report`` (the JSON/CSV/Markdown
writer) and the shared workloads, while ``kv_policy`` itself never imports this folder.
"""
