"""Source stage, collate: samples → one batch, by torch's ``default_collate`` rules.

With ``batch_size=`` a source's items are samples. The first sample of a
run fixes the batch's layout (``SampleSpec``): each of its leaves becomes
one field of the batch, with the samples along a new first axis.

- NumPy arrays, NumPy scalars and torch CPU tensors are stacked (a tensor
  field comes back as a tensor where the host hands batches over as they are);
- Python numbers become a 1-d array: ``int`` → int64, ``float`` → float64,
  ``bool`` → bool, as torch makes them (``complex`` → complex128);
- ``str``, ``bytes`` and ``None`` are gathered into a list, which travels
  on the host beside the batch;
- tuples (named ones too), lists and dicts are walked recursively: the
  batch has the sample's structure.

A later sample whose structure, dtype or shape differs is a ``BatchError``
naming the sample index and the field, and suggesting ``collate=``.

Where the batch goes to a device (or through worker processes) nothing is
stacked here: the host stage writes each sample's leaves straight into its
row of the batch's pinned or shared-memory slot (``batch/rows.py``), the one
host copy. Only the host-only path with threads, which has no slot, builds
the batch here, with one stack (``default_collate``).

``samples.py`` reads a batch's samples and hands them over as ``Samples``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BatchError

__all__ = [
    "Field",
    "Node",
    "SampleSpec",
    "Samples",
    "default_collate",
    "warn_if_a_sample",
]

_HOST_TYPES = (str, bytes, type(None))
# Python number type → the dtype torch gives a batch of them.
_NUMBER_DTYPES: dict[type, np.dtype[Any]] = {
    bool: np.dtype(np.bool_),
    int: np.dtype(np.int64),
    float: np.dtype(np.float64),
    complex: np.dtype(np.complex128),
}
_HINT = (
    "the samples of a batch must match the first one; pass collate= (a function from the "
    "list of samples to one batch) to pad or batch them yourself"
)


@dataclass(frozen=True)
class Field:
    """One array field of the batch, as the first sample gave it.

    Attributes:
        path: Names the field in messages, as ``[0]['image']``.
        dtype: Every sample's dtype for it.
        shape: Every sample's shape for it (``()`` for a number).
        kind: ``"array"``, ``"number"`` (a Python number), ``"torch"`` or
            ``"torch:bfloat16"`` (a tensor, viewed as NumPy without a copy).
        number_type: The Python type of a ``"number"`` field.
    """

    path: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    kind: str
    number_type: type | None = None

    def kind_name(self) -> str:
        """What the field's values are, with an article: ``"an int"``, ``"an array"``."""
        return _article(self.number_type.__name__ if self.number_type is not None else "array")


@dataclass(frozen=True)
class Node:
    """The first sample's structure: ``kind`` is ``"field"``, ``"host"``, ``"tuple"``,
    ``"list"`` or ``"dict"``; ``number`` is the field's or host leaf's position."""

    kind: str
    children: tuple[Node, ...] = ()
    keys: tuple[Any, ...] = ()
    node_type: type | None = None
    number: int = -1
    path: str = ""


def _is_tensor(leaf: Any) -> bool:
    return type(leaf).__module__.split(".")[0] == "torch" and hasattr(leaf, "numpy")


def _tensor_view(tensor: Any, path: str) -> tuple[np.ndarray, str]:
    """A NumPy view of a CPU tensor and its kind (bfloat16 travels as its 16-bit pattern)."""
    if tensor.device.type != "cpu":
        raise BatchError(
            f"field {path} is a torch tensor on {tensor.device}; return CPU tensors from the "
            "dataset (the copy to the device is gpuqueue's job)"
        )
    tensor = tensor.detach()
    if str(tensor.dtype) == "torch.bfloat16":
        import torch

        return tensor.view(torch.int16).numpy(), "torch:bfloat16"
    return tensor.numpy(), "torch"


