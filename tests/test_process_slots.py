"""Worker processes' shared-memory slots: mapped once, lent to the consumer, nothing left over.

With ``device=None`` a delivered batch is the slot itself, lent to the
consumer until the last view of it dies (the worker's write into the slot
is the batch's only copy); these tests hold batches as users do and check
their values, the slots' life cycle, and what each worker process maps.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuqueue import OrderedEnqueuer
from gpuqueue.host import processes as workers_module
from tests.conftest import shared_memory
from tests.seqs import FailsAt, Numbered

pytestmark = pytest.mark.skipif(
    not (os.path.isdir("/proc/self/fd") and os.path.isdir("/dev/shm")),
    reason="needs /proc and POSIX shared memory (Linux)",
)

ROOT = Path(__file__).resolve().parent.parent
SLOTS = 2 + 3 + 1  # workers + max_queue_size + 1


@pytest.fixture
def enqueuers() -> Iterator[list[OrderedEnqueuer]]:
    """Process enqueuers a test starts; afterwards stopped, and nothing of theirs left."""
    made: list[OrderedEnqueuer] = []
    before = shared_memory()
    yield made
    pids = [pid for enqueuer in made for pid in enqueuer.worker_pids]  # type: ignore[attr-defined]
    for enqueuer in made:
        enqueuer.stop(timeout=10)
    gc.collect()
    assert shared_memory() - before == set()
    assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []  # ended and reaped


def started(made: list[OrderedEnqueuer], source: Any, **kwargs: Any) -> OrderedEnqueuer:
    enqueuer = OrderedEnqueuer(source, use_multiprocessing=True, shard=None, **kwargs)
    made.append(enqueuer)
    enqueuer.start(workers=2, max_queue_size=3)
    enqueuer.worker_pids = [p.pid for p in enqueuer._run.processes.processes]  # type: ignore[attr-defined]
    return enqueuer


def segments_mapped(pid: int) -> set[tuple[str, str]]:
    """The shared-memory segments ``pid`` maps now, as (address range, inode) pairs."""
    with open(f"/proc/{pid}/maps") as maps:
        fields = [line.split(None, 5) for line in maps if "/memfd:" in line or "/dev/shm/" in line]
    return {(f[0], f[4]) for f in fields}


def test_each_process_maps_each_slot_once_for_the_whole_run(
    enqueuers: list[OrderedEnqueuer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a process re-opened and faulted in a segment for nearly every batch."""
    sent: list[tuple[int, int, int]] = []  # (process, slot number, segment generation)
    real_send = workers_module.ProcessPool._send_segment

    def counting_send(pool: Any, worker: Any, slot: Any) -> None:
        sent.append((worker.process.pid, slot.number, slot.generation))
        real_send(pool, worker, slot)

    monkeypatch.setattr(workers_module.ProcessPool, "_send_segment", counting_send)
    enqueuer = started(enqueuers, Numbered(length=7, shape=(256, 1024)))
    pids = enqueuer.worker_pids  # type: ignore[attr-defined]
    batches = enqueuer.get()
    for index in range(80):
        batch = next(batches)
        assert float(batch[0][0, 0]) == index % 7
    del batch
    # 80 batches, and each segment went to each process once: it stayed mapped there
    assert len(sent) == len(set(sent)) <= len(pids) * (SLOTS + 4), sent
    for pid in pids:
        mapped = segments_mapped(pid)
        assert 0 < len(mapped) <= SLOTS + 4, mapped
        assert len(mapped) == len({inode for _, inode in mapped})  # no segment mapped twice


def test_many_held_batches_stay_true_and_their_slots_go_back_when_dropped(
    enqueuers: list[OrderedEnqueuer],
) -> None:
    enqueuer = started(enqueuers, Numbered(length=7, shape=(64, 64)))
    pool = enqueuer._run.processes._slots
    batches = enqueuer.get()
    held = list(islice(batches, 40))  # far more than the pool's slots: they are lent
    for position, (x, extra) in enumerate(held):
        assert int(extra["index"]) == position % 7
        assert x.shape == (64, 64) and np.all(x == position % 7), position
    assert pool.slots >= 40  # each held batch is a slot of its own, none overwritten
    del held, x, extra
    gc.collect()
    for _ in range(3 * SLOTS):  # later reads take the returned slots back, or retire them
        next(batches)
    assert pool.slots <= SLOTS + 4
    for process in enqueuer._run.processes.processes:  # and the processes unmapped them
        assert len(segments_mapped(process.pid)) <= SLOTS + 4


def test_a_batch_outlives_its_run(enqueuers: list[OrderedEnqueuer]) -> None:
    enqueuer = started(enqueuers, Numbered(length=4, shape=(128, 128)))
    kept = list(islice(enqueuer.get(), 6))
    enqueuer.stop(timeout=10)
    assert enqueuer._run is None or enqueuer._run.processes.alive() == []
    # The slots' memory now lives only with these batches, and stays true.
    assert [float(x[0, 0]) for x, _ in kept] == [0, 1, 2, 3, 0, 1]
    assert all(np.all(x == float(x[0, 0])) for x, _ in kept)
    del kept


