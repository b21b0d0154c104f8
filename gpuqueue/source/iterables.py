"""Source stage, iterables: reading an iterable epoch after epoch, and resuming it.

A re-iterable source (``iter()`` starts over: a list, a torch ``DataLoader``,
a torch or Hugging Face ``IterableDataset``) is read ``epochs`` times by
``Epochs``, which calls ``set_epoch`` between them; a one-shot iterator (a
generator) can be read once. ``IterableOrder`` is the iterable's counterpart
of ``order.ReadingOrder``: where the consumer is (the epoch, the items of it
received, the source's own state after the last of them), and how a new run
goes on from there.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import PipelineError
from .engines import EngineBatches, reads_in_batches
from .kinds import is_torch_class, is_torch_dataloader
from .order import Task
from .tasks import GeneratorTasks

__all__ = [
    "Epochs",
    "IterableOrder",
    "check_iterable_source",
    "epoch_setters",
    "next_only",
    "takes_no_arguments",
]


def _one_shot(source: Any) -> bool:
    # An iterator is its own iterator: a second iter() continues, never restarts.
    # Told apart without calling iter(), which starts a DataLoader's workers. A torch
    # IterableDataset is iterated anew each epoch (by DataLoader's contract), also one
    # that is its own iterator and restarts in __iter__ (litdata's StreamingDataset).
    return hasattr(source, "__next__") and not is_torch_class(source, "IterableDataset")


def check_iterable_source(source: Any, *, epochs: int | None, use_multiprocessing: bool) -> Any:
    """What a ``GeneratorEnqueuer`` reads for an iterable ``source`` and ``epochs``.

    With processes ``source`` may also be a generator function, which the
    worker process calls (whether it pickles is the process launcher's
    check, ``host.pickling.check_picklable``).

    Returns:
        ``source`` itself for one pass (``epochs`` None or 1), else ``Epochs``;
        a source read by its own ``iter_batches`` (Ray) as ``EngineBatches``.

    Raises:
        TypeError: If ``source`` is not iterable (or, with processes, a
            generator function).
        ValueError: If ``epochs`` is not None or a positive int, or asks a
            one-shot iterator (a generator) for more than one pass.
        PipelineError: If ``source`` is a torch ``DataLoader`` or a Ray dataset
            and ``use_multiprocessing`` is set: they read in processes of
            their own (``num_workers``, Ray's workers).
    """
    if reads_in_batches(source):
        if use_multiprocessing:
            raise PipelineError(
                f"use_multiprocessing=True cannot take a {type(source).__name__}: it reads in "
                "Ray's own workers; pass it with use_multiprocessing=False, and gpuqueue pins, "
                "copies and overlaps its batches"
            )
        source = EngineBatches(source)
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


class Epochs:
    """Reads a re-iterable source epoch after epoch, one fresh ``iter()`` per epoch.

    With several epochs, before epoch ``e`` (counted from 0) it calls
    ``set_epoch(e)`` on whatever of the source has one: the source itself (a
    torch or Hugging Face ``IterableDataset``), and for a torch
    ``DataLoader`` its sampler (a ``DistributedSampler`` reshuffles by
    epoch), batch sampler and dataset, so that each epoch is drawn anew, as
    a loop that calls ``sampler.set_epoch(epoch)`` would. One pass leaves
    the epoch to the caller. ``epoch`` and ``position`` say where the last
    item read came from (``GeneratorEnqueuer.state_dict``). Picklable when
    the source is, so a worker process can run it.

    Args:
        source: An iterable whose ``iter()`` starts over (or, for one pass,
            any iterable).
        epochs: How many passes, counted from epoch 0.
        start: The epoch to begin with (a resumed run).
        skip: Items of the first epoch read to skip (a resumed run whose
            source keeps no state of its own); 0 when it restored its own.
    """

    def __init__(self, source: Iterable[Any], epochs: int, *, start: int = 0, skip: int = 0):
        self.source = source
        self.epochs = epochs
        self.start, self.skip = start, skip
        self.epoch, self.position = start, skip
        # Looked up once: ``state`` runs after every item a thread reads.
        self._keeps_state = takes_no_arguments(getattr(source, "state_dict", None))

    def __iter__(self) -> Iterator[Any]:
        for epoch in range(self.start, self.epochs):
            if self.epochs > 1:
                for part in epoch_setters(self.source):
                    part.set_epoch(epoch)
            skip = self.skip if epoch == self.start else 0
            self.epoch, self.position = epoch, skip
            items = next_only(iter(self.source))
            for _ in range(skip):
                if next(items, _END) is _END:
                    break
            for item in items:
                self.position += 1
                yield item

    def state(self) -> dict[str, Any]:
        """Where the last item read came from, and the source's own state right after it."""
        own = self.source.state_dict() if self._keeps_state else None  # type: ignore[attr-defined]
        return {"epoch": self.epoch, "position": self.position, "source": own_copy(own)}


_END = object()


def next_only(iterator: Iterator[Any]) -> Iterator[Any]:
    """``iterator``'s items through ``next()`` alone, in a generator (its own ``iter()``).

    A ``for`` loop or ``islice`` over a source's iterator calls ``iter()`` on
    it again, and a source that is its own iterator may start over there
    (litdata's ``StreamingDataset``), undoing a skip or repeating the epoch's
    first batch.
    """
    while (item := next(iterator, _END)) is not _END:
        yield item


def takes_no_arguments(method: Any) -> bool:
    """True if ``method`` is a callable that can be called with no arguments.

    A ``state_dict`` that needs arguments (litdata's and Mosaic's
    ``StreamingDataset`` take the samples their loader yielded) is not a state
    gpuqueue can take of a source by itself; such a source resumes by reading
    its epoch again, as one without a state does (``resumable``).
    """
    if not callable(method):
        return False
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): call it as before
        return True
    return all(
        parameter.default is not parameter.empty
        or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        for parameter in parameters
    )


