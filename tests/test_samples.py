"""Per-sample sources (``batch_size=``): collation into the slot, samplers, resume, errors."""

from __future__ import annotations

import collections
import gc
import itertools
import warnings
from typing import Any

import numpy as np
import pytest

import gpuqueue.source.collate
from gpuqueue import BatchError, GeneratorEnqueuer, OrderedEnqueuer, prefetch
from tests.conftest import received

# (device, use_multiprocessing): the thread path without a slot (one stack), with a
# pinned slot, and worker processes writing into shared memory, with and without a device.
PATHS = [(None, False), ("cpu", False), (None, True), ("cpu", True)]
PATH_IDS = ["threads-host", "threads-pinned", "processes-host", "processes-pinned"]

Point = collections.namedtuple("Point", ["x", "y"])


class Samples:
    """One sample per index: a dict of an image, numbers, a string, a named tuple."""

    def __init__(self, length: int = 10, odd: dict[int, Any] | None = None) -> None:
        self.length = length
        self.odd = odd or {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if index >= self.length:
            raise IndexError(index)
        sample = {
            "image": np.full((3, 4, 4), index, dtype=np.uint8),
            "label": index,
            "weight": index / 2,
            "even": index % 2 == 0,
            "name": f"s{index}",
            "point": Point(np.float32(index), [index, -index]),
        }
        sample.update(self.odd.get(index, {}))
        return sample


def labels(batches: Any) -> list[list[int]]:
    return [np.asarray(batch["label"]).tolist() for batch in batches]


@pytest.mark.parametrize(("device", "use_multiprocessing"), PATHS, ids=PATH_IDS)
def test_samples_are_collated_by_default_collate_rules(
    device: Any, use_multiprocessing: bool
) -> None:
    with prefetch(
        Samples(10),
        device,
        batch_size=4,
        epochs=1,
        workers=2,
        use_multiprocessing=use_multiprocessing,
    ) as batches:
        got = received(batches)
    assert labels(got) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # a short last batch
    first, last = got[0], got[-1]
    assert first["image"].shape == (4, 3, 4, 4) and first["image"].dtype == np.uint8
    assert [int(first["image"][row, 0, 0, 0]) for row in range(4)] == [0, 1, 2, 3]
    assert last["image"].shape == (2, 3, 4, 4)
    # Python numbers become 1-d arrays, as torch makes them.
    assert first["label"].dtype == np.int64 and first["label"].shape == (4,)
    assert first["weight"].dtype == np.float64 and first["weight"].tolist() == [0, 0.5, 1, 1.5]
    assert first["even"].dtype == np.bool_ and first["even"].tolist() == [True, False] * 2
    assert first["name"] == ["s0", "s1", "s2", "s3"] and last["name"] == ["s8", "s9"]
    # Named tuples and lists are walked: each leaf stacked along a new first axis.
    assert isinstance(first["point"], Point)
    assert first["point"].x.dtype == np.float32 and first["point"].x.tolist() == [0, 1, 2, 3]
    assert [column.tolist() for column in first["point"].y] == [[0, 1, 2, 3], [0, -1, -2, -3]]


@pytest.mark.parametrize(("device", "use_multiprocessing"), PATHS, ids=PATH_IDS)
def test_drop_last_drops_the_short_last_batch(device: Any, use_multiprocessing: bool) -> None:
    with prefetch(
        Samples(10),
        device,
        batch_size=4,
        drop_last=True,
        epochs=2,
        use_multiprocessing=use_multiprocessing,
    ) as batches:
        assert labels(batches) == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2


@pytest.mark.parametrize(("device", "use_multiprocessing"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    ("odd", "message"),
    [
        (
            {"image": np.zeros((3, 2, 2), np.uint8)},
            r"field \['image'\] has shape \(3, 2, 2\), expected \(3, 4, 4\)",
        ),
        (
            {"image": np.zeros((3, 4, 4), np.float32)},
            r"field \['image'\] has dtype float32, expected uint8",
        ),
        ({"label": 5.0}, r"field \['label'\] is a float, expected an int"),
        ({"point": (1.0,)}, r"field \['point'\] is a tuple of 1, expected a tuple of 2 items"),
    ],
    ids=["shape", "dtype", "number-type", "structure"],
)
def test_a_sample_that_differs_is_an_error_naming_its_index_and_field(
    device: Any, use_multiprocessing: bool, odd: dict[str, Any], message: str
) -> None:
    source = Samples(10, odd={5: odd})
    with (
        pytest.raises(BatchError, match=rf"^sample 5: {message} as in the first sample;.*collate="),
        prefetch(
            source, device, batch_size=4, epochs=1, use_multiprocessing=use_multiprocessing
        ) as batches,
    ):
        for _ in batches:
            pass


def test_the_slot_is_written_row_by_row_without_a_stacked_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a slot, no stack is made: the one host copy is each sample's row write."""

    def no_stack(*args: Any) -> Any:
        raise AssertionError("a batch was stacked before its slot was written")

    monkeypatch.setattr(gpuqueue.host.stage, "default_collate", no_stack)
    with prefetch(Samples(6), "cpu", batch_size=3, epochs=1) as batches:
        assert labels(batches) == [[0, 1, 2], [3, 4, 5]]
    with (
        pytest.raises(AssertionError, match="stacked"),
        prefetch(Samples(6), None, batch_size=3, epochs=1) as batches,
    ):
        next(iter(batches))  # without a slot, one stack is the batch


@pytest.mark.parametrize(("device", "use_multiprocessing"), PATHS, ids=PATH_IDS)
def test_collate_takes_a_function_whose_batch_is_packed_as_any(
    device: Any, use_multiprocessing: bool
) -> None:
    with prefetch(
        Samples(5),
        device,
        batch_size=2,
        epochs=1,
        collate=stack_images_and_sum_labels,
        use_multiprocessing=use_multiprocessing,
    ) as batches:
        got = [(x.shape, int(y)) for x, y in batches]
    assert got == [((2, 3, 4, 4), 1), ((2, 3, 4, 4), 5), ((1, 3, 4, 4), 4)]


def stack_images_and_sum_labels(samples: list[Any]) -> Any:
    return np.stack([s["image"] for s in samples]), np.int64(sum(s["label"] for s in samples))


class Batched(Samples):
    """Reads by ``__getitems__`` only: ``__getitem__`` refuses, so one call per batch is seen."""

    calls: list[list[int]]

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.calls = []

    def __getitem__(self, index: int) -> Any:
        raise AssertionError("__getitem__ called though __getitems__ exists")

    def __getitems__(self, indices: list[int]) -> list[Any]:
        self.calls.append(list(indices))
        return [Samples.__getitem__(self, index) for index in indices]


def test_getitems_is_called_once_per_batch() -> None:
    dataset = Batched(7)
    with prefetch(dataset, "cpu", batch_size=3, epochs=1, workers=2) as batches:
        assert labels(batches) == [[0, 1, 2], [3, 4, 5], [6]]
    assert sorted(dataset.calls) == [[0, 1, 2], [3, 4, 5], [6]]


def test_getitems_returning_too_few_samples_is_an_error() -> None:
    class Short(Batched):
        def __getitems__(self, indices: list[int]) -> list[Any]:
            return super().__getitems__(indices)[:-1]

    with (
        pytest.raises(BatchError, match=r"^Short.__getitems__ returned 2 samples for 3 indices"),
        prefetch(Short(6), None, batch_size=3, epochs=1) as batches,
    ):
        list(batches)


def epoch_labels(got: list[list[int]], per_epoch: int) -> list[list[int]]:
    flat = [label for batch in got for label in batch]
    return [flat[i : i + per_epoch] for i in range(0, len(flat), per_epoch)]


@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "processes"])
def test_shuffle_reads_every_sample_once_per_epoch_in_a_seeded_order(
    use_multiprocessing: bool,
) -> None:
    def run() -> list[list[int]]:
        with prefetch(
            Samples(10),
            "cpu",
            batch_size=4,
            shuffle=True,
            seed=3,
            epochs=3,
            workers=2,
            use_multiprocessing=use_multiprocessing,
        ) as batches:
            return labels(batches)

    got = run()
    assert [len(batch) for batch in got] == [4, 4, 2] * 3
    epochs = epoch_labels(got, 10)
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch its own permutation
    assert run() == got  # the same seed, the same order


