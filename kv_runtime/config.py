"""One configuration for both engines (the embedded transformers engine and LMDeploy's connector), validated in
one place: a frozen pydantic model.

Few knobs with good defaults; everything else is derived (byte sizes from the model config) or measured and
then learned online (prefill throughput, link bandwidths). Precedence, lowest to highest: defaults, a named
preset (``kv_runtime_presets.yaml``), a TOML or JSON file, ``KVTIER_*`` environment variables, keyword
arguments in code. A preset is picked by ``load(preset=...)``, ``KVTIER_PRESET`` or a ``preset`` key in the file
(in that order of precedence).

LMDeploy runs its engine in a spawned process and hands the connector its settings as plain data
(``kv_connector_extra_config``): ``to_plain()`` gives that dict, ``KVTierConfig.from_plain`` rebuilds and
validates it on the other side, and ``digest()`` keys the per-process store.

Importing this module loads no torch: the CLI's parser, settings files and LMDeploy's launcher read it cheaply.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal, get_args

import orjson
import xxhash
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic import model_validator as _model_validator

from kv_runtime.logs import LOG_LEVEL_ENV

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_IO_THREADS",
    "ENGINES",
    "ENV_PREFIX",
    "PRESETS_FILE",
    "PRESET_ENV",
    "WRITE_MODES",
    "ConfigError",
    "KVTierConfig",
    "parse_size",
    "preset_values",
    "presets",
]

ENV_PREFIX = "KVTIER_"
PRESET_ENV = "KVTIER_PRESET"  # names a preset; like KVTIER_LOG_LEVEL it is not a configuration key
PRESETS_FILE = "kv_runtime_presets.yaml"
Engine = Literal["hf", "lmdeploy"]
WriteMode = Literal["write-back", "write-through", "selective"]
ENGINES: tuple[str, ...] = get_args(Engine)
WRITE_MODES: tuple[str, ...] = get_args(WriteMode)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_BLOCK_SIZE = 4096  # tokens per block: LMDeploy uses 16-256; a larger block would rarely be reused whole
MAX_IO_THREADS = 256  # a disk's useful queue depth is tens of requests (io/README.md), not thousands of threads
MAX_PREFILL_CHUNK = 1 << 20  # tokens; "never split" in practice: past any model's context length
EVICTION_TIERS = ("hbm", "ddr", "disk")  # the tiers ``eviction_policy`` may name
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# KV dtype names (and the aliases torch and LMDeploy users write) -> the one name both engines pass on.
_DTYPES = {
    "auto": "auto",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


def parse_size(value: int | str, key: str = "size") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2G"`` or ``"1048576"`` (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{key}: a byte count must be whole, got {value!r} (units may be fractional: '1.5GiB')")
        n = int(value)
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(f"{key}: cannot read {value!r} as a byte size (e.g. 512MiB, 2GiB)")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "")[:1].upper()])
    if n < 0:
        raise ConfigError(f"{key}: must be >= 0, got {n}")
    return n


def parse_eviction_policy(value: str) -> dict[str, str]:
    """``eviction_policy`` as ``{tier: policy}``: one name (every tier) or ``tier=name`` pairs separated by
    commas; a ConfigError naming the known policies (or tiers) for an unknown one."""
    from kv_policy.eviction import EVICTION_POLICIES

    known = ", ".join(sorted(EVICTION_POLICIES))
    text = value.strip().lower()
    if "=" not in text:
        pairs = [(t, text) for t in EVICTION_TIERS]
    else:
        pairs = []
        for part in text.split(","):
            tier, sep, name = (p.strip() for p in part.partition("="))
            if not sep or tier not in EVICTION_TIERS:
                raise ConfigError(
                    f"eviction_policy: expected a policy name or tier=name pairs ({', '.join(EVICTION_TIERS)}), "
                    f"got {value!r}"
                )
            pairs.append((tier, name))
    for _, name in pairs:
        if name not in EVICTION_POLICIES:
            raise ConfigError(f"eviction_policy: unknown eviction policy {name!r}; known: {known}")
    return dict(pairs)


def _io_defaults() -> ModuleType:
    """``kv_io.defaults`` without running ``kv_io``'s package ``__init__``, which loads torch for the file engines.

    The module imports nothing, so executing it on its own is exactly what a normal import would do; once the
    package is loaded anyway the normal import is used.
    """
    if "kv_io" not in sys.modules:
        package = importlib.util.find_spec("kv_io")
        for where in (package.submodule_search_locations or []) if package else []:
            path = Path(where) / "defaults.py"
            spec = importlib.util.spec_from_file_location("kv_io.defaults", path) if path.is_file() else None
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
    return importlib.import_module("kv_io.defaults")


DEFAULT_IO_THREADS: int = _io_defaults().DEFAULT_THREADS


def _size(value: Any, info: ValidationInfo) -> int:
    return parse_size(value, info.field_name or "size")


def _no_flag(what: str):
    # pydantic's lax mode reads True as 1; a flag where a count or a rate belongs is a mistake
    def check(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):
            raise ConfigError(f"{info.field_name}: expected {what}, got {value!r}")
        return value

    return BeforeValidator(check)


Size = Annotated[int, BeforeValidator(_size)]
Count = Annotated[int, _no_flag("an integer"), Field(gt=0)]
# A prior of the cost model, which refits it online from observed prefills and transfers; 0: the engine measures
# it at start. Negative, infinite and NaN values are refused.
Prior = Annotated[float, _no_flag("a number"), Field(ge=0, allow_inf_nan=False)]


class KVTierConfig(BaseModel):
    """What a user sets, for either engine. Sizes are bytes (strings with units accepted); 0 disables a tier."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, use_attribute_docstrings=True)

    model: str = ""
    """The model directory (config.json, weights, tokenizer); required to run (``check_engine``)."""
    engine: Engine = "hf"
    """``hf``: the embedded transformers engine, which runs anywhere; ``lmdeploy``: LMDeploy's PyTorch engine."""
    device: str = "auto"
    """``auto`` (CUDA when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """Model and KV dtype; ``auto``: the model's config.json (``resolve_dtype``)."""
    block_size: Annotated[Count, Field(le=MAX_BLOCK_SIZE)] = 64
    """Tokens per block, the unit of reuse; 64 is LMDeploy's own block size, so one block maps to one of its blocks."""
    hbm_bytes: Size = 0
    """GPU memory for the engine's block pool (LMDeploy's prefix cache); 0: the engine sizes it itself."""
    ddr_bytes: Size = 2 << 30
    """Host memory (pinned where there is CUDA), allocated once at start. 2 GiB holds one 32K-token prefix of a
    7B model (1.75 GiB) and is still small enough for a laptop; servers set tens of GiB (see the presets)."""
    disk_bytes: Size = 0
    """The disk tier under ``cache_dir``; 0 (the default): none. Opt-in, because it writes files that outlive the
    process, and a size for it depends on the drive."""
    cache_dir: Path = Path("kvtier-cache")
    """Directory of the disk tier (and of the shared contexts' registry); ``~`` is expanded."""
    write_mode: WriteMode = "selective"
    """When blocks go down to disk. ``selective`` (default): blocks seen reused, so one-off prompts cost no disk
    bandwidth or wear; ``write-through``: every block once, so long prefixes survive DDR eviction and restarts;
    ``write-back``: on eviction from DDR."""
    cache_salt: str = ""
    """Part of every block key: tenants with different salts never hit (or time) each other's prefixes."""
    model_revision: str = ""
    """A tag naming the weights (a commit, a checkpoint step), part of every block key beside the hash of every
    weight byte: give it where a model directory is rewritten in place, to make the change explicit."""
    io_threads: Annotated[Count, Field(le=MAX_IO_THREADS)] = DEFAULT_IO_THREADS
    """The disk tier's outstanding requests (kv_io's measured default, io/README.md)."""
    max_inflight_bytes: Size = 256 << 20
    """Bound on the bytes of transfers in flight at once (the transformers engine's scheduler)."""
    prefill_chunk_tokens: Annotated[Count, Field(le=MAX_PREFILL_CHUNK)] = 512
    """Tokens per prefill turn on the transformers engine's one compute stream: a long prompt is prefilled in
    chunks of this many tokens, each its own turn, so other contexts' decode steps run between them and no
    stream waits longer than one chunk (an 8K-token prompt in one turn would stall every stream for its whole
    prefill). Smaller chunks: smoother streams, a little less prefill throughput. LMDeploy ignores it (its own
    scheduler batches prefill and decode)."""
    prefill_tflops: Prior = 0.0
    """Prefill throughput the cost model starts from; 0 (default): measured (the transformers engine times one
    calibration prefill), then learned from observed prefills: it differs by orders of magnitude between a CPU
    and a GPU, so no one prior fits."""
    ddr_gbps: Prior = 0.0
    """DDR -> engine bandwidth prior; 0 (default): the engine measures one copy from host memory into its device
    at start (a host memcpy on a CPU, PCIe on a GPU: no one number fits both), then learned from loads."""
    eviction_policy: str = "lru"
    """Which copy a full tier gives up first: a policy of ``kv_policy.EVICTION_POLICIES`` (``lru``, ``lfu``,
    ``arc``, ``s3-fifo``, ``kvtier-prefix``, ...) for every tier, or one per tier (``ddr=lfu,disk=lru``; a tier
    not named keeps ``lru``). Swappable while serving (``KVTierEngine.set_eviction_policy``)."""
    disk_gbps: Annotated[float, _no_flag("a number"), Field(gt=0, allow_inf_nan=False)] = 1.5
    """Disk -> DDR bandwidth prior, refined from observed loads. There is no cheap measurement at start (it would
    write and read a file past the page cache), so it must be > 0; 1.5 GB/s is what an NVMe drive gave without
    GPUDirect Storage on the lent H200 machine (1.4-1.8 GB/s raw, DESIGN.md)."""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_explain(e)) from None

    # ------------------------------------------------------------------ validation

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {value!r}")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> str:
        name = _DTYPES.get(value.removeprefix("torch.").lower()) if isinstance(value, str) else None
        if name is None:
            raise ConfigError(f"dtype: expected auto, float16, bfloat16 or float32, got {value!r}")
        return name

    @field_validator("eviction_policy")
    @classmethod
    def _eviction_policy(cls, value: str) -> str:
        parse_eviction_policy(value)
        return value.strip().lower()

    def eviction_policies(self) -> dict[str, str]:
        """``eviction_policy`` per tier name (``ddr``, ``disk``, ...), for the tiers it names."""
        return parse_eviction_policy(self.eviction_policy)

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @_model_validator(mode="after")
    def _some_tier(self) -> KVTierConfig:
        if self.ddr_bytes == 0 and self.disk_bytes == 0 and self.hbm_bytes == 0:
            raise ConfigError("at least one tier needs capacity: set hbm_bytes, ddr_bytes or disk_bytes")
        if self.max_inflight_bytes == 0:
            raise ConfigError("max_inflight_bytes: must be > 0 (it bounds transfers in flight)")
        return self

    def check_engine(self, engine: str | None = None) -> KVTierConfig:
        """This configuration is ready to run on its engine (``engine``, if given, must be the one it names).

        Both engines call it before they start, so a value wrong for both fails the same way on both; only
        what is really engine-specific differs. Returns ``self``.
        """
        if engine is not None and engine != self.engine:
            raise ConfigError(f"engine: this configuration is for engine={self.engine!r}, not {engine!r}")
        if not self.model:
            raise ConfigError("model: must name the model directory (config.json, weights, tokenizer)")
        if self.ddr_bytes == 0:
            raise ConfigError(
                "ddr_bytes: must be > 0: both engines restore KV through host memory (DDR), disk loads included"
            )
        if self.engine == "lmdeploy" and self.device == "cpu":
            raise ConfigError("device: engine='lmdeploy' runs on CUDA; got 'cpu' (engine='hf' runs on a CPU)")
        return self

    def resolve_dtype(self, model_config: Mapping[str, Any]) -> str:
        """The dtype name both engines use: ``dtype`` unless ``auto``, else the model's config.json
        (``torch_dtype``, or ``dtype`` as newer transformers write it), else bfloat16."""
        if self.dtype != "auto":
            return self.dtype
        found = model_config.get("torch_dtype") or model_config.get("dtype") or "bfloat16"
        name = _DTYPES.get(str(found).removeprefix("torch.").lower())
        if name in (None, "auto"):
            raise ConfigError(f"dtype: the model's config.json names {found!r}; set dtype to float16 or bfloat16")
        return name

    # ------------------------------------------------------------------ building and copying

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        preset: str | None = None,
        **overrides: Any,
    ) -> KVTierConfig:
        """Defaults, then a preset, then ``path`` (TOML or JSON), then ``KVTIER_*`` variables of ``env`` (default:
        the process's), then ``overrides`` (``None`` means not given). The preset is ``preset``, else
        ``KVTIER_PRESET``, else the file's ``preset`` key."""
        env = os.environ if env is None else env
        from_file, file_preset = _read_file(Path(path)) if path is not None else ({}, None)
        values: dict[str, Any] = {}
        name = preset or env.get(PRESET_ENV) or file_preset
        if name:
            values.update(preset_values(name))
        values.update(from_file)
        values.update(_from_env(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> KVTierConfig:
        """A copy with ``changes`` (configuration keys), validated like a new configuration."""
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})

    def to_plain(self) -> dict[str, Any]:
        """Every key with a JSON-able value (paths as strings): what crosses into LMDeploy's engine process."""
        return self.model_dump(mode="json")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, for reports and logs (the same as ``to_plain``)."""
        return self.to_plain()

    @classmethod
    def from_plain(cls, data: Mapping[str, Any]) -> KVTierConfig:
        """Rebuild a configuration from ``to_plain()`` output (missing keys take their defaults), validated."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping of configuration keys, got {type(data).__name__}")
        return cls(**dict(data))

    def digest(self) -> str:
        """A hex digest of every key's value, the same in every process and on every run."""
        return xxhash.xxh3_64_hexdigest(orjson.dumps(self.to_plain(), option=orjson.OPT_SORT_KEYS))


