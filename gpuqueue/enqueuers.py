"""The Keras surface: ``SequenceEnqueuer``, ``OrderedEnqueuer`` and ``GeneratorEnqueuer``.

Each class spells out every keyword, turns its arguments into one
``PipelineConfig`` (``config.py``), and delegates: ``start()`` starts a
``Run``, ``get()`` returns the consumer's side of it (``delivery.py``),
``stop()`` stops it. What is Keras's own here is the call forms and the
state a Keras user reads back (``sequence``, ``workers``, ``state_dict``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from . import pipeline
from .adapters import check_generator, check_sequence
from .config import PipelineConfig
from .delivery import batches
from .distributed import describe_shard
from .errors import PipelineError, ctrl_c_in
from .pipeline import DEFAULT_STOP_TIMEOUT, EMPTY_STATS, Run
from .sources import ReadingOrder
from .tasks import GeneratorTasks, SequenceTasks, Task

__all__ = ["GeneratorEnqueuer", "OrderedEnqueuer", "SequenceEnqueuer"]

logger = logging.getLogger(__name__)


def _ignore_task(task: Task) -> None:
    """A generator's enqueuer keeps no reading position."""


class SequenceEnqueuer:
    """Base class of the enqueuers, as ``keras.utils.SequenceEnqueuer``.

    ``start(workers, max_queue_size)``, then ``get()`` for the batches, then
    ``stop()``; or a ``with`` block, which starts it (one worker unless
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
            ``get()``, no prefetch), or ``"auto"``: from 2, one deeper each
            time the consumer waited for data on more than 5 % of 32 batches,
            up to 8 and within ``max_device_bytes``; never shallower.
            ``stats()`` says which depth and why.
        max_device_bytes: For ``prefetch_depth="auto"``: the device memory
            its batches may take (``(depth + 3) x largest batch x 1.25``,
            plus ``(depth + 2) x`` a transform's outputs); None: a tenth of
            the device's free memory at start (on NumPy, of the host's).
        output: ``None`` (or ``"cupy"``, ``"numpy"``) for the backend's arrays,
            ``"torch"`` or ``"jax"`` for that library's, on the same memory.
        stream: The stream the consumer's work runs on; by default the
            current one (PyTorch's with ``output="torch"``) at each ``get``.
        timeout: Seconds ``get()`` waits for a batch (as DataLoader's), then
            raises ``BatchTimeoutError`` naming what is in flight. None waits,
            with a warning after a minute.
        transform: Applied to each batch on the device, after its copy, on
            the copy stream (current for CuPy, and PyTorch if imported)
            before the consumer can see it: a callable taking and returning
            the batch as the backend's arrays (CuPy, or NumPy on the CPU),
            or a mapping from field (index or key) to a callable, which
            leaves the other fields alone; ``Normalize`` is the ready-made
            one. Its error reaches ``get()`` in the batch's place.

    A batch is its taker's for as long as it is held; its device memory is
    reused once it is dropped, after the work queued on it is done.

    Raises:
        ValueError: If a keyword is out of range or contradicts another.
        TypeError: If ``transform`` is neither a callable nor a mapping to callables.
    """

    _name = "SequenceEnqueuer"

    def __init__(
        self,
        sequence: Any,
        use_multiprocessing: bool = False,
        *,
        device: Any = None,
        prefetch_depth: int | str = 2,
        max_device_bytes: int | None = None,
        output: str | None = None,
        stream: Any = None,
        timeout: float | None = None,
        transform: Any = None,
    ) -> None:
        self._config = PipelineConfig(
            self._name,
            use_multiprocessing=bool(use_multiprocessing),
            device=device,
            prefetch_depth=prefetch_depth,
            max_device_bytes=max_device_bytes,
            output=output,
            stream=stream,
            timeout=timeout,
            transform=transform,
        )
        self.sequence = sequence
        self.use_multiprocessing = self._config.use_multiprocessing
        self.workers = 0
        self.max_queue_size = 0
        self._lock = threading.Lock()
        self._run: Run | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def config(self) -> PipelineConfig:
        """The settings the next ``start()`` runs with (``workers`` and queue size aside)."""
        return self._config

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
        config = dataclasses.replace(self._config, workers=workers, max_queue_size=max_queue_size)
        with self._lock:
            if self.is_running():
                raise PipelineError(f"{self._name} is already running; call stop() first")
            if self._run is not None and not self._run.closed:
                self._run.stop(DEFAULT_STOP_TIMEOUT)
            self.workers, self.max_queue_size = workers, max_queue_size
            self._run = run = Run.start(config, self.sequence, self._make_tasks)
            if self._finalizer is not None:
                self._finalizer.detach()  # the previous run was stopped above
            self._finalizer = weakref.finalize(self, run.abandon)

    def _make_tasks(self) -> SequenceTasks | GeneratorTasks:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        """Stops every thread and process and frees pinned and device memory.

        Returns within ``timeout`` seconds (default 60; at once after Ctrl-C,
        whose own stop already gave the threads their grace) even while
        workers are blocked; a worker still inside user code then is named
        in a ``RuntimeWarning``, once. Safe to call twice, from any thread.
        """
        run = self._run
        if run is not None:
            default = 0.0 if run.interrupted else DEFAULT_STOP_TIMEOUT
            run.stop(default if timeout is None else timeout)

    def __enter__(self) -> SequenceEnqueuer:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._run is not None and ctrl_c_in(exc) is not None:
            self._run.interrupt()  # Ctrl-C: wait for nothing user code could hold up
        self.stop()

    def get(self) -> Iterator[Any]:
        """Returns a generator of batches, in order (each thread may have one).

        Endless for a Sequence unless ``epochs`` was given; for a generator,
        until it is exhausted. ``None`` items are skipped. A worker's (or the
        copy's) error is raised after every batch before it, as itself with
        a note naming the thread and the batch index; the enqueuer stops and
        every later ``get()`` raises it again. ``stop()`` from another thread
        ends the iteration.

        Raises:
            PipelineError: If ``start()`` was not called.
            BatchTimeoutError: When iterated, if ``timeout`` passed with no batch.
        """
        if self._run is None:
            raise PipelineError(f"{self._name}.get() called before start()")
        return batches(self._run, self._receiver())

    def release(self) -> None:
        """Kept for older code: a batch's memory goes back when it is dropped, not before."""

    def _receiver(self) -> Callable[[Task], None]:
        """What records each task the consumer received (for ``state_dict``)."""
        return _ignore_task

    def stats(self) -> dict[str, Any]:
        """Counters of the current (or last) run.

        Returns:
            ``batches_produced``, ``batches_consumed``, ``consumer_wait_s`` (time
            ``get()`` waited), ``producer_blocked_s`` (time workers waited for
            room), ``queue_size``, ``queue_capacity``, ``mean_queue_occupancy``
            (batches queued at each ``get``); with a device ``backend``,
            ``prefetch_depth``, ``bytes_copied``, ``h2d_gbps`` (one copy in 16,
            timed by device events), ``copy_wait_for_host_s``, ``pinned_bytes``
            and ``device_bytes``; with processes ``shared_memory_bytes``. With
            ``prefetch_depth="auto"``, ``prefetch_depth`` is the depth now,
            ``prefetch_depth_reason`` says why, and ``max_device_bytes`` is
            the budget.
        """
        return dict(EMPTY_STATS) if self._run is None else self._run.stats()


