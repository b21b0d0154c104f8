"""Batch, tree: a batch's structure, what it may hold, and what it held the first time.

A batch is any nesting of tuples (named ones too), lists and dicts. Its
leaves are, as Keras takes them:

- NumPy arrays and NumPy scalars;
- torch CPU tensors (pinned or not, read as a NumPy view without a copy;
  ``bfloat16``, which NumPy lacks, travels as its 16-bit pattern);
- Python numbers (``bool``, ``int``, ``float``, ``complex``), and lists or
  tuples whose items are all numbers (or such lists, nested), which become
  one array with ``np.asarray`` as Keras coerces them. The batch itself, if
  it is a tuple, stays a tuple: Keras reads it as ``(x, y, sample_weight)``;
- other array-likes with ``__array__``, ``shape`` and ``dtype`` (a JAX
  array, say), through ``np.asarray``;
- anything else (``None``, strings, bytes, other objects) is a *host leaf*:
  it is not packed; it travels in the structure itself (pickled with it to
  and from worker processes) and comes back in place, untouched.

``describe`` splits a batch into a structure (``TreeDef``) and its array
leaves; ``BatchSpec`` remembers the first batch's structure, dtypes and ranks
and names the field of any later batch that differs (``layout.py`` lays a
batch's arrays out in one buffer, so one batch is one copy).
``LeafMeta.kind`` remembers what each array leaf was, so ``layout.as_source`` can
give the host path (``device=None``) the same leaf types in processes as in
threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BatchError

__all__ = [
    "LeafMeta",
    "TreeDef",
    "describe",
    "map_arrays",
]


_NUMBER_TYPES = (bool, int, float, complex)
_SCALAR_TYPES = (*_NUMBER_TYPES, np.generic)


@dataclass(frozen=True)
class TreeDef:
    """The shape of a nested batch without its leaves.

    ``kind`` is ``"leaf"`` (an array leaf), ``"host"`` (a host leaf, kept
    in ``value``), ``"tuple"``, ``"list"`` or ``"dict"``; ``node_type``
    rebuilds named tuples; ``keys`` are a dict's keys in their first order.
    """

    kind: str
    children: tuple[TreeDef, ...] = ()
    keys: tuple[Any, ...] = ()
    node_type: type | None = None
    value: Any = field(default=None, compare=False)

    def same_structure(self, other: TreeDef, top: bool = True) -> bool:
        """True if ``other`` has the same nesting; a dict's keys may come in another order.

        A list or tuple inside the batch whose items are all alike (a batch of
        samples, as ``tuple(zip(*samples))`` makes) may have another length.
        """
        if self.kind != other.kind or self.node_type is not other.node_type:
            return False
        if len(self.children) != len(other.children):
            return not top and self._alike(other)
        if self.kind == "dict":
            if set(self.keys) != set(other.keys):
                return False
            by_key = dict(zip(other.keys, other.children, strict=True))
            mine = zip(self.keys, self.children, strict=True)
            pairs = [(child, by_key[key]) for key, child in mine]
        else:
            pairs = list(zip(self.children, other.children, strict=True))
        return all(a.same_structure(b, top=False) for a, b in pairs)

    def _alike(self, other: TreeDef) -> bool:
        """Whether this plain list or tuple and ``other`` hold items all of one structure."""
        if self.kind not in ("list", "tuple") or self.node_type is not None:
            return False
        items = [*self.children, *other.children]
        return all(items[0].same_structure(item, top=False) for item in items[1:])

    def first_difference(
        self,
        other: TreeDef,
        path: str = "",
        kinds: tuple[dict[str, str], dict[str, str]] = ({}, {}),
    ) -> str | None:
        """A sentence naming the first field where ``other`` differs from this one, or None.

        ``kinds`` holds what each array leaf was (``LeafMeta.kind``), by path,
        in this batch and in ``other``: it names a list of numbers as such.
        """
        where = path or "<batch>"
        if self.kind != other.kind or self.node_type is not other.node_type:
            empty_list = _empty_list_for_numbers(self, other, where, kinds)
            if empty_list is not None:
                return empty_list
            return f"field {where} is {_kind_name(other)}, expected {_kind_name(self)}"
        if self.kind == "dict" and set(self.keys) != set(other.keys):
            return (
                f"field {where} has keys {sorted(map(repr, other.keys))}, "
                f"expected {sorted(map(repr, self.keys))}"
            )
        if len(self.children) != len(other.children):
            if path and self._alike(other):
                return None
            return f"field {where} has {len(other.children)} items, expected {len(self.children)}"
        if self.kind == "dict":
            mine = dict(zip(self.keys, self.children, strict=True))
            pairs = [
                (f"{path}[{k!r}]", mine[k], c)
                for k, c in zip(other.keys, other.children, strict=True)
            ]
        else:
            pairs = [
                (f"{path}[{i}]", a, b)
                for i, (a, b) in enumerate(zip(self.children, other.children, strict=True))
            ]
        for child_path, a, b in pairs:
            found: str | None = a.first_difference(b, child_path, kinds)
            if found is not None:
                return found
        return None


def _empty_list_for_numbers(
    first: TreeDef, other: TreeDef, where: str, kinds: tuple[dict[str, str], dict[str, str]]
) -> str | None:
    """The message for a list of numbers in one batch that is empty in the other, or None.

    On a device a list of numbers is one array, whose dtype an empty list cannot
    give; without one, lists pass through and may change.
    """
    numbers = ("list", "tuple")
    if first.kind == "leaf" and kinds[0].get(where) in numbers and not other.children:
        if other.kind in numbers:
            seen = "is an empty list, where the first batch had a list of numbers"
        else:
            return None
    elif other.kind == "leaf" and kinds[1].get(where) in numbers and not first.children:
        if first.kind in numbers:
            seen = "is a list of numbers, where the first batch had an empty list"
        else:
            return None
    else:
        return None
    return (
        f"field {where} {seen}: on a device a list of numbers is one array, and an empty "
        "list gives it no dtype; keep such a list non-empty (pad it), or use device=None to "
        "pass lists through as they are"
    )


def _kind_name(treedef: TreeDef) -> str:
    if treedef.kind == "leaf":
        return "an array"
    if treedef.kind == "host":
        return f"a {type(treedef.value).__name__} (passed through)"
    if treedef.node_type is not None:
        return f"a {treedef.node_type.__name__}"
    return f"a {treedef.kind}"


@dataclass(frozen=True)
class LeafMeta:
    """Where one leaf lives in an arena, and what it is."""

    path: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int = 0
    # What the source gave: "array", "scalar" (a NumPy scalar), "number" (a
    # Python number), "list"/"tuple" (of numbers), "torch" or "torch:bfloat16",
    # "ml:bfloat16" (an ml_dtypes bfloat16 array, carried as its bits).
    kind: str = "array"


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


class Leaves(list[tuple[str, np.ndarray]]):
    """A batch's array leaves as ``(path, array)`` pairs, and what each one was (``kinds``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[str] = []

    def add(self, path: str, array: np.ndarray, kind: str) -> None:
        if array.dtype.hasobject:
            raise BatchError(
                f"field {path} has dtype {array.dtype}, which holds Python objects; "
                "expected a numeric or boolean dtype"
            )
        self.append((path, array))
        self.kinds.append(kind)


