"""The closable bounded queue used at every stage of gpuqueue.

``FIFOQueue`` is named after the TensorFlow queue that ``QueueRunner`` fed. It
never polls: one lock with two conditions (as CPython's ``queue.Queue``), and
``close()`` / ``cancel()`` wake every blocked caller at once, the way
``queue.Queue.shutdown`` does in Python 3.13.

- ``close()``: ``put`` raises ``QueueClosedError`` at once; getters drain what
  is queued, then ``get`` raises ``OutOfRangeError``.
- ``cancel()``: what is queued is dropped (and returned to the caller, so it
  can recycle buffers), and every blocked ``put`` and ``get`` raises
  ``CancelledError``.
- A timeout, which exists only at the user's edge, raises ``TimeoutError``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

from .errors import CancelledError, OutOfRangeError, QueueClosedError

__all__ = ["FIFOQueue"]

T = TypeVar("T")


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None  # the common case: no clock read
    if timeout < 0:
        raise ValueError(f"timeout must be None or >= 0, got {timeout!r}")
    return time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class FIFOQueue(Generic[T]):
    """A bounded first-in first-out queue that can be closed or cancelled.

    Args:
        capacity: The most items the queue holds; ``put`` blocks beyond it.
        name: A name for messages and thread names.

    Raises:
        ValueError: If ``capacity`` is not a positive integer.
    """

    def __init__(self, capacity: int, name: str | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self._capacity = capacity
        self._name = name if name is not None else f"fifo_queue_{id(self):x}"
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._cancelled = False
        # Threads blocked in put/get: notify only when someone waits, since
        # Condition.notify costs microseconds even with no waiter.
        self._putters = 0
        self._getters = 0

    @property
    def name(self) -> str:
        """The queue's name."""
        return self._name

    @property
    def capacity(self) -> int:
        """The most items the queue holds."""
        return self._capacity

    @property
    def closed(self) -> bool:
        """True once ``close()`` or ``cancel()`` has been called."""
        with self._lock:
            return self._closed

    @property
    def cancelled(self) -> bool:
        """True once ``cancel()`` has been called."""
        with self._lock:
            return self._cancelled

    def qsize(self) -> int:
        """The number of items queued now."""
        with self._lock:
            return len(self._items)

    def put(self, item: T, timeout: float | None = None) -> None:
        """Appends ``item``, blocking while the queue is full.

        Raises:
            QueueClosedError: If the queue is closed (before or while waiting).
            CancelledError: If the queue is cancelled (before or while waiting).
            TimeoutError: If ``timeout`` seconds pass with the queue still full.
        """
        deadline = _deadline(timeout)
        with self._lock:
            while True:
                if self._cancelled:
                    raise CancelledError(f"queue {self._name!r} was cancelled")
                if self._closed:
                    raise QueueClosedError(f"queue {self._name!r} is closed")
                if len(self._items) < self._capacity:
                    break
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"queue {self._name!r} stayed full for {timeout} s")
                self._putters += 1
                try:
                    self._not_full.wait(remaining)
                finally:
                    self._putters -= 1
            self._items.append(item)
            if self._getters:
                self._not_empty.notify()

    def get(self, timeout: float | None = None) -> T:
        """Removes and returns the oldest item, blocking while the queue is empty.

        Raises:
            OutOfRangeError: If the queue is closed and everything queued was taken.
            CancelledError: If the queue is cancelled (before or while waiting).
            TimeoutError: If ``timeout`` seconds pass with the queue still empty.
        """
        deadline = _deadline(timeout)
        with self._lock:
            while True:
                if self._cancelled:
                    raise CancelledError(f"queue {self._name!r} was cancelled")
                if self._items:
                    break
                if self._closed:
                    raise OutOfRangeError(f"queue {self._name!r} is closed and empty")
                remaining = _remaining(deadline)
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"queue {self._name!r} stayed empty for {timeout} s")
                self._getters += 1
                try:
                    self._not_empty.wait(remaining)
                finally:
                    self._getters -= 1
            item = self._items.popleft()
            if self._putters:
                self._not_full.notify()
            return item

    def close(self) -> None:
        """Refuses new items; getters drain what is queued, then see the end.

        Idempotent. Wakes every blocked caller.
        """
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def cancel(self) -> list[T]:
        """Closes the queue, drops what it holds and wakes every blocked caller.

        Returns:
            The items that were dropped, oldest first, so the caller can
            recycle the buffers they refer to. Later calls return ``[]``.
        """
        with self._lock:
            self._closed = True
            self._cancelled = True
            dropped = list(self._items)
            self._items.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()
        return dropped

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "closed" if self._closed else "open"
        return f"<FIFOQueue {self._name!r} {len(self._items)}/{self._capacity} {state}>"
