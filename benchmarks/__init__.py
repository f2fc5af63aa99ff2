"""Reproducible measurements behind `kvtier bench NAME`.

Each benchmark is a module exposing ``add_arguments(parser)`` and ``run(args) -> Report``; ``BENCHMARKS`` maps
the command-line name to the module so that ``kvtier --help`` lists them without importing their (sometimes
heavy) dependencies. This package keeps the end-to-end and LMDeploy benchmarks (``e2e``, ``e2e_lmdeploy``), the
demo and the shared pieces (``report``, ``models``, ``workload``); each library package's own benchmark lives in
that package's ``benchmarks/`` folder (``prefix_reuse.benchmarks``, ``kv_runtime.benchmarks``,
``kv_policy.benchmarks``), tooling above the library that the library itself never imports.
"""

BENCHMARKS: dict[str, str] = {
    "runtime": "kv_runtime.benchmarks.runtime",
    "prefix": "prefix_reuse.benchmarks.prefix",
    "e2e": "kv_benchmarks.e2e",
    "policy": "kv_policy.benchmarks.policy",
    "faults": "kv_benchmarks.faults",
    "serve": "kv_benchmarks.serve",
}
