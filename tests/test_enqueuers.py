"""OrderedEnqueuer and GeneratorEnqueuer on threads, against the Keras semantics."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import BatchError, GeneratorEnqueuer, OrderedEnqueuer, PipelineError, Sequence
from gpuqueue.host.bundles import _BUNDLE_MOST
from tests.conftest import Worker, start, wait_entered
from tests.seqs import FailsAt, Numbered


def indices(batches: list[Any]) -> list[int]:
    return [int(b[1]["index"]) for b in batches]


# -- order, epochs ------------------------------------------------------------


class OutOfOrder(Numbered):
    """Index 0 is read last: its read waits until index 3's read has finished."""

    def __init__(self) -> None:
        super().__init__(length=4)
        self.index3_read = threading.Event()

    def __getitem__(self, index: int) -> Any:
        if index == 0:
            assert self.index3_read.wait(5)
        batch = super().__getitem__(index)
        if index == 3:
            self.index3_read.set()
        return batch


def test_batches_come_in_index_order_even_when_reads_finish_out_of_order(
    running: list[Any],
) -> None:
    seq = OutOfOrder()
    enqueuer = start(running, OrderedEnqueuer(seq), workers=4)
    batches = list(islice(enqueuer.get(), 4))
    assert indices(batches) == [0, 1, 2, 3]
    assert float(batches[2][0][0, 0]) == 2.0


