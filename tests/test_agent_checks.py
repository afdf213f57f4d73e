"""A check's hold-time state machine and the health computed from checks."""

from __future__ import annotations

from typing import Any

import pytest

from monitoring import (
    CheckRule,
    CheckState,
    expire_check,
    new_check_state,
    step_check,
    summarise_checks,
)
from runtime import compile_schema

RULE = CheckRule(
    "cpu",
    degraded_above=80,
    unhealthy_above=95,
    hold=300,
    recover_hold=120,
)


def feed(samples: list[tuple[float, float]], rule: CheckRule = RULE) -> list[Any]:
    """Apply samples in order; return the state after each (unchanged included)."""
    state: dict[str, Any] = new_check_state("web", "cpu")
    seen = []
    for at, value in samples:
        nxt = step_check(state, rule.classify(value), value, at, rule)
        state = nxt or state
        seen.append(state)
    return seen


def test_a_new_check_starts_healthy_with_nothing_pending() -> None:
    """The first bad sample is then a change of an existing entity."""
    state = new_check_state("web", "cpu")

    assert state == {
        "system": "web",
        "metric": "cpu",
        "status": "healthy",
        "value": None,
        "pending": {},
    }
    assert compile_schema(CheckState).validate(state, "check", "web/cpu") == state


def test_a_worse_status_waits_for_the_hold_time() -> None:
    """Degraded only once every sample for 300 s was over 80."""
    states = feed([(0, 85), (120, 90), (299, 88), (300, 86)])

    assert [s["status"] for s in states] == ["healthy"] * 3 + ["degraded"]
    assert states[0]["pending"] == {"degraded": 0}
    assert states[3]["pending"] == {}
    assert states[3]["value"] == 86


def test_one_good_sample_restarts_the_hold() -> None:
    """The condition must hold without a break, as with Prometheus' for:."""
    states = feed([(0, 85), (200, 50), (250, 85), (500, 85), (550, 85)])

    assert [s["status"] for s in states] == ["healthy"] * 4 + ["degraded"]
    assert states[2]["pending"] == {"degraded": 250}


def test_alternating_degraded_and_unhealthy_samples_still_degrade() -> None:
    """'At least degraded' holds across both levels, so the check degrades."""
    states = feed([(0, 90), (100, 99), (200, 90), (300, 99)])

    assert states[-1]["status"] == "degraded"
    assert states[-1]["pending"] == {"unhealthy": 300}


def test_the_worst_status_held_long_enough_wins() -> None:
    """Both levels held for the hold time: straight to unhealthy."""
    states = feed([(0, 99), (150, 99), (300, 99)])

    assert [s["status"] for s in states] == ["healthy", "healthy", "unhealthy"]
    assert states[-1]["pending"] == {}


def test_recovery_waits_for_its_own_hold() -> None:
    """Back to healthy only after 120 s of good samples."""
    states = feed([(0, 99), (300, 99), (400, 50), (500, 50), (520, 50)])

    assert [s["status"] for s in states] == [
        "healthy",
        "unhealthy",
        "unhealthy",
        "unhealthy",
        "healthy",
    ]
    assert states[3]["pending"] == {"healthy": 400, "degraded": 400}


def test_recovery_stops_at_the_best_level_that_held() -> None:
    """Samples at degraded level only recover an unhealthy check to degraded."""
    states = feed([(0, 99), (300, 99), (400, 85), (520, 85)])

    assert states[-1]["status"] == "degraded"


def test_a_zero_hold_changes_status_on_the_first_sample() -> None:
    """for = 0 behaves like a rule without for:."""
    rule = CheckRule("x", unhealthy_below=1, hold=0, recover_hold=0)

    states = feed([(0, 0), (5, 1)], rule)

    assert [s["status"] for s in states] == ["unhealthy", "healthy"]


def test_a_repeated_time_can_break_a_hold_but_never_complete_one() -> None:
    """No time passes between two samples with the same timestamp."""
    states = feed([(0, 85), (300, 50), (300, 85), (300, 85)])

    assert [s["status"] for s in states] == ["healthy"] * 4
    assert states[-1]["pending"] == {"degraded": 300}


def test_an_unchanging_sample_needs_no_write() -> None:
    """step_check returns None when status and pending stay as they are."""
    state = new_check_state("web", "cpu")

    assert step_check(state, RULE.classify(10), 10, 0, RULE) is None
    pending = step_check(state, RULE.classify(85), 85, 0, RULE)
    assert pending is not None
    assert step_check(pending, RULE.classify(86), 86, 60, RULE) is None


def test_nan_and_infinite_values_are_stored_as_none() -> None:
    """JSON has no NaN; the state keeps None instead of the value."""
    states = feed([(0, float("inf")), (300, float("inf"))])

    assert states[-1]["status"] == "unhealthy"
    assert states[-1]["value"] is None


def test_expiry_returns_a_troubled_check_to_healthy() -> None:
    """A silent series supports no status; a settled check is left alone."""
    degraded = {**new_check_state("web", "cpu"), "status": "degraded", "value": 90.0}

    expired = expire_check(degraded)

    assert expired == {**degraded, "status": "healthy", "value": None, "pending": {}}
    assert expire_check(new_check_state("web", "cpu")) is None


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], ("healthy", 0, 0)),
        (["healthy", "healthy"], ("healthy", 2, 2)),
        (["healthy", "degraded"], ("degraded", 1, 2)),
        (["degraded", "unhealthy", "healthy"], ("unhealthy", 1, 3)),
        (["unhealthy"], ("unhealthy", 0, 1)),
    ],
)
def test_a_system_is_as_healthy_as_its_worst_check(
    statuses: list[str], expected: tuple[str, int, int]
) -> None:
    """Worst check wins; counts are healthy and total checks."""
    states = [{"status": status} for status in statuses]

    summary = summarise_checks(states)

    assert (
        summary["status"],
        summary["healthy_checks"],
        summary["total_checks"],
    ) == expected
