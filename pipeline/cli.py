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
from kv_runtime.logs import log_to_stderr


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
    parser.add_argument(
        "--log-level", default="WARNING", help="level of kvtier's own log lines (INFO: hits, loads, disk writes)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="the main job: a multi-session long-context workload with and without kvtier")
    from kv_benchmarks import demo as demo_module

    demo_module.add_arguments(demo)
    _add_bench(sub)
    serve = sub.add_parser(
        "serve", help="LMDeploy's OpenAI-compatible server with kvtier's DDR and disk tiers under its prefix cache"
    )
    serve.add_argument("model", help="model directory")
    serve.add_argument("--config", type=Path, help="kvtier settings file (TOML or JSON); KVTIER_* variables apply")
    serve.add_argument(
        "--preset",
        help="named tier preset (kv_runtime/kv_runtime_presets.yaml); the file, KVTIER_* and options override it",
    )
    serve.add_argument("--ddr-bytes", help="DDR tier size, e.g. 32GiB")
    serve.add_argument("--disk-bytes", help="disk tier size, e.g. 200GiB (0: no disk tier)")
    serve.add_argument("--cache-dir", type=Path, help="directory of the disk tier")
    serve.add_argument("--write-mode", choices=["write-through", "selective"], help="when blocks go to disk")
    serve.add_argument("--block-size", type=int, help="tokens per block (LMDeploy's block_size)")
    serve.add_argument("--dtype", help="model dtype: auto, bfloat16, float16")
    serve.add_argument("--prefill-tflops", type=float, help="the cost model's prior for prefill throughput")
    serve.add_argument("--session-len", type=int, help="longest prompt plus output, in tokens")
    serve.add_argument("--cache-max-entry-count", type=float, help="share of free GPU memory for LMDeploy's KV")
    serve.add_argument("--server-name", default="0.0.0.0")
    serve.add_argument("--server-port", type=int, default=23333)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Start LMDeploy's OpenAI-compatible server on its PyTorch engine with kvtier's connector installed."""
    from kv_pipeline.config import KVTierConfig
    from kv_pipeline.lmdeploy_engine import engine_config
    from kv_runtime.backends.lmdeploy_connector import install

    install()
    from lmdeploy.serve.openai.api_server import serve as lmdeploy_serve

    overrides = {
        "ddr_bytes": args.ddr_bytes,
        "disk_bytes": args.disk_bytes,
        "cache_dir": args.cache_dir,
        "write_mode": args.write_mode,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "prefill_tflops": args.prefill_tflops,
    }
    config = KVTierConfig.load(args.config, preset=args.preset, model=args.model, engine="lmdeploy", **overrides)
    options = {"session_len": args.session_len, "cache_max_entry_count": args.cache_max_entry_count}
    backend_config = engine_config(config, **{k: v for k, v in options.items() if v is not None})
    lmdeploy_serve(
        args.model,
        backend="pytorch",
        backend_config=backend_config,
        server_name=args.server_name,
        server_port=args.server_port,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr(args.log_level)
    if args.command == "demo":
        from kv_benchmarks import demo

        return demo.main(args)
    if args.command == "serve":
        return serve(args)
    if args.command == "bench":
        report = args.run(args)
        paths = write_report(report, args.out)
        print(Path(paths["md"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