class EpochLog(Sequence):
    """Logs every read and every on_epoch_end, in the order they happen."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.epoch = 0
        self.epoch_ended = threading.Event()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        with self.lock:
            self.log.append(("read", self.epoch))
        return np.array([index])

    def on_epoch_end(self) -> None:
        with self.lock:
            self.log.append(("end", self.epoch))
            self.epoch += 1
        self.epoch_ended.set()


def test_on_epoch_end_runs_between_the_reads_of_two_epochs(running: list[Any]) -> None:
    seq = EpochLog(5)
    enqueuer = start(running, OrderedEnqueuer(seq), workers=4, max_queue_size=2)
    got = [int(b[0]) for b in islice(enqueuer.get(), 5 * 4)]
    assert got == list(range(5)) * 4  # endless: epoch after epoch
    enqueuer.stop()
    ends = [i for i, (kind, _) in enumerate(seq.log) if kind == "end"]
    assert len(ends) >= 3
    for number, at in enumerate(ends):
        assert seq.log[at] == ("end", number)
        # exactly the epoch's 5 reads between two ends, all tagged with that epoch
        start_at = ends[number - 1] + 1 if number else 0
        assert seq.log[start_at:at] == [("read", number)] * 5


def test_on_epoch_end_does_not_wait_for_the_consumer(running: list[Any]) -> None:
    seq = EpochLog(3)
    start(running, OrderedEnqueuer(seq), workers=2, max_queue_size=10)
    # No get() at all: the epoch's reads finished, so on_epoch_end runs.
    assert seq.epoch_ended.wait(5)


class NoneAt(Numbered):
    def __getitem__(self, index: int) -> Any:
        return None if index in (1, 2) else super().__getitem__(index)


def test_none_items_are_skipped(running: list[Any]) -> None:
    enqueuer = start(running, OrderedEnqueuer(NoneAt(length=4)), workers=2)
    assert indices(list(islice(enqueuer.get(), 4))) == [0, 3, 0, 3]


# -- errors -------------------------------------------------------------------


def test_worker_error_arrives_after_the_batches_before_it(running: list[Any]) -> None:
    enqueuer = start(running, OrderedEnqueuer(FailsAt(bad_index=3)), workers=3)
    batches = enqueuer.get()
    assert indices([next(batches) for _ in range(3)]) == [0, 1, 2]
    with pytest.raises(KeyError, match=r"cannot read 3") as info:
        next(batches)
    error = info.value
    assert "__getitem__" in [f.name for f in traceback.extract_tb(error.__traceback__)]
    notes = getattr(error, "__notes__", [])
    assert any(
        "QueueRunnerThread-OrderedEnqueuer-host-worker" in n
        and "reading batch index 3 (epoch 0, position 3)" in n
        for n in notes
    ), notes
    assert not enqueuer.is_running()
    with pytest.raises(KeyError, match=r"cannot read 3") as again:
        next(enqueuer.get())  # sticky
    assert again.value is error


def test_bad_arguments_get_clear_errors(running: list[Any]) -> None:
    with pytest.raises(PipelineError, match=r"^the Sequence is empty \(len\(\) returned 0\)$"):
        OrderedEnqueuer(Numbered(length=0))
    with pytest.raises(TypeError, match=r"^OrderedEnqueuer needs a Sequence .* got int$"):
        OrderedEnqueuer(3)
    enqueuer = OrderedEnqueuer(Numbered())
    with pytest.raises(PipelineError, match=r"^OrderedEnqueuer.get\(\) called before start\(\)$"):
        enqueuer.get()
    with pytest.raises(ValueError, match=r"^workers must be a positive int, got 0$"):
        enqueuer.start(workers=0)
    with pytest.raises(ValueError, match=r"^max_queue_size must be a positive int, got 0$"):
        enqueuer.start(max_queue_size=0)
    start(running, enqueuer)
    with pytest.raises(PipelineError, match=r"^OrderedEnqueuer is already running; call stop"):
        enqueuer.start()


class BadLeaf(Numbered):
    def __getitem__(self, index: int) -> Any:
        if index == 2:
            return (np.array([object()]), {"index": np.int64(index)})
        if index == 4:
            return (np.zeros((2, 3), np.float64), {"index": np.int64(index)})
        return super().__getitem__(index)


def test_object_leaf_and_dtype_change_name_the_index_and_field(running: list[Any]) -> None:
    enqueuer = start(running, OrderedEnqueuer(BadLeaf()), workers=2)
    batches = enqueuer.get()
    assert indices([next(batches), next(batches)]) == [0, 1]
    with pytest.raises(BatchError, match=r"^field \[0\] has dtype object") as info:
        next(batches)
    assert any("reading batch index 2" in n for n in info.value.__notes__)

    class DtypeChangesAt4(BadLeaf):
        def __getitem__(self, index: int) -> Any:
            return Numbered.__getitem__(self, index) if index == 2 else super().__getitem__(index)

    # Where batches are packed for a device (without one they pass as they are)
    enqueuer2 = start(
        running, OrderedEnqueuer(DtypeChangesAt4(), shard=None, device="cpu"), workers=3
    )
    with pytest.raises(BatchError, match=r"^batch index 4 \(epoch 0, position 4\): field \[0\]"):
        for _ in islice(enqueuer2.get(), 6):
            pass


def test_on_epoch_end_error_arrives_after_the_epoch(running: list[Any]) -> None:
    class EndFails(Numbered):
        def on_epoch_end(self) -> None:
            raise RuntimeError("refresh failed")

    enqueuer = start(running, OrderedEnqueuer(EndFails(length=3)), workers=2)
    batches = enqueuer.get()
    assert indices([next(batches) for _ in range(3)]) == [0, 1, 2]
    with pytest.raises(RuntimeError, match=r"^refresh failed\n") as info:
        next(batches)
    assert "raised by on_epoch_end() after epoch 0" in info.value.__notes__


def test_len_changing_between_epochs_is_followed(running: list[Any]) -> None:
    class Shrinks(Numbered):
        def on_epoch_end(self) -> None:
            self.length -= 1

    enqueuer = start(running, OrderedEnqueuer(Shrinks(length=3)), workers=2)
    assert indices(list(islice(enqueuer.get(), 6))) == [0, 1, 2, 0, 1, 0]
    # then the length reaches 0: a clear error instead of an empty epoch
    with pytest.raises(
        PipelineError, match=r"^the Sequence is empty \(len\(\) returned 0\) at epoch 3"
    ):
        next(enqueuer.get())


# -- stopping -----------------------------------------------------------------


def test_stop_returns_while_workers_are_blocked_on_a_full_queue(
    running: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = threading.Event()

    class WatchedQueue(gpuqueue.FIFOQueue[Any]):
        """Sets ``blocked`` when a put waits for room; installed before any thread runs."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._not_full = wait_entered(self._not_full, blocked)

    monkeypatch.setattr(gpuqueue.run, "FIFOQueue", WatchedQueue)
    enqueuer = start(running, OrderedEnqueuer(Numbered()), workers=4, max_queue_size=1)
    assert blocked.wait(5)
    enqueuer.stop(timeout=5)
    assert not enqueuer.is_running()
    assert not any(t.is_alive() for t in enqueuer._run.threads)


