"""Source stage, kinds: every "what is this source?" question, answered in one place.

- Anything with ``__len__`` and ``__getitem__`` is a Sequence (a list of
  batches, a torch map-style ``Dataset``, a Keras 3 ``PyDataset``); it goes
  to an ``OrderedEnqueuer``, which calls ``on_epoch_end`` when it has one.
- Any other iterable goes to a ``GeneratorEnqueuer``. One that can be read
  again (``iter()`` gives a fresh iterator each time: a list, a torch
  ``DataLoader``) is read ``epochs`` times by ``Epochs``; a one-shot iterator
  (a generator) can be read once, and asking for more epochs is an error.
- A torch ``DataLoader`` reads in its own worker processes, so gpuqueue
  reads it in a thread and does what timm's ``PrefetchLoader`` does: pin,
  copy, overlap.

Nothing here imports torch, Keras or TensorFlow until a caller asks for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import PipelineError

__all__ = [
    "Epochs",
    "check_iterable_source",
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
    so it counts as an iterable, as do DataLoaders and generators.
    """
    if is_torch_class(source, "IterableDataset"):
        return False
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def is_sequence(source: Any) -> bool:
    """True for anything read by index: it has ``__len__`` and ``__getitem__``."""
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def is_torch_dataloader(source: Any) -> bool:
    """True for a ``torch.utils.data.DataLoader`` (or a subclass), without importing torch."""
    return is_torch_class(source, "DataLoader")


def _one_shot(source: Any) -> bool:
    # An iterator is its own iterator: a second iter() continues, never restarts.
    # Told apart without calling iter(), which starts a DataLoader's workers.
    return hasattr(source, "__next__")


class Epochs:
    """Reads a re-iterable source ``epochs`` times, one fresh ``iter()`` per epoch.

    Picklable when the source is, so a worker process can run it.

    Args:
        source: An iterable whose ``iter()`` starts over (not an iterator).
        epochs: How many passes.
    """

    def __init__(self, source: Iterable[Any], epochs: int) -> None:
        self.source = source
        self.epochs = epochs

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.epochs):
            yield from self.source


def check_sequence(sequence: Any) -> None:
    """Raises ``TypeError`` unless ``sequence`` can be read by index (``OrderedEnqueuer``)."""
    if not is_sequence(sequence):
        raise TypeError(
            f"OrderedEnqueuer needs a Sequence (with __getitem__ and __len__), "
            f"got {type(sequence).__name__}"
        )


def check_iterable_source(source: Any, *, epochs: int | None, use_multiprocessing: bool) -> Any:
    """What a ``GeneratorEnqueuer`` reads for an iterable ``source`` and ``epochs``.

    With processes ``source`` may also be a generator function, which the
    worker process calls (whether it pickles is the process launcher's
    check, ``host.pickling.check_picklable``).

    Returns:
        ``source`` itself for one pass (``epochs`` None or 1), else ``Epochs``.

    Raises:
        TypeError: If ``source`` is not iterable (or, with processes, a
            generator function).
        ValueError: If ``epochs`` is not None or a positive int, or asks a
            one-shot iterator (a generator) for more than one pass.
        PipelineError: If ``source`` is a torch ``DataLoader`` and
            ``use_multiprocessing`` is set: the loader already reads in its
            own processes (``num_workers``).
    """
    iterable = hasattr(source, "__iter__") or hasattr(source, "__next__")
    if not iterable and not (use_multiprocessing and callable(source)):
        raise TypeError(f"GeneratorEnqueuer needs an iterable, got {type(source).__name__}")
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise ValueError(f"epochs must be None or a positive int, got {epochs!r}")
    if use_multiprocessing and is_torch_dataloader(source):
        raise PipelineError(
            "use_multiprocessing=True cannot take a torch DataLoader: it reads in its own "
            "worker processes (set its num_workers); pass it with use_multiprocessing=False, "
            "and gpuqueue pins, copies and overlaps its batches"
        )
    if epochs is None or epochs == 1:
        return source
    if _one_shot(source):
        raise ValueError(
            f"epochs={epochs} needs a source that can be read again, but "
            f"{type(source).__name__} is a one-shot iterator (a generator is read once); "
            "pass a Sequence or a re-iterable (a list, a DataLoader), or a new generator "
            "for each epoch"
        )
    return Epochs(source, epochs)
