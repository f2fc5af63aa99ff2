"""What the async API accepts: every request's inputs are checked here, once, before anything runs.

A request the engine cannot serve as asked is refused with :class:`RequestError` (a ``ValueError``) and a
message naming the argument and what was wrong with it; nothing of it has touched the model or the tiers.
The rules:

- **prompt**: non-empty text, a non-empty list (or tuple, or 1-D integer array) of token ids, or a non-empty
  list of chat messages (``{"role": str, "content": str}``). Token ids are ``int`` (NumPy integers too) in
  ``[0, vocab_size)``; ``bool``, ``float``, ``str`` and ``bytes`` items are refused, not converted, and so are
  ``bytes`` prompts (a ``Sequence[int]`` in Python's eyes, but never what a caller means).
- **length**: the prompt's tokens (after a named shared context's) plus ``max_new_tokens`` must fit the model's
  context length (``max_position_embeddings`` of its config); positions past it were never trained and an
  unbounded ``max_new_tokens`` would keep a request generating forever.
- **numbers**: ``max_new_tokens`` an integer >= 1; ``temperature`` a finite real >= 0 (0 is greedy);
  ``seed`` None or an integer in ``[0, 2**64)``; ``ttl`` None or a finite real > 0 (seconds). ``bool`` and
  numeric strings are not numbers here.
- **ids**: session and shared-context ids are non-empty ``str`` of at most :data:`MAX_ID_CHARS` characters,
  encodable as UTF-8, without NUL.

Named shared contexts add two errors of their own: :class:`UnknownContextError` (a ``RequestError`` and a
``KeyError``) for an id nobody saved, and :class:`ContextStoreError` (a ``RuntimeError``) when a context could
not be kept (it does not fit the cache, or its disk copy could not be written); after either, nothing of the
failed save is left: no pin, no record.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_ID_CHARS = 1024  # session and context ids: names, not payloads (each is kept in metrics and the registry)
SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes seeds below it


class RequestError(ValueError):
    """A request the engine refuses as given: a bad prompt or parameter, or one that does not fit the model."""


class UnknownContextError(RequestError, KeyError):
    """No live shared context has this id (never saved, dropped, or expired)."""

    def __str__(self) -> str:  # KeyError's own __str__ would quote the message
        return str(self.args[0]) if self.args else ""


class ContextStoreError(RuntimeError):
    """A shared context could not be stored: it does not fit the cache, or its disk copy could not be written.
    The failed save left no pin and no record (a context it was replacing is kept as it was)."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one model accepts: token ids below ``vocab_size``, at most ``context_length`` positions (None:
    the model's config names no limit)."""

    vocab_size: int
    context_length: int | None

    @classmethod
    def from_config(cls, config: Any) -> RequestLimits:
        length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return cls(int(config.vocab_size), int(length) if length else None)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _type(value: Any) -> str:
    return type(value).__name__


