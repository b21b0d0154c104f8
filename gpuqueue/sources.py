"""Where batches come from, and in what order.

``Sequence`` is Keras's dataset interface; ``epoch_order`` draws an epoch's
(seeded, sharded) order and ``ReadingOrder`` remembers where a rank is in
it; ``SequenceTasks`` and ``GeneratorTasks`` hand the workers one task at a
time in stream order.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .distributed import Shard, batches_per_rank, resolve_shard
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


def epoch_order(
    length: int,
    epoch: int,
    *,
    shuffle: bool,
    seed: int,
    shard: tuple[int, int] = (0, 1),
    drop_last: bool = False,
) -> np.ndarray:
    """The indices one rank reads in ``epoch``, in order.

    The epoch's order is a permutation drawn from ``(seed, epoch)`` when
    shuffled (so every rank, and every rerun, with the same seed agrees on
    it), else ``0 .. length - 1``. Rank ``r`` of ``w`` takes positions
    ``r, r + w, r + 2w, ...`` of it, as ``DistributedSampler`` does, so every
    rank reads the same number of batches (``batches_per_rank``): the order
    is first extended to ``ceil(length / w) * w`` positions by wrapping
    around (repeating it as often as needed when ``w > length``), or, with
    ``drop_last``, cut to ``(length // w) * w``. Together the ranks read
    every index once, plus the padding (the order's first batches, read
    again) or less the dropped tail.

    Raises:
        PipelineError: If ``drop_last`` leaves no batch for a rank.
    """
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(length)
    else:
        order = np.arange(length)
    rank, world_size = shard
    total = batches_per_rank(length, world_size, drop_last) * world_size
    if total > length:
        order = np.tile(order, -(-total // length))
    return order[rank:total:world_size]


@dataclass
class ReadingOrder:
    """What a rank reads of a Sequence, epoch after epoch, and how far its consumer got.

    Args:
        shuffle: Read each epoch in a permutation drawn from ``(seed, epoch)``.
        seed: The shuffling seed (ranks must share it).
        shard: Which rank of how many this process is, and how it knows.
        drop_last: Drop each epoch's tail instead of padding it, when the
            ranks cannot all read as many batches.
        epochs: How many epochs to read; None is endless.
        epoch, position: The next batch to deliver: ``position`` of
            ``epoch``'s order.
    """

    shuffle: bool
    seed: int
    shard: Shard
    drop_last: bool = False
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
        drop_last: bool,
        epochs: int | None,
    ) -> ReadingOrder:
        """The order of a new enqueuer, its arguments checked; a seed is drawn if none is given.

        Raises:
            ValueError: If ``epochs`` or ``shard`` is malformed, or several
                ranks shuffle without a shared ``seed``.
            PipelineError: If the Sequence is empty, or ``drop_last`` leaves
                a rank nothing to read.
        """
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be None or a positive int, got {epochs!r}")
        resolved = resolve_shard(shard)
        if shuffle and seed is None and resolved.world_size > 1:
            raise ValueError(
                f"shuffling across {resolved.world_size} ranks needs a seed that every rank shares"
            )
        length = len(sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length})")
        batches_per_rank(length, resolved.world_size, bool(drop_last))
        seed = seed if seed is not None else secrets.randbits(63)
        return cls(bool(shuffle), seed, resolved, bool(drop_last), epochs)

    def tasks(self, sequence: Any) -> SequenceTasks:
        """The tasks of a run that starts at the next batch to deliver."""
        return SequenceTasks(
            sequence,
            shuffle=self.shuffle,
            seed=self.seed,
            shard=self.shard.pair,
            drop_last=self.drop_last,
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
            "shard": self.shard.pair,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from ``state_dict()``'s point, after checking it fits this order.

        Raises:
            ValueError: If ``state`` lacks a field or disagrees with this
                order's ``shuffle``, ``shard`` or ``drop_last``.
        """
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        mine = self.state_dict()
        for name in ("shuffle", "shard", "drop_last"):
            if name in state and tuple(np.atleast_1d(state[name])) != tuple(
                np.atleast_1d(mine[name])
            ):
                raise ValueError(
                    f"state has {name}={state[name]!r}, but this enqueuer has {name}={mine[name]!r}"
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

    def claim_several(self, most: int) -> list[Task]:
        """Up to ``most`` tasks in a row, under one ``seq_no``: they travel as one queue item."""
        return [self.claim()]

    def done_reading(self, reads: int, batches: int) -> None:
        """Called once ``reads`` claimed tasks have finished reading, whatever their outcome.

        ``batches`` of them gave a batch or an error (the others gave None, or
        were never read because an error came before them).
        """

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
        drop_last: bool = False,
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
        self._drop_last = drop_last
        self._epoch = epoch
        self._position = position
        self._order = self._make_order(epoch)
        self._reads_in_flight = 0
        self._boundary_waiters = 0  # workers waiting for the epoch's last read
        self._epoch_end_running = False
        # Reads this epoch that gave a batch (or an error), not None; judged only
        # for an epoch read from its start (a resumed one may rightly have none left).
        self._batches_in_epoch = 0
        self._whole_epoch = position == 0
        # Called after on_epoch_end(), before the next epoch's first read.
        self.epoch_ended: Callable[[], None] | None = None

    def _make_order(self, epoch: int) -> np.ndarray:
        length = len(self._sequence)
        if length <= 0:
            raise PipelineError(f"the Sequence is empty (len() returned {length}) at epoch {epoch}")
        try:
            return epoch_order(
                length,
                epoch,
                shuffle=self._shuffle,
                seed=self._seed,
                shard=self._shard,
                drop_last=self._drop_last,
            )
        except PipelineError as error:
            add_note(error, f"at epoch {epoch}")  # len() may change between epochs
            raise

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
        failure: BaseException | None = None
        order = self._order
        if self._whole_epoch and self._batches_in_epoch == 0:
            # Else the next epoch would be as empty, and the next: workers would spin
            # and the consumer wait for ever.
            failure = PipelineError(
                f"epoch {self._epoch} gave no batch: the Sequence returned None for "
                f"every one of its {len(self._order)} items"
            )
        else:
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
            self._batches_in_epoch = 0
            self._whole_epoch = True
            self._cond.notify_all()
            if self._epochs is not None and self._epoch >= self._epochs and failure is None:
                self._ended = True
                raise OutOfRangeError(f"all {self._epochs} epochs were read")
            if failure is not None:
                self._ended = True
                return Task(self._next_seq_no(), self._epoch, 0, failure=failure, boundary=True)
            self._order = order
        return self.claim()

    def claim_several(self, most: int) -> list[Task]:
        """Up to ``most`` tasks of this epoch (the end of an epoch is claimed alone)."""
        if most > 1:
            with self._cond:
                start, left = self._position, len(self._order) - self._position
                if not self._ended and left > 1:
                    count = min(most, left)
                    seq_no, epoch = self._next_seq_no(), self._epoch
                    indices = self._order[start : start + count].tolist()
                    self._position += count
                    self._reads_in_flight += count
                    return [
                        Task(seq_no, epoch, start + offset, index=index)
                        for offset, index in enumerate(indices)
                    ]
        return [self.claim()]

    def read(self, task: Task) -> Any:
        return self._sequence[task.index]

    def done_reading(self, reads: int, batches: int) -> None:
        with self._cond:
            self._reads_in_flight -= reads
            self._batches_in_epoch += batches
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
