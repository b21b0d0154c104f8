from __future__ import annotations

import threading

import numpy as np
import pytest

from gpuqueue.errors import CancelledError
from gpuqueue.host import Sequencer
from gpuqueue.sources import Sequence, epoch_order, resolve_shard
from tests.conftest import Worker, wait_entered


def test_resolve_shard_explicit_and_none() -> None:
    assert resolve_shard(None) == (0, 1)
    assert resolve_shard((2, 4)) == (2, 4)


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ((4, 4), r"^shard needs 0 <= rank < world_size, got rank=4, world_size=4$"),
        ((0, 0), r"^shard needs 0 <= rank < world_size, got rank=0, world_size=0$"),
        ((0.5, 2), r"^shard must hold two ints, got \(0.5, 2\)$"),
        ([0, 2], r"^shard must be \(rank, world_size\), None or 'auto', got \[0, 2\]$"),
        ("rank0", r"^shard must be \(rank, world_size\), None or 'auto', got 'rank0'$"),
    ],
)
def test_resolve_shard_rejects_bad_values(shard: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_shard(shard)  # type: ignore[arg-type]


def test_resolve_shard_reads_launcher_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_shard("auto") == (0, 1)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "3")
    assert resolve_shard("auto") == (1, 3)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_shard("auto") == (2, 4)  # torchrun's variables come first
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match=r"^RANK='two' and WORLD_SIZE='4' must be integers$"):
        resolve_shard("auto")


def test_epoch_order_is_seeded_per_epoch() -> None:
    a0 = epoch_order(50, 0, shuffle=True, seed=7)
    assert np.array_equal(a0, epoch_order(50, 0, shuffle=True, seed=7))
    assert not np.array_equal(a0, epoch_order(50, 1, shuffle=True, seed=7))
    assert not np.array_equal(a0, epoch_order(50, 0, shuffle=True, seed=8))
    assert sorted(a0) == list(range(50))
    assert list(epoch_order(5, 3, shuffle=False, seed=0)) == [0, 1, 2, 3, 4]


def test_shards_are_disjoint_and_cover_every_index() -> None:
    for epoch in range(3):
        parts = [epoch_order(10, epoch, shuffle=True, seed=1, shard=(r, 3)) for r in range(3)]
        merged = np.concatenate(parts)
        assert sorted(merged) == list(range(10))
        assert [len(p) for p in parts] == [4, 3, 3]


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
