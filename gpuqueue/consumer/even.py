"""Consumer stage, even steps: every rank of a ``torch.distributed`` job stops at the same step.

DDP all-reduces gradients at every step, so a rank that runs out of batches
one step before the others leaves them waiting in that all-reduce for ever:
the most expensive way a data loader can fail. A Sequence sharded by gpuqueue
gives every rank as many batches (``source/shard.py``); an iterable that
shards itself (WebDataset shards, a streaming dataset split by node) need
not: 20 shards over 3 ranks are 7, 7 and 6; nor need a map-style source
split before gpuqueue sees it (``split_dataset_by_node`` gives 13 and 12 of
25 samples: 4 and 3 batches of 4) and read with ``shard=None``. For those, before handing over
each batch, every rank says whether it has one, in one all-reduce (MIN) of
one integer on the CPU, and all stop at the first step where one has none, as
DDP's ``Join`` and Accelerate's ``even_batches`` do. It costs one small
collective per batch (tens of microseconds over gloo on one machine).

``torch`` is found in ``sys.modules``, never imported here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator
from typing import Any

from ..source.iterables import IterableOrder

__all__ = ["even_steps", "evened", "ranks"]


def ranks() -> int:
    """How many ranks the initialised ``torch.distributed`` group has (1 without one)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return int(dist.get_world_size())


def evened(batches: Iterator[Any], even_batches: bool | None, order: Any) -> Iterator[Any]:
    """``batches``, through ``even_steps`` where ``even_batches`` asks for it.

    ``None`` (the default) means: whenever ``torch.distributed`` has more
    than one rank and the source was split among them before gpuqueue saw
    it: an iterable (its ``order`` is an ``IterableOrder``), or a map-style
    source read with ``shard=None`` (as after ``split_dataset_by_node``, into
    parts whose lengths may differ). A source gpuqueue sharded is even
    already, and an explicit ``shard=(rank, world_size)`` says which ranks
    read (``(0, 1)`` on rank 0 alone: no other rank would join the
    all-reduce). ``order.epoch`` is the epoch of the last batch received, so
    every epoch ends at the shortest rank's count.
    """
    iterable = isinstance(order, IterableOrder)
    split_before = iterable or order.shard.source == "none"  # (shard=None)
    if even_batches or (even_batches is None and split_before and ranks() > 1):
        return even_steps(batches, order.epoch if iterable else lambda: int(order.epoch))
    return batches


# What a rank whose batches have ended says in place of an epoch.
_ENDED = 1 << 30


def even_steps(batches: Iterator[Any], epoch_of: Callable[[], int]) -> Generator[Any, None, None]:
    """Yields ``batches`` while every rank has one, epoch by epoch.

    At each step every rank says which epoch its next batch is of
    (``epoch_of()`` after taking it), or that it has none, in one all-reduce
    (MAX of the epoch and of its negation). All in one epoch: each yields its
    batch. Some already in a later one (their epoch was shorter): the others
    drop the rest of theirs, so every epoch ends on every rank at the shortest
    rank's count. One with none left: all stop. Every rank must iterate its
    ``even_steps`` in step with the others, as a DDP loop does; a rank whose
    batches end in an error tells the others first, so they stop at that step
    instead of waiting for it, then raises the error.
    """
    import torch
    import torch.distributed as dist

    # The flag travels on the CPU: over NCCL it would wait for the step's kernels.
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    flag = torch.zeros(2, dtype=torch.int64)

    def agree(epoch: int) -> tuple[int, int]:
        flag[0], flag[1] = epoch, -epoch
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return -int(flag[1]), int(flag[0])  # the lowest epoch, the highest

    def take() -> tuple[Any, int]:
        """The next batch and its epoch; ``_ENDED`` once there is none."""
        try:
            batch = next(batches)
        except StopIteration:
            return None, _ENDED
        except Exception:
            agree(_ENDED)  # the others stop at this step too, then this rank raises
            raise
        return batch, epoch_of()

    try:
        batch, epoch = take()
        while True:
            lowest, highest = agree(epoch)  # one collective per round, on every rank
            if highest >= _ENDED:
                return
            if epoch < highest:  # another rank's epoch ended sooner: drop the rest of this one
                batch, epoch = take()
                continue
            if lowest < highest:  # this rank is ahead: it keeps its batch and waits a round
                continue
            handed = [batch]
            del batch  # the consumer's to keep: this frame must not hold it
            yield handed.pop()
            batch, epoch = take()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
