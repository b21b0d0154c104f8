"""Engines that users run past one machine, under a real torchrun (gloo, CPU): a Hugging
Face ``datasets.Dataset`` and ``IterableDataset`` and a WebDataset, read per sample with
``batch_size=`` while a DDP model trains on every batch.

Each test launches one torchrun whose script does every check of its case on every rank
and writes what it trained on; the test checks across ranks that every sample is read
once per epoch (padding only where gpuqueue shards, as ``DistributedSampler`` pads), that
epochs reshuffle where a seed asks for it, and that every rank takes as many DDP steps (a
rank with one more would wait for ever in the all-reduce: the test would time out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_distributed import run_torchrun

pytest.importorskip("torch.distributed.run")
pytestmark = pytest.mark.engine  # torchrun launches: left out of CI's CuPy stage

# 25 samples, batches of 4: split by node, 13/12 over 2 ranks (4 and 3 batches an epoch)
# and 9/8/8 over 3 (3, 2 and 2): the ranks' step counts differ, as they do for most lengths.
LENGTH = 25
BATCH = 4


def records(tmp_path: Path, world_size: int) -> list[dict[str, Any]]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]


HF_MAP_SCRIPT = '''
"""One rank: a datasets.Dataset of 25 samples read per sample (batch_size=4) under DDP, 2
epochs, shuffled with a seed: sharded by gpuqueue, then split_dataset_by_node and shard=None."""
import json
import os
import sys
import warnings

import datasets
import numpy as np
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node
from torch.nn.parallel import DistributedDataParallel

import gpuqueue

OUT, LENGTH, BATCH = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
datasets.disable_progress_bars()
samples = datasets.Dataset.from_dict(
    {"x": np.arange(LENGTH, dtype=np.float32)[:, None].repeat(2, axis=1), "y": np.arange(LENGTH)}
).with_format("numpy")
model = DistributedDataParallel(torch.nn.Linear(2, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)


def train(source, shard):
    """The labels of every batch trained on, and gpuqueue's warnings that it shards."""
    trained = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, each time: "once" is what is checked
        with gpuqueue.prefetch(
            source, device="cpu", output="torch", batch_size=BATCH, shuffle=True, seed=7,
            epochs=2, shard=shard,
        ) as batches:
            for batch in batches:
                loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["x"][:, :1])
                loss.backward()  # DDP's all-reduce: every rank must take as many steps
                optimizer.step()
                optimizer.zero_grad()
                trained.append(batch["y"].tolist())
    sharding = [
        str(warning.message)
        for warning in caught
        if warning.category is UserWarning and "pass shard=None" in str(warning.message)
    ]
    return {"batches": trained, "warnings": sharding}


gpuqueue_shards = train(samples, "auto")
part = split_dataset_by_node(samples, rank=rank, world_size=world_size)
split_first = train(part, None)
with open(f"{OUT}/rank{rank}.json", "w") as out:
    json.dump(
        {"auto": gpuqueue_shards, "split": split_first, "part": [int(y) for y in part["y"]]}, out
    )
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


