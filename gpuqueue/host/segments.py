"""Host stage, shared memory: segments with no name, made, reserved, mapped, passed on.

Each segment is a ``memfd`` (Linux), or where there is none an unnamed file
in ``/dev/shm`` (``O_TMPFILE``, or unlinked the moment it is made), its space
reserved when it is made (``posix_fallocate``), so a full ``/dev/shm`` or
memory limit is a clear error, not a SIGBUS in a worker halfway through a
write. A mapping holds no descriptor (libc's ``mmap``, not ``mmap.mmap``);
a process receives a segment's descriptor over its pipe once. The slots
built on these are ``shm.py``'s.
"""

from __future__ import annotations

import ctypes
import errno
import io
import mmap
import os
import tempfile
import weakref
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import numpy as np

from ..batch.layout import GROWTH
from ..errors import PipelineError

__all__ = ["create_segment", "map_segment", "receive_segment", "send_segment"]


# Where segments live when there is no memfd_create (tests point this elsewhere).
SHM_DIR = "/dev/shm"
USE_MEMFD = hasattr(os, "memfd_create")

# The errors by which a full tmpfs, memory cgroup or file-size limit refuses a reservation.
_NO_ROOM = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT)


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
        f"(workers + max_queue_size + 1) slots of the largest batch (x {GROWTH} once batch "
        f"sizes grew), plus one per batch the consumer holds; "
        f"{remedy}, or use smaller batches, fewer workers, a smaller max_queue_size, or "
        "threads (use_multiprocessing=False). docker run's default --shm-size is 64 MiB."
    )


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int64,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_segment(fd: int, nbytes: int) -> np.ndarray:
    """Maps ``nbytes`` of the shared file ``fd`` as a uint8 array; ``fd`` may be closed after.

    Not ``mmap.mmap``: it keeps a duplicate of the descriptor for as long as
    the mapping lives, which for a slot lent to the consumer is as long as
    the user holds its batch (one descriptor per held batch, up to the
    process's limit). This mapping holds no descriptor, and is unmapped when
    the array and every view of it are gone (its ctypes base's finaliser).
    """
    address = _LIBC.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        error = ctypes.get_errno()
        raise OSError(error, f"mmap of {nbytes} bytes failed: {os.strerror(error)}")
    raw = (ctypes.c_uint8 * nbytes).from_address(address)
    weakref.finalize(raw, _LIBC.munmap, address, nbytes).atexit = False
    array: np.ndarray = np.frombuffer(raw, dtype=np.uint8)  # type: ignore[call-overload]
    return array


def create_segment(nbytes: int) -> tuple[io.FileIO, np.ndarray]:
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
        segment = map_segment(fd, nbytes)
        return io.FileIO(fd, "r+", closefd=True), segment
    except BaseException:
        os.close(fd)
        raise


def send_segment(conn: Connection, fd: int, pid: int | None) -> None:
    """Passes a segment's descriptor to the process at the other end of ``conn``."""
    send_handle(conn, fd, pid)


def receive_segment(conn: Connection, nbytes: int) -> np.ndarray:
    """Maps the segment whose descriptor ``send_segment`` sent (closing the received one)."""
    fd = recv_handle(conn)
    try:
        return map_segment(fd, nbytes)
    finally:
        os.close(fd)
