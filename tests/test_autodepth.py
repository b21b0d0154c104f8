"""prefetch_depth="auto": deeper while the consumer waits, never past the cap or the budget."""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer
from gpuqueue.backends.numpy import NumpyBackend, available_host_memory
from gpuqueue.batch.layout import layout
from gpuqueue.batch.tree import describe
from gpuqueue.device.autodepth import CAP, START, WARMUP, WINDOW, DepthTuner, device_bytes_for
from tests.conftest import start
from tests.seqs import Gated


class FakeArenas:
    def __init__(self, largest: int) -> None:
        self.largest = largest
        self.largest_output = 0
        self.depths: list[int] = []

    def set_depth(self, depth: int) -> None:
        self.depths.append(depth)


def warmed(arenas: FakeArenas, budget: int = 10**9, source: str = "test") -> DepthTuner:
    """A tuner past its warm-up (the first gets, which wait while the pipeline fills)."""
    tuner = DepthTuner(arenas, budget=budget, budget_source=source)  # type: ignore[arg-type]
    for _ in range(WARMUP):
        tuner.observe(starved=True, staged=False)
    assert tuner.depth == START and arenas.depths == []
    return tuner


def window(tuner: DepthTuner, starved: int, staged: bool = True) -> None:
    for i in range(WINDOW):
        tuner.observe(starved=i < starved, staged=staged)


def test_the_tuner_holds_while_the_consumer_rarely_waits() -> None:
    arenas = FakeArenas(largest=1000)
    tuner = warmed(arenas)
    window(tuner, starved=1)  # 1 of 32 is 3 %: under the 5 % line
    assert tuner.depth == START and arenas.depths == []
    assert tuner.reason == f"holds at {START}: the consumer waited for 1 of the last 32 batches"


def test_the_tuner_goes_one_deeper_as_soon_as_a_window_starves_up_to_the_cap() -> None:
    arenas = FakeArenas(largest=1000)
    tuner = warmed(arenas)
    tuner.observe(starved=True, staged=True)
    tuner.observe(starved=True, staged=True)  # 2 of a window of 32: over 5 %
    assert arenas.depths == [START + 1]
    assert tuner.reason == f"went to {START + 1}: the consumer waited for 2 of the last 2 batches"
    for _ in range(2 * CAP):
        tuner.observe(starved=True, staged=True)
    assert arenas.depths == list(range(START + 1, CAP + 1))
    assert tuner.depth == CAP and tuner.reason.startswith(f"holds at the cap, {CAP}")
    window(tuner, starved=0)  # never shallower
    assert tuner.depth == CAP


def test_the_tuner_never_passes_the_budget_and_says_so() -> None:
    largest = 1 << 20
    budget = device_bytes_for(4, largest)  # room for depth 4, not 5
    arenas = FakeArenas(largest)
    tuner = warmed(arenas, budget, "max_device_bytes")
    for _ in range(6):
        window(tuner, starved=32)
    assert tuner.depth == 4 and arenas.depths == [3, 4]
    assert "depth 5 may need" in tuner.reason and "(max_device_bytes)" in tuner.reason


def test_the_tuner_holds_when_the_workers_are_behind_and_says_so() -> None:
    arenas = FakeArenas(10)
    tuner = warmed(arenas)
    window(tuner, starved=32, staged=False)
    assert tuner.depth == START and arenas.depths == []
    assert tuner.reason.startswith(f"holds at {START}") and "the workers are behind" in tuner.reason


def batch_bytes() -> int:
    return layout(describe((np.zeros(1000, np.float32), 0))[1])[1]


class Plain(gpuqueue.Sequence):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> Any:
        return np.full(1000, index, np.float32), index


class SlowCopies(NumpyBackend):
    """A device whose every copy waits for the consumer's go: the copy stage is behind."""

    shares_host_memory = False  # copy every batch, as a GPU does

    def __init__(self) -> None:
        self.gate = Gated()

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        self.gate[0]  # waits for a go (or for stop())
        super().copy_to_device(dst, src, nbytes, stream)


def test_a_slow_copy_stage_makes_the_run_deeper_within_the_budget(running: list[Any]) -> None:
    budget = device_bytes_for(5, batch_bytes())
    backend = SlowCopies()
    enqueuer = OrderedEnqueuer(
        Plain(), device=backend, prefetch_depth="auto", max_device_bytes=budget, shard=None
    )
    start(running, enqueuer, workers=1, max_queue_size=4)
    running.insert(0, backend.gate)
    assert enqueuer.stats()["prefetch_depth"] == START
    backend.gate.go()
    depths, reasons = [], []
    # Until the budget has stopped it once (a machine under load may also see windows
    # where the single worker was behind, which the tuner rightly reports instead).
    for position, batch in enumerate(islice(enqueuer.get(), WINDOW * 8)):
        assert int(batch[1]) == position % 64 and np.all(batch[0] == position % 64)
        stats = enqueuer.stats()
        assert stats["device_bytes"] <= budget
        depths.append(stats["prefetch_depth"])
        reasons.append(stats["prefetch_depth_reason"])
        if "depth 6 may need" in reasons[-1]:
            break
        backend.gate.go()
    assert depths[0] == START and depths[-1] == 5, depths
    assert depths == sorted(depths)  # never shallower
    assert "depth 6 may need" in reasons[-1], reasons[-3:]
    assert f"over the budget of {budget} (max_device_bytes)" in reasons[-1]
    assert enqueuer.stats()["max_device_bytes"] == budget


