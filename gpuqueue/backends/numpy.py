"""Backends, NumPy: the host stands in for the device, copies happen at once."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

__all__ = ["NumpyBackend", "available_host_memory", "owned_view"]


class _Event:
    """A completed event: NumPy copies are done when the call returns.

    A timing event keeps the host clock of its last record.
    """

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at: float | None = None


def available_host_memory() -> int:
    """The host's available memory in bytes (Linux's MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def owned_view(arena: np.ndarray, nbytes: int, owner: object) -> np.ndarray:
    """``arena[:nbytes]`` as a new uint8 array whose every view keeps ``owner`` alive.

    NumPy collapses a view's ``base`` to the array that owns the memory, so a
    plain slice of ``arena`` would tie the batch's views to the arena, not to
    ``owner``. A ctypes array over the same bytes is a base of its own.
    """
    raw = (ctypes.c_uint8 * max(1, nbytes)).from_address(arena.ctypes.data)
    raw.owner = owner  # type: ignore[attr-defined]
    raw.arena = arena  # type: ignore[attr-defined]
    return np.frombuffer(memoryview(raw), dtype=np.uint8, count=nbytes)


class NumpyBackend:
    """Ordinary memory for "pinned" and "device" buffers; copies are ``memcpy``.

    The host is the device, so the copy stage hands a thread worker's staged
    buffer over as the batch's arena and gives the slot other memory, with
    no copy at all (``shares_host_memory``); from shared memory (worker
    processes) it copies. NumPy releases the GIL during large copies.
    """

    name = "numpy"
    device: int | None = None
    shares_host_memory = True
    array_type = np.ndarray

    def enter_device(self) -> None:
        pass

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        return np.empty(max(1, nbytes), dtype=np.uint8)

    def free_pinned(self, buffer: np.ndarray) -> None:
        pass

    def register_host(self, buffer: np.ndarray) -> None:
        pass

    def unregister_host(self, buffer: np.ndarray) -> None:
        pass

    def free_memory(self) -> int:
        return available_host_memory()

    def alloc_device(self, nbytes: int, stream: Any) -> np.ndarray:
        return np.empty(max(1, nbytes), dtype=np.uint8)

    def free_device(self, arena: Any, stream: Any) -> None:
        pass  # the garbage collector frees it with its last view

    def device_view(self, arena: Any, nbytes: int, owner: object) -> np.ndarray:
        return owned_view(arena, nbytes, owner)

    def create_stream(self) -> Any:
        return None

    def current_stream(self) -> Any:
        return None

    def as_stream(self, stream: Any) -> Any:
        return stream

    def create_event(self, timing: bool = False) -> Any:
        return _Event()

    def record(self, event: Any, stream: Any) -> None:
        event.at = time.perf_counter()

    def wait_event(self, stream: Any, event: Any) -> None:
        pass

    def synchronize(self, event: Any) -> None:
        pass

    def elapsed_s(self, start: Any, end: Any) -> float | None:
        if start.at is None or end.at is None:
            return None
        return float(end.at - start.at)

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        np.copyto(dst[:nbytes], src[:nbytes])

    def copy_on_device(self, dst: Any, src: Any, offset: int, nbytes: int, stream: Any) -> None:
        np.copyto(dst[:nbytes], src[offset : offset + nbytes])

    def transform_scope(
        self, stream: Any, allocate: Callable[[int], tuple[Any, object]]
    ) -> AbstractContextManager[None]:
        # The copy is done when copy_to_device returns; NumPy allocates on its own.
        return contextlib.nullcontext()

    def close(self) -> None:
        pass
