"""The prefetch-depth benchmark: which depth to use here, and whether gpuqueue is ahead of the rest.

For each batch size, a training loop of a synthetic step (``bench/workloads.py``)
runs over gpuqueue's ``OrderedEnqueuer`` at each prefetch depth and over what
a user would write instead (``bench/baselines.py``): the hand-written
one-ahead loop, ``torch.utils.data.DataLoader`` with ``num_workers`` 0 and 2
(``pin_memory`` on a GPU), ``tf_keras``'s ``OrderedEnqueuer`` (a skipped row
saying why where it is not installed), and the step alone on a resident batch
(the floor). All of them run once per round, interleaved (``bench/rounds.py``),
for at least five rounds; each figure is the median of its rounds with the
minimum and maximum, and each ratio is taken within a round.

It prints the table, a line for every column, the recommended depth (the
smallest whose throughput is within 2 % of the best, with its memory) and
whether that depth is ahead of the one-ahead loop at every size; it writes
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gpuqueue
from bench import baselines, normalize
from bench.depth_report import plot, print_report
from bench.machine import describe_machine
from bench.nvml import Nvml, NvmlSampler
from bench.rounds import Case, Figures, Progress, figure, ratio, run_rounds, summary
from bench.workloads import SyntheticBatches, make_step
from gpuqueue.backends import resolve

MiB = 1 << 20
TOLERANCE = 0.02  # a depth within 2 % of the best throughput is as good as the best


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


# ---------------------------------------------------------------- recommendation


def recommend(throughput: Mapping[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest depth whose throughput is within ``tolerance`` of the best.

    Args:
        throughput: Batches per second (medians) by prefetch depth.
    """
    if not throughput:
        raise ValueError("no depth was measured")
    best = max(throughput.values())
    return min(depth for depth, rate in throughput.items() if rate >= best * (1 - tolerance))


def recommend_everywhere(
    by_size: Sequence[Mapping[int, float]], tolerance: float = TOLERANCE
) -> int:
    """The smallest depth within ``tolerance`` of the best at every size.

    If no depth is within it at all sizes, the depth that falls least below
    a size's best (``holds_everywhere`` says which case it is).
    """
    if not by_size:
        raise ValueError("no size was measured")
    common = sorted(set.intersection(*(set(t) for t in by_size)))
    for depth in common:
        if holds_everywhere(by_size, depth, tolerance):
            return depth
    return max(common, key=lambda d: (worst_ratio(by_size, d), -d))


def worst_ratio(by_size: Sequence[Mapping[int, float]], depth: int) -> float:
    """``depth``'s throughput over the best depth's, at the size where it is lowest."""
    return min(t[depth] / max(t.values()) for t in by_size)


def holds_everywhere(
    by_size: Sequence[Mapping[int, float]], depth: int, tolerance: float = TOLERANCE
) -> bool:
    return worst_ratio(by_size, depth) >= 1 - tolerance


# ---------------------------------------------------------------- rows


def run_gpuqueue(ctx: Context, seq: Any, step: Any, n: int, **options: Any) -> Figures:
    """One run of the loop over gpuqueue, with NVML sampled beside it."""
    args = ctx.args
    enqueuer = gpuqueue.OrderedEnqueuer(seq, device=args.device, shard=None, **options)
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
REFERENCE = "one-ahead loop"  # every row's throughput is also shown as a ratio to this one's

# gpuqueue rows beyond the fixed depths of --depths: (label, OrderedEnqueuer keywords).
# An automatic depth belongs here, e.g. ("depth auto", {"prefetch_depth": "auto"}).
GPUQUEUE_VARIANTS: list[tuple[str, dict[str, Any]]] = [("depth auto", {"prefetch_depth": "auto"})]


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
    variants = [(f"depth {d}", {"prefetch_depth": d}) for d in args.depths] + GPUQUEUE_VARIANTS
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


