"""Faults 7 to 11 of issue 26's hostile pass, each forced and checked.

Sparse tensors without a device, an unpicklable leaf from a worker process,
ml_dtypes' bfloat16 with ``output="torch"``, the user's own
``gpuqueue.CancelledError``, and ``SystemExit`` in a transform. Worker
processes run in a fresh interpreter.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import BatchError, OrderedEnqueuer
from tests.seqs import CancelsAt, Numbered, SparseLabels
from tests.test_faults_hostile import run_script

# -- 7. a torch sparse COO tensor ------------------------------------------------------


def test_without_a_device_a_sparse_tensor_passes_through() -> None:
    """Regression: refused, as "a torch tensor of dtype torch.float32, which NumPy
    cannot view"."""
    torch = pytest.importorskip("torch")
    enqueuer = OrderedEnqueuer(SparseLabels(), shard=None, epochs=1)
    with enqueuer:
        got = list(enqueuer.get())
    assert [int(dense[0]) for dense, _ in got] == [0, 1, 2]
    for index, (_, sparse) in enumerate(got):
        assert sparse.layout == torch.sparse_coo
        assert sparse.to_dense().tolist() == [float(index), 0.0, 1.0, 0.0]


@pytest.mark.timeout(90)
def test_without_a_device_a_sparse_tensor_comes_back_from_a_worker_process() -> None:
    pytest.importorskip("torch")
    done = run_script(
        """
        import json, torch
        from gpuqueue import OrderedEnqueuer
        from tests.seqs import SparseLabels

        if __name__ == "__main__":
            enqueuer = OrderedEnqueuer(
                SparseLabels(), use_multiprocessing=True, shard=None, epochs=1
            )
            with enqueuer:
                got = [
                    (str(sparse.layout), sparse.to_dense().tolist())
                    for _, sparse in enqueuer.get()
                ]
            print(json.dumps(got))
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == [["torch.sparse_coo", [float(i), 0.0, 1.0, 0.0]] for i in range(3)]


def test_on_a_device_a_sparse_tensor_is_a_clear_error() -> None:
    pytest.importorskip("torch")
    enqueuer = OrderedEnqueuer(SparseLabels(), device="cpu", shard=None, epochs=1)
    with enqueuer, pytest.raises(BatchError) as info:
        list(enqueuer.get())
    assert str(info.value).startswith(
        "field [1] is a sparse torch tensor (layout torch.sparse_coo); a device takes dense "
        "arrays: return tensor.to_dense(), or use device=None to pass it through as it is"
    ), str(info.value)


# -- 8. an unpicklable leaf from a worker process --------------------------------------


@pytest.mark.timeout(90)
def test_an_unpicklable_leaf_from_a_worker_process_is_its_pickling_error() -> None:
    """Regression: batches 0-3, then WorkerDiedError "exit code 1"; the pickling error
    was only on the worker's stderr."""
    done = run_script(
        """
        import json
        from gpuqueue import OrderedEnqueuer
        from tests.seqs import Unpicklable

        if __name__ == "__main__":
            enqueuer = OrderedEnqueuer(
                Unpicklable(bad_index=4), use_multiprocessing=True, shard=None, epochs=1
            )
            got = []
            try:
                with enqueuer:
                    for x, extra in enqueuer.get():
                        got.append(int(extra["index"]))
            except Exception as error:
                print(json.dumps({
                    "got": got,
                    "type": type(error).__name__,
                    "message": str(error),
                    "notes": getattr(error, "__notes__", []),
                }))
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["got"] == [0, 1, 2, 3], result
    assert result["type"] in ("PicklingError", "AttributeError", "TypeError"), result
    notes = "\n".join(result["notes"])
    assert "field [1]['hook'] (a function) cannot be pickled" in notes, notes
    assert "traceback in the worker process" in notes, notes
    assert "reading batch index 4 (epoch 0, position 4)" in notes, notes


# -- 9. ml_dtypes' bfloat16 -------------------------------------------------------------


class MlBfloat16(gpuqueue.Sequence):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        import ml_dtypes

        return np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16) + index, index


@pytest.mark.parametrize("output", ["torch", "jax", None])
def test_an_ml_dtypes_bfloat16_array_reaches_torch_as_bfloat16(output: str | None) -> None:
    """Regression: BatchError "... (raw or structured data)", although torch has
    bfloat16. Without an output on NumPy, the array comes back as it went."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    library = pytest.importorskip(output) if output is not None else None
    enqueuer = OrderedEnqueuer(MlBfloat16(), device="cpu", output=output, shard=None, epochs=1)
    with enqueuer:
        got = [x for x, _ in enqueuer.get()]
    for index, x in enumerate(got):
        if output == "torch":
            assert x.dtype == library.bfloat16
            assert x.float().tolist() == [float(i + index) for i in range(4)]
        elif output == "jax":
            assert x.dtype == library.numpy.bfloat16
            assert np.asarray(x, np.float32).tolist() == [float(i + index) for i in range(4)]
        else:
            assert x.dtype == ml_dtypes.bfloat16
            assert x.astype(np.float32).tolist() == [float(i + index) for i in range(4)]


# -- 10. the user's own gpuqueue.CancelledError ----------------------------------------


@pytest.mark.parametrize("device", [None, "cpu"])
def test_the_users_own_cancelled_error_arrives_after_every_earlier_batch(device: Any) -> None:
    """Regression: with threads it arrived after 0 of the 5 earlier batches: gpuqueue
    took the user's exception for its own cancellation."""
    enqueuer = OrderedEnqueuer(CancelsAt(bad_index=5), device=device, shard=None)
    got: list[int] = []
    enqueuer.start(workers=2)
    with enqueuer, pytest.raises(gpuqueue.CancelledError, match=r"^the user's own, at 5") as info:
        for _, extra in enqueuer.get():
            got.append(int(extra["index"]))
    assert got == [0, 1, 2, 3, 4]
    notes = getattr(info.value, "__notes__", [])
    assert any(n.endswith("reading batch index 5 (epoch 0, position 5)") for n in notes), notes


# -- 11. SystemExit in a transform ------------------------------------------------------


class ExitsInTransform:
    """A transform that raises ``SystemExit`` on batch ``bad_index``."""

    def __init__(self, bad_index: int) -> None:
        self.bad_index = bad_index

    def __call__(self, batch: Any) -> Any:
        if int(batch[1]["index"]) == self.bad_index:
            raise SystemExit(f"stop at {self.bad_index}")
        return batch


@pytest.mark.parametrize("depth", [0, 2])
def test_system_exit_in_a_transform_arrives_after_every_earlier_batch(depth: int) -> None:
    """Regression: at depth 2 it arrived after batches 0-3: batch 4 was lost."""
    enqueuer = OrderedEnqueuer(
        Numbered(length=10),
        device="cpu",
        prefetch_depth=depth,
        transform=ExitsInTransform(5),
        shard=None,
    )
    got: list[int] = []
    where = r"raised in \S+ transforming batch index 5 \(epoch 0, position 5\)"
    with enqueuer, pytest.raises(SystemExit, match=rf"^stop at 5\n{where}$"):
        for _, extra in enqueuer.get():
            got.append(int(extra["index"]))
    assert got == [0, 1, 2, 3, 4]


def cancels_after_five() -> Any:
    for index in range(5):
        yield np.full(2, index, np.int64)
    raise gpuqueue.CancelledError("the user's own, after 5")


def test_the_users_own_cancelled_error_from_a_generator_arrives_after_its_items() -> None:
    """As for a Sequence: gpuqueue took a generator's own CancelledError for a stop, and
    the consumer saw a clean end after 5 items instead of the error."""
    enqueuer = gpuqueue.GeneratorEnqueuer(cancels_after_five())
    got: list[int] = []
    enqueuer.start(workers=2)
    try:
        with pytest.raises(gpuqueue.CancelledError, match=r"^the user's own, after 5"):
            for batch in enqueuer.get():
                got.append(int(batch[0]))
    finally:
        enqueuer.stop()
    assert got == [0, 1, 2, 3, 4]
