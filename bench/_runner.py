"""The side-by-side runner behind ``entity-runtime bench``: sizes, report, output."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._compare import (
    BaselineError,
    compare_ratios,
    format_comparison,
    load_baseline,
)
from bench._modes import (
    AMORTISED,
    BLOCKING_ROUNDS,
    EVENTSOURCING_SETUP,
    PROBE_ROWS,
    MemoryResult,
    ModeResult,
    eventsourcing_version,
    has_mutate_many,
    run_blocking_pair,
    run_eventsourcing,
    run_limit,
    run_memory_and_history,
    run_pykka_batched,
    run_pykka_pipelined,
    run_python_stages,
    run_runtime_batched,
    run_runtime_pipelined,
)
from bench._workload import STATUSES, build_plan, sample_plan

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

HOME_ASSISTANT_VS_LIMIT = 0.20
"""Home Assistant's throughput on this workload as a share of the limit.

Measured earlier, not run here: Home Assistant needs Python 3.13 and about
600 MB installed, so the runner compares with this recorded figure.
"""

TARGETS = {"runtime_vs_eventsourcing": 10.0, "pipelined_vs_home_assistant": 2.0}
"""The least each comparison ratio should reach."""


class MissingExtraError(ImportError):
    """An optional dependency of the benchmarks is not installed."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The sizes of one side-by-side run.

    Attributes:
        size: ``full``, ``quick`` or ``smoke``.
        mutations: mutations of the throughput workload, per mode.
        ids: distinct ids they are spread over.
        memory_changes: four-field changes written for the memory run (so
            ``4 * memory_changes`` rows); ``history`` is timed on that log.
        memory_ids: ids of the memory run.
        history_calls: timed ``history`` calls.
        batch: mutations per batched call.
        window: changes per amortised latency sample.
        repeats: runs of the bare loop and of each pipelined or batched mode;
            the fastest of each counts (per-call modes run once: each of their
            calls is timed on its own, and they take longest).
        eventsourcing_every: the eventsourcing mode runs the mutations of
            every ``eventsourcing_every``-th id (see :func:`sample_plan`).
    """

    size: str
    mutations: int
    ids: int
    memory_changes: int
    memory_ids: int
    history_calls: int
    batch: int = 100
    window: int = 100
    repeats: int = 3
    eventsourcing_every: int = 10

    @property
    def memory_rows(self) -> int:
        """Rows the memory run writes once its ids exist."""
        return 4 * self.memory_changes


FULL = BenchConfig("full", 200_000, 10_000, 250_000, 10_000, 2_000)
QUICK = BenchConfig("quick", 20_000, 1_000, 25_000, 1_000, 1_000)
# Only checks that the harness runs and counts right; its numbers mean little.
SMOKE = BenchConfig("smoke", 2_000, 100, 2_000, 100, 200)


def run_side_by_side(
    config: BenchConfig, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every mode on one workload in this process; return the report.

    The report is JSON-ready: ``workload`` (sizes and how to read the
    numbers), ``results`` (one entry per mode, plus the ``history`` timing),
    ``ratios`` and ``checks`` (whether every mode's subscriber and deriver saw
    what the workload made; a failed check means the harness, not the
    runtime's speed, is wrong).

    The eventsourcing mode, much slower, runs a sample of the plan (the whole
    life of every ``config.eventsourcing_every``-th id) and is checked
    against the bare loop on that same sample; without the library it is
    skipped with a note and its ratio is null.
    """
    say = progress or (lambda _message: None)
    plan = build_plan(config.mutations, config.ids)
    notes: list[str] = [_HOME_ASSISTANT_NOTE]
    results: list[ModeResult] = []
    references: dict[str, ModeResult] = {}

    best = functools.partial(_fastest, config.repeats)
    # pykka's ask and the runtime's blocking mutate run in alternating rounds
    # of one call: the first of the two modes runs both.
    blocking = functools.cache(lambda: run_blocking_pair(plan, config.window))
    modes: list[tuple[str, Callable[[], ModeResult]]] = [
        ("limit", best(lambda: run_limit(plan, config.window))),
        ("pykka_ask", lambda: blocking()[0]),
        ("pykka_pipelined", best(lambda: run_pykka_pipelined(plan, config.window))),
        (
            f"pykka_batched_{config.batch}",
            best(lambda: run_pykka_batched(plan, config.window, config.batch)),
        ),
        (
            "python_stages_pipelined",
            best(lambda: run_python_stages(plan, config.window, None)),
        ),
        (
            f"python_stages_batched_{config.batch}",
            best(lambda: run_python_stages(plan, config.window, config.batch)),
        ),
        ("runtime_mutate", lambda: blocking()[1]),
        (
            "runtime_mutate_async",
            best(lambda: run_runtime_pipelined(plan, config.window)),
        ),
    ]
    if has_mutate_many():
        modes.append(
            (
                f"runtime_mutate_many_{config.batch}",
                best(lambda: run_runtime_batched(plan, config.window, config.batch)),
            )
        )
    else:
        notes.append(
            "EntityHandle has no mutate_many: the batched runtime mode is skipped"
        )
    if eventsourcing_version() is None:
        notes.append(_NO_EVENTSOURCING_NOTE)
    else:
        sample = sample_plan(plan, config.ids, config.eventsourcing_every)
        references["eventsourcing"] = run_limit(sample, config.window)
        modes.append(
            ("eventsourcing", lambda: run_eventsourcing(sample, config.window))
        )
        notes.append(_sample_note(config, len(sample)))

    for name, run in modes:
        gc.collect()
        count = references[name].ops if name in references else config.mutations
        say(f"{name}: {count:,} mutations")
        try:
            results.append(run())
        except TypeError as err:
            if not name.startswith("runtime_mutate_many"):
                raise
            notes.append(f"mutate_many did not take a list of (id, apply): {err}")

    gc.collect()
    say(f"memory: {config.memory_rows:,} rows, then history x{config.history_calls}")
    memory = run_memory_and_history(
        config.memory_changes, config.memory_ids, config.history_calls
    )
    return _report(config, results, memory, notes, references)


