from __future__ import annotations

import threading

import numpy as np
import pytest

import gpuqueue
from gpuqueue.errors import CancelledError, OutOfRangeError, PipelineError
from gpuqueue.host.sequencer import Sequencer
from gpuqueue.source.order import Sequence, epoch_order
from tests.conftest import Worker, wait_entered


def test_epoch_order_is_seeded_per_epoch() -> None:
    a0 = epoch_order(50, 0, shuffle=True, seed=7)
    assert np.array_equal(a0, epoch_order(50, 0, shuffle=True, seed=7))
    assert not np.array_equal(a0, epoch_order(50, 1, shuffle=True, seed=7))
    assert not np.array_equal(a0, epoch_order(50, 0, shuffle=True, seed=8))
    assert sorted(a0) == list(range(50))
    assert list(epoch_order(5, 3, shuffle=False, seed=0)) == [0, 1, 2, 3, 4]


def ranks_orders(
    length: int, world_size: int, epoch: int, *, shuffle: bool, drop_last: bool = False
) -> list[np.ndarray]:
    return [
        epoch_order(
            length,
            epoch,
            shuffle=shuffle,
            seed=1,
            shard=(rank, world_size),
            drop_last=drop_last,
        )
        for rank in range(world_size)
    ]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length", range(1, 13))
