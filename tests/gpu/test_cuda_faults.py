"""Issue 6's faults on a real GPU through CuPy (skipped without one)."""

from __future__ import annotations

import gc
import os
from itertools import islice
from typing import Any

import pytest

from gpuqueue import OrderedEnqueuer, WorkerDiedError
from tests.faults import failing
from tests.seqs import DiesAt, FailsAt, Numbered


def failing_backend(operation: str, at: int) -> Any:
    from gpuqueue.backends.cupy import CupyBackend

    return failing(CupyBackend, operation, at)(0)


@pytest.mark.parametrize(
    ("operation", "at", "before"), [("alloc_pinned", 1, 0), ("alloc_device", 2, 1)]
)
def test_allocation_failures_arrive_in_order(operation: str, at: int, before: int) -> None:
    backend = failing_backend(operation, at)
    enqueuer = OrderedEnqueuer(Numbered(10), device=backend, shard=None)
    enqueuer.start(workers=1)
    try:
        batches = enqueuer.get()
        # Held, so the next batch cannot reuse their arenas: it needs a new one.
        held = [next(batches) for _ in range(before)]
        assert [int(batch[1]["index"]) for batch in held] == list(range(before))
        with pytest.raises(MemoryError, match=rf"^{operation} failed"):
            next(batches)
    finally:
        enqueuer.stop(timeout=10)
        backend.close()


def test_a_source_error_arrives_after_exactly_the_batches_before_it() -> None:
    enqueuer = OrderedEnqueuer(FailsAt(bad_index=4), device=0, shard=None)
    enqueuer.start(workers=3)
    try:
        batches = enqueuer.get()
        assert [int(next(batches)[1]["index"]) for _ in range(4)] == [0, 1, 2, 3]
        with pytest.raises(KeyError, match="cannot read 4"):
            next(batches)
    finally:
        enqueuer.stop(timeout=10)


def test_a_killed_worker_process_feeding_the_gpu_is_a_clear_error() -> None:
    enqueuer = OrderedEnqueuer(
        DiesAt(bad_index=3, how="sigkill"), use_multiprocessing=True, device=0, shard=None
    )
    enqueuer.start(workers=2)
    try:
        batches = enqueuer.get()
        assert [int(next(batches)[1]["index"]) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(WorkerDiedError, match="died with signal SIGKILL"):
            next(batches)
    finally:
        enqueuer.stop(timeout=10)
    assert enqueuer._run.processes.alive() == []
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("psm_")]


def test_an_abandoned_gpu_enqueuer_frees_its_pinned_memory() -> None:
    import weakref

    enqueuer = OrderedEnqueuer(Numbered(), device=0, shard=None)
    enqueuer.start(workers=2)
    list(islice(enqueuer.get(), 3))
    backend = enqueuer._run.backend
    pinned = backend._pinned  # address -> bytes, emptied when the backend is freed
    threads = list(enqueuer._run.threads)
    collected = weakref.ref(backend)
    del enqueuer, backend
    gc.collect()
    for thread in threads:
        thread.join(10)
    gc.collect()
    assert collected() is None and pinned == {}
