"""Source stage, Keras's side: a gpuqueue Sequence handed to Keras's ``model.fit``.

Nothing here imports Keras or TensorFlow until a caller asks for them.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import PipelineError

__all__ = ["keras_dataset"]


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
