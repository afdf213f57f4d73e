"""Instructions per change of the write path and of the bare loop, by callgrind.

Run: ``python -m bench.bench_instructions [--changes N] [--json FILE]
[--compare BASELINE.json] [--tolerance FRACTION]`` (needs valgrind).

Timings on a shared machine spread by a fifth between runs; instruction
counts do not depend on what else the machine is doing, so a change of a
percent shows. Each subject runs in a child Python under
``valgrind --tool=callgrind`` twice, for ``N`` and for ``2 * N`` updates of
the workload (after its creates), with a fixed hash seed; the difference of
the two totals over ``N`` is the cost of one update, free of start-up and
import costs. Subjects:

- ``limit``: one step of the bare loop (read, apply, check, diff, append
  rows, derive, subscriber), the benchmark's *limit*;
- ``write_path``: one ``KindEngine.mutate`` of the runtime's kind engine on
  the calling thread (snapshot, apply, schema check, diff, log columns and
  per-entity index, change event, counters), without actors, deriver or
  subscriber.

The report gives both and their ratio. ``--compare`` reads an earlier
``--json`` report and exits 3 when a subject got dearer by more than the
tolerance (default 1 %). Counts depend on the Python build, so a baseline
from another Python version is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._compare import parse_fraction

logger = logging.getLogger(__name__)

SUBJECTS = ("limit", "write_path")
"""What is counted, in report order."""

IDS = 500
"""Ids the plan visits; the first ``IDS`` mutations create them."""

DEFAULT_TOLERANCE = 0.01
"""How much dearer a subject may get before it counts as a regression."""

HASH_SEED = "0"
"""The children's ``PYTHONHASHSEED``: dict layouts, and so counts, repeat."""


class InstructionCountError(RuntimeError):
    """A count could not be taken or compared (no valgrind, a child failed)."""


def _run_subject(subject: str, updates: int) -> None:
    """Run ``updates`` updates of ``subject`` after its creates (child side)."""
    from bench._workload import (
        KIND,
        CountingDeriver,
        CountingSubscriber,
        ItemState,
        LimitModel,
        build_plan,
    )

    plan = build_plan(IDS + updates, IDS)
    if subject == "limit":
        model = LimitModel(CountingDeriver(), CountingSubscriber(window=100))
        model.run(plan)
        if model.seq != len(plan):
            raise InstructionCountError(f"limit made {model.seq} of {len(plan)}")
        return

    from runtime import Runtime
    from runtime._engine import KindEngine

    rt = Runtime()
    rt.define_entity(KIND, ItemState)
    engine = KindEngine(
        rt._kind(KIND).definition, rt.log, rt.metrics, rt.clock, lambda change: None
    )
    mutate = engine.mutate
    for entity_id, apply in plan:
        mutate(entity_id, apply, "system", None, None)
    if len(rt.log) < 2 * len(plan):
        raise InstructionCountError(f"write_path logged {len(rt.log)} rows")


