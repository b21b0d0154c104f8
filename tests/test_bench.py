"""The benches run end to end (``--smoke``), explain each column, and decide by their stated rules.

Smoke runs check that the JSON has every field, that each peer that cannot
run is a row saying why, and that the README's tables are what the JSON
says; never the speeds (speed is measured in bench/, never asserted in tests).
tf_keras is hidden from the smoke runs (``sys.modules["tf_keras"] = None``),
so its skipped row is exercised whether or not it is installed here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import readme
from bench.advice import depth_verdict, noise, recommend, recommend_everywhere, within_noise
from bench.rounds import Case, ratio, run_rounds

ROOT = Path(__file__).resolve().parent.parent
WITHOUT_TF_KERAS = "import sys; sys.modules['tf_keras'] = None; sys.argv[0] = '{module}'; "


def _run_without_tf_keras(module: str, args: list[str], timeout: float) -> str:
    code = WITHOUT_TF_KERAS.format(module=module) + (
        f"import runpy; sys.argv[1:] = {args!r}; runpy.run_module('{module}', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    bar = re.findall(r"\[#*\.*\] (\d+)/(\d+) ", done.stderr)
    assert len(bar) > 1 and bar[-1][0] == bar[-1][1], f"no progress bar: {done.stderr[-500:]}"
    return done.stdout


@pytest.fixture(scope="module")
def depth_smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("depth")
    return _run_without_tf_keras("bench", ["--smoke", "--out", str(out)], 170), out


@pytest.mark.timeout(180)
def test_depth_smoke_run_writes_every_row_and_the_plot(depth_smoke: tuple[str, Path]) -> None:
    stdout, out = depth_smoke
    report = json.loads((out / "prefetch_depth.json").read_text())
    assert report["schema"] == 3 and report["config"]["rounds"] == 2
    assert {"cpu_count", "python", "backend", "packages", "platform"} <= set(report["machine"])
    (size,) = report["sizes"]
    rows = {row["row"]: row for row in size["rows"]}
    # No GPU here (CI): no copy to hide, so one gpuqueue row and no depth swept.
    assert report["machine"]["backend"] == "numpy"
    assert list(rows) == [
        "gpuqueue (no device)", "one-ahead loop", "DataLoader workers=0", "DataLoader workers=2",
        "tf_keras enqueuer",
    ]  # fmt: skip
    assert report["recommended_depth"] is None and size["recommended_depth"] is None
    assert report["within_noise"] == [] and report["goal_vs_one_ahead"] is None
    # The DataLoader rows are measured where torch is installed (CI's first venv, not 3.10/3.13's).
    torch_here = importlib.util.find_spec("torch") is not None
    loaders = {"DataLoader workers=0", "DataLoader workers=2"} if torch_here else set()
    assert set(size["vs_peers"]) == {"one-ahead loop", *loaders}
    advice = [line for line in stdout.splitlines() if line.startswith("advice: ")]
    assert advice == [f"advice: {report['advice']}"]  # one line of advice
    assert report["advice"].startswith("no depth to recommend: without a GPU prefetch_depth has")
    assert ("x DataLoader workers=2" in report["advice"]) == torch_here
    assert "recommended depth" not in stdout
    normalize = report["sections"]["normalize"]
    assert set(normalize["paths"]) == {"device", "host"}
    device, host = normalize["paths"]["device"], normalize["paths"]["host"]
    # uint8 travels, float32 does not: a quarter of the bytes (and the labels).
    assert device["bytes_copied_per_batch"]["median"] < host["bytes_copied_per_batch"]["median"] / 3
    assert "Normalize on the device vs on the host" in stdout
    assert rows["tf_keras enqueuer"]["skipped"].startswith("tf_keras not installed")
    assert "tf_keras enqueuer" in stdout and "skipped: tf_keras not installed" in stdout
    for name, row in rows.items():
        if "skipped" in row:
            continue
        for key in ("batches_per_s", "vs_one_ahead", "stall_fraction", "step_time_s"):
            assert len(row[key]["rounds"]) == 2, (name, key)
            assert row[key]["min"] <= row[key]["median"] <= row[key]["max"], (name, key)
    assert rows["one-ahead loop"]["vs_one_ahead"]["rounds"] == [1.0, 1.0]
    png = (out / "prefetch_depth.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_depth_smoke_explains_every_column_it_prints(depth_smoke: tuple[str, Path]) -> None:
    stdout, _ = depth_smoke
    lines = stdout.splitlines()
    header = lines[lines.index(next(x for x in lines if x.startswith("---"))) - 1]
    shown = re.split(r"\s{2,}", header.strip())
    explained = [
        x.split(":", 1)[0].strip()
        for x in lines[lines.index("columns:") + 1 :]
        if x.startswith("  ") and ":" in x
    ]
    assert len(shown) >= 9 and shown == explained[: len(shown)], (shown, explained)
    if "NumPy fallback" in stdout:  # no device: nothing claims a host-to-device copy
        assert "no copy: the batch a worker read is handed over" in stdout
        assert "GB/s H2D" not in stdout


def test_readme_tables_are_made_from_the_json(depth_smoke: tuple[str, Path]) -> None:
    _, out = depth_smoke
    block = readme.depth_block(out)
    report = json.loads((out / "prefetch_depth.json").read_text())
    for row in report["sizes"][0]["rows"]:
        assert row["row"] in block
    assert f"Advice: {report['advice']}." in block and "Recommended depth" not in block
    assert "No figures yet" in readme.loaders_block(out)  # no loaders.json in that folder
    assert readme.main(["--check"]) == 0, "README's bench tables differ from bench/results"


@pytest.mark.engine
@pytest.mark.timeout(360)  # 11 cases in fresh processes, twice (6 of them per-sample)
def test_loaders_smoke_run_computes_every_goal(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "loaders.json"
    stdout = _run_without_tf_keras("bench.loaders", ["--smoke", "--out", str(out)], 350)
    report = json.loads(out.read_text())
    assert report["config"]["rounds"] == 2 and report["machine"]["cpu_count"]
    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 27  # 16, 7 of per-sample datasets, 4 of GIL-bound reads and start-up
    gil = goals["GIL-bound reads (a pure-Python loop per batch): worker processes vs threads"]
    assert len(gil["measured"]["rounds"]) == 2 and gil["cases"] == ["gil/processes", "gil/threads"]
    assert "GIL-bound reads: worker processes vs DataLoader num_workers=2" in goals
    started = report["rounds"]["startup"]
    assert [r["imported"] for r in started] == ["torch", "torch"]  # smoke: torch alone
    assert all(r["gpuqueue_again_s"] > 0 and r["dataloader2_s"] > 0 for r in started)
    keras = goals["trivial batches: gpuqueue threads vs tf_keras's enqueuer"]
    assert keras["measured"] is None and keras["met"] is None
    assert "skipped" in stdout and report["cases"]["trivial/tf_keras"]["skipped"]
    for goal in goals.values():
        if goal["measured"] is not None:
            assert len(goal["measured"]["rounds"]) == 2, goal["goal"]
            assert goal["met"] in (True, False, None)
            assert (goal["met"] is None) == goal["target"].startswith("none")
    block = readme.loaders_block(tmp_path)  # the README's tables, from this JSON
    assert all(goal in block for goal in goals) and "| DataLoader num_workers=2 |" in block
    assert "| samples: DataLoader num_workers=2 |" in block
    assert "| gpuqueue processes, second run (forks from that server) | " in block
    processes = report["rounds"]["image/processes"]
    assert all(r["tree_pss_peak_bytes"] >= r["tree_pss_base_bytes"] > 0 for r in processes)
    for case in ("processes", "threads", "dataloader0", "dataloader2", "gil_threads"):
        runs = report["rounds"][f"samples/{case}"]
        assert len(runs) == 2 and all(r["s_per_batch"] > 0 for r in runs), case
    assert all(r["shared_memory_bytes"] > 0 and r["rss_peak_bytes"] > 0 for r in processes)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:gpuqueue. device='auto' found no usable GPU:UserWarning")
def test_variants_and_sections_are_registry_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lead's later rows (an automatic depth) and sections (Normalize) need no special case."""
    from bench import depth

    class Doubling:
        name = "doubling"

        def cases(self, ctx: Any) -> list[Case]:
            return [Case("doubling/x", lambda: {"x": 2.0})]

        def summarize(self, ctx: Any, results: dict[str, Any]) -> dict[str, Any]:
            return {"rounds": len(results["doubling/x"])}

        def render(self, summary: dict[str, Any]) -> list[str]:
            return [f"doubling ran {summary['rounds']} rounds"]

    monkeypatch.setattr(depth, "BASELINES", depth.BASELINES[:1])  # the one-ahead loop only
    monkeypatch.setattr(depth, "GPUQUEUE_VARIANTS", [("default depth", {})])
    monkeypatch.setattr(depth, "SECTIONS", [Doubling()])
    report = depth.main(["--smoke", "--sweep", "--no-plot", "--out", str(tmp_path)])
    (size,) = report["sizes"]
    rows = {row["row"]: row for row in size["rows"]}
    assert [row.get("depth") for row in size["rows"][:3]] == [0, 1, 2]  # the swept depths
    variant = rows["gpuqueue default depth"]
    assert variant["depth"] is None and len(variant["vs_fastest_depth"]["rounds"]) == 2
    fixed = {d: rows[f"gpuqueue depth {d}"]["batches_per_s"]["median"] for d in (0, 1, 2)}
    assert size["recommended_depth"] == within_noise([fixed], [size["noise"]])[0]
    assert report["recommended_depth"] is None  # on NumPy, swept or not, no depth is advised
    assert report["sections"] == {"doubling": {"rounds": 2}}
    out = capsys.readouterr().out
    assert "gpuqueue default depth: " in out and "doubling ran 2 rounds" in out


