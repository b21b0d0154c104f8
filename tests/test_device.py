"""The device path on the NumPy and simulated backends: values, fences, errors, memory."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import GeneratorEnqueuer, OrderedEnqueuer, PipelineError
from gpuqueue.backends import resolve
from gpuqueue.backends.numpy import NumpyBackend
from gpuqueue.backends.simulated import SimulatedBackend
from gpuqueue.batch.layout import layout
from gpuqueue.batch.tree import describe
from gpuqueue.device.arenas import DeviceArenas
from gpuqueue.host.pinned import PinnedPool
from tests.conftest import start, wait_entered
from tests.faults import failing
from tests.seqs import FailsAt, Growing, Numbered


@pytest.fixture
def backends() -> Iterator[list[SimulatedBackend]]:
    """Simulated backends a test makes; their stream threads are closed afterwards."""
    made: list[SimulatedBackend] = []
    yield made
    for backend in made:
        backend.close()
        if backend.fences:  # unfenced, memory can rightly be dropped under a queued copy
            assert backend.stream_errors == []


def on_host(enqueuer: Any) -> None:
    """What ``cupy.asnumpy`` does before a host read: wait for the consumer's stream.

    Device batches are ordered on the consumer's stream, not the host; on the
    simulated backend a host read without this races with the copy, as it
    would on a GPU.
    """
    backend = enqueuer._run.backend
    if isinstance(backend, SimulatedBackend):
        backend.synchronize_stream(backend.current_stream())


def check_numbered(batch: Any, enqueuer: Any = None) -> int:
    if enqueuer is not None:
        on_host(enqueuer)
    index = int(batch[1]["index"])
    assert batch[0].shape == (2, 3) and batch[0].dtype == np.float32
    assert np.all(batch[0] == index), f"batch {index} holds {batch[0]}"
    return index


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
@pytest.mark.parametrize("device", ["cpu", "simulated"])
def test_values_round_trip_over_epochs(running: list[Any], device: str, depth: int) -> None:
    enqueuer = start(
        running, OrderedEnqueuer(Numbered(length=5), device=device, prefetch_depth=depth)
    )
    got = [check_numbered(b, enqueuer) for b in islice(enqueuer.get(), 23)]
    assert got == (list(range(5)) * 5)[:23]
    stats = enqueuer.stats()
    assert stats["backend"] == ("numpy" if device == "cpu" else "simulated")
    assert stats["prefetch_depth"] == depth
    assert stats["bytes_copied"] >= 23 * (24 + 8)


def test_generator_on_the_device_path_ends_cleanly(running: list[Any]) -> None:
    items = ((np.arange(i, i + 4), {"k": np.int64(i)}) for i in range(30))
    enqueuer = start(running, GeneratorEnqueuer(items, device="cpu", prefetch_depth=2), workers=3)
    got = [(b[0].tolist(), int(b[1]["k"])) for b in enqueuer.get()]
    assert got == [(list(range(i, i + 4)), i) for i in range(30)]
    assert not enqueuer.is_running()


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("device", ["cpu", "simulated"])
def test_batches_are_the_consumers_for_as_long_as_it_holds_them(
    running: list[Any], backends: list[SimulatedBackend], device: str, depth: int
) -> None:
    """``list(batches)`` keeps true values: no arena is rewritten while a batch lives."""
    backend: Any = device
    if device == "simulated":  # the test's own, so its streams outlive the run
        backend = SimulatedBackend()
        backends.append(backend)
    enqueuer = OrderedEnqueuer(
        Numbered(length=6), device=backend, prefetch_depth=depth, epochs=2, shard=None
    )
    kept = list(start(running, enqueuer).get())
    if device == "simulated":
        backend.synchronize_stream(backend.current_stream())
    assert [check_numbered(b) for b in kept] == list(range(6)) * 2


def test_keep_copies_any_leaf(running: list[Any]) -> None:
    enqueuer = start(running, OrderedEnqueuer(Numbered(length=3), device="cpu", shard=None))
    first = next(enqueuer.get())
    kept = gpuqueue.keep((first, 7, "label", None))
    assert kept[1:] == (7, "label", None)
    assert np.array_equal(kept[0][0], first[0]) and kept[0][0] is not first[0]
    assert not np.shares_memory(kept[0][0], first[0])


def _address_reader(array: np.ndarray) -> Any:
    """Reads ``array``'s memory by address, as a kernel does: it keeps no reference to it."""
    address, count = array.ctypes.data, array.size
    return lambda: float(
        np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).sum()
    )


