"""Source stage, tasks: work for the workers, one task at a time (or a bundle), in stream order.

``SequenceTasks`` hands out the indices of a Sequence's epochs in the order
``order.epoch_order`` draws, with ``on_epoch_end`` between epochs;
``GeneratorTasks`` reads a generator's items one at a time (a per-sample
dataset's are ``sample_tasks.SampleTasks``). Each ``Task``
knows where it sits in the stream, for ordering and for messages.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import CancelledError, OutOfRangeError, PipelineError, add_note
from .order import EpochOrder, ReadingOrder, Sequence, Task, epoch_order, indices

__all__ = ["GeneratorTasks", "SequenceTasks", "overrides_on_epoch_end"]


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

    def release(self) -> None:
        """Lets go of what the run made of its source, once no worker reads (``Run.stop``)."""

    def claim_several(self, most: int) -> list[Task]:
        """Up to ``most`` tasks in a row, with consecutive seq_nos: one queue item."""
        return [self.claim()]

    def done_reading(self, reads: int, batches: int) -> None:
        """Called once ``reads`` claimed tasks have finished reading, whatever their outcome.

        ``batches`` of them gave a batch or an error (the others gave None, or
        were never read because an error came before them).
        """

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
        start: int = 0,
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
        self._start = start  # where the first epoch's split begins (a resume on another world)
        self._order = self._make_order(epoch)
        self._reads_in_flight = 0
        self._boundary_waiters = 0  # workers waiting for the epoch's last read
        self._epoch_end_running = False
        # Reads this epoch that gave a batch (or an error), not None; judged only
        # for an epoch read from its start (a resumed one may rightly have none left).
        self._batches_in_epoch = 0
        self._whole_epoch = position == 0 and start == 0
        # Called after on_epoch_end(), before the next epoch's first read.
        self.epoch_ended: Callable[[], None] | None = None
        # Whether the epoch's reads must all end before the next epoch's start: only
        # for an on_epoch_end() of the source's own, which may change what they read.
        self._drains_at_boundary = overrides_on_epoch_end(sequence)

    @classmethod
    def resuming(cls, order: ReadingOrder, sequence: Any) -> SequenceTasks:
        """The tasks of a run that starts at ``order``'s next batch to deliver."""
        return cls(
            sequence,
            shuffle=order.shuffle,
            seed=order.seed,
            shard=order.shard.pair,
            drop_last=order.drop_last,
            epoch=order.epoch,
            position=order.position,
            epochs=order.epochs,
            start=order.start,
        )

    def _make_order(self, epoch: int) -> EpochOrder:
        length = len(self._sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length}) at epoch {epoch}")
        start, self._start = self._start, 0
        try:
            return epoch_order(
                length,
                epoch,
                shuffle=self._shuffle,
                seed=self._seed,
                shard=self._shard,
                drop_last=self._drop_last,
                start=start,
            )
        except PipelineError as error:
            add_note(error, f"at epoch {epoch}")  # len() may change between epochs
            raise

    def claim(self) -> Task:
        return self._claim(1)[0]

    def claim_several(self, most: int) -> list[Task]:
        """Up to ``most`` tasks in a row of one epoch; the first of an epoch may open a bundle."""
        return self._claim(most)

    def _claim(self, most: int) -> list[Task]:
        with self._cond:
            while True:
                if self._ended:
                    raise OutOfRangeError("the stream has ended")
                start = self._position
                count = min(most, len(self._order) - start)
                if count > 0:
                    seq_no, epoch, order = self._seq_no, self._epoch, self._order
                    self._seq_no += count  # one each: a bundle may go to the queue in parts
                    self._position += count
                    self._reads_in_flight += count
                    if count == 1:
                        return [Task(seq_no, epoch, start, int(order[start]))]
                    # (positional: a keyword costs as much again, on every batch)
                    return [
                        Task(seq_no + offset, epoch, start + offset, index)
                        for offset, index in enumerate(indices(order, start, start + count))
                    ]
                if not self._epoch_end_running and (
                    self._reads_in_flight == 0 or self._may_cross_early()
                ):
                    self._epoch_end_running = True
                    break
                self._boundary_waiters += 1
                try:
                    self._cond.wait()
                finally:
                    self._boundary_waiters -= 1
        # The epoch's last read has finished and nobody else may start one.
        failure: BaseException | None = None
        order = self._order
        if self._whole_epoch and self._batches_in_epoch == 0:
            # Else the next epoch would be as empty, and the next: workers would spin
            # and the consumer wait for ever.
            failure = PipelineError(
                f"epoch {self._epoch} gave no batch: the Sequence returned None for "
                f"every one of its {len(self._order)} items"
            )
        else:
            try:
                # Optional, as for any map-style dataset: called when present.
                on_epoch_end = getattr(self._sequence, "on_epoch_end", None)
                if on_epoch_end is not None:
                    on_epoch_end()
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
            self._batches_in_epoch = 0
            self._whole_epoch = True
            self._cond.notify_all()
            if self._epochs is not None and self._epoch >= self._epochs and failure is None:
                self._ended = True
                raise OutOfRangeError(f"all {self._epochs} epochs were read")
            if failure is not None:
                self._ended = True
                return [Task(self._next_seq_no(), self._epoch, 0, failure=failure, boundary=True)]
            self._order = order
        return self._claim(most)

    def _may_cross_early(self) -> bool:
        """Whether the next epoch may start while this one's last reads are still running.

        So when nothing runs between epochs that could change what a read returns
        (no ``on_epoch_end`` of the source's own, no worker processes to tell),
        and this epoch already gave a batch (so it is not the all-``None`` epoch
        that must be an error): waiting for the other workers' last reads would
        cost a thread hand-off per epoch and buy nothing. Called under the lock.
        """
        return (
            not self._drains_at_boundary and self.epoch_ended is None and self._batches_in_epoch > 0
        )

    def read(self, task: Task) -> Any:
        return self._sequence[task.index]

    def done_reading(self, reads: int, batches: int) -> None:
        with self._cond:
            self._reads_in_flight -= reads
            self._batches_in_epoch += batches
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
        snapshot: Called right after each ``next()``, under the read lock: the
            source's state just after that item, kept on its ``Task``, so the
            state handed back is that of what the consumer received, not of
            what the workers read ahead (torchdata's nodes do the same).
    """

    @classmethod
    def for_run(
        cls,
        generator: Any,
        use_multiprocessing: bool,
        *,
        used: bool,
        snapshot: Callable[[], Any] | None = None,
    ) -> GeneratorTasks:
        """The tasks of a ``GeneratorEnqueuer``'s run; ``used`` if it was started before.

        Raises:
            PipelineError: If the generator was consumed by an earlier run (a
                generator function in a process starts afresh, and may restart).
        """
        restartable = use_multiprocessing and not hasattr(generator, "__next__")
        if used and not restartable:
            raise PipelineError(
                "GeneratorEnqueuer was already started once and its generator is consumed; "
                "make a new enqueuer with a new generator"
            )
        if use_multiprocessing:  # Run.start points it at the process
            return cls(None, fetch=_not_launched)
        return cls(generator, snapshot=snapshot)

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        fetch: Callable[[int], Any] | None = None,
        snapshot: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.snapshot = snapshot
        self._read_lock = threading.Lock()
        # The iterator made here of a re-iterable source: this run's to close at its end.
        self._made: Iterator[Any] | None = None
        if fetch is None:
            assert iterable is not None
            iterator = iter(iterable)
            if iterator is not iterable:  # (a generator the user handed in stays theirs)
                self._made = iterator

            def fetch(position: int) -> Any:
                return next(iterator)

        self.fetch = fetch
        # True once the run is stopping (the run sets Coordinator.should_stop): a
        # CancelledError from fetch then is gpuqueue's own, else the generator's.
        self.stopping: Callable[[], bool] = lambda: False

    def claim(self) -> Task:
        with self._read_lock:  # one reader at a time; held while user code runs
            with self._cond:
                if self._ended:
                    raise OutOfRangeError("the generator is exhausted")
                position = self._seq_no  # taken only once an item (or an error) exists
            try:
                batch = self.fetch(position)
                state = None if self.snapshot is None else self.snapshot()
            except (StopIteration, OutOfRangeError):
                self.snapshot = None  # (it holds the source: let it go with the iterator)
                self.close()
                raise OutOfRangeError("the generator is exhausted") from None
            except CancelledError as cancelled:
                if self.stopping():  # gpuqueue's own: the pipeline is stopping
                    raise
                with self._cond:  # the generator's own: it goes in its place
                    self._ended = True
                    return Task(self._next_seq_no(), 0, position, failure=cancelled)
            except BaseException as error:
                with self._cond:
                    self._ended = True
                    return Task(self._next_seq_no(), 0, position, failure=error)
            with self._cond:
                return Task(self._next_seq_no(), 0, position, batch=batch, state=state)

    def read(self, task: Task) -> Any:
        return task.batch

    def release(self) -> None:
        """Closes the iterator this run made of its source, so the source's ``finally`` runs.

        A run stopped before the end of its source would otherwise leave that
        iterator to the garbage collector, with whatever it holds open (a
        Hugging Face ``IterableDataset``'s prefetch threads, a file). Only once
        no worker is inside ``next()``: a running generator cannot be closed.
        """
        made, self._made = self._made, None
        close = getattr(made, "close", None)
        if close is None or not self._read_lock.acquire(blocking=False):
            return
        try:
            close()
        except Exception as error:  # the source's own, at its end: said, not raised from stop()
            warnings.warn(
                f"closing the source's iterator at stop() raised {error!r}",
                RuntimeWarning,
                stacklevel=4,
            )
        finally:
            self._read_lock.release()


def _not_launched(position: int) -> Any:
    """The fetch of a generator's tasks until ``Run.start`` points it at the process."""
    raise PipelineError("the generator's worker process was not started")