def _is_number_list(node: Any) -> bool:
    """True for a non-empty list or plain tuple of Python numbers, or of such lists (nested).

    NumPy scalars do not count: a tuple of them stays a structure, as before.
    """
    if not isinstance(node, (list, tuple)) or hasattr(node, "_fields") or not node:
        return False
    return all(isinstance(item, _NUMBER_TYPES) or _is_number_list(item) for item in node)


def _is_torch_tensor(leaf: Any) -> bool:
    # Checked by module name, so that torch is imported only once it is in use.
    return type(leaf).__module__.split(".")[0] == "torch" and hasattr(leaf, "numpy")


def tensor_array(path: str, tensor: Any) -> tuple[np.ndarray, str]:
    """A NumPy view of a CPU tensor (no copy), and its kind."""
    import torch

    if tensor.device.type != "cpu":
        raise BatchError(
            f"field {path} is a torch tensor on {tensor.device}; gpuqueue reads host "
            "batches: return CPU tensors (the copy to the device is gpuqueue's job)"
        )
    if tensor.layout != torch.strided:
        raise BatchError(
            f"field {path} is a sparse torch tensor (layout {tensor.layout}); a device takes "
            "dense arrays: return tensor.to_dense(), or use device=None to pass it through "
            "as it is"
        )
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy(), "torch:bfloat16"
    try:
        return tensor.numpy(), "torch"
    except (TypeError, RuntimeError) as error:
        raise BatchError(
            f"field {path} is a torch tensor of dtype {tensor.dtype}, which NumPy cannot "
            f"view ({error})"
        ) from None


