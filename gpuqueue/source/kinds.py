"""Source stage, kinds: every "what is this source?" question, answered in one place.

- Anything with ``__len__`` and ``__getitem__`` is a Sequence (a list of
  batches, a torch map-style ``Dataset``, a Keras 3 ``PyDataset``); it goes
  to an ``OrderedEnqueuer``, which calls ``on_epoch_end`` when it has one.
- Any other iterable goes to a ``GeneratorEnqueuer`` (``iterables.py`` reads
  its epochs).
- A torch ``DataLoader`` reads in its own worker processes, so gpuqueue
  reads it in a thread and does what timm's ``PrefetchLoader`` does: pin,
  copy, overlap.

Nothing here imports torch, Keras or TensorFlow until a caller asks for them.
"""

from __future__ import annotations

from typing import Any

from .engines import reads_in_batches

__all__ = [
    "check_loader_keywords",
    "check_sequence",
    "is_sequence",
    "is_torch_class",
    "is_torch_dataloader",
    "reads_by_index",
    "split_per_rank",
]


def is_torch_class(obj: Any, name: str) -> bool:
    """True if ``obj`` is an instance of torch.utils.data's ``name`` (torch not imported)."""
    return any(
        cls.__name__ == name and cls.__module__.startswith("torch.utils.data")
        for cls in type(obj).__mro__
    )


def split_per_rank(source: Any) -> bool:
    """True if ``source`` is a torch DataLoader whose sampler is a DistributedSampler."""
    if not is_torch_class(source, "DataLoader"):
        return False
    samplers = (
        getattr(source, "sampler", None),
        getattr(getattr(source, "batch_sampler", None), "sampler", None),
    )
    return any(is_torch_class(sampler, "DistributedSampler") for sampler in samplers)


def reads_by_index(source: Any) -> bool:
    """True for a Sequence-like source (``__getitem__`` and ``__len__``), read by index.

    A torch ``IterableDataset`` inherits a ``__getitem__`` it cannot serve,
    so it counts as an iterable, as do DataLoaders, generators and engines
    read through ``iter_batches`` (Ray).
    """
    if is_torch_class(source, "IterableDataset") or reads_in_batches(source):
        return False
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def is_sequence(source: Any) -> bool:
    """True for anything read by index: it has ``__len__`` and ``__getitem__``."""
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def is_torch_dataloader(source: Any) -> bool:
    """True for a ``torch.utils.data.DataLoader`` (or a subclass), without importing torch."""
    return is_torch_class(source, "DataLoader")


def check_sequence(sequence: Any) -> None:
    """Raises ``TypeError`` unless ``sequence`` can be read by index (``OrderedEnqueuer``)."""
    if not is_sequence(sequence):
        raise TypeError(
            f"OrderedEnqueuer needs a Sequence (with __getitem__ and __len__), "
            f"got {type(sequence).__name__}"
        )


def check_loader_keywords(source: Any, *, batch_size: Any, shuffle: bool, workers: int) -> None:
    """Raises ``ValueError`` if a torch ``DataLoader`` comes with keywords that are its own.

    A DataLoader batches, shuffles and reads in its own workers; gpuqueue
    pins, copies and overlaps its batches, so ``batch_size=``, ``shuffle=``
    and ``workers=`` (other than 1) would silently do nothing, or the wrong thing.
    """
    if not is_torch_dataloader(source):
        return
    given = [
        f"{name}={value!r}"
        for name, value, default in (
            ("batch_size", batch_size, None),
            ("shuffle", shuffle, False),
            ("workers", workers, 1),
        )
        if value != default
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: a DataLoader batches, shuffles and reads in its own workers, "
            "so these belong to it (DataLoader(dataset, batch_size=..., shuffle=..., "
            "num_workers=...)); pass the DataLoader to gpuqueue without them, or pass the "
            "dataset itself with batch_size="
        )
