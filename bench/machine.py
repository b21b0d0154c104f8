"""A description of the machine a benchmark ran on, for its JSON."""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.nvml import Nvml


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def describe_machine(backend_name: str, gpu: int = 0, nvml: Nvml | None = None) -> dict[str, Any]:
    """CPU, Python and package versions, and GPU ``gpu`` when the backend is CuPy."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # The machine's load when the report was made (the 1, 5 and 15 minute averages):
        # figures from a shared machine are read against it.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "backend": backend_name,
        "packages": {
            name: _version(name)
            for name in (
                "gpuqueue",
                "numpy",
                "cupy-cuda12x",
                "cupy-cuda13x",
                "torch",
                "nvidia-ml-py",
                "tf-keras",
                "tensorflow-cpu",
                "tensorflow",
            )
            if _version(name) is not None
        },
    }
    if backend_name == "cupy":
        import cupy

        runtime = cupy.cuda.runtime
        props = runtime.getDeviceProperties(gpu)
        info["gpu"] = {
            "index": gpu,
            "name": _text(props["name"]),
            "memory_bytes": int(props["totalGlobalMem"]),
            "cuda_runtime": runtime.runtimeGetVersion(),
            "cuda_driver_api": runtime.driverGetVersion(),
        }
        if nvml is not None:
            info["gpu"]["nvidia_driver"] = nvml.query(
                "driver", lambda n, h: _text(n.nvmlSystemGetDriverVersion())
            )
    return info


def results_folder(machine: dict[str, Any]) -> Path:
    """``bench/results/<machine>/``: ``cpu-<n>core`` without a GPU, else the GPU's name."""
    gpu = machine.get("gpu")
    if gpu:
        slug = re.sub(r"[^a-z0-9]+", "-", str(gpu["name"]).lower()).strip("-")
    else:
        slug = f"cpu-{machine['cpu_count']}core"
    return Path(__file__).resolve().parent / "results" / slug
