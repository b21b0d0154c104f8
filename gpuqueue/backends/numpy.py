"""The NumPy backend: the host stands in for the device, copies happen at once."""

from __future__ import annotations

from typing import Any

import numpy as np

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
        return np.empty(nbytes, dtype=np.uint8)

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

    def close(self) -> None:
        pass
