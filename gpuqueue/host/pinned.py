"""Host stage, pinned memory: the page-locked slots thread workers pack batches into.

A pinned slot goes back to its pool with the event of the copy that read it
(that copy's own, never re-recorded); whoever takes the slot next waits for
that event first (by then the copy has long finished, so the wait is free).
Worker processes write into shared-memory slots instead (``shm.py``); both
hand the copy stage a ``Staged`` batch (``batch/layout.py``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..batch.layout import GROWTH, Staged, pack
from ..batch.tree import LeafMeta, TreeDef
from ..errors import CancelledError

__all__ = ["PinnedPool", "PinnedSlot"]


@dataclass
class PinnedSlot:
    """A page-locked host buffer, and the event of the last copy that read it."""

    buffer: np.ndarray | None = None
    copy_done: Any = None

    @property
    def capacity(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.nbytes)


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
        # On a GPU the slot freed longest ago (its copy surely done); on NumPy, where
        # nothing is in flight, the one freed last: its memory is warm, and slots a
        # run never needs at once are never allocated (memory follows what is in use).
        self._free = _FreeSlots(self._slots, newest_first=backend.shares_host_memory)
        self._largest = 0  # the largest batch seen: every slot grows straight to it
        self._lock = threading.Lock()
        self._out: set[int] = set()  # ids of the slots taken and not yet given back
        self._closed = False

    def acquire(self, nbytes: int) -> PinnedSlot:
        """Takes a free slot of at least ``nbytes``, once its last copy has completed.

        Raises:
            CancelledError: If the pool was closed (the pipeline is stopping).
        """
        slot = self._free.take()
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
                slot.buffer = self._backend.alloc_pinned(max(1, int(largest * GROWTH)))
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
            self._free.give(slot)

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
        return self.stage_with(treedef, metas, nbytes, lambda buffer: pack(leaves, metas, buffer))

    def stage_with(
        self,
        treedef: TreeDef,
        metas: list[LeafMeta],
        nbytes: int,
        write: Callable[[np.ndarray], None],
    ) -> Staged:
        """Has ``write`` fill a slot of ``nbytes`` laid out as ``metas`` (samples, row by row)."""
        slot = self.acquire(nbytes)
        try:
            assert slot.buffer is not None
            write(slot.buffer)
        except BaseException:
            self.release(slot)
            raise

        def exchange(memory: Any) -> Any:
            taken, slot.buffer = slot.buffer, memory
            return taken

        return Staged(
            treedef, metas, nbytes, slot.buffer, lambda event: self.release(slot, event), exchange
        )


class _FreeSlots:
    """The free slots of a pool: taken oldest first, or newest first; cancellable."""

    def __init__(self, slots: list[PinnedSlot], *, newest_first: bool) -> None:
        self._slots = deque(slots)
        self._newest_first = newest_first
        self._cond = threading.Condition()
        self._cancelled = False

    def take(self) -> PinnedSlot:
        """Waits for a free slot.

        Raises:
            CancelledError: If the pool was cancelled (the pipeline is stopping).
        """
        with self._cond:
            while not self._slots and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise CancelledError("the pipeline is stopping")
            return self._slots.pop() if self._newest_first else self._slots.popleft()

    def give(self, slot: PinnedSlot) -> None:
        with self._cond:
            if not self._cancelled:  # else the pipeline is stopping: close() frees it
                self._slots.append(slot)
                self._cond.notify()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
