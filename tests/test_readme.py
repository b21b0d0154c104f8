"""The README's examples run as written.

A fenced ``python`` block preceded by ``<!-- readme-test: MODULES -->`` is
run in a fresh interpreter (so a Keras backend choice stays there), and
skipped where one of MODULES is not installed. Two words are not modules:
``gpu`` skips the block without a usable GPU, and ``torchrun`` runs it
under ``torchrun`` with 3 ranks (CPU, gloo), as the README says to.
Every ``python`` block of the README is marked: none is a fragment.

A line ``# prints: TEXT`` in a block tells the reader what it prints, and
the test checks that it does: TEXT is in its output (under ``torchrun``,
with ``{rank}`` standing for each of the 3 ranks). A block that prints
nothing to check asserts what it shows, or trains only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"<!-- readme-test:([^>]*)-->\s*```python\n(.*?)```", re.DOTALL)
NOT_MODULES = {"gpu", "torchrun"}
PRINTS = re.compile(r"^\s*# prints: (.*)$", re.MULTILINE)


def _examples() -> list[tuple[str, list[str], str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for match in MARKED.finditer(text):
        modules = match.group(1).split()
        line = text.count("\n", 0, match.start()) + 1
        found.append((f"README.md:{line}", modules, match.group(2)))
    return found


EXAMPLES = _examples()


def test_the_readme_marks_an_example_per_ecosystem() -> None:
    assert [modules for _, modules, _ in EXAMPLES] == [
        ["torch"],
        ["cupy", "gpu"],
        [],
        ["torch"],
        ["torch"],
        ["keras", "torch"],
        ["jax"],
        ["torch"],
        ["torch", "torchrun"],
        ["ray", "torch"],
        ["torch", "datasets", "torchrun"],
        ["torch", "webdataset", "torchrun"],
        [],
    ]


def test_the_past_one_machine_examples_say_what_they_print() -> None:
    """Each engine's example prints that every sample was read once, or its ranks' steps."""
    printed = [PRINTS.findall(code) for _, modules, code in EXAMPLES if "torch" in modules]
    assert [lines for lines in printed if lines] == [
        ["rank {rank} of 3: 8 steps"],
        ["32 and 32 batches: every row once per epoch"],
        ["rank {rank} of 3: 12 steps, 334 samples an epoch"],
        ["rank {rank} of 3: 8 steps, 100 samples an epoch"],
    ]


def test_every_python_block_of_the_readme_is_run() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count("```python") == len(EXAMPLES)


def _gpu_usable() -> bool:
    try:
        from gpuqueue.backends import cupy as cupy_backend

        return bool(cupy_backend.device_count() > 0)
    except Exception:  # CuPy missing, or no driver
        return False


# An example that launches torchrun or a Ray cluster runs a whole engine in processes of its
# own: marked engine, as the other such tests, so CI's CuPy stage leaves it out.
RUNS = [
    pytest.param(*example, id=example[0], marks=[pytest.mark.engine])
    if {"torchrun", "ray"} & set(example[1])
    else pytest.param(*example, id=example[0])
    for example in EXAMPLES
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("where", "modules", "code"), RUNS)
def test_readme_example_runs(where: str, modules: list[str], code: str, tmp_path: Path) -> None:
    for module in set(modules) - NOT_MODULES:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{where} needs {module}")
    if "gpu" in modules and not _gpu_usable():
        pytest.skip(f"{where} needs a GPU")
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code]
    if "torchrun" in modules:
        script = tmp_path / "train.py"
        script.write_text(code, encoding="utf-8")
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", "3", str(script)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"
    for text in PRINTS.findall(code):  # what the README says it prints, on every rank
        ranks = range(3) if "{rank}" in text else [None]
        for rank in ranks:
            line = text.replace("{rank}", str(rank))
            assert line in result.stdout, f"{where}: no {line!r} in\n{result.stdout[-3000:]}"
