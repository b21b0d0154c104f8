"""Ctrl-C in the consumer ends the program within 2 s, even with workers stuck in a read.

Each test runs a real script in a subprocess whose ``__getitem__`` blocks for
a minute from index 2 on, waits until the consumer has taken batches 0 and 1
and the workers are inside the blocking read (the script says so on
stdout), then sends one real SIGINT and times the exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from multiprocessing import shared_memory
    import numpy as np
    import gpuqueue

    def say(line):  # one write per line: threads of this process print too
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

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
            if index >= 2:
                say("READING")
                threading.Event().wait(60)  # a read that nothing can interrupt
            return np.full(3, index)

    if __name__ == "__main__":
        mode, device = sys.argv[1], None if sys.argv[2] == "none" else sys.argv[2]
        with gpuqueue.prefetch(
            Stuck(), device=device, workers=2, use_multiprocessing=mode == "processes"
        ) as batches:
            for batch in batches:
                if int(batch[0]) == 1:
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
            pytest.fail("the process was still alive 10 s after one Ctrl-C")
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
