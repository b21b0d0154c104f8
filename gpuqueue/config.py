"""Config: the settings of one run, ``PipelineConfig`` and ``Workers``, frozen, checked once.

The public entry points (the enqueuers, ``prefetch()``) spell out every
keyword in their signatures, so ``help()`` and IDEs show them, and build one
``PipelineConfig`` from their arguments by name (``PipelineConfig.of``):
adding a setting is one field here plus the public signatures, and nothing
relays keywords from one function to the next. It is checked once, where it
is made (a bad keyword fails in the constructor, before anything starts).
``start(workers, max_queue_size)`` adds a ``Workers``, checked on its own.
``Run.start`` builds the run from both; each stage reads what it needs by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .backends import check_device
from .consumer.outputs import OUTPUTS, check_installed
from .device.transforms import BatchTransform, as_transform

__all__ = ["PipelineConfig", "Workers"]


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


@dataclass(frozen=True)
class Workers:
    """How many read, and how much waits: the arguments of ``start()``.

    Args:
        workers: Number of worker threads (or processes).
        max_queue_size: The most finished batches waiting in host memory.

    Raises:
        ValueError: If either is not a positive int.
    """

    workers: int = 1
    max_queue_size: int = 10

    def __post_init__(self) -> None:
        _check_count("workers", self.workers, 1)
        _check_count("max_queue_size", self.max_queue_size, 1)

    @property
    def staging_slots(self) -> int:
        """Host slots a run can fill at once: one per worker, the queue, one being copied."""
        return self.workers + self.max_queue_size + 1


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of one run but the worker counts, checked once when it is made.

    Args:
        name: Names the run's threads, queues and messages.
        use_multiprocessing: Read in worker processes instead of threads.
        device: ``None`` (host batches as the source made them), ``"auto"``,
            ``"cpu"``, an int or ``"cuda:N"``, or a backend object.
        prefetch_depth: Batches copied ahead of the consumer (0 = copy in
            ``get()``), or ``"auto"``: from 2, one deeper while the consumer
            waits for data, within ``max_device_bytes`` (``device/autodepth.py``).
        max_device_bytes: The device memory ``prefetch_depth="auto"`` may
            use for batches; None: a tenth of what is free at start.
        output: ``None``, ``"cupy"``, ``"numpy"``, ``"torch"`` or ``"jax"``
            (``consumer/outputs.py``).
        stream: The consumer's stream; None for the current one at each get.
        timeout: Seconds ``get()`` waits for one batch before it raises
            ``BatchTimeoutError``; None waits as long as it takes (with a
            warning once a minute has passed).
        transform: Applied to each batch on the device after its copy
            (``device/transforms.py``); a callable or a mapping from field to
            callable, kept as a ``BatchTransform``.
        random_seed: Seeds NumPy in a generator's worker process.
        even_batches: Every ``torch.distributed`` rank stops at the same step
            (``consumer/even.py``); None: for an iterable, with several ranks.
        batch_size: The source's items are samples, this many to a batch
            (``source/collate.py``); None: its items are batches.
        collate: The user's function from a list of samples to one batch,
            in place of the default collate; needs ``batch_size`` (or a
            ``batch_sampler``).

    Raises:
        ValueError: If a setting is out of range or settings contradict
            each other.
        TypeError: If ``transform`` is neither a callable nor a mapping to callables.
        PipelineError: If ``output`` names a library that is not installed.
    """

    name: str
    use_multiprocessing: bool = False
    device: Any = None
    prefetch_depth: int | str = 2
    max_device_bytes: int | None = None
    output: str | None = None
    stream: Any = None
    timeout: float | None = None
    transform: BatchTransform | None = None
    random_seed: int | None = None
    even_batches: bool | None = None
    batch_size: int | None = None
    collate: Callable[[list[Any]], Any] | None = None

    def host_is_the_device(self, backend_name: str) -> bool:
        """True where ``device="auto"`` found no GPU and nothing needs the staged path.

        The batches are then delivered as with ``device=None``. ``device="cpu"``
        keeps staging (it is how the tests run the device path), and so does
        ``transform=``, which runs on the staged batch's arena.
        """
        auto = isinstance(self.device, str) and self.device == "auto"
        return auto and backend_name == "numpy" and self.transform is None

    @classmethod
    def of(cls, name: str, arguments: Mapping[str, Any]) -> PipelineConfig:
        """The config of a public call, from its arguments by name (``locals()``).

        Takes every field the mapping has, so a public signature hands over
        its settings without naming each a second time.
        """
        fields = {field.name for field in dataclasses.fields(cls)} - {"name"}
        return cls(name, **{key: arguments[key] for key in fields if key in arguments})

    def __post_init__(self) -> None:
        object.__setattr__(self, "use_multiprocessing", bool(self.use_multiprocessing))
        if self.even_batches not in (None, True, False):
            raise ValueError(f"even_batches must be None, True or False, got {self.even_batches!r}")
        if self.batch_size is not None:
            _check_count("batch_size", self.batch_size, 1)
        if self.collate is not None and not callable(self.collate):
            raise TypeError(
                "collate must be a function from a list of samples to one batch, "
                f"got {type(self.collate).__name__}"
            )
        timeout = self.timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(
                f"timeout must be None or a positive number of seconds, not {timeout!r}"
            )
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
            raise ValueError(f"output must be one of {tuple(OUTPUTS)}, got {self.output!r}")
        if self.device is None:
            if self.prefetch_depth == "auto" and self.max_device_bytes is not None:
                raise ValueError("max_device_bytes needs a device (device='auto', 0, ...)")
            if OUTPUTS[self.output].needs_device:
                raise ValueError(
                    f"output={self.output!r} and stream need a device (device='auto', 0, ...)"
                )
            if self.stream is not None:
                raise ValueError("stream needs a device (device='auto', 0, ...)")
        else:
            check_device(self.device)
        check_installed(self.output)
        transform = as_transform(self.transform)  # TypeError for what is not one
        object.__setattr__(self, "transform", transform)
        if transform is not None:
            if self.device is None:
                raise ValueError(
                    "transform= runs on the device after the copy and needs one "
                    "(device='auto', 'cpu', 0, ...); with device=None, transform in the Sequence"
                )
            made = transform.bfloat16_maker()
            if made is not None and not OUTPUTS[self.output].bfloat16:
                raise ValueError(
                    f"transform= has {made!r}, and bfloat16 needs output='torch' or "
                    f"output='jax' (NumPy and CuPy have no bfloat16), got output={self.output!r}"
                )
