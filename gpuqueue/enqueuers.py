"""Keras-compatible enqueuers: ``OrderedEnqueuer`` and ``GeneratorEnqueuer``.

The host stage is a ``QueueRunner`` whose enqueue ops are the workers, under
one ``Coordinator``. Each worker call:

1. claims the next task (an index of the epoch's order, or the next item of a
   generator, read under a lock);
2. reads and describes the batch (in parallel with the other workers, in a
   thread or in the worker's own process);
3. waits for its turn, checks the batch against the first, and puts it on the
   bounded host queue, so the queue holds batches in exactly the read order.

An error while reading travels down the queue in its place, so the consumer
gets every batch before it, then the original exception. Epochs follow one
another without draining the queue: ``on_epoch_end()`` runs as soon as the
epoch's last read has finished, and the next epoch's reads start right after.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from .channel import FIFOQueue
from .coordinator import Coordinator
from .errors import (
    CancelledError,
    OutOfRangeError,
    PipelineError,
)
from .runner import QueueRunner
from .sources import Sequence, epoch_order, resolve_shard
from .staging import BatchSpec, LeafMeta, TreeDef, describe, layout, rebuild

__all__ = ["GeneratorEnqueuer", "OrderedEnqueuer", "SequenceEnqueuer"]

logger = logging.getLogger(__name__)

# How long stop() waits for threads by default before naming the stragglers.
DEFAULT_STOP_TIMEOUT = 60.0


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, also on Python 3.10."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


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


@dataclass
class Item:
    """What travels on the host queue: a batch, or the error in its place."""

    task: Task
    batch: Any = None
    error: BaseException | None = None
    release: Callable[[], None] | None = None  # returns a staging slot to its pool


@dataclass
class Described:
    """A batch read by a worker, split into structure and leaves."""

    treedef: TreeDef
    metas: list[LeafMeta]
    batch: Any
    release: Callable[[], None] | None = None


def _overrides_on_epoch_end(sequence: Any) -> bool:
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
        epoch: int = 0,
        position: int = 0,
    ) -> None:
        super().__init__()
        self._sequence = sequence
        self._shuffle = shuffle
        self._seed = seed
        self._shard = shard
        self._epoch = epoch
        self._position = position
        self._order = self._make_order(epoch)
        self._reads_in_flight = 0
        self._epoch_end_running = False
        # Called after on_epoch_end(), before the next epoch's first read.
        self.epoch_ended: Callable[[], None] | None = None

    def _make_order(self, epoch: int) -> np.ndarray:
        length = len(self._sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length}) at epoch {epoch}")
        order = epoch_order(
            length, epoch, shuffle=self._shuffle, seed=self._seed, shard=self._shard
        )
        if len(order) == 0:
            raise PipelineError(
                f"shard {self._shard} gets no batch of a Sequence of length {length} "
                f"at epoch {epoch}"
            )
        return order

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
                self._cond.wait()
        # The epoch's last read has finished and nobody else may start one.
        failure = None
        try:
            self._sequence.on_epoch_end()
            order = self._make_order(self._epoch + 1)
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
            if self._reads_in_flight == 0:
                self._cond.notify_all()

    def fail(self) -> None:
        """Stops handing out tasks after a read failed."""
        self.close()


class GeneratorTasks(_TaskSource):
    """Items of an iterator, read one at a time under the lock.

    The iterator need not be thread-safe. Once it raised, or ended, it is
    never called again, even if it would yield more.
    """

    def __init__(self, iterable: Iterable[Any]) -> None:
        super().__init__()
        self._iterator = iter(iterable)

    def claim(self) -> Task:
        with self._cond:
            if self._ended:
                raise OutOfRangeError("the generator is exhausted")
            seq_no = self._seq_no
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._ended = True
                raise OutOfRangeError("the generator is exhausted") from None
            except BaseException as error:
                self._ended = True
                return Task(self._next_seq_no(), 0, seq_no, failure=error)
            return Task(self._next_seq_no(), 0, seq_no, batch=batch)

    def read(self, task: Task) -> Any:
        return task.batch

    def fail(self) -> None:
        self.close()


class Sequencer:
    """Lets workers put their items on the queue in ``seq_no`` order."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._closed = False

    def wait_turn(self, seq_no: int) -> None:
        """Blocks until every item before ``seq_no`` is on the queue.

        Raises:
            CancelledError: If the sequencer was closed meanwhile.
        """
        with self._cond:
            while self._next != seq_no and not self._closed:
                self._cond.wait()
            if self._closed:
                raise CancelledError("the pipeline is stopping")

    def advance(self) -> None:
        with self._cond:
            self._next += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class _Stats:
    produced: int = 0
    consumed: int = 0
    consumer_wait_s: float = 0.0
    producer_blocked_s: float = 0.0
    occupancy_sum: int = 0


