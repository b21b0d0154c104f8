"""Where batches come from: ``Sequence``, and the order an epoch reads it in."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["Sequence", "epoch_order", "resolve_shard"]

# Launcher variables, in the order they are tried: torchrun, then Open MPI.
_LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))


class Sequence:
    """A dataset of batches indexed ``0 .. len - 1``, as ``keras.utils.Sequence``.

    Subclasses implement ``__getitem__`` (one whole batch per index) and
    ``__len__`` (the number of batches in an epoch), and may override
    ``on_epoch_end``, which the enqueuers call once every read of an epoch
    has finished and before any read of the next.
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


def resolve_shard(shard: tuple[int, int] | str | None) -> tuple[int, int]:
    """Returns ``(rank, world_size)`` for a ``shard`` argument.

    Args:
        shard: ``(rank, world_size)``; ``None`` for no sharding; or ``"auto"``
            to read the launcher's variables (``RANK``/``WORLD_SIZE`` from
            torchrun, ``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_SIZE`` from
            Open MPI), falling back to no sharding when neither is set.

    Raises:
        ValueError: If the values are not integers with ``0 <= rank < world_size``.
    """
    if shard is None:
        return 0, 1
    if shard == "auto":
        return _shard_from_environment(os.environ)
    if isinstance(shard, str) or not isinstance(shard, tuple) or len(shard) != 2:
        raise ValueError(f"shard must be (rank, world_size), None or 'auto', got {shard!r}")
    rank, world_size = shard
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in shard):
        raise ValueError(f"shard must hold two ints, got {shard!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def _shard_from_environment(environ: Mapping[str, str]) -> tuple[int, int]:
    for rank_name, size_name in _LAUNCHER_VARIABLES:
        if rank_name in environ and size_name in environ:
            try:
                shard = (int(environ[rank_name]), int(environ[size_name]))
            except ValueError:
                raise ValueError(
                    f"{rank_name}={environ[rank_name]!r} and {size_name}={environ[size_name]!r} "
                    "must be integers"
                ) from None
            return resolve_shard(shard)
    return 0, 1


def epoch_order(
    length: int, epoch: int, *, shuffle: bool, seed: int, shard: tuple[int, int] = (0, 1)
) -> np.ndarray:
    """The indices one rank reads in ``epoch``, in order.

    Shuffled orders are a permutation drawn from ``(seed, epoch)``, so every
    rank (and every rerun) with the same seed agrees on it; rank ``r`` of
    ``w`` takes positions ``r, r + w, r + 2w, ...`` of it, so ranks are
    disjoint and together cover every index once.
    """
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(length)
    else:
        order = np.arange(length)
    rank, world_size = shard
    return order[rank::world_size]
