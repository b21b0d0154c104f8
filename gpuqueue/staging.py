"""Batch structure, validation, and packing a batch's arrays into one arena.

A batch is any nesting of tuples (named ones too), lists and dicts whose
leaves are NumPy arrays or scalars. ``describe`` splits it into a structure
(``TreeDef``) and its leaves; ``BatchSpec`` remembers the first batch's
structure, dtypes and ranks and names the field of any later batch that
differs; ``pack`` / ``unpack`` lay a batch's arrays out in one buffer at
aligned offsets, so one batch is one copy (into shared memory, or from pinned
memory to the device).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BatchError

__all__ = [
    "ALIGNMENT",
    "BatchSpec",
    "LeafMeta",
    "Staged",
    "TreeDef",
    "describe",
    "pack",
    "unpack",
]

# Offsets in an arena are multiples of this, which suits every dtype and
# the alignment CUDA copies and kernels prefer.
ALIGNMENT = 256

_SCALAR_TYPES = (bool, int, float, complex, np.generic)

# Dtype kinds a device computes with: booleans, integers, floats, complex numbers.
_DEVICE_KINDS = frozenset("biufc")
_KIND_NAMES = {
    "U": "text",
    "S": "bytes",
    "V": "raw or structured",
    "M": "datetime",
    "m": "timedelta",
}


@dataclass(frozen=True)
class TreeDef:
    """The shape of a nested batch without its leaves.

    ``kind`` is ``"leaf"``, ``"tuple"``, ``"list"`` or ``"dict"``; ``node_type``
    rebuilds named tuples; ``keys`` are a dict's keys in their first order.
    """

    kind: str
    children: tuple[TreeDef, ...] = ()
    keys: tuple[Any, ...] = ()
    node_type: type | None = None

    def same_structure(self, other: TreeDef) -> bool:
        """True if ``other`` has the same nesting; a dict's keys may come in another order."""
        if self.kind != other.kind or len(self.children) != len(other.children):
            return False
        if self.node_type is not other.node_type:
            return False
        if self.kind == "dict":
            if set(self.keys) != set(other.keys):
                return False
            by_key = dict(zip(other.keys, other.children, strict=True))
            mine = zip(self.keys, self.children, strict=True)
            pairs = [(child, by_key[key]) for key, child in mine]
        else:
            pairs = list(zip(self.children, other.children, strict=True))
        return all(a.same_structure(b) for a, b in pairs)


@dataclass(frozen=True)
class LeafMeta:
    """Where one leaf lives in an arena, and what it is."""

    path: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int = 0


def _flatten(node: Any, path: str, leaves: list[tuple[str, Any]]) -> TreeDef:
    if isinstance(node, dict):
        keys = tuple(node)
        children = tuple(_flatten(node[k], f"{path}[{k!r}]", leaves) for k in keys)
        return TreeDef("dict", children, keys=keys)
    if isinstance(node, (tuple, list)):
        kind = "list" if isinstance(node, list) else "tuple"
        node_type = type(node) if hasattr(node, "_fields") else None
        children = tuple(_flatten(v, f"{path}[{i}]", leaves) for i, v in enumerate(node))
        return TreeDef(kind, children, node_type=node_type)
    leaves.append((path or "<batch>", node))
    return TreeDef("leaf")


def flatten(batch: Any) -> tuple[TreeDef, list[tuple[str, Any]]]:
    """Splits a batch into its structure and its ``(path, leaf)`` pairs, any leaf type.

    Paths read like ``[0]['image']``; they name fields in error messages.
    """
    leaves: list[tuple[str, Any]] = []
    return _flatten(batch, "", leaves), leaves


def _as_array(path: str, leaf: Any) -> np.ndarray:
    if isinstance(leaf, np.ndarray):
        array = leaf
    elif isinstance(leaf, _SCALAR_TYPES):
        array = np.asarray(leaf)
    else:
        raise BatchError(
            f"field {path} is a {type(leaf).__name__}; expected a NumPy array, "
            "a scalar, or a tuple, list or dict of them"
        )
    if array.dtype.hasobject:
        raise BatchError(
            f"field {path} has dtype {array.dtype}, which holds Python objects; "
            "expected a numeric or boolean dtype"
        )
    return array


def describe(batch: Any) -> tuple[TreeDef, list[tuple[str, np.ndarray]]]:
    """Splits a host batch into its structure and its ``(path, array)`` leaves.

    Raises:
        BatchError: If a leaf is not an array or scalar, or holds objects.
    """
    treedef, leaves = flatten(batch)
    return treedef, [(path, _as_array(path, leaf)) for path, leaf in leaves]


