"""Sync, ``QueueRunner``: after ``tf.train.queue_runner.QueueRunner``, without graphs.

An enqueue op is a plain callable that puts one item on the queue per call.
``create_threads`` starts one thread per op, each calling its op until the
queue reports closed; the last op thread to finish closes the queue, keeping
what is queued for the getters. Given a coordinator, the threads obey it and
report their errors to it, and one more thread cancels the queue the moment
stop is requested, so nothing stays blocked on a full queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import CancelledError, OutOfRangeError
from .channel import FIFOQueue
from .coordinator import Coordinator

__all__ = ["QueueRunner"]

logger = logging.getLogger(__name__)

EnqueueOp = Callable[[], object]


def _op_name(op: EnqueueOp, index: int) -> str:
    return str(getattr(op, "__name__", None) or f"op{index}")


class QueueRunner:
    """Runs enqueue ops in threads to keep a ``FIFOQueue`` filled.

    Args:
        queue: The ``FIFOQueue`` the ops fill.
        enqueue_ops: Callables, one thread each; each call enqueues one item.
            A call that raises one of ``queue_closed_exception_types`` means
            "no more items" and ends that thread.
        close_op: Called by the last op thread to finish; defaults to
            ``queue.close`` (queued items stay for the getters).
        cancel_op: Called when the coordinator stops; defaults to
            ``queue.cancel``.
        queue_closed_exception_types: Exception types that end an op thread
            cleanly. Defaults to ``(OutOfRangeError,)``, as in TensorFlow.
        queue_runner_def: A ``to_config()`` dict to rebuild a runner from,
            where TensorFlow took a ``QueueRunnerDef``; exclusive with the
            other arguments.
        import_scope: Accepted for TensorFlow's signature; there are no
            graphs to scope names in, so it is ignored.

    Raises:
        ValueError: If ``queue`` or ``enqueue_ops`` is missing, or an op is
            not callable, or ``queue_runner_def`` comes with other arguments.
    """

    def __init__(
        self,
        queue: FIFOQueue[Any] | None = None,
        enqueue_ops: Sequence[EnqueueOp] | None = None,
        close_op: EnqueueOp | None = None,
        cancel_op: EnqueueOp | None = None,
        queue_closed_exception_types: Iterable[type[BaseException]] | None = None,
        queue_runner_def: dict[str, Any] | None = None,
        import_scope: str | None = None,
    ) -> None:
        if queue_runner_def is not None:
            given = (queue, enqueue_ops, close_op, cancel_op, queue_closed_exception_types)
            if any(arg is not None for arg in given):
                raise ValueError("queue_runner_def and the other arguments are mutually exclusive")
            queue, enqueue_ops = queue_runner_def["queue"], queue_runner_def["enqueue_ops"]
            close_op = queue_runner_def.get("close_op")
            cancel_op = queue_runner_def.get("cancel_op")
            queue_closed_exception_types = queue_runner_def.get("queue_closed_exception_types")
        if queue is None:
            raise ValueError("QueueRunner needs a queue")
        if not enqueue_ops:
            raise ValueError("QueueRunner needs at least one enqueue op")
        for index, op in enumerate(enqueue_ops):
            if not callable(op):
                raise ValueError(f"enqueue_ops[{index}] is not callable: {op!r}")
        if queue_closed_exception_types is None:
            queue_closed_exception_types = (OutOfRangeError,)
        self._queue = queue
        self._enqueue_ops = list(enqueue_ops)
        self._close_op = close_op if close_op is not None else queue.close
        self._cancel_op = cancel_op if cancel_op is not None else queue.cancel
        self._queue_closed_exception_types = tuple(queue_closed_exception_types)
        self._lock = threading.Lock()
        self._runs = 0
        self._exceptions_raised: list[BaseException] = []

    @property
    def queue(self) -> FIFOQueue[Any]:
        return self._queue

    @property
    def enqueue_ops(self) -> list[EnqueueOp]:
        return list(self._enqueue_ops)

    @property
    def close_op(self) -> EnqueueOp:
        return self._close_op

    @property
    def cancel_op(self) -> EnqueueOp:
        return self._cancel_op

    @property
    def queue_closed_exception_types(self) -> tuple[type[BaseException], ...]:
        return self._queue_closed_exception_types

    @property
    def name(self) -> str:
        """The queue's name."""
        return self._queue.name

    @property
    def exceptions_raised(self) -> list[BaseException]:
        """Exceptions the op threads raised when no coordinator was given."""
        with self._lock:
            return list(self._exceptions_raised)

    def create_threads(
        self,
        sess: Any = None,
        coord: Coordinator | None = None,
        daemon: bool = False,
        start: bool = False,
    ) -> list[threading.Thread]:
        """Creates one thread per enqueue op (plus a cancel thread with ``coord``).

        ``create_threads(sess, coord=coord, daemon=True, start=True)`` as
        TensorFlow code writes it. Returns ``[]`` while threads from an
        earlier call still run, as TensorFlow does.

        Args:
            sess: TensorFlow's session: accepted and ignored (ops are plain
                callables; pass None). A ``Coordinator`` here, with no
                ``coord``, is taken as ``coord`` (gpuqueue's earlier form
                ``create_threads(coord)``).
            coord: Threads obey it, register with it and report errors to it;
                one extra thread cancels the queue when it stops.
            daemon: Make the threads daemons.
            start: Start the threads before returning them.

        Returns:
            The threads created.
        """
        if coord is None and isinstance(sess, Coordinator):
            coord = sess
        with self._lock:
            if self._runs > 0:
                return []
            self._runs = len(self._enqueue_ops)
            self._exceptions_raised = []
        threads = [
            threading.Thread(
                target=self._run,
                args=(op, coord),
                name=f"QueueRunnerThread-{self.name}-{_op_name(op, index)}",
            )
            for index, op in enumerate(self._enqueue_ops)
        ]
        if coord is not None:
            threads.append(
                threading.Thread(
                    target=self._cancel_on_stop,
                    args=(coord,),
                    name=f"QueueRunnerThread-{self.name}-close_on_stop",
                )
            )
        for thread in threads:
            thread.daemon = daemon
            if coord is not None:
                coord.register_thread(thread)
            if start:
                thread.start()
        return threads

    def _run(self, enqueue_op: EnqueueOp, coord: Coordinator | None) -> None:
        try:
            while coord is None or not coord.should_stop():
                try:
                    enqueue_op()
                except self._queue_closed_exception_types:
                    return
        except BaseException as error:
            if coord is not None:
                if not (coord.should_stop() and isinstance(error, CancelledError)):
                    coord.request_stop(error)
            else:
                logger.error("exception in QueueRunner %s: %r", self.name, error)
                with self._lock:
                    self._exceptions_raised.append(error)
        finally:
            self._op_thread_done()

    def _op_thread_done(self) -> None:
        with self._lock:
            self._runs -= 1
            last = self._runs == 0
        if last:
            try:
                self._close_op()
            except Exception as error:
                logger.debug("ignored exception from close_op: %r", error)

    def _cancel_on_stop(self, coord: Coordinator) -> None:
        coord.wait_for_stop()
        try:
            self._cancel_op()
        except Exception as error:
            logger.debug("ignored exception from cancel_op: %r", error)

    def to_config(self) -> dict[str, Any]:
        """The runner's settings, for ``from_config`` (TensorFlow's ``to_proto``)."""
        return {
            "queue": self._queue,
            "enqueue_ops": list(self._enqueue_ops),
            "close_op": self._close_op,
            "cancel_op": self._cancel_op,
            "queue_closed_exception_types": self._queue_closed_exception_types,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QueueRunner:
        """Builds a runner from ``to_config()``'s output (TensorFlow's ``from_proto``)."""
        return cls(**config)
