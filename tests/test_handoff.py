"""The per-batch path: the plan that skips the general walk, bundles of fast reads, and
NumPy's hand-over of staged buffers. Each must engage, and change nothing a user sees."""

from __future__ import annotations

import threading
from itertools import islice
from typing import Any

import numpy as np
import pytest

import gpuqueue
from gpuqueue import OrderedEnqueuer
from gpuqueue.backends.numpy import NumpyBackend
from gpuqueue.batch.layout import layout
from gpuqueue.batch.plan import Plan
from gpuqueue.batch.tree import describe
from gpuqueue.errors import BatchError
from tests.conftest import start


class Tiny(gpuqueue.Sequence):
    """Fast reads of small batches: (array, int label, dict of a tensor-free array)."""

    def __init__(self, length: int = 40, bad: dict[int, Any] | None = None) -> None:
        self.length, self.bad = length, bad or {}
        self.epochs_ended = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if index in self.bad:
            value = self.bad[index]
            if isinstance(value, BaseException):
                raise value
            return value
        return np.full(3, index, np.float32), index, {"w": np.float64(index)}

    def on_epoch_end(self) -> None:
        self.epochs_ended += 1


def label(batch: Any) -> int:
    x, y, extra = batch
    assert np.all(x == y) and float(extra["w"]) == y
    return int(y)


def test_plan_splits_batches_shaped_like_the_first_and_refuses_others() -> None:
    first = (np.zeros((2, 3), np.float32), 5, {"a": np.int64(1)})
    treedef, leaves = describe(first)
    plan = Plan.of(first, treedef, leaves, *layout(leaves))
    assert plan is not None
    # A shorter batch of the same structure: split, with a layout of its own.
    split = plan.split((np.ones((1, 3), np.float32), 6, {"a": np.int64(2)}))
    assert split is not None
    got, metas, _ = split
    assert [path for path, _ in got] == [path for path, _ in leaves]
    assert metas[0].shape == (1, 3) and got.kinds == ["array", "number", "scalar"]
    assert int(got[1][1]) == 6
    # The same leaves again share that layout (so it is checked once).
    again = plan.split((np.ones((1, 3), np.float32), 7, {"a": np.int64(3)}))
    assert again is not None and again[1] is metas
    for other in [
        [np.zeros((2, 3), np.float32), 5, {"a": np.int64(1)}],  # a list, not a tuple
        (np.zeros((2, 3), np.float32), 5.0, {"a": np.int64(1)}),  # a float label
        (np.zeros((2, 3), np.float32), 5, {"b": np.int64(1)}),  # another key
        (np.zeros((2, 3), np.float32), 5, {"a": np.int64(1)}, None),  # one more field
        (np.array([object()]), 5, {"a": np.int64(1)}),  # objects: describe names it
    ]:
        assert plan.split(other) is None and not plan.matches(other)


def test_batches_with_host_leaves_keep_the_general_path() -> None:
    batch = (np.zeros(2), None, "name")
    treedef, leaves = describe(batch)
    assert Plan.of(batch, treedef, leaves, *layout(leaves)) is None


