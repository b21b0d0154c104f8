"""OrderedEnqueuer with use_multiprocessing=True: shared-memory slots and process faults."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import pytest

from gpuqueue import GeneratorEnqueuer, OrderedEnqueuer, PipelineError, WorkerDiedError
from tests.conftest import Worker, shared_memory
from tests.seqs import (
    DiesAt,
    FailsAt,
    Growing,
    Numbered,
    ShiftsEachEpoch,
    dies_at_three,
    fails_at_three,
    random_batches,
    twenty_batches,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory")


@pytest.fixture
def enqueuers() -> Iterator[list[OrderedEnqueuer]]:
    made: list[OrderedEnqueuer] = []
    before = shared_memory()
    yield made
    for enqueuer in made:
        enqueuer.stop(timeout=10)
    # every slot is closed and every process ended
    assert shared_memory() - before == set()
    for enqueuer in made:
        if enqueuer._run.processes is not None:
            assert enqueuer._run.processes.alive() == []


def started(
    made: list[OrderedEnqueuer], seq: Any, workers: int = 2, **kwargs: Any
) -> OrderedEnqueuer:
    enqueuer = OrderedEnqueuer(seq, use_multiprocessing=True, shard=None, **kwargs)
    made.append(enqueuer)
    enqueuer.start(workers=workers, max_queue_size=3)
    return enqueuer


def test_batches_come_back_in_order_with_their_values(enqueuers: list[OrderedEnqueuer]) -> None:
    enqueuer = started(enqueuers, Numbered(length=5), workers=3)
    batches = list(islice(enqueuer.get(), 12))
    assert [int(b[1]["index"]) for b in batches] == [0, 1, 2, 3, 4] * 2 + [0, 1]
    for batch in batches:
        index = int(batch[1]["index"])
        assert batch[0].dtype == np.float32 and batch[0].shape == (2, 3)
        assert np.all(batch[0] == index)
    # delivered batches are the consumer's own: later batches do not overwrite them
    assert float(batches[0][0][0, 0]) == 0.0 and float(batches[3][0][0, 0]) == 3.0


def test_slots_are_reused_and_grow_only_when_a_batch_does_not_fit(
    enqueuers: list[OrderedEnqueuer],
) -> None:
    enqueuer = started(enqueuers, Growing(), workers=2)
    lengths = []
    for batch in islice(enqueuer.get(), 16):  # one batch held at a time
        lengths.append(len(batch))
        assert np.array_equal(batch, np.arange(len(batch), dtype=np.int32))
    del batch
    assert lengths == [(i % 8 + 1) * 1000 for i in range(16)]
    pool = enqueuer._run.processes
    # The pipeline's own slots (workers + queue + 1), the one the consumer held,
    # and one it had just dropped, each at most the largest batch with its margin.
    slots = 2 + 3 + 1 + 2
    largest = 8 * 1000 * 4
    assert pool.pinned_bytes <= slots * largest * 1.25


def test_on_epoch_end_reaches_the_worker_processes(enqueuers: list[OrderedEnqueuer]) -> None:
    enqueuer = started(enqueuers, ShiftsEachEpoch(length=3), workers=2)
    values = [float(b[0][0, 0]) for b in islice(enqueuer.get(), 9)]
    assert values == [0, 1, 2, 100, 101, 102, 200, 201, 202]


def test_worker_error_keeps_its_type_and_remote_traceback(
    enqueuers: list[OrderedEnqueuer],
) -> None:
    enqueuer = started(enqueuers, FailsAt(bad_index=2), workers=2)
    batches = enqueuer.get()
    assert [int(next(batches)[1]["index"]) for _ in range(2)] == [0, 1]
    with pytest.raises(KeyError, match=r"cannot read 2") as info:
        next(batches)
    notes = "\n".join(info.value.__notes__)
    assert "traceback in the worker process" in notes and "in __getitem__" in notes
    assert "reading batch index 2 (epoch 0, position 2)" in notes


@pytest.mark.parametrize(("how", "signal_name"), [("sigkill", "SIGKILL"), ("segfault", "SIGSEGV")])
def test_a_dead_worker_is_a_clear_error_within_seconds(
    enqueuers: list[OrderedEnqueuer], how: str, signal_name: str
) -> None:
    enqueuer = started(enqueuers, DiesAt(bad_index=3, how=how), workers=2)
    batches = enqueuer.get()
    began = time.monotonic()
    assert [int(next(batches)[1]["index"]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(
        WorkerDiedError, match=rf"died with signal {signal_name} while reading batch index 3"
    ):
        next(batches)
    assert time.monotonic() - began < 5
    assert not enqueuer.is_running()


class Unpicklable(Numbered):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_an_unpicklable_sequence_is_a_clear_error() -> None:
    enqueuer = OrderedEnqueuer(Unpicklable(), use_multiprocessing=True)
    with pytest.raises(
        PipelineError, match=r"^use_multiprocessing=True needs a picklable Sequence"
    ):
        enqueuer.start(workers=2)
    assert not enqueuer.is_running()


class Stuck(Numbered):
    """Reading index 1 never returns; entering it writes a byte to the named pipe ``fifo``."""

    def __init__(self, fifo: str) -> None:
        super().__init__()
        self.fifo = fifo

    def __getitem__(self, index: int) -> Any:
        if index == 1:
            with open(self.fifo, "wb") as entered:  # blocks until the test opens its end
                entered.write(b"x")
            threading.Event().wait()
        return super().__getitem__(index)


def test_a_process_stuck_in_user_code_is_killed_and_named(
    enqueuers: list[OrderedEnqueuer], tmp_path: Any
) -> None:
    fifo = str(tmp_path / "entered")
    os.mkfifo(fifo)

    def read_marker() -> bytes:
        with open(fifo, "rb") as entered:
            return entered.read(1)

    marker = Worker(read_marker, name="marker-reader")
    marker.start()
    enqueuer = started(enqueuers, Stuck(fifo), workers=1)
    next(enqueuer.get())
    assert marker.finish(10).result == b"x"  # the process is inside __getitem__(1)
    with pytest.warns(RuntimeWarning) as record:
        enqueuer.stop(timeout=0.5)
    messages = [str(w.message) for w in record]
    assert any(
        "worker processes did not exit within 0.5 s and were killed" in m
        and "OrderedEnqueuer-process0" in m
        for m in messages
    ), messages
    assert enqueuer._run.processes.alive() == []


# -- generators in a worker process -------------------------------------------------


def run_generator(source: Any, workers: int = 2, **options: Any) -> list[Any]:
    before = shared_memory()
    enqueuer = GeneratorEnqueuer(source, use_multiprocessing=True, **options)
    enqueuer.start(workers=workers, max_queue_size=3)
    try:
        return list(enqueuer.get())
    finally:
        enqueuer.stop(timeout=10)
        assert enqueuer._run.processes.alive() == []
        assert shared_memory() - before == set()


def test_a_generator_function_runs_in_one_process_in_order() -> None:
    batches = run_generator(twenty_batches, workers=3)
    assert [int(b[1]["index"]) for b in batches] == list(range(20))  # once each, in order
    assert all(np.all(b[0] == int(b[1]["index"])) for b in batches)


def test_random_seed_seeds_the_generator_process() -> None:
    first = run_generator(random_batches, random_seed=7)
    again = run_generator(random_batches, random_seed=7)
    other = run_generator(random_batches, random_seed=8)
    assert len(first) == 5 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_a_generator_error_in_the_process_arrives_after_the_items_before_it() -> None:
    enqueuer = GeneratorEnqueuer(fails_at_three, use_multiprocessing=True)
    enqueuer.start(workers=2)
    got = []
    try:
        with pytest.raises(KeyError, match=r"cannot make item 3") as info:
            for batch in enqueuer.get():
                got.append(int(batch[1]["index"]))
    finally:
        enqueuer.stop(timeout=10)
    assert got == [0, 1, 2]
    assert "traceback in the worker process" in "\n".join(info.value.__notes__)


def test_a_killed_generator_process_is_a_clear_error() -> None:
    enqueuer = GeneratorEnqueuer(dies_at_three, use_multiprocessing=True)
    enqueuer.start(workers=2)
    got = []
    try:
        with pytest.raises(WorkerDiedError, match=r"died with signal SIGKILL while reading"):
            for batch in enqueuer.get():
                got.append(int(batch[1]["index"]))
    finally:
        enqueuer.stop(timeout=10)
    assert got == [0, 1, 2]