def _rebuild(treedef: TreeDef, leaves: Any) -> Any:
    if treedef.kind == "leaf":
        return next(leaves)
    children = [_rebuild(child, leaves) for child in treedef.children]
    if treedef.kind == "dict":
        return dict(zip(treedef.keys, children, strict=True))
    if treedef.kind == "list":
        return children
    if treedef.node_type is not None:
        return treedef.node_type(*children)
    return tuple(children)


def rebuild(treedef: TreeDef, leaves: Sequence[Any]) -> Any:
    """Puts leaves back into the structure ``describe`` took them from."""
    return _rebuild(treedef, iter(leaves))


class BatchSpec:
    """The structure, dtypes and ranks of the first batch, to check the rest against."""

    def __init__(self, treedef: TreeDef, leaves: Sequence[tuple[str, np.dtype[Any], int]]) -> None:
        self.treedef = treedef
        self.leaves = list(leaves)
        # By path, not position: a dict may list the same keys in another order.
        self._by_path = {path: (dtype, ndim) for path, dtype, ndim in self.leaves}

    @classmethod
    def of(cls, treedef: TreeDef, metas: Sequence[LeafMeta]) -> BatchSpec:
        return cls(treedef, [(m.path, m.dtype, len(m.shape)) for m in metas])

    def check(
        self, treedef: TreeDef, metas: Sequence[LeafMeta], where: str, *, dtypes: bool = True
    ) -> None:
        """Raises ``BatchError`` naming ``where`` and the field that differs.

        Shapes may differ (a short last batch); structure, dtypes and ranks may
        not. Fields are matched by path, so a dict's keys may come in any order.

        Args:
            treedef: The batch's structure.
            metas: Its leaves.
            where: Names the batch in the message.
            dtypes: Also check dtypes and ranks (where batches are packed for
                a device); with False only the structure is checked.
        """
        if not self.treedef.same_structure(treedef):
            raise BatchError(
                f"{where}: structure differs from the first batch "
                f"(fields {[m.path for m in metas]}, expected {[p for p, _, _ in self.leaves]})"
            )
        if not dtypes:
            return
        for meta in metas:
            dtype, ndim = self._by_path[meta.path]
            if meta.dtype != dtype:
                raise BatchError(
                    f"{where}: field {meta.path} has dtype {meta.dtype}, "
                    f"expected {dtype} as in the first batch"
                )
            if len(meta.shape) != ndim:
                raise BatchError(
                    f"{where}: field {meta.path} has rank {len(meta.shape)} "
                    f"(shape {meta.shape}), expected rank {ndim} as in the first batch"
                )


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def layout(leaves: Sequence[tuple[str, np.ndarray]]) -> tuple[list[LeafMeta], int]:
    """Assigns each leaf an aligned offset in one arena.

    Returns:
        The leaves' metadata and the arena size in bytes they need.
    """
    metas = []
    offset = 0
    for path, array in leaves:
        metas.append(LeafMeta(path, array.dtype, array.shape, offset))
        offset = _align(offset + array.nbytes)
    return metas, offset


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


def arena_view(arena: Any, meta: LeafMeta) -> Any:
    """An array of ``meta``'s dtype and shape over a uint8 array ``arena`` (NumPy or CuPy)."""
    end = meta.offset + math.prod(meta.shape) * meta.dtype.itemsize
    return arena[meta.offset : end].view(meta.dtype).reshape(meta.shape)


def device_ready(metas: Sequence[LeafMeta], arena: np.ndarray, where: str) -> list[LeafMeta]:
    """Makes a packed batch what a device expects, in place; returns its leaves' new metadata.

    Leaves in non-native byte order are swapped in ``arena`` (a device reads
    its own order; a copy moves bytes as they are), and dtypes with no
    meaning on a device never reach a copy.

    Raises:
        BatchError: Naming ``where`` and the field, for a text, bytes, raw,
            structured, datetime or timedelta leaf.
    """
    ready = list(metas)
    for position, meta in enumerate(metas):
        if meta.dtype.kind not in _DEVICE_KINDS:
            kind = _KIND_NAMES.get(meta.dtype.kind, "unknown")
            raise BatchError(
                f"{where}: field {meta.path} has dtype {meta.dtype} ({kind} data), which has "
                "no meaning on a device; expected a numeric or boolean dtype"
            )
        if not meta.dtype.isnative:
            _view(arena, meta).byteswap(inplace=True)
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
    released: bool = False

    def release(self, copy_done: Any = None) -> None:
        """Returns the slot to its pool, once: the next user waits for ``copy_done``.

        Idempotent, because an item can be dropped (on stop) after its copy
        already gave the slot back.
        """
        if not self.released:
            self.released = True
            self.give_back(copy_done)
