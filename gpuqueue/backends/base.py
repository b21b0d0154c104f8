"""The protocol every backend implements: memory, streams, events, one copy.

The pipeline is one code path; a backend only says how to allocate pinned
host memory and device memory, make streams and events, and issue an
asynchronous host-to-device copy. Streams and events are opaque to the
pipeline.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ["Backend"]


class Backend(Protocol):
    """What the copy stage needs from a device."""

    name: str  # "numpy", "cupy", "simulated"
    device: int | None  # the GPU index, or None on the host

    def enter_device(self) -> None:
        """Makes the device current in the calling thread (once per thread)."""

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array; freed by ``free_pinned``."""

    def free_pinned(self, buffer: np.ndarray) -> None: ...

    def register_host(self, buffer: np.ndarray) -> None:
        """Page-locks memory allocated elsewhere (shared memory), in place."""

    def unregister_host(self, buffer: np.ndarray) -> None: ...

    def alloc_device(self, nbytes: int) -> Any:
        """A device buffer of ``nbytes`` bytes."""

    def create_stream(self) -> Any:
        """A non-blocking stream for copies."""

    def current_stream(self) -> Any:
        """The stream the consumer's work runs on by default."""

    def create_event(self) -> Any:
        """An event with timing disabled."""

    def record(self, event: Any, stream: Any) -> None:
        """Records ``event`` on ``stream``: it completes when the stream's work so far has."""

    def wait_event(self, stream: Any, event: Any) -> None:
        """Makes later work on ``stream`` wait for ``event`` (on the device, not the host)."""

    def synchronize(self, event: Any) -> None:
        """Blocks the calling thread until ``event`` has completed."""

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        """Copies ``nbytes`` from host ``src`` to device ``dst`` asynchronously on ``stream``."""

    def close(self) -> None:
        """Releases what the backend itself holds (helper threads, pools)."""
