from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

from monitoring._errors import InvalidInputError, NotFoundError
from monitoring._handle import State, SupportsEntityWrites
from runtime import SYSTEM_ACTOR, EntityChanged

logger = logging.getLogger(__name__)

HEALTH_KIND = "health"
"""The entity kind of a system's computed health."""

HealthStatus = Literal["healthy", "degraded", "unhealthy"]

HEALTH_STATUSES: tuple[str, ...] = get_args(HealthStatus)
"""Every health status, best first."""

SYSTEM_HEALTHY = "healthcheck.system_healthy"
SYSTEM_DEGRADED = "healthcheck.system_degraded"
SYSTEM_HEALTH_CHANGED = "healthcheck.system_health_changed"


@dataclasses.dataclass(frozen=True)
class HealthState:
    """The health of one system, computed from its checks' latest results."""

    status: HealthStatus
    healthy_checks: int
    total_checks: int


@dataclasses.dataclass(frozen=True)
class SystemHealthyPayload:
    """Payload of ``healthcheck.system_healthy``: a system recovered."""

    system_id: str
    previous_status: Literal["degraded", "unhealthy"]
    new_status: Literal["healthy"]
    healthy_checks: int
    total_checks: int


@dataclasses.dataclass(frozen=True)
class SystemDegradedPayload:
    """Payload of ``healthcheck.system_degraded``: a healthy system got worse."""

    system_id: str
    previous_status: Literal["healthy"]
    new_status: Literal["degraded", "unhealthy"]
    healthy_checks: int
    total_checks: int


@dataclasses.dataclass(frozen=True)
class SystemHealthChangedPayload:
    """Payload of ``healthcheck.system_health_changed``: any status move."""

    system_id: str
    previous_status: HealthStatus
    new_status: HealthStatus
    healthy_checks: int
    total_checks: int


HEALTH_TRIGGER_PAYLOADS: Mapping[str, type] = {
    SYSTEM_HEALTHY: SystemHealthyPayload,
    SYSTEM_DEGRADED: SystemDegradedPayload,
    SYSTEM_HEALTH_CHANGED: SystemHealthChangedPayload,
}
"""The payload schema each health trigger declares, by trigger name."""


@dataclasses.dataclass
class _Check:
    enabled: bool
    passed: bool | None = None


