"""Errors: the exceptions gpuqueue raises, and the notes that say where they came from.

Every error of gpuqueue's own shares one base class, and each way a pipeline
can end has its own type, so callers never tell endings apart by message
text::

    GpuqueueError
    ├── OutOfRangeError        normal end of data: a closed queue is drained
    ├── CancelledError         the queue was cancelled; what it held is gone
    │   └── QueueClosedError   put() on a queue that was already closed
    └── PipelineError          the pipeline could not run as configured
        ├── BatchError         a batch is malformed or differs from the first
        ├── BatchTimeoutError  no batch arrived within the timeout (also a TimeoutError)
        └── WorkerDiedError    a worker process ended without reporting

``OutOfRangeError`` and ``CancelledError`` keep TensorFlow's names and
meanings: a ``Coordinator`` treats ``OutOfRangeError`` as a clean stop, as
``tf.train.Coordinator`` does. Exceptions raised by user code (a Sequence, a
generator) are never wrapped: they reach the consumer as their own type, with
their own traceback and a note naming the thread and the batch index.
"""

from __future__ import annotations

import os
import threading

__all__ = [
    "BatchError",
    "BatchTimeoutError",
    "CancelledError",
    "GpuqueueError",
    "OutOfRangeError",
    "PipelineError",
    "QueueClosedError",
    "WorkerDiedError",
]


class GpuqueueError(Exception):
    """Base class of every error gpuqueue raises itself."""


class _TensorFlowSignature(GpuqueueError):
    """Also accepts TensorFlow's ``(node_def, op, message)`` constructor arguments.

    Code that raises ``tf.errors.OutOfRangeError(None, None, "done")`` then
    runs unchanged with gpuqueue's error; ``str()`` is the message.
    """

    def __init__(self, *args: object) -> None:
        self.node_def: object = None
        self.op: object = None
        if len(args) == 3:
            self.node_def, self.op, message = args
            args = (message,)
        super().__init__(*args)


class OutOfRangeError(_TensorFlowSignature):
    """The end of the data: a closed queue has been drained.

    A ``Coordinator`` treats it as a clean stop by default.
    """


class CancelledError(_TensorFlowSignature):
    """The queue was cancelled: blocked calls woke and queued items were dropped."""


class QueueClosedError(CancelledError):
    """``put()`` was called on a queue that has been closed."""


class PipelineError(GpuqueueError):
    """The pipeline was misused or could not run as configured."""


class WorkerDiedError(PipelineError):
    """A worker process ended (killed, crashed) without reporting an error."""


class BatchTimeoutError(PipelineError, TimeoutError):
    """No batch arrived within the enqueuer's ``timeout``.

    The message names the worker threads and processes and the batch
    indices they are reading, so a stopped, deadlocked or very slow worker
    can be found.
    """


class BatchError(PipelineError, ValueError):
    """A batch has a leaf that is not an array, or differs from the first batch.

    The message names the batch index and the field, for example
    ``batch index 7: field [0]['image'] has dtype float64, expected float32``.
    """


def ctrl_c_in(error: BaseException | None) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` that ``error`` is, or that gpuqueue's own lock turned it into.

    A Ctrl-C can land inside the standard library's ``Condition.wait`` after
    it released its lock and before its ``try``: the ``with`` around the wait
    then fails to release the lock, and a ``RuntimeError`` goes up in place
    of the ``KeyboardInterrupt``, which is left only as its context. Only
    that shape counts: any other error whose context is a
    ``KeyboardInterrupt`` is not Ctrl-C in gpuqueue, since Python sets an
    error's context to whatever the raising thread was handling (a worker's
    error delivered inside the caller's ``except KeyboardInterrupt`` has
    that ``KeyboardInterrupt`` as its context, and is still the worker's error).
    """
    if error is None or isinstance(error, KeyboardInterrupt):
        return error
    context = error.__context__
    if (
        isinstance(error, RuntimeError)
        and isinstance(context, KeyboardInterrupt)
        and str(error) in _UNLOCKED
        and _raised_in_gpuqueue(error)
    ):
        return context
    return None


# What releasing a lock this thread does not hold says (_thread.lock, _thread.RLock).
_UNLOCKED = ("release unlocked lock", "cannot release un-acquired lock")
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_THREADING = os.path.abspath(threading.__file__)


def _raised_in_gpuqueue(error: BaseException) -> bool:
    """True if ``error`` was raised by one of gpuqueue's own frames.

    That is the innermost frame outside the ``threading`` module: a
    ``Condition``'s ``with`` exits through ``threading.py`` (a bare lock's
    through C, with no frame of its own).
    """
    traceback = error.__traceback__
    frames = []
    while traceback is not None:
        frames.append(os.path.abspath(traceback.tb_frame.f_code.co_filename))
        traceback = traceback.tb_next
    outside = [name for name in frames if name != _THREADING]
    return bool(outside) and outside[-1].startswith(_PACKAGE)


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, also on Python 3.10."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def note_thread(error: BaseException, doing: str) -> None:
    """Notes on ``error`` which thread raised it and what it was doing."""
    add_note(error, f"raised in {threading.current_thread().name} {doing}")
