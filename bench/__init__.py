"""Benchmarks of entity-runtime, kept outside the default test run.

The package's public surface is the side-by-side runner behind
``entity-runtime bench``: one workload run in one process as a bare Python
loop (*the limit*), on raw pykka actors and through the runtime, with ratios
and bytes per transition row. Next to it, ``bench/test_benchmarks.py`` holds
pytest-benchmark scenarios, run with
``python -m pytest bench -p no:cacheprovider --benchmark-only``.

Speed is never asserted: the test suite only checks that the runner still runs
and counts right.
"""

from __future__ import annotations

import logging

from bench._runner import (
    FULL,
    QUICK,
    SMOKE,
    BenchConfig,
    MissingExtraError,
    format_table,
    run_cli,
    run_side_by_side,
    write_plot,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "FULL",
    "QUICK",
    "SMOKE",
    "BenchConfig",
    "MissingExtraError",
    "format_table",
    "run_cli",
    "run_side_by_side",
    "write_plot",
]
