"""Resuming gpuqueue's own orders with another world size (elastic resume).

A state saved on one rank at a training step (every rank at the same step, as
under DDP) says how much of the epoch's global order every rank together has
received; resumed with another world size, the remaining positions are split
among the new ranks, so every remaining sample is read once across them (plus
the wrap-around padding every uneven split has). The ranks are simulated one
after another in this process: gpuqueue's orders are deterministic, so that
is what several processes would read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer
from gpuqueue.source.order import epoch_order

pytestmark = pytest.mark.timeout(60)


class Batches:
    """A Sequence of batches: batch i is ``{"i": [i]}``."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"i": np.array([index])}


class SampleSet:
    """A per-sample dataset: sample i is ``{"i": i}``."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return {"i": index}


def read_ids(batch: Any) -> list[int]:
    return [int(i) for i in np.asarray(batch["i"])]


def world(
    make: Callable[[tuple[int, int]], OrderedEnqueuer],
    size: int,
    *,
    state: dict[str, Any] | None = None,
    steps: int | None = None,
    workers: int = 2,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Every rank of a world of ``size`` reads ``steps`` batches (all, if None) from ``state``.

    Returns each rank's sample ids in the order read, and rank 0's state after them.
    """
    reads, saved = [], {}
    for rank in range(size):
        enqueuer = make((rank, size))
        if state is not None:
            enqueuer.load_state_dict(state)
        enqueuer.start(workers=workers, max_queue_size=4)
        try:
            batches = islice(enqueuer.get(), steps) if steps is not None else enqueuer.get()
            reads.append([i for batch in batches for i in read_ids(batch)])
            if rank == 0:
                saved = enqueuer.state_dict()
        finally:
            enqueuer.stop()
    return reads, saved


def batches(length: int, **options: Any) -> Callable[[tuple[int, int]], OrderedEnqueuer]:
    return lambda shard: OrderedEnqueuer(Batches(length), shard=shard, **options)


def samples(length: int, **options: Any) -> Callable[[tuple[int, int]], OrderedEnqueuer]:
    return lambda shard: OrderedEnqueuer(SampleSet(length), shard=shard, **options)


def flat(reads: list[list[int]]) -> list[int]:
    return [i for rank in reads for i in rank]


