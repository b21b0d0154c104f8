"""Worker processes on image batches: throughput, CPU and memory against threads and DataLoader.

The workload: (64, 3, 224, 224) uint8 batches from a Sequence that does
per-batch NumPy work (a brightness shift into a fresh array, and a flip of
every other image), 2 workers, queue 10, ``device=None``. Each loader runs
in a fresh interpreter (so one's heap never counts against another), the
loaders interleaved over the rounds; figures are median [min-max].

- ``batches_per_s``: consumer doing nothing (the loader's own limit);
- ``cpu_ms_per_batch``: CPU time of the whole process tree per batch (user +
  system, main process and every descendant): steadier than wall time on a
  shared machine;
- ``pss_mib``: peak proportional set size of the process tree (the sum of
  ``/proc/<pid>/smaps_rollup`` Pss over the main process and its
  descendants), sampled while the loader runs; shared memory counts once;
- ``hidden_*``: with a 5 ms consumer step (``sleep``: the CPU is free;
  ``numpy``: a NumPy step that holds the GIL part of the time), the share
  of the load time hidden behind the step: ``1 - (t_step_and_load - t_step)
  / t_load``, each per batch.

Run::

    python -m bench.processes --out bench/results/cpu-2core/processes.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import gpuqueue
from bench.machine import describe_machine

LOADERS = ("gpuqueue-threads", "gpuqueue-processes", "dataloader-2")
SHAPE = (64, 3, 224, 224)


class ImageBatches(gpuqueue.Sequence):
    """Image batches made by per-batch NumPy work: a shifted copy, every other image flipped."""

    def __init__(self, length: int = 64) -> None:
        self.length = length
        self.base = np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        images = np.add(self.base, np.uint8(index % 7))
        images[::2] = images[::2, :, :, ::-1]
        return images, np.full(SHAPE[0], index, np.int64)


def _tree(root: int) -> list[int]:
    """``root`` and every descendant process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sorted(tree)


def tree_pss_bytes(root: int) -> int:
    total = 0
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total * 1024


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its live descendants."""
    ticks = 0
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


class _Dataset:
    """A map-style torch dataset over the Sequence, whole batches (``batch_size=None``)."""

    def __init__(self, seq: ImageBatches) -> None:
        self.seq = seq

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, index: int) -> Any:
        return self.seq[index]


def _batches(loader: str, seq: ImageBatches) -> tuple[Any, Any]:
    """An endless iterator of the loader's batches, and a function that stops it."""
    if loader.startswith("gpuqueue"):
        processes = loader.endswith("processes")
        enqueuer = gpuqueue.OrderedEnqueuer(seq, use_multiprocessing=processes, shard=None)
        enqueuer.start(workers=2, max_queue_size=10)
        return enqueuer.get(), enqueuer.stop
    import torch.utils.data

    dataset = type("ImageDataset", (_Dataset, torch.utils.data.Dataset), {})(seq)
    data = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, persistent_workers=True
    )

    def endless() -> Any:
        while True:
            yield from data

    return endless(), lambda: data._iterator._shutdown_workers()


def _step(kind: str) -> Any:
    if kind == "none":
        return lambda batch: None
    if kind == "sleep":
        return lambda batch: time.sleep(0.005)
    # ~5 ms: a large ufunc (no GIL) and a Python loop of small ones (the GIL held)
    work = np.ones(1 << 16, np.float32)
    small = np.ones(64, np.float32)

    def step(batch: Any) -> None:
        np.multiply(work, 1.0000001, out=work)
        for _ in range(40):
            np.sqrt(small, out=small)
        work[0] += float(batch[0].flat[0])

    began = time.perf_counter()
    for _ in range(50):
        step((np.zeros(1),))
    per = (time.perf_counter() - began) / 50
    repeats = max(1, round(0.005 / per))

    def steps(batch: Any) -> None:
        for _ in range(repeats):
            step(batch)

    return steps


