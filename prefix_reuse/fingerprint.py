"""Rolling fingerprints of block-sized token windows, for finding cached chunks at any token offset.

Block keys are chained, so they only find a chunk at the position where it was cached. To find a chunk that
starts anywhere (a document placed after a different system prompt), the index records a polynomial
fingerprint ``F(w) = sum_j w_j * B**j mod 2**64`` of the first block of every chain, and the matcher computes
``F`` for *every* token offset of a prompt in one vectorised pass: with prefix sums ``S_k = sum_{i<k} t_i B**i``,
``F(t[p:p+n]) = (S_{p+n} - S_p) * B**-p`` (``B`` odd, hence invertible mod 2**64). A fingerprint match only
nominates a candidate; the chained keys and confirmation hashes decide.
"""

from __future__ import annotations

import numpy as np

from prefix_reuse.namespace import KeyNamespace

_MASK = (1 << 64) - 1


def fingerprint_base(namespace: KeyNamespace) -> int:
    """An odd base drawn from the namespace, so fingerprints differ between namespaces."""
    return ((namespace.check_seed * 0x9E3779B97F4A7C15) & _MASK) | 1


class RollingFingerprint:
    """Fingerprints of windows of ``width`` tokens for one namespace; powers are cached and grown on demand."""

    __slots__ = ("_base", "_inv", "_tables", "width")

    def __init__(self, namespace: KeyNamespace) -> None:
        self.width = namespace.block_size
        self._base = fingerprint_base(namespace)
        self._inv = pow(self._base, -1, 1 << 64)
        one = np.ones(1, dtype=np.uint64)
        self._tables = (one, one)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        # NOTE: both tables live in one attribute, replaced in one assignment, so a thread that grows them can
        # never leave another thread holding powers and inverse powers of different lengths.
        powers, inverse = self._tables
        if powers.size < n:
            size = max(n, 2 * powers.size)
            powers, inverse = self._geometric(self._base, size), self._geometric(self._inv, size)
            self._tables = (powers, inverse)
        return powers[:n], inverse[:n]

    @staticmethod
    def _geometric(base: int, n: int) -> np.ndarray:
        steps = np.full(n, base, dtype=np.uint64)
        steps[0] = 1
        return np.multiply.accumulate(steps)  # wraps mod 2**64, as intended

    def of_block(self, tokens: np.ndarray) -> int:
        """Fingerprint of one window of exactly ``width`` tokens."""
        if tokens.size != self.width:
            raise ValueError(f"a fingerprint covers {self.width} tokens, got {tokens.size}")
        powers, _ = self._powers(self.width)
        return int(np.sum(tokens.astype(np.uint64) * powers, dtype=np.uint64))

    def rolling(self, tokens: np.ndarray) -> np.ndarray:
        """Fingerprint of the window starting at every offset ``p`` in ``[0, len - width]``."""
        n, w = tokens.size, self.width
        if n < w:
            return np.empty(0, dtype=np.uint64)
        powers, inv = self._powers(n + 1)
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(tokens.astype(np.uint64) * powers[:n], dtype=np.uint64, out=prefix[1:])
        return (prefix[w:] - prefix[: n - w + 1]) * inv[: n - w + 1]
