"""Iterable sources as users run them past one machine: epochs that reshuffle (``set_epoch``),
a handle with ``stats()`` and ``state_dict()``, and a source that never yields."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import BatchTimeoutError, prefetch
from tests.seqs import Numbered


class EpochRecorder:
    """A re-iterable source with a ``set_epoch``, as torch and Hugging Face datasets have."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.calls.append(epoch)
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        for position in range(3):
            yield np.array([self.epoch, position])


def test_epochs_call_set_epoch_before_each_epoch() -> None:
    source = EpochRecorder()
    with prefetch(source, device=None, epochs=3) as batches:
        read = [tuple(int(v) for v in batch) for batch in batches]
    assert source.calls == [0, 1, 2]
    assert read == [(epoch, position) for epoch in range(3) for position in range(3)]


@pytest.mark.parametrize("epochs", [None, 1])
def test_one_pass_leaves_the_epoch_to_the_caller(epochs: int | None) -> None:
    """A loop that calls ``sampler.set_epoch(epoch)`` itself around one pass keeps its epoch."""
    source = EpochRecorder()
    source.set_epoch(7)
    with prefetch(source, device=None, epochs=epochs) as batches:
        read = [int(batch[0]) for batch in batches]
    assert source.calls == [7]
    assert read == [7, 7, 7]


def test_a_dataloaders_distributed_sampler_reshuffles_every_epoch() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    data = TensorDataset(torch.arange(16))
    sampler = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=3)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    with prefetch(loader, device=None, epochs=3) as batches:
        read = [batch[0].tolist() for batch in batches]
    epochs = [read[2 * e] + read[2 * e + 1] for e in range(3)]
    expected = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        expected.append(list(iter(sampler)))
    assert epochs == expected  # what a loop calling set_epoch(epoch) itself reads
    assert len({tuple(order) for order in epochs}) == 3  # a new order every epoch
    assert sampler.epoch == 2


class NeverYields:
    """An iterable whose ``next()`` blocks until released (an unconsumed Ray split, say)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        yield np.zeros(2)
        self.release.wait()  # the test releases it afterwards, so no thread outlives it
        return


def test_a_source_that_never_yields_times_out_and_the_block_ends_within_a_second() -> None:
    source = NeverYields()
    started = time.monotonic()
    with (
        pytest.warns(
            RuntimeWarning,
            match=r"after a batch timeout, threads left running as daemons.*"
            r"worker0 \(the next item \(a generator's next\(\)",
        ),
        pytest.raises(BatchTimeoutError, match=r"no batch arrived within 0\.5 s"),
        prefetch(source, device=None, timeout=0.5) as batches,
    ):
        for _ in batches:
            pass
    # The timeout, then the exit: the reader stuck in next() is named, not waited for.
    assert time.monotonic() - started < 0.5 + 2.0
    source.release.set()


def test_prefetch_returns_a_handle_with_stats() -> None:
    run = prefetch([np.zeros(2)] * 3, device=None, epochs=1)
    assert isinstance(run, gpuqueue.Prefetched)
    with run as batches:
        assert isinstance(batches, types.GeneratorType)  # as before: Keras's fit takes it
        assert next(batches).shape == (2,)
        assert run.stats()["batches_consumed"] == 1
        assert len(list(batches)) == 2
        assert run.stats()["batches_consumed"] == 3


class Items:
    """A re-iterable source without a state of its own: ``count`` items per epoch."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __iter__(self) -> Iterator[Any]:
        for position in range(self.count):
            yield np.array([position])


def test_an_iterable_resumes_with_the_item_after_the_last_received() -> None:
    run = prefetch(Items(5), device=None, epochs=2, max_queue_size=4)
    with run as batches:
        first = [int(next(batches)[0]) for _ in range(7)]
        state = run.state_dict()  # the workers have read further ahead
    assert state == {"epoch": 1, "position": 2, "source": None}
    with prefetch(Items(5), device=None, epochs=2, state=state) as batches:
        rest = [int(batch[0]) for batch in batches]
    assert first + rest == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]


class Counter:
    """A source that keeps its own reading state (``state_dict``), as HF's IterableDataset."""

    def __init__(self, count: int) -> None:
        self.count, self.next = count, 0
        self.six_read = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        while self.next < self.count:
            self.next += 1
            if self.next == 6:
                self.six_read.set()
            yield np.array([self.next - 1])

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next = state["next"]


def test_a_sources_own_state_is_the_one_after_the_last_item_received() -> None:
    source = Counter(20)
    run = prefetch(source, device=None, max_queue_size=8)
    with run as batches:
        first = [int(next(batches)[0]) for _ in range(3)]
        assert source.six_read.wait(10)  # the workers have read ahead of the consumer...
        state = run.state_dict()
    assert state == {"epoch": 0, "position": 3, "source": {"next": 3}}  # ...not in the state
    with prefetch(Counter(20), device=None, state=state) as batches:
        rest = [int(batch[0]) for batch in batches]
    assert first + rest == list(range(20))


