"""Consumer stage, delivery: queued items become the user's batches, in order.

``batches`` is the generator ``get()`` returns (a generator, as Keras's
``fit`` requires of an iterator it is given): it takes items off the run's
output queue, yields each batch (on a device, ordered after its copy on the
consumer's stream, in the output library the user asked for), and raises a
worker's error in its place, after every batch before it. Every batch is
its taker's to keep, so several threads may consume one run, each through
a ``get()`` of its own (one generator, as any, runs in one thread at a time): a batch's
device memory is reused only once the last view of it is gone
(``device.arenas.DeviceArenas``). The conversion to the ``output`` library is
``outputs.py``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Protocol

from ..backends.base import Backend
from ..backends.numpy import owned_view
from ..batch.layout import Staged, arena_view, as_source, small_leaves
from ..batch.tree import map_arrays, rebuild
from ..device.arenas import DeviceArenas
from ..device.autodepth import DepthTuner
from ..device.copy import Copy, copy_one
from ..errors import (
    BatchTimeoutError,
    CancelledError,
    OutOfRangeError,
    QueueClosedError,
    ctrl_c_in,
    note_thread,
)
from ..host.items import Counters, Item
from ..host.stage import HostStage
from ..source.order import Task
from ..sync.channel import FIFOQueue
from ..sync.coordinator import DEFAULT_STOP_TIMEOUT, Coordinator
from .outputs import HostOutput, consumer_stream, to_output, transformed_output

__all__ = ["WARN_AFTER_S", "RunState", "batches"]

logger = logging.getLogger("gpuqueue")

# Without a timeout, get() logs a warning naming what is in flight once it has
# waited this long for one batch, then waits on.
WARN_AFTER_S = 60.0


class _Settings(Protocol):
    """The settings delivery reads (``config.PipelineConfig``'s)."""

    @property
    def timeout(self) -> float | None: ...
    @property
    def output(self) -> str | None: ...
    @property
    def stream(self) -> Any: ...


class RunState(Protocol):
    """What the consumer's side reads and calls of a run (``run.Run`` is one).

    Named here, so that the consumer stage does not import the run, which
    is built over every stage and imports them all.
    """

    ended: bool  # set when the source ended: the parts left are the stream's last

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> _Settings: ...
    @property
    def coord(self) -> Coordinator: ...
    @property
    def copy(self) -> Copy: ...
    @property
    def output_queue(self) -> FIFOQueue[Item]: ...
    @property
    def host_queue(self) -> FIFOQueue[Item]: ...
    @property
    def parts(self) -> deque[Item]: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def tuner(self) -> DepthTuner | None: ...
    @property
    def host(self) -> HostStage | None: ...
    @property
    def arenas(self) -> DeviceArenas | None: ...
    @property
    def backend(self) -> Backend | None: ...
    @property
    def host_output(self) -> HostOutput | None: ...
    @property
    def error(self) -> BaseException | None: ...
    @property
    def error_traceback(self) -> TracebackType | None: ...
    def fail(self, error: BaseException) -> None: ...
    def stop(self, grace: float) -> None: ...
    def interrupt(self, by: str = ...) -> None: ...
    def in_flight(self) -> str: ...


def batches(run: RunState, received: Callable[[Task], None]) -> Generator[Any, None, None]:
    """Yields the run's batches in order; ``received`` learns each task delivered.

    Ends when a finite source ends (the run is stopped) or another thread
    stops the run. A worker's error is raised in its place, stops the run,
    and is raised again by every later call (``Run.fail``). Ctrl-C while it
    waits interrupts the run (``Run.interrupt``) before going on up, as the
    ``KeyboardInterrupt`` it is, even where the wait it landed in turned it
    into another error (``errors.ctrl_c_in``).

    Raises:
        BatchTimeoutError: If ``timeout`` is set and no batch arrives within it.
    """
    counters = run.counters
    delivered = counters.consumer()
    try:
        yield from _batches(run, received, delivered)
    except GeneratorExit:
        raise
    except BaseException as error:
        interrupt = ctrl_c_in(error)
        if interrupt is None:
            raise
        run.interrupt()
        if interrupt is error:
            raise
        raise interrupt from None  # the user pressed Ctrl-C: that is what they get
    finally:
        counters.consumer_ended(delivered)


def _batches(
    run: RunState, received: Callable[[Task], None], delivered: list[int]
) -> Iterator[Any]:
    """``batches``' loop; ``delivered[0]`` counts the batches it yields (its own count)."""
    queue, parts, coord, counters = run.output_queue, run.parts, run.coord, run.counters
    bundles = run.host is not None and run.host.bundles and queue is run.host_queue
    while True:
        if run.error is not None:
            raise run.error.with_traceback(run.error_traceback)
        try:
            # A bundle's next batch first, whichever get() took the bundle off the queue.
            part = parts.popleft()
        except IndexError:
            part = None
        if part is not None and coord.should_stop() and not run.ended:
            parts.clear()  # stop() ends the iteration, as when the queue is cancelled
            if coord.exception is not None:
                run.fail(coord.exception)
                continue
            return
        if part is None:
            started = time.monotonic()
            tuner = run.tuner
            if tuner is not None:  # prefetch_depth="auto" learns whether this get waits
                tuner.observe(starved=queue.qsize() == 0, staged=run.host_queue.qsize() > 0)
            try:
                item = _next_item(run, queue, bundles)
            except BatchTimeoutError as error:
                run.fail(error)
                coord.request_stop(error)
                # What is stuck is inside user code (a source that never yields): it is
                # named and left behind, as after Ctrl-C, instead of waited for.
                run.interrupt("a batch timeout")
                raise
            except OutOfRangeError:  # a finite source ended
                run.ended = True
                run.stop(DEFAULT_STOP_TIMEOUT)
                return
            except CancelledError:  # stop() from another thread, or an internal failure
                if coord.exception is not None:
                    run.fail(coord.exception)
                    continue
                return
            with counters.lock:
                counters.consumer_wait_s += time.monotonic() - started
                counters.occupancy_sum += queue.qsize()
                counters.gets += 1
            if item.bundle is None:
                part = item
            else:  # (a bundle's last may hold an error)
                parts.extend(item.bundle)
            del item
            if part is None:
                continue
        if part.error is not None:
            part.release_staging()
            _stop_with(run, part.error)
            continue
        received(part.task)
        described = part.described
        if described is None or described.skipped:
            continue
        if described.staged is None and run.arenas is None:
            batch = part.batch  # a worker thread's batch, handed over as it is
            if run.host_output is not None:  # device="auto" without a GPU
                batch = run.host_output(described.treedef, described.metas, batch)
        else:
            try:
                batch = _deliver(run, part)
            except CancelledError:  # stopped from another thread while copying (depth 0)
                return
            except _CopyFailed as failed:  # depth 0: the copy ran in this get()
                _stop_with(run, failed.error)
                continue
            except Exception as error:
                if ctrl_c_in(error) is not None:  # Ctrl-C in a wait of the copy (depth 0)
                    raise
                note_thread(error, f"delivering {part.task.where()}")
                _stop_with(run, error)
                continue
        if counters.startup_s is None:  # (two consumers' first batches may race: either will do)
            counters.startup_s = time.monotonic() - counters.started
        delivered[0] += 1  # before the yield: stats() is exact while the consumer holds it
        # The batch is the consumer's: this frame must not keep it (and its arena)
        # alive while it waits here for the next call.
        handed = [batch]
        del batch, part, described
        yield handed.pop()


def _from_a_bundle(run: RunState, queue: FIFOQueue[Item]) -> Item | None:
    """The next item, if the batch it holds sits in a bundle still being read.

    A bundle that is not late (fast reads) comes whole: this waits for it
    that long at most (a millisecond). Then a bundle holding the next batch commits
    what it has read (``HostStage.hand_over_waited``); and while the wait
    that follows lasts, bundles hand each read over as it ends
    (``HostStage.sleep``), so a batch never waits behind a slow read, nor a
    read that waits for the consumer to take an earlier batch hangs.
    """
    host = run.host
    assert host is not None
    # If the run is stopping, the get that follows says so.
    with contextlib.suppress(CancelledError, QueueClosedError):
        left = host.hand_over_waited()
        if left is not None:
            try:
                return queue.get(timeout=left)  # a millisecond at most, once
            except TimeoutError:
                pass
        host.sleep()
        try:
            host.hand_over_waited(sleeping=True)
            return _next_item(run, queue, False)
        finally:
            host.woke()
    return None


def _next_item(run: RunState, queue: FIFOQueue[Item], bundles: bool) -> Item:
    """The next item, waiting at most ``timeout``, or warning once ``WARN_AFTER_S`` passed.

    With ``bundles``, a batch held in a bundle still being read is taken
    out of it first (``_from_a_bundle``).

    Raises:
        BatchTimeoutError: If ``timeout`` passed with no item; it names what is in flight.
    """
    if bundles and queue.qsize() == 0:
        early = _from_a_bundle(run, queue)
        if early is not None:
            return early
    timeout = run.config.timeout
    # One timed wait at the user's edge (their timeout, or the warning's): stop()
    # and close wake it as they wake every wait.
    try:
        return _get(queue, WARN_AFTER_S if timeout is None else timeout)
    except TimeoutError:
        pass
    if timeout is not None:
        raise BatchTimeoutError(
            f"{run.name}.get(): no batch arrived within {timeout} s; {run.in_flight()}"
        )
    logger.warning(
        "%s.get() has waited %s s for a batch and waits on; %s",
        run.name,
        WARN_AFTER_S,
        run.in_flight(),
    )
    return _get(queue, None)


# The main thread waits for a batch in slices this long. CPython runs a signal's
# handler in the main thread only when the wait there returns, and a SIGINT that
# lands after the wait's last check and before the thread sleeps (or that the
# kernel hands to another thread) does not cut the sleep short: without slices,
# one Ctrl-C could go unseen for the whole wait (WARN_AFTER_S).
SIGNAL_CHECK_S = 0.25


def _get(queue: FIFOQueue[Item], timeout: float | None) -> Item:
    """``queue.get(timeout)``; in the main thread, in ``SIGNAL_CHECK_S`` slices."""
    if threading.current_thread() is not threading.main_thread():
        # One wait at the user's edge; a batch, stop() and close wake it at once.
        return queue.get(timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = SIGNAL_CHECK_S
        if deadline is not None:
            step = max(0.0, min(step, deadline - time.monotonic()))
        try:
            # Not polling for batches: a batch, stop() and close wake this wait at once.
            # The slice is only for a Ctrl-C the sleep missed, raised as the wait returns.
            return queue.get(timeout=step)
        except TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def _stop_with(run: RunState, error: BaseException) -> None:
    run.fail(error)
    run.coord.request_stop(error)
    run.stop(DEFAULT_STOP_TIMEOUT)


class _CopyFailed(Exception):
    """Carries a depth-0 copy's (or transform's) error, already noted, out of ``_deliver``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _deliver(run: RunState, item: Item) -> Any:
    """Turns a queued item into what the consumer receives."""
    described = item.described
    assert described is not None
    staged = described.staged
    if run.arenas is None:
        if staged is None:
            return item.batch
        # device="auto" without a GPU: the output's leaf types (consumer/outputs.py).
        return _lent(staged, run.host_output)
    backend, config = run.backend, run.config
    assert backend is not None
    stream = consumer_stream(backend, config.output, config.stream)
    if run.copy is Copy.IN_GET:  # copy now, on the consumer's stream
        copy_one(run.arenas, item, stream)
        if item.error is not None:
            raise _CopyFailed(item.error)
    copied, item.copied = item.copied, None
    batch = run.arenas.deliver(copied, stream)
    if copied.transformed:
        assert copied.kinds is not None
        return transformed_output(config.output, backend, batch, copied.kinds, stream)
    return to_output(config.output, backend, batch, copied.treedef, copied.metas, stream)


def _lent(staged: Staged, as_output: HostOutput | None = None) -> Any:
    """A batch from a worker process, without a device: its shared-memory slot, lent.

    No copy of the large leaves (the worker's write into the slot was the
    one): every view of the slot keeps the lease, and the slot goes back to
    the pool when the last one dies, so the batch stays true as long as it
    is held. Small leaves (``batch.layout.small_leaves``) are copied out, so a
    held label holds its own bytes, not the slot.
    """
    lease = staged.hand_over()
    arena = owned_view(staged.buffer, staged.nbytes, lease)
    views = [arena_view(arena, meta) for meta in staged.metas]
    for position in small_leaves(staged.metas):
        views[position] = views[position].copy()
    del lease, arena
    batch = rebuild(staged.treedef, views)
    if as_output is not None:
        return as_output(staged.treedef, staged.metas, batch)
    # The leaf types the source gave, as with threads (a tensor stays a tensor).
    return map_arrays(staged.treedef, staged.metas, batch, as_source)