def _instructions(subject: str, updates: int, valgrind: str) -> int:
    """Total instructions of one child run under callgrind."""
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as scratch:
        out = Path(scratch) / "callgrind.out"
        done = subprocess.run(
            [
                valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.bench_instructions",
                "--child",
                subject,
                "--changes",
                str(updates),
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONHASHSEED": HASH_SEED},
            cwd=Path(__file__).resolve().parent.parent,
        )
        if done.returncode != 0:
            raise InstructionCountError(
                f"{subject} with {updates} updates failed under valgrind "
                f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        return _total(out)


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("totals", "summary"):
            return int(value.split()[0])
    raise InstructionCountError(f"no totals line in callgrind's output {path}")


def count(updates: int) -> dict[str, Any]:
    """Count every subject; return the JSON-ready report.

    Raises:
        InstructionCountError: valgrind is missing or a child run failed.
    """
    if updates < 1:
        raise ValueError(f"updates must be at least 1, got {updates}")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise InstructionCountError(
            "valgrind is not installed; it counts the instructions (Debian: "
            "apt-get install valgrind)"
        )

    # The children's counts do not depend on what runs beside them.
    runs = [(subject, n) for subject in SUBJECTS for n in (updates, 2 * updates)]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        totals = dict(
            zip(
                runs,
                pool.map(lambda run: _instructions(run[0], run[1], valgrind), runs),
                strict=True,
            )
        )

    per_change = {}
    for subject in SUBJECTS:
        grown = totals[subject, 2 * updates] - totals[subject, updates]
        per_change[subject] = round(grown / updates)
        logger.info("%s: %d instructions per update", subject, per_change[subject])
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "updates": updates,
        "ids": IDS,
        "instructions_per_change": per_change,
        "write_path_vs_limit": round(per_change["write_path"] / per_change["limit"], 4),
    }


def load_baseline(path: str | Path, updates: int) -> dict[str, Any]:
    """Read an earlier report of this script; check it can be compared here.

    Raises:
        InstructionCountError: unreadable, not such a report, a count that is
            not a positive whole number, another Python version, or counted
            over another number of updates (the bare loop's rows are objects
            the cycle collector walks, so its cost per update grows with the
            run).
    """
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InstructionCountError(f"cannot read the baseline {path}: {err}") from err

    counts = report.get("instructions_per_change") if isinstance(report, dict) else None
    if not isinstance(counts, dict):
        raise InstructionCountError(
            f"the baseline {path} has no 'instructions_per_change' object (write "
            "one with python -m bench.bench_instructions --json FILE)"
        )
    for subject, value in counts.items():
        if type(value) is not int or value <= 0:
            raise InstructionCountError(
                f"the baseline {path} counts {value!r} instructions for {subject!r}; "
                "counts are positive whole numbers"
            )

    here = (platform.python_implementation(), platform.python_version())
    there = (report.get("implementation"), report.get("python"))
    if there != here:
        raise InstructionCountError(
            f"the baseline {path} was counted on {there[0]} {there[1]}, this is "
            f"{here[0]} {here[1]}; counts are only comparable on one Python build"
        )
    if report.get("updates") != updates:
        raise InstructionCountError(
            f"the baseline {path} counted {report.get('updates')!r} updates, this "
            f"run {updates}; compare runs of one size (--changes)"
        )
    checked: dict[str, Any] = report
    return checked


def regressions(
    current: dict[str, Any], baseline: dict[str, Any], tolerance: float
) -> list[str]:
    """Describe each subject that got dearer than the baseline by over ``tolerance``."""
    found = []
    for subject, now in current["instructions_per_change"].items():
        then = baseline["instructions_per_change"].get(subject)
        if then is not None and now > then * (1 + tolerance):
            found.append(f"{subject}: {then:,} -> {now:,} ({now / then:.3f}x)")
    return found


def _format(report: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    lines = [
        f"instructions per update ({report['implementation']} {report['python']}, "
        f"difference of {report['updates']:,} and {2 * report['updates']:,} updates)"
    ]
    for subject, now in report["instructions_per_change"].items():
        line = f"  {subject:<12}{now:>12,}"
        then = (
            None
            if baseline is None
            else baseline["instructions_per_change"].get(subject)
        )
        if then is not None:
            line += f"   baseline {then:>12,}  {now / then:.3f}x"
        lines.append(line)
    lines.append(f"  write_path / limit: {report['write_path_vs_limit']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Count, print, and compare; exit 0, 2 on an unusable setup, 3 on regression."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_instructions")
    parser.add_argument("--changes", type=int, default=3_000, help="N (default 3000)")
    parser.add_argument("--json", metavar="FILE", help="also write the report")
    parser.add_argument("--compare", metavar="BASELINE.json")
    parser.add_argument(
        "--tolerance",
        type=parse_fraction,
        default=DEFAULT_TOLERANCE,
        metavar="FRACTION",
    )
    parser.add_argument("--child", choices=SUBJECTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        _run_subject(args.child, args.changes)
        return 0

    print(
        f"counting {', '.join(SUBJECTS)} under callgrind ({args.changes:,} and "
        f"{2 * args.changes:,} updates each)...",
        file=sys.stderr,
        flush=True,
    )
    try:
        baseline = (
            None if args.compare is None else load_baseline(args.compare, args.changes)
        )
        report = count(args.changes)
    except (InstructionCountError, ValueError) as err:
        print(f"bench_instructions: {err}", file=sys.stderr)
        return 2

    print(_format(report, baseline))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if baseline is not None:
        found = regressions(report, baseline, args.tolerance)
        for line in found:
            print(f"REGRESSED {line}")
        if found:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