class OneStateDict(Counter):
    """Returns, and updates in place, the one state dict it was loaded with (litdata's
    ``StreamingDataset`` does so after ``load_state_dict``)."""

    def state_dict(self) -> dict[str, int]:
        self.loaded["next"] = self.next
        return self.loaded

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loaded = state
        self.next = state["next"]


def test_a_state_the_source_updates_in_place_is_still_the_last_received() -> None:
    saved = {"epoch": 0, "position": 3, "source": {"next": 3}}
    source = OneStateDict(20)
    run = prefetch(source, device=None, max_queue_size=8, state=saved)
    with run as batches:
        first = [int(next(batches)[0]) for _ in range(2)]
        assert source.six_read.wait(10)  # the workers have read ahead of the consumer
        state = run.state_dict()
    assert first == [3, 4]
    assert state["source"] == {"next": 5}  # what was received, not what was read ahead
    assert saved == {"epoch": 0, "position": 3, "source": {"next": 3}}  # not changed


class OwnIterator:
    """Samples of a source that is its own iterator and starts over in ``__iter__``, as
    litdata's ``StreamingDataset``; its ``state_dict`` needs arguments, as Mosaic's."""

    def __init__(self, count: int) -> None:
        self.count, self.next, self.epoch = count, 0, 0
        self.starts = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> OwnIterator:
        self.next, self.starts = 0, self.starts + 1
        return self

    def __next__(self) -> Any:
        if self.next == self.count:
            raise StopIteration
        self.next += 1
        return np.array([self.epoch, self.next - 1])

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, int]:
        raise AssertionError("gpuqueue has no such arguments to give; it must not call this")


def test_a_source_that_is_its_own_iterator_is_started_once_a_pass() -> None:
    source = OwnIterator(7)
    with prefetch(source, device=None, batch_size=3) as batches:
        read = [int(sample[1]) for batch in batches for sample in batch]
    assert read == list(range(7))  # not the first 3 again and again: iter() was called once
    assert source.starts == 1


def test_a_torch_iterable_dataset_that_is_its_own_iterator_is_read_every_epoch() -> None:
    torch = pytest.importorskip("torch")

    class Samples(OwnIterator, torch.utils.data.IterableDataset):  # type: ignore[misc]
        pass

    source = Samples(7)  # its __next__ does not make it a one-shot iterator (a generator)
    with prefetch(source, device=None, batch_size=3, epochs=2) as batches:
        read = [tuple(int(v) for v in sample) for batch in batches for sample in batch]
    assert read == [(epoch, position) for epoch in range(2) for position in range(7)]
    assert source.starts == 2


def test_a_state_dict_that_needs_arguments_resumes_by_reading_the_epoch_again() -> None:
    run = prefetch(OwnIterator(7), device=None)
    with run as batches:
        first = [int(next(batches)[1]) for _ in range(3)]
        state = run.state_dict()
    assert state == {"epoch": 0, "position": 3, "source": None}
    with prefetch(OwnIterator(7), device=None, state=state) as batches:
        rest = [int(batch[1]) for batch in batches]
    assert first + rest == list(range(7))


def test_a_sequence_resumes_through_prefetch() -> None:
    run = prefetch(Numbered(length=6), device=None, epochs=2, shuffle=True, seed=1)
    with run as batches:
        first = [int(next(batches)[1]["index"]) for _ in range(4)]
        state = run.state_dict()
    assert (state["epoch"], state["position"]) == (0, 4)
    options = {"device": None, "epochs": 2, "shuffle": True, "seed": 1, "state": state}
    with prefetch(Numbered(length=6), **options) as batches:
        rest = [int(batch[1]["index"]) for batch in batches]
    assert sorted(first + rest[:2]) == list(range(6))
    assert sorted(rest[2:]) == list(range(6))


def test_state_dict_of_an_iterable_read_in_a_process_says_why_not() -> None:
    from gpuqueue import GeneratorEnqueuer, PipelineError

    enqueuer = GeneratorEnqueuer(Items(3), use_multiprocessing=True)
    with pytest.raises(PipelineError, match=r"^an iterable's state_dict\(\) needs use_multi"):
        enqueuer.state_dict()


# -- uneven ranks under a real torchrun ----------------------------------------------


@pytest.mark.parametrize(
    ("shard", "even_batches", "evened"),
    [
        ("auto", None, False),
        (None, None, True),
        (None, False, False),
        ("auto", True, True),
        ((0, 1), None, False),  # rank 0 alone reads all (as an elastic resume on fewer ranks)
    ],
)
def test_a_map_style_source_gpuqueue_did_not_split_stops_every_rank_at_one_step(
    monkeypatch: pytest.MonkeyPatch,
    shard: str | tuple[int, int] | None,
    even_batches: bool | None,
    evened: bool,
) -> None:
    """Under 2 ranks, shard=None (split_dataset_by_node's parts, 13 and 12 samples) is evened
    by default, as an iterable is; a Sequence gpuqueue shards is even already."""
    from gpuqueue.consumer.even import evened as even
    from gpuqueue.source.order import ReadingOrder
    from tests.test_distributed import fake_torch_distributed

    monkeypatch.setitem(sys.modules, "torch.distributed", fake_torch_distributed(1, 2))
    order = ReadingOrder.of(
        Numbered(length=4), shuffle=False, seed=None, shard=shard, drop_last=False, epochs=1
    )
    batches: Iterator[Any] = iter([])
    assert (even(batches, even_batches, order) is not batches) is evened


