"""Host stage, inside a worker process: the loop each process of ``use_multiprocessing`` runs.

``worker_main`` rebuilds the Sequence from the bytes it was started with,
then reads one batch per request and packs it into the shared-memory slot the
parent names, mapping each slot's segment once, when its descriptor arrives
over the pipe (``segments.send_segment``). Every error, rebuilding the Sequence
included, goes back to the parent as a value (its own type when it
pickles), so the consumer sees the cause instead of an exit code. The
parent's side is ``processes.ProcessPool``.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import traceback
from typing import Any

import numpy as np

from ..batch.layout import layout, pack
from ..batch.rows import row_layout, write_rows
from ..batch.tree import TreeDef, describe
from ..errors import PipelineError, add_note
from ..source.collate import Samples
from .segments import receive_segment

__all__ = ["portable_error", "worker_main"]


def portable_error(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a PipelineError describing it."""
    remote = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    note = f"traceback in the worker process:\n{remote}"
    try:
        error.__traceback__ = None
        clone: BaseException = pickle.loads(pickle.dumps(error))
    except Exception:
        clone = PipelineError(
            f"{type(error).__name__}: {error} (the exception could not be pickled)"
        )
    notes = [*getattr(error, "__notes__", []), note]
    clone.__notes__ = notes  # type: ignore[attr-defined]
    return clone


def _receive_or_stop(
    conn: multiprocessing.connection.Connection, stop: multiprocessing.connection.Connection
) -> Any:
    """The next message from the parent, or None once the pipeline stops or the parent is gone."""
    try:
        ready = multiprocessing.connection.wait([conn, stop])
        if stop in ready:
            return None
        return conn.recv()
    except (EOFError, OSError):
        return None


def _iterate(source: Any) -> Any:
    """An iterator over a generator function's output, or over an iterable."""
    if callable(source) and not hasattr(source, "__iter__"):
        return iter(source())
    return iter(source)


def _unpickle(payload: bytes, what: str) -> tuple[Any, BaseException | None]:
    """The object ``payload`` holds, or the error rebuilding it raised (made portable)."""
    try:
        return pickle.loads(payload), None
    except BaseException as error:  # whatever the user's __setstate__ raises goes back
        note = f"raised while rebuilding {what} in worker process {_process_name()}"
        add_note(error, note)
        return None, portable_error(error)


class _ParentGone(Exception):
    """The pipe to the parent broke: it was killed, or dropped the run."""


def _send(conn: multiprocessing.connection.Connection, message: Any) -> None:
    try:
        conn.send(message)
    except (EOFError, OSError) as error:  # BrokenPipeError is an OSError
        raise _ParentGone from error


def _send_bytes(conn: multiprocessing.connection.Connection, data: bytes) -> None:
    try:
        conn.send_bytes(data)
    except (EOFError, OSError) as error:  # BrokenPipeError is an OSError
        raise _ParentGone from error


def _pickled_reply(reply: Any) -> bytes:
    """``reply`` pickled for the parent; if a leaf of the batch cannot be, the error instead.

    Host leaves travel pickled in the batch's structure; one that cannot be
    (a lambda, an open file) is the read's error, sent back in its place with
    the field named, not a worker process dying with exit code 1.
    """
    try:
        return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        field = _unpicklable_field(reply[1]) if reply[0] == "ok" else None
        if field is not None:
            add_note(
                error,
                f"{field} cannot be pickled to go back from worker process "
                f"{_process_name()} to the parent: return leaves that pickle, or use threads",
            )
        return pickle.dumps(("error", portable_error(error)), protocol=pickle.HIGHEST_PROTOCOL)