def _fastest(repeats: int, run: Callable[[], ModeResult]) -> Callable[[], ModeResult]:
    # Throughput is taken at its least disturbed, the fastest of a few runs,
    # for the bare loop and the modes compared with it alike: on a busy
    # machine single runs vary by up to half.
    def fastest() -> ModeResult:
        runs = []
        for _ in range(repeats):
            gc.collect()
            runs.append(run())
        return max(runs, key=lambda r: r.ops_per_s)

    return fastest


def _sample_note(config: BenchConfig, mutations: int) -> str:
    return (
        f"eventsourcing runs {mutations:,} of the {config.mutations:,} mutations: "
        f"the whole life of one id in {config.eventsourcing_every}, so its mix of "
        "creates and updates and its events per aggregate match the whole plan's "
        "and its ops/s compare with the other modes' (a prefix of the plan would "
        "hold only short histories and flatter it)"
    )


_NO_EVENTSOURCING_NOTE = (
    "eventsourcing is not installed (only the bench extra has it): its mode is "
    "skipped and runtime_vs_eventsourcing is null"
)
_HOME_ASSISTANT_NOTE = (
    "pipelined_vs_home_assistant compares with Home Assistant's previously "
    f"measured {HOME_ASSISTANT_VS_LIMIT:.2f} of the limit; Home Assistant is not "
    "run here (it needs Python 3.13 and about 600 MB)"
)


