"""Backends: where batches go. A registry that imports CuPy only when asked.

``resolve(device)`` turns the user's ``device`` argument into a backend:

- ``"cpu"``: the NumPy backend (the same pipeline, host memory);
- ``"auto"``: CuPy on GPU 0 if CuPy imports and a GPU is usable, else NumPy,
  with a ``UserWarning`` that says why (no CuPy, no driver, no GPU); Python
  shows it once per reason and process;
- an int or ``"cuda:N"``: CuPy on that GPU, or a clear error naming the extra
  to install;
- ``"simulated"``: NumPy memory with late, stream-ordered copies (tests);
- a backend object: used as is.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

from ..errors import PipelineError
from .base import Backend

__all__ = ["Backend", "check_device", "resolve"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install gpuqueue[cuda12] or gpuqueue[cuda13] (CuPy for your CUDA version)"


def _cupy_backend(index: int) -> Backend:
    try:
        from . import cupy as cupy_backend
    except ImportError as error:
        raise PipelineError(
            f"device={index} needs CuPy, which is not installed: {_INSTALL_HINT}"
        ) from error
    try:
        count = cupy_backend.device_count()
    except Exception as error:
        raise PipelineError(
            f"device={index} needs a CUDA GPU, but CUDA is not usable here ({error}); "
            f"check the driver, or {_INSTALL_HINT}"
        ) from error
    if not 0 <= index < count:
        raise PipelineError(f"device={index} does not exist: {count} GPU(s) visible")
    return cupy_backend.CupyBackend(index)


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
            backend = _cupy_backend(0)
        except PipelineError as error:
            # stacklevel=1 on purpose: the warning registry is then this line's,
            # so Python's default filter shows each reason once per process.
            warnings.warn(
                f"gpuqueue: device='auto' found no usable GPU and uses NumPy on the CPU ({error})",
                UserWarning,
                stacklevel=1,
            )
            from .numpy import NumpyBackend

            return NumpyBackend()
        logger.debug("device='auto': using CuPy on GPU 0")
        return backend
    check_device(device)
    index = _device_index(device)
    if index is not None:
        return _cupy_backend(index)
    return device  # type: ignore[no-any-return]
