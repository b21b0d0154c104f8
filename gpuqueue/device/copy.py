"""Device stage, the copy: each staged batch into a device arena, on the copy stream.

::

    worker ──pack──▶ pinned slot ──host queue──▶ CopyLooper ──memcpyAsync──▶ device arena
                                                  (copy stream)                     │
                                         device queue (prefetch_depth) ◀── ready ───┘

``copy_one`` is the one copy of one batch, used by the ``CopyLooper`` (on its
copy stream, ``prefetch_depth`` batches ahead) and by the consumer itself at
``prefetch_depth=0`` (on the consumer's stream, inside ``get()``): a failed
copy or transform goes on in the batch's place the same way in both. The
arenas the consumer owns, their fences and the transform are ``arenas.py``.
Backends only say how to allocate, copy and fence (``backends.base``); this
module is the one code path for all of them.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from ..errors import CancelledError, OutOfRangeError, ctrl_c_in, note_thread
from ..host.items import Item
from ..sync.channel import FIFOQueue
from ..sync.coordinator import Coordinator, LooperThread
from .arenas import DeviceArenas

__all__ = ["Copy", "CopyLooper", "copy_one"]


class Copy(enum.Enum):
    """How a run's batches reach the consumer."""

    NONE = "no device: the host queue's batches, as the workers made them"
    IN_GET = "prefetch_depth=0: the consumer copies each batch in get(), on its own stream"
    AHEAD = "a CopyLooper copies prefetch_depth batches ahead, on its own stream"


def copy_one(arenas: DeviceArenas, item: Item, stream: Any) -> None:
    """Copies ``item``'s staged batch into an arena on ``stream`` (and transforms it).

    Waits for room first (at most ``depth`` batches ahead of the consumer).
    On success ``item.copied`` is set; if the copy or the transform raised,
    the staged slot goes back and the error, noted with the thread and the
    batch, is ``item.error``, to travel in the batch's place.

    Raises:
        CancelledError: If the arenas were cancelled while it waited for
            room (the pipeline is stopping); the staged slot goes back.
        BaseException: Ctrl-C (also disguised by a lock, ``errors.ctrl_c_in``)
            and other non-``Exception`` errors go on up, after the slot and
            the reservation are given back.
    """
    staged = item.staged
    assert staged is not None
    try:
        arenas.reserve()
    except BaseException:
        staged.release(None)
        raise
    try:
        copied = arenas.copy(staged, stream)
    except BaseException as error:
        staged.release(None)
        arenas.unreserve()
        if not isinstance(error, Exception) or ctrl_c_in(error) is not None:
            raise
        note_thread(error, f"copying {item.task.where()}")
        item.error = error
        return
    if copied.error is None:
        item.copied = copied
    else:  # the transform raised: the error goes on in the batch's place
        arenas.unreserve()
        note_thread(copied.error, f"transforming {item.task.where()}")
        item.error = copied.error


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
        host_queue: FIFOQueue[Item],
        device_queue: FIFOQueue[Item],
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
        if item.error is None and item.staged is not None:
            try:
                copy_one(arenas, item, self._stream)
            except CancelledError:
                return
        try:
            self._device_queue.put(item)
        except CancelledError:
            if item.copied is not None:
                arenas.discard(item.copied)

    def stop_loop(self) -> None:
        self._arenas = None
        self._stream = None
