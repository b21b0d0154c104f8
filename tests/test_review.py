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
    import gpuqueue.host.bundles as host

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


def test_plan_split_in_two_threads_never_pairs_leaves_with_another_layout() -> None:
    # Forced interleaving: one worker splits a short batch (a new layout) and is paused
    # right after its first write to the plan; another splits a full batch meanwhile.
    # Each must get the layout of its own leaves: a short batch packed under the full
    # layout is broadcast into it (rows repeated), silently.
    import threading

    from gpuqueue.batch.layout import layout
    from gpuqueue.batch.plan import Plan
    from gpuqueue.batch.tree import describe
    from tests.conftest import Worker

    full = (np.zeros((2, 3), np.float32), np.int64(0))
    short = (np.ones((1, 3), np.float32), np.int64(1))
    treedef, leaves = describe(full)
    plan = Plan.of(full, treedef, leaves, *layout(leaves))
    assert plan is not None
    paused, go = threading.Event(), threading.Event()
    pausing: list[threading.Thread] = []

    class PausedPlan(Plan):
        def __setattr__(self, name: str, value: Any) -> None:
            super().__setattr__(name, value)
            if pausing and threading.current_thread() is pausing[0] and not paused.is_set():
                paused.set()
                go.wait(timeout=10)

    plan.__class__ = PausedPlan
    worker = Worker(plan.split, short, name="short-batch")
    pausing.append(worker)
    worker.start()
    assert paused.wait(timeout=10)
    try:
        result = plan.split(full)
    finally:
        go.set()
        worker.finish()
    for split in (result, worker.result):
        assert split is not None
        got, metas, nbytes = split  # type: ignore[misc]
        assert [meta.shape for meta in metas] == [array.shape for _, array in got]
        assert nbytes >= metas[-1].offset + got[-1][1].nbytes


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_python_int_numpy_cannot_hold_is_refused_after_many_alike(
    running: list[Any], device: str | None
) -> None:
    # The first batches make a plan; a label past int64 (an object array) must get the
    # general path's clear error, as it would as the first batch.
    from gpuqueue.errors import BatchError

    class BigLabel(Tiny):
        def __getitem__(self, index: int) -> Any:
            x, y = super().__getitem__(index)
            return x, (2**70 if index == 5 else y)

    enqueuer = start(running, OrderedEnqueuer(BigLabel(), shard=None, device=device), workers=1)
    batches = enqueuer.get()
    assert [int(next(batches)[1]) for _ in range(5)] == list(range(5))
    with pytest.raises(BatchError, match=r"field \[1\] has dtype object"):
        next(batches)


def test_stop_inside_the_loop_ends_it_even_mid_bundle(
    running: list[Any], bundles_of_eight: None
) -> None:
    # get()'s promise: stop() ends the iteration. The rest of the bundle the loop's
    # batch came in must not be delivered after it.
    enqueuer = start(running, OrderedEnqueuer(Tiny(), shard=None), workers=1)
    got = []
    for batch in enqueuer.get():
        got.append(int(batch[1]))
        if len(got) == 10:
            enqueuer.stop()
    assert got == list(range(10))


def test_a_failed_copy_in_get_at_depth_0_gives_its_pinned_slot_back(running: list[Any]) -> None:
    # prefetch_depth=0 copies in get(); a copy that raises there must return the batch's
    # pinned slot (as the copy looper does), or stop() can never free it.
    from gpuqueue.backends.numpy import NumpyBackend

    class Copies(NumpyBackend):
        shares_host_memory = False  # a device of its own: every batch is copied

        def __init__(self) -> None:
            self.pinned: set[int] = set()
            self.copies = 0

        def alloc_pinned(self, nbytes: int) -> np.ndarray:
            buffer = super().alloc_pinned(nbytes)
            self.pinned.add(id(buffer))
            return buffer

        def free_pinned(self, buffer: np.ndarray) -> None:
            self.pinned.discard(id(buffer))

        def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
            self.copies += 1
            if self.copies == 3:
                raise MemoryError("the device is full")
            super().copy_to_device(dst, src, nbytes, stream)

    backend = Copies()
    enqueuer = OrderedEnqueuer(Tiny(), device=backend, prefetch_depth=0, shard=None)
    start(running, enqueuer, workers=1)
    batches = enqueuer.get()
    held = [next(batches), next(batches)]
    with pytest.raises(MemoryError, match="the device is full"):
        next(batches)
    enqueuer.stop()
    assert [int(batch[1]) for batch in held] == [0, 1]
    assert backend.pinned == set(), "a pinned slot was never freed"
