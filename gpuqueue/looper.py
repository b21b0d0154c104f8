"""The copy stage: pinned host slots, device arenas, the copy looper, the consumer's fences.

::

    worker ──pack──▶ pinned slot ──host queue──▶ CopyLooper ──memcpyAsync──▶ device arena
                                                  (copy stream)                     │
                                         device queue (prefetch_depth) ◀── ready ───┘
                                                  │
    consumer: its stream waits on "ready" and it gets views of the arena. The
    batch is the consumer's: when the last view of it dies, "released" is
    recorded on the consumer's stream, the arena goes back for reuse, and the
    copy stream waits on "released" before writing it again.

Two fences, both on the device, never a host synchronize on the hot path:

- a pinned slot goes back to its pool with the event of the copy that read
  it (that copy's own, never re-recorded); whoever takes the slot next waits
  for that event first (by then the copy has long finished, so it is free);
- a device arena is rewritten (or freed) only in stream order after the
  consumer's work on the batch it held, as PyTorch's caching allocator does
  with ``record_stream``.

Backends only say how to allocate, copy and fence (``backends.base``); this
module is the one code path for all of them.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import Backend
from .channel import FIFOQueue
from .coordinator import Coordinator, LooperThread
from .errors import CancelledError, OutOfRangeError, note_thread
from .staging import LeafMeta, TreeDef, arena_view, pack, rebuild

__all__ = [
    "Copied",
    "CopyLooper",
    "DeviceArena",
    "DeviceArenas",
    "PinnedPool",
    "PinnedSlot",
    "Staged",
]

_GROWTH = 1.25  # a slot that must grow takes a margin, so slowly growing batches settle


@dataclass
class PinnedSlot:
    """A page-locked host buffer, and the event of the last copy that read it."""

    buffer: np.ndarray | None = None
    copy_done: Any = None

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.nbytes)


@dataclass
class Staged:
    """A batch packed into one host arena, ready for one host-to-device copy."""

    treedef: TreeDef
    metas: list[LeafMeta]
    nbytes: int
    buffer: np.ndarray  # uint8, at least nbytes long
    give_back: Callable[[Any], None]  # returns the slot to its pool, fenced by an event
    released: bool = False

    def release(self, copy_done: Any = None) -> None:
        """Returns the slot to its pool, once: the next user waits for ``copy_done``.

        Idempotent, because an item can be dropped (on stop) after its copy
        already gave the slot back.
        """
        if not self.released:
            self.released = True
            self.give_back(copy_done)


class PinnedPool:
    """A fixed number of pinned slots, allocated once, grown only when a batch does not fit.

    Args:
        backend: Allocates and fences.
        count: Number of slots (workers + max_queue_size + 1).
        name: For the pool's queue.
    """

    def __init__(self, backend: Backend, count: int, name: str) -> None:
        self._backend = backend
        self._slots = [PinnedSlot() for _ in range(count)]
        self._free: FIFOQueue[PinnedSlot] = FIFOQueue(count, name=name)
        for slot in self._slots:
            self._free.put(slot)
        self._largest = 0  # the largest batch seen: every slot grows straight to it
        self._lock = threading.Lock()
        self._out: set[int] = set()  # ids of the slots taken and not yet given back
        self._closed = False

    def acquire(self, nbytes: int) -> PinnedSlot:
        """Takes a free slot of at least ``nbytes``, once its last copy has completed.

        Raises:
            CancelledError: If the pool was closed (the pipeline is stopping).
        """
        slot = self._free.get()
        with self._lock:
            self._out.add(id(slot))
            self._largest = largest = max(self._largest, nbytes)
        try:
            if slot.copy_done is not None:
                self._backend.synchronize(slot.copy_done)
                slot.copy_done = None
            # (A batch of zero bytes still gets a slot, of one byte.)
            if slot.buffer is None or slot.capacity < largest:
                if slot.buffer is not None:
                    self._backend.free_pinned(slot.buffer)
                    slot.buffer = None
                slot.buffer = self._backend.alloc_pinned(max(1, int(largest * _GROWTH)))
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: PinnedSlot, copy_done: Any = None) -> None:
        """Returns a slot; the next user waits for ``copy_done`` before writing it.

        After ``close`` a slot coming back is freed, once ``copy_done`` is.
        """
        slot.copy_done = copy_done
        with self._lock:
            self._out.discard(id(slot))
            closed = self._closed
        if closed:
            self._free_slot(slot)
        else:
            _put_back(self._free, slot)

    def cancel(self) -> None:
        """Wakes every thread waiting for a slot; they see ``CancelledError``."""
        self._free.cancel()

    @property
    def pinned_bytes(self) -> int:
        return sum(slot.capacity for slot in self._slots)

    def close(self) -> None:
        """Frees every slot once the copies reading them have completed.

        A slot still taken (a consumer copying at depth 0 while another thread
        stops the run) is freed when it comes back, not under its copy.
        """
        self._free.cancel()
        with self._lock:
            self._closed = True
            idle = [slot for slot in self._slots if id(slot) not in self._out]
        for slot in idle:
            self._free_slot(slot)

    def _free_slot(self, slot: PinnedSlot) -> None:
        if slot.copy_done is not None:
            self._backend.synchronize(slot.copy_done)
            slot.copy_done = None
        if slot.buffer is not None:
            self._backend.free_pinned(slot.buffer)
            slot.buffer = None

    def stage(self, treedef: TreeDef, metas: list[LeafMeta], nbytes: int, leaves: Any) -> Staged:
        """Packs ``leaves`` into a slot (the per-batch work a worker does)."""
        slot = self.acquire(nbytes)
        try:
            assert slot.buffer is not None
            pack(leaves, metas, slot.buffer)
        except BaseException:
            self.release(slot)
            raise
        return Staged(treedef, metas, nbytes, slot.buffer, lambda event: self.release(slot, event))


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
        if arena is None:
            capacity = max(1, int(self.largest * _GROWTH))
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


class CopyLooper(LooperThread):
    """The copy stage: takes staged batches in order, copies each into a device arena.

    Runs under the enqueuer's coordinator. It enters the device once, makes
    its copy stream once, and passes errors and skipped items through in
    their place in the order. When the host stage ends (a finite generator),
    it closes the device queue and waits for stop. It lets go of the arenas
    and the stream when it ends, so nothing it held keeps the backend alive.
    """

    def __init__(
        self,
        coord: Coordinator,
        arenas: DeviceArenas,
        host_queue: FIFOQueue[Any],
        device_queue: FIFOQueue[Any],
        *,
        name: str,
    ) -> None:
        super().__init__(coord, None, name=name)
        self._arenas: DeviceArenas | None = arenas
        self._host_queue = host_queue
        self._device_queue = device_queue
        self._stream: Any = None
        self.host_wait_s = 0.0

    def start_loop(self) -> None:
        assert self._arenas is not None
        self._arenas.backend.enter_device()
        self._stream = self._arenas.backend.create_stream()

    def run_loop(self) -> None:
        arenas = self._arenas
        assert arenas is not None
        started = time.monotonic()
        try:
            item = self._host_queue.get()
        except OutOfRangeError:
            self._device_queue.close()
            self.coord.wait_for_stop()
            return
        except CancelledError:
            return
        self.host_wait_s += time.monotonic() - started
        staged = item.staged
        if item.error is None and staged is not None:
            try:
                arenas.reserve()
            except CancelledError:
                staged.release(None)
                return
            try:
                item.copied = arenas.copy(staged, self._stream)
            except Exception as error:
                staged.release(None)
                arenas.unreserve()
                note_thread(error, f"copying {item.task.where()}")
                item.error = error
        try:
            self._device_queue.put(item)
        except CancelledError:
            if item.copied is not None:
                arenas.discard(item.copied)

    def stop_loop(self) -> None:
        self._arenas = None
        self._stream = None


def _put_back(queue: FIFOQueue[Any], item: Any) -> None:
    """Returns an item to a pool queue unless the pipeline is stopping."""
    if not queue.closed:
        with contextlib.suppress(CancelledError):  # cancelled since the check: stopping
            queue.put(item)