def test_slow_workers_do_not_make_the_run_deeper(running: list[Any]) -> None:
    seq = Gated()
    enqueuer = OrderedEnqueuer(seq, device="cpu", prefetch_depth="auto", shard=None)
    start(running, enqueuer, workers=1, max_queue_size=2)
    running.insert(0, seq)
    seq.go()
    for position, batch in enumerate(islice(enqueuer.get(), WINDOW * 2)):
        assert int(batch[1]) == position % 64
        seq.go()
    stats = enqueuer.stats()
    assert stats["prefetch_depth"] == START
    assert "the workers are behind" in stats["prefetch_depth_reason"]
    assert stats["prefetch_depth_reason"].startswith(f"holds at {START}")


def test_the_default_budget_is_a_share_of_free_memory(running: list[Any]) -> None:
    seq = Gated()
    enqueuer = start(running, OrderedEnqueuer(seq, device="cpu", prefetch_depth="auto", shard=None))
    running.insert(0, seq)
    budget = enqueuer.stats()["max_device_bytes"]
    available = available_host_memory()
    # A tenth of what was available at start (the host's memory moves a little since).
    assert 0.05 * available < budget < 0.2 * available
    assert enqueuer._run.tuner._budget_source == "10% of the host memory free at start"


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"prefetch_depth": "deep"}, "prefetch_depth must be an int >= 0 or 'auto', got 'deep'"),
        ({"prefetch_depth": -1}, "prefetch_depth must be an int >= 0"),
        ({"max_device_bytes": 1 << 20}, "max_device_bytes bounds prefetch_depth='auto'"),
        ({"prefetch_depth": "auto", "max_device_bytes": 0}, "max_device_bytes must be"),
        (
            {"prefetch_depth": "auto", "max_device_bytes": 1 << 20, "device": None},
            "max_device_bytes needs a device",
        ),
    ],
)
def test_bad_depth_settings_are_named(keywords: dict[str, Any], message: str) -> None:
    keywords = {"device": "cpu", **keywords}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OrderedEnqueuer(Gated(), **keywords)


class OneMiB(gpuqueue.Sequence):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> Any:
        return np.full(1 << 20, index, np.uint8)


def test_a_budget_below_one_batch_shrinks_the_depth_and_warns_once_naming_why(
    running: list[Any],
) -> None:
    """Regression: max_device_bytes=2 MiB with 1 MiB batches stayed at depth 2 (3.75 MiB
    at its peak) without a word, and the reason said "holds at 2: the consumer waited
    for 0 ...", as if the budget played no part."""
    budget = 2 << 20
    enqueuer = OrderedEnqueuer(
        OneMiB(), device="cpu", prefetch_depth="auto", max_device_bytes=budget, shard=None
    )
    with pytest.warns(RuntimeWarning) as warned:
        start(running, enqueuer, workers=1)
        for _ in islice(enqueuer.get(), 3 * WINDOW):
            pass
    ours = [w for w in warned if "prefetch_depth='auto'" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in warned]
    assert str(ours[0].message).startswith(
        f"prefetch_depth='auto': one batch of {1 << 20} bytes needs "
        f"{device_bytes_for(1, 1 << 20)} bytes of device memory at depth 1, over the budget "
        f"of {budget} bytes (max_device_bytes)"
    ), str(ours[0].message)
    stats = enqueuer.stats()
    assert stats["prefetch_depth"] == 1
    assert stats["prefetch_depth_reason"].startswith(
        f"holds at 1, the least: one batch of {1 << 20} bytes needs "
        f"{device_bytes_for(1, 1 << 20)} bytes at depth 1, over the budget of {budget}"
    ), stats["prefetch_depth_reason"]


def test_a_budget_that_fits_a_shallower_depth_makes_the_run_that_shallow() -> None:
    arenas = FakeArenas(largest=1000)
    budget = device_bytes_for(1, 1000)  # depth 1 fits, depth 2 (the start) does not
    tuner = DepthTuner(arenas, budget=budget, budget_source="max_device_bytes")  # type: ignore[arg-type]
    tuner.observe(starved=True, staged=True)  # the first batch: its size is known now
    assert tuner.depth == 1 and arenas.depths == [1]
    assert tuner.reason.startswith("went to 1: depth 2 may need "), tuner.reason
    window(tuner, starved=WINDOW)  # starving: still never past the budget
    assert tuner.depth == 1 and "depth 2 may need" in tuner.reason
