"""``bench.loaders``' goals, computed from its rounds, and its printed report.

Every goal is a row: what is measured, its median [min-max] over the
rounds (each round's value computed from that round's cases only), the
target and whether it is met. Nothing here is typed in but the targets,
which are the issue's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import samples
from bench.rounds import Figures, spread, summary

MB = 1e6
Rounds = dict[str, list[Figures]]


def _per_round(results: Rounds, keys: list[str], value: Callable[..., float]) -> list[float]:
    """``value(case figures...)`` for each round, from the cases ``keys`` of that round."""
    runs = [results[k] for k in keys]
    if len({len(r) for r in runs}) != 1:
        raise ValueError(f"cases {keys} ran a different number of rounds")
    return [value(*figures) for figures in zip(*runs, strict=True)]


def _speed(faster: Figures, slower: Figures) -> float:
    """How many times faster the first is, per batch (above 1: the first is faster)."""
    return float(slower["s_per_batch"]) / float(faster["s_per_batch"])


def _hidden(alone: Figures, load: Figures, both: Figures) -> float:
    """Share of the load time the step hid: 1 = the loop runs at max(step, load) per batch."""
    step, loading = float(alone["s_per_batch"]), float(load["s_per_batch"])
    total = float(both["s_per_batch"])
    return min(1.0, max(0.0, (step + loading - total) / min(step, loading)))


# (goal, unit, cases, per-round value, test of the summary, target text)
Test = Callable[[dict[str, Any]], bool] | None  # None: a figure, no goal
GOALS: list[tuple[str, str, list[str], Callable[..., float], Test, str]]
GOALS = [
    ("trivial batches: gpuqueue threads vs tf_keras's enqueuer", "x",
     ["trivial/gpuqueue", "trivial/tf_keras"], _speed, lambda s: s["min"] >= 3,
     ">= 3x in every round"),
    ("trivial batches: gpuqueue threads vs DataLoader num_workers=0", "x",
     ["trivial/gpuqueue", "trivial/dataloader0"], _speed, lambda s: s["min"] >= 1,
     ">= 1x in every round"),
    ("thread hand-off per batch (trivial, 1 worker, consumer doing nothing)", "us",
     ["handoff/gpuqueue1", "handoff/direct"],
     lambda gq, direct: (gq["s_per_batch"] - direct["s_per_batch"]) * 1e6,
     lambda s: s["median"] <= 5, "<= 5 us (median)"),
    ("10 short epochs vs one long epoch: time per batch", "x",
     ["epochs/short", "epochs/long"], lambda s, lo: s["s_per_batch"] / lo["s_per_batch"],
     lambda s: s["median"] <= 1.05, "<= 1.05x (no dearer; 5 % for noise), median"),
    ("10 short epochs: gpuqueue vs DataLoader num_workers=0 (time)", "x",
     ["epochs/short", "epochs/dataloader0"], _speed, lambda s: s["median"] >= 1,
     ">= 1x (median)"),
    ("image batches: threads vs DataLoader num_workers=0", "x",
     ["image/threads", "image/dataloader0"], _speed, None, "none: a figure to compare"),
    ("image batches: threads vs DataLoader num_workers=2", "x",
     ["image/threads", "image/dataloader2"], _speed, None, "none: a figure to compare"),
    ("image batches: worker processes vs threads", "x",
     ["image/processes", "image/threads"], _speed, lambda s: s["median"] >= 0.8,
     ">= 0.8x (median)"),
    ("image batches: worker processes vs DataLoader num_workers=2", "x",
     ["image/processes", "image/dataloader2"], _speed, lambda s: s["median"] >= 2,
     ">= 2x (median)"),
    ("image batches: processes' tree PSS added / (DataLoader num_workers=2's + the slots)", "x",
     ["image/processes", "image/dataloader2"],
     lambda proc, dl: proc["tree_pss_added_bytes"]
     / (dl["tree_pss_added_bytes"] + proc["shared_memory_bytes"]),
     lambda s: s["median"] <= 1, "<= 1 (median)"),
    ('image batches: prefetch(device="auto") on CPU vs enqueuer device=None, throughput', "x",
     ["image/prefetch_auto", "image/threads"], _speed, lambda s: s["median"] >= 0.9,
     ">= 0.9x (median)"),
    ('image batches: prefetch(device="auto") on CPU vs enqueuer device=None, memory '
     "(enqueuer's peak RSS / prefetch's)", "x",
     ["image/prefetch_auto", "image/threads"],
     lambda auto, none: none["rss_peak_bytes"] / auto["rss_peak_bytes"],
     lambda s: s["median"] >= 0.9, ">= 0.9x (median)"),
]  # fmt: skip
GOALS += samples.GOALS  # per-sample datasets (batch_size=), issue 23
GOALS += [
    ("GIL-bound reads (a pure-Python loop per batch): worker processes vs threads", "x",
     ["gil/processes", "gil/threads"], _speed, lambda s: s["median"] >= 1.8,
     ">= 1.8x (median; 2x is the limit on 2 CPUs)"),
    ("GIL-bound reads: worker processes vs DataLoader num_workers=2", "x",
     ["gil/processes", "gil/dataloader2"], _speed, lambda s: s["median"] >= 1.5,
     ">= 1.5x (median)"),
    ("worker start after import torch, keras: gpuqueue's first run vs DataLoader "
     "num_workers=2, time to the first batch", "x", ["startup"],
     lambda f: f["gpuqueue_first_s"] / f["dataloader2_s"], lambda s: s["median"] <= 1.5,
     "<= 1.5x (median)"),
    ("worker start: gpuqueue's second run in the same interpreter vs DataLoader "
     "num_workers=2", "x", ["startup"],
     lambda f: f["gpuqueue_again_s"] / f["dataloader2_s"], lambda s: s["median"] <= 1.5,
     "<= 1.5x (median)"),
]  # fmt: skip
for _mode in ("threads", "processes"):
    for _step in ("sleep", "numpy"):
        GOALS.append(
            (f"5 ms {_step} step: share of the load time hidden, {_mode}", "",
             [f"overlap/alone/{_step}", f"overlap/{_mode}/none", f"overlap/{_mode}/{_step}"],
             _hidden, lambda s: s["median"] >= 0.95, ">= 0.95 (median)")
        )  # fmt: skip


def goals(results: Rounds, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal's row, from the rounds; a goal whose cases were skipped says so."""
    rows = []
    for goal, unit, keys, value, test, target in GOALS:
        row: dict[str, Any] = {"goal": goal, "unit": unit, "target": target, "cases": keys}
        missing = [k for k in keys if not results.get(k)]
        if missing:
            rows.append({**row, "measured": None, "met": None, "skipped": f"not run: {missing}"})
            continue
        measured = summary(_per_round(results, keys, value))
        met = None if test is None else bool(test(measured))
        rows.append({**row, "measured": measured, "met": met})
    return rows


