"""Sharding among ranks, where the rank comes from, and one GPU per local rank."""

from __future__ import annotations

import logging
import sys
import types
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer, PipelineError, backends
from gpuqueue.distributed import (
    LOCAL_RANK_VARIABLES,
    RANK_VARIABLES,
    Shard,
    local_rank,
    reads_by_index,
    resolve_shard,
)
from tests.conftest import start
from tests.seqs import Numbered


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher's variables, and no torch.distributed process group, in this test."""
    for pair in RANK_VARIABLES:
        for name in pair:
            monkeypatch.delenv(name, raising=False)
    for name in LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    return monkeypatch


def fake_torch_distributed(
    rank: int, world_size: int, *, initialized: bool = True, available: bool = True
) -> types.ModuleType:
    """A stand-in for ``torch.distributed`` with the four calls gpuqueue makes."""
    module = types.ModuleType("torch.distributed")
    module.is_available = lambda: available  # type: ignore[attr-defined]
    module.is_initialized = lambda: initialized  # type: ignore[attr-defined]
    module.get_rank = lambda: rank  # type: ignore[attr-defined]
    module.get_world_size = lambda: world_size  # type: ignore[attr-defined]
    return module


# -- where the rank comes from --------------------------------------------------


def test_explicit_and_no_shard(no_launcher: pytest.MonkeyPatch) -> None:
    assert resolve_shard(None) == Shard(0, 1, "none")
    assert resolve_shard((2, 4)) == Shard(2, 4, "explicit")
    assert resolve_shard((2, 4)).pair == (2, 4)
    assert resolve_shard("auto") == Shard(0, 1, "none found")


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ((4, 4), r"^shard needs 0 <= rank < world_size, got rank=4, world_size=4$"),
        ((0, 0), r"^shard needs 0 <= rank < world_size, got rank=0, world_size=0$"),
        ((0.5, 2), r"^shard must hold two ints, got \(0.5, 2\)$"),
        ((True, 2), r"^shard must hold two ints, got \(True, 2\)$"),
        ([0, 2], r"^shard must be \(rank, world_size\), None or 'auto', got \[0, 2\]$"),
        ("rank0", r"^shard must be \(rank, world_size\), None or 'auto', got 'rank0'$"),
    ],
)
def test_malformed_shards_are_rejected(shard: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_shard(shard)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rank_name", "size_name"), RANK_VARIABLES)
def test_each_launchers_variables_are_read(
    no_launcher: pytest.MonkeyPatch, rank_name: str, size_name: str
) -> None:
    no_launcher.setenv(rank_name, "1")
    no_launcher.setenv(size_name, "3")
    assert resolve_shard("auto") == Shard(1, 3, f"{rank_name}/{size_name}")
    no_launcher.delenv(size_name)  # half a pair is not a launcher
    assert resolve_shard("auto") == Shard(0, 1, "none found")


def test_launchers_are_tried_in_order(no_launcher: pytest.MonkeyPatch) -> None:
    for value, (rank_name, size_name) in enumerate(reversed(RANK_VARIABLES)):
        no_launcher.setenv(rank_name, str(value))
        no_launcher.setenv(size_name, "8")
        assert resolve_shard("auto") == Shard(value, 8, f"{rank_name}/{size_name}")
    assert resolve_shard("auto").source == "RANK/WORLD_SIZE"  # torchrun's come first


@pytest.mark.parametrize(
    ("rank", "size"), [("two", "4"), ("4", "4"), ("-1", "4"), ("0", "0"), ("0", "")]
)
@pytest.mark.parametrize(("rank_name", "size_name"), RANK_VARIABLES)
def test_bad_launcher_values_name_the_variables(
    no_launcher: pytest.MonkeyPatch, rank_name: str, size_name: str, rank: str, size: str
) -> None:
    no_launcher.setenv(rank_name, rank)
    no_launcher.setenv(size_name, size)
    with pytest.raises(
        ValueError,
        match=rf"^{rank_name}='{rank}' and {size_name}='{size}' must be integers "
        rf"with 0 <= {rank_name} < {size_name}$",
    ):
        resolve_shard("auto")


def test_an_initialised_process_group_comes_before_the_launcher(
    no_launcher: pytest.MonkeyPatch,
) -> None:
    no_launcher.setenv("RANK", "0")
    no_launcher.setenv("WORLD_SIZE", "2")
    no_launcher.setitem(sys.modules, "torch.distributed", fake_torch_distributed(3, 5))
    assert resolve_shard("auto") == Shard(3, 5, "torch.distributed")
    assert resolve_shard((0, 2)) == Shard(0, 2, "explicit")  # an explicit shard wins
    assert resolve_shard(None) == Shard(0, 1, "none")


@pytest.mark.parametrize(
    "dist",
    [
        fake_torch_distributed(3, 5, initialized=False),
        fake_torch_distributed(3, 5, available=False),
    ],
)
def test_a_process_group_not_set_up_is_skipped(
    no_launcher: pytest.MonkeyPatch, dist: types.ModuleType
) -> None:
    no_launcher.setitem(sys.modules, "torch.distributed", dist)
    assert resolve_shard("auto") == Shard(0, 1, "none found")
    no_launcher.setenv("PMI_RANK", "1")
    no_launcher.setenv("PMI_SIZE", "2")
    assert resolve_shard("auto") == Shard(1, 2, "PMI_RANK/PMI_SIZE")


def test_local_rank_variables(no_launcher: pytest.MonkeyPatch) -> None:
    assert local_rank() is None
    for value, name in enumerate(reversed(LOCAL_RANK_VARIABLES)):
        no_launcher.setenv(name, str(value))
        assert local_rank() == (name, value)
    assert local_rank() == ("LOCAL_RANK", 3)  # torchrun's comes first
    no_launcher.setenv("LOCAL_RANK", "-1")
    with pytest.raises(ValueError, match=r"^LOCAL_RANK='-1' must be an integer >= 0"):
        local_rank()
    no_launcher.setenv("LOCAL_RANK", "gpu1")
    with pytest.raises(ValueError, match=r"^LOCAL_RANK='gpu1' must be an integer >= 0"):
        local_rank()


# -- the enqueuer's side: stats, the log line, drop_last, resuming ---------------


def test_stats_and_the_first_log_line_say_which_rank_and_from_where(
    running: list[Any], no_launcher: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_launcher.setitem(sys.modules, "torch.distributed", fake_torch_distributed(1, 3))
    caplog.set_level(logging.INFO, logger="gpuqueue")
    enqueuer = start(running, OrderedEnqueuer(Numbered(10), shuffle=True, seed=0))
    assert caplog.messages[0] == (
        "OrderedEnqueuer: rank 1 of 3 reads 4 of 10 batches per epoch "
        "(from torch.distributed), 2 padded by wrapping around the epoch's order"
    )
    stats = enqueuer.stats()
    assert (stats["shard_rank"], stats["shard_world_size"]) == (1, 3)
    assert stats["shard_source"] == "torch.distributed"


@pytest.mark.parametrize(
    ("options", "line"),
    [
        ({"shard": None}, "reads all 10 batches per epoch (not sharded: shard=None)"),
        (
            {"shard": "auto"},
            "reads all 10 batches per epoch (not sharded: no process group or launcher found)",
        ),
        ({"shard": (0, 5)}, "rank 0 of 5 reads 2 of 10 batches per epoch (from explicit)"),
        (
            {"shard": (2, 4), "drop_last": True},
            "rank 2 of 4 reads 2 of 10 batches per epoch (from explicit), last 2 of the "
            "epoch's order dropped (drop_last=True)",
        ),
    ],
)
def test_log_line_for_each_kind_of_shard(
    running: list[Any],
    no_launcher: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    line: str,
) -> None:
    caplog.set_level(logging.INFO, logger="gpuqueue")
    start(running, OrderedEnqueuer(Numbered(10), **options))
    assert caplog.messages[0] == f"OrderedEnqueuer: {line}"


def test_drop_last_with_more_ranks_than_batches_is_an_error() -> None:
    with pytest.raises(
        PipelineError, match=r"^drop_last=True with 4 ranks leaves no batch of an epoch of 3"
    ):
        OrderedEnqueuer(Numbered(3), shard=(1, 4), drop_last=True)
    OrderedEnqueuer(Numbered(3), shard=(3, 4))  # padded: rank 3 reads index 0


def test_a_rank_resumes_exactly_with_padding_and_drop_last(running: list[Any]) -> None:
    for drop_last in (False, True):
        options = {"shuffle": True, "seed": 4, "shard": (2, 3), "drop_last": drop_last}
        per_rank = 4 if not drop_last else 3
        reference = OrderedEnqueuer(Numbered(10), epochs=3, **options)
        start(running, reference)
        expected = [int(b[1]["index"]) for b in reference.get()]
        assert len(expected) == 3 * per_rank

        first = start(running, OrderedEnqueuer(Numbered(10), epochs=3, **options))
        got = [int(b[1]["index"]) for b in islice(first.get(), per_rank + 2)]
        state = first.state_dict()
        first.stop()
        assert (state["epoch"], state["position"], state["drop_last"]) == (1, 2, drop_last)
        second = OrderedEnqueuer(Numbered(10), epochs=3, **options)
        second.load_state_dict(state)
        got += [int(b[1]["index"]) for b in start(running, second).get()]
        assert got == expected
    with pytest.raises(ValueError, match=r"^state has drop_last=True, but this enqueuer has"):
        OrderedEnqueuer(Numbered(10), shuffle=True, seed=4, shard=(2, 3)).load_state_dict(state)


# -- what prefetch shards: Sequences, and never an iterable ----------------------


def numbered_batches(count: int) -> Any:
    for index in range(count):
        yield (np.full((2, 3), index, np.float32), {"index": np.int64(index)})


def test_prefetch_shards_a_sequence(no_launcher: pytest.MonkeyPatch) -> None:
    no_launcher.setenv("RANK", "2")
    no_launcher.setenv("WORLD_SIZE", "3")
    with gpuqueue.prefetch(Numbered(10), device="cpu", epochs=1) as batches:
        assert [int(b[1]["index"]) for b in batches] == [2, 5, 8, 1]
    with gpuqueue.prefetch(Numbered(10), device="cpu", epochs=1, drop_last=True) as batches:
        assert [int(b[1]["index"]) for b in batches] == [2, 5, 8]
    with gpuqueue.prefetch(Numbered(10), device="cpu", epochs=1, shard=None) as batches:
        assert len(list(batches)) == 10


def test_prefetch_never_shards_an_iterable_by_default(no_launcher: pytest.MonkeyPatch) -> None:
    no_launcher.setenv("RANK", "1")
    no_launcher.setenv("WORLD_SIZE", "2")
    for shard in ("auto", None):
        with gpuqueue.prefetch(numbered_batches(5), device="cpu", shard=shard) as batches:
            assert [int(b[1]["index"]) for b in batches] == [0, 1, 2, 3, 4]


def test_an_explicit_shard_of_an_iterable_is_an_error_that_says_why() -> None:
    with (
        pytest.raises(
            ValueError,
            match=r"^shard=\(1, 2\) cannot split an iterable \(generator\): every rank would "
            r"read all of it to keep 1 batch in 2\. Split it at the source",
        ),
        gpuqueue.prefetch(numbered_batches(5), device="cpu", shard=(1, 2)),
    ):
        pytest.fail("prefetch started")


def test_torch_sources_are_routed_by_kind() -> None:
    """A DataLoader with a DistributedSampler is split already; an IterableDataset is iterated."""
    torch_data = pytest.importorskip("torch.utils.data")

    class Batches(torch_data.Dataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return 6

        def __getitem__(self, index: int) -> Any:
            return (np.full((2, 3), index, np.float32), {"index": np.int64(index)})

    class Stream(torch_data.IterableDataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return 3

        def __iter__(self) -> Any:
            return numbered_batches(3)

    assert reads_by_index(Batches()) and not reads_by_index(Stream())
    sampler = torch_data.DistributedSampler(Batches(), num_replicas=2, rank=1, shuffle=False)
    loader = torch_data.DataLoader(
        Batches(), sampler=sampler, batch_size=None, collate_fn=lambda item: item
    )
    assert not reads_by_index(loader)
    with gpuqueue.prefetch(loader, device="cpu") as batches:  # numpy leaves: works as is
        assert [int(b[1]["index"]) for b in batches] == [1, 3, 5]
    with (
        pytest.raises(
            ValueError,
            match=r"^shard=\(1, 2\): this DataLoader's sampler is a DistributedSampler, so it "
            r"is already split per rank",
        ),
        gpuqueue.prefetch(loader, device="cpu", shard=(1, 2)),
    ):
        pytest.fail("prefetch started")
    batched = torch_data.DataLoader(
        Batches(), sampler=sampler, batch_size=2, collate_fn=lambda items: items[0]
    )
    with (
        pytest.raises(ValueError, match=r"already split per rank"),
        gpuqueue.prefetch(batched, device="cpu", shard=(0, 2)),
    ):
        pytest.fail("prefetch started")
    with gpuqueue.prefetch(Stream(), device="cpu", shard="auto") as batches:
        assert [int(b[1]["index"]) for b in batches] == [0, 1, 2]
    with (
        pytest.raises(ValueError, match=r"cannot split an iterable \(Stream\)"),
        gpuqueue.prefetch(Stream(), device="cpu", shard=(0, 2)),
    ):
        pytest.fail("prefetch started")


# -- device="auto": one GPU per local rank ---------------------------------------


class FakeGpus:
    """Stands in for CuPy's discovery: ``count`` GPUs (or CUDA unusable), and records the pick."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int | None) -> None:
        self.count, self.made = count, []
        monkeypatch.setattr(backends, "_gpu_count", self.gpu_count)
        monkeypatch.setattr(backends, "_new_cupy_backend", self.new_backend)

    def gpu_count(self, asked: Any) -> int:
        if self.count is None:
            raise PipelineError(f"device={asked} needs a CUDA GPU, but CUDA is not usable here")
        return self.count

    def new_backend(self, index: int) -> Any:
        self.made.append(index)
        return types.SimpleNamespace(name="cupy", index=index)


@pytest.mark.parametrize(
    ("variables", "count", "index"),
    [
        ({}, 4, 0),
        ({"LOCAL_RANK": "1"}, 2, 1),
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 4, 2),
        ({"MPI_LOCALRANKID": "3"}, 4, 3),
        ({"SLURM_LOCALID": "1"}, 2, 1),
        ({"LOCAL_RANK": "0", "SLURM_LOCALID": "1"}, 2, 0),
    ],
)
def test_auto_is_the_local_ranks_gpu(
    no_launcher: pytest.MonkeyPatch, variables: dict[str, str], count: int, index: int
) -> None:
    for name, value in variables.items():
        no_launcher.setenv(name, value)
    gpus = FakeGpus(no_launcher, count)
    assert backends.resolve("auto").index == index
    assert gpus.made == [index]


def test_two_ranks_never_share_a_gpu_unless_asked(no_launcher: pytest.MonkeyPatch) -> None:
    gpus = FakeGpus(no_launcher, 2)
    no_launcher.setenv("LOCAL_RANK", "2")
    with pytest.raises(
        PipelineError,
        match=r"^device='auto' is the local rank's GPU, but LOCAL_RANK=2 and only 2 GPU\(s\) "
        r"are visible here",
    ):
        backends.resolve("auto")
    assert gpus.made == []
    no_launcher.setenv("SLURM_LOCALID", "7")
    no_launcher.delenv("LOCAL_RANK")
    with pytest.raises(PipelineError, match=r"but SLURM_LOCALID=7 and only 2 GPU"):
        backends.resolve("auto")
    assert backends.resolve(0).index == 0  # the user said so
    no_launcher.setenv("SLURM_LOCALID", "x")
    with pytest.raises(ValueError, match=r"^SLURM_LOCALID='x' must be an integer >= 0"):
        backends.resolve("auto")


@pytest.mark.parametrize("count", [None, 0])
def test_auto_without_a_usable_gpu_is_numpy_whatever_the_local_rank(
    no_launcher: pytest.MonkeyPatch, count: int | None
) -> None:
    no_launcher.setenv("LOCAL_RANK", "5")
    gpus = FakeGpus(no_launcher, count)
    assert backends.resolve("auto").name == "numpy"
    assert gpus.made == []
