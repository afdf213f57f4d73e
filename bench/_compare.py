"""Comparing a benchmark report with an earlier one, to see regressions.

Ratios are compared, not ops/s: each ratio is measured side by side within
one run, so it carries over between runs on a shared machine far better than
an absolute speed does. A ratio *regresses* when it moves the wrong way by
more than the tolerance (a fraction of the baseline's value). Which way is
wrong depends on the ratio: more throughput is better, more time per call or
more bytes per row is worse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RATIO_NAMES = (
    "pipelined_vs_limit",
    "batched_vs_limit",
    "blocking_vs_pykka_ask",
    "bytes_per_row",
    "runtime_vs_eventsourcing",
    "pipelined_vs_home_assistant",
    "pipelined_vs_python_stages",
    "batched_vs_python_stages",
)
"""The ratios a report holds, in the order they are printed."""

LOWER_IS_BETTER = frozenset({"blocking_vs_pykka_ask", "bytes_per_row"})
"""Ratios that get worse as they grow; every other ratio gets worse as it falls."""

DEFAULT_TOLERANCE = 0.20
"""How far a ratio may move the wrong way before it counts as a regression.

The throughput ratios of full runs on a shared two-core machine have spread
over about a fifth of their value between runs; a smaller tolerance would
flag noise. Instruction counts (``python -m bench.bench_instructions``) see
much smaller changes.
"""


class BaselineError(ValueError):
    """A baseline report could not be read or does not fit this run."""


@dataclasses.dataclass(frozen=True)
class RatioChange:
    """One ratio of the current run next to the baseline's.

    Attributes:
        name: the ratio's key in the report.
        baseline: its value in the baseline, or ``None`` if not measured there.
        current: its value now, or ``None`` if not measured now.
        regressed: it moved the wrong way by more than the tolerance.
    """

    name: str
    baseline: float | None
    current: float | None
    regressed: bool

    @property
    def factor(self) -> float | None:
        """``current / baseline``, or ``None`` when either is missing or zero."""
        if self.baseline is None or self.current is None or self.baseline == 0:
            return None
        return self.current / self.baseline


def load_baseline(path: str | Path, size: str) -> dict[str, Any]:
    """Read a report written by ``entity-runtime bench --json``; return it.

    Raises:
        BaselineError: the file cannot be read, is not such a report, holds a
            ratio that is not a positive finite number, was run at another
            size than ``size`` (ratios of scaled-down runs differ from full
            ones), holds none of the ratios measured now, or failed its own
            harness checks.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BaselineError(f"cannot read the baseline {path}: {err}") from err

    try:
        report = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise BaselineError(f"the baseline {path} is not JSON: {err}") from err

    if not isinstance(report, dict) or not isinstance(report.get("ratios"), dict):
        raise BaselineError(
            f"the baseline {path} is not a bench report: it has no 'ratios' object "
            "(write one with entity-runtime bench --json FILE)"
        )
    for name, value in report["ratios"].items():
        if value is not None and not (_is_finite_number(value) and value > 0):
            raise BaselineError(
                f"the baseline {path} has ratio {name!r} = {value!r:.40}; ratios are "
                "positive finite numbers or null"
            )

    workload = report.get("workload")
    ran_at = workload.get("size") if isinstance(workload, dict) else None
    if ran_at != size:
        raise BaselineError(
            f"the baseline {path} was run at size {ran_at!r}, this run is {size!r}; "
            "ratios are only comparable between runs of the same size"
        )
    if not any(report["ratios"].get(name) is not None for name in RATIO_NAMES):
        raise BaselineError(
            f"the baseline {path} holds none of the ratios this version measures "
            f"({', '.join(RATIO_NAMES)}), so it would compare nothing"
        )
    checks = report.get("checks")
    if isinstance(checks, dict) and checks.get("ok") is False:
        raise BaselineError(
            f"the baseline {path} comes from a run whose harness checks failed "
            f"({'; '.join(map(str, checks.get('problems') or [])) or 'no detail'}); "
            "its ratios mean nothing"
        )
    return report


def compare_ratios(
    current: Mapping[str, float | None],
    baseline: Mapping[str, float | None],
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[RatioChange]:
    """Set each ratio of ``current`` next to ``baseline``'s; flag regressions.

    Ratios only one side has are listed with ``None`` on the other side and
    never count as regressed.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")

    changes = []
    for name in _union(current, baseline):
        now, then = current.get(name), baseline.get(name)
        regressed = False
        if now is not None and then is not None:
            if name in LOWER_IS_BETTER:
                regressed = now > then * (1 + tolerance)
            else:
                regressed = now < then * (1 - tolerance)
        changes.append(RatioChange(name, then, now, regressed))
    return changes


def format_comparison(changes: list[RatioChange], tolerance: float) -> str:
    """Render the comparison as the lines the command prints."""
    lines = [f"against the baseline (tolerance {tolerance:.0%}):"]
    for change in changes:
        then = "n/a" if change.baseline is None else f"{change.baseline:,.4f}"
        now = "n/a" if change.current is None else f"{change.current:,.4f}"
        factor = change.factor
        moved = "" if factor is None else f"{factor:.2f}x"
        better = "lower" if change.name in LOWER_IS_BETTER else "higher"
        verdict = "REGRESSED" if change.regressed else ""
        lines.append(
            f"  {change.name:<30}{then:>12} -> {now:<12}{moved:>7}  "
            f"({better} is better) {verdict}".rstrip()
        )
    return "\n".join(lines)


def parse_fraction(text: str) -> float:
    """A ``--tolerance`` argument: a number in [0, 1).

    Raises:
        argparse.ArgumentTypeError: not a number, or outside [0, 1) (NaN too).
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"{text} is not a fraction in [0, 1) (0.2 allows 20 %)"
        )
    return value


def _union(*mappings: Mapping[str, Any]) -> Iterable[str]:
    seen: dict[str, None] = {}
    for mapping in mappings:
        seen.update(dict.fromkeys(mapping))
    return seen


def _is_finite_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False
