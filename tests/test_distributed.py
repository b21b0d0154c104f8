"""Sharding among ranks, where the rank comes from, one GPU per local rank, and torchrun.

The unit tests need no torch. The torchrun tests at the end launch real
``torch.distributed.run`` agents (torch CPU wheel, gloo) training a small DDP
model; they skip where torch is not installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import types
import uuid
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer, PipelineError, backends
from gpuqueue.backends import LOCAL_RANK_VARIABLES, local_rank
from gpuqueue.source.kinds import reads_by_index
from gpuqueue.source.order import epoch_order
from gpuqueue.source.shard import RANK_VARIABLES, Shard, resolve_shard
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


def test_stats_and_a_warning_say_which_rank_and_from_where(
    running: list[Any], no_launcher: pytest.MonkeyPatch
) -> None:
    """gpuqueue chose to shard: a warning, since sharding a source split already is silent loss."""
    no_launcher.setitem(sys.modules, "torch.distributed", fake_torch_distributed(1, 3))
    with pytest.warns(UserWarning) as warned:
        enqueuer = start(running, OrderedEnqueuer(Numbered(10), shuffle=True, seed=0))
    assert str(warned[0].message) == (
        "OrderedEnqueuer: rank 1 of 3 reads 4 of 10 batches per epoch "
        "(from torch.distributed), 2 padded by wrapping around the epoch's order. If the "
        "source is split per rank already (datasets' split_dataset_by_node, a sampler or file "
        "list of your own), pass shard=None; pass shard=(rank, world_size) to choose explicitly"
    )
    stats = enqueuer.stats()
    assert (stats["shard_rank"], stats["shard_world_size"]) == (1, 3)
    assert stats["shard_source"] == "torch.distributed"


def test_per_sample_sharding_chosen_by_gpuqueue_is_a_warning_too(
    running: list[Any], no_launcher: pytest.MonkeyPatch
) -> None:
    """batch_size=: the ranks split samples, and sharding a dataset split already is silent loss."""

    class Samples:
        def __len__(self) -> int:
            return 12

        def __getitem__(self, index: int) -> Any:
            return np.full(2, index, np.float32)

    no_launcher.setitem(sys.modules, "torch.distributed", fake_torch_distributed(1, 3))
    with pytest.warns(
        UserWarning,
        match=r"^OrderedEnqueuer: rank 1 of 3 reads its part of the 12 "
        r"samples of every epoch \(from torch\.distributed\)\. If the source is split",
    ):
        start(running, OrderedEnqueuer(Samples(), batch_size=2, shuffle=True, seed=0))


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


# -- torchrun: the real engine --------------------------------------------------

TRAIN_SCRIPT = '''
"""One rank: trains a small DDP model on a gpuqueue Sequence and writes what it read."""
import json
import logging
import os
import sys
import warnings
from itertools import islice

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gpuqueue

LENGTH, EPOCHS, RESUME_AFTER = (int(arg) for arg in sys.argv[1:4])
DROP_LAST, OUT = sys.argv[4] == "drop_last", sys.argv[5]
SEED = 5


class Indexed(gpuqueue.Sequence):
    def __len__(self):
        return LENGTH

    def __getitem__(self, index):
        x = np.full((2, 3), index, np.float32)
        return x, x.sum(axis=1, keepdims=True), np.array([index], np.int64)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


lines = Lines()
logging.getLogger("gpuqueue").addHandler(lines)
logging.getLogger("gpuqueue").setLevel(logging.INFO)
# Where gpuqueue chose to shard, it says so as a warning: record it with the log lines.
warnings.showwarning = lambda message, *rest: lines.lines.append(str(message))

dist.init_process_group("gloo")  # before the enqueuers: shard="auto" must find it
model = DistributedDataParallel(torch.nn.Linear(3, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)


def step(x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()  # DDP's all-reduce: every rank must take as many steps
    optimizer.step()
    optimizer.zero_grad()


options = dict(shuffle=True, seed=SEED, drop_last=DROP_LAST, epochs=EPOCHS)

# The issue's loop, to the end of the data.
trained = []
with gpuqueue.prefetch(Indexed(), device="cpu", output="torch", **options) as batches:
    for x, y, index in batches:
        step(x, y)
        trained.append(int(index))
prefetch_log = list(lines.lines)

# Stopped after RESUME_AFTER steps; a new enqueuer resumes from the checkpointed state.
first = gpuqueue.OrderedEnqueuer(Indexed(), device="cpu", output="torch", **options)
first.start(workers=2)
resumed = []
for x, y, index in islice(first.get(), RESUME_AFTER):
    step(x, y)
    resumed.append(int(index))
state = json.loads(json.dumps(first.state_dict()))  # through a checkpoint file, as JSON
stats = first.stats()
first.stop()
second = gpuqueue.OrderedEnqueuer(Indexed(), device="cpu", output="torch", **options)
second.load_state_dict(state)
second.start(workers=2)
for x, y, index in second.get():
    step(x, y)
    resumed.append(int(index))

# Resumed on one rank fewer (elastic): rank 0's checkpoint, loaded by every rank of the
# smaller world, which reads the rest of the checkpoint's epoch and the epochs after it.
saved = [state]
dist.broadcast_object_list(saved, src=0)
elastic = []
smaller = dist.get_world_size() - 1
if dist.get_rank() < smaller:
    shard = (dist.get_rank(), smaller)
    third = gpuqueue.OrderedEnqueuer(Indexed(), shard=shard, **options)
    third.load_state_dict(saved[0])
    with third:
        elastic = [int(index[0]) for _, _, index in third.get()]

record = {
    "rank": dist.get_rank(),
    "world_size": dist.get_world_size(),
    "trained": trained,
    "resumed": resumed,
    "state": state,
    "elastic": elastic,
    "stats": {key: value for key, value in stats.items() if key.startswith("shard_")},
    "log": prefetch_log,
}
with open(f"{OUT}/rank{dist.get_rank()}.json", "w") as out:
    json.dump(record, out)
dist.barrier()  # every rank is past its last all-reduce before any tears gloo down
dist.destroy_process_group()
# Everything is written. Skip the interpreter's teardown: on a loaded machine torch
# 2.13 now and then aborts there ("terminate called without an active exception",
# SIGABRT) after all of the above, which is not what these tests are about.
sys.stdout.flush()
os._exit(0)
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_torchrun(
    tmp_path: Path,
    agents: list[list[str]],
    script_args: list[str],
    *,
    script_text: str = TRAIN_SCRIPT,
    timeout_s: float = 150,
) -> None:
    """Runs one torchrun agent per entry of ``agents``, concurrently, under one deadline.

    Each agent leads its own process group, so a hang (or any failure) kills
    the whole tree of every agent and fails the test, instead of CI.
    """
    script = tmp_path / "train.py"
    script.write_text(script_text)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for pair in RANK_VARIABLES:
        for name in pair:
            env.pop(name, None)
    launched: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for number, agent in enumerate(agents):
            log = tmp_path / f"agent{number}.log"
            with open(log, "wb") as output:
                command = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0"]
                process = subprocess.Popen(
                    [*command, *agent, str(script), *script_args],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=tmp_path,
                    start_new_session=True,
                )
            launched.append((process, log))
        deadline = time.monotonic() + timeout_s
        for process, _ in launched:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"torchrun still running after {timeout_s} s (a hang?):\n{tails(launched)}"
                )
            if process.returncode != 0:
                pytest.fail(f"torchrun exited with {process.returncode}:\n{tails(launched)}")
    finally:
        for process, _ in launched:
            if process.poll() is None:
                kill_tree(process.pid)
                process.wait()


def kill_tree(root: int) -> None:
    """SIGKILLs ``root``, every process below it, and their process groups.

    torchrun starts each worker in a session of its own, so killing the
    agent's process group alone would leave the workers running: the tree is
    found through ``/proc`` (parent links) while the agent still holds it.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # it ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    for pid in tree:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)


