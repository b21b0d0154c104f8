"""Host stage, workers: what each worker thread does, and what travels on the queues.

Each call of a worker's enqueue op (a ``QueueRunner`` runs them):

1. claims the next task (an index of the epoch's order, or the next item of a
   generator, read under a lock), once fewer than ``workers`` items are out;
2. reads the batch and, when a device is set, packs it into a pinned slot (in
   parallel with the other workers, in a thread or in its own process);
3. hands it to the ``Sequencer``: if every item before it is on the queue, it
   checks the batch against the first and puts it on the bounded host queue,
   then does the same for the items after it that others finished early;
   otherwise it leaves the item for whoever completes the turn and goes on.
   The queue holds batches in exactly the read order, and no worker waits
   for another's turn.

An error while reading travels down the queue in its place (an ``Item``
whose ``error`` is set), so the consumer gets every batch before it first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..batch.layout import Staged, device_ready, layout
from ..batch.plan import Plan
from ..batch.rows import row_layout, write_rows
from ..batch.spec import BatchSpec
from ..batch.tree import LeafMeta, TreeDef, describe
from ..errors import CancelledError, note_thread
from ..source.collate import Samples, default_collate, warn_if_a_sample
from ..source.order import Task
from ..source.tasks import GeneratorTasks, SequenceTasks
from ..sync.channel import FIFOQueue
from .bundles import Bundling, OpenBundle
from .items import Counters, Described, Item
from .pinned import PinnedPool
from .sequencer import Sequencer

__all__ = ["HostStage"]


_SKIPPED = Described(TreeDef("leaf"), [], skipped=True)

_UNREAD: Any = object()  # _read_in_thread's batch when it is to read the batch itself


# What a worker is at while it claims a task (for a generator, that is its next()).
_CLAIMING = "the next item (a generator's next(), or on_epoch_end() between epochs)"


class HostStage(Bundling):
    """The workers of one run, from claiming a task to its item on the host queue, in order.

    The worker threads hold this, never the enqueuer, so an enqueuer nobody
    holds can be collected (and its finaliser stop them) while they run.

    Args:
        tasks: Hands out the tasks in stream order.
        host_queue: Where committed items go, in order.
        counters: The run's counters.
        workers: Number of workers: at most this many items are out at once,
            as each staging pool counts on.
        pinned: Packs thread workers' batches for the copy; None without a device.
        processes: The worker processes (``processes.ProcessPool``), if any.
        device: Batches go to a device: each staged batch is made ready for it
            (byte order, dtypes) by the worker that read it, and checked against
            the first batch's dtypes and ranks. Without one, batches are handed
            over as they are and only their structure is checked.
        stopping: True once the run is stopping (``Coordinator.should_stop``):
            a ``CancelledError`` raised then is gpuqueue's own; one raised
            before is the source's, and goes in its batch's place.
        samples: The source's items are ``Samples`` (``batch_size=``): a thread
            with a pinned slot writes them into it row by row; one without
            stacks them (``default_collate``).
        look_for_samples: Warn if the first batch looks like one sample
            (a map-style source read as batches, not already warned about).
    """

    def __init__(
        self,
        tasks: SequenceTasks | GeneratorTasks,
        host_queue: FIFOQueue[Item],
        counters: Counters,
        *,
        workers: int,
        pinned: PinnedPool | None,
        processes: Any,
        device: bool,
        stopping: Callable[[], bool] = lambda: False,
        samples: bool = False,
        look_for_samples: bool = False,
    ) -> None:
        self._tasks, self._host_queue, self._counters = tasks, host_queue, counters
        self._stopping = stopping
        self._pinned, self._processes, self._device = pinned, processes, device
        self._spec: BatchSpec | None = None  # the first batch's structure, dtypes and ranks
        self._plan: Plan | None = None  # splits batches shaped like one read earlier
        # Without staging: the plan, and the structure of every batch it matches.
        self._as_is: tuple[Plan, Described] | None = None
        self._checked: list[LeafMeta] | None = None  # a layout whose batches pass the check
        self.sequencer: Sequencer[Item] = Sequencer(
            self._commit, Item.release_staging, limit=workers
        )
        self._read = self._read_in_process if processes is not None else self._read_in_thread
        if samples and processes is None:
            self._read = self._read_samples_in_thread
        self._look_for_samples = look_for_samples
        # Fast reads handed to the consumer as they are are claimed and queued in
        # bundles, so that the claim, the queue and the wake-up cost once a bundle.
        self._bundles = pinned is None and processes is None and isinstance(tasks, SequenceTasks)
        self.bundle = 1  # batches to claim at once, from how long a read took
        # What each worker thread is at, by thread name: a task, or _CLAIMING. Kept
        # as is and worded only for a message, off the per-batch path.
        self._reading: dict[str, Task | str] = {}
        # Bundles being read, by id: the consumer takes a finished prefix from them.
        self._open: dict[int, OpenBundle] = {}
        self._sleepers = 0  # consumers waiting with no bundle's budget to wait for
        self._sleepers_lock = threading.Lock()

    def enqueue_op(self, number: int) -> Callable[[], None]:
        """Worker ``number``'s enqueue op: claim, read, then hand the item in to be committed."""
        tasks, sequencer, reading = self._tasks, self.sequencer, self._reading
        read, failed_read, stopping = self._read, self._failed_read, self._stopping

        def enqueue_one() -> None:
            started = time.monotonic()
            sequencer.reserve()  # waits while enough items are out (bounds staging slots)
            me = threading.current_thread().name
            reading[me] = _CLAIMING
            try:
                # OutOfRangeError here ends this worker cleanly.
                claimed = tasks.claim_several(self.bundle) if self._bundles else [tasks.claim()]
            except BaseException:
                reading.pop(me, None)
                sequencer.unreserve()
                raise
            claim_wait_s = time.monotonic() - started
            if len(claimed) > 1:
                self._read_bundle(me, claimed, claim_wait_s)
                return
            items: list[Item] = []
            began = time.perf_counter()
            batches = failed = 0
            try:
                for task in claimed:
                    # Inline, not a method: this runs for every batch.
                    reading[me] = task
                    try:
                        if task.failure is not None:
                            raise task.failure
                        item = read(task)
                    except GeneratorExit:
                        raise
                    except CancelledError as error:
                        if stopping():  # gpuqueue's own: the pipeline is stopping
                            raise
                        item = failed_read(task, error)  # the source's own: in its place
                    except BaseException as error:  # SystemExit too: it belongs in its place
                        item = failed_read(task, error)
                    items.append(item)
                    if item.error is not None:
                        failed = 1
                        break  # an error ends the bundle (and the run)
                    if not item.described.skipped:  # type: ignore[union-attr]
                        batches += 1
            finally:
                reading.pop(me, None)
                tasks.done_reading(len(claimed), batches + failed)
            if self._bundles:
                per_read = time.perf_counter() - began
                self._learn_bundle(per_read)
            head = items[0]
            head.claim_wait_s = claim_wait_s
            sequencer.submit(head.task.seq_no, head)

        enqueue_one.__name__ = f"worker{number}"
        return enqueue_one

    def _failed_read(self, task: Task, error: BaseException) -> Item:
        """The item of a read that raised: the error in the batch's place; the stream ends."""
        self._tasks.close()
        note_thread(error, f"reading {task.where()}")
        return Item(task, error=error)

    def reading(self) -> list[str]:
        """What each worker thread is reading now, as ``"thread: batch index ..."``."""
        return [f"{thread}: {what}" for thread, what in self.reading_by_thread().items()]

    def reading_by_thread(self) -> dict[str, str]:
        """What each worker thread is reading now, by thread name."""
        return {
            thread: what if isinstance(what, str) else what.where()
            for thread, what in dict(self._reading).items()
        }

    def _read_in_process(self, task: Task) -> Item:
        # A generator's item was read by the process while claiming it.
        if task.index is None:  # (a generator's item was read while claiming it)
            staged = task.batch
        else:
            what = task.index if task.samples is None else task.samples
            staged = self._processes.read(what, task.where())
        if staged is None:
            return Item(task, _SKIPPED)
        return Item(task, self._staged(staged, task))

    def _read_samples_in_thread(self, task: Task) -> Item:
        """Writes a batch's samples straight into a pinned slot, each at its row.

        Without a slot (``device=None``) the batch is stacked once instead.
        Either way the batch's structure is the first sample's, each host
        leaf one list (``batch/rows.py``), so a short last batch matches.
        """
        samples = self._tasks.read(task)
        if type(samples) is not Samples:  # the user's collate= made a batch: packed as any
            return self._read_in_thread(task, samples)
        values, hosts = samples.split()
        host_lists = samples.host_lists(hosts)
        treedef, metas, nbytes = row_layout(samples, len(values), host_lists)
        if self._pinned is None:
            batch = default_collate(samples.spec, values, host_lists)
            return Item(task, Described(treedef, metas), batch)
        staged = self._pinned.stage_with(
            treedef, metas, nbytes, lambda buffer: write_rows(values, metas, buffer)
        )
        return Item(task, self._staged(staged, task))

    def _read_in_thread(self, task: Task, batch: Any = _UNREAD) -> Item:
        if batch is _UNREAD:
            batch = self._tasks.read(task)
        if batch is None:
            return Item(task, _SKIPPED)
        as_is = self._as_is
        if as_is is not None and as_is[0].matches(batch):
            # Handed over as it is: its structure is all there is to check.
            return Item(task, as_is[1], batch)
        plan = self._plan
        split = None if plan is None or self._pinned is None else plan.split(batch)
        if split is not None:
            assert plan is not None
            treedef, (leaves, metas, nbytes) = plan.treedef, split
        else:
            treedef, leaves = describe(batch, packed=self._device)
            metas, nbytes = layout(leaves)
            if plan is None:  # (two workers may both make one: either will do)
                plan = self._plan = Plan.of(batch, treedef, leaves, metas, nbytes)
                if plan is not None and self._pinned is None:
                    self._as_is = (plan, Described(plan.treedef, plan.metas))
        if self._pinned is None:
            return Item(task, Described(treedef, metas), batch)
        return Item(task, self._staged(self._pinned.stage(treedef, metas, nbytes, leaves), task))

    def _staged(self, staged: Staged, task: Task) -> Described:
        if self._device:
            try:
                staged.metas = device_ready(staged.metas, staged.buffer, task.where())
            except BaseException:
                staged.release(None)
                raise
        return Described(staged.treedef, staged.metas, staged=staged)

    def _commit(self, item: Item) -> None:
        """Checks an item (each of a bundle's) against the first batch, then queues it, in order."""
        parts = item.bundle or [item]
        for count, part in enumerate(parts, 1):
            # A batch with a layout that passed needs no call (most of them).
            described = part.described
            if described is not None and described.metas is self._checked and part.error is None:
                continue
            if not self._check(part):
                del parts[count:]  # the error ends the bundle
                break
        started = time.monotonic()
        self._host_queue.put(item)
        blocked = item.claim_wait_s + time.monotonic() - started
        with self._counters.lock:
            self._counters.produced += len(parts)
            self._counters.producer_blocked_s += blocked

    def _check(self, item: Item) -> bool:
        """Checks one batch against the first; False if it differs (the error is in the item)."""
        described = item.described
        if described is None or described.skipped:  # (_commit skips a layout that passed)
            return item.error is None
        try:
            if self._spec is None:
                self._spec = BatchSpec.of(described.treedef, described.metas)
                if self._look_for_samples:
                    warn_if_a_sample(described.metas, item.task.where())
            else:
                self._spec.check(
                    described.treedef, described.metas, item.task.where(), dtypes=self._device
                )
                # A plan's layout is shared only by batches it split alike (same
                # structure, dtypes and shapes): one that passed, they all pass.
                self._checked = described.metas
        except Exception as error:
            self._tasks.close()
            item.error = error
            return False
        return True
