"""Interleaved rounds: every case once per round, so drift hits all cases alike.

A benchmark is a list of ``Case``s. ``run_rounds`` runs each case once per
round, round-robin (the starting case moves by one each round, so no case
is always first after a pause), for at least five rounds by default. A
figure is then the median of its rounds with their minimum and maximum;
a ratio is taken within each round (case A's figure over case B's from the
same round) and only then summarised, so a slow round slows both sides of
its ratio instead of widening the spread.

A case whose ``skip`` is set is not run: it stays in the results as a row
that says why (``tf_keras`` not installed, say), so a missing peer is never
a crash and never silently absent.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Figures = dict[str, Any]  # one run's figures: floats, or anything JSON can hold


@dataclass
class Case:
    """One thing measured once per round.

    Args:
        key: A unique name, the key of its results.
        run: One measurement; returns its figures (floats by name).
        skip: Why the case cannot run here (None: it runs).
        label: The row's label in tables (the key if empty).
    """

    key: str
    run: Callable[[], Figures]
    skip: str | None = None
    label: str = ""
    tags: dict[str, Any] = field(default_factory=dict)


class Progress:
    """A one-line progress bar on stderr (a no-op when ``total`` is 0)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total, self.done = total, 0
        self.stream = stream if stream is not None else sys.stderr

    def advance(self, label: str) -> None:
        self.done += 1
        if not self.total:
            return
        filled = round(30 * self.done / self.total)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label[:44]:<44}"
        )
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def run_rounds(
    cases: Sequence[Case], rounds: int, progress: Progress | None = None
) -> dict[str, list[Figures]]:
    """Runs every case that is not skipped once per round, interleaved.

    Returns:
        For each case's key, its figures from each round, in round order
        (empty for a skipped case).
    """
    keys = [case.key for case in cases]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"case keys must be unique; repeated: {duplicates}")
    results: dict[str, list[Figures]] = {case.key: [] for case in cases}
    runnable = [case for case in cases if case.skip is None]
    for round_index in range(rounds):
        shift = round_index % len(runnable) if runnable else 0
        for case in runnable[shift:] + runnable[:shift]:
            results[case.key].append(case.run())
            if progress is not None:
                progress.advance(f"round {round_index + 1}/{rounds}: {case.label or case.key}")
    return results


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"median", "min", "max", "rounds"}`` of one figure over the rounds."""
    if not values:
        raise ValueError("no rounds to summarise")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": list(values),
    }


def figure(runs: Sequence[Figures], name: str) -> dict[str, Any]:
    """The summary of figure ``name`` over a case's rounds."""
    return summary([float(run[name]) for run in runs])


def ratio(
    top: Sequence[Figures], bottom: Sequence[Figures], name: str, invert: bool = False
) -> dict[str, Any]:
    """``top[name] / bottom[name]`` in each round (its inverse if ``invert``), summarised.

    Use ``invert`` for times, so that above 1 always means "top is faster".
    """
    if len(top) != len(bottom):
        raise ValueError(f"ratio of {len(top)} rounds over {len(bottom)}: rounds must pair up")
    values = []
    for a, b in zip(top, bottom, strict=True):
        num, den = (float(b[name]), float(a[name])) if invert else (float(a[name]), float(b[name]))
        values.append(num / den if den else float("inf"))
    return summary(values)


def spread(stat: Mapping[str, Any], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """``median [min-max]`` in one format, the way every table here shows a figure."""
    m, lo, hi = (fmt.format(stat[k] * scale) for k in ("median", "min", "max"))
    return f"{m} [{lo}-{hi}]"
