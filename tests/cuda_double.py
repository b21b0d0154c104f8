"""A strict CUDA double: a stand-in for the part of CuPy that gpuqueue's backend calls.

Installed as the ``cupy`` module (``install``), it lets the real
``gpuqueue/backends/cupy.py`` run on a machine without a GPU, and records the
mistakes a GPU punishes, instead of forgiving them as NumPy does:

- a CUDA call outside the context of the device its stream, event or memory
  belongs to, and every context made (a call with no current context makes
  one on device 0, as the CUDA runtime does);
- memory written or freed by a stream before that stream waited (through an
  event) for every earlier reader and writer on another stream, memory used
  on a stream that its allocation was not ordered before, use after free;
- a batch read on the consumer's stream before its copy is ordered before it;
- pinned memory changed, freed or unregistered while a copy reading it has
  not been waited for by the host;
- non-native byte order reaching a device array;
- a kernel (``RawKernel``) launched on a stream that is not ordered after
  the copy or kernel that wrote its inputs, or writing memory before the
  wait on its last reader; a read of a batch before the kernel that wrote it
  (a transform's, run after "ready" or on the wrong stream).

Kernels run on CuPy's current stream of the calling thread
(``ExternalStream`` as a context manager sets it); a kernel's ``const``
pointer parameters are its reads, the other pointers its writes; its values
come from a NumPy model of the kernel, by name (``KERNEL_MODELS``). Arrays
are allocated (``cupy.empty``) only through an allocator installed with
``using_allocator``: the double has no memory pool of its own.

Work runs at once, in the order it is issued (so values are right); the
ordering a GPU would need is checked with a vector clock per stream: an
event snapshots its stream's clock, a stream wait merges it, a host
synchronize merges it into the host's clock, and work the host has seen
complete is ordered before anything issued after. Events report "not ready"
to the first query the host has not waited for (as a busy GPU does), and
timing them before they are done fails as CUDA does. Handle 0 is the
legacy default stream of the calling thread's device. Violations are
collected in ``violations``; the ``strict_cuda`` fixture fails a test that
has any, and one that leaves device memory allocated.

It also keeps the state CUDA keeps behind a caller's back:

- a per-thread last error: ``eventQuery``'s "not ready" sets it (CuPy
  returns the status and never clears it), ``native.cudaGetLastError``
  reads and clears it, and ``torch_launch_check`` (what PyTorch does after
  each of its kernel launches) turns it into a failure;
- the driver API is not initialised until the first runtime call
  (``ctxGetCurrent`` before one fails with ``CUDA_ERROR_NOT_INITIALIZED``);
- a kernel's parameters must fit the parameter space (32 764 bytes), or it
  does not compile;
- a user's graph capture in global mode (``begin_capture``): a runtime call
  from any other thread whose capture mode is not relaxed invalidates it;
- ``ExternalStream`` warns as deprecated, as in CuPy 14 (``Stream.from_external``
  replaces it); allocations from the device's default pool
  (``mallocAsync``) are counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import re
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Clock = dict[int, int]  # stream handle -> the last of its operations seen


def _merge(into: Clock, other: Clock) -> None:
    for stream, tick in other.items():
        if into.get(stream, 0) < tick:
            into[stream] = tick


def _covers(clock: Clock, access: tuple[int, int]) -> bool:
    stream, tick = access
    return clock.get(stream, 0) >= tick


@dataclass
class _Stream:
    handle: int
    device: int
    clock: Clock = field(default_factory=dict)


@dataclass
class _Event:
    handle: int
    device: int
    timing: bool
    snapshot: Clock | None = None
    queried: bool = False  # a first query said "not ready"; the next one says done


@dataclass
class _Allocation:
    ptr: int
    nbytes: int
    device: int
    storage: Any  # a ctypes buffer: the "device" bytes
    made: tuple[int, int] | None  # (stream, tick) it was allocated at; None: before everything
    accesses: list[tuple[int, int, str]] = field(default_factory=list)  # (stream, tick, what)
    freed: bool = False


@dataclass
class _PendingRead:
    stream: int
    tick: int
    start: int
    nbytes: int
    snapshot: bytes


@dataclass
class _Pinned:
    address: int
    nbytes: int
    buffer: Any  # keeps host memory from hostAlloc alive; None for registered memory
    reads: list[_PendingRead] = field(default_factory=list)


class CUDADriverError(RuntimeError):
    def __init__(self, status: int) -> None:
        super().__init__(f"CUresult {status}")
        self.status = status


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int) -> None:
        super().__init__(f"cudaError {status}")
        self.status = status


class StrictCuda:
    """The double's state: devices, contexts, streams, events, memory, and what went wrong."""

    def __init__(self, devices: int = 2, elapsed_ms: float = 1.0, pools: bool = True) -> None:
        self.devices = devices
        self.pools = pools  # cudaDevAttrMemoryPoolsSupported
        self.refuse_register = False  # hostRegister fails, as over the locked-memory limit
        self.elapsed_ms = elapsed_ms
        self.lock = threading.RLock()
        self.local = threading.local()
        self.contexts: set[int] = set()
        self.violations: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (thread name, runtime call), in order
        self.host_clock: Clock = {}
        self.streams: dict[int, _Stream] = {}
        self.events: dict[int, _Event] = {}
        self.allocations: dict[int, _Allocation] = {}
        self.pinned: dict[int, _Pinned] = {}
        self.initialized = False  # the driver API, until the first runtime call (cuInit)
        self.capturing: int | None = None  # the thread id capturing a graph in global mode
        self.default_pool_allocations = 0  # mallocAsync: the device's pool, shared by all
        self.pools_created: dict[int, dict[int, int]] = {}  # pool handle -> attributes set
        self.kernels: dict[tuple[str, str], int] = {}  # (source, name) -> times compiled
        self.native = _Native(self)
        self._handles = itertools.count(0x1000, 0x10)
        self._next_address = 0x7F0000000000  # made-up device addresses, never overlapping
        for device in range(devices):
            self._new_stream(self.default_stream(device), device)

    # -- bookkeeping ------------------------------------------------------

    @staticmethod
    def default_stream(device: int) -> int:
        """The double's own name for a device's legacy default stream (handle 0 there)."""
        return 0x10 + device

    def _new_stream(self, handle: int, device: int) -> _Stream:
        stream = _Stream(handle, device)
        self.streams[handle] = stream
        return stream

    def violate(self, message: str) -> None:
        with self.lock:
            self.violations.append(f"{threading.current_thread().name}: {message}")

    def runtime_call(self, call: str) -> None:
        """Any runtime call: it initialises the driver; during a user's global-mode
        capture, a potentially unsafe call from another thread that is not in relaxed
        mode invalidates it."""
        self.initialized = True
        capturing = self.capturing
        unsafe = call in _UNSAFE_DURING_CAPTURE
        relaxed = getattr(self.local, "capture_mode", 0) == _CAPTURE_RELAXED
        if unsafe and capturing not in (None, threading.get_ident()) and not relaxed:
            self.violate(f"{call} during another thread's graph capture (global mode)")

    def begin_capture(self) -> None:
        """The calling thread begins a graph capture in global mode, as torch.cuda.graph does."""
        self.capturing = threading.get_ident()

    def end_capture(self) -> None:
        self.capturing = None

    def torch_launch_check(self) -> None:
        """What PyTorch does after each kernel it launches: ``cudaGetLastError``, raising if set."""
        error = getattr(self.local, "last_error", 0)
        self.local.last_error = 0
        if error:
            raise RuntimeError(f"CUDA error: device not ready (cudaError {error})")

    def current(self, call: str) -> int:
        """The calling thread's device for ``call``; with no context, device 0's is made."""
        self.runtime_call(call)
        with self.lock:
            self.calls.append((threading.current_thread().name, call))
            device = getattr(self.local, "device", None)
            if device is None:
                device = self.local.device = 0
                self.contexts.add(0)
            return device

    def in_context(self, call: str, device: int) -> None:
        current = self.current(call)
        if current != device:
            self.violate(f"{call} on device {device} from device {current}'s context")

    def tick(self, stream: _Stream) -> tuple[int, int]:
        stream.clock[stream.handle] = stream.clock.get(stream.handle, 0) + 1
        return stream.handle, stream.clock[stream.handle]

    def stream(self, handle: int) -> _Stream:
        if handle == 0:  # the legacy default stream of the calling thread's device
            handle = self.default_stream(getattr(self.local, "device", None) or 0)
        try:
            return self.streams[handle]
        except KeyError:
            raise AssertionError(f"unknown or destroyed stream handle {handle:#x}") from None

    def done(self, stream: _Stream, access: tuple[int, int]) -> bool:
        """Whether work ``access`` is ordered before what ``stream`` runs next."""
        return _covers(stream.clock, access) or _covers(self.host_clock, access)

    def allocation(self, ptr: int) -> _Allocation:
        for allocation in self.allocations.values():
            if allocation.ptr <= ptr < allocation.ptr + max(1, allocation.nbytes):
                return allocation
        raise AssertionError(f"{ptr:#x} is not device memory")

    def _check_device_access(self, allocation: _Allocation, stream: _Stream, what: str) -> None:
        if allocation.freed:
            self.violate(f"{what} on stream {stream.handle:#x} uses memory already freed")
        if allocation.device != stream.device:
            self.violate(f"{what}: memory of device {allocation.device} on device {stream.device}")
        if allocation.made is not None and not self.done(stream, allocation.made):
            self.violate(
                f"{what} on stream {stream.handle:#x} uses memory allocated on stream "
                f"{allocation.made[0]:#x} without waiting for it"
            )

    def _check_ordered_after_all(self, allocation: _Allocation, stream: _Stream, what: str) -> None:
        for other, tick, earlier in allocation.accesses:
            if other != stream.handle and not self.done(stream, (other, tick)):
                self.violate(
                    f"{what} on stream {stream.handle:#x} is not ordered after the {earlier} "
                    f"on stream {other:#x} (no wait on an event after it)"
                )

    def _check_pinned(self, pinned: _Pinned, what: str, *, final: bool) -> None:
        """Copies from ``pinned`` the host has not waited for must still see their bytes.

        With ``final`` (a free or an unregister), there must be none left.
        Those the host has waited for are dropped: the host may write again.
        """
        still = []
        for read in pinned.reads:
            if _covers(self.host_clock, (read.stream, read.tick)):
                continue
            now = bytes(ctypes.string_at(pinned.address + read.start, read.nbytes))
            if now != read.snapshot:
                self.violate(f"pinned memory changed under a copy not yet waited for ({what})")
            elif final:
                self.violate(f"pinned memory {what} with a copy reading it not yet waited for")
            still.append(read)
        pinned.reads = still

    def pinned_at(self, address: int) -> _Pinned | None:
        for pinned in self.pinned.values():
            if pinned.address <= address < pinned.address + pinned.nbytes:
                return pinned
        return None

    def read(self, array: Any, stream_handle: int, what: str = "a kernel") -> np.ndarray:
        """A kernel on ``stream_handle`` reads ``array``: checked, and its values returned."""
        with self.lock:
            stream = self.stream(stream_handle)
            self.in_context(f"{what} read", stream.device)
            allocation = self.allocation(array.data.ptr)
            self._check_device_access(allocation, stream, what)
            for other, tick, earlier in allocation.accesses:
                if earlier in _WRITES and not self.done(stream, (other, tick)):
                    self.violate(
                        f"{what} on stream {stream_handle:#x} reads a batch before "
                        + ("its copy" if earlier == "copy" else "the kernel that wrote it")
                    )
            stream_tick = self.tick(stream)
            allocation.accesses.append((*stream_tick, "read"))
            values: np.ndarray = array._host_copy()
            return values

    def current_stream(self) -> int:
        """The handle of CuPy's current stream in the calling thread (0: the default)."""
        stack = getattr(self.local, "streams", None)
        return stack[-1] if stack else 0

    def launch(self, name: str, reads: list[Any], writes: list[Any], model: Any) -> None:
        """Kernel ``name`` on the current stream reads ``reads`` and writes ``writes``.

        Checked as a GPU orders it; then ``model`` (NumPy arrays of the reads
        in, arrays for the writes out) gives the values written.
        """
        with self.lock:
            handle = self.current_stream()
            stream = self.stream(handle)
            what = f"kernel {name}"
            self.in_context(what, stream.device)
            for array in reads:
                allocation = self.allocation(array.data.ptr)
                self._check_device_access(allocation, stream, what)
                for other, tick, earlier in allocation.accesses:
                    ordered = other == stream.handle or self.done(stream, (other, tick))
                    if earlier in _WRITES and not ordered:
                        self.violate(
                            f"{what} on stream {stream.handle:#x} reads memory before the "
                            f"{earlier} on stream {other:#x} that wrote it"
                        )
            for array in writes:
                allocation = self.allocation(array.data.ptr)
                self._check_device_access(allocation, stream, what)
                self._check_ordered_after_all(allocation, stream, what)
            inputs = [array._host_copy() for array in reads]
            stream_tick = self.tick(stream)
            for array in reads:
                self.allocation(array.data.ptr).accesses.append((*stream_tick, "kernel read"))
            for array, values in zip(writes, model(inputs), strict=True):
                allocation = self.allocation(array.data.ptr)
                allocation.accesses.append((*stream_tick, "kernel write"))
                data = np.ascontiguousarray(values, dtype=array.dtype).reshape(array.shape)
                start = ctypes.addressof(allocation.storage) + array.data.ptr - allocation.ptr
                ctypes.memmove(start, data.tobytes(), data.nbytes)


