"""The readers-writer lock: readers share, a writer is alone, a waiting writer is not starved."""

from __future__ import annotations

import threading

from prefix_reuse.rwlock import RWLock

WAIT = 10.0  # generous bound for events that must happen; a hang fails the test instead of blocking CI


def test_readers_share() -> None:
    lock = RWLock()
    both_in = threading.Barrier(2, timeout=WAIT)

    def reader() -> None:
        with lock.read():
            both_in.wait()  # would time out (BrokenBarrierError) if the second reader were kept out

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not both_in.broken
    assert all(not t.is_alive() for t in threads)


def _start(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_writer_excludes_readers_and_writers() -> None:
    lock = RWLock()
    entered: list[str] = []
    writer_in, release = threading.Event(), threading.Event()

    def first_writer() -> None:
        with lock.write():
            entered.append("writer-1")
            writer_in.set()
            release.wait(WAIT)
            entered.append("writer-1 done")

    def reader() -> None:
        with lock.read():
            entered.append("reader")

    def second_writer() -> None:
        with lock.write():
            entered.append("writer-2")

    t1 = _start(first_writer)
    assert writer_in.wait(WAIT)
    others = [_start(reader), _start(second_writer)]
    # Both are now blocked; give them every chance to (wrongly) get in before releasing the first writer.
    for t in others:
        t.join(0.2)
        assert t.is_alive()
    assert entered == ["writer-1"]
    release.set()
    for t in [t1, *others]:
        t.join(WAIT)
        assert not t.is_alive()
    assert entered[:2] == ["writer-1", "writer-1 done"]
    assert sorted(entered[2:]) == ["reader", "writer-2"]


def test_waiting_writer_is_not_starved_by_readers() -> None:
    # A reader holds the lock, a writer queues, then a new reader arrives. With writer preference the new
    # reader waits behind the writer; otherwise an overlapping stream of readers would keep the writer out
    # forever.
    lock = RWLock()
    order: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def first_reader() -> None:
        with lock.read():
            first_in.set()
            release_first.wait(WAIT)
        order.append("reader-1 out")

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("reader-2")

    r1 = _start(first_reader)
    assert first_in.wait(WAIT)
    w = _start(writer)
    _wait_until(lambda: lock._writers_waiting == 1)  # the writer is queued behind reader-1
    r2 = _start(late_reader)
    r2.join(0.2)
    assert r2.is_alive(), "a new reader overtook a waiting writer"
    assert order == []
    release_first.set()
    for t in (r1, w, r2):
        t.join(WAIT)
        assert not t.is_alive()
    assert order.index("writer") < order.index("reader-2")


def _wait_until(cond) -> None:
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if cond():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")
