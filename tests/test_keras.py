"""``model.fit`` as a Keras user gets there: Keras 3 (torch and JAX backends) and tf_keras.

Each case runs in its own interpreter: Keras 3 fixes its backend
(``KERAS_BACKEND``) at import, and that choice must not leak into other
tests. A case skips where its Keras (or backend) is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROLOGUE = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import gpuqueue

    class Data(gpuqueue.Sequence):  # from tf_keras.utils import Sequence, swapped
        def __init__(self):
            self.epochs_ended = 0
            rng = np.random.default_rng(0)
            self.x = rng.normal(size=(64, 4)).astype("float32")
            self.y = self.x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")

        def __len__(self):
            return 8

        def __getitem__(self, index):
            rows = slice(index * 8, index * 8 + 8)
            return self.x[rows], self.y[rows]

        def on_epoch_end(self):
            self.epochs_ended += 1
    """
)

FIT = textwrap.dedent(
    """
    def model():
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        net.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        return net

    seq = Data()
    losses = {}

    # 1. gpuqueue reads (threads here; processes work the same): the short form.
    enqueuer = gpuqueue.OrderedEnqueuer(seq, use_multiprocessing=False, shuffle=True, seed=0)
    enqueuer.start(workers=2, max_queue_size=10)
    history = model().fit(enqueuer.get(), steps_per_epoch=len(seq), epochs=3, verbose=0)
    enqueuer.stop()
    losses["enqueuer"] = history.history["loss"]

    # 2. The same with prefetch(), host batches as Keras takes them.
    with gpuqueue.prefetch(seq, device=None, workers=2, epochs=3) as batches:
        history = model().fit(batches, steps_per_epoch=len(seq), epochs=3, verbose=0)
    losses["prefetch"] = history.history["loss"]

    # 3. Keras reads the Sequence itself, through its own dataset class.
    ended_before = seq.epochs_ended
    history = model().fit(gpuqueue.keras_dataset(seq, keras=FLAVOR), epochs=3, verbose=0)
    losses["keras_dataset"] = history.history["loss"]
    losses["on_epoch_end_calls"] = seq.epochs_ended - ended_before

    # 4. Keras's own dataset class goes into gpuqueue as it is, threads and processes
    # (the class is defined in this -c script: it reaches the processes by value).
    BASE = keras.utils.PyDataset if FLAVOR == "keras" else keras.utils.Sequence

    class KerasData(BASE):
        def __init__(self):
            super().__init__()
            self.inner = Data()

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, index):
            return self.inner[index]

    for processes in (False, True):
        with gpuqueue.prefetch(
            KerasData(), device=None, workers=2, epochs=2, use_multiprocessing=processes
        ) as batches:
            losses[f"keras_class_batches_{processes}"] = sum(1 for _ in batches)

    # 5. The import swap alone: Keras refuses the object; what it says.
    try:
        model().fit(seq, epochs=1, verbose=0)
        losses["plain_fit"] = "accepted"
    except Exception as error:
        losses["plain_fit"] = type(error).__name__
    print(json.dumps(losses))
    """
)


def _run(flavor: str, backend: str | None) -> dict[str, object]:
    if flavor == "keras":
        header = "import keras\nFLAVOR = 'keras'\n"
    else:
        header = "import tf_keras as keras\nFLAVOR = 'tf_keras'\n"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    result = subprocess.run(
        [sys.executable, "-c", PROLOGUE + header + FIT],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _check(losses: dict[str, object]) -> None:
    for how in ("enqueuer", "prefetch", "keras_dataset"):
        curve = losses[how]
        assert isinstance(curve, list) and len(curve) == 3, (how, curve)
        assert curve[-1] < curve[0], (how, curve)  # it trained
    assert losses["on_epoch_end_calls"] >= 3  # Keras 3 calls it once more
    assert losses["plain_fit"] == "ValueError"  # Keras's own refusal, documented in README
    assert losses["keras_class_batches_False"] == losses["keras_class_batches_True"] == 16


def _needs(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


@pytest.mark.engine
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_keras3_fit_on_gpuqueue_batches_and_keras_dataset(backend: str) -> None:
    _needs("keras", backend)
    if int(importlib.metadata.version("keras").split(".")[0]) < 3:  # no import: no backend
        pytest.skip("Keras 2 is installed; tf_keras covers it")
    _check(_run("keras", backend))


@pytest.mark.timeout(300)
def test_tf_keras_fit_on_gpuqueue_batches_and_keras_dataset() -> None:
    _needs("tf_keras")
    _check(_run("tf_keras", None))
