"""The prefetch-depth bench's table, the line that explains each column, and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.rounds import spread
from gpuqueue.batch.layout import GROWTH  # every slot and arena: the largest batch times this

MiB = 1 << 20


def human(nbytes: int) -> str:
    return f"{nbytes / MiB:g} MiB" if nbytes >= MiB else f"{nbytes / 1024:g} KiB"


def on_device(report: dict[str, Any]) -> bool:
    return bool(report["machine"]["backend"] == "cupy")


def where(report: dict[str, Any]) -> str:
    """The machine in a few words, true to what a "copy" is there."""
    machine = report["machine"]
    if on_device(report):
        return f"{machine['gpu']['name']} (host to device copies)"
    return (
        f"the NumPy fallback, {machine['cpu_count']} CPUs, no GPU (no copy: the batch a "
        "worker read is handed over)"
    )


def columns(report: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(header, width, what it means) for every column the table shows on this machine."""
    config = report["config"]
    queue, workers = config["max_queue_size"], config["workers"]
    cols = [
        ("size", 8, "bytes per batch"),
        ("loader", 26, "gpuqueue at a prefetch depth (batches copied ahead of the loop; 0 = "
         "copied inside get()), or what a user might pick instead, in the same rounds"),
        ("batch/s", 22, "batches through the training loop per second: median [min-max] over "
         f"{config['rounds']} interleaved rounds"),
        ("vs 1-ahead", 18, "this row's batches/s over the one-ahead loop's in the same round, "
         "median [min-max]; above 1.00 = faster than the loop"),
        ("step ms", 8, f"wall time per training step ({config['step_ms']:g} ms of work) with "
         "this loader, median"),
        ("stall %", 16, "share of each step spent waiting for data, 1 - (step alone on a "
         "resident batch / step with this loader), per round: median [min-max]"),
        ("occup", 6, "batches already waiting in gpuqueue's device queue when the loop asked "
         "for one (stats()['mean_queue_occupancy'], median of rounds; at depth 0, where the copy "
         "runs in get(), the host queue's): 0 = the loop waits for the loader, near the depth "
         "= the loader is ahead"),
        ("pinned MiB", 10, "gpuqueue's pinned host slots (stats()['pinned_bytes']): "
         f"(workers + max_queue_size + 1) = ({workers} + {queue} + 1) slots, each "
         f"{GROWTH} x the largest batch"),
        ("dev MiB", 8, "peak of stats()['device_bytes'] sampled at every batch, highest "
         f"round: arenas, each {GROWTH} x the largest batch (growth margin, device/arenas.py), "
         "one per batch copied ahead (up to max(depth, 1)), per batch the loop still holds, "
         f"and 1 kept free for reuse; at most (max(depth, 1) + 3) x {GROWTH} x batch for a "
         "loop that holds one batch at a time"),
    ]  # fmt: skip
    if on_device(report):
        cols += [
            ("hidden", 7, "share of the raw pinned copy's time that the step hid: 1 - (step "
             "with loader - step alone) / copy time, median"),
            ("NVML rx", 8, "PCIe receive GB/s that NVML saw during the run (20 ms samples, mean)"),
        ]  # fmt: skip
    return cols


def _cells(row: dict[str, Any], size: int, report: dict[str, Any]) -> list[str]:
    if "skipped" in row:
        return [human(size), row["row"], f"skipped: {row['skipped']}"]
    dash = "—"
    gq = row["kind"] == "gpuqueue"
    cells = [
        human(size),
        row["row"],
        spread(row["batches_per_s"], "{:.1f}"),
        spread(row["vs_one_ahead"], "{:.2f}"),
        f"{row['step_time_s']['median'] * 1e3:.2f}",
        spread(row["stall_fraction"], "{:.0f}", 100),
        f"{row['queue_occupancy_mean']['median']:.2f}" if gq else dash,
        f"{row['pinned_bytes'] / MiB:.1f}" if gq else dash,
        f"{row['device_bytes_peak'] / MiB:.1f}" if gq else dash,
    ]
    if on_device(report):
        cells.append(f"{row['hidden_fraction']['median']:.0%}")
        rx = row.get("nvml", {}).get("pcie_rx_gbps_mean")
        cells.append(f"{rx:.2f}" if isinstance(rx, float) else dash)
    return cells


def table_lines(report: dict[str, Any]) -> list[str]:
    cols = columns(report)
    widths = [width for _, width, _ in cols]

    def line(cells: list[str]) -> str:
        if len(cells) < len(cols):  # a skipped row: its reason takes the rest of the line
            return (
                "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False))
                + "  "
                + cells[-1]
            )
        return "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in
                         enumerate(zip(cells, widths, strict=True)))  # fmt: skip

    header = line([name for name, _, _ in cols])
    lines = [header, "-" * len(header)]
    for size in report["sizes"]:
        lines += [line(_cells(row, size["size_bytes"], report)) for row in size["rows"]]
    return lines