def one(loader: str, batches: int, step_kind: str) -> dict[str, Any]:
    """Runs one loader in this process; its figures."""
    step = _step(step_kind)
    resident_s = 0.0
    if step_kind != "none":
        dummy = (np.zeros(SHAPE, np.uint8), None)
        began = time.perf_counter()
        for _ in range(50):
            step(dummy)
        resident_s = (time.perf_counter() - began) / 50
    stream, stop = _batches(loader, ImageBatches())
    try:
        for _ in range(12):  # warm-up: processes started, slots made
            step(next(stream))
        me = os.getpid()
        cpu0, began = tree_cpu_s(me), time.perf_counter()
        for _ in range(batches):
            step(next(stream))
        wall = time.perf_counter() - began
        cpu = tree_cpu_s(me) - cpu0
        pss = 0
        for _ in range(8):  # memory after the timed part, so sampling costs it nothing
            for _ in range(5):
                step(next(stream))
            pss = max(pss, tree_pss_bytes(me))
    finally:
        stop()
    return {
        "seconds_per_batch": wall / batches,
        "resident_step_s": resident_s,
        "cpu_ms_per_batch": cpu / batches * 1e3,
        "pss_bytes": pss,
    }


def _in_child(loader: str, batches: int, step_kind: str) -> dict[str, Any]:
    code = (
        "import json, sys\nfrom bench.processes import one\n"
        "if __name__ == '__main__':\n"
        f"    print(json.dumps(one({loader!r}, {batches}, {step_kind!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{loader} ({step_kind}) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("bench/results/processes.json"))
    args = parser.parse_args()

    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        loader: {"none": [], "sleep": [], "numpy": []} for loader in LOADERS
    }
    for round_number in range(args.rounds):
        for step_kind in ("none", "sleep", "numpy"):
            for loader in LOADERS:  # interleaved, so drift hits every loader alike
                if step_kind != "none" and loader == "dataloader-2":
                    continue
                print(f"round {round_number + 1}/{args.rounds}: {loader}, step {step_kind}")
                raw[loader][step_kind].append(_in_child(loader, args.batches, step_kind))
    results: dict[str, Any] = {}
    for loader in LOADERS:
        runs = raw[loader]["none"]
        entry: dict[str, Any] = {
            "batches_per_s": _summary([1 / r["seconds_per_batch"] for r in runs]),
            "cpu_ms_per_batch": _summary([r["cpu_ms_per_batch"] for r in runs]),
            "pss_mib": _summary([r["pss_bytes"] / 2**20 for r in runs]),
        }
        for step_kind in ("sleep", "numpy"):
            hidden = []
            for loaded, alone in zip(raw[loader][step_kind], runs, strict=False):
                load = alone["seconds_per_batch"]
                extra = loaded["seconds_per_batch"] - loaded["resident_step_s"]
                hidden.append(min(1.0, max(0.0, 1 - extra / load)))
            if hidden:
                entry[f"hidden_{step_kind}"] = _summary(hidden)
        results[loader] = entry
    ratios = {
        "processes_vs_threads": [
            p["seconds_per_batch"] and t["seconds_per_batch"] / p["seconds_per_batch"]
            for p, t in zip(
                raw["gpuqueue-processes"]["none"], raw["gpuqueue-threads"]["none"], strict=True
            )
        ],
        "processes_vs_dataloader_2": [
            d["seconds_per_batch"] / p["seconds_per_batch"]
            for p, d in zip(
                raw["gpuqueue-processes"]["none"], raw["dataloader-2"]["none"], strict=True
            )
        ],
    }
    slot_bytes = int(np.prod(SHAPE)) + 256 * (-(-SHAPE[0] * 8 // 256))
    report = {
        "benchmark": "worker processes on (64,3,224,224) uint8 image batches, 2 workers, queue 10",
        "command": f"python -m bench.processes --rounds {args.rounds} --batches {args.batches}",
        "machine": describe_machine("numpy"),
        "slot_bytes": slot_bytes,
        "slots_formula": "(workers + max_queue_size + 1) slots of the largest batch, "
        "+ up to 2 spare, + one per batch the consumer holds",
        "results": results,
        "ratios": {name: _summary(values) for name, values in ratios.items()},
        "raw": raw,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for loader, entry in results.items():
        figures = ", ".join(
            f"{name} {value['median']:.3g} [{value['min']:.3g}-{value['max']:.3g}]"
            for name, value in entry.items()
        )
        print(f"{loader}: {figures}")
    for name, values in {n: _summary(v) for n, v in ratios.items()}.items():
        print(f"{name}: {values['median']:.2f} [{values['min']:.2f}-{values['max']:.2f}]")


if __name__ == "__main__":
    main()
