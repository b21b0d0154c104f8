"""First contact with a real GPU, on the strict CUDA double: the state CUDA keeps.

Each test here is one of issue 22's defects, found by reading the backend
against CuPy's source, and each fails against the double as it would on a GPU:
a "not ready" left as the thread's last error, the driver API called before
the runtime initialised it, a kernel whose parameters overflow the parameter
space, calls that invalidate a user's graph capture, memory from the device's
shared default pool, JAX reading from the wrong device's stream, CuPy's
deprecated ``ExternalStream``, and device bookkeeping calls on every batch.
"""

from __future__ import annotations

import gc
import importlib.machinery
import sys
import threading
import types
import warnings
from typing import Any

import numpy as np
import pytest

from gpuqueue import Normalize, OrderedEnqueuer
from tests.cuda_double import StrictCuda
from tests.seqs import Numbered
from tests.test_transforms import MEAN, STD, Images, close, reference


def test_a_not_ready_timing_query_leaves_no_error_for_torch_in_the_copy_thread(
    strict_cuda: StrictCuda,
) -> None:
    """A torch op in a transform checks the last CUDA error after its kernel: the copy
    timings' ``eventQuery`` must not have left "not ready" there."""
    failures: list[BaseException] = []

    def torch_like(batch: Any) -> Any:
        try:
            strict_cuda.torch_launch_check()
        except RuntimeError as error:
            failures.append(error)
        return batch

    enqueuer = OrderedEnqueuer(
        Numbered(length=40), device=0, epochs=1, shard=None, transform=torch_like
    )
    enqueuer.start(workers=2)
    assert len(list(enqueuer.get())) == 40
    assert failures == []


def test_a_not_ready_timing_query_leaves_no_error_for_the_consumers_training_step(
    strict_cuda: StrictCuda,
) -> None:
    """At prefetch_depth=0 the copy (and its timing query) runs in the consumer's thread."""
    enqueuer = OrderedEnqueuer(
        Numbered(length=40), device=0, prefetch_depth=0, epochs=1, shard=None
    )
    enqueuer.start(workers=2)
    steps = 0
    for _batch in enqueuer.get():
        strict_cuda.torch_launch_check()  # the user's next torch kernel
        steps += 1
    assert steps == 40


def test_a_backend_can_be_the_first_cuda_call_of_a_process(strict_cuda: StrictCuda) -> None:
    from gpuqueue.backends.cupy import CupyBackend

    assert not strict_cuda.initialized
    backend = CupyBackend(1)
    backend.close()
    assert strict_cuda.contexts == {1}


def test_one_mean_and_std_build_one_kernel_for_any_last_axis(strict_cuda: StrictCuda) -> None:
    """A single mean/std must not turn the last axis into kernel parameters: 4100 of them
    overflow the parameter space, and each new size would be a new kernel."""

    class Wide(Images):
        def __getitem__(self, index: int) -> Any:
            width = 4100 if index % 2 else 7
            images = np.random.default_rng(index).integers(0, 256, (2, width), dtype=np.uint8)
            return images, [index], None

    enqueuer = OrderedEnqueuer(
        Wide(length=4), device=0, epochs=1, shard=None, transform={0: Normalize(2.0, 4.0)}
    )
    enqueuer.start(workers=1)
    stream = strict_cuda.default_stream(0)
    got = [strict_cuda.read(batch[0], stream) for batch in enqueuer.get()]
    for index, images in enumerate(got):
        want = (Wide()[index][0].astype(np.float32) - np.float32(2)) / np.float32(4)
        np.testing.assert_array_equal(images, want)
    assert len(strict_cuda.kernels) == 1, list(strict_cuda.kernels)
    gc.collect()


def test_per_channel_values_past_the_kernel_s_limit_are_refused_where_normalize_is_made() -> None:
    from gpuqueue.device.normalize import MAX_CHANNELS

    Normalize([0.0] * MAX_CHANNELS, [1.0] * MAX_CHANNELS)
    with pytest.raises(ValueError, match=rf"{MAX_CHANNELS + 1} channels.*at most {MAX_CHANNELS}"):
        Normalize([0.0] * (MAX_CHANNELS + 1), [1.0] * (MAX_CHANNELS + 1))


def test_device_memory_comes_from_a_private_pool_that_keeps_freed_memory(
    strict_cuda: StrictCuda,
) -> None:
    """Not the device's default pool: shared with torch and CuPy, and with a release
    threshold of 0 it hands freed memory back to the OS at every synchronize."""
    transform = {0: Normalize(MEAN, STD)}
    enqueuer = OrderedEnqueuer(Images(), device=0, epochs=2, shard=None, transform=transform)
    enqueuer.start(workers=2)
    stream = strict_cuda.default_stream(0)
    for position, batch in enumerate(enqueuer.get()):
        images, _labels = (strict_cuda.read(leaf, stream) for leaf in batch[:2])
        close(images, reference(Images()[position % 6][0], "float32"), "float32")
    del batch
    gc.collect()
    assert strict_cuda.default_pool_allocations == 0
    from gpuqueue.backends.cupy import POOL_RELEASE_THRESHOLD

    thresholds = [attrs.get(4) for attrs in strict_cuda.pools_created.values()]
    assert POOL_RELEASE_THRESHOLD > 0
    assert thresholds in ([], [POOL_RELEASE_THRESHOLD])  # destroyed at close, or still live


