"""``python -m bench.gpu_check``: the GPU truth, in one command, in under 4 minutes.

Run it first whenever a GPU is at hand. Each row is one case, guarded: an
error becomes that row's result, with its traceback, and the run goes on;
the JSON (``bench/results/<gpu>-<date>.json`` unless ``--out`` says
otherwise) is rewritten after every row, so a run cut short keeps what it
measured. Nothing here needs matplotlib. The rows:

1. ``tests/gpu`` (CuPy and PyTorch output), as a subprocess, with its summary;
2. an ownership check: ``list(batches)`` over two epochs, every batch
   compared on the host with what the Sequence made;
3. at 4 MiB (the small-batch row), 16 MiB and 64 MiB: the raw pinned
   ``cudaMemcpyAsync`` loop; the one-ahead loop whose batches are packed in
   pinned memory ahead of time (so it measures the copy, not the packing);
   ``DataLoader(pin_memory=True)`` with ``.cuda(non_blocking=True)``;
   gpuqueue with no step (its throughput against the raw copy), and at
   depths 0 to 4 behind a real step: a float32 matmul sized to take as long
   as the copy, so "hidden" reads as the share of the copy the step hid;
4. with two or more GPUs, two processes with ``LOCAL_RANK`` 0 and 1, which
   must land on different GPUs.

Every figure is the median of at least 3 repeats, each at least 0.5 s long
(``--min-seconds``), after a warm-up; ``stats()`` is read once per run,
after the timed windows. Goals (a benchmark's, not a test's): at least 0.95
of the raw pinned copy's throughput at 4 MiB and 0.97 at 16 and 64 MiB, and
at least 95 % of the copy hidden at depth 2 at 16 and 64 MiB.

``--dry-run`` runs every row on the CPU against the strict CUDA double
(``tests/cuda_double.py``) in place of CuPy, with NumPy steps and short
windows: what CI runs (``tests/test_bench.py``), so a GPU's minutes are never
the first to find a bug here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SIZES = (4 * MiB, 16 * MiB, 64 * MiB)
THROUGHPUT_GOALS = {4 * MiB: 0.95, 16 * MiB: 0.97, 64 * MiB: 0.97}  # of the raw pinned copy
HIDDEN_GOAL = 0.95  # share of the copy hidden at depth 2 behind a step as long as it
HIDDEN_GOAL_SIZES = (16 * MiB, 64 * MiB)  # at 4 MiB Python's per-batch cost is of the order
DEPTHS = (0, 1, 2, 3, 4)
INSTALL_HINT = (
    "bench.gpu_check needs CuPy: pip install -e '.[test,bench,cuda12]' (or cuda13); "
    "--dry-run runs it on the CPU"
)


# -- the report: one guarded row at a time, written after each ---------------------------


class Report:
    """The JSON report, rewritten after every row, so nothing measured is ever lost."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "rows": []}
        self.began = time.perf_counter()
        self.write()

    def row(self, name: str, case: Callable[[], Any]) -> Any:
        """Runs ``case`` as row ``name``; an exception becomes the row's result.

        Returns what ``case`` returned, or None if it raised. ``KeyboardInterrupt``
        still stops the run, after the rows so far are on disk.
        """
        print(f"-- {name}", flush=True)
        began = time.perf_counter()
        row: dict[str, Any] = {"row": name}
        result = None
        try:
            result = case()
            row["status"] = "ok"
            row["result"] = result
        except ImportError as error:  # a library this row needs is not installed
            row["status"] = "skipped"
            row["reason"] = f"{type(error).__name__}: {error}"
        except Exception as error:
            row["status"] = "error"
            row["error"] = f"{type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc()
            print(row["traceback"], file=sys.stderr, flush=True)
        row["seconds"] = time.perf_counter() - began
        self.data["rows"].append(row)
        self.write()
        return result

    def write(self) -> None:
        self.data["seconds"] = time.perf_counter() - self.began
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        partial.replace(self.path)  # never a half-written file


