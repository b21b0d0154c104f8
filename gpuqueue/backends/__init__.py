"""Backends: where batches go. A registry that imports CuPy only when asked.

``resolve(device)`` turns the user's ``device`` argument into a backend:

- ``"cpu"``: the NumPy backend (the same pipeline, host memory);
- ``"auto"``: CuPy on this process's GPU if CuPy imports and a GPU is usable,
  else NumPy, saying which at debug level. This process's GPU is its local
  rank's (``LOCAL_RANK``, ``OMPI_COMM_WORLD_LOCAL_RANK``, ``MPI_LOCALRANKID``,
  ``SLURM_LOCALID``) under a launcher, so two ranks never share one, else
  GPU 0;
- an int or ``"cuda:N"``: CuPy on that GPU, or a clear error naming the extra
  to install;
- ``"simulated"``: NumPy memory with late, stream-ordered copies (tests);
- a backend object: used as is.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..distributed import local_rank
from ..errors import PipelineError
from .base import Backend

__all__ = ["Backend", "check_device", "resolve"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install gpuqueue[cuda12] or gpuqueue[cuda13] (CuPy for your CUDA version)"


def _gpu_count(asked: Any) -> int:
    """How many GPUs CuPy sees; ``asked`` is the ``device`` argument, for the message.

    Raises:
        PipelineError: If CuPy is missing or CUDA is not usable.
    """
    try:
        from . import cupy as cupy_backend
    except ImportError as error:
        raise PipelineError(
            f"device={asked} needs CuPy, which is not installed: {_INSTALL_HINT}"
        ) from error
    try:
        return cupy_backend.device_count()
    except Exception as error:
        raise PipelineError(
            f"device={asked} needs a CUDA GPU, but CUDA is not usable here ({error}); "
            f"check the driver, or {_INSTALL_HINT}"
        ) from error


def _new_cupy_backend(index: int) -> Backend:
    from . import cupy as cupy_backend

    return cupy_backend.CupyBackend(index)


def _cupy_backend(index: int) -> Backend:
    count = _gpu_count(index)
    if not 0 <= index < count:
        raise PipelineError(f"device={index} does not exist: {count} GPU(s) visible")
    return _new_cupy_backend(index)


def _auto_backend() -> Backend:
    """CuPy on this process's GPU (its local rank's, under a launcher), else NumPy."""
    launcher = local_rank()  # a malformed variable is an error even without a GPU
    try:
        count = _gpu_count("'auto'")
        if count < 1:
            raise PipelineError("device='auto' found no GPU: 0 GPU(s) visible")
    except PipelineError as error:
        logger.debug("device='auto': using NumPy, because %s", error)
        from .numpy import NumpyBackend

        return NumpyBackend()
    if launcher is None:
        index, why = 0, "no local rank set"
    else:
        name, index = launcher
        why = f"{name}={index}"
        if index >= count:
            raise PipelineError(
                f"device='auto' is the local rank's GPU, but {name}={index} and only {count} "
                f"GPU(s) are visible here: start at most {count} ranks per machine, or pass "
                "device=0 if each rank sees only its own GPU (CUDA_VISIBLE_DEVICES per rank)"
            )
    logger.debug("device='auto': using CuPy on GPU %d (%s)", index, why)
    return _new_cupy_backend(index)


def _device_index(device: Any) -> int | None:
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        match = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", device)
        if match:
            return int(match.group(1) or 0)
    return None


def check_device(device: Any) -> None:
    """Raises ``ValueError`` unless ``device`` has an accepted form; creates nothing."""
    if device in ("cpu", "simulated", "auto") or _device_index(device) is not None:
        return
    if hasattr(device, "copy_to_device") and hasattr(device, "alloc_device"):
        return
    raise ValueError(
        f"device must be None, 'auto', 'cpu', an int, 'cuda:N' or a backend, got {device!r}"
    )


def resolve(device: Any) -> Backend:
    """Returns the backend for a ``device`` argument.

    Raises:
        PipelineError: If a GPU was asked for and none is usable, or
            ``device="auto"`` under a launcher whose local rank has no GPU here.
        ValueError: If ``device`` is not one of the accepted forms, or a
            local-rank variable is not an integer >= 0.
    """
    if device == "cpu":
        from .numpy import NumpyBackend

        return NumpyBackend()
    if device == "simulated":
        from .simulated import SimulatedBackend

        return SimulatedBackend()
    if device == "auto":
        return _auto_backend()
    check_device(device)
    index = _device_index(device)
    if index is not None:
        return _cupy_backend(index)
    return device  # type: ignore[no-any-return]
