"""Backends, the registry: where batches go, chosen by ``device=``; CuPy imported only when asked.

``resolve(device)`` turns the user's ``device`` argument into a backend:

- ``"cpu"``: the NumPy backend (the same pipeline, host memory);
- ``"auto"``: CuPy on this process's GPU if CuPy imports and a GPU is usable,
  else NumPy, with a ``UserWarning`` that says why (no CuPy, no driver, no
  GPU; Python shows it once per reason and process). This process's GPU is
  its local rank's (``LOCAL_RANK``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
  ``MPI_LOCALRANKID``, ``SLURM_LOCALID``) under a launcher, so two ranks never
  share one, else the calling thread's current CUDA device;
- ``"cuda"``: the same GPU, or a clear error naming what was asked;
- an int or ``"cuda:N"``: CuPy on that GPU, or a clear error naming the extra
  to install;
- ``"simulated"``: NumPy memory with late, stream-ordered copies (tests);
- a backend object: used as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from ..errors import PipelineError
from .base import Backend

__all__ = ["LOCAL_RANK_VARIABLES", "Backend", "check_device", "local_rank", "resolve"]

logger = logging.getLogger(__name__)

# A process's rank among those on its own machine, in the same launcher order.
LOCAL_RANK_VARIABLES = (
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
)


def local_rank(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The first launcher's local-rank variable that is set, and its value.

    Returns:
        ``(variable name, local rank)``, or ``None`` outside a launcher.

    Raises:
        ValueError: If the variable is not an integer >= 0; the message names it.
    """
    environ = os.environ if environ is None else environ
    for name in LOCAL_RANK_VARIABLES:
        if name in environ:
            text = environ[name]
            try:
                value = int(text)
            except ValueError:
                value = -1
            if value < 0:
                raise ValueError(f"{name}={text!r} must be an integer >= 0 (a local rank)")
            return name, value
    return None


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
            f"device={asked!r} needs CuPy, which is not installed: {_INSTALL_HINT}"
        ) from error
    try:
        return cupy_backend.device_count()
    except Exception as error:
        raise PipelineError(
            f"device={asked!r} needs a CUDA GPU, but CUDA is not usable here ({error}); "
            f"check the driver, or {_INSTALL_HINT}"
        ) from error


def _new_cupy_backend(index: int) -> Backend:
    from . import cupy as cupy_backend

    return cupy_backend.CupyBackend(index)


def _current_device() -> int:
    """The calling thread's current CUDA device (0 where it never chose one, or unknown)."""
    try:
        from . import cupy as cupy_backend

        return cupy_backend.current_device()
    except Exception:
        return 0


def _cupy_backend(asked: Any, index: int | None) -> Backend:
    """CuPy on GPU ``index``; None is this process's GPU (see ``_default_gpu``)."""
    count = _gpu_count(asked)
    if count < 1:
        raise PipelineError(f"device={asked!r} needs a CUDA GPU, but none is visible")
    if index is None:
        index = _default_gpu(asked, count)
    elif not 0 <= index < count:
        raise PipelineError(f"device={asked!r} does not exist: {count} GPU(s) visible")
    return _new_cupy_backend(index)


def _default_gpu(asked: Any, count: int) -> int:
    """The local rank's GPU under a launcher, else the calling thread's current device."""
    launcher = local_rank()
    if launcher is None:
        index = _current_device()
        logger.debug("device=%r: GPU %d, the current device (no local rank set)", asked, index)
        return index
    name, index = launcher
    if index < count:
        logger.debug("device=%r: GPU %d (%s=%d)", asked, index, name, index)
        return index
    if count == 1 and "CUDA_VISIBLE_DEVICES" in os.environ:
        # Each rank sees only its own GPU (CUDA_VISIBLE_DEVICES set per rank).
        logger.debug("device=%r: GPU 0, the only one %s=%d sees", asked, name, index)
        return 0
    raise PipelineError(
        f"device={asked!r} is the local rank's GPU, but {name}={index} and only {count} "
        f"GPU(s) are visible here: start at most {count} ranks per machine, or pass "
        "device=N to choose one (two ranks may then share it)"
    )


def _device_index(device: Any) -> int | None:
    """The GPU index in ``device``; None for ``"cuda"`` (this process's GPU) or another form."""
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
        local_rank()  # a malformed local-rank variable is an error even without a GPU
        try:
            count = _gpu_count(device)
        except PipelineError as error:
            count, why = 0, str(error)
        else:
            why = "0 GPU(s) visible"
        if count < 1:
            _warn_no_gpu(why)
            from .numpy import NumpyBackend

            return NumpyBackend()
        return _new_cupy_backend(_default_gpu(device, count))
    check_device(device)
    if _names_a_gpu(device):
        return _cupy_backend(device, _device_index(device))
    return device  # type: ignore[no-any-return]


# The reasons device="auto" fell back to NumPy that were already said: each once per process.
_SAID_NO_GPU: set[str] = set()


def _warn_no_gpu(why: str) -> None:
    """Says once per process (per reason) that ``device="auto"`` uses NumPy, at the user's line.

    Once by a set of our own, not by the warning registry, which counts once
    per line: a program that starts two pipelines would hear it twice.
    """
    if why in _SAID_NO_GPU:
        return
    _SAID_NO_GPU.add(why)
    warnings.warn(
        f"gpuqueue: device='auto' found no usable GPU and uses NumPy on the CPU ({why})",
        UserWarning,
        stacklevel=_users_frame(),
    )


def _users_frame() -> int:
    """The ``stacklevel`` (for the caller's ``warnings.warn``) of the first frame outside
    gpuqueue and contextlib: the line of the user's that started the pipeline."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    internal = (package + os.sep, contextlib.__file__)
    frame = sys._getframe(1)  # the frame that calls warnings.warn: stacklevel 1
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
