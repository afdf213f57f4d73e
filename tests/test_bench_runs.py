"""The side-by-side benchmark still runs and counts right; its speed is never judged.

The runner is run once, at its smallest (hidden ``--smoke``) size, through the
real command in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench._compare import RATIO_NAMES
from bench.bench_threads import ROLES as THREAD_ROLES
from bench.bench_threads import thread_cpu

ROOT = Path(__file__).resolve().parent.parent

MODES = {
    "limit",
    "pykka_ask",
    "pykka_pipelined",
    "pykka_batched_100",
    "python_stages_pipelined",
    "python_stages_batched_100",
    "runtime_mutate",
    "runtime_mutate_async",
}

RATIOS = set(RATIO_NAMES)

HAS_EVENTSOURCING = importlib.util.find_spec("eventsourcing") is not None
NO_EVENTSOURCING = (
    "eventsourcing is not installed (only the bench extra has it; CI installs the "
    "test extra)"
)


def _run_smoke(out: Path, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "monitoring._cli", "bench", "--smoke", "--json", out],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    """Run ``entity-runtime bench --smoke --json FILE`` once for this module."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = _run_smoke(out)
    report = json.loads(out.read_text()) if out.exists() else {}
    return done, report


def test_smoke_bench_exits_cleanly_and_prints_the_table(
    smoke: tuple[Any, dict[str, Any]],
) -> None:
    done, _ = smoke

    assert done.returncode == 0, done.stderr
    assert "ops/s" in done.stdout
    assert "pipelined_vs_limit" in done.stdout
    assert "runtime_mutate_async" in done.stdout


def test_smoke_bench_json_has_the_report_shape(
    smoke: tuple[Any, dict[str, Any]],
) -> None:
    _, report = smoke

    assert {"workload", "results", "ratios"} <= set(report)
    assert report["workload"]["size"] == "smoke"
    assert report["workload"]["scaled_down"] is True
    names = {r["name"] for r in report["results"]}
    assert names >= MODES | {"history_10_rows"}
    for entry in report["results"]:
        assert {"name", "ops_per_s", "p50_us", "p99_us"} <= set(entry)
        assert entry["ops_per_s"] > 0, entry
        assert 0 < entry["p50_us"] <= entry["p99_us"], entry


def test_smoke_bench_ratios_are_positive_or_null_without_their_mode(
    smoke: tuple[Any, dict[str, Any]],
) -> None:
    from runtime import EntityHandle

    _, report = smoke
    ratios = report["ratios"]
    notes = report["workload"]["notes"]

    assert set(ratios) == RATIOS
    assert ratios["pipelined_vs_limit"] > 0
    assert ratios["blocking_vs_pykka_ask"] > 0
    assert ratios["bytes_per_row"] > 0
    assert ratios["pipelined_vs_home_assistant"] == pytest.approx(
        ratios["pipelined_vs_limit"] / 0.20, rel=1e-3
    )
    assert any("Home Assistant" in n and "0.20" in n for n in notes)
    ops = {r["name"]: r["ops_per_s"] for r in report["results"]}
    assert ratios["pipelined_vs_python_stages"] == pytest.approx(
        ops["runtime_mutate_async"] / ops["python_stages_pipelined"], rel=1e-3
    )
    if hasattr(EntityHandle, "mutate_many"):
        assert ratios["batched_vs_limit"] > 0
        assert ratios["batched_vs_python_stages"] == pytest.approx(
            ops["runtime_mutate_many_100"] / ops["python_stages_batched_100"],
            rel=1e-3,
        )
    else:
        assert ratios["batched_vs_limit"] is None
        assert any("mutate_many" in n for n in notes)
    if HAS_EVENTSOURCING:
        assert ratios["runtime_vs_eventsourcing"] > 0
    else:
        assert ratios["runtime_vs_eventsourcing"] is None
        assert any("eventsourcing is not installed" in n for n in notes)


def test_every_mode_subscriber_saw_every_change_of_the_workload(
    smoke: tuple[Any, dict[str, Any]],
) -> None:
    _, report = smoke
    workload = report["workload"]
    seen = {r["name"]: r["changes_seen"] for r in report["results"]}

    for mode in MODES:
        assert seen[mode] == workload["mutations"], mode
    assert workload["events"]["x.created"] == workload["ids"]
    assert sum(workload["events"].values()) == workload["mutations"]
    assert report["checks"] == {"ok": True, "problems": []}


def test_eventsourcing_mode_agrees_with_the_limit_on_its_sample(
    smoke: tuple[Any, dict[str, Any]],
) -> None:
    if not HAS_EVENTSOURCING:
        pytest.skip(NO_EVENTSOURCING)
    _, report = smoke
    sample = report["workload"]["eventsourcing"]
    entry = next(r for r in report["results"] if r["name"] == "eventsourcing")

    assert sample["mutations"] == report["workload"]["mutations"] // sample["every"]
    assert entry["ops"] == entry["changes_seen"] == sample["mutations"]
    assert sample["events"] == sample["events_expected"]
    assert sample["events_expected"]["x.created"] == sample["ids"]
    assert sum(sample["events_expected"].values()) == sample["mutations"]
    assert report["checks"] == {"ok": True, "problems": []}


def test_without_eventsourcing_its_mode_is_skipped_and_its_ratio_is_null(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "eventsourcing.py").write_text("raise ImportError('blocked')\n")
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(blocked)}

    done = _run_smoke(out, env)

    assert done.returncode == 0, done.stderr
    assert "runtime_vs_eventsourcing" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["ratios"]) == RATIOS
    assert report["ratios"]["runtime_vs_eventsourcing"] is None
    assert report["ratios"]["pipelined_vs_home_assistant"] > 0
    assert "eventsourcing" not in {r["name"] for r in report["results"]}
    assert report["workload"]["eventsourcing"]["version"] is None
    assert any(
        "eventsourcing is not installed" in n for n in report["workload"]["notes"]
    )
    assert report["checks"] == {"ok": True, "problems": []}


