"""One writer for every benchmark: ``NAME.json``, ``NAME.csv`` and ``NAME.md`` in the output directory.

The JSON always carries ``env`` (machine, GPU, versions), ``reference`` (the baseline measured in the same run)
and ``metrics`` (the figures under the names their bars use), so results from different machines compare.
"""

from __future__ import annotations

import csv
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

DEFAULT_OUT = Path("benchmarks/results")


@dataclass
class Report:
    """What a benchmark produced: the figures, their reference, and a table for CSV/Markdown."""

    name: str
    metrics: dict[str, Any]
    reference: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] | None = None  # where it was measured; None: this machine (see ``environment``)


def environment() -> dict[str, Any]:
    """Machine and library versions, so a figure can be traced to where it was measured."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    for dist in ("kvtier", "torch", "numpy", "xxhash", "transformers", "lmdeploy", "kvikio-cu13"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return env


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def to_markdown(report: Report, env: dict[str, Any]) -> str:
    """A page a person reads: the headline metrics, the reference, then the detailed table."""
    lines = [f"# kvtier bench {report.name}", ""]
    flat: dict[str, Any] = {}
    _flatten("", report.metrics, flat)
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
    if report.reference:
        ref: dict[str, Any] = {}
        _flatten("", report.reference, ref)
        lines += ["", "Reference measured in the same run:", "", "| reference | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ref.items()]
    if report.rows:
        cols = list(report.rows[0])
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in report.rows]
    if report.notes:
        lines += ["", *[f"- {n}" for n in report.notes]]
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write JSON, CSV and Markdown; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = report.env if report.env is not None else environment()
    doc = {
        "name": report.name,
        "env": env,
        "config": report.config,
        "reference": report.reference,
        "metrics": report.metrics,
        "rows": report.rows,
        "notes": report.notes,
    }
    paths = {ext: out_dir / f"{report.name}.{ext}" for ext in ("json", "csv", "md")}
    paths["json"].write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    with paths["csv"].open("w", newline="") as f:
        if report.rows:
            cols = list(dict.fromkeys(c for r in report.rows for c in r))
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            writer.writerows(report.rows)
        else:
            flat: dict[str, Any] = {}
            _flatten("", report.metrics, flat)
            writer = csv.writer(f)
            writer.writerow(["metric", "value"])
            writer.writerows(flat.items())
    paths["md"].write_text(to_markdown(report, env))
    return paths
