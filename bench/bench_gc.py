"""What the cycle collector costs with a large store, with ``freeze_gc`` on and off.

Run: ``python -m bench.bench_gc [--entities N] [--rounds R]``.

Each side fills a runtime with ``N`` entities of a three-field state (each
written twice, so the log holds their rows too), takes a snapshot (where
``freeze_gc=True`` freezes what is alive), then times a full ``gc.collect()``,
the pause a program sees when the collector walks its oldest generation. The
two sides run alternately in one process; the ratio is of the median pauses.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._workload import KIND, ItemState, item_state
from runtime import Runtime

logger = logging.getLogger(__name__)


def _pause(freeze_gc: bool, entities: int, directory: Path) -> float:
    rt = Runtime(
        data_dir=directory,
        journal_fsync="never",
        snapshot_every=None,
        snapshot_interval=None,
        freeze_gc=freeze_gc,
    )
    handle = rt.define_entity(KIND, ItemState)
    with rt:
        for step in (0, 1):
            for start in range(0, entities, 1_000):
                end = min(start + 1_000, entities)
                handle.mutate_many(
                    [
                        (f"x-{i}", functools.partial(item_state, step))
                        for i in range(start, end)
                    ]
                )
        rt.snapshot()

        started = time.perf_counter()
        gc.collect()
        return time.perf_counter() - started


def run(entities: int, rounds: int) -> dict[str, Any]:
    """Alternate the two sides ``rounds`` times; return the pauses and ratio."""
    pauses: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for freeze_gc in order:
            with tempfile.TemporaryDirectory() as directory:
                pauses[freeze_gc].append(_pause(freeze_gc, entities, Path(directory)))

    off, on = statistics.median(pauses[False]), statistics.median(pauses[True])
    return {"entities": entities, "off_s": off, "on_s": on, "on_vs_off": on / off}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    result = run(args.entities, args.rounds)

    print(
        f"{result['entities']:,} entities: full collection "
        f"{result['off_s'] * 1e3:,.1f} ms with freeze_gc off, "
        f"{result['on_s'] * 1e3:,.1f} ms on; on/off {result['on_vs_off']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
