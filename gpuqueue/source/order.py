"""Source stage, order: the Sequence interface, epochs, shuffling, and where a rank is.

``Sequence`` is Keras's dataset interface; ``epoch_order`` draws an epoch's
(seeded, sharded) order and ``ReadingOrder`` remembers where a rank is in
it. ``tasks.py`` hands the workers the reads, in stream order.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from ..errors import PipelineError
from .resume import check_length, check_state, regroup
from .shard import Shard, batches_per_rank, resolve_shard

__all__ = [
    "EpochOrder",
    "InOrder",
    "ReadingOrder",
    "Sequence",
    "Task",
    "epoch_order",
    "indices",
    "rank_count",
    "resolve_shard",
    "shard_and_seed",
]


@dataclass
class Task:
    """One unit of work a worker claimed: where it sits in the stream, what to read."""

    seq_no: int
    epoch: int
    position: int
    index: int | None = None  # the Sequence index; None for a generator's item
    batch: Any = None  # a generator's item, read while claiming
    failure: BaseException | None = None  # an error that belongs at this point
    boundary: bool = False  # the end of epoch ``epoch - 1`` (on_epoch_end), not a read
    state: Any = None  # an iterable's own state right after this item (GeneratorTasks.snapshot)
    # With batch_size=: the batch's sample indices, and the epoch's samples once it is read.
    samples: list[int] | None = None
    samples_end: int = 0

    def where(self) -> str:
        if self.boundary:
            return f"the end of epoch {self.epoch - 1} (on_epoch_end)"
        if self.samples is not None:
            return (
                f"batch {self.position} of epoch {self.epoch} (samples {_first_few(self.samples)})"
            )
        if self.index is None:
            return f"generator item {self.position}"
        return f"batch index {self.index} (epoch {self.epoch}, position {self.position})"


def _first_few(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:4]))
    return f"{shown}, ... ({len(indices)} in all)" if len(indices) > 4 else shown


class Sequence:
    """A dataset of batches indexed ``0 .. len - 1``, as ``keras.utils.Sequence``.

    Subclasses implement ``__getitem__`` (one whole batch per index) and
    ``__len__`` (the number of batches in an epoch), and may override
    ``on_epoch_end``, which the enqueuers call once every read of an epoch
    has finished and before any read of the next.

    Subclassing is optional: anything with ``__len__`` and ``__getitem__`` is
    read the same way (a list or array of batches, a torch map-style
    ``Dataset`` of batches, a Keras 3 ``PyDataset``, a ``tf_keras`` Sequence),
    and its ``on_epoch_end`` is called when it has one.
    """

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Called between epochs; override to reshuffle or refresh state."""

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self)):
            yield self[index]


