"""A resume from ``state_dict()`` after ``k`` batches goes on with batch ``k + 1``, on real engines.

Hugging Face's ``IterableDataset`` keeps a state of its own (restored with its
``load_state_dict``; it holds no shuffle buffer's content, so only a shard
shuffle resumes exactly); WebDataset keeps none, so its epoch is read again
from the start and what was received skipped. Each is read per sample with
``batch_size=``, shuffled and over two epochs, and the resume is taken in the
second epoch, where ``set_epoch`` has changed the order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpuqueue

pytestmark = pytest.mark.timeout(60)


def ids(batch: Any) -> list[int]:
    return [int(i) for i in np.asarray(batch["i"])]


def flat(batches: list[list[int]]) -> list[int]:
    return list(chain.from_iterable(batches))


def check_resume(make: Callable[[], Any], taken: int, **options: Any) -> list[list[int]]:
    """Reads ``make()`` whole, then ``taken`` batches, then the rest from that state."""
    with gpuqueue.prefetch(make(), None, **options) as batches:
        whole = [ids(batch) for batch in batches]
    run = gpuqueue.prefetch(make(), None, **options)
    with run as batches:
        first = [ids(batch) for batch in islice(batches, taken)]
        state = run.state_dict()  # the workers have read further ahead by now
    with gpuqueue.prefetch(make(), None, state=state, **options) as batches:
        rest = [ids(batch) for batch in batches]
    assert first + rest == whole
    return whole


def test_a_hugging_face_iterable_dataset_resumes_from_its_own_state() -> None:
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"i": list(range(48))})

    def make() -> Any:
        # Shards reshuffled each epoch. (HF's state holds no shuffle buffer's content: with
        # buffer_size > 1 its own resume loses what was in the buffer, as HF warns.)
        return table.to_iterable_dataset(num_shards=4).shuffle(seed=3, buffer_size=1)

    whole = check_resume(make, taken=15, batch_size=4, epochs=3)  # batch 3 of epoch 1
    # Each epoch is the one HF gives after set_epoch(epoch), each sample once.
    source, expected = make(), []
    for epoch in range(3):
        source.set_epoch(epoch)
        expected.append([sample["i"] for sample in source])
    assert [flat(whole[12 * e : 12 * (e + 1)]) for e in range(3)] == expected
    assert all(sorted(epoch) == list(range(48)) for epoch in expected)
    assert expected[0] != expected[2]  # (so a missing set_epoch would be seen)


def test_webdataset_resumes_by_skipping_what_was_received(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    urls = [str(tmp_path / f"shard-{shard}.tar") for shard in range(4)]
    for shard, url in enumerate(urls):
        with wds.TarWriter(url) as sink:
            for i in range(shard * 10, shard * 10 + 10):
                sink.write({"__key__": f"{i:06d}", "i.cls": i})

    def make() -> Any:
        pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
        return pipeline.map(lambda sample: {"i": sample["i.cls"]})

    whole = check_resume(make, taken=13, batch_size=4, epochs=2)  # batch 3 of epoch 1
    assert sorted(flat(whole[:10])) == sorted(flat(whole[10:])) == list(range(40))


class Closes:
    """A re-iterable source whose iterators say when they were closed."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[dict[str, int]]:
        try:
            for i in range(10**6):
                yield {"i": i}
        finally:
            self.closed.set()


def test_a_run_stopped_early_closes_the_iterator_it_made_of_the_source() -> None:
    """So a source's finally runs at stop(): HF's IterableDataset ends its prefetch threads."""
    source = Closes()
    with gpuqueue.prefetch(source, None, batch_size=4, epochs=2) as batches:
        assert ids(next(iter(batches))) == [0, 1, 2, 3]
    assert source.closed.is_set()


def test_a_generator_of_the_users_is_left_to_them() -> None:
    source = Closes()
    generator = iter(source)
    with gpuqueue.prefetch(generator, None, batch_size=4) as batches:
        next(iter(batches))
    assert not source.closed.is_set()  # theirs to close (or to go on reading)
    assert next(generator)["i"] > 0
    generator.close()
