"""The NumPy backend: the host stands in for the device, copies happen at once."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..staging import LeafMeta

__all__ = ["NumpyBackend"]


class _Event:
    """A completed event: NumPy copies are done when the call returns."""

    __slots__ = ()


class NumpyBackend:
    """Ordinary memory for "pinned" and "device" buffers; copies are ``memcpy``.

    NumPy releases the GIL during large copies, so workers and the copy
    stage still overlap.
    """

    name = "numpy"
    device: int | None = None

    def __init__(self) -> None:
        self._device_bytes = 0

    def enter_device(self) -> None:
        pass

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, dtype=np.uint8)

    def free_pinned(self, buffer: np.ndarray) -> None:
        pass

    def register_host(self, buffer: np.ndarray) -> None:
        pass

    def unregister_host(self, buffer: np.ndarray) -> None:
        pass

    def alloc_device(self, nbytes: int) -> np.ndarray:
        self._device_bytes += nbytes
        return np.empty(nbytes, dtype=np.uint8)

    def free_device(self, buffer: np.ndarray) -> None:
        self._device_bytes -= buffer.nbytes

    def create_stream(self) -> Any:
        return None

    def current_stream(self) -> Any:
        return None

    def create_event(self) -> Any:
        return _Event()

    def record(self, event: Any, stream: Any) -> None:
        pass

    def wait_event(self, stream: Any, event: Any) -> None:
        pass

    def synchronize(self, event: Any) -> None:
        pass

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        np.copyto(dst[:nbytes], src[:nbytes])

    def view(self, arena: Any, meta: LeafMeta) -> Any:
        count = math.prod(meta.shape)
        flat = arena[meta.offset : meta.offset + count * meta.dtype.itemsize].view(meta.dtype)
        return flat.reshape(meta.shape)

    def device_bytes(self) -> int:
        return self._device_bytes

    def close(self) -> None:
        pass
