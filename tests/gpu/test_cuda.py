"""The device path on a real GPU through CuPy (skipped without one)."""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer

MiB = 1 << 20


class Stamped(gpuqueue.Sequence):
    """Batch i: a uint32 array of ``words`` values, every one derived from i."""

    def __init__(self, length: int, words: int) -> None:
        self.length, self.words = length, words
        self.base = np.arange(words, dtype=np.uint32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return (self.base * np.uint32(2654435761) + np.uint32(index), np.int64(index))


def expected_checksum(seq: Stamped, index: int) -> int:
    return int(seq[index][0].astype(np.uint64).sum())


def test_bit_exact_over_10000_batches_with_a_kernel_reading_each_batch() -> None:
    import cupy

    seq = Stamped(length=100, words=64 * 1024)  # 256 KiB batches
    sums = cupy.zeros(10_000, cupy.uint64)
    enqueuer = OrderedEnqueuer(seq, device=0, prefetch_depth=2, shard=None)
    enqueuer.start(workers=4, max_queue_size=8)
    try:
        for i, (x, _) in enumerate(islice(enqueuer.get(), 10_000)):
            # runs on the consumer's stream while the next copy runs on the copy stream
            sums[i] = x.astype(cupy.uint64).sum()
            assert x.dtype == cupy.uint32 and isinstance(x, cupy.ndarray)
    finally:
        enqueuer.stop()
    got = cupy.asnumpy(sums)
    want = np.array([expected_checksum(seq, i % 100) for i in range(10_000)], np.uint64)
    assert np.array_equal(got, want)


def test_the_consumer_never_sees_a_batch_before_its_copy_completes() -> None:
    import cupy

    # Large batches make each copy long; a kernel checks the last word right away.
    seq = Stamped(length=8, words=16 * MiB // 4)
    bad = cupy.zeros(1, cupy.int64)
    enqueuer = OrderedEnqueuer(seq, device=0, prefetch_depth=1, shard=None)
    enqueuer.start(workers=2, max_queue_size=2)
    try:
        for i, (x, _) in enumerate(islice(enqueuer.get(), 40)):
            want = np.uint32((int(seq.base[-1]) * 2654435761 + i % 8) % 2**32)
            bad += (x[-1] != want).astype(cupy.int64) + (x[0] != np.uint32(i % 8))
    finally:
        enqueuer.stop()
    assert int(bad.get()) == 0


def test_torch_output_agrees_with_cupy_output() -> None:
    torch = pytest.importorskip("torch")
    import cupy

    seq = Stamped(length=6, words=1024)
    outputs = {}
    for output in ("cupy", "torch"):
        enqueuer = OrderedEnqueuer(seq, device=0, output=output, shard=None)
        enqueuer.start(workers=2)
        try:
            outputs[output] = [
                cupy.asnumpy(x) if output == "cupy" else x.cpu().numpy()
                for x, _ in islice(enqueuer.get(), 12)
            ]
        finally:
            enqueuer.stop()
    assert all(np.array_equal(a, b) for a, b in zip(outputs["cupy"], outputs["torch"], strict=True))
    enqueuer = OrderedEnqueuer(seq, device=0, output="torch", shard=None)
    with enqueuer:
        x, _ = next(enqueuer.get())
        assert isinstance(x, torch.Tensor) and x.is_cuda


def test_no_growth_of_pinned_or_device_memory_across_epochs() -> None:
    import cupy

    seq = Stamped(length=16, words=MiB // 4)
    depth, workers, queue = 2, 2, 4
    enqueuer = OrderedEnqueuer(seq, device=0, prefetch_depth=depth, shard=None)
    enqueuer.start(workers=workers, max_queue_size=queue)
    try:
        batches = enqueuer.get()
        for x, _ in islice(batches, 32):  # one batch held at a time, as a training loop does
            x.sum()
        cupy.cuda.Device(0).synchronize()
        first = enqueuer.stats()
        for x, _ in islice(batches, 16 * 10):
            x.sum()
            # depth ahead, the two the loop holds while it asks for the next, one kept free
            assert enqueuer.stats()["device_bytes"] <= (depth + 3) * MiB * 1.25 + 4096
        cupy.cuda.Device(0).synchronize()
        later = enqueuer.stats()
        assert later["pinned_bytes"] == first["pinned_bytes"]
        assert later["pinned_bytes"] <= (workers + queue + 1) * MiB * 1.25 + 4096
    finally:
        enqueuer.stop()


def test_list_of_batches_keeps_true_values() -> None:
    """Each batch is the consumer's: held batches are never rewritten."""
    import cupy

    seq = Stamped(length=8, words=64 * 1024)
    for output in ("cupy", "torch"):
        if output == "torch":
            pytest.importorskip("torch")
        enqueuer = OrderedEnqueuer(seq, device=0, output=output, epochs=3, shard=None)
        enqueuer.start(workers=3)
        kept = list(enqueuer.get())
        cupy.cuda.Device(0).synchronize()
        assert len(kept) == 24
        for position, (x, index) in enumerate(kept):
            host = cupy.asnumpy(x) if output == "cupy" else x.cpu().numpy()
            assert int(index) == position % 8
            assert np.array_equal(host, seq[position % 8][0])


def test_processes_write_into_registered_shared_memory() -> None:
    import cupy

    seq = Stamped(length=5, words=4096)
    enqueuer = OrderedEnqueuer(seq, use_multiprocessing=True, device=0, shard=None)
    enqueuer.start(workers=2)
    try:
        for i, (x, _) in enumerate(islice(enqueuer.get(), 15)):
            assert np.array_equal(cupy.asnumpy(x), seq[i % 5][0])
    finally:
        enqueuer.stop()


def test_a_copy_error_reaches_the_consumer_in_order() -> None:
    from gpuqueue.backends.cupy import CupyBackend
    from tests.faults import failing

    enqueuer = OrderedEnqueuer(
        Stamped(8, 256), device=failing(CupyBackend, "copy_to_device", 3)(0), shard=None
    )
    enqueuer.start(workers=1)
    batches = enqueuer.get()
    assert [int(next(batches)[1]) for _ in range(2)] == [0, 1]
    with pytest.raises(MemoryError, match="copy_to_device failed"):
        next(batches)
    assert not enqueuer.is_running()
    enqueuer.stop()
