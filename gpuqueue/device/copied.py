"""Device stage, what a copied batch holds: its arena, its "ready" event, and its leases.

An ``Owner`` names the stream of a batch's last user (the copy stream, then
the consumer's), so memory the batch holds is reused in that stream's order;
a ``Lease`` is the object whose death (the last view of the memory gone)
gives the memory back. ``arenas.py`` makes and reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..batch.tree import LeafMeta, TreeDef

__all__ = ["Copied", "DeviceArena", "Lease", "Owner"]


@dataclass(eq=False)
class DeviceArena:
    """Device memory for one batch at a time, and the event its last consumer recorded."""

    memory: Any
    capacity: int
    released: Any  # recorded on the consumer's stream when the last view of its batch died
    released_once: bool = False


@dataclass(eq=False)
class Copied:
    """A batch copied (or being copied) into an arena; ``ready`` marks the copy complete."""

    arena: DeviceArena
    ready: Any
    treedef: TreeDef
    metas: list[LeafMeta]
    nbytes: int
    transformed: bool = False
    batch: Any = None  # what the transform returned, until it is delivered
    kinds: list[str | None] | None = None  # per leaf of batch: the input leaf's kind if kept
    owner: Owner | None = None
    error: BaseException | None = None  # the transform raised it; nothing is left to deliver
    # Small leaves copied out of the arena (``batch.layout.small_leaves``): by position,
    # their memory and the lease whose death frees it. Until delivery only.
    small: dict[int, tuple[Any, Lease]] | None = None


class Owner:
    """The stream of a batch's last user: memory the batch holds is reused in its order.

    The copy stream while the batch is the copy stage's (a transform's
    temporaries, a batch dropped undelivered), the consumer's once delivered.
    """

    __slots__ = ("live", "stream")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.live = 0  # bytes the transform allocated for the batch and still held


class Lease:
    """Owns device memory: its finaliser runs when the last view of that memory dies."""

    __slots__ = ("__weakref__",)
