"""The consumer's side of a run: queued items become the user's batches, in order.

``batches`` is the generator ``get()`` returns (a generator, as Keras's
``fit`` requires of an iterator it is given): it takes items off the run's
output queue, yields each batch (on a device, ordered after its copy on the
consumer's stream, in the output library the user asked for), and raises a
worker's error in its place, after every batch before it. Every batch is
its taker's to keep, so several threads may consume one run, each through
a ``get()`` of its own (one generator, as any, runs in one thread at a time): a batch's
device memory is reused only once the last view of it is gone
(``looper.DeviceArenas``). ``keep`` copies a batch all the same, for code
written against the older "valid until the next get" rule.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np

from .backends.base import Backend
from .backends.numpy import owned_view
from .channel import FIFOQueue
from .errors import (
    BatchError,
    BatchTimeoutError,
    CancelledError,
    OutOfRangeError,
    ctrl_c_in,
    note_thread,
)
from .host import Item
from .packing import unpack
from .pipeline import DEFAULT_STOP_TIMEOUT, Run
from .staging import LeafMeta, TreeDef, as_source, flatten, map_arrays, rebuild
from .tasks import Task
from .transforms import BFloat16

__all__ = ["WARN_AFTER_S", "batches", "keep"]

logger = logging.getLogger("gpuqueue")

# Without a timeout, get() logs a warning naming what is in flight once it has
# waited this long for one batch, then waits on.
WARN_AFTER_S = 60.0


def batches(run: Run, received: Callable[[Task], None]) -> Generator[Any, None, None]:
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


def _batches(run: Run, received: Callable[[Task], None], delivered: list[int]) -> Iterator[Any]:
    """``batches``' loop; ``delivered[0]`` counts the batches it yields (its own count)."""
    queue, parts, coord, counters = run.output_queue, run.parts, run.coord, run.counters
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
                item = _next_item(run, queue)
            except BatchTimeoutError as error:
                run.fail(error)
                coord.request_stop(error)  # stop() then ends (or kills) what is stuck
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
        else:
            try:
                batch = _deliver(run, part)
            except CancelledError:  # stopped from another thread while copying (depth 0)
                return
            except _TransformFailed as failed:  # depth 0: the transform ran in this get()
                _stop_with(run, failed.error)
                continue
            except Exception as error:
                if ctrl_c_in(error) is not None:  # Ctrl-C in a wait of the copy (depth 0)
                    raise
                note_thread(error, f"delivering {part.task.where()}")
                _stop_with(run, error)
                continue
        delivered[0] += 1  # before the yield: stats() is exact while the consumer holds it
        # The batch is the consumer's: this frame must not keep it (and its arena)
        # alive while it waits here for the next call.
        handed = [batch]
        del batch, part, described
        yield handed.pop()


def _next_item(run: Run, queue: FIFOQueue[Item]) -> Item:
    """The next item, waiting at most ``timeout``, or warning once ``WARN_AFTER_S`` passed.

    Raises:
        BatchTimeoutError: If ``timeout`` passed with no item; it names what is in flight.
    """
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


def _stop_with(run: Run, error: BaseException) -> None:
    run.fail(error)
    run.coord.request_stop(error)
    run.stop(DEFAULT_STOP_TIMEOUT)


# Leaf kinds carried as 16-bit patterns: a torch.bfloat16 tensor, a transform's BFloat16.
_BFLOAT16 = ("torch:bfloat16", "bfloat16")


