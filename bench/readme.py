"""``python -m bench.readme``: the README's bench tables, made from the JSON in ``bench/results/``.

Each table lives in the README between ``<!-- bench:NAME:start -->`` and
``<!-- bench:NAME:end -->``; ``--write`` replaces those blocks with what the
JSON says now, ``--check`` fails if they differ (the tests run it), and no
option prints the blocks. A JSON that is missing, or older than the bench
that reads it, gives a block saying so and the command that makes it: the
README never shows a figure that its JSON does not hold.

The lead's sequence on a quiet machine::

    python -m bench --out bench/results/cpu-2core
    python -m bench.loaders
    python -m bench.readme --write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.depth_report import human
from bench.loaders_report import STARTUP_ROWS
from bench.rounds import spread, summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cpu-2core"
MiB = 1 << 20


def _machine(report: dict[str, Any]) -> str:
    machine = report["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in sorted(machine.get("packages", {}).items()))
    gpu = machine.get("gpu", {}).get("name")
    where = f"on {gpu}" if gpu else f"without a GPU (NumPy fallback), {machine['cpu_count']} CPUs"
    load = machine.get("load_average")
    during = f", load average {load[1]:.1f} (5 min) when it ended" if load else ""
    return (
        f"Measured {where}{during}, {machine['platform']}, Python {machine['python']}; {packages}."
    )


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _missing(path: Path, command: str, schema: int) -> str | None:
    if not path.exists():
        return f"_No figures yet: `{command}` writes `{_shown(path)}`._"
    report = json.loads(path.read_text())
    if report.get("schema") != schema:
        return f"_`{_shown(path)}` predates this table's format; rerun `{command}` to fill it._"
    return None


def depth_block(results: Path) -> str:
    path = results / "prefetch_depth.json"
    command = f"python -m bench --out {_shown(path.parent)}"
    missing = _missing(path, command, 3)
    if missing:
        return missing
    report = json.loads(path.read_text())
    config = report["config"]
    lines = [
        f"`{report['command']}`: {config['workers']} workers, max_queue_size "
        f"{config['max_queue_size']}, a {config['step_ms']:g} ms step, {config['rounds']} "
        "interleaved rounds; median [min-max] of the rounds, ratios within a round. "
        + _machine(report),
        "",
        "| size | loader | batches/s | vs one-ahead loop | stall % | device MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size in report["sizes"]:
        for row in size["rows"]:
            name = human(size["size_bytes"])
            if "skipped" in row:
                lines.append(f"| {name} | {row['row']} | skipped: {row['skipped']} | | | |")
                continue
            dev = f"{row['device_bytes_peak'] / MiB:.1f}" if "device_bytes_peak" in row else "—"
            recommended = report["recommended_depth"]
            mark = "**" if recommended is not None and row.get("depth") == recommended else ""
            lines.append(
                f"| {name} | {mark}{row['row']}{mark} | {spread(row['batches_per_s'], '{:.1f}')} "
                f"| {spread(row['vs_one_ahead'])} | {spread(row['stall_fraction'], '{:.0f}', 100)} "
                f"| {dev} |"
            )
    lines += ["", f"Advice: {report['advice']}."]
    goal = report["goal_vs_one_ahead"]
    if goal is not None:
        recommended = report["recommended_depth"]
        lines[-1] += (
            f" Recommended depth in bold: **{recommended}**. "
            f"Goal: {goal['goal']}: **{'met' if goal['met'] else 'not met'}**."
        )
    return "\n".join(lines)


def loaders_block(results: Path) -> str:
    path = results / "loaders.json"
    missing = _missing(path, "python -m bench.loaders", 1)
    if missing:
        return missing
    report = json.loads(path.read_text())
    config = report["config"]
    lines = [
        f"`{report['command']}`: {config['workers']} workers, queue {config['max_queue_size']}, "
        f"{config['rounds']} interleaved rounds; median [min-max], each round's value from "
        "that round's cases. " + _machine(report),
        "",
        "| goal | measured | target | |",
        "| --- | --- | --- | --- |",
    ]
    for g in report["goals"]:
        if g["measured"] is None:
            lines.append(f"| {g['goal']} | skipped: {g['skipped']} | {g['target']} | |")
            continue
        unit = f" {g['unit']}" if g["unit"] else ""
        verdict = {True: "met", False: "**not met**", None: ""}[g["met"]]
        lines.append(f"| {g['goal']} | {spread(g['measured'])}{unit} | {g['target']} | {verdict} |")
    lines += [
        "",
        "| image batches (and per-sample datasets), each case in a fresh process "
        "| ms per batch | peak RSS, MB "
        "| process tree's PSS at its peak, MB | PSS added by the loader, MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, case in report["cases"].items():
        runs = report["rounds"][key]
        if not key.startswith(("image/", "samples/")) or not runs:
            continue

        def cell(name: str, scale: float, fmt: str, runs: list[dict[str, Any]] = runs) -> str:
            return spread(summary([r[name] * scale for r in runs]), fmt)

        lines.append(
            f"| {case['label'].removeprefix('images: ')} | {cell('s_per_batch', 1e3, '{:.2f}')} "
            f"| {cell('rss_peak_bytes', 1e-6, '{:.0f}')} "
            f"| {cell('tree_pss_peak_bytes', 1e-6, '{:.0f}')} "
            f"| {cell('tree_pss_added_bytes', 1e-6, '{:.0f}')} |"
        )
    started = report["rounds"].get("startup")
    if started:
        lines += [
            "",
            f"| worker start, 2 processes, after `import {started[0]['imported']}` (a fresh "
            "process per round) | seconds to the first batch |",
            "| --- | --- |",
        ]
        for name, label in STARTUP_ROWS.items():
            lines.append(f"| {label} | {spread(summary([r[name] for r in started]))} |")
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[Path], str]] = {"depth": depth_block, "loaders": loaders_block}


def render(readme: str, results: Path) -> str:
    """``readme`` with every bench block replaced by what the JSON says.

    Raises:
        ValueError: If a block's markers are missing or out of order.
    """
    for name, make in BLOCKS.items():
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.DOTALL)
        if len(pattern.findall(readme)) != 1:
            raise ValueError(f"README needs exactly one '{start}' ... '{end}' block")
        before, _, rest = readme.partition(start)
        _, _, after = rest.partition(end)
        readme = f"{before}{start}\n{make(results)}\n{end}{after}"
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite README.md's blocks")
    action.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args(argv)
    readme_path = ROOT / "README.md"
    current = readme_path.read_text(encoding="utf-8")
    wanted = render(current, args.results.resolve())
    if args.write:
        readme_path.write_text(wanted, encoding="utf-8")
    elif args.check:
        if wanted != current:
            print("README.md's bench tables differ from the JSON: python -m bench.readme --write")
            return 1
    else:
        for name, make in BLOCKS.items():
            print(f"<!-- bench:{name} -->\n{make(args.results.resolve())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