@pytest.mark.parametrize(
    ("drop_last", "per_rank"), [(False, 5), (True, 4)], ids=["pad", "drop_last"]
)
def test_two_ranks_read_equal_samples_and_together_every_one(
    drop_last: bool, per_rank: int
) -> None:
    ranks = []
    for rank in range(2):
        with prefetch(
            Samples(10),
            None,
            batch_size=4,
            shuffle=True,
            seed=1,
            shard=(rank, 2),
            drop_last=drop_last,
            epochs=1,
        ) as batches:
            ranks.append([label for batch in labels(batches) for label in batch])
    assert [len(samples) for samples in ranks] == [per_rank, per_rank]
    union = set(ranks[0]) | set(ranks[1])
    if drop_last:  # 10 // (2 ranks x 4) x 4 per rank: the tail of 2 is dropped
        assert len(union) == 8 and not set(ranks[0]) & set(ranks[1])
    else:  # padded by wrapping around: every sample, one read twice
        assert union == set(range(10))


@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "processes"])
def test_state_dict_resumes_mid_epoch_with_exactly_the_next_batch(
    use_multiprocessing: bool,
) -> None:
    def enqueuer(batch_size: int = 3) -> OrderedEnqueuer:
        return OrderedEnqueuer(
            Samples(10),
            use_multiprocessing,
            shuffle=True,
            seed=7,
            epochs=2,
            shard=None,
            batch_size=batch_size,
        )

    whole = enqueuer()
    with whole:
        expected = labels(whole.get())
    first = enqueuer()
    first.start(workers=2)
    taken = []
    for batch in first.get():
        taken.append(np.asarray(batch["label"]).tolist())
        if len(taken) == 2:
            break
    state = first.state_dict()
    first.stop()
    assert state["epoch"] == 0 and state["sample"] == 6
    resumed = enqueuer()
    resumed.load_state_dict(state)
    with resumed:
        rest = labels(resumed.get())
    assert taken + rest == expected
    # At sample granularity: another batch size continues with the same samples.
    other = enqueuer(batch_size=4)
    other.load_state_dict(state)
    with other:
        flat = [label for batch in labels(other.get()) for label in batch]
    assert flat == [label for batch in rest for label in batch]


