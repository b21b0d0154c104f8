"""Per-sample sources as users have them, installed for real: a torch ``Dataset``, a Hugging
Face ``datasets.Dataset`` (``with_format("numpy")``) and an iterable of samples.

Each gives correct batches with ``batch_size=``, and every sample exactly once
per epoch: shuffled, sharded over 2 ranks, and resumed mid-epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpuqueue import OrderedEnqueuer, prefetch

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from tests.user_sources import TorchSamples  # noqa: E402  (imports torch)

# datasets shows progress bars through tqdm, whose monitor thread would outlive a test.
datasets.disable_progress_bars()
pytest.importorskip("tqdm").tqdm.monitor_interval = 0

LENGTH = 20


def hf_dataset() -> Any:
    features = datasets.Features(
        {"image": datasets.Array3D((3, 8, 8), "uint8"), "label": datasets.Value("int64")}
    )
    images = np.stack([np.full((3, 8, 8), i, np.uint8) for i in range(LENGTH)])
    data = {"image": images, "label": np.arange(LENGTH)}
    return datasets.Dataset.from_dict(data, features=features).with_format("numpy")


SOURCES = {"torch": TorchSamples, "hf": hf_dataset}


def unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, dict):  # a datasets.Dataset gives dicts
        return batch["image"], batch["label"]
    return batch


def check_batch(batch: Any) -> list[int]:
    """The batch's labels, after checking each image row is its sample's."""
    images, labels = unpack(batch)
    images, labels = np.asarray(images), np.asarray(labels)
    # (datasets 5 gives an Array3D of uint8 back as int64 with the numpy format.)
    assert images.dtype in (np.uint8, np.int64) and images.shape[1:] == (3, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (images.shape[0],)
    assert (images == labels[:, None, None, None]).all()
    return labels.tolist()  # type: ignore[no-any-return]


def samples_of(batches: Any) -> list[int]:
    return [label for batch in batches for label in check_batch(batch)]


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "processes"])
def test_every_sample_once_per_shuffled_epoch(kind: str, use_multiprocessing: bool) -> None:
    with prefetch(
        SOURCES[kind](),
        "cpu",
        batch_size=6,
        shuffle=True,
        seed=0,
        epochs=2,
        workers=2,
        use_multiprocessing=use_multiprocessing,
    ) as batches:
        got = [check_batch(batch) for batch in batches]
    assert [len(batch) for batch in got] == [6, 6, 6, 2] * 2
    flat = [label for batch in got for label in batch]
    first, second = flat[:LENGTH], flat[LENGTH:]
    assert sorted(first) == sorted(second) == list(range(LENGTH))
    assert first != second and first != list(range(LENGTH))


@pytest.mark.parametrize("kind", SOURCES)
def test_two_ranks_split_every_sample_once(kind: str) -> None:
    ranks = []
    for rank in range(2):
        with prefetch(
            SOURCES[kind](), None, batch_size=4, shuffle=True, seed=5, shard=(rank, 2), epochs=1
        ) as batches:
            ranks.append(samples_of(batches))
    assert [len(part) for part in ranks] == [10, 10]
    assert sorted(ranks[0] + ranks[1]) == list(range(LENGTH))


@pytest.mark.parametrize("kind", SOURCES)
def test_a_resume_mid_epoch_continues_with_the_next_batch(kind: str) -> None:
    def enqueuer() -> OrderedEnqueuer:
        return OrderedEnqueuer(
            SOURCES[kind](), shuffle=True, seed=2, shard=None, epochs=1, batch_size=4, device="cpu"
        )

    first = enqueuer()
    first.start(workers=2)
    taken: list[int] = []
    for batch in first.get():
        taken += check_batch(batch)
        if len(taken) == 8:
            break
    state = first.state_dict()
    first.stop()
    resumed = enqueuer()
    resumed.load_state_dict(state)
    with resumed:
        rest = samples_of(resumed.get())
    assert len(rest) == LENGTH - 8
    assert sorted(taken + rest) == list(range(LENGTH))


def test_an_iterable_of_samples_gives_every_sample_once() -> None:
    stream = Stream()
    with prefetch(stream, "cpu", batch_size=6, epochs=2, output="torch") as batches:
        got = [(tuple(x.shape), y.tolist()) for x, y in batches]
    assert [shape for shape, _ in got] == ([(6, 3, 8, 8)] * 3 + [(2, 3, 8, 8)]) * 2
    flat = [label for _, labels in got for label in labels]
    assert flat == list(range(LENGTH)) * 2


class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg,misc]
    """A per-sample IterableDataset: read again from its start each epoch."""

    def __iter__(self) -> Any:
        return iter(TorchSamples()[i] for i in range(LENGTH))


def test_a_distributed_sampler_splits_itself_and_is_not_split_again() -> None:
    ranks = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(
            TorchSamples(), num_replicas=2, rank=rank, shuffle=True, seed=4
        )
        with prefetch(
            TorchSamples(), None, batch_size=4, sampler=sampler, shard=(rank, 2), epochs=2
        ) as batches:
            got = samples_of(batches)
        assert len(got) == 2 * LENGTH // 2  # two epochs of this rank's half, not a quarter
        sampler.set_epoch(0)
        assert got[: LENGTH // 2] == list(sampler)  # epoch 0 is the sampler's own order
        ranks.append(got)
    for epoch in range(2):
        part = slice(epoch * LENGTH // 2, (epoch + 1) * LENGTH // 2)
        assert sorted(ranks[0][part] + ranks[1][part]) == list(range(LENGTH))
    assert ranks[0][:10] != ranks[0][10:]  # set_epoch(1) reshuffled the second epoch
