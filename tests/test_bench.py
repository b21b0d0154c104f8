"""The main job runs end to end: a smoke run of the prefetch-depth benchmark.

Checks that the JSON has every field and the PNG was written, not the speeds
(speed is measured in bench/, never asserted in tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROW_FIELDS = {
    "size_bytes", "depth", "step_time_s", "batches_per_s", "h2d_gbps", "copy_stage_gbps",
    "copy_time_s", "hidden_fraction", "stall_fraction", "queue_occupancy_mean",
    "consumer_wait_s", "copy_wait_for_host_s", "pinned_bytes_peak", "device_bytes_peak", "nvml",
}  # fmt: skip
BASELINES = {
    "raw_pinned_gbps", "pageable_gbps", "resident_step_time_s", "synchronous_step_time_s",
    "one_ahead_step_time_s",
}  # fmt: skip


@pytest.mark.timeout(180)
def test_smoke_run_writes_every_field_and_the_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stall" in done.stdout and "baselines" in done.stdout  # the table was printed
    report = json.loads((out / "prefetch_depth.json").read_text())
    assert {"benchmark", "command", "machine", "config", "nvml_link", "sizes"} <= set(report)
    machine = report["machine"]
    assert {"cpu_count", "python", "backend", "packages", "platform"} <= set(machine)
    assert report["sizes"], "no size was measured"
    for size in report["sizes"]:
        assert set(size["baselines"]) >= BASELINES
        assert [row["depth"] for row in size["depths"]] == [0, 1, 2]
        for row in size["depths"]:
            assert set(row) >= ROW_FIELDS, ROW_FIELDS - set(row)
            assert row["batches_per_s"] > 0 and 0 <= row["stall_fraction"] <= 1
        assert {"gpuqueue_gbps", "raw_pinned_gbps", "ratio"} <= set(size["throughput"])
    if machine["backend"] == "numpy":
        # no GPU: NVML's fields say why they are missing instead of failing the run
        assert all(isinstance(v, str) for v in report["nvml_link"].values())
    png = (out / "prefetch_depth.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.timeout(60)
def test_soak_smoke_run_samples_both_modes_and_ends_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--batches", "200", "--every", "100", "--length",
         "50", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"benchmark", "command", "machine", "config", "runs"} <= set(report)
    assert [run["mode"] for run in report["runs"]] == ["threads", "processes"]
    for run in report["runs"]:
        assert [s["batches"] for s in run["samples"]] == [100, 200]
        assert run["growth"]["threads"] == 0 and run["growth"]["shared_memory_fds"] == 0
        after = run["after_stop"]
        assert after["shared_memory_fds"] == 0 and after["pinned_bytes"] == 0
    assert report["runs"][1]["samples"][0]["shared_memory_bytes"] > 0


@pytest.mark.timeout(60)
def test_normalize_smoke_run_measures_both_paths_in_one_report(tmp_path: Path) -> None:
    out = tmp_path / "normalize.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.normalize", "--smoke", "--device", "cpu", "--rounds", "2",
         "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"benchmark", "command", "machine", "config", "paths", "ratios"} <= set(report)
    assert report["machine"]["backend"] == "numpy"
    for path in ("device", "host"):
        figures = report["paths"][path]
        for key in ("batches_per_s", "bytes_copied_per_batch", "host_ms_per_batch"):
            assert figures[key]["min"] <= figures[key]["median"] <= figures[key]["max"]
        assert figures["batches_per_s"]["min"] > 0
    # uint8 against float32 of the same images: a quarter of the bytes, plus the labels
    device = report["paths"]["device"]["bytes_copied_per_batch"]["median"]
    host = report["paths"]["host"]["bytes_copied_per_batch"]["median"]
    assert 4 * 16 * 16 * 3 <= device < host and host >= 4 * 16 * 16 * 3 * 4
