"""Batch, layout: one batch, one arena; its arrays at aligned offsets, packed, and viewed.

``layout`` gives each array leaf an aligned offset, ``pack`` copies the
leaves into one buffer (a pinned or shared-memory slot), and ``unpack`` and
``arena_view`` read them back (on the host, or as device arrays), so one
batch is one copy. ``device_ready`` makes a packed batch what a device
expects. ``Staged`` is a packed batch waiting for its copy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BatchError
from .tree import LeafMeta, TreeDef, rebuild

__all__ = [
    "ALIGNMENT",
    "GROWTH",
    "SMALL_LEAF_BYTES",
    "Staged",
    "arena_view",
    "as_source",
    "device_ready",
    "layout",
    "leaf_nbytes",
    "ml_bfloat16",
    "pack",
    "small_leaves",
    "unpack",
]

# Offsets in an arena are multiples of this, which suits every dtype and
# the alignment CUDA copies and kernels prefer.
ALIGNMENT = 256

# A slot or arena that must grow takes this margin over the largest batch, so slowly
# growing batches settle (pinned slots, shared-memory slots, device arenas alike).
GROWTH = 1.25

# A leaf of at most this many bytes (a label, a weight, an id), unless it is the
# batch's largest, is copied out of its batch's arena into memory of its own before
# delivery: a held label then holds its own bytes, not the batch's images. Larger
# leaves, and the largest, stay views of the arena (one copy per batch for the bulk
# of the bytes) and hold the arena while any of them is held.
SMALL_LEAF_BYTES = 64 * 1024

# Dtype kinds a device computes with: booleans, integers, floats, complex numbers.
_DEVICE_KINDS = frozenset("biufc")
_KIND_NAMES = {
    "U": "text",
    "S": "bytes",
    "V": "raw or structured",
    "M": "datetime",
    "m": "timedelta",
}


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def layout(leaves: Sequence[tuple[str, np.ndarray]]) -> tuple[list[LeafMeta], int]:
    """Assigns each leaf an aligned offset in one arena.

    Returns:
        The leaves' metadata and the arena size in bytes they need.
    """
    metas = []
    offset = 0
    kinds = getattr(leaves, "kinds", None) or ["array"] * len(leaves)
    for (path, array), kind in zip(leaves, kinds, strict=True):
        metas.append(LeafMeta(path, array.dtype, array.shape, offset, kind))
        offset = _align(offset + array.nbytes)
    return metas, offset


def small_leaves(metas: Sequence[LeafMeta]) -> list[int]:
    """The positions of the leaves to copy out of the batch's arena (see ``SMALL_LEAF_BYTES``).

    Every leaf of at most ``SMALL_LEAF_BYTES`` but the batch's largest (the
    first, of equals): that one stays, so the arena always holds the bulk of
    the batch and a batch of one leaf copies nothing.
    """
    if len(metas) < 2:
        return []
    sizes = [leaf_nbytes(meta) for meta in metas]
    largest = sizes.index(max(sizes))
    return [
        position
        for position, size in enumerate(sizes)
        if size <= SMALL_LEAF_BYTES and position != largest
    ]


def leaf_nbytes(meta: LeafMeta) -> int:
    """The bytes of one leaf's data."""
    return meta.dtype.itemsize * math.prod(meta.shape)


def pack(leaves: Sequence[tuple[str, np.ndarray]], metas: Sequence[LeafMeta], arena: Any) -> None:
    """Copies each leaf into ``arena`` (a writable byte buffer) at its offset.

    Non-contiguous and Fortran-ordered arrays are copied element by element
    into C order, so what comes out of ``unpack`` equals what went in.
    """
    for (_, array), meta in zip(leaves, metas, strict=True):
        np.copyto(_view(arena, meta), array, casting="no")


def _view(arena: Any, meta: LeafMeta) -> np.ndarray:
    count = math.prod(meta.shape)
    flat = np.frombuffer(arena, dtype=meta.dtype, count=count, offset=meta.offset)
    return flat.reshape(meta.shape)


