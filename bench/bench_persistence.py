"""Snapshot write and restore for a large store, and mutate cost per fsync mode.

Run: ``python -m bench.bench_persistence [--entities N] [--changes K] [--json F]``.

The store is filled through the kind's write path itself (the engine, on one
thread, journal with ``fsync="never"``), so the snapshot holds exactly what a
runtime would: every state and every transition row. Figures are printed and,
with ``--json``, written; mutate costs are also given as ratios to the
``"never"`` mode measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runtime import Runtime

logger = logging.getLogger(__name__)

STATUSES = ("healthy", "degraded", "unhealthy")


@dataclass
class Check:
    """A three-field state like the monitoring agent's checks."""

    status: Literal["healthy", "degraded", "unhealthy"]
    value: float
    samples: int


def _constant(state: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    return lambda prev: state


def _fill(data_dir: Path, entities: int, changes: int) -> dict[str, float]:
    rt = Runtime(data_dir=data_dir, journal_fsync="never", snapshot_every=None)
    rt.define_entity("check", Check)
    rt.start()
    engine = rt._engine("check")

    wakes: list[Callable[[], None]] = []
    started = time.perf_counter()
    for round_ in range(changes):
        state = {
            "status": STATUSES[round_ % 3],
            "value": float(round_),
            "samples": round_,
        }
        for i in range(entities):
            _, change = engine.mutate(
                f"check-{i}", _constant(state), "bench", None, None
            )
            if change is not None:
                rt._publish([change], wakes)
        for wake in wakes:
            wake()
        wakes.clear()
    filled = time.perf_counter() - started

    rows = len(rt.log)
    started = time.perf_counter()
    path = rt.snapshot()
    snapshot_s = time.perf_counter() - started
    size = path.stat().st_size if path else 0
    rt.stop()

    return {
        "fill_s": filled,
        "rows": rows,
        "snapshot_s": snapshot_s,
        "snapshot_mb": size / 1e6,
    }


def _restore(data_dir: Path) -> float:
    rt = Runtime(data_dir=data_dir, snapshot_every=None)
    rt.define_entity("check", Check)

    started = time.perf_counter()
    rt.start()
    took = time.perf_counter() - started

    rt._data_dir.last_snapshot_at = time.time()  # type: ignore[union-attr]
    rt._data_dir.last_snapshot_seq = rt.log.last_seq  # type: ignore[union-attr]
    rt.stop()
    return took


def _mutate_cost(root: Path, mode: str, count: int) -> dict[str, float]:
    rt = Runtime(data_dir=root / mode, journal_fsync=mode, snapshot_every=None)
    checks = rt.define_entity("check", Check)
    latencies = []

    with rt:
        for i in range(count):
            started = time.perf_counter()
            checks.mutate(
                f"check-{i % 100}",
                _constant({"status": STATUSES[i % 3], "value": float(i), "samples": i}),
            )
            latencies.append(time.perf_counter() - started)

    latencies.sort()
    return {
        "ops_per_s": count / sum(latencies),
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def run(entities: int, changes: int, mutations: int) -> dict[str, Any]:
    """Run every measurement in a temporary directory; return the figures."""
    root = Path(tempfile.mkdtemp(prefix="entity-runtime-bench-"))
    try:
        filled = _fill(root / "big", entities, changes)
        restore_s = _restore(root / "big")
        modes = {
            mode: _mutate_cost(root, mode, mutations if mode != "always" else 500)
            for mode in ("never", "interval", "always")
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    never = modes["never"]["ops_per_s"]
    return {
        "workload": {
            "entities": entities,
            "changes_per_entity": changes,
            "mutations_per_mode": mutations,
        },
        "snapshot": {**filled, "restore_s": restore_s},
        "mutate": modes,
        "ratios_vs_never": {m: r["ops_per_s"] / never for m, r in modes.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=3)
    parser.add_argument("--mutations", type=int, default=5_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    result = run(args.entities, args.changes, args.mutations)

    snap = result["snapshot"]
    print(
        f"{args.entities:,} entities x {args.changes} changes = "
        f"{snap['rows']:,} rows: fill {snap['fill_s']:.1f} s, snapshot "
        f"{snap['snapshot_s']:.1f} s ({snap['snapshot_mb']:.0f} MB), restore "
        f"{snap['restore_s']:.1f} s"
    )
    for mode, figures in result["mutate"].items():
        print(
            f"mutate fsync={mode:<8} {figures['ops_per_s']:>9,.0f} ops/s  "
            f"p50 {figures['p50_us']:>8.0f} us  p99 {figures['p99_us']:>8.0f} us  "
            f"({result['ratios_vs_never'][mode]:.3f} of never)"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