class _TransformFailed(Exception):
    """Carries a transform's error (already noted) out of ``_deliver``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _deliver(run: Run, item: Item) -> Any:
    """Turns a queued item into what the consumer receives."""
    described = item.described
    assert described is not None
    staged = described.staged
    if run.arenas is None:
        if staged is None:
            return item.batch
        # From a worker process: the batch is the shared-memory slot itself,
        # lent to the consumer (no copy: the worker's write into the slot was
        # the one). Every view keeps the lease; the slot goes back to the pool
        # when the last one dies, so the batch stays true as long as it is held.
        lease = staged.hand_over()
        arena = owned_view(staged.buffer, staged.nbytes, lease)
        batch = unpack(staged.treedef, staged.metas, arena)
        del lease, arena
        # The leaf types the source gave, as with threads (a tensor stays a tensor).
        return map_arrays(staged.treedef, staged.metas, batch, as_source)
    assert run.backend is not None
    stream = _consumer_stream(run, run.backend)
    copied = item.copied
    if copied is None:  # prefetch_depth=0: copy now, on the consumer's stream
        assert staged is not None
        run.arenas.reserve()
        try:
            copied = run.arenas.copy(staged, stream)
        except BaseException:  # as the copy looper: the slot goes back, the batch is gone
            staged.release(None)
            run.arenas.unreserve()
            raise
        if copied.error is not None:
            run.arenas.unreserve()
            note_thread(copied.error, f"transforming {item.task.where()}")
            raise _TransformFailed(copied.error)
    batch = run.arenas.deliver(copied, stream)
    if copied.transformed:
        assert copied.kinds is not None
        return _transformed_output(run, run.backend, batch, copied.kinds, stream)
    return _to_output(run, run.backend, batch, copied.treedef, copied.metas)


def _consumer_stream(run: Run, backend: Backend) -> Any:
    if run.config.stream is not None:
        return backend.as_stream(run.config.stream)
    if run.config.output == "torch" and hasattr(backend, "torch_stream"):
        return backend.torch_stream()
    return backend.current_stream()


def _to_output(
    run: Run, backend: Backend, batch: Any, treedef: TreeDef, metas: list[LeafMeta]
) -> Any:
    """Converts the device batch's array leaves to the library ``output`` names.

    Host leaves (``None``, strings) pass through. A ``bfloat16`` tensor, which
    travels as its bits, becomes ``bfloat16`` again in torch and JAX; NumPy
    and CuPy have no such dtype, so without one of those it is an error.
    """
    convert = _converter(run, backend)
    return map_arrays(treedef, metas, batch, lambda meta, leaf: convert(meta.kind, meta.path, leaf))


def _transformed_output(
    run: Run, backend: Backend, batch: Any, kinds: list[str | None], stream: Any
) -> Any:
    """A transform's batch in the ``output`` library: any structure, any leaves.

    The backend's arrays are converted (``BFloat16`` to bfloat16, and leaves
    the transform handed back as they came keep their kind); other leaves
    pass through. A PyTorch CUDA tensor the transform made on the copy
    stream is recorded on the consumer's stream (``record_stream``), so
    PyTorch's allocator reuses its memory only after the consumer's work.
    """
    convert = _converter(run, backend)
    array_type = getattr(backend, "array_type", np.ndarray)
    torch_stream = None
    treedef, leaves = flatten(batch)
    converted = []
    for (path, leaf), kind in zip(leaves, kinds, strict=True):
        if isinstance(leaf, BFloat16):
            converted.append(convert("bfloat16", path, leaf.bits))
        elif isinstance(leaf, array_type):
            converted.append(convert(kind or "array", path, leaf))
        else:
            if getattr(leaf, "is_cuda", False) and hasattr(leaf, "record_stream"):
                if torch_stream is None:
                    torch_stream = backend.torch_stream_of(stream)  # type: ignore[attr-defined]
                leaf.record_stream(torch_stream)
            converted.append(leaf)
    return rebuild(treedef, converted)


def _converter(run: Run, backend: Backend) -> Callable[[str, str, Any], Any]:
    """``convert(kind, path, leaf)``: a backend array in the library ``output`` names."""
    output = run.config.output
    if output == "torch":
        import torch
        import torch.utils.dlpack

        def to_torch(leaf: Any) -> Any:
            if backend.name != "cupy":
                return torch.from_numpy(leaf)
            # The batch is already ordered on the consumer's stream (one event for
            # the whole batch), so each leaf is exported with no stream order of
            # its own (DLPack's stream -1): no event per tensor.
            return torch.utils.dlpack.from_dlpack(leaf.__dlpack__(stream=-1))

        def convert(kind: str, path: str, leaf: Any) -> Any:
            tensor = to_torch(leaf)
            return tensor.view(torch.bfloat16) if kind in _BFLOAT16 else tensor

    elif output == "jax":
        # JAX orders its read after CuPy's current stream of the thread's current
        # device: on a GPU, have the enqueuer's device current in the consumer.
        import jax.dlpack
        import jax.numpy as jnp

        def convert(kind: str, path: str, leaf: Any) -> Any:
            try:
                array = jax.dlpack.from_dlpack(leaf)
            except BufferError:  # a read-only NumPy array: DLPack cannot say so
                array = jnp.asarray(leaf)
            return array.view(jnp.bfloat16) if kind in _BFLOAT16 else array

    else:

        def convert(kind: str, path: str, leaf: Any) -> Any:
            if kind in _BFLOAT16:
                what = "a torch.bfloat16 tensor" if kind == "torch:bfloat16" else "bfloat16"
                raise BatchError(
                    f"field {path} is {what}, which NumPy and CuPy have no dtype for; "
                    "use output='torch' or output='jax'"
                )
            return leaf

    return convert


def keep(batch: Any) -> Any:
    """Copies a batch: its arrays and tensors are copied, other leaves are kept as they are.

    Batches are their takers' already (they stay valid as long as they are
    held), so this is for code written for the older "valid until the next
    get" rule, or that wants a copy anyway. Works for CuPy, NumPy, PyTorch
    and JAX leaves (host leaves such as ``None`` or strings are returned as
    they are); a device copy is ordered on the current stream like any other
    work. With an enqueuer given an explicit ``stream``, call it with that
    stream current (``with stream:``), since only that stream is ordered
    after the batch's copy.
    """
    treedef, leaves = flatten(batch)
    return rebuild(treedef, [_copy_leaf(leaf) for _, leaf in leaves])


def _copy_leaf(leaf: Any) -> Any:
    if hasattr(leaf, "clone"):  # torch
        return leaf.clone()
    if hasattr(leaf, "copy") and hasattr(leaf, "shape"):  # NumPy, CuPy, JAX
        return leaf.copy()
    return leaf  # a host leaf (None, a string): never in a reused slot
