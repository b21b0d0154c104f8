"""Batches as people write them: Keras-loose leaves, torch tensors, host leaves, in every mode.

Each test runs threads and processes, on the host (``device=None``) and on
the NumPy device path (``device="cpu"``), and checks the leaf types each
gives back (documented in ``batch/tree.py``).
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np
import pytest

from gpuqueue import BatchError, OrderedEnqueuer, prefetch
from gpuqueue.batch.tree import describe
from tests.conftest import received

from .seqs import KerasLoose, MixedLeaves, StructureChangesAt3, TorchBatches

MODES = [False, True]  # use_multiprocessing


@pytest.mark.parametrize("use_multiprocessing", MODES)
@pytest.mark.parametrize("device", [None, "cpu"])
def test_keras_loose_batches_list_labels_none_weight_short_last(
    use_multiprocessing: bool, device: str | None
) -> None:
    with prefetch(
        KerasLoose(), device, epochs=1, workers=2, use_multiprocessing=use_multiprocessing
    ) as batches:
        got = received(batches)
    assert [x.shape for x, _, _ in got] == [(4, 2), (4, 2), (2, 2)]  # the last one is short
    for index, (x, y, w) in enumerate(got):
        assert np.all(x == index) and w is None
        expected = list(range(len(x)))
        if device is None:  # as the source made it, in threads and processes alike
            assert type(y) is list and y == expected
        else:  # coerced with np.asarray, as Keras does
            assert isinstance(y, np.ndarray) and y.tolist() == expected


@pytest.mark.parametrize("use_multiprocessing", MODES)
def test_leaf_types_are_the_same_in_threads_and_processes(use_multiprocessing: bool) -> None:
    with prefetch(
        MixedLeaves(), None, epochs=1, use_multiprocessing=use_multiprocessing
    ) as batches:
        batch = next(batches)
    assert type(batch["int"]) is int and batch["int"] == 3
    assert type(batch["float"]) is float and batch["float"] == 1.5
    assert type(batch["bool"]) is bool and batch["bool"] is True
    assert type(batch["np_scalar"]) is np.float32 and batch["np_scalar"] == 2
    assert batch["tuple_of_numbers"] == (1, 2) and type(batch["tuple_of_numbers"]) is tuple
    assert batch["none"] is None and batch["text"] == "cat" and batch["raw"] == b"\x00\x01"
    assert batch["nested"] == {"tag": ("a", None), "n": [1.0, 2.0]}


@pytest.mark.parametrize("use_multiprocessing", MODES)
def test_on_a_device_numbers_become_arrays_and_host_leaves_stay(
    use_multiprocessing: bool,
) -> None:
    with prefetch(
        MixedLeaves(), "cpu", epochs=1, use_multiprocessing=use_multiprocessing
    ) as batches:
        batch = next(batches)
    assert isinstance(batch["int"], np.ndarray) and batch["int"].shape == ()
    assert batch["int"].dtype == np.int64 and batch["float"].dtype == np.float64
    assert batch["tuple_of_numbers"].tolist() == [1, 2]
    assert batch["none"] is None and batch["text"] == "cat" and batch["raw"] == b"\x00\x01"
    assert batch["nested"]["tag"] == ("a", None)
    assert batch["nested"]["n"].tolist() == [1.0, 2.0]


def test_the_batch_tuple_itself_is_never_coerced() -> None:
    treedef, leaves = describe((1, 2))  # (x, y) of two numbers, as Keras reads it
    assert treedef.kind == "tuple" and len(leaves) == 2
    treedef, leaves = describe([1, 2])
    assert treedef.kind == "leaf" and leaves[0][1].tolist() == [1, 2]


@pytest.mark.parametrize("use_multiprocessing", MODES)
def test_a_structure_change_names_the_index_and_the_field(use_multiprocessing: bool) -> None:
    enqueuer = OrderedEnqueuer(
        StructureChangesAt3(), use_multiprocessing=use_multiprocessing, shard=None
    )
    with enqueuer:
        batches = enqueuer.get()
        assert [int(b[0][0, 0]) for b in islice(batches, 3)] == [0, 1, 2]
        with pytest.raises(
            BatchError,
            match=r"^batch index 3 \(epoch 0, position 3\): structure differs from the first "
            r"batch: field \[1\] has keys \[\"'label'\"\], expected \[\"'y'\"\]",
        ):
            next(batches)


def test_a_list_length_change_names_the_field() -> None:
    """A list of unlike items, or the batch itself, keeps its length; a list of alike
    items (a batch of samples, ``tuple(zip(*samples))``) may change it (issue 26)."""
    first, _ = describe((np.zeros(2), [np.zeros(1), {"y": np.zeros(1)}]))
    later, _ = describe((np.zeros(2), [np.zeros(1)]))
    assert first.first_difference(later) == "field [1] has 1 items, expected 2"
    assert not first.same_structure(later)
    top, _ = describe((np.zeros(1), np.zeros(1)))
    assert top.first_difference(describe((np.zeros(1),))[0]) == (
        "field <batch> has 1 items, expected 2"
    )
    samples, _ = describe((np.zeros(2), [np.zeros(1), np.zeros(1)]))
    assert samples.first_difference(later) is None and samples.same_structure(later)
    none_first, _ = describe((np.zeros(2), None))
    assert none_first.first_difference(first) == (
        "field [1] is a list, expected a NoneType (passed through)"
    )


def test_a_cpu_tensor_is_read_without_a_host_copy() -> None:
    torch = pytest.importorskip("torch")
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).requires_grad_()
    _, leaves = describe({"x": tensor})
    ((path, array),) = leaves
    assert path == "['x']" and array.ctypes.data == tensor.data_ptr()  # a view, not a copy
    assert leaves.kinds == ["torch"]


@pytest.mark.parametrize("use_multiprocessing", MODES)
def test_torch_leaves_on_the_host_stay_tensors(use_multiprocessing: bool) -> None:
    torch = pytest.importorskip("torch")
    with prefetch(
        TorchBatches(), None, epochs=1, use_multiprocessing=use_multiprocessing
    ) as batches:
        got = received(batches)
    assert len(got) == 3
    for index, (x, half, y) in enumerate(got):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert torch.equal(x, TorchBatches()[index][0].detach())
        assert half.dtype == torch.bfloat16 and torch.equal(half, TorchBatches()[index][1])
        assert isinstance(y, torch.Tensor) and y.tolist() == [index] * 4


@pytest.mark.parametrize("use_multiprocessing", MODES)
def test_torch_leaves_on_a_device(use_multiprocessing: bool) -> None:
    torch = pytest.importorskip("torch")
    with prefetch(
        TorchBatches(), "cpu", epochs=1, output="torch", use_multiprocessing=use_multiprocessing
    ) as batches:
        got = received(batches)
    for index, (x, half, y) in enumerate(got):
        assert torch.equal(x, TorchBatches()[index][0].detach())
        assert half.dtype == torch.bfloat16 and torch.equal(half, TorchBatches()[index][1])
        assert y.tolist() == [index] * 4
    # output=None: the backend's arrays; bfloat16 has no NumPy dtype, and the error says so.
    bfloat16_error = r"^field \[1\] is a torch.bfloat16 tensor, which NumPy and CuPy have no dtype"
    with (
        prefetch(TorchBatches(), "cpu", epochs=1) as batches,
        pytest.raises(BatchError, match=bfloat16_error),
    ):
        next(batches)


def test_a_cuda_tensor_is_a_clear_error() -> None:
    class FakeCudaTensor:  # the attributes describe() reads, named as torch names them
        __module__ = "torch"
        device = type("device", (), {"type": "cuda", "__str__": lambda self: "cuda:0"})()

        def numpy(self) -> Any:
            raise AssertionError("never called")

    pytest.importorskip("torch")
    with pytest.raises(BatchError, match=r"^field \[0\] is a torch tensor on cuda:0; gpuqueue"):
        describe((FakeCudaTensor(),))


def test_keep_copies_array_leaves_and_passes_host_leaves() -> None:
    from gpuqueue import keep

    with prefetch(KerasLoose(), "cpu", epochs=1) as batches:
        x, y, w = keep(next(batches))
        following = next(batches)
    assert np.all(x == 0) and y.tolist() == [0, 1, 2, 3] and w is None
    assert np.all(following[0] == 1)
