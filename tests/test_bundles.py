"""A bundle delivers its finished prefix (issue 26, fault 4).

Fast reads travel in bundles of up to 8 batches per queue item. A bundle
whose later reads are slow, or wait for the consumer, must not keep the
batches it already read: as soon as the consumer waits for one of them, it
gets the finished prefix, in order. The forced interleaving: one worker (so
its second claim is a bundle), reads from index 3 gated shut, and a consumer
that must get batches 1 and 2 while read 3 is still running.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer


class GatedFrom(gpuqueue.Sequence):
    """Reads from ``first_gated`` on wait for ``gate`` (a slow read); the rest are instant."""

    def __init__(self, first_gated: int, length: int = 16) -> None:
        self.first_gated, self.length = first_gated, length
        self.gate = threading.Event()
        self.gated_read_started = threading.Event()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if index >= self.first_gated:
            self.gated_read_started.set()
            if not self.gate.wait(20):
                raise TimeoutError(f"read {index} was never let go")
        return np.full(4, index, np.int64)


class WaitsForTheConsumer(gpuqueue.Sequence):
    """Read ``i`` (from 2 on) returns once the consumer has taken batch ``i - 1``."""

    def __init__(self, length: int = 12) -> None:
        self.length = length
        self.taken = [threading.Event() for _ in range(length)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if index >= 2 and not self.taken[index - 1].wait(20):
            raise TimeoutError(f"read {index}: batch {index - 1} was never taken")
        return np.full(4, index, np.int64)


@pytest.mark.timeout(60)
def test_a_bundle_hands_over_its_read_batches_while_a_later_read_is_slow() -> None:
    """Regression: batches 1 and 2 waited in a bundle behind read 3, and get() raised
    BatchTimeoutError although no read had outlasted the timeout."""
    sequence = GatedFrom(first_gated=3)
    enqueuer = OrderedEnqueuer(sequence, shard=None, epochs=1, timeout=10)
    try:
        enqueuer.start(workers=1, max_queue_size=4)
        batches = enqueuer.get()
        early = [int(next(batches)[0]) for _ in range(3)]  # read 3 is still gated
        assert sequence.gated_read_started.is_set() and not sequence.gate.is_set()
        sequence.gate.set()
        rest = [int(batch[0]) for batch in batches]
    finally:
        sequence.gate.set()
        enqueuer.stop(timeout=10)
    assert early == [0, 1, 2]
    assert rest == list(range(3, 16))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 3])
def test_a_read_that_waits_for_the_consumer_to_take_an_earlier_batch_does_not_hang(
    workers: int,
) -> None:
    """Regression: read 2 waited for batch 1, which waited in read 2's bundle: a hang."""
    sequence = WaitsForTheConsumer()
    enqueuer = OrderedEnqueuer(sequence, shard=None, epochs=1, timeout=10)
    got = []
    try:
        enqueuer.start(workers=workers, max_queue_size=4)
        for batch in enqueuer.get():
            got.append(int(batch[0]))
            sequence.taken[got[-1]].set()
    finally:
        for taken in sequence.taken:
            taken.set()
        enqueuer.stop(timeout=10)
    assert got == list(range(12))
