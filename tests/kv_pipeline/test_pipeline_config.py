"""Configuration from code, TOML and JSON files and ``KVTIER_*`` variables: precedence, sizes, clear errors."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from kv_pipeline.config import ConfigError, KVTierConfig, parse_size


def test_defaults_and_code():
    cfg = KVTierConfig(model="m", ddr_bytes="2GiB", disk_bytes=0, block_size=32)
    assert cfg.ddr_bytes == 2 << 30
    assert cfg.disk_bytes == 0
    assert cfg.block_size == 32
    assert cfg.write_mode == "selective"
    assert isinstance(cfg.cache_dir, Path)
    assert cfg.replace(block_size=16).block_size == 16
    assert cfg.to_dict()["cache_dir"] == str(cfg.cache_dir)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 << 20),
        ("2G", 2 << 30),
        ("1.5KiB", 1536),
        ("1048576", 1 << 20),
        (" 4 kb ", 4096),
        ("7B", 7),
        (123, 123),
        ("1T", 1 << 40),
    ],
)
def test_size_strings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-5MiB", True, -1, "MiB"])
def test_bad_sizes_name_the_key(bad):
    with pytest.raises(ConfigError, match="ddr_bytes"):
        KVTierConfig(ddr_bytes=bad)


def test_toml_file(tmp_path):
    path = tmp_path / "kvtier.toml"
    path.write_text('[kvtier]\nmodel = "m"\nddr_bytes = "64MiB"\nblock_size = 16\nwrite_mode = "write-back"\n')
    cfg = KVTierConfig.load(path, env={})
    assert (cfg.model, cfg.ddr_bytes, cfg.block_size, cfg.write_mode) == ("m", 64 << 20, 16, "write-back")


def test_json_file_without_table(tmp_path):
    path = tmp_path / "kvtier.json"
    path.write_bytes(orjson.dumps({"model": "m", "disk_bytes": "1GiB", "io_threads": 2}))
    cfg = KVTierConfig.load(path, env={})
    assert (cfg.disk_bytes, cfg.io_threads) == (1 << 30, 2)


def test_environment_values_are_coerced():
    env = {
        "KVTIER_BLOCK_SIZE": "32",
        "KVTIER_DDR_BYTES": "128MiB",
        "KVTIER_CACHE_DIR": "/tmp/x",
        "KVTIER_ENGINE": "hf",
        "KVTIER_PREFILL_TFLOPS": "2.5",
        "KVTIER_LOG_LEVEL": "INFO",  # the log level, not a configuration key
        "OTHER": "ignored",
    }
    cfg = KVTierConfig.load(env=env)
    assert (cfg.block_size, cfg.ddr_bytes, cfg.cache_dir) == (32, 128 << 20, Path("/tmp/x"))
    assert cfg.prefill_tflops == 2.5


def test_process_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("KVTIER_WRITE_MODE", "write-through")
    assert KVTierConfig.load().write_mode == "write-through"


def test_precedence_file_then_env_then_code(tmp_path):
    path = tmp_path / "kvtier.toml"
    path.write_text('block_size = 16\nddr_bytes = "1MiB"\ndisk_bytes = "1MiB"\n')
    env = {"KVTIER_DDR_BYTES": "2MiB", "KVTIER_DISK_BYTES": "3MiB"}
    cfg = KVTierConfig.load(path, env=env, disk_bytes="4MiB", model=None)
    assert cfg.block_size == 16  # file only
    assert cfg.ddr_bytes == 2 << 20  # environment over file
    assert cfg.disk_bytes == 4 << 20  # code over environment
    assert cfg.model == ""  # None in code means "not given"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"engine": "vllm"}, "engine"),
        ({"write_mode": "sometimes"}, "write_mode"),
        ({"device": "tpu"}, "device"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"io_threads": -2}, "io_threads"),
        ({"ddr_bytes": 0, "disk_bytes": 0, "hbm_bytes": 0}, "at least one tier"),
        ({"max_inflight_bytes": 0}, "max_inflight_bytes"),
        ({"prefill_tflops": -1.0}, "prefill_tflops"),
        ({"prefill_tflops": "fast"}, "prefill_tflops"),
    ],
)
def test_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KVTierConfig.load(env={}, **kwargs)


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown configuration keys: ddr_size"):
        KVTierConfig.load(env={}, ddr_size="1GiB")
    with pytest.raises(ConfigError, match="unknown configuration keys: colour"):
        KVTierConfig.load(env={"KVTIER_COLOUR": "blue"})
    path = tmp_path / "c.json"
    path.write_bytes(orjson.dumps({"blocksize": 16}))
    with pytest.raises(ConfigError, match="blocksize"):
        KVTierConfig.load(path, env={})


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        KVTierConfig.load(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("block_size = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        KVTierConfig.load(broken, env={})
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="table of settings"):
        KVTierConfig.load(listed, env={})


def test_bad_environment_integer():
    with pytest.raises(ConfigError, match="block_size: expected an integer"):
        KVTierConfig.load(env={"KVTIER_BLOCK_SIZE": "sixteen"})


def test_bad_environment_number():
    with pytest.raises(ConfigError, match="prefill_tflops: expected a number"):
        KVTierConfig.load(env={"KVTIER_PREFILL_TFLOPS": "fast"})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
