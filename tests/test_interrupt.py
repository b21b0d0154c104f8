"""Ctrl-C in the consumer ends the program within 2 s, even with workers stuck in a read.

Each test runs a real script in a subprocess whose ``__getitem__`` blocks for
a minute from index 1 on, waits until the consumer has taken batch 0 and the
workers are inside the blocking read (the script says so on stdout), then
sends one real SIGINT and times the exit. (Only batch 0 is awaited: fast
reads travel in bundles, and a bundle that holds batch 1 and a blocked read
of batch 2 would never deliver batch 1. Batch 0 is always claimed alone.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gpuqueue

SCRIPT = textwrap.dedent(
    """
    import faulthandler, signal, sys, threading
    from multiprocessing import shared_memory
    import numpy as np
    import gpuqueue

    def say(line):  # one write per line: threads of this process print too
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's view of a hang

    create_segment = shared_memory.SharedMemory.__init__

    def record_segment(self, name=None, create=False, size=0, **options):
        create_segment(self, name, create, size, **options)
        if create:  # the test checks that each one is gone once the process has exited
            say(f"SEGMENT {self.name}")

    shared_memory.SharedMemory.__init__ = record_segment

    class Stuck:
        def __len__(self):
            return 100

        def __getitem__(self, index):
            if index >= 1:
                say("READING")
                threading.Event().wait(60)  # a read that nothing can interrupt
            return np.full(3, index)

    if __name__ == "__main__":
        mode, device = sys.argv[1], None if sys.argv[2] == "none" else sys.argv[2]
        with gpuqueue.prefetch(
            Stuck(), device=device, workers=2, use_multiprocessing=mode == "processes"
        ) as batches:
            for batch in batches:
                if int(batch[0]) == 0:
                    say("BLOCKED")  # the next step waits in get()
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "device"),
    [("threads", "none"), ("threads", "cpu"), ("processes", "none"), ("processes", "cpu")],
)
def test_one_ctrl_c_ends_the_program_within_two_seconds(
    tmp_path: Path, mode: str, device: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    process = subprocess.Popen(
        [sys.executable, str(script), mode, device],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        seen = set()
        for line in process.stdout:  # the gate: both markers, no sleep
            seen.add(line.strip())
            if {"READING", "BLOCKED"} <= seen:
                break
        assert {"READING", "BLOCKED"} <= seen, process.stderr.read() if process.stderr else ""
        interrupted_at = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # every thread's stack, on stderr
            process.kill()
            _, stderr = process.communicate(timeout=10)
            pytest.fail(f"the process was still alive 10 s after one Ctrl-C:\n{stderr}")
        took = time.monotonic() - interrupted_at
        try:  # ends once every process the script started has let go of its pipes
            rest, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("10 s after the script exited, a process it started still holds its pipes")
        seen.update(line.strip() for line in rest.splitlines())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert took < 2.0, f"exited {took:.2f} s after Ctrl-C"
    assert process.returncode == -signal.SIGINT, stderr
    assert "KeyboardInterrupt" in stderr
    if mode == "threads":  # the stuck readers are named, not waited for
        assert "after Ctrl-C, threads left running as daemons" in stderr
    segments = [line.split()[1] for line in seen if line.startswith("SEGMENT ")]
    left = [name for name in segments if Path("/dev/shm", name).exists()]
    assert not left, f"shared memory left behind: {left}"


class StuckFrom1(gpuqueue.Sequence):
    """Reads 0 at once; from ``first_stuck`` (1) on, each read waits at ``gate``; the test opens it.

    Only batch 0 can be awaited: a worker's first claim is always one batch, but
    a later one may be a bundle, and a bundle holding batch 1 and a blocked read
    would never deliver batch 1.
    """

    def __init__(self, first_stuck: int = 1) -> None:
        self.first_stuck = first_stuck
        self.gate = threading.Event()
        self.reading = threading.Semaphore(0)

    def __len__(self) -> int:
        return 100

    def wait_until_both_workers_are_stuck(self) -> None:
        for _ in range(2):
            assert self.reading.acquire(timeout=10)

    def __getitem__(self, index: int) -> np.ndarray:
        if index >= self.first_stuck:
            self.reading.release()
            self.gate.wait(30)
        return np.full(3, index)


def ctrl_c_lands_in_the_window(cond: threading.Condition) -> None:
    """From now on ``cond.wait`` ends as a Ctrl-C that lands just after ``Condition.wait``
    released its lock and before its ``try`` does: the lock released, KeyboardInterrupt."""

    def wait(timeout: float | None = None) -> bool:
        cond._lock.release()  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    cond.wait = wait  # type: ignore[method-assign]


@pytest.mark.timeout(30)
def test_ctrl_c_inside_a_condition_wait_is_still_ctrl_c() -> None:
    """Ctrl-C can land in ``threading.Condition.wait`` just after it released its lock and
    before its ``try``: the queue's ``with`` then fails to release the lock, and a
    RuntimeError ("release unlocked lock") goes up in place of the KeyboardInterrupt. The
    run took that for an ordinary error and waited the full 60 s for the stuck readers (CI
    saw one Ctrl-C leave the program alive 10 s later). Here the wait is replaced by that
    exact state: its lock released, then KeyboardInterrupt."""
    seq = StuckFrom1()
    enqueuer = gpuqueue.OrderedEnqueuer(seq, shard=None)
    enqueuer.start(workers=2, max_queue_size=4)
    try:
        batches = enqueuer.get()
        taken = [int(next(batches)[0])]
        seq.wait_until_both_workers_are_stuck()  # inside a read that nothing interrupts
        ctrl_c_lands_in_the_window(enqueuer._run.output_queue._not_empty)  # type: ignore[union-attr]
        began = time.monotonic()
        with (
            pytest.raises(KeyboardInterrupt) as raised,
            pytest.warns(RuntimeWarning, match="after Ctrl-C, threads left running") as named,
            enqueuer,
        ):
            for batch in batches:
                taken.append(int(batch[0]))
        took = time.monotonic() - began
    finally:
        seq.gate.set()  # the readers return, see the stop and end
        enqueuer.stop(timeout=10)
    assert taken == [0]
    assert raised.value.__suppress_context__  # the lock's RuntimeError is not what happened
    assert took < 2.0, f"the run took {took:.2f} s to stop after Ctrl-C"
    assert enqueuer._run.interrupted  # type: ignore[union-attr]
    assert len(named) == 1, "each stuck reader is named once, not again by the enqueuer's exit"


@pytest.mark.timeout(30)
def test_a_worker_error_raised_while_the_caller_handles_ctrl_c_is_that_error() -> None:
    """Code that runs a pipeline inside ``except KeyboardInterrupt`` (say, a last evaluation
    before exiting) gets the worker's error, not the Ctrl-C it is handling: the error's
    context is that KeyboardInterrupt only because Python chains whatever is being handled."""
    from tests.seqs import FailsAt

    enqueuer = gpuqueue.OrderedEnqueuer(FailsAt(0), shard=None)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with pytest.raises(KeyError, match="cannot read 0"), enqueuer:
            for _ in enqueuer.get():
                pass
    assert not enqueuer._run.interrupted  # type: ignore[union-attr]


@pytest.mark.timeout(30)
def test_ctrl_c_that_the_wait_did_not_wake_for_is_seen_within_a_second() -> None:
    """A SIGINT that lands after ``Condition.wait`` checked for signals and before the
    thread sleeps (or that the kernel hands to another thread) does not cut the sleep
    short: CPython runs the handler only when the wait returns. The consumer's wait for
    a batch was 60 s (the warning's), so one Ctrl-C left the program alive a minute.
    Here the sleep misses the signal the same way: SIGINT is blocked in this thread
    while it sleeps, so another thread takes it."""
    seq = StuckFrom1()
    enqueuer = gpuqueue.OrderedEnqueuer(seq, shard=None)
    enqueuer.start(workers=2, max_queue_size=4)
    try:
        cond = enqueuer._run.output_queue._not_empty  # type: ignore[union-attr]
        real_wait = cond.wait
        sent = []

        def wait(timeout: float | None = None) -> bool:
            if sent:
                return real_wait(timeout)
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                sent.append(time.monotonic())
                threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
                return real_wait(timeout)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

        batches = enqueuer.get()
        assert int(next(batches)[0]) == 0
        seq.wait_until_both_workers_are_stuck()
        cond.wait = wait  # type: ignore[method-assign]
        with (
            pytest.raises(KeyboardInterrupt),
            pytest.warns(RuntimeWarning, match="after Ctrl-C"),
            enqueuer,
        ):
            for _ in batches:
                pass
        took = time.monotonic() - sent[0]
    finally:
        seq.gate.set()
        enqueuer.stop(timeout=10)
    assert took < 2.0, f"the Ctrl-C was seen {took:.2f} s after it was sent"


@pytest.mark.timeout(30)
def test_ctrl_c_inside_the_copy_wait_of_depth_0_is_still_ctrl_c() -> None:
    """With ``prefetch_depth=0`` the copy runs inside ``get()`` and may wait for an arena
    (several consumers of one run). The same window there made ``get()`` take the lock's
    RuntimeError for a delivery error and stop the run with its 60 s grace."""
    seq = StuckFrom1(first_stuck=2)  # a device path claims one batch at a time: no bundles
    enqueuer = gpuqueue.OrderedEnqueuer(seq, shard=None, device="cpu", prefetch_depth=0)
    enqueuer.start(workers=2, max_queue_size=4)
    try:
        batches = enqueuer.get()
        assert int(next(batches)[0]) == 0
        arenas = enqueuer._run.arenas  # type: ignore[union-attr]
        seq.wait_until_both_workers_are_stuck()
        with arenas._cond:
            arenas._in_flight = arenas._depth  # another consumer holds the only copy slot
        ctrl_c_lands_in_the_window(arenas._cond)
        began = time.monotonic()
        with (
            pytest.raises(KeyboardInterrupt),
            pytest.warns(RuntimeWarning, match="after Ctrl-C"),
            enqueuer,
        ):
            for _ in batches:
                pass
        took = time.monotonic() - began
    finally:
        seq.gate.set()
        enqueuer.stop(timeout=10)
    assert took < 2.0, f"the run took {took:.2f} s to stop after Ctrl-C"
