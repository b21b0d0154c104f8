"""``device="auto"`` on a machine without a GPU: the workers' batches, at no cost.

There the device would be the host itself, so staging a batch would only
copy it. The batch a worker read is delivered (as with ``device=None``), its
structure checked, its leaves made what the device path gives on the CPU
(``output=`` included) by views, not copies; ``device="cpu"`` and
``transform=`` keep the staged path. Each test makes "auto" find no GPU, so
it holds on a machine that has one too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue.backends
from gpuqueue import BatchError, OrderedEnqueuer, PipelineError, prefetch

from .seqs import Numbered

pytestmark = pytest.mark.filterwarnings(
    "ignore:gpuqueue. device='auto' found no usable GPU:UserWarning"
)


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """``device="auto"`` finds no GPU, whatever this machine has."""

    def no_cuda(asked: Any) -> int:
        raise PipelineError(f"device={asked!r} needs CuPy, which is not installed (the test)")

    monkeypatch.setattr(gpuqueue.backends, "_gpu_count", no_cuda)


class Kept(gpuqueue.Sequence):
    """Batches it keeps, so a test can tell the very arrays it returned from copies."""

    def __init__(self, length: int = 6) -> None:
        self.made: dict[int, tuple[Any, ...]] = {}
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        batch = (np.full((4, 3), index, np.float32), np.arange(4) + index)
        self.made[index] = batch
        return batch


def taken(batches: Iterator[Any], n: int) -> list[Any]:
    return list(islice(batches, n))


def test_auto_without_a_gpu_delivers_the_very_arrays_the_workers_read() -> None:
    seq = Kept(length=100)  # no index is read twice while the test looks
    enqueuer = OrderedEnqueuer(seq, device="auto", shard=None)
    enqueuer.start(workers=2, max_queue_size=3)
    try:
        got = taken(enqueuer.get(), 6)
        stats = enqueuer.stats()
    finally:
        enqueuer.stop()
    assert [type(batch) for batch in got] == [tuple] * 6
    for index, (x, y) in enumerate(got):
        assert x is seq.made[index][0] and y is seq.made[index][1]  # no pack, no copy
    assert "pinned_bytes" not in stats  # no staging slot was made


def test_cpu_still_stages_each_batch() -> None:
    """``device="cpu"`` is how the tests run the device path: a packed copy, a slot."""
    seq = Kept()
    enqueuer = OrderedEnqueuer(seq, device="cpu", shard=None)
    enqueuer.start(workers=2, max_queue_size=3)
    try:
        x, _ = taken(enqueuer.get(), 1)[0]
        stats = enqueuer.stats()
    finally:
        enqueuer.stop()
    assert x is not seq.made[0][0] and not np.shares_memory(x, seq.made[0][0])
    assert np.array_equal(x, seq.made[0][0])
    assert stats["pinned_bytes"] > 0


def test_auto_without_a_gpu_still_checks_the_structure() -> None:
    class Changes(Kept):
        def __getitem__(self, index: int) -> Any:
            x, y = super().__getitem__(index)
            return (x, y) if index < 3 else (x, {"y": y})

    with (
        pytest.raises(
            BatchError, match=r"^batch index 3 \(epoch 0, position 3\): structure differs"
        ),
        prefetch(Changes(), device="auto", workers=1, epochs=1, shard=None) as batches,
    ):
        for _ in batches:
            pass


def test_torch_output_views_the_workers_memory() -> None:
    """``output="torch"`` gives CPU tensors over the arrays the Sequence returned."""
    torch = pytest.importorskip("torch")
    seq = Kept()
    with prefetch(seq, device="auto", workers=2, epochs=1, output="torch", shard=None) as batches:
        got = list(batches)
    assert len(got) == 6
    for index, (x, y) in enumerate(got):
        assert isinstance(x, torch.Tensor) and x.device.type == "cpu"
        assert x.data_ptr() == seq.made[index][0].ctypes.data  # a view, no copy
        assert y.data_ptr() == seq.made[index][1].ctypes.data
        assert torch.equal(x, torch.full((4, 3), float(index)))


def test_leaves_become_what_the_device_path_gives_on_the_cpu() -> None:
    """The README's leaf table, ``output=None``: a tensor is a NumPy view, a number an array."""
    torch = pytest.importorskip("torch")
    tensor = torch.arange(6, dtype=torch.float32)
    strided = np.arange(12, dtype=np.int32)[::-2]  # torch cannot view negative strides

    class Mixed(gpuqueue.Sequence):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> Any:
            return {"t": tensor, "n": 3, "l": [1.0, 2.0], "s": "name", "w": None, "r": strided}

    with prefetch(Mixed(), device="auto", workers=1, epochs=1, shard=None) as batches:
        first = next(iter(batches))
    assert isinstance(first["t"], np.ndarray) and first["t"].ctypes.data == tensor.data_ptr()
    assert isinstance(first["n"], np.ndarray) and first["n"].shape == () and first["n"] == 3
    assert first["l"] == [1.0, 2.0]  # a list of numbers stays a list, as with device=None
    assert first["s"] == "name" and first["w"] is None
    assert first["r"] is strided
    with prefetch(Mixed(), device="auto", workers=1, epochs=1, output="torch") as batches:
        first = next(iter(batches))
    assert isinstance(first["t"], torch.Tensor) and first["t"].data_ptr() == tensor.data_ptr()
    assert first["r"].tolist() == strided.tolist()  # a copy: no view can be made of it


