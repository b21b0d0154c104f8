"""Source stage, sharding: which part of every epoch this process reads, when it is one of many.

A Sequence is split among ranks the way ``torch.utils.data.DistributedSampler``
splits a dataset: every rank reads the same number of batches, so collective
operations (DDP's all-reduce) never wait for a rank that has run out. Where
the rank comes from, in order:

1. ``torch.distributed``, when the program imported it and initialised a
   process group (looked up in ``sys.modules``: gpuqueue never imports torch);
2. the launcher's variables: ``RANK``/``WORLD_SIZE`` (torchrun),
   ``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_SIZE`` (Open MPI),
   ``PMI_RANK``/``PMI_SIZE`` (MPICH, Intel MPI), ``SLURM_PROCID``/
   ``SLURM_NTASKS`` (SLURM);
3. otherwise this process reads everything.

Sources that are already split per rank (a DataLoader with a
DistributedSampler, an IterableDataset that splits by rank, a generator) are
never split again.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import PipelineError
from .kinds import split_per_rank

__all__ = [
    "RANK_VARIABLES",
    "Shard",
    "announce_shard",
    "batches_per_rank",
    "check_iterable_shard",
    "describe_shard",
    "resolve_shard",
]

logger = logging.getLogger("gpuqueue.enqueuers")  # (where this line was logged before)

# (rank, world size) variable pairs, in the order they are tried.
RANK_VARIABLES = (
    ("RANK", "WORLD_SIZE"),  # torchrun
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE"),  # MPICH, Intel MPI
    ("SLURM_PROCID", "SLURM_NTASKS"),  # SLURM (srun)
)


@dataclass(frozen=True)
class Shard:
    """This process's rank of ``world_size``, and where that was learned.

    Attributes:
        rank: The rank, ``0 <= rank < world_size``.
        world_size: How many ranks split each epoch; 1 means no split.
        source: ``"torch.distributed"``, the launcher's variables (such as
            ``"RANK/WORLD_SIZE"``), ``"explicit"`` (``shard=(rank, world_size)``),
            ``"none"`` (``shard=None``) or ``"none found"`` (``shard="auto"``
            with no process group and no launcher).
    """

    rank: int = 0
    world_size: int = 1
    source: str = "none"

    @property
    def pair(self) -> tuple[int, int]:
        """``(rank, world_size)``."""
        return self.rank, self.world_size

    def stats(self) -> dict[str, Any]:
        """The keys an enqueuer's ``stats()`` reports about its shard."""
        return {
            "shard_rank": self.rank,
            "shard_world_size": self.world_size,
            "shard_source": self.source,
        }


def resolve_shard(
    shard: tuple[int, int] | str | None,
    *,
    environ: Mapping[str, str] | None = None,
    modules: Mapping[str, Any] | None = None,
) -> Shard:
    """Returns the ``Shard`` a ``shard`` argument means in this process.

    Args:
        shard: ``(rank, world_size)``; ``None`` for no sharding; or ``"auto"``:
            the initialised ``torch.distributed`` process group, else the
            launcher's variables (see the module docstring), else no sharding.
        environ: The environment to read (``os.environ`` by default).
        modules: The imported modules to look in (``sys.modules`` by default).

    Raises:
        ValueError: If ``shard`` or a launcher's variables are not integers
            with ``0 <= rank < world_size``; the message names the variables.
    """
    if shard is None:
        return Shard(0, 1, "none")
    if isinstance(shard, str) and shard == "auto":
        found = _from_torch_distributed(sys.modules if modules is None else modules)
        if found is None:
            found = _from_environment(os.environ if environ is None else environ)
        return found if found is not None else Shard(0, 1, "none found")
    if not isinstance(shard, tuple) or len(shard) != 2:
        raise ValueError(f"shard must be (rank, world_size), None or 'auto', got {shard!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in shard):
        raise ValueError(f"shard must hold two ints, got {shard!r}")
    rank, world_size = shard
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
        )
    return Shard(rank, world_size, "explicit")


def _from_torch_distributed(modules: Mapping[str, Any]) -> Shard | None:
    # Not imported means not initialised: a process group needs torch.distributed.
    dist = modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return Shard(int(dist.get_rank()), int(dist.get_world_size()), "torch.distributed")


def _from_environment(environ: Mapping[str, str]) -> Shard | None:
    for rank_name, size_name in RANK_VARIABLES:
        if rank_name not in environ or size_name not in environ:
            continue
        rank_text, size_text = environ[rank_name], environ[size_name]
        try:
            rank, world_size = int(rank_text), int(size_text)
        except ValueError:
            rank, world_size = -1, 0
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"{rank_name}={rank_text!r} and {size_name}={size_text!r} must be integers "
                f"with 0 <= {rank_name} < {size_name}"
            )
        return Shard(rank, world_size, f"{rank_name}/{size_name}")
    return None


