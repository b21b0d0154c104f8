"""The CUDA path against the strict CUDA double (``tests/cuda_double.py``), on any machine.

The real ``gpuqueue/backends/cupy.py`` runs on a stand-in for CuPy that fails
a test on what a GPU punishes: a call in the wrong device's context, a
context nobody asked for, memory rewritten or read out of stream order,
pinned memory changed or freed under a pending copy, non-native byte order
on the device.
"""

from __future__ import annotations

import gc
import sys
import threading
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue.backends
from gpuqueue import OrderedEnqueuer, PipelineError, Sequence
from gpuqueue.backends import resolve
from tests.cuda_double import StrictCuda
from tests.seqs import Growing, Numbered


def in_fresh_thread(fn: Any) -> Any:
    """Runs ``fn`` in a new thread (no CUDA context yet) and returns its result."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as error:
            result["error"] = error

    thread = threading.Thread(target=run, name="fresh-consumer")
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]


def values(cuda: StrictCuda, batch: Any, stream: int) -> list[np.ndarray]:
    """Each leaf of ``batch`` as a kernel on ``stream`` reads it."""
    return [cuda.read(leaf, stream) for leaf in _leaves(batch)]


def _leaves(batch: Any) -> list[Any]:
    if isinstance(batch, dict):
        return [leaf for value in batch.values() for leaf in _leaves(value)]
    if isinstance(batch, tuple | list):
        return [leaf for value in batch for leaf in _leaves(value)]
    return [batch]


def one_copy_in_flight() -> tuple[Any, Any, Any, Any, Any]:
    """A CuPy backend on the double with one 64-byte copy issued: (backend, copy stream,
    consumer stream, its pinned source, its device arena)."""
    from gpuqueue.backends.cupy import CupyBackend

    backend = CupyBackend(0)
    backend.enter_device()
    copies, consumer = backend.create_stream(), backend.current_stream()
    host = backend.alloc_pinned(64)
    arena = backend.alloc_device(64, copies)
    backend.copy_to_device(arena, host, 64, copies)
    return backend, copies, consumer, host, arena


# -- 1. batches the consumer owns ----------------------------------------------------


def test_list_of_batches_keeps_true_values_on_the_cuda_path(strict_cuda: StrictCuda) -> None:
    enqueuer = OrderedEnqueuer(Numbered(length=6), device=0, epochs=2, shard=None)
    enqueuer.start(workers=2)
    kept = list(enqueuer.get())
    stream = strict_cuda.default_stream(0)
    for position, batch in enumerate(kept):
        image, labels = values(strict_cuda, (batch[0], batch[1]["index"]), stream)
        assert np.all(image == position % 6) and int(labels) == position % 6
    del kept, batch
    gc.collect()
    assert strict_cuda.violations == []


# -- 2. the right device --------------------------------------------------------------


def test_device_1_makes_no_context_on_device_0(strict_cuda: StrictCuda) -> None:
    """Workers, the copy looper and a consumer in a fresh thread all stay on GPU 1."""

    def consume() -> list[int]:
        enqueuer = OrderedEnqueuer(Numbered(length=4), device=1, epochs=2, shard=None)
        enqueuer.start(workers=2)
        got = []
        for batch in enqueuer.get():
            got.append(int(strict_cuda.read(batch[1]["index"], strict_cuda.default_stream(1))))
        return got

    assert in_fresh_thread(consume) == [0, 1, 2, 3] * 2
    gc.collect()
    assert strict_cuda.contexts == {1}


def test_cuda_and_auto_mean_the_local_rank_or_the_current_device(
    strict_cuda: StrictCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = sys.modules["cupy"].cuda.runtime

    def chosen(device: str) -> int | None:
        backend = resolve(device)
        backend.close()
        return backend.device

    def on_device_1(device: str) -> int | None:
        runtime.setDevice(1)
        return chosen(device)

    assert in_fresh_thread(lambda: chosen("cuda")) == 0
    assert in_fresh_thread(lambda: on_device_1("cuda")) == 1  # the thread's current device
    assert in_fresh_thread(lambda: on_device_1("auto")) == 1
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert in_fresh_thread(lambda: chosen("cuda")) == 1
    assert in_fresh_thread(lambda: chosen("auto")) == 1
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(
        PipelineError, match=r"^device='cuda' is the local rank's GPU, but LOCAL_RANK=2"
    ):
        resolve("cuda")
    with pytest.raises(PipelineError, match=r"^device='cuda:5' does not exist: 2 GPU"):
        resolve("cuda:5")


# -- 3. streams -------------------------------------------------------------------------


class TorchLikeStream:
    """What PyTorch's ``torch.cuda.Stream`` offers: a raw handle."""

    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle


