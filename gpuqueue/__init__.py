"""gpuqueue: feed GPU training loops with batches already on the device.

The public names follow TensorFlow's ``Coordinator``, ``LooperThread``,
``QueueRunner`` and ``FIFOQueue`` and Keras's ``Sequence`` and enqueuers, so
code written for those runs after changing the import.
"""

from .adapters import keras_dataset
from .channel import FIFOQueue
from .coordinator import Coordinator, LooperThread
from .delivery import keep
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
from .oneshot import prefetch
from .runner import QueueRunner
from .sources import Sequence
from .transforms import Normalize

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
    "QueueClosedError",
    "QueueRunner",
    "Sequence",
    "SequenceEnqueuer",
    "WorkerDiedError",
    "keep",
    "keras_dataset",
    "prefetch",
]
