"""Device stage, ``prefetch_depth="auto"``: a depth that finds itself, within a memory budget.

The run starts at depth ``START``. The tuner counts the batches the
consumer had to wait for (the device queue was empty when it asked), over
windows of ``WINDOW`` batches after the first ``WARMUP`` (which wait while
the pipeline fills). As soon as more than ``STARVED`` of a window waited,
and one more batch ahead still fits the budget, it goes one deeper (up to
``CAP``) and starts a new window: a run that starves deepens within a few
batches, one that does not holds. It never goes shallower for want of waits:
a depth that was once needed is kept for the rest of the run, so a run never
oscillates, and memory only grows while it buys something. The budget is a
bound: once the largest batch is known (or grows), the depth shrinks to one
the budget holds, down to 1; if even depth 1 is over it (one batch is too
large for the budget), the run warns once (``RuntimeWarning``) and the reason
says so. ``stats()`` reports the depth and the reason for it.

Device memory for depth ``d`` is bounded by ``(d + 3) x largest batch x
1.25``: ``d`` batches ahead, the one the loop holds and the one it just
dropped, one free arena, each with the arenas' growth margin
(``arenas.py``); with a transform, plus ``(d + 2) x`` the most its outputs
held for one batch (batches ahead and held have outputs; a free arena has
none). The budget is ``max_device_bytes``, by default a tenth of the
device's free memory when the run starts (on NumPy, of the host's available
memory).

A deeper prefetch absorbs jitter: slow copies, a burst of fast steps. When
the workers themselves are behind (nothing was staged when most of the
waits happened), a deeper device queue cannot help: the tuner holds, and
the reason says that more workers would.
"""

from __future__ import annotations

import threading
import warnings

from ..batch.layout import GROWTH
from .arenas import DeviceArenas

__all__ = ["CAP", "START", "STARVED", "WARMUP", "WINDOW", "DepthTuner", "device_bytes_for"]

START = 2
CAP = 8
WARMUP = 4  # the first gets wait while the pipeline fills: not counted
WINDOW = 32  # batches per decision, at most
STARVED = 0.05  # a larger share of a window's batches waited for: go deeper
DEFAULT_BUDGET_SHARE = 0.1  # of the free device (or host) memory at start


def device_bytes_for(depth: int, largest: int, outputs: int = 0) -> int:
    """The device memory a run at ``depth`` may hold, batches of ``largest`` bytes
    whose transform's outputs hold ``outputs`` bytes."""
    return int((depth + 3) * largest * GROWTH) + (depth + 2) * outputs


class DepthTuner:
    """Deepens a run's prefetch while the consumer waits for data and the budget allows.

    Args:
        arenas: The run's arenas; their depth is what changes.
        budget: Device bytes the run may hold (``device_bytes_for``).
        budget_source: Says where ``budget`` came from, for the reason.
    """

    def __init__(self, arenas: DeviceArenas, budget: int, budget_source: str) -> None:
        self._arenas = arenas
        self.budget, self._budget_source = budget, budget_source
        self.depth = START
        self.reason = f"starts at {START}"
        self._lock = threading.Lock()  # several threads may consume one run
        self._seen = self._starved = self._unstaged = 0
        self._warming = WARMUP
        self._fitted = 0  # the largest batch the depth was last fitted to the budget for
        self._warned = False

    @classmethod
    def for_run(cls, arenas: DeviceArenas, max_device_bytes: int | None) -> DepthTuner:
        """A run's tuner: its budget is ``max_device_bytes``, or a share of what is free now."""
        if max_device_bytes is not None:
            return cls(arenas, max_device_bytes, "max_device_bytes")
        free = arenas.backend.free_memory()
        where = "host" if arenas.backend.shares_host_memory else "device"
        return cls(
            arenas,
            int(free * DEFAULT_BUDGET_SHARE),
            f"{DEFAULT_BUDGET_SHARE:.0%} of the {where} memory free at start",
        )

    def observe(self, starved: bool, staged: bool) -> None:
        """One batch taken: ``starved`` if the consumer had to wait for it, ``staged``
        if batches were waiting for their copy at that moment."""
        with self._lock:
            if self._arenas.largest != self._fitted:
                self._fit()
            if self._warming:
                self._warming -= 1
                return
            self._seen += 1
            if starved:
                self._starved += 1
                self._unstaged += not staged
            if self._starved > STARVED * WINDOW or self._seen >= WINDOW:
                self._decide()
                self._seen = self._starved = self._unstaged = 0

    def _fit(self) -> None:
        """Makes the depth one the budget holds, for the largest batch seen (it grew).

        Never below 1: if even that is over the budget (one batch is too
        large for it), the run says so once, with a ``RuntimeWarning``, and
        goes on at depth 1.
        """
        arenas = self._arenas
        self._fitted = largest = arenas.largest
        depth = self.depth
        while depth > 1 and self._need(depth) > self.budget:
            depth -= 1
        if depth < self.depth:
            self.reason = (
                f"went to {depth}: depth {depth + 1} may need {self._need(depth + 1)} bytes, "
                f"over the budget of {self.budget} ({self._budget_source})"
            )
            self.depth = depth
            arenas.set_depth(depth)
        if self._need(1) > self.budget:
            self.reason = self._over_budget()
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"prefetch_depth='auto': one batch of {largest} bytes needs "
                    f"{self._need(1)} bytes of device memory at depth 1, over the budget of "
                    f"{self.budget} bytes ({self._budget_source}); the run goes on at depth 1, "
                    "over the budget (raise max_device_bytes, or use smaller batches)",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _need(self, depth: int) -> int:
        return device_bytes_for(depth, self._arenas.largest, self._arenas.largest_output)

    def _over_budget(self) -> str:
        return (
            f"holds at 1, the least: one batch of {self._arenas.largest} bytes needs "
            f"{self._need(1)} bytes at depth 1, over the budget of {self.budget} "
            f"({self._budget_source})"
        )

    def _decide(self) -> None:
        depth = self.depth
        if depth == 1 and self._need(1) > self.budget:
            self.reason = self._over_budget()
            return
        waited = f"the consumer waited for {self._starved} of the last {self._seen} batches"
        if self._starved <= STARVED * WINDOW:
            self.reason = f"holds at {depth}: {waited}"
            return
        if self._unstaged * 2 > self._starved:  # a deeper device queue would only cost memory
            self.reason = (
                f"holds at {depth}: {waited}, with nothing staged for {self._unstaged} of "
                "those: the workers are behind (more workers would help; a deeper prefetch "
                "would not)"
            )
            return
        if depth >= CAP:
            self.reason = f"holds at the cap, {CAP}: {waited}"
            return
        need = device_bytes_for(depth + 1, self._arenas.largest, self._arenas.largest_output)
        if need > self.budget:
            self.reason = (
                f"holds at {depth}: {waited}, but depth {depth + 1} may need {need} bytes, "
                f"over the budget of {self.budget} ({self._budget_source})"
            )
            return
        self.depth = depth + 1
        self._arenas.set_depth(self.depth)
        self.reason = f"went to {self.depth}: {waited}"
