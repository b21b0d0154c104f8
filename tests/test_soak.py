"""Long runs: many epochs, random faults and restarts; nothing accumulates.

CI runs the short form. The long form, for manual runs::

    GPUQUEUE_SOAK_BATCHES=100000 python -m pytest -m soak -p no:cacheprovider
"""

from __future__ import annotations

import os
import random
import threading
from itertools import islice
from typing import Any

import numpy as np
import pytest

from gpuqueue import OrderedEnqueuer
from tests.conftest import shared_memory
from tests.seqs import Numbered

BATCHES = int(os.environ.get("GPUQUEUE_SOAK_BATCHES", "4000"))


def resources() -> dict[str, Any]:
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
    return {"threads": threading.active_count(), "fds": fds, "shm": sorted(shared_memory())}


class RandomFaults(Numbered):
    def __init__(self, length: int, fault_rate: float, seed: int) -> None:
        super().__init__(length)
        self.fault_rate = fault_rate
        self.seed = seed

    def __getitem__(self, index: int) -> Any:
        if random.Random(self.seed * 1_000_003 + index).random() < self.fault_rate:
            raise RuntimeError(f"injected fault at {index}")
        return super().__getitem__(index)


@pytest.mark.soak
@pytest.mark.timeout(max(120, BATCHES // 200))
def test_memory_is_flat_over_many_epochs_of_one_enqueuer() -> None:
    enqueuer = OrderedEnqueuer(Numbered(length=50), device="cpu", prefetch_depth=2, shard=None)
    enqueuer.start(workers=3, max_queue_size=4)
    try:
        batches = enqueuer.get()
        for i, batch in enumerate(islice(batches, 100)):
            assert int(batch[1]["index"]) == i % 50
        first = enqueuer.stats()
        for i, batch in enumerate(islice(batches, BATCHES // 2), start=100):
            assert int(batch[1]["index"]) == i % 50 and np.all(batch[0] == i % 50)
        last = enqueuer.stats()
    finally:
        enqueuer.stop()
    # On NumPy a staged buffer becomes the batch's arena and the slot takes a free
    # arena's memory: one pool of buffers, so their sum is what stays bounded.
    # Slots (workers + queue + 1), then depth 2 ahead, the two the loop holds while
    # asking for the next, and one kept free.
    arena = int(enqueuer._run.arenas.largest * 1.25)
    for stats in (first, last):
        assert stats["pinned_bytes"] + stats["device_bytes"] <= (3 + 4 + 1 + 2 + 3) * arena
    assert last["batches_consumed"] == 100 + BATCHES // 2


@pytest.mark.soak
@pytest.mark.timeout(max(180, BATCHES // 100))
def test_restarts_with_random_faults_leave_nothing_behind() -> None:
    rng = random.Random(1234)
    baseline: dict[str, Any] | None = None
    delivered = 0
    run = 0
    while delivered < BATCHES // 2:
        run += 1
        # Process start-up is slow: every tenth run, from the first, so the baseline
        # already includes multiprocessing's forkserver, started once per interpreter.
        processes = run % 10 == 1
        seq = RandomFaults(rng.randint(1, 30), fault_rate=0.01, seed=run)
        enqueuer = OrderedEnqueuer(
            seq,
            use_multiprocessing=processes,
            device=rng.choice([None, "cpu"]),
            prefetch_depth=rng.randint(0, 3),
            shuffle=rng.random() < 0.5,
            seed=run,
            shard=None,
        )
        enqueuer.start(workers=rng.randint(1, 4), max_queue_size=rng.randint(1, 5))
        try:
            for _ in islice(enqueuer.get(), rng.randint(1, 300)):
                delivered += 1
        except RuntimeError as error:
            assert str(error).startswith("injected fault at")
        finally:
            enqueuer.stop(timeout=10)
        if baseline is None:
            baseline = resources()
    assert resources() == baseline