def test_recommend_takes_the_smallest_depth_within_two_percent_of_the_best() -> None:
    assert recommend({0: 100.0, 1: 150.0, 2: 196.0, 3: 200.0, 4: 199.0}) == 2
    assert recommend({0: 100.0, 1: 150.0, 2: 195.9, 3: 200.0, 4: 199.0}) == 3
    assert recommend({8: 10.0, 2: 10.0}) == 2  # order of the mapping does not matter
    assert recommend({3: 50.0}) == 3
    with pytest.raises(ValueError, match=r"^no depth was measured$"):
        recommend({})


def test_recommend_everywhere_needs_the_depth_to_hold_at_every_size() -> None:
    small = {1: 100.0, 2: 99.0, 3: 100.0}
    large = {1: 80.0, 2: 90.0, 3: 100.0}
    assert recommend_everywhere([small]) == 1
    assert recommend_everywhere([small, large]) == 3
    # No depth holds at both sizes: the one that falls least below a size's best, not the deepest.
    assert recommend_everywhere([{1: 100.0, 2: 50.0, 8: 40.0}, {1: 90.0, 2: 100.0, 8: 30.0}]) == 1
    assert recommend_everywhere([{1: 100.0, 2: 50.0, 3: 90.0}, {1: 50.0, 2: 100.0, 3: 90.0}]) == 3


