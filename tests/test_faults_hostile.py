"""The faults and misuse of issue 16's hostile pass, each forced and checked.

Processes, shared memory and signals are tested for real; what must not leak
or hang across an interpreter is run in a subprocess under a kill timeout.
"""

from __future__ import annotations

import traceback
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import BatchError, OrderedEnqueuer, PipelineError
from tests.seqs import Numbered

# -- errors keep their place, their note and their traceback -------------------------


class ExitsAt(Numbered):
    """``__getitem__(bad_index)`` raises ``error`` (SystemExit, KeyboardInterrupt)."""

    def __init__(self, bad_index: int, error: BaseException, length: int = 40) -> None:
        super().__init__(length)
        self.bad_index, self.error = bad_index, error

    def __getitem__(self, index: int) -> Any:
        if index == self.bad_index:
            raise self.error
        return super().__getitem__(index)


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()], ids=type)
@pytest.mark.parametrize("device", [None, "cpu"])
def test_system_exit_in_a_thread_worker_arrives_after_every_earlier_batch(
    error: BaseException, device: Any
) -> None:
    """Regression: only 32 of 37 batches came, and the error had no note."""
    enqueuer = OrderedEnqueuer(ExitsAt(37, error), device=device, shard=None)
    enqueuer.start(workers=4, max_queue_size=3)
    got: list[int] = []
    try:
        with pytest.raises(type(error)) as info:
            for batch in enqueuer.get():
                got.append(int(batch[1]["index"]))
    finally:
        enqueuer.stop(timeout=10)
    assert got == list(range(37))
    assert info.value is error
    notes = getattr(info.value, "__notes__", [])
    assert any(
        n.startswith("raised in QueueRunnerThread-")
        and n.endswith("reading batch index 37 (epoch 0, position 37)")
        for n in notes
    ), notes


class FailsAtTwo(Numbered):
    def __getitem__(self, index: int) -> Any:
        if index == 2:
            raise KeyError(f"cannot read {index}")
        return super().__getitem__(index)


def _consume(batches: Any) -> None:
    for _ in batches:
        pass


@pytest.mark.parametrize("ending", ["with", "finally"])
def test_stop_keeps_the_traceback_the_consumer_saw(ending: str) -> None:
    """Regression: stop() re-raised the error inside Coordinator.join, replacing its frames."""
    enqueuer = OrderedEnqueuer(FailsAtTwo(), shard=None)
    with pytest.raises(KeyError, match=r"^'cannot read 2'\nraised in QueueRunnerThread-") as info:
        if ending == "with":
            with enqueuer:
                _consume(enqueuer.get())
        else:
            enqueuer.start(workers=2)
            try:
                _consume(enqueuer.get())
            finally:
                enqueuer.stop()
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    # the consumer's frames, then the worker's, down to the user's __getitem__
    assert names[0] == "test_stop_keeps_the_traceback_the_consumer_saw", names
    assert names[1:3] == ["_consume", "batches"], names
    assert names[-1] == "__getitem__", names
    assert "join" not in names, names


# -- batches handed over as they are ---------------------------------------------------


class DtypeChangesEachEpoch(Numbered):
    """As Keras's ``test_context_switch``: on_epoch_end changes the arrays' dtype."""

    dtypes = (np.float32, np.float64, np.int8)

    def __init__(self) -> None:
        super().__init__(length=3)
        self.epoch = 0

    def __getitem__(self, index: int) -> Any:
        dtype = self.dtypes[self.epoch % 3]
        return (np.full((2, 3), index, dtype), {"index": np.int64(index)})

    def on_epoch_end(self) -> None:
        self.epoch += 1


@pytest.mark.parametrize("processes", [False, True])
def test_without_a_device_a_dtype_may_change_between_epochs(processes: bool) -> None:
    enqueuer = OrderedEnqueuer(
        DtypeChangesEachEpoch(), use_multiprocessing=processes, shard=None, epochs=3
    )
    with enqueuer:
        got = [(b[0].dtype, int(b[1]["index"])) for b in enqueuer.get()]
    assert got == [(np.dtype(d), i) for d in DtypeChangesEachEpoch.dtypes for i in range(3)]


def test_with_a_device_a_dtype_change_is_still_a_clear_error() -> None:
    enqueuer = OrderedEnqueuer(DtypeChangesEachEpoch(), device="cpu", shard=None, epochs=3)
    with (
        enqueuer,
        pytest.raises(
            BatchError,
            match=r"^batch index 0 \(epoch 1, position 0\): field \[0\] has dtype float64, "
            r"expected float32",
        ),
    ):
        _consume(enqueuer.get())


# -- an epoch of nothing ----------------------------------------------------------------


class AllNone(gpuqueue.Sequence):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> Any:
        return None


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("processes", "device"), [(False, None), (False, "cpu"), (True, None)])
def test_an_epoch_of_nothing_but_none_is_an_error(processes: bool, device: Any) -> None:
    """Regression: the consumer waited for ever while workers read empty epochs at 100 % CPU."""
    enqueuer = OrderedEnqueuer(AllNone(), use_multiprocessing=processes, device=device, shard=None)
    enqueuer.start(workers=2)
    try:
        with pytest.raises(
            PipelineError,
            match=r"^epoch 0 gave no batch: the Sequence returned None for every one of its 5 ",
        ):
            next(enqueuer.get())
    finally:
        enqueuer.stop(timeout=10)


class SomeNone(Numbered):
    def __getitem__(self, index: int) -> Any:
        return None if index % 2 else super().__getitem__(index)


def test_an_epoch_with_some_none_items_goes_on() -> None:
    enqueuer = OrderedEnqueuer(SomeNone(length=4), shard=None)
    with enqueuer:
        got = [int(b[1]["index"]) for b in islice(enqueuer.get(), 5)]
    assert got == [0, 2, 0, 2, 0]
