"""Sequences shared by the tests; module level so worker processes can unpickle them."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import Any

import numpy as np

import gpuqueue


class Numbered(gpuqueue.Sequence):
    """Batch i is ``(x, {"index": i})`` with x filled with i (plus an epoch offset)."""

    def __init__(self, length: int = 6, shape: tuple[int, ...] = (2, 3)) -> None:
        self.length = length
        self.shape = shape
        self.offset = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return (np.full(self.shape, index + self.offset, np.float32), {"index": np.int64(index)})


class ShiftsEachEpoch(Numbered):
    """on_epoch_end changes what later reads return: processes must see it."""

    def on_epoch_end(self) -> None:
        self.offset += 100


class FailsAt(Numbered):
    def __init__(self, bad_index: int, length: int = 6) -> None:
        super().__init__(length)
        self.bad_index = bad_index

    def __getitem__(self, index: int) -> Any:
        if index == self.bad_index:
            raise KeyError(f"cannot read {index}")
        return super().__getitem__(index)


class DiesAt(Numbered):
    """The worker process reading ``bad_index`` kills itself with ``how``."""

    def __init__(self, bad_index: int, how: str, length: int = 6) -> None:
        super().__init__(length)
        self.bad_index = bad_index
        self.how = how

    def __getitem__(self, index: int) -> Any:
        if index == self.bad_index:
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                ctypes.string_at(0)  # segfault
        return super().__getitem__(index)


class Growing(gpuqueue.Sequence):
    """Batches get larger along the first axis, so slots must grow."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> Any:
        return np.arange((index + 1) * 1000, dtype=np.int32)


def twenty_batches() -> Any:
    """A generator function (for a worker process): 20 numbered batches."""
    for i in range(20):
        yield (np.full((2, 3), i, np.float32), {"index": np.int64(i)})


def fails_at_three() -> Any:
    for i in range(10):
        if i == 3:
            raise KeyError(f"cannot make item {i}")
        yield (np.full((2, 3), i, np.float32), {"index": np.int64(i)})


def dies_at_three() -> Any:
    for i in range(10):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        yield (np.full((2, 3), i, np.float32), {"index": np.int64(i)})


def random_batches() -> Any:
    """Draws from NumPy's global state, which random_seed seeds in the process."""
    for _ in range(5):
        yield np.random.random(3)


class EightMiB(gpuqueue.Sequence):
    """16 batches of 8 MiB each (one float64 array filled with its index)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> Any:
        return np.full(1 << 20, index, np.float64)


class KerasLoose(gpuqueue.Sequence):
    """As Keras users write batches: ``(x, [labels], None)``, and a short last batch."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        rows = 2 if index == 2 else 4
        return np.full((rows, 2), index, np.float32), list(range(rows)), None


class MixedLeaves:
    """Not a gpuqueue.Sequence: every kind of leaf, numbers and host leaves."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:
        return {
            "int": 3,
            "float": 1.5,
            "bool": True,
            "np_scalar": np.float32(2),
            "tuple_of_numbers": (1, 2),
            "none": None,
            "text": "cat",
            "raw": b"\x00\x01",
            "nested": {"tag": ("a", None), "n": [1.0, 2.0]},
        }


class StructureChangesAt3(Numbered):
    def __getitem__(self, index: int) -> Any:
        x, extra = super().__getitem__(index)
        return (x, {"label": extra["index"]}) if index == 3 else (x, {"y": extra["index"]})


class TorchBatches:
    """torch CPU tensors: one that requires grad and is transposed, a bfloat16 one, int64."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        import torch

        x = torch.arange(8, dtype=torch.float32).reshape(2, 4).t() + index
        half = torch.full((4,), index + 0.5, dtype=torch.bfloat16)
        return x.requires_grad_(), half, torch.full((4,), index, dtype=torch.int64)


