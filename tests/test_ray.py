"""Ray Data as users run it: a Dataset, and the splits Ray Train hands each worker."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from gpuqueue import BatchTimeoutError, PipelineError, prefetch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

pytestmark = pytest.mark.engine  # a local Ray cluster: left out of CI's CuPy stage


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        # Ray's objects left in reference cycles (a run's iterator of a split) go while Ray
        # is up: collected after shutdown, their finalisers start Ray's threads again.
        gc.collect()
        ray.shutdown()


@pytest.mark.timeout(120)
def test_a_ray_dataset_is_read_through_iter_batches_epoch_after_epoch() -> None:
    dataset = ray.data.range(600)
    with prefetch(dataset, device=None, epochs=2) as batches:
        read = [batch["id"] for batch in batches]
    assert all(isinstance(ids, np.ndarray) for ids in read)
    assert [len(ids) for ids in read] == [256, 256, 88, 256, 256, 88]  # Ray's default size
    for epoch in range(2):
        assert sorted(np.concatenate(read[epoch * 3 : epoch * 3 + 3]).tolist()) == list(range(600))


@pytest.mark.timeout(120)
def test_the_splits_of_streaming_split_each_read_their_share() -> None:
    splits = ray.data.range(400).streaming_split(2, equal=True)
    read: list[list[int]] = [[], []]

    def consume(rank: int) -> None:
        with prefetch(splits[rank], device="cpu") as batches:
            for batch in batches:
                read[rank] += np.asarray(batch["id"]).tolist()

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert not any(thread.is_alive() for thread in threads)
    assert len(read[0]) == len(read[1]) == 200  # equal=True: as many on each
    assert sorted(read[0] + read[1]) == list(range(400))  # each row once, across the splits


def test_a_ray_dataset_with_processes_is_a_clear_error() -> None:
    dataset: Any = ray.data.range(4)
    with (
        pytest.raises(PipelineError, match=r"^use_multiprocessing=True cannot take a Dataset"),
        prefetch(dataset, device=None, use_multiprocessing=True),
    ):
        pass


@pytest.mark.timeout(120)
def test_a_ray_dataset_resumes_after_the_last_batch_received() -> None:
    """Ray keeps no reading state: the epoch is read again and what was received skipped,
    which is exact where Ray's order is (``preserve_order``, as the README says)."""
    context = ray.data.DataContext.get_current()
    kept = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        dataset = ray.data.range(600, override_num_blocks=6).random_shuffle(seed=1)
        with prefetch(dataset, device=None, epochs=2) as batches:
            whole = [batch["id"].tolist() for batch in batches]
        run = prefetch(dataset, device=None, epochs=2)
        with run as batches:
            first = [next(batches)["id"].tolist() for _ in range(4)]  # batch 1 of epoch 1
            state = run.state_dict()
        with prefetch(dataset, device=None, epochs=2, state=state) as batches:
            rest = [batch["id"].tolist() for batch in batches]
    finally:
        context.execution_options.preserve_order = kept
    assert first + rest == whole
    assert sorted(i for batch in whole[3:] for i in batch) == list(range(600))


@pytest.mark.timeout(120)
def test_a_split_whose_sibling_is_never_read_times_out_and_the_block_ends_at_once() -> None:
    """The issue's hang: Ray starts an epoch of streaming_split once every split is read."""
    splits = ray.data.range(400).streaming_split(2, equal=True)
    started = time.monotonic()
    with (
        pytest.warns(RuntimeWarning, match=r"after a batch timeout, threads left running"),
        pytest.raises(BatchTimeoutError, match=r"no batch arrived within 1\.0 s"),
        prefetch(splits[0], device=None, timeout=1.0) as batches,
    ):
        for _ in batches:
            pass
    assert time.monotonic() - started < 1.0 + 2.0  # the timeout, then the exit: no wait
    # Reading the other split lets Ray go on, and the reader left in next() ends with it.
    assert sum(len(batch["id"]) for batch in splits[1].iter_batches()) == 200
