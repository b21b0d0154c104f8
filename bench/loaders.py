"""``python -m bench.loaders``: gpuqueue's host loaders against the peers, goal by goal.

The comparisons behind issue 14, reproducible in one command (a few
minutes; ``--smoke`` for the tests), every case interleaved with the others
in each of at least five rounds (``bench/rounds.py``), every ratio taken
within a round:

- trivial batches (one 4-byte array), 2 worker threads, queue 10: gpuqueue's
  ``OrderedEnqueuer`` against ``tf_keras``'s (a skipped row where it is not
  installed) and ``DataLoader(num_workers=0)``;
- the thread hand-off per batch: trivial batches, 1 worker, the consumer
  doing nothing, minus the time of calling ``seq[i]`` directly;
- epoch boundaries: 10 short epochs against one epoch as long as all ten
  (time per batch), and the 10 short epochs against ``DataLoader(num_workers=0)``;
- (64, 3, 224, 224) uint8 image batches, each a freshly written array:
  threads against ``DataLoader`` (``num_workers`` 0 and 2), worker processes
  against threads, ``prefetch(device="auto")`` on a machine without a GPU
  against the enqueuer with ``device=None``; each run in a fresh process
  whose tree's PSS is sampled from outside (``bench/memory.py``), with its
  own peak RSS;
- a 5 ms consumer step (a sleep, and a NumPy step) on the image batches: the
  share of the load time hidden behind it, threads and processes;
- per-sample datasets (``batch_size=``) against ``DataLoader``, each in a
  fresh process (``bench/samples.py``).
- reads that hold the GIL (a pure-Python loop per batch, about 1.5 ms on a
  quiet machine), where processes exist to win: worker processes against
  worker threads and ``DataLoader(num_workers=2)``, 2 workers each;
- worker start (``bench/startup.py``, a fresh process per round that imports
  torch and Keras first): time to the first batch with 2 worker processes,
  gpuqueue's first and second run against ``DataLoader(num_workers=2)``.

It prints each goal of the issue as a row (goal, median [min-max], met or
not: computed from the rounds) and writes the JSON, with the machine, to
``bench/results/<machine>/loaders.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import gpuqueue
from bench import memory, samples
from bench.baselines import tf_keras_missing
from bench.loaders_report import goals, print_report
from bench.machine import describe_machine, results_folder
from bench.rounds import Case, Figures, Progress, run_rounds
from bench.workloads import NumpyStep

IMAGE_SHAPE = (64, 3, 224, 224)
FULL = {
    "workers": 2, "max_queue_size": 10, "image_shape": IMAGE_SHAPE, "image_batches": 60,
    "trivial_batches": 10000, "epoch_batches": 100, "epochs": 10, "overlap_batches": 40,
    "step_ms": 5.0, "gil_loop": 18000, "gil_batches": 200, "startup_keras": True,
}  # fmt: skip
SMOKE = {
    **FULL, "image_shape": (4, 3, 32, 32), "image_batches": 8, "trivial_batches": 100,
    "epoch_batches": 10, "overlap_batches": 6, "step_ms": 1.0, "gil_loop": 500,
    "gil_batches": 10, "startup_keras": False,
}  # fmt: skip
FULL.update(samples.FULL)
SMOKE.update(samples.SMOKE)


class Trivial(gpuqueue.Sequence):
    """Batches that cost nothing to read: what is timed is the loader itself."""

    def __init__(self, length: int) -> None:
        self.length, self.batch = length, np.zeros(1, np.float32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batch


class Images(gpuqueue.Sequence):
    """uint8 image batches, each a fresh array written from one image (a memcpy per batch).

    Small to pickle (one image), so worker processes start as cheaply as threads.
    """

    def __init__(self, shape: tuple[int, ...], length: int = 1000) -> None:
        self.shape, self.length = tuple(shape), length
        self.image = np.random.default_rng(0).integers(0, 255, self.shape[1:], dtype=np.uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        batch = np.empty(self.shape, np.uint8)
        batch[...] = self.image
        batch.flat[0] = index % 256
        return batch


class GilBound(gpuqueue.Sequence):
    """Batches whose read is a pure-Python loop: it holds the GIL, as Python decoding does."""

    def __init__(self, loop: int, length: int = 10**6) -> None:
        self.loop, self.length = loop, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        total = 0
        for i in range(self.loop):
            total += (i * i) ^ index
        return np.full(16, total % 251, np.int64)


def per_batch(
    batches: Iterator[Any], n: int, step: Callable[[Any], None] | None = None, warm: int = 1
) -> float:
    """Seconds per batch over ``n`` batches after the first ``warm`` (which pay the start-up).

    With worker processes, ``warm`` is the number of workers: each has then
    delivered a batch, so the last one's start is not counted as throughput.
    """
    try:
        for _ in range(warm):
            next(batches)
        began = time.perf_counter()
        if step is None:
            for _ in range(n):
                next(batches)
        else:
            for _ in range(n):
                step(next(batches))
        return (time.perf_counter() - began) / n
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def gpuqueue_feed(seq: Any, p: dict[str, Any], workers: int, **options: Any) -> Iterator[Any]:
    enqueuer = gpuqueue.OrderedEnqueuer(seq, shard=None, **options)
    enqueuer.start(workers=workers, max_queue_size=p["max_queue_size"])
    try:
        yield from enqueuer.get()
    finally:
        enqueuer.stop()


def dataloader_feed(seq: Any, num_workers: int, epochs: int | None = None) -> Iterator[Any]:
    from torch.utils.data import DataLoader

    class Batches:  # a map-style dataset; DataLoader turns its arrays into tensors
        def __len__(self) -> int:
            return len(seq)

        def __getitem__(self, index: int) -> Any:
            return seq[index]

    loader = DataLoader(Batches(), batch_size=None, num_workers=num_workers)  # type: ignore[arg-type, unused-ignore]
    epoch = 0
    while epochs is None or epoch < epochs:
        yield from loader
        epoch += 1


def tf_keras_feed(seq: Any, workers: int, max_queue_size: int) -> Iterator[Any]:
    from tf_keras.utils import OrderedEnqueuer

    enqueuer = OrderedEnqueuer(seq, use_multiprocessing=False, shuffle=False)
    enqueuer.start(workers=workers, max_queue_size=max_queue_size)
    try:
        yield from enqueuer.get()
    finally:
        enqueuer.stop()


def direct_feed(seq: Any) -> Iterator[Any]:
    while True:
        for index in range(len(seq)):
            yield seq[index]


def epoch_time(batches: Iterator[Any], total: int) -> float:
    """Seconds per batch from the first batch to the last of a finite feed of ``total``."""
    next(batches)
    began = time.perf_counter()
    count = 1
    for _ in batches:
        count += 1
    if count != total:
        raise RuntimeError(f"expected {total} batches over the epochs, got {count}")
    return (time.perf_counter() - began) / (total - 1)


# ------------------------------------------------------------ image cases, in a fresh process


def _image_case(name: str, p: dict[str, Any]) -> Figures:
    """One image, per-sample or start-up case, run in this (fresh) process; its figures."""
    if name == "startup":
        from bench import startup

        memory.child_handshake()
        return startup.measure(keras=p["startup_keras"])
    seq = Images(p["image_shape"])
    workers, n = p["workers"], p["image_batches"]
    if "dataloader" in name:
        import torch.utils.data  # noqa: F401  # its users have it loaded before their loader
    memory.child_handshake()
    figures: Figures = {}
    if name.startswith("samples/"):
        figures = samples.run_case(name.removeprefix("samples/"), p, workers)
        return {**figures, "rss_peak_bytes": memory.peak_rss_bytes()}
    if name == "threads":
        seconds = per_batch(gpuqueue_feed(seq, p, workers), n)
    elif name == "processes":
        enqueuer = gpuqueue.OrderedEnqueuer(seq, use_multiprocessing=True, shard=None)
        enqueuer.start(workers=workers, max_queue_size=p["max_queue_size"])
        try:
            seconds = per_batch(iter(enqueuer.get()), n)
            figures["shared_memory_bytes"] = enqueuer.stats().get("shared_memory_bytes", 0)
        finally:
            enqueuer.stop()
    elif name in ("dataloader0", "dataloader2"):
        seconds = per_batch(dataloader_feed(seq, int(name[-1])), n)
    elif name == "prefetch_auto":
        import warnings

        from gpuqueue.backends import resolve

        with warnings.catch_warnings():  # the "no GPU here, NumPy it is" warning
            warnings.simplefilter("ignore")
            backend = resolve("auto")
            backend.close()
            # The CPU path is the goal: where "auto" would find a GPU, ask for the CPU.
            device = "cpu" if backend.name == "cupy" else "auto"
            figures["device"] = device
            with gpuqueue.prefetch(
                seq, device=device, workers=workers, max_queue_size=p["max_queue_size"], shard=None
            ) as batches:
                seconds = per_batch(iter(batches), n)
    else:
        raise ValueError(f"unknown image case {name!r}")
    return {**figures, "s_per_batch": seconds, "rss_peak_bytes": memory.peak_rss_bytes()}


IMAGE_CASES = {
    "threads": "gpuqueue threads (device=None)",
    "processes": "gpuqueue processes (device=None)",
    "dataloader0": "DataLoader num_workers=0",
    "dataloader2": "DataLoader num_workers=2",
    "prefetch_auto": 'prefetch(device="auto") on CPU',  # device="cpu" where there is a GPU
}


# ------------------------------------------------------------ the cases


class SleepStep:
    """A consumer step that sleeps (a GPU step's host side: the host is idle meanwhile)."""

    def __init__(self, ms: float) -> None:
        self.seconds = ms / 1e3

    def __call__(self, batch: Any) -> None:
        time.sleep(self.seconds)


def build_cases(p: dict[str, Any]) -> list[Case]:
    """Every case, in the order a round runs them (rotated each round)."""
    workers, queue, n = p["workers"], p["max_queue_size"], p["trivial_batches"]
    long_seq = Trivial(10**7)
    cases = [
        Case("trivial/gpuqueue", lambda: {"s_per_batch": per_batch(
            gpuqueue_feed(long_seq, p, workers), n)}, label="trivial: gpuqueue threads"),
        Case("trivial/tf_keras", lambda: {"s_per_batch": per_batch(
            tf_keras_feed(long_seq, workers, queue), n)}, skip=tf_keras_missing(),
            label="trivial: tf_keras enqueuer"),
        Case("trivial/dataloader0", lambda: {"s_per_batch": per_batch(
            dataloader_feed(long_seq, 0), n)}, label="trivial: DataLoader num_workers=0"),
        Case("handoff/gpuqueue1", lambda: {"s_per_batch": per_batch(
            gpuqueue_feed(long_seq, p, 1), n)}, label="hand-off: gpuqueue 1 worker"),
        Case("handoff/direct", lambda: {"s_per_batch": per_batch(direct_feed(long_seq), n)},
             label="hand-off: seq[i] called directly"),
    ]  # fmt: skip
    epochs, length = p["epochs"], p["epoch_batches"]
    total = epochs * length
    cases += [
        Case("epochs/short", lambda: {"s_per_batch": epoch_time(gpuqueue_feed(
            Trivial(length), p, workers, epochs=epochs), total)},
            label=f"epochs: gpuqueue {epochs} x {length}"),
        Case("epochs/long", lambda: {"s_per_batch": epoch_time(gpuqueue_feed(
            Trivial(total), p, workers, epochs=1), total)}, label=f"epochs: gpuqueue 1 x {total}"),
        Case("epochs/dataloader0", lambda: {"s_per_batch": epoch_time(dataloader_feed(
            Trivial(length), 0, epochs), total)}, label=f"epochs: DataLoader {epochs} x {length}"),
    ]  # fmt: skip
    for name, label in IMAGE_CASES.items():
        cases.append(
            Case(f"image/{name}", lambda name=name: memory.run_fresh(  # type: ignore[misc]
                "bench.loaders", name, p, timeout=300), label=f"images: {label}")
        )  # fmt: skip
    for name, label in samples.CASES.items():
        cases.append(
            Case(f"samples/{name}", lambda name=name: memory.run_fresh(  # type: ignore[misc]
                "bench.loaders", f"samples/{name}", p, timeout=300), label=f"samples: {label}")
        )  # fmt: skip
    gil, g = GilBound(p["gil_loop"]), p["gil_batches"]
    cases += [
        Case("gil/processes", lambda: {"s_per_batch": per_batch(gpuqueue_feed(
            gil, p, workers, use_multiprocessing=True), g, warm=workers)},
            label="GIL-bound: gpuqueue processes"),
        Case("gil/threads", lambda: {"s_per_batch": per_batch(
            gpuqueue_feed(gil, p, workers), g, warm=workers)}, label="GIL-bound: gpuqueue threads"),
        Case("gil/dataloader2", lambda: {"s_per_batch": per_batch(
            dataloader_feed(gil, 2), g, warm=2)}, label="GIL-bound: DataLoader num_workers=2"),
        Case("startup", lambda: memory.run_fresh("bench.loaders", "startup", p, timeout=300),
             skip=_startup_missing(p), label="start-up: 2 processes after import torch, keras"),
    ]  # fmt: skip
    images = Images(p["image_shape"])
    resident = images[0]
    steps = {"sleep": SleepStep(p["step_ms"]), "numpy": NumpyStep(p["step_ms"])}
    m = p["overlap_batches"]
    for step_name, step in steps.items():
        cases.append(Case(f"overlap/alone/{step_name}", lambda step=step: {  # type: ignore[misc]
            "s_per_batch": per_batch(direct_feed([resident]), m, step)},
            label=f"overlap: {step_name} step alone"))  # fmt: skip
    for mode, processes in (("threads", False), ("processes", True)):
        for step_name, step in (("none", None), *steps.items()):
            cases.append(Case(
                f"overlap/{mode}/{step_name}",
                lambda processes=processes, step=step: {  # type: ignore[misc]
                    "s_per_batch": per_batch(gpuqueue_feed(
                        images, p, workers, use_multiprocessing=processes), m, step)},
                label=f"overlap: {mode}, {step_name} step"))  # fmt: skip
    return cases


def _startup_missing(p: dict[str, Any]) -> str | None:
    """Why the start-up case cannot run here (it needs torch, and Keras unless a smoke run)."""
    import importlib.util

    for module in ("torch", "keras") if p["startup_keras"] else ("torch",):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed: pip install {module}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loaders", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (tests)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.child:
        figures = _image_case(args.child, json.loads(args.params))
        print(json.dumps(figures), flush=True)
        return figures
    if args.smoke:
        params, args.rounds = dict(SMOKE), 2
    elif args.rounds < 5:
        raise SystemExit(f"--rounds {args.rounds}: at least 5 rounds make a median and a spread")
    else:
        params = dict(FULL)
    cases = build_cases(params)
    progress = Progress(sum(case.skip is None for case in cases) * args.rounds)
    results = run_rounds(cases, args.rounds, progress)
    machine = describe_machine("numpy")
    report: dict[str, Any] = {
        "benchmark": "gpuqueue's loaders against the peers (issues 14 and 25)",
        "schema": 1,
        "command": " ".join(["python -m bench.loaders", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine,
        "config": {**params, "rounds": args.rounds, "smoke": args.smoke},
        "cases": {c.key: {"label": c.label, "skipped": c.skip} for c in cases},
        "goals": goals(results, params),
        "rounds": results,
    }
    out = args.out or results_folder(machine) / "loaders.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
