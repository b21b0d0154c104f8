"""Worker processes start from gpuqueue's own forkserver, preloaded with the parent's libraries.

A worker then finds the libraries the parent had imported already imported
(it does not import torch or Keras again), its parent is the server (not the
training process: never a plain ``fork`` of it), and the server, having
imported them, runs no thread that a process importing only NumPy does not
(so forking it is as safe as ``DataLoader``'s fork). ``stats()["startup_s"]``
says what starting cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer, prefetch
from gpuqueue.host.forkserver import PRELOADABLE, preload_for_parent

from .seqs import Numbered

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")

ROOT = Path(__file__).resolve().parent.parent


class WhatTheWorkerHas(gpuqueue.Sequence):
    """Batch i: whether scipy was in the worker's modules when it read, and its parent's pid."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Any:
        return np.array(["scipy" in sys.modules, os.getppid()], np.int64)


@pytest.mark.engine
def test_workers_start_with_the_libraries_the_parent_imported() -> None:
    pytest.importorskip("scipy")  # imported here; nothing a worker runs imports it
    assert "scipy" in preload_for_parent()
    with prefetch(WhatTheWorkerHas(), None, workers=2, epochs=1, use_multiprocessing=True) as got:
        replies = [batch.tolist() for batch in got]
    assert [had_scipy for had_scipy, _ in replies] == [1, 1, 1, 1]
    parents = {parent for _, parent in replies}
    assert len(parents) == 1 and os.getpid() not in parents  # one server forked both


def test_startup_s_is_the_time_from_start_to_the_first_batch() -> None:
    for processes in (False, True):
        enqueuer = OrderedEnqueuer(Numbered(), use_multiprocessing=processes, shard=None)
        assert enqueuer.stats()["startup_s"] is None
        began = time.monotonic()
        enqueuer.start(workers=2, max_queue_size=3)
        try:
            batches = enqueuer.get()
            next(batches)
            elapsed = time.monotonic() - began
            startup = enqueuer.stats()["startup_s"]
            next(batches)
            assert enqueuer.stats()["startup_s"] == startup  # the first batch's, kept
        finally:
            enqueuer.stop()
        assert isinstance(startup, float) and 0 < startup <= elapsed


_SERVER_PROBE = """
import json, os, subprocess, sys
os.environ.setdefault("KERAS_BACKEND", "torch")
import importlib
for name in {libraries!r}:
    try:
        importlib.import_module(name)
    except Exception:
        pass
import numpy as np
import gpuqueue
from gpuqueue.host.forkserver import preload_for_parent


class Parent(gpuqueue.Sequence):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return np.array([os.getppid()])


with gpuqueue.prefetch(Parent(), None, workers=1, epochs=1, use_multiprocessing=True) as got:
    server = int(next(iter(got))[0])  # the server has preloaded before it forked this worker
    threads = len(os.listdir(f"/proc/{{server}}/task"))
numpy_alone = subprocess.run(
    [sys.executable, "-c", "import os, numpy; print(len(os.listdir('/proc/self/task')))"],
    capture_output=True, text=True, check=True,
).stdout
print(json.dumps({{
    "preload": preload_for_parent(), "server": server, "me": os.getpid(),
    "server_threads": threads, "numpy_threads": int(numpy_alone),
}}))
"""


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_the_preloaded_server_runs_no_thread_beyond_numpys() -> None:
    """With every preloadable library installed here imported, in a fresh interpreter."""
    code = textwrap.dedent(_SERVER_PROBE.format(libraries=PRELOADABLE))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=280, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["server"] != found["me"]  # forked from the server, not from the parent
    assert found["server_threads"] <= found["numpy_threads"], found
    assert found["preload"][0] == "numpy" and found["preload"][-1] == "gpuqueue.host.process_main"
