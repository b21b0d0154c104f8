"""The CUDA backend, through CuPy. The only module of gpuqueue that imports CuPy.

Pinned memory comes straight from ``cudaHostAlloc`` (not CuPy's pinned pool,
which frees eagerly): a slot must live until its copy is done, and gpuqueue
tracks that itself. Copies are ``cudaMemcpyAsync`` on an explicit stream;
events have timing disabled and block (rather than spin) a host thread that
waits for them.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import cupy
import numpy as np

__all__ = ["CupyBackend", "device_count", "wrap_stream"]

_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
_HOST_ALLOC_PORTABLE = 1  # cudaHostAllocPortable: pinned for every context
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable


def device_count() -> int:
    """The number of usable GPUs; raises if the driver or runtime is missing."""
    return int(cupy.cuda.runtime.getDeviceCount())


def _free_all_pinned(device: int, pinned: dict[int, int]) -> None:
    # cudaFreeHost waits for the device, so a copy still reading a slot finishes first.
    with cupy.cuda.Device(device):
        for address in list(pinned):
            cupy.cuda.runtime.freeHost(address)
    pinned.clear()


class _StreamHandle:
    """A raw ``cudaStream_t`` that speaks the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def wrap_stream(stream: Any, device: int | None) -> Any:
    """A CuPy view of another library's CUDA stream (PyTorch's, say).

    Uses the CUDA stream protocol (``Stream.from_external``, CuPy 14+), on
    the stream itself where it speaks it, else on its raw handle
    (``cuda_stream``, as PyTorch names it); ``ExternalStream`` before CuPy 14.
    """
    if hasattr(cupy.cuda.Stream, "from_external"):
        if not hasattr(stream, "__cuda_stream__"):
            stream = _StreamHandle(int(stream.cuda_stream))
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, -1 if device is None else device)


def _address(buffer: np.ndarray) -> int:
    return int(buffer.ctypes.data)


class CupyBackend:
    """Pinned host slots, device arenas, a copy stream and events, on one GPU.

    Args:
        device: The GPU index.
    """

    name = "cupy"

    def __init__(self, device: int) -> None:
        self.device: int | None = device
        self._cuda_device = cupy.cuda.Device(device)
        self._pinned: dict[int, int] = {}  # address -> bytes, for free_pinned
        # Frees what is left if the backend is collected without close().
        self._finalizer = weakref.finalize(self, _free_all_pinned, device, self._pinned)
        self._torch_stream: tuple[int, Any] | None = None  # (handle, its CuPy view)

    def enter_device(self) -> None:
        self._cuda_device.use()

    # Host-memory calls run in any thread (workers, the consumer, a finaliser):
    # each enters the device, so none makes a context on GPU 0 by default.

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        nbytes = max(1, nbytes)
        with self._cuda_device:
            address = cupy.cuda.runtime.hostAlloc(nbytes, _HOST_ALLOC_PORTABLE)
        self._pinned[address] = nbytes
        raw = (ctypes.c_uint8 * nbytes).from_address(address)
        return np.ctypeslib.as_array(raw)

    def free_pinned(self, buffer: np.ndarray) -> None:
        address = _address(buffer)
        if self._pinned.pop(address, None) is not None:
            with self._cuda_device:
                cupy.cuda.runtime.freeHost(address)

    def register_host(self, buffer: np.ndarray) -> None:
        with self._cuda_device:
            cupy.cuda.runtime.hostRegister(_address(buffer), buffer.nbytes, _HOST_REGISTER_PORTABLE)

    def unregister_host(self, buffer: np.ndarray) -> None:
        with self._cuda_device:
            cupy.cuda.runtime.hostUnregister(_address(buffer))

    def alloc_device(self, nbytes: int) -> Any:
        with self._cuda_device:
            return cupy.empty(max(1, nbytes), dtype=cupy.uint8)

    def create_stream(self) -> Any:
        with self._cuda_device:
            return cupy.cuda.Stream(non_blocking=True)

    def current_stream(self) -> Any:
        with self._cuda_device:
            return cupy.cuda.get_current_stream()

    def torch_stream(self) -> Any:
        """PyTorch's current stream on this device, as a CuPy stream (for ``output="torch"``).

        Asked at every ``get``, so the view of the last one is kept.
        """
        import torch

        stream = torch.cuda.current_stream(self.device)
        last = self._torch_stream
        if last is None or last[0] != stream.cuda_stream:
            last = self._torch_stream = (stream.cuda_stream, wrap_stream(stream, self.device))
        return last[1]

    def create_event(self) -> Any:
        # Blocking: a host thread that must wait for one (a worker reusing a pinned
        # slot behind a slow consumer) sleeps instead of spinning on a core the
        # other workers need. A wait for an event already complete returns at once.
        with self._cuda_device:
            return cupy.cuda.Event(block=True, disable_timing=True)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        cupy.cuda.runtime.memcpyAsync(
            dst.data.ptr, _address(src), nbytes, _HOST_TO_DEVICE, stream.ptr
        )

    def close(self) -> None:
        self._finalizer()
