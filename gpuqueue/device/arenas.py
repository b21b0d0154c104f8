"""Device stage, arenas: memory the consumer owns, one arena per batch, reused once dropped.

The copy stage takes an arena for each batch (a free one, or one allocated
in the copy stream's order), copies into it and records "ready". The
consumer's views of it all keep one lease; when the last dies, "released"
is recorded on the consumer's stream and the copy stream waits on it before
writing the arena again (PyTorch's caching allocator with ``record_stream``):
a batch stays valid as long as it is held, and nothing synchronizes the host.
A transform (``transforms.py``) runs after the copy, on the copy stream,
before "ready"; memory it allocates comes from here (``alloc_owned``), owned
the same way (``copied.Owner``: the copy stream's until delivery, the
consumer's after).
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

from ..backends.base import Backend
from ..batch.layout import GROWTH, Staged, arena_view, leaf_nbytes, small_leaves
from ..batch.tree import flatten, rebuild
from ..errors import CancelledError
from .copied import Copied, DeviceArena, Lease, Owner

__all__ = ["DeviceArenas"]

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

    def __init__(
        self,
        backend: Backend,
        depth: int,
        keep: int,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.backend = backend
        self._transform = transform
        self.transform_s = 0.0  # host time the copy stage spent calling the transform
        self._depth, self._keep = max(1, depth), keep
        self._cond = threading.Condition()
        self._free: list[DeviceArena] = []
        self._in_flight = 0  # copied (or reserved) and not yet delivered
        self._cancelled = False
        self._closed = False
        self.largest = 0  # the largest batch seen: every new arena takes it, with a margin
        self.largest_output = 0  # the most a transform's outputs held for one batch
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
        adopt = staged.exchange is not None and backend.shares_host_memory
        if adopt:
            arena = self._adopt(staged, arena)
        elif arena is None:
            capacity = max(1, int(self.largest * GROWTH))
            arena = DeviceArena(backend.alloc_device(capacity, stream), capacity, None)
            arena.released = backend.create_event()
            with self._cond:
                self.device_bytes += capacity
        elif arena.released_once:
            backend.wait_event(stream, arena.released)
        copied = Copied(arena, None, staged.treedef, staged.metas, staged.nbytes)
        copied.owner = Owner(stream)  # the copy stream's until the batch is delivered
        try:
            copied.ready = ready = backend.create_event()
            timed = not adopt and self._copies % _TIMING_EVERY == 0
            if timed:
                start, end = backend.create_event(timing=True), backend.create_event(timing=True)
                backend.record(start, stream)
            if not adopt:
                backend.copy_to_device(arena.memory, staged.buffer, staged.nbytes, stream)
            if timed:
                backend.record(end, stream)
                self._timings.append((start, end, staged.nbytes))
            self._copy_out(copied, stream)
            if self._transform is None:
                backend.record(ready, stream)
        except BaseException:
            copied.small = None  # their memory goes back in the copy stream's order
            self._retire(arena, stream)  # in stream order after whatever was issued
            raise
        if self._transform is not None:
            self._transformed(copied, stream)
            try:
                # After the transform's work: the consumer's one wait covers both.
                backend.record(ready, stream)
            except BaseException:
                copied.batch = None  # its memory goes back in the copy stream's order
                raise
        staged.release(ready)  # recorded after this copy: the slot is free once it completes
        self._copies += 1
        self.bytes_copied += staged.nbytes
        self._read_timings()
        return copied

    def _copy_out(self, copied: Copied, stream: Any) -> None:
        """Copies the batch's small leaves out of its arena, each into memory of its own.

        A held label then holds its own bytes, not the arena with the batch's
        images (``batch.layout.SMALL_LEAF_BYTES``). The copies are device-to-device,
        on ``stream`` after the batch's one host-to-device copy and before
        "ready"; the memory is owned as a transform's is (``alloc_owned``):
        freed in its last user's stream order once its last view dies.
        """
        positions = small_leaves(copied.metas)
        copy_on_device = getattr(self.backend, "copy_on_device", None)
        if not positions or copy_on_device is None:  # (a backend of the user's may lack it)
            return
        owner = copied.owner
        assert owner is not None
        copied.small = small = {}
        for position in positions:
            meta = copied.metas[position]
            nbytes = leaf_nbytes(meta)
            memory, lease = self.alloc_owned(nbytes, owner)
            small[position] = (memory, lease)
            if nbytes:
                copy_on_device(memory, copied.arena.memory, meta.offset, nbytes, stream)

    def _views(self, copied: Copied, owner: Owner) -> list[Any]:
        """The batch's leaves as device arrays: views of its arena, or of their own memory.

        The arena's views keep one lease of the arena alive; each small
        leaf's keeps its own memory's lease (and nothing else).
        """
        backend, small = self.backend, copied.small or {}
        copied.small = None  # from now on the views hold the leases, and only they
        lease = self._lease(copied, owner)
        whole = backend.device_view(copied.arena.memory, copied.nbytes, lease)
        del lease
        views = []
        for position, meta in enumerate(copied.metas):
            own = small.pop(position, None)
            if own is None:
                views.append(arena_view(whole, meta))
            else:
                memory = backend.device_view(own[0], leaf_nbytes(meta), own[1])
                views.append(arena_view(memory, meta, offset=0))
                del own, memory
        return views

    def _transformed(self, copied: Copied, stream: Any) -> None:
        """Runs the transform on the copied batch, on ``stream``; an error goes in ``copied``.

        The error's frames are cleared: they would keep the batch's views,
        and with them its arena, alive for as long as the error is kept.
        """
        copied.transformed = True
        owner = copied.owner
        assert owner is not None
        started = time.perf_counter()
        try:
            copied.batch, copied.kinds = self._apply(copied, owner, stream)
            # (its temporaries are gone: what is left goes with the batch)
            self.largest_output = max(self.largest_output, owner.live)
        except BaseException as error:  # SystemExit too: it belongs in its batch's place
            if isinstance(error, KeyboardInterrupt) and (
                threading.current_thread() is threading.main_thread()
            ):
                raise  # Ctrl-C in the consumer's own get() (depth 0): it goes up at once
            traceback.clear_frames(error.__traceback__)
            copied.error = error
        finally:
            self.transform_s += time.perf_counter() - started

    def _apply(self, copied: Copied, owner: Owner, stream: Any) -> tuple[Any, list[str | None]]:
        assert self._transform is not None
        backend = self.backend
        views = self._views(copied, owner)
        with backend.transform_scope(stream, lambda nbytes: self.alloc_owned(nbytes, owner)):
            batch = self._transform(rebuild(copied.treedef, views))
        # A leaf handed back as it came keeps its kind (a bfloat16 tensor's bits, say).
        kinds = {id(view): meta.kind for view, meta in zip(views, copied.metas, strict=True)}
        return batch, [kinds.get(id(leaf)) for _, leaf in flatten(batch)[1]]

    def alloc_owned(self, nbytes: int, owner: Owner) -> tuple[Any, Lease]:
        """Device memory for a transform, and the lease whose death frees it.

        It is allocated in ``owner.stream``'s order, and freed in the order of
        whichever stream ``owner`` names when the lease dies (the copy stream
        for a temporary, the consumer's for an output it was given).
        """
        nbytes = max(1, nbytes)
        memory = self.backend.alloc_device(nbytes, owner.stream)
        lease = Lease()
        finalizer = weakref.finalize(lease, self._free_owned, memory, nbytes, owner)
        finalizer.atexit = False
        with self._cond:
            self.device_bytes += nbytes
            owner.live += nbytes
        return memory, lease

    def _free_owned(self, memory: Any, nbytes: int, owner: Owner) -> None:
        # As in _give_back: a finaliser has nobody to raise to; the safety net frees it.
        with contextlib.suppress(Exception):
            self.backend.free_device(memory, owner.stream)
        with self._cond:
            self.device_bytes -= nbytes
            owner.live -= nbytes

    def _lease(self, copied: Copied, owner: Owner) -> Lease:
        lease = Lease()
        # Not at exit: the interpreter's end frees everything, and the device may be gone.
        weakref.finalize(lease, self._give_back, copied.arena, owner).atexit = False
        return lease

    def _adopt(self, staged: Staged, arena: DeviceArena | None) -> DeviceArena:
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
        return arena

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
        owner = copied.owner
        assert owner is not None
        if copied.transformed:
            batch, copied.batch = copied.batch, None
            # Held here, so nothing of it can die before its owner learns the stream.
            owner.stream = consumer_stream
            return batch
        # Before the views exist: a leaf dropped at once is freed in the consumer's order.
        owner.stream = consumer_stream
        return rebuild(copied.treedef, self._views(copied, owner))

    def _give_back(self, arena: DeviceArena, owner: Owner) -> None:
        """The last view of a batch died: its arena is reusable after its last user's work."""
        stream = owner.stream
        with self._cond:
            closed = self._closed
        try:
            if not closed:
                self.backend.record(arena.released, stream)
                arena.released_once = True
                if self._put_free(arena):
                    return
            # Freed in the last user's stream order, so after the work it queued.
            self.backend.free_device(arena.memory, stream)
        except Exception:
            # A finaliser has nobody to raise to. The arena is dropped; the backend's
            # safety net frees its memory once the device is done with it, and a
            # broken device says so at the consumer's next call.
            pass
        with self._cond:
            self.device_bytes -= arena.capacity

    def discard(self, copied: Copied) -> None:
        """An undelivered batch (dropped on stop): its arena is freed once its copy is done."""
        copied.small = None  # (their leases free them in the copy stream's order)
        if copied.transformed:
            copied.batch = None  # its leases give everything back in the copy stream's order
            return
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