def test_plot_without_matplotlib_asks_for_the_bench_extra(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from monitoring._cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)

    code = main(["bench", "--smoke", "--plot", str(tmp_path / "bench.png")])

    assert code == 2
    assert "install the bench extra" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


def test_plot_writes_a_png_of_the_report(
    smoke: tuple[Any, dict[str, Any]], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    from bench import write_plot

    _, report = smoke
    path = tmp_path / "bench.png"

    write_plot(report, path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_bench_module(module: str, *args: str, timeout: float = 300) -> Any:
    """Run ``python -m bench.<module> ARGS`` from the project root."""
    return subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def test_the_bus_benchmark_still_runs() -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary (.ci/run installs Debian's redis-server)")

    done = _run_bench_module("bench_bus", "--changes", "300", timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("300 changes: local ")
    assert "through the bus to another runtime" in done.stdout


def test_the_bus_entry_check_benchmark_still_runs() -> None:
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary (.ci/run installs Debian's redis-server)")

    done = _run_bench_module(
        "bench_bus_checks", "--entries", "200", "--rounds", "1", timeout=120
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "shape",
        "decode",
        "µs",
        "check",
        "µs",
        "ratio",
        "added",
    ]
    assert lines[-1].startswith("reader, flat updates")
    assert all(float(line.split()[-2]) > 0 for line in lines[1:])


PYTEST_QUICK_BENCH = (
    sys.executable,
    "-m",
    "pytest",
    "bench",
    "-q",
    "-p",
    "no:cacheprovider",
    "--benchmark-disable",
    "-o",
    "addopts=",
)


def test_the_pytest_benchmark_scenarios_still_run() -> None:
    env = {**os.environ, "ENTITY_RUNTIME_BENCH_QUICK": "1"}

    done = subprocess.run(
        [*PYTEST_QUICK_BENCH],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env=env,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 passed" in done.stdout


def test_the_persistence_metrics_and_gc_benchmarks_still_run(tmp_path: Path) -> None:
    persistence = _run_bench_module(
        "bench_persistence",
        *("--entities", "300", "--changes", "2", "--mutations", "50"),
        *("--json", str(tmp_path / "persistence.json")),
    )
    metrics = _run_bench_module("bench_metrics", "--mutations", "300", "--rounds", "1")
    collector = _run_bench_module("bench_gc", "--entities", "500", "--rounds", "1")

    assert persistence.returncode == 0, persistence.stderr
    report = json.loads((tmp_path / "persistence.json").read_text())
    assert report
    assert metrics.returncode == 0, metrics.stderr
    assert metrics.stdout.strip()
    assert collector.returncode == 0, collector.stderr
    assert collector.stdout.startswith("500 entities: full collection ")


def test_the_thread_benchmark_accounts_each_mode_and_thread(tmp_path: Path) -> None:
    out = tmp_path / "threads.json"
    done = _run_bench_module(
        "bench_threads", "--mutations", "5000", "--ids", "250", "--json", str(out)
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["limit", "write path alone", "mutate_async", "mutate_many_100"]
    assert report["workload"] == {"mutations": 5000, "ids": 250, "batch": 100}
    assert all(
        r["ops_per_s"] > 0 and len(r["gc_passes"]) == 3 for r in report["results"]
    )
    assert report["per_thread"] == sys.platform.startswith("linux")
    if report["per_thread"]:
        runtime_modes = report["results"][2:]
        assert all(
            set(r["cpu_us_per_change"]) == set(THREAD_ROLES) for r in runtime_modes
        )
        assert all(sum(r["cpu_us_per_change"].values()) > 0 for r in runtime_modes)
    for name in names:
        assert name in done.stdout


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_thread_cpu_reads_the_cpu_time_of_each_running_thread() -> None:
    busy_id: list[int] = []
    stop = threading.Event()
    spun = threading.Event()

    def spin() -> None:
        busy_id.append(threading.get_native_id())
        while time.thread_time() < 0.3:
            pass
        spun.set()
        stop.wait(30)

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        assert spun.wait(60)
        used = thread_cpu()
    finally:
        stop.set()
        worker.join(30)

    # /proc counts in clock ticks (usually 10 ms): well under the 0.3 s spun.
    assert used[busy_id[0]] >= 0.2


@pytest.mark.parametrize("size", [None, 7])
def test_python_stages_hand_every_change_through_all_three_threads(
    size: int | None,
) -> None:
    from bench._modes import run_limit, run_python_stages
    from bench._workload import build_plan

    plan = build_plan(503, 41)
    limit = run_limit(plan, 10)

    staged = run_python_stages(plan, 10, size)

    assert staged.ops == staged.changes_seen == len(plan)
    assert staged.events == limit.events
    assert staged.ops_per_s > 0
    assert len(staged.samples_us) == (len(plan) // 10 if size is None else 72)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_as_a_failure_and_writes_nothing(
    tmp_path: Path, signum: int
) -> None:
    out = tmp_path / "bench.json"
    with subprocess.Popen(
        [sys.executable, "-m", "monitoring._cli", "bench", "--smoke", "--json", out],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    ) as child:
        assert child.stderr is not None
        for line in child.stderr:
            if line.startswith("bench: limit"):
                break

        child.send_signal(signum)
        rest = child.stderr.read()
        code = child.wait(timeout=60)

    assert code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}; no report written" in rest
    assert not out.exists()
