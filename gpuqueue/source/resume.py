"""Source stage, resume: a saved ``state_dict()`` checked, and regrouped for another world.

gpuqueue's orders (``order.ReadingOrder``, ``samplers.SampleOrder``) split an
epoch's shared order among ``w`` ranks by position (rank ``r`` takes ``r, r + w,
...``), so a state saved on any rank at a step, when every rank was at that
step (as under DDP), says how far all of them got together. That is what lets
a state resume every rank, and, through ``regroup``, another number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["check_length", "check_state", "regroup"]


def regroup(
    state: Mapping[str, Any],
    position: str,
    world_size: int,
    per_rank: Callable[[int, int, int], int],
) -> tuple[int, int, int]:
    """Where ``state`` resumes on ``world_size`` ranks: its epoch, position and split's start.

    On as many ranks as saved it, where it was (whichever rank saved it). On
    another number: every rank was at the same step (as under DDP), having
    received ``done`` of its ``per_rank(epoch, start, saved_world_size)``
    items of the split that began at ``start``; together the ranks received
    the first ``start + done * saved_world_size`` positions of the epoch's
    order (rank ``r`` takes ``r, r + w, ...``), and the new world's split
    starts there, at position 0: at the next epoch's beginning if the saved
    one was finished.

    Args:
        position: The state's field of where in the epoch (``"position"``, ``"sample"``).
        per_rank: Called only for another number of ranks; it raises where the
            state cannot be regrouped.
    """
    epoch, done, start = state["epoch"], state[position], state.get("start", 0)
    saved = saved_world_size(state, world_size)
    if saved == world_size:
        return epoch, done, start
    if done >= per_rank(epoch, start, saved):
        return epoch + 1, 0, 0
    return epoch, 0, start + done * saved


def check_state(
    state: Mapping[str, Any], mine: Mapping[str, Any], position: str, what: str = ""
) -> None:
    """Checks a saved ``state`` against an order's own (``mine``) before a resume.

    Args:
        position: The field that says where in the epoch (``"position"`` of a
            batch, ``"sample"``).
        what: Said after the missing fields (which kind of ``state_dict()``).

    The ``shard`` may differ: a state saved on any rank resumes every rank,
    and one saved on another number of ranks is regrouped (``regroup``).

    Raises:
        ValueError: If ``state`` lacks a field, disagrees on ``shuffle`` or
            ``drop_last``, or its epoch or position is not an int >= 0.
    """
    missing = {"epoch", position, "seed"} - set(state)
    if missing:
        raise ValueError(f"state is missing {sorted(missing)}{what}")
    for name in ("shuffle", "drop_last"):
        if name in state and tuple(np.atleast_1d(state[name])) != tuple(np.atleast_1d(mine[name])):
            raise ValueError(
                f"state has {name}={state[name]!r}, but this enqueuer has {name}={mine[name]!r}"
            )
    for name in ("epoch", position):
        if not isinstance(state[name], int) or state[name] < 0:
            raise ValueError(f"state {name} must be an int >= 0, got {state[name]!r}")


def saved_world_size(state: Mapping[str, Any], default: int) -> int:
    """How many ranks read when ``state`` was saved (``default`` for a state without a shard)."""
    if "shard" not in state:
        return default
    try:
        _rank, world_size = state["shard"]
    except (TypeError, ValueError):
        world_size = None
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"state shard must be (rank, world_size), got {state['shard']!r}")
    return world_size


def check_length(state: Mapping[str, Any], length: int, unit: str, what: str) -> int:
    """The length a state of another world size was saved over: this source's, or an error.

    Raises:
        ValueError: If the state does not say, or says another length: the
            rest of its epoch's order cannot be found in another source's.
    """
    saved = state.get("length")
    if saved is None:
        raise ValueError(
            "state has no length (saved by an older gpuqueue): it resumes only on as many "
            "ranks as saved it"
        )
    if saved != length:
        raise ValueError(
            f"state was saved over {saved} {unit}, this {what} has {length}: a resume on "
            f"another number of ranks splits the rest of the saved epoch's order among them, "
            f"which needs the {what} it was saved over"
        )
    return length
