"""Device memory the consumer owns: an arena per batch, reused once the batch is dropped.

The copy stage takes an arena for each batch (reusing a free one, or
allocating one in the copy stream's order), copies into it, and records the
batch's "ready" event. The consumer gets views of the arena that all keep one
lease alive; when the last of them dies, "released" is recorded on the
consumer's stream and the arena goes back for reuse, and the copy stream
waits on "released" before writing it again: the semantics of PyTorch's
caching allocator with ``record_stream``, so a batch stays valid for as long
as it is held. No host synchronize on this path, growth included.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend
from .errors import CancelledError
from .packing import Staged, arena_view
from .staging import LeafMeta, TreeDef, rebuild

__all__ = ["GROWTH", "Copied", "DeviceArena", "DeviceArenas"]

GROWTH = 1.25  # an arena takes a margin over the largest batch, so growing batches settle


@dataclass(eq=False)
class DeviceArena:
    """Device memory for one batch at a time, and the event its last consumer recorded."""

    memory: Any
    capacity: int
    released: Any  # recorded on the consumer's stream when the last view of its batch died
    released_once: bool = False


@dataclass(eq=False)
class Copied:
    """A batch copied (or being copied) into an arena; ``ready`` marks the copy complete."""

    arena: DeviceArena
    ready: Any
    treedef: TreeDef
    metas: list[LeafMeta]
    nbytes: int


class _Lease:
    """Owns a delivered batch's arena: its finaliser runs when the batch's last view dies."""

    __slots__ = ("__weakref__",)


_TIMING_EVERY = 16  # one copy in this many is timed with device events


class DeviceArenas:
    """Device memory for batches: an arena per batch in flight or held by the consumer.

    An arena goes back for reuse when the consumer drops the last view of its
    batch (and up to ``keep`` are kept for reuse; the rest are freed), so a
    batch stays valid as long as the consumer holds it: ``list(batches)``
    keeps true values. At most ``depth`` batches are copied ahead of the
    consumer (``reserve``); what the consumer holds comes on top.

    Args:
        backend: Allocates, copies and fences.
        depth: The most batches copied and not yet delivered.
        keep: The most free arenas kept for reuse.
    """

    def __init__(self, backend: Backend, depth: int, keep: int) -> None:
        self.backend = backend
        self._depth, self._keep = max(1, depth), keep
        self._cond = threading.Condition()
        self._free: list[DeviceArena] = []
        self._in_flight = 0  # copied (or reserved) and not yet delivered
        self._cancelled = False
        self._closed = False
        self.largest = 0  # the largest batch seen: every new arena takes it, with a margin
        self.device_bytes = 0  # allocated now: free, in flight, and held by the consumer
        self.bytes_copied = 0
        self._copies = 0
        self._timings: list[tuple[Any, Any, int]] = []  # (start, end, nbytes) not yet read
        self.timed_bytes = 0
        self.timed_s = 0.0

    def reserve(self) -> None:
        """Waits until fewer than ``depth`` batches are ahead of the consumer, then counts one.

        Raises:
            CancelledError: If the arenas were cancelled (the pipeline is stopping).
        """
        with self._cond:
            while self._in_flight >= self._depth and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise CancelledError("the pipeline is stopping")
            self._in_flight += 1

    def set_depth(self, depth: int) -> None:
        """From now on, at most ``depth`` batches are copied ahead (``prefetch_depth="auto"``)."""
        with self._cond:
            self._depth = max(1, depth)
            self._cond.notify_all()

    def unreserve(self) -> None:
        """One batch reserved or copied ahead will not be delivered."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify()

    def cancel(self) -> None:
        """Wakes the copy looper if it waits in ``reserve``."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def copy(self, staged: Staged, stream: Any) -> Copied:
        """Copies ``staged`` into an arena on ``stream``; the pinned slot goes back fenced.

        The arena is written only after the work of its last consumer (its
        ``released`` event); a free arena too small for the batch is freed in
        that same stream order, never with a host synchronize.
        """
        backend = self.backend
        self.largest = max(self.largest, staged.nbytes)
        arena = self._take(stream)
        if staged.exchange is not None and backend.shares_host_memory:
            return self._adopt(staged, arena)
        if arena is None:
            capacity = max(1, int(self.largest * GROWTH))
            arena = DeviceArena(backend.alloc_device(capacity, stream), capacity, None)
            arena.released = backend.create_event()
            with self._cond:
                self.device_bytes += capacity
        elif arena.released_once:
            backend.wait_event(stream, arena.released)
        try:
            ready = backend.create_event()
            timed = self._copies % _TIMING_EVERY == 0
            if timed:
                start, end = backend.create_event(timing=True), backend.create_event(timing=True)
                backend.record(start, stream)
            backend.copy_to_device(arena.memory, staged.buffer, staged.nbytes, stream)
            if timed:
                backend.record(end, stream)
                self._timings.append((start, end, staged.nbytes))
            backend.record(ready, stream)
        except BaseException:
            self._retire(arena, stream)  # in stream order after whatever was issued
            raise
        staged.release(ready)  # this copy's own event: exact, never re-recorded
        self._copies += 1
        self.bytes_copied += staged.nbytes
        self._read_timings()
        return Copied(arena, ready, staged.treedef, staged.metas, staged.nbytes)

    def _adopt(self, staged: Staged, arena: DeviceArena | None) -> Copied:
        """The host is the device: the staged buffer becomes the batch's arena, uncopied.

        The slot takes the free arena's memory in exchange (or new memory on
        its next use), so the bytes are written once, by the worker, and a
        CPU run costs what a run with no device does, plus that one pack.
        """
        assert staged.exchange is not None
        memory = staged.exchange(None if arena is None else arena.memory)
        if arena is None:
            arena = DeviceArena(memory, 0, self.backend.create_event())
        with self._cond:
            self.device_bytes += memory.nbytes - arena.capacity
        arena.memory, arena.capacity = memory, int(memory.nbytes)
        ready = self.backend.create_event()
        self.backend.record(ready, None)
        staged.release(ready)
        self._copies += 1
        self.bytes_copied += staged.nbytes
        return Copied(arena, ready, staged.treedef, staged.metas, staged.nbytes)

    def _take(self, stream: Any) -> DeviceArena | None:
        """A free arena that holds the largest batch seen; smaller ones are freed.

        Every arena grows straight to the largest batch, so batch sizes that
        vary settle on one arena size, and memory stays flat.
        """
        while True:
            with self._cond:
                if not self._free:
                    return None
                arena = self._free.pop()
            if arena.capacity >= self.largest:
                return arena
            self._retire(arena, stream)

    def _retire(self, arena: DeviceArena, stream: Any) -> None:
        if arena.released_once and stream is not None:
            self.backend.wait_event(stream, arena.released)
        elif arena.released_once:
            self.backend.synchronize(arena.released)
        self.backend.free_device(arena.memory, stream)
        with self._cond:
            self.device_bytes -= arena.capacity

    def _put_free(self, arena: DeviceArena) -> bool:
        with self._cond:
            if self._closed or len(self._free) >= self._keep:
                return False
            self._free.append(arena)
            return True

    def _read_timings(self) -> None:
        """Adds the samples whose events have completed (never waits for one)."""
        pending = []
        for start, end, nbytes in self._timings:
            seconds = self.backend.elapsed_s(start, end)
            if seconds is None:
                pending.append((start, end, nbytes))
            else:
                self.timed_bytes += nbytes
                self.timed_s += seconds
        self._timings = pending

    def deliver(self, copied: Copied, consumer_stream: Any) -> Any:
        """The batch as device arrays the consumer owns, ordered after its copy on its stream."""
        self.unreserve()  # no longer ahead of the consumer
        try:
            self.backend.wait_event(consumer_stream, copied.ready)
        except BaseException:
            self.discard(copied)
            raise
        lease = _Lease()
        # Not at exit: the interpreter's end frees everything, and the device may be gone.
        weakref.finalize(lease, self._give_back, copied.arena, consumer_stream).atexit = False
        whole = self.backend.device_view(copied.arena.memory, copied.nbytes, lease)
        return rebuild(copied.treedef, [arena_view(whole, meta) for meta in copied.metas])

    def _give_back(self, arena: DeviceArena, consumer_stream: Any) -> None:
        """The last view of a batch died: its arena is reusable after the consumer's work."""
        with self._cond:
            closed = self._closed
        try:
            if not closed:
                self.backend.record(arena.released, consumer_stream)
                arena.released_once = True
                if self._put_free(arena):
                    return
            # Freed in the consumer's stream order, so after the work it queued.
            self.backend.free_device(arena.memory, consumer_stream)
        except Exception:
            # A finaliser has nobody to raise to. The arena is dropped; the backend's
            # safety net frees its memory once the device is done with it, and a
            # broken device says so at the consumer's next call.
            pass
        with self._cond:
            self.device_bytes -= arena.capacity

    def discard(self, copied: Copied) -> None:
        """An undelivered batch (dropped on stop): its arena is freed once its copy is done."""
        self.backend.synchronize(copied.ready)
        self.backend.free_device(copied.arena.memory, None)
        with self._cond:
            self.device_bytes -= copied.arena.capacity

    @property
    def h2d_gbps(self) -> float:
        """Bytes over seconds of the timed copies, as the device measured them."""
        return self.timed_bytes / self.timed_s / 1e9 if self.timed_s > 0 else 0.0

    def close(self) -> None:
        """Frees every free arena once the GPU is done with it; held ones go with their batch.

        A copy writes through a raw pointer and the consumer's kernels read
        through one: memory handed back while either is still queued could
        be given to someone else and overwritten (or read) from under them.
        """
        with self._cond:
            self._closed = self._cancelled = True
            free, self._free = self._free, []
            self._cond.notify_all()
        for arena in free:
            self._retire(arena, None)
