"""Backends: where batches go. A registry that imports CuPy only when asked.

``resolve(device)`` turns the user's ``device`` argument into a backend:

- ``"cpu"``: the NumPy backend (the same pipeline, host memory);
- ``"auto"``: CuPy on the default GPU if CuPy imports and a GPU is usable,
  else NumPy, saying which at debug level. The default GPU is the local
  rank's under a launcher (``LOCAL_RANK`` and the like), else the calling
  thread's current CUDA device;
- ``"cuda"``: the default GPU, or a clear error naming what was asked;
- an int or ``"cuda:N"``: CuPy on that GPU, or a clear error naming the extra
  to install;
- ``"simulated"``: NumPy memory with late, stream-ordered copies (tests);
- a backend object: used as is.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from ..errors import PipelineError
from .base import Backend

__all__ = ["Backend", "check_device", "resolve"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install gpuqueue[cuda12] or gpuqueue[cuda13] (CuPy for your CUDA version)"


# Launchers' local-rank variables, in the order they are tried: torchrun, Open
# MPI, MPICH and Intel MPI, SLURM. One process per GPU: the local rank picks it.
LOCAL_RANK_VARIABLES = (
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
)


def _local_rank() -> tuple[str, int] | None:
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            try:
                return name, int(value)
            except ValueError:
                raise PipelineError(f"{name}={value!r} must be an integer") from None
    return None


def _cupy_backend(asked: Any, index: int | None) -> Backend:
    """CuPy on GPU ``index``; None means the local rank's GPU, else the current device."""
    try:
        from . import cupy as cupy_backend
    except ImportError as error:
        raise PipelineError(
            f"device={asked!r} needs CuPy, which is not installed: {_INSTALL_HINT}"
        ) from error
    try:
        count = cupy_backend.device_count()
    except Exception as error:
        raise PipelineError(
            f"device={asked!r} needs a CUDA GPU, but CUDA is not usable here ({error}); "
            f"check the driver, or {_INSTALL_HINT}"
        ) from error
    if count < 1:
        raise PipelineError(f"device={asked!r} needs a CUDA GPU, but none is visible")
    if index is None:
        local = _local_rank()
        if local is not None:
            name, index = local
            if not 0 <= index < count:
                raise PipelineError(
                    f"device={asked!r} is the local rank's GPU, but {name}={index} and only "
                    f"{count} GPU(s) are visible; give each process its own GPU, or pass "
                    "device=N to share one"
                )
        else:
            index = cupy_backend.current_device()
    if not 0 <= index < count:
        raise PipelineError(f"device={asked!r} does not exist: {count} GPU(s) visible")
    return cupy_backend.CupyBackend(index)


def _device_index(device: Any) -> int | None:
    """The GPU index in ``device``; None for ``"cuda"`` (the default GPU) or another form."""
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        match = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", device)
        if match and match.group(1) is not None:
            return int(match.group(1))
    return None


def _names_a_gpu(device: Any) -> bool:
    return _device_index(device) is not None or device in ("cuda", "gpu")


def check_device(device: Any) -> None:
    """Raises ``ValueError`` unless ``device`` has an accepted form; creates nothing."""
    if device in ("cpu", "simulated", "auto") or _names_a_gpu(device):
        return
    if hasattr(device, "copy_to_device") and hasattr(device, "alloc_device"):
        return
    raise ValueError(
        f"device must be None, 'auto', 'cpu', an int, 'cuda:N' or a backend, got {device!r}"
    )


def resolve(device: Any) -> Backend:
    """Returns the backend for a ``device`` argument.

    Raises:
        PipelineError: If a GPU was asked for and none is usable.
        ValueError: If ``device`` is not one of the accepted forms.
    """
    if device == "cpu":
        from .numpy import NumpyBackend

        return NumpyBackend()
    if device == "simulated":
        from .simulated import SimulatedBackend

        return SimulatedBackend()
    if device == "auto":
        try:
            backend = _cupy_backend(device, None)
        except PipelineError as error:
            logger.debug("device='auto': using NumPy, because %s", error)
            from .numpy import NumpyBackend

            return NumpyBackend()
        logger.debug("device='auto': using CuPy on GPU %s", backend.device)
        return backend
    check_device(device)
    if _names_a_gpu(device):
        return _cupy_backend(device, _device_index(device))
    return device  # type: ignore[no-any-return]
