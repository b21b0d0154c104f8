"""Host stage, pickling: a source for worker processes, by name where it can, else by value.

The standard pickler saves classes and functions by name, and a worker
process finds them by importing their module. That fails for code typed
into a notebook, stdin or ``python -c`` (its ``__main__`` cannot be
imported again) and for classes defined inside functions. Those are pickled
by value with cloudpickle, as Keras and loky do; the worker reads either
form with plain ``pickle.loads``.
"""

from __future__ import annotations

import collections
import inspect
import io
import pickle
import types
from typing import Any, ClassVar

from ..errors import PipelineError

__all__ = ["check_picklable", "pickle_source"]


class _FindsMain(pickle.Pickler):
    """The standard pickler, noting whether it pickled a class or function of ``__main__``.

    Those are pickled by name, and a worker process cannot find them by name
    when the main module is stdin, ``python -c`` or a notebook.
    """

    uses_main = False

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and obj.__module__ == "__main__":
            self.uses_main = True
        return NotImplemented


def pickle_source(source: Any) -> bytes:
    """Pickles ``source`` for a worker process: by name where it can, else by value.

    Classes and functions defined in ``__main__`` (a script typed into a
    notebook or stdin), or where the standard pickler cannot find them by
    name (a class defined in a function, a lambda), are pickled by value
    with cloudpickle, as Keras and loky do.

    Raises:
        Whatever the standard pickler raised, if cloudpickle fails too.
    """
    buffer = io.BytesIO()
    pickler = _FindsMain(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        pickler.dump(source)
        if not pickler.uses_main:
            return buffer.getvalue()
    except Exception as error:
        by_name_error: Exception | None = error
    else:
        by_name_error = None
    try:
        return _by_value(source)
    except Exception:
        if by_name_error is not None:
            raise by_name_error from None
        raise


def check_picklable(source: Any, what: str) -> bytes:
    """``source`` pickled for a worker process (by name, else by value), or why it cannot be.

    Raises:
        PipelineError: If ``source`` cannot be pickled, even by value.
    """
    try:
        return pickle_source(source)
    except Exception as error:
        hint = (
            "pass the generator function itself (make_batches, not make_batches()), "
            "defined at module level, or a picklable iterable"
            if inspect.isgenerator(source)
            else "define it at module level without locks, open files or lambdas, or use threads"
        )
        raise PipelineError(
            f"use_multiprocessing=True needs {what}, but pickling "
            f"{type(source).__name__} failed: {error}; {hint}"
        ) from error


def _by_value(source: Any) -> bytes:
    """``source`` pickled by cloudpickle, its code keeping the file it came from.

    cloudpickle 3.1 names every code object it pickles ``<dynamic-code>``
    (for payloads that do not depend on where the code was defined), so a
    worker process's traceback would lose the file (the line number stays);
    the file is put back, and linecache then shows the line too.
    """
    buffer = io.BytesIO()
    _pickler_class()(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(source)
    return buffer.getvalue()


def _code_keeping_filename(code: types.CodeType) -> Any:
    import cloudpickle.cloudpickle as internals

    rebuild, args = internals._code_reduce(code)
    return rebuild, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)


def _pickler_class() -> type:
    import cloudpickle
    import cloudpickle.cloudpickle as internals

    if not hasattr(internals, "_code_reduce"):  # another cloudpickle: it pickles code its way
        return cloudpickle.Pickler  # type: ignore[no-any-return]

    class KeepsFilenames(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table: ClassVar[Any] = collections.ChainMap(
            {types.CodeType: _code_keeping_filename}, cloudpickle.Pickler.dispatch_table
        )

    return KeepsFilenames
