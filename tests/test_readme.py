"""The README's examples run as written.

A fenced ``python`` block preceded by ``<!-- readme-test: MODULES -->`` is
run in a fresh interpreter (so a Keras backend choice stays there), and
skipped where one of MODULES is not installed.
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
        ["keras", "torch"],
        ["jax"],
        ["torch"],
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("where", "modules", "code"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_readme_example_runs(where: str, modules: list[str], code: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{where} needs {module}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"
