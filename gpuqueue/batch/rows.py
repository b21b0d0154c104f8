"""Batch, rows: a batch of samples laid out in one arena, each sample written at its row.

With ``batch_size=`` the host stage never stacks samples: ``row_layout``
gives each field of the batch (``source/collate.py``'s ``SampleSpec``) an
aligned offset in the slot, for as many rows as the batch has samples, and
``write_rows`` copies each sample's leaves straight into its row there.
That write is the batch's one host copy; the slot is then a staged batch
like any other (``layout.Staged``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..source.collate import Node, Samples
from .layout import ALIGNMENT
from .tree import LeafMeta, TreeDef

__all__ = ["row_layout", "write_rows"]


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _treedef(node: Node, hosts: list[list[Any]]) -> TreeDef:
    if node.kind == "field":
        return TreeDef("leaf")
    if node.kind == "host":
        return TreeDef("host", value=hosts[node.number])
    children = tuple(_treedef(child, hosts) for child in node.children)
    return TreeDef(node.kind, children, keys=node.keys, node_type=node.node_type)


def row_layout(
    samples: Samples, rows: int, hosts: list[list[Any]]
) -> tuple[TreeDef, list[LeafMeta], int]:
    """The batch's structure, its fields' layout for ``rows`` samples, and the bytes it needs.

    Args:
        samples: The batch's samples, with the layout they share.
        rows: How many samples the batch has.
        hosts: The host leaves, one list per leaf (they travel in the structure).
    """
    metas = []
    offset = 0
    for field in samples.spec.fields:
        shape = (rows, *field.shape)
        kind = "array" if field.kind == "number" else field.kind
        metas.append(LeafMeta(field.path, field.dtype, shape, offset, kind))
        offset = _align(offset + math.prod(shape) * field.dtype.itemsize)
    return _treedef(samples.spec.root, hosts), metas, offset


def write_rows(values: list[list[Any]], metas: list[LeafMeta], arena: Any) -> None:
    """Copies sample ``i``'s field values into row ``i`` of each field's place in ``arena``.

    Args:
        values: Per sample, its field values (checked by ``Samples.split``).
        metas: The fields' layout (``row_layout``).
        arena: A writable byte buffer (a pinned or shared-memory slot).
    """
    for number, meta in enumerate(metas):
        count = math.prod(meta.shape)
        target = np.frombuffer(arena, dtype=meta.dtype, count=count, offset=meta.offset)
        target = target.reshape(meta.shape)
        for row, sample_values in enumerate(values):
            target[row] = sample_values[number]
