from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol, get_args

from monitoring._handle import State, SupportsEntityWrites
from runtime import SYSTEM_ACTOR, EntityChanged

logger = logging.getLogger(__name__)

INCIDENT_KIND = "incident"
"""The entity kind of an incident's reactive state."""

IncidentStatus = Literal[
    "investigating", "identified", "fixing", "monitoring", "resolved"
]
IncidentSeverity = Literal["minor", "major", "critical"]

INCIDENT_STATUSES: tuple[str, ...] = get_args(IncidentStatus)
"""Every status an incident can have, in the order an incident usually moves."""

INCIDENT_SEVERITIES: tuple[str, ...] = get_args(IncidentSeverity)
"""Every severity an incident can have, mildest first."""

INCIDENT_CREATED = "incident.created"
INCIDENT_UPDATED = "incident.updated"
INCIDENT_RESOLVED = "incident.resolved"


@dataclasses.dataclass(frozen=True)
class IncidentState:
    """The reactive subset of an incident: what changes are derived from.

    Titles, descriptions and timestamps stay in the incident service only; a
    change of those alone is not a change of the entity.
    """

    status: IncidentStatus
    severity: IncidentSeverity
    system_ids: list[str]


@dataclasses.dataclass(frozen=True)
class IncidentCreatedPayload:
    """Payload of ``incident.created``; a create changes every field."""

    incident_id: str
    system_ids: list[str]
    severity: IncidentSeverity
    status: IncidentStatus
    status_change: IncidentStatus


@dataclasses.dataclass(frozen=True)
class IncidentUpdatedPayload:
    """Payload of ``incident.updated``; ``status_change`` only on a status move."""

    incident_id: str
    system_ids: list[str]
    severity: IncidentSeverity
    status: IncidentStatus
    status_change: IncidentStatus | None = None


@dataclasses.dataclass(frozen=True)
class IncidentResolvedPayload:
    """Payload of ``incident.resolved``; the status is always the new one."""

    incident_id: str
    system_ids: list[str]
    severity: IncidentSeverity
    status: Literal["resolved"]
    status_change: Literal["resolved"]


INCIDENT_TRIGGER_PAYLOADS: Mapping[str, type] = {
    INCIDENT_CREATED: IncidentCreatedPayload,
    INCIDENT_UPDATED: IncidentUpdatedPayload,
    INCIDENT_RESOLVED: IncidentResolvedPayload,
}
"""The payload schema each incident trigger declares, by trigger name."""


def _field(state: Mapping[str, Any] | None, name: str) -> Any:
    return None if state is None else state.get(name)


def derive_incident_events(change: EntityChanged) -> list[str]:
    """Turn one ``incident`` change into the trigger events it fires.

    - a create fires ``incident.created``;
    - a move into ``resolved`` from any other status fires ``incident.resolved``
      and nothing else, so automations that react to resolution have one
      trigger to listen to;
    - every other change, a reopen included, fires ``incident.updated``;
    - a tombstone fires nothing: there is no deletion trigger.

    The function is pure and cheap; the runtime may call it on any thread.

    Args:
        change: the committed change of one incident.

    Returns:
        The trigger names to fire, possibly none.
    """
    if change.is_tombstone:
        return []

    if change.is_create:
        return [INCIDENT_CREATED]

    before = _field(change.prev, "status")
    after = _field(change.next, "status")
    if after == "resolved" and before != "resolved":
        return [INCIDENT_RESOLVED]

    return [INCIDENT_UPDATED]


def incident_change_to_payload(change: EntityChanged) -> dict[str, Any]:
    """Build the payload of an incident trigger from the change behind it.

    Keys: ``incident_id``, ``system_ids`` (a plain list, empty when the new
    state has none), ``severity`` and ``status`` of the new state, and
    ``status_change`` (the new status) only when ``status`` is among the
    changed fields. On a tombstone the new state is absent, so ``severity`` and
    ``status`` are ``None``; no incident trigger fires on a tombstone.

    Args:
        change: the committed change of one incident.

    Returns:
        A new, mutable dict that validates against the payload schema of the
        trigger :func:`derive_incident_events` picks for the same change.
    """
    state = change.next
    systems = _field(state, "system_ids")
    status = _field(state, "status")

    payload: dict[str, Any] = {
        "incident_id": change.id,
        "system_ids": list(systems) if isinstance(systems, list) else [],
        "severity": _field(state, "severity"),
        "status": status,
    }

    if "status" in change.changed_fields and isinstance(status, str):
        payload["status_change"] = status
    return payload


