"""What gpuqueue is measured against, on the same batches and step, in the same rounds.

Each baseline is a *feed*: a generator of batches ready for the step, which
cleans up after itself when closed. ``timed`` runs the one training loop
every row shares over any feed. On a GPU each feed moves its batches to the
device as its users would; on the NumPy fallback there is no device, and a
feed hands over what its users would use on that machine: the one-ahead
loop copies each batch into a fresh array (its "device" copy, as gpuqueue's
NumPy backend does), while ``DataLoader`` and ``tf_keras`` hand over the
batch as it was read.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Feed = Iterator[Any]


def timed(feed: Feed, step: Any, n: int, warmup: int) -> dict[str, float]:
    """Seconds per step over ``n`` steps after ``warmup``, synchronised at both ends.

    The feed is closed afterwards (its workers stop), also on error.
    """
    try:
        for _ in range(warmup):
            step(next(feed))
        step.synchronize()
        began = time.perf_counter()
        for _ in range(n):
            step(next(feed))
        step.synchronize()
        elapsed = time.perf_counter() - began
    finally:
        close = getattr(feed, "close", None)
        if close is not None:
            close()
    return {"step_time_s": elapsed / n, "batches_per_s": n / elapsed}


def cycle(seq: Any) -> Iterator[Any]:
    """The Sequence's batches in index order, epoch after epoch."""
    while True:
        for index in range(len(seq)):
            yield seq[index]


def raw_copy_gbps(backend: str, nbytes: int, n: int) -> float:
    """Back-to-back copies of one buffer from pinned memory: the ceiling of any loader."""
    if backend != "cupy":
        host = np.ones(nbytes, np.uint8)
        device = np.empty(nbytes, np.uint8)
        np.copyto(device, host)
        began = time.perf_counter()
        for _ in range(n):
            np.copyto(device, host)
        return nbytes * n / (time.perf_counter() - began) / 1e9
    import cupy
    import cupyx

    host = cupyx.empty_pinned(nbytes, np.uint8)
    host[:] = 1
    device = cupy.empty(nbytes, cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    copy = cupy.cuda.runtime.memcpyAsync
    copy(device.data.ptr, host.ctypes.data, nbytes, 1, stream.ptr)
    stream.synchronize()
    began = time.perf_counter()
    for _ in range(n):
        copy(device.data.ptr, host.ctypes.data, nbytes, 1, stream.ptr)
    stream.synchronize()
    return nbytes * n / (time.perf_counter() - began) / 1e9


def resident(backend: str, nbytes: int) -> Feed:
    """One batch already on the device, again and again: the step alone, the loop's floor."""
    if backend == "cupy":
        import cupy

        batch = cupy.ones(nbytes, cupy.uint8)
    else:
        batch = np.ones(nbytes, np.uint8)
    while True:
        yield batch


def one_ahead(backend: str, seq: Any) -> Feed:
    """The prefetcher many scripts write by hand: the next batch copies while this one steps.

    On a GPU: two pinned and two device buffers used in turn, a side stream,
    an event per buffer; each batch is valid only until the next one (the
    loop overwrites its buffer), which is what makes it cheap. On the NumPy
    fallback: a helper thread copying one batch ahead into a fresh array.
    """
    if backend == "cupy":
        yield from _one_ahead_cuda(seq)
        return
    ahead: queue.Queue[np.ndarray] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def fill() -> None:
        for host in cycle(seq):
            ahead.put(np.array(host, copy=True))  # waits while one batch is ahead
            if stop.is_set():
                return

    helper = threading.Thread(target=fill, name="bench-one-ahead", daemon=True)
    helper.start()
    try:
        while True:
            yield ahead.get()
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):  # make room: a helper in put() wakes and ends
            ahead.get_nowait()
        helper.join()


def _one_ahead_cuda(seq: Any) -> Feed:
    import cupy
    import cupyx

    nbytes = seq[0].nbytes
    pinned = [cupyx.empty_pinned(nbytes, np.uint8) for _ in range(2)]
    device = [cupy.empty(nbytes, cupy.uint8) for _ in range(2)]
    ready = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
    side = cupy.cuda.Stream(non_blocking=True)
    source = cycle(seq)

    def load(slot: int) -> None:
        ready[slot].synchronize()  # the previous copy out of this pinned buffer is done
        np.copyto(pinned[slot], next(source))
        cupy.cuda.runtime.memcpyAsync(
            device[slot].data.ptr, pinned[slot].ctypes.data, nbytes, 1, side.ptr
        )
        ready[slot].record(side)

    load(0)
    i = 0
    while True:
        slot = i % 2
        cupy.cuda.get_current_stream().wait_event(ready[slot])
        # the previous step read the other buffer; the side stream waits for it
        side.wait_event(cupy.cuda.get_current_stream().record())
        load(1 - slot)
        yield device[slot]
        i += 1


def torch_dataloader(backend: str, seq: Any, num_workers: int) -> Feed:
    """``DataLoader(batch_size=None, num_workers=...)`` over the Sequence.

    On a GPU with ``pin_memory=True`` and ``.cuda(non_blocking=True)``, as its
    docs advise; on the NumPy fallback the tensors as NumPy arrays (no copy).
    """
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Batches(Dataset[Any]):  # type: ignore[misc, unused-ignore]  # Any without torch stubs
        def __len__(self) -> int:
            return len(seq)

        def __getitem__(self, index: int) -> Any:
            return torch.from_numpy(seq[index])

    on_gpu = backend == "cupy"
    loader = DataLoader(
        Batches(), batch_size=None, num_workers=num_workers, pin_memory=on_gpu, shuffle=False
    )
    if not on_gpu:
        while True:
            for batch in loader:  # an epoch's iterator ends its workers when dropped
                yield batch.numpy()
    import cupy

    gpu = cupy.cuda.Device().id  # the GPU the benchmark made current
    with _cupy_view(torch.cuda.current_stream(gpu)):
        while True:
            for host in loader:
                yield cupy.from_dlpack(host.cuda(gpu, non_blocking=True))


def tf_keras_missing() -> str | None:
    """Why ``tf_keras``'s enqueuer cannot run here, or None if it can."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter
    try:
        import tf_keras.utils  # noqa: F401
    except ImportError as error:
        return f"tf_keras not installed ({error.name or error}): pip install tf-keras"
    return None


def tf_keras_enqueuer(backend: str, seq: Any, workers: int) -> Feed:
    """``tf_keras.utils.OrderedEnqueuer`` (threads); on a GPU each batch then ``cupy.asarray``."""
    from tf_keras.utils import OrderedEnqueuer

    to_device: Callable[[Any], Any] = lambda batch: batch  # noqa: E731
    if backend == "cupy":
        import cupy

        to_device = cupy.asarray
    enqueuer = OrderedEnqueuer(seq, use_multiprocessing=False, shuffle=False)
    enqueuer.start(workers=workers, max_queue_size=10)
    try:
        for batch in enqueuer.get():
            yield to_device(batch)
    finally:
        enqueuer.stop()


class _StreamProtocol:
    """A raw ``cudaStream_t`` that speaks the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _cupy_view(torch_stream: Any) -> Any:
    """PyTorch's stream as a CuPy stream, so CuPy work runs in its order (``from_external``
    on CuPy 14 and later, ``ExternalStream`` on the CuPy 13 that ``pyproject`` allows)."""
    from gpuqueue.backends.cupy import external_stream

    return external_stream(_StreamProtocol(int(torch_stream.cuda_stream)))
