"""The consumer's side of a run: queued items become the user's batches, in order.

``Batches`` is the iterator ``get()`` returns: it takes items off the run's
output queue, yields each batch (on a device, ordered after its copy on the
consumer's stream, in the output library the user asked for), and raises a
worker's error in its place, after every batch before it. Every batch is
its taker's to keep, so several threads may consume one run: a batch's
device memory is reused only once the last view of it is gone
(``looper.DeviceArenas``). ``keep`` copies a batch all the same, for code
written against the older "valid until the next get" rule.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from .backends.base import Backend
from .channel import FIFOQueue
from .errors import BatchTimeoutError, CancelledError, OutOfRangeError, note_thread
from .host import Item
from .pipeline import DEFAULT_STOP_TIMEOUT, Run
from .sources import Task
from .staging import flatten, rebuild, unpack

__all__ = ["WARN_AFTER_S", "Batches", "batches", "keep"]

logger = logging.getLogger("gpuqueue")

# Without a timeout, get() logs a warning naming what is in flight once it has
# waited this long for one batch, then waits on.
WARN_AFTER_S = 60.0


class Batches:
    """The iterator ``get()`` returns: the run's batches, in order.

    Every batch is its taker's, so several threads may consume one run, each
    through its own ``get()`` or together through one iterator: ``next()``
    calls take turns, and each returns a batch of its own.
    """

    def __init__(self, run: Run, received: Callable[[Task], None]) -> None:
        self._batches = batches(run, received)
        self._turn = threading.Lock()  # a generator runs in one thread at a time

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        with self._turn:
            return next(self._batches)

    def close(self) -> None:
        """Ends the iteration now, as a generator's ``close`` does."""
        with self._turn:
            self._batches.close()


def batches(run: Run, received: Callable[[Task], None]) -> Generator[Any, None, None]:
    """Yields the run's batches in order; ``received`` learns each task delivered.

    Ends when a finite source ends (the run is stopped) or another thread
    stops the run. A worker's error is raised in its place, stops the run,
    and is raised again by every later call (``Run.fail``).

    Raises:
        BatchTimeoutError: If ``timeout`` is set and no batch arrives within it.
    """
    queue = run.output_queue
    while True:
        if run.error is not None:
            raise run.error.with_traceback(run.error_traceback)
        started = time.monotonic()
        try:
            item = _next_item(run, queue)
        except BatchTimeoutError as error:
            run.fail(error)
            run.coord.request_stop(error)  # stop() then ends (or kills) what is stuck
            raise
        except OutOfRangeError:  # a finite source ended
            run.stop(DEFAULT_STOP_TIMEOUT)
            return
        except CancelledError:  # stop() from another thread, or an internal failure
            if run.coord.exception is not None:
                run.fail(run.coord.exception)
                continue
            return
        with run.counters.lock:
            run.counters.consumer_wait_s += time.monotonic() - started
            run.counters.occupancy_sum += queue.qsize()
            run.counters.gets += 1
        if item.error is not None:
            item.release_staging()
            _stop_with(run, item.error)
            continue
        received(item.task)
        if item.described is None or item.described.skipped:
            continue
        try:
            batch = _deliver(run, item)
        except CancelledError:  # stopped from another thread while copying (depth 0)
            return
        except Exception as error:
            note_thread(error, f"delivering {item.task.where()}")
            _stop_with(run, error)
            continue
        with run.counters.lock:
            run.counters.consumed += 1
        # The batch is the consumer's: this frame must not keep it (and its arena)
        # alive while it waits here for the next call.
        handed = [batch]
        del batch, item
        yield handed.pop()


def _next_item(run: Run, queue: FIFOQueue[Item]) -> Item:
    """The next item, waiting at most ``timeout``, or warning once ``WARN_AFTER_S`` passed.

    Raises:
        BatchTimeoutError: If ``timeout`` passed with no item; it names what is in flight.
    """
    timeout = run.config.timeout
    try:
        return queue.get(timeout=WARN_AFTER_S if timeout is None else timeout)
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
    return queue.get()


def _stop_with(run: Run, error: BaseException) -> None:
    run.fail(error)
    run.coord.request_stop(error)
    run.stop(DEFAULT_STOP_TIMEOUT)


def _deliver(run: Run, item: Item) -> Any:
    """Turns a queued item into what the consumer receives."""
    described = item.described
    assert described is not None
    staged = described.staged
    if run.arenas is None:
        if staged is None:
            return described.batch
        # From a worker process: copy out of the shared-memory slot (one
        # memcpy per array, no pickling) and give the slot back at once.
        batch = unpack(staged.treedef, staged.metas, staged.buffer, copy=True)
        staged.release(None)
        return batch
    assert run.backend is not None
    stream = _consumer_stream(run, run.backend)
    copied = item.copied
    if copied is None:  # prefetch_depth=0: copy now, on the consumer's stream
        assert staged is not None
        run.arenas.reserve()
        copied = run.arenas.copy(staged, stream)
    return _to_output(run, run.backend, run.arenas.deliver(copied, stream))


def _consumer_stream(run: Run, backend: Backend) -> Any:
    if run.config.stream is not None:
        return backend.as_stream(run.config.stream)
    if run.config.output == "torch" and hasattr(backend, "torch_stream"):
        return backend.torch_stream()
    return backend.current_stream()


def _to_output(run: Run, backend: Backend, batch: Any) -> Any:
    if run.config.output != "torch":
        return batch
    import torch

    treedef, leaves = flatten(batch)
    if backend.name != "cupy":
        return rebuild(treedef, [torch.from_numpy(leaf) for _, leaf in leaves])
    import torch.utils.dlpack

    # The batch is already ordered on the consumer's stream (one event for the
    # whole batch), so each leaf is exported with no stream order of its own
    # (DLPack's stream -1): no event per tensor.
    return rebuild(
        treedef,
        [torch.utils.dlpack.from_dlpack(leaf.__dlpack__(stream=-1)) for _, leaf in leaves],
    )


def keep(batch: Any) -> Any:
    """Copies a batch: its arrays and tensors are copied, other leaves are kept as they are.

    Batches are the consumer's already (they stay valid as long as they are
    held), so this is only for code written for the older "valid until the
    next get" rule, or that wants a copy anyway. Works for CuPy, NumPy and
    PyTorch leaves, and any other leaf (a Python number, a string, None) is
    returned as is. A device copy is ordered on the current stream like any
    other work; with an enqueuer given an explicit ``stream``, call it with
    that stream current (``with stream:``), since only that stream is
    ordered after the batch's copy.
    """
    treedef, leaves = flatten(batch)
    return rebuild(treedef, [_copy_leaf(leaf) for _, leaf in leaves])


def _copy_leaf(leaf: Any) -> Any:
    if hasattr(leaf, "clone"):  # PyTorch
        return leaf.clone()
    if hasattr(leaf, "copy"):  # NumPy, CuPy
        return leaf.copy()
    return leaf