def test_a_torch_stream_passed_as_stream_orders_the_batches(strict_cuda: StrictCuda) -> None:
    runtime = sys.modules["cupy"].cuda.runtime
    runtime.setDevice(0)
    handle = runtime.streamCreateWithFlags(1)
    enqueuer = OrderedEnqueuer(
        Numbered(length=3), device=0, stream=TorchLikeStream(handle), epochs=1, shard=None
    )
    enqueuer.start(workers=1)
    batches = list(enqueuer.get())
    assert [int(values(strict_cuda, b[1]["index"], handle)[0]) for b in batches] == [0, 1, 2]
    assert strict_cuda.violations == []


def test_the_double_catches_a_read_before_the_copy_is_ordered(strict_cuda: StrictCuda) -> None:
    """The check the runs above pass: a read on a stream that did not wait must fail."""
    backend, copies, consumer, host, arena = one_copy_in_flight()
    view = backend.device_view(arena, 64, object())
    strict_cuda.read(view, consumer.handle)  # no wait on the copy's event
    assert any("reads a batch before its copy" in v for v in strict_cuda.violations)
    strict_cuda.violations.clear()
    done = backend.create_event()
    backend.record(done, copies)
    backend.synchronize(done)
    backend.free_device(arena, None)
    backend.free_pinned(host)
    backend.close()


# -- 4. bytes as the device expects them -----------------------------------------------


class Awkward(Sequence):
    """Big-endian leaves, a zero-byte first batch, zero-byte leaves throughout."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        rows = 0 if index == 0 else index
        return {
            "x": np.arange(rows * 4, dtype=">f4").reshape(rows, 4),
            "n": np.array(index, dtype=">i8"),
            "empty": np.zeros((0, 2), dtype=np.int16),
        }


def test_non_native_byte_order_and_zero_bytes_reach_the_device_right(
    strict_cuda: StrictCuda,
) -> None:
    enqueuer = OrderedEnqueuer(Awkward(), device=0, epochs=1, shard=None)
    enqueuer.start(workers=2)
    stream = strict_cuda.default_stream(0)
    for index, batch in enumerate(enqueuer.get()):
        assert batch["x"].dtype == np.dtype("float32") and batch["x"].dtype.isnative
        x, n, empty = values(strict_cuda, (batch["x"], batch["n"], batch["empty"]), stream)
        assert np.array_equal(x, np.arange(index * 4, dtype=np.float32).reshape(index, 4))
        assert int(n) == index and empty.shape == (0, 2)


def test_device_less_dtypes_never_reach_a_copy(strict_cuda: StrictCuda) -> None:
    class Text(Numbered):
        def __getitem__(self, index: int) -> Any:
            return (np.array(["a", "b"]),)

    enqueuer = OrderedEnqueuer(Text(length=2), device=0, shard=None)
    enqueuer.start(workers=1)
    try:
        with pytest.raises(gpuqueue.BatchError, match=r"field \[0\] has dtype <U1 \(text data\)"):
            next(enqueuer.get())
    finally:
        enqueuer.stop()
    assert not [call for _, call in strict_cuda.calls if call == "memcpyAsync"]


# -- 5. pinned memory --------------------------------------------------------------------


def test_the_double_catches_pinned_memory_freed_under_a_pending_copy(
    strict_cuda: StrictCuda,
) -> None:
    """The check the pipeline's runs pass: here broken on purpose, it must fire."""
    backend, copies, _, host, arena = one_copy_in_flight()
    backend.free_pinned(host)  # no wait for the copy first
    assert any("freed with a copy reading it" in v for v in strict_cuda.violations)
    strict_cuda.violations.clear()
    backend.free_device(arena, copies)
    backend.close()


