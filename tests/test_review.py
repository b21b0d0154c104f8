"""Regressions found reviewing the per-batch path, transforms and slots: each test forces
the case that broke, with gates, not sleeps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer
from tests.conftest import start


class Tiny(gpuqueue.Sequence):
    """Fast reads of small batches (they travel in bundles): (array, int label)."""

    def __init__(self, length: int = 40) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return np.full(3, index, np.float32), index


@pytest.fixture
def bundles_of_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read counts as fast: after the first read, tasks are claimed eight at a time."""
    import gpuqueue.host as host

    monkeypatch.setattr(host, "_BUNDLE_BUDGET_S", 10.0)


def test_a_generator_dropped_after_one_batch_loses_none_of_its_bundle(
    running: list[Any], bundles_of_eight: None
) -> None:
    # next(enqueuer.get()) per step: each get() is a new generator, dropped after one
    # batch. The rest of a bundle it took off the queue must reach the next get().
    enqueuer = start(running, OrderedEnqueuer(Tiny(), shard=None, epochs=1), workers=1)
    got = [int(next(enqueuer.get())[1]) for _ in range(40)]
    assert got == list(range(40))
    state = enqueuer.state_dict()
    assert (state["epoch"], state["position"]) == (0, 40)


def test_two_consuming_threads_share_bundles_and_get_every_batch_once(
    running: list[Any], bundles_of_eight: None
) -> None:
    from tests.conftest import Worker

    enqueuer = start(running, OrderedEnqueuer(Tiny(80), shard=None, epochs=1), workers=2)

    def consume() -> list[int]:
        return [int(batch[1]) for batch in enqueuer.get()]

    threads = [Worker(consume, name=f"consumer{n}") for n in range(2)]
    for thread in threads:
        thread.start()
    results = [thread.finish(timeout=20) for thread in threads]
    assert all(thread.error is None for thread in results), [t.error for t in results]
    got = [label for thread in results for label in thread.result]  # type: ignore[attr-defined]
    assert sorted(got) == list(range(80))
