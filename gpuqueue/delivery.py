"""The consumer's side of a run: queued items become the user's batches, in order.

``batches`` is the generator ``get()`` returns: it takes items off the run's
output queue, yields each batch (on a device, ordered after its copy on the
consumer's stream, in the output library the user asked for), and raises a
worker's error in its place, after every batch before it. Every batch is
the consumer's to keep: its device memory is reused only once the last view
of it is gone (``looper.DeviceArenas``). ``keep`` copies a batch all the same,
for code written against the older "valid until the next get" rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from .backends.base import Backend
from .errors import CancelledError, OutOfRangeError, note_thread
from .host import Item
from .pipeline import DEFAULT_STOP_TIMEOUT, Run
from .sources import Task
from .staging import flatten, rebuild, unpack

__all__ = ["batches", "keep"]


def batches(run: Run, received: Callable[[Task], None]) -> Iterator[Any]:
    """Yields the run's batches in order; ``received`` learns each task delivered.

    Ends when a finite source ends (the run is stopped) or another thread
    stops the run. A worker's error is raised in its place, stops the run,
    and is raised again by every later call (``Run.fail``).
    """
    queue = run.output_queue
    while True:
        if run.error is not None:
            raise run.error.with_traceback(run.error_traceback)
        started = time.monotonic()
        try:
            item = queue.get()
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