class EpochSampler:
    """A sampler with ``set_epoch``, as torch's DistributedSampler: reverses odd epochs."""

    def __init__(self, length: int) -> None:
        self.length, self.epochs = length, []  # type: ignore[var-annotated]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)
        self.epoch = epoch

    def __iter__(self) -> Any:
        order = list(range(self.length))
        return iter(order[::-1] if self.epoch % 2 else order)


def test_a_sampler_is_iterated_each_epoch_after_set_epoch() -> None:
    sampler = EpochSampler(5)
    with prefetch(Samples(5), None, batch_size=2, sampler=sampler, epochs=2) as batches:
        assert labels(batches) == [[0, 1], [2, 3], [4], [4, 3], [2, 1], [0]]
    assert sampler.epochs == [0, 1]
    with prefetch(Samples(5), None, batch_size=3, sampler=[4, 0, 2], epochs=1) as batches:
        assert labels(batches) == [[4, 0, 2]]


def test_a_batch_sampler_gives_variable_batches() -> None:
    buckets = [[0], [1, 2, 3], [4, 5]]
    with prefetch(Samples(6), "cpu", batch_sampler=buckets, epochs=2) as batches:
        assert labels(batches) == buckets * 2


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"batch_sampler": [[0]], "batch_size": 2}, r"^batch_sampler= decides every batch"),
        ({"batch_sampler": [[0]], "shuffle": True}, r"^batch_sampler= .* no shuffle="),
        ({"batch_size": 2, "sampler": [0], "shuffle": True}, r"^sampler= decides the order"),
        ({"sampler": [0, 1]}, r"^sampler= read the source's items as samples, and need batch_"),
        ({"batch_size": 0}, r"^batch_size must be a positive int, got 0"),
    ],
)
def test_per_sample_keywords_that_contradict_are_clear_errors(
    keywords: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        OrderedEnqueuer(Samples(4), **keywords)


def test_a_one_shot_sampler_is_refused() -> None:
    with pytest.raises(TypeError, match=r"^sampler= must be re-iterable"):
        OrderedEnqueuer(Samples(4), batch_size=2, sampler=iter([0, 1]))


def make_samples() -> Any:
    return ((np.full(2, i, np.float32), i) for i in range(7))


@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "processes"])
def test_an_iterable_of_samples_is_batched(use_multiprocessing: bool) -> None:
    source = make_samples if use_multiprocessing else make_samples()
    enqueuer = GeneratorEnqueuer(source, use_multiprocessing, batch_size=3, device="cpu")
    with enqueuer:
        got = [(x.shape, y.tolist()) for x, y in enqueuer.get()]
    assert got == [((3, 2), [0, 1, 2]), ((3, 2), [3, 4, 5]), ((1, 2), [6])]
    with prefetch(
        [(np.zeros(1), i) for i in range(5)], None, batch_size=2, drop_last=True, epochs=2
    ) as batches:
        assert [y.tolist() for _, y in batches] == [[0, 1], [2, 3]] * 2


def test_tensors_stack_into_tensors_on_the_host_path() -> None:
    torch = pytest.importorskip("torch")
    samples = [(torch.full((2,), i), torch.tensor(i, dtype=torch.bfloat16)) for i in range(4)]
    with prefetch(samples, None, batch_size=4) as batches:
        (x, y) = next(iter(batches))
    assert isinstance(x, torch.Tensor) and x.tolist() == [[i, i] for i in range(4)]
    assert y.dtype == torch.bfloat16 and y.tolist() == [0, 1, 2, 3]