def batches_per_rank(length: int, world_size: int, drop_last: bool) -> int:
    """How many batches each rank reads in an epoch of ``length`` batches.

    ``ceil(length / world_size)``, the tail padded by wrapping around the
    epoch's order; with ``drop_last``, ``length // world_size``.

    Raises:
        PipelineError: If that is 0 (``drop_last`` with more ranks than batches).
    """
    if not drop_last:
        return -(-length // world_size)
    count = length // world_size
    if count == 0:
        raise PipelineError(
            f"drop_last=True with {world_size} ranks leaves no batch of an epoch of "
            f"{length}: every rank needs at least one; use drop_last=False (the tail is "
            "padded by wrapping around the epoch) or fewer ranks"
        )
    return count


def describe_shard(name: str, shard: Shard, length: int, drop_last: bool) -> str:
    """The line an enqueuer logs at start: which rank reads how much, and from where.

    For example ``"OrderedEnqueuer: rank 1 of 3 reads 4 of 10 batches per epoch
    (from torch.distributed), 2 padded by wrapping around the epoch's order"``.
    """
    if shard.world_size == 1 and shard.source.startswith("none"):
        why = "shard=None" if shard.source == "none" else "no process group or launcher found"
        return f"{name}: reads all {length} batches per epoch (not sharded: {why})"
    count = batches_per_rank(length, shard.world_size, drop_last)
    line = (
        f"{name}: rank {shard.rank} of {shard.world_size} reads {count} of {length} batches "
        f"per epoch (from {shard.source})"
    )
    spare = count * shard.world_size - length
    if spare > 0:
        line += f", {spare} padded by wrapping around the epoch's order"
    elif spare < 0:
        line += f", last {-spare} of the epoch's order dropped (drop_last=True)"
    return line


def announce_shard(
    name: str, shard: Shard, length: int, drop_last: bool, samples: bool = False
) -> None:
    """Says which part of each epoch this rank reads: a warning where gpuqueue chose to shard.

    Sharding a source that is split per rank already (a map-style dataset
    after ``split_dataset_by_node``, a Sequence that reads only its rank's
    files) leaves each rank a fraction of its part, silently; so when
    ``shard="auto"`` finds several ranks, the decision is a ``UserWarning``
    (shown once per place by Python's default filter) that says how to
    choose. Anything else (one rank, ``shard=None``, an explicit
    ``shard=(rank, world_size)``) is logged at INFO. With ``samples`` the
    source's items are samples (``batch_size=``), split among the ranks
    as ``DistributedSampler`` splits them.
    """
    if samples:
        line = (
            f"{name}: rank {shard.rank} of {shard.world_size} reads its part of the {length} "
            f"samples of every epoch (from {shard.source})"
            if shard.world_size > 1
            else f"{name}: reads all {length} samples of every epoch"
        )
    else:
        line = describe_shard(name, shard, length, drop_last)
    if shard.world_size > 1 and shard.source != "explicit":
        warnings.warn(
            f"{line}. If the source is split per rank already (datasets' "
            "split_dataset_by_node, a sampler or file list of your own), pass shard=None; "
            "pass shard=(rank, world_size) to choose explicitly",
            UserWarning,
            stacklevel=5,
        )
    else:
        logger.info(line)


def check_iterable_shard(source: Any, shard: tuple[int, int] | str | None) -> Shard:
    """The shard of an iterable source: never split again by gpuqueue.

    ``"auto"`` and ``None`` mean no sharding: a DataLoader with a
    DistributedSampler, an IterableDataset that splits by rank or a generator
    already yields only this rank's part (or all of it, as its author chose).

    Raises:
        ValueError: If ``shard`` names ranks: gpuqueue cannot pick a rank's
            part of an iterable without reading all of it on every rank.
    """
    if shard is None or (isinstance(shard, str) and shard == "auto"):
        return Shard(0, 1, "none")
    wanted = resolve_shard(shard)
    kind = type(source).__name__
    if split_per_rank(source):
        raise ValueError(
            f"shard={shard!r}: this {kind}'s sampler is a DistributedSampler, so it is "
            "already split per rank; splitting it again would drop most of each rank's "
            "batches. Leave shard='auto' (or None)"
        )
    raise ValueError(
        f"shard={shard!r} cannot split an iterable ({kind}): every rank would read all of it "
        f"to keep 1 batch in {wanted.world_size}. Split it at the source (a DataLoader with "
        "a DistributedSampler, an IterableDataset that reads its rank's part) and leave "
        "shard='auto', or pass a Sequence"
    )