def repeat_timing(
    run: Callable[[int], None], min_seconds: float, repeats: int = 3
) -> dict[str, Any]:
    """Seconds per call of ``run(n)`` (which makes ``n`` calls and waits for them).

    The count is doubled until one window lasts ``min_seconds``, then at
    least ``repeats`` windows of that count are timed: the median and the
    range of their per-call times.
    """
    count = 1
    while True:
        began = time.perf_counter()
        run(count)
        elapsed = time.perf_counter() - began
        if elapsed >= min_seconds or count >= 1 << 20:
            break
        count = max(count * 2, int(count * min_seconds / max(elapsed, 1e-9)) + 1)
    per_call = [elapsed / count]
    while len(per_call) < repeats:
        began = time.perf_counter()
        run(count)
        per_call.append((time.perf_counter() - began) / count)
    return {
        "median_s": statistics.median(per_call),
        "min_s": min(per_call),
        "max_s": max(per_call),
        "calls_per_window": count,
        "windows": len(per_call),
    }


# -- what runs the rows: a GPU through CuPy, or the strict double on the CPU ---------------


class Kit:
    """What the rows need from the device: a GPU (``GpuKit``) or the double (``DryKit``)."""

    device: Any
    min_seconds: float

    def raw_copy(self, nbytes: int) -> Callable[[int], None]:
        raise NotImplementedError

    def step(self, target_s: float) -> tuple[Callable[[Any], None], float]:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def to_host(self, array: Any) -> np.ndarray:
        raise NotImplementedError

    def one_ahead(self, nbytes: int) -> Iterator[Any]:
        raise NotImplementedError

    def dataloader(self, seq: Any) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Frees what the kit made."""


class GpuKit(Kit):
    """One GPU through CuPy (and PyTorch for the DataLoader row)."""

    def __init__(self, device: int, min_seconds: float) -> None:
        import cupy

        self.cupy = cupy
        self.device, self.min_seconds = device, min_seconds
        cupy.cuda.Device(device).use()

    def raw_copy(self, nbytes: int) -> Callable[[int], None]:
        cupy = self.cupy
        import cupyx

        host = cupyx.empty_pinned(nbytes, np.uint8)
        host[:] = 1
        target = cupy.empty(nbytes, cupy.uint8)
        stream = cupy.cuda.Stream(non_blocking=True)
        copy = cupy.cuda.runtime.memcpyAsync

        def run(n: int) -> None:
            for _ in range(n):
                copy(target.data.ptr, host.ctypes.data, nbytes, 1, stream.ptr)
            stream.synchronize()

        run(2)  # warm
        return run

    def step(self, target_s: float) -> tuple[Callable[[Any], None], float]:
        """A float32 matmul on the current stream, its size chosen to last ``target_s``."""
        cupy = self.cupy
        size = 256
        while True:
            a = cupy.ones((size, size), cupy.float32)
            b = cupy.ones((size, size), cupy.float32)

            def run(n: int, a: Any = a, b: Any = b) -> None:
                for _ in range(n):
                    cupy.matmul(a, b)
                cupy.cuda.get_current_stream().synchronize()

            seconds = repeat_timing(run, 0.05)["median_s"]
            if seconds >= target_s or size >= 16384:
                break
            size = min(16384, max(size + 64, int(size * (target_s / seconds) ** (1 / 3))))
            size = -(-size // 64) * 64

        def step(batch: Any) -> None:
            cupy.matmul(a, b)

        return step, seconds

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def to_host(self, array: Any) -> np.ndarray:
        self.synchronize()
        values: np.ndarray = self.cupy.asnumpy(array)
        return values

    def one_ahead(self, nbytes: int) -> Iterator[Any]:
        """Two pinned buffers packed once, ahead; each batch copies on a side stream while
        the previous one steps; an event per buffer both ways (valid until the next)."""
        cupy = self.cupy
        import cupyx

        pinned = [cupyx.empty_pinned(nbytes, np.uint8) for _ in range(2)]
        device = [cupy.empty(nbytes, cupy.uint8) for _ in range(2)]
        copied = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
        side = cupy.cuda.Stream(non_blocking=True)

        def load(slot: int) -> None:
            cupy.cuda.runtime.memcpyAsync(
                device[slot].data.ptr, pinned[slot].ctypes.data, nbytes, 1, side.ptr
            )
            copied[slot].record(side)

        load(0)
        for i in itertools.count():
            slot = i % 2
            consumer = cupy.cuda.get_current_stream()
            consumer.wait_event(copied[slot])
            side.wait_event(consumer.record())  # the step that read the other buffer is done
            load(1 - slot)
            yield device[slot]

    def dataloader(self, seq: Any) -> Iterator[Any]:
        from bench import baselines

        yield from baselines.torch_dataloader("cupy", seq, num_workers=2)


class DryKit(Kit):
    """The strict CUDA double as CuPy: gpuqueue's device path on the CPU, NumPy steps."""

    def __init__(self, min_seconds: float) -> None:
        import gpuqueue.backends
        from tests.cuda_double import StrictCuda, install

        self.cuda = StrictCuda(devices=2)
        self._saved = {name: sys.modules.get(name) for name in ("cupy", "cupy.cuda")}
        self._saved["cupy.cuda.runtime"] = sys.modules.get("cupy.cuda.runtime")
        self._saved["gpuqueue.backends.cupy"] = sys.modules.pop("gpuqueue.backends.cupy", None)
        sys.modules.update(install(self.cuda))
        if hasattr(gpuqueue.backends, "cupy"):
            delattr(gpuqueue.backends, "cupy")
        import gpuqueue.backends.cupy as backend

        backend._CUDART = backend._LIBCUDA = self.cuda.native
        self.backend_module = backend
        self.device, self.min_seconds = 0, min_seconds

    def raw_copy(self, nbytes: int) -> Callable[[int], None]:
        backend = self.backend_module.CupyBackend(0)
        stream, host = backend.create_stream(), backend.alloc_pinned(nbytes)
        arena = backend.alloc_device(nbytes, stream)
        done = backend.create_event()
        self._raw: tuple[Any, ...] | None = (backend, stream, arena, done)

        def run(n: int) -> None:
            for _ in range(n):
                backend.copy_to_device(arena, host, nbytes, stream)
            backend.record(done, stream)
            backend.synchronize(done)

        return run

    def step(self, target_s: float) -> tuple[Callable[[Any], None], float]:
        a = np.ones((64, 64), np.float32)

        def step(batch: Any) -> None:
            a @ a  # the stand-in for a kernel: it takes time, its result is unused

        def run(n: int) -> None:
            for _ in range(n):
                step(None)

        return step, repeat_timing(run, 0.01)["median_s"]

    def synchronize(self) -> None:
        """The double runs work as it is issued."""

    def to_host(self, array: Any) -> np.ndarray:
        values: np.ndarray = self.cuda.read(array, self.cuda.default_stream(0), "ownership")
        return values

    def one_ahead(self, nbytes: int) -> Iterator[Any]:
        buffers = [np.ones(nbytes, np.uint8) for _ in range(2)]
        for i in itertools.count():
            yield buffers[i % 2]

    def dataloader(self, seq: Any) -> Iterator[Any]:
        from bench import baselines

        yield from baselines.torch_dataloader("numpy", seq, num_workers=0)

    def close(self) -> None:
        import gc

        import gpuqueue.backends
        from tests.cuda_double import uninstall

        raw = getattr(self, "_raw", None)
        if raw is not None:
            backend, stream, arena, _done = raw
            backend.free_device(arena, stream)
            backend.close()
            del raw, backend, stream, arena
            self._raw = None
        gc.collect()
        uninstall()
        if hasattr(gpuqueue.backends, "cupy"):
            delattr(gpuqueue.backends, "cupy")
        for name, module in self._saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# -- the rows -----------------------------------------------------------------------------


