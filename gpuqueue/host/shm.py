"""Host stage, shared-memory slots: where worker processes write batches for the main one.

A ``SlotPool`` is a bounded number of slots, made when first needed and
reused. Each slot is one segment that grows (to the largest batch seen, with
a margin once batch sizes grew) only when a batch does not fit, never per
batch. With a backend, a slot is page-locked (``cudaHostRegister``) so the
copy to the device reads it directly, and a slot is rewritten only after the
copy that read it is done. Without one, the slot itself is the consumer's
batch (``lend``), so the batch is copied once, by the worker into the slot.

Segments have no name that could be left behind (PyTorch's
``file_descriptor`` strategy): each is a ``memfd`` (Linux), or where there is
none an unnamed file in ``/dev/shm`` (``O_TMPFILE``, or unlinked the moment it
is made). The parent maps it once; a worker process receives its descriptor
over its pipe (``segments.py``) once per segment and keeps it mapped. So
however the processes end, SIGKILL of the whole group included, the memory
goes with the last process that maps it, and ``/dev/shm`` keeps nothing.
Each segment's space is reserved when it is made (``posix_fallocate``), so
a full ``/dev/shm`` or memory limit is a clear error, not a SIGBUS in a
worker halfway through a write.
"""

from __future__ import annotations

import contextlib
import io
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..batch.layout import GROWTH
from ..errors import CancelledError, PipelineError
from .segments import create_segment

__all__ = ["Slot", "SlotPool"]


# Slots a pipeline keeps beyond its count for lent ones coming back: a consumer
# holds a batch while it takes the next, and a slot retired as it came back
# would have to be made again for the next read.
_SPARE = 2

# What an empty slot (before any batch, or for batches of zero bytes) packs into.
_EMPTY = np.empty(0, dtype=np.uint8)


@dataclass
class Slot:
    """One segment, its bytes as a uint8 array, and the event of the last copy that read it.

    ``generation`` changes whenever the segment is replaced (it grew), so a
    worker process knows it must map the new one.
    """

    number: int
    file: io.FileIO | None = None  # the segment's descriptor, to send to worker processes
    array: np.ndarray = field(default_factory=lambda: _EMPTY)  # the mapped segment, as uint8
    generation: int = 0
    copy_done: Any = None

    @property
    def capacity(self) -> int:
        return int(self.array.size)


class _Lease:
    """Holds a lent slot for the consumer: the slot goes back when this object dies."""

    __slots__ = ("__weakref__",)