def tails(launched: list[tuple[subprocess.Popen[bytes], Path]]) -> str:
    return "\n".join(
        f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:] for _, log in launched
    )


def check_ranks(
    tmp_path: Path, world_size: int, length: int, epochs: int, resume_after: int, drop_last: bool
) -> None:
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    per_rank = length // world_size if drop_last else -(-length // world_size)
    orders = []
    for rank, record in enumerate(records):
        assert (record["rank"], record["world_size"]) == (rank, world_size)
        assert record["stats"] == {
            "shard_rank": rank,
            "shard_world_size": world_size,
            "shard_source": "torch.distributed",
        }
        assert record["log"][0].startswith(
            f"OrderedEnqueuer: rank {rank} of {world_size} reads {per_rank} of {length} "
            "batches per epoch (from torch.distributed)"
        )
        assert len(record["trained"]) == per_rank * epochs  # equal steps on every rank
        assert record["resumed"] == record["trained"]  # the resumed run read the same
        assert (record["state"]["epoch"], record["state"]["position"]) == divmod(
            resume_after, per_rank
        )
    for epoch in range(epochs):
        parts = [r["trained"][epoch * per_rank : (epoch + 1) * per_rank] for r in records]
        # Rank r read positions r, r + w, ... of the epoch's order: interleave them back.
        order = [parts[p % world_size][p // world_size] for p in range(per_rank * world_size)]
        shared = [int(i) for i in epoch_order(length, epoch, shuffle=True, seed=5)]
        if drop_last:
            assert order == shared[: len(order)]
            assert len(set(order)) == len(order)  # none twice; the rest dropped
        else:
            assert sorted(order[:length]) == list(range(length))  # every index once
            assert order[:length] == shared  # the same shuffled order on every rank
            assert order[length:] == shared[: len(order) - length]  # padding wraps around
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled each epoch
    check_elastic(records, length, epochs, resume_after, drop_last)


def check_elastic(
    records: list[Any], length: int, epochs: int, resume_after: int, drop_last: bool
) -> None:
    """One rank fewer resumed from rank 0's state: the rest of its epoch once, then whole epochs."""
    world_size, smaller = len(records), len(records) - 1
    state = records[0]["state"]
    epoch, position = state["epoch"], state["position"]
    before = [i for r in records for i in r["resumed"][resume_after - position : resume_after]]
    elastic = [r["elastic"] for r in records]
    assert elastic[smaller:] == [[]]  # the rank left out read nothing
    rest = length - position * world_size
    first = rest // smaller if drop_last else -(-rest // smaller)  # the rest of `epoch`
    per_epoch = length // smaller if drop_last else -(-length // smaller)
    assert [len(e) for e in elastic[:smaller]] == [
        first + per_epoch * (epochs - 1 - epoch)
    ] * smaller
    read = before + [i for e in elastic for i in e[:first]]
    assert len(read) == position * world_size + first * smaller
    if drop_last:
        assert len(set(read)) == len(read)  # none twice: what the ranks cannot split is dropped
    else:
        assert set(read) == set(range(length))  # every index, the padding read twice
    # The smaller world read on from where the bigger one stopped, in the epoch's order.
    shared = [int(i) for i in epoch_order(length, epoch, shuffle=True, seed=5)] * 2
    order = [elastic[p % smaller][p // smaller] for p in range(first * smaller)]
    assert order == shared[position * world_size : position * world_size + len(order)]
    for later in range(epochs - 1 - epoch):
        begin = first + later * per_epoch
        whole = [i for e in elastic[:smaller] for i in e[begin : begin + per_epoch]]
        assert len(set(whole)) == (per_epoch * smaller if drop_last else length)


@pytest.fixture
def torchrun() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("torch.distributed.run")


@pytest.mark.engine
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("torchrun")
def test_torchrun_three_ranks_ten_batches_train_to_the_end(tmp_path: Path) -> None:
    """The issue's case: 10 batches on 3 ranks read 4, 3, 3 and DDP hung at the epoch's end."""
    run_torchrun(
        tmp_path, [["--standalone", "--nproc-per-node", "3"]], ["10", "2", "5", "pad", "."]
    )
    check_ranks(tmp_path, 3, 10, epochs=2, resume_after=5, drop_last=False)


@pytest.mark.engine
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("torchrun")
def test_torchrun_two_ranks_drop_last(tmp_path: Path) -> None:
    run_torchrun(
        tmp_path, [["--standalone", "--nproc-per-node", "2"]], ["7", "2", "4", "drop_last", "."]
    )
    check_ranks(tmp_path, 2, 7, epochs=2, resume_after=4, drop_last=True)


@pytest.mark.engine
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("torchrun")
def test_torchrun_two_nodes_on_localhost(tmp_path: Path) -> None:
    """Two torchrun agents meeting at a c10d rendezvous on 127.0.0.1, as two machines would."""
    rendezvous = [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        f"gpuqueue-{uuid.uuid4().hex}",
    ]
    run_torchrun(tmp_path, [rendezvous, rendezvous], ["5", "2", "4", "pad", "."])
    check_ranks(tmp_path, 2, 5, epochs=2, resume_after=4, drop_last=False)


HANGING_SCRIPT = """
import os
import sys
import threading

with open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w") as out:
    out.write(str(os.getpid()))
threading.Event().wait()  # as a rank waiting for an all-reduce nobody joins
"""


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie left for init to reap counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.engine
@pytest.mark.timeout(60)
@pytest.mark.usefixtures("torchrun")
def test_a_hanging_torchrun_fails_the_test_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"^torchrun still running after 8 s"):
        run_torchrun(
            tmp_path,
            [["--standalone", "--nproc-per-node", "2"]],
            [str(tmp_path)],
            script_text=HANGING_SCRIPT,
            timeout_s=8,
        )
    pids = [int((tmp_path / f"pid{rank}").read_text()) for rank in range(2)]
    assert [pid for pid in pids if not gone(pid)] == []