def _describe(node: Any, path: str, leaves: Leaves, top: bool, packed: bool) -> TreeDef:
    if isinstance(node, np.ndarray):
        if packed and node.dtype.kind == "V" and node.dtype.name == "bfloat16":
            # ml_dtypes' bfloat16 (what JAX makes): its bits, as a torch bfloat16 travels.
            leaves.add(path or "<batch>", node.view(np.int16), "ml:bfloat16")
        else:
            leaves.add(path or "<batch>", node, "array")
        return TreeDef("leaf")
    if isinstance(node, dict):
        keys = tuple(node)
        children = tuple(_describe(node[k], f"{path}[{k!r}]", leaves, False, packed) for k in keys)
        return TreeDef("dict", children, keys=keys)
    if isinstance(node, (tuple, list)):
        # The batch itself, when a tuple, stays a tuple even of numbers: Keras's (x, y, w).
        numbers = (isinstance(node, list) or not top) and _is_number_list(node)
        empty = not node and not top and not hasattr(node, "_fields")
        if not packed and (numbers or empty):
            # Nothing packs it: a list of numbers (ragged or not), or an empty one, goes
            # as it came, and may change from batch to batch.
            return TreeDef("host", value=node)
        if not numbers:
            kind = "list" if isinstance(node, list) else "tuple"
            node_type = type(node) if hasattr(node, "_fields") else None
            children = tuple(
                _describe(v, f"{path}[{i}]", leaves, False, packed) for i, v in enumerate(node)
            )
            return TreeDef(kind, children, node_type=node_type)
    where = path or "<batch>"
    if isinstance(node, (tuple, list)):  # numbers, coerced as Keras does
        leaves.add(where, _number_array(where, node), "list" if isinstance(node, list) else "tuple")
    elif isinstance(node, _NUMBER_TYPES):
        leaves.add(where, np.asarray(node), "number")
    elif isinstance(node, np.generic) and not isinstance(node, (np.str_, np.bytes_)):
        leaves.add(where, np.asarray(node), "scalar")
    elif _is_torch_tensor(node):
        if not packed and str(getattr(node, "layout", "torch.strided")) != "torch.strided":
            return TreeDef("host", value=node)  # a sparse tensor: nothing packs it
        leaves.add(where, *tensor_array(where, node))
    elif hasattr(node, "__array__") and hasattr(node, "shape") and hasattr(node, "dtype"):
        leaves.add(where, np.asarray(node), "array")
    else:
        return TreeDef("host", value=node)
    return TreeDef("leaf")


def _number_array(where: str, numbers: list[Any] | tuple[Any, ...]) -> np.ndarray:
    try:
        return np.asarray(numbers)
    except ValueError as error:  # ragged: NumPy's words name no field
        raise BatchError(
            f"field {where} is a list of numbers whose lists differ in length, which cannot "
            f"be one array on a device ({error}); pad them to one length, or use device=None "
            "to pass lists through as they are"
        ) from None


def describe(batch: Any, packed: bool = True) -> tuple[TreeDef, Leaves]:
    """Splits a host batch into its structure and its ``(path, array)`` leaves.

    Host leaves (``None``, strings, other objects) stay in the structure.
    With ``packed`` False (no device: nothing needs one layout), a list of
    numbers inside the batch, ragged or empty, is a host leaf too: it comes
    back as the source made it, and may change from batch to batch.

    Raises:
        BatchError: If an array leaf holds Python objects, or a tensor cannot
            be viewed as NumPy (a CUDA tensor, say).
    """
    leaves = Leaves()
    return _describe(batch, "", leaves, True, packed), leaves


def _rebuild(treedef: TreeDef, leaves: Any) -> Any:
    if treedef.kind == "leaf":
        return next(leaves)
    if treedef.kind == "host":
        return treedef.value
    children = [_rebuild(child, leaves) for child in treedef.children]
    if treedef.kind == "dict":
        return dict(zip(treedef.keys, children, strict=True))
    if treedef.kind == "list":
        return children
    if treedef.node_type is not None:
        return treedef.node_type(*children)
    return tuple(children)


def rebuild(treedef: TreeDef, leaves: Sequence[Any]) -> Any:
    """Puts array leaves back into the structure ``describe`` took them from (host leaves too)."""
    return _rebuild(treedef, iter(leaves))


def map_arrays(
    treedef: TreeDef, metas: Sequence[LeafMeta], batch: Any, convert: Callable[[LeafMeta, Any], Any]
) -> Any:
    """Rebuilds ``batch`` (shaped as ``treedef``) with each array leaf ``convert(meta, leaf)``.

    Host leaves are left as they are.
    """
    arrays = iter(metas)

    def walk(node: TreeDef, value: Any) -> Any:
        if node.kind == "leaf":
            return convert(next(arrays), value)
        if node.kind == "host":
            return value
        if node.kind == "dict":
            return {k: walk(c, value[k]) for k, c in zip(node.keys, node.children, strict=True)}
        items = [walk(c, v) for c, v in zip(node.children, value, strict=True)]
        if node.kind == "list":
            return items
        return node.node_type(*items) if node.node_type is not None else tuple(items)

    return walk(treedef, batch)
