"""Host stage, what travels on the queues: an ``Item`` per batch (or the error in its place),
the ``Described`` structure of what a worker read, and the run's ``Counters``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..batch.layout import Staged
from ..batch.tree import LeafMeta, TreeDef
from ..source.order import Task

__all__ = ["Counters", "Described", "Item"]


@dataclass
class Described:
    """A batch a worker read: its structure, and its staged copy if it has one.

    Batches a thread hands over as they are travel in their ``Item``; those
    shaped like the plan share one ``Described``, the plan's.
    """

    treedef: TreeDef
    metas: list[LeafMeta]
    staged: Staged | None = None  # packed in a pinned or shared-memory slot
    skipped: bool = False  # the source returned None


@dataclass
class Item:
    """What travels on the queues: a batch, a skipped item, or the error in its place."""

    task: Task
    described: Described | None = None
    batch: Any = None  # the user's own batch, handed over as it is (device=None, threads)
    error: BaseException | None = None
    # Its device copy (``device.copied.Copied``), once the copy stage made it; typed
    # loosely so that the host stage does not import the device stage.
    copied: Any = None
    # Several batches claimed and read together (this item first), as one queue item.
    bundle: list[Item] | None = None
    claim_wait_s: float = 0.0  # how long its worker waited for room before claiming it

    @property
    def staged(self) -> Staged | None:
        return None if self.described is None else self.described.staged

    def release_staging(self) -> None:
        """Returns a staging slot the item still holds (when it is dropped)."""
        if self.staged is not None:
            self.staged.release(None)


@dataclass
class Counters:
    """What ``stats()`` reports of the host stage and the consumer; change under ``lock``.

    ``consumed`` is the exception: each consumer counts its batches in a cell
    of its own (``consumer``), read under ``lock`` by whoever sums them.
    """

    produced: int = 0
    consumer_wait_s: float = 0.0
    producer_blocked_s: float = 0.0
    occupancy_sum: int = 0  # batches queued, summed over the consumer's gets
    gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Batches delivered: by consumers that have ended, and by each live one in a
    # cell of its own that only it adds to, so a batch costs it no lock.
    consumed_before: int = 0
    consumer_cells: list[list[int]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)  # when start() began
    startup_s: float | None = None  # from start() to the first batch delivered

    @property
    def consumed(self) -> int:
        """Batches delivered to the consumers, up to the last one each received."""
        return self.consumed_before + sum(cell[0] for cell in self.consumer_cells)

    def consumer(self) -> list[int]:
        """A new consumer's cell: it adds 1 to ``cell[0]`` for each batch it delivers."""
        cell = [0]
        with self.lock:
            self.consumer_cells.append(cell)
        return cell

    def consumer_ended(self, cell: list[int]) -> None:
        """Folds an ended consumer's cell into ``consumed_before``."""
        with self.lock:
            self.consumer_cells.remove(cell)
            self.consumed_before += cell[0]
