"""Benchmark regressions show: ratios against a baseline report, and instruction counts.

Speed is never judged here: the baselines are made up from the run's own
report, so only the comparison, its direction and its errors are checked.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import bench_instructions
from bench._compare import (
    DEFAULT_TOLERANCE,
    LOWER_IS_BETTER,
    BaselineError,
    compare_ratios,
    load_baseline,
)
from bench.bench_instructions import InstructionCountError, regressions
from monitoring._cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitoring._cli", "bench", "--smoke", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def _report(size: str = "smoke", **ratios: float | None) -> dict[str, Any]:
    return {"workload": {"size": size}, "results": [], "ratios": ratios}


def _write(path: Path, content: Any) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_throughput_ratio_regresses_only_when_it_falls_beyond_the_tolerance() -> None:
    changes = compare_ratios(
        {"pipelined_vs_limit": 0.079, "batched_vs_limit": 0.081, "new": 1.0},
        {"pipelined_vs_limit": 0.1, "batched_vs_limit": 0.1, "gone": 2.0},
        tolerance=0.2,
    )

    by_name = {change.name: change for change in changes}
    assert by_name["pipelined_vs_limit"].regressed
    assert not by_name["batched_vs_limit"].regressed
    assert by_name["pipelined_vs_limit"].factor == pytest.approx(0.79)
    # A ratio only one side measured is listed but never judged.
    assert (by_name["new"].baseline, by_name["new"].regressed) == (None, False)
    assert (by_name["gone"].current, by_name["gone"].factor) == (None, None)


def test_a_cost_ratio_regresses_when_it_grows_and_improves_when_it_falls() -> None:
    grown = compare_ratios(
        {"bytes_per_row": 73.0, "blocking_vs_pykka_ask": 1.25},
        {"bytes_per_row": 60.0, "blocking_vs_pykka_ask": 1.0},
        0.2,
    )
    fallen = compare_ratios({"bytes_per_row": 30.0}, {"bytes_per_row": 60.0}, 0.2)
    faster = compare_ratios(
        {"pipelined_vs_limit": 0.5}, {"pipelined_vs_limit": 0.1}, 0.2
    )

    assert [c.regressed for c in grown + fallen + faster] == [True, True, False, False]


@pytest.mark.parametrize("tolerance", [-0.1, 1.0, float("nan")])
def test_a_tolerance_outside_zero_to_one_is_refused(tolerance: float) -> None:
    with pytest.raises(ValueError, match="tolerance must be in"):
        compare_ratios({}, {}, tolerance)


def test_the_command_defaults_to_the_comparison_s_tolerance() -> None:
    args = build_parser().parse_args(["bench", "--compare", "x.json"])

    assert args.tolerance == DEFAULT_TOLERANCE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the baseline"),
        ("{not json", "is not JSON"),
        (b"\xff\xfe", "cannot read the baseline"),
        ([1, 2], "is not a bench report"),
        ({"ratios": [0.1]}, "is not a bench report"),
        ('{"workload": {"size": "smoke"}, "ratios": {"x": NaN}}', "finite numbers"),
        (_report(pipelined_vs_limit="fast"), "finite numbers"),  # type: ignore[arg-type]
        (_report(pipelined_vs_limit=True), "finite numbers"),
        (_report("full", pipelined_vs_limit=0.1), "run at size 'full'"),
        ({"ratios": {}}, "run at size None"),
        (_report(pipelined_vs_limit=0), "positive finite numbers"),
        (_report(bytes_per_row=-60.0), "positive finite numbers"),
        (
            '{"workload": {"size": "smoke"}, "ratios": {"x": 1' + "0" * 400 + "}}",
            "positive finite numbers",
        ),
        ("[" * 100_000 + "]" * 100_000, "is not JSON"),
        (_report(), "holds none of the ratios this version measures"),
        (_report(renamed_ratio=0.5), "holds none of the ratios this version measures"),
        (
            {
                **_report(pipelined_vs_limit=0.1),
                "checks": {"ok": False, "problems": ["x"]},
            },
            "whose harness checks failed \\(x\\)",
        ),
    ],
)
def test_an_unusable_baseline_is_refused_saying_what_is_wrong(
    tmp_path: Path, content: Any, message: str
) -> None:
    path = tmp_path / "baseline.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        _write(path, content)

    with pytest.raises(BaselineError, match=message) as caught:
        load_baseline(path, "smoke")

    assert str(path) in str(caught.value)


def test_the_command_refuses_a_bad_baseline_before_running_anything(
    tmp_path: Path,
) -> None:
    baseline = _write(tmp_path / "full.json", _report("full", pipelined_vs_limit=0.1))
    out = tmp_path / "report.json"

    done = _bench("--compare", baseline, "--json", out)

    assert done.returncode == 2
    assert "run at size 'full', this run is 'smoke'" in done.stderr
    assert not out.exists()
    assert "ops/s" not in done.stdout


@pytest.mark.parametrize("tolerance", ["1.5", "-0.1", "x"])
def test_the_command_refuses_a_tolerance_that_is_not_a_fraction(
    tolerance: str,
) -> None:
    done = _bench("--compare", "x.json", "--tolerance", tolerance)

    assert done.returncode == 2
    assert "--tolerance" in done.stderr


def _baseline_from_a_run(tmp_path: Path, flagged: set[str]) -> tuple[Path, list[str]]:
    """A baseline from a real smoke run, moved far from it on purpose.

    The ratios in ``flagged`` are moved a hundredfold the way that makes the
    run look regressed, every other one a hundredfold the other way, so that
    noise between two small runs cannot decide the outcome.
    """
    first = tmp_path / "first.json"
    assert _bench("--json", first).returncode == 0
    report = json.loads(first.read_text())

    for name, value in report["ratios"].items():
        if value is None:
            # Not measured (eventsourcing is only in the bench extra).
            continue
        worse_past = (name in flagged) == (name in LOWER_IS_BETTER)
        report["ratios"][name] = value / 100 if worse_past else value * 100
    return _write(tmp_path / "baseline.json", report), list(report["ratios"])


def test_the_command_flags_exactly_the_ratios_that_moved_the_wrong_way(
    tmp_path: Path,
) -> None:
    flagged = {"pipelined_vs_limit", "bytes_per_row"}
    baseline, names = _baseline_from_a_run(tmp_path, flagged)

    done = _bench("--compare", baseline, "--tolerance", "0.5")

    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    shown = lines[lines.index("against the baseline (tolerance 50%):") + 1 :]
    # Every ratio is listed, measured or not; only measured ones are judged.
    assert sorted(line.split()[0] for line in shown) == sorted(names)
    assert {line.split()[0] for line in shown if "REGRESSED" in line} == flagged


def test_the_command_passes_when_nothing_moved_the_wrong_way(tmp_path: Path) -> None:
    baseline, _ = _baseline_from_a_run(tmp_path, flagged=set())

    done = _bench("--compare", baseline, "--tolerance", "0.5")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "against the baseline (tolerance 50%):" in done.stdout
    assert "REGRESSED" not in done.stdout


# Instruction counts.


def _counts(python: str | None = None, **counts: Any) -> dict[str, Any]:
    here = bench_instructions.platform
    return {
        "implementation": here.python_implementation(),
        "python": python or here.python_version(),
        "updates": 3_000,
        "instructions_per_change": counts,
    }


def test_a_subject_that_got_dearer_than_the_tolerance_is_a_regression() -> None:
    baseline = _counts(limit=30_000, write_path=50_000)
    current = _counts(limit=30_299, write_path=50_600)

    found = regressions(current, baseline, tolerance=0.01)

    assert found == ["write_path: 50,000 -> 50,600 (1.012x)"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]", "no 'instructions_per_change'"),
        ("nope", "cannot read the baseline"),
        (_counts(limit=0), "positive whole numbers"),
        (_counts(limit=1.5), "positive whole numbers"),
        (_counts(limit=True), "positive whole numbers"),
        (_counts("2.7.18", limit=10), "counted on CPython 2.7.18"),
        (
            {**_counts(limit=10), "updates": 1_000},
            "counted 1000 updates, this run 3000",
        ),
    ],
)
def test_an_unusable_instruction_baseline_is_refused(
    tmp_path: Path, content: Any, message: str
) -> None:
    path = _write(tmp_path / "counts.json", content)

    with pytest.raises(InstructionCountError, match=message):
        bench_instructions.load_baseline(path, 3_000)


@pytest.mark.parametrize("subject", bench_instructions.SUBJECTS)
def test_each_counted_subject_runs_its_updates(subject: str) -> None:
    # The child side, in process: it raises if the subject did not record
    # every change of the plan.
    bench_instructions._run_subject(subject, 20)


def test_counting_without_valgrind_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_instructions", "--changes", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PATH": str(tmp_path)},
    )

    assert done.returncode == 2
    assert "valgrind is not installed" in done.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_callgrind_counts_grow_with_the_updates_run() -> None:
    valgrind = shutil.which("valgrind")
    assert valgrind is not None

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        few, many = pool.map(
            lambda n: bench_instructions._instructions("limit", n, valgrind),
            (10, 1_010),
        )

    # A thousand bare-loop steps cost thousands of instructions each, and
    # nowhere near a million each.
    assert 1_000 * 5_000 < many - few < 1_000 * 1_000_000


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--json", "missing/report.json", "missing is not a directory"),
        ("--json", ".", "is a directory"),
        ("--plot", "chart.txt", "the file name must end in .png"),
        ("--plot", "missing/chart.png", "missing is not a directory"),
    ],
)
def test_an_unusable_output_path_is_refused_before_running_anything(
    tmp_path: Path, option: str, name: str, message: str
) -> None:
    target = tmp_path / name

    done = _bench(option, target)

    assert done.returncode == 2
    assert message in done.stderr
    assert "bench: limit" not in done.stderr
    assert not target.is_file()


@pytest.mark.parametrize(
    ("name", "size"), [("full.json", "full"), ("quick.json", "quick")]
)
def test_the_committed_baselines_are_usable_and_hold_every_ratio(
    name: str, size: str
) -> None:
    from bench._compare import RATIO_NAMES

    report = load_baseline(ROOT / "bench" / "baselines" / name, size)

    assert set(report["ratios"]) == set(RATIO_NAMES)
    assert report["checks"] == {"ok": True, "problems": []}
