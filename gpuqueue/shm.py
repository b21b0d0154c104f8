"""Shared-memory slots: where worker processes write batches for the main process to read.

A ``SlotPool`` is a fixed number of slots, made once per run and reused.
Each slot is one segment that grows (to the largest batch seen, with a
margin) only when a batch does not fit, never per batch. With a backend, a
slot is page-locked (``cudaHostRegister``) so the copy to the device reads it
directly, and a slot is rewritten only after the copy that read it is done.

Segments have no name that could be left behind (PyTorch's
``file_descriptor`` strategy): each is a ``memfd`` (Linux), or where there is
none an unnamed file in ``/dev/shm`` (``O_TMPFILE``, or unlinked the moment it
is made). The parent maps it once; a worker process receives its descriptor
over its pipe (``send_segment``) once per segment and keeps it mapped. So
however the processes end, SIGKILL of the whole group included, the memory
goes with the last process that maps it, and ``/dev/shm`` keeps nothing.
Each segment's space is reserved when it is made (``posix_fallocate``), so
a full ``/dev/shm`` or memory limit is a clear error, not a SIGBUS in a
worker halfway through a write.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from .backends.base import Backend
from .channel import FIFOQueue
from .errors import CancelledError, PipelineError

__all__ = ["Slot", "SlotPool", "create_segment", "receive_segment", "send_segment"]

_GROWTH = 1.25  # a slot that must grow takes a margin, so a slowly growing batch size settles

# Where segments live when there is no memfd_create (tests point this elsewhere).
SHM_DIR = "/dev/shm"
USE_MEMFD = hasattr(os, "memfd_create")

# The errors by which a full tmpfs, memory cgroup or file-size limit refuses a reservation.
_NO_ROOM = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT)

# What an empty slot (before any batch, or for batches of zero bytes) packs into.
_EMPTY = np.empty(0, dtype=np.uint8)


def _anonymous_file() -> tuple[int, str]:
    """A descriptor of a new shared-memory file that has no name, and where it lives."""
    if USE_MEMFD:
        return os.memfd_create("gpuqueue-slot", os.MFD_CLOEXEC), "memfd"
    folder = SHM_DIR if os.path.isdir(SHM_DIR) else None
    # TemporaryFile opens with O_TMPFILE where it can, else unlinks the name at once.
    with tempfile.TemporaryFile(dir=folder, prefix="gpuqueue-") as file:
        return os.dup(file.fileno()), folder or tempfile.gettempdir()


def _no_room(nbytes: int, where: str, error: OSError) -> PipelineError:
    if where == "memfd":
        source = (
            "anonymous shared memory (memfd_create), which counts against RAM and the "
            "container's or job's memory limit"
        )
        remedy = "raise the memory limit"
    else:
        try:
            stat = os.statvfs(where)
            free = stat.f_bavail * stat.f_frsize
            size = f"{free:,} bytes free of {stat.f_blocks * stat.f_frsize:,}"
        except OSError:
            size = "free space unknown"
        source = f"{where} ({size})"
        remedy = (
            "give the container more shared memory (docker run --shm-size=8g, or a "
            "memory-backed volume at /dev/shm)"
        )
    return PipelineError(
        f"cannot reserve {nbytes:,} bytes of shared memory for a worker process's batch "
        f"slot in {source}: {os.strerror(error.errno or 0)}. Each process enqueuer needs "
        f"(workers + max_queue_size + 1) slots of the largest batch (x {_GROWTH}); "
        f"{remedy}, or use smaller batches, fewer workers, a smaller max_queue_size, or "
        "threads (use_multiprocessing=False). docker run's default --shm-size is 64 MiB."
    )


def create_segment(nbytes: int) -> tuple[io.FileIO, mmap.mmap]:
    """A new anonymous shared segment of ``nbytes`` (> 0), its space reserved, mapped here.

    Returns its file (whose descriptor ``send_segment`` passes on; closed with
    it, or when it is collected) and its mapping. The memory goes once both are
    closed here and in every process that received it.

    Raises:
        PipelineError: If there is no room for ``nbytes``: it names where the
            memory comes from, its free space and what to change.
    """
    fd, where = _anonymous_file()
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:  # pragma: no cover - macOS: no reservation to be had
                os.ftruncate(fd, nbytes)
        except OSError as error:
            if error.errno in _NO_ROOM:
                raise _no_room(nbytes, where, error) from error
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, nbytes)  # a file system that cannot reserve: size it only
        segment = mmap.mmap(fd, nbytes)
        return io.FileIO(fd, "r+", closefd=True), segment
    except BaseException:
        os.close(fd)
        raise


def send_segment(conn: Connection, fd: int, pid: int | None) -> None:
    """Passes a segment's descriptor to the process at the other end of ``conn``."""
    send_handle(conn, fd, pid)


