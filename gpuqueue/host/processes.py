"""Host stage, worker processes: their life cycle and protocol (``use_multiprocessing=True``).

Each worker thread of the host stage drives one process: it sends a batch
index and a shared-memory slot, the process reads ``sequence[index]`` and
packs the batch's arrays into the slot, and only the layout (a few hundred
bytes) comes back through the pipe. Slots come from the run's ``SlotPool``
(``shm.py``), fixed and reused; a slot grows when a batch does not fit,
never per batch.

Nothing blocks in a way ``stop()`` cannot wake: the thread waits on the
process's pipe, the process's sentinel (so a killed or crashed process is an
error within moments, not a hang) and a stop pipe, together.

Processes start with ``forkserver`` (or ``spawn`` where there is none),
never plain ``fork``, which is unsafe once CUDA or threads exist: from a
server of gpuqueue's own that has imported the parent's libraries already
(``forkserver.py``), so a worker does not import torch or Keras again.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import selectors
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import Backend
from ..batch.layout import Staged
from ..errors import CancelledError, OutOfRangeError, PipelineError, WorkerDiedError
from ..sync.channel import FIFOQueue
from ..sync.coordinator import Coordinator
from .forkserver import worker_process
from .pickling import check_picklable, pickle_source
from .process_main import worker_main
from .segments import send_segment
from .shm import Slot, SlotPool

__all__ = ["ProcessPool", "check_main_guard", "main_without_file"]

# "Stop", pickled once (see ProcessPool._send for why bytes, not send()).
_STOP = pickle.dumps(None)


def check_main_guard() -> None:
    """Raises ``PipelineError`` where worker processes would run the main script's code again.

    With ``forkserver`` and ``spawn`` (gpuqueue never uses plain ``fork``)
    each new process imports the main script again, as ``__mp_main__``.
    Without ``if __name__ == "__main__":`` around the code that starts the
    workers, that import runs the training code in every worker, which then
    fails (multiprocessing refuses to start processes from there) and reaches
    the parent only as an exit code. Two checks, so the message says what to
    do: in the parent, a main script whose source never mentions
    ``__name__``; in a worker, being called while it imports the script.

    Raises:
        PipelineError: If the main script has no ``__main__`` guard.
    """
    hint = (
        'put the code that starts the workers under if __name__ == "__main__":, since '
        "each worker process imports the main script again"
    )
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise PipelineError(
            "use_multiprocessing=True: a worker process, importing the main script, reached "
            f"code that starts workers; {hint}"
        )
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not os.path.exists(path):  # stdin, -c, a notebook: nothing is imported again
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as script:
            guarded = "__name__" in script.read()
    except OSError:
        return
    if not guarded:
        raise PipelineError(f"use_multiprocessing=True needs a main-module guard in {path}: {hint}")


@contextlib.contextmanager
def main_without_file() -> Iterator[None]:
    """Hides a ``__main__.__file__`` that names no file while worker processes start.

    ``python -`` sets it to ``"<stdin>"``, and ``spawn``/``forkserver``
    children then fail trying to run that path as the main script. Without
    it they skip the main module; what they need of it arrives pickled by
    value (``pickling.pickle_source``).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or os.path.exists(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


@dataclass
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    sequence_version: int = 0
    busy_with: str = field(default="")
    closed: bool = False  # Process.close() was called: it ended and was reaped
    # The generation of each slot's segment the process has mapped, by slot number.
    mapped: dict[int, int] = field(default_factory=dict)
    # Retired slots the process still maps: it unmaps them with its next read.
    forget: list[int] = field(default_factory=list)
    # Waits for the reply, the process's end or the pipeline's stop: made once, not per
    # read (multiprocessing.connection.wait builds and fills a selector on every call).
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)


