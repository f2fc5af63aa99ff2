"""The embedded engine: any causal LM that transformers loads, on CPU or GPU.

Cached blocks are restored into the model's own cache object (``DynamicCache``) and only the rest of the prompt
is prefilled. A block's bytes are the concatenation, layer by layer, of its keys and then its values, each
``[kv_heads, block_size, head_dim]`` in the cache dtype: the same bytes whichever tier holds them, so a block
saved from one request restores into any other with the same namespace.

``HFModel`` is the embedded engine's backend (``kv_runtime.backend_protocol``): ``copy_in`` fills a buffer on the
model's device from DDR slots, ``copy_out`` copies blocks of a cache into DDR slots; on a GPU each runs on a
copy stream of its own and returns the event that completes with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kv_io.cuda import CopyStream
from kv_runtime.layout import KVLayout
from kv_runtime.pool import DDRPool, Slot


class HFModel:
    """A transformers causal LM with block-granular access to its KV cache."""

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "auto", block_size: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.config = self.model.config
        self.layout = KVLayout.from_config(self.config, block_size=block_size, dtype=self.model.dtype)
        if self.layout.head_dim * self.layout.num_kv_heads * 2 * self.layout.dtype.itemsize * block_size != (
            self.layout.layer_block_bytes
        ):
            raise ValueError("the transformers backend keeps unquantised K and V only")

    # ------------------------------------------------------------------ the backend protocol

    def attach(self, ddr: DDRPool) -> None:
        """The DDR tier that ``copy_in`` reads and ``copy_out`` writes (pinned memory where CUDA is used)."""
        self._ddr = ddr
        cuda = self.device.type == "cuda"
        self._load_stream = CopyStream(self.device) if cuda else None
        self._save_stream = CopyStream(self.device) if cuda else None

    def copy_in(self, ddr_slots: Sequence[Slot], dest: torch.Tensor, *, after: Any = None) -> torch.cuda.Event | None:
        """DDR slots into ``dest`` (``[n, block_bytes]`` uint8 on the model's device): on GPU straight from the
        pinned slots on the load stream (the device never stalls), on CPU a copy done on return."""
        if self._load_stream is None:
            for i, slot in enumerate(ddr_slots):
                dest[i].copy_(self._ddr.view(slot))
            return None
        with self._load_stream.use():
            self._load_stream.wait(after)
            for i, slot in enumerate(ddr_slots):
                dest[i].copy_(self._ddr.view(slot), non_blocking=True)
            return self._load_stream.record()

    def copy_out(
        self, src: tuple[Any, int], ddr_slots: Sequence[Slot], *, after: Any = None
    ) -> torch.cuda.Event | None:
        """Blocks ``[first, first + len(ddr_slots))`` of ``src = (cache, first)`` into the slots. On GPU they are
        gathered on the save stream after ``after`` (recorded on the compute stream behind the prefill that wrote
        them), then copied into the pinned slots on the same stream; on CPU the copy is done on return."""
        cache, first = src
        if self._save_stream is None:
            blocks = self.blocks_from_cache(cache, first, len(ddr_slots))
            for slot, row in zip(ddr_slots, blocks, strict=True):
                self._ddr.view(slot).copy_(row)
            return None
        stream = self._save_stream.stream
        with self._save_stream.use():
            self._save_stream.wait(after)
            # NOTE: decoding replaces the cache's tensors (it concatenates); marking the ones read here as used
            # by this stream keeps the allocator from recycling them before the gather has run.
            for layer in cache.layers:
                layer.keys.record_stream(stream)
                layer.values.record_stream(stream)
            blocks = self.blocks_from_cache(cache, first, len(ddr_slots))
            for slot, row in zip(ddr_slots, blocks, strict=True):
                self._ddr.view(slot).copy_(row, non_blocking=True)
            blocks.record_stream(stream)
            return self._save_stream.record()

    # ------------------------------------------------------------------ the model

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Run the prompt (or its uncached rest) through the model, growing ``cache``; returns last logits."""
        out = self.model(input_ids.view(1, -1).to(self.device), past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def decode(self, token: int, cache) -> torch.Tensor:
        """One decode step after ``token``; returns the next logits."""
        ids = torch.tensor([[token]], device=self.device)
        return self.model(ids, past_key_values=cache, use_cache=True).logits[0, -1].float()

    @torch.inference_mode()
    def prefill_logits(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """All positions' logits of a prefill (for correctness checks against a full prefill)."""
        out = self.model(input_ids.view(1, -1).to(self.device), past_key_values=cache, use_cache=True)
        return out.logits[0].float()

    def blocks_from_cache(self, cache, first_block: int, num_blocks: int) -> torch.Tensor:
        """Bytes of blocks ``[first_block, first_block + num_blocks)`` as ``[num_blocks, block_bytes]`` uint8,
        on the model's device (the caller moves them: on GPU through its own stream, never a blocking copy)."""
        s = self.layout
        start, end = first_block * s.block_size, (first_block + num_blocks) * s.block_size
        if end > cache.get_seq_length():
            raise ValueError(f"cache holds {cache.get_seq_length()} tokens, blocks need {end}")
        per_layer = []
        for layer in cache.layers:
            kv = torch.stack([layer.keys[0, :, start:end], layer.values[0, :, start:end]])  # [2, H, T, D]
            kv = kv.view(2, s.num_kv_heads, num_blocks, s.block_size, s.head_dim).permute(2, 0, 1, 3, 4)
            per_layer.append(kv)
        blocks = torch.stack(per_layer, dim=1).contiguous()  # [N, L, 2, H, bs, D]
        return blocks.view(num_blocks, -1).view(torch.uint8)

    def cache_from_blocks(self, blocks: Sequence[torch.Tensor] | torch.Tensor, cache=None):
        """``cache`` (a fresh one if None) extended by the given blocks (uint8, ``block_bytes`` each), in order."""
        s = self.layout
        cache = self.new_cache() if cache is None else cache
        n = len(blocks)
        if n == 0:
            return cache
        flat = blocks if isinstance(blocks, torch.Tensor) else torch.stack(list(blocks))
        if flat.dtype != torch.uint8 or tuple(flat.shape) != (n, s.block_bytes):
            raise ValueError(f"expected uint8 blocks of {s.block_bytes} bytes, got {flat.dtype} {tuple(flat.shape)}")
        kv = flat.to(self.device, non_blocking=True).view(s.dtype)
        kv = kv.view(n, s.num_layers, 2, s.num_kv_heads, s.block_size, s.head_dim)
        kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(s.num_layers, 2, 1, s.num_kv_heads, n * s.block_size, s.head_dim)
        for layer in range(s.num_layers):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache

    def encode(self, content: str | Sequence[int] | Sequence[dict]) -> list[int]:
        """Token ids of a prompt: text, chat messages (``{"role", "content"}``) or ids as they are."""
        return encode_with(self.tokenizer, content)


def encode_with(tokenizer: Any, content: str | Sequence[int] | Sequence[dict]) -> list[int]:
    """Token ids of a prompt through a transformers tokenizer: text, chat messages (``{"role", "content"}``,
    through the model's chat template where it has one) or ids as they are. Both engines encode with it."""
    if isinstance(content, str):
        return list(tokenizer(content, add_special_tokens=False)["input_ids"])
    items = list(content)
    if items and isinstance(items[0], dict):
        if getattr(tokenizer, "chat_template", None):
            return list(tokenizer.apply_chat_template(items, tokenize=True))
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in items)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [int(t) for t in items]