class _HasIncidentFields(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def severity(self) -> str: ...

    @property
    def system_ids(self) -> Iterable[str]: ...


def to_incident_entity_state(
    incident: _HasIncidentFields | Mapping[str, Any],
) -> dict[str, Any]:
    """Project a full incident record onto its reactive subset.

    Args:
        incident: an :class:`~monitoring.Incident` from the service, or any
            object or mapping with ``status``, ``severity`` and ``system_ids``.

    Returns:
        A new dict with exactly ``status``, ``severity`` and ``system_ids`` (a
        new list, in the record's order); everything else is left out.
    """
    if isinstance(incident, Mapping):
        status, severity = incident["status"], incident["severity"]
        systems = incident["system_ids"]
    else:
        status, severity = incident.status, incident.severity
        systems = incident.system_ids

    return {"status": status, "severity": severity, "system_ids": list(systems)}


class _IncidentStateSource(Protocol):
    def get_many_entity_states(
        self, incident_ids: Iterable[str]
    ) -> dict[str, dict[str, Any]]: ...


def create_incident_read(
    service: _IncidentStateSource,
) -> Callable[[list[str]], Mapping[str, Mapping[str, Any]]]:
    """Return the batched ``read`` of the plugin-backed ``incident`` kind.

    The read goes straight to the service's batched
    ``get_many_entity_states``; the runtime keeps no copy of incident state.
    Ids the service does not hold are missing from the result.

    Args:
        service: the incident service (or anything with the same method).
    """

    def read(incident_ids: list[str]) -> Mapping[str, Mapping[str, Any]]:
        return service.get_many_entity_states(incident_ids)

    return read


def write_incident_entity(
    handle: SupportsEntityWrites | None,
    incident_id: str,
    apply: Callable[[], Mapping[str, Any]],
    *,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> Mapping[str, Any]:
    """Perform an incident write through the entity handle.

    ``apply`` performs the real write in the incident service and returns the
    resulting reactive state (usually via :func:`to_incident_entity_state`).
    With a handle, the runtime runs ``apply`` serialised with every other write
    of the same incident, diffs it against the state it read before, and
    records and announces the change; an error from ``apply`` reaches the
    caller wrapped in :class:`runtime.ApplyError`. Without a handle (a service
    used on its own) the write still happens, it is simply not reactive.

    Args:
        handle: the ``incident`` entity handle, or ``None``.
        incident_id: the incident the write is for; the runtime's key.
        apply: performs the write and returns the new reactive state.
        actor: who made the write, recorded with the change.
        run_id: the run the write belongs to, if any.

    Returns:
        The new state: validated by the runtime when a handle is given, as
        ``apply`` returned it otherwise.
    """
    if handle is None:
        return apply()

    return handle.mutate(incident_id, _ignore_prev(apply), actor=actor, run_id=run_id)


def remove_incident_entity(
    handle: SupportsEntityWrites | None,
    incident_id: str,
    apply: Callable[[], object],
    *,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> None:
    """Delete an incident through the entity handle.

    ``apply`` performs the real delete in the incident service. With a handle,
    the runtime records a tombstone and announces it (no trigger fires for
    it); removing an incident the service does not hold is a no-op. Without a
    handle the delete still runs.

    Args:
        handle: the ``incident`` entity handle, or ``None``.
        incident_id: the incident to delete.
        apply: performs the delete; its return value is ignored.
        actor: who made the delete, recorded with the tombstone.
        run_id: the run the delete belongs to, if any.
    """
    if handle is None:
        apply()
        return

    def delete(_prev: State | None) -> None:
        apply()

    handle.remove(incident_id, delete, actor=actor, run_id=run_id)


def _ignore_prev(
    apply: Callable[[], Mapping[str, Any]],
) -> Callable[[State | None], Mapping[str, Any]]:
    def run(_prev: State | None) -> Mapping[str, Any]:
        return apply()

    return run
