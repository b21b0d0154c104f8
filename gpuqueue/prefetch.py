"""``prefetch()``, the one-call form: picks an enqueuer by the kind of source.

Its arguments become one ``PipelineConfig`` here, checked once, and the
enqueuer it picks is built from that config (``_configured``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from .config import PipelineConfig
from .enqueuers import GeneratorEnqueuer, OrderedEnqueuer, SequenceEnqueuer
from .host.pickling import check_picklable
from .source.engines import EngineBatches, reads_in_batches
from .source.iterables import IterableOrder, check_iterable_source
from .source.kinds import check_loader_keywords, reads_by_index
from .source.samples import SampleChunks, order_and_reader
from .source.shard import check_iterable_shard

__all__ = ["Prefetched", "prefetch"]

_E = TypeVar("_E", bound=SequenceEnqueuer)


def _configured(cls: type[_E], source: Any, config: PipelineConfig, *more: Any) -> _E:
    """An enqueuer of a config made here, checked once (``SequenceEnqueuer._setup``)."""
    enqueuer = cls.__new__(cls)
    enqueuer._setup(source, config, *more)
    return enqueuer


class Prefetched:
    """What ``prefetch()`` returns: a run of the pipeline, entered by ``with``.

    ``with`` starts it and gives the batches: the generator ``get()``
    returns (Keras's ``fit`` takes it as it is); the block's end stops it,
    also on error or Ctrl-C. The handle itself has the run's ``stats()``
    and ``state_dict()``: what the loop has received (not what the workers
    read ahead), so ``prefetch(..., state=run.state_dict())`` resumes with the
    next batch::

        run = gpuqueue.prefetch(dataset, epochs=3)
        with run as batches:
            for batch in batches:
                step(batch)
                if time_to_save():
                    save(run.state_dict())
    """

    def __init__(self, enqueuer: SequenceEnqueuer, workers: int, max_queue_size: int) -> None:
        self._enqueuer = enqueuer
        self._counts = workers, max_queue_size

    def __enter__(self) -> Iterator[Any]:
        workers, max_queue_size = self._counts
        self._enqueuer.start(workers=workers, max_queue_size=max_queue_size)
        return self._enqueuer.get()

    def __exit__(self, *exc_info: Any) -> None:
        # The enqueuer's own exit stops it, once, also on error; after Ctrl-C in the
        # loop's body it waits for nothing user code could hold up.
        self._enqueuer.__exit__(*exc_info)

    def stats(self) -> dict[str, Any]:
        """The run's counters (``SequenceEnqueuer.stats``)."""
        return self._enqueuer.stats()

    def state_dict(self) -> dict[str, Any]:
        """What the loop has received so far (``SequenceEnqueuer.state_dict``)."""
        return self._enqueuer.state_dict()


def prefetch(
    source: Any,
    device: Any = "auto",
    *,
    workers: int = 1,
    prefetch_depth: int | str = 2,
    max_device_bytes: int | None = None,
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
    transform: Any = None,
    even_batches: bool | None = None,
    state: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    collate: Callable[[list[Any]], Any] | None = None,
    sampler: Any = None,
    batch_sampler: Any = None,
) -> Prefetched:
    """A run of device batches from a Sequence or any iterable, to enter with ``with``.

    The one-call form of the enqueuers. Everything is stopped and freed when
    the block ends, also on error or Ctrl-C::

        with gpuqueue.prefetch(dataset, device="auto", workers=4, epochs=1) as batches:
            for x, y in batches:
                loss = step(x, y)

    What ``source`` may be, and how epochs work for each:

    - Anything with ``__len__`` and ``__getitem__`` (a ``gpuqueue.Sequence``,
      a Keras ``PyDataset`` or ``Sequence``, a torch map-style ``Dataset`` of
      batches, a list of batches): read by index through an
      ``OrderedEnqueuer``; endless unless ``epochs`` is given;
      ``on_epoch_end()`` is called between epochs when it exists.
    - An iterable that starts over on each ``iter()`` (a torch
      ``DataLoader``, a list of batches passed as ``iter``-able): read
      through a ``GeneratorEnqueuer`` ``epochs`` times (once if None).
      A ``DataLoader`` keeps its own workers; gpuqueue pins, copies and
      overlaps, as timm's ``PrefetchLoader`` does.
    - A one-shot iterator (a generator): read once, to its end; ``epochs``
      other than None or 1 is an error.

    Args:
        source: What to read, as above.
        device: ``"auto"`` (the default: a CUDA GPU through CuPy if one is
            usable, else, with a warning saying why, the workers' batches on
            the host at no extra cost, see ``OrderedEnqueuer``), ``None`` (host
            batches exactly as the source made them), ``"cpu"`` (the NumPy
            fallback of the device path), an int or ``"cuda:N"``.
        workers: Worker threads (or processes) reading in parallel.
        prefetch_depth: Batches copied to the device ahead of the loop
            (0 = copy in ``get()``), or ``"auto"`` (see ``OrderedEnqueuer``).
        max_device_bytes: The device memory ``prefetch_depth="auto"`` may use.
        max_queue_size: The most finished batches waiting in host memory.
        use_multiprocessing: Read a Sequence in worker processes (a generator
            in one process); not for a ``DataLoader``, which has its own.
        shuffle: Read each epoch of a Sequence in a permutation drawn from
            ``(seed, epoch)``.
        seed: The shuffling seed.
        epochs: How many epochs to read; None is endless for a Sequence and
            one pass for an iterable.
        output: ``None`` (the backend's arrays: CuPy or NumPy), ``"cupy"``,
            ``"numpy"``, ``"torch"`` or ``"jax"`` (through DLPack, on the
            same device).
        stream: The stream the consumer's work runs on; by default the
            current one at each step.
        shard: Split a Sequence among ranks as ``OrderedEnqueuer`` does
            (``"auto"``: from ``torch.distributed`` or the launcher). An
            iterable (a generator, a DataLoader, an IterableDataset) is never
            split: ``"auto"`` reads it as it is, since it is split at its
            source if at all, and ``(rank, world_size)`` is an error.
        drop_last: Drop the epoch's tail that does not give every rank a
            whole batch instead of padding it (and, with ``batch_size``,
            keeping a short last batch), as ``OrderedEnqueuer``.
        timeout: Seconds to wait for each batch before ``BatchTimeoutError``.
        transform: Applied to each batch on the device right after its copy,
            on the copy stream: a callable, or a mapping from field to
            callable (``{0: gpuqueue.Normalize(mean, std)}``); see
            ``OrderedEnqueuer``.
        even_batches: Under ``torch.distributed``, stop every rank at the
            first step where one has no batch left (DDP's all-reduce would
            wait for ever); None (the default): for an iterable, whenever
            there are several ranks. See ``consumer/even.py``.
        state: A ``state_dict()`` taken earlier: go on with the batch after it
            (a Sequence's or a per-sample order's, saved on any rank, also on
            another number of ranks: the rest of its epoch is split among
            this world's).
        batch_size: The source's items are samples (a per-sample torch
            ``Dataset``, a Hugging Face ``datasets.Dataset``, an iterable of
            samples): each batch is this many, written straight into its
            pinned or shared-memory slot by torch's ``default_collate``
            rules; see ``OrderedEnqueuer``. Not for a ``DataLoader``, which
            batches itself.
        collate: A function from a list of samples to one batch, instead of
            the default collate (its batch is then packed: one more host copy).
        sampler: With ``batch_size`` on a map-style source, each epoch's
            indices (a torch ``Sampler``, a list).
        batch_sampler: On a map-style source, each epoch's batches as index lists.

    Returns:
        A ``Prefetched``: ``with`` it for the batches (each with the source's
        structure); it has the run's ``stats()`` and ``state_dict()``.

    Raises:
        ValueError: If an argument is out of range, ``epochs`` asks a
            one-shot iterator for more than one pass, or ``shard`` names
            ranks for an iterable.
        TypeError: If ``source`` is neither indexable nor iterable.
        PipelineError: If the device or the ``output`` library is missing,
            the source cannot be pickled for processes, or a
            ``DataLoader`` is given with ``use_multiprocessing=True``.
        Whatever the source raised, as its own type, in place of the batch
        it was reading.
    """
    check_loader_keywords(source, batch_size=batch_size, shuffle=shuffle, workers=workers)
    by_index = reads_by_index(source)
    config = PipelineConfig.of("OrderedEnqueuer" if by_index else "GeneratorEnqueuer", locals())
    enqueuer: SequenceEnqueuer
    if by_index:
        order, reads = order_and_reader(source, locals(), stacklevel=2)
        enqueuer = _configured(OrderedEnqueuer, source, config, order, reads)
    else:
        check_iterable_shard(source, shard)
        for name, value in (("sampler", sampler), ("batch_sampler", batch_sampler)):
            if value is not None:
                raise ValueError(
                    f"{name}= picks indices of a map-style source; {type(source).__name__} "
                    "is read as an iterable"
                )
        iterable = check_iterable_source(
            source, epochs=epochs, use_multiprocessing=use_multiprocessing
        )
        if batch_size is not None and reads_in_batches(source):  # the engine batches (Ray)
            iterable = check_iterable_source(
                EngineBatches(source, batch_size), epochs=epochs, use_multiprocessing=False
            )
        elif batch_size is not None or collate is not None:  # an iterable of samples
            chunks = SampleChunks.of(source, batch_size, drop_last=drop_last, collate=collate)
            iterable = check_iterable_source(
                chunks, epochs=epochs, use_multiprocessing=use_multiprocessing
            )
        if use_multiprocessing:
            check_picklable(iterable, "the generator function or a picklable iterable")
        position = IterableOrder(processes=config.use_multiprocessing)
        enqueuer = _configured(GeneratorEnqueuer, iterable, config, position)
    if state is not None:
        enqueuer.load_state_dict(dict(state))
    return Prefetched(enqueuer, workers, max_queue_size)