def test_arena_fence_keeps_an_arena_until_the_consumer_work_on_it_is_done(
    running: list[Any], backends: list[SimulatedBackend]
) -> None:
    """Forces: the consumer drops batch 0 while its kernel on it is still queued."""
    results = {}
    for fences in (True, False):
        copied = {n: threading.Event() for n in range(8)}
        backend = SimulatedBackend(fences=fences, on_copy=lambda n, c=copied: c[n].set())
        backends.append(backend)
        enqueuer = start(
            running, OrderedEnqueuer(Numbered(length=6), device=backend, prefetch_depth=1)
        )
        stream = backend.current_stream()
        batches = enqueuer.get()
        batch0 = next(batches)
        read_batch0 = _address_reader(batch0[0])
        gate = threading.Event()
        seen: list[float] = []

        def kernel(read: Any = read_batch0, gate: Any = gate, seen: Any = seen) -> None:
            gate.wait()  # reads batch 0's memory once the test opens the gate
            seen.append(read())

        backend.launch(stream, kernel)
        del batch0  # its arena goes back, fenced after the kernel on the consumer's stream
        next(batches)  # batch 1 is delivered; batch 2 is copied into batch 0's arena
        if fences:
            assert not copied[2].wait(0.3)  # copy 2 waits for the kernel
        else:
            assert copied[2].wait(5)
        gate.set()
        backend.synchronize_stream(stream)
        results[fences] = seen[0]
        enqueuer.stop()
    assert results[True] == 0.0  # batch 0 as it was
    # Without the fences a later batch overwrote it under the kernel (batch 2, or batch 3
    # when the unfenced pinned slot of copy 2 was rewritten too).
    assert results[False] in (2.0 * 6, 3.0 * 6)


def test_pinned_fence_keeps_a_host_slot_until_its_copy_is_done(
    running: list[Any], backends: list[SimulatedBackend]
) -> None:
    """Forces: copies stay in flight while the worker wants to reuse their pinned slots."""
    outcomes = {}
    for fences in (True, False):
        gate = threading.Event()
        backend = SimulatedBackend(fences=fences, copy_gate=gate)
        backends.append(backend)

        class Signals(Numbered):
            read5 = threading.Event()

            def __getitem__(self, index: int) -> Any:
                if index == 5:
                    self.read5.set()
                return super().__getitem__(index)

        seq = Signals(length=8)
        # 1 worker + queue 1 + 1 = 3 pinned slots; batch 3 reuses batch 0's slot.
        enqueuer = OrderedEnqueuer(seq, device=backend, prefetch_depth=4, shard=None)
        start(running, enqueuer, workers=1, max_queue_size=1)
        if fences:
            assert not seq.read5.wait(0.3)  # the worker waits for copy 0 before reusing
        else:
            assert seq.read5.wait(5)
        gate.set()
        clean, kept = [], []
        for position, batch in enumerate(islice(enqueuer.get(), 8)):
            kept.append(batch)  # unfenced, a dropped batch's arena could go under a copy
            backend.synchronize_stream(backend.current_stream())
            # a corrupted batch carries another batch's values *and* index field
            clean.append(float(batch[0][0, 0]) == position == int(batch[1]["index"]))
        outcomes[fences] = clean
        if fences:
            enqueuer.stop()
        else:  # unfenced, stop may rightly drop an arena under a copy still queued
            with contextlib.suppress(RuntimeError):
                enqueuer.stop()
    assert all(outcomes[True])
    assert not all(outcomes[False])