class Gated(Numbered):
    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def __getitem__(self, index: int) -> Any:
        if index > 0:
            assert self.gate.wait(10)
        return super().__getitem__(index)


def test_a_consumer_blocked_in_get_wakes_when_another_thread_stops(running: list[Any]) -> None:
    seq = Gated()
    enqueuer = start(running, OrderedEnqueuer(seq), workers=2)
    next(enqueuer.get())  # closed once dropped: another thread may consume next
    waiting = wait_entered(enqueuer._run.host_queue._not_empty)
    consumer = Worker(lambda: list(enqueuer.get()), name="consumer")
    consumer.start()
    assert waiting.wait(5)
    stopper = Worker(enqueuer.stop, 10, name="stopper")
    stopper.start()
    consumer.finish()  # woke and ended while the workers are still inside __getitem__
    assert consumer.result == [] and consumer.error is None
    seq.gate.set()
    stopper.finish(10)


def test_stop_names_workers_stuck_in_user_code(running: list[Any]) -> None:
    seq = Gated()
    enqueuer = start(running, OrderedEnqueuer(seq), workers=1)
    next(enqueuer.get())
    try:
        with pytest.warns(RuntimeWarning, match=r"threads still running after 0.05 s, most likely"):
            enqueuer.stop(timeout=0.05)
    finally:
        seq.gate.set()
        enqueuer.stop(timeout=5)


def test_stop_before_start_twice_and_context_manager() -> None:
    enqueuer = OrderedEnqueuer(Numbered())
    enqueuer.stop()
    with enqueuer as running_enqueuer:
        assert running_enqueuer.is_running()
        assert indices(list(islice(enqueuer.get(), 2))) == [0, 1]
    assert not enqueuer.is_running()
    enqueuer.stop()
    enqueuer.stop()


# -- shuffling, sharding, resuming ---------------------------------------------


def read_epochs(running: list[Any], enqueuer: OrderedEnqueuer, n: int) -> list[int]:
    start(running, enqueuer, workers=3)
    return indices(list(islice(enqueuer.get(), n)))


def test_shuffle_is_seeded_per_epoch(running: list[Any]) -> None:
    a = read_epochs(running, OrderedEnqueuer(Numbered(20), shuffle=True, seed=5), 40)
    b = read_epochs(running, OrderedEnqueuer(Numbered(20), shuffle=True, seed=5), 40)
    c = read_epochs(running, OrderedEnqueuer(Numbered(20), shuffle=True), 40)
    assert a == b
    assert a[:20] != a[20:] and sorted(a[:20]) == sorted(a[20:]) == list(range(20))
    assert a != c  # no seed: a random one (1 in 20! to collide)


