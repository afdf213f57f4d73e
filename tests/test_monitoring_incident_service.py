"""The SQLite incident service: storage, links, batched reads and bad input."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitoring import (
    IncidentService,
    InvalidInputError,
    MonitoringError,
    NotFoundError,
)


@pytest.fixture
def service() -> Iterator[IncidentService]:
    with IncidentService() as svc:
        yield svc


def table_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read rows straight from the database file, bypassing the service."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_create_writes_one_incident_row_and_one_link_row_per_system(
    tmp_path: Path,
) -> None:
    path = tmp_path / "incidents.db"

    with IncidentService(path) as svc:
        svc.create_incident(
            "Checkout slow", severity="major", system_ids=["a", "b"], incident_id="i1"
        )

    assert table_rows(path, "SELECT id, status, severity FROM incidents") == [
        ("i1", "investigating", "major")
    ]
    assert table_rows(
        path, "SELECT incident_id, system_id FROM incident_systems ORDER BY system_id"
    ) == [("i1", "a"), ("i1", "b")]


def test_incidents_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "incidents.db"
    with IncidentService(path) as svc:
        svc.create_incident("Disk full", severity="critical", incident_id="i1")

    with IncidentService(path) as reopened:
        incident = reopened.get_incident("i1")

    assert incident is not None
    assert incident.title == "Disk full"
    assert incident.severity == "critical"


def test_create_generates_distinct_ids_when_none_is_given(
    service: IncidentService,
) -> None:
    first = service.create_incident("One", severity="minor")
    second = service.create_incident("Two", severity="minor")

    assert first.id.startswith("inc-")
    assert first.id != second.id


def test_create_drops_repeated_systems_and_keeps_the_given_order(
    service: IncidentService,
) -> None:
    incident = service.create_incident(
        "Slow", severity="minor", system_ids=["c", "a", "c", "b"]
    )

    assert incident.system_ids == ("c", "a", "b")


def test_entity_states_come_back_for_held_ids_only(service: IncidentService) -> None:
    service.create_incident("One", severity="minor", system_ids=["a"], incident_id="i1")
    service.create_incident("Two", severity="critical", incident_id="i2")

    states = service.get_many_entity_states(["i2", "missing", "i1"])

    assert states == {
        "i1": {"status": "investigating", "severity": "minor", "system_ids": ["a"]},
        "i2": {"status": "investigating", "severity": "critical", "system_ids": []},
    }


def test_entity_states_read_more_ids_than_one_query_binds(
    service: IncidentService,
) -> None:
    for n in range(1200):
        service.create_incident(
            f"n{n}", severity="minor", system_ids=[f"s{n}"], incident_id=f"i{n}"
        )

    states = service.get_many_entity_states([f"i{n}" for n in range(1200)])

    assert len(states) == 1200
    assert states["i1199"]["system_ids"] == ["s1199"]


def test_update_changes_only_the_fields_given(service: IncidentService) -> None:
    service.create_incident(
        "Slow", severity="minor", system_ids=["a"], description="x", incident_id="i1"
    )

    updated = service.update_incident("i1", severity="critical")

    assert updated.severity == "critical"
    assert updated.status == "investigating"
    assert updated.title == "Slow"
    assert updated.description == "x"
    assert updated.system_ids == ("a",)


def test_update_can_clear_the_description(service: IncidentService) -> None:
    service.create_incident("Slow", severity="minor", description="x", incident_id="i1")

    updated = service.update_incident("i1", description=None)

    assert updated.description is None


def test_update_replaces_every_system_link(service: IncidentService) -> None:
    service.create_incident(
        "Slow", severity="minor", system_ids=["a", "b"], incident_id="i1"
    )

    updated = service.update_incident("i1", system_ids=["c"])

    assert updated.system_ids == ("c",)
    assert service.incident_ids_for_system("a") == []


def test_resolve_stamps_resolved_at_and_reopen_clears_it(
    service: IncidentService,
) -> None:
    service.create_incident("Slow", severity="minor", incident_id="i1")

    resolved = service.resolve_incident("i1")
    reopened = service.update_incident("i1", status="investigating")

    assert resolved.status == "resolved"
    assert resolved.resolved_at is not None
    assert reopened.resolved_at is None


def test_link_and_unlink_are_idempotent(service: IncidentService) -> None:
    service.create_incident(
        "Slow", severity="minor", system_ids=["a"], incident_id="i1"
    )

    service.link_system("i1", "b")
    linked_twice = service.link_system("i1", "b")
    service.unlink_system("i1", "a")
    unlinked_twice = service.unlink_system("i1", "a")

    assert linked_twice.system_ids == ("a", "b")
    assert unlinked_twice.system_ids == ("b",)


def test_delete_removes_the_incident_and_its_links(service: IncidentService) -> None:
    service.create_incident(
        "Slow", severity="minor", system_ids=["a"], incident_id="i1"
    )

    existed = service.delete_incident("i1")
    again = service.delete_incident("i1")

    assert (existed, again) == (True, False)
    assert service.get_incident("i1") is None
    assert service.incident_ids_for_system("a") == []


def test_remove_system_associations_unlinks_the_system_everywhere(
    service: IncidentService,
) -> None:
    service.create_incident(
        "1", severity="minor", system_ids=["a", "b"], incident_id="i1"
    )
    service.create_incident("2", severity="minor", system_ids=["a"], incident_id="i2")
    service.create_incident("3", severity="minor", system_ids=["b"], incident_id="i3")

    affected = service.remove_system_associations("a")

    assert affected == ["i1", "i2"]
    assert service.get_many_entity_states(["i1", "i2", "i3"]) == {
        "i1": {"status": "investigating", "severity": "minor", "system_ids": ["b"]},
        "i2": {"status": "investigating", "severity": "minor", "system_ids": []},
        "i3": {"status": "investigating", "severity": "minor", "system_ids": ["b"]},
    }


def test_list_incidents_filters_by_system_and_open_status(
    service: IncidentService,
) -> None:
    service.create_incident("1", severity="minor", system_ids=["a"], incident_id="i1")
    service.create_incident("2", severity="minor", system_ids=["a"], incident_id="i2")
    service.create_incident("3", severity="minor", system_ids=["b"], incident_id="i3")
    service.resolve_incident("i2")

    of_a = service.list_incidents(system_id="a")
    open_of_a = service.list_incidents(system_id="a", include_resolved=False)

    assert [incident.id for incident in of_a] == ["i1", "i2"]
    assert [incident.id for incident in open_of_a] == ["i1"]
    assert len(service.list_incidents()) == 3


def test_concurrent_writers_on_many_threads_lose_no_link(
    service: IncidentService,
) -> None:
    service.create_incident("Shared", severity="minor", incident_id="i1")

    def link_many(worker: int) -> None:
        for n in range(50):
            service.link_system("i1", f"s{worker}-{n}")

    threads = [threading.Thread(target=link_many, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert len(service.get_many_entity_states(["i1"])["i1"]["system_ids"]) == 400


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda svc: svc.update_incident("i1", status="open"),
            InvalidInputError,
            r"^incident/i1: 'status' must be one of investigating, identified, "
            r"fixing, monitoring, resolved, got 'open'; nothing recorded$",
        ),
        (
            lambda svc: svc.update_incident("i1", severity="urgent"),
            InvalidInputError,
            r"^incident/i1: 'severity' must be one of minor, major, critical, "
            r"got 'urgent'; nothing recorded$",
        ),
        (
            lambda svc: svc.update_incident("i1", system_ids="b"),
            InvalidInputError,
            r"^incident/i1: 'system_ids' must be a list of system ids, "
            r"got 'b' \(str\); nothing recorded$",
        ),
        (
            lambda svc: svc.update_incident("i1", system_ids=["b", 7]),
            InvalidInputError,
            r"^incident/i1: 'system_ids\[1\]' must be a non-empty string",
        ),
        (
            lambda svc: svc.update_incident("i1", title=""),
            InvalidInputError,
            r"^incident/i1: 'title' must be a non-empty string",
        ),
        (
            lambda svc: svc.update_incident("nope", status="fixing"),
            NotFoundError,
            r"^incident/nope: no such incident; nothing recorded$",
        ),
        (
            lambda svc: svc.link_system("nope", "b"),
            NotFoundError,
            r"^incident/nope: no such incident",
        ),
        (
            lambda svc: svc.create_incident(
                "Again", severity="minor", incident_id="i1"
            ),
            InvalidInputError,
            r"^incident/i1: 'incident_id' is already taken",
        ),
        (
            lambda svc: svc.create_incident(
                "New", severity="minor", system_ids=["b"], status="done"
            ),
            InvalidInputError,
            r"'status' must be one of",
        ),
    ],
)
def test_bad_input_is_refused_by_name_and_nothing_changes(
    service: IncidentService, call: Any, error: type[Exception], message: str
) -> None:
    service.create_incident(
        "Slow", severity="major", system_ids=["a"], description="x", incident_id="i1"
    )
    before = service.list_incidents()

    with pytest.raises(error, match=message):
        call(service)

    assert service.list_incidents() == before
    assert service.incident_ids_for_system("b") == []


def test_service_errors_share_a_base_and_the_nearest_builtin() -> None:
    assert issubclass(InvalidInputError, MonitoringError)
    assert issubclass(InvalidInputError, ValueError)
    assert issubclass(NotFoundError, MonitoringError)
    assert issubclass(NotFoundError, LookupError)


def test_invalid_input_keeps_its_parts_as_attributes(
    service: IncidentService,
) -> None:
    service.create_incident("Slow", severity="major", incident_id="i1")

    with pytest.raises(InvalidInputError) as caught:
        service.update_incident("i1", severity="urgent")

    assert (caught.value.kind, caught.value.entity_id, caught.value.field) == (
        "incident",
        "i1",
        "severity",
    )
