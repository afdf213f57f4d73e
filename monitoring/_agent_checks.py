from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from monitoring._agent_config import (
    DEGRADED,
    HEALTHY,
    LEVEL_NAMES,
    UNHEALTHY,
    CheckRule,
)
from monitoring._health import HealthStatus

logger = logging.getLogger(__name__)

CHECK_KIND = "check"
"""The entity kind of one metric series judged against its thresholds."""

_LEVEL_OF = {name: level for level, name in enumerate(LEVEL_NAMES)}
_LEVELS = (HEALTHY, DEGRADED, UNHEALTHY)


@dataclasses.dataclass(frozen=True)
class CheckState:
    """The reactive state of one check (one metric series).

    Attributes:
        system: the system the check belongs to.
        metric: the series it judges (name and labels).
        status: the status it holds now.
        value: the sample behind the latest change of this state (``None``
            before the first change, or for NaN and infinite samples).
        pending: for each status the check is moving towards, the record time
            (POSIX seconds) since which every sample has supported it. A worse
            status needs ``for``, a better one ``recover_for``, before the
            check takes it. Empty when every sample agrees with ``status``.
    """

    system: str
    metric: str
    status: HealthStatus
    value: float | None
    pending: dict[str, float]


def new_check_state(system: str, metric: str) -> dict[str, Any]:
    """The state a check starts in before its first sample: healthy, nothing pending.

    A new check starts healthy, as a Prometheus rule starts with no alert, so
    that a first bad sample is a change of an existing entity.
    """
    return {
        "system": system,
        "metric": metric,
        "status": "healthy",
        "value": None,
        "pending": {},
    }


def step_check(
    state: Mapping[str, Any],
    level: int,
    value: float,
    at: float,
    rule: CheckRule,
) -> dict[str, Any] | None:
    """Apply one sample to a check's state; return the new state or ``None``.

    The hold works like the ``for:`` of Prometheus alert rules, one rule per
    status. For every status ``X`` other than the current one, the condition
    is "the sample is at least as bad as ``X``" when ``X`` is worse, and "at
    least as good as ``X``" when it is better. ``pending[X]`` is the time since
    which that condition has held without a break; a sample that breaks it
    drops ``X``. When some worse ``X`` has held for ``rule.hold`` seconds the
    check moves to the worst such ``X``; otherwise, when some better ``X`` has
    held for ``rule.recover_hold``, to the best such ``X``. A hold of 0 moves
    on the first sample.

    Pure: ``state`` is not modified. Cost: constant.

    Args:
        state: the check's current state.
        level: the sample's level (``rule.classify(value)``).
        value: the sample's value.
        at: the sample's record time, POSIX seconds.
        rule: the check's thresholds and hold times.

    Returns:
        The next state, or ``None`` when the sample changes neither the
        status nor what is pending (so no write is needed).
    """
    status = _LEVEL_OF[state["status"]]
    before = state["pending"]

    pending: dict[str, float] = {}
    for candidate in _LEVELS:
        if _supports(candidate, status, level):
            name = LEVEL_NAMES[candidate]
            pending[name] = before.get(name, at)

    new_status = _fired(status, pending, at, rule)
    if new_status != status:
        pending = {
            name: since
            for name, since in pending.items()
            if _supports(_LEVEL_OF[name], new_status, level)
        }
    elif pending == before:
        return None

    return {
        "system": state["system"],
        "metric": state["metric"],
        "status": LEVEL_NAMES[new_status],
        "value": value if math.isfinite(value) else None,
        "pending": pending,
    }


def _supports(candidate: int, status: int, level: int) -> bool:
    if candidate > status:
        return level >= candidate
    if candidate < status:
        return level <= candidate
    return False


def _fired(
    status: int, pending: Mapping[str, float], at: float, rule: CheckRule
) -> int:
    worse = [
        _LEVEL_OF[name]
        for name, since in pending.items()
        if _LEVEL_OF[name] > status and at - since >= rule.hold
    ]
    if worse:
        return max(worse)
    better = [
        _LEVEL_OF[name]
        for name, since in pending.items()
        if _LEVEL_OF[name] < status and at - since >= rule.recover_hold
    ]
    return min(better) if better else status


def expire_check(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The state of a check whose series stopped reporting; ``None`` if no change.

    A series with no sample for ``stale_after`` no longer supports any
    status: its check goes back to healthy with nothing pending (as an alert
    on a vanished series resolves in Prometheus), and ``value`` is cleared.
    """
    if is_settled(state):
        return None
    return {**state, "status": "healthy", "value": None, "pending": {}}


def is_settled(state: Mapping[str, Any]) -> bool:
    """Whether a check is healthy with nothing pending (time alone cannot change it)."""
    return state["status"] == "healthy" and not state["pending"]


def summarise_checks(states: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Compute a system's health from its checks' states.

    The worst check sets the system's status: ``unhealthy`` if any check is
    unhealthy, ``degraded`` if any is degraded, otherwise ``healthy``.
    ``healthy_checks`` counts the healthy ones, ``total_checks`` all of them.
    """
    worst, healthy, total = HEALTHY, 0, 0
    for state in states:
        level = _LEVEL_OF[state["status"]]
        total += 1
        healthy += level == HEALTHY
        worst = max(worst, level)
    return {
        "status": LEVEL_NAMES[worst],
        "healthy_checks": healthy,
        "total_checks": total,
    }


class CheckIndex:
    """Which checks belong to which system; the agent's bookkeeping.

    Thread-safe. The ``health`` kind's read uses it to find a system's checks;
    a check is added inside the health write that creates it, so the health
    read before that write does not count it yet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_system: dict[str, tuple[str, ...]] = {}

    def add(self, system: str, check_id: str) -> None:
        """Put a check under a system (adding it twice does nothing)."""
        with self._lock:
            known = self._by_system.get(system, ())
            if check_id not in known:
                self._by_system[system] = (*known, check_id)

    def checks_of(self, system: str) -> tuple[str, ...]:
        """Return the ids of a system's checks, in the order they were added."""
        return self._by_system.get(system, ())

    def systems(self) -> list[str]:
        """Return every system with at least one check, sorted."""
        with self._lock:
            return sorted(self._by_system)


def make_health_read(
    index: CheckIndex,
    read_checks: Callable[[list[str]], Mapping[str, Mapping[str, Any]]],
) -> Callable[[list[str]], dict[str, dict[str, Any]]]:
    """Return the compute-on-read ``read`` of the agent's ``health`` kind.

    Each system's health is computed from the current states of its checks
    (read through ``read_checks``, the check kind's ``get_many``). Systems
    without a check are missing from the result.
    """

    def read(system_ids: list[str]) -> dict[str, dict[str, Any]]:
        found = {}
        for system in system_ids:
            check_ids = index.checks_of(system)
            if not check_ids:
                continue
            states = read_checks(list(check_ids))
            if states:
                found[system] = summarise_checks(states.values())
        return found

    return read