def epochs_of(batches: list[list[int]], per_epoch: int) -> list[list[int]]:
    """The labels of each epoch: ``per_epoch`` batches each."""
    assert len(batches) % per_epoch == 0, batches
    return [
        [label for batch in batches[start : start + per_epoch] for label in batch]
        for start in range(0, len(batches), per_epoch)
    ]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_torchrun_hf_dataset_every_sample_once_whoever_splits_it(
    tmp_path: Path, world_size: int
) -> None:
    pytest.importorskip("datasets")
    agent = ["--nproc-per-node", str(world_size), "--standalone"]
    args = [str(tmp_path), str(LENGTH), str(BATCH)]
    run_torchrun(tmp_path, [agent], args, script_text=HF_MAP_SCRIPT, timeout_s=100)
    ranks = records(tmp_path, world_size)

    # (i) gpuqueue shards: ceil(25 / world_size) samples a rank, as DistributedSampler
    # pads (wrapping around the epoch's order), and says so once, in a UserWarning.
    per_rank = -(-LENGTH // world_size)
    per_epoch = -(-per_rank // BATCH)
    for number, rank in enumerate(ranks):
        assert len(rank["auto"]["warnings"]) == 1, rank["auto"]["warnings"]
        assert f"rank {number} of {world_size} reads its part" in rank["auto"]["warnings"][0]
        assert len(rank["auto"]["batches"]) == 2 * per_epoch  # the same steps on every rank
    epochs = [epochs_of(rank["auto"]["batches"], per_epoch) for rank in ranks]
    for epoch in range(2):
        read = [label for rank in epochs for label in rank[epoch]]
        assert len(read) == per_rank * world_size
        assert sorted(set(read)) == list(range(LENGTH))  # every sample, each once ...
        assert len(read) - len(set(read)) == per_rank * world_size - LENGTH  # ... but the padding
    assert [rank[0] for rank in epochs] != [rank[1] for rank in epochs]  # reshuffled

    # (ii) split by split_dataset_by_node, shard=None: each rank reads its own part (not a
    # part of it) with no warning; its length differs by rank, and every rank stops each
    # epoch at the shortest rank's step, as for an iterable that splits itself.
    parts = [rank["part"] for rank in ranks]
    assert sorted(label for part in parts for label in part) == list(range(LENGTH))
    steps = min(-(-len(part) // BATCH) for part in parts)
    for rank, part in zip(ranks, parts, strict=True):
        assert rank["split"]["warnings"] == []
        assert len(rank["split"]["batches"]) == 2 * steps
        for read in epochs_of(rank["split"]["batches"], steps):
            assert len(read) == len(set(read)) == min(len(part), steps * BATCH)
            assert set(read) <= set(part)
    first, second = (epochs_of(ranks[0]["split"]["batches"], steps)[e] for e in range(2))
    assert first != second  # reshuffled


HF_ITERABLE_SCRIPT = '''
"""One rank of three: a datasets.IterableDataset of 20 samples in 6 shards (4, 4, 3, 3, 3, 3)
split by split_dataset_by_node (2 shards a rank: 7, 7 and 6 samples, or 8, 6 and 6, as the
shards fall in each epoch's shuffle), read per sample (batch_size=2) under DDP for 2 epochs."""
import json
import os
import sys

import datasets
import numpy as np
import torch
import torch.distributed as dist
from datasets.distributed import split_dataset_by_node
from torch.nn.parallel import DistributedDataParallel

import gpuqueue

OUT = sys.argv[1]
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
datasets.disable_progress_bars()
table = datasets.Dataset.from_dict(
    {"x": np.arange(20, dtype=np.float32)[:, None].repeat(2, axis=1), "y": np.arange(20)}
)
stream = table.to_iterable_dataset(num_shards=6).shuffle(seed=3, buffer_size=4)
part = split_dataset_by_node(stream.with_format("numpy"), rank=rank, world_size=world_size)
model = DistributedDataParallel(torch.nn.Linear(2, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

trained = []
run = gpuqueue.prefetch(part, device="cpu", output="torch", batch_size=2, epochs=2)
with run as batches:
    for batch in batches:
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["x"][:, :1])
        loss.backward()  # DDP's all-reduce: a rank with a batch more would wait for ever
        optimizer.step()
        optimizer.zero_grad()
        trained.append([run.state_dict()["epoch"], batch["y"].tolist()])

# Turned off, each rank reads all of its part of an epoch (no DDP step: nothing waits).
with gpuqueue.prefetch(part, device=None, batch_size=2, even_batches=False) as batches:
    read_all = [int(label) for batch in batches for label in batch["y"]]

with open(f"{OUT}/rank{rank}.json", "w") as out:
    json.dump({"trained": trained, "read_all": read_all}, out)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


@pytest.mark.timeout(120)
def test_torchrun_hf_iterable_dataset_split_unevenly_stops_every_rank_at_one_step(
    tmp_path: Path,
) -> None:
    pytest.importorskip("datasets")
    agent = ["--nproc-per-node", "3", "--standalone"]
    run_torchrun(tmp_path, [agent], [str(tmp_path)], script_text=HF_ITERABLE_SCRIPT, timeout_s=100)
    ranks = records(tmp_path, 3)
    # Not sharded again by gpuqueue: one epoch's parts are all 20 samples, unevenly.
    assert len({len(rank["read_all"]) for rank in ranks}) > 1
    assert sorted(label for rank in ranks for label in rank["read_all"]) == list(range(20))
    # 3 steps an epoch on every rank (a 6-sample rank's 3 batches of 2): the longer ranks
    # drop the rest of their epoch, and no all-reduce waits for it.
    for rank in ranks:
        assert [epoch for epoch, _ in rank["trained"]] == [0, 0, 0, 1, 1, 1]
    orders = []
    for epoch in range(2):
        parts = [
            [label for seen, labels in rank["trained"] if seen == epoch for label in labels]
            for rank in ranks
        ]
        read = [label for part in parts for label in part]
        assert len(read) == len(set(read)) == 18  # 3 steps of 2 on 3 ranks, none twice
        orders.append(parts)
    assert orders[0] != orders[1]  # set_epoch: a new shard order and shuffle every epoch


WEBDATASET_SAMPLES_SCRIPT = '''
"""One rank of two: WebDataset samples (no .batched()) in 5 shards of 3, split by node (9
and 6 samples), batched by gpuqueue (batch_size=4) under DDP for 2 epochs."""
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
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

urls = [f"{DATA}/shard-{shard}.tar" for shard in range(5)]
samples = (
    wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    .decode()
    .to_tuple("x.npy", "y.cls")
)
trained = []
with gpuqueue.prefetch(samples, device="cpu", output="torch", batch_size=4, epochs=2) as batches:
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        loss.backward()  # DDP's all-reduce
        optimizer.step()
        optimizer.zero_grad()
        trained.append(y.tolist())

with gpuqueue.prefetch(samples, device=None, batch_size=4, even_batches=False) as batches:
    read_all = [int(label) for _, labels in batches for label in labels]

with open(f"{OUT}/rank{rank}.json", "w") as out:
    json.dump({"trained": trained, "read_all": read_all}, out)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
'''


@pytest.mark.timeout(120)
def test_torchrun_webdataset_samples_batched_by_gpuqueue_on_two_ranks(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    for shard in range(5):
        with wds.TarWriter(str(data / f"shard-{shard}.tar")) as sink:
            for label in range(shard * 3, shard * 3 + 3):
                sink.write(
                    {
                        "__key__": f"{label:04d}",
                        "x.npy": np.full(2, label, np.float32),
                        "y.cls": label,
                    }
                )
    agent = ["--nproc-per-node", "2", "--standalone"]
    args = [str(data), str(tmp_path)]
    run_torchrun(tmp_path, [agent], args, script_text=WEBDATASET_SAMPLES_SCRIPT, timeout_s=100)
    ranks = records(tmp_path, 2)
    # split_by_node deals shard s to rank s % 2: 9 samples (shards 0, 2, 4) and 6 (1, 3).
    assert [rank["read_all"] for rank in ranks] == [
        [*range(0, 3), *range(6, 9), *range(12, 15)],
        [*range(3, 6), *range(9, 12)],
    ]
    # Batches of 4: 3 and 2 an epoch; every rank takes 2 steps an epoch, rank 0 drops its
    # short third batch (sample 14), and each epoch the 14 others are read once.
    assert [len(rank["trained"]) for rank in ranks] == [4, 4]
    for epoch in range(2):
        read = [
            label
            for rank in ranks
            for batch in rank["trained"][2 * epoch : 2 * epoch + 2]
            for label in batch
        ]
        assert sorted(read) == list(range(14))