@pytest.mark.parametrize(
    ("operation", "at", "before"),
    # alloc_device: each batch takes an arena, then memory for its small "index" leaf
    # (copied out of the arena): call 3 is batch 1's arena.
    [("copy_to_device", 4, 3), ("alloc_pinned", 1, 0), ("alloc_device", 3, 1)],
)
def test_errors_at_the_device_stage_arrive_in_order(
    running: list[Any], operation: str, at: int, before: int
) -> None:
    backend = failing(NumpyBackend, operation, at)()
    enqueuer = start(running, OrderedEnqueuer(Numbered(length=10), device=backend), workers=1)
    batches = enqueuer.get()
    # Held, so the next batch cannot reuse their arenas: it needs a new one.
    held = [next(batches) for _ in range(before)]
    assert [check_numbered(batch) for batch in held] == list(range(before))
    with pytest.raises(MemoryError, match=rf"^{operation} failed\n"):
        next(batches)
    assert not enqueuer.is_running()


def test_source_error_on_the_device_path(running: list[Any]) -> None:
    enqueuer = start(running, OrderedEnqueuer(FailsAt(bad_index=2), device="simulated"))
    batches = enqueuer.get()
    assert [check_numbered(next(batches), enqueuer) for _ in range(2)] == [0, 1]
    with pytest.raises(KeyError, match=r"cannot read 2"):
        next(batches)


@pytest.mark.parametrize("device", ["simulated", "cpu"])
def test_memory_is_bounded_and_does_not_grow_over_epochs(running: list[Any], device: str) -> None:
    workers, queue, depth = 2, 3, 2
    enqueuer = OrderedEnqueuer(Growing(), device=device, prefetch_depth=depth, shard=None)
    start(running, enqueuer, workers=workers, max_queue_size=queue)
    batches = enqueuer.get()
    # After two epochs every slot and arena has cycled since the largest batch (index 7)
    # came by. The loop holds one batch at a time, as a training loop does.
    for batch in islice(batches, 16):
        on_host(enqueuer)
        assert np.array_equal(batch, np.arange(len(batch), dtype=np.int32))
    after_first = enqueuer.stats()
    largest = 8 * 1000 * 4
    slots, arenas = workers + queue + 1, depth + 3
    for batch in islice(batches, 8 * 5):
        on_host(enqueuer)
        assert np.array_equal(batch, np.arange(len(batch), dtype=np.int32))
        stats = enqueuer.stats()
        # Depth batches ahead, the two the loop holds while it asks for the next,
        # and one free arena kept for reuse: whatever the epoch.
        if device == "cpu":  # one pool: buffers move between slots and arenas, uncopied
            total = stats["pinned_bytes"] + stats["device_bytes"]
            assert total <= (slots + arenas) * largest * 1.25
        else:
            assert stats["device_bytes"] <= arenas * largest * 1.25
    if device == "cpu":
        return
    after_more = enqueuer.stats()
    assert after_more["pinned_bytes"] == after_first["pinned_bytes"]
    assert after_more["pinned_bytes"] <= slots * largest * 1.25
    assert after_first["device_bytes"] <= arenas * largest * 1.25


def test_processes_write_straight_into_the_staging_slots(running: list[Any]) -> None:
    enqueuer = OrderedEnqueuer(
        Numbered(length=5), use_multiprocessing=True, device="simulated", shard=None
    )
    start(running, enqueuer, workers=2)
    got = [check_numbered(b, enqueuer) for b in islice(enqueuer.get(), 12)]
    assert got == [0, 1, 2, 3, 4] * 2 + [0, 1]


