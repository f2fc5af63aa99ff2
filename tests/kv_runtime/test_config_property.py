"""Any value for any key gives a configuration or a ConfigError naming the key: never another exception."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from kv_runtime.config import ConfigError, KVTierConfig

KEYS = sorted(KVTierConfig.model_fields)

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["0", "64", "1.5GiB", "2G", "auto", "cpu", "cuda:1", "cuda:x", "bf16", "write-back", "hf"]),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(Path, st.text(max_size=8)),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*KEYS, "unknown_key"]), values, max_size=4))
def test_random_settings_give_a_config_or_a_config_error(settings_: dict) -> None:
    try:
        cfg = KVTierConfig(**settings_)
    except ConfigError as e:
        named = [k for k in settings_ if k in str(e)] or ["configuration", "at least one tier"]
        assert any(k in str(e) for k in named), str(e)
        return
    # Accepted: every value is in range, and the configuration survives the trip to LMDeploy's process.
    assert KVTierConfig.from_plain(cfg.to_plain()) == cfg
    assert cfg.block_size > 0 and cfg.ddr_bytes >= 0 and cfg.disk_bytes >= 0
    assert all(math.isfinite(v) and v >= 0 for v in (cfg.prefill_tflops, cfg.ddr_gbps, cfg.disk_gbps))
