"""Worker start: time to the first batch with 2 processes, after importing torch and Keras.

Run in a fresh interpreter per round (``bench.loaders``' ``startup`` case), as
a training script is: it imports torch and Keras (or, with ``keras=False``,
torch alone, for a quick check of the harness), then times, in this order,
``DataLoader(num_workers=2)``'s first batch (its workers fork this process),
gpuqueue's first run with 2 worker processes (its forkserver starts and
imports the script's libraries once, ``gpuqueue/host/forkserver.py``), and a
second run in the same interpreter (the server is up: the workers fork from
it). gpuqueue's times are ``stats()["startup_s"]``: from ``start()`` to the
first batch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import gpuqueue


class TorchBatches(gpuqueue.Sequence):
    """The batches of ``KerasBatches``, for a run without Keras."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> Any:
        return np.full((8, 4), index, np.float32), np.zeros(8, np.float32)


def _dataloader_first_batch(source: Any) -> float:
    from torch.utils.data import DataLoader

    began = time.perf_counter()
    loader = DataLoader(source, batch_size=None, num_workers=2)
    batches = iter(loader)
    next(batches)
    seconds = time.perf_counter() - began
    del batches  # ends its workers
    return seconds


def _gpuqueue_first_batch(source: Any) -> float:
    enqueuer = gpuqueue.OrderedEnqueuer(source, use_multiprocessing=True, shard=None)
    enqueuer.start(workers=2, max_queue_size=4)
    try:
        next(iter(enqueuer.get()))
        startup = enqueuer.stats()["startup_s"]
    finally:
        enqueuer.stop()
    return float(startup)


def measure(keras: bool) -> dict[str, Any]:
    """The three times, in seconds, with what the script had imported."""
    began = time.perf_counter()
    import torch.utils.data  # noqa: F401  (what the script imported)

    if keras:
        from bench.keras_batches import KerasBatches

        source: Any = KerasBatches()
    else:
        source = TorchBatches()
    imports_s = time.perf_counter() - began
    return {
        "imported": "torch, keras" if keras else "torch",
        "imports_s": imports_s,
        "dataloader2_s": _dataloader_first_batch(source),
        "gpuqueue_first_s": _gpuqueue_first_batch(source),
        "gpuqueue_again_s": _gpuqueue_first_batch(source),
    }
