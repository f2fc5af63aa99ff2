"""Reproducible measurements behind `kvtier bench NAME`.

Each benchmark is a module of this package exposing ``add_arguments(parser)`` and ``run(args) -> Report``;
``BENCHMARKS`` maps the command-line name to the module so that ``kvtier --help`` lists them without importing
their (sometimes heavy) dependencies.
"""

BENCHMARKS: dict[str, str] = {
    "runtime": "kv_benchmarks.runtime",
    "prefix": "kv_benchmarks.prefix",
    "e2e": "kv_benchmarks.e2e",
    "policy": "kv_benchmarks.policy",
}