class ProcessPool:
    """Worker processes and the shared-memory slots they write batches into.

    Args:
        sequence: The Sequence; it must be picklable.
        workers: Number of processes.
        coord: The enqueuer's coordinator; stopping it wakes every waiting thread.
        name: For process names and messages.
        slots: Number of shared-memory slots (workers + queue size + 1).
        seed: Seeds NumPy's global random state in each process (Keras's
            ``random_seed``).
        backend: Page-locks each slot (``cudaHostRegister``) so the copy to
            the device reads it directly, and fences its reuse; None on the
            host-only path.

    Raises:
        PipelineError: If the Sequence cannot be pickled.
    """

    def __init__(
        self,
        sequence: Any,
        workers: int,
        coord: Coordinator,
        *,
        name: str,
        slots: int,
        backend: Backend | None = None,
        seed: int | None = None,
    ) -> None:
        payload = check_picklable(sequence, "a picklable Sequence")
        self._sequence = sequence
        self._backend = backend
        self._closed = False
        self._sequence_version = 0
        self._lock = threading.Lock()
        self._name = name
        self._stop_reader, self._stop_writer = multiprocessing.Pipe(duplex=False)
        coord.add_stop_callback(self._wake_waiters)
        self._idle: FIFOQueue[_Worker] = FIFOQueue(workers, name=f"{name}-processes")
        self._workers: list[_Worker] = []
        for number in range(workers):
            parent_end, child_end = multiprocessing.Pipe()
            process = worker_process(
                target=worker_main,
                args=(child_end, self._stop_reader, payload, seed, backend is not None),
                name=f"{name}-process{number}",
                daemon=True,
            )
            process.start()
            child_end.close()
            worker = _Worker(process, parent_end)
            for source, what in (
                (parent_end, "reply"),
                (process.sentinel, "ended"),
                (self._stop_reader, "stop"),
            ):
                worker.selector.register(source, selectors.EVENT_READ, what)
            self._workers.append(worker)
            self._idle.put(worker)
        self._slots = SlotPool(slots, name=name, backend=backend)
        coord.add_stop_callback(self._idle.cancel)
        coord.add_stop_callback(self._slots.cancel)

    def _wake_waiters(self) -> None:
        self._stop_writer.send(None)

    def sequence_changed(self) -> None:
        """Ships the Sequence again before each process's next read (after on_epoch_end)."""
        with self._lock:
            self._sequence_version += 1

    def read(self, index: int | None, where: str) -> Staged | None:
        """Reads ``sequence[index]`` (or, with None, the generator's next item) into a slot.

        Returns:
            The staged batch (its ``release(event)`` returns the slot once the
            copy behind ``event`` completes), or None if the Sequence
            returned None.

        Raises:
            The error the Sequence raised, as its own type with the worker's
            traceback in a note; ``WorkerDiedError`` if the process died;
            ``CancelledError`` if the pipeline is stopping;
            ``OutOfRangeError`` when the generator is exhausted.
        """
        worker = self._idle.get()
        try:
            reply, slot = self._read_with(worker, index, where)
        finally:
            worker.busy_with = ""
            if not self._idle.closed:
                self._idle.put(worker)
        if reply[0] == "error":
            self._slots.give_back(slot)
            raise reply[1]
        if reply[0] == "none":
            self._slots.give_back(slot)
            return None
        if reply[0] == "end":
            self._slots.give_back(slot)
            raise OutOfRangeError("the generator is exhausted")
        _, treedef, metas, nbytes = reply
        return Staged(
            treedef,
            metas,
            nbytes,
            slot.array,
            lambda event: self._slots.give_back(slot, event),
            lend=None if self._backend is not None else lambda: self._slots.lend(slot),
        )

    def _read_with(self, worker: _Worker, index: int | None, where: str) -> tuple[Any, Slot]:
        """Has ``worker`` read ``index`` into a free slot; returns its reply and the slot."""
        slot = self._slots.take()
        try:
            worker.busy_with = where
            with self._lock:
                version = self._sequence_version
            if worker.sequence_version != version:
                self._send(worker, ("sequence", pickle_source(self._sequence)))
                worker.sequence_version = version
            forget = self._to_forget(worker)
            # The process maps a slot's segment once, when it first sees it (or it grew),
            # and keeps it mapped until the slot is retired or the run ends.
            sent = slot.capacity > 0 and worker.mapped.get(slot.number) != slot.generation
            message = ("read", index, slot.number, slot.generation, slot.capacity, sent, forget)
            self._send(worker, message)
            if sent:
                self._send_segment(worker, slot)
            reply = self._receive(worker)
            if reply[0] == "grow":
                self._slots.grow(slot, reply[1])
                self._send(worker, (slot.number, slot.generation, slot.capacity))
                self._send_segment(worker, slot)
                reply = self._receive(worker)
        except BaseException:
            self._slots.give_back(slot)
            raise
        return reply, slot

    def _to_forget(self, worker: _Worker) -> list[int]:
        """The retired slots ``worker``'s process should unmap now (their memory then goes)."""
        retired = self._slots.retired()
        with self._lock:
            for number in retired:
                for each in self._workers:
                    if each.mapped.pop(number, None) is not None:
                        each.forget.append(number)
            forget, worker.forget = worker.forget, []
        return forget

    def _receive(self, worker: _Worker) -> Any:
        ready = {key.data for key, _ in worker.selector.select()}
        if "reply" in ready:
            try:
                return worker.conn.recv()
            except (EOFError, OSError):  # the pipe broke: the process is gone
                pass
        elif "stop" in ready:
            raise CancelledError("the pipeline is stopping")
        raise self._died(worker)

    def _send(self, worker: _Worker, message: Any) -> None:
        # Pickled to bytes here: Connection.send pickles into a buffer that a
        # broken pipe's traceback would strand (recv() unpickles either alike).
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            worker.conn.send_bytes(data)
        except (OSError, ValueError):  # the pipe broke: the process is gone
            raise self._died(worker) from None

    def _send_segment(self, worker: _Worker, slot: Slot) -> None:
        try:
            assert slot.file is not None
            send_segment(worker.conn, slot.file.fileno(), worker.process.pid)
        except (OSError, ValueError):  # the pipe broke: the process is gone
            raise self._died(worker) from None
        worker.mapped[slot.number] = slot.generation

    @staticmethod
    def _died(worker: _Worker) -> WorkerDiedError:
        worker.process.join(5)
        return WorkerDiedError(
            f"worker process {worker.process.name} (pid {worker.process.pid}) died with "
            f"{_describe_exit(worker.process.exitcode)} while reading {worker.busy_with}"
        )

    @property
    def pinned_bytes(self) -> int:
        """Bytes held in shared-memory slots now (page-locked, with a backend)."""
        return self._slots.nbytes

    def busy(self) -> list[str]:
        """What each process is reading now, as ``"name (pid N): batch index ..."``."""
        return [
            f"{w.process.name} (pid {w.process.pid}): {w.busy_with}"
            for w in self._workers
            if w.busy_with
        ]

    @property
    def processes(self) -> list[Any]:
        return [w.process for w in self._workers]

    def alive(self) -> list[str]:
        """The names of the worker processes still running."""
        return [w.process.name for w in self._workers if not w.closed and w.process.is_alive()]

    def abandon(self) -> None:
        """Tells every process to exit and lets go of every slot, without waiting.

        For a finaliser: the processes exit on their own (they are daemons,
        so also at interpreter exit), and each segment's memory goes once the
        last mapping of it is closed (see ``SlotPool.abandon``).
        """
        self._slots.abandon()
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send_bytes(_STOP)

    def close(self, timeout: float) -> list[str]:
        """Ends every process and frees every slot. Idempotent.

        Returns:
            The names of processes that had to be killed.
        """
        if self._closed:
            return []
        self._closed = True
        killed = []
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send_bytes(_STOP)
        deadline_each = max(0.1, timeout / max(1, len(self._workers)))
        for worker in self._workers:
            worker.process.join(deadline_each)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
                killed.append(worker.process.name)
            worker.selector.close()  # (before the descriptors it watches are closed)
            worker.conn.close()
            if not worker.process.is_alive():
                worker.process.close()  # releases its sentinel's file descriptor now
                worker.closed = True
        self._slots.close()
        self._stop_reader.close()
        self._stop_writer.close()
        return killed


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"
