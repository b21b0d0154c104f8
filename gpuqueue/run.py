"""Run: one run of the pipeline (source, host, device, consumer), built, started and stopped.

``Run.start`` builds the queues, pools and backend of one run from its
``PipelineConfig`` and ``Workers`` (``config.py``) and starts its threads (and
processes); ``stop`` joins them and frees the memory; ``abandon`` is the
finaliser of a run nobody stopped. Nothing here knows Keras.

The workers (``host/stage.py``) are a ``QueueRunner``'s enqueue ops under one
``Coordinator``, putting batches on the bounded host queue in read order. How
batches reach the consumer is the run's ``Copy`` mode: with no device, as the
workers made them; at ``prefetch_depth=0``, copied in ``get()``; else copied
ahead by a ``CopyLooper`` (``device/copy.py``) into device arenas. The
consumer's side is ``consumer/deliver.py``. An error travels down the queues
in its batch's place; epochs follow one another without draining the queue.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .backends import resolve
from .backends.base import Backend
from .config import PipelineConfig, Workers
from .consumer.outputs import HostOutput, host_output
from .device import autodepth
from .device.arenas import DeviceArenas
from .device.autodepth import DepthTuner
from .device.copy import Copy, CopyLooper
from .host.items import Counters, Item
from .host.pinned import PinnedPool
from .host.processes import check_main_guard, main_without_file
from .host.stage import HostStage
from .source.kinds import is_torch_class
from .source.samples import gives_samples
from .source.tasks import GeneratorTasks, SequenceTasks, overrides_on_epoch_end
from .sync.channel import FIFOQueue
from .sync.coordinator import DEFAULT_STOP_TIMEOUT, Coordinator
from .sync.runner import QueueRunner

__all__ = [
    "EMPTY_STATS",
    "INTERRUPT_GRACE",
    "Run",
]


TaskSource = SequenceTasks | GeneratorTasks

# After Ctrl-C: time for gpuqueue's own threads to see the stop (they take
# milliseconds); threads still inside user code then are left as daemons.
INTERRUPT_GRACE = 0.5


@dataclass
class Run:
    """Everything one ``start()`` made, so ``stop()`` can undo exactly that.

    The threads see only this, never the enqueuer, so an enqueuer nobody
    holds can be collected (and its finaliser abandon the run) while they run.
    """

    config: PipelineConfig
    counts: Workers
    coord: Coordinator
    tasks: TaskSource
    host_queue: FIFOQueue[Item]
    output_queue: FIFOQueue[Item]  # the device queue when copying ahead, else the host queue
    copy: Copy = Copy.NONE
    threads: list[threading.Thread] = field(default_factory=list)
    backend: Backend | None = None
    own_backend: bool = False
    pinned: PinnedPool | None = None
    processes: Any = None  # host.processes.ProcessPool
    arenas: DeviceArenas | None = None
    looper: CopyLooper | None = None
    tuner: DepthTuner | None = None  # prefetch_depth="auto"
    host_output: HostOutput | None = None  # device="auto" without a GPU (consumer/outputs.py)
    closed: bool = False
    finalizer: weakref.finalize[Any, Any] | None = None  # abandons the run with its owner
    # Ctrl-C, or a batch timeout: stop waits for nothing user code could hold up.
    interrupted: bool = False
    interrupted_by: str = "Ctrl-C"
    named_stragglers: set[str] = field(default_factory=set)  # threads a warning named
    close_lock: threading.Lock = field(default_factory=threading.Lock)
    host: HostStage | None = None
    # The threads iterating the run's batches (consumer/deliver.py lets one at a time).
    counters: Counters = field(default_factory=Counters)
    # A bundle's batches taken off the output queue and not yet delivered: whichever
    # get() comes next delivers them, so a generator dropped mid-bundle loses none.
    parts: deque[Item] = field(default_factory=deque)
    ended: bool = False  # the source ended: the parts still to deliver are the stream's last
    # The first error the consumer saw: every later get() raises it again.
    error: BaseException | None = None
    error_traceback: TracebackType | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @classmethod
    def start(
        cls,
        config: PipelineConfig,
        counts: Workers,
        source: Any,
        make_tasks: Callable[[], TaskSource],
        owner: object,
    ) -> Run:
        """Builds a run of ``source`` and starts its threads and processes.

        The device is resolved before ``make_tasks`` is called, so an unusable
        device consumes nothing (of a generator, say). If ``owner`` (the
        enqueuer) is collected without a ``stop()``, the run is abandoned.

        Raises:
            PipelineError: If the device is unusable or the source cannot be
                sent to worker processes.
        """
        started = time.monotonic()
        # The device first: if it is unusable, nothing (a generator) has been consumed.
        backend = resolve(config.device) if config.device is not None else None
        host_queue: FIFOQueue[Item] = FIFOQueue(counts.max_queue_size, name=f"{config.name}-host")
        run = cls(config, counts, Coordinator(), make_tasks(), host_queue, host_queue)
        run.counters.started = started
        if backend is not None and config.host_is_the_device(backend.name):
            # Staging would only copy each batch in host memory: delivered as device=None's.
            run.host_output = host_output(config.output, backend)
            backend.close()
            backend = None
        if backend is not None:
            run.backend, run.own_backend = backend, backend is not config.device
            # What the consumer holds comes on top of the depth. One free arena is
            # kept: a loop that holds one batch at a time then cycles depth + 2
            # arenas (depth ahead, the one it holds, the one it just dropped)
            # without allocating; arenas beyond that are freed as they come back.
            auto = config.prefetch_depth == "auto"
            depth = autodepth.START if auto else int(config.prefetch_depth)
            run.arenas = DeviceArenas(backend, depth=depth, keep=1, transform=config.transform)
            if auto:
                run.tuner = DepthTuner.for_run(run.arenas, config.max_device_bytes)
            if depth == 0:
                run.copy = Copy.IN_GET
            else:  # the queue has room for auto's cap: the arenas bound the depth
                run.copy = Copy.AHEAD
                capacity = autodepth.CAP if auto else depth
                run.output_queue = FIFOQueue(capacity, name=f"{config.name}-device")
            if not config.use_multiprocessing:
                slots = counts.staging_slots
                run.pinned = PinnedPool(backend, slots, name=f"{config.name}-pinned")
        try:
            run._launch(source)
        except BaseException:
            run.stop(DEFAULT_STOP_TIMEOUT)
            raise
        # (The finaliser holds the run, never the owner; stop() detaches it.)
        run.finalizer = weakref.finalize(owner, run.abandon)
        return run

    def _launch(self, source: Any) -> None:
        config, counts, coord, tasks = self.config, self.counts, self.coord, self.tasks
        if config.use_multiprocessing:
            from .host.processes import ProcessPool

            check_main_guard()
            # A generator has one reader: one process runs it (as many would
            # each run a copy and repeat the data); threads handle the rest.
            reading = isinstance(tasks, GeneratorTasks)
            with main_without_file():
                processes = ProcessPool(
                    source,
                    1 if reading else counts.workers,
                    coord,
                    name=config.name,
                    slots=counts.staging_slots,
                    backend=self.backend,
                    seed=config.random_seed,
                )
            self.processes = processes
            if isinstance(tasks, GeneratorTasks):
                tasks.fetch = lambda position: processes.read(None, f"generator item {position}")
            elif overrides_on_epoch_end(source):
                tasks.epoch_ended = processes.sequence_changed
        if isinstance(tasks, GeneratorTasks):
            tasks.stopping = coord.should_stop
        host = HostStage(
            tasks,
            self.host_queue,
            self.counters,
            workers=counts.workers,
            pinned=self.pinned,
            processes=self.processes,
            device=self.backend is not None,
            stopping=coord.should_stop,
            samples=gives_samples(source),
            look_for_samples=type(tasks) is SequenceTasks and not is_torch_class(source, "Dataset"),
        )
        self.host = host
        ops = [host.enqueue_op(number) for number in range(counts.workers)]
        for stop_callback in (
            tasks.close,
            host.sequencer.close,
            lambda: self._drop(self.host_queue),
        ):
            coord.add_stop_callback(stop_callback)
        if self.copy is Copy.AHEAD:
            coord.add_stop_callback(lambda: self._drop(self.output_queue))
        if self.pinned is not None:
            coord.add_stop_callback(self.pinned.cancel)
        if self.arenas is not None:
            coord.add_stop_callback(self.arenas.cancel)
        runner = QueueRunner(self.host_queue, ops)
        self.threads = runner.create_threads(coord=coord, daemon=True, start=True)
        if self.copy is Copy.AHEAD:
            assert self.arenas is not None
            self.looper = CopyLooper(
                coord, self.arenas, self.host_queue, self.output_queue, name=f"{config.name}-copy"
            )
            self.threads.append(self.looper)
            self.looper.start()

    def stop(self, grace: float) -> None:
        """Stops the run's threads and processes, then frees its memory.

        Threads still inside user code after ``grace`` seconds are named in a
        ``RuntimeWarning``, and their memory is left for the garbage collector
        (or for a later ``stop``, once they have ended).
        """
        self.coord.request_stop()
        if self.finalizer is not None:
            self.finalizer.detach()  # stopped: nothing is left to abandon
        # join() re-raises the recorded error with the traceback it was recorded with.
        # When stop() runs in a `finally` or `with` while that very error propagates
        # through the consumer's frames, the re-raise would replace the traceback the
        # consumer saw (and the frames it gathered since): keep it.
        recorded = self.coord.exception
        seen_traceback = None if recorded is None else recorded.__traceback__
        try:
            self.coord.join(self.threads, stop_grace_period_secs=grace, ignore_live_threads=True)
        except BaseException as error:
            if error is not self.coord.exception:  # a real Ctrl-C during stop() goes on up
                raise
            # the recorded error reaches the consumer through get(), not through stop()
            if error is recorded:
                error.__traceback__ = seen_traceback
        stragglers = [t.name for t in self.threads if t.is_alive()]
        unnamed = [name for name in stragglers if name not in self.named_stragglers]
        if unnamed:  # each once: a later stop() frees what has ended, and names no one twice
            self.named_stragglers.update(unnamed)
            reading = {} if self.host is None else self.host.reading_by_thread()
            named = [f"{name} ({reading[name]})" if name in reading else name for name in unnamed]
            warnings.warn(
                f"{self.name}.stop(): "
                + (
                    f"after {self.interrupted_by}, threads left running as daemons"
                    if self.interrupted
                    else f"threads still running after {grace} s"
                )
                + f", most likely inside the Sequence or generator: {', '.join(named)}",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.processes is not None:
            killed = self.processes.close(grace)
            if killed and not self.interrupted:
                warnings.warn(
                    f"{self.name}.stop(): worker processes did not exit within {grace} s and "
                    f"were killed, most likely inside the Sequence: {', '.join(killed)}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if not stragglers:
            self._free()

    def interrupt(self, by: str = "Ctrl-C") -> None:
        """Ctrl-C in the consumer (or a batch timeout): stops now, waiting for no user code.

        Worker processes (which ignore SIGINT) are killed and their shared
        memory unlinked; threads still inside the Sequence or generator cannot
        be interrupted, so they are left running as daemons, named in a
        ``RuntimeWarning`` with what they read, and the interpreter exits
        without them.
        """
        if self.interrupted:
            return
        self.interrupted, self.interrupted_by = True, by
        self.coord.request_stop()
        if self.processes is not None:
            for process in self.processes.processes:
                with contextlib.suppress(ValueError, OSError):  # already closed
                    process.kill()
        self.stop(INTERRUPT_GRACE)

    def _free(self) -> None:
        """Frees pinned and device memory once no thread can touch it."""
        with self.close_lock:
            if self.closed:
                return
            self.closed = True
        # Each is closed even if one before it raised (a sticky CUDA error, say).
        with contextlib.ExitStack() as closing:
            closing.callback(self.tasks.release)
            if self.own_backend and self.backend is not None:
                closing.callback(self.backend.close)
            if self.arenas is not None:
                closing.callback(self.arenas.close)
            if self.pinned is not None:
                closing.callback(self.pinned.close)

    def abandon(self) -> None:
        """The finaliser of an enqueuer collected (or left at exit) without ``stop()``.

        It only asks everything to stop, which wakes every thread and process so
        they end on their own; it never joins, since a finaliser may run in any
        thread, a worker's included. Memory goes with the run once they have.
        """
        self.coord.request_stop()
        if self.processes is not None:
            self.processes.abandon()

    def in_flight(self) -> str:
        """What the workers are reading now, for a message about a wait that went long."""
        reading = [] if self.host is None else self.host.reading()
        parts = [f"worker threads: {'; '.join(reading) or 'none reading'}"]
        if self.processes is not None:
            parts.append(f"worker processes: {'; '.join(self.processes.busy()) or 'none reading'}")
        return ", ".join(parts)

    def fail(self, error: BaseException) -> None:
        """Makes ``error`` sticky: every later ``get()`` raises it, traceback intact."""
        self.error, self.error_traceback = error, error.__traceback__

    def _drop(self, queue: FIFOQueue[Item]) -> None:
        """Cancels ``queue`` and gives back the slots and arenas its dropped items held."""
        for item in queue.cancel():
            item.release_staging()
            if item.copied is not None and self.arenas is not None:
                self.arenas.discard(item.copied)

    def stats(self) -> dict[str, Any]:
        """The run's counters; see ``SequenceEnqueuer.stats``."""
        counters = self.counters
        with counters.lock:
            stats: dict[str, Any] = {
                "batches_produced": counters.produced,
                "batches_consumed": counters.consumed,
                "consumer_wait_s": counters.consumer_wait_s,
                "producer_blocked_s": counters.producer_blocked_s,
                "queue_size": self.output_queue.qsize(),
                "queue_capacity": self.output_queue.capacity,
                "mean_queue_occupancy": (
                    counters.occupancy_sum / counters.gets if counters.gets else 0.0
                ),
                "startup_s": counters.startup_s,
            }
        if self.processes is not None:
            stats["shared_memory_bytes"] = self.processes.pinned_bytes
        arenas, backend = self.arenas, self.backend
        if arenas is not None and backend is not None:
            host_bytes = self.pinned if self.pinned is not None else self.processes
            stats.update(
                backend=backend.name,
                prefetch_depth=self.tuner.depth if self.tuner else self.config.prefetch_depth,
                bytes_copied=arenas.bytes_copied,
                h2d_gbps=arenas.h2d_gbps,
                copy_wait_for_host_s=self.looper.host_wait_s if self.looper else 0.0,
                pinned_bytes=host_bytes.pinned_bytes if host_bytes is not None else 0,
                device_bytes=arenas.device_bytes,
                transform_s=arenas.transform_s,
            )
            if self.tuner is not None:
                stats.update(
                    prefetch_depth_reason=self.tuner.reason,
                    max_device_bytes=self.tuner.budget,
                )
        return stats


EMPTY_STATS: dict[str, Any] = {
    "batches_produced": 0,
    "batches_consumed": 0,
    "consumer_wait_s": 0.0,
    "producer_blocked_s": 0.0,
    "queue_size": 0,
    "queue_capacity": 0,
    "mean_queue_occupancy": 0.0,
    "startup_s": None,
}
