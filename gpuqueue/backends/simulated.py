"""Backends, simulated: copies finish late, to test the fences on a machine without a GPU.

Each stream is a helper thread that runs its operations (copies, event
records, waits on events, test "kernels") in order, after the call that
issued them has returned, as a GPU does. Events complete when their stream
reaches them. With ``fences=False``, ``wait_event`` and ``synchronize`` do
nothing, so a test can show that, without the fences, a slot is rewritten
while its previous batch is still being read.

Copies hold their buffers as a GPU does, by address alone: a copy that runs
after its pinned buffer was freed, or after its device arena was dropped or
freed, fails. Failures on a stream surface at the next ``synchronize``, as
CUDA's do, and stay in ``stream_errors``.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from ..errors import CancelledError
from ..sync.channel import FIFOQueue
from .numpy import NumpyBackend

__all__ = ["SimulatedBackend"]

_UNBOUNDED = 1 << 30


class SimEvent:
    """Counts how many times it was recorded, and how many of those completed."""

    def __init__(self) -> None:
        self.recorded = 0
        self.completed = 0
        self.at: float | None = None  # when it last completed (for timing)


class SimStream:
    """A helper thread running operations in the order they were issued."""

    def __init__(self, backend: SimulatedBackend, number: int) -> None:
        self.name = f"gpuqueue-simulated-stream{number}"
        self._ops: FIFOQueue[Callable[[], None]] = FIFOQueue(_UNBOUNDED, name=self.name)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._backend = backend
        self._thread.start()

    def issue(self, op: Callable[[], None]) -> None:
        self._ops.put(op)

    def _run(self) -> None:
        while True:
            try:
                op = self._ops.get()
            except CancelledError:
                return
            try:
                op()
            except CancelledError:
                return
            except BaseException as error:  # surfaces at the next synchronize
                with self._backend._cond:
                    self._backend.stream_errors.append(error)

    def close(self) -> None:
        self._ops.cancel()
        self._thread.join(5)


class SimulatedBackend(NumpyBackend):
    """NumPy memory with asynchronous, stream-ordered copies.

    Args:
        fences: Honour ``wait_event`` and ``synchronize``. Off only in tests
            that show what the fences prevent.
        on_copy: Called on the stream thread after each copy completes, with
            the copy's number (0, 1, ...), so tests can follow progress.
        copy_gate: If given, every copy waits for it to be set first, so a
            test can hold copies "in flight" as long as it needs.
    """

    name = "simulated"
    shares_host_memory = False  # it stands in for a GPU: every batch is copied, late

    def __init__(
        self,
        fences: bool = True,
        on_copy: Callable[[int], None] | None = None,
        copy_gate: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.fences = fences
        self.on_copy = on_copy
        self.copy_gate = copy_gate
        self.stream_errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._closing = False
        self._streams: list[SimStream] = []
        self._numbers = itertools.count()
        self._copies = itertools.count()
        self._default_stream: SimStream | None = None
        self._gates: list[threading.Event] = []
        self._freed_pinned: set[int] = set()  # addresses of pinned buffers freed
        self._freed_device: set[int] = set()  # addresses of device arenas freed

    def create_stream(self) -> SimStream:
        with self._cond:
            if self._closing:
                raise CancelledError("the simulated backend is closed")
            stream = SimStream(self, next(self._numbers))
            self._streams.append(stream)
            return stream

    def current_stream(self) -> SimStream:
        with self._cond:
            stream = self._default_stream
        if stream is None:
            stream = self.create_stream()
            with self._cond:
                self._default_stream = stream
        return stream

    def create_event(self, timing: bool = False) -> SimEvent:
        return SimEvent()

    def elapsed_s(self, start: SimEvent, end: SimEvent) -> float | None:
        with self._cond:
            if start.completed < start.recorded or end.completed < end.recorded:
                return None
            if start.at is None or end.at is None:
                return None
            return end.at - start.at

    def record(self, event: SimEvent, stream: SimStream) -> None:
        with self._cond:
            event.recorded += 1
            target = event.recorded

        def complete() -> None:
            with self._cond:
                event.completed = max(event.completed, target)
                event.at = time.perf_counter()
                self._cond.notify_all()

        stream.issue(complete)

    def _wait_for(self, event: SimEvent, target: int) -> None:
        with self._cond:
            while event.completed < target and not self._closing:
                self._cond.wait()
            if self._closing:
                raise CancelledError("the simulated backend is closed")

    def wait_event(self, stream: SimStream, event: SimEvent) -> None:
        if not self.fences:
            return
        target = event.recorded
        stream.issue(lambda: self._wait_for(event, target))

    def synchronize(self, event: SimEvent) -> None:
        if self.fences:
            self._wait_for(event, event.recorded)
        self._raise_stream_error()

    def _raise_stream_error(self) -> None:
        with self._cond:
            error = self.stream_errors[0] if self.stream_errors else None
        if error is not None:
            raise error

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        buffer = super().alloc_pinned(nbytes)
        with self._cond:
            self._freed_pinned.discard(buffer.ctypes.data)
        return buffer

    def free_pinned(self, buffer: np.ndarray) -> None:
        with self._cond:
            self._freed_pinned.add(buffer.ctypes.data)

    def alloc_device(self, nbytes: int, stream: Any) -> np.ndarray:
        arena = super().alloc_device(nbytes, stream)
        with self._cond:
            self._freed_device.discard(arena.ctypes.data)
        return arena

    def free_device(self, arena: Any, stream: SimStream | None) -> None:
        def free() -> None:
            # Holding the arena until now keeps its address from being handed out
            # again before the free runs, as a stream-ordered allocator does.
            with self._cond:
                self._freed_device.add(arena.ctypes.data)

        with self._cond:
            closing = self._closing
        if stream is None or closing:  # a closed backend runs nothing more: free at once
            free()
        else:
            stream.issue(free)

    def device_freed(self, arena: np.ndarray) -> bool:
        """True once a free of ``arena`` has run (for test kernels)."""
        with self._cond:
            return arena.ctypes.data in self._freed_device

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: SimStream) -> None:
        number = next(self._copies)
        device, host = weakref.ref(dst), src.ctypes.data  # as a GPU holds them: by address
        address = dst.ctypes.data

        def copy() -> None:
            if self.copy_gate is not None:
                self._wait_gate(self.copy_gate)
            target = device()
            with self._cond:
                source_freed = host in self._freed_pinned
                target_freed = address in self._freed_device
            if target is None:
                raise RuntimeError(f"copy {number}: its device buffer was dropped while queued")
            if target_freed:
                raise RuntimeError(f"copy {number}: its device arena was freed while queued")
            if source_freed:
                raise RuntimeError(f"copy {number}: its pinned buffer was freed while queued")
            np.copyto(target[:nbytes], src[:nbytes])
            if self.on_copy is not None:
                self.on_copy(number)

        stream.issue(copy)

    def copy_on_device(
        self, dst: Any, src: Any, offset: int, nbytes: int, stream: SimStream
    ) -> None:
        target, source = weakref.ref(dst), weakref.ref(src)  # by address, as a GPU holds them
        addresses = (dst.ctypes.data, src.ctypes.data)

        def copy() -> None:
            into, out_of = target(), source()
            with self._cond:
                freed = [a for a in addresses if a in self._freed_device]
            if into is None or out_of is None or freed:
                raise RuntimeError("a device-to-device copy's memory was freed while queued")
            np.copyto(into[:nbytes], out_of[offset : offset + nbytes])

        stream.issue(copy)

    def _wait_gate(self, gate: threading.Event) -> None:
        # The gate is the test's; closing the backend must still end the wait.
        with self._cond:
            self._gates.append(gate)
        gate.wait()
        if self._closing:
            raise CancelledError("the simulated backend is closed")

    def launch(self, stream: SimStream, kernel: Callable[[], None]) -> None:
        """Runs ``kernel`` on ``stream`` after the work issued before it (a test kernel)."""
        stream.issue(kernel)

    def transform_scope(
        self, stream: SimStream, allocate: Callable[[int], tuple[Any, object]]
    ) -> AbstractContextManager[None]:
        """A transform is host code here: it runs once the work queued on ``stream`` has.

        (On a GPU its kernels queue on the stream instead; the host waits for nothing.)
        """
        self.synchronize_stream(stream)
        return contextlib.nullcontext()

    def synchronize_stream(self, stream: SimStream) -> None:
        """Blocks until everything issued to ``stream`` so far has run."""
        event = self.create_event()
        self.record(event, stream)
        self._wait_for(event, event.recorded)
        self._raise_stream_error()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            streams, self._streams = self._streams, []
            gates, self._gates = self._gates, []
        for gate in gates:
            gate.set()
        for stream in streams:
            stream.close()
