"""One configuration for the whole runtime, from code, a file and the environment, validated in one place.

Few knobs with good defaults; everything else is derived (byte sizes from the model config, bandwidths from
measurement). Precedence, lowest to highest: defaults, a TOML or JSON file, ``KVTIER_*`` environment
variables, keyword arguments in code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson

from kv_io.file_io import DEFAULT_THREADS
from kv_runtime.logs import LOG_LEVEL_ENV

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "KVTIER_"
ENGINES = ("hf", "lmdeploy")
WRITE_MODES = ("write-back", "write-through", "selective")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


def parse_size(value: int | str, key: str = "size") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2G"`` or ``"1048576"`` (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"{key}: cannot read {value!r} as a byte size (e.g. 512MiB, 2GiB)")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "")[:1].upper()])
    if n < 0:
        raise ConfigError(f"{key}: must be >= 0, got {n}")
    return n


@dataclass(frozen=True)
class KVTierConfig:
    """What a user sets. Sizes are bytes (strings with units accepted); 0 disables a tier."""

    model: str = ""
    engine: str = "hf"
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 64
    hbm_bytes: int = 0
    ddr_bytes: int = 1 << 30
    disk_bytes: int = 4 << 30
    cache_dir: Path = Path("kvtier-cache")
    write_mode: str = "selective"
    cache_salt: str = ""
    io_threads: int = DEFAULT_THREADS  # the disk tier's I/O threads
    max_inflight_bytes: int = 256 << 20
    # The prefill throughput (TFLOP/s) the cost model starts from; 0: measured at start by the transformers
    # engine, 400 under LMDeploy. The model refines it online from observed prefills.
    prefill_tflops: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("hbm_bytes", "ddr_bytes", "disk_bytes", "max_inflight_bytes"):
            set_(self, name, parse_size(getattr(self, name), name))
        set_(self, "cache_dir", Path(self.cache_dir).expanduser())
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.write_mode not in WRITE_MODES:
            raise ConfigError(f"write_mode: expected one of {', '.join(WRITE_MODES)}, got {self.write_mode!r}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "io_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.ddr_bytes == 0 and self.disk_bytes == 0 and self.hbm_bytes == 0:
            raise ConfigError("at least one tier needs capacity: set hbm_bytes, ddr_bytes or disk_bytes")
        if isinstance(self.prefill_tflops, bool) or not isinstance(self.prefill_tflops, int | float):
            raise ConfigError(f"prefill_tflops: expected a number, got {self.prefill_tflops!r}")
        if self.prefill_tflops < 0:
            raise ConfigError(f"prefill_tflops: expected >= 0, got {self.prefill_tflops!r}")
        if self.max_inflight_bytes == 0:
            raise ConfigError("max_inflight_bytes: must be > 0 (it bounds transfers in flight)")

    @classmethod
    def load(
        cls, path: str | Path | None = None, *, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> KVTierConfig:
        """Defaults, then ``path`` (TOML or JSON), then ``KVTIER_*`` variables of ``env``, then ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(_read_file(Path(path)))
        values.update(_from_env(os.environ if env is None else env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**{k: _coerce(known[k], k, v) for k, v in values.items()})

    def replace(self, **changes: Any) -> KVTierConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: str(v) if isinstance(v, Path) else v for f in fields(self) for v in [getattr(self, f.name)]}


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"configuration file not found: {path}")
    data = path.read_bytes()
    try:
        doc = tomllib.loads(data.decode()) if path.suffix == ".toml" else orjson.loads(data)
    except (tomllib.TOMLDecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return doc.get("kvtier", doc)


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    """``KVTIER_*`` variables as keys; ``KVTIER_LOG_LEVEL`` is the log level (``kv_runtime.logs``), not a key."""
    return {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX) and k != LOG_LEVEL_ENV}


def _coerce(f: dataclasses.Field, key: str, value: Any) -> Any:
    """Environment values arrive as strings; turn them into the field's type with a clear error."""
    if not isinstance(value, str) or f.type in ("str", str) or key.endswith("_bytes"):
        return value
    if f.type in ("int", int):
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if f.type in ("float", float):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if f.type in ("Path", Path):
        return Path(value)
    return value
