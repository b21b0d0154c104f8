"""``prefetch()``: the one-call form of the enqueuers, choosing one by the kind of source."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

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
    """
    enqueuer: SequenceEnqueuer
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        enqueuer = OrderedEnqueuer(
            source,
            use_multiprocessing,
            shuffle,
            seed=seed,
            epochs=epochs,
            device=device,
            prefetch_depth=prefetch_depth,
            output=output,
            stream=stream,
            timeout=timeout,
        )
    else:
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