class SampleSpec:
    """The first sample's layout: what every later sample of the run must match.

    Args:
        sample: The first sample.
        index: Its index (names it in messages).

    Raises:
        BatchError: If a leaf is neither an array, a tensor, a number, nor a
            str, bytes or None (the default collate has no rule for it).
    """

    def __init__(self, sample: Any, index: Any) -> None:
        self.fields: list[Field] = []
        self.host_paths: list[str] = []
        self.root = self._node(sample, "", index)

    def _node(self, value: Any, path: str, index: Any) -> Node:
        if isinstance(value, dict):
            keys = tuple(value)
            children = tuple(self._node(value[k], f"{path}[{k!r}]", index) for k in keys)
            return Node("dict", children, keys=keys, path=path)
        if isinstance(value, (tuple, list)):
            kind = "list" if isinstance(value, list) else "tuple"
            node_type = type(value) if hasattr(value, "_fields") else None
            children = tuple(
                self._node(item, f"{path}[{i}]", index) for i, item in enumerate(value)
            )
            return Node(kind, children, node_type=node_type, path=path)
        where = path or "<sample>"
        if isinstance(value, _HOST_TYPES):
            self.host_paths.append(where)
            return Node("host", number=len(self.host_paths) - 1, path=where)
        number_type = type(value) if type(value) in _NUMBER_DTYPES else None
        if number_type is not None:
            field = Field(where, _NUMBER_DTYPES[number_type], (), "number", number_type)
        else:
            array, kind = _leaf_array(value, where, index)
            field = Field(where, array.dtype, array.shape, kind)
        self.fields.append(field)
        return Node("field", number=len(self.fields) - 1, path=where)

    def split(self, sample: Any, index: Any) -> tuple[list[Any], list[Any]]:
        """A sample's field values (arrays or numbers) and host leaves, checked against the first.

        Raises:
            BatchError: Naming ``index`` and the field, if its structure,
                dtype or shape differs from the first sample's.
        """
        values: list[Any] = []
        hosts: list[Any] = []
        self._split(self.root, sample, index, values, hosts)
        return values, hosts

    def _split(
        self, node: Node, value: Any, index: Any, values: list[Any], hosts: list[Any]
    ) -> None:
        kind = node.kind
        if kind == "field":
            field = self.fields[node.number]
            if field.kind == "number":
                if type(value) is not field.number_type:
                    raise _mismatch(
                        index, field.path, f"is {_what(value)}, expected {field.kind_name()}"
                    )
                values.append(value)
                return
            if type(value) is not np.ndarray:
                if isinstance(value, (*_HOST_TYPES, dict, tuple, list, *_NUMBER_DTYPES)):
                    raise _mismatch(index, field.path, f"is {_what(value)}, expected an array")
                value, _ = _leaf_array(value, field.path, index)
            if value.shape != field.shape:
                raise _mismatch(
                    index, field.path, f"has shape {value.shape}, expected {field.shape}"
                )
            if value.dtype != field.dtype:
                raise _mismatch(
                    index, field.path, f"has dtype {value.dtype}, expected {field.dtype}"
                )
            values.append(value)
        elif kind == "host":
            if not isinstance(value, _HOST_TYPES):
                raise _mismatch(
                    index, node.path, f"is {_what(value)}, expected a str, bytes or None"
                )
            hosts.append(value)
        elif kind == "dict":
            if not isinstance(value, dict) or set(value) != set(node.keys):
                found = sorted(map(repr, value)) if isinstance(value, dict) else _what(value)
                raise _mismatch(
                    index,
                    node.path or "<sample>",
                    f"is {found}, expected a dict with keys {sorted(map(repr, node.keys))}",
                )
            for key, child in zip(node.keys, node.children, strict=True):
                self._split(child, value[key], index, values, hosts)
        else:
            wanted = list if kind == "list" else tuple
            if not isinstance(value, wanted) or len(value) != len(node.children):
                got = (
                    f"{_what(value)} of {len(value)}"
                    if isinstance(value, (tuple, list))
                    else _what(value)
                )
                raise _mismatch(
                    index,
                    node.path or "<sample>",
                    f"is {got}, expected a {kind} of {len(node.children)} items",
                )
            for child, item in zip(node.children, value, strict=True):
                self._split(child, item, index, values, hosts)

    def build(self, fields: Sequence[Any], hosts: Sequence[list[Any]]) -> Any:
        """A batch shaped as the sample: each field from ``fields``, each host leaf a list."""
        return self._build(self.root, fields, hosts)

    def _build(self, node: Node, fields: Sequence[Any], hosts: Sequence[list[Any]]) -> Any:
        if node.kind == "field":
            return fields[node.number]
        if node.kind == "host":
            return hosts[node.number]
        children = [self._build(child, fields, hosts) for child in node.children]
        if node.kind == "dict":
            return dict(zip(node.keys, children, strict=True))
        if node.kind == "list":
            return children
        return node.node_type(*children) if node.node_type is not None else tuple(children)