def test_stop_from_another_thread_with_every_stage_blocked(
    running: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device queue full, copy looper blocked on it, host queue full, workers blocked."""
    host_full = threading.Event()

    class WatchedQueue(gpuqueue.FIFOQueue[Any]):
        def __init__(self, capacity: int, name: str | None = None) -> None:
            super().__init__(capacity, name=name)
            if name is not None and name.endswith("-host"):
                self._not_full = wait_entered(self._not_full, host_full)

    monkeypatch.setattr(gpuqueue.run, "FIFOQueue", WatchedQueue)
    enqueuer = start(running, OrderedEnqueuer(Numbered(), device="simulated", prefetch_depth=2))
    batches = enqueuer.get()
    check_numbered(next(batches), enqueuer)
    run = enqueuer._run
    assert host_full.wait(5)  # a worker is blocked on the full host queue
    stopper = threading.Thread(target=enqueuer.stop, args=(5,))
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive()
    assert list(batches) == []  # the consumer sees the end, not a hang
    assert not any(t.is_alive() for t in run.threads)


class RecordingBackend(SimulatedBackend):
    """Logs when copies complete and when pinned buffers are freed."""

    def __init__(self, gate: threading.Event) -> None:
        self.log: list[str] = []
        super().__init__(copy_gate=gate, on_copy=lambda n: self.log.append(f"copy {n}"))

    def free_pinned(self, buffer: np.ndarray) -> None:
        self.log.append("free pinned")
        super().free_pinned(buffer)


def test_stop_with_copies_in_flight_frees_pinned_memory_only_after_them(
    running: list[Any], backends: list[SimulatedBackend]
) -> None:
    gate = threading.Event()
    backend = RecordingBackend(gate)
    backends.append(backend)
    issued = threading.Event()
    original_copy = backend.copy_to_device

    def copy_to_device(*args: Any) -> None:
        original_copy(*args)
        issued.set()

    backend.copy_to_device = copy_to_device  # type: ignore[method-assign]
    enqueuer = start(running, OrderedEnqueuer(Numbered(), device=backend, prefetch_depth=2))
    assert issued.wait(5)  # a copy is in flight: its stream waits on the gate
    stopper = threading.Thread(target=enqueuer.stop, args=(10,))
    stopper.start()
    gate.set()  # the device finishes its copies, as a GPU always does
    stopper.join(15)
    assert not stopper.is_alive()
    assert not any(t.is_alive() for t in enqueuer._run.threads)
    assert "free pinned" in backend.log
    first_free = backend.log.index("free pinned")
    assert "copy 0" in backend.log[:first_free]  # the copy completed before its memory went


class LazyDevice(SimulatedBackend):
    """Runs no copy until the host waits for one, so closing first drops memory under it."""

    def __init__(self) -> None:
        super().__init__(copy_gate=threading.Event())

    def synchronize(self, event: Any) -> None:
        assert self.copy_gate is not None
        self.copy_gate.set()
        super().synchronize(event)


@pytest.mark.parametrize("dropped_first", ["device arena", "pinned pool"])
def test_dropping_memory_waits_for_the_copy_that_uses_it(
    backends: list[SimulatedBackend], dropped_first: str
) -> None:
    backend = LazyDevice()
    backends.append(backend)
    pool, arenas = PinnedPool(backend, 2, name="pool"), DeviceArenas(backend, depth=2, keep=2)
    stream = backend.create_stream()
    treedef, leaves = describe(np.arange(1000, dtype=np.int64))
    metas, nbytes = layout(leaves)
    arenas.reserve()
    copied = arenas.copy(pool.stage(treedef, metas, nbytes, leaves), stream)
    if dropped_first == "device arena":
        arenas.discard(copied)  # an undelivered batch, dropped on stop
    else:
        pool.close()
    assert backend.copy_gate is not None
    backend.copy_gate.set()  # the copy runs now, unless dropping already waited for it
    backend.synchronize_stream(stream)  # raises the copy's error, as CUDA would
    pool.close()
    arenas.close()


def test_a_failed_simulated_copy_surfaces_at_the_next_synchronize() -> None:
    backend = SimulatedBackend()
    try:
        stream = backend.create_stream()
        src = backend.alloc_pinned(8)
        backend.free_pinned(src)
        dst = backend.alloc_device(8, stream)
        backend.copy_to_device(dst, src, 8, stream)
        with pytest.raises(
            RuntimeError, match=r"^copy 0: its pinned buffer was freed while queued$"
        ):
            backend.synchronize_stream(stream)
        with pytest.raises(RuntimeError, match=r"^copy 0:"):  # sticky, as CUDA's errors are
            backend.synchronize(backend.create_event())
    finally:
        backend.close()


def test_prefetch_picks_the_enqueuer_and_stops_everything() -> None:
    with gpuqueue.prefetch(Numbered(length=4), device="cpu", workers=2, epochs=2) as batches:
        assert [check_numbered(b) for b in batches] == [0, 1, 2, 3] * 2
    items = (np.full(3, i) for i in range(5))
    with gpuqueue.prefetch(items, device="cpu") as batches:
        assert [int(b[0]) for b in batches] == [0, 1, 2, 3, 4]


def test_dropping_a_batch_gives_its_arena_back_and_release_is_kept(running: list[Any]) -> None:
    # Depth 0: copies happen in get(), so no copy ahead takes the arena in between.
    enqueuer = start(running, OrderedEnqueuer(Numbered(), device="cpu", prefetch_depth=0))
    batches = enqueuer.get()
    batch = next(batches)
    arenas = enqueuer._run.arenas
    free_before = len(arenas._free)
    enqueuer.release()  # kept for older code: the batch stays the consumer's
    assert len(arenas._free) == free_before and check_numbered(batch) == 0
    del batch
    assert len(arenas._free) == free_before + 1


def test_device_arguments() -> None:
    with pytest.raises(ValueError, match=r"^prefetch_depth must be an int >= 0, got -1$"):
        OrderedEnqueuer(Numbered(), device="cpu", prefetch_depth=-1)
    with pytest.raises(ValueError, match=r"^output must be one of"):
        OrderedEnqueuer(Numbered(), device="cpu", output="tensorflow")
    with pytest.raises(ValueError, match=r"^output='torch' and stream need a device"):
        OrderedEnqueuer(Numbered(), output="torch")
    with pytest.raises(ValueError, match=r"^device must be None, 'auto', 'cpu', an int"):
        resolve("tpu")
    with pytest.raises(ValueError, match=r"^device must be None, 'auto', 'cpu', an int.*'tpu'"):
        OrderedEnqueuer(Numbered(), device="tpu")  # at construction, not at start()


def test_auto_falls_back_to_numpy_without_a_gpu() -> None:
    """Holds in both CI runs: without CuPy, and with cupy-cuda12x but no GPU."""
    pytest.importorskip("numpy")
    try:
        from gpuqueue.backends import cupy as cupy_backend

        gpu = cupy_backend.device_count() > 0
    except Exception:
        gpu = False
    if gpu:
        pytest.skip("a GPU is usable here; tests/gpu covers this machine")
    assert resolve("auto").name == "numpy"
    with pytest.raises(
        PipelineError, match=r"^device=0 needs (CuPy|a CUDA GPU).*gpuqueue\[cuda12\]"
    ):
        resolve(0)
    with pytest.raises(PipelineError, match=r"^device='cuda:1' needs"):
        resolve("cuda:1")
    with pytest.raises(PipelineError, match=r"^device='cuda' needs"):
        resolve("cuda")


def test_an_unusable_device_leaves_the_generator_unread() -> None:
    try:
        from gpuqueue.backends import cupy as cupy_backend

        if cupy_backend.device_count() > 0:
            pytest.skip("a GPU is usable here")
    except Exception:
        pass
    items = iter(range(3))
    enqueuer = GeneratorEnqueuer(((np.full(2, i),) for i in items), device=0)
    with pytest.raises(PipelineError, match=r"^device=0 needs"):
        enqueuer.start()
    assert next(items) == 0  # nothing was consumed by the failed start
    assert not enqueuer.is_running()


def test_a_generator_process_feeds_the_device_path(running: list[Any]) -> None:
    from tests.seqs import twenty_batches

    enqueuer = GeneratorEnqueuer(twenty_batches, use_multiprocessing=True, device="simulated")
    start(running, enqueuer, workers=2)
    assert [check_numbered(b, enqueuer) for b in enqueuer.get()] == list(range(20))


def test_foreign_streams_are_read_as_raw_handles() -> None:
    """PyTorch's streams have a raw ``cuda_stream`` handle; others speak ``__cuda_stream__``.

    Runs wherever CuPy imports (CI's second run), GPU or not: reading a handle
    makes no CUDA call.
    """
    pytest.importorskip("cupy")
    from gpuqueue.backends.cupy import stream_handle

    class TorchLike:
        cuda_stream = 0xC0FFEE

    class Protocol:
        def __cuda_stream__(self) -> tuple[int, int]:
            return (0, 0xBEEF)

    assert stream_handle(TorchLike()) == 0xC0FFEE
    assert stream_handle(Protocol()) == 0xBEEF
    assert stream_handle(42) == 42
