"""Source stage, samples: reading the samples of each batch, in a worker.

``SampleReader`` reads the samples of one batch of a map-style dataset
(with ``__getitems__`` when the dataset has it: one call per batch);
``SampleChunks`` cuts an iterable of samples into batches. Either hands the
host stage a ``collate.Samples`` (written into the batch's slot row by
row), or with ``collate=`` the user's batch. ``source_for_samples`` picks
the order and the reader of a map-style source from the public keywords.
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import BatchError
from .collate import Samples, SampleSpec
from .iterables import epoch_setters, next_only, takes_no_arguments
from .kinds import is_torch_class
from .order import ReadingOrder
from .samplers import SampleOrder

__all__ = [
    "SampleChunks",
    "SampleReader",
    "gives_samples",
    "order_and_reader",
    "warn_if_per_sample",
]


class SampleReader:
    """Reads the samples of one batch from a map-style dataset, in a worker.

    ``reader[indices]`` gives a ``Samples`` (the host stage writes them into
    the batch's slot), or with ``collate`` the function's batch. A dataset
    with ``__getitems__(indices)`` (torch >= 2.0's convention; Hugging Face
    ``datasets.Dataset``) is called once per batch, else once per sample.
    Picklable when the dataset (and ``collate``) are: a worker process
    reads through its own copy.

    Args:
        dataset: Anything with ``__getitem__`` (and ``__len__``).
        collate: The user's function from a list of samples to one batch, or None.
    """

    def __init__(self, dataset: Any, collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.dataset = dataset
        self.collate = collate
        self._spec: SampleSpec | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "collate": self.collate, "_spec": None}

    def __getitem__(self, indices: Sequence[int]) -> Any:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            samples = list(getitems(list(indices)))
            if len(samples) != len(indices):
                raise BatchError(
                    f"{type(self.dataset).__name__}.__getitems__ returned {len(samples)} "
                    f"samples for {len(indices)} indices"
                )
        else:
            dataset = self.dataset
            samples = [dataset[index] for index in indices]
        return self.collate_samples(samples, indices)

    def collate_samples(self, samples: list[Any], indices: Sequence[Any]) -> Any:
        """``collate(samples)`` if the user gave one, else the ``Samples`` to write as rows."""
        if self.collate is not None:
            return self.collate(samples)
        spec = self._spec
        if spec is None:  # (two threads may both make one: they agree, or a check says so)
            spec = self._spec = SampleSpec(samples[0], indices[0])
        return Samples(samples, indices, spec)


class SampleChunks:
    """One epoch of an iterable of samples, cut into batches of ``batch_size``, per ``iter()``.

    Each item is a ``Samples`` (or, with ``collate``, the function's batch).
    Epochs are ``iterables.Epochs``' to drive: ``set_epoch``, ``state_dict``
    and ``load_state_dict`` reach the source's own, so it reshuffles and
    resumes as it would without the batching. Picklable when the source is,
    so one worker process can run it; a generator function there is called
    once per epoch.

    Args:
        source: An iterable of samples, or a generator function (worker processes).
        batch_size: Samples per batch.
        drop_last: Drop an epoch's short last batch instead of yielding it.
        collate: The user's function from a list of samples to one batch, or None.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        drop_last: bool,
        collate: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.reader = SampleReader(None, collate)
        self._taken = 0  # samples taken from the source in this epoch
        self._resumed_at = 0  # samples of the epoch a restored state had taken already

    @classmethod
    def of(
        cls,
        source: Any,
        batch_size: int | None,
        *,
        drop_last: bool,
        collate: Callable[[list[Any]], Any] | None,
    ) -> Any:
        """What a ``GeneratorEnqueuer`` reads: the batches of ``source``'s samples with
        ``batch_size``, else ``source`` itself (its items are batches).

        Raises:
            ValueError: If ``collate`` or ``drop_last`` is given without ``batch_size``.
        """
        if batch_size is not None:
            return cls(source, batch_size, drop_last=drop_last, collate=collate)
        for name, value in (("collate", collate), ("drop_last", drop_last)):
            if value:
                raise ValueError(
                    f"{name}= is for an iterable of samples and needs batch_size=; without it "
                    "the iterable's items are batches"
                )
        return source

    def __iter__(self) -> Iterator[Any]:
        source = self.source
        if callable(source) and not hasattr(source, "__iter__"):
            source = source()
        # One iter() of the source: islice on it would call iter() again (see next_only).
        iterator, position = next_only(iter(source)), 0
        self._taken, self._resumed_at = self._resumed_at, 0
        while True:
            samples = list(itertools.islice(iterator, self.batch_size))
            self._taken += len(samples)
            if not samples or (self.drop_last and len(samples) < self.batch_size):
                return
            indices = range(position, position + len(samples))
            position += len(samples)
            yield self.reader.collate_samples(samples, indices)

    def set_epoch(self, epoch: int) -> None:
        for part in epoch_setters(self.source):
            part.set_epoch(epoch)

    def state_dict(self) -> Any:
        """The source's own state (None if it keeps none).

        litdata's ``StreamingDataset`` states where it is from the samples its
        loader yielded (``state_dict(num_samples_yielded, num_workers,
        batch_size)``): here they are the samples taken of this epoch, by one
        reader (gpuqueue reads it in a thread, which litdata counts as one
        worker), at the batch size the dataset knows (1 unless its loader set
        one), so that its resume replays nothing.
        """
        own: Any = getattr(self.source, "state_dict", None)
        if _counts_for_its_loader(own):
            return own(self._taken, 1, getattr(self.source, "batch_size", 1))
        return own() if takes_no_arguments(own) else None

    def load_state_dict(self, state: Any) -> None:
        self.source.load_state_dict(state)
        if _counts_for_its_loader(getattr(self.source, "state_dict", None)):
            self._resumed_at = int(state["num_samples_yielded"])


def _counts_for_its_loader(state_dict: Any) -> bool:
    """True for a ``state_dict`` told the samples yielded (litdata's ``StreamingDataset``)."""
    try:
        return "num_samples_yielded" in inspect.signature(state_dict).parameters
    except (TypeError, ValueError):  # not a callable with a signature
        return False


def gives_samples(source: Any) -> bool:
    """True if what the workers read gives ``Samples`` (a reader, or chunks, in epochs or not)."""
    inner = getattr(source, "source", None)  # (iterables.Epochs around the chunks)
    return isinstance(source, (SampleReader, SampleChunks)) or isinstance(inner, SampleChunks)


def reads_samples(batch_size: int | None, sampler: Any, batch_sampler: Any, collate: Any) -> bool:
    """Whether the keywords ask for per-sample reading (the source's items are samples)."""
    return any(value is not None for value in (batch_size, sampler, batch_sampler, collate))


_SAMPLING = (
    "batch_size",
    "shuffle",
    "seed",
    "shard",
    "drop_last",
    "epochs",
    "sampler",
    "batch_sampler",
    "collate",
)


def order_and_reader(
    dataset: Any, arguments: Mapping[str, Any], *, stacklevel: int
) -> tuple[ReadingOrder | SampleOrder, SampleReader | None]:
    """``order_for`` with a public call's sampling keywords, taken by name (its ``locals()``).

    ``stacklevel`` counts from the caller, as ``order_for``'s does.
    """
    return order_for(
        dataset, **{name: arguments[name] for name in _SAMPLING}, stacklevel=stacklevel + 1
    )


def order_for(
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
    collate: Callable[[list[Any]], Any] | None,
    stacklevel: int,
) -> tuple[ReadingOrder | SampleOrder, SampleReader | None]:
    """The order of a map-style source, and with ``batch_size=`` the reader of its samples.

    Without the per-sample keywords the items are batches (a ``ReadingOrder``,
    no reader), and a source that looks like one of samples gets a warning
    pointing ``stacklevel`` frames up from the caller (1: the caller's line).

    Raises:
        ValueError, TypeError, PipelineError: As ``SampleOrder.of`` and
            ``ReadingOrder.of``.
    """
    if reads_samples(batch_size, sampler, batch_sampler, collate):
        if batch_size is None and batch_sampler is None:
            given = [name for name, v in (("sampler", sampler), ("collate", collate)) if v]
            raise ValueError(
                f"{'= and '.join(given)}= read the source's items as samples, and need "
                "batch_size= (or batch_sampler=) to make batches of them"
            )
        order = SampleOrder.of(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            shard=shard,
            drop_last=drop_last,
            epochs=epochs,
            sampler=sampler,
            batch_sampler=batch_sampler,
        )
        return order, SampleReader(dataset, collate)
    warn_if_per_sample(dataset, stacklevel=stacklevel + 1)
    reading = ReadingOrder.of(
        dataset, shuffle=shuffle, seed=seed, shard=shard, drop_last=drop_last, epochs=epochs
    )
    return reading, None


def warn_if_per_sample(dataset: Any, *, stacklevel: int) -> bool:
    """Warns, once per call, if a map-style source read as batches looks like one of samples.

    A torch ``Dataset`` (most return one sample per index) is told by its
    class, without reading it; others by their first batch, in the host
    stage (``looks_like_a_sample``).

    Returns:
        True if it warned.
    """
    if not is_torch_class(dataset, "Dataset"):
        return False
    warnings.warn(
        f"{type(dataset).__name__} is a torch Dataset, which usually gives one sample per "
        "index, and gpuqueue reads each item as a whole batch; pass batch_size= to read "
        "samples and batch them (or ignore this if each item is a batch)",
        UserWarning,
        stacklevel=stacklevel + 1,
    )
    return True
