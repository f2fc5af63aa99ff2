"""What an engine backend provides to the runtime.

A backend adapts one engine (LMDeploy's PyTorch engine, a transformers model) to the runtime: it describes
the engine's KV byte layout, reads blocks out of the engine's pool by block id into host buffers, writes blocks
into the pool by id, and signals completion without a device-wide synchronisation. Block bytes always follow
:class:`~kv_runtime.layout.KVLayout`: ``[num_layers, layer_block_bytes]`` per block, the same in every tier.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from kv_runtime.layout import KVLayout


@runtime_checkable
class KVBackendProtocol(Protocol):
    """The contract between the runtime and an engine."""

    @property
    def layout(self) -> KVLayout:
        """The engine's KV layout (sizes and byte offsets of a block, per layer and segment)."""
        ...

    @property
    def layer_rows(self) -> Sequence[torch.Tensor] | None:
        """The engine's pool as uint8 rows ``[num_blocks, layer_block_bytes]``, one per layer, when it is
        addressable memory (the runtime then gathers and scatters itself); None when only the read and write
        calls below reach it."""
        ...

    def read_blocks(self, block_ids: Sequence[int], out: torch.Tensor, *, after: Any = None) -> Awaitable[None]:
        """Copy blocks ``block_ids`` into ``out`` (host, pinned where CUDA is used) as
        ``[len(block_ids), layout.block_bytes]`` uint8. ``after`` is an event the copy must wait for (e.g. the
        compute stream's). The awaitable completes only when every byte is in ``out``."""
        ...

    def write_blocks(self, block_ids: Sequence[int], src: torch.Tensor) -> Awaitable[Any]:
        """Copy ``src`` ``[len(block_ids), layout.block_bytes]`` into the engine's blocks ``block_ids``. The
        awaitable completes when the engine may read them; its result is an event the engine's compute stream
        can wait on (or None on CPU), so the engine need not wait on the host."""
        ...