class OrderedEnqueuer(SequenceEnqueuer):
    """Reads a Sequence with several workers and yields batches in order.

    As ``keras.utils.OrderedEnqueuer``, plus seeded shuffling, sharding,
    resumption, and the device keywords of ``SequenceEnqueuer``.

    Args:
        sequence: A ``Sequence``.
        use_multiprocessing: Read in worker processes instead of threads.
        shuffle: Read each epoch in a permutation drawn from ``(seed, epoch)``.
        seed: The shuffling seed (without one, a random one is drawn and kept
            in ``state_dict()``).
        shard: ``(rank, world_size)``: read this rank's part of every epoch, as
            many batches on every rank (as ``DistributedSampler``). ``"auto"``:
            from ``torch.distributed``, else the launcher's variables (torchrun,
            MPI, SLURM), else everything. ``None``: everything.
        drop_last: With several ranks, drop each epoch's tail instead of
            padding it by wrapping around the epoch's order.
        epochs: Stop after this many epochs (counted from epoch 0); None
            (the default, as Keras) is endless.
        device, prefetch_depth, max_device_bytes, output, stream, timeout, transform: As in
            ``SequenceEnqueuer``.

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
        device: Any = None,
        prefetch_depth: int | str = 2,
        max_device_bytes: int | None = None,
        output: str | None = None,
        stream: Any = None,
        timeout: float | None = None,
        transform: Any = None,
    ) -> None:
        check_sequence(sequence)
        self.shuffle = bool(shuffle)
        self._order = ReadingOrder.of(
            sequence, shuffle=shuffle, seed=seed, shard=shard, drop_last=drop_last, epochs=epochs
        )
        super().__init__(
            sequence,
            use_multiprocessing,
            device=device,
            prefetch_depth=prefetch_depth,
            max_device_bytes=max_device_bytes,
            output=output,
            stream=stream,
            timeout=timeout,
            transform=transform,
        )

    def _make_tasks(self) -> SequenceTasks:
        order = self._order
        logger.info(describe_shard(self._name, order.shard, len(self.sequence), order.drop_last))
        return SequenceTasks.resuming(order, self.sequence)

    def _receiver(self) -> Callable[[Task], None]:
        return self._order.received  # called on every batch: no call in between

    def state_dict(self) -> dict[str, Any]:
        """What the consumer has received so far, to resume exactly after it.

        Returns:
            ``{"epoch", "position", "seed", "shuffle", "shard", "drop_last"}``:
            the next batch to deliver is at ``position`` of this rank's order
            in ``epoch``.
        """
        return self._order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from ``state_dict()``: the next ``start()`` continues there.

        Raises:
            PipelineError: If the enqueuer is running.
            ValueError: If ``state`` lacks a field or disagrees with this
                enqueuer's ``shuffle``, ``shard`` or ``drop_last``.
        """
        if self.is_running():
            raise PipelineError("load_state_dict() needs a stopped enqueuer; call stop() first")
        self._order.load_state_dict(state)

    def stats(self) -> dict[str, Any]:
        """``SequenceEnqueuer.stats()``, plus ``shard_rank``, ``shard_world_size`` and
        ``shard_source``: which rank of how many reads, and where that was learned."""
        return {**super().stats(), **self._order.shard.stats()}


