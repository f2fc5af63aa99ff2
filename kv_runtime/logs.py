"""kvtier's own log lines on stderr, in this process and in the engine processes it starts.

Engines such as LMDeploy run their model in a spawned process; the level travels to it in the environment
(``KVTIER_LOG_LEVEL``), so a hit or a disk write logged there shows up like one logged here.
"""

from __future__ import annotations

import logging
import os

LOG_LEVEL_ENV = "KVTIER_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PACKAGES = ("prefix_reuse", "kv_runtime", "kv_policy", "kv_io", "kv_pipeline", "kv_benchmarks")


def log_to_stderr(level: str | None = None) -> None:
    """Send kvtier's packages' logs to stderr at ``level`` (default: the environment's, else WARNING)."""
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "WARNING").upper()
    if level not in LEVELS:
        raise ValueError(f"log level: expected one of {', '.join(LEVELS)}, got {level!r} (from {LOG_LEVEL_ENV}?)")
    os.environ[LOG_LEVEL_ENV] = level
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "kvtier", False)]:
            logger.removeHandler(old)
        handler.kvtier = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
