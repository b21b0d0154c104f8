"""A Keras 3 ``PyDataset`` at module level, so that worker processes unpickle it by name.

Importing this module imports Keras (on PyTorch unless ``KERAS_BACKEND`` says
otherwise), as a user's training script does: ``bench/startup.py`` times how
long worker processes then take to deliver a first batch.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # (after the backend is chosen)
import numpy as np


class KerasBatches(keras.utils.PyDataset):  # type: ignore[misc, unused-ignore]
    """Small float32 batches: what is timed is starting the loader, not reading."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> Any:
        return np.full((8, 4), index, np.float32), np.zeros(8, np.float32)