def test_a_failure_while_batches_are_held_leaves_nothing_once_they_are_dropped(
    enqueuers: list[OrderedEnqueuer],
) -> None:
    enqueuer = started(enqueuers, FailsAt(bad_index=5, length=8))
    batches = enqueuer.get()
    held = [next(batches) for _ in range(5)]
    with pytest.raises(KeyError, match=r"cannot read 5"):
        next(batches)
    assert not enqueuer.is_running()
    assert [int(extra["index"]) for _, extra in held] == [0, 1, 2, 3, 4]
    assert all(np.all(x == i) for i, (x, _) in enumerate(held))
    del held  # the fixture checks that nothing is left


def test_torch_dataset_tensors_from_processes_stay_true_while_held(
    enqueuers: list[OrderedEnqueuer],
) -> None:
    torch = pytest.importorskip("torch")
    from tests.user_sources import TorchImages

    enqueuer = started(enqueuers, TorchImages(length=5))
    held = list(islice(enqueuer.get(), 12))
    for position, (images, labels) in enumerate(held):
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
        assert torch.equal(images, torch.full((4, 3, 32, 32), position % 5, dtype=torch.uint8))
        assert labels.tolist() == [position % 5] * 4
    # a tensor the user writes to is theirs alone: later batches do not change it
    held[0][0].add_(100)
    assert int(held[0][0][0, 0, 0, 0]) == 100 and int(held[5][0][0, 0, 0, 0]) == 0
    del held, images, labels


KERAS_SCRIPT = textwrap.dedent(
    """
    import json
    import keras
    import numpy as np
    import gpuqueue

    class LooseImages(keras.utils.PyDataset):
        # As Keras users write batches: (x, [labels], None), and a short last batch.
        def __init__(self):
            super().__init__()

        def __len__(self):
            return 3

        def __getitem__(self, index):
            rows = 2 if index == 2 else 4
            return np.full((rows, 8, 8, 3), index, np.float32), [index] * rows, None

    if __name__ == "__main__":
        enqueuer = gpuqueue.OrderedEnqueuer(LooseImages(), use_multiprocessing=True, shard=None)
        enqueuer.start(workers=2, max_queue_size=3)
        batches = enqueuer.get()
        held = [next(batches) for _ in range(9)]
        enqueuer.stop()
        print(json.dumps([
            {
                "x_shape": list(x.shape),
                "x_true": bool(np.all(x == i % 3)),
                "labels": labels,
                "labels_type": type(labels).__name__,
                "weights": weights,
            }
            for i, (x, labels, weights) in enumerate(held)
        ]))
    """
)


@pytest.mark.engine
@pytest.mark.timeout(120)
def test_a_keras_pydataset_with_list_labels_and_no_weights_through_processes() -> None:
    if importlib.util.find_spec("keras") is None:
        pytest.skip("needs keras")
    backend = "torch" if importlib.util.find_spec("torch") else "numpy"
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", KERAS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert [b["x_shape"] for b in got] == [[4, 8, 8, 3], [4, 8, 8, 3], [2, 8, 8, 3]] * 3
    assert all(b["x_true"] for b in got)
    assert [b["labels"] for b in got] == [[0] * 4, [1] * 4, [2] * 2] * 3
    assert {b["labels_type"] for b in got} == {"list"}
    assert [b["weights"] for b in got] == [None] * 9


def test_the_consumer_copies_nothing_out_of_a_slot(enqueuers: list[OrderedEnqueuer]) -> None:
    """The delivered array is a view of the shared-memory slot the worker wrote."""
    enqueuer = started(enqueuers, Numbered(length=3, shape=(32, 32)))
    x, _ = next(iter(enqueuer.get()))
    slots = enqueuer._run.processes._slots._all.values()
    inside = [
        s
        for s in slots
        if s.capacity and s.array.ctypes.data <= x.ctypes.data < s.array.ctypes.data + s.capacity
    ]
    assert len(inside) == 1
    del x, inside


def test_held_batches_do_not_each_hold_a_descriptor(enqueuers: list[OrderedEnqueuer]) -> None:
    """Regression: every lent slot kept its segment's descriptor open while held, so a
    consumer holding an epoch (``list(enqueuer.get())``) ran out of descriptors."""
    before = shared_memory()
    enqueuer = started(enqueuers, Numbered(length=7, shape=(16, 16)))
    batches = enqueuer.get()
    held = list(islice(batches, 60))
    opened = shared_memory() - before
    assert len(opened) <= 2 * (SLOTS + 2), f"{len(opened)} descriptors for 60 held batches"
    for position, (x, extra) in enumerate(held):
        assert int(extra["index"]) == position % 7 and np.all(x == position % 7), position
    del held, x, extra
    gc.collect()
    for position in range(60, 60 + 4 * SLOTS):  # slots come back, or retire, and stay true
        x, extra = next(batches)
        assert int(extra["index"]) == position % 7 and np.all(x == position % 7), position
    assert enqueuer._run.processes._slots.slots <= SLOTS + 4