class SequenceEnqueuer:
    """Base class of the enqueuers, as ``keras.utils.SequenceEnqueuer``.

    Use::

        enqueuer = OrderedEnqueuer(sequence, shuffle=True, seed=0)
        enqueuer.start(workers=4, max_queue_size=10)
        batches = enqueuer.get()
        for step in range(steps):
            x, y = next(batches)
        enqueuer.stop()

    or as a context manager, which starts it (with ``workers=1`` unless
    ``start`` was called) and always stops it.

    Args:
        sequence: A ``Sequence`` (or anything with ``__getitem__`` and
            ``__len__``) or, for ``GeneratorEnqueuer``, an iterable.
        use_multiprocessing: Read batches in worker processes instead of
            threads; batches come back through shared memory.
    """

    _name = "SequenceEnqueuer"

    def __init__(self, sequence: Any, use_multiprocessing: bool = False) -> None:
        self.sequence = sequence
        self.use_multiprocessing = bool(use_multiprocessing)
        self.workers = 0
        self.max_queue_size = 0
        self._lock = threading.Lock()
        self._coord: Coordinator | None = None
        self._queue: FIFOQueue[Item] | None = None
        self._tasks: SequenceTasks | GeneratorTasks | None = None
        self._threads: list[threading.Thread] = []
        self._spec: BatchSpec | None = None
        self._error: BaseException | None = None
        self._error_traceback: TracebackType | None = None
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._process_pool: Any = None

    # -- life cycle ---------------------------------------------------------

    def is_running(self) -> bool:
        """True between ``start()`` and the end of the stream or ``stop()``."""
        coord = self._coord
        return coord is not None and not coord.should_stop()

    def start(self, workers: int = 1, max_queue_size: int = 10) -> None:
        """Starts the workers.

        Args:
            workers: Number of worker threads (or processes).
            max_queue_size: The most finished batches waiting for the consumer.

        Raises:
            ValueError: If ``workers`` or ``max_queue_size`` is not a positive int.
            PipelineError: If the enqueuer is already running.
        """
        for name, value in (("workers", workers), ("max_queue_size", max_queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        with self._lock:
            if self.is_running():
                raise PipelineError(f"{self._name} is already running; call stop() first")
            self.workers = workers
            self.max_queue_size = max_queue_size
            self._error = None
            self._spec = None
            self._process_pool = None
            self._stats = _Stats()
            tasks = self._make_tasks()
            coord = Coordinator()
            queue: FIFOQueue[Item] = FIFOQueue(max_queue_size, name=f"{self._name}-host")
            sequencer = Sequencer()
            read = self._make_reader(tasks, workers, coord)
            ops = [self._make_worker_op(i, tasks, read, sequencer, queue) for i in range(workers)]
            runner = QueueRunner(queue, ops)
            coord.add_stop_callback(tasks.close)
            coord.add_stop_callback(sequencer.close)
            coord.add_stop_callback(self._drop_queued(queue))
            self._coord, self._queue, self._tasks = coord, queue, tasks
            self._threads = runner.create_threads(coord, daemon=True, start=True)

    def _make_tasks(self) -> SequenceTasks | GeneratorTasks:
        raise NotImplementedError

    def _make_reader(
        self, tasks: SequenceTasks | GeneratorTasks, workers: int, coord: Coordinator
    ) -> Callable[[Task], Described]:
        """Returns the function a worker calls to read and describe one task."""
        if self.use_multiprocessing:
            from .workers import ProcessPool

            pool = ProcessPool(
                self.sequence,
                workers,
                coord,
                name=self._name,
                slots=workers + self.max_queue_size + 1,
            )
            self._process_pool = pool
            if isinstance(tasks, SequenceTasks) and _overrides_on_epoch_end(self.sequence):
                tasks.epoch_ended = pool.sequence_changed

            def read_in_process(task: Task) -> Described:
                assert task.index is not None
                batch, release = pool.read(task.index, task.where())
                if batch is None:
                    return Described(TreeDef("leaf"), [], None)
                treedef, leaves = describe(batch)
                metas, _ = layout(leaves)
                return Described(treedef, metas, batch, release)

            return read_in_process

        def read_in_thread(task: Task) -> Described:
            batch = tasks.read(task)
            if batch is None:
                return Described(TreeDef("leaf"), [], None)
            treedef, leaves = describe(batch)
            metas, _ = layout(leaves)
            return Described(treedef, metas, batch)

        return read_in_thread

    def _make_worker_op(
        self,
        number: int,
        tasks: SequenceTasks | GeneratorTasks,
        read: Callable[[Task], Described],
        sequencer: Sequencer,
        queue: FIFOQueue[Item],
    ) -> Callable[[], None]:
        def enqueue_one() -> None:
            task = tasks.claim()  # OutOfRangeError here ends this worker cleanly
            item = Item(task)
            described = None
            try:
                if task.failure is not None:
                    raise task.failure
                try:
                    described = read(task)
                finally:
                    tasks.done_reading(task)
            except Exception as error:
                tasks.fail()
                add_note(
                    error, f"raised in {threading.current_thread().name} reading {task.where()}"
                )
                item.error = error
            started = time.monotonic()
            sequencer.wait_turn(task.seq_no)
            try:
                if described is not None:
                    item.batch, item.release = described.batch, described.release
                    if described.batch is not None:
                        self._check(described, task)
            except Exception as error:
                tasks.fail()
                item.error = error
            try:
                queue.put(item)
            except BaseException:
                if item.release is not None:
                    item.release()
                raise
            sequencer.advance()
            with self._stats_lock:
                self._stats.produced += 1
                self._stats.producer_blocked_s += time.monotonic() - started

        enqueue_one.__name__ = f"worker{number}"
        return enqueue_one

    def _check(self, described: Described, task: Task) -> None:
        """Checks a batch against the first; runs in stream order."""
        if self._spec is None:
            self._spec = BatchSpec.of(described.treedef, described.metas)
        else:
            self._spec.check(described.treedef, described.metas, task.where())

    @staticmethod
    def _drop_queued(queue: FIFOQueue[Item]) -> Callable[[], None]:
        def cancel_and_release() -> None:
            for item in queue.cancel():
                if item.release is not None:
                    item.release()

        return cancel_and_release

    def stop(self, timeout: float | None = None) -> None:
        """Stops every worker and waits for them to end.

        Returns within ``timeout`` seconds (default 60) even while workers are
        blocked on a full queue; a worker still inside user code then is
        named in a ``RuntimeWarning``. Safe to call twice, from any thread,
        or before ``start()``.
        """
        coord = self._coord
        if coord is None:
            return
        coord.request_stop()
        grace = DEFAULT_STOP_TIMEOUT if timeout is None else timeout
        try:
            coord.join(self._threads, stop_grace_period_secs=grace, ignore_live_threads=True)
        except Exception as error:
            logger.debug("stop(): the pipeline had failed with %r", error)
        if self._process_pool is not None:
            self._process_pool.close(grace)
        stragglers = [t.name for t in self._threads if t.is_alive()]
        if stragglers:
            warnings.warn(
                f"{self._name}.stop(): threads still running after {grace} s, "
                f"most likely inside the Sequence or generator: {', '.join(stragglers)}",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> SequenceEnqueuer:
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- consuming ----------------------------------------------------------

    def get(self) -> Iterator[Any]:
        """Returns a generator of batches, in order.

        For a Sequence the stream is endless, epoch after epoch; for a
        generator it ends once everything the generator produced has been
        yielded. Items that are ``None`` are skipped. If a worker failed, the
        batches before the failure are yielded, then the worker's exception
        is raised (its own type and traceback, with a note naming the worker
        and the batch index), the enqueuer stops, and every later ``get()``
        raises it again. If another thread calls ``stop()``, the generator
        ends.

        Raises:
            PipelineError: If ``start()`` was not called.
        """
        if self._coord is None or self._queue is None:
            raise PipelineError(f"{self._name}.get() called before start()")
        return self._batches(self._coord, self._queue)

    def _batches(self, coord: Coordinator, queue: FIFOQueue[Item]) -> Iterator[Any]:
        while True:
            if self._error is not None:
                raise self._error.with_traceback(self._error_traceback)
            started = time.monotonic()
            try:
                item = queue.get()
            except OutOfRangeError:  # a finite generator ended
                self.stop()
                return
            except CancelledError:  # stop() from another thread, or an internal failure
                if coord.exception is not None:
                    self._fail(coord.exception)
                    continue
                return
            with self._stats_lock:
                self._stats.consumer_wait_s += time.monotonic() - started
                self._stats.occupancy_sum += queue.qsize()
            if item.error is not None:
                self._fail(item.error)
                coord.request_stop(item.error)
                self.stop()
                continue
            self._received(item.task)
            batch = self._deliver(item)
            if batch is None:
                continue
            with self._stats_lock:
                self._stats.consumed += 1
            yield batch

    def _fail(self, error: BaseException) -> None:
        """Makes ``error`` sticky: every later ``get()`` raises it, traceback intact."""
        self._error, self._error_traceback = error, error.__traceback__

    def _deliver(self, item: Item) -> Any:
        """Turns a queued item into what the consumer receives.

        A batch in a shared-memory slot is copied out (one memcpy per array,
        no pickling) and the slot goes back to the pool at once.
        """
        if item.release is None:
            return item.batch
        treedef, leaves = describe(item.batch)
        batch = rebuild(treedef, [array.copy() for _, array in leaves])
        item.batch = None
        item.release()
        return batch

    def _received(self, task: Task) -> None:
        """Records that the consumer received ``task`` (for ``state_dict``)."""

    def stats(self) -> dict[str, Any]:
        """Counters of the current (or last) run.

        Returns:
            ``batches_produced``, ``batches_consumed``, ``consumer_wait_s``
            (time ``get()`` waited for a batch), ``producer_blocked_s`` (time
            workers waited for their turn or for room in the queue),
            ``queue_size`` (now), ``queue_capacity`` and
            ``mean_queue_occupancy`` (queued batches seen at each ``get``).
        """
        queue = self._queue
        with self._stats_lock:
            s = self._stats
            gets = s.consumed + (s.produced - s.consumed > 0)
            return {
                "batches_produced": s.produced,
                "batches_consumed": s.consumed,
                "consumer_wait_s": s.consumer_wait_s,
                "producer_blocked_s": s.producer_blocked_s,
                "queue_size": queue.qsize() if queue is not None else 0,
                "queue_capacity": self.max_queue_size,
                "mean_queue_occupancy": s.occupancy_sum / gets if gets else 0.0,
            }


class OrderedEnqueuer(SequenceEnqueuer):
    """Reads a Sequence with several workers and yields batches in order.

    As ``keras.utils.OrderedEnqueuer``, plus seeded shuffling, sharding and
    resumption.

    Args:
        sequence: A ``Sequence``.
        use_multiprocessing: Read in worker processes instead of threads.
        shuffle: Read each epoch in a permutation drawn from ``(seed, epoch)``.
        seed: The shuffling seed; two runs with the same seed read the same
            order. Without one, a random seed is drawn (and kept in
            ``state_dict()``).
        shard: ``(rank, world_size)`` to read only this rank's disjoint part
            of every epoch; ``"auto"`` (the default) reads the launcher's
            ``RANK``/``WORLD_SIZE`` or ``OMPI_COMM_WORLD_RANK``/``..._SIZE``
            when set; ``None`` reads everything.

    Raises:
        ValueError: If ``shard`` is malformed, or several ranks shuffle
            without a shared ``seed``.
        PipelineError: If the Sequence is empty.
    """

    _name = "OrderedEnqueuer"

    def __init__(
        self,
        sequence: Any,
        use_multiprocessing: bool = False,
        shuffle: bool = False,
        *,
        seed: int | None = None,
        shard: tuple[int, int] | str | None = "auto",
    ) -> None:
        if not (hasattr(sequence, "__getitem__") and hasattr(sequence, "__len__")):
            raise TypeError(
                f"OrderedEnqueuer needs a Sequence (with __getitem__ and __len__), "
                f"got {type(sequence).__name__}"
            )
        super().__init__(sequence, use_multiprocessing)
        self.shuffle = bool(shuffle)
        self.shard = resolve_shard(shard)
        if self.shuffle and seed is None and self.shard[1] > 1:
            raise ValueError(
                f"shuffling across {self.shard[1]} ranks needs a seed that every rank shares"
            )
        self.seed = seed if seed is not None else secrets.randbits(63)
        self._epoch = 0
        self._position = 0
        length = len(sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length})")

    def _make_tasks(self) -> SequenceTasks:
        return SequenceTasks(
            self.sequence,
            shuffle=self.shuffle,
            seed=self.seed,
            shard=self.shard,
            epoch=self._epoch,
            position=self._position,
        )

    def _received(self, task: Task) -> None:
        self._epoch, self._position = task.epoch, task.position + 1

    def state_dict(self) -> dict[str, Any]:
        """What the consumer has received so far, to resume exactly after it.

        Returns:
            ``{"epoch", "position", "seed", "shuffle", "shard"}``: the next
            batch to deliver is at ``position`` of ``epoch``'s order.
        """
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard": self.shard,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from ``state_dict()``: the next ``start()`` continues there.

        Raises:
            PipelineError: If the enqueuer is running.
            ValueError: If ``state`` lacks a field or disagrees with this
                enqueuer's ``shuffle`` or ``shard``.
        """
        if self.is_running():
            raise PipelineError("load_state_dict() needs a stopped enqueuer; call stop() first")
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        for name in ("shuffle", "shard"):
            if name in state and tuple(np.atleast_1d(state[name])) != tuple(
                np.atleast_1d(getattr(self, name))
            ):
                raise ValueError(
                    f"state has {name}={state[name]!r}, but this enqueuer has "
                    f"{name}={getattr(self, name)!r}"
                )
        for name in ("epoch", "position"):
            if not isinstance(state[name], int) or state[name] < 0:
                raise ValueError(f"state {name} must be an int >= 0, got {state[name]!r}")
        self._epoch, self._position, self.seed = state["epoch"], state["position"], state["seed"]


class GeneratorEnqueuer(SequenceEnqueuer):
    """Reads a generator with several workers, safely, and yields its items in order.

    As ``keras.utils.GeneratorEnqueuer``, but the generator need not be
    thread-safe: ``next()`` runs under a lock, one reader at a time, while
    the per-batch work (checks, staging) runs in parallel. Items come out in
    the order the generator produced them. An exception from the generator
    reaches the consumer after every item produced before it, and the
    generator is never called again.

    Args:
        generator: Any iterable.
        use_multiprocessing: Not supported: a generator's state cannot be
            shared between processes; use an ``OrderedEnqueuer`` over a
            ``Sequence``.
        random_seed: Accepted for Keras compatibility; with threads there is
            no per-worker random state to seed.

    Raises:
        TypeError: If ``generator`` is not iterable.
        ValueError: If ``use_multiprocessing`` is true.
    """

    _name = "GeneratorEnqueuer"

    def __init__(
        self,
        generator: Iterable[Any],
        use_multiprocessing: bool = False,
        random_seed: int | None = None,
    ) -> None:
        if not hasattr(generator, "__iter__") and not hasattr(generator, "__next__"):
            raise TypeError(f"GeneratorEnqueuer needs an iterable, got {type(generator).__name__}")
        if use_multiprocessing:
            raise ValueError(
                "GeneratorEnqueuer cannot use processes: a generator's state cannot be shared "
                "between them; wrap the data in a Sequence and use OrderedEnqueuer"
            )
        super().__init__(generator, use_multiprocessing)
        self.random_seed = random_seed
        self._used = False

    def _make_tasks(self) -> GeneratorTasks:
        if self._used:
            raise PipelineError(
                "GeneratorEnqueuer was already started once and its generator is consumed; "
                "make a new enqueuer with a new generator"
            )
        self._used = True
        return GeneratorTasks(self.sequence)
