from __future__ import annotations

import pytest

from gpuqueue import CancelledError, FIFOQueue, OutOfRangeError, QueueClosedError
from tests.conftest import Worker, wait_entered


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "2"])
def test_capacity_must_be_a_positive_int(capacity: object) -> None:
    with pytest.raises(ValueError, match=r"^capacity must be a positive int, got "):
        FIFOQueue(capacity)  # type: ignore[arg-type]


def test_fifo_order_and_qsize() -> None:
    q: FIFOQueue[int] = FIFOQueue(3, name="q")
    for i in range(3):
        q.put(i)
    assert q.qsize() == 3
    assert [q.get() for _ in range(3)] == [0, 1, 2]
    assert q.qsize() == 0
    assert q.name == "q"
    assert q.capacity == 3


def test_default_name_is_unique() -> None:
    assert FIFOQueue(1).name != FIFOQueue(1).name


def test_close_lets_getters_drain_then_raises_out_of_range() -> None:
    q: FIFOQueue[int] = FIFOQueue(4)
    q.put(1)
    q.put(2)
    q.close()
    assert q.closed and not q.cancelled
    with pytest.raises(QueueClosedError, match=r"^queue '.*' is closed$"):
        q.put(3)
    assert q.get() == 1
    assert q.get() == 2
    with pytest.raises(OutOfRangeError, match=r"is closed and empty$"):
        q.get()


def test_close_wakes_a_blocked_getter() -> None:
    q: FIFOQueue[int] = FIFOQueue(1)
    blocked = wait_entered(q._not_empty)
    getter = Worker(q.get)
    getter.start()
    assert blocked.wait(5)
    q.close()
    assert isinstance(getter.finish().error, OutOfRangeError)


def test_close_wakes_a_blocked_putter_without_enqueuing() -> None:
    q: FIFOQueue[int] = FIFOQueue(1)
    q.put(0)
    blocked = wait_entered(q._not_full)
    putter = Worker(q.put, 1)
    putter.start()
    assert blocked.wait(5)
    q.close()
    assert isinstance(putter.finish().error, QueueClosedError)
    assert q.get() == 0
    with pytest.raises(OutOfRangeError):
        q.get()


def test_cancel_drops_items_returns_them_and_wakes_everyone() -> None:
    q: FIFOQueue[int] = FIFOQueue(1)
    q.put(7)
    blocked_put = wait_entered(q._not_full)
    putter = Worker(q.put, 8, name="putter")
    putter.start()
    assert blocked_put.wait(5)
    assert q.cancel() == [7]
    assert q.cancel() == []
    assert isinstance(putter.finish().error, CancelledError)
    assert not isinstance(putter.error, QueueClosedError)
    assert q.cancelled and q.closed and q.qsize() == 0
    with pytest.raises(CancelledError, match=r"was cancelled$"):
        q.get()

    q2: FIFOQueue[int] = FIFOQueue(1)
    blocked_get = wait_entered(q2._not_empty)
    getter = Worker(q2.get, name="getter")
    getter.start()
    assert blocked_get.wait(5)
    q2.cancel()
    assert isinstance(getter.finish().error, CancelledError)


def test_timeouts_raise_the_standard_timeout_error() -> None:
    q: FIFOQueue[int] = FIFOQueue(1)
    with pytest.raises(TimeoutError, match=r"stayed empty for 0 s$"):
        q.get(timeout=0)
    q.put(1, timeout=0)
    with pytest.raises(TimeoutError, match=r"stayed full for 0.01 s$"):
        q.put(2, timeout=0.01)
    with pytest.raises(ValueError, match=r"^timeout must be None or >= 0"):
        q.get(timeout=-1)


def test_a_put_wakes_a_blocked_getter() -> None:
    q: FIFOQueue[str] = FIFOQueue(1)
    blocked = wait_entered(q._not_empty)
    getter = Worker(q.get)
    getter.start()
    assert blocked.wait(5)
    q.put("x")
    assert getter.finish().result == "x"


def test_repr_shows_state() -> None:
    q: FIFOQueue[int] = FIFOQueue(2, name="host")
    q.put(1)
    assert repr(q) == "<FIFOQueue 'host' 1/2 open>"
    q.close()
    assert repr(q) == "<FIFOQueue 'host' 1/2 closed>"
    q.cancel()
    assert repr(q) == "<FIFOQueue 'host' 0/2 cancelled>"
