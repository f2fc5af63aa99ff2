"""The model's identity in every block key, with its weight hashes remembered in the cache directory.

``prefix_reuse.model_fingerprint`` hashes every byte of the weights; this module keeps its per-file memo in
``cache_dir/model-hashes.json`` (private, written atomically), so a restart over an unchanged model reads no
weights. Without a disk tier nothing is written under ``cache_dir`` and the weights are hashed at every start.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson

from kv_io.private_files import ensure_private_dir, read_private, write_private_atomic
from kv_runtime.config import KVTierConfig
from prefix_reuse import model_fingerprint

log = logging.getLogger(__name__)

MEMO_NAME = "model-hashes.json"
MAX_MEMO_FILES = 1024  # weight files remembered: a few models' worth; the oldest entries go first


def model_identity(config: KVTierConfig) -> str:
    """``KeyNamespace.model_id`` for ``config.model`` and ``config.model_revision``."""
    memo_path = Path(config.cache_dir) / MEMO_NAME if config.disk_bytes else None
    memo = _read_memo(memo_path) if memo_path is not None else {}
    before = dict(memo)
    identity = model_fingerprint(config.model, revision=config.model_revision, memo=memo)
    if memo_path is not None and memo != before:
        while len(memo) > MAX_MEMO_FILES:
            memo.pop(next(iter(memo)))
        write_private_atomic(memo_path, orjson.dumps(memo))
    return identity


def _read_memo(path: Path) -> dict[str, list]:
    ensure_private_dir(path.parent)
    data = read_private(path)
    if data is None:
        return {}
    try:
        memo = orjson.loads(data)
    except orjson.JSONDecodeError:
        memo = None
    if not isinstance(memo, dict):
        # Only a cache of hashes: a damaged one costs one rehash, never a wrong identity.
        log.warning("%s is damaged; the model's weights are hashed again", path)
        return {}
    return memo