def summarize_size(
    ctx: Context, nbytes: int, cases: list[Case], results: dict[str, list[Figures]]
) -> dict[str, Any]:
    """One size's rows: figures over the rounds, ratios within rounds, the recommended depth."""
    size = human(nbytes)
    floor = results[f"{size}/resident"]
    reference = results[f"{size}/{REFERENCE}"]
    rows: list[dict[str, Any]] = []
    for case in cases:
        if case.tags.get("kind") not in ("gpuqueue", "baseline"):
            continue
        row: dict[str, Any] = {"row": case.tags["row"], "kind": case.tags["kind"]}
        if case.tags["kind"] == "gpuqueue":
            row["depth"] = case.tags["depth"]
        if case.skip is not None:
            rows.append({**row, "skipped": case.skip})
            continue
        runs = results[case.key]
        row["batches_per_s"] = figure(runs, "batches_per_s")
        row["step_time_s"] = figure(runs, "step_time_s")
        row["vs_one_ahead"] = ratio(runs, reference, "batches_per_s")
        row["stall_fraction"] = summary(
            [
                max(0.0, 1 - f["step_time_s"] / r["step_time_s"])
                for f, r in zip(floor, runs, strict=True)
            ]
        )
        copy_s = nbytes / (figure(results[f"{size}/flat out"], "raw_copy_gbps")["median"] * 1e9)
        row["hidden_fraction"] = summary(
            [
                min(1.0, max(0.0, 1 - (r["step_time_s"] - f["step_time_s"]) / copy_s))
                for f, r in zip(floor, runs, strict=True)
            ]
        )
        if case.tags["kind"] == "gpuqueue":
            row["queue_occupancy_mean"] = figure(runs, "queue_occupancy_mean")
            row["pinned_bytes"] = max(int(r["pinned_bytes"]) for r in runs)
            row["device_bytes_peak"] = max(int(r["device_bytes_peak"]) for r in runs)
            row["nvml"] = runs[len(runs) // 2]["nvml"]
        rows.append(row)
    fixed = {
        r["depth"]: r["batches_per_s"]["median"]
        for r in rows
        if r["kind"] == "gpuqueue" and r["depth"] is not None and "skipped" not in r
    }
    best = recommend(fixed)
    chosen = next(r for r in rows if r["kind"] == "gpuqueue" and r["depth"] == best)
    # A variant (an automatic depth, say) against the fastest fixed depth, round by round.
    fastest = results[f"{size}/gpuqueue depth {max(fixed, key=fixed.__getitem__)}"]
    for case, variant in zip(cases, rows_by_case(cases, rows), strict=True):
        is_variant = variant and variant["kind"] == "gpuqueue" and variant["depth"] is None
        if variant and is_variant and case.skip is None:
            variant["vs_fastest_depth"] = ratio(results[case.key], fastest, "batches_per_s")
            variant["depth_reached"] = figure(results[case.key], "depth_reached")
    flat = results[f"{size}/flat out"]
    return {
        "size_bytes": nbytes,
        "rows": rows,
        "step_alone_s": figure(floor, "step_time_s"),
        "recommended_depth": best,
        # How far the fastest depth's rounds spread around their median: above the
        # tolerance, the ranking of depths within it is noise.
        "fastest_depth_spread": _spread_of(fastest, "batches_per_s"),
        "recommended": {
            "depth": best,
            "batches_per_s": chosen["batches_per_s"],
            "device_bytes_peak": chosen["device_bytes_peak"],
            "pinned_bytes": chosen["pinned_bytes"],
            "vs_one_ahead": chosen["vs_one_ahead"],
        },
        "throughput": {  # no step at all: the pipeline flat out, against the raw copy loop
            "gpuqueue_gbps": summary([nbytes * f["batches_per_s"] / 1e9 for f in flat]),
            "raw_copy_gbps": figure(flat, "raw_copy_gbps"),
            "ratio": summary(
                [nbytes * f["batches_per_s"] / 1e9 / f["raw_copy_gbps"] for f in flat]
            ),
            "workers": ctx.args.workers,
        },
    }


def _spread_of(runs: list[Figures], name: str) -> float:
    stat = figure(runs, name)
    return float((stat["max"] - stat["min"]) / stat["median"]) if stat["median"] else 0.0


def rows_by_case(cases: list[Case], rows: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Each case's row (None for the floor and flat-out cases, which have none)."""
    found = iter(rows)
    return [next(found) if c.tags.get("kind") in ("gpuqueue", "baseline") else None for c in cases]


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

    sizes = [summarize_size(ctx, n, per_size[n], results) for n in args.sizes]
    by_size = [
        {r["depth"]: r["batches_per_s"]["median"] for r in s["rows"]
         if r["kind"] == "gpuqueue" and r["depth"] is not None and "skipped" not in r}
        for s in sizes
    ]  # fmt: skip
    overall = recommend_everywhere(by_size)
    report: dict[str, Any] = {
        "benchmark": "gpuqueue prefetch depth",
        "schema": 2,
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
        "recommended_depth": overall,
        # Whether it is within the tolerance at every size, and its worst ratio to a size's best.
        "recommended_holds_everywhere": holds_everywhere(by_size, overall),
        "recommended_worst_ratio": worst_ratio(by_size, overall),
        "goal_vs_one_ahead": {
            "goal": "gpuqueue at the recommended depth is not behind the one-ahead loop "
            "at any size (median ratio >= 1.00)",
            "met": all(
                next(r for r in s["rows"] if r.get("depth") == overall)["vs_one_ahead"]["median"]
                >= 1.0
                for s in sizes
            ),
        },
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
