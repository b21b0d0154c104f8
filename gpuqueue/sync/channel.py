"""Sync, the queue: ``FIFOQueue``, closable and bounded, used between every two stages.

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

It also answers to ``tf.queue.FIFOQueue``'s constructor and eager-mode
methods (``enqueue``, ``enqueue_many``, ``dequeue``, ``dequeue_many``,
``dequeue_up_to``, ``size``, ``close(cancel_pending_enqueues)``,
``is_closed``), so code written for TensorFlow's queue runs; with
``dtypes`` given, elements are tuples of NumPy arrays checked against them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Generic, TypeVar

import numpy as np

from ..errors import CancelledError, OutOfRangeError, QueueClosedError
from .elements import ElementSpec

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

    ``FIFOQueue(capacity, dtypes, shapes=None, names=None, shared_name=None,
    name=None)`` as ``tf.queue.FIFOQueue`` takes it; only ``capacity`` is
    required here.

    Args:
        capacity: The most items the queue holds; ``put`` blocks beyond it.
        dtypes: For ``enqueue``/``dequeue``: the dtype of each component of
            an element (anything ``np.dtype`` takes, or a TensorFlow
            ``DType``); a single dtype means one component. None: elements
            are any Python objects, unchecked.
        shapes: The shape of each component (``None`` for an unknown
            dimension), checked at ``enqueue``; needs ``dtypes``.
        names: A name for each component: ``enqueue`` then takes a dict and
            ``dequeue`` returns one; needs ``dtypes``.
        shared_name: Accepted for TensorFlow's signature; there are no
            sessions to share a queue across, so it is ignored.
        name: A name for messages and thread names.

    Raises:
        ValueError: If ``capacity`` is not a positive integer, or
            ``shapes``/``names`` do not match ``dtypes``.
        TypeError: If a dtype is not one NumPy knows.
    """

    def __init__(
        self,
        capacity: int,
        dtypes: Any = None,
        shapes: Any = None,
        names: Any = None,
        shared_name: str | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self._spec = ElementSpec.of(dtypes, shapes, names)
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
        # dequeue_many/dequeue_up_to wait here, for several items at once.
        self._enough = threading.Condition(self._lock)
        self._many_getters = 0

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
            if self._many_getters:
                self._enough.notify_all()

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

    def close(self, cancel_pending_enqueues: bool = False, name: str | None = None) -> None:
        """Refuses new items; getters drain what is queued, then see the end.

        Idempotent. Wakes every blocked caller. A blocked ``put`` fails at
        once with ``QueueClosedError`` whatever ``cancel_pending_enqueues``
        says (TensorFlow lets it finish unless that is true): a closed queue
        takes nothing more. ``name`` is accepted for TensorFlow's signature.
        """
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
            self._enough.notify_all()

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
            self._enough.notify_all()
        return dropped

    def _take(self, count: int, up_to: bool) -> list[T]:
        """Removes ``count`` items at once, or (``up_to``) what is left of them once closed."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"n must be a positive int, got {count!r}")
        if count > self._capacity:
            raise ValueError(f"n={count} is more than the queue's capacity {self._capacity}")
        with self._lock:
            while True:
                if self._cancelled:
                    raise CancelledError(f"queue {self._name!r} was cancelled")
                if len(self._items) >= count or (up_to and self._closed and self._items):
                    break
                if self._closed:
                    raise OutOfRangeError(
                        f"queue {self._name!r} is closed and holds {len(self._items)} of the "
                        f"{count} items asked for"
                    )
                self._many_getters += 1
                try:
                    self._enough.wait()
                finally:
                    self._many_getters -= 1
            taken = [self._items.popleft() for _ in range(min(count, len(self._items)))]
            if self._putters:
                self._not_full.notify_all()
            return taken

    # TensorFlow's names, as tf.queue.FIFOQueue behaves in eager mode.

    @property
    def dtypes(self) -> list[np.dtype[Any]] | None:
        """The components' dtypes, or None for unchecked elements."""
        return None if self._spec is None else list(self._spec.dtypes)

    @property
    def shapes(self) -> list[tuple[int | None, ...] | None] | None:
        """The components' shapes (None where not given), or None without ``dtypes``."""
        return None if self._spec is None else list(self._spec.shapes)

    @property
    def names(self) -> list[str] | None:
        """The components' names, or None."""
        return None if self._spec is None or self._spec.names is None else list(self._spec.names)

    def enqueue(self, vals: Any, name: str | None = None) -> None:
        """Puts one element; with ``dtypes``, its components are checked and made arrays.

        Raises:
            ValueError: If the element has the wrong number of components
                (or names), or a component the wrong shape.
            TypeError: If a component's dtype cannot be cast to the queue's.
            QueueClosedError, CancelledError: As ``put``.
        """
        self.put(vals if self._spec is None else self._spec.element(vals))  # type: ignore[arg-type]

    def enqueue_many(self, vals: Any, name: str | None = None) -> None:
        """Puts several elements: each component is split along its first dimension.

        Without ``dtypes``, ``vals`` is an iterable of elements. Elements go
        in one at a time, each waiting for room as ``put`` does.
        """
        if self._spec is None:
            for item in vals:
                self.put(item)
            return
        for element in self._spec.split(vals):
            self.put(element)  # type: ignore[arg-type]

    def dequeue(self, name: str | None = None) -> Any:
        """Takes one element: one array, a list of them, or a dict with ``names``.

        Raises:
            OutOfRangeError: If the queue is closed and empty.
            CancelledError: If the queue is cancelled.
        """
        item: Any = self.get()
        return item if self._spec is None else self._spec.output(item)

    def dequeue_many(self, n: int, name: str | None = None) -> Any:
        """Takes ``n`` elements at once, stacked per component (a list without ``dtypes``).

        Raises:
            OutOfRangeError: If the queue is closed with fewer than ``n`` left
                (it then takes none).
            ValueError: If ``n`` is not positive or exceeds the capacity.
        """
        return self._many(self._take(n, up_to=False))

    def dequeue_up_to(self, n: int, name: str | None = None) -> Any:
        """As ``dequeue_many``, but once the queue is closed, takes what is left (at least one).

        Raises:
            OutOfRangeError: If the queue is closed and empty.
        """
        return self._many(self._take(n, up_to=True))

    def _many(self, items: list[T]) -> Any:
        if self._spec is None:
            return items
        stacked = tuple(np.stack(parts) for parts in zip(*items, strict=True))
        return self._spec.output(stacked)

    def size(self, name: str | None = None) -> int:
        """The number of elements queued now (``qsize()``)."""
        return self.qsize()

    def is_closed(self, name: str | None = None) -> bool:
        """True once the queue was closed or cancelled."""
        return self.closed

    def __repr__(self) -> str:
        state = "cancelled" if self._cancelled else "closed" if self._closed else "open"
        return f"<FIFOQueue {self._name!r} {len(self._items)}/{self._capacity} {state}>"
