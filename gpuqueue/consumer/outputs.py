"""Consumer stage, outputs: one row per ``output=`` library, and the conversions it makes.

Each row of ``OUTPUTS`` says everything gpuqueue knows of one library: the
module it needs (found without importing it, so ``import gpuqueue`` imports
none of them) and how to install it, whether it has a bfloat16 dtype, whether
it needs a device, whether the consumer's work runs on PyTorch's current
stream, and how a backend array becomes one of its arrays. Adding an output
framework is one row and its converter.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Backend
from ..batch.layout import ml_bfloat16
from ..batch.tree import LeafMeta, TreeDef, flatten, map_arrays, rebuild, tensor_array
from ..device.normalize import BFloat16
from ..errors import BatchError, PipelineError

__all__ = [
    "OUTPUTS",
    "HostOutput",
    "Output",
    "check_installed",
    "consumer_stream",
    "host_output",
    "keep",
    "to_output",
    "transformed_output",
]

# ``convert(kind, path, leaf)``: a backend array (the leaf at ``path``, of
# ``LeafMeta.kind`` ``kind``) as the output library's array.
Converter = Callable[[str, str, Any], Any]

# Leaf kinds carried as 16-bit patterns: a torch.bfloat16 tensor, a transform's BFloat16,
# an ml_dtypes bfloat16 array.
_BFLOAT16 = ("torch:bfloat16", "bfloat16", "ml:bfloat16")


def _backend_arrays(backend: Backend, stream: Any) -> Converter:
    """The backend's own arrays (CuPy, or NumPy on the CPU), which have no bfloat16."""

    def convert(kind: str, path: str, leaf: Any) -> Any:
        if kind == "ml:bfloat16" and isinstance(leaf, np.ndarray):
            return leaf.view(ml_bfloat16())  # NumPy has it, through ml_dtypes
        if kind in _BFLOAT16:
            what = "a torch.bfloat16 tensor" if kind == "torch:bfloat16" else "bfloat16"
            raise BatchError(
                f"field {path} is {what}, which NumPy and CuPy have no dtype for; "
                "use output='torch' or output='jax'"
            )
        return leaf

    return convert


def _torch_tensors(backend: Backend, stream: Any) -> Converter:
    import torch
    import torch.utils.dlpack

    def to_torch(leaf: Any) -> Any:
        if backend.name != "cupy":
            try:
                return torch.from_numpy(leaf)
            except (TypeError, ValueError):
                # A host batch handed over as it is (device="auto" without a GPU) may
                # hold what torch cannot view: negative strides, non-native byte order.
                return torch.from_numpy(np.ascontiguousarray(leaf, leaf.dtype.newbyteorder("=")))
        # The batch is already ordered on the consumer's stream (one event for
        # the whole batch), so each leaf is exported with no stream order of
        # its own (DLPack's stream -1): no event per tensor.
        return torch.utils.dlpack.from_dlpack(leaf.__dlpack__(stream=-1))

    def convert(kind: str, path: str, leaf: Any) -> Any:
        tensor = to_torch(leaf)
        return tensor.view(torch.bfloat16) if kind in _BFLOAT16 else tensor

    return convert


def _jax_arrays(backend: Backend, stream: Any) -> Converter:
    # JAX orders its read after CuPy's current stream of the thread's current
    # device: on a GPU that must be the batch's device and ``stream``, the one
    # the batch is ordered on, whatever device the consumer has current.
    import jax.dlpack
    import jax.numpy as jnp

    export_scope = getattr(backend, "export_scope", None)

    def convert(kind: str, path: str, leaf: Any) -> Any:
        try:
            if export_scope is None:
                array = jax.dlpack.from_dlpack(leaf)
            else:
                with export_scope(stream):
                    array = jax.dlpack.from_dlpack(leaf)
        except BufferError:  # a read-only NumPy array: DLPack cannot say so
            array = jnp.asarray(leaf)
        return array.view(jnp.bfloat16) if kind in _BFLOAT16 else array

    return convert


