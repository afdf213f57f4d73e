"""What counting costs: the mutate paths with Prometheus metrics on and off.

Run: ``python -m bench.bench_metrics [--mutations N] [--rounds R]``.

Each round runs the same workload (pipelined ``mutate_async`` through one
deriver and one subscriber, then blocking ``mutate``) once with metrics and
once without, alternating which goes first; the ratios are of the best
rounds, measured side by side in one process.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from runtime import EntityChanged, Runtime

logger = logging.getLogger(__name__)


@dataclass
class Check:
    """A three-field state."""

    status: Literal["healthy", "degraded", "unhealthy"]
    severity: Literal["minor", "major"]
    updates: int


STATUSES = ("healthy", "degraded", "unhealthy")


def _derive(change: EntityChanged) -> list[str]:
    return ["check.created"] if change.is_create else ["check.updated"]


def _state(i: int) -> dict[str, Any]:
    return {"status": STATUSES[i % 3], "severity": "minor", "updates": i}


def _writer(i: int) -> Any:
    state = _state(i)
    return lambda prev: state


def _one(metrics: bool, mutations: int) -> dict[str, float]:
    rt = Runtime(metrics=metrics, mailbox_size=mutations + 1)
    checks = rt.define_entity("check", Check)
    seen = [0]
    rt.register_change_deriver("check", _derive)
    rt.on_entity_changed("check", lambda c: seen.__setitem__(0, seen[0] + 1))

    with rt:
        started = time.perf_counter()
        futures = [
            checks.mutate_async(f"c{i % 1000}", _writer(i)) for i in range(mutations)
        ]
        for future in futures:
            future.get()
        rt.drain(timeout=600)
        pipelined = mutations / (time.perf_counter() - started)

        count = max(1, mutations // 10)
        started = time.perf_counter()
        for i in range(count):
            checks.mutate(f"c{i % 1000}", _writer(i + mutations))
        blocking = count / (time.perf_counter() - started)

    return {"pipelined": pipelined, "blocking": blocking}


def run(mutations: int, rounds: int) -> dict[str, Any]:
    """Alternate metrics on and off; return the best ops/s of each and ratios."""
    best: dict[bool, dict[str, float]] = {
        True: {"pipelined": 0.0, "blocking": 0.0},
        False: {"pipelined": 0.0, "blocking": 0.0},
    }
    for round_ in range(rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for metrics in order:
            figures = _one(metrics, mutations)
            for mode, value in figures.items():
                best[metrics][mode] = max(best[metrics][mode], value)

    return {
        "on": best[True],
        "off": best[False],
        "on_vs_off": {m: best[True][m] / best[False][m] for m in best[True]},
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    result = run(args.mutations, args.rounds)

    for mode in ("pipelined", "blocking"):
        print(
            f"{mode:<10} metrics on {result['on'][mode]:>9,.0f} ops/s  "
            f"off {result['off'][mode]:>9,.0f} ops/s  "
            f"on/off {result['on_vs_off'][mode]:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
