"""Where batches come from, and in what order.

``Sequence`` is Keras's dataset interface; ``epoch_order`` draws an epoch's
(seeded, sharded) order and ``ReadingOrder`` remembers where a rank is in
it; ``SequenceTasks`` and ``GeneratorTasks`` hand the workers one task at a
time in stream order.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CancelledError, OutOfRangeError, PipelineError, add_note

__all__ = [
    "GeneratorTasks",
    "ReadingOrder",
    "Sequence",
    "SequenceTasks",
    "Task",
    "epoch_order",
    "resolve_shard",
]


# Launcher variables, in the order they are tried: torchrun, then Open MPI.
_LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"))


class Sequence:
    """A dataset of batches indexed ``0 .. len - 1``, as ``keras.utils.Sequence``.

    Subclasses implement ``__getitem__`` (one whole batch per index) and
    ``__len__`` (the number of batches in an epoch), and may override
    ``on_epoch_end``, which the enqueuers call once every read of an epoch
    has finished and before any read of the next.

    Subclassing is optional: anything with ``__len__`` and ``__getitem__`` is
    read the same way (a list or array of batches, a torch map-style
    ``Dataset`` of batches, a Keras 3 ``PyDataset``, a ``tf_keras`` Sequence),
    and its ``on_epoch_end`` is called when it has one.
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


