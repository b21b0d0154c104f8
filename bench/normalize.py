"""uint8 images normalized on the device against float32 normalized on the host and copied.

Same images, same run, interleaved rounds: in each round the two paths run
one after the other (their order alternating), so drift hits both alike.

- ``device``: the Sequence hands out uint8 NHWC images; ``transform={0:
  gpuqueue.Normalize(mean, std, layout="NCHW")}`` makes float32 NCHW on the
  device, on the copy stream (on the NumPy fallback, in the copy thread).
- ``host``: the Sequence normalizes with NumPy (the same float32
  arithmetic) and hands out float32 NCHW images, four times the bytes to copy.

Per path: end-to-end batches/s, bytes copied per batch, and host time per
batch (the Sequence's own time in every worker, plus the copy thread's time
calling the transform), each as median [min-max] over the rounds. On a GPU
the copy and the kernel run on the device; on the NumPy fallback everything
is CPU work, so only the host time saved says anything there.

Run: ``python -m bench.normalize`` (< 30 s on 2 CPUs), ``--smoke`` for a tiny run.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import gpuqueue
from bench import rounds
from bench.machine import describe_machine

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class Photos(gpuqueue.Sequence):
    """Batches of uint8 NHWC images (a copy of one of a few made once: a read's memcpy).

    With ``normalize``, the batch is normalized here with NumPy, as a host
    pipeline does, and is float32 NCHW. ``host_s`` sums the time spent here.
    """

    def __init__(self, shape: tuple[int, ...], length: int, normalize: Any = None) -> None:
        rng = np.random.default_rng(0)
        self.pool = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(3)]
        self.length, self.normalize = length, normalize
        self.labels = np.arange(shape[0], dtype=np.int64)
        self.host_s = 0.0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        began = time.perf_counter()
        images = self.pool[index % len(self.pool)].copy()
        if self.normalize is not None:
            images = self.normalize(images)
        took = time.perf_counter() - began
        with self._lock:
            self.host_s += took
        return images, self.labels


def _synchronize(backend: str) -> None:
    if backend == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


def _gpu_here() -> bool:
    """Whether ``device="auto"`` finds a GPU (its no-GPU warning is not repeated here)."""
    import warnings

    from gpuqueue.backends import resolve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend = resolve("auto")
    backend.close()
    return backend.name == "cupy"


def measure(path: str, args: argparse.Namespace) -> dict[str, float]:
    """One run of ``path``: batches/s, bytes copied per batch, host seconds per batch."""
    norm = gpuqueue.Normalize(MEAN, STD, layout="NCHW")
    shape = (args.batch, args.size, args.size, 3)
    device = args.device
    if device == "auto" and path == "host" and not _gpu_here():
        # Two staged pipelines are compared; without a GPU "auto" would hand the host
        # path's batches over unstaged (nothing copied), so stage them as "cpu" does.
        device = "cpu"
    source = Photos(shape, args.batches + 1, None if path == "device" else norm)
    enqueuer = gpuqueue.OrderedEnqueuer(
        source,
        device=device,
        prefetch_depth=args.depth,
        epochs=1,
        shard=None,
        transform={0: norm} if path == "device" else None,
    )
    enqueuer.start(workers=args.workers, max_queue_size=args.depth + 2)
    try:
        batches = enqueuer.get()
        first = next(batches)  # start-up is paid by both paths, and not measured
        backend = enqueuer.stats()["backend"]
        del first
        began = time.perf_counter()
        count = 0
        for images, _ in batches:
            assert images.dtype == np.float32 and images.shape[1] == 3
            count += 1
        _synchronize(backend)
        seconds = time.perf_counter() - began
        stats = enqueuer.stats()
    finally:
        enqueuer.stop()
    produced = max(1, stats["batches_produced"])
    return {
        "batches_per_s": count / seconds,
        "bytes_copied_per_batch": stats["bytes_copied"] / produced,
        "host_ms_per_batch": (source.host_s + stats["transform_s"]) / produced * 1e3,
        "backend": backend,
    }


FIGURES = ("batches_per_s", "bytes_copied_per_batch", "host_ms_per_batch")


def summarize_paths(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each path's figures over the rounds, median [min-max]."""
    return {
        path: {key: rounds.summary([float(s[key]) for s in runs]) for key in FIGURES}
        for path, runs in samples.items()
    }


def path_line(path: str, figures: dict[str, Any]) -> str:
    rate, size, cost = (figures[key] for key in FIGURES)
    return (
        f"{path:>6}: {rate['median']:8.1f} [{rate['min']:.1f}-{rate['max']:.1f}] batches/s, "
        f"{size['median'] / 2**20:6.2f} MiB copied/batch, host "
        f"{cost['median']:6.2f} [{cost['min']:.2f}-{cost['max']:.2f}] ms/batch"
    )


class NormalizeSection:
    """The comparison as a section of ``python -m bench``, in its interleaved rounds."""

    name = "normalize"

    def _args(self, ctx: Any) -> argparse.Namespace:
        smoke = ctx.args.smoke
        return argparse.Namespace(
            device=ctx.args.device,
            batch=4 if smoke else 32,
            size=16 if smoke else 160,
            batches=4 if smoke else 20,
            workers=ctx.args.workers,
            depth=2,
        )

    def cases(self, ctx: Any) -> list[Any]:
        args = self._args(ctx)

        def run(path: str) -> dict[str, float]:
            figures = measure(path, args)
            return {key: float(figures[key]) for key in FIGURES}

        labels = {
            "device": "uint8 + Normalize on the device",
            "host": "float32 normalized on the host",
        }
        return [
            rounds.Case(f"normalize/{path}", lambda path=path: run(path), label=label)  # type: ignore[misc]
            for path, label in labels.items()
        ]

    def summarize(self, ctx: Any, results: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
        args = self._args(ctx)
        paths = summarize_paths({path: results[f"normalize/{path}"] for path in ("device", "host")})
        within = [
            d["batches_per_s"] / h["batches_per_s"]
            for d, h in zip(results["normalize/device"], results["normalize/host"], strict=True)
        ]
        return {
            "images": f"{args.batch} x {args.size}x{args.size}x3 uint8",
            "paths": paths,
            "device_over_host_batches_per_s": rounds.summary(within),
        }

    def render(self, summary: dict[str, Any]) -> list[str]:
        lines = [
            "",
            f"Normalize on the device vs on the host ({summary['images']} per batch, "
            "median [min-max] over the rounds):",
        ]
        lines += [f"  {path_line(path, figures)}" for path, figures in summary["paths"].items()]
        ratio = summary["device_over_host_batches_per_s"]
        lines.append(
            f"  device/host batches/s within a round: {ratio['median']:.2f} "
            f"[{ratio['min']:.2f}-{ratio['max']:.2f}] (on the NumPy fallback both are CPU work: "
            "only the bytes and the host time say anything there)"
        )
        return lines


SECTION = NormalizeSection()


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; prints a table, writes the JSON, and returns the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--size", type=int, default=160, help="image height and width")
    parser.add_argument("--batches", type=int, default=40, help="measured batches per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/normalize.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny images, few batches")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.batches = 4, 16, 4
    samples: dict[str, list[dict[str, float]]] = {"device": [], "host": []}
    for round_number in range(max(1, args.rounds)):
        order = ["device", "host"] if round_number % 2 == 0 else ["host", "device"]
        for path in order:
            samples[path].append(measure(path, args))
    backend = str(samples["device"][0]["backend"])
    paths = summarize_paths(samples)
    device, host = paths["device"], paths["host"]
    report: dict[str, Any] = {
        "benchmark": "uint8 + Normalize on the device vs float32 normalized on the host",
        "command": "python -m bench.normalize " + " ".join(argv or []),
        "machine": describe_machine(backend),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "paths": paths,
        "ratios": {
            "batches_per_s": device["batches_per_s"]["median"] / host["batches_per_s"]["median"],
            "bytes_copied": device["bytes_copied_per_batch"]["median"]
            / host["bytes_copied_per_batch"]["median"],
            "host_time": device["host_ms_per_batch"]["median"]
            / host["host_ms_per_batch"]["median"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"backend {backend}, {args.rounds} interleaved rounds, median [min-max]")
    for path, figures in paths.items():
        print(path_line(path, figures))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    run()
