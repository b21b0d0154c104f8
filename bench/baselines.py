"""What gpuqueue is measured against, in the same run, on the same batches and step.

Each function returns seconds per step (or GB/s for the raw copies). On the
NumPy fallback "device" memory is host memory, and a copy is ``np.copyto``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np

Timed = tuple[float, int]  # seconds per step, steps measured


def _loop(batches: Iterator[Any], step: Any, n: int, warmup: int) -> float:
    """Seconds per step over ``n`` steps, after ``warmup`` steps, synchronised at both ends."""
    for _ in range(warmup):
        step(next(batches))
    step.synchronize()
    began = time.perf_counter()
    for _ in range(n):
        step(next(batches))
    step.synchronize()
    return (time.perf_counter() - began) / n


def _cycle(seq: Any) -> Iterator[Any]:
    while True:
        for index in range(len(seq)):
            yield seq[index]


def raw_copy_gbps(backend: str, nbytes: int, n: int, pinned: bool = True) -> float:
    """Back-to-back host-to-device copies of one buffer: the ceiling (pinned) or pageable."""
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

    host = cupyx.empty_pinned(nbytes, np.uint8) if pinned else np.empty(nbytes, np.uint8)
    host[:] = 1
    device = cupy.empty(nbytes, cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    pointer = host.ctypes.data
    copy = cupy.cuda.runtime.memcpyAsync
    copy(device.data.ptr, pointer, nbytes, 1, stream.ptr)
    stream.synchronize()
    began = time.perf_counter()
    for _ in range(n):
        copy(device.data.ptr, pointer, nbytes, 1, stream.ptr)
    stream.synchronize()
    return nbytes * n / (time.perf_counter() - began) / 1e9


def resident(backend: str, nbytes: int, step: Any, n: int, warmup: int) -> float:
    """Step time with the data already on the device: the loop's lower bound."""
    if backend == "cupy":
        import cupy

        batch = cupy.ones(nbytes, cupy.uint8)
    else:
        batch = np.ones(nbytes, np.uint8)

    def same() -> Iterator[Any]:
        while True:
            yield batch

    return _loop(same(), step, n, warmup)


def synchronous(backend: str, seq: Any, step: Any, n: int, warmup: int) -> float:
    """No prefetch: copy each batch (from pageable memory) in the loop, then step."""
    if backend == "cupy":
        import cupy

        to_device = cupy.asarray
    else:

        def to_device(array: np.ndarray) -> np.ndarray:
            return np.array(array, copy=True)

    def batches() -> Iterator[Any]:
        for host in _cycle(seq):
            yield to_device(host)

    return _loop(batches(), step, n, warmup)


def one_ahead(backend: str, seq: Any, step: Any, n: int, warmup: int) -> float:
    """The prefetcher many scripts write by hand: the next batch copies while this one steps.

    On a GPU: two pinned and two device buffers, a side stream, an event per
    buffer. On the NumPy fallback: a helper thread copying one batch ahead.
    """
    if backend != "cupy":
        ahead: queue.Queue[np.ndarray] = queue.Queue(maxsize=1)
        stop = threading.Event()

        def fill() -> None:
            for host in _cycle(seq):
                while not stop.is_set():
                    try:
                        ahead.put(np.array(host, copy=True), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return

        helper = threading.Thread(target=fill, name="bench-one-ahead", daemon=True)
        helper.start()

        def taken() -> Iterator[Any]:
            while True:
                yield ahead.get()

        try:
            return _loop(taken(), step, n, warmup)
        finally:
            stop.set()
            helper.join(5)

    import cupy
    import cupyx

    nbytes = seq[0].nbytes
    pinned = [cupyx.empty_pinned(nbytes, np.uint8) for _ in range(2)]
    device = [cupy.empty(nbytes, cupy.uint8) for _ in range(2)]
    ready = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
    side = cupy.cuda.Stream(non_blocking=True)
    source = _cycle(seq)

    def load(slot: int) -> None:
        ready[slot].synchronize()  # the previous copy out of this pinned buffer is done
        np.copyto(pinned[slot], next(source))
        cupy.cuda.runtime.memcpyAsync(
            device[slot].data.ptr, pinned[slot].ctypes.data, nbytes, 1, side.ptr
        )
        ready[slot].record(side)

    def batches() -> Iterator[Any]:
        load(0)
        i = 0
        while True:
            slot = i % 2
            cupy.cuda.get_current_stream().wait_event(ready[slot])
            # the previous step read the other buffer; make the side stream wait for it
            side.wait_event(cupy.cuda.get_current_stream().record())
            load(1 - slot)
            yield device[slot]
            i += 1

    return _loop(batches(), step, n, warmup)


def torch_dataloader(seq: Any, step: Any, workers: int, n: int, warmup: int) -> float:
    """``DataLoader(pin_memory=True)`` with ``.cuda(non_blocking=True)`` (GPU only)."""
    import cupy
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Wrapped(Dataset[Any]):  # type: ignore[misc, unused-ignore]  # Any without torch stubs
        def __len__(self) -> int:
            return len(seq)

        def __getitem__(self, index: int) -> Any:
            return torch.from_numpy(seq[index])

    gpu = cupy.cuda.Device().id  # the GPU the benchmark made current
    loader = DataLoader(
        Wrapped(), batch_size=None, num_workers=workers, pin_memory=True, persistent_workers=True
    )

    def batches() -> Generator[Any, None, None]:
        while True:
            for host in loader:
                on_device = host.cuda(gpu, non_blocking=True)
                yield cupy.from_dlpack(on_device)

    feed = batches()
    try:
        with _cupy_view(torch.cuda.current_stream(gpu)):
            return _loop(feed, step, n, warmup)
    finally:
        # The loader goes with this frame; its iterator's finaliser ends the worker processes.
        feed.close()


def tf_keras_enqueuer(seq: Any, step: Any, workers: int, n: int, warmup: int) -> float:
    """``tf_keras.utils.OrderedEnqueuer`` with a copy into "device" memory (NumPy fallback)."""
    from tf_keras.utils import OrderedEnqueuer

    enqueuer = OrderedEnqueuer(seq, use_multiprocessing=False, shuffle=False)
    enqueuer.start(workers=workers, max_queue_size=10)
    device = np.empty_like(seq[0])

    def batches() -> Iterator[Any]:
        for host in enqueuer.get():
            np.copyto(device, host)
            yield device

    try:
        return _loop(batches(), step, n, warmup)
    finally:
        enqueuer.stop()


class _StreamProtocol:
    """A raw ``cudaStream_t`` that speaks the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def _cupy_view(torch_stream: Any) -> Any:
    """PyTorch's stream as a CuPy stream, so CuPy work runs in its order."""
    import cupy

    return cupy.cuda.Stream.from_external(_StreamProtocol(int(torch_stream.cuda_stream)))