def test_within_noise_is_every_depth_no_further_below_the_best_than_its_own_rounds() -> None:
    assert noise({"median": 100.0, "min": 90.0}) == pytest.approx(0.10)
    assert noise({"median": 100.0, "min": 99.5}) == 0.02  # never under the 2 % tolerance
    medians = {0: 100.0, 1: 97.0, 2: 99.0, 4: 101.0}
    assert within_noise([medians], [0.05]) == [0, 1, 2, 4]
    assert within_noise([medians], [0.02]) == [0, 2, 4]
    # At every size: depth 0 is within noise at the first size only.
    assert within_noise([medians, {0: 80.0, 2: 100.0, 4: 99.0}], [0.05, 0.05]) == [2, 4]


def _size(medians: dict[int, float], spread: float) -> dict[str, Any]:
    """A size's summary as bench.depth makes it, from medians and the best depth's spread."""
    rows = [
        {"row": f"gpuqueue depth {d}", "kind": "gpuqueue", "depth": d,
         "batches_per_s": {"median": m}, "vs_one_ahead": {"median": m / 100.0}}
        for d, m in medians.items()
    ]  # fmt: skip
    return {"rows": rows, "noise": max(0.02, spread)}


def test_three_noisy_runs_give_one_advice_and_one_line() -> None:
    """Rankings that change from run to run within the noise give the same recommendation."""
    runs = [  # the fastest depth differs in each run; its rounds spread 6 % below its median
        {0: 96.0, 1: 99.0, 2: 100.0, 4: 98.0, 8: 97.0},
        {0: 97.0, 1: 101.0, 2: 98.0, 4: 100.0, 8: 99.0},
        {0: 100.0, 1: 98.0, 2: 97.0, 4: 99.0, 8: 101.0},
    ]
    verdicts = [depth_verdict(True, [_size(medians, 0.06)]) for medians in runs]
    assert [v["recommended_depth"] for v in verdicts] == [0, 0, 0]
    assert all(v["within_noise"] == [0, 1, 2, 4, 8] for v in verdicts)
    assert all("\n" not in v["advice"] for v in verdicts)
    assert verdicts[0]["advice"].startswith("prefetch_depth=0: the smallest depth within noise")
    # A quiet machine tells depths apart: then the advice is the smallest that keeps up.
    quiet = depth_verdict(True, [_size({0: 60.0, 1: 90.0, 2: 99.5, 3: 100.0}, 0.0)])
    assert quiet["recommended_depth"] == 2 and quiet["within_noise"] == [2, 3]


