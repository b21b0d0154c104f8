"""Sync, stopping together: ``Coordinator`` and ``LooperThread``, after ``tf.train.Coordinator``.

As TensorFlow's: the first reported exception wins and is re-raised by
``join()`` as the same object with its own traceback; ``OutOfRangeError``
stops cleanly; ``join()`` names the threads still alive after the grace
period. Better than TensorFlow's:

- Nothing polls. ``join()`` wakes when the threads end or stop is requested
  (TensorFlow wakes every second, then sleeps in growing steps).
- Stop callbacks (``add_stop_callback``) run the moment stop is requested, so
  a thread blocked on a queue wakes at once instead of at its next check.
- Exceptions after the first are kept (``suppressed_exceptions``), not dropped.
- ``LooperThread.stop_loop()`` runs even when the loop raised.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeAlias

from ..errors import OutOfRangeError, add_note

__all__ = ["DEFAULT_STOP_TIMEOUT", "Coordinator", "LooperThread"]

logger = logging.getLogger(__name__)

# A pipeline's stop() waits this long for its threads before naming the stragglers.
DEFAULT_STOP_TIMEOUT = 60.0

ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]
ExceptionLike: TypeAlias = BaseException | ExcInfo | tuple[None, None, None]


def _as_exception(ex: ExceptionLike) -> tuple[BaseException, TracebackType | None] | None:
    """Normalises an exception instance or a ``sys.exc_info()`` tuple."""
    if isinstance(ex, BaseException):
        return ex, ex.__traceback__
    if isinstance(ex, tuple) and len(ex) == 3:
        _, value, tb = ex
        if value is None:
            return None
        if isinstance(value, BaseException):
            return value, tb
    raise TypeError(
        f"ex must be an exception instance or a sys.exc_info() tuple, got {type(ex).__name__}"
    )


class Coordinator:
    """Stops a set of threads together and reports the first error.

    Typical use, as with TensorFlow::

        coord = Coordinator()
        threads = [threading.Thread(target=work, args=(coord,)) for _ in range(4)]
        for t in threads:
            t.start()
        coord.join(threads)  # re-raises the first error any thread reported

    Args:
        clean_stop_exception_types: Exception types that stop the coordinator
            without being recorded as an error. Defaults to
            ``(OutOfRangeError,)``, as in TensorFlow.
    """

    def __init__(
        self, clean_stop_exception_types: Iterable[type[BaseException]] | None = None
    ) -> None:
        if clean_stop_exception_types is None:
            clean_stop_exception_types = (OutOfRangeError,)
        self._clean_stop_exception_types = tuple(clean_stop_exception_types)
        self._cond = threading.Condition(threading.Lock())
        self._stop_requested = False
        self._joined = False
        self._exception: tuple[BaseException, TracebackType | None] | None = None
        self._suppressed: list[BaseException] = []
        self._registered_threads: list[threading.Thread] = []
        self._stop_callbacks: list[Callable[[], object]] = []

    # -- stopping ---------------------------------------------------------

    def request_stop(self, ex: ExceptionLike | None = None) -> None:
        """Asks every coordinated thread to stop, optionally reporting an error.

        The first exception reported before stop wins: ``join()`` and
        ``raise_requested_exception()`` re-raise it. Exceptions of a clean-stop
        type stop the coordinator without being recorded; exceptions reported
        after stop was requested are kept in ``suppressed_exceptions``.

        Args:
            ex: An exception instance (from any thread), or a
                ``sys.exc_info()`` tuple.

        Raises:
            The reported exception itself, if the coordinator was already
            joined: nobody is left to see it otherwise (as in TensorFlow).
        """
        error = None if ex is None else _as_exception(ex)
        if error is not None and isinstance(error[0], self._clean_stop_exception_types):
            error = None
        with self._cond:
            if self._joined and error is not None:
                raise error[0].with_traceback(error[1])
            if self._stop_requested:
                if error is not None:
                    self._suppressed.append(error[0])
                return
            if error is not None:
                self._exception = error
                logger.debug("error reported to Coordinator: %r", error[0])
            self._stop_requested = True
            callbacks, self._stop_callbacks = self._stop_callbacks, []
            self._cond.notify_all()
        for callback in callbacks:
            self._run_stop_callback(callback)

    def should_stop(self) -> bool:
        """True once stop has been requested."""
        return self._stop_requested

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Blocks until stop is requested or ``timeout`` seconds pass.

        Returns:
            True if stop was requested, False on timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._stop_requested, timeout)

    @contextlib.contextmanager
    def stop_on_exception(self) -> Iterator[None]:
        """Reports whatever escapes the block to ``request_stop`` and swallows it.

        As in TensorFlow, any exception (``BaseException`` included) ends the
        block and stops the coordinator; a clean-stop type stops it without
        being recorded.
        """
        try:
            yield
        except BaseException:  # reporting every ending, interrupts included, is the point
            self.request_stop(sys.exc_info())

    def add_stop_callback(self, callback: Callable[[], object]) -> None:
        """Runs ``callback()`` once, in the thread that requests stop.

        Use it to wake threads blocked outside the coordinator, for example
        with a queue's ``cancel``. If stop was already requested, the
        callback runs at once in the calling thread. Errors in a callback are
        logged and do not prevent the others from running.
        """
        with self._cond:
            if not self._stop_requested:
                self._stop_callbacks.append(callback)
                return
        self._run_stop_callback(callback)

    def remove_stop_callback(self, callback: Callable[[], object]) -> None:
        """Forgets a callback that has not run yet; does nothing otherwise."""
        with self._cond, contextlib.suppress(ValueError):
            self._stop_callbacks.remove(callback)

    @staticmethod
    def _run_stop_callback(callback: Callable[[], object]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("stop callback %r raised", callback)

    def clear_stop(self) -> None:
        """Makes the coordinator usable again: forgets stop, errors and threads."""
        with self._cond:
            self._joined = False
            self._exception = None
            self._suppressed = []
            self._registered_threads = []
            self._stop_requested = False

    def raise_requested_exception(self) -> None:
        """Re-raises the first reported exception, if there is one."""
        with self._cond:
            error = self._exception
        if error is not None:
            raise error[0].with_traceback(error[1])

    @property
    def exception(self) -> BaseException | None:
        """The first reported exception, or None."""
        with self._cond:
            return None if self._exception is None else self._exception[0]

    @property
    def suppressed_exceptions(self) -> list[BaseException]:
        """Exceptions reported after the first one, kept for diagnosis."""
        with self._cond:
            return list(self._suppressed)

    # -- threads ----------------------------------------------------------

    def register_thread(self, thread: threading.Thread) -> None:
        """Adds ``thread`` to those ``join()`` waits for."""
        with self._cond:
            if thread not in self._registered_threads:
                self._registered_threads.append(thread)

    @property
    def registered_threads(self) -> list[threading.Thread]:
        """The threads registered so far."""
        with self._cond:
            return list(self._registered_threads)

    @property
    def joined(self) -> bool:
        """True once ``join()`` has returned or raised."""
        return self._joined

    def join(
        self,
        threads: Sequence[threading.Thread] | None = None,
        stop_grace_period_secs: float = 120,
        ignore_live_threads: bool = False,
    ) -> None:
        """Waits for the threads to end, then re-raises the first reported error.

        Waits until every thread (the registered ones and ``threads``) has
        ended or stop is requested, then gives the threads still running
        ``stop_grace_period_secs`` to end. Nothing polls: the wait ends the
        moment the last thread ends or stop is requested.

        Args:
            threads: Threads to wait for besides the registered ones.
            stop_grace_period_secs: How long threads may run on once stop is
                requested.
            ignore_live_threads: Log the threads still alive after the grace
                period instead of raising.

        Raises:
            The first exception reported to the coordinator, if any (in
            preference to the error below), with a note naming the threads
            still alive after the grace period, if any are.
            RuntimeError: If threads are still alive after the grace period
                and ``ignore_live_threads`` is false; it names each one.
        """
        with self._cond:
            all_threads = list(self._registered_threads)
        for thread in threads or ():
            if thread not in all_threads:
                all_threads.append(thread)

        watcher = self._wait_for_threads_or_stop(all_threads)

        deadline = time.monotonic() + max(0.0, stop_grace_period_secs)
        for thread in [*all_threads, *([watcher] if watcher else [])]:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        stragglers = [t.name for t in all_threads if t.is_alive()]

        with self._cond:
            self._joined = True
            self._registered_threads = []
            error = self._exception
        message = "Coordinator stopped with threads still running: " + " ".join(stragglers)
        if error is not None:
            if stragglers:  # they may be stuck because of it: the error names them
                add_note(error[0], message)
            raise error[0].with_traceback(error[1])
        if stragglers and not ignore_live_threads:
            raise RuntimeError(message)
        if stragglers:
            logger.info(message)

    def _wait_for_threads_or_stop(self, threads: list[threading.Thread]) -> threading.Thread | None:
        """Blocks until every thread ended or stop was requested.

        A thread cannot be waited on together with a condition, so a helper
        thread joins them one after another and then notifies; the caller
        waits on the condition that ``request_stop`` also notifies. The helper
        ends when the last thread ends; it is returned so the caller can join it.
        """
        live = [t for t in threads if t.is_alive()]
        if not live or self.should_stop():
            return None
        all_ended = False

        def join_all() -> None:
            nonlocal all_ended
            for thread in live:
                thread.join()
            with self._cond:
                all_ended = True
                self._cond.notify_all()

        watcher = threading.Thread(target=join_all, name="gpuqueue-coordinator-join", daemon=True)
        watcher.start()
        with self._cond:
            self._cond.wait_for(lambda: all_ended or self._stop_requested)
        return watcher


class LooperThread(threading.Thread):
    """A thread that calls ``run_loop()`` until its coordinator stops.

    After ``tf.compat.v1.train.LooperThread``: subclass it and override
    ``start_loop`` / ``run_loop`` / ``stop_loop``, or pass a ``target``.
    It registers itself with the coordinator. An exception in any hook is
    reported to the coordinator and ends the thread; ``stop_loop()`` runs in
    a ``finally``, so it also runs when the loop raised.

    Args:
        coord: The ``Coordinator`` to register with and obey.
        timer_interval_secs: None to call ``run_loop`` back to back; a number
            of seconds to call it at fixed timer boundaries, the first at
            once. A timer wait ends at once when stop is requested.
        target: A callable that ``run_loop`` calls.
        args: Positional arguments for ``target``.
        kwargs: Keyword arguments for ``target``.
        name: The thread's name.

    Raises:
        ValueError: If ``coord`` is not a Coordinator, or ``args``/``kwargs``
            come without ``target``, or the interval is negative.
    """

    def __init__(
        self,
        coord: Coordinator,
        timer_interval_secs: float | None,
        target: Callable[..., object] | None = None,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if not isinstance(coord, Coordinator):
            raise ValueError(f"'coord' must be a Coordinator, got {type(coord).__name__}")
        if target is None and (args or kwargs):
            raise ValueError("'args' and 'kwargs' require that you also pass 'target'")
        if timer_interval_secs is not None and timer_interval_secs < 0:
            raise ValueError(
                f"timer_interval_secs must be None or >= 0, got {timer_interval_secs!r}"
            )
        super().__init__(name=name, daemon=True)
        self._coord = coord
        self._timer_interval_secs = timer_interval_secs
        self._loop_target = target
        self._loop_args = tuple(args or ())
        self._loop_kwargs = dict(kwargs or {})
        coord.register_thread(self)

    @staticmethod
    def loop(
        coord: Coordinator,
        timer_interval_secs: float | None,
        target: Callable[..., object],
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> LooperThread:
        """Creates and starts a LooperThread that calls ``target``; returns the thread."""
        looper = LooperThread(coord, timer_interval_secs, target, args, kwargs, name=name)
        looper.start()
        return looper

    @property
    def coord(self) -> Coordinator:
        """The coordinator this thread obeys."""
        return self._coord

    def run(self) -> None:
        # Two blocks, so an error in the loop is reported before one in stop_loop.
        with self._coord.stop_on_exception():
            self.start_loop()
            if self._timer_interval_secs is None:
                while not self._coord.should_stop():
                    self.run_loop()
            else:
                next_time = time.monotonic()
                while not self._coord.wait_for_stop(max(0.0, next_time - time.monotonic())):
                    next_time += self._timer_interval_secs
                    self.run_loop()
        with self._coord.stop_on_exception():
            self.stop_loop()

    def start_loop(self) -> None:
        """Called once when the thread starts."""

    def run_loop(self) -> None:
        """Called at each loop iteration; calls ``target`` by default."""
        if self._loop_target is not None:
            self._loop_target(*self._loop_args, **self._loop_kwargs)

    def stop_loop(self) -> None:
        """Called once when the loop ends, also when it raised."""
