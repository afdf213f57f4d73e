"""Where the runtime's CPU goes, per change: each thread's share and the collector's.

Run: ``python -m bench.bench_threads [--mutations N] [--ids N] [--json FILE]``.

Runs the side-by-side workload (see ``entity-runtime bench``) through
``mutate_async`` and through ``mutate_many`` (100 a call), and reads how much
CPU each thread of the process used meanwhile, in µs per change: the caller,
the kind's actor, the deriver stage, the subscriber and the runtime's other
threads. Thread CPU time counts only the time a thread ran; a sampling
profiler also counts a thread that is waiting for the interpreter lock, which
makes threads that mostly wait look busy. Per-thread figures need Linux
(``/proc/self/task``); elsewhere only the process total is shown.

For comparison, on the same plan and in the same process: the bare loop (the
limit) and the kind's write path alone (``KindEngine.mutate`` called on this
thread, without actors, deriver or subscriber). The cycle collector's passes
are timed by generation (``gc.callbacks``) in every mode: a full pass walks
every live object of the process, so its cost grows with what is alive.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._workload import (
    KIND,
    CountingDeriver,
    CountingSubscriber,
    ItemState,
    LimitModel,
    Plan,
    build_plan,
)
from runtime import Runtime

logger = logging.getLogger(__name__)

ROLES = ("caller", "kind actor", "deriver stage", "subscriber", "other")
"""The threads (or groups of threads) whose CPU is reported, in column order."""

_BATCH = 100
_TASKS = Path("/proc/self/task")


class _NotingDeriver(CountingDeriver):
    """The workload's deriver, noting the thread it runs on."""

    thread: int | None = None

    def __call__(self, change: Any) -> list[str]:
        if self.thread is None:
            self.thread = threading.get_native_id()
        return self.events(change.prev, change.next)


class _NotingSubscriber(CountingSubscriber):
    """The workload's subscriber, noting the thread it runs on."""

    thread: int | None = None

    def __call__(self, change: Any) -> None:
        if self.thread is None:
            self.thread = threading.get_native_id()
        super().__call__(change)


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user and system) used so far by each thread, by native id.

    Empty where ``/proc/self/task`` does not exist (not Linux).
    """
    if not _TASKS.is_dir():
        return {}

    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for task in _TASKS.iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        # Fields after the parenthesised name; utime and stime are 14 and 15.
        fields = stat.rsplit(")", 1)[1].split()
        used[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return used


class _CollectorTimer:
    """Times the cycle collector's passes by generation while installed."""

    def __init__(self) -> None:
        self.passes = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return

        generation = info["generation"]
        self.passes[generation] += 1
        self.seconds[generation] += time.perf_counter() - self._started

    @contextmanager
    def installed(self) -> Iterator[_CollectorTimer]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


def _result(
    name: str, changes: int, seconds: float, timer: _CollectorTimer
) -> dict[str, Any]:
    return {
        "name": name,
        "ops_per_s": changes / seconds,
        "seconds": seconds,
        "gc_passes": list(timer.passes),
        "gc_seconds": list(timer.seconds),
        "cpu_us_per_change": {},
    }


def _run_limit(plan: Plan) -> dict[str, Any]:
    model = LimitModel(CountingDeriver(), CountingSubscriber(len(plan) + 1))

    with _CollectorTimer().installed() as timer:
        before = time.thread_time()
        started = time.perf_counter()
        model.run(plan)
        seconds = time.perf_counter() - started
        used = time.thread_time() - before

    result = _result("limit", len(plan), seconds, timer)
    result["cpu_us_per_change"] = {"caller": used * 1e6 / len(plan)}
    return result


def _run_write_path(plan: Plan) -> dict[str, Any]:
    # The kind's engine called directly on this thread: the runtime is never
    # started, so no actor, deriver or subscriber takes part.
    rt = Runtime()
    rt.define_entity(KIND, ItemState)
    engine = rt._engine(KIND)

    with _CollectorTimer().installed() as timer:
        before = time.thread_time()
        started = time.perf_counter()
        for entity_id, apply in plan:
            engine.mutate(entity_id, apply, "system", None, None)
        seconds = time.perf_counter() - started
        used = time.thread_time() - before

    result = _result("write path alone", len(plan), seconds, timer)
    result["cpu_us_per_change"] = {"kind actor": used * 1e6 / len(plan)}
    return result


