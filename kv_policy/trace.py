"""Request traces in the Mooncake format, read from JSONL or generated with tunable prefix sharing.

One JSON object a line: ``{"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}``
where ``hash_ids`` holds one chained id per ``block_tokens``-token block of the prompt: two requests share an id
only if they share the whole prefix up to and including that block. The block size is a parameter (512 in the
published traces), never assumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(slots=True, frozen=True)
class TraceRequest:
    """One request of a trace: arrival (ms), prompt and output lengths (tokens), chained block ids."""

    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def block_tokens(self, block_tokens: int) -> list[int]:
        """Tokens in each block: full blocks, and a shorter last one where the prompt ends inside it."""
        n = len(self.hash_ids)
        sizes = [block_tokens] * n
        if n:
            tail = self.input_length - (n - 1) * block_tokens
            if 0 < tail < block_tokens:
                sizes[-1] = tail
        return sizes


def _int_field(obj: dict, key: str, where: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def parse_request(line: str | bytes, where: str = "trace line") -> TraceRequest:
    """Parse one JSONL line; a malformed line raises ``ValueError`` naming the line and what is wrong."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _FIELDS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    ts = obj["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0 or ts != ts:
        raise ValueError(f"{where}: 'timestamp' must be a non-negative number, got {ts!r}")
    ids = obj["hash_ids"]
    if not isinstance(ids, list) or any(isinstance(h, bool) or not isinstance(h, int) for h in ids):
        raise ValueError(f"{where}: 'hash_ids' must be a list of integers")
    return TraceRequest(
        float(ts), _int_field(obj, "input_length", where), _int_field(obj, "output_length", where), tuple(ids)
    )


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake-format JSONL trace (blank lines ignored), at most ``limit`` requests."""
    path = Path(path)
    out: list[TraceRequest] = []
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(parse_request(line, f"{path}:{number}"))
            if limit is not None and len(out) >= limit:
                break
    return out


def write_trace(requests: Iterable[TraceRequest], path: str | Path) -> None:
    with Path(path).open("wb") as f:
        for r in requests:
            f.write(
                orjson.dumps(
                    {
                        "timestamp": r.timestamp,
                        "input_length": r.input_length,
                        "output_length": r.output_length,
                        "hash_ids": list(r.hash_ids),
                    }
                )
                + b"\n"
            )


@dataclass(slots=True, frozen=True)
class SyntheticTraceConfig:
    """Knobs of the synthetic generator; the defaults resemble a chat service with shared system prompts.

    - ``contexts``: shared prefixes (system prompts, documents) with Zipf(``zipf``) popularity;
    - ``context_blocks``: range of their lengths in blocks;
    - ``session_fraction``: share of requests that continue an earlier conversation (its whole prompt plus a
      new turn), the rest start a new one after a shared context (or none, with ``private_fraction``);
    - ``turn_blocks``: blocks each new turn adds; ``drift``: how fast context popularity moves over time
      (0 keeps it fixed; 1 re-draws the ranking every ``1/drift``-th of the trace).
    """

    requests: int = 2000
    block_tokens: int = 512
    contexts: int = 200
    context_blocks: tuple[int, int] = (2, 40)
    zipf: float = 1.1
    session_fraction: float = 0.4
    private_fraction: float = 0.2
    turn_blocks: tuple[int, int] = (1, 12)
    drift: float = 0.0
    mean_gap_ms: float = 250.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests <= 0 or self.contexts <= 0 or self.block_tokens <= 0:
            raise ValueError("requests, contexts and block_tokens must be positive")
        for name in ("session_fraction", "private_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        for name in ("context_blocks", "turn_blocks"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if self.zipf <= 0 or self.drift < 0 or self.mean_gap_ms < 0:
            raise ValueError("zipf must be > 0, drift and mean_gap_ms >= 0")


def synthetic_trace(config: SyntheticTraceConfig) -> Iterator[TraceRequest]:
    """Requests with chained ids and the sharing ``config`` asks for; deterministic for a seed."""
    rng = np.random.default_rng(config.seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    contexts = [
        fresh(int(rng.integers(config.context_blocks[0], config.context_blocks[1] + 1))) for _ in range(config.contexts)
    ]
    weights = 1.0 / np.arange(1, config.contexts + 1) ** config.zipf
    weights /= weights.sum()
    ranking = rng.permutation(config.contexts)
    period = int(config.requests / config.drift) if config.drift > 0 else 0
    sessions: list[list[int]] = []
    t = 0.0
    for i in range(config.requests):
        if period and i and i % max(1, period) == 0:
            ranking = rng.permutation(config.contexts)
        t += float(rng.exponential(config.mean_gap_ms))
        if sessions and rng.random() < config.session_fraction:
            s = int(rng.integers(max(0, len(sessions) - 64), len(sessions)))  # recent conversations continue
            prefix = sessions[s][:-1]  # the previous prompt's partial last block is re-filled by the new turn
        elif rng.random() < config.private_fraction:
            prefix, s = [], -1
        else:
            prefix, s = list(contexts[int(ranking[rng.choice(config.contexts, p=weights)])]), -1
        ids = prefix + fresh(int(rng.integers(config.turn_blocks[0], config.turn_blocks[1] + 1)))
        tail = int(rng.integers(1, config.block_tokens + 1))  # the prompt ends inside its last block
        if s >= 0:
            sessions[s] = ids
        else:
            sessions.append(ids)
        yield TraceRequest(
            round(t, 3), (len(ids) - 1) * config.block_tokens + tail, int(rng.integers(1, 512)), tuple(ids)
        )