_WRITES = ("copy", "kernel write")
_CAPTURE_GLOBAL, _CAPTURE_THREAD_LOCAL, _CAPTURE_RELAXED = 0, 1, 2
# CUDA's "potentially unsafe" calls: those that may synchronize implicitly, refused
# (and the capture invalidated) outside relaxed mode while a global-mode capture runs.
_UNSAFE_DURING_CAPTURE = frozenset(
    (
        "eventQuery",
        "eventSynchronize",
        "deviceSynchronize",
        "hostAlloc",
        "freeHost",
        "hostRegister",
        "hostUnregister",
        "malloc",
        "free",
    )
)
PARAMETER_SPACE = 32764  # bytes of kernel parameters (Volta and later, CUDA 12.1 and later)


class _Native:
    """What gpuqueue reaches through ctypes, CuPy wrapping neither: libcudart's
    ``cudaGetLastError`` and the driver's ``cuThreadExchangeStreamCaptureMode``."""

    def __init__(self, cuda: StrictCuda) -> None:
        self._cuda = cuda

    def cudaGetLastError(self) -> int:
        local = self._cuda.local
        error = int(getattr(local, "last_error", 0))
        local.last_error = 0
        return error

    def cuThreadExchangeStreamCaptureMode(self, mode: Any) -> int:
        """``mode`` is a ctypes int by reference: swapped with the thread's mode."""
        local = self._cuda.local
        target = mode._obj if hasattr(mode, "_obj") else mode
        previous = getattr(local, "capture_mode", _CAPTURE_GLOBAL)
        local.capture_mode = int(target.value)
        target.value = previous
        return 0


