"""Fixtures shared by every test: a thread-leak check, gates for interleavings, and the
strict CUDA double in place of CuPy (``strict_cuda``)."""

from __future__ import annotations

import copy
import gc
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import gpuqueue.backends
from tests.cuda_double import StrictCuda, install, uninstall


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fails the test if it leaves a thread alive.

    A thread that is ending anyway gets a few seconds to finish; this is a
    join, not a poll, so a healthy test pays nothing.
    """
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before]
    for thread in leaked:
        thread.join(timeout=5)
    alive = [t.name for t in leaked if t.is_alive()]
    if alive:
        pytest.fail(f"test leaked threads: {alive}")


def wait_entered(cond: threading.Condition, entered: threading.Event | None = None):  # type: ignore[no-untyped-def]
    """Arms ``cond`` so that an event is set each time a thread starts waiting on it.

    Lets a test know a thread is really blocked (inside ``cond.wait``) before
    it acts, with no sleep. Returns the event; with ``entered`` given, sets
    that one and returns ``cond`` (for arming a condition as it is created).
    """
    event = entered if entered is not None else threading.Event()
    original_wait = cond.wait

    def wait(timeout: float | None = None) -> bool:
        event.set()
        return original_wait(timeout)

    cond.wait = wait  # type: ignore[method-assign]
    return cond if entered is not None else event


class Worker(threading.Thread):
    """Runs ``fn`` in a thread and keeps its result or exception for the test."""

    def __init__(self, fn, *args, name: str = "test-worker") -> None:  # type: ignore[no-untyped-def]
        super().__init__(name=name, daemon=True)
        self._fn, self._args = fn, args
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as error:
            self.error = error

    def finish(self, timeout: float = 5) -> Worker:
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} is still blocked"
        return self


@pytest.fixture
def running() -> Iterator[list[Any]]:
    """Enqueuers a test starts (with ``start``); stopped afterwards whatever happens."""
    started: list[Any] = []
    yield started
    for enqueuer in started:
        enqueuer.stop(timeout=5)


def start(running: list[Any], enqueuer: Any, workers: int = 2, max_queue_size: int = 4) -> Any:
    """Starts ``enqueuer`` and hands it to the ``running`` fixture to stop."""
    running.append(enqueuer)
    enqueuer.start(workers=workers, max_queue_size=max_queue_size)
    return enqueuer


def shared_memory() -> set[str]:
    """The shared memory this process holds open, and gpuqueue's names in ``/dev/shm``.

    gpuqueue's segments have no name (a memfd, or an unnamed file in
    ``/dev/shm``), so other programs' entries there never fail a test; a
    descriptor still held, or a name of gpuqueue's own (``gpuqueue-...``),
    would be a leak.
    """
    found = set()
    if os.path.isdir("/proc/self/fd"):
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(("/memfd:", "/dev/shm/")):
                found.add(f"fd {fd}: {target}")
    if os.path.isdir("/dev/shm"):
        found |= {f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith("gpuqueue-")}
    return found


def received(batches: Any) -> list[Any]:
    """Every batch, each deep-copied as it arrives.

    Batches are their takers' (a plain ``list`` keeps them too); the copies
    let a test compare them without depending on that.
    """
    return [copy.deepcopy(batch) for batch in batches]


@pytest.fixture
def strict_cuda(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StrictCuda]:
    """Two double GPUs in place of CuPy; the test fails on any violation they saw.

    Parametrized indirectly with False, the GPUs have no memory pools (as some
    virtual GPUs): no stream-ordered allocation.
    """
    cuda = StrictCuda(devices=2, pools=getattr(request, "param", True))
    for name, module in install(cuda).items():
        monkeypatch.setitem(sys.modules, name, module)
    # gpuqueue's backend module must be imported anew, against the double.
    monkeypatch.delitem(sys.modules, "gpuqueue.backends.cupy", raising=False)
    monkeypatch.delattr(gpuqueue.backends, "cupy", raising=False)
    # The runtime and driver calls CuPy does not wrap go to the double, not through ctypes.
    backend_module = importlib.import_module("gpuqueue.backends.cupy")
    monkeypatch.setattr(backend_module, "_CUDART", cuda.native, raising=False)
    monkeypatch.setattr(backend_module, "_LIBCUDA", cuda.native, raising=False)
    for variable in (
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ):
        monkeypatch.delenv(variable, raising=False)
    yield cuda
    gc.collect()  # batches still alive give their arenas back now, checked too
    uninstall()
    if hasattr(gpuqueue.backends, "cupy"):
        delattr(gpuqueue.backends, "cupy")
    assert cuda.violations == []
    assert [hex(a.ptr) for a in cuda.allocations.values() if not a.freed] == []