class SlotPool:
    """Shared-memory slots, made when first needed, grown only when a batch does not fit.

    The pipeline holds at most ``count`` slots (being written, or queued):
    ``take`` makes a new one while fewer exist, and waits otherwise. On the
    host path a delivered batch is the slot itself, ``lend``-ed to the
    consumer: it leaves the pipeline's count (so a consumer that holds many
    batches never starves the workers) and comes back when the last view of
    the batch dies. A slot that comes back to a pipeline already holding
    ``count`` + 2 is retired (its memory freed), so what stays is at most
    ``count`` + 2 slots plus what the consumer holds. Free slots are reused last-in first
    out on the host path (fewest distinct slots touched) and first-in first
    out with a backend (the oldest copy is the likeliest to be done).

    Args:
        count: The most slots the pipeline holds (workers + queue size + 1).
        name: For messages.
        backend: Page-locks each slot and fences its reuse; None on the
            host-only path.
    """

    def __init__(self, count: int, *, name: str, backend: Backend | None) -> None:
        self._backend = backend
        # Page-locked slots by address. A mapping must never go while registered:
        # if the pool is dropped without close() (an abandoned run), this keeps
        # them mapped until the finaliser has waited for their copies and
        # unregistered them (not at exit, where the process's end frees all).
        self._registered: dict[int, Slot] = {}
        if backend is not None:
            weakref.finalize(self, _unregister_all, backend, self._registered).atexit = False
        self._name = name
        self._count = count
        self._lock = threading.Lock()  # guards the fields below; segments are made under it
        self._wake = threading.Condition(self._lock)
        self._abandoned = self._cancelled = self._closed = False
        self._size = 0  # what every slot grows to: the largest batch (with a margin once it grew)
        self._all: dict[int, Slot] = {}  # every slot not retired, lent ones included
        self._free: deque[Slot] = deque()
        self._busy = 0  # taken and not given back or lent
        self._numbers = 0  # slot numbers are never reused, so a process never mistakes one
        # Lent slots whose last view died. A finaliser can run in any thread, in
        # the middle of anything (a garbage collection): it only appends here
        # (atomic) and never takes the lock; take() gathers them.
        self._returned: deque[Slot] = deque()
        self._retired: list[int] = []  # numbers of slots freed, for the processes to unmap
        # Lent slots that kept their descriptor; past count + _SPARE it is closed (and the
        # slot retires on return), or each held batch would hold one, to the fd limit.
        self._lent_open = 0

    def take(self) -> Slot:
        """A free slot, once its last copy has completed, grown to the largest batch seen.

        Raises:
            CancelledError: If the pool was cancelled (the pipeline is stopping).
            PipelineError: If there is no room to grow it.
        """
        retiring: list[Slot] = []
        with self._lock:
            while True:
                if self._cancelled:
                    raise CancelledError("the pipeline is stopping")
                self._gather_returned(retiring)
                # With a backend nothing is lent: all ``count`` slots are made in
                # the first reads (the memory settles at once, and a fresh slot
                # has no copy to wait for); without one, only as many as are used.
                fill = self._backend is not None and len(self._all) < self._count
                if self._free and not fill:
                    slot = self._free.pop() if self._backend is None else self._free.popleft()
                    break
                if self._busy + len(self._free) < self._count:
                    slot = Slot(self._numbers)
                    self._numbers += 1
                    self._all[slot.number] = slot
                    break
                self._wake.wait()
            self._busy += 1
        for old in retiring:
            self._free_slot(old)
        try:
            if slot.copy_done is not None and self._backend is not None:
                self._backend.synchronize(slot.copy_done)
            slot.copy_done = None
            if slot.capacity < self._size:
                self.grow(slot, self._size)
        except BaseException:
            self.give_back(slot)
            raise
        return slot

    def _gather_returned(self, retiring: list[Slot]) -> None:
        """Puts the lent slots that came back among the free ones, or retires them (locked)."""
        while self._returned:
            slot = self._returned.popleft()
            if slot.file is not None:
                self._lent_open -= 1
            if slot.file is not None and self._busy + len(self._free) < self._count + _SPARE:
                self._free.append(slot)
            else:
                del self._all[slot.number]
                self._retired.append(slot.number)
                retiring.append(slot)

    def give_back(self, slot: Slot, copy_done: Any = None) -> None:
        """Returns a slot; the next user waits for ``copy_done`` before writing it."""
        slot.copy_done = copy_done
        with self._lock:
            self._busy -= 1
            if not self._closed:
                self._free.append(slot)
                self._wake.notify()

    def lend(self, slot: Slot) -> object:
        """Hands a taken slot to the consumer until the returned object dies.

        The slot no longer counts against the pipeline's ``count``; keep the
        object alive with every view of the slot (``owned_view``).
        """
        lease = _Lease()
        returned = self._returned
        # Not at exit: the process's end frees everything.
        weakref.finalize(lease, returned.append, slot).atexit = False
        with self._lock:
            self._busy -= 1
            self._wake.notify()
            if self._lent_open < self._count + _SPARE:
                self._lent_open += 1
            elif slot.file is not None:  # (the mapping needs none)
                slot.file.close()
                slot.file = None
        return lease

    def retired(self) -> list[int]:
        """The numbers of the slots retired since the last call (to unmap in the processes)."""
        with self._lock:
            numbers, self._retired = self._retired, []
        return numbers

    def grow(self, slot: Slot, nbytes: int) -> None:
        """Replaces ``slot``'s segment by one that holds ``nbytes`` (and the largest batch).

        The first size is the batch's own; once a batch outgrows it, every
        slot takes a margin, so a slowly growing batch size settles.

        Raises:
            PipelineError: If there is no room for it.
            CancelledError: If the pool was abandoned.
        """
        self._free_slot(slot)
        # Made and assigned under the lock abandon() closes under, so no
        # segment is made after, or missed by, its pass over the slots.
        with self._lock:
            if self._abandoned:
                raise CancelledError("the pipeline was abandoned")
            if nbytes > self._size:
                self._size = nbytes if self._size == 0 else int(nbytes * GROWTH)
            file, array = create_segment(max(1, self._size))
            if self._backend is not None:
                # Page-locked before any worker or copy can see it.
                try:
                    self._backend.register_host(array)
                except Exception as error:
                    size = array.size
                    del array  # unmapped now, or with the error's frames that still view it
                    file.close()
                    raise PipelineError(
                        f"page-locking a {size}-byte shared-memory slot for the GPU "
                        f"(cudaHostRegister) failed: {error}; the locked-memory limit "
                        "(ulimit -l, or the container's) may be too low for "
                        "(workers + max_queue_size + 1) slots of the largest batch"
                    ) from error
                self._registered[int(array.ctypes.data)] = slot
            slot.file, slot.array = file, array
            slot.generation += 1

    def cancel(self) -> None:
        """Wakes every thread waiting for a slot; they see ``CancelledError``."""
        with self._lock:
            self._cancelled = True
            self._wake.notify_all()

    @property
    def nbytes(self) -> int:
        """Bytes held in slots now (lent ones included)."""
        with self._lock:
            return sum(slot.capacity for slot in self._all.values())

    @property
    def slots(self) -> int:
        """Slots that exist now (lent ones included)."""
        with self._lock:
            return len(self._all)

    def abandon(self) -> None:
        """Lets go of every segment without waiting (the finaliser of an abandoned run).

        Every descriptor is closed now (no segment is sent after this). A
        mapping no batch refers to is closed now too; one that a batch still
        refers to goes with that batch. Page-locked mappings are left to
        ``close`` or the garbage collector, since unregistering them must wait
        for the copies that read them.
        """
        with self._lock:
            self._abandoned = True
            for slot in self._all.values():
                if slot.file is not None:
                    slot.file.close()
                if self._backend is None:
                    _drop_mapping(slot)

    def close(self) -> None:
        """Frees every slot, once the copies reading them have completed.

        A lent slot's mapping goes with the last view of its batch.
        """
        with self._lock:
            self._closed = self._cancelled = True
            everything = list(self._all.values())
            self._free.clear()
            self._wake.notify_all()
        for slot in everything:
            self._free_slot(slot)

    def _free_slot(self, slot: Slot) -> None:
        if slot.array is _EMPTY:
            return
        if self._backend is not None:
            if slot.copy_done is not None:
                self._backend.synchronize(slot.copy_done)
            self._backend.unregister_host(slot.array)
            self._registered.pop(int(slot.array.ctypes.data), None)
        slot.copy_done = None
        _drop_mapping(slot)


def _unregister_all(backend: Backend, registered: dict[int, Slot]) -> None:
    """Unregisters the slots of a pool dropped without ``close``, once their copies are done."""
    for slot in list(registered.values()):
        with contextlib.suppress(Exception):  # a finaliser has nobody to raise to
            if slot.copy_done is not None:
                backend.synchronize(slot.copy_done)
            backend.unregister_host(slot.array)
    registered.clear()  # now the mappings may go


def _drop_mapping(slot: Slot) -> None:
    """Closes a slot's descriptor and lets go of its mapping (which goes with its last view)."""
    if slot.file is not None:
        slot.file.close()
        slot.file = None
    slot.array = _EMPTY
