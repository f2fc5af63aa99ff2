"""The `kvtier` command: one entry point, subcommands registered here.

Benchmark modules (and the demo, in ``benchmarks/``) keep their heavy imports inside the functions that run
them, so building the parser for ``kvtier --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from kv_benchmarks import BENCHMARKS
from kv_benchmarks.report import DEFAULT_OUT, write_report


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark; writes NAME.json, NAME.csv and NAME.md")
    names = bench.add_subparsers(dest="bench_name", metavar="NAME", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--quick", action="store_true", help="smaller scale, under a minute on 2 cores")
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
        module.add_arguments(p)
        p.set_defaults(run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier", description="Tiered KV-cache runtime for LLM inference (HBM, pinned DDR, NVMe)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="the main job: a multi-session long-context workload with and without kvtier")
    from kv_benchmarks import demo as demo_module

    demo_module.add_arguments(demo)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from kv_benchmarks import demo

        return demo.main(args)
    if args.command == "bench":
        report = args.run(args)
        paths = write_report(report, args.out)
        print(Path(paths["md"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