class RequestValidator:
    """The checks of one started engine; ``encode`` turns text or chat messages into token ids."""

    def __init__(self, limits: RequestLimits, encode: Callable[[Any], list[int]]) -> None:
        self.limits = limits
        self._encode = encode

    # ------------------------------------------------------------------ prompts

    def prompt(self, prompt: Any, name: str = "prompt") -> list[int]:
        """The prompt's token ids, each checked against the vocabulary."""
        if isinstance(prompt, str):
            text = self.text(prompt, name)
            if not text:
                raise RequestError(f"{name} is empty text")
            return self._checked(self._encode(text), name, encoded=True)
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise RequestError(f"{name} is {_type(prompt)}: decode it to str, or pass a list of token ids")
        if isinstance(prompt, (np.ndarray, torch.Tensor)):
            return self._array(prompt, name)
        if not isinstance(prompt, (list, tuple)):
            raise RequestError(
                f"{name} must be text, a list of token ids or a list of chat messages, not {_type(prompt)}"
            )
        if not prompt:
            raise RequestError(f"{name} is an empty list")
        if all(isinstance(m, dict) for m in prompt):
            return self._checked(self._encode(self._messages(prompt, name)), name, encoded=True)
        return self._checked(prompt, name, encoded=False)

    def _checked(self, tokens: Sequence[Any], name: str, *, encoded: bool) -> list[int]:
        # The tokenizer's ids are ints: they are checked in one pass of numpy (a 32K-token prompt in about 1 ms,
        # against tens of ms for the loop below). Ids a caller gave take the loop, which refuses bools (numpy
        # would read True as 1) and names the first bad entry; so does an encoding that fails the fast check.
        vocab = self.limits.vocab_size
        if encoded and tokens:
            arr = np.asarray(tokens)
            if arr.ndim == 1 and arr.dtype.kind in "iu" and arr.min() >= 0 and arr.max() < vocab:
                return arr.tolist()
        out = []
        for i, t in enumerate(tokens):
            if not _is_int(t):
                raise RequestError(f"{name}[{i}] is {_type(t)} {t!r}; token ids are integers")
            t = int(t)
            if not 0 <= t < vocab:
                what = "the tokenizer produced" if encoded else f"{name}[{i}] is"
                raise RequestError(f"{what} token id {t}, outside the model's vocabulary [0, {vocab})")
            out.append(t)
        if not out:
            raise RequestError(f"{name} encodes to no tokens")
        return out

    def _array(self, arr: Any, name: str) -> list[int]:
        dtype = str(arr.dtype)
        if arr.ndim != 1 or "int" not in dtype:
            raise RequestError(f"{name} must be a 1-D integer array of token ids, got {arr.ndim}-D {dtype}")
        return self._checked(arr.tolist(), name, encoded=False)

    def _messages(self, messages: Sequence[dict], name: str) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role:
                raise RequestError(f"{name}[{i}]['role'] must be a non-empty str, got {_type(role)}")
            role = self.text(role, f"{name}[{i}]['role']")
            out.append({"role": role, "content": self.text(content, f"{name}[{i}]['content']")})
        return out

    @staticmethod
    def text(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise RequestError(f"{name} must be str, got {_type(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"{name} is not valid Unicode text (a lone surrogate at {e.start})") from None
        return value

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a request whose prompt and new tokens together exceed the model's context length."""
        length = self.limits.context_length
        if length is not None and prompt_tokens + max_new_tokens > length:
            raise RequestError(
                f"{prompt_tokens} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's context "
                f"length of {length} tokens (max_position_embeddings)"
            )

    # ------------------------------------------------------------------ parameters

    @staticmethod
    def identifier(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise RequestError(f"{name} must be str, got {_type(value)}")
        if not value:
            raise RequestError(f"{name} must be a non-empty str")
        if len(value) > MAX_ID_CHARS:
            raise RequestError(f"{name} is {len(value)} characters long; at most {MAX_ID_CHARS}")
        if "\x00" in value:
            raise RequestError(f"{name} contains a NUL character")
        return RequestValidator.text(value, name)

    @staticmethod
    def max_new_tokens(value: Any) -> int:
        if not _is_int(value):
            raise RequestError(f"max_new_tokens must be an integer, got {_type(value)} {value!r}")
        if value < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {value}")
        return int(value)

    @staticmethod
    def temperature(value: Any) -> float:
        if not _is_real(value):
            raise RequestError(f"temperature must be a real number, got {_type(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise RequestError(f"temperature must be finite and >= 0 (0 is greedy), got {value}")
        return value

    @staticmethod
    def seed(value: Any) -> int | None:
        if value is None:
            return None
        if not _is_int(value):
            raise RequestError(f"seed must be an integer or None, got {_type(value)} {value!r}")
        if not 0 <= value < SEED_LIMIT:
            raise RequestError(f"seed must lie in [0, 2**64), got {value}")
        return int(value)

    @staticmethod
    def ttl(value: Any) -> float | None:
        if value is None:
            return None
        if not _is_real(value):
            raise RequestError(f"ttl must be seconds (a real number) or None, got {_type(value)} {value!r}")
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise RequestError(f"ttl must be positive seconds, got {value}")
        return value

    @staticmethod
    def flag(value: Any, name: str) -> bool:
        if not isinstance(value, (bool, np.bool_)):
            raise RequestError(f"{name} must be True or False, got {_type(value)} {value!r}")
        return bool(value)
