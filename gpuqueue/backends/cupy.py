"""Backends, CUDA through CuPy: the only module of gpuqueue that imports CuPy.

It uses CuPy's thin wrappers of the CUDA runtime, and CuPy arrays only for
what the consumer receives:

- pinned memory straight from ``cudaHostAlloc`` (not CuPy's pinned pool,
  which frees eagerly): a slot must live until its copy is done, and
  gpuqueue tracks that itself;
- device arenas from ``cudaMallocFromPoolAsync`` and back with
  ``cudaFreeAsync``, in stream order: growing or freeing an arena never
  synchronizes the device, and no arena comes from a pool tied to another
  stream. The pool is the backend's own, with a release threshold: the
  device's default pool is shared with PyTorch and CuPy and, with its
  threshold of 0, hands freed memory back to the OS at every synchronize
  (and the workers synchronize on an event per batch);
- copies with ``cudaMemcpyAsync`` on an explicit stream; events with timing
  disabled (but for the sampled copy timings) that block, rather than spin,
  a host thread that waits for them;
- a batch's views through ``UnownedMemory`` whose owner is the batch's
  lease, so the arena returns only when the last view is gone;
- a batch transform runs with the copy stream current for CuPy (and for
  PyTorch, once imported) and with CuPy's allocator replaced by gpuqueue's
  (``transform_scope``), so what it allocates is stream-ordered memory
  owned like a batch, never CuPy's per-stream pool; ``launch_elementwise``
  compiles and launches gpuqueue's own kernels (``Normalize``).

Every call runs in the backend's device context. The copy thread enters
the device once (``enter_device``) and then calls the runtime directly; in
any other thread (the consumer's, a worker's, a finaliser's) a call enters
it and then restores the thread's device only if the thread already had a
context, so no context appears on a device nobody asked for (``with
cupy.cuda.Device(n)`` would restore device 0 in a fresh thread and make one
there).

Two pieces of CUDA state outlive a call, and CuPy wraps neither, so they
are reached through ctypes:

- the thread's last error, in the runtime: ``cudaEventQuery``'s "not
  ready" stays there, and PyTorch, which checks ``cudaGetLastError`` after
  each kernel it launches, would raise it from the user's next kernel in
  that thread where it shares CuPy's ``libcudart`` (its own fix of the same
  bug: pytorch#18584, #61554). ``elapsed_s`` clears it (``_cudart``);
- the thread's capture mode, in the driver: a user capturing a CUDA graph
  in global mode (``torch.cuda.graph``) has it invalidated by a potentially
  unsafe call (an event query or synchronize, a host allocation) from any
  other thread in global mode, so the copy thread runs in relaxed mode and
  workers make those calls in it (``cuThreadExchangeStreamCaptureMode``).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cupy
import numpy as np

__all__ = [
    "CupyBackend",
    "current_device",
    "device_count",
    "external_stream",
    "launch_elementwise",
    "stream_handle",
]

_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
_HOST_ALLOC_PORTABLE = 1  # cudaHostAllocPortable: pinned for every context
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable
_EVENT_BLOCKING_SYNC = 1  # cudaEventBlockingSync
_EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming
_STREAM_NON_BLOCKING = 1  # cudaStreamNonBlocking
_EVENT_NOT_READY = 600  # cudaErrorNotReady
_MEMORY_POOLS_SUPPORTED = 115  # cudaDevAttrMemoryPoolsSupported
_PER_THREAD_STREAM = 2  # cudaStreamPerThread: a different stream in each host thread
_CAPTURE_RELAXED = 2  # cudaStreamCaptureModeRelaxed
_POOL_ALLOCATION_PINNED = 1  # cudaMemAllocationTypePinned (device memory, not migratable)
_POOL_HANDLE_NONE = 0  # cudaMemHandleTypeNone
_POOL_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice
_POOL_RELEASE_THRESHOLD_ATTRIBUTE = 4  # cudaMemPoolAttrReleaseThreshold
# Freed memory the backend's pool keeps for reuse across synchronizes rather than handing
# back to the OS: every arena and transform output in flight fits several times over, and
# close() destroys the pool (its memory goes back once the last batch holding some dies).
POOL_RELEASE_THRESHOLD = 1 << 62

_runtime = cupy.cuda.runtime
_thread = threading.local()  # .device: the device this thread entered for good (enter_device)
_CUDART: Any = None  # the libcudart CuPy loaded, through ctypes; found on first use
_LIBCUDA: Any = None  # the driver, through ctypes (tests set doubles of both)
_MISSING = object()


def _cudart() -> Any:
    """The shared ``libcudart`` CuPy loaded, or None where CuPy links the runtime in.

    CuPy loads it at its first runtime call (the backend makes one first).
    CuPy 14's wheels link the runtime in instead: that copy's per-thread
    state is then CuPy's alone, and PyTorch's runtime (another copy) never
    sees it, so there is nothing to clear.
    """
    global _CUDART
    if _CUDART is None:
        found: Any = _MISSING
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1]
                if "/libcudart.so" in path:
                    found = ctypes.CDLL(path)
                    break
        _CUDART = found
    return None if _CUDART is _MISSING else _CUDART


def _libcuda() -> Any:
    """The CUDA driver (which CuPy loaded already), or None if it cannot be opened."""
    global _LIBCUDA
    if _LIBCUDA is None:
        try:
            _LIBCUDA = ctypes.CDLL("libcuda.so.1")
        except OSError:
            _LIBCUDA = _MISSING
    return None if _LIBCUDA is _MISSING else _LIBCUDA


def _clear_last_error() -> None:
    """Clears the calling thread's last error in the runtime PyTorch may share with CuPy."""
    cudart = _cudart()
    if cudart is not None:
        cudart.cudaGetLastError()