def test_the_double_catches_a_rewrite_before_the_readers_event(strict_cuda: StrictCuda) -> None:
    backend, copies, consumer, host, arena = one_copy_in_flight()
    ready = backend.create_event()
    backend.record(ready, copies)
    backend.wait_event(consumer, ready)
    strict_cuda.read(backend.device_view(arena, 64, object()), consumer.handle)
    backend.synchronize(ready)
    backend.copy_to_device(arena, host, 64, copies)  # no wait on the reader's event
    assert any("not ordered after the read" in v for v in strict_cuda.violations)
    strict_cuda.violations.clear()
    done = backend.create_event()
    backend.record(done, copies)
    backend.synchronize(done)
    backend.free_pinned(host)
    backend.close()


def test_worker_processes_write_into_page_locked_slots(strict_cuda: StrictCuda) -> None:
    enqueuer = OrderedEnqueuer(
        Numbered(length=5), use_multiprocessing=True, device=0, epochs=2, shard=None
    )
    enqueuer.start(workers=2)
    stream = strict_cuda.default_stream(0)
    got = [int(strict_cuda.read(b[1]["index"], stream)) for b in enqueuer.get()]
    assert got == [0, 1, 2, 3, 4] * 2
    assert "hostRegister" in [call for _, call in strict_cuda.calls]
    assert strict_cuda.pinned == {}  # every slot unregistered (after its copies) and freed


def test_a_slot_that_cannot_be_page_locked_is_a_clear_error(strict_cuda: StrictCuda) -> None:
    strict_cuda.refuse_register = True
    enqueuer = OrderedEnqueuer(Numbered(length=5), use_multiprocessing=True, device=0, shard=None)
    enqueuer.start(workers=1)
    try:
        with pytest.raises(
            PipelineError, match=r"page-locking a \d+-byte shared-memory slot for the GPU"
        ):
            next(enqueuer.get())
    finally:
        enqueuer.stop(timeout=10)
    assert strict_cuda.pinned == {}


# -- 6. no hidden syncs; copy timings from the device -------------------------------------


def test_growing_arenas_never_synchronize_the_copy_thread(strict_cuda: StrictCuda) -> None:
    enqueuer = OrderedEnqueuer(Growing(), device=0, prefetch_depth=2, shard=None)
    enqueuer.start(workers=2, max_queue_size=3)
    try:
        stream = strict_cuda.default_stream(0)
        for batch in islice(enqueuer.get(), 40):
            read = strict_cuda.read(batch, stream)
            assert np.array_equal(read, np.arange(read.size, dtype=np.int32))
        stats = enqueuer.stats()
        calls = list(strict_cuda.calls)  # before stop(), which may wait for copies in flight
    finally:
        enqueuer.stop()
    copy_thread = [call for name, call in calls if name == "OrderedEnqueuer-copy"]
    assert "memcpyAsync" in copy_thread and "mallocFromPoolAsync" in copy_thread
    assert not [call for call in copy_thread if "synchronize" in call]
    arenas = enqueuer._run.arenas
    timed = arenas.timed_s / (strict_cuda.elapsed_ms / 1e3)
    assert timed >= 1 and timed == int(timed)  # whole copies, each as long as the double says
    assert stats["h2d_gbps"] == pytest.approx(arenas.timed_bytes / arenas.timed_s / 1e9)


@pytest.mark.parametrize("strict_cuda", [False], indirect=True)
def test_without_memory_pools_arenas_come_from_cuda_malloc(strict_cuda: StrictCuda) -> None:
    enqueuer = OrderedEnqueuer(Growing(), device=0, prefetch_depth=2, epochs=2, shard=None)
    enqueuer.start(workers=2)
    stream = strict_cuda.default_stream(0)
    for batch in enqueuer.get():
        read = strict_cuda.read(batch, stream)
        assert np.array_equal(read, np.arange(read.size, dtype=np.int32))
    calls = [call for _, call in strict_cuda.calls]
    assert "malloc" in calls and "mallocFromPoolAsync" not in calls


# -- 8. an abandoned enqueuer lets its backend go ----------------------------------------


def test_an_abandoned_enqueuer_frees_its_pinned_memory(strict_cuda: StrictCuda) -> None:
    import weakref

    enqueuer = OrderedEnqueuer(Numbered(), device=0, shard=None)
    enqueuer.start(workers=2)
    list(islice(enqueuer.get(), 3))
    backend = weakref.ref(enqueuer._run.backend)
    threads = list(enqueuer._run.threads)
    del enqueuer
    gc.collect()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    gc.collect()
    assert backend() is None
    assert strict_cuda.pinned == {}