def receive_segment(conn: Connection, nbytes: int) -> mmap.mmap:
    """Maps the segment whose descriptor ``send_segment`` sent (closing the received one)."""
    fd = recv_handle(conn)
    try:
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


@dataclass
class Slot:
    """One segment, its bytes as a uint8 array, and the event of the last copy that read it.

    ``generation`` changes whenever the segment is replaced (it grew), so a
    worker process knows it must map the new one.
    """

    number: int
    file: io.FileIO | None = None  # the segment's descriptor, to send to worker processes
    segment: mmap.mmap | None = None
    array: np.ndarray = field(default_factory=lambda: _EMPTY)  # the segment as uint8
    generation: int = 0
    copy_done: Any = None

    @property
    def capacity(self) -> int:
        return 0 if self.segment is None else len(self.segment)


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
        # Page-locked slots by address. A mapping must never go while registered:
        # if the pool is dropped without close() (an abandoned run), this keeps
        # them mapped until the finaliser has waited for their copies and
        # unregistered them (not at exit, where the process's end frees all).
        self._registered: dict[int, Slot] = {}
        if backend is not None:
            weakref.finalize(self, _unregister_all, backend, self._registered).atexit = False
        self._lock = threading.Lock()  # segments are made and abandoned under it
        self._abandoned = False
        self._largest = 0  # the largest batch seen: every slot grows straight to it
        self._all = [Slot(number) for number in range(count)]
        self._free: FIFOQueue[Slot] = FIFOQueue(count, name=f"{name}-slots")
        for slot in self._all:
            self._free.put(slot)

    def take(self) -> Slot:
        """A free slot, once its last copy has completed, grown to the largest batch seen.

        Raises:
            CancelledError: If the pool was cancelled (the pipeline is stopping).
            PipelineError: If there is no room to grow it.
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
        """Replaces ``slot``'s segment by one that holds ``nbytes`` (and the largest batch).

        Raises:
            PipelineError: If there is no room for it.
            CancelledError: If the pool was abandoned.
        """
        self._free_slot(slot)
        self._largest = max(self._largest, nbytes)
        # Made and assigned under the lock abandon() closes under, so no
        # segment is made after, or missed by, its pass over the slots.
        with self._lock:
            if self._abandoned:
                raise CancelledError("the pipeline was abandoned")
            file, segment = create_segment(max(1, int(self._largest * _GROWTH)))
            array = np.frombuffer(segment, dtype=np.uint8)
            if self._backend is not None:
                # Page-locked before any worker or copy can see it.
                try:
                    self._backend.register_host(array)
                except Exception as error:
                    del array
                    file.close()
                    # The error's frames may still view it: the mapping then goes with them.
                    with contextlib.suppress(BufferError):
                        segment.close()
                    raise PipelineError(
                        f"page-locking a {len(segment)}-byte shared-memory slot for the GPU "
                        f"(cudaHostRegister) failed: {error}; the locked-memory limit "
                        "(ulimit -l, or the container's) may be too low for "
                        "(workers + max_queue_size + 1) slots of the largest batch"
                    ) from error
                self._registered[int(array.ctypes.data)] = slot
            slot.file, slot.segment, slot.array = file, segment, array
            slot.generation += 1

    def cancel(self) -> None:
        """Wakes every thread waiting for a slot; they see ``CancelledError``."""
        self._free.cancel()

    @property
    def nbytes(self) -> int:
        """Bytes held in slots now."""
        return sum(slot.capacity for slot in self._all)

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
            for slot in self._all:
                if slot.file is not None:
                    slot.file.close()
                if self._backend is None:
                    _drop_mapping(slot)

    def close(self) -> None:
        """Frees every slot, once the copies reading them have completed."""
        for slot in self._all:
            self._free_slot(slot)

    def _free_slot(self, slot: Slot) -> None:
        if slot.segment is None:
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
    """Closes a slot's descriptor and mapping (or leaves the mapping to the last view of it)."""
    if slot.file is not None:
        slot.file.close()
        slot.file = None
    segment, slot.segment, slot.array = slot.segment, None, _EMPTY
    if segment is not None:
        with contextlib.suppress(BufferError):  # a batch still views it: it goes with that
            segment.close()
