from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from monitoring._incident import (
    INCIDENT_CREATED,
    INCIDENT_RESOLVED,
    INCIDENT_SEVERITIES,
    INCIDENT_UPDATED,
)
from runtime import EntityChanged, Runtime

logger = logging.getLogger(__name__)

INCIDENT_EVENTS = (INCIDENT_CREATED, INCIDENT_UPDATED, INCIDENT_RESOLVED)


@dataclasses.dataclass(frozen=True, slots=True)
class StatusChange:
    """One change of a check's status, as the agent committed it."""

    at: float
    check_id: str
    system: str
    before: str
    after: str


@dataclasses.dataclass(frozen=True, slots=True)
class IncidentEvent:
    """One incident trigger event, in record time."""

    seq: int
    at: float
    event: str
    incident_id: str
    system_ids: tuple[str, ...]
    status: str
    severity: str


class IncidentTimeline:
    """Collects the ``incident.*`` trigger events of one run.

    Subscribes a trigger handler per incident event; each runs on its own
    actor, so events are sorted by sequence number when read. Thread-safe.
    """

    def __init__(self, rt: Runtime) -> None:
        self._lock = threading.Lock()
        self._events: list[IncidentEvent] = []
        for event in INCIDENT_EVENTS:
            rt.on_trigger(event, self._collect, name="agent-timeline")

    def _collect(self, event: str, payload: Any, change: EntityChanged) -> None:
        item = IncidentEvent(
            seq=change.seq,
            at=change.occurred_at.timestamp(),
            event=event,
            incident_id=payload["incident_id"],
            system_ids=tuple(payload["system_ids"]),
            status=payload["status"],
            severity=payload["severity"],
        )
        with self._lock:
            self._events.append(item)

    def events(self) -> list[IncidentEvent]:
        """Every event so far, in commit order."""
        with self._lock:
            return sorted(self._events, key=lambda e: (e.seq, e.event))


@dataclasses.dataclass
class IncidentRecord:
    """One incident of the run, for the report.

    Attributes:
        incident_id: its id.
        system: the system it is about.
        opened_at: when it was opened (record time, POSIX seconds).
        resolved_at: when it was resolved, or ``None`` while open.
        max_severity: the highest severity it had.
        checks: the checks of its system that were not healthy at some time
            while it was open, sorted.
        events: its trigger events in order, as ``(at, event, status,
            severity)``.
    """

    incident_id: str
    system: str
    opened_at: float
    resolved_at: float | None
    max_severity: str
    checks: list[str] = dataclasses.field(default_factory=list)
    events: list[tuple[float, str, str, str]] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The report's entry for this incident."""
        return {
            "id": self.incident_id,
            "system": self.system,
            "opened_at": iso(self.opened_at),
            "resolved_at": None if self.resolved_at is None else iso(self.resolved_at),
            "max_severity": self.max_severity,
            "duration_seconds": None
            if self.resolved_at is None
            else self.resolved_at - self.opened_at,
            "checks": self.checks,
            "events": [
                {"at": iso(at), "event": event, "status": status, "severity": sev}
                for at, event, status, sev in self.events
            ],
        }


def iso(seconds: float) -> str:
    """Format POSIX seconds as an ISO 8601 UTC time."""
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def build_incidents(
    events: Sequence[IncidentEvent],
    opened_before: Mapping[str, tuple[str, float, str]],
) -> list[IncidentRecord]:
    """Fold the run's incident events into one record per incident.

    Args:
        events: the run's incident trigger events, in commit order.
        opened_before: for incidents opened in an earlier run, their
            ``(system, opened_at, severity)``.

    Returns:
        The incidents touched in the run, by opening time then id.
    """
    records: dict[str, IncidentRecord] = {}
    for event in events:
        record = records.get(event.incident_id)
        if record is None:
            system, opened, severity = opened_before.get(
                event.incident_id,
                (
                    event.system_ids[0] if event.system_ids else "-",
                    event.at,
                    event.severity,
                ),
            )
            record = IncidentRecord(event.incident_id, system, opened, None, severity)
            records[event.incident_id] = record
        record.events.append((event.at, event.event, event.status, event.severity))
        if _rank(event.severity) > _rank(record.max_severity):
            record.max_severity = event.severity
        if event.event == INCIDENT_RESOLVED:
            record.resolved_at = event.at
        elif event.status != "resolved":
            record.resolved_at = None
    return sorted(records.values(), key=lambda r: (r.opened_at, r.incident_id))


