"""Memory of a process tree, as Linux accounts it, and a case run in a fresh process.

PSS (proportional set size, from ``/proc/<pid>/smaps_rollup``) splits each
shared page among the processes that map it, so the PSS of a process tree
counts every page once: forked workers sharing their parent's pages add
nothing for them, while worker processes' own interpreters and the
shared-memory slots are counted. RSS counts shared pages in every process
that maps them, so only one process's RSS is shown.

``run_fresh`` runs one case in a new Python process (so no case inherits
another's heap), samples its tree's PSS from outside while it runs (so
the sampling takes no time from the case's own threads), and returns the
case's figures with ``tree_pss_base_bytes`` (before the loader started),
``tree_pss_peak_bytes`` and ``tree_pss_added_bytes``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY_S = 0.02


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += _children(current)
    return pids


def rollup(pid: int) -> dict[str, int]:
    """``Rss`` and ``Pss`` of one process in bytes (zeros if it has just ended)."""
    out = {"Rss": 0, "Pss": 0}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in out:
            out[name] = int(rest.split()[0]) * 1024
    return out


def tree_pss(pid: int) -> int:
    return sum(rollup(p)["Pss"] for p in tree(pid))


def run_fresh(module: str, case: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs ``python -m module --child case --params JSON`` and measures its memory.

    The child prints ``ready`` once set up and waits for a line on stdin
    before it starts its loader, so the base PSS is taken before anything
    of the loader exists; then it prints its figures as one JSON line.

    Raises:
        RuntimeError: If the child fails, with its stderr's tail.
    """
    command = [sys.executable, "-m", module, "--child", case, "--params", json.dumps(params)]
    child = subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    deadline = time.monotonic() + timeout
    try:
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"case {case!r} did not start: {line!r}")
        base = peak = tree_pss(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        while child.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"case {case!r} ran past {timeout:.0f} s")
            peak = max(peak, tree_pss(child.pid))
            time.sleep(SAMPLE_EVERY_S)  # a sampling interval, not a wait for an event
        out, err = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"case {case!r} failed ({child.returncode}): {err[-2000:]}")
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    figures.update(
        tree_pss_base_bytes=base, tree_pss_peak_bytes=peak, tree_pss_added_bytes=peak - base
    )
    return figures


def child_handshake() -> None:
    """The child's side: say it is set up, then wait for the parent's base sample."""
    print("ready", flush=True)
    sys.stdin.readline()


def peak_rss_bytes() -> int:
    """This process's peak RSS so far: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: Linux carries that across ``exec``, so a child would
    report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
