"""The `kvtier` command: one entry point, subcommands registered here.

Benchmark modules (and the demo, in ``benchmarks/``) keep their heavy imports inside the functions that run
them, so building the parser for ``kvtier --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kv_benchmarks import BENCHMARKS
from kv_benchmarks.args import positive_float, positive_int
from kv_benchmarks.report import DEFAULT_OUT, write_report
from kv_runtime.logs import LEVELS, log_to_stderr


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LEVELS)}, got {text!r}")
    return level


def _writable_dir(path: Path) -> str | None:
    """Why ``path`` cannot take a report (None: it can), checked before a run rather than after it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"cannot write to {path}: {e.strerror or e}"
    return None


def _user_error(error: BaseException) -> bool:
    """A mistake in what the user asked for (settings, paths, a busy cache), reported in one line: the
    documented error types of the packages that were loaded to run the command."""
    kinds: list[type] = []
    for module, names in (
        ("kv_runtime.config", ("ConfigError",)),
        ("kv_io.private_files", ("UnsafePathError",)),
        ("kv_io.disk_store", ("StoreLockedError", "DiskCapacityError")),
    ):
        loaded = sys.modules.get(module)
        kinds += [getattr(loaded, n) for n in names if loaded is not None and hasattr(loaded, n)]
    return isinstance(error, tuple(kinds))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run a benchmark; writes NAME.json, NAME.csv and NAME.md")
    names = bench.add_subparsers(dest="bench_name", metavar="NAME", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--quick", action="store_true", help="smaller scale: a few minutes at most on 2 cores")
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
        module.add_arguments(p)
        p.set_defaults(run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtier", description="Tiered KV-cache runtime for LLM inference (HBM, pinned DDR, NVMe)."
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default="WARNING",
        help=f"level of kvtier's own log lines: {', '.join(LEVELS)} (INFO: hits, loads, disk writes)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="the main job: a multi-session long-context workload with and without kvtier")
    from kv_benchmarks import demo as demo_module

    demo_module.add_arguments(demo)
    _add_bench(sub)
    _add_serve(sub)
    return parser


LMDEPLOY_ONLY = ("session_len", "cache_max_entry_count")
HF_ONLY = ("device",)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server with kvtier's DDR and disk tiers (the transformers engine, or LMDeploy's)",
        description="kvtier's server (kv_pipeline.server): /v1/chat/completions, /v1/completions, named shared "
        "contexts (/v1/shared_contexts), /metrics, over the transformers engine (--engine hf, the default: CPU or "
        "GPU) or LMDeploy's PyTorch engine with kvtier's connector (--engine lmdeploy: CUDA). Flags without an "
        "engine in their help mean the same on both.",
    )
    serve.add_argument("model", help="model directory")
    serve.add_argument(
        "--engine", choices=["hf", "lmdeploy"], default="hf", help="which engine serves (default hf: runs anywhere)"
    )
    serve.add_argument("--config", type=Path, help="kvtier settings file (TOML or JSON); KVTIER_* variables apply")
    serve.add_argument(
        "--preset",
        help="named tier preset (kv_runtime/kv_runtime_presets.yaml); the file, KVTIER_* and options override it",
    )
    serve.add_argument("--ddr-bytes", help="DDR tier size, e.g. 32GiB")
    serve.add_argument("--disk-bytes", help="disk tier size, e.g. 200GiB (0: no disk tier)")
    serve.add_argument("--cache-dir", type=Path, help="directory of the disk tier")
    serve.add_argument("--write-mode", choices=["write-through", "selective"], help="when blocks go to disk")
    serve.add_argument("--block-size", type=positive_int, help="tokens per block")
    serve.add_argument("--dtype", help="model dtype: auto, bfloat16, float16")
    serve.add_argument("--prefill-tflops", type=positive_float, help="the cost model's prior for prefill throughput")
    serve.add_argument("--server-name", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--server-port", type=positive_int, default=23333, help="port to listen on (default 23333)")
    serve.add_argument("--device", help="hf: auto, cpu or cuda[:N] (default auto)")
    serve.add_argument(
        "--warm-up",
        action="store_true",
        help="before accepting requests, promote pinned shared contexts' and the hottest disk blocks into DDR",
    )
    serve.add_argument(
        "--warm-up-seconds", type=positive_float, help="time bound of --warm-up (default 30; implies --warm-up)"
    )
    serve.add_argument("--session-len", type=positive_int, help="lmdeploy: longest prompt plus output, in tokens")
    serve.add_argument(
        "--cache-max-entry-count", type=positive_float, help="lmdeploy: share of free GPU memory for LMDeploy's KV"
    )
    serve.set_defaults(parser=serve)


def serve(args: argparse.Namespace) -> int:
    """Serve ``args.model`` over HTTP on the engine ``--engine`` names, after checking every setting."""
    from kv_pipeline.config import KVTierConfig

    other = LMDEPLOY_ONLY if args.engine == "hf" else HF_ONLY
    given = [name for name in other if getattr(args, name) not in (None, False)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        args.parser.error(f"{flags}: not an option of --engine {args.engine}")
    overrides = {
        "ddr_bytes": args.ddr_bytes,
        "disk_bytes": args.disk_bytes,
        "cache_dir": args.cache_dir,
        "write_mode": args.write_mode,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "prefill_tflops": args.prefill_tflops,
        "device": args.device,
    }
    # The settings are checked before any engine is imported: a mistake costs no engine start.
    config = KVTierConfig.load(args.config, preset=args.preset, model=args.model, engine=args.engine, **overrides)
    config.check_engine(args.engine)
    return _serve(args, config)


def _serve(args: argparse.Namespace, config: object) -> int:
    """kvtier's OpenAI-compatible server (``kv_pipeline.server``) over the engine ``--engine`` names."""
    import asyncio

    from kv_pipeline.server import serve_forever

    warm = args.warm_up_seconds if args.warm_up_seconds is not None else (30.0 if args.warm_up else None)
    level = "info" if args.log_level in ("DEBUG", "INFO") else "warning"
    options = {name: getattr(args, name) for name in LMDEPLOY_ONLY if getattr(args, name) is not None}
    asyncio.run(
        serve_forever(
            config, args.server_name, args.server_port, warm_up_seconds=warm, log_level=level, engine_options=options
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_to_stderr(args.log_level)
    if args.command in ("demo", "bench") and (problem := _writable_dir(args.out)):
        parser.error(f"--out: {problem}")
    try:
        return _run(args)
    except Exception as e:
        if not _user_error(e) or args.log_level == "DEBUG":
            raise
        print(f"kvtier: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
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