def test_shards_split_every_epoch_among_ranks(running: list[Any]) -> None:
    """10 batches on 3 ranks: 4 each, the epoch's first 2 read twice (DistributedSampler's rule)."""
    per_rank = []
    for rank in range(3):
        enqueuer = OrderedEnqueuer(Numbered(10), shuffle=True, seed=3, shard=(rank, 3))
        per_rank.append(read_epochs(running, enqueuer, 4 * 2))
        assert enqueuer.stats()["shard_rank"] == rank
    for epoch in range(2):
        parts = [got[epoch * 4 : (epoch + 1) * 4] for got in per_rank]
        padded = [parts[p % 3][p // 3] for p in range(12)]  # the epoch's order, rebuilt
        assert sorted(padded[:10]) == list(range(10))
        assert padded[10:] == padded[:2]
    with pytest.raises(ValueError, match=r"^shuffling across 3 ranks needs a seed"):
        OrderedEnqueuer(Numbered(10), shuffle=True, shard=(0, 3))


def test_resume_continues_with_exactly_the_next_batch(running: list[Any]) -> None:
    reference = read_epochs(running, OrderedEnqueuer(Numbered(7), shuffle=True, seed=11), 30)

    first = OrderedEnqueuer(Numbered(7), shuffle=True, seed=11)
    got = read_epochs(running, first, 10)  # past an epoch boundary
    state = first.state_dict()
    first.stop()
    assert state == {
        "epoch": 1,
        "position": 3,
        "start": 0,  # where this world's split of the epoch began (see test_elastic.py)
        "length": 7,
        "seed": 11,
        "shuffle": True,
        "shard": (0, 1),
        "drop_last": False,
    }

    second = OrderedEnqueuer(Numbered(7), shuffle=True)
    second.load_state_dict(state)
    got += read_epochs(running, second, 20)
    assert got == reference
    with pytest.raises(PipelineError, match=r"^load_state_dict\(\) needs a stopped enqueuer"):
        second.load_state_dict(state)
    with pytest.raises(ValueError, match=r"^state is missing \['seed'\]$"):
        OrderedEnqueuer(Numbered(7)).load_state_dict({"epoch": 0, "position": 0})
    with pytest.raises(ValueError, match=r"^state has shuffle=True, but this enqueuer has shuffle"):
        OrderedEnqueuer(Numbered(7)).load_state_dict(state)


def test_stats_count_what_flowed(running: list[Any]) -> None:
    enqueuer = start(running, OrderedEnqueuer(Numbered()), workers=2, max_queue_size=3)
    list(islice(enqueuer.get(), 5))
    stats = enqueuer.stats()
    assert stats["batches_consumed"] == 5
    # Fast reads travel in bundles of up to _BUNDLE_MOST, and the queue's bound (and each
    # worker's one item out) counts bundles (host/bundles.py): so up to that many batches each.
    assert 5 <= stats["batches_produced"] <= 5 + (3 + 2) * _BUNDLE_MOST
    assert stats["queue_capacity"] == 3 and 0 <= stats["queue_size"] <= 3
    assert stats["consumer_wait_s"] >= 0 and stats["producer_blocked_s"] >= 0
    assert 0 <= stats["mean_queue_occupancy"] <= 3


# -- generators -----------------------------------------------------------------


def numbered_items(n: int) -> Iterator[Any]:
    for i in range(n):
        yield (np.full(2, i), {"index": np.int64(i)})


def test_generator_ends_after_everything_it_produced(running: list[Any]) -> None:
    enqueuer = start(running, GeneratorEnqueuer(numbered_items(25)), workers=4, max_queue_size=3)
    assert indices(list(enqueuer.get())) == list(range(25))
    assert not enqueuer.is_running()


def test_generator_need_not_be_thread_safe(running: list[Any]) -> None:
    # A plain generator raises "generator already executing" if two threads
    # call next() at once; under the enqueuer's lock that never happens.
    enqueuer = start(running, GeneratorEnqueuer(numbered_items(500)), workers=8, max_queue_size=2)
    assert indices(list(enqueuer.get())) == list(range(500))


class YieldsAfterRaising:
    """An iterator that raises at item 2 and would go on yielding afterwards."""

    def __init__(self) -> None:
        self.calls = 0

    def __iter__(self) -> YieldsAfterRaising:
        return self

    def __next__(self) -> Any:
        self.calls += 1
        if self.calls == 3:
            raise ValueError("bad item")
        return (np.zeros(1), {"index": np.int64(self.calls - 1)})


def test_generator_error_is_sticky_and_the_generator_is_not_called_again(
    running: list[Any],
) -> None:
    source = YieldsAfterRaising()
    enqueuer = start(running, GeneratorEnqueuer(source), workers=3)
    batches = enqueuer.get()
    assert indices([next(batches), next(batches)]) == [0, 1]
    with pytest.raises(ValueError, match=r"^bad item\nraised in .* reading generator item 2$"):
        next(batches)
    with pytest.raises(ValueError, match=r"^bad item\n"):
        next(enqueuer.get())
    assert source.calls == 3


def test_generator_enqueuer_arguments() -> None:
    with pytest.raises(TypeError, match=r"^GeneratorEnqueuer needs an iterable, got int$"):
        GeneratorEnqueuer(3)  # type: ignore[arg-type]
    with pytest.raises(
        PipelineError,
        match=r"^use_multiprocessing=True needs the generator function or a picklable iterable, "
        r"but pickling generator failed: .*; pass the generator function itself",
    ):
        GeneratorEnqueuer(numbered_items(1), use_multiprocessing=True)
    enqueuer = GeneratorEnqueuer(numbered_items(1), random_seed=3)
    with enqueuer:
        assert len(list(enqueuer.get())) == 1
    with pytest.raises(PipelineError, match=r"generator is consumed"):
        enqueuer.start()


class LastReadWaitsForTheNextEpoch(gpuqueue.Sequence):
    """No on_epoch_end of its own. The first read of index 3 (epoch 0's last) waits until a
    read of the next epoch has begun, and its batch says whether one did."""

    def __init__(self) -> None:
        self.reads = 0
        self.lock = threading.Lock()
        self.next_epoch_began = threading.Event()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> np.ndarray:
        with self.lock:
            self.reads += 1
            first_epoch = self.reads <= 4
        if not first_epoch:
            self.next_epoch_began.set()
        elif index == 3:
            return np.array([index, self.next_epoch_began.wait(10)])
        return np.array([index, True])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("device", [None, "cpu"])
def test_without_on_epoch_end_the_next_epoch_does_not_wait_for_the_last_reads(
    running: list[Any], device: str | None
) -> None:
    """Only an on_epoch_end() of the source's own needs the epoch's reads all ended before
    the next epoch's start; without one, a worker that finds the epoch claimed goes on into
    the next at once (it waited for the other workers' last reads: a thread hand-off per
    epoch, 1.27x the time per batch over 10 epochs of 100 trivial batches). Order holds."""
    seq = LastReadWaitsForTheNextEpoch()
    enqueuer = start(running, OrderedEnqueuer(seq, shard=None, epochs=2, device=device), workers=2)
    got = [tuple(int(v) for v in batch) for batch in enqueuer.get()]
    assert [index for index, _ in got] == [0, 1, 2, 3] * 2
    assert got[3] == (3, 1), "epoch 0's last read ended before epoch 1's first began"


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_finished_run_starts_again_from_epoch_0(shuffle: bool) -> None:
    """Regression (issue 26, fault 6): three start/read/stop cycles of an ``epochs=1``
    enqueuer gave 10, 0 and 0 batches, silently. A Sequence can be read again, and a
    Keras user's start() reads it again (a stop before the end still resumes)."""
    from tests.seqs import Numbered

    enqueuer = OrderedEnqueuer(Numbered(length=10), shuffle=shuffle, seed=3, epochs=1, shard=None)
    cycles = []
    for _ in range(3):
        enqueuer.start(workers=2)
        cycles.append([int(batch[1]["index"]) for batch in enqueuer.get()])
        enqueuer.stop()
    assert [sorted(cycle) for cycle in cycles] == [list(range(10))] * 3
    assert cycles[0] == cycles[1] == cycles[2]  # epoch 0's order each time
    enqueuer.start(workers=1)
    first = [int(batch[1]["index"]) for _, batch in zip(range(4), enqueuer.get(), strict=False)]
    enqueuer.stop()
    enqueuer.start(workers=1)  # stopped before the end: it resumes after what was received
    rest = [int(batch[1]["index"]) for batch in enqueuer.get()]
    enqueuer.stop()
    assert first + rest == cycles[0]
