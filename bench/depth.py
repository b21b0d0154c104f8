"""The prefetch-depth benchmark: which depth to use here, and whether gpuqueue is ahead of the rest.

For each batch size, a training loop of a synthetic step (``bench/workloads.py``)
runs over gpuqueue's ``OrderedEnqueuer`` at each prefetch depth (on a GPU;
without one there is no copy to hide and the depth does nothing, so gpuqueue
runs once, as ``device="auto"`` gives it there) and over what
a user would write instead (``bench/baselines.py``): the hand-written
one-ahead loop, ``torch.utils.data.DataLoader`` with ``num_workers`` 0 and 2
(``pin_memory`` on a GPU), ``tf_keras``'s ``OrderedEnqueuer`` (a skipped row
saying why where it is not installed), and the step alone on a resident batch
(the floor). All of them run once per round, interleaved (``bench/rounds.py``),
for at least five rounds; each figure is the median of its rounds with the
minimum and maximum, and each ratio is taken within a round.

It prints the table, a line for every column, and one line of advice
(``bench/advice.py``): on a GPU the smallest depth within noise of the best at
every size (and the set of depths within noise), and whether it is ahead of
the one-ahead loop at every size; without one, that no depth has an effect,
and gpuqueue's throughput against each peer instead. It writes
``prefetch_depth.json`` and ``prefetch_depth.png`` (error bars: min-max).

Rows and sections are registries: a new loader to compare is one entry in
``BASELINES`` (or a gpuqueue variant in ``GPUQUEUE_VARIANTS``, e.g. an
automatic depth), and a new comparison with a table of its own is a
``Section`` in ``SECTIONS``.

Run ``python -m bench --help`` for the flags. Defaults finish in under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gpuqueue
from bench import baselines, normalize
from bench.advice import TOLERANCE, depth_verdict
from bench.depth_report import plot, print_report
from bench.depth_summary import NO_DEVICE_ROW, summarize_size
from bench.depth_summary import REFERENCE as REFERENCE  # (bench/gpu_check.py reads it here)
from bench.machine import describe_machine
from bench.nvml import Nvml, NvmlSampler
from bench.rounds import Case, Figures, Progress, run_rounds
from bench.workloads import SyntheticBatches, make_step
from gpuqueue.backends import resolve

MiB = 1 << 20


@dataclass
class Context:
    """What every case of one run shares: the flags, the backend, NVML, the steps."""

    args: argparse.Namespace
    backend: str
    nvml: Nvml
    step: Any
    no_step: Any


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(nbytes: int) -> str:
    return f"{nbytes / MiB:g} MiB" if nbytes >= MiB else f"{nbytes / 1024:g} KiB"


# ---------------------------------------------------------------- rows


def run_gpuqueue(ctx: Context, seq: Any, step: Any, n: int, **options: Any) -> Figures:
    """One run of the loop over gpuqueue, with NVML sampled beside it."""
    args = ctx.args
    # --sweep without a GPU measures the staged path, where a depth does something.
    device = "cpu" if args.sweep and ctx.backend != "cupy" else args.device
    enqueuer = gpuqueue.OrderedEnqueuer(seq, device=device, shard=None, **options)
    coord = gpuqueue.Coordinator()
    sampler = NvmlSampler(coord, ctx.nvml)
    enqueuer.start(workers=args.workers, max_queue_size=args.max_queue_size)
    device_peak = 0

    def batches() -> Any:
        nonlocal device_peak
        for batch in enqueuer.get():
            device_peak = max(device_peak, enqueuer.stats().get("device_bytes", 0))
            yield batch

    try:
        sampler.start()
        figures: Figures = baselines.timed(batches(), step, n, args.warmup)
        stats = enqueuer.stats()
    finally:
        coord.request_stop()
        if sampler.is_alive():
            coord.join()
        enqueuer.stop()
    return {
        **figures,
        "queue_occupancy_mean": stats["mean_queue_occupancy"],
        "consumer_wait_s": stats["consumer_wait_s"],
        "copy_stage_gbps": stats.get("h2d_gbps", 0.0),
        "pinned_bytes": stats.get("pinned_bytes", 0),
        "device_bytes_peak": device_peak,
        "depth_reached": float(stats.get("prefetch_depth", 0)),
        "nvml": sampler.summary(),
    }


@dataclass(frozen=True)
class Baseline:
    """A loader a user might pick instead of gpuqueue: one row of every size's table.

    ``feed(ctx, seq)`` makes its batches; ``missing(ctx)`` says why it cannot
    run here (then its row is skipped, saying so), or None.
    """

    label: str
    feed: Callable[[Context, Any], baselines.Feed]
    missing: Callable[[Context], str | None] = lambda ctx: None


def _torch_missing(ctx: Context) -> str | None:
    try:
        import torch.utils.data  # noqa: F401
    except ImportError as error:
        return f"torch not installed ({error.name}): pip install torch"
    return None


BASELINES: list[Baseline] = [
    Baseline("one-ahead loop", lambda ctx, seq: baselines.one_ahead(ctx.backend, seq)),
    Baseline(
        "DataLoader workers=0",
        lambda ctx, seq: baselines.torch_dataloader(ctx.backend, seq, 0),
        _torch_missing,
    ),
    Baseline(
        "DataLoader workers=2",
        lambda ctx, seq: baselines.torch_dataloader(ctx.backend, seq, 2),
        _torch_missing,
    ),
    Baseline(
        "tf_keras enqueuer",
        lambda ctx, seq: baselines.tf_keras_enqueuer(ctx.backend, seq, ctx.args.workers),
        lambda ctx: baselines.tf_keras_missing(),
    ),
]

# gpuqueue rows beyond the fixed depths of --depths: (label, OrderedEnqueuer keywords).
# An automatic depth belongs here, e.g. ("depth auto", {"prefetch_depth": "auto"}).
GPUQUEUE_VARIANTS: list[tuple[str, dict[str, Any]]] = [("depth auto", {"prefetch_depth": "auto"})]


def sweeps(ctx: Context) -> bool:
    """Whether depths are swept: on a GPU, or where ``--sweep`` asks (harness checks)."""
    return ctx.backend == "cupy" or bool(ctx.args.sweep)


def depth_cases(ctx: Context, nbytes: int) -> list[Case]:
    """Every row of one size: the floor, each depth, each variant, each baseline, flat out."""
    args = ctx.args
    seq = SyntheticBatches(nbytes, host_work_ms=args.host_work_ms)
    size = human(nbytes)
    n, warmup = args.batches, args.warmup

    def loop(feed: Callable[[], baselines.Feed]) -> Callable[[], Figures]:
        return lambda: baselines.timed(feed(), ctx.step, n, warmup)

    def gq(options: dict[str, Any]) -> Callable[[], Figures]:
        return lambda: run_gpuqueue(ctx, seq, ctx.step, n, **options)

    cases = [
        Case(
            f"{size}/resident",
            loop(lambda: baselines.resident(ctx.backend, nbytes)),
            label=f"{size} step alone",
            tags={"size": nbytes, "kind": "floor"},
        )
    ]
    if sweeps(ctx):
        variants = [(f"depth {d}", {"prefetch_depth": d}) for d in args.depths]
        variants += GPUQUEUE_VARIANTS
    else:  # no copy to hide: one row, gpuqueue as device=args.device gives it here
        variants = [(NO_DEVICE_ROW, {})]
    for label, options in variants:
        depth = options.get("prefetch_depth")
        cases.append(
            Case(
                f"{size}/gpuqueue {label}",
                gq(options),
                label=f"{size} gpuqueue {label}",
                tags={
                    "size": nbytes,
                    "kind": "gpuqueue",
                    "row": f"gpuqueue {label}",
                    "depth": depth if isinstance(depth, int) else None,
                },
            )
        )
    for base in BASELINES:
        cases.append(
            Case(
                f"{size}/{base.label}",
                loop(lambda base=base: base.feed(ctx, seq)),  # type: ignore[misc]
                skip=base.missing(ctx),
                label=f"{size} {base.label}",
                tags={"size": nbytes, "kind": "baseline", "row": base.label},
            )
        )
    flat_n = max(n, 50)
    cases.append(
        Case(
            f"{size}/flat out",
            lambda: {
                **run_gpuqueue(ctx, seq, ctx.no_step, flat_n, prefetch_depth=2),
                "raw_copy_gbps": baselines.raw_copy_gbps(ctx.backend, nbytes, 20),
            },
            label=f"{size} no step (throughput)",
            tags={"size": nbytes, "kind": "flat"},
        )
    )
    return cases


class Section(Protocol):
    """A comparison with a table of its own, run in the same interleaved rounds."""

    name: str

    def cases(self, ctx: Context) -> list[Case]: ...

    def summarize(self, ctx: Context, results: dict[str, list[Figures]]) -> dict[str, Any]: ...

    def render(self, summary: dict[str, Any]) -> list[str]: ...


SECTIONS: list[Section] = [normalize.SECTION]  # on-device Normalize against host float32


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Which prefetch depth to use on this machine, against what users pick instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Results go to OUT/prefetch_depth.json (every round of every case, the machine) "
        "and OUT/prefetch_depth.png; the table is printed. A file an earlier run left there is "
        "kept, renamed with its time (prefetch_depth.YYYYmmdd-HHMMSS.json), and the run says so.",
    )
    parser.add_argument("--sizes", default="4MiB,16MiB", help="batch sizes")
    parser.add_argument("--depths", default="0,1,2,3,4,8", help="prefetch depths to sweep")
    parser.add_argument("--step-ms", type=float, default=5.0, help="synthetic step duration")
    parser.add_argument("--host-work-ms", type=float, default=0.0, help="host work per batch")
    parser.add_argument("--batches", type=int, default=25, help="measured batches per run")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured batches per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker threads (None: half the CPUs, between 2 and 8)",
    )
    parser.add_argument("--max-queue-size", type=int, default=4, help="the enqueuers' queue")
    parser.add_argument(
        "--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N' or a GPU index N"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (CI)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="sweep the depths without a GPU too, on the staged path of device='cpu' (checks "
        "the harness; no depth is recommended there: there is no copy to hide)",
    )
    return parser


def keep_previous(path: Path) -> tuple[Path, Path] | None:
    """Renames an earlier run's ``path`` after its time, so a new run never overwrites it.

    Returns:
        ``(path, new path)``, or None if there was nothing to keep.
    """
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    number = 1
    while kept.exists():  # two runs within a second
        kept = path.with_name(f"{path.stem}.{stamp}-{number}{path.suffix}")
        number += 1
    path.rename(kept)
    return path, kept


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.smoke:  # tiny sizes and few batches: checks the harness, not the machine
        args.sizes, args.depths, args.step_ms = "64KiB", "0,1,2", 1.0
        args.batches, args.warmup, args.rounds = 8, 2, 2
    elif args.rounds < 5:
        raise SystemExit(f"--rounds {args.rounds}: at least 5 rounds make a median and a spread")
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.depths = sorted({int(d) for d in args.depths.split(",")})
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
    ctx = Context(args, backend_name, nvml, make_step(backend_name, args.step_ms),
                  make_step(backend_name, 0))  # fmt: skip

    per_size = {nbytes: depth_cases(ctx, nbytes) for nbytes in args.sizes}
    cases = [case for size_cases in per_size.values() for case in size_cases]
    for section in SECTIONS:
        cases += section.cases(ctx)
    runnable = sum(case.skip is None for case in cases)
    results = run_rounds(cases, args.rounds, Progress(runnable * args.rounds))

    sizes = [summarize_size(n, per_size[n], results, args.workers) for n in args.sizes]
    verdict = depth_verdict(backend_name == "cupy", sizes)
    report: dict[str, Any] = {
        "benchmark": "gpuqueue prefetch depth",
        "schema": 3,
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": describe_machine(backend_name, gpu, nvml),
        "config": {
            "device": str(args.device),
            "backend": backend_name,
            "sizes": args.sizes,
            "depths": args.depths,
            "step_ms": args.step_ms,
            "host_work_ms": args.host_work_ms,
            "batches": args.batches,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "workers": args.workers,
            "max_queue_size": args.max_queue_size,
            "tolerance": TOLERANCE,
        },
        "nvml_link": nvml.link() if nvml.error is None else {"nvml": nvml.error},
        "sizes": sizes,
        **verdict,
        "sections": {section.name: section.summarize(ctx, results) for section in SECTIONS},
        "rounds": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "prefetch_depth.json"
    kept = [keep_previous(json_path)]
    if not args.no_plot:
        kept.append(keep_previous(args.out / "prefetch_depth.png"))
    for old, new in filter(None, kept):
        print(f"kept the last run's {old.name} as {new}")
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    for section in SECTIONS:
        print("\n".join(section.render(report["sections"][section.name])))
    written = [str(json_path)]
    if not args.no_plot:
        png_path = args.out / "prefetch_depth.png"
        plot(report, png_path)
        written.append(str(png_path))
    print(f"\nwrote {' and '.join(written)}")
    return report