def _report(
    config: BenchConfig,
    results: list[ModeResult],
    memory: MemoryResult,
    notes: list[str],
    references: dict[str, ModeResult],
) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    limit_ops = by_name["limit"].ops_per_s
    pipelined_ops = by_name["runtime_mutate_async"].ops_per_s
    batched = by_name.get(f"runtime_mutate_many_{config.batch}")
    stages_pipelined = by_name["python_stages_pipelined"].ops_per_s
    stages_batched = by_name[f"python_stages_batched_{config.batch}"].ops_per_s
    eventsourcing = by_name.get("eventsourcing")
    blocking_p50 = by_name["runtime_mutate"].percentile(0.5)
    ask_p50 = by_name["pykka_ask"].percentile(0.5)

    ratios = {
        "pipelined_vs_limit": pipelined_ops / limit_ops,
        "batched_vs_limit": None if batched is None else batched.ops_per_s / limit_ops,
        "blocking_vs_pykka_ask": blocking_p50 / ask_p50,
        "bytes_per_row": memory.bytes_per_row,
        "runtime_vs_eventsourcing": (
            None if eventsourcing is None else pipelined_ops / eventsourcing.ops_per_s
        ),
        "pipelined_vs_home_assistant": (
            pipelined_ops / limit_ops / HOME_ASSISTANT_VS_LIMIT
        ),
        "pipelined_vs_python_stages": pipelined_ops / stages_pipelined,
        "batched_vs_python_stages": (
            None if batched is None else batched.ops_per_s / stages_batched
        ),
    }
    problems = _check(results, references)
    for problem in problems:
        logger.error("benchmark harness check failed: %s", problem)

    return {
        "workload": _workload(config, results, memory, notes, references),
        "results": [_entry(r) for r in [*results, memory.history]],
        "ratios": {k: None if v is None else round(v, 4) for k, v in ratios.items()},
        "checks": {"ok": not problems, "problems": problems},
    }


def _check(results: list[ModeResult], references: dict[str, ModeResult]) -> list[str]:
    # Each mode is held to the bare loop on the plan it ran: the whole plan,
    # or for a sampled mode the same sample (its reference).
    limit = results[0]
    problems = []
    for result in results:
        reference = references.get(result.name, limit)
        if result.changes_seen != reference.ops:
            problems.append(
                f"{result.name}: the subscriber saw {result.changes_seen} changes, "
                f"the workload made {reference.ops}"
            )
        if result.events != reference.events:
            problems.append(
                f"{result.name}: the deriver named {result.events}, the bare loop "
                f"{reference.events}"
            )
    return problems


def _entry(result: ModeResult) -> dict[str, Any]:
    return {
        "name": result.name,
        "ops": result.ops,
        "ops_per_s": round(result.ops_per_s, 1),
        "p50_us": round(result.percentile(0.5), 3),
        "p99_us": round(result.percentile(0.99), 3),
        "latency": result.latency,
        "changes_seen": result.changes_seen,
    }


def _workload(
    config: BenchConfig,
    results: list[ModeResult],
    memory: MemoryResult,
    notes: list[str],
    references: dict[str, ModeResult],
) -> dict[str, Any]:
    scaled = config.size != "full"
    return {
        "size": config.size,
        "scaled_down": scaled,
        "scale": (
            f"{config.size}: {config.mutations:,} mutations over {config.ids:,} ids "
            f"and a {config.memory_rows:,}-row memory log, instead of "
            f"{FULL.mutations:,} over {FULL.ids:,} and {FULL.memory_rows:,} rows"
            if scaled
            else "full size"
        ),
        "mutations": config.mutations,
        "ids": config.ids,
        "changes_expected": config.mutations,
        "state_fields": ["status", "severity", "updates"],
        "statuses": list(STATUSES),
        "deriver": "create -> x.created, into resolved -> x.resolved, else x.updated",
        "subscribers": 1,
        "events": results[0].events,
        "batch_size": config.batch,
        "latency": {r.name: r.latency for r in [*results, memory.history]},
        "latency_note": (
            f"per_call: each call timed; {AMORTISED}: per-operation time over "
            f"windows of {config.window} changes seen by the subscriber "
            "(pipelined modes and the bare loop) or over each batch (batched "
            "modes); a pipelined subscriber catching up on a backlog makes short "
            "windows, so read ops/s first"
        ),
        "ratio_note": (
            "pipelined/batched_vs_limit: ops/s over the bare loop's ops/s (the "
            f"fastest of {config.repeats} runs, as for the pipelined and batched "
            "modes); "
            "blocking_vs_pykka_ask: median runtime mutate over median pykka ask, "
            f"timed in {BLOCKING_ROUNDS} alternating rounds; "
            "bytes_per_row: traced memory growth over rows written; "
            "runtime_vs_eventsourcing: runtime_mutate_async ops/s over "
            "eventsourcing ops/s (target >= 10); pipelined_vs_home_assistant: "
            f"pipelined_vs_limit over Home Assistant's {HOME_ASSISTANT_VS_LIMIT:.2f} "
            "(target >= 2); pipelined/batched_vs_python_stages: the runtime's "
            "ops/s over the python_stages mode of the same kind (the runtime's "
            "threads and hand-offs as plain threads and SimpleQueues doing only "
            "the bare loop's work: what that shape allows in Python)"
        ),
        "ratio_targets": TARGETS,
        "eventsourcing": _eventsourcing_workload(config, results, references),
        "home_assistant": {
            "vs_limit": HOME_ASSISTANT_VS_LIMIT,
            "measured": "previously; not run here (needs Python 3.13, ~600 MB)",
        },
        "runtime_mailbox_size": max(10_000, config.mutations + 1),
        "memory": {
            "rows_written": memory.rows_written,
            "fields_per_change": 4,
            "ids": config.memory_ids,
            "bytes_grown": memory.bytes_grown,
            "log_rows": memory.log_rows,
        },
        "history": {
            "log_rows": memory.log_rows,
            "answer_rows": PROBE_ROWS,
            "calls": config.history_calls,
        },
        "repeats": {
            "limit, pipelined and batched modes": config.repeats,
            "per-call modes and eventsourcing": 1,
        },
        "python": platform.python_version(),
        "pykka": importlib.metadata.version("pykka"),
        "cpus": os.cpu_count(),
        "notes": notes,
    }