def _exchange_capture_mode(mode: ctypes.c_int) -> None:
    """Swaps the calling thread's stream-capture mode with ``mode`` (the driver keeps it)."""
    libcuda = _libcuda()
    if libcuda is not None:
        libcuda.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))


@contextlib.contextmanager
def _relaxed_capture() -> Iterator[None]:
    """Runs the block in relaxed capture mode, restoring the thread's mode after it."""
    mode = ctypes.c_int(_CAPTURE_RELAXED)
    _exchange_capture_mode(mode)
    try:
        yield
    finally:
        _exchange_capture_mode(mode)


def _call(device: int, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on ``device``: directly in a thread that entered it for good."""
    if getattr(_thread, "device", None) == device:
        return function(*args)
    with _on_device(device):
        return function(*args)


def device_count() -> int:
    """The number of usable GPUs; raises if the driver or runtime is missing."""
    return int(_runtime.getDeviceCount())


def current_device() -> int:
    """The calling thread's current CUDA device (0 where it never chose one); makes no context."""
    return int(_runtime.getDevice())


@contextlib.contextmanager
def _on_device(device: int) -> Iterator[None]:
    """Runs the block with ``device`` current, leaving no context on another device.

    A thread that already has a context gets its device back afterwards; a
    thread without one (a fresh thread, whose device reads as 0 though it
    has no context there) keeps ``device``, since switching "back" to 0
    would create a context on GPU 0.
    """
    if getattr(_thread, "device", None) == device:
        yield
        return
    had_context = cupy.cuda.driver.ctxGetCurrent() != 0
    previous = int(_runtime.getDevice()) if had_context else None
    if previous != device:
        _runtime.setDevice(device)
    try:
        yield
    finally:
        if previous is not None and previous != device:
            _runtime.setDevice(previous)


def external_stream(stream: Any) -> Any:
    """A CuPy stream object for ``stream`` (anything with ``__cuda_stream__``), made
    current with ``with``: ``Stream.from_external`` where CuPy has it (14 and later,
    where ``ExternalStream`` warns as deprecated), ``ExternalStream`` before."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(stream)
    _version, handle = stream.__cuda_stream__()
    return cupy.cuda.ExternalStream(handle, _runtime.getDevice())


def stream_handle(stream: Any) -> int:
    """The raw ``cudaStream_t`` of a CuPy or PyTorch stream, or of anything speaking
    the CUDA stream protocol (``__cuda_stream__``); an int is taken as a handle."""
    if isinstance(stream, int):
        return stream
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    if hasattr(stream, "cuda_stream"):  # PyTorch
        return int(stream.cuda_stream)
    return int(stream.ptr)  # CuPy


class Stream:
    """A stream handle on one device; owns (and destroys) it when gpuqueue made it.

    A stream made elsewhere (``source``: CuPy's, PyTorch's) is kept alive as
    long as this is, so a batch that outlives the user's stream object never
    records on a destroyed handle. The per-thread default stream is a
    different stream in each host thread: ``thread`` says whose it is.
    """

    def __init__(self, handle: int, device: int, owned: bool, source: Any = None) -> None:
        self.handle, self.device, self.source = handle, device, source
        self.thread = threading.get_ident() if handle == _PER_THREAD_STREAM else None
        if owned:
            # Not at exit: a daemon copy thread of an abandoned run may still use it.
            weakref.finalize(self, _destroy_stream, handle, device).atexit = False

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class Event:
    """An event handle on one device, destroyed with this object."""

    def __init__(self, device: int, timing: bool) -> None:
        flags = _EVENT_BLOCKING_SYNC | (0 if timing else _EVENT_DISABLE_TIMING)
        with _on_device(device):
            self.handle = int(_runtime.eventCreateWithFlags(flags))
        self.device = device
        weakref.finalize(self, _destroy_event, self.handle, device).atexit = False


class Arena:
    """A device allocation: its address and size.

    Freed by ``free_device``; one dropped without it (an abandoned run, a
    failure half-way) is freed by a finaliser once the device is idle.
    """

    def __init__(self, ptr: int, nbytes: int, device: int, stream_ordered: bool) -> None:
        self.ptr, self.nbytes = ptr, nbytes
        self.safety_net = weakref.finalize(self, _free_leaked, ptr, device, stream_ordered)
        self.safety_net.atexit = False


def _free_leaked(ptr: int, device: int, stream_ordered: bool) -> None:
    with contextlib.suppress(Exception), _on_device(device):
        _runtime.deviceSynchronize()  # off the hot path: only for memory dropped by mistake
        if stream_ordered:
            _runtime.freeAsync(ptr, 0)
        else:
            _runtime.free(ptr)


def _destroy_stream(handle: int, device: int) -> None:
    with contextlib.suppress(Exception), _on_device(device):  # the runtime may be gone at exit
        _runtime.streamDestroy(handle)


def _destroy_event(handle: int, device: int) -> None:
    # An event still pending is released by the driver once it completes.
    with contextlib.suppress(Exception), _on_device(device):
        _runtime.eventDestroy(handle)


def _address(buffer: np.ndarray) -> int:
    return int(buffer.ctypes.data)


class CupyBackend:
    """Pinned host slots, device arenas, streams and events, on one GPU.

    Args:
        device: The GPU index.
    """

    name = "cupy"
    shares_host_memory = False
    array_type = cupy.ndarray

    def __init__(self, device: int) -> None:
        self.device: int | None = device
        self._index = device
        self._pinned: dict[int, int] = {}  # address -> bytes, for free_pinned
        self._torch_stream: Stream | None = None
        # A runtime call first: it initialises the driver (cuInit), which the driver
        # API's ctxGetCurrent in _on_device does not, when this is the process's first.
        _runtime.getDeviceCount()
        # Stream-ordered allocation where the device has memory pools (not on some
        # virtual GPUs); elsewhere cudaMalloc and cudaFree, which synchronize.
        self._pool = 0
        with _on_device(device):
            self._stream_ordered = bool(
                _runtime.deviceGetAttribute(_MEMORY_POOLS_SUPPORTED, device)
            )
            if self._stream_ordered:
                props = _runtime.MemPoolProps(
                    _POOL_ALLOCATION_PINNED, _POOL_HANDLE_NONE, _POOL_LOCATION_DEVICE, device
                )
                self._pool = int(_runtime.memPoolCreate(props))
                _runtime.memPoolSetAttribute(
                    self._pool, _POOL_RELEASE_THRESHOLD_ATTRIBUTE, POOL_RELEASE_THRESHOLD
                )
        # Frees what is left if the backend is collected without close(): by then no
        # thread holds it, so no copy reads it. Not at exit, where a daemon copy
        # thread may still run; the process's end frees it then.
        finalizer = weakref.finalize(self, _release, device, self._pinned, self._pool)
        finalizer.atexit = False
        self._finalizer = finalizer

    def enter_device(self) -> None:
        """The calling thread (gpuqueue's copy thread) stays on this device from now on.

        Its calls then skip the context checks and device switches, and are
        made in relaxed capture mode, so a user's graph capture elsewhere
        stays valid.
        """
        _runtime.setDevice(self._index)
        _exchange_capture_mode(ctypes.c_int(_CAPTURE_RELAXED))
        _thread.device = self._index

    def alloc_pinned(self, nbytes: int) -> np.ndarray:
        nbytes = max(1, nbytes)
        with _on_device(self._index), _relaxed_capture():  # in a worker thread
            address = int(_runtime.hostAlloc(nbytes, _HOST_ALLOC_PORTABLE))
        self._pinned[address] = nbytes
        raw = (ctypes.c_uint8 * nbytes).from_address(address)
        return np.ctypeslib.as_array(raw)

    def free_pinned(self, buffer: np.ndarray) -> None:
        address = _address(buffer)
        if self._pinned.pop(address, None) is not None:
            with _on_device(self._index), _relaxed_capture():
                _runtime.freeHost(address)

    def register_host(self, buffer: np.ndarray) -> None:
        with _on_device(self._index), _relaxed_capture():
            _runtime.hostRegister(_address(buffer), buffer.nbytes, _HOST_REGISTER_PORTABLE)

    def unregister_host(self, buffer: np.ndarray) -> None:
        with _on_device(self._index), _relaxed_capture():
            _runtime.hostUnregister(_address(buffer))

    def free_memory(self) -> int:
        with _on_device(self._index):
            free, _total = _runtime.memGetInfo()
        return int(free)

    def alloc_device(self, nbytes: int, stream: Stream) -> Arena:
        nbytes = max(1, nbytes)
        if self._stream_ordered:
            allocate = _runtime.mallocFromPoolAsync
            ptr = int(_call(self._index, allocate, nbytes, self._pool, stream.handle))
        else:
            with _on_device(self._index):
                ptr = int(_runtime.malloc(nbytes))
        return Arena(ptr, nbytes, self._index, self._stream_ordered)

    def free_device(self, arena: Arena, stream: Stream | None) -> None:
        arena.safety_net.detach()
        with _on_device(self._index):
            if not self._stream_ordered:
                _runtime.free(arena.ptr)  # synchronizes the device: the fallback's cost
            elif stream is None:
                _runtime.freeAsync(arena.ptr, 0)  # callers waited for its users first
            elif self._foreign_per_thread(stream):
                _runtime.deviceSynchronize()  # that stream cannot be named from here
                _runtime.freeAsync(arena.ptr, 0)
            else:
                _runtime.freeAsync(arena.ptr, stream.handle)

    def export_scope(self, stream: Stream) -> Any:
        """This device current and ``stream`` CuPy's current stream, for a DLPack export.

        A consumer of ``__dlpack__`` (JAX) orders its read after CuPy's current
        stream of the thread's current device: the batch's device and the
        stream it is ordered on, whatever device the consumer has current.
        """
        scope = contextlib.ExitStack()
        scope.enter_context(_on_device(self._index))
        scope.enter_context(external_stream(stream))
        return scope

    def device_view(self, arena: Arena, nbytes: int, owner: object) -> Any:
        memory = cupy.cuda.UnownedMemory(arena.ptr, max(1, nbytes), owner, self._index)
        return cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(memory, 0))

    def create_stream(self) -> Stream:
        with _on_device(self._index):
            handle = int(_runtime.streamCreateWithFlags(_STREAM_NON_BLOCKING))
        return Stream(handle, self._index, owned=True)

    def current_stream(self) -> Stream:
        with _on_device(self._index):
            current = cupy.cuda.get_current_stream()
        return Stream(stream_handle(current), self._index, owned=False, source=current)

    def as_stream(self, stream: Any) -> Stream:
        if isinstance(stream, Stream):
            return stream
        return Stream(stream_handle(stream), self._index, owned=False, source=stream)

    @staticmethod
    def _foreign_per_thread(stream: Stream) -> bool:
        """True for another thread's per-thread default stream, which this thread cannot name."""
        return stream.thread is not None and stream.thread != threading.get_ident()

    def torch_stream(self) -> Stream:
        """PyTorch's current stream on this device (for ``output="torch"``), asked at every get."""
        import torch

        current = torch.cuda.current_stream(self._index)
        handle = int(current.cuda_stream)
        last = self._torch_stream
        if last is None or last.handle != handle:
            last = self._torch_stream = Stream(handle, self._index, owned=False, source=current)
        return last

    def create_event(self, timing: bool = False) -> Event:
        return Event(self._index, timing)

    def record(self, event: Event, stream: Stream) -> None:
        if self._foreign_per_thread(stream):
            with _on_device(self._index):
                # A batch got on a per-thread default stream died in another thread
                # (the collector, say): that stream cannot be named from here, so
                # wait for the whole device once, and the event marks that point.
                _runtime.deviceSynchronize()
                _runtime.eventRecord(event.handle, _PER_THREAD_STREAM)
        else:
            _call(self._index, _runtime.eventRecord, event.handle, stream.handle)

    def wait_event(self, stream: Stream, event: Event) -> None:
        _call(self._index, _runtime.streamWaitEvent, stream.handle, event.handle, 0)

    def synchronize(self, event: Event) -> None:
        if getattr(_thread, "device", None) == self._index:
            _runtime.eventSynchronize(event.handle)
            return
        with _on_device(self._index), _relaxed_capture():  # a worker's wait for its slot
            _runtime.eventSynchronize(event.handle)

    def elapsed_s(self, start: Event, end: Event) -> float | None:
        """The seconds between two timing events, or None if they are not done yet.

        Never leaves an error behind: ``cudaEventQuery``'s "not ready" would
        stay the thread's last error, which PyTorch raises from its next
        kernel in this thread (the consumer's own, at ``prefetch_depth=0``).
        """
        with _on_device(self._index):
            for event in (start, end):
                status = int(_runtime.eventQuery(event.handle))  # a status; it never raises
                if status == _EVENT_NOT_READY:
                    _clear_last_error()
                    return None
                if status != 0:
                    raise _runtime.CUDARuntimeError(status)
            return float(_runtime.eventElapsedTime(start.handle, end.handle)) / 1e3

    def copy_to_device(self, dst: Arena, src: np.ndarray, nbytes: int, stream: Stream) -> None:
        _call(
            self._index,
            _runtime.memcpyAsync,
            dst.ptr,
            _address(src),
            nbytes,
            _HOST_TO_DEVICE,
            stream.handle,
        )

    def copy_on_device(
        self, dst: Arena, src: Arena, offset: int, nbytes: int, stream: Stream
    ) -> None:
        source = src.ptr + offset
        copy = _runtime.memcpyAsync
        _call(self._index, copy, dst.ptr, source, nbytes, _DEVICE_TO_DEVICE, stream.handle)

    @contextlib.contextmanager
    def transform_scope(
        self, stream: Stream, allocate: Callable[[int], tuple[Arena, object]]
    ) -> Iterator[None]:
        """``stream`` current for CuPy (and PyTorch if imported), device memory from ``allocate``.

        CuPy's allocator is thread-local, as its current stream is: only the
        calling thread (the copy looper) is affected, and only inside.
        """

        def allocator(nbytes: int) -> Any:
            arena, owner = allocate(nbytes)
            memory = cupy.cuda.UnownedMemory(arena.ptr, max(1, nbytes), owner, self._index)
            return cupy.cuda.MemoryPointer(memory, 0)

        with contextlib.ExitStack() as scope:
            scope.enter_context(_on_device(self._index))
            # A fresh object each time: a stream object's enter/exit keep state of their own.
            scope.enter_context(external_stream(stream))
            scope.enter_context(cupy.cuda.using_allocator(allocator))
            torch_stream = self.torch_stream_of(stream)
            if torch_stream is not None:
                import torch

                scope.enter_context(torch.cuda.stream(torch_stream))
            yield

    def torch_stream_of(self, stream: Stream) -> Any:
        """``stream`` as a PyTorch stream, or None where PyTorch is not imported or has no CUDA."""
        if "torch" not in sys.modules:
            return None
        import torch

        if not torch.cuda.is_available():
            return None
        if isinstance(stream.source, torch.cuda.Stream):
            return stream.source
        return torch.cuda.ExternalStream(stream.handle, device=torch.device("cuda", self._index))

    def close(self) -> None:
        """Frees the pinned memory still allocated (after the device is done with it), and
        destroys the memory pool (CUDA frees it once the last allocation from it is freed)."""
        self._finalizer()


_KERNELS: dict[tuple[str, str], Any] = {}
_KERNELS_LOCK = threading.Lock()
_THREADS = 256


def launch_elementwise(
    source: str, name: str, x: Any, out_shape: tuple[int, ...], out_dtype: Any, scalars: list[Any]
) -> Any:
    """Runs kernel ``name`` of ``source`` once over ``x``, into a new array it returns.

    The kernel takes ``(x, out, n, *scalars)`` and loops over the ``n``
    elements of ``x`` (grid-stride); it is compiled once per source and
    launched on CuPy's current stream, and ``out`` comes from the current
    allocator: inside a transform, the copy stream and gpuqueue's memory.
    """
    key = (source, name)
    with _KERNELS_LOCK:
        kernel = _KERNELS.get(key)
        if kernel is None:
            kernel = _KERNELS[key] = cupy.RawKernel(source, name)
    if not x.flags.c_contiguous:
        x = cupy.ascontiguousarray(x)
    out = cupy.empty(out_shape, out_dtype)
    size = math.prod(x.shape)
    if size:
        blocks = min(-(-size // _THREADS), 1 << 16)
        kernel((blocks,), (_THREADS,), (x, out, np.int64(size), *scalars))
    return out


def _release(device: int, pinned: dict[int, int], pool: int) -> None:
    with _on_device(device):
        if pool:
            # Batches still held keep their memory: a pool destroyed with allocations
            # outstanding is released by CUDA once the last of them is freed.
            _runtime.memPoolDestroy(pool)
        if not pinned:
            return
        # Only off the hot path (close, or a backend collected after an abandoned
        # run): wait for every copy that may still read a buffer, then free.
        _runtime.deviceSynchronize()
        for address in list(pinned):
            _runtime.freeHost(address)
    pinned.clear()