class GeneratorEnqueuer(SequenceEnqueuer):
    """Reads a generator with several workers, safely, and yields its items in order.

    As ``keras.utils.GeneratorEnqueuer``, but the generator need not be
    thread-safe: ``next()`` runs under a lock while the per-batch work runs
    in parallel, and items keep the generator's order. Its exception reaches
    the consumer after every item before it; it is never called again.

    Args:
        generator: Any iterable.
        use_multiprocessing: Run the generator in one worker process, whatever
            ``workers`` is (Keras runs a copy in every process and repeats the
            data), writing items into shared memory; pass the generator
            function (``make_batches``, not ``make_batches()``) or a picklable
            iterable.
        random_seed: Seeds NumPy's global random state in that process, as
            Keras does; unused with threads.
        device, prefetch_depth, max_device_bytes, output, stream, timeout, transform: As in
            ``SequenceEnqueuer``.

    Raises:
        TypeError: If ``generator`` is not iterable (or, with processes, a
            generator function).
        PipelineError: With processes, if ``generator`` cannot be pickled or
            is a torch ``DataLoader`` (which has worker processes of its own).
    """

    _name = "GeneratorEnqueuer"

    def __init__(
        self,
        generator: Iterable[Any],
        use_multiprocessing: bool = False,
        random_seed: int | None = None,
        *,
        device: Any = None,
        prefetch_depth: int | str = 2,
        max_device_bytes: int | None = None,
        output: str | None = None,
        stream: Any = None,
        timeout: float | None = None,
        transform: Any = None,
    ) -> None:
        check_generator(generator, use_multiprocessing)
        super().__init__(
            generator,
            use_multiprocessing,
            device=device,
            prefetch_depth=prefetch_depth,
            max_device_bytes=max_device_bytes,
            output=output,
            stream=stream,
            timeout=timeout,
            transform=transform,
        )
        self._config = dataclasses.replace(self._config, process_seed=random_seed)
        self.random_seed = random_seed
        self._used = False

    def _make_tasks(self) -> GeneratorTasks:
        tasks = pipeline.generator_tasks(self.sequence, self.use_multiprocessing, used=self._used)
        self._used = True
        return tasks
