"""gpuqueue: feed GPU training loops with batches already on the device.

The public names follow TensorFlow's ``Coordinator``, ``LooperThread``,
``QueueRunner`` and ``FIFOQueue`` and Keras's ``Sequence`` and enqueuers, so
code written for those runs after changing the import.
"""

from .consumer.outputs import keep
from .device.normalize import Normalize
from .enqueuers import GeneratorEnqueuer, OrderedEnqueuer, SequenceEnqueuer
from .errors import (
    BatchError,
    BatchTimeoutError,
    CancelledError,
    GpuqueueError,
    OutOfRangeError,
    PipelineError,
    QueueClosedError,
    WorkerDiedError,
)
from .prefetch import Prefetched, prefetch
from .source.keras import keras_dataset
from .source.order import Sequence
from .sync.channel import FIFOQueue
from .sync.coordinator import Coordinator, LooperThread
from .sync.runner import QueueRunner

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "BatchTimeoutError",
    "CancelledError",
    "Coordinator",
    "FIFOQueue",
    "GeneratorEnqueuer",
    "GpuqueueError",
    "LooperThread",
    "Normalize",
    "OrderedEnqueuer",
    "OutOfRangeError",
    "PipelineError",
    "Prefetched",
    "QueueClosedError",
    "QueueRunner",
    "Sequence",
    "SequenceEnqueuer",
    "WorkerDiedError",
    "keep",
    "keras_dataset",
    "prefetch",
]
