"""Reference model directories built locally: random weights of a real architecture, a locally trained tokenizer.

No weights can be downloaded, and a benchmark must still exercise a real model: the directory holds a Qwen2
config of a real shape (or a reduced one for CPU), random weights saved with ``save_pretrained`` and a BPE
tokenizer trained here with ``tokenizers``. Users point at their own model directory instead.

Random weights give nearly flat logits, so greedy tokens can flip on harmless rounding. ``peaked=True`` scales
the output head so that the top logit stands well clear of the rest, which makes greedy continuations a fair
correctness check.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

# Shapes of real Qwen2 checkpoints, and reduced ones of the same architecture for CPU runs.
SHAPES: dict[str, dict[str, int]] = {
    "qwen2-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
    ),
    "qwen2-0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    "qwen2-tiny": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        vocab_size=8192,
    ),
}

_MARKER = "kvtier_reference_model.json"


@functools.cache
def _lexicon(size: int = 4000) -> tuple[str, ...]:
    """The same pseudo-words in every run, so a trained tokenizer and later workloads agree."""
    rng = np.random.default_rng(12345)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return tuple("".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(size))


def synthetic_words(rng: np.random.Generator, n_words: int) -> list[str]:
    """Pseudo-words with a Zipf-like distribution: text a BPE tokenizer can learn and a workload can reuse."""
    lexicon = _lexicon()
    ranks = np.minimum(rng.zipf(1.3, size=n_words), len(lexicon)) - 1
    return [lexicon[r] for r in ranks]


def synthetic_text(rng: np.random.Generator, n_words: int) -> str:
    words = synthetic_words(rng, n_words)
    return " ".join(w + ("." if i % 17 == 16 else "") for i, w in enumerate(words))


def _train_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = np.random.default_rng(0)
    corpus = [synthetic_text(rng, 200) for _ in range(2000)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)


def build_model_dir(
    path: Path,
    shape: str = "qwen2-tiny",
    *,
    dtype: str = "float32",
    device: str = "cpu",
    peaked: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 32768,
    vocab_size: int | None = None,
) -> Path:
    """Create (or reuse, when it matches) a model directory; returns its path.

    ``vocab_size`` overrides the shape's (its embedding and LM head; the KV cache does not change): a model with
    the local tokenizer's vocabulary (8192) generates only tokens that have text, which a client timing streamed
    text needs (a random-weight model with the full vocabulary mostly generates ids the tokenizer lacks)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    path = Path(path)
    wanted = {"shape": shape, "dtype": dtype, "peaked": peaked, "seed": seed, "max_pos": max_position_embeddings}
    if vocab_size is not None:
        wanted["vocab_size"] = vocab_size
    marker = path / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return path
    path.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape] if vocab_size is None else {**SHAPES[shape], "vocab_size": vocab_size}
    config = Qwen2Config(
        **dims,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch_dtype)
    if peaked:
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path, safe_serialization=True)
    _train_tokenizer(path, min(dims["vocab_size"], 8192))
    marker.write_text(json.dumps(wanted))
    return path
