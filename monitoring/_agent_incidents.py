from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from monitoring._health import (
    SYSTEM_DEGRADED,
    SYSTEM_HEALTH_CHANGED,
    SYSTEM_HEALTHY,
    derive_health_events,
)
from monitoring._incident import INCIDENT_SEVERITIES, to_incident_entity_state
from monitoring._incident_service import Incident, IncidentService
from runtime import EntityChanged, EntityHandle

logger = logging.getLogger(__name__)

AUTOMATION_WORKER_GROUP = "agent-incident-automation"
"""The work-queue group of the automation that opens and resolves incidents."""

AUTOMATION_ACTOR = "incident-automation"
"""The actor recorded with the automation's incident writes."""

SEVERITY_FOR_STATUS = {"degraded": "major", "unhealthy": "critical"}
"""The severity an incident gets (at least) for each unhealthy system status."""


@dataclasses.dataclass(frozen=True)
class OpenIncident:
    """An incident the automation is looking after.

    Attributes:
        incident_id: the incident's id.
        system: the system it is about.
        severity: its current severity.
        status: ``investigating`` while the system is not healthy,
            ``monitoring`` while it is healthy but not yet for long enough.
        resolve_due: when it will be resolved if the system stays healthy
            (POSIX seconds), or ``None``.
    """

    incident_id: str
    system: str
    severity: str
    status: str
    resolve_due: float | None


def _raise(current: str, wanted: str) -> str:
    order = INCIDENT_SEVERITIES
    return current if order.index(current) >= order.index(wanted) else wanted


