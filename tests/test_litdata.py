"""litdata as users run it: a ``StreamingDataset`` of an optimized local dataset, read per
sample through ``prefetch(..., batch_size=)`` and as litdata's own ``StreamingDataLoader``.

Every sample once per epoch, reshuffled each epoch, and a resume from the handle's
``state_dict()`` taken after k batches continues with batch k + 1. litdata is installed
with ``--no-deps`` on the CPU torch (``.ci/run``); these tests skip without it.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from gpuqueue import prefetch

litdata = pytest.importorskip("litdata")
pytestmark = pytest.mark.engine  # litdata.optimize in a process: left out of CI's CuPy stage

LENGTH = 50

# litdata.optimize as its README writes it: a function from an input to a sample. Run in
# a process of its own: its multiprocessing queues keep feeder threads alive afterwards,
# which this process's thread-leak check would (rightly) report.
OPTIMIZE = """
import sys

import numpy as np
import litdata


def sample(index):
    return {"x": np.full(3, index, np.float32), "y": index}


if __name__ == "__main__":
    litdata.optimize(
        fn=sample, inputs=list(range(int(sys.argv[2]))), output_dir=sys.argv[1],
        chunk_size=8, num_workers=1, start_method="fork", verbose=False,
    )
"""


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local litdata dataset of 50 samples ``{"x": [i, i, i], "y": i}``, in chunks of 8."""
    folder = tmp_path_factory.mktemp("litdata")
    script = folder / "optimize.py"
    script.write_text(OPTIMIZE, encoding="utf-8")
    output = folder / "optimized"
    command = [sys.executable, str(script), str(output), str(LENGTH)]
    subprocess.run(command, check=True, capture_output=True, timeout=50)
    return str(output)


def labels(batch: Any) -> list[int]:
    """The batch's labels, after checking each row of ``x`` is its sample's."""
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    assert x.dtype == np.float32 and x.shape == (len(y), 3)
    assert (x == y[:, None]).all()
    return [int(label) for label in y]


def dataset(folder: str) -> Any:
    return litdata.StreamingDataset(folder, shuffle=True, seed=3)


@pytest.mark.timeout(60)
def test_a_streaming_dataset_read_per_sample_gives_every_sample_once_per_epoch(
    optimized: str,
) -> None:
    with prefetch(dataset(optimized), device="cpu", batch_size=8, epochs=2) as batches:
        read = [labels(batch) for batch in batches]
    assert [len(batch) for batch in read] == [8] * 6 + [2] + [8] * 6 + [2]
    first = [label for batch in read[:7] for label in batch]
    second = [label for batch in read[7:] for label in batch]
    assert sorted(first) == sorted(second) == list(range(LENGTH))
    assert first != second  # set_epoch: reshuffled


@pytest.mark.timeout(60)
def test_a_streaming_dataset_resumes_with_the_batch_after_the_last_received(
    optimized: str,
) -> None:
    with prefetch(dataset(optimized), device=None, batch_size=5, epochs=2) as batches:
        whole = [labels(batch) for batch in batches]
    run = prefetch(dataset(optimized), device=None, batch_size=5, epochs=2, workers=2)
    with run as batches:
        taken = [labels(batch) for _, batch in zip(range(3), batches, strict=False)]
        state = run.state_dict()
    with prefetch(dataset(optimized), device=None, batch_size=5, epochs=2, state=state) as rest:
        resumed = [labels(batch) for batch in rest]
    # litdata's own state, told the 15 samples taken: its resume starts at the 16th.
    assert (state["epoch"], state["position"]) == (0, 3)
    assert state["source"]["num_samples_yielded"] == 15
    assert taken == whole[:3]
    assert resumed == whole[3:]


@pytest.mark.timeout(60)
def test_a_streaming_dataloader_every_sample_once_per_epoch_and_resumed_by_its_own_state(
    optimized: str,
) -> None:
    """litdata's loader batches and counts itself (``state_dict()`` with no arguments)."""

    def loader() -> Any:
        return litdata.StreamingDataLoader(dataset(optimized), batch_size=5)

    with prefetch(loader(), device="cpu", epochs=2) as batches:
        whole = [labels(batch) for batch in batches]
    assert [len(batch) for batch in whole] == [5] * 20
    epochs = [[label for batch in whole[e * 10 : e * 10 + 10] for label in batch] for e in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(LENGTH))
    assert epochs[0] != epochs[1]  # the loader's own epoch count reshuffles
    run = prefetch(loader(), device=None, epochs=2)
    with run as batches:
        taken = [labels(batch) for _, batch in zip(range(13), batches, strict=False)]
        state = run.state_dict()
    assert state["source"]["num_samples_yielded"] == 15  # batch 3 of epoch 1 (counted from 0)
    with prefetch(loader(), device=None, epochs=2, state=state) as rest:
        resumed = [labels(batch) for batch in rest]
    assert taken == whole[:13]
    assert resumed == whole[13:]
