"""Shared-memory slots: where worker processes write batches for the main process to read.

A ``SlotPool`` is a fixed number of slots, made once per run and reused.
Each slot is one segment that grows (to the largest batch seen, with a
margin) only when a batch does not fit, never per batch. With a backend, a
slot is page-locked (``cudaHostRegister``) so the copy to the device reads it
directly, and a slot is rewritten only after the copy that read it is done.
The process side only attaches to slots by name (``attach``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from .backends.base import Backend
from .channel import FIFOQueue
from .errors import CancelledError

__all__ = ["Slot", "SlotPool", "attach"]

_GROWTH = 1.25  # a slot that must grow takes a margin, so a slowly growing batch size settles


def attach(name: str) -> shared_memory.SharedMemory:
    """Opens a slot the parent created, without making this process its owner."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    # Before 3.13 attaching registers the segment with the resource tracker
    # again; forkserver and spawn children share the parent's tracker, whose
    # registry is a set, so that is harmless, and the parent's unlink
    # unregisters it once for all.
    return shared_memory.SharedMemory(name=name)


class _Segment(shared_memory.SharedMemory):
    """A shared-memory segment whose collection tolerates views still alive.

    When an abandoned pipeline is collected, a NumPy view of the segment and
    the segment can go in the same garbage cycle; ``SharedMemory.__del__``
    would then print a ``BufferError``. The mapping goes with the view.
    """

    def __del__(self) -> None:
        with contextlib.suppress(BufferError, OSError):
            self.close()


@dataclass
class Slot:
    """One segment, its bytes as a uint8 array, and the event of the last copy that read it."""

    shm: _Segment | None = None
    array: np.ndarray | None = None  # the segment as uint8, registered with the backend
    copy_done: Any = None

    @property
    def name(self) -> str:
        return "" if self.shm is None else self.shm.name

    @property
    def capacity(self) -> int:
        return 0 if self.shm is None else self.shm.size


class SlotPool:
    """A fixed number of shared-memory slots, grown only when a batch does not fit.

    Args:
        count: Number of slots (workers + queue size + 1).
        name: For the pool's queue.
        backend: Page-locks each slot and fences its reuse; None on the
            host-only path.
    """

    def __init__(self, count: int, *, name: str, backend: Backend | None) -> None:
        self._backend = backend
        self._lock = threading.Lock()  # segments are made and abandoned under it
        self._abandoned = False
        self._largest = 0  # the largest batch seen: every slot grows straight to it
        self._all = [Slot() for _ in range(count)]
        self._free: FIFOQueue[Slot] = FIFOQueue(count, name=f"{name}-slots")
        for slot in self._all:
            self._free.put(slot)

    def take(self) -> Slot:
        """A free slot, once its last copy has completed, grown to the largest batch seen.

        Raises:
            CancelledError: If the pool was cancelled (the pipeline is stopping).
        """
        slot = self._free.get()
        try:
            if slot.copy_done is not None and self._backend is not None:
                self._backend.synchronize(slot.copy_done)
            slot.copy_done = None
            if slot.capacity < self._largest:
                self.grow(slot, self._largest)
        except BaseException:
            self.give_back(slot)
            raise
        return slot

    def give_back(self, slot: Slot, copy_done: Any = None) -> None:
        """Returns a slot; the next user waits for ``copy_done`` before writing it."""
        slot.copy_done = copy_done
        if not self._free.closed:
            self._free.put(slot)

    def grow(self, slot: Slot, nbytes: int) -> None:
        """Replaces ``slot``'s segment by one that holds ``nbytes`` (and the largest batch)."""
        self._free_slot(slot)
        self._largest = max(self._largest, nbytes)
        # Created and assigned under the lock abandon() unlinks under, so no
        # segment is made after, or missed by, its pass over the slots.
        with self._lock:
            if self._abandoned:
                raise CancelledError("the pipeline was abandoned")
            shm = _Segment(create=True, size=max(1, int(self._largest * _GROWTH)))
            slot.shm = shm
        slot.array = np.frombuffer(shm.buf, dtype=np.uint8)  # type: ignore[arg-type]
        if self._backend is not None:
            self._backend.register_host(slot.array)

    def cancel(self) -> None:
        """Wakes every thread waiting for a slot; they see ``CancelledError``."""
        self._free.cancel()

    @property
    def nbytes(self) -> int:
        """Bytes held in slots now."""
        return sum(slot.capacity for slot in self._all)

    def abandon(self) -> None:
        """Unlinks every segment without waiting; each goes once its last mapping closes."""
        with self._lock:
            self._abandoned = True
            for slot in self._all:
                if slot.shm is not None:
                    with contextlib.suppress(FileNotFoundError):
                        slot.shm.unlink()

    def close(self) -> None:
        """Frees every slot, once the copies reading them have completed."""
        for slot in self._all:
            self._free_slot(slot)

    def _free_slot(self, slot: Slot) -> None:
        if slot.shm is None:
            return
        if self._backend is not None and slot.array is not None:
            if slot.copy_done is not None:
                self._backend.synchronize(slot.copy_done)
            self._backend.unregister_host(slot.array)
        slot.array = None
        slot.copy_done = None
        with contextlib.suppress(FileNotFoundError):  # abandon() may have unlinked it
            slot.shm.unlink()
        # A batch may still refer to it; then the mapping goes with that batch.
        with contextlib.suppress(BufferError):
            slot.shm.close()
        slot.shm = None
