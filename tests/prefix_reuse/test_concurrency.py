"""The index under threads and the asyncio loop at once, every answer checked against what could be true.

Payloads name the exact token prefix they cover, so a reader can check each matched block on its own. Writers
own disjoint chains (their first block is theirs alone), so the final index is a deterministic function of each
writer's op log, replayed here on a brute-force reference.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from prefix_reuse import BlockKeyer, KeyNamespace, PrefixMatcher, PrefixReuseIndex

BS = 4
NS = KeyNamespace(model_id="test-model@0001", kv_dtype="bfloat16", block_size=BS)
KEYER = BlockKeyer(NS)
Prefix = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Payload:
    prefix: Prefix  # every token from the start of the chain to the end of this block
    serial: int


@pytest.fixture(autouse=True)
def _frequent_thread_switches() -> Iterator[None]:
    # Switch threads far more often than the default 5 ms, so the readers see writers mid-operation.
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def run_threads(targets: list[Callable[[], None]], timeout: float = 60) -> None:
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish: deadlock?"
    if errors:
        raise errors[0]


def block_prefixes(prompt: Prefix) -> list[Prefix]:
    return [prompt[:end] for end in range(BS, len(prompt) - len(prompt) % BS + 1, BS)]


class World:
    """The shared index, the universe of prompts, and what every thread may assume about them."""

    def __init__(self, writers: int) -> None:
        self.released: list[Payload] = []
        self.index = PrefixReuseIndex(on_release=self.released.append)
        self.serials = itertools.count()
        self.created: list[Payload] = []
        self.ever: set[Prefix] = set()  # every prefix some insert offered (added before the insert)
        self.ever_lock = threading.Lock()
        self.answers: dict[int, dict[Prefix, set[int]]] = {}  # per reader: query -> match lengths seen
        # Stable chains: inserted and pinned before the threads start, never removed.
        self.stable = [tuple(range(9000 + 100 * s, 9000 + 100 * s + 4 * BS)) for s in range(2)]
        self.stable_nodes = []
        for prompt in self.stable:
            self.stable_nodes.append(self.index.insert(KEYER.request(prompt), self.payloads(prompt, 0)).nodes)
            self.ever.update(block_prefixes(prompt))
            self.index.pin(self.stable_nodes[-1])
        # Writer w owns every chain whose first token is 1000 * (w + 1); its prompts branch after block 1.
        self.owned = [
            [(1000 * (w + 1), 1, 2, 3, *(range(10 * b, 10 * b + 5 * BS))) for b in range(3)] for w in range(writers)
        ]

    def payloads(self, prompt: Prefix, start: int, count: int | None = None) -> list[Payload]:
        end = len(prompt) // BS if count is None else start + count
        out = [Payload(prompt[: (i + 1) * BS], next(self.serials)) for i in range(start, end)]
        self.created.extend(out)
        return out

    def queries(self) -> list[Prefix]:
        prompts = [*self.stable, *(p for owned in self.owned for p in owned)]
        # Extensions past anything cached, and a trailing partial block, must not change the answer.
        return prompts + [p + (77777,) * (BS + 1) for p in prompts] + [p[: 2 * BS + 1] for p in prompts]

    def check_answer(self, query: Prefix, nodes: list, token_start: int = 0) -> None:
        """Every node names exactly the prompt slice it covers; nothing beyond what was ever offered."""
        for i, node in enumerate(nodes):
            expected = query[token_start : token_start + (i + 1) * BS]
            assert node.payload.prefix == expected, "a match handed out another prefix's block"
            assert node.ready
        with self.ever_lock:
            assert all(query[token_start : token_start + (i + 1) * BS] in self.ever for i in range(len(nodes)))
        for prompt in self.stable:
            if query[: len(prompt)] == prompt and token_start == 0:
                assert len(nodes) >= len(prompt) // BS, "a pinned chain went missing"


def apply(ref: dict[Prefix, tuple[int, bool]], op: tuple) -> list[int]:
    """Brute-force semantics of one writer op; returns the serials it drops."""
    kind, *args = op
    if kind == "insert":
        payloads, ready = args
        dropped = []
        for p in payloads:
            if p.prefix in ref:
                dropped.append(p.serial)
            else:
                ref[p.prefix] = (p.serial, ready)
        return dropped
    if kind == "publish":
        for prefix in args[0]:
            ref[prefix] = (ref[prefix][0], True)
        return []
    (prefix,) = args
    gone = [p for p in ref if p[: len(prefix)] == prefix]
    return [ref.pop(p)[0] for p in gone]


def writer(world: World, w: int, ops: int, log: list[tuple]) -> None:
    rng = random.Random(w)
    ref: dict[Prefix, tuple[int, bool]] = {}
    for _ in range(ops):
        roll = rng.random()
        if roll < 0.55 or not ref:
            prompt = rng.choice(world.owned[w])
            present = 0
            while present < len(prompt) // BS and prompt[: (present + 1) * BS] in ref:
                present += 1
            start = rng.randint(0, present) if present < len(prompt) // BS else rng.randint(0, present - 1)
            count = rng.randint(1, len(prompt) // BS - start)
            payloads = world.payloads(prompt, start, count)
            with world.ever_lock:
                world.ever.update(p.prefix for p in payloads)
            ready = rng.random() < 0.7
            world.index.insert(KEYER.request(prompt), payloads, start_block=start, ready=ready)
            op: tuple = ("insert", payloads, ready)
        elif roll < 0.7 and any(not r for _, r in ref.values()):
            pending = sorted(p for p, (_, r) in ref.items() if not r)
            chosen = rng.sample(pending, min(len(pending), rng.randint(1, 3)))
            world.index.publish([world.index.get(KEYER.request(p).keys[-1]) for p in chosen])
            op = ("publish", chosen)
        else:
            prefix = rng.choice(sorted(ref))
            world.index.remove(world.index.get(KEYER.request(prefix).keys[-1]))
            op = ("remove", prefix)
        apply(ref, op)
        log.append(op)


def reader(world: World, seed: int, lookups: int, use_matcher: bool) -> None:
    rng = random.Random(1000 + seed)
    seen = world.answers.setdefault(seed, {})
    queries = world.queries()
    matcher = PrefixMatcher(world.index, KEYER)
    for _ in range(lookups):
        query = rng.choice(queries)
        if not use_matcher:
            nodes = world.index.match(KEYER.request(query))
            world.check_answer(query, nodes)
            seen.setdefault(query, set()).add(len(nodes))
            continue
        for hit in matcher.multi_hit(query).hits:
            world.check_answer(query, list(hit.nodes), hit.token_start)


def pinner(world: World, rounds: int) -> None:
    rng = random.Random(7)
    for _ in range(rounds):
        s = rng.randrange(len(world.stable))
        nodes = world.index.match_and_pin(KEYER.request(world.stable[s]))
        assert nodes == world.stable_nodes[s]
        world.index.unpin(nodes)
        world.index.pin(world.stable_nodes[s][:2])
        world.index.touch(world.stable_nodes[s])
        world.index.unpin(world.stable_nodes[s][:2])


def check_final_state(world: World, logs: list[list[tuple]]) -> None:
    expected: dict[Prefix, tuple[int, bool]] = {}
    replay_dropped: list[int] = []
    for log in logs:
        ref: dict[Prefix, tuple[int, bool]] = {}
        for op in log:
            replay_dropped.extend(apply(ref, op))
        expected.update(ref)
    for s, prompt in enumerate(world.stable):
        for prefix, node in zip(block_prefixes(prompt), world.stable_nodes[s], strict=True):
            expected[prefix] = (node.payload.serial, True)
            assert node.pin_count == 1
    for prefix in world.ever:
        node = world.index.get(KEYER.request(prefix).keys[-1])
        if prefix in expected:
            assert node is not None and (node.payload.serial, node.ready) == expected[prefix]
            assert node.payload.prefix == prefix
        else:
            assert node is None
    stats = world.index.stats()
    assert stats.blocks == len(world.index) == len(expected)
    assert stats.ready_blocks == sum(r for _, r in expected.values())
    assert stats.pinned_blocks == sum(len(n) for n in world.stable_nodes)
    # Every payload ever offered is either in the index or was released, exactly once.
    released = [p.serial for p in world.released]
    assert len(released) == len(set(released))
    assert Counter(released) == Counter(replay_dropped)
    assert set(released) | {s for s, _ in expected.values()} == {p.serial for p in world.created}
    assert not set(released) & {s for s, _ in expected.values()}


def test_readers_writers_and_pins_at_once() -> None:
    world = World(writers=2)
    logs: list[list[tuple]] = [[], []]
    targets = [lambda w=w: writer(world, w, 1500, logs[w]) for w in range(2)]
    targets += [lambda s=s: reader(world, s, 2000, use_matcher=s == 3) for s in range(4)]
    targets.append(lambda: pinner(world, 1000))
    run_threads(targets)
    assert all(len(log) == 1500 for log in logs)
    # The readers ran while the writers did: some query got different answers over time.
    assert any(len(lengths) > 1 for seen in world.answers.values() for lengths in seen.values())
    check_final_state(world, logs)


@pytest.mark.parametrize("mode", ["block_by_block", "one_shot_vs_block_by_block"])
def test_concurrent_inserts_of_one_chain_have_one_winner_per_block(mode: str) -> None:
    released: list[tuple[int, int, int]] = []
    index = PrefixReuseIndex(on_release=released.append)
    blocks = 8
    rk = KEYER.request(range(blocks * BS))
    for rnd in range(40):
        barrier = threading.Barrier(2)
        results: list[list] = [[], []]

        def insert(t: int, rnd: int = rnd, barrier: threading.Barrier = barrier, results: list = results) -> None:
            payloads = [(rnd, t, i) for i in range(blocks)]
            barrier.wait()
            if mode == "one_shot_vs_block_by_block" and t == 0:
                r = index.insert(rk, payloads)
                results[t] = list(zip(r.nodes, r.inserted, strict=True))
                return
            for i in range(blocks):
                r = index.insert(rk, payloads[i : i + 1], start_block=i)
                results[t].extend(zip(r.nodes, r.inserted, strict=True))

        before = len(released)
        run_threads([lambda: insert(0), lambda: insert(1)])
        nodes = index.match(rk)
        assert len(nodes) == blocks
        for i, node in enumerate(nodes):
            (n0, won0), (n1, won1) = results[0][i], results[1][i]
            assert n0 is node and n1 is node
            assert won0 != won1, "exactly one inserter wins each block"
            winner = 0 if won0 else 1
            assert node.payload == (rnd, winner, i)
        losers = [(rnd, 1 - (0 if results[0][i][1] else 1), i) for i in range(blocks)]
        assert sorted(released[before:]) == sorted(losers)
        removed = index.remove(nodes[0])
        assert {n.payload for n in removed} == {n.payload for n in nodes}
        assert sorted(released[before + blocks :]) == sorted(n.payload for n in nodes)
    assert len(released) == len(set(released)) == 40 * blocks * 2
    assert len(index) == 0


async def test_asyncio_lookups_alongside_threads() -> None:
    world = World(writers=2)
    logs: list[list[tuple]] = [[], []]
    loop = asyncio.get_running_loop()
    queries = world.queries()
    matcher = PrefixMatcher(world.index, KEYER)
    rng = random.Random(3)
    with ThreadPoolExecutor(max_workers=4) as pool:
        writers = [loop.run_in_executor(pool, writer, world, w, 200, logs[w]) for w in range(2)]
        pins = loop.run_in_executor(pool, pinner, world, 200)
        for _ in range(20):
            batch = [rng.choice(queries) for _ in range(10)]
            results = await asyncio.gather(*(loop.run_in_executor(pool, matcher.longest, q) for q in batch))
            for query, result in zip(batch, results, strict=True):
                world.check_answer(query, list(result.prefix))
                assert result.matched_tokens == result.prefix_tokens == len(result.prefix) * BS
            # The loop itself may look up too: lookups are short and never wait on each other.
            query = rng.choice(queries)
            world.check_answer(query, world.index.match(KEYER.request(query)))
        await asyncio.gather(*writers, pins)
    check_final_state(world, logs)
