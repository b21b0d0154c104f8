"""Source stage, samplers: which samples make each batch of an epoch, on this rank.

With ``batch_size=`` a map-style source's items are samples, and an epoch is
cut into batches here, in the parent, so any sampler (a torch ``Sampler``
with its ``set_epoch``, a list) works and the workers only read:

- by default the epoch's samples are ``0 .. len - 1``, or with ``shuffle`` a
  permutation drawn from ``(seed, epoch)``;
- ``sampler=``: any re-iterable of indices (a torch ``Sampler``, a list),
  iterated once per epoch;
- ``batch_sampler=``: any re-iterable of index lists, one list per batch
  (variable sizes, buckets); it decides the batches, so ``batch_size``,
  ``shuffle``, ``sampler`` and ``drop_last`` are not taken with it.

Every epoch starts with ``set_epoch(epoch)`` on a sampler that has it.
Several ranks split the epoch's samples as ``DistributedSampler`` does (a
sampler with ``num_replicas``, a ``DistributedSampler``, splits itself and
is not split again): rank ``r`` of ``w`` takes positions ``r, r + w, ...``,
the order padded by wrapping around to the same count on every rank.

``drop_last`` has one meaning here, the one it has for a Sequence of
batches: drop the epoch's tail that does not give every rank a whole batch,
instead of padding the ranks and keeping a short last batch. On one rank
that is DataLoader's ``drop_last`` (the short last batch goes); on several,
DistributedSampler's and DataLoader's together (every rank reads the same
number of full batches).

``SampleOrder`` remembers how far the consumer got in samples, so a resume
continues with exactly the next sample (also with another ``batch_size``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PipelineError
from .order import Task, shard_and_seed
from .resume import check_length, check_state, regroup
from .shard import Shard

__all__ = ["EpochBatches", "SampleOrder"]


class EpochBatches:
    """One rank's batches of one epoch: batch ``k``'s sample indices, and where it ends.

    Args:
        indices: The rank's samples in order (fixed batch size), or None.
        batch_size: Samples per batch (the last may be short).
        lists: Explicit batches (a batch sampler), or None.
        skip: Samples of the epoch already delivered (a resume): counted in
            ``end``, not read again.
    """

    def __init__(
        self,
        indices: np.ndarray | None,
        batch_size: int,
        lists: list[list[int]] | None = None,
        skip: int = 0,
    ) -> None:
        self._indices, self._size, self._lists, self._skip = indices, batch_size, lists, skip
        if lists is not None:
            self._ends = list(np.cumsum([len(batch) for batch in lists]) + skip)
            self._count = len(lists)
        else:
            assert indices is not None
            self._count = -(-len(indices) // batch_size)

    def __len__(self) -> int:
        return self._count

    def batch(self, number: int) -> tuple[list[int], int]:
        """Batch ``number``'s sample indices, and the epoch's sample count once it is read."""
        if self._lists is not None:
            return self._lists[number], int(self._ends[number])
        assert self._indices is not None
        start = number * self._size
        part = self._indices[start : start + self._size]
        return part.tolist(), self._skip + start + len(part)


@dataclass
class SampleOrder:
    """What a rank reads of a per-sample dataset, epoch after epoch, and how far its consumer got.

    Args:
        batch_size: Samples per batch (None with a ``batch_sampler``).
        shuffle: Read each epoch in a permutation drawn from ``(seed, epoch)``.
        seed: The shuffling seed (ranks must share it).
        shard: Which rank of how many this process is.
        drop_last: Drop the tail that does not give every rank a whole batch.
        epochs: How many epochs to read; None is endless.
        sampler: Indices of an epoch, or None.
        batch_sampler: Batches of an epoch, or None.
        length: The dataset's ``len()`` when last looked at.
        epoch, sample: The next sample to deliver: ``sample`` of this
            rank's ``epoch``.
        start: Where in ``epoch``'s order this world's split began: 0, or
            the samples read before a resume on another world size.
    """

    batch_size: int | None
    shuffle: bool
    seed: int
    shard: Shard
    drop_last: bool = False
    epochs: int | None = None
    sampler: Any = None
    batch_sampler: Any = None
    length: int = 0
    epoch: int = 0
    sample: int = 0
    start: int = 0

    @classmethod
    def of(
        cls,
        dataset: Any,
        *,
        batch_size: int | None,
        shuffle: bool,
        seed: int | None,
        shard: tuple[int, int] | str | None,
        drop_last: bool,
        epochs: int | None,
        sampler: Any,
        batch_sampler: Any,
    ) -> SampleOrder:
        """The order of a new enqueuer over samples, its arguments checked.

        Raises:
            ValueError: If the arguments contradict each other (as DataLoader's
                do: ``batch_sampler`` with ``batch_size``, ``shuffle``,
                ``sampler`` or ``drop_last``; ``sampler`` with ``shuffle``),
                or several ranks shuffle without a shared ``seed``.
            TypeError: If a sampler is not iterable.
            PipelineError: If the dataset is empty.
        """
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
        ):
            raise ValueError(f"epochs must be None or a positive int, got {epochs!r}")
        if batch_sampler is not None:
            clashes = [
                name
                for name, value in (
                    ("batch_size", batch_size),
                    ("shuffle", shuffle),
                    ("sampler", sampler),
                    ("drop_last", drop_last),
                )
                if value
            ]
            if clashes:
                raise ValueError(
                    f"batch_sampler= decides every batch, so it takes no {', '.join(clashes)}= "
                    "(as DataLoader)"
                )
            _check_iterable(batch_sampler, "batch_sampler")
        else:
            if sampler is not None:
                if shuffle:
                    raise ValueError(
                        "sampler= decides the order, so it takes no shuffle=True (as DataLoader)"
                    )
                _check_iterable(sampler, "sampler")
            if batch_size is None:
                raise ValueError("per-sample reading needs batch_size= (or batch_sampler=)")
        resolved, seed = shard_and_seed(shard, shuffle, seed)
        length = len(dataset)
        if length <= 0:
            raise PipelineError(f"the dataset is empty (len() returned {length})")
        return cls(
            batch_size,
            bool(shuffle),
            seed,
            resolved,
            bool(drop_last),
            epochs,
            sampler,
            batch_sampler,
            length,
        )

    def received(self, task: Task) -> None:
        """The consumer received ``task``: the next sample to deliver is the one after it."""
        if task.epoch != self.epoch:
            self.start = 0
        self.epoch, self.sample = task.epoch, task.samples_end

    def epoch_batches(self, length: int, epoch: int, skip: int = 0, start: int = 0) -> EpochBatches:
        """This rank's batches of ``epoch`` over a dataset of ``length`` samples.

        Calls ``set_epoch(epoch)`` first on a sampler (or batch sampler) that has it.

        Args:
            skip: Samples of this rank's part already delivered (a resume).
            start: Where in the epoch's order the split begins (a resume on
                another world size: the samples every rank read before).

        Raises:
            PipelineError: If ``drop_last`` leaves a rank no whole batch, or
                ``skip`` (a resume) falls inside a batch of a batch sampler.
        """
        world, rank = self.shard.world_size, self.shard.rank
        if self.batch_sampler is not None:
            _set_epoch(self.batch_sampler, epoch)
            lists = [[int(i) for i in batch] for batch in self.batch_sampler]
            if world > 1 and not _splits_itself(self.batch_sampler):
                count = -(-len(lists) // world)
                lists = [lists[p % len(lists)] for p in range(rank, count * world, world)]
            return _skip_lists(lists, skip, epoch)
        batch_size = self.batch_size
        assert batch_size is not None
        order = self._epoch_order(length, epoch)
        # Split among the ranks here, unless the sampler read this rank's part itself.
        if self.sampler is not None and _splits_itself(self.sampler):
            ranks, first = 1, start
        else:
            ranks, first = world, start + rank
        end = start + self._per_rank(len(order) - start, ranks) * ranks
        if end > len(order):  # padded by wrapping around
            order = np.tile(order, -(-end // len(order)))
        order = order[first:end:ranks]
        if len(order) == 0 and start == 0:
            raise PipelineError(
                f"drop_last=True leaves no whole batch of {batch_size} samples in epoch {epoch} "
                f"on rank {rank} of {world} ({length} samples); use drop_last=False or a "
                "smaller batch_size"
            )
        return EpochBatches(order[skip:], batch_size, skip=skip)

    def _epoch_order(self, length: int, epoch: int) -> np.ndarray:
        """The epoch's samples in order, before any split among ranks."""
        if self.sampler is not None:
            _set_epoch(self.sampler, epoch)
            return np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(length)
        return np.arange(length, dtype=np.int64)

    def _per_rank(self, left: int, world: int, batch_size: int | None = None) -> int:
        """How many of ``left`` samples each of ``world`` ranks reads (padded, or dropped)."""
        size = batch_size or self.batch_size
        assert size is not None
        if self.drop_last:  # whole batches only, the same count on every rank
            return (left // (world * size)) * size
        return -(-left // world)

    def restart_if_finished(self, length: int) -> None:
        """Goes back to epoch 0 if the consumer received every sample of the last epoch.

        As ``order.ReadingOrder.restart_if_finished``: a ``start()`` after a
        finished run reads the dataset again; a stopped one resumes.
        """
        self.length = length
        if self.epochs is None or self.epoch < self.epochs - 1:
            return
        last = self.epoch_batches(length, self.epoch, start=self.start)
        end = last.batch(len(last) - 1)[1] if len(last) else 0
        if self.epoch >= self.epochs or self.sample >= end:
            self.epoch = self.sample = self.start = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "sample": self.sample,
            "start": self.start,
            "length": self.length,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard": self.shard.pair,
            "drop_last": self.drop_last,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state_dict()``'s point, after checking it fits this order.

        The ``batch_size`` may differ: the resume is at sample granularity.
        The state may come from any rank (every rank was at the same step),
        and from another number of ranks: the rest of its epoch is then split
        among this world's (``resume.regroup``), unless a sampler or batch
        sampler decides the split.

        Raises:
            ValueError: If ``state`` lacks a field or disagrees with this
                order's ``shuffle`` or ``drop_last``, or was saved on another
                number of ranks over another dataset or with a sampler that
                splits itself or a batch sampler.
        """
        check_state(state, self.state_dict(), "sample", " (a per-sample state_dict())")

        def per_rank(epoch: int, start: int, world_size: int) -> int:
            self._check_regroups(world_size)
            length = check_length(state, self.length, "samples", "dataset")
            left = len(self._epoch_order(length, epoch)) - start
            return self._per_rank(left, world_size, state.get("batch_size"))

        self.epoch, self.sample, self.start = regroup(
            state, "sample", self.shard.world_size, per_rank
        )
        self.seed = state["seed"]

    def _check_regroups(self, saved_world: int) -> None:
        why = None
        if self.batch_sampler is not None:
            why = "batch_sampler= decides the batches, so which samples are left is its to say"
        elif self.sampler is not None and _splits_itself(self.sampler):
            why = (
                "sampler= splits itself among ranks (it has num_replicas, as DistributedSampler), "
                "so which samples the other ranks read is its to say"
            )
        if why is not None:
            raise ValueError(
                f"cannot resume a state saved on {saved_world} ranks on "
                f"{self.shard.world_size} ranks: {why}; resume on {saved_world} ranks, or let "
                "gpuqueue order and split the samples (shuffle=, seed=, shard=)"
            )


def _check_iterable(sampler: Any, name: str) -> None:
    if not hasattr(sampler, "__iter__") or hasattr(sampler, "__next__"):
        raise TypeError(
            f"{name}= must be re-iterable (a torch Sampler, a list): iterated once per epoch, "
            f"got {type(sampler).__name__}"
        )


def _set_epoch(sampler: Any, epoch: int) -> None:
    set_epoch = getattr(sampler, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


def _splits_itself(sampler: Any) -> bool:
    """A sampler that already reads one rank's part (``DistributedSampler``, or one like it)."""
    inner = getattr(sampler, "sampler", None)  # a torch BatchSampler over a DistributedSampler
    return hasattr(sampler, "num_replicas") or hasattr(inner, "num_replicas")


def _skip_lists(lists: list[list[int]], skip: int, epoch: int) -> EpochBatches:
    seen = 0
    for number, batch in enumerate(lists):
        if seen == skip:
            return EpochBatches(None, 0, lists[number:], skip=skip)
        seen += len(batch)
    if seen == skip:
        return EpochBatches(None, 0, [], skip=skip)
    raise PipelineError(
        f"cannot resume epoch {epoch} at sample {skip}: the batch sampler's batches do not "
        "end there (it gave other batches than when the state was saved)"
    )
