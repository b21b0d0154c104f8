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
from typing import Any, TypeVar

from .config import PipelineConfig, Workers
from .consumer.deliver import batches
from .consumer.even import evened
from .errors import PipelineError, ctrl_c_in
from .host.pickling import check_picklable
from .run import EMPTY_STATS, Run
from .source.iterables import IterableOrder, check_iterable_source
from .source.kinds import check_sequence
from .source.order import ReadingOrder, Task
from .source.samplers import SampleOrder
from .source.samples import SampleChunks, order_and_reader
from .source.shard import announce_shard
from .source.tasks import GeneratorTasks, SampleTasks, SequenceTasks
from .sync.coordinator import DEFAULT_STOP_TIMEOUT

__all__ = ["GeneratorEnqueuer", "OrderedEnqueuer", "SequenceEnqueuer"]

_E = TypeVar("_E", bound="SequenceEnqueuer")


class SequenceEnqueuer:
    """Base class of the enqueuers, as ``keras.utils.SequenceEnqueuer``.

    ``start(workers, max_queue_size)``, ``get()``, ``stop()``; or a ``with`` block,
    which starts it (one worker unless ``start`` was called) and always stops it.

    Args:
        sequence: A ``Sequence`` or, for ``GeneratorEnqueuer``, an iterable.
        use_multiprocessing: Read batches in worker processes instead of
            threads; batches come back through shared memory.
        device: ``None`` (the default, as Keras): host batches exactly as the
            source made them. ``"auto"``: a CUDA GPU through CuPy if one is
            usable; else (a warning says why) the workers' batches as with
            ``None``, their leaves made what the device path gives on the
            CPU by views, not copies (``transform=`` still stages them).
            ``"cpu"``: the NumPy fallback of the device pipeline, staged.
            An int or ``"cuda:N"``: that GPU, or a clear error.
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
        transform: Applied to each batch on the device right after its copy,
            on the copy stream, before the consumer sees it: a callable on
            the batch as the backend's arrays, or a mapping from field to a
            callable (``{0: Normalize(mean, std)}``). Its error reaches
            ``get()`` in the batch's place.

    A batch is its taker's for as long as it is held; its device memory is
    reused once it is dropped, after the work queued on it is done.

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

    @classmethod
    def _configured(cls: type[_E], sequence: Any, config: PipelineConfig, *more: Any) -> _E:
        """An enqueuer of a config already made (by ``prefetch()``), checked once."""
        enqueuer = cls.__new__(cls)
        enqueuer._setup(sequence, config, *more)
        return enqueuer

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
            ``OrderedEnqueuer``: ``{"epoch", "position", "seed", "shuffle", "shard",
            "drop_last"}``; with ``batch_size``, ``"sample"`` (the next sample, so
            any batch size resumes there) in place of ``"position"``, and
            ``"batch_size"``. ``GeneratorEnqueuer`` (threads only): ``{"epoch",
            "position", "source"}``, ``source`` being the iterable's own
            ``state_dict()`` right after the last item received, where it has one.
        """
        return self._order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from ``state_dict()``: the next ``start()`` goes on after that batch.

        An iterable with a ``load_state_dict`` gets its state back; any other is
        read from the start of the saved epoch, skipping what was received.

        Raises:
            PipelineError: If the enqueuer is running (or an iterable's is read in
                a process).
            ValueError: If ``state`` lacks a field or disagrees with this enqueuer.
        """
        if self.is_running():
            raise PipelineError("load_state_dict() needs a stopped enqueuer; call stop() first")
        self._order.load_state_dict(state)

    def stats(self) -> dict[str, Any]:
        """Counters of the current (or last) run.

        Returns:
            Batches produced and consumed, time ``get()`` waited
            (``consumer_wait_s``) and workers waited for room
            (``producer_blocked_s``), queue occupancy; on a device the
            backend, depth (and with ``"auto"``, why), bytes copied,
            ``h2d_gbps``, pinned and device bytes; with processes
            ``shared_memory_bytes``. ``startup_s``: seconds from ``start()``
            to the first batch delivered (None until then), which with
            processes includes starting them.
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
        drop_last: Drop the epoch's tail that does not give every rank a whole
            batch, instead of padding the ranks by wrapping around the epoch
            (and, with ``batch_size``, keeping a short last batch): DataLoader's
            ``drop_last`` on one rank, DistributedSampler's and its on several.
        epochs: Stop after this many epochs (counted from epoch 0); None
            (the default, as Keras) is endless.
        batch_size: The items are samples: this many (by ``__getitems__`` if
            any) are written straight into each batch's slot by torch's
            ``default_collate`` rules; order, shards and ``state_dict()`` count
            samples (``source/samplers.py``). None: items are batches.
        collate: A function from a list of samples to one batch, instead of
            the default collate; its batch is then packed as any batch (one
            more host copy, in the worker).
        sampler: With ``batch_size``, each epoch's indices: a torch
            ``Sampler``, a list; ``set_epoch(epoch)`` first where it has one.
        batch_sampler: The index lists of each epoch's batches (variable
            sizes, buckets), in place of ``batch_size``, ``shuffle``,
            ``sampler`` and ``drop_last``.
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
        order, reads = order_and_reader(
            sequence,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            shard=shard,
            drop_last=drop_last,
            epochs=epochs,
            sampler=sampler,
            batch_sampler=batch_sampler,
            collate=collate,
            stacklevel=2,
        )
        self._setup(sequence, config, order, reads)

    shuffle = property(lambda self: self._order.shuffle, doc="Each epoch in a seeded permutation.")

    def _make_tasks(self) -> SequenceTasks:
        order = self._order
        order.restart_if_finished(len(self.sequence))
        if isinstance(order, SampleOrder):
            return SampleTasks(order, self._reads)
        announce_shard(self._name, order.shard, len(self.sequence), order.drop_last)
        return SequenceTasks.resuming(order, self.sequence)

    def stats(self) -> dict[str, Any]:
        """``SequenceEnqueuer.stats()``, plus which rank of how many reads (``shard_*``)."""
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
            ``workers`` is (Keras runs a copy in each and repeats the data):
            pass the generator function (``make_batches``, not
            ``make_batches()``) or a picklable iterable.
        random_seed: Seeds NumPy's global random state in that process, as
            Keras does; unused with threads.
        even_batches: Stop every ``torch.distributed`` rank at the first step where
            one has no batch (DDP would wait for ever); None: with several ranks.
        batch_size: The generator's items are samples: batch this many,
            written straight into the batch's slot (see ``OrderedEnqueuer``).
        drop_last, collate: With ``batch_size``: drop the short last batch;
            a function from a list of samples to one batch.
        device, prefetch_depth, ...: The device keywords of ``SequenceEnqueuer``.

    Raises:
        TypeError: If ``generator`` is not iterable (or, with processes, a
            generator function).
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
