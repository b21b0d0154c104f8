from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

from gpuqueue import BatchError
from gpuqueue.batch.layout import ALIGNMENT, layout, pack, unpack
from gpuqueue.batch.spec import BatchSpec
from gpuqueue.batch.tree import describe, rebuild

Pair = namedtuple("Pair", ["x", "y"])


def spec_of(batch: object) -> BatchSpec:
    treedef, leaves = describe(batch)
    return BatchSpec.of(treedef, layout(leaves)[0])


def check(spec: BatchSpec, batch: object) -> None:
    treedef, leaves = describe(batch)
    spec.check(treedef, layout(leaves)[0], "batch index 7")


def test_describe_and_rebuild_keep_the_structure() -> None:
    batch = {"a": Pair(np.zeros(2), [np.ones((1, 2)), 3]), "b": (np.float32(1.5),)}
    treedef, leaves = describe(batch)
    assert [path for path, _ in leaves] == [
        "['a'][0]", "['a'][1][0]", "['a'][1][1]", "['b'][0]",
    ]  # fmt: skip
    rebuilt = rebuild(treedef, [a for _, a in leaves])
    assert isinstance(rebuilt["a"], Pair) and isinstance(rebuilt["a"].y, list)
    assert rebuilt["a"].y[1] == 3 and rebuilt["b"][0] == np.float32(1.5)


def test_describe_rejects_object_arrays() -> None:
    with pytest.raises(BatchError, match=r"^field \[0\] has dtype object, which holds"):
        describe((np.array([1, "a"], dtype=object),))


def test_spec_names_the_index_and_field_that_differs() -> None:
    spec = spec_of((np.zeros((4, 3), np.float32), {"y": np.zeros(4, np.int64)}))
    check(spec, (np.zeros((2, 3), np.float32), {"y": np.zeros(2, np.int64)}))  # short batch: fine
    with pytest.raises(
        BatchError,
        match=r"^batch index 7: field \[1\]\['y'\] has dtype int32, expected int64 as in the first",
    ):
        check(spec, (np.zeros((4, 3), np.float32), {"y": np.zeros(4, np.int32)}))
    with pytest.raises(
        BatchError,
        match=r"^batch index 7: field \[0\] has rank 1 \(shape \(12,\)\), expected rank 2",
    ):
        check(spec, (np.zeros(12, np.float32), {"y": np.zeros(4, np.int64)}))
    with pytest.raises(BatchError, match=r"^batch index 7: structure differs from the first batch"):
        check(spec, (np.zeros((4, 3), np.float32), {"z": np.zeros(4, np.int64)}))
    with pytest.raises(BatchError, match=r"^batch index 7: structure differs"):
        check(spec, [np.zeros((4, 3), np.float32), {"y": np.zeros(4, np.int64)}])


def test_pack_unpack_round_trip_odd_layouts() -> None:
    fortran = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    strided = np.arange(20, dtype=np.int16)[::3]
    batch = (fortran, strided, np.zeros((0, 5), np.float32), np.bool_(True), {"k": np.uint8(7)})
    treedef, leaves = describe(batch)
    metas, nbytes = layout(leaves)
    assert all(m.offset % ALIGNMENT == 0 for m in metas)
    arena = bytearray(nbytes)
    pack(leaves, metas, arena)
    out = unpack(treedef, metas, arena)
    assert np.array_equal(out[0], fortran) and np.array_equal(out[1], strided)
    assert out[2].shape == (0, 5) and bool(out[3]) and int(out[4]["k"]) == 7


def test_a_dict_with_its_keys_in_another_order_is_the_same_batch() -> None:
    """Regression: the structure check took keys as a set, the dtype check went by position."""
    spec = spec_of({"a": np.zeros(3, np.float32), "b": np.zeros((2, 2), np.int64)})
    check(spec, {"b": np.ones((1, 2), np.int64), "a": np.ones(3, np.float32)})
    with pytest.raises(
        BatchError, match=r"^batch index 7: field \['b'\] has dtype int32, expected int64 as in"
    ):
        check(spec, {"b": np.ones((1, 2), np.int32), "a": np.ones(3, np.float32)})
    nested = spec_of({"x": {"p": np.zeros(1), "q": (np.zeros(1),)}, "y": np.zeros(1)})
    check(nested, {"y": np.zeros(1), "x": {"q": (np.zeros(1),), "p": np.zeros(1)}})
    with pytest.raises(BatchError, match=r"^batch index 7: structure differs from the first"):
        check(nested, {"y": np.zeros(1), "x": {"q": np.zeros(1), "p": (np.zeros(1),)}})


def test_without_packing_only_the_structure_is_checked() -> None:
    spec = spec_of({"a": np.zeros(3, np.float32)})
    treedef, leaves = describe({"a": np.zeros((3, 3), np.uint8)})
    spec.check(treedef, layout(leaves)[0], "batch index 7", dtypes=False)
    treedef, leaves = describe({"b": np.zeros(3, np.float32)})
    with pytest.raises(BatchError, match=r"^batch index 7: structure differs from the first"):
        spec.check(treedef, layout(leaves)[0], "batch index 7", dtypes=False)