@dataclass(frozen=True)
class Output:
    """One ``output=`` choice.

    Attributes:
        module: The module it needs, looked up when an enqueuer is built;
            None for the backend's own arrays.
        library: Its name, for messages.
        install: How to install it, for the message when it is missing.
        bfloat16: It has a bfloat16 dtype (a bfloat16 leaf can be delivered).
        needs_device: Its arrays come through DLPack from the device path.
        torch_stream: The consumer's work runs on PyTorch's current stream.
        converter: Makes the ``convert`` of a backend, for batches ordered on
            the consumer's stream it is given.
    """

    module: str | None
    library: str
    install: str
    bfloat16: bool
    needs_device: bool
    torch_stream: bool
    converter: Callable[[Backend, Any], Converter]


OUTPUTS: dict[str | None, Output] = {
    None: Output(None, "the backend's arrays", "", False, False, False, _backend_arrays),
    "cupy": Output(
        "cupy",
        "CuPy",
        "install gpuqueue[cuda12] or gpuqueue[cuda13]",
        False,
        False,
        False,
        _backend_arrays,
    ),
    "numpy": Output(None, "NumPy", "", False, False, False, _backend_arrays),
    "torch": Output(
        "torch",
        "PyTorch",
        "install gpuqueue[torch] (or torch itself)",
        True,
        True,
        True,
        _torch_tensors,
    ),
    "jax": Output(
        "jax",
        "JAX",
        "install gpuqueue[jax] (or jax[cpu], jax[cuda12])",
        True,
        True,
        False,
        _jax_arrays,
    ),
}


