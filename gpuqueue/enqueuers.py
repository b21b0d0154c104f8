"""Keras-compatible enqueuers, ``OrderedEnqueuer`` and ``GeneratorEnqueuer``, and ``prefetch``.

The host stage is a ``QueueRunner`` whose enqueue ops are the workers, under
one ``Coordinator``. Each worker call:

1. claims the next task (an index of the epoch's order, or the next item of a
   generator, read under a lock), once fewer than ``workers`` items are out;
2. reads the batch and, when a device is set, packs it into a pinned slot (in
   parallel with the other workers, in a thread or in its own process);
3. hands it to the ``Sequencer``: if every item before it is on the queue, it
   checks the batch against the first and puts it on the bounded host queue,
   then does the same for the items after it that others finished early;
   otherwise it leaves the item for whoever completes the turn and goes on.
   The queue holds batches in exactly the read order, and no worker waits
   for another's turn.

With a device, a ``CopyLooper`` (``looper.py``) moves each staged batch to a
device slot and onto the device queue (``prefetch_depth``), and ``get()``
hands out device arrays ordered after their copy on the consumer's stream.

An error while reading (or copying) travels down the queues in its place, so
the consumer gets every batch before it, then the original exception.
Epochs follow one another without draining the queue: ``on_epoch_end()``
runs as soon as the epoch's last read has finished.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np

from .backends import check_device, resolve
from .backends.base import Backend
from .channel import FIFOQueue
from .coordinator import Coordinator
from .distributed import (
    batches_per_rank,
    check_iterable_shard,
    describe_shard,
    reads_by_index,
    resolve_shard,
)
from .errors import CancelledError, OutOfRangeError, PipelineError, note_thread
from .looper import CopyLooper, DeviceRing, DeviceSlot, PinnedPool, Staged
from .runner import QueueRunner
from .sources import (
    GeneratorTasks,
    Sequencer,
    SequenceTasks,
    Task,
    overrides_on_epoch_end,
)
from .staging import BatchSpec, LeafMeta, TreeDef, describe, flatten, layout, rebuild, unpack

__all__ = ["GeneratorEnqueuer", "OrderedEnqueuer", "SequenceEnqueuer", "keep", "prefetch"]

logger = logging.getLogger(__name__)

# How long stop() waits for threads by default before naming the stragglers.
DEFAULT_STOP_TIMEOUT = 60.0

_OUTPUTS = (None, "cupy", "numpy", "torch")


@dataclass
class Described:
    """A batch a worker read: its structure, and the batch itself or its staged copy."""

    treedef: TreeDef
    metas: list[LeafMeta]
    batch: Any = None  # the user's own batch (device=None, threads)
    staged: Staged | None = None  # packed in a pinned or shared-memory slot
    skipped: bool = False  # the source returned None


_SKIPPED = Described(TreeDef("leaf"), [], skipped=True)


@dataclass
class Item:
    """What travels on the queues: a batch, a skipped item, or the error in its place."""

    task: Task
    described: Described | None = None
    error: BaseException | None = None
    device_slot: DeviceSlot | None = None
    claim_wait_s: float = 0.0  # how long its worker waited for room before claiming it

    @property
    def staged(self) -> Staged | None:
        return None if self.described is None else self.described.staged

    def release_staging(self) -> None:
        """Returns a staging slot the item still holds (when it is dropped)."""
        if self.staged is not None:
            self.staged.release(None)


@dataclass
class _Stats:
    produced: int = 0
    consumed: int = 0
    consumer_wait_s: float = 0.0
    producer_blocked_s: float = 0.0
    occupancy_sum: int = 0  # batches queued, summed over the consumer's gets
    gets: int = 0


@dataclass
class _Run:
    """Everything one ``start()`` made, so ``stop()`` can undo exactly that.

    The threads see only this, never the enqueuer.
    """

    name: str
    coord: Coordinator
    tasks: SequenceTasks | GeneratorTasks
    host_queue: FIFOQueue[Item]
    output_queue: FIFOQueue[Item]
    threads: list[threading.Thread]
    backend: Backend | None = None
    own_backend: bool = False
    pinned: PinnedPool | None = None
    processes: Any = None  # workers.ProcessPool
    ring: DeviceRing | None = None
    looper: CopyLooper | None = None
    held: tuple[DeviceSlot, Any] | None = None  # the device slot the consumer holds
    closed: bool = False
    close_lock: threading.Lock = field(default_factory=threading.Lock)
    spec: BatchSpec | None = None  # the first batch's structure, dtypes and ranks
    stats: _Stats = field(default_factory=_Stats)
    stats_lock: threading.Lock = field(default_factory=threading.Lock)


class SequenceEnqueuer:
    """Base class of the enqueuers, as ``keras.utils.SequenceEnqueuer``.

    Use::

        enqueuer = OrderedEnqueuer(sequence, shuffle=True, seed=0, device="auto")
        enqueuer.start(workers=4, max_queue_size=10)
        batches = enqueuer.get()
        for step in range(steps):
            x, y = next(batches)
        enqueuer.stop()

    or as a context manager, which starts it (with ``workers=1`` unless
    ``start`` was called) and always stops it.

    Args:
        sequence: A ``Sequence`` or, for ``GeneratorEnqueuer``, an iterable.
        use_multiprocessing: Read batches in worker processes instead of
            threads; batches come back through shared memory.
        device: ``None`` (the default, as Keras): host batches exactly as the
            source made them. ``"auto"``: a CUDA GPU through CuPy if one is
            usable, else NumPy. ``"cpu"``: the NumPy fallback of the device
            pipeline. An int or ``"cuda:N"``: that GPU, or a clear error.
        prefetch_depth: Batches copied ahead of the consumer (0 = copy in
            ``get()``, no prefetch). Device memory is ``prefetch_depth + 1``
            slots.
        output: ``None`` for the backend's arrays (CuPy or NumPy; ``"cupy"``
            and ``"numpy"`` mean the same), or ``"torch"`` for PyTorch tensors
            on the same memory.
        stream: The stream the consumer's work runs on; by default CuPy's
            current stream (PyTorch's with ``output="torch"``) at each ``get``.

    Device batches are valid until the next ``get`` (or ``release()``): the
    slot is then reused, after the work the consumer queued on it is done.
    Use ``gpuqueue.keep(batch)`` to copy one that must live longer.
    """

    _name = "SequenceEnqueuer"

    def __init__(
        self,
        sequence: Any,
        use_multiprocessing: bool = False,
        *,
        device: Any = None,
        prefetch_depth: int = 2,
        output: str | None = None,
        stream: Any = None,
    ) -> None:
        if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int):
            raise ValueError(f"prefetch_depth must be an int >= 0, got {prefetch_depth!r}")
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be an int >= 0, got {prefetch_depth!r}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
        if device is not None:
            check_device(device)
        if device is None and (output == "torch" or stream is not None):
            raise ValueError("output='torch' and stream need a device (device='auto', 0, ...)")
        self.sequence = sequence
        self.use_multiprocessing = bool(use_multiprocessing)
        self.device = device
        self.prefetch_depth = prefetch_depth
        self.output = output
        self.stream = stream
        self.workers = 0
        self.max_queue_size = 0
        self._lock = threading.Lock()
        self._run: _Run | None = None
        self._error: BaseException | None = None
        self._error_traceback: TracebackType | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- life cycle ---------------------------------------------------------

    def is_running(self) -> bool:
        """True between ``start()`` and the end of the stream or ``stop()``."""
        run = self._run
        return run is not None and not run.coord.should_stop()

    def start(self, workers: int = 1, max_queue_size: int = 10) -> None:
        """Starts the workers (and the copy stage, with a device).

        Args:
            workers: Number of worker threads (or processes).
            max_queue_size: The most finished batches waiting in host memory.

        Raises:
            ValueError: If ``workers`` or ``max_queue_size`` is not a positive int.
            PipelineError: If the enqueuer is already running, the Sequence
                cannot be pickled for processes, or the device is unusable.
        """
        for name, value in (("workers", workers), ("max_queue_size", max_queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        with self._lock:
            if self.is_running():
                raise PipelineError(f"{self._name} is already running; call stop() first")
            self._close_run()
            self.workers, self.max_queue_size = workers, max_queue_size
            self._error = self._error_traceback = None
            run = self._prepare(workers, max_queue_size)
            self._run = run
            try:
                self._launch(run, workers)
            except BaseException:
                _shutdown(run, DEFAULT_STOP_TIMEOUT)
                raise
            if self._finalizer is not None:
                self._finalizer.detach()  # the previous run was stopped above
            self._finalizer = weakref.finalize(self, _abandon, run)

    def _prepare(self, workers: int, max_queue_size: int) -> _Run:
        """Makes the run's queues, pools and backend; starts nothing."""
        # The device first: if it is unusable, nothing (a generator) has been consumed.
        backend = resolve(self.device) if self.device is not None else None
        coord = Coordinator()
        tasks = self._make_tasks()
        host_queue: FIFOQueue[Item] = FIFOQueue(max_queue_size, name=f"{self._name}-host")
        run = _Run(self._name, coord, tasks, host_queue, host_queue, [])
        if backend is not None:
            run.backend, run.own_backend = backend, backend is not self.device
            ring_size = self.prefetch_depth + 1
            run.ring = DeviceRing(backend, ring_size, name=f"{self._name}-device-slots")
            if self.prefetch_depth > 0:
                run.output_queue = FIFOQueue(self.prefetch_depth, name=f"{self._name}-device")
            if not self.use_multiprocessing:
                slots = workers + max_queue_size + 1
                run.pinned = PinnedPool(backend, slots, name=f"{self._name}-pinned")
        return run

    def _launch(self, run: _Run, workers: int) -> None:
        coord, tasks = run.coord, run.tasks
        if self.use_multiprocessing:
            from .workers import ProcessPool

            # A generator has one reader: one process runs it (as many would
            # each run a copy and repeat the data); threads handle the rest.
            reading = isinstance(tasks, GeneratorTasks)
            processes = ProcessPool(
                self.sequence,
                1 if reading else workers,
                coord,
                name=self._name,
                slots=workers + self.max_queue_size + 1,
                backend=run.backend,
                seed=getattr(self, "random_seed", None),
            )
            run.processes = processes
            if isinstance(tasks, GeneratorTasks):
                tasks.fetch = lambda position: processes.read(None, f"generator item {position}")
            elif overrides_on_epoch_end(self.sequence):
                tasks.epoch_ended = processes.sequence_changed
        # At most one item out per worker, as each staging pool counts on.
        sequencer: Sequencer[Item] = Sequencer(
            lambda item: _commit(run, item), Item.release_staging, limit=workers
        )
        read = _reader(run)
        ops = [_worker_op(i, run, read, sequencer) for i in range(workers)]
        for stop_callback in (tasks.close, sequencer.close, lambda: _drop(run.host_queue)):
            coord.add_stop_callback(stop_callback)
        if run.output_queue is not run.host_queue:
            coord.add_stop_callback(lambda: _drop(run.output_queue))
        if run.pinned is not None:
            coord.add_stop_callback(run.pinned.cancel)
        if run.ring is not None:
            coord.add_stop_callback(run.ring.free.cancel)
        runner = QueueRunner(run.host_queue, ops)
        run.threads = runner.create_threads(coord, daemon=True, start=True)
        if run.ring is not None and self.prefetch_depth > 0:
            run.looper = CopyLooper(
                coord, run.ring, run.host_queue, run.output_queue, name=f"{self._name}-copy"
            )
            run.threads.append(run.looper)
            run.looper.start()

    def _make_tasks(self) -> SequenceTasks | GeneratorTasks:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        """Stops every thread and process and frees pinned and device memory.

        Returns within ``timeout`` seconds (default 60) even while workers are
        blocked on a full queue; a worker still inside user code then is
        named in a ``RuntimeWarning``. Safe to call twice, from any thread,
        or before ``start()``.
        """
        run = self._run
        if run is not None:
            _shutdown(run, DEFAULT_STOP_TIMEOUT if timeout is None else timeout)

    def _close_run(self) -> None:
        run = self._run
        if run is not None and not run.closed:
            _shutdown(run, DEFAULT_STOP_TIMEOUT)

    def __enter__(self) -> SequenceEnqueuer:
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- consuming ----------------------------------------------------------

    def get(self) -> Iterator[Any]:
        """Returns a generator of batches, in order.

        For a Sequence the stream is endless (epoch after epoch) unless
        ``epochs`` was given; for a generator it ends once everything the
        generator produced has been yielded. Items that are ``None`` are
        skipped. If a worker (or the copy) failed, the batches before the
        failure are yielded, then the original exception is raised (its own
        type and traceback, with a note naming the thread and the batch
        index), the enqueuer stops, and every later ``get()`` raises it
        again. If another thread calls ``stop()``, the generator ends.

        Raises:
            PipelineError: If ``start()`` was not called.
        """
        run = self._run
        if run is None:
            raise PipelineError(f"{self._name}.get() called before start()")
        return self._batches(run)

    def _batches(self, run: _Run) -> Iterator[Any]:
        queue = run.output_queue
        while True:
            _release_held(run)
            if self._error is not None:
                raise self._error.with_traceback(self._error_traceback)
            started = time.monotonic()
            try:
                item = queue.get()
            except OutOfRangeError:  # a finite source ended
                self.stop()
                return
            except CancelledError:  # stop() from another thread, or an internal failure
                if run.coord.exception is not None:
                    self._fail(run.coord.exception)
                    continue
                return
            with run.stats_lock:
                run.stats.consumer_wait_s += time.monotonic() - started
                run.stats.occupancy_sum += queue.qsize()
                run.stats.gets += 1
            if item.error is not None:
                item.release_staging()
                self._fail(item.error)
                run.coord.request_stop(item.error)
                self.stop()
                continue
            self._received(item.task)
            if item.described is None or item.described.skipped:
                continue
            try:
                batch = self._deliver(run, item)
            except CancelledError:  # stopped from another thread while copying (depth 0)
                return
            except Exception as error:
                note_thread(error, f"delivering {item.task.where()}")
                self._fail(error)
                run.coord.request_stop(error)
                self.stop()
                continue
            with run.stats_lock:
                run.stats.consumed += 1
            yield batch

    def _fail(self, error: BaseException) -> None:
        """Makes ``error`` sticky: every later ``get()`` raises it, traceback intact."""
        self._error, self._error_traceback = error, error.__traceback__

    def _deliver(self, run: _Run, item: Item) -> Any:
        """Turns a queued item into what the consumer receives."""
        described = item.described
        assert described is not None
        staged = described.staged
        if run.ring is None:
            if staged is None:
                return described.batch
            # From a worker process: copy out of the shared-memory slot (one
            # memcpy per array, no pickling) and give the slot back at once.
            batch = unpack(staged.treedef, staged.metas, staged.buffer, copy=True)
            staged.release(None)
            return batch
        assert staged is not None and run.backend is not None
        stream = self._consumer_stream(run.backend)
        slot = item.device_slot
        if slot is None:  # prefetch_depth=0: copy now, on the consumer's stream
            slot = run.ring.free.get()
            run.ring.copy(slot, staged, stream)
        run.held = (slot, stream)
        return self._to_output(run.backend, run.ring.batch(slot, staged, stream))

    def _consumer_stream(self, backend: Backend) -> Any:
        if self.stream is not None:
            return self.stream
        if self.output == "torch" and hasattr(backend, "torch_stream"):
            return backend.torch_stream()
        return backend.current_stream()

    def _to_output(self, backend: Backend, batch: Any) -> Any:
        if self.output != "torch":
            return batch
        import torch

        convert = torch.from_numpy if backend.name != "cupy" else torch.from_dlpack
        treedef, leaves = flatten(batch)
        return rebuild(treedef, [convert(leaf) for _, leaf in leaves])

    def release(self) -> None:
        """Gives the device slot of the last batch back now, instead of at the next ``get``.

        The slot is rewritten only after the work already queued on the
        consumer's stream is done, so it is safe to call right after
        launching the step that reads the batch.
        """
        if self._run is not None:
            _release_held(self._run)

    def _received(self, task: Task) -> None:
        """Records that the consumer received ``task`` (for ``state_dict``)."""

    def stats(self) -> dict[str, Any]:
        """Counters of the current (or last) run.

        Returns:
            ``batches_produced``, ``batches_consumed``, ``consumer_wait_s``
            (time ``get()`` waited for a batch), ``producer_blocked_s`` (time
            workers waited for room: for an item to be committed, or in the queue),
            ``queue_size`` (now), ``queue_capacity``,
            ``mean_queue_occupancy`` (batches queued at each ``get``), and
            with a device: ``backend``, ``prefetch_depth``, ``bytes_copied``,
            ``h2d_gbps`` (bytes copied over the time copies were issued),
            ``copy_wait_for_host_s`` (time the copy stage waited for the host
            stage), ``pinned_bytes`` and ``device_bytes``.
        """
        run = self._run
        s, lock = (run.stats, run.stats_lock) if run is not None else (_Stats(), threading.Lock())
        with lock:
            stats: dict[str, Any] = {
                "batches_produced": s.produced,
                "batches_consumed": s.consumed,
                "consumer_wait_s": s.consumer_wait_s,
                "producer_blocked_s": s.producer_blocked_s,
                "queue_size": run.output_queue.qsize() if run is not None else 0,
                "queue_capacity": run.output_queue.capacity if run is not None else 0,
                "mean_queue_occupancy": s.occupancy_sum / s.gets if s.gets else 0.0,
            }
        if run is not None and run.ring is not None and run.backend is not None:
            ring = run.ring
            span = (ring.last_copy_at or 0.0) - (ring.first_copy_at or 0.0)
            stats.update(
                backend=run.backend.name,
                prefetch_depth=self.prefetch_depth,
                bytes_copied=ring.bytes_copied,
                h2d_gbps=ring.bytes_copied / span / 1e9 if span > 0 else 0.0,
                copy_wait_for_host_s=run.looper.host_wait_s if run.looper else 0.0,
                pinned_bytes=(
                    run.pinned.pinned_bytes
                    if run.pinned is not None
                    else run.processes.pinned_bytes
                    if run.processes is not None
                    else 0
                ),
                device_bytes=ring.device_bytes,
            )
        return stats


# -- what the threads run: functions of the run alone, never of the enqueuer,
# so an enqueuer nobody holds any more can be collected (and its finaliser
# stop them) while they run.


def _reader(run: _Run) -> Callable[[Task], Described]:
    """Returns the function a worker calls to read (and stage) one task."""
    tasks, processes, pinned = run.tasks, run.processes, run.pinned

    if processes is not None:

        def read_in_process(task: Task) -> Described:
            # A generator's item was read by the process while claiming it.
            staged = task.batch if task.index is None else processes.read(task.index, task.where())
            if staged is None:
                return _SKIPPED
            return Described(staged.treedef, staged.metas, staged=staged)

        return read_in_process

    def read_in_thread(task: Task) -> Described:
        batch = tasks.read(task)
        if batch is None:
            return _SKIPPED
        treedef, leaves = describe(batch)
        metas, nbytes = layout(leaves)
        if pinned is None:
            return Described(treedef, metas, batch=batch)
        return Described(treedef, metas, staged=pinned.stage(treedef, metas, nbytes, leaves))

    return read_in_thread


def _worker_op(
    number: int, run: _Run, read: Callable[[Task], Described], sequencer: Sequencer[Item]
) -> Callable[[], None]:
    """One worker's enqueue op: claim, read, then hand the item in to be committed in order."""
    tasks = run.tasks

    def enqueue_one() -> None:
        started = time.monotonic()
        sequencer.reserve()  # waits while enough items are out (bounds staging slots)
        try:
            task = tasks.claim()  # OutOfRangeError here ends this worker cleanly
        except BaseException:
            sequencer.unreserve()
            raise
        item = Item(task, claim_wait_s=time.monotonic() - started)
        try:
            if task.failure is not None:
                raise task.failure
            try:
                item.described = read(task)
            finally:
                tasks.done_reading(task)
        except CancelledError:
            raise
        except Exception as error:
            tasks.close()
            note_thread(error, f"reading {task.where()}")
            item.error = error
        sequencer.submit(task.seq_no, item)

    enqueue_one.__name__ = f"worker{number}"
    return enqueue_one


def _commit(run: _Run, item: Item) -> None:
    """Checks an item against the first batch and puts it on the host queue, in stream order."""
    described = item.described
    if described is not None and not described.skipped:
        try:
            if run.spec is None:
                run.spec = BatchSpec.of(described.treedef, described.metas)
            else:
                run.spec.check(described.treedef, described.metas, item.task.where())
        except Exception as error:
            run.tasks.close()
            item.error = error
    started = time.monotonic()
    run.host_queue.put(item)
    blocked = item.claim_wait_s + time.monotonic() - started
    with run.stats_lock:
        run.stats.produced += 1
        run.stats.producer_blocked_s += blocked


def _shutdown(run: _Run, grace: float) -> None:
    """Stops the run's threads and processes, then frees its memory.

    Threads still inside user code after ``grace`` seconds are named in a
    ``RuntimeWarning``, and their memory is left for the garbage collector.
    """
    run.coord.request_stop()
    try:
        run.coord.join(run.threads, stop_grace_period_secs=grace, ignore_live_threads=True)
    except BaseException as error:
        if error is not run.coord.exception:  # a real Ctrl-C during stop() goes on up
            raise
        # the recorded error reaches the consumer through get(), not through stop()
    stragglers = [t.name for t in run.threads if t.is_alive()]
    if stragglers:
        warnings.warn(
            f"{run.name}.stop(): threads still running after {grace} s, "
            f"most likely inside the Sequence or generator: {', '.join(stragglers)}",
            RuntimeWarning,
            stacklevel=3,
        )
    if run.processes is not None:
        killed = run.processes.close(grace)
        if killed:
            warnings.warn(
                f"{run.name}.stop(): worker processes did not exit within {grace} s and were "
                f"killed, most likely inside the Sequence: {', '.join(killed)}",
                RuntimeWarning,
                stacklevel=3,
            )
    if not stragglers:
        _free(run)


def _free(run: _Run) -> None:
    """Frees pinned and device memory once no thread can touch it."""
    with run.close_lock:
        if run.closed:
            return
        run.closed = True
    run.held = None
    # Each is closed even if one before it raised (a sticky CUDA error, say).
    with contextlib.ExitStack() as closing:
        if run.own_backend and run.backend is not None:
            closing.callback(run.backend.close)
        if run.ring is not None:
            closing.callback(run.ring.close)
        if run.pinned is not None:
            closing.callback(run.pinned.close)


def _not_launched(position: int) -> Any:
    raise PipelineError("the generator's worker process was not started")


def _release_held(run: _Run) -> None:
    """Gives back the device slot the consumer holds, fenced on its stream."""
    if run.held is None or run.ring is None:
        return
    slot, stream = run.held
    run.held = None
    run.ring.release(slot, stream)


def _abandon(run: _Run) -> None:
    """The finaliser of an enqueuer collected (or left at exit) without ``stop()``.

    It only asks everything to stop, which wakes every thread and process so
    they end on their own; it never joins, since a finaliser may run in any
    thread, a worker's included. Memory goes with the run once they have.
    """
    run.coord.request_stop()
    if run.processes is not None:
        run.processes.abandon()


def _drop(queue: FIFOQueue[Item]) -> None:
    """Cancels ``queue`` and gives back the slots its dropped items held."""
    for item in queue.cancel():
        item.release_staging()


def keep(batch: Any) -> Any:
    """Copies a device batch so it stays valid after the next ``get()``.

    Works for CuPy, NumPy and PyTorch leaves; the copy is ordered on the
    current stream like any other work. With an enqueuer given an explicit
    ``stream``, call it with that stream current (``with stream:``), since
    only that stream is ordered after the batch's copy.
    """
    treedef, leaves = flatten(batch)
    copies = [leaf.clone() if hasattr(leaf, "clone") else leaf.copy() for _, leaf in leaves]
    return rebuild(treedef, copies)


class OrderedEnqueuer(SequenceEnqueuer):
    """Reads a Sequence with several workers and yields batches in order.

    As ``keras.utils.OrderedEnqueuer``, plus seeded shuffling, sharding,
    resumption, and the device keywords of ``SequenceEnqueuer``.

    Args:
        sequence: A ``Sequence``.
        use_multiprocessing: Read in worker processes instead of threads.
        shuffle: Read each epoch in a permutation drawn from ``(seed, epoch)``.
        seed: The shuffling seed; two runs with the same seed read the same
            order. Without one, a random seed is drawn (and kept in
            ``state_dict()``).
        shard: ``(rank, world_size)`` to read only this rank's part of
            every epoch, the same number of batches on every rank (as
            ``DistributedSampler``); ``"auto"`` (the default) takes them from
            an initialised ``torch.distributed``, else the launcher's
            variables (torchrun, Open MPI, MPICH/Intel MPI, SLURM), else
            reads everything; ``None`` reads everything.
        drop_last: With several ranks, drop the epoch's last
            ``len % world_size`` batches instead of padding the tail by
            wrapping around the epoch's order.
        epochs: Stop after this many epochs (counted from epoch 0); None
            (the default, as Keras) is endless.
        **device_options: ``device``, ``prefetch_depth``, ``output``,
            ``stream``, as in ``SequenceEnqueuer``.

    Raises:
        ValueError: If ``shard`` (or a launcher's variable) is malformed, or
            several ranks shuffle without a shared ``seed``.
        PipelineError: If the Sequence is empty, or ``drop_last`` leaves a
            rank nothing to read.
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
        drop_last: bool = False,
        epochs: int | None = None,
        **device_options: Any,
    ) -> None:
        if not (hasattr(sequence, "__getitem__") and hasattr(sequence, "__len__")):
            raise TypeError(
                f"OrderedEnqueuer needs a Sequence (with __getitem__ and __len__), "
                f"got {type(sequence).__name__}"
            )
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or a positive int, got {epochs!r}")
        super().__init__(sequence, use_multiprocessing, **device_options)
        self.shuffle = bool(shuffle)
        self._shard = resolve_shard(shard)
        self.shard = self._shard.pair
        self.drop_last = bool(drop_last)
        if self.shuffle and seed is None and self.shard[1] > 1:
            raise ValueError(
                f"shuffling across {self.shard[1]} ranks needs a seed that every rank shares"
            )
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.epochs = epochs
        self._epoch = 0
        self._position = 0
        length = len(sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length})")
        batches_per_rank(length, self.shard[1], self.drop_last)

    def _make_tasks(self) -> SequenceTasks:
        length = len(self.sequence)
        if length > 0:
            logger.info(describe_shard(self._name, self._shard, length, self.drop_last))
        return SequenceTasks(
            self.sequence,
            shuffle=self.shuffle,
            seed=self.seed,
            shard=self.shard,
            drop_last=self.drop_last,
            epoch=self._epoch,
            position=self._position,
            epochs=self.epochs,
        )

    def _received(self, task: Task) -> None:
        self._epoch, self._position = task.epoch, task.position + 1

    def state_dict(self) -> dict[str, Any]:
        """What the consumer has received so far, to resume exactly after it.

        Returns:
            ``{"epoch", "position", "seed", "shuffle", "shard", "drop_last"}``:
            the next batch to deliver is at ``position`` of this rank's order
            in ``epoch``.
        """
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard": self.shard,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from ``state_dict()``: the next ``start()`` continues there.

        Raises:
            PipelineError: If the enqueuer is running.
            ValueError: If ``state`` lacks a field or disagrees with this
                enqueuer's ``shuffle``, ``shard`` or ``drop_last``.
        """
        if self.is_running():
            raise PipelineError("load_state_dict() needs a stopped enqueuer; call stop() first")
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        for name in ("shuffle", "shard", "drop_last"):
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

    def stats(self) -> dict[str, Any]:
        """The counters of ``SequenceEnqueuer.stats()``, and this process's shard.

        Returns:
            Those counters, plus ``shard_rank`` and ``shard_world_size`` (which
            rank of how many reads) and ``shard_source`` (where that came
            from: ``"torch.distributed"``, ``"RANK/WORLD_SIZE"``, ...).
        """
        return {**super().stats(), **self._shard.stats()}


class GeneratorEnqueuer(SequenceEnqueuer):
    """Reads a generator with several workers, safely, and yields its items in order.

    As ``keras.utils.GeneratorEnqueuer``, but the generator need not be
    thread-safe: ``next()`` runs under a lock, one reader at a time, while
    the per-batch work (checks, staging into pinned memory) runs in
    parallel. Items come out in the order the generator produced them. An
    exception from the generator reaches the consumer after every item
    produced before it, and the generator is never called again.

    Args:
        generator: Any iterable.
        use_multiprocessing: Run the generator in a worker process, which
            writes each item into shared memory. There is one such process
            whatever ``workers`` is (a generator has one reader; Keras runs a
            copy in every process and repeats the data), so ``generator`` must
            be picklable: the generator function (``make_batches``, not
            ``make_batches()``) or a picklable iterable.
        random_seed: Seeds NumPy's global random state in that process, as
            Keras does; unused with threads.
        **device_options: ``device``, ``prefetch_depth``, ``output``,
            ``stream``, as in ``SequenceEnqueuer``.

    Raises:
        TypeError: If ``generator`` is not iterable (or, with processes, a
            generator function).
        PipelineError: With processes, if ``generator`` cannot be pickled.
    """

    _name = "GeneratorEnqueuer"

    def __init__(
        self,
        generator: Iterable[Any],
        use_multiprocessing: bool = False,
        random_seed: int | None = None,
        **device_options: Any,
    ) -> None:
        iterable = hasattr(generator, "__iter__") or hasattr(generator, "__next__")
        if not iterable and not (use_multiprocessing and callable(generator)):
            raise TypeError(f"GeneratorEnqueuer needs an iterable, got {type(generator).__name__}")
        if use_multiprocessing:
            from .workers import check_picklable

            check_picklable(generator, "the generator function or a picklable iterable")
        super().__init__(generator, use_multiprocessing, **device_options)
        self.random_seed = random_seed
        self._used = False

    def _make_tasks(self) -> GeneratorTasks:
        restartable = self.use_multiprocessing and not hasattr(self.sequence, "__next__")
        if self._used and not restartable:
            raise PipelineError(
                "GeneratorEnqueuer was already started once and its generator is consumed; "
                "make a new enqueuer with a new generator"
            )
        self._used = True
        if self.use_multiprocessing:
            return GeneratorTasks(None, fetch=_not_launched)  # _launch points it at the process
        return GeneratorTasks(self.sequence)


@contextlib.contextmanager
def prefetch(
    source: Any,
    device: Any = "auto",
    *,
    workers: int = 1,
    prefetch_depth: int = 2,
    max_queue_size: int = 10,
    use_multiprocessing: bool = False,
    shuffle: bool = False,
    seed: int | None = None,
    shard: tuple[int, int] | str | None = "auto",
    drop_last: bool = False,
    epochs: int | None = None,
    output: str | None = None,
    stream: Any = None,
) -> Iterator[Iterator[Any]]:
    """Yields an iterator of device batches from a Sequence or any iterable.

    The one-call form of the enqueuers: a ``Sequence`` (anything with
    ``__getitem__`` and ``__len__``) goes through an ``OrderedEnqueuer``
    (endless unless ``epochs`` is given), any other iterable through a
    ``GeneratorEnqueuer``. Everything is stopped and freed when the block
    ends, also on error::

        with gpuqueue.prefetch(dataset, device="auto", workers=4, epochs=1) as batches:
            for x, y in batches:
                loss = step(x, y)

    ``shard`` and ``drop_last`` split a Sequence among ranks as
    ``OrderedEnqueuer`` does. An iterable (a generator, a DataLoader, an
    IterableDataset) is never split: ``"auto"`` reads it as it is, since it
    is split at its source if at all, and ``(rank, world_size)`` is a
    ``ValueError`` that says why.
    """
    options: dict[str, Any] = {
        "device": device,
        "prefetch_depth": prefetch_depth,
        "output": output,
        "stream": stream,
    }
    enqueuer: SequenceEnqueuer
    if reads_by_index(source):
        enqueuer = OrderedEnqueuer(
            source,
            use_multiprocessing,
            shuffle,
            seed=seed,
            shard=shard,
            drop_last=drop_last,
            epochs=epochs,
            **options,
        )
    else:
        check_iterable_shard(source, shard)
        enqueuer = GeneratorEnqueuer(source, use_multiprocessing, **options)
    enqueuer.start(workers=workers, max_queue_size=max_queue_size)
    try:
        yield enqueuer.get()
    finally:
        enqueuer.stop()
