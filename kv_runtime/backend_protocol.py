"""What an engine backend provides to the tier service: its KV layout and the two copies between DDR and itself.

The tier service (``service.py``) owns the life of blocks; an engine owns only its cache and its scheduling.
So a backend does exactly two things besides describing its layout: copy blocks from DDR slots into its cache
(``copy_in``, what a load's sink does) and out of its cache into DDR slots (``copy_out``, what a save does).
Where the blocks are in the engine (``dest`` / ``src``) is the engine's own address: a device buffer for the
transformers engine, cache block ids for LMDeploy. Both copies return their completion: ``None`` when the bytes
have already arrived (a CPU copy), else a CUDA event that completes with the copy; nothing waits on the device.
Block bytes always follow :class:`~kv_runtime.layout.KVLayout`, the same in every tier.

Implemented by ``backends.hf_backend.HFModel`` and ``backends.lmdeploy_worker.LMDeployWorkerSide``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from kv_runtime.layout import KVLayout
from kv_runtime.pool import Slot

Completion = torch.cuda.Event | None


@runtime_checkable
class KVBackendProtocol(Protocol):
    """The contract between the tier service and an engine."""

    @property
    def layout(self) -> KVLayout:
        """The engine's KV layout (sizes and byte offsets of a block, per layer and segment)."""
        ...

    def copy_in(self, ddr_slots: Sequence[Slot], dest: Any, *, after: Any = None) -> Completion:
        """Copy the blocks in ``ddr_slots`` (pinned DDR, in order) into the engine at ``dest``; ``after`` is an
        event the copy must wait for (earlier kernels that may still use the destination)."""
        ...

    def copy_out(self, src: Any, ddr_slots: Sequence[Slot], *, after: Any = None) -> Completion:
        """Copy the engine's blocks at ``src`` into ``ddr_slots``; ``after`` is an event recorded behind the
        forward that wrote them, so the copy never races it."""
        ...


async def completed(done: Completion) -> None:
    """Wait for a backend copy's completion from asyncio.

    NOTE: a pool thread blocked in CUDA releases the GIL until the copy ends; polling the event from the loop
    instead needs the GIL at every poll, and an engine's busy threads make each of those waits long (a DDR hit
    under LMDeploy took 612 ms that way instead of 72 ms). A cancelled wait still lets the copy finish first:
    the DDR slots must outlive the DMA that uses them.
    """
    if done is None:
        return
    try:
        await asyncio.get_running_loop().run_in_executor(None, done.synchronize)
    except BaseException:
        done.synchronize()
        raise
