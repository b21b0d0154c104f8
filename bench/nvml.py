"""An NVML sampler that runs as a ``LooperThread`` beside a benchmark run.

It reads PCIe receive throughput, GPU utilisation, memory in use, and the
PCIe link generation and width (current and maximum) and replay counter.
Where NVML is missing (no GPU, no driver, ``nvidia-ml-py`` not installed) or
a query is unsupported (virtual machines), each field says so and the run
carries on.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import gpuqueue


def _unavailable(error: BaseException) -> str:
    return f"unavailable: {type(error).__name__}: {error}"


class Nvml:
    """NVML on the GPU with PCI bus id ``pci_bus_id``, or a record of why it is not there."""

    def __init__(self, pci_bus_id: str | None) -> None:
        self.error: str | None = None
        self.handle: Any = None
        if pci_bus_id is None:
            self.error = "unavailable: no GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id.encode())
        except Exception as error:
            self.error = _unavailable(error)

    @classmethod
    def for_gpu(cls, gpu: int | None) -> Nvml:
        """NVML on CUDA device ``gpu``, found by its PCI bus id.

        CUDA's device numbers and NVML's indices differ under
        ``CUDA_VISIBLE_DEVICES`` (and with ``CUDA_DEVICE_ORDER`` unset); the
        bus id names the same card in both.
        """
        if gpu is None:
            return cls(None)
        try:
            import cupy

            bus_id = cupy.cuda.runtime.deviceGetPCIBusId(gpu)
        except Exception as error:
            nvml = cls(None)
            nvml.error = _unavailable(error)
            return nvml
        return cls(bus_id)

    def query(self, name: str, call: Callable[[Any, Any], Any]) -> Any:
        if self.error is not None:
            return self.error
        try:
            return call(self.pynvml, self.handle)
        except Exception as error:
            return _unavailable(error)

    def link(self) -> dict[str, Any]:
        """The PCIe link as it is now, and at most."""
        return {
            "pcie_generation_current": self.query(
                "gen", lambda n, h: n.nvmlDeviceGetCurrPcieLinkGeneration(h)
            ),
            "pcie_generation_max": self.query(
                "gen", lambda n, h: n.nvmlDeviceGetMaxPcieLinkGeneration(h)
            ),
            "pcie_width_current": self.query(
                "width", lambda n, h: n.nvmlDeviceGetCurrPcieLinkWidth(h)
            ),
            "pcie_width_max": self.query("width", lambda n, h: n.nvmlDeviceGetMaxPcieLinkWidth(h)),
            "pcie_replay_counter": self.query(
                "replay", lambda n, h: n.nvmlDeviceGetPcieReplayCounter(h)
            ),
        }

    def sample(self) -> dict[str, Any]:
        return {
            # NVML reports KB/s over a 20 ms window.
            "pcie_rx_gbps": self.query(
                "rx",
                lambda n, h: (
                    n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES) * 1e3 / 1e9
                ),
            ),
            "gpu_util_pct": self.query("util", lambda n, h: n.nvmlDeviceGetUtilizationRates(h).gpu),
            "memory_used_bytes": self.query("mem", lambda n, h: n.nvmlDeviceGetMemoryInfo(h).used),
        }


class NvmlSampler(gpuqueue.LooperThread):
    """Samples NVML every ``interval`` seconds until its coordinator stops."""

    def __init__(self, coord: gpuqueue.Coordinator, nvml: Nvml, interval: float = 0.02) -> None:
        super().__init__(coord, interval, name="bench-nvml-sampler")
        self.nvml = nvml
        self.samples: list[dict[str, Any]] = []

    def run_loop(self) -> None:
        self.samples.append(self.nvml.sample())

    def summary(self) -> dict[str, Any]:
        """Mean (and peak memory) of each field, or why it is unavailable."""
        if self.nvml.error is not None:
            return {"nvml": self.nvml.error}
        out: dict[str, Any] = {}
        for field in ("pcie_rx_gbps", "gpu_util_pct", "memory_used_bytes"):
            values = [s[field] for s in self.samples if isinstance(s[field], (int, float))]
            reasons = [s[field] for s in self.samples if isinstance(s[field], str)]
            if values:
                out[f"{field}_mean"] = statistics.fmean(values)
                if field == "memory_used_bytes":
                    out["memory_used_bytes_peak"] = max(values)
            else:
                out[f"{field}_mean"] = reasons[0] if reasons else "unavailable: no samples"
        out.update(self.nvml.link())
        return out
