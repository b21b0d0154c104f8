"""Synthetic batches and synthetic training steps of a chosen duration.

On a GPU the step is a CuPy kernel that spins for a calibrated number of
clock cycles on the consumer's stream (after reading the batch, so it
depends on it); on the NumPy fallback it is a NumPy computation calibrated
to take as long. Both release the GIL, so the pipeline's threads run
beside them as they would beside a real model.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import gpuqueue

_SPIN = r"""
extern "C" __global__ void spin(long long cycles, const unsigned char* data, unsigned char* sink) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    if (threadIdx.x == 0 && blockIdx.x == 0) { sink[0] = data[0]; }
}
"""


class SyntheticBatches(gpuqueue.Sequence):
    """``length`` batches of ``nbytes`` random bytes, with optional host work per batch.

    The batches are made once and handed out in turn, so reading costs
    nothing but the host work; what is measured is the pipeline.
    """

    def __init__(self, nbytes: int, length: int = 64, host_work_ms: float = 0.0) -> None:
        rng = np.random.default_rng(0)
        self.pool = [rng.integers(0, 255, nbytes, dtype=np.uint8) for _ in range(4)]
        self.length = length
        self.host_work = HostWork(host_work_ms) if host_work_ms > 0 else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if self.host_work is not None:
            self.host_work()
        return self.pool[index % len(self.pool)]


def _calibrate(run: Any, target_s: float, first: int) -> int:
    """The repeat count for which ``run(count)`` takes about ``target_s``."""
    count = first
    for _ in range(20):
        began = time.perf_counter()
        run(count)
        took = time.perf_counter() - began
        if took > 0.02 or took > target_s:
            break
        count *= 4
    per_unit = max(took / count, 1e-9)
    return max(1, round(target_s / per_unit))


class HostWork:
    """Host-side work per batch (a NumPy computation) of about ``ms`` milliseconds."""

    def __init__(self, ms: float) -> None:
        self.buffer = np.ones(4096, np.float64)
        self.repeats = _calibrate(self._run, ms / 1e3, 16)

    def _run(self, repeats: int) -> None:
        for _ in range(repeats):
            np.sqrt(self.buffer, out=self.buffer)

    def __call__(self) -> None:
        self._run(self.repeats)


class NumpyStep:
    """A NumPy "training step" of about ``ms`` milliseconds that reads the batch.

    One large ufunc call, sized by calibration: NumPy runs it without the
    GIL, so the pipeline's threads run beside it, as they do beside a GPU
    step. (A Python loop of small calls would hold the GIL instead.)
    """

    def __init__(self, ms: float) -> None:
        self.ms = ms
        self.buffer = np.ones(1, np.float32)
        if ms > 0:
            elements = 1 << 16
            for _ in range(12):
                self.buffer = np.ones(elements, np.float32)
                took = self._fastest_of(3)
                if took >= ms / 1e3 / 2:
                    break
                elements *= 2
            self.buffer = np.ones(max(1, int(elements * ms / 1e3 / max(took, 1e-9))), np.float32)

    def _fastest_of(self, times: int) -> float:
        """The quickest of ``times`` runs: one preempted run must not shrink the step."""
        fastest = float("inf")
        for _ in range(times):
            began = time.perf_counter()
            self._run()
            fastest = min(fastest, time.perf_counter() - began)
        return fastest

    def _run(self) -> None:
        np.multiply(self.buffer, 1.0000001, out=self.buffer)

    def __call__(self, batch: Any) -> None:
        if self.ms > 0:
            self._run()
        self.buffer[0] += float(batch.flat[0])  # depend on the batch

    def synchronize(self) -> None:
        pass


class CupyStep:
    """A GPU "training step": a kernel spinning ``ms`` milliseconds on the current stream."""

    def __init__(self, ms: float) -> None:
        import cupy

        self.cupy = cupy
        self.ms = ms
        self.kernel = cupy.RawKernel(_SPIN, "spin")
        self.sink = cupy.zeros(1, cupy.uint8)
        self.cycles = self._calibrate(ms) if ms > 0 else 0

    def _calibrate(self, ms: float) -> int:
        probe = 10_000_000
        data = self.cupy.zeros(1, self.cupy.uint8)
        start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
        self.kernel((1,), (1,), (np.int64(probe), data, self.sink))  # warm-up and JIT
        start.record()
        self.kernel((1,), (1,), (np.int64(probe), data, self.sink))
        end.record()
        end.synchronize()
        probe_ms = self.cupy.cuda.get_elapsed_time(start, end)
        return int(probe * ms / max(probe_ms, 1e-6))

    def __call__(self, batch: Any) -> None:
        self.kernel((1,), (1,), (np.int64(self.cycles), batch, self.sink))

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()


def make_step(backend: str, ms: float) -> Any:
    return CupyStep(ms) if backend == "cupy" else NumpyStep(ms)