class MemPoolProps:
    """``cupy.cuda.runtime.MemPoolProps(allocType, handleType, locationType, devId)``."""

    def __init__(self, allocType: int, handleType: int, locationType: int, devId: int) -> None:
        self.allocType, self.handleType = allocType, handleType
        self.locationType, self.devId = locationType, devId


class _Runtime(types.ModuleType):
    """``cupy.cuda.runtime``: the calls gpuqueue's backend makes, checked."""

    CUDARuntimeError = CUDARuntimeError
    MemPoolProps = MemPoolProps
    cudaMemPoolAttrReleaseThreshold = 4

    def __init__(self, cuda: StrictCuda) -> None:
        super().__init__("cupy.cuda.runtime")
        self._cuda = cuda

    def getDeviceCount(self) -> int:
        self._cuda.runtime_call("getDeviceCount")
        return self._cuda.devices

    def getDevice(self) -> int:
        cuda = self._cuda
        cuda.runtime_call("getDevice")
        with cuda.lock:
            cuda.calls.append((threading.current_thread().name, "getDevice"))
        device = getattr(cuda.local, "device", None)
        return 0 if device is None else int(device)

    def setDevice(self, device: int) -> None:
        cuda = self._cuda
        cuda.runtime_call("setDevice")
        if not 0 <= device < cuda.devices:
            raise CUDARuntimeError(101)
        with cuda.lock:
            cuda.calls.append((threading.current_thread().name, "setDevice"))
            cuda.local.device = device
            cuda.contexts.add(device)  # CUDA 12: setDevice makes the primary context

    def hostAlloc(self, nbytes: int, flags: int) -> int:
        cuda = self._cuda
        cuda.current("hostAlloc")
        buffer = ctypes.create_string_buffer(nbytes)
        address = ctypes.addressof(buffer)
        with cuda.lock:
            cuda.pinned[address] = _Pinned(address, nbytes, buffer)
        return address

    def freeHost(self, address: int) -> None:
        self._let_go("freeHost", address, "freed", "which hostAlloc did not return")

    def hostRegister(self, address: int, nbytes: int, flags: int) -> None:
        cuda = self._cuda
        cuda.current("hostRegister")
        if cuda.refuse_register:
            raise CUDARuntimeError(2)  # cudaErrorMemoryAllocation, as over the locked limit
        with cuda.lock:
            cuda.pinned[address] = _Pinned(address, nbytes, None)

    def hostUnregister(self, address: int) -> None:
        self._let_go("hostUnregister", address, "unregistered", "which is not registered")

    def _let_go(self, call: str, address: int, done: str, unknown: str) -> None:
        """Pinned memory freed or unregistered: no copy reading it may still be pending."""
        cuda = self._cuda
        cuda.current(call)
        with cuda.lock:
            pinned = cuda.pinned.pop(address, None)
            if pinned is None:
                cuda.violate(f"{call} of {address:#x}, {unknown}")
                return
            cuda._check_pinned(pinned, done, final=True)

    def mallocAsync(self, nbytes: int, stream_handle: int) -> int:
        cuda = self._cuda
        with cuda.lock:
            stream = cuda.stream(stream_handle)
            cuda.in_context("mallocAsync", stream.device)
            cuda.default_pool_allocations += 1
            return self._allocate(nbytes, stream.device, cuda.tick(stream))

    def memPoolCreate(self, props: Any) -> int:
        cuda = self._cuda
        with cuda.lock:
            cuda.current("memPoolCreate")
            handle = next(cuda._handles)
            cuda.pools_created[handle] = {}
            return handle

    def memPoolSetAttribute(self, pool: int, attr: int, value: Any) -> None:
        cuda = self._cuda
        with cuda.lock:
            cuda.current("memPoolSetAttribute")
            cuda.pools_created[pool][attr] = int(value)

    def memPoolDestroy(self, pool: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            cuda.current("memPoolDestroy")
            if cuda.pools_created.pop(pool, None) is None:
                cuda.violate(f"memPoolDestroy of {pool:#x}: not a pool, or destroyed twice")

    def mallocFromPoolAsync(self, nbytes: int, pool: int, stream_handle: int) -> int:
        cuda = self._cuda
        with cuda.lock:
            stream = cuda.stream(stream_handle)
            cuda.in_context("mallocFromPoolAsync", stream.device)
            if pool not in cuda.pools_created:
                cuda.violate(f"mallocFromPoolAsync from {pool:#x}: not a pool, or destroyed")
            return self._allocate(nbytes, stream.device, cuda.tick(stream))

    def _allocate(self, nbytes: int, device: int, made: tuple[int, int] | None) -> int:
        cuda = self._cuda
        storage = ctypes.create_string_buffer(max(1, nbytes))
        # Each allocation its own range, a gap after it: 16 MiB steps, as before, let an
        # allocation over 16 MiB overlap the next, and a copy into it overran its storage.
        ptr = cuda._next_address
        cuda._next_address += -(-max(1, nbytes) // (1 << 24)) * (1 << 24) + (1 << 24)
        cuda.allocations[ptr] = _Allocation(ptr, nbytes, device, storage, made)
        return ptr

    def malloc(self, nbytes: int) -> int:
        cuda = self._cuda
        with cuda.lock:
            device = cuda.current("malloc")
            return self._allocate(nbytes, device, None)

    def freeAsync(self, ptr: int, stream_handle: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            cuda.current("freeAsync")
            stream = cuda.stream(stream_handle)
            cuda.in_context("freeAsync", stream.device)
            allocation = cuda.allocations.get(ptr)
            if allocation is None or allocation.freed:
                cuda.violate(f"freeAsync of {ptr:#x}: not allocated, or freed twice")
                return
            cuda._check_ordered_after_all(allocation, stream, "freeAsync")
            cuda.tick(stream)
            allocation.freed = True

    def free(self, ptr: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            device = cuda.current("free")
            cuda.calls.append((threading.current_thread().name, "device synchronize (cudaFree)"))
            self._synchronize_device(device)
            allocation = cuda.allocations.get(ptr)
            if allocation is None or allocation.freed:
                cuda.violate(f"free of {ptr:#x}: not allocated, or freed twice")
                return
            allocation.freed = True

    def _synchronize_device(self, device: int) -> None:
        cuda = self._cuda
        for stream in cuda.streams.values():
            if stream.device == device:
                _merge(cuda.host_clock, stream.clock)

    def memcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream_handle: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            stream = cuda.stream(stream_handle)
            cuda.in_context("memcpyAsync", stream.device)
            if kind == 3:
                self._device_to_device(dst, src, nbytes, stream)
                return
            if kind != 1:
                cuda.violate(
                    f"memcpyAsync of kind {kind}, expected host to device (1) "
                    "or device to device (3)"
                )
            allocation = cuda.allocation(dst)
            cuda._check_device_access(allocation, stream, "a copy")
            cuda._check_ordered_after_all(allocation, stream, "a copy")
            pinned = cuda.pinned_at(src)
            if pinned is None:
                cuda.violate("memcpyAsync from memory that is not pinned (a synchronous copy)")
            else:
                cuda._check_pinned(pinned, "copied again", final=False)
            tick = cuda.tick(stream)
            ctypes.memmove(ctypes.addressof(allocation.storage) + dst - allocation.ptr, src, nbytes)
            allocation.accesses.append((*tick, "copy"))
            if pinned is not None:
                snapshot = bytes(ctypes.string_at(src, nbytes))
                pinned.reads.append(_PendingRead(*tick, src - pinned.address, nbytes, snapshot))

    def _device_to_device(self, dst: int, src: int, nbytes: int, stream: _Stream) -> None:
        """A copy between allocations: it reads ``src`` after what wrote it, and writes
        ``dst`` after every earlier use of it, in ``stream``'s order (lock held)."""
        cuda = self._cuda
        source, target = cuda.allocation(src), cuda.allocation(dst)
        what = "a device-to-device copy"
        cuda._check_device_access(source, stream, what)
        for other, tick, earlier in source.accesses:
            ordered = other == stream.handle or cuda.done(stream, (other, tick))
            if earlier in _WRITES and not ordered:
                cuda.violate(
                    f"{what} on stream {stream.handle:#x} reads memory before the "
                    f"{earlier} on stream {other:#x} that wrote it"
                )
        if src + nbytes > source.ptr + source.nbytes or dst + nbytes > target.ptr + target.nbytes:
            cuda.violate(f"{what} of {nbytes} bytes runs past the end of an allocation")
        cuda._check_device_access(target, stream, what)
        cuda._check_ordered_after_all(target, stream, what)
        stamp = cuda.tick(stream)
        ctypes.memmove(
            ctypes.addressof(target.storage) + dst - target.ptr,
            ctypes.addressof(source.storage) + src - source.ptr,
            nbytes,
        )
        source.accesses.append((*stamp, "copy read"))
        target.accesses.append((*stamp, "copy"))

    def streamCreateWithFlags(self, flags: int) -> int:
        cuda = self._cuda
        with cuda.lock:
            device = cuda.current("streamCreateWithFlags")
            return cuda._new_stream(next(cuda._handles), device).handle

    def streamDestroy(self, handle: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            cuda.in_context("streamDestroy", cuda.stream(handle).device)
            del cuda.streams[handle]  # a later use of the handle fails

    def eventCreateWithFlags(self, flags: int) -> int:
        cuda = self._cuda
        with cuda.lock:
            device = cuda.current("eventCreateWithFlags")
            handle = next(cuda._handles)
            cuda.events[handle] = _Event(handle, device, timing=not flags & 2)
            return handle

    def eventDestroy(self, handle: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            event = cuda.events.pop(handle, None)
            if event is not None:
                cuda.in_context("eventDestroy", event.device)

    def eventRecord(self, handle: int, stream_handle: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            event, stream = cuda.events[handle], cuda.stream(stream_handle)
            cuda.in_context("eventRecord", stream.device)
            if event.device != stream.device:
                cuda.violate(
                    f"eventRecord: event of device {event.device} on a stream of {stream.device}"
                )
            cuda.tick(stream)
            event.snapshot = dict(stream.clock)

    def streamWaitEvent(self, stream_handle: int, handle: int, flags: int = 0) -> None:
        cuda = self._cuda
        with cuda.lock:
            event, stream = cuda.events[handle], cuda.stream(stream_handle)
            cuda.in_context("streamWaitEvent", stream.device)
            if event.snapshot is not None:
                _merge(stream.clock, event.snapshot)

    def eventSynchronize(self, handle: int) -> None:
        cuda = self._cuda
        with cuda.lock:
            event = cuda.events[handle]
            cuda.in_context("eventSynchronize", event.device)
            cuda.calls.append((threading.current_thread().name, "host synchronize"))
            for pinned in cuda.pinned.values():  # what the host wrote before this wait
                cuda._check_pinned(pinned, "before the host waited", final=False)
            if event.snapshot is not None:
                _merge(cuda.host_clock, event.snapshot)

    def deviceSynchronize(self) -> None:
        cuda = self._cuda
        with cuda.lock:
            device = cuda.current("deviceSynchronize")
            cuda.calls.append((threading.current_thread().name, "device synchronize"))
            self._synchronize_device(device)

    def memGetInfo(self) -> tuple[int, int]:
        """Free and total bytes of the current device: 16 GiB, less what is allocated."""
        cuda = self._cuda
        device = cuda.current("memGetInfo")
        total = 16 << 30
        with cuda.lock:
            used = sum(
                a.nbytes for a in cuda.allocations.values() if a.device == device and not a.freed
            )
        return total - used, total

    def deviceGetAttribute(self, attribute: int, device: int) -> int:
        self._cuda.runtime_call("deviceGetAttribute")
        if attribute != 115:  # cudaDevAttrMemoryPoolsSupported
            raise AssertionError(f"the double knows no device attribute {attribute}")
        return int(self._cuda.pools)

    def _completed(self, event: _Event) -> bool:
        host = self._cuda.host_clock
        return event.snapshot is None or all(
            _covers(host, access) for access in event.snapshot.items()
        )

    def eventQuery(self, handle: int) -> int:
        """A status, as CuPy's: 600 (not ready) the first time, unless the host waited for it."""
        cuda = self._cuda
        with cuda.lock:
            event = cuda.events[handle]
            cuda.in_context("eventQuery", event.device)
            if self._completed(event) or event.queried:
                return 0
            event.queried = True
            cuda.local.last_error = 600  # sticky until cudaGetLastError: CuPy never calls it
            return 600

    def eventElapsedTime(self, start: int, end: int) -> float:
        cuda = self._cuda
        with cuda.lock:
            first, last = cuda.events[start], cuda.events[end]
            cuda.in_context("eventElapsedTime", first.device)
            if not (first.timing and last.timing):
                raise CUDARuntimeError(6)  # cudaErrorInvalidResourceHandle, as for timing off
            for event in (first, last):
                if not (self._completed(event) or event.queried):
                    raise CUDARuntimeError(600)  # cudaErrorNotReady
            return cuda.elapsed_ms


class _Driver(types.ModuleType):
    CUDADriverError = CUDADriverError

    def __init__(self, cuda: StrictCuda) -> None:
        super().__init__("cupy.cuda.driver")
        self._cuda = cuda

    def ctxGetCurrent(self) -> int:
        cuda = self._cuda
        if not cuda.initialized:
            raise CUDADriverError(3)  # CUDA_ERROR_NOT_INITIALIZED: no runtime call has run cuInit
        with cuda.lock:
            cuda.calls.append((threading.current_thread().name, "ctxGetCurrent"))
        device = getattr(cuda.local, "device", None)
        return 0 if device is None else 0xC0 + device


class UnownedMemory:
    def __init__(self, ptr: int, size: int, owner: object, device_id: int = -1) -> None:
        self.ptr, self.size, self.owner, self.device_id = ptr, size, owner, device_id


class MemoryPointer:
    def __init__(self, mem: UnownedMemory, offset: int) -> None:
        self.mem, self.ptr = mem, mem.ptr + offset


class ndarray:  # CuPy's name
    """A device array: its bytes live in the double's memory; it keeps its memory's owner."""

    def __init__(self, shape: Any, dtype: Any, memptr: MemoryPointer, cuda: Any = None) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape) if isinstance(shape, tuple | list) else (int(shape),)
        self.data = memptr
        self._cuda: StrictCuda = cuda if cuda is not None else _installed()
        if not self.dtype.isnative:
            self._cuda.violate(f"non-native byte order {self.dtype} reached a device array")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def flags(self) -> Any:
        return types.SimpleNamespace(c_contiguous=True)  # the double makes no strided views

    @property
    def nbytes(self) -> int:
        return int(self.size * self.dtype.itemsize)

    def _host_copy(self) -> np.ndarray:
        allocation = self._cuda.allocation(self.data.ptr)
        start = self.data.ptr - allocation.ptr
        raw = ctypes.string_at(ctypes.addressof(allocation.storage) + start, self.nbytes)
        values: np.ndarray = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape).copy()
        return values

    def __getitem__(self, key: slice) -> ndarray:
        assert len(self.shape) == 1 and isinstance(key, slice) and key.step is None
        start, stop, _ = key.indices(self.shape[0])
        pointer = MemoryPointer(
            self.data.mem, self.data.ptr - self.data.mem.ptr + start * self.dtype.itemsize
        )
        return ndarray((max(0, stop - start),), self.dtype, pointer, self._cuda)

    def view(self, dtype: Any) -> ndarray:
        dtype = np.dtype(dtype)
        assert len(self.shape) == 1 and self.nbytes % dtype.itemsize == 0
        return ndarray((self.nbytes // dtype.itemsize,), dtype, self.data, self._cuda)

    def reshape(self, shape: Any) -> ndarray:
        return ndarray(shape, self.dtype, self.data, self._cuda)

    def __dlpack__(self, *, stream: Any = None) -> Any:
        raise NotImplementedError("the double has no DLPack")


_INSTALLED: list[StrictCuda] = []


def _installed() -> StrictCuda:
    return _INSTALLED[-1]


class _StreamObject:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class ExternalStream(_StreamObject):
    """CuPy's wrapper of a raw stream; ``with`` makes it current in the calling thread."""

    def __init__(self, ptr: int, device_id: int = -1, *, _warn: bool = True) -> None:
        if _warn:
            warnings.warn(
                "cupy.cuda.ExternalStream is deprecated; use cupy.cuda.Stream.from_external",
                DeprecationWarning,
                stacklevel=2,
            )
        super().__init__(ptr)
        self.device_id = device_id

    def __enter__(self) -> ExternalStream:
        cuda = _installed()
        if not hasattr(cuda.local, "streams"):
            cuda.local.streams = []
        cuda.local.streams.append(self.ptr)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _installed().local.streams.pop()


class Stream:
    """CuPy 14's ``Stream``: only ``from_external``, which takes the CUDA stream protocol."""

    @classmethod
    def from_external(cls, obj: Any) -> ExternalStream:
        version, handle = obj.__cuda_stream__()
        assert version == 0, version
        return ExternalStream(handle, _warn=False)


@contextlib.contextmanager
def using_allocator(allocator: Any) -> Any:
    """CuPy's thread-local allocator switch."""
    local = _installed().local
    previous = getattr(local, "allocator", None)
    local.allocator = allocator
    try:
        yield
    finally:
        local.allocator = previous


def empty(shape: Any, dtype: Any) -> ndarray:
    """A new array from the installed allocator (the double has no pool of its own)."""
    allocator = getattr(_installed().local, "allocator", None)
    if allocator is None:
        raise AssertionError("cupy.empty outside using_allocator: the double has no memory pool")
    shape = tuple(shape) if isinstance(shape, tuple | list) else (int(shape),)
    dtype = np.dtype(dtype)
    pointer = allocator(int(np.prod(shape)) * dtype.itemsize)
    return ndarray(shape, dtype, pointer)


def _normalize_model(name: str, scalars: list[Any], out: ndarray) -> Any:
    """The fused normalize kernel, as the GPU computes it (written apart from gpuqueue's)."""
    hw, channels, rest = int(scalars[1]), int(scalars[2]), [float(v) for v in scalars[3:]]
    values = len(rest) // 2  # per channel, or one for every channel
    mean = np.resize(np.array(rest[:values], np.float32), channels)
    std = np.resize(np.array(rest[values:], np.float32), channels)

    def model(inputs: list[np.ndarray]) -> list[np.ndarray]:
        flat = inputs[0].reshape(-1)
        position = np.arange(flat.size)
        channel = (position // hw) % channels if name.endswith("_cfirst") else position % channels
        values = (flat.astype(np.float32) - mean[channel]) / std[channel]
        target = position
        if name.endswith("_nchw"):
            pixel = position // channels
            target = ((pixel // hw) * channels + channel) * hw + pixel % hw
        placed = np.empty_like(values)
        placed[target] = values
        if out.dtype == np.int16:  # bfloat16 bits: round to nearest, ties to even
            word = placed.view(np.uint32).astype(np.uint64)
            upper = ((word + 0x7FFF + ((word >> 16) & 1)) >> 16).astype(np.uint16)
            quiet = ((word >> 16) | 0x40).astype(np.uint16)
            nan = np.isnan(placed)
            return [np.where(nan, quiet, upper).view(np.int16)]
        return [placed.astype(out.dtype)]

    return model


KERNEL_MODELS = {
    "gpuqueue_normalize_nhwc": _normalize_model,
    "gpuqueue_normalize_nchw": _normalize_model,
    "gpuqueue_normalize_cfirst": _normalize_model,
}

_SIGNATURE = re.compile(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)", re.DOTALL)


class CompileException(Exception):
    """``cupy.cuda.compiler.CompileException``."""


_SIZES = {"float": 4, "int": 4, "unsigned int": 4, "short": 2, "long long": 8}


def _parameter_bytes(params: list[str]) -> int:
    """The bytes a kernel's parameters take, each aligned to its size."""
    total = 0
    for param in params:
        kind = param.rsplit(" ", 1)[0].replace("const ", "").strip()
        size = 8 if "*" in param else _SIZES[kind]
        total = -(-total // size) * size + size
    return total


class RawKernel:
    """A kernel: its pointer parameters (``const``: read) and its model; runs at once."""

    def __init__(self, code: str, name: str, **options: Any) -> None:
        for found, params in _SIGNATURE.findall(code):
            if found == name:
                self.params = [p.strip() for p in params.split(",")]
                break
        else:
            raise AssertionError(f"no kernel {name} in the source")
        if name not in KERNEL_MODELS:
            raise AssertionError(f"the double has no model of kernel {name}")
        self.name = name
        cuda = _installed()
        with cuda.lock:
            cuda.kernels[(code, name)] = cuda.kernels.get((code, name), 0) + 1
        size = _parameter_bytes(self.params)
        if size > PARAMETER_SPACE:
            # What NVRTC says (12.9 and 13.x), at compile time.
            raise CompileException(
                f"Formal parameter space overflowed ({size} bytes required, "
                f"max {PARAMETER_SPACE} bytes allowed) in function {name}"
            )

    def __call__(self, grid: Any, block: Any, args: Any, **options: Any) -> None:
        assert len(args) == len(self.params), (args, self.params)
        reads: list[ndarray] = []
        writes: list[ndarray] = []
        scalars: list[Any] = []
        for param, arg in zip(self.params, args, strict=True):
            if "*" in param:
                assert isinstance(arg, ndarray), f"{param} needs a device array"
                (reads if param.startswith("const") else writes).append(arg)
            else:
                scalars.append(arg)
        model = KERNEL_MODELS[self.name](self.name, scalars, writes[0])
        _installed().launch(self.name, reads, writes, model)


def make_module(cuda: StrictCuda) -> types.ModuleType:
    """A ``cupy`` module backed by ``cuda``."""
    cupy = types.ModuleType("cupy")
    cuda_module = types.ModuleType("cupy.cuda")
    cuda_module.runtime = _Runtime(cuda)  # type: ignore[attr-defined]
    cuda_module.driver = _Driver(cuda)  # type: ignore[attr-defined]
    cuda_module.UnownedMemory = UnownedMemory  # type: ignore[attr-defined]
    cuda_module.MemoryPointer = MemoryPointer  # type: ignore[attr-defined]

    def get_current_stream() -> _StreamObject:
        return _StreamObject(cuda.current_stream())  # by default the legacy default stream

    cuda_module.get_current_stream = get_current_stream  # type: ignore[attr-defined]
    cuda_module.ExternalStream = ExternalStream  # type: ignore[attr-defined]
    cuda_module.Stream = Stream  # type: ignore[attr-defined]
    cuda_module.using_allocator = using_allocator  # type: ignore[attr-defined]
    cupy.cuda = cuda_module  # type: ignore[attr-defined]
    cupy.ndarray = ndarray  # type: ignore[attr-defined]
    cupy.empty = empty  # type: ignore[attr-defined]
    cupy.RawKernel = RawKernel  # type: ignore[attr-defined]
    cupy.uint8 = np.uint8  # type: ignore[attr-defined]
    return cupy


def install(cuda: StrictCuda) -> dict[str, Any]:
    """The ``sys.modules`` entries that make ``import cupy`` the double (for the backend too)."""
    _INSTALLED.append(cuda)
    cupy = make_module(cuda)
    return {"cupy": cupy, "cupy.cuda": cupy.cuda, "cupy.cuda.runtime": cupy.cuda.runtime}


def uninstall() -> None:
    _INSTALLED.pop()
    sys.modules.pop("gpuqueue.backends.cupy", None)
