"""Sources as users have them: plain datasets, lists, arrays, DataLoaders, notebook classes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuqueue import GeneratorEnqueuer, OrderedEnqueuer, PipelineError, prefetch
from gpuqueue.source.iterables import Epochs
from tests.conftest import received

from .seqs import twenty_batches

ROOT = Path(__file__).resolve().parent.parent


def enter(context: Any) -> None:
    with context:
        pass


class PlainDataset:
    """Has ``__len__`` and ``__getitem__``, nothing else: no gpuqueue base, no on_epoch_end."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        return np.full(2, index), np.int64(index)


@pytest.mark.parametrize("use_multiprocessing", [False, True])
def test_any_map_style_dataset_reads_epoch_after_epoch(use_multiprocessing: bool) -> None:
    with prefetch(
        PlainDataset(), None, epochs=3, workers=2, use_multiprocessing=use_multiprocessing
    ) as batches:
        assert [int(y) for _, y in batches] == [0, 1, 2] * 3


@pytest.mark.parametrize(
    "source",
    [[np.full(2, i) for i in range(3)], np.arange(6).reshape(3, 2)],
    ids=["list", "ndarray"],
)
def test_a_list_or_an_array_of_batches_is_a_sequence(source: Any) -> None:
    with prefetch(source, "cpu", epochs=2) as batches:
        got = [b.tolist() for b in batches]
    assert got == [np.asarray(source[i]).tolist() for i in range(3)] * 2


def test_on_epoch_end_is_called_when_present_and_its_error_names_the_epoch_end() -> None:
    class EndFails(PlainDataset):
        def on_epoch_end(self) -> None:
            raise RuntimeError("refresh failed")

    with prefetch(EndFails(), None, epochs=3) as batches:
        assert [int(y) for _, y in (next(batches) for _ in range(3))] == [0, 1, 2]
        with pytest.raises(RuntimeError, match=r"^refresh failed") as info:
            next(batches)
    notes = info.value.__notes__
    assert any(n.endswith("reading the end of epoch 0 (on_epoch_end)") for n in notes), notes
    assert not any("generator item" in n for n in notes), notes


def test_epochs_reiterate_an_iterable_that_starts_over() -> None:
    batches_list = [np.full(2, i) for i in range(3)]

    class Reiterable:  # iter() starts over, as a DataLoader does
        def __iter__(self) -> Any:
            return iter(batches_list)

    with prefetch(Reiterable(), None, epochs=2) as batches:
        assert [int(b[0]) for b in batches] == [0, 1, 2, 0, 1, 2]
    with prefetch(Reiterable(), None) as batches:  # epochs=None: one pass
        assert [int(b[0]) for b in batches] == [0, 1, 2]


def test_epochs_on_a_one_shot_generator_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"^epochs=2 needs a source that can be read again, but "):
        enter(prefetch(twenty_batches(), None, epochs=2))
    with pytest.raises(ValueError, match=r"^epochs must be None or a positive int, got 0$"):
        enter(prefetch(iter([1]), None, epochs=0))
    with prefetch(twenty_batches(), None, epochs=1) as batches:
        assert len(list(batches)) == 20


def test_epochs_pickle_for_a_worker_process() -> None:
    enqueuer = GeneratorEnqueuer(Epochs([np.zeros(1), np.ones(1)], 2), use_multiprocessing=True)
    with enqueuer:
        assert [float(b[0]) for b in enqueuer.get()] == [0, 1, 0, 1]


