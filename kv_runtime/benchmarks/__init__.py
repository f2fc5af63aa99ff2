"""Benchmarks of ``kv_runtime`` (``kvtier bench runtime``): HBM<->DDR and disk<->DDR/HBM through the migrator
against raw pinned copies and raw O_DIRECT in the same run, DDR pool utilisation around defragmentation, and the
cost of one eviction from a DDR tier of many blocks with a pinned LRU end.

Tooling above the library, not part of it: modules here may import ``kv_benchmarks.report`` (the JSON/CSV/Markdown
writer) and the shared workloads, while ``kv_runtime`` itself never imports this folder.
"""