STARTUP_ROWS = {  # the start-up case's figures: what each one times
    "dataloader2_s": "DataLoader num_workers=2 (forks this process)",
    "gpuqueue_first_s": "gpuqueue processes, first run (starts its forkserver)",
    "gpuqueue_again_s": "gpuqueue processes, second run (forks from that server)",
}


def _case_line(label: str, runs: list[Figures]) -> str:
    if "dataloader2_s" in runs[0]:  # the start-up case: seconds to the first batch
        times = ", ".join(
            f"{name.removesuffix('_s')} {spread(summary([r[name] for r in runs]), '{:.2f}')} s"
            for name in ("imports_s", *STARTUP_ROWS)
        )
        return f"  {label:<44} {times} to the first batch ({runs[0]['imported']} imported)"
    seconds = summary([r["s_per_batch"] for r in runs])
    text = f"  {label:<44} " + (
        spread(seconds, "{:.1f}", 1e6) + " us/batch"
        if seconds["median"] < 1e-3
        else spread(seconds, "{:.2f}", 1e3) + " ms/batch"
    )
    if "tree_pss_added_bytes" in runs[0]:
        rss = summary([r["rss_peak_bytes"] / MB for r in runs])
        pss = summary([r["tree_pss_peak_bytes"] / MB for r in runs])
        added = summary([r["tree_pss_added_bytes"] / MB for r in runs])
        text += (
            f"; peak RSS {spread(rss, '{:.0f}')} MB, tree PSS peak {spread(pss, '{:.0f}')} MB"
            f" (+{spread(added, '{:.0f}')} MB over the process before its loader)"
        )
        if "shared_memory_bytes" in runs[0]:
            text += f", slots {runs[0]['shared_memory_bytes'] / MB:.0f} MB"
    return text


def print_report(report: dict[str, Any]) -> None:
    config, machine = report["config"], report["machine"]
    print(
        f"gpuqueue's loaders against the peers, {machine['cpu_count']} CPUs, "
        f"{config['workers']} workers, queue {config['max_queue_size']}, "
        f"{config['rounds']} interleaved rounds (median [min-max]; ratios within a round)"
    )
    print("\ncases:")
    for key, case in report["cases"].items():
        runs = report["rounds"][key]
        if case["skipped"]:
            print(f"  {case['label']:<44} skipped: {case['skipped']}")
        else:
            print(_case_line(case["label"], runs))
    print("\ngoals (the issue's, each computed per round from that round's cases):")
    for g in report["goals"]:
        if g["measured"] is None:
            verdict, figure = "skipped", g["skipped"]
        else:
            verdict = {True: "met", False: "NOT met", None: "figure"}[g["met"]]
            figure = spread(g["measured"], "{:.2f}") + (f" {g['unit']}" if g["unit"] else "")
        print(f"  {verdict:>7}  {g['goal']}: {figure}  (goal {g['target']})")
    print(
        "\nhidden = (step alone + load alone - both) / min(step, load), per round: 1 when the "
        "loop runs at the pace of the slower of the two. PSS counts each shared page once "
        "across the process tree; 'added' is the tree's peak minus the process before its "
        "loader started; slots = stats()['shared_memory_bytes']."
    )