def test_a_torch_dataloader_with_its_own_workers_goes_in_as_is() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(24, dtype=torch.float32).reshape(12, 2), torch.arange(12))
    # Its own worker process (forkserver: this test process has threads), kept across epochs.
    loader = DataLoader(
        data,
        batch_size=4,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context="forkserver",
    )
    with prefetch(loader, "cpu", epochs=2, output="torch") as batches:
        got = received(batches)
    assert len(got) == 6
    assert all(isinstance(x, torch.Tensor) and x.shape == (4, 2) for x, _ in got)
    assert [y.tolist() for _, y in got[:3]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [y.tolist() for _, y in got[3:]] == [y.tolist() for _, y in got[:3]]


def test_a_dataloader_with_use_multiprocessing_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    loader = DataLoader(torch.zeros(4, 2), batch_size=2)
    with pytest.raises(PipelineError, match=r"^use_multiprocessing=True cannot take a torch Data"):
        enter(prefetch(loader, None, use_multiprocessing=True))
    with pytest.raises(PipelineError, match=r"^use_multiprocessing=True cannot take a torch Data"):
        GeneratorEnqueuer(loader, use_multiprocessing=True)


def test_a_torch_map_style_dataset_of_batches_is_a_sequence() -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import Dataset

    class Batches(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> Any:
            return torch.full((3,), index), index

    enqueuer = OrderedEnqueuer(Batches(), epochs=2, shard=None)
    with enqueuer:
        assert [y for _, y in enqueuer.get()] == [0, 1, 0, 1]


def test_a_class_defined_in_a_function_reaches_worker_processes_by_value() -> None:
    class Local:  # the standard pickler cannot find it by name
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> Any:
            return np.full(2, index)

    with prefetch(Local(), None, epochs=1, use_multiprocessing=True) as batches:
        assert [int(b[0]) for b in batches] == [0, 1]


def test_a_class_pickled_by_value_shows_its_file_and_line_in_a_workers_traceback() -> None:
    class Local:  # pickled by value: cloudpickle would name its code <dynamic-code>
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> Any:
            raise ValueError("bad read")  # the line the traceback must show

    line = Local.__getitem__.__code__.co_firstlineno + 1
    with (
        pytest.raises(ValueError, match=r"^bad read") as raised,
        prefetch(Local(), None, epochs=1, use_multiprocessing=True) as batches,
    ):
        list(batches)
    remote = next(n for n in raised.value.__notes__ if n.startswith("traceback in the worker"))
    assert f'File "{__file__}", line {line}, in __getitem__' in remote, remote
    assert 'raise ValueError("bad read")' in remote and "<dynamic-code>" not in remote


NOTEBOOK_CODE = textwrap.dedent(
    """
    import numpy as np
    import gpuqueue

    class Data:  # typed into stdin, as into a notebook: no module to import it from
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return np.full(3, index), [index, index + 1], None

    with gpuqueue.prefetch(
        Data(), None, workers=2, epochs=2, use_multiprocessing=True
    ) as batches:
        print([(int(x[0]), y, w) for x, y, w in batches])

    def make_batches():  # a generator function typed in: one worker process runs it
        for index in range(3):
            yield {"x": np.full(2, index), "tag": f"b{index}"}

    with gpuqueue.GeneratorEnqueuer(make_batches, use_multiprocessing=True) as enqueuer:
        print([(int(b["x"][0]), b["tag"]) for b in enqueuer.get()])
    """
)


@pytest.mark.timeout(120)
def test_a_class_typed_into_stdin_works_with_processes() -> None:
    result = subprocess.run(
        [sys.executable, "-"],
        input=NOTEBOOK_CODE,
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    expected = [(i, [i, i + 1], None) for i in range(4)] * 2
    generated = [(i, f"b{i}") for i in range(3)]
    assert result.stdout.strip().splitlines() == [repr(expected), repr(generated)]


UNGUARDED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import gpuqueue

    class Data(gpuqueue.Sequence):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return np.full(3, index)

    with gpuqueue.prefetch(Data(), None, epochs=1, use_multiprocessing=True) as batches:
        print(len(list(batches)))
    """
)


@pytest.mark.timeout(120)
def test_a_missing_main_guard_is_an_error_that_says_so(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gpuqueue.errors.PipelineError: use_multiprocessing=True needs a main")
    assert 'if __name__ == "__main__":' in last
    assert "WorkerDiedError" not in result.stderr
    body = UNGUARDED_SCRIPT.split("\nwith ", 1)
    script.write_text(
        body[0] + '\nif __name__ == "__main__":\n' + textwrap.indent("with " + body[1], "    ")
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"
