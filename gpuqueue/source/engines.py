"""Source stage, engines: data engines that read in batches of their own, such as Ray Data.

A Ray ``Dataset`` (and the ``DataIterator`` that ``streaming_split`` and Ray
Train's ``get_dataset_shard`` hand each worker) is not a Python iterable: it
is read with ``iter_batches``. gpuqueue recognises it by that method alone (no
Ray import), reads it as NumPy batches, one ``iter_batches`` call per epoch,
and leaves reading, decoding and distribution to Ray: it pins, copies and
overlaps, as with a ``DataLoader``. A split is Ray's own, so it is never
sharded again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["EngineBatches", "reads_in_batches"]


def reads_in_batches(source: Any) -> bool:
    """True for a source read through its own ``iter_batches`` (a Ray Dataset or DataIterator)."""
    return callable(getattr(source, "iter_batches", None))


class EngineBatches:
    """A source with ``iter_batches``, as a re-iterable of NumPy batches (dicts of columns).

    Args:
        source: A Ray ``Dataset`` or ``DataIterator``, or anything else with
            ``iter_batches(batch_size=..., batch_format="numpy")``.
        batch_size: Rows per batch; None for the engine's default (Ray's 256).
    """

    def __init__(self, source: Any, batch_size: int | None = None) -> None:
        self.source = source
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Any]:
        if self.batch_size is None:  # the engine's own default size
            return iter(self.source.iter_batches(batch_format="numpy"))
        return iter(self.source.iter_batches(batch_size=self.batch_size, batch_format="numpy"))

    def __repr__(self) -> str:
        return f"EngineBatches({type(self.source).__name__})"