def _eventsourcing_workload(
    config: BenchConfig, results: list[ModeResult], references: dict[str, ModeResult]
) -> dict[str, Any]:
    reference = references.get("eventsourcing")
    if reference is None:
        return {"version": None, "skipped": _NO_EVENTSOURCING_NOTE}
    ran = next((r for r in results if r.name == "eventsourcing"), None)
    return {
        "version": eventsourcing_version(),
        "mutations": reference.ops,
        "ids": len(range(0, config.ids, config.eventsourcing_every)),
        "every": config.eventsourcing_every,
        "setup": EVENTSOURCING_SETUP,
        "events": None if ran is None else ran.events,
        "events_expected": reference.events,
    }


def format_table(report: dict[str, Any]) -> str:
    """Render a report as the text table the command prints."""
    workload = report["workload"]
    limit = next(r for r in report["results"] if r["name"] == "limit")
    lines = [
        f"entity-runtime bench ({workload['scale']})",
        "",
        f"{'mode':<26}{'ops':>9}{'ops/s':>13}{'p50 us':>11}{'p99 us':>11}  "
        f"{'latency':<10}{'vs limit':>9}",
    ]
    for entry in report["results"]:
        is_history = entry["changes_seen"] is None
        versus = "" if is_history else f"{entry['ops_per_s'] / limit['ops_per_s']:.4f}"
        lines.append(
            f"{entry['name']:<26}{entry['ops']:>9,}{entry['ops_per_s']:>13,.0f}"
            f"{entry['p50_us']:>11.2f}{entry['p99_us']:>11.2f}  "
            f"{entry['latency']:<10}{versus:>9}"
        )

    lines += ["", "ratios:"]
    for name, value in report["ratios"].items():
        shown = "n/a" if value is None else f"{value:,.4f}"
        target = TARGETS.get(name)
        if target is not None:
            shown = f"{shown:<12}(target >= {target:g})"
        lines.append(f"  {name:<30}{shown}")
    lines += ["", f"latency: {workload['latency_note']}"]
    lines += [f"note: {note}" for note in workload["notes"]]
    if not report["checks"]["ok"]:
        lines += [f"CHECK FAILED: {p}" for p in report["checks"]["problems"]]
    return "\n".join(lines)


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    """Write a PNG bar chart of ops/s per mode (log scale).

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    Figure = _figure_class()
    modes = [r for r in report["results"] if r["changes_seen"] is not None]
    names = [r["name"] for r in modes]
    values = [r["ops_per_s"] for r in modes]

    colours = [_COLOURS.get(name.split("_")[0], "tab:gray") for name in names]
    workload = report["workload"]

    figure = Figure(figsize=(8, 0.5 * len(modes) + 1.5), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(names, values, color=colours)
    axes.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3)
    axes.set_xscale("log")
    axes.set_xlim(right=max(values) * 4)
    axes.invert_yaxis()
    axes.set_xlabel("mutations per second (log scale)")
    axes.set_title(
        f"entity-runtime bench, {workload['size']}: {workload['mutations']:,} "
        f"mutations over {workload['ids']:,} ids"
    )
    figure.savefig(path, dpi=120)


_COLOURS = {
    "limit": "tab:gray",
    "pykka": "tab:orange",
    "runtime": "tab:blue",
    "eventsourcing": "tab:green",
}


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingExtraError(
            "--plot needs matplotlib, which is not installed; install the bench "
            "extra: pip install 'entity-runtime[bench]' (in a checkout: "
            "pip install -e '.[bench]')"
        ) from err
    return Figure


def run_cli(args: argparse.Namespace) -> int:
    """Run ``entity-runtime bench``; return its exit code.

    Exit codes: 0 done, 1 a harness check failed, 2 an unusable ``--json`` or
    ``--plot`` path, ``--plot`` without matplotlib or an unusable
    ``--compare`` baseline (all checked before anything runs) or a report
    that could not be written, 3 a ratio regressed against the baseline by
    more than ``--tolerance``, 128 + the signal's number when SIGINT or
    SIGTERM stopped the run (nothing is written then).
    """
    config = SMOKE if args.smoke else QUICK if args.quick else FULL
    try:
        if args.json:
            _check_output(args.json, "--json")
        if args.plot:
            _check_output(args.plot, "--plot", suffix=".png")
            _figure_class()
        baseline = load_baseline(args.compare, config.size) if args.compare else None
    except (BaselineError, MissingExtraError, _UnusableOutputError) as err:
        print(f"entity-runtime bench: {err}", file=sys.stderr)
        return 2

    try:
        with _signals_interrupt():
            started = time.perf_counter()
            report = run_side_by_side(config, _progress)
            _progress(f"done in {time.perf_counter() - started:.1f} s")
    except _Interrupted as stop:
        print(
            f"entity-runtime bench: stopped by {signal.Signals(stop.signum).name}; "
            "no report written",
            file=sys.stderr,
        )
        return 128 + stop.signum

    print(format_table(report))
    try:
        if args.json:
            text = json.dumps(report, indent=2, allow_nan=False) + "\n"
            Path(args.json).write_text(text)
        if args.plot:
            write_plot(report, args.plot)
    except OSError as err:
        print(
            f"entity-runtime bench: could not write the report: {err}", file=sys.stderr
        )
        return 2
    if not report["checks"]["ok"]:
        return 1

    if baseline is not None:
        changes = compare_ratios(report["ratios"], baseline["ratios"], args.tolerance)
        print()
        print(format_comparison(changes, args.tolerance))
        regressed = [change.name for change in changes if change.regressed]
        if regressed:
            logger.warning("ratios regressed against %s: %s", args.compare, regressed)
            return 3
    return 0


class _UnusableOutputError(ValueError):
    """An output path the command could not write its report to."""


def _check_output(path: str, option: str, suffix: str | None = None) -> None:
    # Found out before a run of minutes rather than after it.
    target = Path(path)
    if suffix is not None and target.suffix.lower() != suffix:
        raise _UnusableOutputError(
            f"{option} {path}: the file name must end in {suffix}"
        )
    if target.is_dir():
        raise _UnusableOutputError(f"{option} {path}: is a directory")
    if target.exists() and not target.is_file():
        raise _UnusableOutputError(f"{option} {path}: exists and is not a file")
    folder = target.parent
    if not folder.is_dir():
        raise _UnusableOutputError(f"{option} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise _UnusableOutputError(f"{option} {path}: not writable")


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the benchmark ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    # A stopped run is a failed run (a CI job's timeout must not pass): each
    # signal raises in the main thread, whose with-blocks stop what they
    # started, and the previous handlers come back afterwards.
    def interrupt(signum: int, frame: object) -> None:
        raise _Interrupted(signum)

    previous = {
        sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