def test_a_torch_dataset_without_batch_size_warns_once_at_the_users_line() -> None:
    torch = pytest.importorskip("torch")

    class PerSample(torch.utils.data.Dataset):  # type: ignore[type-arg,misc]
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> Any:
            return torch.zeros(3), index

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OrderedEnqueuer(PerSample(), shard=None)
        with prefetch(PerSample(), None, epochs=1):
            pass
        with prefetch(PerSample(), None, batch_size=2, epochs=1):
            pass
    mine = [w for w in caught if "batch_size=" in str(w.message)]
    assert len(mine) == 2, [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in mine), [w.filename for w in mine]
    assert str(mine[0].message).startswith("PerSample is a torch Dataset, which usually gives")


def test_a_dataloader_with_its_own_keywords_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(torch.zeros(4, 2), batch_size=2)
    for keywords in ({"batch_size": 2}, {"shuffle": True}, {"workers": 4}):
        name = next(iter(keywords))
        with (
            pytest.raises(ValueError, match=rf"^{name}=.*: a DataLoader batches, shuffles"),
            prefetch(loader, None, **keywords),
        ):
            pass


class OneSamplePerIndex:
    """Not a torch Dataset, but per-sample: an image and a lone label per index."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        return np.zeros((3, 4, 4), np.uint8), index


def test_a_first_item_that_looks_like_one_sample_warns_naming_batch_size() -> None:
    warned = r"looks like one sample.*field \[1\].*batch_size="
    with (
        pytest.warns(UserWarning, match=warned) as got,
        prefetch(OneSamplePerIndex(), None, epochs=2, workers=2) as batches,
    ):
        assert len(list(batches)) == 6
    assert len([w for w in got if "looks like one sample" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batches of samples, and real batches: no warning
        with prefetch(OneSamplePerIndex(), None, batch_size=3, epochs=1) as batches:
            assert labels_of(batches) == [[0, 1, 2]]
        with prefetch([(np.zeros((2, 3)), np.arange(2))] * 2, None, epochs=1) as batches:
            assert len(list(batches)) == 2


def labels_of(batches: Any) -> list[list[int]]:
    return [y.tolist() for _, y in batches]


class EpochStream:
    """A re-iterable of samples with ``set_epoch``, as a torch or HF IterableDataset."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self) -> Any:
        return iter([(np.zeros(2), i) for i in range(5)])


def test_an_iterable_of_samples_gets_set_epoch_and_resumes_after_the_last_batch_received() -> None:
    stream = EpochStream()
    with prefetch(stream, None, batch_size=2, epochs=2) as batches:
        assert labels_of(batches) == [[0, 1], [2, 3], [4]] * 2
    assert stream.epochs == [0, 1]
    run = prefetch(EpochStream(), None, batch_size=2, epochs=2)
    with run as batches:
        taken = [y.tolist() for _, y in itertools.islice(batches, 4)]
    assert taken == [[0, 1], [2, 3], [4], [0, 1]]
    with prefetch(EpochStream(), None, batch_size=2, epochs=2, state=run.state_dict()) as batches:
        assert labels_of(batches) == [[2, 3], [4]]


def test_a_finished_run_started_again_reads_every_sample_again() -> None:
    enqueuer = OrderedEnqueuer(Samples(5), shard=None, epochs=1, batch_size=2)
    for _ in range(2):
        with enqueuer:
            assert labels(enqueuer.get()) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "processes"])
def test_rows_written_into_slots_reach_the_strict_cuda_double_intact(
    strict_cuda: Any, use_multiprocessing: bool
) -> None:
    """The CUDA path: pinned (or registered shared) slots written row by row, one copy each."""
    stream = strict_cuda.default_stream(0)
    got = []
    with prefetch(
        Samples(6),
        0,
        batch_size=4,
        epochs=1,
        workers=2,
        use_multiprocessing=use_multiprocessing,
        shard=None,
    ) as batches:
        for batch in batches:
            images = strict_cuda.read(batch["image"], stream)
            labels = strict_cuda.read(batch["label"], stream)
            assert (images == labels[:, None, None, None].astype(np.uint8)).all()
            got.append((labels.tolist(), batch["name"]))
            del batch
    assert got == [([0, 1, 2, 3], ["s0", "s1", "s2", "s3"]), ([4, 5], ["s4", "s5"])]
    gc.collect()
    assert strict_cuda.violations == []