def epoch_order(
    length: int,
    epoch: int,
    *,
    shuffle: bool,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    drop_last: bool = False,
    start: int = 0,
) -> EpochOrder:
    """The indices one rank reads in ``epoch``, in order.

    The epoch's order is a permutation drawn from ``(seed, epoch)`` when
    shuffled (so every rank, and every rerun, with the same seed agrees on
    it), else ``0 .. length - 1``. Rank ``r`` of ``w`` takes positions
    ``r, r + w, r + 2w, ...`` of it, as ``DistributedSampler`` does, so every
    rank reads the same number of batches (``batches_per_rank``): the order
    is first extended to ``ceil(length / w) * w`` positions by wrapping
    around (repeating it as often as needed when ``w > length``), or, with
    ``drop_last``, cut to ``(length // w) * w``. Together the ranks read
    every index once, plus the padding (the order's first batches, read
    again) or less the dropped tail.

    ``start`` is where in the epoch's order the split begins: the positions
    before it were read before a resume on another world size (``regroup``);
    the ``length - start`` after it are split as above. With ``drop_last``
    such a rest may leave the ranks nothing (an empty order).

    Raises:
        PipelineError: If ``drop_last`` leaves no batch for a rank of a whole epoch.
    """
    rank, world_size = shard
    end = start + rank_count(length, world_size, drop_last, start) * world_size
    if not shuffle:
        return InOrder(range(start + rank, end, world_size), length)
    order = np.random.default_rng([seed, epoch]).permutation(length)
    if end > length:
        order = np.tile(order, -(-end // length))
    return order[start + rank : end : world_size]


def rank_count(length: int, world_size: int, drop_last: bool, start: int = 0) -> int:
    """How many of an epoch's positions from ``start`` on each rank reads (``epoch_order``).

    Raises:
        PipelineError: If ``drop_last`` leaves no batch for a rank of a whole epoch.
    """
    if start and drop_last:  # a resumed rest may leave the ranks nothing
        return (length - start) // world_size
    return batches_per_rank(length - start, world_size, drop_last)


class InOrder:
    """An unshuffled epoch order, worked out as it is read instead of stored.

    Item ``i`` is ``positions[i] % length``: the rank's positions in the
    epoch, wrapped around for the padding. A Sequence whose ``len()`` is
    huge (an endless sampler that says 10⁹, say) then costs no array of
    ``len()`` indices (8 GB at 10⁹). Indexing gives an ``int``; slicing an
    int64 array of those indices, as the stored order does.
    """

    __slots__ = ("_length", "_positions")

    def __init__(self, positions: range, length: int) -> None:
        self._positions, self._length = positions, length

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> np.ndarray: ...
    def __getitem__(self, key: int | slice) -> int | np.ndarray:
        if isinstance(key, slice):
            part = self._positions[key]
            return np.arange(part.start, part.stop, part.step, dtype=np.int64) % self._length
        return self._positions[key] % self._length

    def run(self, start: int, stop: int) -> list[int]:
        """Items ``start .. stop - 1`` as a list (a bundle's indices): no array on the way."""
        part = self._positions[start:stop]
        if not part or part[-1] < self._length:  # no wrap-around in it
            return list(part)
        return [position % self._length for position in part]

    def __iter__(self) -> Iterator[int]:
        length = self._length
        return (position % length for position in self._positions)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        indices = self[:]
        return indices if dtype is None else indices.astype(dtype)


# An epoch's order for one rank: drawn and stored when shuffled, worked out when not.
EpochOrder = np.ndarray | InOrder


def indices(order: EpochOrder, start: int, stop: int) -> list[int]:
    """Items ``start .. stop - 1`` of ``order`` as a list of ints (a bundle's indices)."""
    if isinstance(order, InOrder):
        return order.run(start, stop)
    return order[start:stop].tolist()  # type: ignore[no-any-return]


@dataclass
class ReadingOrder:
    """What a rank reads of a Sequence, epoch after epoch, and how far its consumer got.

    Args:
        shuffle: Read each epoch in a permutation drawn from ``(seed, epoch)``.
        seed: The shuffling seed (ranks must share it).
        shard: Which rank of how many this process is, and how it knows.
        drop_last: Drop each epoch's tail instead of padding it, when the
            ranks cannot all read as many batches.
        epochs: How many epochs to read; None is endless.
        length: The Sequence's ``len()`` when last looked at.
        epoch, position: The next batch to deliver: ``position`` of
            ``epoch``'s order on this rank.
        start: Where in ``epoch``'s order this world's split began: 0, or
            the positions read before a resume on another world size.
    """

    shuffle: bool
    seed: int
    shard: Shard
    drop_last: bool = False
    epochs: int | None = None
    length: int = 0
    epoch: int = 0
    position: int = 0
    start: int = 0

    @classmethod
    def of(
        cls,
        sequence: Any,
        *,
        shuffle: bool,
        seed: int | None,
        shard: tuple[int, int] | str | None,
        drop_last: bool,
        epochs: int | None,
    ) -> ReadingOrder:
        """The order of a new enqueuer, its arguments checked; a seed is drawn if none is given.

        Raises:
            ValueError: If ``epochs`` or ``shard`` is malformed, or several
                ranks shuffle without a shared ``seed``.
            PipelineError: If the Sequence is empty, or ``drop_last`` leaves
                a rank nothing to read.
        """
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or a positive int, got {epochs!r}")
        resolved, seed = shard_and_seed(shard, shuffle, seed)
        length = len(sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length})")
        batches_per_rank(length, resolved.world_size, bool(drop_last))
        return cls(bool(shuffle), seed, resolved, bool(drop_last), epochs, length)

    def epoch_order(self, length: int, epoch: int, start: int = 0) -> EpochOrder:
        """This rank's order of ``epoch`` over ``length`` batches, split from ``start`` on."""
        return epoch_order(
            length,
            epoch,
            shuffle=self.shuffle,
            seed=self.seed,
            shard=self.shard.pair,
            drop_last=self.drop_last,
            start=start,
        )

    def restart_if_finished(self, length: int) -> None:
        """Goes back to epoch 0 if the consumer received every batch of the last epoch.

        A ``start()`` after a finished run reads the Sequence again, as
        Keras's ``OrderedEnqueuer`` does (a Sequence, unlike a generator, can
        be read again); a run stopped before its end resumes where it was.

        Args:
            length: The Sequence's ``len()`` now.
        """
        self.length = length
        if self.epochs is None or self.epoch < self.epochs - 1:
            return
        if self.epoch >= self.epochs or self.position >= len(
            self.epoch_order(length, self.epoch, self.start)
        ):
            self.epoch = self.position = self.start = 0

    def received(self, task: Task) -> None:
        """The consumer received ``task``: the next to deliver is the one after it."""
        if task.epoch != self.epoch:
            self.start = 0
        self.epoch, self.position = task.epoch, task.position + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "start": self.start,
            "length": self.length,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard": self.shard.pair,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state_dict()``'s point, after checking it fits this order.

        The state may come from any rank (every rank was at the same step),
        and from another number of ranks: the rest of its epoch is then split
        among this world's (``regroup``).

        Raises:
            ValueError: If ``state`` lacks a field or disagrees with this
                order's ``shuffle`` or ``drop_last``, or was saved on another
                number of ranks over a Sequence of another length.
        """
        check_state(state, self.state_dict(), "position")

        def per_rank(epoch: int, start: int, world_size: int) -> int:
            length = check_length(state, self.length, "batches", "Sequence")
            return rank_count(length, world_size, self.drop_last, start)

        self.epoch, self.position, self.start = regroup(
            state, "position", self.shard.world_size, per_rank
        )
        self.seed = state["seed"]


def shard_and_seed(
    shard: tuple[int, int] | str | None, shuffle: bool, seed: int | None
) -> tuple[Shard, int]:
    """An order's shard, and its seed: the one given, else a random one kept in its state.

    Raises:
        ValueError: If ``shard`` is malformed, or several ranks shuffle without a
            seed they share (a random one would differ per rank).
    """
    resolved = resolve_shard(shard)
    if shuffle and seed is None and resolved.world_size > 1:
        raise ValueError(
            f"shuffling across {resolved.world_size} ranks needs a seed that every rank shares"
        )
    return resolved, seed if seed is not None else secrets.randbits(63)
