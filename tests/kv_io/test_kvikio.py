"""The KvikIO engine on a GPU machine: host and device round trips, and a DiskStore read straight into HBM.

Marked `gpu`: KvikIO's wheels need CUDA, so these run on the lent machine and skip elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kv_io.disk_format import block_capacity
from kv_io.disk_store import DiskLocation, DiskStore
from kv_io.file_io import kvikio_available, make_file_io

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and kvikio_available()), reason="needs CUDA and kvikio"),
]


async def test_kvikio_round_trip_host_and_device(tmp_path: Path) -> None:
    import kvikio.defaults

    fio = make_file_io("kvikio", threads=4, chunk_bytes=1 << 20)
    assert fio.name == "kvikio"
    getter = getattr(kvikio.defaults, "get", None)
    task_size = getter("task_size") if callable(getter) else kvikio.defaults.task_size()
    assert (fio.threads, fio.chunk_bytes, task_size) == (4, 1 << 20, 1 << 20)  # 3 MiB below: three tasks
    path = tmp_path / "k.bin"
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8)
    assert await fio.pwrite(path, 4096, data) == data.numel()
    await fio.fsync(path)
    host = torch.empty_like(data)
    assert await fio.pread(path, 4096, host) == data.numel()
    assert torch.equal(host, data)
    dev = torch.empty(data.numel(), dtype=torch.uint8, device="cuda")
    assert await fio.pread(path, 4096, dev) == data.numel()
    assert torch.equal(dev.cpu(), data)
    assert await fio.pwrite(path, 0, dev[:8192]) == 8192
    await fio.close()


async def test_disk_store_reads_into_device_memory_verified(tmp_path: Path) -> None:
    fio = make_file_io("kvikio", threads=4)
    store = await DiskStore.open(tmp_path / "store", slab_bytes=8 << 20, num_slabs=1, file_io=fio)
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    rec = await store.write(b"ns", b"k", DiskLocation(0, 0, block_capacity(data.numel())), data)
    dev = torch.empty(data.numel(), dtype=torch.uint8, device="cuda")
    assert await store.read(rec, dev)
    assert torch.equal(dev.cpu(), data)
    await store.close()
    await fio.close()
