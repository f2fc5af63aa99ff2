"""Chained block keys, computed incrementally per request.

``key_i = XXH3-128(key_{i-1} || tokens_i)`` with ``key_{-1}`` the namespace digest, so a key names a block *and
its whole prefix*: two requests share block ``i``'s key only if they share every token up to the end of block
``i``. Each block also gets a confirmation hash, ``XXH64(tokens_i)`` seeded by the namespace: an independent
algorithm, checked on every match together with the tree's parent link, so a key collision can never hand out
another prefix's KV. Only full blocks get keys: a partial block is never cached.

Tokens are hashed as little-endian int32, never through Python's ``hash()``: keys are stable across processes
and machines and can name blocks on disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import xxhash

from prefix_reuse.namespace import KeyNamespace

_TOKEN_DTYPE = np.dtype("<i4")
_INT32_MAX = np.iinfo(np.int32).max

TokenIds = Sequence[int] | np.ndarray


def as_token_array(tokens: TokenIds) -> np.ndarray:
    """Validate token ids and return them as a contiguous little-endian int32 array."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != _TOKEN_DTYPE:
        if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
            raise ValueError("token ids must lie in [0, 2**31)")
        arr = arr.astype(_TOKEN_DTYPE)
    elif arr.size and arr.min() < 0:
        raise ValueError("token ids must lie in [0, 2**31)")
    return np.ascontiguousarray(arr)


class BlockKeyer:
    """Computes chained keys and confirmation hashes for one namespace."""

    __slots__ = ("_block_bytes", "_check_seed", "block_size", "namespace")

    def __init__(self, namespace: KeyNamespace) -> None:
        self.namespace = namespace
        self.block_size = namespace.block_size
        self._block_bytes = namespace.block_size * _TOKEN_DTYPE.itemsize
        self._check_seed = namespace.check_seed

    def request(self, tokens: TokenIds = ()) -> RequestKeys:
        """Keys for a request's prompt; extend it as the request grows."""
        rk = RequestKeys(self)
        rk.extend(tokens)
        return rk

    def iter_keys(self, tokens: np.ndarray, start: int = 0, prev: bytes | None = None) -> Iterator[tuple[bytes, int]]:
        """Lazily yield ``(key, check)`` for the full blocks of ``tokens[start:]``.

        ``prev`` is the key of the block before ``start`` (None: ``start`` begins a chain at the namespace
        root). Lazy so that a matcher probing a chain pays only for the blocks it actually looks at.
        """
        buf = memoryview(tokens[start:]).cast("B")
        step = self._block_bytes
        key = self.namespace.digest if prev is None else prev
        digest, check, seed = xxhash.xxh3_128_digest, xxhash.xxh64_intdigest, self._check_seed
        for off in range(0, len(buf) - step + 1, step):
            block = buf[off : off + step]
            key = digest(key + block)
            yield key, check(block, seed)


class RequestKeys:
    """The keys of one request's full blocks; growing it by one block costs one block of hashing."""

    __slots__ = ("_buf", "_len", "checks", "keyer", "keys")

    def __init__(self, keyer: BlockKeyer) -> None:
        self.keyer = keyer
        self._buf = np.empty(0, dtype=_TOKEN_DTYPE)
        self._len = 0
        self.keys: list[bytes] = []
        self.checks: list[int] = []

    @property
    def namespace(self) -> KeyNamespace:
        return self.keyer.namespace

    @property
    def tokens(self) -> np.ndarray:
        """All tokens so far, including a trailing partial block (a read-only view)."""
        view = self._buf[: self._len]
        view.flags.writeable = False
        return view

    @property
    def num_tokens(self) -> int:
        return self._len

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def block_size(self) -> int:
        return self.keyer.block_size

    def block_tokens(self, i: int) -> np.ndarray:
        bs = self.keyer.block_size
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range [0, {self.num_blocks})")
        return self._buf[i * bs : (i + 1) * bs]

    def extend(self, tokens: TokenIds) -> int:
        """Append tokens; hash only the blocks they complete. Returns the number of new full blocks."""
        new = as_token_array(tokens)
        end = self._len + new.size
        if end > self._buf.size:
            # Doubling keeps a request that grows turn by turn at amortised O(new tokens) copying.
            grown = np.empty(max(end, 2 * self._buf.size), dtype=_TOKEN_DTYPE)
            grown[: self._len] = self._buf[: self._len]
            self._buf = grown
        self._buf[self._len : end] = new
        self._len = end
        first = self.num_blocks
        prev = self.keys[-1] if self.keys else None
        bs = self.keyer.block_size
        full = self._buf[first * bs : (end // bs) * bs]
        for key, check in self.keyer.iter_keys(full, 0, prev):
            self.keys.append(key)
            self.checks.append(check)
        return self.num_blocks - first
