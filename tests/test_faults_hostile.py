"""The faults and misuse of issue 16's hostile pass, each forced and checked.

Processes, shared memory and signals are tested for real; what must not leak
or hang across an interpreter is run in a subprocess under a kill timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import traceback
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import BatchError, BatchTimeoutError, OrderedEnqueuer, PipelineError
from gpuqueue.backends.simulated import SimulatedBackend
from gpuqueue.consumer import deliver as delivery
from tests.conftest import Worker
from tests.seqs import Numbered

# -- errors keep their place, their note and their traceback -------------------------


class ExitsAt(Numbered):
    """``__getitem__(bad_index)`` raises ``error`` (SystemExit, KeyboardInterrupt)."""

    def __init__(self, bad_index: int, error: BaseException, length: int = 40) -> None:
        super().__init__(length)
        self.bad_index, self.error = bad_index, error

    def __getitem__(self, index: int) -> Any:
        if index == self.bad_index:
            raise self.error
        return super().__getitem__(index)


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()], ids=type)
@pytest.mark.parametrize(("processes", "device"), [(False, None), (False, "cpu"), (True, None)])
def test_system_exit_in_a_worker_arrives_after_every_earlier_batch(
    error: BaseException, processes: bool, device: Any
) -> None:
    """Regression: only 32 of 37 batches came (threads), and the error had no note."""
    enqueuer = OrderedEnqueuer(
        ExitsAt(37, error), use_multiprocessing=processes, device=device, shard=None
    )
    enqueuer.start(workers=4, max_queue_size=3)
    got: list[int] = []
    try:
        with pytest.raises(type(error)) as info:
            for batch in enqueuer.get():
                got.append(int(batch[1]["index"]))
    finally:
        enqueuer.stop(timeout=10)
    assert got == list(range(37))
    assert info.value is error or processes  # from a process: a copy, of the same type
    notes = getattr(info.value, "__notes__", [])
    assert any(
        n.startswith("raised in QueueRunnerThread-")
        and n.endswith("reading batch index 37 (epoch 0, position 37)")
        for n in notes
    ), notes


class FailsAtTwo(Numbered):
    def __getitem__(self, index: int) -> Any:
        if index == 2:
            raise KeyError(f"cannot read {index}")
        return super().__getitem__(index)


def _consume(batches: Any) -> None:
    for _ in batches:
        pass


@pytest.mark.parametrize("ending", ["with", "finally"])
def test_stop_keeps_the_traceback_the_consumer_saw(ending: str) -> None:
    """Regression: stop() re-raised the error inside Coordinator.join, replacing its frames."""
    enqueuer = OrderedEnqueuer(FailsAtTwo(), shard=None)
    with pytest.raises(KeyError, match=r"^'cannot read 2'\nraised in QueueRunnerThread-") as info:
        if ending == "with":
            with enqueuer:
                _consume(enqueuer.get())
        else:
            enqueuer.start(workers=2)
            try:
                _consume(enqueuer.get())
            finally:
                enqueuer.stop()
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    # the consumer's frames, then the worker's, down to the user's __getitem__
    assert names[0] == "test_stop_keeps_the_traceback_the_consumer_saw", names
    assert names[1] == "_consume" and "_batches" in names, names
    assert names[-1] == "__getitem__", names
    assert "join" not in names, names


# -- batches handed over as they are ---------------------------------------------------


class DtypeChangesEachEpoch(Numbered):
    """As Keras's ``test_context_switch``: on_epoch_end changes the arrays' dtype."""

    dtypes = (np.float32, np.float64, np.int8)

    def __init__(self) -> None:
        super().__init__(length=3)
        self.epoch = 0

    def __getitem__(self, index: int) -> Any:
        dtype = self.dtypes[self.epoch % 3]
        return (np.full((2, 3), index, dtype), {"index": np.int64(index)})

    def on_epoch_end(self) -> None:
        self.epoch += 1


@pytest.mark.parametrize("processes", [False, True])
def test_without_a_device_a_dtype_may_change_between_epochs(processes: bool) -> None:
    enqueuer = OrderedEnqueuer(
        DtypeChangesEachEpoch(), use_multiprocessing=processes, shard=None, epochs=3
    )
    with enqueuer:
        got = [(b[0].dtype, int(b[1]["index"])) for b in enqueuer.get()]
    assert got == [(np.dtype(d), i) for d in DtypeChangesEachEpoch.dtypes for i in range(3)]


def test_with_a_device_a_dtype_change_is_still_a_clear_error() -> None:
    enqueuer = OrderedEnqueuer(DtypeChangesEachEpoch(), device="cpu", shard=None, epochs=3)
    with (
        enqueuer,
        pytest.raises(
            BatchError,
            match=r"^batch index 0 \(epoch 1, position 0\): field \[0\] has dtype float64, "
            r"expected float32",
        ),
    ):
        _consume(enqueuer.get())


# -- an epoch of nothing ----------------------------------------------------------------


class AllNone(gpuqueue.Sequence):
    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> Any:
        return None


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("processes", "device"), [(False, None), (False, "cpu"), (True, None)])
def test_an_epoch_of_nothing_but_none_is_an_error(processes: bool, device: Any) -> None:
    """Regression: the consumer waited for ever while workers read empty epochs at 100 % CPU."""
    enqueuer = OrderedEnqueuer(AllNone(), use_multiprocessing=processes, device=device, shard=None)
    enqueuer.start(workers=2)
    try:
        with pytest.raises(
            PipelineError,
            match=r"^epoch 0 gave no batch: the Sequence returned None for every one of its 5 ",
        ):
            next(enqueuer.get())
    finally:
        enqueuer.stop(timeout=10)


class SomeNone(Numbered):
    def __getitem__(self, index: int) -> Any:
        return None if index % 2 else super().__getitem__(index)


def test_an_epoch_with_some_none_items_goes_on() -> None:
    enqueuer = OrderedEnqueuer(SomeNone(length=4), shard=None)
    with enqueuer:
        got = [int(b[1]["index"]) for b in islice(enqueuer.get(), 5)]
    assert got == [0, 2, 0, 2, 0]


# -- processes and shared memory, for real ------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent

# Helpers for the scripts: what shared memory a process has open and mapped.
SHARED_MEMORY_PROBE = textwrap.dedent(
    """
    import os

    def shared_fds(pid="self"):
        found = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(("/dev/shm/", "/memfd:")):
                found.append(target)
        return found

    def mapped_segments(pid="self"):
        with open(f"/proc/{pid}/maps") as maps:
            return [
                line.split(None, 5)[5].strip()
                for line in maps
                if "/dev/shm/" in line or "/memfd:" in line
            ]
    """
)


def run_script(code: str, timeout: float = 90, prefix: list[str] | None = None) -> Any:
    """Runs ``code`` in a fresh interpreter in its own process group, killed whole on timeout."""
    process = subprocess.Popen(
        [*(prefix or []), sys.executable, "-c", SHARED_MEMORY_PROBE + textwrap.dedent(code)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(
            f"the script hung for {timeout} s; stdout {out[-2000:]!r} stderr {err[-2000:]!r}"
        )
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


needs_procfs = pytest.mark.skipif(
    not (os.path.isdir("/proc/self/fd") and os.path.isdir("/dev/shm")),
    reason="needs /proc and POSIX shared memory (Linux)",
)


@needs_procfs
@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", [None, "cpu"])
def test_dropped_process_enqueuers_leave_no_shared_memory_and_print_nothing(device: Any) -> None:
    """Regression: 10 enqueuers dropped without stop() kept 57 segments (570 MiB) open."""
    done = run_script(
        f"""
        import gc, json
        import gpuqueue
        from tests.seqs import EightMiB as Big

        if __name__ == "__main__":
            shm_before = set(os.listdir("/dev/shm"))
            fds = []
            for _ in range(10):
                e = gpuqueue.OrderedEnqueuer(
                    Big(), use_multiprocessing=True, shard=None, device={device!r}
                )
                e.start(workers=2, max_queue_size=3)
                it = e.get()
                for _ in range(3):
                    next(it)
                threads, processes = e._run.threads, e._run.processes.processes
                del e, it
                gc.collect()
                for thread in threads:  # they end on their own; wait, so counts are settled
                    thread.join(30)
                for process in processes:
                    process.join(30)
                gc.collect()
                fds.append(len(os.listdir("/proc/self/fd")))
            print(json.dumps({{
                "shared_fds": shared_fds(),
                "mapped": mapped_segments(),
                "fds": fds,
                "new_shm": sorted(
                    n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("gpuqueue-")
                ),
            }}))
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["shared_fds"] == [] and report["mapped"] == [], report
    assert report["new_shm"] == [], report
    assert max(report["fds"][1:]) <= report["fds"][0], report["fds"]  # no growth
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