def _submit_async(rt: Runtime, plan: Plan) -> None:
    submit = rt.handle(KIND).mutate_async
    futures = [submit(entity_id, apply) for entity_id, apply in plan]
    for future in futures:
        future.get(timeout=600)


def _submit_many(rt: Runtime, plan: Plan) -> None:
    mutate_many = rt.handle(KIND).mutate_many
    for start in range(0, len(plan), _BATCH):
        mutate_many(plan[start : start + _BATCH])


def _run_runtime(
    name: str, plan: Plan, submit: Callable[[Runtime, Plan], None]
) -> dict[str, Any]:
    deriver, subscriber = _NotingDeriver(), _NotingSubscriber(len(plan) + 1)
    rt = Runtime(mailbox_size=max(10_000, len(plan) + 1))
    rt.define_entity(KIND, ItemState)
    rt.register_change_deriver(KIND, deriver)
    rt.on_entity_changed(KIND, subscriber, name="counter")

    with rt, _CollectorTimer().installed() as timer:
        before = thread_cpu()
        started = time.perf_counter()
        submit(rt, plan)
        rt.drain(timeout=600)
        seconds = time.perf_counter() - started
        after = thread_cpu()
        names = {t.native_id: t.name for t in threading.enumerate()}

    if subscriber.count != len(plan):
        raise RuntimeError(
            f"{name}: the subscriber saw {subscriber.count} of {len(plan)} changes"
        )

    result = _result(name, len(plan), seconds, timer)
    roles = {
        threading.main_thread().native_id: "caller",
        deriver.thread: "deriver stage",
        subscriber.thread: "subscriber",
    }
    per_role = dict.fromkeys(ROLES, 0.0)
    for thread, used in after.items():
        role = roles.get(thread)
        if role is None:
            is_kind = names.get(thread, "").startswith("KindActor")
            role = "kind actor" if is_kind else "other"
        per_role[role] += (used - before.get(thread, 0.0)) * 1e6 / len(plan)
    result["cpu_us_per_change"] = per_role if after else {}
    return result


def run(mutations: int, ids: int) -> dict[str, Any]:
    """Run every mode on one plan; return the workload and each mode's figures."""
    plan = build_plan(mutations, ids)
    results = [
        _run_limit(plan),
        _run_write_path(plan),
        _run_runtime("mutate_async", plan, _submit_async),
        _run_runtime(f"mutate_many_{_BATCH}", plan, _submit_many),
    ]
    return {
        "workload": {"mutations": mutations, "ids": ids, "batch": _BATCH},
        "per_thread": _TASKS.is_dir(),
        "results": results,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: CPU µs per change by thread, and GC time."""
    head = f"{'mode':18s} {'ops/s':>9s}" + "".join(f" {r:>13s}" for r in ROLES)
    lines = [
        "CPU µs per change, by thread (- where the mode has no such thread)",
        head + f" {'total':>7s}   gc passes (gen 0/1/2), ms, % of wall",
    ]
    for result in report["results"]:
        cpu = result["cpu_us_per_change"]
        cells = "".join(
            f" {cpu[r]:13.2f}" if r in cpu else f" {'-':>13s}" for r in ROLES
        )
        gc_ms = sum(result["gc_seconds"]) * 1e3
        passes = "/".join(str(n) for n in result["gc_passes"])
        share = sum(result["gc_seconds"]) / result["seconds"]
        lines.append(
            f"{result['name']:18s} {result['ops_per_s']:9,.0f}{cells}"
            f" {sum(cpu.values()):7.2f}   {passes}, {gc_ms:.0f} ms, {share:.0%}"
        )
    if report["per_thread"]:
        ticks = os.sysconf("SC_CLK_TCK")
        lines.append(
            f"note: /proc counts each thread's CPU in ticks of {1000 / ticks:g} ms: "
            "a short run rounds every cell (use 100,000 mutations or more)"
        )
    else:
        lines.append("note: no /proc/self/task here, so no per-thread figures")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=200_000)
    parser.add_argument("--ids", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.mutations < 1 or not 1 <= args.ids <= args.mutations:
        parser.error("--mutations must be 1 or more, --ids from 1 to --mutations")

    report = run(args.mutations, args.ids)

    print(format_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