def print_report(report: dict[str, Any]) -> None:
    config = report["config"]
    print(
        f"gpuqueue prefetch depth on {where(report)}: {config['workers']} workers, "
        f"max_queue_size {config['max_queue_size']}, {config['step_ms']:g} ms step, "
        f"{config['rounds']} interleaved rounds of {config['batches']} batches"
    )
    print()
    print("\n".join(table_lines(report)))
    print()
    print("columns:")
    for name, _, meaning in columns(report):
        print(f"  {name}: {meaning}")
    print()
    for size in report["sizes"]:
        t = size["throughput"]
        rec = size.get("recommended")
        head = f"{human(size['size_bytes'])}: "
        if rec is not None and on_device(report):  # (--sweep on NumPy recommends nothing)
            head += (
                f"fastest within noise at depth {rec['depth']} "
                f"({spread(rec['batches_per_s'], '{:.1f}')} batch/s, "
                f"{spread(rec['vs_one_ahead'])}x the one-ahead loop, "
                f"{rec['device_bytes_peak'] / MiB:.1f} MiB device, "
                f"{rec['pinned_bytes'] / MiB:.1f} MiB pinned); "
            )
        print(
            head
            + f"flat out (no step{', depth 2' if on_device(report) else ''}) "
            + f"{spread(t['ratio'], '{:.0%}', 1)} of "
            + ("the raw pinned copy loop" if on_device(report) else "a memcpy loop into one buffer")
        )
        for row in size["rows"]:
            if "vs_fastest_depth" in row:
                reached = row.get("depth_reached")
                print(
                    f"  {row['row']}: {spread(row['vs_fastest_depth'])}x the fastest fixed depth's "
                    f"batches/s, {row['device_bytes_peak'] / MiB:.1f} MiB device"
                    + (f", reached depth {spread(reached, '{:.0f}')}" if reached else "")
                )
    print(f"\nadvice: {report['advice']}")
    goal = report["goal_vs_one_ahead"]
    if goal is not None:
        print(f"goal: {goal['goal']}: {'met' if goal['met'] else 'NOT met'}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.get("depth") is not None for s in report["sizes"] for r in s["rows"]):
        _plot_loaders(report, path, plt)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for size in report["sizes"]:
        rows = [r for r in size["rows"] if r.get("depth") is not None and "skipped" not in r]
        depths = [r["depth"] for r in rows]
        label = human(size["size_bytes"])
        for axis, key, scale in ((left, "vs_one_ahead", 1), (right, "stall_fraction", 100)):
            mid = [r[key]["median"] * scale for r in rows]
            low = [(r[key]["median"] - r[key]["min"]) * scale for r in rows]
            high = [(r[key]["max"] - r[key]["median"]) * scale for r in rows]
            axis.errorbar(depths, mid, yerr=[low, high], marker="o", capsize=3, label=label)
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="one-ahead loop")
    rounds = report["config"]["rounds"]
    left.set(
        xlabel="prefetch depth",
        ylabel="batches/s over the one-ahead loop's (same round)",
        title=f"Throughput: median, min-max of {rounds} rounds",
    )
    right.set(
        xlabel="prefetch depth",
        ylabel="stall % (1 - step alone / step with loader)",
        title=f"Consumer stall, {report['config']['step_ms']:g} ms step",
    )
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(title="batch size")
    fig.suptitle(f"gpuqueue prefetch depth on {where(report)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_loaders(report: dict[str, Any], path: Path, plt: Any) -> None:
    """Without a depth sweep (no GPU): each loader's batches/s over the one-ahead loop's."""
    fig, axis = plt.subplots(figsize=(11.5, 4.4))
    sizes = report["sizes"]
    width = 0.8 / len(sizes)
    for number, size in enumerate(sizes):
        rows = [r for r in size["rows"] if "skipped" not in r]
        places = [i + number * width for i in range(len(rows))]
        stats = [r["vs_one_ahead"] for r in rows]
        low = [s["median"] - s["min"] for s in stats]
        high = [s["max"] - s["median"] for s in stats]
        axis.bar(places, [s["median"] for s in stats], width, yerr=[low, high], capsize=3,
                 label=human(size["size_bytes"]))  # fmt: skip
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["row"] for r in rows])
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.set(
        ylabel="batches/s over the one-ahead loop's (same round)",
        title=f"No device: prefetch depth has no effect; median, min-max of "
        f"{report['config']['rounds']} rounds, {report['config']['step_ms']:g} ms step",
    )
    axis.legend(title="batch size")
    axis.grid(alpha=0.3, axis="y")
    fig.suptitle(f"gpuqueue against the peers on {where(report)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