def test_a_bfloat16_tensor_without_torch_output_is_the_device_paths_error() -> None:
    torch = pytest.importorskip("torch")

    class Half(gpuqueue.Sequence):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> Any:
            return (torch.ones(2, dtype=torch.bfloat16),)

    bfloat16 = r"^field \[0\] is a torch.bfloat16 tensor"
    unconverted = prefetch(Half(), device="auto", workers=1, epochs=1, shard=None)
    with pytest.raises(BatchError, match=bfloat16), unconverted as batches:
        list(batches)
    with prefetch(Half(), device="auto", workers=1, epochs=1, output="torch") as batches:
        (x,) = next(iter(batches))
    assert x.dtype == torch.bfloat16 and x.tolist() == [1.0, 1.0]


def test_an_ml_dtypes_bfloat16_array_is_a_view_in_every_output() -> None:
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    image = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)

    class Half(gpuqueue.Sequence):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> Any:
            return (image,)

    with prefetch(Half(), device="auto", workers=1, epochs=1, shard=None) as batches:
        (x,) = next(iter(batches))
    assert x.dtype == ml_dtypes.bfloat16 and x.ctypes.data == image.ctypes.data
    with prefetch(Half(), device="auto", workers=1, epochs=1, output="torch") as batches:
        (t,) = next(iter(batches))
    assert t.dtype == torch.bfloat16 and t.data_ptr() == image.ctypes.data
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_transform_keeps_the_staged_path() -> None:
    seq = Kept()
    with prefetch(
        seq, device="auto", workers=1, epochs=1, transform={0: lambda x: x * 2}, shard=None
    ) as batches:
        got = list(batches)
    assert [float(x[0, 0]) for x, _ in got] == [2.0 * i for i in range(6)]
    assert not np.shares_memory(got[0][0], seq.made[0][0])


@pytest.mark.skipif(
    not (os.path.isdir("/proc/self/fd") and os.path.isdir("/dev/shm")),
    reason="needs /proc and POSIX shared memory (Linux)",
)
def test_processes_lend_their_slot_as_with_device_none() -> None:
    """The delivered array is a view of the shared-memory slot the worker process wrote."""
    enqueuer = OrderedEnqueuer(
        Numbered(length=3, shape=(32, 32)), use_multiprocessing=True, device="auto", shard=None
    )
    enqueuer.start(workers=2, max_queue_size=3)
    try:
        x, extra = next(iter(enqueuer.get()))
        slots = enqueuer._run.processes._slots._all.values()  # type: ignore[union-attr]
        inside = [
            s
            for s in slots
            if s.capacity
            and s.array.ctypes.data <= x.ctypes.data < s.array.ctypes.data + s.capacity
        ]
        assert len(inside) == 1
        assert isinstance(extra["index"], np.ndarray) and extra["index"].shape == ()
        stats = enqueuer.stats()
        assert "pinned_bytes" not in stats and stats["shared_memory_bytes"] > 0
        del x, inside, slots
    finally:
        enqueuer.stop()