def own_copy(state: Any) -> Any:
    """``state`` with every dict in it copied (other values shared), cheaply.

    A source may return the same dict from each ``state_dict()`` and update it
    in place, or keep the dict ``load_state_dict`` was given and update that
    (litdata's ``StreamingDataset`` does both after a resume): a snapshot kept
    as it is would change as the workers read ahead, and so would the caller's
    saved state. Dicts are where they are updated; a deep copy of every list
    in a large dataset's state (one entry per chunk) would cost each item.
    """
    if isinstance(state, dict):
        return {key: own_copy(value) for key, value in state.items()}
    return state


def resumable(source: Any, state: Mapping[str, Any] | None) -> Epochs:
    """What a run reads of an iterable: its epochs, from ``state`` (``Epochs.state``) if given.

    A source with a ``load_state_dict`` of its own gets its saved state back
    and goes on from there; any other is read from the start of the saved
    epoch, its items up to the saved position skipped.
    """
    epochs = source if isinstance(source, Epochs) else Epochs(source, 1)
    if state is None:
        return Epochs(epochs.source, epochs.epochs)
    restore = getattr(epochs.source, "load_state_dict", None)
    skip = int(state["position"])
    if state["source"] is not None and callable(restore):
        restore(own_copy(state["source"]))  # the caller's saved state stays as it was
        skip = 0
    return Epochs(epochs.source, epochs.epochs, start=int(state["epoch"]), skip=skip)


def epoch_setters(source: Any) -> list[Any]:
    """The parts of ``source`` with a ``set_epoch``: itself, and a DataLoader's sampling.

    Each object once, though a DataLoader's batch sampler holds its sampler.
    """
    parts = [source]
    if is_torch_dataloader(source):
        batch_sampler = getattr(source, "batch_sampler", None)
        parts += [
            getattr(source, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
            getattr(source, "dataset", None),
        ]
    setters: dict[int, Any] = {}
    for part in parts:
        if part is not None and callable(getattr(part, "set_epoch", None)):
            setters.setdefault(id(part), part)
    return list(setters.values())


class IterableOrder:
    """Where the consumer of an iterable is, and where a new run of it starts.

    The workers snapshot ``Epochs.state`` right after each item they read
    (``GeneratorTasks.snapshot``); ``received`` keeps the snapshot of the
    last item the consumer took, so ``state_dict`` is what was consumed, not
    what was read ahead. With ``processes`` the source is read in a worker
    process, where its state is, and there is none to hand back here.
    """

    def __init__(self, *, processes: bool) -> None:
        self._processes = processes
        self._last: dict[str, Any] | None = None
        self._resume: Mapping[str, Any] | None = None
        self._used = False  # a run was started: a one-shot source is consumed

    def tasks(self, source: Any) -> GeneratorTasks:
        """The tasks of a new run of ``source``: its epochs, from a loaded state if any.

        Raises:
            PipelineError: If a one-shot source was consumed by an earlier run.
        """
        snapshot = None
        if not self._processes:  # (a worker process reads it, where its state is)
            state, self._resume = self._resume, None
            source = resumable(source, state)
            snapshot = source.state
        tasks = GeneratorTasks.for_run(source, self._processes, used=self._used, snapshot=snapshot)
        self._used = True
        return tasks

    def received(self, task: Task) -> None:
        """The consumer received ``task``."""
        self._last = task.state

    def epoch(self) -> int:
        """The epoch of the last item received (0 when read in a process: not known here)."""
        return int(self._last["epoch"]) if self._last else 0

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "source"}`` of the last item received.

        Raises:
            PipelineError: With processes.
        """
        self._check()
        return dict(self._last) if self._last else {"epoch": 0, "position": 0, "source": None}

    def _check(self) -> None:
        if self._processes:
            raise PipelineError(
                "an iterable's state_dict() needs use_multiprocessing=False: with processes "
                "it is read in a worker process, where its state is"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next run goes on after ``state``'s item.

        Raises:
            PipelineError: With processes.
            ValueError: If ``state`` lacks a field.
        """
        self._check()
        missing = {"epoch", "position", "source"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        self._resume = dict(state)