class HealthService:
    """Holds each system's checks and the latest result of every check.

    The ``health`` kind is computed on read: :meth:`get_many_entity_states`
    derives each system's state from what the service holds at that moment, so
    the runtime keeps no copy. The rule (see :meth:`compute_state`):

    - only enabled checks count; a check with no result yet is not failing;
    - ``healthy`` when no counted check's latest result failed (so a system
      whose checks have not run yet reads as healthy, and its first failure is
      a change of an existing entity, never a silent create);
    - ``unhealthy`` when at least one failed and none passed;
    - ``degraded`` when some failed and some passed.

    A system is known from its first :meth:`add_check` until
    :meth:`remove_system`; a known system with no enabled check reads as
    healthy with zero counts, because nothing it runs is failing.

    .. note::
        Because the read computes from the current results, a write that
        changes a system's health must run inside the entity's ``apply``
        (see :func:`evaluate_system`); written beforehand, the runtime would
        read the new health as ``prev`` and see no change.

    Thread-safe: every method holds one lock. Only the latest result of each
    check is kept.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._systems: dict[str, dict[str, _Check]] = {}

    def add_check(self, system_id: str, check_id: str, *, enabled: bool = True) -> None:
        """Add a check to a system, making the system known if it was not.

        Raises:
            InvalidInputError: an id is not a non-empty string, ``enabled`` is
                not a bool, or the system already has that check.
        """
        _check_ids(system_id, check_id)
        _check_bool(system_id, "enabled", enabled)

        with self._lock:
            checks = self._systems.setdefault(system_id, {})
            if check_id in checks:
                raise InvalidInputError(
                    HEALTH_KIND, system_id, "check_id", f"{check_id!r} already exists"
                )
            checks[check_id] = _Check(enabled=enabled)

    def set_check_enabled(self, system_id: str, check_id: str, enabled: bool) -> None:
        """Enable or disable a check; a disabled check keeps its latest result.

        Raises:
            InvalidInputError: ``enabled`` is not a bool.
            NotFoundError: the system or the check is unknown.
        """
        _check_bool(system_id, "enabled", enabled)

        with self._lock:
            self._find(system_id, check_id).enabled = enabled

    def remove_check(self, system_id: str, check_id: str) -> None:
        """Remove a check and its result; the system stays known.

        Raises:
            NotFoundError: the system or the check is unknown.
        """
        with self._lock:
            self._find(system_id, check_id)
            del self._systems[system_id][check_id]

    def record_result(self, system_id: str, check_id: str, healthy: bool) -> None:
        """Keep one check run's outcome as that check's latest result.

        Raises:
            InvalidInputError: ``healthy`` is not a bool.
            NotFoundError: the system or the check is unknown.
        """
        _check_bool(system_id, "healthy", healthy)

        with self._lock:
            self._find(system_id, check_id).passed = healthy

    def remove_system(self, system_id: str) -> bool:
        """Forget a system, its checks and their results.

        Returns:
            Whether the system was known.
        """
        with self._lock:
            return self._systems.pop(system_id, None) is not None

    def system_ids(self) -> list[str]:
        """Return the known systems, sorted."""
        with self._lock:
            return sorted(self._systems)

    def compute_state(self, system_id: str) -> dict[str, Any] | None:
        """Return a system's health now, or ``None`` for an unknown system."""
        with self._lock:
            checks = self._systems.get(system_id)
            if checks is None:
                return None
            return _summarise(checks.values())

    def get_many_entity_states(
        self, system_ids: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """Compute the health of each known system; the ``health`` kind's read.

        Returns:
            ``{system_id: {"status", "healthy_checks", "total_checks"}}``;
            unknown systems are missing. All states come from one consistent
            moment.
        """
        with self._lock:
            return {
                system_id: _summarise(self._systems[system_id].values())
                for system_id in system_ids
                if system_id in self._systems
            }

    def _find(self, system_id: str, check_id: str) -> _Check:
        checks = self._systems.get(system_id)
        if checks is None:
            raise NotFoundError(HEALTH_KIND, system_id, "no such system")
        check = checks.get(check_id)
        if check is None:
            raise NotFoundError(HEALTH_KIND, system_id, f"no check {check_id!r}")
        return check


def _summarise(checks: Iterable[_Check]) -> dict[str, Any]:
    counted = [check for check in checks if check.enabled]
    passed = sum(1 for check in counted if check.passed is True)
    failed = sum(1 for check in counted if check.passed is False)

    if failed == 0:
        status = "healthy"
    elif passed == 0:
        status = "unhealthy"
    else:
        status = "degraded"
    return {"status": status, "healthy_checks": passed, "total_checks": len(counted)}


def _check_ids(system_id: object, check_id: object) -> None:
    for field, value in (("system_id", system_id), ("check_id", check_id)):
        if not isinstance(value, str) or not value:
            where = system_id if isinstance(system_id, str) and system_id else "-"
            raise InvalidInputError(
                HEALTH_KIND,
                where,
                field,
                f"must be a non-empty string, got {value!r} ({type(value).__name__})",
            )


def _check_bool(system_id: str, field: str, value: object) -> None:
    if type(value) is not bool:
        raise InvalidInputError(
            HEALTH_KIND,
            system_id,
            field,
            f"must be True or False, got {value!r} ({type(value).__name__})",
        )


def derive_health_events(change: EntityChanged) -> list[str]:
    """Turn one ``health`` change into the trigger events it fires.

    - into ``healthy``: ``healthcheck.system_healthy`` and
      ``healthcheck.system_health_changed``;
    - out of ``healthy``: ``healthcheck.system_degraded`` and
      ``healthcheck.system_health_changed``;
    - between ``degraded`` and ``unhealthy``: only
      ``healthcheck.system_health_changed``;
    - a change of the counts alone, a create and a tombstone fire nothing.

    Args:
        change: the committed change of one system's health.

    Returns:
        The trigger names to fire, possibly none.
    """
    if change.prev is None or change.next is None:
        return []

    before = change.prev.get("status")
    after = change.next.get("status")
    if before == after:
        return []

    if after == "healthy":
        return [SYSTEM_HEALTHY, SYSTEM_HEALTH_CHANGED]
    if before == "healthy":
        return [SYSTEM_DEGRADED, SYSTEM_HEALTH_CHANGED]
    return [SYSTEM_HEALTH_CHANGED]


def health_change_to_payload(change: EntityChanged) -> dict[str, Any]:
    """Build the payload of a health trigger from the change behind it.

    Keys: ``system_id``, ``previous_status`` and ``new_status`` (``None`` on a
    create or a tombstone respectively), ``healthy_checks`` and
    ``total_checks`` (from the new state, or the last one on a tombstone).

    Returns:
        A new, mutable dict that validates against the payload schema of each
        trigger :func:`derive_health_events` picks for the same change.
    """
    latest = change.next if change.next is not None else change.prev or {}

    return {
        "system_id": change.id,
        "previous_status": None if change.prev is None else change.prev.get("status"),
        "new_status": None if change.next is None else change.next.get("status"),
        "healthy_checks": latest.get("healthy_checks", 0),
        "total_checks": latest.get("total_checks", 0),
    }


def evaluate_system(
    handle: SupportsEntityWrites | None,
    service: HealthService,
    system_id: str,
    write: Callable[[], object] | None = None,
    *,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> Mapping[str, Any]:
    """Run a health write and record the health it leads to.

    ``write`` (a call on ``service``: a result, a new check, a disabled check)
    and the computation of the fresh state both run inside the runtime's
    ``apply``, serialised with every other write of the same system. The
    runtime reads ``prev`` before the write, so the diff is exactly what the
    write did; two writers of one system never both diff against the same
    ``prev``, so the same move is recorded once. Without a handle the write
    still runs and the fresh state is returned.

    Args:
        handle: the ``health`` entity handle, or ``None``.
        service: the health service holding the system's checks.
        system_id: the system to evaluate.
        write: the change to make first, or ``None`` to only re-evaluate.
        actor: who made the write, recorded with the change.
        run_id: the run the write belongs to, if any.

    Returns:
        The system's health after the write.

    Raises:
        NotFoundError: the system is unknown (wrapped in
            :class:`runtime.ApplyError` when a handle is given); nothing was
            recorded.
    """

    def apply(_prev: State | None) -> Mapping[str, Any]:
        if write is not None:
            write()
        state = service.compute_state(system_id)
        if state is None:
            raise NotFoundError(HEALTH_KIND, system_id, "no such system")
        return state

    if handle is None:
        return apply(None)
    return handle.mutate(system_id, apply, actor=actor, run_id=run_id)


def record_check_result(
    handle: SupportsEntityWrites | None,
    service: HealthService,
    system_id: str,
    check_id: str,
    healthy: bool,
    *,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> Mapping[str, Any]:
    """Record one check run and the system health that follows from it.

    Shorthand for :func:`evaluate_system` with
    :meth:`HealthService.record_result` as the write.

    Returns:
        The system's health after the result.
    """

    def write() -> None:
        service.record_result(system_id, check_id, healthy)

    return evaluate_system(
        handle, service, system_id, write, actor=actor, run_id=run_id
    )


def remove_system_health(
    handle: SupportsEntityWrites | None,
    service: HealthService,
    system_id: str,
    *,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> None:
    """Forget a system's checks and record the end of its ``health`` entity.

    A system the service does not know is a no-op.
    """

    def delete(_prev: State | None) -> None:
        service.remove_system(system_id)

    if handle is None:
        delete(None)
        return
    handle.remove(system_id, delete, actor=actor, run_id=run_id)
