"""The ``incident`` kind on its own: deriver, payloads, schema, projection, helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from monitoring import (
    INCIDENT_CREATED,
    INCIDENT_KIND,
    INCIDENT_RESOLVED,
    INCIDENT_TRIGGER_PAYLOADS,
    INCIDENT_UPDATED,
    Incident,
    IncidentCreatedPayload,
    IncidentResolvedPayload,
    IncidentState,
    IncidentUpdatedPayload,
    create_incident_read,
    derive_incident_events,
    incident_change_to_payload,
    remove_incident_entity,
    to_incident_entity_state,
    write_incident_entity,
)
from runtime import (
    SYSTEM_ACTOR,
    EntityChanged,
    ReadOnlyList,
    SchemaError,
    compile_schema,
    freeze,
    validate_value,
)

MONITORING = {"status": "monitoring", "severity": "major", "system_ids": ["a"]}
INVESTIGATING = {"status": "investigating", "severity": "major", "system_ids": ["a"]}


def incident_change(**overrides: Any) -> EntityChanged:
    """Build an ``incident`` change; by default a status move to monitoring."""
    fields: dict[str, Any] = {
        "kind": INCIDENT_KIND,
        "id": "inc-1",
        "prev": INVESTIGATING,
        "next": MONITORING,
    }
    fields.update(overrides)
    return EntityChanged(**fields)


class RecordingHandle:
    """A stand-in for an entity handle that runs ``apply`` and notes each call."""

    def __init__(self) -> None:
        self.mutations: list[tuple[str, Mapping[str, Any], str, str | None]] = []
        self.removals: list[tuple[str, str, str | None]] = []

    def mutate(
        self,
        entity_id: str,
        apply: Callable[[Any], Mapping[str, Any]],
        /,
        *,
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
    ) -> Mapping[str, Any]:
        next_state = apply(None)
        self.mutations.append((entity_id, next_state, actor, run_id))
        return next_state

    def remove(
        self,
        entity_id: str,
        apply: Callable[[Any], None] | None = None,
        /,
        *,
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
    ) -> None:
        if apply is not None:
            apply(None)
        self.removals.append((entity_id, actor, run_id))


# --- deriver -----------------------------------------------------------------


def test_create_fires_incident_created() -> None:
    change = incident_change(
        prev=None,
        next={"status": "investigating", "severity": "minor", "system_ids": ["a"]},
    )

    events = derive_incident_events(change)

    assert events == [INCIDENT_CREATED]


def test_move_into_resolved_fires_incident_resolved_only() -> None:
    change = incident_change(prev=MONITORING, next={**MONITORING, "status": "resolved"})

    events = derive_incident_events(change)

    assert events == [INCIDENT_RESOLVED]


def test_status_move_short_of_resolved_fires_incident_updated() -> None:
    change = incident_change()

    events = derive_incident_events(change)

    assert events == [INCIDENT_UPDATED]


def test_reopen_from_resolved_fires_incident_updated() -> None:
    change = incident_change(
        prev={**INVESTIGATING, "status": "resolved"}, next=INVESTIGATING
    )

    events = derive_incident_events(change)

    assert events == [INCIDENT_UPDATED]


def test_tombstone_fires_nothing() -> None:
    change = incident_change(next=None)

    events = derive_incident_events(change)

    assert events == []


def test_resolve_that_also_changes_severity_fires_incident_resolved_only() -> None:
    change = incident_change(
        prev=MONITORING,
        next={**MONITORING, "status": "resolved", "severity": "minor"},
    )

    events = derive_incident_events(change)

    assert events == [INCIDENT_RESOLVED]


def test_change_to_a_resolved_incident_that_stays_resolved_fires_updated() -> None:
    resolved = {**MONITORING, "status": "resolved"}
    change = incident_change(prev=resolved, next={**resolved, "system_ids": []})

    events = derive_incident_events(change)

    assert events == [INCIDENT_UPDATED]


# --- payload mapper and payload schemas --------------------------------------


def test_create_payload_validates_against_the_created_schema() -> None:
    change = incident_change(
        prev=None,
        next={"status": "investigating", "severity": "minor", "system_ids": ["a", "b"]},
    )

    payload = incident_change_to_payload(change)
    parsed = validate_value(IncidentCreatedPayload, payload, INCIDENT_CREATED)

    assert parsed["incident_id"] == "inc-1"
    assert parsed["status"] == "investigating"
    assert parsed["severity"] == "minor"
    assert parsed["system_ids"] == ["a", "b"]


def test_status_move_payload_validates_against_updated_schema_with_status_change() -> (
    None
):
    change = incident_change()

    payload = incident_change_to_payload(change)
    parsed = validate_value(IncidentUpdatedPayload, payload, INCIDENT_UPDATED)

    assert parsed["incident_id"] == "inc-1"
    assert parsed["status"] == "monitoring"
    assert parsed["status_change"] == "monitoring"


def test_resolve_payload_validates_against_the_resolved_schema() -> None:
    change = incident_change(prev=MONITORING, next={**MONITORING, "status": "resolved"})

    payload = incident_change_to_payload(change)
    parsed = validate_value(IncidentResolvedPayload, payload, INCIDENT_RESOLVED)

    assert parsed["incident_id"] == "inc-1"
    assert parsed["severity"] == "major"
    assert parsed["system_ids"] == ["a"]


def test_payload_leaves_out_status_change_when_status_did_not_change() -> None:
    change = incident_change(
        prev=MONITORING, next={**MONITORING, "severity": "critical"}
    )

    payload = incident_change_to_payload(change)

    assert change.changed_fields == ("severity",)
    assert "status_change" not in payload
    assert payload["severity"] == "critical"


def test_payload_has_an_empty_system_list_when_the_state_has_none() -> None:
    change = incident_change(next=None)

    payload = incident_change_to_payload(change)

    assert payload == {
        "incident_id": "inc-1",
        "system_ids": [],
        "severity": None,
        "status": None,
    }


def test_payload_system_ids_is_a_plain_list_detached_from_the_state() -> None:
    state = freeze(MONITORING)
    change = incident_change(prev=freeze(INVESTIGATING), next=state)

    payload = incident_change_to_payload(change)
    payload["system_ids"].append("b")

    assert type(payload["system_ids"]) is list
    assert isinstance(state["system_ids"], ReadOnlyList)
    assert state["system_ids"] == ["a"]


@pytest.mark.parametrize(
    ("prev", "next_state"),
    [
        (None, INVESTIGATING),
        (INVESTIGATING, MONITORING),
        (MONITORING, {**MONITORING, "severity": "critical"}),
        (MONITORING, {**MONITORING, "status": "resolved"}),
        ({**MONITORING, "status": "resolved"}, {**MONITORING, "status": "fixing"}),
        (MONITORING, {**MONITORING, "system_ids": []}),
    ],
)
def test_every_fired_trigger_gets_a_payload_its_schema_accepts(
    prev: dict[str, Any] | None, next_state: dict[str, Any]
) -> None:
    change = incident_change(prev=prev, next=next_state)

    events = derive_incident_events(change)
    payload = incident_change_to_payload(change)

    assert len(events) == 1
    validate_value(INCIDENT_TRIGGER_PAYLOADS[events[0]], payload, events[0])


def test_resolved_schema_rejects_a_payload_that_is_not_a_resolution() -> None:
    payload = incident_change_to_payload(incident_change())

    with pytest.raises(SchemaError, match=r"field 'status' must be one of 'resolved'"):
        validate_value(IncidentResolvedPayload, payload, INCIDENT_RESOLVED)


def test_created_schema_requires_a_status_change() -> None:
    payload = incident_change_to_payload(
        incident_change(prev=MONITORING, next={**MONITORING, "severity": "minor"})
    )

    with pytest.raises(SchemaError, match=r"field 'status_change' is missing"):
        validate_value(IncidentCreatedPayload, payload, INCIDENT_CREATED)


# --- state schema and projection ---------------------------------------------


def test_state_schema_accepts_the_reactive_subset() -> None:
    schema = compile_schema(IncidentState)

    state = schema.validate(
        {"status": "investigating", "severity": "critical", "system_ids": ["a", "b"]},
        INCIDENT_KIND,
        "inc-1",
    )

    assert state["system_ids"] == ["a", "b"]


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"status": "open", "severity": "minor", "system_ids": []}, "status"),
        ({"status": "fixing", "severity": "urgent", "system_ids": []}, "severity"),
        ({"status": "fixing", "severity": "minor", "system_ids": "a"}, "system_ids"),
        ({"status": "fixing", "severity": "minor", "system_ids": [1]}, "system_ids[0]"),
        ({"status": "fixing", "severity": "minor"}, "system_ids"),
    ],
)
def test_state_schema_rejects_a_bad_field_and_names_it(
    state: dict[str, Any], field: str
) -> None:
    schema = compile_schema(IncidentState)

    with pytest.raises(SchemaError) as caught:
        schema.validate(state, INCIDENT_KIND, "inc-1")

    assert caught.value.field == field
    assert str(caught.value).startswith(f"incident/inc-1: field '{field}'")


def test_projection_keeps_only_the_reactive_subset_of_a_record() -> None:
    record = {
        "status": "monitoring",
        "severity": "major",
        "system_ids": ["a", "b"],
        "title": "Checkout slow",
    }

    state = to_incident_entity_state(record)

    assert state == {
        "status": "monitoring",
        "severity": "major",
        "system_ids": ["a", "b"],
    }


def test_projection_of_a_service_incident_lists_its_systems_in_order() -> None:
    now = datetime.now(UTC)
    incident = Incident(
        id="inc-1",
        title="Checkout slow",
        description=None,
        status="fixing",
        severity="critical",
        system_ids=("b", "a"),
        created_at=now,
        updated_at=now,
        resolved_at=None,
    )

    state = to_incident_entity_state(incident)

    assert state == {
        "status": "fixing",
        "severity": "critical",
        "system_ids": ["b", "a"],
    }


# --- read and write helpers --------------------------------------------------


def test_read_passes_the_whole_batch_to_the_service_in_one_call() -> None:
    seen: list[list[str]] = []

    class FakeService:
        def get_many_entity_states(self, ids: Any) -> dict[str, dict[str, Any]]:
            seen.append(list(ids))
            return {
                "inc-1": {
                    "status": "investigating",
                    "severity": "minor",
                    "system_ids": ["a"],
                }
            }

    read = create_incident_read(FakeService())

    found = read(["inc-1", "inc-2"])

    assert seen == [["inc-1", "inc-2"]]
    assert found["inc-1"] == {
        "status": "investigating",
        "severity": "minor",
        "system_ids": ["a"],
    }
    assert "inc-2" not in found


def test_write_goes_through_handle_mutate_keyed_by_incident_id() -> None:
    handle = RecordingHandle()
    applied = []
    new_state = {"status": "monitoring", "severity": "critical", "system_ids": ["a"]}

    def apply() -> dict[str, Any]:
        applied.append(True)
        return new_state

    returned = write_incident_entity(handle, "inc-9", apply, run_id="run-7")

    assert applied == [True]
    assert handle.mutations == [("inc-9", new_state, SYSTEM_ACTOR, "run-7")]
    assert returned == new_state


def test_write_still_runs_when_no_handle_is_wired() -> None:
    applied = []

    def apply() -> dict[str, Any]:
        applied.append(True)
        return {"status": "investigating", "severity": "minor", "system_ids": []}

    returned = write_incident_entity(None, "inc-9", apply)

    assert applied == [True]
    assert returned["status"] == "investigating"


def test_remove_goes_through_handle_remove_and_runs_the_delete() -> None:
    handle = RecordingHandle()
    deleted = []

    remove_incident_entity(handle, "inc-9", lambda: deleted.append(True), actor="ana")

    assert deleted == [True]
    assert handle.removals == [("inc-9", "ana", None)]


def test_remove_still_runs_the_delete_when_no_handle_is_wired() -> None:
    deleted = []

    remove_incident_entity(None, "inc-9", lambda: deleted.append(True))

    assert deleted == [True]