def test_rounds_interleave_every_case_and_ratios_pair_within_a_round() -> None:
    calls: list[str] = []

    def case(key: str, value: float) -> Case:
        def run() -> dict[str, Any]:
            calls.append(key)
            return {"t": value * (1 + len(calls))}

        return Case(key, run)

    cases = [case("a", 1.0), case("b", 2.0), case("c", 3.0), Case("d", calls.clear, skip="why")]
    results = run_rounds(cases, rounds=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert results["d"] == [] and [len(results[k]) for k in "abc"] == [3, 3, 3]
    paired = ratio(results["a"], results["b"], "t")
    expected = [r["t"] / s["t"] for r, s in zip(results["a"], results["b"], strict=True)]
    assert paired["rounds"] == expected
    with pytest.raises(ValueError, match=r"^case keys must be unique; repeated: \['a'\]$"):
        run_rounds([case("a", 1.0), case("a", 2.0)], rounds=1)


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


# -- gpu_check: a dry run on the strict CUDA double ---------------------------------------

GPU_CHECK_ROWS = 3 + 3 * 10 + 1  # tests/gpu, ownership, 10 per size, LOCAL_RANK, the double


@pytest.mark.timeout(120)
def test_gpu_check_dry_run_writes_every_row_on_the_double(tmp_path: Path) -> None:
    """Every row of a GPU run, on the CPU, in CI's budget: no GPU minute finds a bug here."""
    import time

    from bench import gpu_check

    out = tmp_path / "check.json"
    began = time.perf_counter()
    returned = gpu_check.main(["--dry-run", "--out", str(out)])
    assert time.perf_counter() - began < 30
    written = json.loads(out.read_text())
    assert [row["row"] for row in written["rows"]] == [row["row"] for row in returned["rows"]]
    assert len(written["rows"]) == GPU_CHECK_ROWS
    statuses = {row["row"]: row["status"] for row in written["rows"]}
    # The DataLoader rows need torch, which the 3.10/3.13 venvs do not install.
    assert {s for r, s in statuses.items() if "DataLoader" not in r} == {"ok"}
    for row in written["rows"]:
        if row["row"].endswith("behind the step") and row["status"] == "ok":
            result = row["result"]
            assert result["windows"] >= 3 and 0.0 <= result["hidden_fraction"] <= 1.0
            assert result["stats"]["batches_consumed"] > 0  # read once, after the windows


@pytest.mark.timeout(120)
def test_gpu_check_writes_a_row_per_case_when_cases_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error is that row's result, traceback and all, the JSON is on disk after each
    row, and the rows after it still run."""
    from bench import gpu_check

    out = tmp_path / "check.json"
    seen_on_disk: list[int] = []
    real_row = gpu_check.Report.row

    def row(self: Any, name: str, case: Any) -> Any:
        if out.exists():  # what a run killed now would have left
            seen_on_disk.append(len(json.loads(out.read_text())["rows"]))
        return real_row(self, name, case)

    def broken_ownership(kit: Any) -> Any:
        raise RuntimeError("an ownership check that breaks")

    def broken_one_ahead(self: Any, nbytes: int) -> Any:
        raise ValueError(f"a one-ahead loop that breaks at {nbytes}")

    monkeypatch.setattr(gpu_check.Report, "row", row)
    monkeypatch.setattr(gpu_check, "ownership_check", broken_ownership)
    monkeypatch.setattr(gpu_check.DryKit, "one_ahead", broken_one_ahead)
    gpu_check.main(["--dry-run", "--out", str(out), "--sizes", "64KiB"])
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 3 + 10 + 1
    assert rows["ownership"]["status"] == "error"
    assert "an ownership check that breaks" in rows["ownership"]["traceback"]
    failed = rows["64KiB one-ahead, packed ahead"]
    assert failed["status"] == "error" and "ValueError" in failed["traceback"]
    assert rows["64KiB gpuqueue depth 4 behind the step"]["status"] == "ok"
    assert seen_on_disk == list(range(len(seen_on_disk)))  # row n found n rows written


def test_gpu_check_without_cupy_names_the_extra_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['cupy'] = None\n")
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "x.json")],
        cwd=Path(__file__).resolve().parent.parent,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[test,bench,cuda12]'" in lines[0], done.stderr
    assert not (tmp_path / "x.json").exists()


def test_bench_help_shows_every_default_and_where_results_go() -> None:
    from bench import depth

    parser = depth.build_parser()
    text = parser.format_help()
    # One entry per option, each with its help wrapped over however many lines.
    entries = [" ".join(e.split()).lstrip("-") for e in text.split("options:")[1].split("\n  -")]
    for action in parser._actions:
        if action.dest == "help":
            continue
        entry = next(e for e in entries if e.startswith(action.option_strings[0].lstrip("-")))
        assert f"(default: {action.default})" in entry, (action.dest, entry)
    assert "OUT/prefetch_depth.json" in " ".join(text.split())
    assert "OUT/prefetch_depth.png" in " ".join(text.split())


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:gpuqueue. device='auto' found no usable GPU:UserWarning")
def test_a_second_bench_run_keeps_the_first_runs_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import depth

    monkeypatch.setattr(depth, "BASELINES", depth.BASELINES[:1])  # the one-ahead loop only
    monkeypatch.setattr(depth, "GPUQUEUE_VARIANTS", [])
    monkeypatch.setattr(depth, "SECTIONS", [])
    first = tmp_path / "prefetch_depth.json"
    first.write_text('{"the first run": true}\n')
    depth.main(["--smoke", "--no-plot", "--out", str(tmp_path)])
    kept = [p for p in tmp_path.glob("prefetch_depth.*.json")]
    assert len(kept) == 1 and kept[0].read_text() == '{"the first run": true}\n'
    assert "the first run" not in first.read_text()
    assert f"kept the last run's prefetch_depth.json as {kept[0]}" in capsys.readouterr().out