@dataclass
class ReadingOrder:
    """What a rank reads of a Sequence, epoch after epoch, and how far its consumer got.

    Args:
        shuffle: Read each epoch in a permutation drawn from ``(seed, epoch)``.
        seed: The shuffling seed (ranks must share it).
        shard: ``(rank, world_size)``, as ``resolve_shard`` returns it.
        epochs: How many epochs to read; None is endless.
        epoch, position: The next batch to deliver: ``position`` of
            ``epoch``'s order.
    """

    shuffle: bool
    seed: int
    shard: tuple[int, int]
    epochs: int | None = None
    epoch: int = 0
    position: int = 0

    @classmethod
    def of(
        cls,
        sequence: Any,
        *,
        shuffle: bool,
        seed: int | None,
        shard: tuple[int, int] | str | None,
        epochs: int | None,
    ) -> ReadingOrder:
        """The order of a new enqueuer, its arguments checked; a seed is drawn if none is given.

        Raises:
            ValueError: If ``epochs`` or ``shard`` is malformed, or several
                ranks shuffle without a shared ``seed``.
            PipelineError: If the Sequence is empty.
        """
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or a positive int, got {epochs!r}")
        rank_and_size = resolve_shard(shard)
        if shuffle and seed is None and rank_and_size[1] > 1:
            raise ValueError(
                f"shuffling across {rank_and_size[1]} ranks needs a seed that every rank shares"
            )
        length = len(sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length})")
        seed = seed if seed is not None else secrets.randbits(63)
        return cls(shuffle, seed, rank_and_size, epochs)

    def tasks(self, sequence: Any) -> SequenceTasks:
        """The tasks of a run that starts at the next batch to deliver."""
        return SequenceTasks(
            sequence,
            shuffle=self.shuffle,
            seed=self.seed,
            shard=self.shard,
            epoch=self.epoch,
            position=self.position,
            epochs=self.epochs,
        )

    def received(self, task: Task) -> None:
        """The consumer received ``task``: the next to deliver is the one after it."""
        self.epoch, self.position = task.epoch, task.position + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard": self.shard,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state_dict()``'s point, after checking it fits this order.

        Raises:
            ValueError: If ``state`` lacks a field or disagrees with this
                order's ``shuffle`` or ``shard``.
        """
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        for name in ("shuffle", "shard"):
            if name in state and tuple(np.atleast_1d(state[name])) != tuple(
                np.atleast_1d(getattr(self, name))
            ):
                raise ValueError(
                    f"state has {name}={state[name]!r}, but this enqueuer has "
                    f"{name}={getattr(self, name)!r}"
                )
        for name in ("epoch", "position"):
            if not isinstance(state[name], int) or state[name] < 0:
                raise ValueError(f"state {name} must be an int >= 0, got {state[name]!r}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


@dataclass
class Task:
    """One unit of work a worker claimed: where it sits in the stream, what to read."""

    seq_no: int
    epoch: int
    position: int
    index: int | None = None  # the Sequence index; None for a generator's item
    batch: Any = None  # a generator's item, read while claiming
    failure: BaseException | None = None  # an error that belongs at this point
    boundary: bool = False  # the end of epoch ``epoch - 1`` (on_epoch_end), not a read

    def where(self) -> str:
        if self.boundary:
            return f"the end of epoch {self.epoch - 1} (on_epoch_end)"
        if self.index is None:
            return f"generator item {self.position}"
        return f"batch index {self.index} (epoch {self.epoch}, position {self.position})"


def overrides_on_epoch_end(sequence: Any) -> bool:
    """True if ``sequence`` has an ``on_epoch_end`` of its own (not the no-op base)."""
    method = getattr(type(sequence), "on_epoch_end", None)
    return method is not None and method is not Sequence.on_epoch_end


class _TaskSource:
    """Hands out tasks in stream order; subclasses decide what a task reads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq_no = 0
        self._ended = False

    def close(self) -> None:
        """Ends the stream: every later or blocked ``claim`` raises ``OutOfRangeError``."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def claim(self) -> Task:
        raise NotImplementedError

    def read(self, task: Task) -> Any:
        raise NotImplementedError

    def done_reading(self, task: Task) -> None:
        """Called once the read of ``task`` has finished, whatever its outcome."""

    def _next_seq_no(self) -> int:
        seq_no = self._seq_no
        self._seq_no += 1
        return seq_no


class SequenceTasks(_TaskSource):
    """Indices of a Sequence, epoch after epoch, with ``on_epoch_end`` between.

    ``on_epoch_end`` runs in the worker that finds the epoch exhausted once
    every read of the epoch has finished; the other workers wait for it, so no
    read of the next epoch starts before it returns.
    """

    def __init__(
        self,
        sequence: Any,
        *,
        shuffle: bool,
        seed: int,
        shard: tuple[int, int],
        epoch: int = 0,
        position: int = 0,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        self._epochs = epochs
        self._sequence = sequence
        self._shuffle = shuffle
        self._seed = seed
        self._shard = shard
        self._epoch = epoch
        self._position = position
        self._order = self._make_order(epoch)
        self._reads_in_flight = 0
        self._boundary_waiters = 0  # workers waiting for the epoch's last read
        self._epoch_end_running = False
        # Called after on_epoch_end(), before the next epoch's first read.
        self.epoch_ended: Callable[[], None] | None = None

    def _make_order(self, epoch: int) -> np.ndarray:
        length = len(self._sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length}) at epoch {epoch}")
        order = epoch_order(
            length, epoch, shuffle=self._shuffle, seed=self._seed, shard=self._shard
        )
        if len(order) == 0:
            raise PipelineError(
                f"shard {self._shard} gets no batch of a Sequence of length {length} "
                f"at epoch {epoch}"
            )
        return order

    def claim(self) -> Task:
        with self._cond:
            while True:
                if self._ended:
                    raise OutOfRangeError("the stream has ended")
                if self._position < len(self._order):
                    task = Task(
                        self._next_seq_no(),
                        self._epoch,
                        self._position,
                        index=int(self._order[self._position]),
                    )
                    self._position += 1
                    self._reads_in_flight += 1
                    return task
                if self._reads_in_flight == 0 and not self._epoch_end_running:
                    self._epoch_end_running = True
                    break
                self._boundary_waiters += 1
                try:
                    self._cond.wait()
                finally:
                    self._boundary_waiters -= 1
        # The epoch's last read has finished and nobody else may start one.
        failure = None
        try:
            # Optional, as for any map-style dataset: called when present.
            on_epoch_end = getattr(self._sequence, "on_epoch_end", None)
            if on_epoch_end is not None:
                on_epoch_end()
            last = self._epochs is not None and self._epoch + 1 >= self._epochs
            order = self._order if last else self._make_order(self._epoch + 1)
            if self.epoch_ended is not None:
                self.epoch_ended()
        except BaseException as error:
            add_note(error, f"raised by on_epoch_end() after epoch {self._epoch}")
            failure = error
        with self._cond:
            self._epoch_end_running = False
            self._epoch += 1
            self._position = 0
            self._cond.notify_all()
            if self._epochs is not None and self._epoch >= self._epochs and failure is None:
                self._ended = True
                raise OutOfRangeError(f"all {self._epochs} epochs were read")
            if failure is not None:
                self._ended = True
                return Task(self._next_seq_no(), self._epoch, 0, failure=failure, boundary=True)
            self._order = order
        return self.claim()

    def read(self, task: Task) -> Any:
        return self._sequence[task.index]

    def done_reading(self, task: Task) -> None:
        with self._cond:
            self._reads_in_flight -= 1
            if self._reads_in_flight == 0 and self._boundary_waiters:
                self._cond.notify_all()


class GeneratorTasks(_TaskSource):
    """Items of an iterator, read one at a time.

    The iterator need not be thread-safe: a read lock lets one worker call
    it at a time. The state lock is never held while user code runs, so
    ``close()`` (from ``stop()``) never waits for a generator stuck in
    ``next()``. Once the iterator raised, or ended, it is never called again,
    even if it would yield more.

    Args:
        iterable: What to read; ``None`` when ``fetch`` is set later.
        fetch: Replaces ``next(iterator)``: called with the item's position,
            it returns the item, or raises ``StopIteration`` or
            ``OutOfRangeError`` at the end (a worker process reading the
            generator uses this).
    """

    def __init__(
        self, iterable: Iterable[Any] | None, fetch: Callable[[int], Any] | None = None
    ) -> None:
        super().__init__()
        self._read_lock = threading.Lock()
        if fetch is None:
            assert iterable is not None
            iterator = iter(iterable)

            def fetch(position: int) -> Any:
                return next(iterator)

        self.fetch = fetch

    def claim(self) -> Task:
        with self._read_lock:  # one reader at a time; held while user code runs
            with self._cond:
                if self._ended:
                    raise OutOfRangeError("the generator is exhausted")
                position = self._seq_no  # taken only once an item (or an error) exists
            try:
                batch = self.fetch(position)
            except (StopIteration, OutOfRangeError):
                self.close()
                raise OutOfRangeError("the generator is exhausted") from None
            except CancelledError:
                raise
            except BaseException as error:
                with self._cond:
                    self._ended = True
                    return Task(self._next_seq_no(), 0, position, failure=error)
            with self._cond:
                return Task(self._next_seq_no(), 0, position, batch=batch)

    def read(self, task: Task) -> Any:
        return task.batch