def _unpicklable_field(treedef: TreeDef, path: str = "") -> str | None:
    """``"field <path> (a <type>)"`` for the first host leaf that does not pickle, or None."""
    if treedef.kind == "host":
        try:
            pickle.dumps(treedef.value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return f"field {path or '<batch>'} (a {type(treedef.value).__name__})"
        return None
    if treedef.kind == "dict":
        paths = [f"{path}[{key!r}]" for key in treedef.keys]
    else:
        paths = [f"{path}[{i}]" for i in range(len(treedef.children))]
    for child, child_path in zip(treedef.children, paths, strict=True):
        found = _unpicklable_field(child, child_path)
        if found is not None:
            return found
    return None


def _process_name() -> str:
    return multiprocessing.current_process().name


class _Mappings:
    """The slots a worker process has mapped: each kept until it grows, is retired, or the end."""

    def __init__(self) -> None:
        self._mapped: dict[int, tuple[int, np.ndarray]] = {}

    def receive(
        self, conn: multiprocessing.connection.Connection, slot: int, generation: int, size: int
    ) -> None:
        """Maps the segment the parent sends right after its message."""
        try:
            segment = receive_segment(conn, size)
        except (EOFError, OSError, RuntimeError) as error:
            raise _ParentGone from error
        self.drop(slot)
        self._mapped[slot] = (generation, segment)

    def buffer(self, slot: int) -> Any:
        return self._mapped[slot][1] if slot in self._mapped else bytearray(0)

    def drop(self, slot: int) -> None:
        self._mapped.pop(slot, None)  # unmapped with its last view (none outlives a read)

    def close(self) -> None:
        for slot in list(self._mapped):
            self.drop(slot)


def worker_main(
    conn: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
    payload: bytes,
    seed: int | None = None,
    packed: bool = True,
) -> None:
    """The loop of a worker process: read, pack, reply, until told to stop.

    The Sequence (or generator function) arrives pickled in ``payload`` and is
    rebuilt here, so an error rebuilding it goes back to the parent like any
    read's, instead of killing the process before it could say why.

    Messages in: ``("sequence", payload)`` replaces the Sequence (after
    ``on_epoch_end`` ran in the parent); ``("read", index, slot, generation,
    size, sent, forget)`` first unmaps the retired slots numbered in
    ``forget``, then reads ``sequence[index]`` (or with ``index`` None the
    generator's next item) into slot number ``slot``, whose segment's
    descriptor follows the message when ``sent`` is true (the slot is new to
    this process, or grew); ``None``, or anything on the ``stop`` pipe (which
    the parent's stop callback writes), stops. Replies: ``("ok", treedef,
    metas, nbytes)``, ``("none",)``, ``("end",)`` (the generator is
    exhausted), ``("grow", nbytes)`` (then ``(slot, generation, size)`` and
    the new segment's descriptor), or ``("error", exception)``.

    A parent that has gone (it was killed, or dropped the run) ends the loop
    quietly: no broken-pipe traceback. ``packed`` is False without a device:
    lists of numbers then travel as they are (``staging.describe``).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if seed is not None:
        np.random.seed(seed)  # as Keras's random_seed: the process's global NumPy state
    sequence, broken = _unpickle(payload, "the Sequence")
    iterator: Any = None
    mappings = _Mappings()
    try:
        while True:
            message = _receive_or_stop(conn, stop)
            if message is None:
                return
            if message[0] == "sequence":
                sequence, broken = _unpickle(message[1], "the Sequence after on_epoch_end()")
                continue
            _, index, slot, generation, size, sent, forget = message
            for retired in forget:
                mappings.drop(retired)
            if sent:
                mappings.receive(conn, slot, generation, size)
            reply = _read_one(conn, stop, sequence, broken, index, slot, mappings, iterator, packed)
            if reply is None:
                return
            iterator = reply[1]
            _send_bytes(conn, _pickled_reply(reply[0]))
    except _ParentGone:
        return
    finally:
        mappings.close()


def _read_one(
    conn: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
    sequence: Any,
    broken: BaseException | None,
    index: int | None,
    slot: int,
    mappings: _Mappings,
    iterator: Any,
    packed: bool,
) -> tuple[Any, Any] | None:
    """Reads one batch into ``slot``; its reply and the generator's iterator, or None to stop."""
    try:
        if broken is not None:
            return ("error", broken), iterator
        if index is not None:
            batch = sequence[index]
        else:
            if iterator is None:
                iterator = _iterate(sequence)
            try:
                batch = next(iterator)
            except StopIteration:
                return ("end",), iterator
        if batch is None:
            return ("none",), iterator
        if type(batch) is Samples:  # batch_size=: each sample is written at its row
            values, hosts = batch.split()
            treedef, metas, nbytes = row_layout(batch, len(values), batch.host_lists(hosts))
            write = functools.partial(write_rows, values)
        else:
            treedef, leaves = describe(batch, packed=packed)
            metas, nbytes = layout(leaves)
            write = functools.partial(pack, leaves)
        if nbytes > len(mappings.buffer(slot)):
            _send(conn, ("grow", nbytes))
            grown = _receive_or_stop(conn, stop)
            if grown is None:
                return None
            mappings.receive(conn, *grown)
        write(metas, mappings.buffer(slot))
        return ("ok", treedef, metas, nbytes), iterator
    except _ParentGone:
        raise
    except BaseException as error:  # SystemExit from user code too: it goes back in its place
        return ("error", portable_error(error)), iterator
