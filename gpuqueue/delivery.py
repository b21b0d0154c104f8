"""The consumer's side of a run: queued items become the user's batches, in order.

``batches`` is the iterator ``get()`` returns: it takes items off the run's
output queue, yields each batch (on a device, ordered after its copy on the
consumer's stream, in the output library the user asked for), and raises a
worker's error in its place, after every batch before it. One thread at a
time consumes a run (``Batches``). ``keep`` copies a batch the user wants to
hold past the next ``get``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from .backends.base import Backend
from .channel import FIFOQueue
from .errors import BatchTimeoutError, CancelledError, OutOfRangeError, PipelineError, note_thread
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
    """The iterator ``get()`` returns: the run's batches, to one consuming thread at a time.

    Device batches are recycled after the consumer's next ``get``, so two
    threads taking batches from one run would overwrite each other's. A
    second thread is refused with a ``PipelineError`` instead: one that
    iterates a second ``get()`` while another thread's is still open, or one
    that calls ``next()`` on an iterator another thread is consuming. One
    thread may call ``get()`` again (after a loop ends, each epoch, or
    ``next(enqueuer.get())`` in a loop).
    """

    def __init__(self, run: Run, received: Callable[[Task], None]) -> None:
        self._run = run
        self._batches = batches(run, received)
        self._owner: threading.Thread | None = None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        me = threading.current_thread()
        owner = self._owner
        if owner is not None and owner is not me and owner.is_alive():
            raise PipelineError(
                f"{self._run.name}.get(): thread {me.name!r} called next() on the batches "
                f"thread {owner.name!r} is consuming; one thread consumes a run at a time"
            )
        self._owner = me
        return next(self._batches)

    def close(self) -> None:
        """Ends the iteration now (as a generator's ``close``); another thread may then consume."""
        self._batches.close()


def _claim(run: Run, me: threading.Thread) -> None:
    """Records ``me`` as consuming ``run``, unless another live thread already is."""
    with run.consumer_lock:
        others = [t.name for t in run.consumers if t is not me and t.is_alive()]
        if others:
            raise PipelineError(
                f"{run.name}.get(): thread {others[0]!r} is consuming this run's batches, so "
                f"thread {me.name!r} may not: a batch is reused once its consumer takes the "
                "next, so two consumers would corrupt each other's. Close (or finish) the "
                "other thread's iterator first, or give each thread an enqueuer of its own"
            )
        run.consumers.append(me)


def _release(run: Run, me: threading.Thread) -> None:
    with run.consumer_lock:
        run.consumers.remove(me)


def batches(run: Run, received: Callable[[Task], None]) -> Generator[Any, None, None]:
    """Yields the run's batches in order; ``received`` learns each task delivered.

    Ends when a finite source ends (the run is stopped) or another thread
    stops the run. A worker's error is raised in its place, stops the run,
    and is raised again by every later call (``Run.fail``).

    Raises:
        PipelineError: If another thread is consuming the run.
        BatchTimeoutError: If ``timeout`` is set and no batch arrives within it.
    """
    me = threading.current_thread()
    _claim(run, me)
    try:
        yield from _deliver_all(run, received)
    finally:
        _release(run, me)


def _deliver_all(run: Run, received: Callable[[Task], None]) -> Iterator[Any]:
    queue = run.output_queue
    while True:
        run.release_held()
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
        yield batch


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
    if run.ring is None:
        if staged is None:
            return described.batch
        # From a worker process: copy out of the shared-memory slot (one
        # memcpy per array, no pickling) and give the slot back at once.
        batch = unpack(staged.treedef, staged.metas, staged.buffer, copy=True)
        staged.release(None)
        return batch
    assert staged is not None and run.backend is not None
    stream = _consumer_stream(run, run.backend)
    slot = item.device_slot
    if slot is None:  # prefetch_depth=0: copy now, on the consumer's stream
        slot = run.ring.free.get()
        run.ring.copy(slot, staged, stream)
    run.held = (slot, stream)
    return _to_output(run, run.backend, run.ring.batch(slot, staged, stream))


def _consumer_stream(run: Run, backend: Backend) -> Any:
    if run.config.stream is not None:
        return run.config.stream
    if run.config.output == "torch" and hasattr(backend, "torch_stream"):
        return backend.torch_stream()
    return backend.current_stream()


def _to_output(run: Run, backend: Backend, batch: Any) -> Any:
    if run.config.output != "torch":
        return batch
    import torch
    import torch.utils.dlpack

    convert = torch.from_numpy if backend.name != "cupy" else torch.utils.dlpack.from_dlpack
    treedef, leaves = flatten(batch)
    return rebuild(treedef, [convert(leaf) for _, leaf in leaves])


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
