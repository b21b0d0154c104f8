"""Fakes for fault injection, shared by the CPU and GPU tests."""

from __future__ import annotations

from typing import Any

import numpy as np


def failing(base: type, operation: str, at: int) -> type:
    """A subclass of backend class ``base`` whose ``operation`` raises at its ``at``-th call.

    ``operation`` is ``"alloc_pinned"``, ``"alloc_device"`` or ``"copy_to_device"``;
    the error is ``MemoryError("<operation> failed")``, as an allocator's would be.
    """

    class Failing(base):  # type: ignore[valid-type, misc]
        calls = 0
        # Every batch goes through alloc_device and copy_to_device, as on a GPU
        # (NumPy would hand a staged buffer over instead).
        shares_host_memory = False

        def _maybe_fail(self, name: str) -> None:
            if name == operation:
                self.calls += 1
                if self.calls == at:
                    raise MemoryError(f"{name} failed")

        def alloc_pinned(self, nbytes: int) -> np.ndarray:
            self._maybe_fail("alloc_pinned")
            return super().alloc_pinned(nbytes)  # type: ignore[no-any-return]

        def alloc_device(self, nbytes: int, stream: Any) -> Any:
            self._maybe_fail("alloc_device")
            return super().alloc_device(nbytes, stream)

        def copy_to_device(self, dst: Any, src: np.ndarray, nbytes: int, stream: Any) -> None:
            self._maybe_fail("copy_to_device")
            super().copy_to_device(dst, src, nbytes, stream)

    Failing.__name__ = f"Failing_{operation}_{base.__name__}"
    return Failing
