from __future__ import annotations

import subprocess
import sys

import gpuqueue


def test_all_is_sorted_and_complete() -> None:
    assert gpuqueue.__all__ == sorted(gpuqueue.__all__)
    for name in gpuqueue.__all__:
        assert getattr(gpuqueue, name) is not None


def test_errors_share_one_base() -> None:
    for name in gpuqueue.__all__:
        obj = getattr(gpuqueue, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, gpuqueue.GpuqueueError), name


def test_import_does_not_pull_in_heavy_modules() -> None:
    code = (
        "import sys, gpuqueue\n"
        "heavy = ('cupy', 'pynvml', 'torch', 'jax', 'keras', 'tf_keras', 'tensorflow')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_py_typed_is_shipped() -> None:
    from importlib.resources import files

    assert files("gpuqueue").joinpath("py.typed").is_file()


def test_cupy_presence_matches_what_ci_installed() -> None:
    """CI's second run installs cupy-cuda12x; make sure it really did."""
    import importlib.util
    import os

    import pytest

    if os.environ.get("GPUQUEUE_CI_EXPECT_CUPY") != "1":
        pytest.skip("only CI's second run installs cupy-cuda12x")
    assert importlib.util.find_spec("cupy") is not None


def test_errors_accept_tensorflow_constructor_arguments() -> None:
    error = gpuqueue.OutOfRangeError(None, None, "end of input")
    assert str(error) == "end of input" and error.node_def is None and error.op is None
    assert str(gpuqueue.CancelledError("plain")) == "plain"


def test_batch_timeout_error_is_a_pipeline_error_and_a_timeout_error() -> None:
    assert "BatchTimeoutError" in gpuqueue.__all__
    assert issubclass(gpuqueue.BatchTimeoutError, gpuqueue.PipelineError)
    assert issubclass(gpuqueue.BatchTimeoutError, TimeoutError)