@needs_procfs
@pytest.mark.timeout(120)
def test_sigkill_of_the_whole_process_group_leaves_nothing_in_dev_shm() -> None:
    """Regression: SIGKILL of the group (timeout(1), SLURM, Kubernetes) left every segment."""
    fds_before = sorted(os.listdir("/proc/self/fd"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SHARED_MEMORY_PROBE
            + textwrap.dedent(
                """
                import json, sys, threading
                import numpy as np
                import gpuqueue
                from tests.seqs import Numbered

                if __name__ == "__main__":
                    e = gpuqueue.OrderedEnqueuer(
                        Numbered(length=8, shape=(256, 1024)), use_multiprocessing=True, shard=None
                    )
                    e.start(workers=2, max_queue_size=4)
                    it = e.get()
                    next(it)
                    segments = mapped_segments()
                    for worker in e._run.processes.processes:
                        segments += mapped_segments(worker.pid)
                    print(json.dumps({"pgid": os.getpgid(0), "segments": segments}), flush=True)
                    print("ready", flush=True)
                    threading.Event().wait()  # until killed
                """
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        report = json.loads(process.stdout.readline())
        assert process.stdout.readline().strip() == "ready"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
    assert report["pgid"] == process.pid
    assert report["segments"], "the enqueuer mapped no shared memory: nothing was tested"
    named = sorted({s for s in report["segments"] if s.startswith("/dev/shm/")})
    left = [name for name in named if os.path.exists(name)]
    assert left == [], f"segments left in /dev/shm after SIGKILL of the group: {left}"
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


NO_ROOM_SCRIPT = """
    import resource
    import gpuqueue
    from tests.seqs import EightMiB as Big

    if __name__ == "__main__":
        {setup}
        e = gpuqueue.OrderedEnqueuer(Big(), use_multiprocessing=True, shard=None)
        e.start(workers=1, max_queue_size=1)
        try:
            next(e.get())
        except Exception as error:
            print(type(error).__name__ + ": " + str(error), flush=True)
        finally:
            e.stop(timeout=10)
"""


@needs_procfs
@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd_create")
@pytest.mark.timeout(120)
def test_no_room_for_a_memfd_slot_is_a_clear_error_not_a_sigbus() -> None:
    # The kernel refuses the reservation (EFBIG past RLIMIT_FSIZE) as it would past a
    # memory limit; CPython ignores SIGXFSZ, so the refusal arrives as an error.
    setup = "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))"
    done = run_script(NO_ROOM_SCRIPT.replace("{setup}", setup))
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.match(
        r"^PipelineError: cannot reserve 8,388,608 bytes of shared memory for a worker "
        r"process's batch slot in anonymous shared memory \(memfd_create\)",
        done.stdout,
    ), done.stdout


@needs_procfs
@pytest.mark.timeout(120)
def test_a_dev_shm_too_small_is_a_clear_error_naming_it_and_the_shm_size() -> None:
    """Regression: a worker died with SIGBUS while writing into a full /dev/shm."""
    unshare = shutil.which("unshare")
    probe = (
        subprocess.run(
            [unshare, "-m", "sh", "-c", "mount -t tmpfs -o size=4m tmpfs /dev/shm"],
            capture_output=True,
            timeout=30,
        )
        if unshare
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("needs unshare -m and mount (root) to give the script a 4 MiB /dev/shm")
    # as without memfd_create
    setup = "import gpuqueue.host.segments as segments; segments.USE_MEMFD = False"
    script = SHARED_MEMORY_PROBE + textwrap.dedent(NO_ROOM_SCRIPT.replace("{setup}", setup))
    code = 'mount -t tmpfs -o size=4m tmpfs /dev/shm && exec "$0" -c "$1"'
    done = subprocess.run(
        [unshare, "-m", "sh", "-c", code, sys.executable, script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.match(
        r"^PipelineError: cannot reserve 8,388,608 bytes of shared memory for a worker "
        r"process's batch slot in /dev/shm \(4,194,304 bytes free of 4,194,304\): No space "
        r"left on device\. .*docker run --shm-size",
        done.stdout,
    ), done.stdout


class BrokenInTheChild(Numbered):
    """Pickles in the parent; rebuilding it in a worker process raises."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise ImportError("No module named 'private_dataset' (only the parent has it)")


@pytest.mark.timeout(60)
def test_a_sequence_the_child_cannot_rebuild_raises_its_cause_with_the_index() -> None:
    """Regression: this was ``WorkerDiedError ... exit code 1``, the cause only on stderr."""
    enqueuer = OrderedEnqueuer(BrokenInTheChild(), use_multiprocessing=True, shard=None)
    enqueuer.start(workers=2)
    try:
        with pytest.raises(ImportError, match=r"^No module named 'private_dataset'") as info:
            next(enqueuer.get())
    finally:
        enqueuer.stop(timeout=10)
    notes = "\n".join(info.value.__notes__)
    assert re.search(
        r"raised while rebuilding the Sequence in worker process OrderedEnqueuer-process\d", notes
    ), notes
    assert "reading batch index 0 (epoch 0, position 0)" in notes, notes


# -- zero bytes, and stats after stop ------------------------------------------------------


class ZeroBytes(gpuqueue.Sequence):
    def __init__(self, empty: bool) -> None:
        self.empty = empty

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        return () if self.empty else (np.zeros((0, 4), np.float32), np.zeros(0, np.int8))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("empty", [True, False], ids=["tuple", "zero-length"])
@pytest.mark.parametrize(
    ("processes", "device"), [(False, "cpu"), (False, "simulated"), (True, None), (True, "cpu")]
)
def test_a_first_batch_of_zero_bytes_goes_through(
    processes: bool, device: Any, empty: bool
) -> None:
    """Regression: a bare AssertionError (threads, cpu), OSError '/' (processes)."""
    enqueuer = OrderedEnqueuer(
        ZeroBytes(empty), use_multiprocessing=processes, device=device, shard=None, epochs=2
    )
    with enqueuer:
        got = list(enqueuer.get())
    assert len(got) == 6
    if empty:
        assert all(batch == () for batch in got)
    else:
        assert all(b[0].shape == (0, 4) and b[1].dtype == np.int8 for b in got)


@pytest.mark.parametrize("processes", [False, True])
def test_stats_after_stop_report_freed_memory_as_zero(processes: bool) -> None:
    """Regression: device bytes were still reported after stop(); shared memory never was."""
    enqueuer = OrderedEnqueuer(
        Numbered(length=4, shape=(64, 64)), use_multiprocessing=processes, device="cpu", shard=None
    )
    enqueuer.start(workers=2)
    next(enqueuer.get())
    running = enqueuer.stats()
    enqueuer.stop(timeout=10)
    stopped = enqueuer.stats()
    assert running["device_bytes"] > 0 and running["pinned_bytes"] > 0
    assert stopped["device_bytes"] == 0 and stopped["pinned_bytes"] == 0
    assert ("shared_memory_bytes" in running) is processes
    if processes:
        assert running["shared_memory_bytes"] > 0 and stopped["shared_memory_bytes"] == 0


def test_stats_report_shared_memory_with_processes_and_no_device() -> None:
    enqueuer = OrderedEnqueuer(
        Numbered(length=4, shape=(64, 64)), use_multiprocessing=True, shard=None
    )
    enqueuer.start(workers=2, max_queue_size=2)
    next(enqueuer.get())
    running = enqueuer.stats()
    enqueuer.stop(timeout=10)
    # slots are made when first taken, each for at least one 16 KiB batch
    assert running["shared_memory_bytes"] >= 64 * 64 * 4, running
    assert enqueuer.stats()["shared_memory_bytes"] == 0


# -- one consumer at a time ------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "simulated"])
def test_two_consuming_threads_each_keep_the_batches_they_took(device: str) -> None:
    """Regression: two threads iterating one enqueuer (device="cpu") saw held batches change."""
    # The test's own simulated backend, so its streams outlive the run.
    backend: Any = SimulatedBackend() if device == "simulated" else device
    enqueuer = OrderedEnqueuer(Numbered(length=8), device=backend, epochs=40, shard=None)
    enqueuer.start(workers=2)
    held: dict[str, list[Any]] = {"first": [], "second": []}

    def consume(name: str) -> None:
        for batch in enqueuer.get():  # each thread its own get()
            held[name].append(batch)

    threads = [Worker(consume, name, name=f"{name}-consumer") for name in held]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.finish(30)
        assert thread.error is None, thread.error
    if device == "simulated":
        backend.synchronize_stream(backend.current_stream())
    batches = held["first"] + held["second"]
    assert len(batches) == 320
    for batch in batches:  # every held batch still holds its own values
        assert np.all(batch[0] == int(batch[1]["index"]))
    indices = sorted(int(b[1]["index"]) for b in batches)
    assert indices == sorted(list(range(8)) * 40)
    enqueuer.stop(timeout=10)
    if device == "simulated":
        del batches, held
        backend.close()


def test_get_again_in_one_thread_and_after_another_thread_finished_works() -> None:
    enqueuer = OrderedEnqueuer(Numbered(length=8), device="cpu", shard=None)
    enqueuer.start(workers=2)
    try:
        assert [int(next(enqueuer.get())[1]["index"]) for _ in range(3)] == [0, 1, 2]

        def take_two() -> list[int]:
            got = []
            for batch in enqueuer.get():
                got.append(int(batch[1]["index"]))
                if len(got) == 2:
                    break
            return got

        worker = Worker(take_two, name="epoch-thread")
        worker.start()
        assert worker.finish(10).result == [3, 4]
        batches = enqueuer.get()
        assert int(next(batches)[1]["index"]) == 5
        batches.close()
        assert int(next(enqueuer.get())[1]["index"]) == 6
    finally:
        enqueuer.stop(timeout=10)


# -- timeouts ----------------------------------------------------------------------------------


class BlocksAt(Numbered):
    """Reading ``index`` blocks until ``gate`` is set; ``entered`` says it began."""

    def __init__(self, index: int) -> None:
        super().__init__(length=6)
        self.index = index
        self.entered, self.gate = threading.Event(), threading.Event()

    def __getitem__(self, index: int) -> Any:
        if index == self.index:
            self.entered.set()
            assert self.gate.wait(30)
        return super().__getitem__(index)


def test_a_timeout_names_the_workers_and_indices_in_flight() -> None:
    seq = BlocksAt(1)
    enqueuer = OrderedEnqueuer(seq, shard=None, timeout=0.5)
    enqueuer.start(workers=1, max_queue_size=2)
    batches = enqueuer.get()
    try:
        assert int(next(batches)[1]["index"]) == 0
        with pytest.raises(
            BatchTimeoutError,
            match=r"^OrderedEnqueuer\.get\(\): no batch arrived within 0\.5 s; worker threads: "
            r"QueueRunnerThread-OrderedEnqueuer-host-worker0: batch index 1 \(epoch 0, position 1",
        ) as info:
            next(batches)
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(BatchTimeoutError):  # sticky, as any error
            next(enqueuer.get())
        assert not enqueuer.is_running()
    finally:
        seq.gate.set()
        enqueuer.stop(timeout=10)


def test_without_a_timeout_a_long_wait_logs_a_warning_and_waits_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    warned = threading.Event()
    records: list[logging.LogRecord] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            warned.set()

    handler = Seen(logging.WARNING)
    logging.getLogger("gpuqueue").addHandler(handler)
    seq = BlocksAt(1)
    enqueuer = OrderedEnqueuer(seq, shard=None)
    enqueuer.start(workers=1, max_queue_size=2)
    try:
        next(enqueuer.get())
        monkeypatch.setattr(delivery, "WARN_AFTER_S", 0.05)  # after the first, however slow
        consumer = Worker(lambda: next(enqueuer.get()), name="consumer")
        consumer.start()
        assert warned.wait(10)
        seq.gate.set()  # the batch comes after all: the consumer waited on and got it
        assert int(consumer.finish(10).result[1]["index"]) == 1  # type: ignore[index]
    finally:
        seq.gate.set()
        logging.getLogger("gpuqueue").removeHandler(handler)
        enqueuer.stop(timeout=10)
    message = records[0].getMessage()
    assert records[0].levelno == logging.WARNING
    assert re.match(
        r"^OrderedEnqueuer\.get\(\) has waited 0\.05 s for a batch and waits on; worker threads: "
        r"QueueRunnerThread-OrderedEnqueuer-host-worker0: batch index 1 \(epoch 0, position 1\)",
        message,
    ), message


@needs_procfs
@pytest.mark.timeout(60)
def test_a_stopped_worker_process_is_a_timeout_naming_it() -> None:
    """Regression: a SIGSTOPped (or deadlocked) worker blocked the consumer for ever."""
    enqueuer = OrderedEnqueuer(Numbered(length=50), use_multiprocessing=True, shard=None, timeout=2)
    enqueuer.start(workers=1, max_queue_size=1)
    (process,) = enqueuer._run.processes.processes
    pid = process.pid  # (the timeout kills and closes the process object: keep its pid)
    try:
        batches = enqueuer.get()
        next(batches)
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(BatchTimeoutError) as info:
            for _ in range(10):  # what was queued before it stopped, then nothing
                next(batches)
        assert re.match(
            rf"^OrderedEnqueuer\.get\(\): no batch arrived within 2 s; .*worker processes: "
            rf"OrderedEnqueuer-process0 \(pid {pid}\): batch index \d+ \(epoch 0",
            str(info.value),
        ), info.value
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed at the timeout, reaped since
            os.kill(pid, signal.SIGCONT)
        enqueuer.stop(timeout=10)


@pytest.mark.parametrize("timeout", [0, -1, "1", True])
def test_timeout_must_be_none_or_positive(timeout: Any) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be None or a positive number"):
        OrderedEnqueuer(Numbered(), timeout=timeout)
    with pytest.raises(ValueError, match=r"^timeout must be None or a positive number"):
        gpuqueue.GeneratorEnqueuer(iter([]), timeout=timeout)


def test_prefetch_passes_its_timeout_on() -> None:
    seq = BlocksAt(1)
    with (
        pytest.raises(BatchTimeoutError, match=r"^OrderedEnqueuer\.get\(\): no batch arrived"),
        gpuqueue.prefetch(seq, device="cpu", workers=1, max_queue_size=1, timeout=0.5) as b,
    ):
        try:
            for _ in b:
                pass
        finally:
            seq.gate.set()  # before the block's stop() waits for the worker