def test_every_rank_reads_as_many_and_the_tail_wraps_around(
    length: int, world_size: int, shuffle: bool
) -> None:
    """DistributedSampler's rule: ceil(n / w) each; the epoch's order, extended by wrapping."""
    for epoch in range(2):
        parts = ranks_orders(length, world_size, epoch, shuffle=shuffle)
        per_rank = -(-length // world_size)
        assert [len(p) for p in parts] == [per_rank] * world_size
        # Rank r holds positions r, r + w, ... of the padded order: interleave them back.
        padded = [int(parts[p % world_size][p // world_size]) for p in range(per_rank * world_size)]
        whole = epoch_order(length, epoch, shuffle=shuffle, seed=1)
        assert padded[:length] == list(whole)  # every index once, in the shared order
        assert padded == [int(whole[p % length]) for p in range(len(padded))]  # then wraps
        if not shuffle:
            assert padded[:length] == list(range(length))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length", range(1, 13))
def test_drop_last_drops_the_tail_of_the_epochs_order(
    length: int, world_size: int, shuffle: bool
) -> None:
    if length < world_size:
        with pytest.raises(
            PipelineError,
            match=rf"^drop_last=True with {world_size} ranks leaves no batch of an epoch of "
            rf"{length}: every rank needs at least one",
        ):
            ranks_orders(length, world_size, 0, shuffle=shuffle, drop_last=True)
        return
    parts = ranks_orders(length, world_size, 0, shuffle=shuffle, drop_last=True)
    kept = length // world_size
    assert [len(p) for p in parts] == [kept] * world_size
    merged = [int(parts[p % world_size][p // world_size]) for p in range(kept * world_size)]
    assert merged == list(epoch_order(length, 0, shuffle=shuffle, seed=1)[: kept * world_size])


def test_ten_batches_on_three_ranks_as_in_the_issue() -> None:
    """The case that hung DDP: 4, 3 and 3 batches. Now 4 each, positions 10 and 11 wrap."""
    parts = ranks_orders(10, 3, 0, shuffle=False)
    assert [list(p) for p in parts] == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    dropped = ranks_orders(10, 3, 0, shuffle=False, drop_last=True)
    assert [list(p) for p in dropped] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_sequence_base_class() -> None:
    class Three(Sequence):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> int:
            return index * 2

    assert list(Three()) == [0, 2, 4]
    Three().on_epoch_end()
    with pytest.raises(NotImplementedError):
        len(Sequence())


class Committed:
    """A Sequencer's commit and discard, recording what went where and from which thread."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.by: list[str] = []
        self.discarded: list[str] = []

    def commit(self, item: str) -> None:
        self.items.append(item)
        self.by.append(threading.current_thread().name)

    def discard(self, item: str) -> None:
        self.discarded.append(item)


def make_sequencer(limit: int = 3) -> tuple[Sequencer[str], Committed]:
    log = Committed()
    return Sequencer(log.commit, log.discard, limit), log


def test_items_handed_in_out_of_turn_are_committed_in_order_by_the_turns_worker() -> None:
    sequencer, log = make_sequencer()
    for _ in range(3):
        sequencer.reserve()
    sequencer.submit(2, "c")
    sequencer.submit(1, "b")
    assert log.items == []  # item 0 is still being read
    reader = Worker(sequencer.submit, 0, "a", name="reader-of-0")
    reader.start()
    assert reader.finish().error is None
    assert log.items == ["a", "b", "c"]
    assert log.by == ["reader-of-0"] * 3  # the worker finishing the turn put all three
    sequencer.reserve()  # and all three are no longer out
    sequencer.reserve()
    sequencer.reserve()


def test_reserve_waits_for_a_commit_and_close_wakes_it() -> None:
    sequencer, log = make_sequencer(limit=2)
    sequencer.reserve()
    sequencer.reserve()
    room = wait_entered(sequencer._room)
    waiting = Worker(sequencer.reserve)
    waiting.start()
    assert room.wait(5)  # blocked: two items are out
    sequencer.submit(0, "a")
    waiting.finish()  # a commit made room
    assert waiting.error is None
    room.clear()
    blocked = Worker(sequencer.reserve)
    blocked.start()
    assert room.wait(5)
    sequencer.submit(2, "c")  # out of turn: left for item 1's worker
    sequencer.close()
    assert isinstance(blocked.finish().error, CancelledError)
    assert log.items == ["a"] and log.discarded == ["c"]
    with pytest.raises(CancelledError):
        sequencer.submit(1, "b")  # after close: discarded, never committed
    assert log.discarded == ["c", "b"]


def test_a_failed_commit_discards_the_item_and_the_next_one_still_commits() -> None:
    log = Committed()

    def commit(item: str) -> None:
        if item == "b":
            raise CancelledError("the queue was cancelled")
        log.commit(item)

    sequencer: Sequencer[str] = Sequencer(commit, log.discard, limit=3)
    for _ in range(3):
        sequencer.reserve()
    sequencer.submit(1, "b")
    sequencer.submit(2, "c")
    with pytest.raises(CancelledError, match="cancelled"):
        sequencer.submit(0, "a")  # commits a, then fails on b
    assert log.items == ["a"] and log.discarded == ["b"]
    sequencer.close()
    assert log.discarded == ["b", "c"]  # what was left is discarded, once


class Endless(Sequence):
    """A sampler that says it is endless the way Keras code often does: a huge ``len()``."""

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, index: int) -> np.ndarray:
        return np.full(2, index)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shard", [None, (1, 3)])
def test_a_sequence_of_a_trillion_batches_costs_no_order_array(
    shard: tuple[int, int] | None,
) -> None:
    """An unshuffled epoch's order is worked out as it is read: np.arange(10**12) was a
    MemoryError (7.3 TiB) before the first batch, and 10**9 (8 GB) could be killed silently."""
    with gpuqueue.prefetch(Endless(), device=None, workers=2, shard=shard) as batches:
        first = [int(next(batches)[0]) for _ in range(5)]
    rank, world = shard or (0, 1)
    assert first == [rank + world * position for position in range(5)]
    order = epoch_order(10**12, 0, shuffle=False, seed=0, shard=(2, 3))
    assert len(order) == -(-(10**12) // 3)
    assert order[-1] == (2 + 3 * (len(order) - 1)) % 10**12  # the padding wraps around
    assert order[1:4].tolist() == [5, 8, 11]


@pytest.mark.parametrize(
    ("length", "shard"), [(10, (0, 1)), (10, (1, 3)), (2, (2, 5)), (7, (0, 4))]
)
def test_an_unshuffled_order_reads_the_same_whichever_way(
    length: int, shard: tuple[int, int]
) -> None:
    """Indexing, slicing, iterating and a bundle's run give the indices the stored order gave:
    the positions rank, rank + world, ... of 0 .. length - 1 wrapped around for the padding."""
    order = epoch_order(length, 0, shuffle=False, seed=0, shard=shard)
    rank, world = shard
    expected = [p % length for p in range(rank, -(-length // world) * world, world)]
    assert list(order) == [order[i] for i in range(len(order))] == expected
    assert np.asarray(order).tolist() == order[:].tolist() == expected
    for start in range(len(order)):
        for stop in range(start, len(order) + 1):
            assert order.run(start, stop) == expected[start:stop]  # type: ignore[union-attr]


def test_a_bundle_opens_the_next_epoch_and_on_epoch_end_still_comes_between() -> None:
    """After an epoch's end the worker that crossed it claims a whole bundle of the next epoch
    (it got one batch, and every other read of the new epoch its own queue item: a short epoch
    cost several more hand-offs than its batches needed). on_epoch_end still runs between."""
    from gpuqueue.source.tasks import SequenceTasks

    ends: list[int] = []

    class Ten(Sequence):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> int:
            return index

        def on_epoch_end(self) -> None:
            ends.append(len(ends))

    tasks = SequenceTasks(Ten(), shuffle=False, seed=0, shard=(0, 1), epochs=2)
    claimed = []
    for _ in range(4):
        bundle = tasks.claim_several(8)
        claimed.append([(task.epoch, task.index) for task in bundle])
        # one seq_no each, in a row: a bundle's finished prefix may go to the queue early
        first = bundle[0].seq_no
        assert [task.seq_no for task in bundle] == list(range(first, first + len(bundle)))
        tasks.done_reading(len(bundle), len(bundle))
    assert claimed == [
        [(0, i) for i in range(8)],
        [(0, 8), (0, 9)],
        [(1, i) for i in range(8)],  # was [(1, 0)] alone
        [(1, 8), (1, 9)],
    ]
    assert ends == [0]
    with pytest.raises(OutOfRangeError):
        tasks.claim_several(8)
    assert ends == [0, 1]