def _article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _what(value: Any) -> str:
    return _article(type(value).__name__)


def _mismatch(index: Any, path: str, difference: str) -> BatchError:
    return BatchError(f"sample {index}: field {path} {difference} as in the first sample; {_HINT}")


def _leaf_array(value: Any, path: str, index: Any) -> tuple[np.ndarray, str]:
    """A sample's array leaf as NumPy (no copy for arrays and tensors), and its kind."""
    if isinstance(value, np.ndarray):
        array, kind = value, "array"
    elif isinstance(value, np.generic):
        array, kind = np.asarray(value), "array"
    elif _is_tensor(value):
        array, kind = _tensor_view(value, path)
    elif hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"):
        array, kind = np.asarray(value), "array"
    else:
        raise BatchError(
            f"sample {index}: field {path} is {_what(value)}; the default collate stacks "
            "arrays, tensors and numbers and gathers str, bytes and None into lists. Pass "
            "collate= (a function from the list of samples to one batch) for anything else"
        )
    if array.dtype.hasobject:
        raise BatchError(
            f"sample {index}: field {path} has dtype {array.dtype}, which holds Python "
            "objects; expected a numeric or boolean dtype"
        )
    return array, kind


@dataclass
class Samples:
    """The samples of one batch, read and not yet collated, and the layout they must match.

    Attributes:
        samples: The samples, in the batch's order.
        indices: Each sample's index (the dataset's, or its position in an
            iterable), for messages.
        spec: The first sample's layout (of this batch, or of an earlier one).
    """

    samples: list[Any]
    indices: Sequence[Any]
    spec: SampleSpec

    def split(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """Each sample's field values and host leaves, checked against ``spec``."""
        spec = self.spec
        pairs = [
            spec.split(sample, index)
            for sample, index in zip(self.samples, self.indices, strict=True)
        ]
        return [values for values, _ in pairs], [hosts for _, hosts in pairs]

    def host_lists(self, hosts: list[list[Any]]) -> list[list[Any]]:
        """The host leaves gathered per leaf: one list each, in sample order."""
        return [[row[number] for row in hosts] for number in range(len(self.spec.host_paths))]


def default_collate(spec: SampleSpec, values: list[list[Any]], hosts: list[list[Any]]) -> Any:
    """One batch of the samples ``Samples.split`` gave, each field stacked once.

    For the host path with threads, which has no slot to write into. Tensor
    fields come back as tensors, the rest as NumPy arrays; host leaves as lists.
    """
    count = len(values)
    fields: list[Any] = []
    for number, field in enumerate(spec.fields):
        stacked = np.empty((count, *field.shape), dtype=field.dtype)
        for row, sample_values in enumerate(values):
            stacked[row] = sample_values[number]
        fields.append(_as_kind(stacked, field.kind))
    return spec.build(fields, hosts)


def _as_kind(array: np.ndarray, kind: str) -> Any:
    if not kind.startswith("torch"):
        return array
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if kind == "torch:bfloat16" else tensor


def warn_if_a_sample(metas: Sequence[Any], where: str) -> bool:
    """Warns if a batch read as a whole looks like one sample: 0-d leaves beside arrays.

    A batch's label is a 1-d array; a lone number beside an image is what a
    per-sample dataset returns, read as a batch of one (training then runs at
    batch size 1, silently). ``metas`` are the batch's leaves (``LeafMeta``).

    Returns:
        True if it warned.
    """
    scalars = [meta.path for meta in metas if meta.shape == ()]
    if not scalars or len(scalars) == len(metas):
        return False
    warnings.warn(
        f"{where} looks like one sample, not a batch: field {scalars[0]} is a single number "
        "beside arrays. If the source gives one sample per index, pass batch_size= to read "
        "samples and batch them; if it gives batches, make that field a 1-d array",
        UserWarning,
        stacklevel=2,
    )
    return True