UNEVEN_SCRIPT = '''
"""One rank of three: an iterable that shards itself unevenly (7/7/6 items), DDP steps."""
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gpuqueue

OUT = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = DistributedDataParallel(torch.nn.Linear(3, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)


class OwnShards:
    """As 20 WebDataset shards split by node: 7, 7 and 6 batches."""

    def __iter__(self):
        for i in range(7 if rank < 2 else 6):
            yield np.full((2, 3), i, np.float32), np.zeros((2, 1), np.float32)


trained = 0
with gpuqueue.prefetch(OwnShards(), device="cpu", output="torch", epochs=2) as batches:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP's all-reduce: a rank with one batch more would wait for ever
        optimizer.step()
        optimizer.zero_grad()
        trained += 1

# Turned off, each rank reads all of its own (no DDP step here, so nothing waits).
with gpuqueue.prefetch(OwnShards(), device=None, even_batches=False) as batches:
    read_all = sum(1 for _ in batches)

with open(f"{OUT}/rank{rank}.json", "w") as out:
    json.dump({"trained": trained, "read_all": read_all}, out)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


@pytest.mark.engine
@pytest.mark.timeout(180)
def test_torchrun_three_uneven_ranks_stop_at_the_same_step(tmp_path: Any) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("torch.distributed.run")
    import json

    from tests.test_distributed import run_torchrun

    agent = ["--nproc-per-node", "3", "--standalone"]
    run_torchrun(tmp_path, [agent], [str(tmp_path)], script_text=UNEVEN_SCRIPT, timeout_s=150)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    # The shortest rank's 6, in each of 2 epochs: each epoch ends, on every rank, at the
    # step where rank 2 has no 7th batch (ranks 0 and 1 drop their 7th).
    assert [record["trained"] for record in records] == [12, 12, 12]
    assert [record["read_all"] for record in records] == [7, 7, 6]


WEBDATASET_SCRIPT = '''
"""One rank of three: WebDataset split by node (20 shards: 7, 7, 6), DDP steps, 2 epochs."""
import json
import os
import sys

import torch
import torch.distributed as dist
import webdataset as wds
from torch.nn.parallel import DistributedDataParallel

import gpuqueue

DATA, OUT = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = DistributedDataParallel(torch.nn.Linear(2, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

urls = [f"{DATA}/shard-{shard:02d}.tar" for shard in range(20)]
dataset = (
    wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    .decode()
    .to_tuple("x.npy", "y.cls")
    .batched(2)  # 2 samples a shard: one batch per shard
)
seen = []
with gpuqueue.prefetch(dataset, device="cpu", output="torch", epochs=2) as batches:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y.float()[:, None])
        loss.backward()  # DDP's all-reduce
        optimizer.step()
        optimizer.zero_grad()
        seen.append(y.tolist())
with open(f"{OUT}/rank{rank}.json", "w") as out:
    json.dump({"seen": seen}, out)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


@pytest.mark.engine
@pytest.mark.timeout(180)
def test_torchrun_webdataset_split_by_node_unevenly_trains_to_the_end(tmp_path: Any) -> None:
    pytest.importorskip("torch.distributed.run")
    wds = pytest.importorskip("webdataset")
    import json

    from tests.test_distributed import run_torchrun

    data = tmp_path / "data"
    data.mkdir()
    for shard in range(20):
        with wds.TarWriter(str(data / f"shard-{shard:02d}.tar")) as sink:
            for sample in range(2):
                label = shard * 2 + sample
                sink.write(
                    {
                        "__key__": f"{label:04d}",
                        "x.npy": np.full(2, label, np.float32),
                        "y.cls": label,
                    }
                )
    agent = ["--nproc-per-node", "3", "--standalone"]
    run_torchrun(
        tmp_path,
        [agent],
        [str(data), str(tmp_path)],
        script_text=WEBDATASET_SCRIPT,
        timeout_s=150,
    )
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text())["seen"] for r in range(3)]
    assert [len(batches) for batches in seen] == [12, 12, 12]  # 6 steps an epoch, everywhere
    for epoch in range(2):
        labels = sorted(
            label for rank in seen for batch in rank[epoch * 6 : epoch * 6 + 6] for label in batch
        )
        # Each rank's first 6 shards (split_by_node deals shard s to rank s % 3), each once;
        # ranks 0 and 1 drop their 7th (shards 18 and 19), which rank 2 has no match for.
        assert labels == list(range(36))