@pytest.mark.parametrize("device", [None, "cpu", "simulated"])
def test_the_general_walk_runs_for_the_first_batch_only(
    running: list[Any], device: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpuqueue.host.stage as host

    walks = []
    real = host.describe

    def counting(batch: Any, packed: bool = True) -> Any:
        walks.append(batch)
        return real(batch, packed)

    monkeypatch.setattr(host, "describe", counting)
    enqueuer = start(running, OrderedEnqueuer(Tiny(), device=device, shard=None), workers=1)
    got = []
    for batch in islice(enqueuer.get(), 80):
        if device == "simulated":
            enqueuer._run.backend.synchronize_stream(enqueuer._run.backend.current_stream())
        got.append(label(batch))
    assert got == list(range(40)) * 2
    assert len(walks) == 1


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_batch_that_differs_after_many_alike_is_named(
    running: list[Any], device: str | None
) -> None:
    bad = {25: (np.full(3, 25, np.float32), 25, {"w": np.float64(25), "extra": 1})}
    enqueuer = start(running, OrderedEnqueuer(Tiny(bad=bad), device=device, shard=None))
    batches = enqueuer.get()
    assert [label(next(batches)) for _ in range(25)] == list(range(25))
    with pytest.raises(BatchError, match=r"batch index 25 .*\[2\] has keys"):
        next(batches)


def test_a_dtype_that_changes_after_many_alike_is_named_on_a_device(running: list[Any]) -> None:
    bad = {30: (np.full(3, 30, np.float64), 30, {"w": np.float64(30)})}
    enqueuer = start(running, OrderedEnqueuer(Tiny(bad=bad), device="cpu", shard=None))
    batches = enqueuer.get()
    assert [label(next(batches)) for _ in range(30)] == list(range(30))
    with pytest.raises(BatchError, match=r"batch index 30 .*field \[0\] has dtype float64"):
        next(batches)


def test_fast_reads_travel_in_bundles_in_order_with_epoch_ends_between(
    running: list[Any],
) -> None:
    seq = Tiny(length=37)
    enqueuer = start(running, OrderedEnqueuer(seq, shard=None), workers=1)
    puts = []
    queue = enqueuer._run.host_queue
    real_put = queue.put

    def counting_put(item: Any, timeout: float | None = None) -> None:
        puts.append(len(item.bundle or [item]))
        real_put(item, timeout)

    queue.put = counting_put  # type: ignore[method-assign]
    got = [label(batch) for batch in islice(enqueuer.get(), 37 * 4)]
    assert got == list(range(37)) * 4
    assert max(puts) > 1, "fast reads never made a bundle"
    assert seq.epochs_ended >= 3
    assert enqueuer.stats()["batches_consumed"] == 37 * 4


def test_an_error_inside_a_bundle_arrives_after_every_batch_before_it(
    running: list[Any],
) -> None:
    seq = Tiny(length=200, bad={150: KeyError("cannot read 150")})
    enqueuer = start(running, OrderedEnqueuer(seq, shard=None), workers=2)
    batches = enqueuer.get()
    assert [label(next(batches)) for _ in range(150)] == list(range(150))
    assert enqueuer._run.host.bundle > 1
    with pytest.raises(KeyError, match="cannot read 150"):
        next(batches)


def test_none_inside_a_bundle_is_skipped_and_resume_is_exact(running: list[Any]) -> None:
    seq = Tiny(length=60, bad={10: None, 11: None, 40: None})
    enqueuer = start(running, OrderedEnqueuer(seq, shard=None), workers=1)
    batches = enqueuer.get()
    got = [label(next(batches)) for _ in range(20)]
    assert got == [i for i in range(22) if i not in (10, 11)]
    state = enqueuer.state_dict()
    enqueuer.stop()
    assert (state["epoch"], state["position"]) == (0, 22)
    resumed = OrderedEnqueuer(Tiny(length=60, bad={40: None}), shard=None)
    resumed.load_state_dict(state)
    start(running, resumed, workers=2)
    rest = [label(b) for b in islice(resumed.get(), 37)]
    assert rest == [i for i in range(22, 60) if i != 40]


class CountingNumpy(NumpyBackend):
    def __init__(self) -> None:
        self.copies = 0
        self.lock = threading.Lock()

    def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
        with self.lock:
            self.copies += 1
        super().copy_to_device(dst, src, nbytes, stream)


@pytest.mark.parametrize("depth", [0, 2])
def test_numpy_hands_staged_buffers_over_and_held_batches_stay_true(
    running: list[Any], depth: int
) -> None:
    backend = CountingNumpy()
    enqueuer = OrderedEnqueuer(Tiny(length=25), device=backend, prefetch_depth=depth, shard=None)
    start(running, enqueuer, workers=2, max_queue_size=3)
    held = list(islice(enqueuer.get(), 100))  # every batch held: none may be rewritten
    assert [label(batch) for batch in held] == list(range(25)) * 4
    assert backend.copies == 0


def test_numpy_copies_out_of_shared_memory(running: list[Any]) -> None:
    backend = CountingNumpy()
    enqueuer = OrderedEnqueuer(Tiny(length=6), use_multiprocessing=True, device=backend, shard=None)
    start(running, enqueuer, workers=2)
    held = list(islice(enqueuer.get(), 12))
    assert [label(batch) for batch in held] == list(range(6)) * 2
    assert backend.copies >= 12  # (and the copy stage may be ahead)


class KerasStyle(gpuqueue.Sequence):
    """As a Keras Sequence often is: list labels and None sample weights (host leaves)."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, index: int) -> Any:
        return np.full((2, 2), index, np.float32), [index, index], None


@pytest.mark.parametrize("device", [None, "cpu"])
def test_list_labels_and_none_weights_keep_their_place_in_bundles(
    running: list[Any], device: str | None
) -> None:
    enqueuer = start(running, OrderedEnqueuer(KerasStyle(), device=device, shard=None))
    got = list(islice(enqueuer.get(), 90))
    for position, (x, y, weights) in enumerate(got):
        index = position % 30
        assert np.all(x == index) and weights is None
        assert list(y) == [index, index] if device is None else np.array_equal(y, [index, index])


def test_torch_tensors_take_the_plan_and_come_back_as_tensors(
    running: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    import gpuqueue.host.stage as host
    from tests.user_sources import TorchImages

    walks = []
    real = host.describe
    monkeypatch.setattr(
        host, "describe", lambda batch, packed=True: walks.append(1) or real(batch, packed)
    )
    with gpuqueue.prefetch(
        TorchImages(length=7), device="cpu", prefetch_depth="auto", output="torch", shard=None
    ) as batches:
        held = list(islice(batches, 21))
    assert len(walks) == 1
    for position, (images, labels) in enumerate(held):
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        assert bool((images == position % 7).all()) and bool((labels == position % 7).all())
