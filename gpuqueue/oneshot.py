"""``prefetch()``: the one-call form of the enqueuers, choosing one by the kind of source."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .distributed import check_iterable_shard, reads_by_index
from .enqueuers import GeneratorEnqueuer, OrderedEnqueuer, SequenceEnqueuer

__all__ = ["prefetch"]


@contextlib.contextmanager
def prefetch(
    source: Any,
    device: Any = "auto",
    *,
    workers: int = 1,
    prefetch_depth: int = 2,
    max_queue_size: int = 10,
    use_multiprocessing: bool = False,
    shuffle: bool = False,
    seed: int | None = None,
    shard: tuple[int, int] | str | None = "auto",
    drop_last: bool = False,
    epochs: int | None = None,
    output: str | None = None,
    stream: Any = None,
    timeout: float | None = None,
) -> Iterator[Iterator[Any]]:
    """Yields an iterator of device batches from a Sequence or any iterable.

    The one-call form of the enqueuers: a ``Sequence`` (anything with
    ``__getitem__`` and ``__len__``) goes through an ``OrderedEnqueuer``
    (endless unless ``epochs`` is given), any other iterable through a
    ``GeneratorEnqueuer``. ``timeout`` (seconds) bounds the wait for each
    batch, as the enqueuers' (``BatchTimeoutError``). Everything is stopped
    and freed when the block ends, also on error::

        with gpuqueue.prefetch(dataset, device="auto", workers=4, epochs=1) as batches:
            for x, y in batches:
                loss = step(x, y)

    ``shard`` and ``drop_last`` split a Sequence among ranks as
    ``OrderedEnqueuer`` does. An iterable (a generator, a DataLoader, an
    IterableDataset) is never split: ``"auto"`` reads it as it is, since it
    is split at its source if at all, and ``(rank, world_size)`` is a
    ``ValueError`` that says why.
    """
    enqueuer: SequenceEnqueuer
    if reads_by_index(source):
        enqueuer = OrderedEnqueuer(
            source,
            use_multiprocessing,
            shuffle,
            seed=seed,
            shard=shard,
            drop_last=drop_last,
            epochs=epochs,
            device=device,
            prefetch_depth=prefetch_depth,
            output=output,
            stream=stream,
            timeout=timeout,
        )
    else:
        check_iterable_shard(source, shard)
        enqueuer = GeneratorEnqueuer(
            source,
            use_multiprocessing,
            device=device,
            prefetch_depth=prefetch_depth,
            output=output,
            stream=stream,
            timeout=timeout,
        )
    enqueuer.start(workers=workers, max_queue_size=max_queue_size)
    try:
        yield enqueuer.get()
    finally:
        enqueuer.stop()
