"""The namespace that seeds every block key.

Everything that changes the bytes of a KV block is part of the namespace, so two caches whose bytes differ can
never share a key: a different model (config or weights), KV dtype, quantisation policy, layout version, block
size or tensor-parallel shard, and the tenant's cache salt (so one tenant can neither hit nor time another's
prefixes). The digest is computed from a canonical encoding, never from Python's per-process ``hash()``, so it
is stable across processes and machines and can name blocks on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import orjson
import xxhash

NAMESPACE_DIGEST_BYTES = 16


@dataclass(frozen=True, slots=True)
class KeyNamespace:
    """Identity of a KV byte format plus the tenant; seeds block keys and their confirmation hash."""

    model_id: str
    kv_dtype: str
    block_size: int
    quant_policy: str = "none"
    layout_version: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    cache_salt: str = ""
    digest: bytes = field(init=False, repr=False, compare=False)
    check_seed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("block_size", "layout_version", "tp_rank", "tp_size"):
            if isinstance(getattr(self, name), bool):
                raise ValueError(f"KeyNamespace.{name} must be an int, got a bool")
        if not self.model_id:
            raise ValueError("KeyNamespace.model_id must identify the model (config and weights fingerprint)")
        if not self.kv_dtype:
            raise ValueError("KeyNamespace.kv_dtype must name the KV cache dtype, e.g. 'bfloat16'")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"KeyNamespace.block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.layout_version, int) or self.layout_version < 0:
            raise ValueError(f"KeyNamespace.layout_version must be an int >= 0, got {self.layout_version!r}")
        if not (isinstance(self.tp_size, int) and self.tp_size >= 1):
            raise ValueError(f"KeyNamespace.tp_size must be an int >= 1, got {self.tp_size!r}")
        if not (isinstance(self.tp_rank, int) and 0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"KeyNamespace.tp_rank must be in [0, tp_size), got {self.tp_rank!r}")
        # Quantisation policies arrive as LMDeploy ints (0/4/8) or names; one canonical string keeps them equal.
        object.__setattr__(self, "quant_policy", str(self.quant_policy))
        identity = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        canonical = orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)
        object.__setattr__(self, "digest", xxhash.xxh3_128_digest(b"kvtier-ns\x00" + canonical))
        # The confirmation hash (XXH64, a different algorithm from the XXH3 keys) gets its own seed.
        object.__setattr__(self, "check_seed", xxhash.xxh64_intdigest(b"kvtier-check\x00" + canonical))


def model_fingerprint(model_dir: str | Path) -> str:
    """A model's identity for ``KeyNamespace.model_id``: its config plus a cheap weights fingerprint (file
    names and sizes, and the first and last MiB of every weight file), so that changed weights never match."""
    model_dir = Path(model_dir)
    h = xxhash.xxh3_128()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return f"{model_dir.name}@{h.hexdigest()}"
