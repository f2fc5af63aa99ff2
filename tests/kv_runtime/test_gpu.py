"""On a GPU: HBM <-> DDR through the migrator in LMDeploy's pool layout, ordering, and disk -> HBM."""

from __future__ import annotations

import pytest
import torch
from runtime_helpers import BLOCK_TOKENS, tokens

from kv_runtime.hierarchy import HierarchyManager
from kv_runtime.layout import KVLayout
from kv_runtime.migrator import KVMigrator, MigrationPlan
from kv_runtime.pool import DDRPool, DiskPool, HBMPool, Tier

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QWEN2_7B = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584}


def hbm_hierarchy(layout: KVLayout, num_blocks: int, disk: DiskPool | None = None):
    pools = {Tier.HBM: HBMPool(layout, num_blocks), Tier.DDR: DDRPool(num_blocks * layout.block_bytes)}
    if disk is not None:
        pools[Tier.DISK] = disk
    h = HierarchyManager(pools)
    return h, KVMigrator(h, chunk_bytes=16 * layout.block_bytes)


def fill_hbm(h: HierarchyManager, keyer, n: int, seed: int):
    """Index n blocks resident in HBM with random bytes written on the default stream; returns nodes, bytes."""
    hbm: HBMPool = h.pools[Tier.HBM]
    layout = hbm.layout
    rk = keyer.request(tokens(seed, n * BLOCK_TOKENS))
    slots = h.allocate(Tier.HBM, [layout.block_bytes] * n, "")
    data = torch.randint(0, 256, (n, layout.num_layers, layout.layer_block_bytes), dtype=torch.uint8, device="cuda")
    for i, s in enumerate(slots):
        for layer, row in enumerate(hbm.rows):
            row[s.offset].copy_(data[i, layer])
    nodes = h.insert(rk, 0, Tier.HBM, slots, tenant="")
    return nodes, data


async def test_hbm_ddr_round_trip_lmdeploy_layout(keyer):
    layout = KVLayout.from_config(QWEN2_7B, block_size=BLOCK_TOKENS, dtype=torch.bfloat16)
    h, mig = hbm_hierarchy(layout, 96)
    nodes, data = fill_hbm(h, keyer, 40, 1)
    res = [n.payload for n in nodes]
    # Scatter the HBM cells: drop a few early ids so the batch is not one contiguous range.
    out = await mig.migrate(MigrationPlan(Tier.HBM, Tier.DDR, res, keep_source=False))
    assert len(out.moved) == 40 and h.pools[Tier.HBM].live_bytes == 0
    ddr: DDRPool = h.pools[Tier.DDR]
    for r, expect in zip(res, data, strict=True):
        assert torch.equal(ddr.view(r.copies[Tier.DDR]), expect.reshape(-1).cpu())
    back = await mig.migrate(MigrationPlan(Tier.DDR, Tier.HBM, res[::-1]))
    assert len(back.moved) == 40
    hbm: HBMPool = h.pools[Tier.HBM]
    for r, expect in zip(res, data, strict=True):
        cell = r.copies[Tier.HBM].offset
        got = torch.stack([row[cell] for row in hbm.rows])
        assert torch.equal(got, expect)


async def test_no_read_before_the_copy_completed(keyer):
    """A huge copy, then an immediate read through the handle: the copy is registered only when complete."""
    layout = KVLayout.from_config(QWEN2_7B, block_size=64, dtype=torch.bfloat16)  # 3.5 MiB blocks
    h, mig = hbm_hierarchy(layout, 160)
    nodes, data = fill_hbm(h, keyer, 150, 2)  # ~525 MB
    res = [n.payload for n in nodes]
    handle = mig.migrate(MigrationPlan(Tier.HBM, Tier.DDR, res))
    assert all(Tier.DDR not in r.copies for r in res)  # nothing visible before completion
    out = await handle
    ddr: DDRPool = h.pools[Tier.DDR]
    last = res[-1]
    assert torch.equal(ddr.view(last.copies[Tier.DDR]), data[-1].reshape(-1).cpu())
    assert torch.equal(ddr.view(res[0].copies[Tier.DDR]), data[0].reshape(-1).cpu())
    assert out.gbps > 0


async def test_disk_to_hbm_and_back(tmp_path, keyer):
    layout = KVLayout.from_config(QWEN2_7B, block_size=BLOCK_TOKENS, dtype=torch.bfloat16)
    disk = await DiskPool.open(tmp_path, slab_bytes=64 * layout.block_bytes, num_slabs=1)
    h, mig = hbm_hierarchy(layout, 48, disk)
    nodes, data = fill_hbm(h, keyer, 20, 3)
    res = [n.payload for n in nodes]
    out = await mig.migrate(MigrationPlan(Tier.HBM, Tier.DISK, res, keep_source=False))
    assert len(out.moved) == 20
    back = await mig.migrate(MigrationPlan(Tier.DISK, Tier.HBM, res))
    assert len(back.moved) == 20
    hbm: HBMPool = h.pools[Tier.HBM]
    for r, expect in zip(res, data, strict=True):
        cell = r.copies[Tier.HBM].offset
        assert torch.equal(torch.stack([row[cell] for row in hbm.rows]), expect)
    await disk.store.close()
