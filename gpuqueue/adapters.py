"""Data as users have it: which enqueuer reads a source, epochs of iterables, Keras's side.

- Anything with ``__len__`` and ``__getitem__`` is a Sequence (a list of
  batches, a torch map-style ``Dataset``, a Keras 3 ``PyDataset``); it goes
  to an ``OrderedEnqueuer``, which calls ``on_epoch_end`` when it has one.
- Any other iterable goes to a ``GeneratorEnqueuer``. One that can be read
  again (``iter()`` gives a fresh iterator each time: a list, a torch
  ``DataLoader``) is read ``epochs`` times by ``Epochs``; a one-shot iterator
  (a generator) can be read once, and asking for more epochs is an error.
- A torch ``DataLoader`` reads in its own worker processes, so gpuqueue
  reads it in a thread and does what timm's ``PrefetchLoader`` does: pin,
  copy, overlap.
- ``keras_dataset`` hands a gpuqueue Sequence to Keras's ``model.fit``.

Nothing here imports torch, Keras or TensorFlow until a caller asks for them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from .distributed import is_torch_class
from .errors import PipelineError

__all__ = [
    "Epochs",
    "check_generator",
    "check_iterable_source",
    "check_main_guard",
    "check_sequence",
    "is_sequence",
    "is_torch_dataloader",
    "keras_dataset",
    "main_without_file",
]


def is_sequence(source: Any) -> bool:
    """True for anything read by index: it has ``__len__`` and ``__getitem__``."""
    return hasattr(source, "__getitem__") and hasattr(source, "__len__")


def is_torch_dataloader(source: Any) -> bool:
    """True for a ``torch.utils.data.DataLoader`` (or a subclass), without importing torch."""
    return is_torch_class(source, "DataLoader")


def _one_shot(source: Any) -> bool:
    # An iterator is its own iterator: a second iter() continues, never restarts.
    # Told apart without calling iter(), which starts a DataLoader's workers.
    return hasattr(source, "__next__")


class Epochs:
    """Reads a re-iterable source ``epochs`` times, one fresh ``iter()`` per epoch.

    Picklable when the source is, so a worker process can run it.

    Args:
        source: An iterable whose ``iter()`` starts over (not an iterator).
        epochs: How many passes.
    """

    def __init__(self, source: Iterable[Any], epochs: int) -> None:
        self.source = source
        self.epochs = epochs

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.epochs):
            yield from self.source


def check_sequence(sequence: Any) -> None:
    """Raises ``TypeError`` unless ``sequence`` can be read by index (``OrderedEnqueuer``)."""
    if not is_sequence(sequence):
        raise TypeError(
            f"OrderedEnqueuer needs a Sequence (with __getitem__ and __len__), "
            f"got {type(sequence).__name__}"
        )


def check_generator(generator: Any, use_multiprocessing: bool) -> None:
    """Checks what a ``GeneratorEnqueuer`` was given.

    Raises:
        TypeError: If ``generator`` is not iterable (or, with processes, a
            generator function).
        PipelineError: With processes, if it cannot be pickled, or is a
            torch ``DataLoader``, which reads in processes of its own.
    """
    iterable = hasattr(generator, "__iter__") or hasattr(generator, "__next__")
    if not iterable and not (use_multiprocessing and callable(generator)):
        raise TypeError(f"GeneratorEnqueuer needs an iterable, got {type(generator).__name__}")
    if use_multiprocessing:
        from .workers import check_picklable

        check_iterable_source(generator, epochs=None, use_multiprocessing=True)
        check_picklable(generator, "the generator function or a picklable iterable")


def check_iterable_source(source: Any, *, epochs: int | None, use_multiprocessing: bool) -> Any:
    """What a ``GeneratorEnqueuer`` reads for an iterable ``source`` and ``epochs``.

    Returns:
        ``source`` itself for one pass (``epochs`` None or 1), else ``Epochs``.

    Raises:
        ValueError: If ``epochs`` is not None or a positive int, or asks a
            one-shot iterator (a generator) for more than one pass.
        PipelineError: If ``source`` is a torch ``DataLoader`` and
            ``use_multiprocessing`` is set: the loader already reads in its
            own processes (``num_workers``).
    """
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise ValueError(f"epochs must be None or a positive int, got {epochs!r}")
    if use_multiprocessing and is_torch_dataloader(source):
        raise PipelineError(
            "use_multiprocessing=True cannot take a torch DataLoader: it reads in its own "
            "worker processes (set its num_workers); pass it with use_multiprocessing=False, "
            "and gpuqueue pins, copies and overlaps its batches"
        )
    if epochs is None or epochs == 1:
        return source
    if _one_shot(source):
        raise ValueError(
            f"epochs={epochs} needs a source that can be read again, but "
            f"{type(source).__name__} is a one-shot iterator (a generator is read once); "
            "pass a Sequence or a re-iterable (a list, a DataLoader), or a new generator "
            "for each epoch"
        )
    return Epochs(source, epochs)


def check_main_guard() -> None:
    """Raises ``PipelineError`` where worker processes would run the main script's code again.

    With ``forkserver`` and ``spawn`` (gpuqueue never uses plain ``fork``)
    each new process imports the main script again, as ``__mp_main__``.
    Without ``if __name__ == "__main__":`` around the code that starts the
    workers, that import runs the training code in every worker, which then
    fails (multiprocessing refuses to start processes from there) and reaches
    the parent only as an exit code. Two checks, so the message says what to
    do: in the parent, a main script whose source never mentions
    ``__name__``; in a worker, being called while it imports the script.

    Raises:
        PipelineError: If the main script has no ``__main__`` guard.
    """
    hint = (
        'put the code that starts the workers under if __name__ == "__main__":, since '
        "each worker process imports the main script again"
    )
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise PipelineError(
            "use_multiprocessing=True: a worker process, importing the main script, reached "
            f"code that starts workers; {hint}"
        )
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not os.path.exists(path):  # stdin, -c, a notebook: nothing is imported again
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as script:
            guarded = "__name__" in script.read()
    except OSError:
        return
    if not guarded:
        raise PipelineError(f"use_multiprocessing=True needs a main-module guard in {path}: {hint}")


@contextlib.contextmanager
def main_without_file() -> Iterator[None]:
    """Hides a ``__main__.__file__`` that names no file while worker processes start.

    ``python -`` sets it to ``"<stdin>"``, and ``spawn``/``forkserver``
    children then fail trying to run that path as the main script. Without
    it they skip the main module; what they need of it arrives pickled by
    value (``workers.pickle_source``).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or os.path.exists(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def keras_dataset(sequence: Any, keras: str | None = None) -> Any:
    """A Keras view of a gpuqueue Sequence (or any map-style dataset), for ``model.fit``.

    Keras chooses how to read ``model.fit``'s input by its type, so a
    ``gpuqueue.Sequence`` (which cannot subclass Keras's classes without
    importing Keras at ``import gpuqueue``) is refused there. This wraps
    ``sequence`` in Keras's own class, made on first use. Keras then reads
    it with its own workers; to have gpuqueue read it (faster, with
    processes, shuffling and sharding), pass gpuqueue's batches instead:
    ``model.fit(enqueuer.get(), steps_per_epoch=len(sequence), epochs=n)``.

    Args:
        sequence: Anything with ``__len__`` and ``__getitem__``; its
            ``on_epoch_end`` is called when it has one.
        keras: ``"keras"`` for a Keras 3 ``keras.utils.PyDataset``,
            ``"tf_keras"`` for a ``tf_keras.utils.Sequence``; None picks the
            one already imported (tf_keras first), else Keras 3, else tf_keras.

    Returns:
        An object ``model.fit`` accepts, reading ``sequence``.

    Raises:
        PipelineError: If the Keras asked for (or any) is not installed.
        ValueError: If ``keras`` is not one of the above.
    """
    base = _keras_sequence_class(keras)

    def on_epoch_end(self: Any) -> None:
        end = getattr(self.sequence, "on_epoch_end", None)
        if end is not None:
            end()

    wrapper = type(
        "GpuqueueKerasDataset",
        (base,),
        {
            "__len__": lambda self: len(self.sequence),
            "__getitem__": lambda self, index: self.sequence[index],
            "on_epoch_end": on_epoch_end,
            "__doc__": "A gpuqueue Sequence as Keras's own dataset class (keras_dataset).",
        },
    )
    dataset = wrapper()
    dataset.sequence = sequence
    return dataset


def _keras_sequence_class(keras: str | None) -> type:
    if keras not in (None, "keras", "tf_keras"):
        raise ValueError(f"keras must be None, 'keras' or 'tf_keras', got {keras!r}")
    order: list[str]
    if keras is None:
        imported: list[str] = [name for name in ("tf_keras", "keras") if name in sys.modules]
        order = imported[:1] or ["keras", "tf_keras"]
    else:
        order = [keras]
    for name in order:
        try:
            if name == "tf_keras":
                import tf_keras

                return tf_keras.utils.Sequence  # type: ignore[no-any-return]
            import keras as keras3

            if int(keras3.__version__.split(".")[0]) >= 3:
                return keras3.utils.PyDataset  # type: ignore[no-any-return]
        except ImportError:
            continue
    wanted = " or ".join(order)
    raise PipelineError(f"keras_dataset() needs {wanted}, which is not installed")
