"""Host stage, bundles: fast reads claimed, read and queued together, never held back.

Reads under about ``_BUNDLE_BUDGET_S`` are claimed and queued in bundles of
up to ``_BUNDLE_MOST``, so that the claim, the queue and the consumer's
wake-up cost once a bundle. A bundle never holds a finished batch back: once
it has run ``_BUNDLE_LATE_S``, its worker queues each read as it finishes,
and a consumer waiting on a batch a bundle holds takes the bundle's finished
prefix itself (``hand_over_waited``). ``Bundling`` is ``HostStage``'s side of
this; ``stage.py`` holds the rest of the workers' loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CancelledError
from ..source.order import Task
from ..source.tasks import GeneratorTasks, SequenceTasks
from ..sync.channel import FIFOQueue
from .items import Item
from .sequencer import Sequencer

__all__ = ["Bundling", "OpenBundle"]

# A bundle of reads takes about this long at most (a read this long or longer goes alone),
# and holds at most this many batches: the queue's bound counts bundles.
_BUNDLE_BUDGET_S = 100e-6
_BUNDLE_MOST = 8
# A bundle still reading this long after its first read began is late: its reads are not
# the fast ones bundles are for, and what it has read goes to the queue at once. (Ten
# budgets: a fast bundle on a loaded machine is not taken apart.)
_BUNDLE_LATE_S = 10 * _BUNDLE_BUDGET_S


@dataclass(eq=False)
class OpenBundle:
    """A bundle being read: the tasks ``start`` to ``start + count - 1`` (their seq_nos).

    ``items`` are those read so far, in order (its worker appends to it); the
    first ``taken`` of them went to the queue early (``HostStage._hand_over``).
    ``taken`` and ``done`` change under ``lock``.
    """

    start: int
    count: int
    began: float  # time.perf_counter() when its first read began
    items: list[Item] = field(default_factory=list)
    taken: int = 0
    done: bool = False  # its worker submits the rest: nothing more goes early
    lock: threading.Lock = field(default_factory=threading.Lock)


class Bundling:
    """The bundles of a ``HostStage``: reading them, and handing their finished prefix over."""

    # Set by HostStage.__init__.
    _tasks: SequenceTasks | GeneratorTasks
    _host_queue: FIFOQueue[Item]
    _stopping: Callable[[], bool]
    _bundles: bool
    bundle: int
    sequencer: Sequencer[Item]
    _reading: dict[str, Task | str]
    _open: dict[int, OpenBundle]
    _sleepers: int
    _sleepers_lock: threading.Lock
    _read: Callable[[Task], Item]

    def _commit(self, item: Item) -> None:
        raise NotImplementedError

    def _failed_read(self, task: Task, error: BaseException) -> Item:
        raise NotImplementedError

    def _learn_bundle(self, per_read: float) -> None:
        """How many reads to claim at once, from how long one took."""
        self.bundle = max(1, min(_BUNDLE_MOST, int(_BUNDLE_BUDGET_S / max(per_read, 1e-7))))

    def _read_bundle(self, me: str, claimed: list[Task], claim_wait_s: float) -> None:
        """Reads a bundle of tasks and submits it as one queue item, less what went early.

        Its finished prefix is handed over before the bundle is complete
        (``_hand_over``) once the bundle is late (``_BUNDLE_LATE_S``): after
        each of its reads from then on (here), and while a read is still
        running if the consumer waits for a batch the bundle holds
        (``hand_over_waited``), or before each read while a consumer sleeps.
        Bundles are for fast reads; a slow one must never hold a batch back,
        nor a read that waits for the consumer to take an earlier batch hang.
        """
        tasks, reading, read, failed_read = (
            self._tasks,
            self._reading,
            self._read,
            self._failed_read,
        )
        began = time.perf_counter()
        bundle = OpenBundle(claimed[0].seq_no, len(claimed), began)
        self._open[id(bundle)] = bundle
        batches = failed = 0
        try:
            for task in claimed:
                reading[me] = task
                if self._sleepers and bundle.items:
                    # A consumer sleeps (it found no bundle to wait for): this read may be
                    # slow, or wait for it to take a batch this bundle holds.
                    self._hand_over(bundle)
                try:
                    if task.failure is not None:
                        raise task.failure
                    item = read(task)
                except GeneratorExit:
                    raise
                except CancelledError as error:
                    if self._stopping():  # gpuqueue's own: the pipeline is stopping
                        raise
                    item = failed_read(task, error)  # the source's own: in its place
                except BaseException as error:  # SystemExit too: it belongs in its place
                    item = failed_read(task, error)
                bundle.items.append(item)  # (atomic: _hand_over reads it under the lock)
                if item.error is not None:
                    failed = 1
                    break  # an error ends the bundle (and the run)
                if not item.described.skipped:  # type: ignore[union-attr]
                    batches += 1
                if time.perf_counter() - began > _BUNDLE_LATE_S:
                    # Late: its reads are slow, and what they read goes now.
                    self._hand_over(bundle)
        finally:
            reading.pop(me, None)
            tasks.done_reading(len(claimed), batches + failed)
            with bundle.lock:
                bundle.done = True
                rest, taken = bundle.items[bundle.taken :], bundle.taken
            del self._open[id(bundle)]
        per_read = (time.perf_counter() - began) / (len(bundle.items) or 1)
        self._learn_bundle(per_read)
        if not rest:  # all of it went early
            self.sequencer.unreserve()
            return
        head = rest[0]
        head.claim_wait_s = claim_wait_s
        if len(rest) > 1:
            head.bundle = rest
        self.sequencer.submit(head.task.seq_no, head, span=len(claimed) - taken)

    @property
    def bundles(self) -> bool:
        """Whether fast reads are read and queued in bundles (``hand_over_waited`` matters)."""
        return self._bundles

    def hand_over_waited(self, *, sleeping: bool = False) -> float | None:
        """The consumer is about to wait: a late bundle that holds the next batch hands its
        finished prefix over now.

        Called by the consumer when the queue is empty. What it commits fits
        the queue (``_hand_over`` checks), so the consumer never blocks here.

        Args:
            sleeping: The consumer will now wait without a limit (between
                ``sleep()`` and ``woke()``): whatever a bundle holding the next
                batch has read goes now, whatever its budget.

        Returns:
            How long the consumer may wait before it calls again with
            ``sleeping``: what is left before that bundle is late (its reads
            are fast, and it will come whole), or, with no bundle holding the
            next batch yet, the time a bundle has before it is late. None
            with ``sleeping``.
        """
        next_seq_no = self.sequencer.next_seq_no
        for bundle in list(self._open.values()):
            if bundle.start <= next_seq_no < bundle.start + bundle.count:
                left = bundle.began + _BUNDLE_LATE_S - time.perf_counter()
                if left > 0 and not sleeping:
                    return left
                self._hand_over(bundle)
                return None
        return None if sleeping else _BUNDLE_LATE_S

    def sleep(self) -> None:
        """A consumer waits without a limit: bundles hand over each read from now on."""
        with self._sleepers_lock:
            self._sleepers += 1

    def woke(self) -> None:
        """Ends a ``sleep()``."""
        with self._sleepers_lock:
            self._sleepers -= 1

    def _hand_over(self, bundle: OpenBundle) -> None:
        """Commits a bundle's finished prefix now, if it is next in order and the queue has room.

        Only while reads of the bundle are left: a complete bundle is its worker's
        to submit, so the turn taken here ends inside the bundle, where no other
        item can be waiting to be committed. The bundle's lock is held
        throughout, so its worker's final submit comes after, in order.
        """
        with bundle.lock:
            finished = len(bundle.items)
            if bundle.done or finished in (bundle.taken, bundle.count):
                return
            host_queue = self._host_queue
            room = lambda: host_queue.qsize() < host_queue.capacity  # noqa: E731
            if not self.sequencer.take_turn(bundle.start + bundle.taken, room):
                return
            parts = bundle.items[bundle.taken : finished]
            bundle.taken = finished
            head = parts[0]
            if len(parts) > 1:
                head.bundle = parts
            try:
                self._commit(head)
            finally:
                self.sequencer.end_turn(len(parts))
