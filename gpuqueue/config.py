"""``PipelineConfig``: every setting of one run, typed, frozen, and checked where it is made.

The enqueuers build one from their arguments (so a bad keyword fails in the
constructor, before anything starts) and ``Run.start`` builds the run from
it; each stage reads the settings it needs by name.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from .backends import check_device
from .errors import PipelineError
from .transforms import BatchTransform, as_transform

__all__ = ["OUTPUTS", "PipelineConfig"]

OUTPUTS = (None, "cupy", "numpy", "torch", "jax")

# The module each output needs, what it is called, and how to install it.
_OUTPUT_NEEDS = {
    "torch": ("torch", "PyTorch", "install gpuqueue[torch] (or torch itself)"),
    "jax": ("jax", "JAX", "install gpuqueue[jax] (or jax[cpu], jax[cuda12])"),
    "cupy": ("cupy", "CuPy", "install gpuqueue[cuda12] or gpuqueue[cuda13]"),
}


def _check_output_installed(output: str | None) -> None:
    """Raises ``PipelineError`` naming the extra if ``output``'s library is missing.

    Looks the module up without importing it, so that building an enqueuer
    stays cheap and ``import gpuqueue`` imports none of them.
    """
    if output not in _OUTPUT_NEEDS:
        return
    module, library, hint = _OUTPUT_NEEDS[output]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise PipelineError(f"output={output!r} needs {library}, which is not installed: {hint}")


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of one run, checked once when it is made.

    Args:
        name: Names the run's threads, queues and messages.
        use_multiprocessing: Read in worker processes instead of threads.
        workers: Number of worker threads (or processes).
        max_queue_size: The most finished batches waiting in host memory.
        device: ``None`` (host batches as the source made them), ``"auto"``,
            ``"cpu"``, an int or ``"cuda:N"``, or a backend object.
        prefetch_depth: Batches copied ahead of the consumer (0 = copy in
            ``get()``), or ``"auto"``: from 2, one deeper while the consumer
            waits for data, within ``max_device_bytes`` (``autodepth.py``).
        max_device_bytes: The device memory ``prefetch_depth="auto"`` may
            use for batches; None: a tenth of what is free at start.
        output: ``None``, ``"cupy"``, ``"numpy"``, ``"torch"`` or ``"jax"``.
        stream: The consumer's stream; None for the current one at each get.
        process_seed: Seeds NumPy in a generator's worker process.
        timeout: Seconds ``get()`` waits for one batch before it raises
            ``BatchTimeoutError``; None waits as long as it takes (with a
            warning once a minute has passed).
        transform: Applied to each batch on the device after its copy
            (``transforms.py``); a callable or a mapping from field to
            callable, kept as a ``BatchTransform``.

    Raises:
        ValueError: If a setting is out of range or settings contradict
            each other.
        PipelineError: If ``output`` names a library that is not installed.
    """

    name: str
    use_multiprocessing: bool = False
    workers: int = 1
    max_queue_size: int = 10
    device: Any = None
    prefetch_depth: int | str = 2
    max_device_bytes: int | None = None
    output: str | None = None
    stream: Any = None
    process_seed: int | None = None
    timeout: float | None = None
    transform: BatchTransform | None = None

    def __post_init__(self) -> None:
        timeout = self.timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(
                f"timeout must be None or a positive number of seconds, not {timeout!r}"
            )
        _check_count("workers", self.workers, 1)
        _check_count("max_queue_size", self.max_queue_size, 1)
        if self.prefetch_depth != "auto":
            if isinstance(self.prefetch_depth, str):
                raise ValueError(
                    f"prefetch_depth must be an int >= 0 or 'auto', got {self.prefetch_depth!r}"
                )
            _check_count("prefetch_depth", self.prefetch_depth, 0)
        if self.max_device_bytes is not None:
            _check_count("max_device_bytes", self.max_device_bytes, 1)
            if self.prefetch_depth != "auto":
                raise ValueError(
                    "max_device_bytes bounds prefetch_depth='auto'; with a fixed "
                    f"prefetch_depth={self.prefetch_depth!r} the memory follows from the depth"
                )
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.device is None:
            if self.prefetch_depth == "auto" and self.max_device_bytes is not None:
                raise ValueError("max_device_bytes needs a device (device='auto', 0, ...)")
            if self.output in ("torch", "jax") or self.stream is not None:
                raise ValueError(
                    f"output={self.output!r} and stream need a device (device='auto', 0, ...)"
                    if self.output in ("torch", "jax")
                    else "stream needs a device (device='auto', 0, ...)"
                )
        else:
            check_device(self.device)
        _check_output_installed(self.output)
        transform = as_transform(self.transform)  # TypeError for what is not one
        object.__setattr__(self, "transform", transform)
        if transform is not None:
            if self.device is None:
                raise ValueError(
                    "transform= runs on the device after the copy and needs one "
                    "(device='auto', 'cpu', 0, ...); with device=None, transform in the Sequence"
                )
            transform.check_output(self.output)
