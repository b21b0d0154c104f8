"""Backends, the protocol every backend implements: memory, streams, events, one copy.

The pipeline is one code path; a backend only says how to allocate pinned
host memory and device memory, make streams and events, issue an
asynchronous host-to-device copy, and view device memory as an array that
keeps an owner alive. Streams, events and device arenas are opaque to the
pipeline.

A backend's methods may be called from any thread (workers, the copy
looper, the consumer, a finaliser); each runs in the backend's device
context without leaving a context behind on any other device.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

__all__ = ["Backend"]


class Backend(Protocol):
    """What the copy stage needs from a device."""

    name: str  # "numpy", "cupy", "simulated"
    device: int | None  # the GPU index, or None on the host
    # True where "device" memory is host memory (NumPy): a staged buffer can then
    # become the batch's arena as it is, instead of being copied into one.
    shares_host_memory: bool

    def enter_device(self) -> None:
        """Makes the device current in a thread gpuqueue owns (once, at its top)."""

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array; freed by ``free_pinned``."""

    def free_pinned(self, buffer: np.ndarray) -> None: ...

    def register_host(self, buffer: np.ndarray) -> None:
        """Page-locks memory allocated elsewhere (shared memory), in place."""

    def unregister_host(self, buffer: np.ndarray) -> None: ...

    def free_memory(self) -> int:
        """Bytes of device memory free now (on NumPy: the host's available memory)."""

    def alloc_device(self, nbytes: int, stream: Any) -> Any:
        """A device arena of ``nbytes`` bytes, usable in ``stream``'s order from now."""

    def free_device(self, arena: Any, stream: Any) -> None:
        """Frees ``arena`` once the work queued on ``stream`` so far is done (None: now)."""

    def device_view(self, arena: Any, nbytes: int, owner: object) -> Any:
        """``arena``'s first ``nbytes`` as a uint8 device array that keeps ``owner`` alive.

        Every view taken from it keeps ``owner`` alive too, so ``owner``'s
        finaliser runs once the last view of a batch is gone.
        """

    def create_stream(self) -> Any:
        """A non-blocking stream for copies."""

    def current_stream(self) -> Any:
        """The stream the consumer's work runs on by default."""

    def as_stream(self, stream: Any) -> Any:
        """The backend's form of a stream the user passed (a CuPy or PyTorch stream, say)."""

    def create_event(self, timing: bool = False) -> Any:
        """An event; with timing disabled unless ``timing``."""

    def record(self, event: Any, stream: Any) -> None:
        """Records ``event`` on ``stream``: it completes when the stream's work so far has."""

    def wait_event(self, stream: Any, event: Any) -> None:
        """Makes later work on ``stream`` wait for ``event`` (on the device, not the host)."""

    def synchronize(self, event: Any) -> None:
        """Blocks the calling thread until ``event`` has completed."""

    def elapsed_s(self, start: Any, end: Any) -> float | None:
        """Seconds between two completed timing events; None while either is pending."""

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        """Copies ``nbytes`` from host ``src`` to arena ``dst``, asynchronously on ``stream``."""

    def copy_on_device(self, dst: Any, src: Any, offset: int, nbytes: int, stream: Any) -> None:
        """Copies ``nbytes`` from arena ``src`` at ``offset`` to the start of arena ``dst``,
        asynchronously on ``stream`` (device to device: a batch's small leaves)."""

    def transform_scope(
        self, stream: Any, allocate: Callable[[int], tuple[Any, object]]
    ) -> AbstractContextManager[None]:
        """Where a batch transform runs: ``stream`` current, device memory from ``allocate``.

        ``allocate(nbytes)`` returns an arena and the owner whose death frees
        it; arrays the transform creates on the device keep that owner alive.
        Host backends run the transform on the host, after the copy has landed.
        """

    def close(self) -> None:
        """Releases what the backend itself holds (helper threads, pools)."""
