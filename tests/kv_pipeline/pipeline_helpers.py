"""Helpers for the kv_pipeline tests (a module of its own: every test folder has a ``conftest``)."""

from __future__ import annotations

import asyncio
import threading

import torch

BLOCK = 16  # tokens per block in these tests: short prompts still span many blocks
GATE_S = 30.0  # how long a gate waits before the test fails instead of hanging (never decides a pass)


def prompt(n: int, seed: int = 0) -> list[int]:
    """``n`` random token ids in the tokenizer's range (no EOS), the same for the same seed."""
    return torch.randint(2, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    """The prompt's last logits from a full prefill straight through the model (the reference)."""
    return model.prefill(torch.tensor(tokens), model.new_cache())


def greedy(model, tokens: list[int], n: int) -> list[int]:
    """The no-cache baseline: a full prefill then greedy decoding, straight through the model."""
    cache = model.new_cache()
    out = [int(torch.argmax(model.prefill(torch.tensor(tokens), cache)))]
    while len(out) < n:
        out.append(int(torch.argmax(model.decode(out[-1], cache))))
    return out


async def run(engine, prompt_, **kwargs):
    """Every output of one request, after its write-back has finished."""
    outs = [out async for out in engine.generate(prompt_, **kwargs)]
    await engine.scheduler.drain()
    return outs


def cost_model(engine):
    """The engine's load-vs-recompute cost model: the one place the tests reach it (re-point it here)."""
    return engine.cost


def set_costs(
    engine,
    *,
    prefill_tflops: float,
    ddr: tuple[float, float] | None = None,
    disk: tuple[float, float] | None = None,
) -> None:
    """Fix the cost model's inputs, so that its next plan is known: prefill throughput (TFLOP/s) and each
    tier's link as (GB/s, latency ms). The model learns from the requests it serves, so set them right
    before the request whose plan a test asserts."""
    cost = cost_model(engine)
    cost.prefill_flops_per_s = prefill_tflops * 1e12
    for name, link in (("ddr", ddr), ("disk", disk)):
        if link is not None:
            cost.tiers[name].bandwidth_gbps, cost.tiers[name].latency_ms = link


class Gate:
    """Holds a thread (the engine's compute thread, inside a wrapped model call) until the test opens it.

    ``hold()`` runs on the held thread; ``await entered()`` waits until something is held; ``open()``
    lets it go. Both waits time out after ``GATE_S`` so that a broken engine fails the test, never hangs it.
    """

    def __init__(self) -> None:
        self._entered = threading.Event()
        self._open = threading.Event()

    def hold(self) -> None:
        self._entered.set()
        if not self._open.wait(GATE_S):
            raise TimeoutError("the gate was never opened")

    async def entered(self) -> None:
        if not await asyncio.to_thread(self._entered.wait, GATE_S):
            raise AssertionError("nothing reached the gate")

    def open(self) -> None:
        self._open.set()


def assert_released(engine, context_pins: int = 0) -> None:
    """Nothing of a finished (or cancelled) request is left: no lease in the index beyond the named
    contexts' pins, no block with a migration in flight, no slot of any tier busy with a copy."""
    hierarchy = engine.hierarchy
    pinned = hierarchy.index.stats().pinned_blocks
    assert pinned == context_pins, f"{pinned} blocks pinned, expected the contexts' {context_pins}"
    for tier, pool in hierarchy.pools.items():
        in_flight = sum(1 for r in hierarchy.blocks_in(tier) if r.in_flight)
        assert in_flight == 0, f"{in_flight} blocks in {tier.name} with a migration in flight"
        busy = sum(1 for s in pool.live_slots() if s.busy)
        assert busy == 0, f"{busy} {tier.name} slots busy with a copy"
