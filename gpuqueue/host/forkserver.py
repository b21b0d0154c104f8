"""Host stage, starting worker processes: a forkserver of our own, with the parent's libraries.

A ``forkserver`` (or ``spawn``) child begins as a fresh interpreter, so it
imports again what the parent had: the main script's imports and the
Sequence's module, torch and Keras among them, several seconds each, in
every worker of every run (measured: 8 to 32 s to the first batch of a Keras
``PyDataset`` in 2 processes after ``import torch, keras``, on a loaded
2-CPU machine, where ``DataLoader(num_workers=2)``, which forks, took 0.15 s).
Python's forkserver can import modules once, in the server, before it forks
each child, but multiprocessing's one server is shared with the user's own
processes, and its default preload of ``__main__`` does nothing (the main
script's path reaches the server under a key it does not read, CPython 3.11).

So gpuqueue starts its workers from servers of its own: one per set of
preloaded libraries, started when a run first needs it, kept for the life of
the interpreter (each later run forks its workers from it at once), and ended
with the interpreter. A server preloads the libraries of ``PRELOADABLE``
that the parent has imported when the workers start, and gpuqueue's worker
module. Each is a library whose import starts no thread beyond NumPy's BLAS
pool (which OpenBLAS shuts down around a fork) and makes no CUDA context
(``tests/test_forkserver.py`` checks the server's threads against a process
that imported only NumPy): forking the server is then as safe as forking a
process that imported NumPy, which is what ``DataLoader`` does. User modules
are never preloaded (their import may do anything): a worker imports them
itself, but the libraries they import are there already.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import threading
from typing import Any

if sys.platform != "win32":  # (no forkserver there: worker_process spawns)
    from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
    from multiprocessing.context import ForkServerProcess, set_spawning_popen

__all__ = ["PRELOADABLE", "WORKER_MODULE", "preload_for_parent", "worker_process"]

# Libraries whose import is slow and safe to do once in a server that then forks.
# (tf_keras is not one: it imports TensorFlow, whose import was not checked.)
PRELOADABLE = ("numpy", "scipy", "torch", "jax", "keras", "PIL")
# Keras imports its backend: one whose import was not checked (TensorFlow)
# keeps Keras out of the preload.
_NOT_WITH = {"keras": ("tensorflow",)}
WORKER_MODULE = "gpuqueue.host.process_main"

# The servers, by what they preloaded. Process-wide on purpose, as
# multiprocessing's own server is: a server outlives the runs that use it.
_servers: dict[tuple[str, ...], Any] = {}  # multiprocessing.forkserver.ForkServer
_servers_lock = threading.Lock()


def preload_for_parent() -> tuple[str, ...]:
    """What a server should preload for this process now: its libraries, and gpuqueue's worker."""
    loaded = sys.modules
    libraries = [
        name
        for name in PRELOADABLE
        if name in loaded and not any(other in loaded for other in _NOT_WITH.get(name, ()))
    ]
    return (*libraries, WORKER_MODULE)


def server(preload: tuple[str, ...]) -> Any:
    """The server that preloads ``preload`` (made on first use; started by its first child)."""
    with _servers_lock:
        found = _servers.get(preload)
        if found is None:
            found = forkserver.ForkServer()
            found.set_forkserver_preload(list(preload))
            _servers[preload] = found
        return found


if sys.platform != "win32":

    class _Popen(popen_forkserver.Popen):
        """multiprocessing's forkserver launch, asking the process's own server for the child."""

        def _launch(self, process_obj: Any) -> None:
            # What the child needs to set itself up, then the process object (with its
            # target and arguments), pickled while this launch can hand descriptors over.
            payload = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(spawn.get_preparation_data(process_obj._name), payload)
                reduction.dump(process_obj, payload)
            finally:
                set_spawning_popen(None)
            chosen = server(process_obj.preload)
            descriptors = self._fds  # type: ignore[attr-defined]  # (set by Popen.__init__)
            self.sentinel, data_writer = chosen.connect_to_new_process(descriptors)
            # The child watches a copy of the data pipe's write end to see this process go.
            parent_end = os.dup(data_writer)
            self.finalizer = util.Finalize(self, _close, (parent_end, self.sentinel))
            with open(data_writer, "wb", closefd=True) as pipe:
                pipe.write(payload.getbuffer())
            self.pid = forkserver.read_signed(self.sentinel)

    def _close(*descriptors: int) -> None:
        for descriptor in descriptors:
            os.close(descriptor)

    class _PreloadedProcess(ForkServerProcess):
        """A forkserver process started from the server that preloads ``preload``."""

        def __init__(self, *args: Any, preload: tuple[str, ...], **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.preload = preload

        @staticmethod
        def _Popen(process_obj: Any) -> Any:  # multiprocessing's name for it
            return _Popen(process_obj)


def worker_process(**kwargs: Any) -> Any:
    """A new (unstarted) worker process: from a preloaded forkserver, else ``spawn``.

    ``kwargs`` are ``multiprocessing.Process``'s (``target``, ``args``, ``name``,
    ``daemon``). The libraries to preload are taken from the parent now.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn").Process(**kwargs)
    return _PreloadedProcess(preload=preload_for_parent(), **kwargs)
