"""The one configuration of both engines (``kv_runtime.config``): defaults, precedence with presets, sizes, the
environment, errors that name their key, the same rules on both engines, and the plain-data trip into
LMDeploy's engine process."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import types
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kv_runtime.config import (
    DEFAULT_IO_THREADS,
    ENGINES,
    PRESETS_FILE,
    ConfigError,
    KVTierConfig,
    parse_size,
    preset_values,
    presets,
)

DEFAULTS = {
    "model": "",
    "engine": "hf",
    "device": "auto",
    "dtype": "auto",
    "block_size": 64,
    "hbm_bytes": 0,
    "ddr_bytes": 2 << 30,
    "disk_bytes": 0,
    "cache_dir": "kvtier-cache",
    "write_mode": "selective",
    "cache_salt": "",
    "model_revision": "",
    "io_threads": 16,
    "max_inflight_bytes": 256 << 20,
    "prefill_chunk_tokens": 512,
    "prefill_tflops": 0.0,
    "ddr_gbps": 0.0,
    "eviction_policy": "lru",
    "disk_gbps": 1.5,
}


def error_of(**values: Any) -> str:
    """The message of the ConfigError that building (and checking) a configuration from ``values`` raises."""
    with pytest.raises(ConfigError) as info:
        KVTierConfig(**values).check_engine()
    return str(info.value)


# ---------------------------------------------------------------------- defaults


def test_one_default_per_key_whichever_engine():
    assert KVTierConfig().to_plain() == DEFAULTS
    for engine in ENGINES:
        plain = KVTierConfig.load(env={}, engine=engine).to_plain()
        assert plain == {**DEFAULTS, "engine": engine}
    # what the LMDeploy connector rebuilds from a bare extra-config dict gets the very same defaults
    assert KVTierConfig.from_plain({"engine": "lmdeploy"}).to_plain() == {**DEFAULTS, "engine": "lmdeploy"}


def test_io_threads_default_is_kv_ios():
    from kv_io.file_io import DEFAULT_THREADS

    assert DEFAULT_IO_THREADS == DEFAULT_THREADS == KVTierConfig().io_threads


def test_frozen_and_hashable():
    cfg = KVTierConfig(model="m")
    with pytest.raises(ValueError):
        cfg.block_size = 16  # type: ignore[misc]
    assert hash(cfg) == hash(KVTierConfig(model="m"))


def test_replace_is_validated():
    cfg = KVTierConfig(model="m")
    assert cfg.replace(ddr_bytes="1GiB").ddr_bytes == 1 << 30
    assert cfg.replace(ddr_bytes="1GiB").model == "m"
    with pytest.raises(ConfigError, match="block_size: must be > 0"):
        cfg.replace(block_size=0)
    with pytest.raises(ConfigError, match="unknown configuration keys: colour"):
        cfg.replace(colour="blue")


# ---------------------------------------------------------------------- precedence and presets


def test_every_preset_validates_and_runs_on_its_engine():
    names = set(presets())
    assert {"cpu-laptop", "gpu-long-context", "multi-tenant-server"} <= names
    for name in names:
        cfg = KVTierConfig.load(env={}, preset=name, model="m")
        assert cfg.check_engine() is cfg
        assert set(preset_values(name)) <= set(KVTierConfig.model_fields)


def test_presets_say_what_they_are_for():
    laptop = KVTierConfig.load(env={}, preset="cpu-laptop")
    gpu = KVTierConfig.load(env={}, preset="gpu-long-context")
    tenants = KVTierConfig.load(env={}, preset="multi-tenant-server")
    assert (laptop.engine, laptop.device) == ("hf", "cpu")
    assert 0 < laptop.ddr_bytes <= 2 << 30 and 1 << 30 <= laptop.disk_bytes <= 16 << 30
    assert laptop.cache_dir == Path("~/.cache/kvtier").expanduser()
    assert gpu.engine == "lmdeploy" and gpu.write_mode == "write-through"
    assert 10 << 30 <= gpu.ddr_bytes < 100 << 30 and 100 << 30 <= gpu.disk_bytes < 1 << 40
    assert tenants.write_mode == "selective" and tenants.ddr_bytes > gpu.ddr_bytes
    assert tenants.io_threads > DEFAULT_IO_THREADS


def test_presets_file_is_package_data():
    assert resources.files("kv_runtime").joinpath(PRESETS_FILE).is_file()
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert PRESETS_FILE in pyproject["tool"]["setuptools"]["package-data"]["kv_runtime"]  # in wheels too


def test_presets_is_a_copy():
    presets()["cpu-laptop"]["ddr_bytes"] = "1TiB"
    assert KVTierConfig.load(env={}, preset="cpu-laptop").ddr_bytes == 1 << 30


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="preset: unknown preset 'laptop'; known: cpu-laptop, gpu-long-context"):
        KVTierConfig.load(env={}, preset="laptop")
    with pytest.raises(ConfigError, match="multi-tenant-server"):
        KVTierConfig.load(env={"KVTIER_PRESET": "nope"})
    path = tmp_path / "c.toml"
    path.write_text('preset = "nope"\n')
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        KVTierConfig.load(path, env={})


def test_precedence_defaults_preset_file_env_code(tmp_path):
    path = tmp_path / "kvtier.toml"
    path.write_text(
        'preset = "gpu-long-context"\n[kvtier]\ndisk_bytes = "100GiB"\ncache_salt = "file"\nblock_size = 32\n'
    )
    env = {"KVTIER_CACHE_SALT": "env", "KVTIER_BLOCK_SIZE": "16"}
    cfg = KVTierConfig.load(path, env=env, block_size=128)
    assert cfg.io_threads == DEFAULT_IO_THREADS  # default (the preset leaves it)
    assert cfg.ddr_bytes == 64 << 30  # preset
    assert cfg.disk_bytes == 100 << 30  # file over preset
    assert cfg.cache_salt == "env"  # environment over file
    assert cfg.block_size == 128  # code over environment


def test_which_preset_code_then_env_then_file(tmp_path):
    path = tmp_path / "kvtier.json"
    path.write_bytes(orjson.dumps({"preset": "cpu-laptop"}))
    assert KVTierConfig.load(path, env={}).engine == "hf"
    assert KVTierConfig.load(path, env={"KVTIER_PRESET": "gpu-long-context"}).ddr_bytes == 64 << 30
    env = {"KVTIER_PRESET": "gpu-long-context"}
    assert KVTierConfig.load(path, env=env, preset="multi-tenant-server").ddr_bytes == 256 << 30
    # a preset named inside the [kvtier] table counts too
    toml = tmp_path / "kvtier.toml"
    toml.write_text('[kvtier]\npreset = "cpu-laptop"\nmodel = "m"\n')
    cfg = KVTierConfig.load(toml, env={})
    assert (cfg.model, cfg.device) == ("m", "cpu")


def test_preset_through_from_pretrained_keywords():
    # KVTierEngine.from_pretrained(model, **overrides) calls load(model=..., **overrides): preset= reaches load
    assert KVTierConfig.load(env={}, model="m", preset="cpu-laptop", ddr_bytes="512MiB").ddr_bytes == 512 << 20


def test_bad_preset_name_in_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(orjson.dumps({"preset": 3}))
    with pytest.raises(ConfigError, match="preset: expected a preset name"):
        KVTierConfig.load(path, env={})


# ---------------------------------------------------------------------- sizes


UNITS = {"": 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20}
UNITS |= {"G": 1 << 30, "GiB": 1 << 30, "g": 1 << 30, "T": 1 << 40, "TiB": 1 << 40, "tb": 1 << 40}


@given(n=st.integers(0, 1 << 40), unit=st.sampled_from(sorted(UNITS)), pad=st.sampled_from(["", " "]))
def test_formatted_sizes_round_trip(n, unit, pad):
    assert parse_size(f"{pad}{n}{pad}{unit}{pad}") == n * UNITS[unit]


@given(n=st.integers(0, 1 << 62))
def test_int_sizes_pass_through(n):
    assert parse_size(n) == n
    assert KVTierConfig(disk_bytes=n).disk_bytes == n


@given(n=st.integers(0, 1 << 20))
def test_fractional_sizes(n):
    assert parse_size(f"{n}.5KiB") == n * 1024 + 512


@pytest.mark.parametrize("key", ["hbm_bytes", "ddr_bytes", "disk_bytes", "max_inflight_bytes"])
@pytest.mark.parametrize("bad", ["lots", "-5MiB", True, -1, "MiB", None, 1.5, math.nan])
def test_bad_sizes_name_their_key(key, bad):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        KVTierConfig(**{key: bad})


def test_whole_float_sizes_and_fractional_units_are_bytes():
    assert KVTierConfig(ddr_bytes=4096.0).ddr_bytes == 4096
    assert KVTierConfig(ddr_bytes="1.5GiB").ddr_bytes == 3 << 29


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"block_size": 10**9}, "block_size: must be <= 4096, got 1000000000"),
        ({"io_threads": 10**6}, "io_threads: must be <= 256, got 1000000"),
        ({"prefill_tflops": math.nan}, "prefill_tflops: expected a finite number, got nan"),
        ({"model_revision": 3}, "model_revision: expected a string, got 3"),
    ],
)
def test_out_of_range_values_get_a_message_naming_the_bound(values, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        KVTierConfig(**values)


# ---------------------------------------------------------------------- environment


def test_environment_strings_are_coerced():
    env = {
        "KVTIER_IO_THREADS": "8",
        "KVTIER_DISK_GBPS": "2.5",
        "KVTIER_DDR_GBPS": "30",
        "KVTIER_HBM_BYTES": "1G",
        "KVTIER_CACHE_DIR": "~/kv",
        "KVTIER_ENGINE": "lmdeploy",
        "KVTIER_DTYPE": "bf16",
        "KVTIER_WRITE_MODE": "write-back",
        "KVTIER_PRESET": "gpu-long-context",  # names a preset, not a key
        "KVTIER_LOG_LEVEL": "DEBUG",  # the log level, not a key
        "OTHER_IO_THREADS": "3",
    }
    cfg = KVTierConfig.load(env=env)
    assert (cfg.io_threads, cfg.disk_gbps, cfg.ddr_gbps, cfg.hbm_bytes) == (8, 2.5, 30.0, 1 << 30)
    assert cfg.cache_dir == Path("~/kv").expanduser()
    assert (cfg.engine, cfg.dtype, cfg.write_mode, cfg.ddr_bytes) == ("lmdeploy", "bfloat16", "write-back", 64 << 30)


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("KVTIER_IO_THREADS", "many", "io_threads: expected an integer, got 'many'"),
        ("KVTIER_BLOCK_SIZE", "1.5", "block_size: expected an integer"),
        ("KVTIER_DISK_GBPS", "fast", "disk_gbps: expected a number, got 'fast'"),
        ("KVTIER_ENGINE", "vllm", "engine: expected 'hf' or 'lmdeploy', got 'vllm'"),
        ("KVTIER_DDR_BYTES", "lots", "ddr_bytes: cannot read 'lots'"),
        ("KVTIER_DDR_SIZE", "1G", "unknown configuration keys: ddr_size; known: model, engine"),
    ],
)
def test_bad_environment_values_name_the_key(var, value, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        KVTierConfig.load(env={var: value})


# ---------------------------------------------------------------------- the same rules on both engines


BAD_ON_BOTH = [
    ({"ddr_bytes": 0, "disk_bytes": "1GiB"}, "ddr_bytes: must be > 0"),
    ({"model": ""}, "model: must name the model directory"),
    ({"block_size": 0}, "block_size: must be > 0"),
    ({"block_size": 1.5}, "block_size: expected an integer"),
    ({"io_threads": -2}, "io_threads: must be > 0"),
    ({"io_threads": True}, "io_threads: expected an integer"),
    ({"write_mode": "sometimes"}, "write_mode: expected 'write-back', 'write-through' or 'selective'"),
    ({"dtype": "int8"}, "dtype: expected auto, float16, bfloat16 or float32"),
    ({"device": "tpu"}, "device: expected 'auto', 'cpu' or 'cuda[:N]'"),
    ({"max_inflight_bytes": 0}, "max_inflight_bytes: must be > 0"),
    ({"ddr_bytes": 0, "disk_bytes": 0, "hbm_bytes": 0}, "at least one tier needs capacity"),
    ({"prefill_tflops": -1.0}, "prefill_tflops: must be >= 0"),
    ({"ddr_gbps": -0.5}, "ddr_gbps: must be >= 0"),
    ({"disk_gbps": 0}, "disk_gbps: must be > 0"),
    ({"cache_salt": 7}, "cache_salt: expected a string"),
]


@pytest.mark.parametrize(("values", "message"), BAD_ON_BOTH)
def test_same_error_for_the_same_bad_value_on_both_engines(values, message):
    values = {"model": "m", **values}
    errors = {engine: error_of(engine=engine, **values) for engine in ENGINES}
    assert errors["hf"] == errors["lmdeploy"]
    assert errors["hf"].startswith(message)


@pytest.mark.parametrize("mode", ["write-back", "write-through", "selective"])
@pytest.mark.parametrize("engine", ENGINES)
def test_every_write_mode_on_every_engine(engine, mode):
    cfg = KVTierConfig(model="m", engine=engine, write_mode=mode).check_engine()
    assert KVTierConfig.from_plain(cfg.to_plain()).write_mode == mode


@pytest.mark.parametrize("key", ["prefill_tflops", "ddr_gbps", "disk_gbps"])
@pytest.mark.parametrize("bad", [-1, -1e-9, math.nan, math.inf, -math.inf, "fast", True])
def test_bad_rates_are_refused(key, bad):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        KVTierConfig(**{key: bad})


def test_zero_rate_priors_mean_measured_except_the_disk():
    cfg = KVTierConfig(prefill_tflops=0, ddr_gbps=0)
    assert (cfg.prefill_tflops, cfg.ddr_gbps) == (0.0, 0.0)
    assert KVTierConfig(prefill_tflops=400, ddr_gbps=25, disk_gbps=1.7).disk_gbps == 1.7
    with pytest.raises(ConfigError, match="disk_gbps: must be > 0"):
        KVTierConfig(disk_gbps=0.0)


def test_engine_specific_checks():
    assert KVTierConfig(model="m", device="cpu").check_engine("hf").device == "cpu"
    assert KVTierConfig(model="m", engine="lmdeploy", device="cuda:1").check_engine("lmdeploy")
    with pytest.raises(ConfigError, match="device: engine='lmdeploy' runs on CUDA"):
        KVTierConfig(model="m", engine="lmdeploy", device="cpu").check_engine()
    with pytest.raises(ConfigError, match="engine: this configuration is for engine='hf', not 'lmdeploy'"):
        KVTierConfig(model="m").check_engine("lmdeploy")


def test_unknown_keys_are_named_however_given():
    for build in (
        lambda: KVTierConfig(ddr_size=1),
        lambda: KVTierConfig.from_plain({"ddr_size": 1}),
        lambda: KVTierConfig.load(env={}, ddr_size=1),
        lambda: KVTierConfig().replace(ddr_size=1),
    ):
        with pytest.raises(ConfigError, match=r"^unknown configuration keys: ddr_size; known: model, engine,"):
            build()


def test_several_problems_in_one_short_message():
    message = error_of(block_size=0, engine="vllm", colour="blue")
    assert message.count("\n") == 0
    for key in ("colour", "block_size", "engine"):
        assert key in message


def test_dtype_names_and_the_one_fallback():
    assert KVTierConfig(dtype="torch.float16").dtype == "float16"
    assert KVTierConfig(dtype="FP32").dtype == "float32"
    auto = KVTierConfig()
    assert auto.resolve_dtype({"torch_dtype": "float16"}) == "float16"
    assert auto.resolve_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert auto.resolve_dtype({}) == "bfloat16"
    assert KVTierConfig(dtype="half").resolve_dtype({"torch_dtype": "bfloat16"}) == "float16"
    with pytest.raises(ConfigError, match=r"dtype: the model's config\.json names 'float64'"):
        auto.resolve_dtype({"torch_dtype": "float64"})


# ---------------------------------------------------------------------- plain data and digest


CONFIGS = st.builds(
    KVTierConfig,
    model=st.text(max_size=8),
    engine=st.sampled_from(ENGINES),
    dtype=st.sampled_from(["auto", "fp16", "bfloat16", "float32"]),
    block_size=st.integers(1, 512),
    ddr_bytes=st.integers(1, 1 << 40),
    disk_bytes=st.integers(0, 1 << 42) | st.sampled_from(["0", "2GiB", "1.5T"]),
    cache_dir=st.sampled_from(["c", "/tmp/kv", "~/kv"]),
    write_mode=st.sampled_from(["write-back", "write-through", "selective"]),
    cache_salt=st.text(max_size=8),
    io_threads=st.integers(1, 64),
    prefill_tflops=st.floats(0, 2000),
    ddr_gbps=st.floats(0, 100),
    disk_gbps=st.floats(0.01, 20),
)


@given(CONFIGS)
def test_plain_round_trip(cfg):
    plain = cfg.to_plain()
    assert orjson.loads(orjson.dumps(plain)) == plain  # JSON-able as it is
    back = KVTierConfig.from_plain(orjson.loads(orjson.dumps(plain)))
    assert back == cfg
    assert back.digest() == cfg.digest()


def test_to_dict_is_plain():
    cfg = KVTierConfig(cache_dir="/tmp/x")
    assert cfg.to_dict() == cfg.to_plain()
    assert cfg.to_dict()["cache_dir"] == "/tmp/x"


def test_from_plain_validates():
    with pytest.raises(ConfigError, match="ddr_bytes"):
        KVTierConfig.from_plain({"ddr_bytes": "lots"})
    with pytest.raises(ConfigError, match="expected a mapping"):
        KVTierConfig.from_plain([("model", "m")])  # type: ignore[arg-type]


def test_digest_follows_every_value():
    base = KVTierConfig(model="m")
    assert base.digest() == KVTierConfig(model="m", ddr_bytes="2GiB").digest()
    changed = [base.replace(**{k: v}) for k, v in [("cache_salt", "t"), ("ddr_bytes", 1 << 20), ("engine", "lmdeploy")]]
    assert len({base.digest(), *(c.digest() for c in changed)}) == 4


def _python(code: str, **env: str) -> str:
    """``code`` run by a fresh interpreter (no KVTIER_* variables), its stdout."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_digest_is_stable_across_processes():
    cfg = KVTierConfig.load(env={}, preset="gpu-long-context", model="/models/qwen", cache_salt="tenant-a")
    code = (
        "from kv_runtime.config import KVTierConfig;"
        "print(KVTierConfig.load(env={}, preset='gpu-long-context', model='/models/qwen', cache_salt='tenant-a')"
        ".digest())"
    )
    assert {_python(code, PYTHONHASHSEED=seed) for seed in ("1", "2")} == {cfg.digest()}