class Gated(gpuqueue.Sequence):
    """Each read waits for a ``go()``: a producer exactly as slow as the test makes it.

    Batch i is ``(np.full(shape, i, dtype), i)``. ``stop()`` lets every read
    through; put the sequence before its enqueuer in the ``running`` fixture's
    list, so that its workers can end.
    """

    def __init__(
        self, length: int = 64, shape: tuple[int, ...] = (1000,), dtype: Any = np.float32
    ) -> None:
        self.length, self.shape, self.dtype = length, shape, dtype
        self._cond = threading.Condition()
        self._permits = 0
        self._open = False

    def __len__(self) -> int:
        return self.length

    def go(self) -> None:
        with self._cond:
            self._permits += 1
            self._cond.notify()

    def stop(self, timeout: float = 0.0) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def __getitem__(self, index: int) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._open or self._permits > 0, timeout=20):
                raise TimeoutError(f"read {index} was never let go")
            self._permits -= not self._open
        return np.full(self.shape, index, self.dtype), index


class LabelledImages(gpuqueue.Sequence):
    """Batch i is ``(image, label)``: a 128 KiB uint8 image and a 256-byte int64 label.

    The label is the batch's small leaf: holding it must not hold the image.
    """

    IMAGE_BYTES = 128 * 1024
    LABEL_BYTES = 256

    def __init__(self, length: int = 50) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        image = np.full(self.IMAGE_BYTES, index % 251, np.uint8)
        return image, np.full(self.LABEL_BYTES // 8, index, np.int64)


class TokenLists(gpuqueue.Sequence):
    """Lists as collates make them: ragged token ids, a list that is sometimes empty, and a
    list of mixed Python numbers (which ``np.asarray`` would turn into floats)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Any:
        return {
            "x": np.full((2, 3), index, np.float32),
            "tokens": [[101, 7, index, 102], [101, index, 102]][: 1 + index % 2],
            "hard_negatives": [] if index % 2 == 0 else [index, index + 5],
            "flags": [True, index, 3.5],
        }


class NegativesSometimesEmpty(gpuqueue.Sequence):
    """``[i, i + 5]`` in even batches, ``[]`` in odd ones (or the other way round)."""

    def __init__(self, empty_first: bool = False) -> None:
        self.empty_first = empty_first

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Any:
        negatives = [index, index + 5] if (index % 2 == 0) != self.empty_first else []
        return np.full((2, 3), index, np.float32), {"hard_negatives": negatives}


class DetectionBatches(gpuqueue.Sequence):
    """torchvision's detection collate, ``tuple(zip(*samples))``: 10 samples in batches of
    4, so the last batch has 2 (its tuples are shorter)."""

    SAMPLES, BATCH = 10, 4

    def __len__(self) -> int:
        return -(-self.SAMPLES // self.BATCH)

    def __getitem__(self, index: int) -> Any:
        first = index * self.BATCH
        samples = [
            (
                np.full((3, 4), i, np.float32),
                {"boxes": np.full((1, 4), i, np.float32), "labels": np.array([i], np.int64)},
            )
            for i in range(first, min(first + self.BATCH, self.SAMPLES))
        ]
        return tuple(zip(*samples, strict=True))


class SparseLabels(gpuqueue.Sequence):
    """Batch i is ``(dense, sparse)``: a torch sparse COO tensor, as some collates make."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> Any:
        import torch

        sparse = torch.sparse_coo_tensor([[0, 2]], [float(index), 1.0], (4,), check_invariants=True)
        return torch.full((2,), float(index)), sparse


class CancelsAt(Numbered):
    """``__getitem__(bad_index)`` raises the user's own ``gpuqueue.CancelledError``."""

    def __init__(self, bad_index: int, length: int = 12) -> None:
        super().__init__(length)
        self.bad_index = bad_index

    def __getitem__(self, index: int) -> Any:
        if index == self.bad_index:
            raise gpuqueue.CancelledError(f"the user's own, at {index}")
        return super().__getitem__(index)


class Unpicklable(Numbered):
    """Batch ``bad_index`` holds a lambda, which a worker process cannot send back."""

    def __init__(self, bad_index: int, length: int = 8) -> None:
        super().__init__(length)
        self.bad_index = bad_index

    def __getitem__(self, index: int) -> Any:
        x, extra = super().__getitem__(index)
        if index == self.bad_index:
            extra["hook"] = lambda: index
        return x, extra
