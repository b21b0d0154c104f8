"""Batch, plan: a batch shaped exactly like an earlier one, split in one pass.

Most sources give every batch the same nesting and the same leaf types: a
tuple of two arrays, a dict of tensors. ``Plan`` compiles one described
batch into a check per node. A later batch whose every node has the same
Python type (and whose dicts have the same keys, in the same order) is split
into its array leaves without ``tree.describe``'s general walk, and its
leaves' layout is reused while their dtypes and shapes stay the same: the
per-batch cost of a worker is then a few type checks, not a walk of rules.

Anything else takes the general path, which gives the same result or the
error naming the field: a host leaf (``None``, a string), a list of numbers,
another leaf type, a different nesting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .layout import layout
from .tree import LeafMeta, Leaves, TreeDef, tensor_array

__all__ = ["Plan"]

# Checks one node of a batch; appends its array leaves (and their kinds); False if it differs.
_Check = Callable[[Any, list[np.ndarray], list[str]], bool]

_SCALAR_KINDS = ("number", "scalar")  # made arrays with np.asarray

# Where matches() has the checks put the leaves it does not keep: appending to it
# keeps nothing (and needs no lock), so a match costs no new lists.
_DISCARD: Any = deque(maxlen=0)


class Plan:
    """A described batch's structure, compiled: splits later batches shaped exactly like it.

    Args:
        treedef: The described batch's structure (no host leaves).
        check: The compiled check of its root.
    """

    def __init__(
        self, treedef: TreeDef, check: _Check, leaves: Leaves, metas: list[LeafMeta], nbytes: int
    ) -> None:
        self.treedef = treedef
        self._check = check
        self._paths = [path for path, _ in leaves]
        # (the leaves' dtypes, shapes and kinds; their layout; its size), read and
        # replaced as one: workers split at once, and a layout must go with its key.
        self._layout = (_key([array for _, array in leaves], leaves.kinds), metas, nbytes)

    @property
    def metas(self) -> list[LeafMeta]:
        """The layout of the batch split last (the first batch's until one differed)."""
        return self._layout[1]

    @classmethod
    def of(
        cls, batch: Any, treedef: TreeDef, leaves: Leaves, metas: list[LeafMeta], nbytes: int
    ) -> Plan | None:
        """The plan of ``batch``, as ``describe`` split it and ``layout`` laid it out; None if
        it has no fast path.

        Batches with host leaves, lists of numbers or array-likes other than
        NumPy arrays and torch tensors keep the general path.
        """
        try:
            check = _compile(batch, treedef, "", iter(leaves.kinds))
        except _NoPlan:
            return None
        return cls(treedef, check, leaves, metas, nbytes)

    def matches(self, batch: Any) -> bool:
        """True if ``batch`` is shaped as the plan: its structure passes the first batch's check.

        Raises:
            BatchError: As ``describe`` would, for a tensor NumPy cannot view.
        """
        return self._check(batch, _DISCARD, _DISCARD)

    def split(self, batch: Any) -> tuple[Leaves, list[LeafMeta], int] | None:
        """``batch``'s array leaves, their layout and size, if it is shaped as the plan.

        The layout (``metas``) is the same list for as long as the leaves'
        dtypes, shapes and kinds stay the same.

        Returns:
            None if any node differs in type (the general path then decides).

        Raises:
            BatchError: As ``describe`` would, for a tensor NumPy cannot view.
        """
        arrays: list[np.ndarray] = []
        kinds: list[str] = []
        if not self._check(batch, arrays, kinds):
            return None
        leaves = Leaves()
        leaves.extend(zip(self._paths, arrays, strict=True))
        leaves.kinds = kinds
        key = _key(arrays, kinds)
        known = self._layout
        if key != known[0]:
            known = self._layout = (key, *layout(leaves))
        return leaves, known[1], known[2]


def _key(arrays: list[np.ndarray], kinds: list[str]) -> tuple[Any, ...]:
    """What a layout depends on: each leaf's dtype and shape, and what it was."""
    return (*[(a.dtype, a.shape) for a in arrays], *kinds)


class _NoPlan(Exception):
    """This batch takes the general path."""


def _compile(value: Any, treedef: TreeDef, path: str, kinds: Any) -> _Check:
    if treedef.kind == "leaf":
        return _compile_leaf(value, path or "<batch>", next(kinds))
    if treedef.kind == "host":
        raise _NoPlan
    node_type = type(value)
    if treedef.kind == "dict":
        keys = list(treedef.keys)
        if node_type is not dict:
            raise _NoPlan
        children = [
            _compile(value[k], c, f"{path}[{k!r}]", kinds)
            for k, c in zip(keys, treedef.children, strict=True)
        ]

        def check_dict(node: Any, arrays: list[np.ndarray], found: list[str]) -> bool:
            if type(node) is not dict or list(node) != keys:
                return False
            for key, child in zip(keys, children, strict=True):
                if not child(node[key], arrays, found):
                    return False
            return True

        return check_dict
    count = len(treedef.children)
    children = [
        _compile(v, c, f"{path}[{i}]", kinds)
        for i, (v, c) in enumerate(zip(value, treedef.children, strict=True))
    ]

    def check_sequence(node: Any, arrays: list[np.ndarray], found: list[str]) -> bool:
        if type(node) is not node_type or len(node) != count:
            return False
        # A loop, not all() over a generator: half the cost, on every batch.
        for child, value in zip(children, node, strict=True):  # noqa: SIM110
            if not child(value, arrays, found):
                return False
        return True

    return check_sequence


def _compile_leaf(value: Any, path: str, kind: str) -> _Check:
    leaf_type = type(value)
    if kind == "array" and leaf_type is np.ndarray:

        def check_array(node: Any, arrays: list[np.ndarray], found: list[str]) -> bool:
            if type(node) is not np.ndarray or node.dtype.hasobject:
                return False
            arrays.append(node)
            found.append("array")
            return True

        return check_array
    if kind in _SCALAR_KINDS:

        def check_scalar(node: Any, arrays: list[np.ndarray], found: list[str]) -> bool:
            if type(node) is not leaf_type:
                return False
            array = np.asarray(node)
            if array.dtype.hasobject:  # an int past 64 bits: the general path names it
                return False
            arrays.append(array)
            found.append(kind)
            return True

        return check_scalar
    if kind.startswith("torch"):

        def check_tensor(node: Any, arrays: list[np.ndarray], found: list[str]) -> bool:
            if type(node) is not leaf_type:
                return False
            array, got = tensor_array(path, node)
            arrays.append(array)
            found.append(got)
            return True

        return check_tensor
    raise _NoPlan
