"""The namespace that seeds every block key.

Everything that changes the bytes of a KV block is part of the namespace, so two caches whose bytes differ can
never share a key: a different model (config or weights), KV dtype, quantisation policy, layout version, block
size or tensor-parallel shard, and the tenant's cache salt (so one tenant can neither hit nor time another's
prefixes). The digest is computed from a canonical encoding, never from Python's per-process ``hash()``, so it
is stable across processes and machines and can name blocks on disk.
"""

from __future__ import annotations

from collections.abc import MutableMapping
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


# Files whose bytes can change a model's KV: its weights in every format transformers and LMDeploy load.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_READ_BYTES = 16 << 20


def model_fingerprint(
    model_dir: str | Path, *, revision: str = "", memo: MutableMapping[str, list] | None = None
) -> str:
    """A model's identity for ``KeyNamespace.model_id``: ``config.json``, ``revision`` (a user-given tag, e.g. a
    commit) and an xxh3-128 hash of every byte of every weight file under ``model_dir``.

    Every byte, because a copy of a model with one middle layer changed (a weight edit, a merged adapter) must
    never be served the original's KV: hashing only each file's ends let exactly that through. Hashing costs one
    read of the weights (about a second per GB from the page cache); ``memo`` remembers each file's hash by its
    resolved path, size, mtime, ctime, inode and device, so a restart that finds the same file rehashes nothing.
    Any change to a file (even one that restores its mtime: ctime cannot be set back) makes it hashed again.
    """
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a model directory")
    weights = sorted(
        p for p in model_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file() and ".git" not in p.parts
    )
    if not weights:
        raise FileNotFoundError(f"{model_dir} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    h = xxhash.xxh3_128()
    h.update(b"kvtier-model\x00" + config.read_bytes())
    h.update(b"\x00revision\x00" + revision.encode())
    for path in weights:
        h.update(b"\x00" + path.relative_to(model_dir).as_posix().encode() + b"\x00")
        h.update(_file_digest(path, memo))
    return f"{model_dir.name}@{h.hexdigest()}"


def _file_digest(path: Path, memo: MutableMapping[str, list] | None) -> bytes:
    real = path.resolve()  # hub caches link weights to shared blobs: the blob's identity is what counts
    st = real.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    key = str(real)
    if memo is not None:
        known = memo.get(key)
        if isinstance(known, list) and len(known) == 6 and known[:5] == stamp and isinstance(known[5], str):
            return bytes.fromhex(known[5])
    h = xxhash.xxh3_128()
    buf = bytearray(_READ_BYTES)
    view = memoryview(buf)
    with real.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.digest()
    if memo is not None:
        memo[key] = [*stamp, digest.hex()]
    return digest
