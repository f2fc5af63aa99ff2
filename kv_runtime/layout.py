"""Exact byte sizes and byte layout of a KV block, derived from a model config.

A block is ``block_size`` tokens of every layer's keys and values. In the engine's pool (LMDeploy 0.18's
``connector_kv_caches``) each layer is one uint8 row ``[num_blocks, layer_block_bytes]``; a *layer-block* is
one block's bytes in one such row. Outside the engine (DDR and disk tiers) a block is its layer-blocks
concatenated in layer order, ``[num_layers, layer_block_bytes]``, so one block is one contiguous extent.

Inside a layer-block the segments follow LMDeploy's cache tensors: keys ``[block_size, kv_heads, packed_dim]``,
values likewise, then (quantised caches only) key and value scale/zero pairs ``[block_size, kv_heads, groups,
2]`` in the model dtype. Quantisation is asymmetric per token, per KV head and per group of ``group_size``
channels (LMDeploy's quant_policy 8 and 4 use one group per head: ``group_size == head_dim``); int4 packs two
channels per byte.

Every size is computed from the config, never estimated, so two processes that agree on the config agree on
every byte offset.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

LAYOUT_VERSION = 1  # bump when the bytes of a block change meaning: caches of an older format then never match

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
}


class KVQuant(enum.IntEnum):
    """KV cache quantisation; the values are LMDeploy's ``quant_policy`` numbers."""

    NONE = 0
    INT4 = 4
    INT8 = 8

    @property
    def bits(self) -> int | None:
        return None if self is KVQuant.NONE else int(self)

    @classmethod
    def parse(cls, value: KVQuant | int | str | None) -> KVQuant:
        if value is None:
            return cls.NONE
        if isinstance(value, KVQuant):
            return value
        if isinstance(value, str):
            names = {"none": cls.NONE, "0": cls.NONE, "int8": cls.INT8, "8": cls.INT8, "int4": cls.INT4, "4": cls.INT4}
            if value.lower() in names:
                return names[value.lower()]
        elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 4, 8):
            return cls(value)
        raise ValueError(f"KV quantisation must be none/int8/int4 (quant_policy 0/8/4), got {value!r}")


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype:
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        name = value.removeprefix("torch.").lower()
        if name not in _DTYPES:
            raise ValueError(f"unsupported KV dtype {value!r}; expected one of {sorted(set(_DTYPES))}")
        dtype = _DTYPES[name]
    else:
        raise TypeError(f"KV dtype must be a torch.dtype or a name, got {type(value).__name__}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported KV dtype {dtype}; expected float16, bfloat16 or float32")
    return dtype


