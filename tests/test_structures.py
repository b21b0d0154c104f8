"""Structures real collates make (issue 26, faults 2 and 3).

With ``device=None`` a batch's leaves come back as the source made them,
lists included, and its structure may change where nothing needs one
layout for every batch: a list's length, ragged token lists, the short last
batch of ``tuple(zip(*samples))``. On a device each batch is laid out for
itself, so that last batch works too; a list of numbers that cannot be one
array (ragged, or empty where the first batch had numbers) is a
``BatchError`` naming the field. Worker processes run in a fresh interpreter.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest

from gpuqueue import BatchError, OrderedEnqueuer
from tests import seqs
from tests.test_faults_hostile import run_script


def plain(value: Any) -> Any:
    """``value`` as JSON keeps it, with each leaf's type: what "as the source made it" means."""
    if isinstance(value, dict):
        return {"dict": {str(k): plain(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [plain(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"ndarray": [str(value.dtype), list(value.shape), value.tolist()]}
    return {type(value).__name__: value}


_RUN = """
import json
import re
from gpuqueue import OrderedEnqueuer
from tests import seqs
from tests.test_structures import plain

if __name__ == "__main__":
    enqueuer = OrderedEnqueuer(
        seqs.{name}(), use_multiprocessing=True, device={device!r}, shard=None, epochs=1
    )
    try:
        with enqueuer:
            print(json.dumps([plain(batch) for batch in enqueuer.get()]))
    except Exception as error:
        print(json.dumps({{"error": type(error).__name__, "message": str(error)}}))
"""


def received(name: str, processes: bool, device: Any = None) -> Any:
    """Every batch of ``seqs.<name>`` as ``plain`` has it, read by threads or by processes
    (in a fresh interpreter); or the error's type and message."""
    if processes:
        done = run_script(_RUN.format(name=name, device=device), timeout=90)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    enqueuer = OrderedEnqueuer(getattr(seqs, name)(), device=device, shard=None, epochs=1)
    try:
        with enqueuer:
            return json.loads(json.dumps([plain(batch) for batch in enqueuer.get()]))
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}


def source(name: str) -> Any:
    sequence = getattr(seqs, name)()
    return json.loads(json.dumps([plain(sequence[i]) for i in range(len(sequence))]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
@pytest.mark.parametrize("name", ["TokenLists", "DetectionBatches", "NegativesSometimesEmpty"])
def test_without_a_device_every_batch_comes_back_as_the_source_made_it(
    name: str, processes: bool
) -> None:
    """Regression: ragged token lists raised NumPy's "inhomogeneous shape" naming no field;
    ``[]`` then ``[i, i + 5]`` was "an array, expected a list"; the detection collate's
    short last batch was "field [0] has 2 items, expected 4"; from a process, ``[True, 1,
    3.5]`` came back as ``[1.0, 1.0, 3.5]``."""
    assert received(name, processes) == source(name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_on_a_device_the_short_last_batch_of_a_tuple_of_samples_works(processes: bool) -> None:
    """Regression: "field [0] has 2 items, expected 4" at the end of every epoch."""
    got = received("DetectionBatches", processes, device="cpu")
    assert got == source("DetectionBatches")


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_on_a_device_ragged_token_lists_are_a_batch_error_naming_the_field(
    processes: bool,
) -> None:
    got = received("TokenLists", processes, device="cpu")
    assert got["error"] == "BatchError", got
    assert re.match(
        r"^field \['tokens'\] is a list of numbers whose lists differ in length, which "
        r"cannot be one array on a device",
        got["message"],
    ), got["message"]


@pytest.mark.parametrize(
    ("empty_first", "seen"),
    [
        (False, "is an empty list, where the first batch had a list of numbers"),
        (True, "is a list of numbers, where the first batch had an empty list"),
    ],
)
def test_on_a_device_a_list_of_numbers_that_turns_empty_is_a_batch_error_naming_it(
    empty_first: bool, seen: str
) -> None:
    """Regression: "field ['hard_negatives'] is an array, expected a list"."""
    sequence = seqs.NegativesSometimesEmpty(empty_first=empty_first)
    enqueuer = OrderedEnqueuer(sequence, device="cpu", shard=None)
    with enqueuer, pytest.raises(BatchError) as info:
        list(zip(range(4), enqueuer.get(), strict=False))
    assert re.match(
        r"^batch index 1 \(epoch 0, position 1\): structure differs from the first batch: "
        rf"field \[1\]\['hard_negatives'\] {seen}: on a device a list of numbers is one "
        r"array, and an empty list gives it no dtype",
        str(info.value),
    ), str(info.value)
