"""The Keras surface: ``SequenceEnqueuer``, ``OrderedEnqueuer``, ``GeneratorEnqueuer``.

Each class spells out every keyword, makes one ``PipelineConfig`` of them by
name (``config.py``), and delegates to a ``Run`` (``run.py``) and its consumer
(``consumer/deliver.py``). The device defaults to ``None``, as Keras hands over
host batches: swapping the import changes nothing until a device is asked for
(``prefetch()``, gpuqueue's own form, defaults to ``"auto"``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .config import PipelineConfig, Workers
from .consumer.deliver import batches
from .consumer.even import evened
from .errors import PipelineError, ctrl_c_in
from .host.pickling import check_picklable
from .run import EMPTY_STATS, Run
from .source.iterables import IterableOrder, check_iterable_source
from .source.kinds import check_sequence
from .source.order import ReadingOrder, Task
from .source.sample_tasks import SampleTasks
from .source.samplers import SampleOrder
from .source.samples import SampleChunks, order_and_reader
from .source.shard import announce_shard
from .source.tasks import GeneratorTasks, SequenceTasks
from .sync.coordinator import DEFAULT_STOP_TIMEOUT

__all__ = ["GeneratorEnqueuer", "OrderedEnqueuer", "SequenceEnqueuer"]


class SequenceEnqueuer:
    """Base class of the enqueuers, as ``keras.utils.SequenceEnqueuer``.

    ``start(workers, max_queue_size)``, ``get()``, ``stop()``; or a ``with`` block,
    which starts it (one worker unless ``start`` was called) and always stops it.

    Args:
        sequence: A ``Sequence`` or, for ``GeneratorEnqueuer``, an iterable.
        use_multiprocessing: Read batches in worker processes instead of
            threads; batches come back through shared memory.
        device: ``None`` (as Keras): host batches as the source made them.
            ``"auto"``: a CUDA GPU through CuPy if usable, else (a warning says
            why) the workers' batches as with ``None``, by views. ``"cpu"``: the
            device path on NumPy. An int or ``"cuda:N"``: that GPU.
        prefetch_depth: Batches copied ahead of the consumer (0 = copy in
            ``get()``), or ``"auto"``: from 2, one deeper while the consumer
            waits for data, up to 8, within ``max_device_bytes``; ``stats()``
            says which depth and why.
        max_device_bytes: The device memory ``prefetch_depth="auto"`` may use
            (None: a tenth of what is free at start).
        output: ``None`` (or ``"cupy"``, ``"numpy"``) for the backend's arrays,
            ``"torch"`` or ``"jax"`` for that library's, on the same memory.
        stream: The stream the consumer's work runs on; by default the
            current one (PyTorch's with ``output="torch"``) at each ``get``.
        timeout: Seconds ``get()`` waits for a batch, then raises
            ``BatchTimeoutError`` naming what is in flight; None waits.
        transform: Applied to each batch on the device after its copy, on the
            copy stream: a callable on the batch as the backend's arrays, or a
            mapping from field to a callable (``{0: Normalize(mean, std)}``).

    Raises:
        ValueError: If a keyword is out of range or contradicts another.
        TypeError: If ``transform`` is neither a callable nor a mapping to callables.
    """

    _name = "SequenceEnqueuer"
    _order: ReadingOrder | SampleOrder | IterableOrder  # where the consumer is in the source

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
        self._setup(sequence, PipelineConfig.of(self._name, locals()))

    def _setup(
        self, sequence: Any, config: PipelineConfig, order: Any = None, reads: Any = None
    ) -> None:
        self._config, self._order = config, order
        self.sequence = sequence
        # What the workers read: the source, or what reads its samples (batch_size=).
        self._reads = sequence if reads is None else reads
        self.use_multiprocessing = config.use_multiprocessing
        self.workers = 0
        self.max_queue_size = 0
        self._lock = threading.Lock()
        self._run: Run | None = None

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
        counts = Workers(workers, max_queue_size)
        with self._lock:
            if self.is_running():
                raise PipelineError(f"{self._name} is already running; call stop() first")
            if self._run is not None and not self._run.closed:
                self._run.stop(DEFAULT_STOP_TIMEOUT)
            self.workers, self.max_queue_size = workers, max_queue_size
            self._run = Run.start(self._config, counts, self._reads, self._make_tasks, self)

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

    def __exit__(self, *exc_info: Any) -> None:
        if self._run is not None and ctrl_c_in(exc_info[1]) is not None:
            self._run.interrupt()  # Ctrl-C: wait for nothing user code could hold up
        self.stop()

    def get(self) -> Iterator[Any]:
        """Returns a generator of batches, in order (each thread may have one).

        Endless for a Sequence unless ``epochs`` was given; for a generator,
        until it ends (``None`` items are skipped). A worker's error is raised
        after every batch before it, as itself with a note naming the thread
        and the batch, and again by every later ``get()``.

        Raises:
            PipelineError: If ``start()`` was not called.
            BatchTimeoutError: When iterated, if ``timeout`` passed with no batch.
        """
        if self._run is None:
            raise PipelineError(f"{self._name}.get() called before start()")
        stream = batches(self._run, self._receiver())
        return evened(stream, self._config.even_batches, self._order)

    def release(self) -> None:
        """Kept for older code: a batch's memory goes back when it is dropped, not before."""

    def _receiver(self) -> Callable[[Task], None]:
        """What records each task the consumer received (for ``state_dict``)."""
        return self._order.received  # called on every batch: no call in between

    def state_dict(self) -> dict[str, Any]:
        """What the consumer has received so far, to resume exactly after it.

        Returns:
            ``OrderedEnqueuer``: ``{"epoch", "position" (or, per sample, "sample"
            and "batch_size"), "start", "length", "seed", "shuffle", "shard",
            "drop_last"}``; any rank's resumes every rank, on any number of ranks.
            ``GeneratorEnqueuer`` (threads): ``{"epoch", "position", "source"}``,
            the last being the iterable's own ``state_dict()`` where it has one.
        """
        return self._order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from ``state_dict()``: the next ``start()`` goes on after that batch.

        Raises:
            PipelineError: If the enqueuer is running (or an iterable is read in a
                process).
            ValueError: If ``state`` lacks a field or disagrees with this enqueuer.
        """
        if self.is_running():
            raise PipelineError("load_state_dict() needs a stopped enqueuer; call stop() first")
        self._order.load_state_dict(state)

    def stats(self) -> dict[str, Any]:
        """Counters of the current (or last) run.

        Returns:
            Batches produced and consumed, ``consumer_wait_s``,
            ``producer_blocked_s``, queue occupancy, ``startup_s`` (``start()``
            to the first batch); on a device the backend, depth (and why, with
            ``"auto"``), bytes copied, ``h2d_gbps``, pinned and device bytes;
            with processes ``shared_memory_bytes``.
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
        shard: ``(rank, world_size)``: this rank's part of every epoch, as many
            batches on every rank (as ``DistributedSampler``). ``"auto"``: from
            ``torch.distributed`` or the launcher's variables. ``None``: all.
        drop_last: Drop the epoch's tail that does not give every rank a whole
            batch, instead of padding the ranks by wrapping around the epoch
            (and, with ``batch_size``, keeping a short last batch): DataLoader's
            ``drop_last`` on one rank, DistributedSampler's and its on several.
        epochs: Stop after this many epochs (counted from epoch 0); None
            (the default, as Keras) is endless.
        batch_size, collate, sampler, batch_sampler: The items are samples, this
            many to a batch written straight into its slot (``prefetch()``
            says how); order, shards and ``state_dict()`` then count samples.
        device, prefetch_depth, ...: The device keywords of ``SequenceEnqueuer``.

    Raises:
        ValueError: If ``shard`` (or a launcher's variable) is malformed,
            several ranks shuffle without a shared ``seed``, or per-sample
            keywords contradict each other.
        PipelineError: If the Sequence is empty, or ``drop_last`` leaves a
            rank nothing to read.
    """

    _name = "OrderedEnqueuer"
    _order: ReadingOrder | SampleOrder

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
        batch_size: int | None = None,
        collate: Callable[[list[Any]], Any] | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
    ) -> None:
        check_sequence(sequence)
        config = PipelineConfig.of(self._name, locals())
        order, reads = order_and_reader(sequence, locals(), stacklevel=2)
        self._setup(sequence, config, order, reads)

    shuffle = property(lambda self: self._order.shuffle, doc="Each epoch in a seeded permutation.")

    def _make_tasks(self) -> SequenceTasks:
        order = self._order
        order.restart_if_finished(len(self.sequence))
        per_sample = isinstance(order, SampleOrder)
        announce_shard(self._name, order.shard, len(self.sequence), order.drop_last, per_sample)
        if isinstance(order, SampleOrder):
            return SampleTasks(order, self._reads)
        return SequenceTasks.resuming(order, self.sequence)

    def stats(self) -> dict[str, Any]:
        """``SequenceEnqueuer.stats()``, plus which rank of how many reads (``shard_*``)."""
        return {**super().stats(), **self._order.shard.stats()}


class GeneratorEnqueuer(SequenceEnqueuer):
    """Reads a generator with several workers, safely, and yields its items in order.

    As ``keras.utils.GeneratorEnqueuer``, but the generator need not be thread-safe:
    ``next()`` runs under a lock, the rest in parallel, and items keep their order.

    Args:
        generator: Any iterable.
        use_multiprocessing: Run the generator in one worker process, whatever
            ``workers`` is (Keras runs a copy in each and repeats the data):
            pass the generator function (``make_batches``, not
            ``make_batches()``) or a picklable iterable.
        random_seed: Seeds NumPy's global random state in that process, as
            Keras does; unused with threads.
        even_batches: Stop every ``torch.distributed`` rank at the first step where
            one has no batch (DDP would wait for ever); None: with several ranks.
        batch_size, drop_last, collate: The items are samples, this many to a
            batch (the short last one dropped with ``drop_last``), as ``prefetch()``.
        device, prefetch_depth, ...: The device keywords of ``SequenceEnqueuer``.

    Raises:
        TypeError: If ``generator`` is not iterable (nor, with processes, a generator function).
        PipelineError: With processes, if ``generator`` cannot be pickled or
            is a torch ``DataLoader`` (which has worker processes of its own).
    """

    _name = "GeneratorEnqueuer"
    _order: IterableOrder

    def __init__(
        self,
        generator: Iterable[Any],
        use_multiprocessing: bool = False,
        random_seed: int | None = None,
        *,
        even_batches: bool | None = None,
        device: Any = None,
        prefetch_depth: int | str = 2,
        max_device_bytes: int | None = None,
        output: str | None = None,
        stream: Any = None,
        timeout: float | None = None,
        transform: Any = None,
        batch_size: int | None = None,
        drop_last: bool = False,
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        check_iterable_source(generator, epochs=None, use_multiprocessing=use_multiprocessing)
        config = PipelineConfig.of(self._name, locals())
        reads = SampleChunks.of(generator, batch_size, drop_last=drop_last, collate=collate)
        if use_multiprocessing:
            check_picklable(reads, "the generator function or a picklable iterable")
        self._setup(generator, config, IterableOrder(processes=config.use_multiprocessing), reads)

    random_seed = property(lambda self: self._config.random_seed, doc="NumPy's seed (processes).")

    def _make_tasks(self) -> GeneratorTasks:
        return self._order.tasks(self._reads)
