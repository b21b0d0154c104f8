"""``python -m bench.gpu_check``: the GPU truth, in one command, in a few minutes.

Run first whenever a GPU is at hand. It runs, and records in one JSON
(``bench/results/<gpu>-<date>.json`` unless ``--out`` says otherwise):

1. ``tests/gpu`` (CuPy and PyTorch output), as a subprocess, with its summary;
2. an ownership check: ``list(batches)`` over two epochs, every batch compared
   on the host with what the Sequence made;
3. the prefetch-depth bench at 4 MiB and 16 MiB against the raw pinned
   ``cudaMemcpyAsync`` loop and the hand-written one-ahead loop, with a step
   as long as each size's copy, so "hidden" reads as the share of the copy
   that the step hid;
4. with two or more GPUs, two processes with ``LOCAL_RANK`` 0 and 1, which
   must land on different GPUs.

Goals (a benchmark's, not a test's): at least 0.95 of the raw pinned copy's
throughput at 4 MiB and 0.97 at 16 MiB, at least 95 % of the copy hidden at
depth 2. The JSON says, for each, the figure and whether it met the goal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
THROUGHPUT_GOALS = {4 * MiB: 0.95, 16 * MiB: 0.97}  # of the raw pinned copy loop
HIDDEN_GOAL = 0.95  # share of the copy hidden at depth 2 behind a step as long as it


def run_gpu_tests(timeout: float) -> dict[str, Any]:
    began = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as error:
        return {"command": " ".join(command), "timed_out_after_s": timeout, "tail": str(error)}
    lines = done.stdout.strip().splitlines()
    return {
        "command": " ".join(command),
        "exit_code": done.returncode,
        "summary": lines[-1] if lines else "",
        "tail": "\n".join(lines[-40:]) + ("\n" + done.stderr[-2000:] if done.stderr else ""),
        "seconds": time.perf_counter() - began,
    }


class Stamped:
    """Batch i: ``words`` uint32 values derived from i, and i itself."""

    def __init__(self, length: int, words: int) -> None:
        self.length, self.base = length, np.arange(words, dtype=np.uint32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.base * np.uint32(2654435761) + np.uint32(index), np.int64(index)


def ownership_check(device: Any) -> dict[str, Any]:
    import cupy

    import gpuqueue

    seq = Stamped(length=24, words=MiB // 4)
    enqueuer = gpuqueue.OrderedEnqueuer(seq, device=device, epochs=2, shard=None)
    enqueuer.start(workers=4)
    kept = list(enqueuer.get())
    cupy.cuda.get_current_stream().synchronize()
    wrong = [
        position
        for position, (x, index) in enumerate(kept)
        if int(index) != position % 24 or not np.array_equal(cupy.asnumpy(x), seq[position % 24][0])
    ]
    return {"batches": len(kept), "wrong": wrong, "ok": len(kept) == 48 and not wrong}


def depth_bench(device: Any, out: Path, quick: bool) -> dict[str, Any]:
    from bench import baselines, depth

    results: dict[str, Any] = {}
    for nbytes in (4 * MiB, 16 * MiB):
        raw = baselines.raw_copy_gbps("cupy", nbytes, 50)
        step_ms = nbytes / (raw * 1e9) * 1e3  # a step as long as the copy
        argv = ["--sizes", f"{nbytes // MiB}MiB", "--depths", "0,1,2,3,4"]
        argv += ["--device", str(device), "--step-ms", f"{step_ms:.4f}"]
        argv += ["--out", str(out / f"depth-{nbytes // MiB}MiB")]
        if quick:
            argv += ["--batches", "20"]
        report = depth.main(argv)
        size = report["sizes"][0]
        at_2 = next(row for row in size["rows"] if row.get("depth") == 2)
        loop = next(row for row in size["rows"] if row["row"] == depth.REFERENCE)
        ratio = size["throughput"]["ratio"]["median"]
        results[f"{nbytes // MiB}MiB"] = {
            "step_ms": step_ms,
            "raw_pinned_gbps": size["throughput"]["raw_copy_gbps"]["median"],
            "gpuqueue_gbps": size["throughput"]["gpuqueue_gbps"]["median"],
            "throughput_ratio": ratio,
            "throughput_goal": THROUGHPUT_GOALS[nbytes],
            "throughput_goal_met": ratio >= THROUGHPUT_GOALS[nbytes],
            "hidden_at_depth_2": at_2["hidden_fraction"]["median"],
            "hidden_goal": HIDDEN_GOAL,
            "hidden_goal_met": at_2["hidden_fraction"]["median"] >= HIDDEN_GOAL,
            "step_time_s_at_depth_2": at_2["step_time_s"]["median"],
            "one_ahead_step_time_s": loop["step_time_s"]["median"],
            "versus_one_ahead": at_2["vs_one_ahead"]["median"],
            "recommended_depth": size["recommended_depth"],
            "report": report,
        }
    return results


_RANK_SCRIPT = """
import gpuqueue, numpy as np
from gpuqueue.backends import resolve
backend = resolve("auto")
print("device", backend.device)
with gpuqueue.prefetch([(np.arange(4),)] * 3, device="auto", epochs=1, shard=None) as batches:
    print("batches", len(list(batches)))
"""


def local_rank_check() -> dict[str, Any]:
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if count < 2:
        return {"skipped": f"{count} GPU visible; needs 2"}
    devices = []
    for rank in (0, 1):
        env = {**os.environ, "LOCAL_RANK": str(rank)}
        done = subprocess.run(
            [sys.executable, "-c", _RANK_SCRIPT], env=env, capture_output=True, text=True,
            timeout=120, check=False, cwd=ROOT,
        )  # fmt: skip
        match = re.search(r"device (\d+)", done.stdout)
        devices.append(int(match.group(1)) if match else f"failed: {done.stderr[-500:]}")
    return {"devices": devices, "ok": devices == [0, 1]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="the GPU: 'cuda', 'cuda:N' or N")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--quick", action="store_true", help="fewer batches per run")
    parser.add_argument("--skip-tests", action="store_true", help="bench only")
    args = parser.parse_args(argv)

    import cupy

    from bench.machine import describe_machine
    from bench.nvml import Nvml
    from gpuqueue.backends import resolve

    backend = resolve(args.device)
    gpu = backend.device if backend.device is not None else 0
    backend.close()
    cupy.cuda.Device(gpu).use()
    machine = describe_machine("cupy", gpu, Nvml.for_gpu(gpu))
    slug = re.sub(r"[^a-z0-9]+", "-", machine["gpu"]["name"].lower()).strip("-")
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"{slug}-{today}.json"
    scratch = out.parent / f"{out.stem}-figures"

    began = time.perf_counter()
    report: dict[str, Any] = {"check": "python -m bench.gpu_check", "machine": machine}
    report["gpu_tests"] = "skipped" if args.skip_tests else run_gpu_tests(timeout=180)
    report["ownership"] = ownership_check(gpu)
    report["depth"] = depth_bench(gpu, scratch, args.quick)
    report["local_rank"] = local_rank_check()
    report["seconds"] = time.perf_counter() - began
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "depth"}, indent=2, default=str))
    for size, figures in report["depth"].items():
        print(
            f"{size}: {figures['throughput_ratio']:.3f} of raw pinned "
            f"({figures['gpuqueue_gbps']:.1f} of {figures['raw_pinned_gbps']:.1f} GB/s), "
            f"hidden at depth 2 {figures['hidden_at_depth_2']:.1%}, "
            f"{figures['versus_one_ahead']:.2f}x the one-ahead loop"
        )
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
