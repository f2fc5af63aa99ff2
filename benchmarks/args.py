"""Argument types the benchmarks' command lines share, so a bad value is an argparse error, not a traceback."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """An int > 0 (counts, sizes, block sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (ratios, rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model the benchmarks on the embedded engine run: a given directory, or a random-weight one of a named
    shape built (once) under the work directory."""
    parser.add_argument("--model", type=Path, help="model directory (default: build a random-weight one)")
    parser.add_argument("--shape", default="qwen2-tiny", help="shape of the built model (kv_benchmarks.models)")
    parser.add_argument("--work-dir", type=Path, default=Path("kvtier-work"), help="built model and caches")


def add_scale_arguments(
    parser: argparse.ArgumentParser, full: dict[str, int], quick: dict[str, int], help_: dict[str, str] | None = None
) -> None:
    """One ``--NAME`` (a positive int) per workload size; its default is ``full[NAME]``, or ``quick[NAME]``
    with ``--quick`` (the benchmark resolves it)."""
    for name in full:
        what = f"{help_[name]}; " if help_ else ""
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=positive_int, help=f"{what}default {full[name]} ({quick[name]} quick)"
        )
