"""Batch, the check: every batch against the first one's structure, dtypes and ranks.

The first batch fixes what the rest must be (``BatchSpec``); a batch that
differs is a ``BatchError`` naming the batch and the field. With
``device=None`` only the structure is checked (a dtype may change between
epochs, as Keras allows); where batches are packed for a device, dtypes and
ranks too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BatchError
from .tree import LeafMeta, TreeDef

__all__ = ["BatchSpec"]


class BatchSpec:
    """The structure, dtypes and ranks of the first batch, to check the rest against."""

    def __init__(self, treedef: TreeDef, leaves: Sequence[tuple[str, np.dtype[Any], int]]) -> None:
        self.treedef = treedef
        self.leaves = list(leaves)
        # By path, not position: a dict may list the same keys in another order.
        self._by_path = {path: (dtype, ndim) for path, dtype, ndim in self.leaves}
        self._kinds: dict[str, str] = {}  # what each leaf was, by path (LeafMeta.kind)

    @classmethod
    def of(cls, treedef: TreeDef, metas: Sequence[LeafMeta]) -> BatchSpec:
        spec = cls(treedef, [(m.path, m.dtype, len(m.shape)) for m in metas])
        spec._kinds = {m.path: m.kind for m in metas}
        return spec

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
            kinds = (self._kinds, {m.path: m.kind for m in metas})
            difference = self.treedef.first_difference(treedef, "", kinds)
            raise BatchError(
                f"{where}: structure differs from the first batch: "
                f"{difference or 'the structure differs'} "
                f"(fields {[m.path for m in metas]}, expected {[p for p, _, _ in self.leaves]})"
            )
        if not dtypes:
            return
        by_path = self._by_path
        if len(metas) != len(self.leaves) or any(m.path not in by_path for m in metas):
            # A list of alike items changed length: each item is checked against the
            # first batch's item in its place, or its first item past the end.
            expected = _expected_leaves(self.treedef, [(d, n) for _, d, n in self.leaves], treedef)
            by_path = {m.path: e for m, e in zip(metas, expected, strict=True) if e is not None}
        for meta in metas:
            if meta.path not in by_path:  # (the first batch's list was empty: nothing to match)
                continue
            dtype, ndim = by_path[meta.path]
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


def _leaf_count(treedef: TreeDef) -> int:
    if treedef.kind == "leaf":
        return 1
    return sum(_leaf_count(child) for child in treedef.children)


def _expected_leaves(first: TreeDef, specs: list[Any], other: TreeDef) -> list[Any]:
    """``specs`` (the first batch's leaves, in its order) as ``other``'s leaves expect them.

    ``other`` has the first batch's structure but for lists of alike items
    of another length (``TreeDef.same_structure``): an item past the first
    batch's end is matched with its first item; None where the first
    batch's list was empty.
    """
    if other.kind == "leaf":
        return specs[:1] if first.kind == "leaf" else [None]
    chunks = []
    position = 0
    for child in first.children:
        count = _leaf_count(child)
        chunks.append((child, specs[position : position + count]))
        position += count
    if first.kind == "dict":
        by_key = dict(zip(first.keys, chunks, strict=True))
        pairs = [by_key[key] for key in other.keys]
    elif chunks:
        pairs = [chunks[i] if i < len(chunks) else chunks[0] for i in range(len(other.children))]
    else:
        return [None] * _leaf_count(other)
    expected: list[Any] = []
    for (child, part), theirs in zip(pairs, other.children, strict=True):
        expected += _expected_leaves(child, part, theirs)
    return expected
