"""Soak: 10^5 batches through one enqueuer, threads then processes; is every resource flat?

Each mode runs one ``OrderedEnqueuer`` (``device="cpu"``, shuffled, many
epochs) for ``--batches`` batches, checks every batch's content against the
epoch's seeded order, and samples every ``--every`` batches: threads, open
file descriptors, shared-memory descriptors (memfd or ``/dev/shm``) held by
this process, entries in ``/dev/shm`` (the whole machine's: other programs'
too), resident memory of this process and of the worker processes, and the
pinned, device and shared-memory bytes ``stats()`` reports. After ``stop()``
it samples once more. Flat is the goal: the JSON's ``growth`` is the last
sample minus the first.

Not part of the test suite. Run::

    python -m bench.soak                        # 10^5 batches per mode
    python -m bench.soak --batches 20000 --every 2000 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import gpuqueue
from bench.machine import describe_machine
from gpuqueue.source.order import epoch_order

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class SoakSequence(gpuqueue.Sequence):
    """Batch i: a (64, 64) float32 array filled with i, and i as an int64."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return np.full((64, 64), index, np.float32), np.int64(index)


def _rss(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return -1


def _shared_memory_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(("/memfd:", "/dev/shm/"))
    return count


def _sample(enqueuer: gpuqueue.OrderedEnqueuer, delivered: int, started: float) -> dict[str, Any]:
    stats = enqueuer.stats()
    run = enqueuer._run
    pool = None if run is None else run.processes
    workers = [] if pool is None or not pool.alive() else pool.processes
    return {
        "batches": delivered,
        "seconds": round(time.monotonic() - started, 3),
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "shared_memory_fds": _shared_memory_fds(),
        "dev_shm_entries": len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else -1,
        "rss_bytes": _rss(),
        "worker_rss_bytes": sum(_rss(p.pid) for p in workers if p.pid is not None),
        "pinned_bytes": stats.get("pinned_bytes", 0),
        "device_bytes": stats.get("device_bytes", 0),
        "shared_memory_bytes": stats.get("shared_memory_bytes", 0),
    }


def soak(processes: bool, batches: int, every: int, length: int, workers: int) -> dict[str, Any]:
    """One mode's run: the samples, and how much each figure grew from first to last."""
    seed = 16
    enqueuer = gpuqueue.OrderedEnqueuer(
        SoakSequence(length),
        use_multiprocessing=processes,
        shuffle=True,
        seed=seed,
        shard=None,
        device="cpu",
    )
    enqueuer.start(workers=workers, max_queue_size=8)
    started = time.monotonic()
    samples = []
    delivered = 0
    order = epoch_order(length, 0, shuffle=True, seed=seed)
    try:
        for batch in enqueuer.get():
            epoch, position = divmod(delivered, length)
            if position == 0:
                order = epoch_order(length, epoch, shuffle=True, seed=seed)
            expected = int(order[position])
            if int(batch[1]) != expected or batch[0][63, 63] != expected:
                raise AssertionError(f"batch {delivered}: got {int(batch[1])}, not {expected}")
            delivered += 1
            if delivered % every == 0:
                samples.append(_sample(enqueuer, delivered, started))
            if delivered == batches:
                break
    finally:
        enqueuer.stop(timeout=30)
    after_stop = _sample(enqueuer, delivered, started)
    first, last = samples[0], samples[-1]
    growth = {key: last[key] - first[key] for key in first if key not in ("batches", "seconds")}
    return {
        "mode": "processes" if processes else "threads",
        "batches": delivered,
        "epochs": delivered / length,
        "batches_per_s": round(delivered / last["seconds"], 1),
        "samples": samples,
        "after_stop": after_stop,
        "growth": growth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=100_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("--length", type=int, default=1000, help="batches per epoch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu-2core/soak.json"))
    args = parser.parse_args()
    before = {
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_bytes": _rss(),
    }
    runs = []
    for processes in (False, True):
        run = soak(processes, args.batches, args.every, args.length, args.workers)
        runs.append(run)
        print(
            f"{run['mode']:9}  {run['batches']:,} batches ({run['epochs']:.0f} epochs, "
            f"{run['batches_per_s']:,.0f}/s)  growth first to last sample: "
            + ", ".join(f"{k} {v:+,}" for k, v in run["growth"].items())
        )
    report = {
        "benchmark": "soak",
        "command": f"python -m bench.soak --batches {args.batches} --every {args.every} "
        f"--length {args.length} --workers {args.workers}",
        "machine": describe_machine("numpy"),
        "config": vars(args) | {"out": str(args.out), "device": "cpu", "shuffle": True},
        "before": before,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    import bench.soak  # so that worker processes find SoakSequence under its module's name

    bench.soak.main()
