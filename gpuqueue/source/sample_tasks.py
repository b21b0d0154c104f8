"""Source stage, sample tasks: a per-sample dataset's batches, each task carrying its samples.

``samplers.SampleOrder`` decides which samples make each batch of an epoch;
``SampleTasks`` hands those batches out as ``tasks.SequenceTasks`` hands out
a Sequence's indices, and the workers read each batch's samples at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import PipelineError
from .order import InOrder, Task
from .samplers import EpochBatches, SampleOrder
from .tasks import SequenceTasks

__all__ = ["SampleTasks"]


class SampleTasks(SequenceTasks):
    """The batches of a per-sample dataset, epoch after epoch: each task carries its samples.

    A task's sample indices are attached when it is claimed, while the epoch's
    batches are still the current ones: the next epoch's are drawn only once
    every read of this one has finished (``_may_cross_early`` is False, so an
    epoch boundary costs one hand-off, once per epoch).
    """

    def __init__(self, order: SampleOrder, reader: Any) -> None:
        self._sample_order = order
        self._dataset = reader
        self._skip = order.sample
        self._batches = EpochBatches(np.empty(0, np.int64), 1)
        super().__init__(
            reader,
            shuffle=False,
            seed=order.seed,
            shard=(0, 1),
            epoch=order.epoch,
            position=0,
            epochs=order.epochs,
            start=order.start,
        )
        # A resumed epoch may rightly have nothing left to read.
        self._whole_epoch = order.sample == 0 and order.start == 0

    def _make_order(self, epoch: int) -> InOrder:
        length = len(self._dataset)
        if length <= 0:
            raise PipelineError(f"the dataset is empty (len() returned {length}) at epoch {epoch}")
        (skip, self._skip), (start, self._start) = (self._skip, 0), (self._start, 0)
        self._batches = self._sample_order.epoch_batches(length, epoch, skip, start)
        count = len(self._batches)
        return InOrder(range(count), max(count, 1))

    def _claim(self, most: int) -> list[Task]:
        tasks = super()._claim(most)
        batches = self._batches
        for task in tasks:
            if task.index is not None and task.samples is None:
                task.samples, task.samples_end = batches.batch(task.index)
        return tasks

    def _may_cross_early(self) -> bool:
        return False

    def read(self, task: Task) -> Any:
        return self._sequence[task.samples]