class IncidentAutomation:
    """Opens, escalates and resolves one incident per troubled system.

    Subscribed to ``health`` changes as the work queue
    ``agent-incident-automation`` (so a failing write is retried and, at the
    end, dead-lettered), it reacts to the trigger events the health deriver
    names for each change:

    - ``healthcheck.system_degraded`` (healthy to degraded or unhealthy): opens
      an incident, ``investigating``, severity ``major`` (degraded) or
      ``critical`` (unhealthy); if the system still has an open incident
      (``monitoring`` a recovery), that one goes back to ``investigating``.
    - ``healthcheck.system_health_changed`` between degraded and unhealthy:
      raises the severity to ``critical``; it never lowers it.
    - ``healthcheck.system_healthy``: the incident goes to ``monitoring`` and
      is due to be resolved ``resolve_after`` seconds after the recovery.

    :meth:`fire_due` resolves the incidents whose system stayed healthy that
    long; the agent calls it as its clock moves, with record time during a
    replay. Each write passes ``at=`` the time of the health change (or the
    due time), so an incident's history is in record time.

    The open incidents are re-read from the incident service on every health
    change, so a retried delivery does not open a second incident. The due
    times are kept in memory (declared as non-reactive bookkeeping) and
    rebuilt from the service and the ``health`` history by :meth:`reconcile`.

    Thread-safe: the work queue's thread and the agent's thread share one lock.
    """

    def __init__(
        self,
        incidents: EntityHandle[Any],
        health: EntityHandle[Any],
        service: IncidentService,
        resolve_after: float,
    ) -> None:
        self._incidents = incidents
        self._health = health
        self._service = service
        self.resolve_after = resolve_after
        self._lock = threading.Lock()
        self._open: dict[str, OpenIncident] = {}

    # -- reactions --------------------------------------------------------------

    def on_health_changed(self, change: EntityChanged) -> None:
        """The work-queue handler: react to one ``health`` change."""
        events = derive_health_events(change)
        if not events or change.next is None:
            return
        system = change.id
        at = change.occurred_at.timestamp()
        status = change.next["status"]

        with self._lock:
            current = self._find_open(system)
            if SYSTEM_HEALTHY in events:
                if current is not None:
                    self._write(
                        current.incident_id, at, status="monitoring", severity=None
                    )
                    self._open[system] = dataclasses.replace(
                        current,
                        status="monitoring",
                        resolve_due=at + self.resolve_after,
                    )
                return
            if SYSTEM_DEGRADED in events or SYSTEM_HEALTH_CHANGED in events:
                self._escalate(system, current, status, at, change.seq)

    def _escalate(
        self,
        system: str,
        current: OpenIncident | None,
        status: str,
        at: float,
        seq: int,
    ) -> None:
        wanted = SEVERITY_FOR_STATUS[status]
        if current is None:
            incident_id = self._next_id(system)
            self._create(incident_id, system, wanted, status, at)
            self._open[system] = OpenIncident(
                incident_id, system, wanted, "investigating", None
            )
            logger.info(
                "incident/%s: opened (%s) for health/%s seq=%d",
                incident_id,
                wanted,
                system,
                seq,
            )
            return

        severity = _raise(current.severity, wanted)
        self._write(current.incident_id, at, status="investigating", severity=severity)
        self._open[system] = dataclasses.replace(
            current, severity=severity, status="investigating", resolve_due=None
        )

    def fire_due(self, now: float) -> list[str]:
        """Resolve every incident whose system has been healthy long enough.

        An incident is resolved at its due time (``at=`` the recovery plus
        ``resolve_after``), in due order, provided its system is still
        healthy.

        Returns:
            The ids of the incidents resolved.
        """
        resolved = []
        with self._lock:
            due = sorted(
                (item for item in self._open.values() if item.resolve_due is not None),
                key=lambda item: (item.resolve_due, item.incident_id),
            )
            for item in due:
                when = item.resolve_due
                if when is None or when > now:
                    break
                state = self._health.get(item.system)
                if state is not None and state["status"] != "healthy":
                    # NOTE: never leave a due time in the past behind, or the
                    # agent's timer loop would find it again and again.
                    self._open[item.system] = dataclasses.replace(
                        item, resolve_due=None
                    )
                    continue
                resolve = functools.partial(
                    self._service.resolve_incident, item.incident_id
                )
                self._mutate(item.incident_id, when, resolve)
                del self._open[item.system]
                resolved.append(item.incident_id)
                logger.info(
                    "incident/%s: resolved, health/%s healthy for %g s",
                    item.incident_id,
                    item.system,
                    self.resolve_after,
                )
        return resolved

    def next_due(self) -> float | None:
        """The earliest due time of a resolution, or ``None``."""
        with self._lock:
            times = [i.resolve_due for i in self._open.values() if i.resolve_due]
        return min(times) if times else None

    def open_incidents(self) -> list[OpenIncident]:
        """The incidents being looked after, by system."""
        with self._lock:
            return [self._open[s] for s in sorted(self._open)]

    def reconcile(self, systems: Iterable[str], now: float) -> None:
        """Bring the incidents in line with the systems' health after a restart.

        Reads the open incidents from the service; an incident of a healthy
        system goes to ``monitoring`` (due ``resolve_after`` after the system
        became healthy, by the ``health`` history); one of a troubled system
        goes back to ``investigating``; a troubled system without an incident
        gets one. This covers health changes that were committed but not yet
        handled when the previous run stopped.
        """
        with self._lock:
            self._open.clear()
            for incident in self._service.list_incidents(include_resolved=False):
                if incident.system_ids:
                    self._open[incident.system_ids[0]] = _as_open(incident)

            for system in sorted({*systems, *self._open}):
                self._reconcile_system(system, now)

    def _reconcile_system(self, system: str, now: float) -> None:
        state = self._health.get(system)
        current = self._open.get(system)
        if state is None:
            return
        since = self._health.in_state_since(system, "status")
        at = since.timestamp() if since is not None else now
        if state["status"] == "healthy":
            if current is not None:
                if current.status != "monitoring":
                    self._write(current.incident_id, at, status="monitoring")
                self._open[system] = dataclasses.replace(
                    current, status="monitoring", resolve_due=at + self.resolve_after
                )
        else:
            self._escalate(system, current, state["status"], at, 0)

    # -- writes -------------------------------------------------------------------

    def _find_open(self, system: str) -> OpenIncident | None:
        known = self._open.get(system)
        if known is not None:
            return known
        for incident in self._service.list_incidents(
            system_id=system, include_resolved=False
        ):
            found = _as_open(incident)
            self._open[system] = found
            return found
        return None

    def _next_id(self, system: str) -> str:
        number = len(self._service.list_incidents(system_id=system)) + 1
        while self._service.get_incident(f"inc-{system}-{number}") is not None:
            number += 1
        return f"inc-{system}-{number}"

    def _create(
        self, incident_id: str, system: str, severity: str, status: str, at: float
    ) -> None:
        def create() -> Incident:
            return self._service.create_incident(
                f"{system} is {status}",
                severity=severity,
                system_ids=[system],
                incident_id=incident_id,
            )

        self._mutate(incident_id, at, create)

    def _write(
        self, incident_id: str, at: float, *, status: str, severity: str | None = None
    ) -> None:
        def update() -> Incident:
            return self._service.update_incident(
                incident_id, status=status, severity=severity
            )

        self._mutate(incident_id, at, update)

    def _mutate(
        self, incident_id: str, at: float, write: Callable[[], Incident]
    ) -> None:
        def apply(_prev: Any) -> dict[str, Any]:
            return to_incident_entity_state(write())

        self._incidents.mutate(incident_id, apply, actor=AUTOMATION_ACTOR, at=at)


def _as_open(incident: Incident) -> OpenIncident:
    return OpenIncident(
        incident.id,
        incident.system_ids[0],
        incident.severity,
        incident.status,
        None,
    )
