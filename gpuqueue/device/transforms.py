"""Device stage, transforms: ``transform=``, on the copy stream before "ready".

A transform runs in the copy looper on each batch right after its copy, on
the copy stream, before the batch's "ready" event is recorded, so the
consumer's one wait on "ready" covers the copy and the transform. It gets
the batch as the backend's arrays (CuPy on a GPU, NumPy on the CPU), views
of the batch's device arena, and returns the new batch; what it returns is
converted to ``output`` afterwards. Who owns what it returns is
``arenas.py``'s business: views of the input keep the input's arena, new
device memory is freed in the stream order of its last user.

``transform=`` takes a callable (the whole batch) or a mapping from field
(a tuple index, a dict key, a named tuple's field name) to a callable, which
leaves the other fields as they are. ``Normalize`` (``normalize.py``) is the
ready-made one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import BatchError, add_note
from .normalize import Normalize

__all__ = ["BatchTransform", "as_transform"]


class BatchTransform:
    """A checked ``transform=``: a callable, or callables for some fields of the batch.

    Args:
        transform: A callable taking and returning a batch, or a mapping from
            field (int index, dict key, named-tuple field name) to a callable.

    Raises:
        TypeError: If ``transform`` is neither, or a field's value is not callable.
    """

    def __init__(self, transform: Any) -> None:
        self.whole: Callable[[Any], Any] | None = None
        self.fields: tuple[tuple[Any, Callable[[Any], Any]], ...] = ()
        if isinstance(transform, Mapping):
            if not transform:
                raise TypeError("transform= is an empty mapping; pass None for no transform")
            for key, function in transform.items():
                if isinstance(key, bool) or not isinstance(key, (int, str)):
                    raise TypeError(
                        f"transform= maps field {key!r}; fields are int indices or str keys"
                    )
                if not callable(function):
                    raise TypeError(
                        f"transform= maps field [{key!r}] to {function!r}, which is not callable"
                    )
            self.fields = tuple(transform.items())
        elif callable(transform):
            self.whole = transform
        else:
            raise TypeError(
                f"transform must be None, a callable or a mapping from field to callable, "
                f"got {transform!r}"
            )

    def functions(self) -> list[Callable[[Any], Any]]:
        return [self.whole] if self.whole is not None else [f for _, f in self.fields]

    def bfloat16_maker(self) -> Normalize | None:
        """A ``Normalize`` here that makes bfloat16 (which only some outputs have), if any."""
        for function in self.functions():
            if isinstance(function, Normalize) and function.dtype == "bfloat16":
                return function
        return None

    def __call__(self, batch: Any) -> Any:
        if self.whole is not None:
            return self.whole(batch)
        return _apply_fields(batch, self.fields)

    def __repr__(self) -> str:
        if self.whole is not None:
            return f"BatchTransform({self.whole!r})"
        return f"BatchTransform({dict(self.fields)!r})"


def as_transform(transform: Any) -> BatchTransform | None:
    """The checked form of a ``transform=`` argument (None stays None)."""
    if transform is None or isinstance(transform, BatchTransform):
        return transform
    return BatchTransform(transform)


def _apply_fields(batch: Any, fields: tuple[tuple[Any, Callable[[Any], Any]], ...]) -> Any:
    if isinstance(batch, dict):
        result = dict(batch)
        for key, function in fields:
            if key not in batch:
                raise BatchError(
                    f"transform= maps field [{key!r}], but the batch is a dict with keys "
                    f"{sorted(map(repr, batch))}"
                )
            result[key] = _call(function, batch[key], f"[{key!r}]")
        return result
    if isinstance(batch, (tuple, list)):
        items = list(batch)
        names = getattr(batch, "_fields", ())
        for key, function in fields:
            index = names.index(key) if isinstance(key, str) and key in names else key
            if not isinstance(index, int) or not -len(items) <= index < len(items):
                kind = type(batch).__name__
                raise BatchError(
                    f"transform= maps field [{key!r}], but the batch is a {kind} of "
                    f"{len(items)} fields" + (f" ({', '.join(names)})" if names else "")
                )
            index %= len(items)
            items[index] = _call(function, items[index], f"[{index}]")
        if isinstance(batch, list):
            return items
        return type(batch)(*items) if names else tuple(items)
    raise BatchError(
        f"transform= maps fields, but the batch is one {type(batch).__name__}, with no "
        "fields; pass the callable itself (transform=fn)"
    )


def _call(function: Callable[[Any], Any], value: Any, field: str) -> Any:
    if isinstance(function, Normalize):
        return function.apply(value, field)
    try:
        return function(value)
    except Exception as error:
        add_note(error, f"in transform= of field {field}")
        raise