def _rank(severity: str) -> int:
    return INCIDENT_SEVERITIES.index(severity)


def attribute_checks(
    incidents: Iterable[IncidentRecord],
    changes: Sequence[StatusChange],
    initial: Mapping[str, tuple[str, str]],
    end: float,
) -> None:
    """Fill each incident's ``checks``: its system's checks that were not
    healthy at some moment while it was open.

    Args:
        incidents: the incidents to fill in.
        changes: the run's status changes, in order.
        initial: ``{check_id: (system, status)}`` at the start of the run.
        end: the end of the run (the end of incidents still open).
    """
    spans: dict[str, list[tuple[str, float, float]]] = {}
    status = {check: state for check, (_, state) in initial.items()}
    system_of = {check: system for check, (system, _) in initial.items()}
    since = dict.fromkeys(initial, float("-inf"))
    for change in changes:
        system_of.setdefault(change.check_id, change.system)
        previous = status.get(change.check_id, "healthy")
        if previous != "healthy":
            spans.setdefault(change.system, []).append(
                (change.check_id, since.get(change.check_id, float("-inf")), change.at)
            )
        status[change.check_id] = change.after
        since[change.check_id] = change.at
    for check, state in status.items():
        if state != "healthy":
            spans.setdefault(system_of[check], []).append(
                (check, since.get(check, float("-inf")), float("inf"))
            )

    for incident in incidents:
        stop = end if incident.resolved_at is None else incident.resolved_at
        found = {
            check
            for check, start, finish in spans.get(incident.system, ())
            if start <= stop and finish >= incident.opened_at
        }
        incident.checks = sorted(found)


@dataclasses.dataclass(frozen=True)
class LabelScore:
    """How the incidents line up with labelled anomaly windows.

    Attributes:
        windows_total: windows of the replayed series.
        windows_hit: windows that an incident overlapped; an incident covers
            a window of a series when that series' check was not healthy
            during the incident and the two time spans overlap.
        incidents_outside_windows: incidents that overlap no window of their
            checks.
        unlabelled_series: replayed series the label file has no entry for.
        per_series: ``{label_key: (windows, hit)}``.
    """

    windows_total: int
    windows_hit: int
    incidents_outside_windows: int
    unlabelled_series: list[str]
    per_series: dict[str, tuple[int, int]]


def score_labels(
    incidents: Sequence[IncidentRecord],
    windows: Mapping[str, Sequence[tuple[float, float]]],
    series_keys: Mapping[str, str],
    end: float,
) -> LabelScore:
    """Score incidents against labelled windows.

    Args:
        incidents: the run's incidents, with ``checks`` filled in.
        windows: ``{label_key: [(start, end), ...]}``.
        series_keys: ``{check_id: label_key}`` of the replayed series.
        end: the end of the run (the end of incidents still open).
    """
    hit: set[tuple[str, int]] = set()
    outside = 0
    for incident in incidents:
        stop = end if incident.resolved_at is None else incident.resolved_at
        overlapped = False
        for check in incident.checks:
            key = series_keys.get(check)
            for number, (start, finish) in enumerate(windows.get(key or "", ())):
                if incident.opened_at <= finish and stop >= start:
                    hit.add((key or "", number))
                    overlapped = True
        outside += not overlapped

    per_series = {}
    unlabelled = []
    for key in sorted(set(series_keys.values())):
        if key not in windows:
            unlabelled.append(key)
            continue
        count = len(windows[key])
        per_series[key] = (count, sum(1 for k, _ in hit if k == key))
    return LabelScore(
        windows_total=sum(total for total, _ in per_series.values()),
        windows_hit=len(hit),
        incidents_outside_windows=outside,
        unlabelled_series=unlabelled,
        per_series=per_series,
    )