def test_gpuqueue_threads_leave_a_users_global_graph_capture_valid(
    strict_cuda: StrictCuda,
) -> None:
    """``torch.cuda.graph`` captures in global mode: a runtime call from another thread
    that is not in relaxed mode (a worker's eventSynchronize, the copy thread's
    eventQuery) invalidates it."""
    enqueuer = OrderedEnqueuer(Numbered(length=24), device=0, epochs=1, shard=None)
    enqueuer.start(workers=2)
    batches = enqueuer.get()
    next(batches)
    strict_cuda.begin_capture()  # the user's capture, in this thread
    try:
        rest = list(batches)
    finally:
        strict_cuda.end_capture()
    assert len(rest) == 23
    assert strict_cuda.violations == []


def test_jax_output_is_exported_on_the_enqueuers_device_and_stream(
    strict_cuda: StrictCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JAX orders its read after CuPy's current stream of the thread's current device:
    with the consumer on device 0 and the batches on device 1, that must be device 1's
    consumer stream, not device 0's."""
    seen: list[tuple[int, int]] = []
    runtime = sys.modules["cupy"].cuda.runtime

    def from_dlpack(leaf: Any) -> Any:
        seen.append((runtime.getDevice(), strict_cuda.current_stream()))
        return leaf

    fake_jax = types.ModuleType("jax")
    fake_jax.__spec__ = importlib.machinery.ModuleSpec("jax", None)  # found by find_spec
    fake_jax.dlpack = types.SimpleNamespace(from_dlpack=from_dlpack)  # type: ignore[attr-defined]
    fake_jax.numpy = types.SimpleNamespace()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    monkeypatch.setitem(sys.modules, "jax.dlpack", fake_jax.dlpack)
    monkeypatch.setitem(sys.modules, "jax.numpy", fake_jax.numpy)

    def consume() -> list[Any]:
        runtime.setDevice(1)
        streams.append(runtime.streamCreateWithFlags(1))  # the consumer's stream, on device 1
        runtime.setDevice(0)  # and the consumer works on device 0
        enqueuer = OrderedEnqueuer(
            Numbered(length=3), device=1, epochs=1, shard=None, output="jax", stream=streams[0]
        )
        enqueuer.start(workers=1)
        return list(enqueuer.get())

    streams: list[int] = []
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(got=consume()), name="consumer")
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and len(result["got"]) == 3
    # Each leaf of each batch: exported with device 1 current and the consumer's stream
    # current for CuPy there, the stream the batch is ordered on.
    assert len(seen) == 6
    assert set(seen) == {(1, streams[0])}
    result.clear()
    gc.collect()


def test_transforms_use_no_deprecated_cupy_stream_api(strict_cuda: StrictCuda) -> None:
    """CuPy 14 deprecates ``ExternalStream``: a warning per transformed batch, an error
    under ``-W error``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        enqueuer = OrderedEnqueuer(
            Images(length=3), device=0, epochs=1, shard=None, transform={0: Normalize(MEAN, STD)}
        )
        enqueuer.start(workers=1)
        assert len(list(enqueuer.get())) == 3
    gc.collect()


def test_the_copy_thread_makes_no_device_bookkeeping_calls_per_batch(
    strict_cuda: StrictCuda,
) -> None:
    """The copy thread entered the device once: no ctxGetCurrent, getDevice or setDevice
    around each of its calls (each one GIL time, at ~12 000 batches/s for 4 MiB)."""
    enqueuer = OrderedEnqueuer(Numbered(length=30), device=0, epochs=1, shard=None)
    enqueuer.start(workers=2)
    assert len(list(enqueuer.get())) == 30
    bookkeeping = [
        call
        for thread, call in strict_cuda.calls
        if thread == "OrderedEnqueuer-copy" and call in ("ctxGetCurrent", "getDevice", "setDevice")
    ]
    assert bookkeeping == ["setDevice"]


def test_a_cupy_without_from_external_gets_external_stream(
    strict_cuda: StrictCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CuPy 13 (which ``pyproject`` still allows) has no ``Stream.from_external``."""
    monkeypatch.delattr(sys.modules["cupy"].cuda.Stream, "from_external")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        enqueuer = OrderedEnqueuer(
            Images(length=2), device=0, epochs=1, shard=None, transform={0: Normalize(MEAN, STD)}
        )
        enqueuer.start(workers=1)
        assert len(list(enqueuer.get())) == 2
    assert any("ExternalStream is deprecated" in str(w.message) for w in caught)
    gc.collect()
