"""kv_io.cuda: importable without CUDA (clear errors); on a GPU, copies ordered by events on their own stream."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kv_io import cuda as kcuda


def test_clear_error_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not kcuda.cuda_available()
    with pytest.raises(RuntimeError, match="CUDA"):
        kcuda.CopyStream()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_copy_waits_for_event_of_another_stream():
    cs = kcuda.CopyStream()
    producer = torch.cuda.Stream()
    n = 64 << 20
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(producer):
        # A slow producer: many passes over the buffer before its final value lands.
        for v in range(1, 40):
            src.fill_(v)
        produced = producer.record_event()
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    done = cs.copy(host, src, after=produced)
    await kcuda.wait_event(done)
    assert done.query()
    assert int(host[0]) == 39 and int(host[-1]) == 39 and bool((host[:: 1 << 20] == 39).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_pageable_host_memory_is_refused():
    cs = kcuda.CopyStream()
    with pytest.raises(ValueError, match="pinned"):
        cs.copy(torch.empty(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_wait_event_does_not_block_the_loop():
    cs = kcuda.CopyStream()
    big = torch.ones(256 << 20, dtype=torch.uint8, device="cuda")
    host = torch.empty_like(big, device="cpu").pin_memory()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    done = cs.copy(host, big)
    await kcuda.wait_event(done)
    t.cancel()
    assert done.query() and bool(host[-1] == 1)
    assert ticks > 0