def arena_view(arena: Any, meta: LeafMeta, offset: int | None = None) -> Any:
    """An array of ``meta``'s dtype and shape over a uint8 array ``arena`` (NumPy or CuPy).

    At ``meta.offset``, or at ``offset`` (0 for a leaf copied out into memory of its own).
    """
    start = meta.offset if offset is None else offset
    end = start + math.prod(meta.shape) * meta.dtype.itemsize
    return arena[start:end].view(meta.dtype).reshape(meta.shape)


def device_ready(metas: list[LeafMeta], arena: np.ndarray, where: str) -> list[LeafMeta]:
    """Makes a packed batch what a device expects, in place; returns its leaves' new metadata.

    Leaves in non-native byte order are swapped in ``arena`` (a device reads
    its own order; a copy moves bytes as they are), and dtypes with no
    meaning on a device never reach a copy.

    Returns:
        ``metas`` itself if no leaf changed, so a layout ``plan.Plan`` shares
        stays shared (and the check of it done once).

    Raises:
        BatchError: Naming ``where`` and the field, for a text, bytes, raw,
            structured, datetime or timedelta leaf.
    """
    ready = metas  # the same list when nothing changes: a plan's layout stays shared
    for position, meta in enumerate(metas):
        if meta.dtype.kind not in _DEVICE_KINDS:
            kind = _KIND_NAMES.get(meta.dtype.kind, "unknown")
            raise BatchError(
                f"{where}: field {meta.path} has dtype {meta.dtype} ({kind} data), which has "
                "no meaning on a device; expected a numeric or boolean dtype"
            )
        if not meta.dtype.isnative:
            _view(arena, meta).byteswap(inplace=True)
            if ready is metas:
                ready = list(metas)
            ready[position] = dataclasses.replace(meta, dtype=meta.dtype.newbyteorder("="))
    return ready


def unpack(treedef: TreeDef, metas: Sequence[LeafMeta], arena: Any, copy: bool = False) -> Any:
    """Rebuilds a batch whose arrays are views of ``arena`` (or, with ``copy``, copies)."""
    views = [_view(arena, meta) for meta in metas]
    return rebuild(treedef, [view.copy() for view in views] if copy else views)


@dataclass
class Staged:
    """A batch packed into one host arena, ready for one host-to-device copy."""

    treedef: TreeDef
    metas: list[LeafMeta]
    nbytes: int
    buffer: np.ndarray  # uint8, at least nbytes long
    give_back: Callable[[Any], None]  # returns the slot to its pool, fenced by an event
    # Puts other memory (or None: new memory later) in the slot and returns its buffer,
    # which leaves with the batch; None where the slot's memory cannot leave (shared memory).
    exchange: Callable[[Any], Any] | None = None
    released: bool = False
    # Hands the slot to the consumer; the slot returns once the object it gives dies.
    lend: Callable[[], object] | None = None

    def release(self, copy_done: Any = None) -> None:
        """Returns the slot to its pool, once: the next user waits for ``copy_done``.

        Idempotent, because an item can be dropped (on stop) after its copy
        already gave the slot back.
        """
        if not self.released:
            self.released = True
            self.give_back(copy_done)

    def hand_over(self) -> object:
        """Lends the slot to the consumer instead of returning it; see ``SlotPool.lend``.

        Returns:
            The lease: keep it alive with every view of the slot; the slot
            returns to its pool when it dies.
        """
        assert self.lend is not None and not self.released
        self.released = True
        return self.lend()


def as_source(meta: LeafMeta, array: np.ndarray) -> Any:
    """What the source gave for a host array leaf: the same type back (``device=None``).

    NumPy arrays stay arrays; NumPy scalars and Python numbers come back as
    scalars of their type (``arr[()]``, ``arr.item()``); coerced lists and
    tuples come back as lists (``tolist()``; a tuple's outer level as a
    tuple); tensors come back as tensors over the same memory.
    """
    kind = meta.kind
    if kind == "scalar":
        return array[()]
    if kind == "number":
        return array.item()
    if kind == "list":
        return array.tolist()
    if kind == "tuple":
        return tuple(array.tolist())
    if kind == "ml:bfloat16":
        return array.view(ml_bfloat16())
    if kind.startswith("torch"):
        import torch

        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if kind == "torch:bfloat16" else tensor
    return array


def ml_bfloat16() -> np.dtype[Any]:
    """ml_dtypes' bfloat16 dtype (imported only once a batch holds one)."""
    import ml_dtypes

    dtype: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return dtype
