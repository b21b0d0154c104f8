"""The prefetch-depth bench's advice: one line, from the rounds, and the rules behind it.

On a GPU the advice is a depth: the smallest within noise of the best at
every size, where noise is how far the fastest depth's own rounds fell below
its median (at least ``TOLERANCE``), so that the depths a run cannot tell
apart are printed as one set and the smallest of them is recommended, which
a rerun on the same machine then repeats. Without a GPU there is no copy to
hide and ``prefetch_depth`` does nothing: the advice says so and gives what
was measured instead, gpuqueue's throughput against the peers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.depth_report import human
from bench.rounds import spread

__all__ = [
    "TOLERANCE",
    "depth_verdict",
    "holds_everywhere",
    "noise",
    "recommend",
    "recommend_everywhere",
    "within_noise",
    "worst_ratio",
]

TOLERANCE = 0.02  # a depth within 2 % of the best throughput is as good as the best


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


def noise(stat: Mapping[str, float], tolerance: float = TOLERANCE) -> float:
    """How far below its median a figure's rounds reached, as a share (at least ``tolerance``)."""
    return max(tolerance, (stat["median"] - stat["min"]) / stat["median"] if stat["median"] else 0)


def within_noise(by_size: Sequence[Mapping[int, float]], noises: Sequence[float]) -> list[int]:
    """The depths within ``noises[i]`` of size ``i``'s best, at every size (smallest first).

    A depth is as fast as the best when its median is no further below the
    best depth's median than the best's own rounds fell (``noise``): which
    of those is fastest is noise, so the smallest of them is the advice.
    """
    common = set.intersection(*(set(t) for t in by_size))
    return sorted(
        d
        for d in common
        if all(t[d] >= max(t.values()) * (1 - n) for t, n in zip(by_size, noises, strict=True))
    )


def worst_ratio(by_size: Sequence[Mapping[int, float]], depth: int) -> float:
    """``depth``'s throughput over the best depth's, at the size where it is lowest."""
    return min(t[depth] / max(t.values()) for t in by_size)


def holds_everywhere(
    by_size: Sequence[Mapping[int, float]], depth: int, tolerance: float = TOLERANCE
) -> bool:
    return worst_ratio(by_size, depth) >= 1 - tolerance


def depth_verdict(on_device: bool, sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's advice, one line, and what it rests on.

    On a GPU: the smallest depth within noise of the best at every size, the
    set of depths within noise (``within_noise``), and whether that depth
    keeps up with the one-ahead loop. Without one, no depth: there is no
    copy to hide, so what was measured instead is gpuqueue's host
    throughput against the peers.
    """
    if not on_device:
        return {
            "recommended_depth": None,
            "within_noise": [],
            "goal_vs_one_ahead": None,
            "advice": no_device_advice(sizes),
        }
    by_size = [
        {r["depth"]: r["batches_per_s"]["median"] for r in s["rows"]
         if r["kind"] == "gpuqueue" and r["depth"] is not None and "skipped" not in r}
        for s in sizes
    ]  # fmt: skip
    noises = [s["noise"] for s in sizes]
    near = within_noise(by_size, noises)
    overall = near[0] if near else recommend_everywhere(by_size, max(noises))
    if near:
        advice = (
            f"prefetch_depth={overall}: the smallest depth within noise of the best at every "
            f"size (depths within noise: {', '.join(map(str, near))}; noise is how far the "
            "fastest depth's own rounds fell below its median)"
        )
    else:
        advice = (
            f"prefetch_depth={overall}, tentatively: no depth is within noise of the best at "
            f"every size; this one falls least below a size's best "
            f"({1 - worst_ratio(by_size, overall):.0%}); rerun on a quieter machine"
        )
    return {
        "recommended_depth": overall,
        "within_noise": near,
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
        "advice": advice,
    }


def no_device_advice(sizes: list[dict[str, Any]]) -> str:
    """The advice without a GPU: depth does nothing; what gpuqueue's host throughput was."""
    measured = []
    for size in sizes:
        peers = size.get("vs_peers")
        if peers is None:  # --sweep: every depth ran, on the staged path
            measured.append(f"{human(size['size_bytes'])}: each depth in the table (--sweep)")
            continue
        ratios = ", ".join(f"{spread(stat)}x {label}" for label, stat in peers.items())
        measured.append(f"{human(size['size_bytes'])}: {ratios}")
    return (
        "no depth to recommend: without a GPU prefetch_depth has no effect (there is no copy "
        "to hide; each batch is handed over as the worker made it). Measured instead, the "
        "training loop's batches/s with gpuqueue over each peer's, same round: "
        + "; ".join(measured)
    )