def check_installed(output: str | None) -> None:
    """Raises ``PipelineError`` naming the extra if ``output``'s library is missing.

    Looks the module up without importing it, so that building an enqueuer
    stays cheap and ``import gpuqueue`` imports none of them.
    """
    row = OUTPUTS[output]
    if row.module is None:
        return
    try:
        found = importlib.util.find_spec(row.module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise PipelineError(
            f"output={output!r} needs {row.library}, which is not installed: {row.install}"
        )


def consumer_stream(backend: Backend, output: str | None, stream: Any) -> Any:
    """The stream the consumer's work runs on: ``stream`` if given, else the current one."""
    if stream is not None:
        return backend.as_stream(stream)
    if OUTPUTS[output].torch_stream and hasattr(backend, "torch_stream"):
        return backend.torch_stream()
    return backend.current_stream()


def to_output(
    output: str | None,
    backend: Backend,
    batch: Any,
    treedef: TreeDef,
    metas: list[LeafMeta],
    stream: Any,
) -> Any:
    """Converts the device batch's array leaves to the library ``output`` names.

    Host leaves (``None``, strings) pass through. A ``bfloat16`` tensor, which
    travels as its bits, becomes ``bfloat16`` again in torch and JAX; NumPy
    and CuPy have no such dtype, so without one of those it is an error.
    ``stream`` is the consumer's, which the batch is ordered on.
    """
    convert = OUTPUTS[output].converter(backend, stream)
    return map_arrays(treedef, metas, batch, lambda meta, leaf: convert(meta.kind, meta.path, leaf))


# ``as_output(treedef, metas, batch)``: a host batch (shaped as ``treedef``, its
# array leaves described by ``metas``) as the output library's batch.
HostOutput = Callable[[TreeDef, Sequence[LeafMeta], Any], Any]


def host_output(output: str | None, backend: Backend) -> HostOutput:
    """The batches of ``device="auto"`` on a machine without a GPU: the host's, made outputs.

    There the device would be the host itself, and staging a batch would
    only copy it; so the worker's batch is delivered, its array leaves
    turned into what the device path gives on the CPU (the table in the
    README): NumPy arrays stay the same arrays, a torch tensor is a NumPy
    view of its memory, a Python number a 0-d array (lists of numbers stay
    lists, as with ``device=None``, which describes them as such), and with
    ``output="torch"`` or ``"jax"`` each becomes a tensor or array over the
    same memory. A copy is made only where no view can be (a strided or
    byte-swapped array that torch cannot view).
    """
    convert = OUTPUTS[output].converter(backend, None)  # (the host: no stream)

    def leaf_output(meta: LeafMeta, leaf: Any) -> Any:
        return convert(*_host_array(meta, leaf))

    def as_output(treedef: TreeDef, metas: Sequence[LeafMeta], batch: Any) -> Any:
        return map_arrays(treedef, metas, batch, leaf_output)

    return as_output


def _host_array(meta: LeafMeta, leaf: Any) -> tuple[str, str, np.ndarray]:
    """A source's array leaf as NumPy (a view where it is one already: a tensor's).

    Returns the leaf's kind, its path and the array. An ml_dtypes bfloat16
    array becomes its bits, of kind ``"ml:bfloat16"``, as on the device path.
    """
    if isinstance(leaf, np.ndarray):
        if leaf.dtype.kind == "V" and leaf.dtype.name == "bfloat16":
            return "ml:bfloat16", meta.path, leaf.view(np.int16)
        return meta.kind, meta.path, leaf
    if meta.kind.startswith("torch"):
        return meta.kind, meta.path, tensor_array(meta.path, leaf)[0]
    return meta.kind, meta.path, np.asarray(leaf)


def transformed_output(
    output: str | None, backend: Backend, batch: Any, kinds: list[str | None], stream: Any
) -> Any:
    """A transform's batch in the ``output`` library: any structure, any leaves.

    The backend's arrays are converted (``BFloat16`` to bfloat16, and leaves
    the transform handed back as they came keep their kind); other leaves
    pass through. A PyTorch CUDA tensor the transform made on the copy
    stream is recorded on the consumer's stream (``record_stream``), so
    PyTorch's allocator reuses its memory only after the consumer's work.
    """
    convert = OUTPUTS[output].converter(backend, stream)
    array_type = getattr(backend, "array_type", np.ndarray)
    torch_stream = None
    treedef, leaves = flatten(batch)
    converted = []
    for (path, leaf), kind in zip(leaves, kinds, strict=True):
        if isinstance(leaf, BFloat16):
            converted.append(convert("bfloat16", path, leaf.bits))
        elif isinstance(leaf, array_type):
            converted.append(convert(kind or "array", path, leaf))
        else:
            if getattr(leaf, "is_cuda", False) and hasattr(leaf, "record_stream"):
                if torch_stream is None:
                    torch_stream = backend.torch_stream_of(stream)  # type: ignore[attr-defined]
                leaf.record_stream(torch_stream)
            converted.append(leaf)
    return rebuild(treedef, converted)


def keep(batch: Any) -> Any:
    """Copies a batch: its arrays and tensors are copied, other leaves are kept as they are.

    Batches are their takers' already (they stay valid as long as they are
    held), so this is for code written for the older "valid until the next
    get" rule, or that wants a copy anyway. Works for CuPy, NumPy, PyTorch
    and JAX leaves (host leaves such as ``None`` or strings are returned as
    they are); a device copy is ordered on the current stream like any other
    work. With an enqueuer given an explicit ``stream``, call it with that
    stream current (``with stream:``), since only that stream is ordered
    after the batch's copy.
    """
    treedef, leaves = flatten(batch)
    return rebuild(treedef, [_copy_leaf(leaf) for _, leaf in leaves])


def _copy_leaf(leaf: Any) -> Any:
    if hasattr(leaf, "clone"):  # torch
        return leaf.clone()
    if hasattr(leaf, "copy") and hasattr(leaf, "shape"):  # NumPy, CuPy, JAX
        return leaf.copy()
    return leaf  # a host leaf (None, a string): never in a reused slot