def test_four_ranks_resumed_on_two_read_the_rest_of_the_epoch_once_then_reshuffle() -> None:
    make = batches(24, shuffle=True, seed=7, epochs=2)
    before, state = world(make, 4, steps=3)
    assert state["epoch"] == 0 and state["position"] == 3
    after, _ = world(make, 2, state=state)
    assert [len(rank) for rank in after] == [6 + 12, 6 + 12]
    epoch0 = flat(before) + flat([rank[:6] for rank in after])
    epoch1 = flat([rank[6:] for rank in after])
    assert sorted(epoch0) == list(range(24))  # every batch exactly once
    assert sorted(epoch1) == list(range(24))
    # The rest of epoch 0 is the rest of its global order, in order across the ranks.
    global0 = epoch_order(24, 0, shuffle=True, seed=7).tolist()
    resumed = [after[position % 2][position // 2] for position in range(12)]
    assert resumed == global0[12:]
    assert epoch_order(24, 1, shuffle=True, seed=7).tolist() != global0  # reshuffled
    assert [after[p % 2][6 + p // 2] for p in range(24)] == epoch_order(
        24, 1, shuffle=True, seed=7
    ).tolist()


def test_a_split_that_does_not_divide_pads_by_wrapping_around_as_any_uneven_split() -> None:
    make = batches(10, shuffle=True, seed=3, epochs=1)
    before, state = world(make, 2, steps=2)  # 4 of 10 read
    after, _ = world(make, 4, state=state)  # 6 left for 4 ranks: 2 each, 2 read again
    assert [len(rank) for rank in after] == [2, 2, 2, 2]
    counts = Counter(flat(before) + flat(after))
    assert set(counts) == set(range(10))
    assert sum(counts.values()) == 12 and max(counts.values()) == 2
    # The padding wraps around to the epoch's first positions, read before the resume.
    twice = {i for i, count in counts.items() if count == 2}
    assert twice == set(epoch_order(10, 0, shuffle=True, seed=3)[:2].tolist()) <= set(flat(before))


@pytest.mark.parametrize(("new_size", "kept"), [(3, 10), (4, 8)])
def test_drop_last_drops_only_what_the_new_world_cannot_split(new_size: int, kept: int) -> None:
    make = batches(10, shuffle=True, seed=5, epochs=1, drop_last=True)
    before, state = world(make, 2, steps=2)
    after, _ = world(make, new_size, state=state)
    read = flat(before) + flat(after)
    assert len(read) == len(set(read)) == kept  # none twice, the tail dropped
    assert len({len(rank) for rank in after}) == 1  # every rank the same number of steps


def test_a_state_saved_at_the_end_of_an_epoch_resumes_with_the_next_one() -> None:
    make = batches(10, shuffle=True, seed=9, epochs=2)
    _, state = world(make, 2, steps=5)  # the whole of epoch 0
    after, _ = world(make, 3, state=state)
    assert [len(rank) for rank in after] == [4, 4, 4]  # epoch 1 only: ceil(10 / 3) each
    assert set(flat(after)) == set(range(10))


def test_a_resumed_epoch_with_nothing_left_for_some_ranks_still_ends() -> None:
    make = batches(10, epochs=2, drop_last=True)
    _, state = world(make, 2, steps=4)  # 8 of 10 read
    after, _ = world(make, 3, state=state)  # 2 left, fewer than 3 ranks: dropped
    assert after == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # epoch 1, 9 dropped


def test_a_state_from_rank_zero_resumes_every_rank_of_the_same_world() -> None:
    make = batches(12, shuffle=True, seed=2, epochs=1)
    before, state = world(make, 3, steps=2)
    after, _ = world(make, 3, state=state)  # each rank loads rank 0's state
    assert sorted(flat(before) + flat(after)) == list(range(12))


@pytest.mark.parametrize("workers", [1, 3])
def test_per_sample_orders_resume_elastically_with_another_batch_size_and_workers(
    workers: int,
) -> None:
    before, state = world(samples(50, batch_size=4, shuffle=True, seed=3, epochs=2), 2, steps=3)
    assert state["sample"] == 12
    after, _ = world(
        samples(50, batch_size=5, shuffle=True, seed=3, epochs=2), 3, state=state, workers=workers
    )
    # 50 - 24 = 26 left for 3 ranks: 9 each (one read again), then epoch 1: 17 each.
    assert [len(rank) for rank in after] == [9 + 17] * 3
    epoch0 = Counter(flat(before) + flat([rank[:9] for rank in after]))
    assert set(epoch0) == set(range(50)) and sum(epoch0.values()) == 51
    # Read on from sample 24 of the epoch's order, padded with its first sample.
    shared = np.random.default_rng([3, 0]).permutation(50).tolist() * 2  # SampleOrder's draw
    assert [after[p % 3][p // 3] for p in range(27)] == shared[24:51]
    epoch1 = Counter(flat([rank[9:] for rank in after]))
    assert set(epoch1) == set(range(50)) and sum(epoch1.values()) == 51


def test_a_sampler_of_the_users_resumes_elastically() -> None:
    order = [7, 1, 5, 3, 9, 0, 2, 8, 6, 4]
    make = samples(10, batch_size=1, sampler=order, epochs=1)
    before, state = world(make, 2, steps=2)
    after, _ = world(make, 3, state=state)
    assert flat(before) == [7, 5, 1, 3]
    # The rest of the sampler's order, 9 0 2 8 6 4, split among three ranks.
    assert after == [[9, 8], [0, 6], [2, 4]]


class SplitsItself:
    """A sampler that reads one rank's part itself, as ``DistributedSampler``."""

    def __init__(self, num_replicas: int, rank: int) -> None:
        self.num_replicas, self.rank = num_replicas, rank

    def __iter__(self) -> Any:
        return iter(range(self.rank, 10, self.num_replicas))


def test_what_cannot_resume_elastically_says_why() -> None:
    sampler = SplitsItself(2, 0)
    _, state = world(
        lambda shard: OrderedEnqueuer(SampleSet(10), batch_size=1, sampler=sampler), 1, steps=1
    )
    with pytest.raises(ValueError, match=r"^cannot resume .* on 2 ranks: sampler= splits itself"):
        OrderedEnqueuer(SampleSet(10), batch_size=1, sampler=sampler, shard=(0, 2)).load_state_dict(
            state
        )
    lists = [[0, 1], [2, 3], [4, 5], [6, 7]]
    _, state = world(
        lambda shard: OrderedEnqueuer(SampleSet(8), batch_sampler=lists, shard=shard), 2, steps=1
    )
    with pytest.raises(ValueError, match=r"^cannot resume .* on 4 ranks: batch_sampler="):
        OrderedEnqueuer(SampleSet(8), batch_sampler=lists, shard=(0, 4)).load_state_dict(state)


def test_prefetch_resumes_on_another_world_size() -> None:
    make = batches(12, shuffle=True, seed=1, epochs=1)
    before, state = world(make, 2, steps=3)  # 6 of 12 read
    rest = []
    for rank in range(3):
        with gpuqueue.prefetch(
            Batches(12), None, shuffle=True, seed=1, epochs=1, shard=(rank, 3), state=state
        ) as run:
            rest += [i for batch in run for i in read_ids(batch)]
    assert sorted(flat(before) + rest) == list(range(12))


def test_a_state_of_another_world_needs_the_sequence_it_was_saved_over() -> None:
    _, state = world(batches(10, epochs=1), 2, steps=2)
    with pytest.raises(ValueError, match=r"^state was saved over 10 batches, this Sequence has 12"):
        OrderedEnqueuer(Batches(12), shard=(0, 3)).load_state_dict(state)
    _, state = world(samples(10, batch_size=2, epochs=1), 2, steps=1)
    with pytest.raises(ValueError, match=r"^state was saved over 10 samples, this dataset has 9"):
        OrderedEnqueuer(SampleSet(9), batch_size=2, shard=(0, 3)).load_state_dict(state)
    del state["length"]
    with pytest.raises(ValueError, match=r"^state has no length \(saved by an older gpuqueue\)"):
        OrderedEnqueuer(SampleSet(10), batch_size=2, shard=(0, 3)).load_state_dict(state)
    OrderedEnqueuer(SampleSet(10), batch_size=2, shard=(1, 2)).load_state_dict(state)  # same world
