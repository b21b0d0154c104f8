"""``bench.loaders``' per-sample rows (issue 23): ``batch_size=`` against ``DataLoader``.

The workload is a per-sample dataset, as most are: each index gives a fresh
uint8 3x64x64 image and an int label, batched by 64, 2 workers. Each case
runs in a fresh process (``memory.run_fresh``), so its peak RSS and its
process tree's PSS are its own:

- gpuqueue threads (``device=None``: one stack per batch) and worker
  processes (each sample written into its row of a shared-memory slot);
- ``DataLoader(batch_size=64)`` with ``num_workers`` 0 and 2;
- a GIL-bound sample (a pure-Python loop of about 200 us per sample) in
  gpuqueue threads and processes: threads take turns on the GIL, processes
  do not (the limit is 2x on 2 CPUs).

The goals (``GOALS``) are the issue's; ``bench.loaders_report`` computes them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import gpuqueue

# Case key (after "samples/") -> label (the batch size is the config's sample_batch: 64).
CASES = {
    "threads": "gpuqueue threads, batch_size= (device=None)",
    "processes": "gpuqueue processes, batch_size= (device=None)",
    "dataloader0": "DataLoader num_workers=0",
    "dataloader2": "DataLoader num_workers=2",
    "gil_threads": "GIL-bound samples: gpuqueue threads",
    "gil_processes": "GIL-bound samples: gpuqueue processes",
}

FULL = {"sample_shape": (3, 64, 64), "sample_batch": 64, "sample_batches": 300,
        "gil_us": 200.0, "sample_gil_batches": 60}  # fmt: skip
SMOKE = {"sample_shape": (3, 8, 8), "sample_batch": 8, "sample_batches": 4,
         "gil_us": 20.0, "sample_gil_batches": 2}  # fmt: skip


class Images:
    """One sample per index: a fresh uint8 image (a memcpy, as a decode writes one) and a label."""

    def __init__(self, shape: tuple[int, ...], length: int = 100_000) -> None:
        self.shape, self.length = tuple(shape), length
        self.image = np.random.default_rng(0).integers(0, 255, self.shape, dtype=np.uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        image = self.image.copy()
        image.flat[0] = index % 256
        return image, index


class GilBound(Images):
    """Samples whose reading holds the GIL: a pure-Python loop of about ``us`` microseconds."""

    def __init__(self, shape: tuple[int, ...], us: float) -> None:
        super().__init__(shape)
        began, count = time.perf_counter(), 0
        while time.perf_counter() - began < 0.02:  # calibrated where it is made
            count += _spin(1000)
        self.spins = max(1, int(count * us * 1e-6 / 0.02))

    def __getitem__(self, index: int) -> Any:
        _spin(self.spins)
        return super().__getitem__(index)


def _spin(count: int) -> int:
    total = 0
    for step in range(count):
        total += step & 1
    return count


def per_batch(batches: Any, n: int) -> float:
    """Seconds per batch over ``n`` batches after the first (which pays the start-up).

    ``n`` is many times the queue, so the batches queued during the start-up
    weigh little.
    """
    iterator = iter(batches)
    next(iterator)
    began = time.perf_counter()
    for _ in range(n):
        next(iterator)
    return (time.perf_counter() - began) / n


def run_case(name: str, p: dict[str, Any], workers: int) -> dict[str, Any]:
    """One case (``name`` without ``samples/``), in this fresh process; its figures.

    The caller has done ``memory.child_handshake()`` first, when ``ready``
    is to be measured from outside.
    """
    batch = p["sample_batch"]
    gil = name.startswith("gil_")
    dataset = GilBound(p["sample_shape"], p["gil_us"]) if gil else Images(p["sample_shape"])
    n = p["sample_gil_batches"] if gil else p["sample_batches"]
    if name.startswith("dataloader"):
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch, num_workers=int(name[-1]))  # type: ignore[arg-type, unused-ignore]
        return {"s_per_batch": per_batch(loader, n)}
    processes = name.endswith("processes")
    with gpuqueue.prefetch(
        dataset,
        None,
        batch_size=batch,
        workers=workers,
        max_queue_size=p["max_queue_size"],
        use_multiprocessing=processes,
        shard=None,
    ) as batches:
        return {"s_per_batch": per_batch(batches, n)}


def _speed(faster: dict[str, Any], slower: dict[str, Any]) -> float:
    return float(slower["s_per_batch"]) / float(faster["s_per_batch"])


def _pss(mine: dict[str, Any], theirs: dict[str, Any]) -> float:
    return float(mine["tree_pss_peak_bytes"]) / float(theirs["tree_pss_peak_bytes"])


# (goal, unit, cases, per-round value, test of the summary, target text), as bench.loaders_report
GOALS: list[Any] = [
    ("samples: threads vs DataLoader num_workers=0", "x",
     ["samples/threads", "samples/dataloader0"], _speed, lambda s: s["median"] >= 1.0,
     ">= 1.0x (median)"),
    ("samples: threads vs DataLoader num_workers=2", "x",
     ["samples/threads", "samples/dataloader2"], _speed, lambda s: s["median"] >= 4.0,
     ">= 4x (median)"),
    ("samples: processes vs DataLoader num_workers=2", "x",
     ["samples/processes", "samples/dataloader2"], _speed, lambda s: s["median"] >= 2.5,
     ">= 2.5x (median)"),
    ("samples: processes vs threads", "x",
     ["samples/processes", "samples/threads"], _speed, lambda s: s["median"] >= 0.8,
     ">= 0.8x (median)"),
    ("GIL-bound samples: processes vs threads", "x",
     ["samples/gil_processes", "samples/gil_threads"], _speed, lambda s: s["median"] >= 1.8,
     ">= 1.8x (median; 2x is the limit on 2 CPUs)"),
    ("samples: tree PSS peak, processes / DataLoader num_workers=2", "x",
     ["samples/processes", "samples/dataloader2"], _pss, lambda s: s["median"] <= 1.0,
     "<= 1 (median)"),
    ("samples: tree PSS peak, threads / DataLoader num_workers=2", "x",
     ["samples/threads", "samples/dataloader2"], _pss, lambda s: s["median"] <= 1.0,
     "<= 1 (median)"),
]  # fmt: skip
