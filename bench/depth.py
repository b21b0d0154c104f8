"""The prefetch-depth benchmark: how deep to prefetch on this machine, and how close to the limit.

For each batch size and each prefetch depth it runs a training loop of a
synthetic step through ``gpuqueue.OrderedEnqueuer(device=...)`` and reports:
steady-state step time, batches/s, GB/s host-to-device, the fraction of the
copy time hidden behind the step, the consumer's stall fraction
(1 - resident step time / step time with the loader), queue occupancy, and
peak pinned and device memory, with NVML's view of the PCIe link beside it.
Baselines run in the same process on the same batches and step: the raw
pinned copy loop (the ceiling), pageable copies, a synchronous copy in the
loop, a hand-written one-ahead prefetcher, and (where installed)
``torch.utils.data.DataLoader(pin_memory=True)`` on a GPU or ``tf_keras``'s
``OrderedEnqueuer`` on the NumPy fallback.

Run ``python -m bench --help`` for the flags. Defaults finish in under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import gpuqueue
from bench import baselines
from bench.machine import describe_machine
from bench.nvml import Nvml, NvmlSampler
from bench.workloads import SyntheticBatches, make_step
from gpuqueue.backends import resolve

MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(nbytes: int) -> str:
    return f"{nbytes / MiB:g} MiB" if nbytes >= MiB else f"{nbytes / 1024:g} KiB"


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def advance(self, label: str) -> None:
        self.done += 1
        filled = round(30 * self.done / self.total)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}"
        )
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def median_run(repeats: int, run: Any) -> Any:
    """Runs ``run()`` ``repeats`` times; returns the result with the median time.

    Results are floats (seconds) or dicts with ``step_time_s``.
    """
    results = [run() for _ in range(repeats)]
    results.sort(key=lambda r: r["step_time_s"] if isinstance(r, dict) else r)
    return results[len(results) // 2]


def run_gpuqueue(
    args: argparse.Namespace,
    backend_name: str,
    nbytes: int,
    depth: int,
    step: Any,
    nvml: Nvml,
) -> dict[str, Any]:
    """One configuration through the pipeline, with the NVML sampler running beside it."""
    seq = SyntheticBatches(nbytes, host_work_ms=args.host_work_ms)
    enqueuer = gpuqueue.OrderedEnqueuer(seq, device=args.device, prefetch_depth=depth, shard=None)
    coord = gpuqueue.Coordinator()
    sampler = NvmlSampler(coord, nvml)
    enqueuer.start(workers=args.workers, max_queue_size=args.max_queue_size)
    try:
        batches = enqueuer.get()
        for _ in range(args.warmup):
            step(next(batches))
        step.synchronize()
        sampler.start()
        began = time.perf_counter()
        for _ in range(args.batches):
            step(next(batches))
        step.synchronize()
        elapsed = time.perf_counter() - began
        stats = enqueuer.stats()
    finally:
        coord.request_stop()
        if sampler.is_alive():
            coord.join()
        enqueuer.stop()
    return {
        "step_time_s": elapsed / args.batches,
        "batches_per_s": args.batches / elapsed,
        "h2d_gbps": nbytes * args.batches / elapsed / 1e9,
        "copy_stage_gbps": stats["h2d_gbps"],
        "queue_occupancy_mean": stats["mean_queue_occupancy"],
        "consumer_wait_s": stats["consumer_wait_s"],
        "copy_wait_for_host_s": stats["copy_wait_for_host_s"],
        "pinned_bytes_peak": stats["pinned_bytes"],
        "device_bytes_peak": stats["device_bytes"],
        "nvml": sampler.summary(),
    }


def measure_size(
    args: argparse.Namespace, backend_name: str, nbytes: int, nvml: Nvml, progress: Progress
) -> dict[str, Any]:
    step = make_step(backend_name, args.step_ms)
    n, warmup = args.batches, args.warmup
    seq = SyntheticBatches(nbytes, host_work_ms=args.host_work_ms)
    reps = args.repeats
    raw = -median_run(reps, lambda: -baselines.raw_copy_gbps(backend_name, nbytes, max(n, 20)))
    copy_time = nbytes / (raw * 1e9)
    resident = median_run(reps, lambda: baselines.resident(backend_name, nbytes, step, n, warmup))
    progress.advance(f"{human(nbytes)} baselines")
    base: dict[str, Any] = {
        "raw_pinned_gbps": raw,
        "pageable_gbps": -median_run(
            reps, lambda: -baselines.raw_copy_gbps(backend_name, nbytes, max(n, 20), pinned=False)
        ),
        "resident_step_time_s": resident,
        "synchronous_step_time_s": median_run(
            reps, lambda: baselines.synchronous(backend_name, seq, step, n, warmup)
        ),
        "one_ahead_step_time_s": median_run(
            reps, lambda: baselines.one_ahead(backend_name, seq, step, n, warmup)
        ),
    }
    for name, run in (
        ("torch_dataloader_step_time_s", baselines.torch_dataloader),
        ("tf_keras_step_time_s", baselines.tf_keras_enqueuer),
    ):
        wanted = (name.startswith("torch")) == (backend_name == "cupy")
        if not wanted:
            continue
        try:
            base[name] = median_run(reps, lambda run=run: run(seq, step, args.workers, n, warmup))
        except ImportError as error:
            base[name] = f"not installed: {error.name}"
        except Exception as error:  # a baseline failing must not lose the rest
            base[name] = f"failed: {type(error).__name__}: {error}"

    rows = []
    for depth in args.depths:
        row = median_run(
            reps, lambda depth=depth: run_gpuqueue(args, backend_name, nbytes, depth, step, nvml)
        )
        loaded = row["step_time_s"]
        row.update(
            size_bytes=nbytes,
            depth=depth,
            copy_time_s=copy_time,
            hidden_fraction=min(1.0, max(0.0, 1 - (loaded - resident) / copy_time)),
            stall_fraction=max(0.0, 1 - resident / loaded),
        )
        rows.append(row)
        progress.advance(f"{human(nbytes)} depth {depth}")

    # Throughput through the queue with no step at all, against the raw loop.
    throughput_args = argparse.Namespace(**{**vars(args), "batches": max(n, 50)})
    no_step = make_step(backend_name, 0)
    flat_out = median_run(
        reps, lambda: run_gpuqueue(throughput_args, backend_name, nbytes, 2, no_step, nvml)
    )
    progress.advance(f"{human(nbytes)} throughput")
    return {
        "size_bytes": nbytes,
        "baselines": base,
        "depths": rows,
        "throughput": {
            "gpuqueue_gbps": flat_out["h2d_gbps"],
            "raw_pinned_gbps": raw,
            "ratio": flat_out["h2d_gbps"] / raw,
            "workers": args.workers,
        },
    }


def print_table(report: dict[str, Any]) -> None:
    header = (
        f"{'size':>9} {'depth':>5} {'step ms':>8} {'batch/s':>8} {'GB/s':>7} "
        f"{'hidden':>7} {'stall':>6} {'occup':>5} {'pinned MiB':>10} {'dev MiB':>8} {'NVML rx':>8}"
    )
    print(header)
    print("-" * len(header))
    for size in report["sizes"]:
        for row in size["depths"]:
            rx = row["nvml"].get("pcie_rx_gbps_mean", "n/a")
            rx_text = f"{rx:8.2f}" if isinstance(rx, float) else f"{'n/a':>8}"
            print(
                f"{human(row['size_bytes']):>9} {row['depth']:>5} {row['step_time_s'] * 1e3:8.3f} "
                f"{row['batches_per_s']:8.1f} {row['h2d_gbps']:7.2f} "
                f"{row['hidden_fraction']:7.1%} {row['stall_fraction']:6.1%} "
                f"{row['queue_occupancy_mean']:5.2f} {row['pinned_bytes_peak'] / MiB:10.1f} "
                f"{row['device_bytes_peak'] / MiB:8.1f} {rx_text}"
            )
    print()
    print("baselines (ms per step unless GB/s):")
    for size in report["sizes"]:
        base = size["baselines"]
        parts = []
        for key, value in base.items():
            label = key.removesuffix("_step_time_s").removesuffix("_gbps")
            if not isinstance(value, float):
                parts.append(f"{label}: {value}")
            elif key.endswith("_s"):
                parts.append(f"{label} {value * 1e3:.3f}")
            else:
                parts.append(f"{label} {value:.2f} GB/s")
        print(f"  {human(size['size_bytes'])}: " + "; ".join(parts))
        t = size["throughput"]
        print(
            f"  {human(size['size_bytes'])}: throughput through the queue (no step, depth 2, "
            f"{t['workers']} workers) {t['gpuqueue_gbps']:.2f} GB/s = {t['ratio']:.1%} of raw"
        )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for size in report["sizes"]:
        depths = [r["depth"] for r in size["depths"]]
        label = human(size["size_bytes"])
        left.plot(depths, [r["h2d_gbps"] for r in size["depths"]], marker="o", label=label)
        right.plot(depths, [r["stall_fraction"] for r in size["depths"]], marker="o", label=label)
    machine = report["machine"]
    where = machine.get("gpu", {}).get("name") or f"NumPy fallback, {machine['cpu_count']} CPUs"
    left.set(xlabel="prefetch depth", ylabel="GB/s host to device (effective)", title="Throughput")
    right.set(
        xlabel="prefetch depth",
        ylabel="stall fraction (1 - resident / loaded step)",
        title=f"Consumer stall, {report['config']['step_ms']} ms step",
    )
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(title="batch size")
    fig.suptitle(f"gpuqueue prefetch depth on {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Sweep gpuqueue's prefetch depth on this machine."
    )
    parser.add_argument("--sizes", default="4MiB,16MiB", help="batch sizes (default: 4MiB,16MiB)")
    parser.add_argument("--depths", default="0,1,2,3,4,8", help="prefetch depths to sweep")
    parser.add_argument("--step-ms", type=float, default=5.0, help="synthetic step duration")
    parser.add_argument("--host-work-ms", type=float, default=0.0, help="host work per batch")
    parser.add_argument("--batches", type=int, default=60, help="measured batches per run")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median kept)")
    parser.add_argument("--workers", type=int, default=None, help="worker threads")
    parser.add_argument("--max-queue-size", type=int, default=4)
    parser.add_argument(
        "--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or a GPU index N"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.smoke:  # tiny sizes and few batches: checks the harness, not the machine
        args.sizes, args.depths, args.step_ms = "64KiB", "0,1,2", 1.0
        args.batches, args.warmup, args.repeats = 12, 2, 1
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.depths = [int(d) for d in args.depths.split(",")]
    if args.workers is None:
        args.workers = max(2, min(8, (os.cpu_count() or 2) // 2))
    if args.device.isdigit():
        args.device = int(args.device)
    backend = resolve(args.device)
    backend_name, gpu = backend.name, backend.device or 0
    backend.close()
    if backend_name == "cupy":  # the baselines run on the current GPU
        import cupy

        cupy.cuda.Device(gpu).use()
    nvml = Nvml.for_gpu(gpu if backend_name == "cupy" else None)

    progress = Progress(len(args.sizes) * (len(args.depths) + 2))
    sizes = [measure_size(args, backend_name, n, nvml, progress) for n in args.sizes]
    report = {
        "benchmark": "gpuqueue prefetch depth",
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": describe_machine(backend_name, gpu, nvml),
        "config": {
            "device": str(args.device),
            "backend": backend_name,
            "step_ms": args.step_ms,
            "host_work_ms": args.host_work_ms,
            "batches": args.batches,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "workers": args.workers,
            "max_queue_size": args.max_queue_size,
        },
        "nvml_link": nvml.link() if nvml.error is None else {"nvml": nvml.error},
        "sizes": sizes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "prefetch_depth.json"
    png_path = args.out / "prefetch_depth.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    plot(report, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return report
