"""Where batches come from, and in what order.

``Sequence`` is Keras's dataset interface; ``epoch_order`` draws an epoch's
(seeded, sharded) order; ``SequenceTasks`` and ``GeneratorTasks`` hand the
workers one task at a time in stream order, and ``Sequencer`` puts the
workers' results on the queue in that same order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from .distributed import batches_per_rank, resolve_shard
from .errors import CancelledError, OutOfRangeError, PipelineError, add_note

__all__ = [
    "GeneratorTasks",
    "Sequence",
    "SequenceTasks",
    "Sequencer",
    "Task",
    "epoch_order",
    "resolve_shard",
]

T = TypeVar("T")


class Sequence:
    """A dataset of batches indexed ``0 .. len - 1``, as ``keras.utils.Sequence``.

    Subclasses implement ``__getitem__`` (one whole batch per index) and
    ``__len__`` (the number of batches in an epoch), and may override
    ``on_epoch_end``, which the enqueuers call once every read of an epoch
    has finished and before any read of the next.
    """

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Called between epochs; override to reshuffle or refresh state."""

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self)):
            yield self[index]


def epoch_order(
    length: int,
    epoch: int,
    *,
    shuffle: bool,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    drop_last: bool = False,
) -> np.ndarray:
    """The indices one rank reads in ``epoch``, in order.

    The epoch's order is a permutation drawn from ``(seed, epoch)`` when
    shuffled (so every rank, and every rerun, with the same seed agrees on
    it), else ``0 .. length - 1``. Rank ``r`` of ``w`` takes positions
    ``r, r + w, r + 2w, ...`` of it, as ``DistributedSampler`` does, so every
    rank reads the same number of batches (``batches_per_rank``): the order
    is first extended to ``ceil(length / w) * w`` positions by wrapping
    around (repeating it as often as needed when ``w > length``), or, with
    ``drop_last``, cut to ``(length // w) * w``. Together the ranks read
    every index once, plus the padding (the order's first batches, read
    again) or less the dropped tail.

    Raises:
        PipelineError: If ``drop_last`` leaves no batch for a rank.
    """
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(length)
    else:
        order = np.arange(length)
    rank, world_size = shard
    total = batches_per_rank(length, world_size, drop_last) * world_size
    if total > length:
        order = np.tile(order, -(-total // length))
    return order[rank:total:world_size]


@dataclass
class Task:
    """One unit of work a worker claimed: where it sits in the stream, what to read."""

    seq_no: int
    epoch: int
    position: int
    index: int | None = None  # the Sequence index; None for a generator's item
    batch: Any = None  # a generator's item, read while claiming
    failure: BaseException | None = None  # an error that belongs at this point

    def where(self) -> str:
        if self.index is None:
            return f"generator item {self.position}"
        return f"batch index {self.index} (epoch {self.epoch}, position {self.position})"


def overrides_on_epoch_end(sequence: Any) -> bool:
    """True if ``sequence`` has an ``on_epoch_end`` of its own (not the no-op base)."""
    method = getattr(type(sequence), "on_epoch_end", None)
    return method is not None and method is not Sequence.on_epoch_end


class _TaskSource:
    """Hands out tasks in stream order; subclasses decide what a task reads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq_no = 0
        self._ended = False

    def close(self) -> None:
        """Ends the stream: every later or blocked ``claim`` raises ``OutOfRangeError``."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def claim(self) -> Task:
        raise NotImplementedError

    def read(self, task: Task) -> Any:
        raise NotImplementedError

    def done_reading(self, task: Task) -> None:
        """Called once the read of ``task`` has finished, whatever its outcome."""

    def _next_seq_no(self) -> int:
        seq_no = self._seq_no
        self._seq_no += 1
        return seq_no


class SequenceTasks(_TaskSource):
    """Indices of a Sequence, epoch after epoch, with ``on_epoch_end`` between.

    ``on_epoch_end`` runs in the worker that finds the epoch exhausted once
    every read of the epoch has finished; the other workers wait for it, so no
    read of the next epoch starts before it returns.
    """

    def __init__(
        self,
        sequence: Any,
        *,
        shuffle: bool,
        seed: int,
        shard: tuple[int, int],
        drop_last: bool = False,
        epoch: int = 0,
        position: int = 0,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        self._epochs = epochs
        self._sequence = sequence
        self._shuffle = shuffle
        self._seed = seed
        self._shard = shard
        self._drop_last = drop_last
        self._epoch = epoch
        self._position = position
        self._order = self._make_order(epoch)
        self._reads_in_flight = 0
        self._boundary_waiters = 0  # workers waiting for the epoch's last read
        self._epoch_end_running = False
        # Called after on_epoch_end(), before the next epoch's first read.
        self.epoch_ended: Callable[[], None] | None = None

    def _make_order(self, epoch: int) -> np.ndarray:
        length = len(self._sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length}) at epoch {epoch}")
        try:
            return epoch_order(
                length,
                epoch,
                shuffle=self._shuffle,
                seed=self._seed,
                shard=self._shard,
                drop_last=self._drop_last,
            )
        except PipelineError as error:
            add_note(error, f"at epoch {epoch}")  # len() may change between epochs
            raise

    def claim(self) -> Task:
        with self._cond:
            while True:
                if self._ended:
                    raise OutOfRangeError("the stream has ended")
                if self._position < len(self._order):
                    task = Task(
                        self._next_seq_no(),
                        self._epoch,
                        self._position,
                        index=int(self._order[self._position]),
                    )
                    self._position += 1
                    self._reads_in_flight += 1
                    return task
                if self._reads_in_flight == 0 and not self._epoch_end_running:
                    self._epoch_end_running = True
                    break
                self._boundary_waiters += 1
                try:
                    self._cond.wait()
                finally:
                    self._boundary_waiters -= 1
        # The epoch's last read has finished and nobody else may start one.
        failure = None
        try:
            self._sequence.on_epoch_end()
            last = self._epochs is not None and self._epoch + 1 >= self._epochs
            order = self._order if last else self._make_order(self._epoch + 1)
            if self.epoch_ended is not None:
                self.epoch_ended()
        except BaseException as error:
            add_note(error, f"raised by on_epoch_end() after epoch {self._epoch}")
            failure = error
        with self._cond:
            self._epoch_end_running = False
            self._epoch += 1
            self._position = 0
            self._cond.notify_all()
            if self._epochs is not None and self._epoch >= self._epochs and failure is None:
                self._ended = True
                raise OutOfRangeError(f"all {self._epochs} epochs were read")
            if failure is not None:
                self._ended = True
                return Task(self._next_seq_no(), self._epoch, 0, failure=failure)
            self._order = order
        return self.claim()

    def read(self, task: Task) -> Any:
        return self._sequence[task.index]

    def done_reading(self, task: Task) -> None:
        with self._cond:
            self._reads_in_flight -= 1
            if self._reads_in_flight == 0 and self._boundary_waiters:
                self._cond.notify_all()


class GeneratorTasks(_TaskSource):
    """Items of an iterator, read one at a time.

    The iterator need not be thread-safe: a read lock lets one worker call
    it at a time. The state lock is never held while user code runs, so
    ``close()`` (from ``stop()``) never waits for a generator stuck in
    ``next()``. Once the iterator raised, or ended, it is never called again,
    even if it would yield more.

    Args:
        iterable: What to read; ``None`` when ``fetch`` is set later.
        fetch: Replaces ``next(iterator)``: called with the item's position,
            it returns the item, or raises ``StopIteration`` or
            ``OutOfRangeError`` at the end (a worker process reading the
            generator uses this).
    """

    def __init__(
        self, iterable: Iterable[Any] | None, fetch: Callable[[int], Any] | None = None
    ) -> None:
        super().__init__()
        self._read_lock = threading.Lock()
        if fetch is None:
            assert iterable is not None
            iterator = iter(iterable)

            def fetch(position: int) -> Any:
                return next(iterator)

        self.fetch = fetch

    def claim(self) -> Task:
        with self._read_lock:  # one reader at a time; held while user code runs
            with self._cond:
                if self._ended:
                    raise OutOfRangeError("the generator is exhausted")
                position = self._seq_no  # taken only once an item (or an error) exists
            try:
                batch = self.fetch(position)
            except (StopIteration, OutOfRangeError):
                self.close()
                raise OutOfRangeError("the generator is exhausted") from None
            except CancelledError:
                raise
            except BaseException as error:
                with self._cond:
                    self._ended = True
                    return Task(self._next_seq_no(), 0, position, failure=error)
            with self._cond:
                return Task(self._next_seq_no(), 0, position, batch=batch)

    def read(self, task: Task) -> Any:
        return task.batch


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
        self._pending: dict[int, T] = {}  # submitted out of turn
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

    def submit(self, seq_no: int, item: T) -> None:
        """Hands in a reserved item: commits it, and those after it, if its turn has come.

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
                    self._pending[seq_no] = item
                    return
                self._committing = True
        if closed:
            self._discard(item)
            raise CancelledError("the pipeline is stopping")
        self._drain(item)

    def _drain(self, item: T) -> None:
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
                self._next += 1
                self._out -= 1
                if self._room_waiters:
                    self._room.notify()
                following = None if self._closed else self._pending.pop(self._next, None)
                if following is None:
                    # Under the lock that submit() takes: an item handed in after
                    # this sees _committing False and commits itself.
                    self._committing = False
                    return
            item = following

    def close(self) -> None:
        """Discards what is left uncommitted; wakes every waiter (they raise ``CancelledError``)."""
        with self._lock:
            self._closed = True
            dropped, self._pending = list(self._pending.values()), {}
            self._room.notify_all()
        for item in dropped:
            self._discard(item)
