"""Host stage, ordering: the workers' items go on the host queue in stream order.

A worker that finishes an item out of turn leaves it with the ``Sequencer``
and goes on reading; whichever worker completes the turn commits its own
item and every consecutive one left there. No worker waits for another's
turn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import CancelledError

__all__ = ["Sequencer"]

T = TypeVar("T")


class Sequencer(Generic[T]):
    """Puts the workers' items on the queue in ``seq_no`` order, and bounds how many are out.

    A worker that finishes an item out of turn leaves it here and goes on
    reading; whichever worker completes the turn commits its own item and
    every consecutive one left here. No worker waits for another's turn, so
    a batch costs no hand-off between workers unless one waits for room.

    Args:
        commit: Puts one item on the queue, in order (it may block).
        discard: Gives back what an item that will never be committed holds.
        limit: The most items claimed and not yet committed: with the queue,
            this bounds the staging slots that items hold.
    """

    def __init__(
        self, commit: Callable[[T], None], discard: Callable[[T], None], limit: int
    ) -> None:
        self._commit, self._discard, self._limit = commit, discard, limit
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        self._next = 0  # the seq_no to commit next
        self._out = 0  # reserved and not yet committed
        self._pending: dict[int, tuple[T, int]] = {}  # submitted out of turn, with their spans
        self._committing = False  # a thread is in _drain
        self._closed = False

    def reserve(self) -> None:
        """Blocks until fewer than ``limit`` items are out, then counts one more.

        Raises:
            CancelledError: If the sequencer was closed (before or while waiting).
        """
        with self._lock:
            while self._out >= self._limit and not self._closed:
                self._room_waiters += 1
                try:
                    self._room.wait()
                finally:
                    self._room_waiters -= 1
            if self._closed:
                raise CancelledError("the pipeline is stopping")
            self._out += 1

    def unreserve(self) -> None:
        """Takes back a ``reserve()`` that will submit nothing."""
        with self._lock:
            self._out -= 1
            if self._room_waiters:
                self._room.notify()

    def submit(self, seq_no: int, item: T, span: int = 1) -> None:
        """Hands in a reserved item: commits it, and those after it, if its turn has come.

        ``span`` is how many seq_nos the item covers (a bundle's tasks, from
        ``seq_no`` on); the next item's turn comes after them.

        Raises:
            CancelledError: If the sequencer was closed (the item is discarded).
            Whatever ``commit`` raised (that item is discarded).
        """
        with self._lock:
            closed = self._closed
            if not closed:
                # Whoever is committing, or the turn's own worker, will take it. (The
                # next item is never left here with nobody committing: see _drain.)
                if self._committing or seq_no != self._next:
                    self._pending[seq_no] = (item, span)
                    return
                self._committing = True
        if closed:
            self._discard(item)
            raise CancelledError("the pipeline is stopping")
        self._drain(item, span)

    def take_turn(self, seq_no: int, room: Callable[[], bool]) -> bool:
        """Takes the turn to commit ``seq_no`` out of band, if it is next, nobody is
        committing, and ``room()`` says the commit will not block.

        For part of a reserved item that goes early (a bundle's finished
        prefix); ``end_turn`` gives the turn back. The caller guarantees that
        no item can be submitted at the seq_nos it commits, nor at the one
        right after (they are its own).
        """
        with self._lock:
            if self._closed or self._committing or seq_no != self._next or not room():
                return False
            self._committing = True
            return True

    @property
    def next_seq_no(self) -> int:
        """The seq_no to commit next (read without the lock: a hint, checked again later)."""
        return self._next

    def end_turn(self, span: int) -> None:
        """Ends a ``take_turn``: ``span`` seq_nos were committed; the reservation stays."""
        with self._lock:
            self._next += span
            self._committing = False

    def _drain(self, item: T, span: int) -> None:
        """Commits ``item`` (the next), then each next one already here; one thread at a time."""
        while True:
            try:
                self._commit(item)
            except BaseException:
                with self._lock:
                    self._committing = False
                self._discard(item)
                raise
            with self._lock:
                self._next += span
                self._out -= 1
                if self._room_waiters:
                    self._room.notify()
                following = None if self._closed else self._pending.pop(self._next, None)
                if following is None:
                    # Under the lock that submit() takes: an item handed in after
                    # this sees _committing False and commits itself.
                    self._committing = False
                    return
            item, span = following

    def close(self) -> None:
        """Discards what is left uncommitted; wakes every waiter (they raise ``CancelledError``)."""
        with self._lock:
            self._closed = True
            dropped = [item for item, _ in self._pending.values()]
            self._pending = {}
            self._room.notify_all()
        for item in dropped:
            self._discard(item)
