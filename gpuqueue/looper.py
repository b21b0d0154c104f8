"""The copy stage: pinned host slots, the device ring, the copy looper, the consumer's fences.

::

    worker ──pack──▶ pinned slot ──host queue──▶ CopyLooper ──memcpyAsync──▶ device slot
                                                  (copy stream)                    │
                                         device queue (prefetch_depth) ◀── ready ──┘
                                                  │
    consumer: its stream waits on "ready"; when it moves on, "released" is
    recorded on its stream, and the copy stream waits on it before the slot
    is written again.

Two fences, both on the device, never a host synchronize on the hot path:

- a pinned slot goes back to its pool with the event of the copy that reads
  it; whoever takes it next waits for that event first (by then the copy
  has long finished, so the wait is free);
- a device slot is rewritten only after the consumer's work on it is done.

Backends only say how to allocate, copy and fence (``backends.base``); this
module is the one code path for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import Backend
from .channel import FIFOQueue
from .coordinator import Coordinator, LooperThread
from .errors import CancelledError, OutOfRangeError, note_thread
from .staging import LeafMeta, TreeDef, arena_view, pack, rebuild

__all__ = ["CopyLooper", "DeviceSlot", "PinnedPool", "PinnedSlot", "Staged"]

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

    def acquire(self, nbytes: int) -> PinnedSlot:
        """Takes a free slot of at least ``nbytes``, once its last copy has completed.

        Raises:
            CancelledError: If the pool was closed (the pipeline is stopping).
        """
        slot = self._free.get()
        try:
            if slot.copy_done is not None:
                self._backend.synchronize(slot.copy_done)
                slot.copy_done = None
            self._largest = max(self._largest, nbytes)
            # (A batch of zero bytes still gets a slot, of one byte.)
            if slot.buffer is None or slot.capacity < self._largest:
                if slot.buffer is not None:
                    self._backend.free_pinned(slot.buffer)
                    slot.buffer = None
                slot.buffer = self._backend.alloc_pinned(max(1, int(self._largest * _GROWTH)))
        except BaseException:
            self.release(slot)
            raise
        return slot

    def release(self, slot: PinnedSlot, copy_done: Any = None) -> None:
        """Returns a slot; the next user waits for ``copy_done`` before writing it."""
        slot.copy_done = copy_done
        _put_back(self._free, slot)

    def cancel(self) -> None:
        """Wakes every thread waiting for a slot; they see ``CancelledError``."""
        self._free.cancel()

    @property
    def pinned_bytes(self) -> int:
        return sum(slot.capacity for slot in self._slots)

    def close(self) -> None:
        """Frees every slot once the copies reading them have completed."""
        self._free.cancel()
        for slot in self._slots:
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


@dataclass
class DeviceSlot:
    """A device arena, the event marking its copy complete, and the consumer's release event."""

    ready: Any
    released: Any
    arena: Any = None
    capacity: int = 0
    released_once: bool = False


class DeviceRing:
    """``prefetch_depth + 1`` device slots: the queue's, and the one the consumer holds."""

    def __init__(self, backend: Backend, count: int, name: str) -> None:
        self.backend = backend
        self.slots = [
            DeviceSlot(backend.create_event(), backend.create_event()) for _ in range(count)
        ]
        self.free: FIFOQueue[DeviceSlot] = FIFOQueue(count, name=name)
        for slot in self.slots:
            self.free.put(slot)
        self.bytes_copied = 0
        self.largest = 0  # the largest batch seen: every slot grows straight to it
        self.first_copy_at: float | None = None
        self.last_copy_at: float | None = None

    def copy(self, slot: DeviceSlot, staged: Staged, stream: Any) -> None:
        """Issues the copy of ``staged`` into ``slot`` on ``stream``, fenced both ways.

        The pinned slot goes back to its pool with the copy's event.
        """
        backend = self.backend
        self.largest = max(self.largest, staged.nbytes)
        if slot.arena is None or slot.capacity < self.largest:
            if slot.arena is not None and slot.released_once:
                # The old arena may still be read by the consumer's queued work.
                backend.synchronize(slot.released)
            slot.capacity = max(1, int(self.largest * _GROWTH))  # zero-byte batches too
            slot.arena = backend.alloc_device(slot.capacity)
        if slot.released_once:
            backend.wait_event(stream, slot.released)
        backend.copy_to_device(slot.arena, staged.buffer, staged.nbytes, stream)
        backend.record(slot.ready, stream)
        # The pinned slot is fenced by this device slot's ready event. Should the
        # device slot be reused first, the event then marks a later copy on the
        # same stream: waiting for it still waits for this one, and it never
        # waits on the host.
        staged.release(slot.ready)
        now = time.monotonic()
        self.first_copy_at = self.first_copy_at or now
        self.last_copy_at = now
        self.bytes_copied += staged.nbytes

    def release(self, slot: DeviceSlot, consumer_stream: Any) -> None:
        """The consumer is done with ``slot`` once its stream's work so far completes."""
        self.backend.record(slot.released, consumer_stream)
        slot.released_once = True
        _put_back(self.free, slot)

    def batch(self, slot: DeviceSlot, staged: Staged, consumer_stream: Any) -> Any:
        """The batch in ``slot`` as device arrays, ordered after its copy on ``consumer_stream``."""
        self.backend.wait_event(consumer_stream, slot.ready)
        return rebuild(staged.treedef, [arena_view(slot.arena, m) for m in staged.metas])

    @property
    def device_bytes(self) -> int:
        return sum(slot.capacity for slot in self.slots)

    def close(self) -> None:
        """Drops every arena once the GPU is done with it.

        A copy writes through a raw pointer and the consumer's kernels read
        through one: memory handed back to the allocator while either is
        still queued could be given to someone else and overwritten (or
        read) from under them.
        """
        self.free.cancel()
        for slot in self.slots:
            if slot.arena is not None:
                self.backend.synchronize(slot.ready)
                if slot.released_once:
                    self.backend.synchronize(slot.released)
            slot.arena = None
            slot.capacity = 0  # freed: stats() reports no device bytes


class CopyLooper(LooperThread):
    """The copy stage: takes staged batches in order, copies each to a device slot.

    Runs under the enqueuer's coordinator. It enters the device once, makes
    its copy stream once, and passes errors and skipped items through in
    their place in the order. When the host stage ends (a finite generator),
    it closes the device queue and waits for stop.
    """

    def __init__(
        self,
        coord: Coordinator,
        ring: DeviceRing,
        host_queue: FIFOQueue[Any],
        device_queue: FIFOQueue[Any],
        *,
        name: str,
    ) -> None:
        super().__init__(coord, None, name=name)
        self._ring = ring
        self._host_queue = host_queue
        self._device_queue = device_queue
        self._stream: Any = None
        self.host_wait_s = 0.0

    def start_loop(self) -> None:
        self._ring.backend.enter_device()
        self._stream = self._ring.backend.create_stream()

    def run_loop(self) -> None:
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
                slot = self._ring.free.get()
            except CancelledError:
                staged.release(None)
                return
            try:
                self._ring.copy(slot, staged, self._stream)
                item.device_slot = slot
            except Exception as error:
                staged.release(None)
                _put_back(self._ring.free, slot)
                note_thread(error, f"copying {item.task.where()}")
                item.error = error
        try:
            self._device_queue.put(item)
        except CancelledError:
            if item.device_slot is not None:
                _put_back(self._ring.free, item.device_slot)


def _put_back(queue: FIFOQueue[Any], item: Any) -> None:
    """Returns an item to a pool queue unless the pipeline is stopping."""
    if not queue.closed:
        queue.put(item)
