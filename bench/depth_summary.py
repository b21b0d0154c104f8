"""One batch size's part of the prefetch-depth bench's report, from its rounds.

Each row's figures over the rounds (median [min-max]), its ratios to the
one-ahead loop and to the step alone taken within each round, and, where
depths were swept, the fastest within noise; without a sweep (no GPU),
gpuqueue's one row against each peer instead (``bench/advice.py`` words it).
"""

from __future__ import annotations

from typing import Any

from bench.advice import noise, within_noise
from bench.depth_report import human
from bench.rounds import Case, Figures, figure, ratio, summary

__all__ = ["NO_DEVICE_ROW", "REFERENCE", "rows_by_case", "summarize_size"]

REFERENCE = "one-ahead loop"  # every row's throughput is also shown as a ratio to this one's
NO_DEVICE_ROW = "(no device)"  # the one gpuqueue row without a GPU: the depth has no effect


def summarize_size(
    nbytes: int, cases: list[Case], results: dict[str, list[Figures]], workers: int
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
    flat = results[f"{size}/flat out"]
    summarized: dict[str, Any] = {
        "size_bytes": nbytes,
        "rows": rows,
        "step_alone_s": figure(floor, "step_time_s"),
        "throughput": {  # no step at all: the pipeline flat out, against the raw copy loop
            "gpuqueue_gbps": summary([nbytes * f["batches_per_s"] / 1e9 for f in flat]),
            "raw_copy_gbps": figure(flat, "raw_copy_gbps"),
            "ratio": summary(
                [nbytes * f["batches_per_s"] / 1e9 / f["raw_copy_gbps"] for f in flat]
            ),
            "workers": workers,
        },
        "recommended_depth": None,
    }
    if not fixed:  # no depth swept: gpuqueue's one row against each peer, round by round
        gq = results[f"{size}/gpuqueue {NO_DEVICE_ROW}"]
        summarized["vs_peers"] = {
            case.tags["row"]: ratio(gq, results[case.key], "batches_per_s")
            for case in cases
            if case.tags.get("kind") == "baseline" and results[case.key]
        }
        return summarized
    fastest_depth = max(fixed, key=fixed.__getitem__)
    best_stat = next(r for r in rows if r.get("depth") == fastest_depth)["batches_per_s"]
    summarized["noise"] = noise(best_stat)
    best = within_noise([fixed], [summarized["noise"]])[0]
    chosen = next(r for r in rows if r["kind"] == "gpuqueue" and r["depth"] == best)
    # A variant (an automatic depth, say) against the fastest fixed depth, round by round.
    fastest = results[f"{size}/gpuqueue depth {fastest_depth}"]
    for case, variant in zip(cases, rows_by_case(cases, rows), strict=True):
        is_variant = variant and variant["kind"] == "gpuqueue" and variant["depth"] is None
        if variant and is_variant and case.skip is None:
            variant["vs_fastest_depth"] = ratio(results[case.key], fastest, "batches_per_s")
            variant["depth_reached"] = figure(results[case.key], "depth_reached")
    summarized.update(
        recommended_depth=best,
        # How far the fastest depth's rounds spread around their median: above the
        # tolerance, the ranking of depths within it is noise.
        fastest_depth_spread=_spread_of(fastest, "batches_per_s"),
        recommended={
            "depth": best,
            "batches_per_s": chosen["batches_per_s"],
            "device_bytes_peak": chosen["device_bytes_peak"],
            "pinned_bytes": chosen["pinned_bytes"],
            "vs_one_ahead": chosen["vs_one_ahead"],
        },
    )
    return summarized


def _spread_of(runs: list[Figures], name: str) -> float:
    stat = figure(runs, name)
    return float((stat["max"] - stat["min"]) / stat["median"]) if stat["median"] else 0.0


def rows_by_case(cases: list[Case], rows: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Each case's row (None for the floor and flat-out cases, which have none)."""
    found = iter(rows)
    return [next(found) if c.tags.get("kind") in ("gpuqueue", "baseline") else None for c in cases]
