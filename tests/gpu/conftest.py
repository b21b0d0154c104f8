"""GPU tests: marked ``gpu`` and skipped unless CuPy imports and a GPU is usable."""

from __future__ import annotations

import pytest


def _gpu_usable() -> str | None:
    try:
        from gpuqueue.backends import cupy as cupy_backend

        if cupy_backend.device_count() > 0:
            return None
        return "no GPU visible"
    except Exception as error:  # CuPy missing, or no driver
        return f"no usable GPU ({type(error).__name__}: {error})"


_REASON = _gpu_usable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if _REASON is not None:
                item.add_marker(pytest.mark.skip(reason=_REASON))