@dataclass(frozen=True, slots=True)
class Segment:
    """One tensor inside a layer-block: byte offset, byte length, element shape and dtype."""

    name: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The KV byte format of one tensor-parallel rank: sizes and offsets of every block, layer and segment.

    ``num_kv_heads`` is the rank's share (the model's KV heads divided by ``tp_size``); ``dtype`` is the
    model's KV dtype, which quantised caches keep for their scales and zeros.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    quant: KVQuant = KVQuant.NONE
    group_size: int = 0  # channels per scale/zero pair; 0 = head_dim (one group per token and head)
    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        object.__setattr__(self, "quant", KVQuant.parse(self.quant))
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank}")
        group = self.group_size or self.head_dim
        if self.head_dim % group:
            raise ValueError(f"group_size {group} must divide head_dim {self.head_dim}")
        object.__setattr__(self, "group_size", group)
        if self.quant is KVQuant.INT4 and self.head_dim % 2:
            raise ValueError(f"int4 KV packs two channels per byte: head_dim {self.head_dim} must be even")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        block_size: int = 64,
        dtype: torch.dtype | str | None = None,
        quant: KVQuant | int | str | None = None,
        group_size: int = 0,
        tp_size: int = 1,
        tp_rank: int = 0,
    ) -> KVLayout:
        """From a transformers config object or a dict with the same field names.

        ``dtype`` defaults to the config's ``torch_dtype``/``dtype``. KV heads are split across ``tp_size``
        ranks; when there are fewer KV heads than ranks each head is replicated (one head per rank), as
        LMDeploy and vLLM do.
        """

        def field(name: str) -> Any:
            if isinstance(config, Mapping):
                return config.get(name)
            return getattr(config, name, None)

        if config is None or isinstance(config, (str, bytes, int, float)):
            raise TypeError(f"expected a model config object or dict, got {type(config).__name__}")
        layers = field("num_hidden_layers")
        heads = field("num_attention_heads")
        if layers is None or heads is None:
            raise ValueError("model config needs num_hidden_layers and num_attention_heads")
        _positive_int("num_attention_heads", heads)
        kv_heads = field("num_key_value_heads") or heads
        _positive_int("num_key_value_heads", kv_heads)
        head_dim = field("head_dim")
        if not head_dim:
            hidden = field("hidden_size")
            if not hidden:
                raise ValueError("model config needs head_dim or hidden_size")
            if hidden % heads:
                raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
            head_dim = hidden // heads
        if dtype is None:
            dtype = field("torch_dtype") or field("dtype")
            if dtype is None:
                raise ValueError("the KV dtype is neither given nor in the config (torch_dtype)")
        _positive_int("tp_size", tp_size)
        if kv_heads >= tp_size:
            if kv_heads % tp_size:
                raise ValueError(f"{kv_heads} KV heads cannot be split evenly over tp_size {tp_size}")
            local_heads = kv_heads // tp_size
        else:
            if tp_size % kv_heads:
                raise ValueError(f"tp_size {tp_size} is not a multiple of the {kv_heads} KV heads to replicate")
            local_heads = 1
        return cls(
            num_layers=layers,
            num_kv_heads=local_heads,
            head_dim=head_dim,
            block_size=block_size,
            dtype=dtype,
            quant=KVQuant.parse(quant),
            group_size=group_size,
            tp_size=tp_size,
            tp_rank=tp_rank,
        )

    # ------------------------------------------------------------------ sizes

    @property
    def packed_head_dim(self) -> int:
        """Bytes-per-channel-adjusted width of one stored head: ``head_dim`` elements, or bytes when quantised."""
        if self.quant is KVQuant.INT4:
            return self.head_dim // 2
        return self.head_dim

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Keys plus values of one token in one layer, without scales."""
        per_head = self.head_dim * self.dtype.itemsize if self.quant is KVQuant.NONE else self.packed_head_dim
        return 2 * self.num_kv_heads * per_head

    @property
    def scale_bytes_per_token_layer(self) -> int:
        """Scale and zero of keys and values of one token in one layer (0 when not quantised)."""
        if self.quant is KVQuant.NONE:
            return 0
        groups = self.head_dim // self.group_size
        return 2 * self.num_kv_heads * groups * 2 * self.dtype.itemsize

    @property
    def bytes_per_token_layer(self) -> int:
        return self.kv_bytes_per_token_layer + self.scale_bytes_per_token_layer

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_layer * self.num_layers

    @property
    def layer_block_bytes(self) -> int:
        """One block in one layer row of the engine's pool."""
        return self.bytes_per_token_layer * self.block_size

    @property
    def block_bytes(self) -> int:
        """One block, all layers: the size of a block's extent in the DDR and disk tiers."""
        return self.layer_block_bytes * self.num_layers

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Full blocks in ``num_tokens`` (a partial block is never cached)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens // self.block_size

    # ------------------------------------------------------------------ byte layout

    def segments(self) -> tuple[Segment, ...]:
        """The tensors inside one layer-block, in storage order."""
        bs, h = self.block_size, self.num_kv_heads
        if self.quant is KVQuant.NONE:
            shape, dtype = (bs, h, self.head_dim), self.dtype
        else:
            shape, dtype = (bs, h, self.packed_head_dim), torch.uint8
        kv = bs * h * (self.head_dim * self.dtype.itemsize if self.quant is KVQuant.NONE else self.packed_head_dim)
        out = [Segment("k", 0, kv, shape, dtype), Segment("v", kv, kv, shape, dtype)]
        if self.quant is not KVQuant.NONE:
            groups = self.head_dim // self.group_size
            sz_shape = (bs, h, groups, 2)
            sz = bs * h * groups * 2 * self.dtype.itemsize
            out.append(Segment("k_scales_zeros", 2 * kv, sz, sz_shape, self.dtype))
            out.append(Segment("v_scales_zeros", 2 * kv + sz, sz, sz_shape, self.dtype))
        return tuple(out)

    def layer_offset(self, layer: int) -> int:
        """Byte offset of ``layer``'s layer-block inside a block's contiguous bytes."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer * self.layer_block_bytes

    def describe(self) -> dict[str, Any]:
        """Plain data for reports and namespaces."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quant_policy": int(self.quant),
            "group_size": self.group_size,
            "tp": f"{self.tp_rank}/{self.tp_size}",
            "layer_block_bytes": self.layer_block_bytes,
            "block_bytes": self.block_bytes,
            "bytes_per_token": self.bytes_per_token,
        }
