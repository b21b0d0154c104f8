from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from gpuqueue import Coordinator, FIFOQueue, OutOfRangeError, QueueRunner
from tests.conftest import wait_entered


def feeder(q: FIFOQueue[int], items: Iterator[int]) -> Callable[[], None]:
    """An enqueue op that puts the next item, or reports the end of its input."""

    def enqueue() -> None:
        try:
            item = next(items)
        except StopIteration:
            raise OutOfRangeError("input exhausted") from None
        q.put(item)

    return enqueue


def drain(q: FIFOQueue[int]) -> list[int]:
    out = []
    while True:
        try:
            out.append(q.get(timeout=5))
        except OutOfRangeError:
            return out


def test_argument_errors() -> None:
    q: FIFOQueue[int] = FIFOQueue(1)
    with pytest.raises(ValueError, match=r"^QueueRunner needs a queue$"):
        QueueRunner(None, [lambda: None])
    with pytest.raises(ValueError, match=r"^QueueRunner needs at least one enqueue op$"):
        QueueRunner(q, [])
    with pytest.raises(ValueError, match=r"^enqueue_ops\[1\] is not callable: 3$"):
        QueueRunner(q, [lambda: None, 3])  # type: ignore[list-item]


def test_last_op_thread_closes_the_queue_keeping_pending_items() -> None:
    q: FIFOQueue[int] = FIFOQueue(100, name="numbers")
    ops = [feeder(q, iter(range(i * 10, i * 10 + 10))) for i in range(3)]
    runner = QueueRunner(q, ops)
    threads = runner.create_threads(start=True)
    assert len(threads) == 3
    for t in threads:
        t.join(5)
    assert q.closed and q.qsize() == 30
    assert sorted(drain(q)) == list(range(30))
    assert runner.exceptions_raised == []


def test_queue_stays_open_until_the_last_op_finishes() -> None:
    q: FIFOQueue[int] = FIFOQueue(10)
    gate = threading.Event()
    sent = [False]

    def slow() -> None:
        gate.wait(5)
        if sent[0]:
            raise OutOfRangeError()
        sent[0] = True
        q.put(99)

    runner = QueueRunner(q, [feeder(q, iter([1, 2])), slow])
    threads = runner.create_threads(start=True)
    threads[0].join(5)
    assert not q.closed
    assert runner.create_threads() == []  # threads from the first call still run
    gate.set()
    threads[1].join(5)
    assert sorted(drain(q)) == [1, 2, 99]
    # All threads ended: a new call makes new ones.
    assert len(runner.create_threads()) == 2


def test_thread_names_and_daemon_flag() -> None:
    q: FIFOQueue[int] = FIFOQueue(1, name="host")

    def read_batch() -> None:
        raise OutOfRangeError()

    coord = Coordinator()
    threads = QueueRunner(q, [read_batch, lambda: None]).create_threads(coord, daemon=True)
    assert [t.name for t in threads] == [
        "QueueRunnerThread-host-read_batch",
        "QueueRunnerThread-host-<lambda>",
        "QueueRunnerThread-host-close_on_stop",
    ]
    assert all(t.daemon for t in threads)
    assert not any(t.is_alive() for t in threads)
    assert coord.registered_threads == threads


def test_coordinator_stop_cancels_a_queue_blocking_the_ops() -> None:
    q: FIFOQueue[int] = FIFOQueue(1)
    blocked = wait_entered(q._not_full)
    coord = Coordinator()
    runner = QueueRunner(q, [lambda: q.put(1)])
    runner.create_threads(coord, start=True)
    assert blocked.wait(5)
    coord.request_stop()
    coord.join(stop_grace_period_secs=5)  # no CancelledError is reported: stop came first
    assert q.cancelled
    assert coord.suppressed_exceptions == []


def test_op_error_goes_to_the_coordinator() -> None:
    q: FIFOQueue[int] = FIFOQueue(5)

    def bad() -> None:
        raise KeyError("bad op")

    coord = Coordinator()
    QueueRunner(q, [bad]).create_threads(coord, start=True)
    with pytest.raises(KeyError, match=r"bad op"):
        coord.join()


def test_op_error_without_coordinator_goes_to_exceptions_raised() -> None:
    q: FIFOQueue[int] = FIFOQueue(5)
    error = KeyError("bad op")

    def bad() -> None:
        raise error

    runner = QueueRunner(q, [bad])
    for t in runner.create_threads(start=True):
        t.join(5)
    assert runner.exceptions_raised == [error]
    assert q.closed


def test_custom_closed_exception_types_and_ops() -> None:
    q: FIFOQueue[int] = FIFOQueue(5)
    calls: list[str] = []
    items = iter([1, 2])

    def op() -> None:
        q.put(next(items))

    runner = QueueRunner(
        q,
        [op],
        close_op=lambda: calls.append("close"),
        cancel_op=lambda: calls.append("cancel"),
        queue_closed_exception_types=(StopIteration,),
    )
    coord = Coordinator()
    runner.create_threads(coord, start=True)
    threads = coord.registered_threads
    threads[0].join(5)
    assert calls == ["close"]
    coord.request_stop()
    coord.join()
    assert calls == ["close", "cancel"]
    assert q.qsize() == 2


def test_config_round_trip() -> None:
    q: FIFOQueue[int] = FIFOQueue(2, name="cfg")
    op = lambda: None  # noqa: E731
    runner = QueueRunner(q, [op], queue_closed_exception_types=(KeyError,))
    clone = QueueRunner.from_config(runner.to_config())
    assert clone.to_config() == runner.to_config()
    assert clone.queue is q and clone.name == "cfg"
    assert clone.enqueue_ops == [op]
    assert clone.queue_closed_exception_types == (KeyError,)
    assert clone.close_op == q.close and clone.cancel_op == q.cancel
