"""gpuqueue's host enqueuer against ``tf_keras``'s ``OrderedEnqueuer``, side by side.

Same Sequence, same worker count (threads), same queue size, one process,
alternating runs. Two workloads:

- trivial batches (a 1-element array): the pipeline's own overhead dominates;
- 16 MiB batches, each a fresh copy of a slice of a source array (the read
  costs a memcpy, which NumPy runs without the GIL, so workers overlap).

Epochs are short (64 batches) so epoch boundaries count, as they do in real
training with ``steps_per_epoch``. A third measurement isolates the epoch
boundary: trivial batches in epochs of 10 against one long epoch, for each
library; ``epoch_cost`` is the ratio of time per batch (1.0 = boundaries are
free).

``bench.loaders`` measures the same and more, goal by goal, in interleaved
rounds. Without ``tf_keras`` its rows say "skipped" and why; gpuqueue's run.
Run (``pip install tf-keras tensorflow-cpu`` for the peer)::

    python -m bench.keras_compare --out bench/results/keras_compare.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

import gpuqueue
from bench.baselines import tf_keras_missing
from bench.machine import describe_machine

MiB = 1 << 20


class Trivial(gpuqueue.Sequence):
    def __init__(self, length: int) -> None:
        self.length = length
        self.batch = np.zeros(1, np.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batch


class Copies(gpuqueue.Sequence):
    """Each batch is a fresh copy of a slice of a source array: a real read's memcpy."""

    def __init__(self, length: int, batch_bytes: int) -> None:
        self.length = length
        self.batch_bytes = batch_bytes
        self.source = np.random.default_rng(0).integers(0, 255, 4 * batch_bytes, dtype=np.uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        start = (index % 3) * self.batch_bytes
        return self.source[start : start + self.batch_bytes].copy()


def consume(get: Any, batches: int) -> float:
    """Seconds to take ``batches`` batches from a started enqueuer's ``get()``."""
    stream = get()
    next(stream)  # the first batch pays the start-up in both libraries
    began = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return time.perf_counter() - began


def run_one(library: str, seq: Any, workers: int, batches: int) -> float:
    if library == "gpuqueue":
        enqueuer: Any = gpuqueue.OrderedEnqueuer(seq, shard=None)
    else:
        from tf_keras.utils import OrderedEnqueuer

        enqueuer = OrderedEnqueuer(seq, use_multiprocessing=False, shuffle=False)
    enqueuer.start(workers=workers, max_queue_size=10)
    try:
        return consume(enqueuer.get, batches)
    finally:
        enqueuer.stop()


def compare(
    name: str, seq: Any, workers: int, batches: int, repeats: int, nbytes: int
) -> dict[str, Any]:
    missing = tf_keras_missing()
    times: dict[str, list[float]] = (
        {"gpuqueue": []} if missing else {"gpuqueue": [], "tf_keras": []}
    )
    for _ in range(repeats):
        for library in times:  # alternate, so drift hits both alike
            times[library].append(run_one(library, seq, workers, batches))
    result: dict[str, Any] = {"workload": name, "workers": workers, "batches": batches}
    for library, seconds in times.items():
        best = statistics.median(seconds)
        result[library] = {
            "seconds_median": best,
            "batches_per_s": batches / best,
            "bytes_per_s": batches * nbytes / best,
        }
    if missing:  # a row that says why, not a crash
        result["tf_keras"] = {"skipped": missing}
        result["speedup"] = None
    else:
        gq, tk = result["gpuqueue"]["batches_per_s"], result["tf_keras"]["batches_per_s"]
        result["speedup"] = gq / tk
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trivial-batches", type=int, default=3000)
    parser.add_argument("--big-batches", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/keras_compare.json"))
    args = parser.parse_args()

    short = compare("epochs of 10", Trivial(10), args.workers, 1000, args.repeats, 4)
    long = compare("one long epoch", Trivial(10**6), args.workers, 1000, args.repeats, 4)
    epoch_cost = {
        library: long[library]["batches_per_s"] / short[library]["batches_per_s"]
        for library in ("gpuqueue", "tf_keras")
        if "skipped" not in long[library]
    }
    results = [
        compare("trivial", Trivial(64), args.workers, args.trivial_batches, args.repeats, 4),
        compare(
            "16MiB", Copies(64, 16 * MiB), args.workers, args.big_batches, args.repeats, 16 * MiB
        ),
    ]
    report = {
        "benchmark": "host enqueuer: gpuqueue.OrderedEnqueuer vs tf_keras.utils.OrderedEnqueuer",
        "command": "python -m bench.keras_compare "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": describe_machine("numpy"),
        "results": results,
        "epoch_boundaries": {"short": short, "long": long, "epoch_cost": epoch_cost},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        peer = r["tf_keras"]
        print(
            f"{r['workload']:>8}: gpuqueue {r['gpuqueue']['batches_per_s']:10.1f} batches/s, "
            + (
                f"tf_keras skipped: {peer['skipped']}"
                if "skipped" in peer
                else f"tf_keras {peer['batches_per_s']:10.1f} batches/s, "
                f"speedup {r['speedup']:.2f}x"
            )
        )
    print(
        "epoch boundaries (time per batch in 10-batch epochs / in one long epoch): "
        + ", ".join(f"{lib} {cost:.2f}x" for lib, cost in epoch_cost.items())
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
