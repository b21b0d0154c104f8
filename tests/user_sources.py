"""Sources as users write them, for worker processes (module level, so they unpickle by name).

Importing this module imports torch; the Keras source lives in the script
that uses it, since Keras needs its backend chosen before it is imported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.data


class TorchImages(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A torch Dataset of whole batches: uint8 images and int64 labels, each filled with i."""

    def __init__(self, length: int = 5, shape: tuple[int, ...] = (4, 3, 32, 32)) -> None:
        self.length = length
        self.shape = shape

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        images = torch.full(self.shape, index, dtype=torch.uint8)
        labels = torch.full((self.shape[0],), index, dtype=torch.int64)
        return images, labels


class TorchSamples(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A per-sample torch Dataset, as most are: a uint8 3x8x8 image filled with i, label i."""

    def __init__(self, length: int = 20) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return torch.full((3, 8, 8), index % 256, dtype=torch.uint8), index