def _explain(error: ValidationError) -> str:
    """pydantic's report in one short line per problem, each naming its key."""
    unknown = [str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden" and e["loc"]]
    parts = []
    if unknown:
        known = ", ".join(KVTierConfig.model_fields)
        parts.append(f"unknown configuration keys: {', '.join(sorted(unknown))}; known: {known}")
    for e in error.errors():
        if e["type"] == "extra_forbidden":
            continue
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # raised by our own validators, already naming the key
            parts.append(str(cause))
            continue
        key = ".".join(str(p) for p in e["loc"]) or "configuration"
        parts.append(f"{key}: {_phrase(e)}, got {e['input']!r}")
    return "; ".join(parts)


def _phrase(e: Mapping[str, Any]) -> str:
    kind, ctx = e["type"], e.get("ctx") or {}
    if isinstance(e.get("input"), float) and not math.isfinite(e["input"]):
        return "expected a finite number"
    if kind.startswith("int_"):
        return "expected an integer"
    if kind.startswith("float_"):
        return "expected a number"
    if kind == "finite_number":
        return "expected a finite number"
    if kind == "literal_error":
        return f"expected {ctx.get('expected', '')}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind.startswith("string_"):
        return "expected a string"
    return str(e["msg"]).lower()


# ---------------------------------------------------------------------- sources: presets, files, environment


@functools.cache
def _presets() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(resources.files("kv_runtime").joinpath(PRESETS_FILE).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ConfigError(f"{PRESETS_FILE}: expected a table of named presets, each a table of settings")
    return doc


def presets() -> dict[str, dict[str, Any]]:
    """The named presets of ``kv_runtime_presets.yaml``: ``{name: {key: value}}`` (a copy)."""
    return {name: dict(values) for name, values in _presets().items()}


def preset_values(name: str) -> dict[str, Any]:
    """One preset's settings; a ConfigError listing the known presets for an unknown name."""
    known = _presets()
    if name not in known:
        raise ConfigError(f"preset: unknown preset {name!r}; known: {', '.join(sorted(known))}")
    return dict(known[name])


def _read_file(path: Path) -> tuple[dict[str, Any], str | None]:
    """A settings file's keys and the preset it names (a ``preset`` key at its top or in its ``[kvtier]`` table)."""
    if not path.exists():
        raise ConfigError(f"configuration file not found: {path}")
    data = path.read_bytes()
    try:
        doc = tomllib.loads(data.decode()) if path.suffix == ".toml" else orjson.loads(data)
    except (tomllib.TOMLDecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    table = doc.get("kvtier", doc)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [kvtier] must be a table of settings")
    values = dict(table)
    preset = values.pop("preset", None) or doc.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"preset: expected a preset name, got {preset!r}")
    return values, preset


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    """``KVTIER_*`` variables as keys (their strings are coerced by validation). ``KVTIER_LOG_LEVEL`` is the log
    level (``kv_runtime.logs``) and ``KVTIER_PRESET`` names a preset: neither is a key."""
    skip = (LOG_LEVEL_ENV, PRESET_ENV)
    return {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX) and k not in skip}