def test_importable_without_torch():
    code = (
        "import sys, kv_runtime.config, kv_pipeline.config;"
        "from kv_runtime.config import KVTierConfig;"
        "c = KVTierConfig.load(env={}, preset='cpu-laptop', model='m').check_engine();"
        "KVTierConfig.from_plain(c.to_plain()).digest();"
        "assert 'torch' not in sys.modules, 'torch was imported';"
        "print(c.io_threads)"
    )
    assert _python(code) == str(DEFAULT_IO_THREADS)


def test_pipeline_config_re_exports_the_same_objects():
    import kv_pipeline
    import kv_pipeline.config as pipeline_config
    import kv_runtime.config as runtime_config

    for name in ("KVTierConfig", "ConfigError", "parse_size", "presets", "ENV_PREFIX", "ENGINES", "WRITE_MODES"):
        assert getattr(pipeline_config, name) is getattr(runtime_config, name)
    assert kv_pipeline.KVTierConfig is KVTierConfig


# ---------------------------------------------------------------------- the LMDeploy glue (LMDeploy faked)


class _Recorded:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


@pytest.fixture
def fake_lmdeploy(monkeypatch):
    """Stand-ins for the two LMDeploy classes the glue builds; they only record their fields."""
    root = types.ModuleType("lmdeploy")
    messages = types.ModuleType("lmdeploy.messages")
    messages.KVTransferConfig = type("KVTransferConfig", (_Recorded,), {})  # type: ignore[attr-defined]
    root.PytorchEngineConfig = type("PytorchEngineConfig", (_Recorded,), {})  # type: ignore[attr-defined]
    root.messages = messages  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lmdeploy", root)
    monkeypatch.setitem(sys.modules, "lmdeploy.messages", messages)


