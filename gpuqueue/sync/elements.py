"""Sync, elements: what a ``FIFOQueue`` made with ``dtypes``/``shapes``/``names`` holds.

TensorFlow's queues hold tuples (or dicts) of tensors of given dtypes and
shapes; ``ElementSpec`` checks and converts what is enqueued to that form and
splits and stacks the ``*_many`` forms. A queue built without them holds any
Python object, and never touches this module's checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["ElementSpec", "as_dtype", "as_shape"]


def as_dtype(dtype: Any) -> np.dtype[Any]:
    numpy_dtype = getattr(dtype, "as_numpy_dtype", dtype)  # a TensorFlow DType
    try:
        converted: np.dtype[Any] = np.dtype(numpy_dtype)
        return converted
    except TypeError:
        raise TypeError(f"dtypes: {dtype!r} is not a dtype NumPy knows") from None


def as_shape(shape: Any) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    if hasattr(shape, "as_list"):  # a TensorFlow TensorShape
        shape = shape.as_list()
    return tuple(None if dim is None else int(dim) for dim in shape)


class ElementSpec:
    """The dtypes (and shapes, names) of a typed queue's elements: checks and converts them."""

    def __init__(
        self,
        dtypes: tuple[np.dtype[Any], ...],
        shapes: tuple[tuple[int | None, ...] | None, ...],
        names: tuple[str, ...] | None,
    ) -> None:
        self.dtypes, self.shapes, self.names = dtypes, shapes, names

    @classmethod
    def of(cls, dtypes: Any, shapes: Any, names: Any) -> ElementSpec | None:
        if dtypes is None:
            if shapes is not None or names is not None:
                raise ValueError("shapes and names need dtypes")
            return None
        single = not isinstance(dtypes, (list, tuple))
        dtype_list = tuple(as_dtype(d) for d in ([dtypes] if single else dtypes))
        if shapes is None:
            shape_list: tuple[Any, ...] = (None,) * len(dtype_list)
        else:
            given = [shapes] if single else list(shapes)
            if len(given) != len(dtype_list):
                raise ValueError(f"{len(given)} shapes for {len(dtype_list)} dtypes")
            shape_list = tuple(as_shape(s) for s in given)
        name_list = None
        if names is not None:
            name_list = (names,) if isinstance(names, str) else tuple(names)
            if len(name_list) != len(dtype_list):
                raise ValueError(f"{len(name_list)} names for {len(dtype_list)} dtypes")
        return cls(dtype_list, shape_list, name_list)

    def _components(self, vals: Any) -> list[Any]:
        if self.names is not None:
            if not isinstance(vals, Mapping) or set(vals) != set(self.names):
                got = sorted(vals) if isinstance(vals, Mapping) else type(vals).__name__
                raise ValueError(f"expected a dict with keys {sorted(self.names)}, got {got}")
            return [vals[key] for key in self.names]
        if len(self.dtypes) == 1 and not isinstance(vals, (list, tuple)):
            return [vals]
        if not isinstance(vals, (list, tuple)) or len(vals) != len(self.dtypes):
            count = len(vals) if isinstance(vals, (list, tuple)) else 1
            raise ValueError(f"expected {len(self.dtypes)} components, got {count}")
        return list(vals)

    def _array(self, position: int, value: Any, leading: bool) -> np.ndarray:
        dtype, shape = self.dtypes[position], self.shapes[position]
        array = np.asarray(value)
        if array.dtype != dtype:
            # Python numbers and lists convert as TensorFlow converts them; no narrowing.
            if isinstance(value, (np.ndarray, np.generic)) or not np.can_cast(
                array.dtype, dtype, "same_kind"
            ):
                raise TypeError(f"component {position} has dtype {array.dtype}, expected {dtype}")
            array = array.astype(dtype)
        actual = array.shape[1:] if leading else array.shape
        if shape is not None and (
            len(actual) != len(shape)
            or any(
                want is not None and got != want for got, want in zip(actual, shape, strict=True)
            )
        ):
            raise ValueError(f"component {position} has shape {actual}, expected {shape}")
        return array

    def element(self, vals: Any) -> tuple[np.ndarray, ...]:
        parts = self._components(vals)
        return tuple(self._array(i, v, leading=False) for i, v in enumerate(parts))

    def split(self, vals: Any) -> Iterable[tuple[np.ndarray, ...]]:
        parts = self._components(vals)
        arrays = [self._array(i, v, leading=True) for i, v in enumerate(parts)]
        counts = {len(a) if a.ndim else -1 for a in arrays}
        if len(counts) != 1 or -1 in counts:
            raise ValueError(
                f"enqueue_many needs one first dimension for every component, got {counts}"
            )
        return [tuple(a[k] for a in arrays) for k in range(counts.pop())]

    def output(self, components: tuple[np.ndarray, ...]) -> Any:
        if self.names is not None:
            return dict(zip(self.names, components, strict=True))
        return components[0] if len(components) == 1 else list(components)
