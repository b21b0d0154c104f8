"""Outputs: checked when the enqueuer is built, JAX through DLPack, and the "auto" fallback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuqueue import OrderedEnqueuer, PipelineError, prefetch
from tests.conftest import received

from .seqs import Numbered


@pytest.mark.parametrize(
    ("output", "module", "message"),
    [
        ("torch", "torch", r"^output='torch' needs PyTorch, which is not installed: install gpu"
         r"queue\[torch\]"),
        ("jax", "jax", r"^output='jax' needs JAX, which is not installed: install gpuqueue\[jax\]"),
        ("cupy", "cupy", r"^output='cupy' needs CuPy, which is not installed: install gpuqueue"
         r"\[cuda12\]"),
    ],
)  # fmt: skip
def test_a_missing_output_library_fails_when_the_enqueuer_is_built(
    monkeypatch: pytest.MonkeyPatch, output: str, module: str, message: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(PipelineError, match=message):
        OrderedEnqueuer(Numbered(), device="cpu", output=output)


def test_jax_output_is_a_jax_array_on_the_cpu() -> None:
    jax = pytest.importorskip("jax")
    with prefetch(Numbered(), "cpu", epochs=1, output="jax") as batches:
        got = received(batches)
    assert len(got) == 6
    for index, (x, extra) in enumerate(got):
        assert isinstance(x, jax.Array) and x.shape == (2, 3)
        assert next(iter(x.devices())).platform == "cpu"
        assert np.all(np.asarray(x) == index) and int(extra["index"]) == index
    with pytest.raises(ValueError, match=r"^output='jax' and stream need a device"):
        OrderedEnqueuer(Numbered(), output="jax")


def test_auto_says_once_why_it_fell_back_to_numpy() -> None:
    code = (
        "import gpuqueue.backends as b\n"
        "for _ in range(3):\n"
        "    assert b.resolve('auto').name == 'numpy'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0 and "AssertionError" in result.stderr:
        pytest.skip("a GPU is usable here")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "UserWarning" in line]
    assert len(warnings) == 1, result.stderr
    assert "device='auto' found no usable GPU and uses NumPy on the CPU (" in warnings[0]
    assert "CuPy" in warnings[0] or "CUDA" in warnings[0] or "GPU" in warnings[0]


NO_GPU_SCRIPT = """\
import numpy as np
import gpuqueue

if __name__ == "__main__":
    batches = [np.zeros(2)] * 2
    with gpuqueue.prefetch(batches, epochs=1) as got:  # line 6: the first pipeline
        list(got)
    with gpuqueue.prefetch(batches, epochs=1) as got:  # line 8: a second one, said already
        list(got)
    enqueuer = gpuqueue.OrderedEnqueuer(batches, device="auto", epochs=1)
    enqueuer.start()  # line 11
    enqueuer.stop()
"""


def test_the_no_gpu_warning_points_at_the_users_line_once_per_process(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(NO_GPU_SCRIPT, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-W", "default", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if "found no usable GPU" not in result.stderr and result.returncode == 0:
        pytest.skip("a GPU is usable here")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "UserWarning" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(f"{script}:6: UserWarning: gpuqueue: device='auto' found no")