def test_kv_transfer_config_passes_the_plain_config(fake_lmdeploy):
    from kv_runtime.backends.lmdeploy_connector import CONNECTOR_NAME, kv_transfer_config

    transfer = kv_transfer_config(Path("/models/m"), ddr_bytes="16GiB", write_mode="write-back")
    assert (transfer.kv_connector, transfer.kv_role) == (CONNECTOR_NAME, "kv_both")
    extra = transfer.kv_connector_extra_config
    expected = KVTierConfig(model="/models/m", engine="lmdeploy", ddr_bytes=16 << 30, write_mode="write-back")
    assert extra == expected.to_plain()
    assert KVTierConfig.from_plain(extra) == expected

    cfg = KVTierConfig.load(env={}, preset="gpu-long-context", model="/models/m")
    assert kv_transfer_config(config=cfg).kv_connector_extra_config == cfg.to_plain()
    assert kv_transfer_config(config=cfg, disk_bytes=0).kv_connector_extra_config["disk_bytes"] == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f("/m", ddr_bytes=0, disk_bytes="1GiB"), "ddr_bytes: must be > 0"),
        (lambda f: f("/m", ddr_size="1GiB"), "unknown configuration keys: ddr_size"),
        (lambda f: f(ddr_bytes="1GiB"), "model: must name"),
        (lambda f: f("/m", device="cpu"), "device: engine='lmdeploy' runs on CUDA"),
    ],
)
def test_kv_transfer_config_validates_before_lmdeploy_sees_it(fake_lmdeploy, call, message):
    from kv_runtime.backends.lmdeploy_connector import kv_transfer_config

    with pytest.raises(ConfigError, match=message):
        call(kv_transfer_config)


def test_engine_config_hands_lmdeploy_the_plain_config(fake_lmdeploy):
    from kv_pipeline.lmdeploy_engine import engine_config

    cfg = KVTierConfig(model="/models/m", engine="lmdeploy", dtype="bf16", block_size=32, io_threads=4)
    engine = engine_config(cfg, session_len=4096)
    assert engine.kv_transfer_config.kv_connector_extra_config == cfg.to_plain()
    assert (engine.block_size, engine.dtype, engine.session_len) == (32, "bfloat16", 4096)
    with pytest.raises(ConfigError, match="ddr_bytes: must be > 0"):
        engine_config(cfg.replace(ddr_bytes=0, disk_bytes="1GiB"))