def run_gpu_tests(timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"tests/gpu timed out after {timeout} s: {error}") from None
    lines = done.stdout.strip().splitlines()
    result = {
        "command": " ".join(command),
        "exit_code": done.returncode,
        "summary": lines[-1] if lines else "",
        "tail": "\n".join(lines[-40:]) + ("\n" + done.stderr[-2000:] if done.stderr else ""),
    }
    if done.returncode not in (0, 5):
        raise RuntimeError(f"tests/gpu failed: {result['summary']}\n{result['tail']}")
    return result


class Stamped:
    """Batch i: ``words`` uint32 values derived from i, and i itself."""

    def __init__(self, length: int, words: int) -> None:
        self.length, self.base = length, np.arange(words, dtype=np.uint32)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.base * np.uint32(2654435761) + np.uint32(index), np.int64(index)


class Repeated:
    """The same batch of ``nbytes`` every time: gpuqueue's cost, not the Sequence's."""

    def __init__(self, nbytes: int, length: int = 64) -> None:
        self.batch, self.length = np.ones(nbytes, np.uint8), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        return self.batch


def ownership_check(kit: Kit) -> dict[str, Any]:
    import gpuqueue

    seq = Stamped(length=24, words=MiB // 4)
    enqueuer = gpuqueue.OrderedEnqueuer(seq, device=kit.device, epochs=2, shard=None)
    enqueuer.start(workers=4)
    kept = list(enqueuer.get())
    wrong = [
        position
        for position, (x, index) in enumerate(kept)
        if int(kit.to_host(index)) != position % 24
        or not np.array_equal(kit.to_host(x), seq[position % 24][0])
    ]
    if len(kept) != 48 or wrong:
        raise AssertionError(f"{len(kept)} batches of 48, wrong at positions {wrong}")
    return {"batches": len(kept), "wrong": wrong}


def time_feed(kit: Kit, feed: Iterator[Any], step: Callable[[Any], None]) -> dict[str, Any]:
    """Seconds per batch of ``step(next(feed))``, synchronised at each window's end."""

    def run(n: int) -> None:
        for _ in range(n):
            step(next(feed))
        kit.synchronize()

    run(3)  # warm: threads started, memory allocated, kernels compiled
    return repeat_timing(run, kit.min_seconds)


def gpuqueue_row(kit: Kit, nbytes: int, depth: int, step: Callable[[Any], None]) -> dict[str, Any]:
    """gpuqueue at ``depth`` behind ``step``; ``stats()`` read once, after the windows."""
    import gpuqueue

    enqueuer = gpuqueue.OrderedEnqueuer(
        Repeated(nbytes), device=kit.device, prefetch_depth=depth, shard=None
    )
    enqueuer.start(workers=2)
    try:
        timing = time_feed(kit, enqueuer.get(), step)
        stats = enqueuer.stats()
    finally:
        enqueuer.stop()
    return {**timing, "stats": stats}


def no_step(batch: Any) -> None:
    """The loop with nothing to do: what the feed alone costs."""


def size_rows(report: Report, kit: Kit, nbytes: int) -> None:
    """The rows of one batch size; each later row uses what the earlier ones measured."""
    label = size_label(nbytes)

    def raw_copy() -> dict[str, Any]:
        timing = repeat_timing(kit.raw_copy(nbytes), kit.min_seconds)
        return {**timing, "gbps": nbytes / timing["median_s"] / 1e9}

    raw = report.row(f"{label} raw pinned memcpyAsync", raw_copy)
    copy_s = raw["median_s"] if raw else None
    steps: list[Callable[[Any], None]] = []

    def make_step() -> dict[str, Any]:
        step, seconds = kit.step(copy_s or 1e-3)
        steps.append(step)
        return {"step_s": seconds, "copy_s": copy_s}

    made = report.row(f"{label} matmul step as long as the copy", make_step)
    step = steps[0] if steps else no_step
    report.row(
        f"{label} one-ahead, packed ahead", lambda: time_feed(kit, kit.one_ahead(nbytes), step)
    )
    report.row(
        f"{label} DataLoader(pin_memory=True)",
        lambda: time_feed(kit, kit.dataloader(Repeated(nbytes)), step),
    )
    alone = report.row(f"{label} gpuqueue, no step", lambda: gpuqueue_row(kit, nbytes, 2, no_step))
    if raw and alone:
        ratio = raw["median_s"] / alone["median_s"]
        alone["gbps"] = nbytes / alone["median_s"] / 1e9
        alone["throughput_ratio"] = ratio
        alone["throughput_goal"] = THROUGHPUT_GOALS.get(nbytes)
        alone["throughput_goal_met"] = ratio >= THROUGHPUT_GOALS.get(nbytes, 1.0)
        report.write()
    for depth in DEPTHS:
        result = report.row(
            f"{label} gpuqueue depth {depth} behind the step",
            lambda depth=depth: gpuqueue_row(kit, nbytes, depth, step),  # type: ignore[misc]
        )
        if result and raw and made:
            copy, step_s = raw["median_s"], made["step_s"]
            hidden = (copy + step_s - result["median_s"]) / copy
            result["hidden_fraction"] = max(0.0, min(1.0, hidden))
            if depth == 2 and nbytes in HIDDEN_GOAL_SIZES:
                result["hidden_goal"] = HIDDEN_GOAL
                result["hidden_goal_met"] = hidden >= HIDDEN_GOAL
            report.write()


def size_label(nbytes: int) -> str:
    return f"{nbytes // MiB}MiB" if nbytes % MiB == 0 else f"{nbytes // 1024}KiB"


def parse_size(text: str) -> int:
    """``"16MiB"``, ``"64KiB"`` or a number of MiB."""
    match = re.fullmatch(r"(\d+)\s*(MiB|KiB)?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"a size is like 16MiB or 64KiB, got {text!r}")
    return int(match.group(1)) * (1024 if match.group(2) == "KiB" else MiB)


def double_violations(kit: Kit) -> dict[str, Any]:
    """On the double: what it saw go wrong over the whole run (nothing, or the row fails)."""
    assert isinstance(kit, DryKit)
    import gc

    gc.collect()
    violations = list(kit.cuda.violations)
    if violations:
        raise AssertionError(f"the strict CUDA double saw: {violations[:10]}")
    return {"violations": 0, "runtime_calls": len(kit.cuda.calls)}


_RANK_SCRIPT = """
import gpuqueue, numpy as np
from gpuqueue.backends import resolve
backend = resolve("auto")
print("device", backend.device)
with gpuqueue.prefetch([(np.arange(4),)] * 3, device="auto", epochs=1, shard=None) as batches:
    print("batches", len(list(batches)))
"""


def local_rank_check(kit: Kit) -> dict[str, Any]:
    if isinstance(kit, DryKit):
        return {"skipped": "dry run: no processes on the double"}
    count = kit.cupy.cuda.runtime.getDeviceCount()  # type: ignore[attr-defined]
    if count < 2:
        return {"skipped": f"{count} GPU visible; needs 2"}
    devices: list[Any] = []
    for rank in (0, 1):
        env = {**os.environ, "LOCAL_RANK": str(rank)}
        done = subprocess.run(
            [sys.executable, "-c", _RANK_SCRIPT], env=env, capture_output=True, text=True,
            timeout=120, check=False, cwd=ROOT,
        )  # fmt: skip
        match = re.search(r"device (\d+)", done.stdout)
        devices.append(int(match.group(1)) if match else f"failed: {done.stderr[-500:]}")
    if devices != [0, 1]:
        raise AssertionError(f"LOCAL_RANK 0 and 1 landed on {devices}")
    return {"devices": devices}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--device", default="cuda", help="the GPU: 'cuda', 'cuda:N' or N")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--skip-tests", action="store_true", help="bench only")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="each timed window")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated, e.g. 4MiB,16MiB,64MiB (the default; 64KiB,256KiB,1MiB dry)",
    )
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, on the CUDA double")
    args = parser.parse_args(argv)
    default = "64KiB,256KiB,1MiB" if args.dry_run else ",".join(map(size_label, SIZES))
    sizes = [parse_size(text) for text in (args.sizes or default).split(",")]

    kit: Kit
    if args.dry_run:
        kit = DryKit(min(args.min_seconds, 0.02))
        machine: dict[str, Any] = {"gpu": {"name": "strict CUDA double (dry run)"}}
    else:
        if _cupy_missing():
            print(INSTALL_HINT, file=sys.stderr)
            raise SystemExit(2)
        from bench.machine import describe_machine
        from bench.nvml import Nvml
        from gpuqueue.backends import resolve

        backend = resolve(args.device)
        gpu = backend.device if backend.device is not None else 0
        backend.close()
        kit = GpuKit(gpu, args.min_seconds)
        machine = describe_machine("cupy", gpu, Nvml.for_gpu(gpu))
    slug = re.sub(r"[^a-z0-9]+", "-", str(machine["gpu"]["name"]).lower()).strip("-")
    today = datetime.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"{slug}-{today}.json"
    report = Report(out, {"check": "python -m bench.gpu_check", "argv": argv, "machine": machine})
    try:
        if args.skip_tests or args.dry_run:
            report.row("tests/gpu", lambda: {"skipped": "--skip-tests or --dry-run"})
        else:
            report.row("tests/gpu", lambda: run_gpu_tests(timeout=120))
        report.row("ownership", lambda: ownership_check(kit))
        for nbytes in sizes:
            size_rows(report, kit, nbytes)
        report.row("LOCAL_RANK", lambda: local_rank_check(kit))
        if isinstance(kit, DryKit):
            report.row("strict double", lambda: double_violations(kit))
    finally:
        kit.close()
        report.write()
    failed = [row["row"] for row in report.data["rows"] if row["status"] == "error"]
    print(f"wrote {out}: {len(report.data['rows'])} rows, errors in {failed or 'none'}")
    return report.data


def _cupy_missing() -> bool:
    import importlib.util

    with contextlib.suppress(ImportError, ValueError):
        return importlib.util.find_spec("cupy") is None
    return True


if __name__ == "__main__":
    main()
