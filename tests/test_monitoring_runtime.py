"""The monitoring kinds on a running runtime: wiring, serialisation, clean-up."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from monitoring_triggers import TriggerLog

from monitoring import (
    CATALOG_SYSTEM_KIND,
    CLEANUP_WORKER_GROUP,
    HEALTH_KIND,
    INCIDENT_KIND,
    INCIDENT_UPDATED,
    SYSTEM_DEGRADED,
    SYSTEM_HEALTH_CHANGED,
    HealthService,
    IncidentService,
    InvalidInputError,
    MonitoringHandles,
    NotFoundError,
    delete_catalog_system,
    install_monitoring,
    record_check_result,
    remove_incident_entity,
    save_catalog_system,
    to_incident_entity_state,
    write_incident_entity,
)
from runtime import (
    ApplyError,
    Runtime,
)


@dataclass
class Monitored:
    rt: Runtime
    handles: MonitoringHandles
    incidents: IncidentService
    health: HealthService
    triggers: TriggerLog


@contextlib.contextmanager
def run_monitoring(health: HealthService) -> Iterator[Monitored]:
    with IncidentService() as incidents:
        rt = Runtime()
        handles = install_monitoring(
            rt, incident_service=incidents, health_service=health
        )
        triggers = TriggerLog(rt)
        with rt:
            yield Monitored(rt, handles, incidents, health, triggers)


@pytest.fixture
def monitored() -> Iterator[Monitored]:
    with run_monitoring(HealthService()) as m:
        yield m


def open_incident(m: Monitored, incident_id: str, *systems: str) -> None:
    def create() -> dict[str, Any]:
        record = m.incidents.create_incident(
            f"Incident {incident_id}",
            severity="major",
            system_ids=list(systems),
            incident_id=incident_id,
        )
        return to_incident_entity_state(record)

    write_incident_entity(m.handles.incidents, incident_id, create)


def test_install_defines_three_kinds_and_declares_the_raw_results() -> None:
    with IncidentService() as incidents:
        rt = Runtime()

        install_monitoring(
            rt, incident_service=incidents, health_service=HealthService()
        )

        assert rt.kinds() == [INCIDENT_KIND, HEALTH_KIND, CATALOG_SYSTEM_KIND]
        assert [(s.name, s.reason) for s in rt.non_reactive_states()] == [
            ("health_check_results", "raw-sample")
        ]


def test_incident_writes_record_changes_and_fire_valid_triggers(
    monitored: Monitored,
) -> None:
    open_incident(monitored, "i1", "a")

    write_incident_entity(
        monitored.handles.incidents,
        "i1",
        lambda: to_incident_entity_state(
            monitored.incidents.update_incident("i1", status="fixing")
        ),
        actor="ana",
    )
    monitored.rt.drain()

    rows = monitored.handles.incidents.history("i1", field="status")
    assert [(row.before, row.after, row.actor) for row in rows] == [
        (None, "investigating", "system"),
        ("investigating", "fixing", "ana"),
    ]
    assert [event for event, _ in monitored.triggers.events()] == [
        "incident.created",
        "incident.updated",
    ]
    assert monitored.triggers.invalid == []


def test_a_title_only_edit_is_not_a_change_of_the_entity(
    monitored: Monitored,
) -> None:
    open_incident(monitored, "i1", "a")
    monitored.rt.drain()

    write_incident_entity(
        monitored.handles.incidents,
        "i1",
        lambda: to_incident_entity_state(
            monitored.incidents.update_incident("i1", title="Renamed")
        ),
    )
    monitored.rt.drain()

    record = monitored.incidents.get_incident("i1")
    assert record is not None
    assert record.title == "Renamed"
    assert len({row.seq for row in monitored.handles.incidents.history("i1")}) == 1
    assert len(monitored.triggers.events()) == 1


def test_deleting_an_incident_records_a_tombstone_and_fires_nothing(
    monitored: Monitored,
) -> None:
    open_incident(monitored, "i1", "a")

    remove_incident_entity(
        monitored.handles.incidents,
        "i1",
        lambda: monitored.incidents.delete_incident("i1"),
    )
    monitored.rt.drain()

    last = monitored.handles.incidents.history("i1")[-1]
    assert last.tombstone
    assert monitored.handles.incidents.get("i1") is None
    assert [event for event, _ in monitored.triggers.events()] == ["incident.created"]


@pytest.mark.parametrize(
    ("write", "cause", "message"),
    [
        (
            lambda svc: svc.update_incident("i1", status="open"),
            InvalidInputError,
            r"incident/i1: 'status' must be one of .*, got 'open'; nothing recorded",
        ),
        (
            lambda svc: svc.update_incident("i1", severity="urgent"),
            InvalidInputError,
            r"incident/i1: 'severity' must be one of minor, major, critical, "
            r"got 'urgent'",
        ),
        (
            lambda svc: svc.update_incident("i1", system_ids="b"),
            InvalidInputError,
            r"incident/i1: 'system_ids' must be a list of system ids",
        ),
        (
            lambda svc: svc.update_incident("i9", status="fixing"),
            NotFoundError,
            r"incident/i9: no such incident",
        ),
    ],
)
def test_bad_incident_input_reaches_the_caller_and_records_nothing(
    monitored: Monitored, write: Any, cause: type[Exception], message: str
) -> None:
    open_incident(monitored, "i1", "a")
    monitored.rt.drain()
    stored = monitored.incidents.list_incidents()
    target = "i9" if cause is NotFoundError else "i1"

    with pytest.raises(ApplyError, match=message) as caught:
        write_incident_entity(
            monitored.handles.incidents,
            target,
            lambda: to_incident_entity_state(write(monitored.incidents)),
        )
    monitored.rt.drain()

    assert isinstance(caught.value.error, cause)
    assert monitored.incidents.list_incidents() == stored
    assert len(monitored.handles.incidents.history("i1")) == 3
    assert monitored.handles.incidents.history("i9") == []
    assert len(monitored.triggers.events()) == 1


def test_first_failure_of_a_never_run_check_is_a_real_change(
    monitored: Monitored,
) -> None:
    monitored.health.add_check("sys-1", "ping")

    record_check_result(
        monitored.handles.health, monitored.health, "sys-1", "ping", False
    )
    monitored.rt.drain()

    (row,) = monitored.handles.health.history("sys-1", field="status")
    assert (row.before, row.after) == ("healthy", "unhealthy")
    assert [event for event, _ in monitored.triggers.events()] == [
        SYSTEM_DEGRADED,
        SYSTEM_HEALTH_CHANGED,
    ]


class GatedHealthService(HealthService):
    """Holds the first recorded result until released, and notes reads meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.first_write_started = threading.Event()
        self.release = threading.Event()
        self.read_during_first_write = threading.Event()
        self._gate = threading.Lock()
        self._gated = False

    def record_result(self, system_id: str, check_id: str, healthy: bool) -> None:
        with self._gate:
            first, self._gated = not self._gated, True
        if first:
            self.first_write_started.set()
            self.release.wait(timeout=5)
        super().record_result(system_id, check_id, healthy)

    def get_many_entity_states(self, system_ids: Any) -> dict[str, dict[str, Any]]:
        if self.first_write_started.is_set() and not self.release.is_set():
            self.read_during_first_write.set()
        return super().get_many_entity_states(system_ids)


def test_two_writers_failing_one_system_at_once_record_exactly_one_change() -> None:
    health = GatedHealthService()
    health.add_check("sys-1", "ping")
    health.add_check("sys-1", "http")

    with run_monitoring(health) as m:

        def fail(check_id: str) -> None:
            record_check_result(m.handles.health, health, "sys-1", check_id, False)

        first = threading.Thread(target=fail, args=("ping",))
        second = threading.Thread(target=fail, args=("http",))
        first.start()
        assert health.first_write_started.wait(timeout=5)
        second.start()
        # NOTE: the second writer gets a window in which, without per-id
        # serialisation, it would read the not-yet-changed health as prev.
        overlapped = health.read_during_first_write.wait(timeout=0.3)
        health.release.set()
        first.join(timeout=5)
        second.join(timeout=5)
        m.rt.drain()

        assert not overlapped
        assert m.handles.health.get("sys-1") == {
            "status": "unhealthy",
            "healthy_checks": 0,
            "total_checks": 2,
        }
        assert len({row.seq for row in m.handles.health.history("sys-1")}) == 1
        assert [event for event, _ in m.triggers.events()] == [
            SYSTEM_DEGRADED,
            SYSTEM_HEALTH_CHANGED,
        ]


def test_deleting_a_system_detaches_it_from_every_incident_once(
    monitored: Monitored,
) -> None:
    save_catalog_system(monitored.handles.catalog_systems, "a", name="A")
    open_incident(monitored, "i1", "a")
    open_incident(monitored, "i2", "b", "a")
    open_incident(monitored, "i3", "b")

    delete_catalog_system(monitored.handles.catalog_systems, "a")
    for incident_id in ("i1", "i2"):
        monitored.handles.incidents.wait_until(
            incident_id,
            lambda state: state is not None and "a" not in state["system_ids"],
            timeout=5,
        )
    monitored.rt.drain()

    assert monitored.incidents.incident_ids_for_system("a") == []
    assert monitored.handles.incidents.get_many(["i1", "i2", "i3"]) == {
        "i1": {"status": "investigating", "severity": "major", "system_ids": []},
        "i2": {"status": "investigating", "severity": "major", "system_ids": ["b"]},
        "i3": {"status": "investigating", "severity": "major", "system_ids": ["b"]},
    }
    updated = [
        payload["incident_id"]
        for event, payload in monitored.triggers.events()
        if event == INCIDENT_UPDATED
    ]
    assert sorted(updated) == ["i1", "i2"]
    assert monitored.rt.dead_letters(CLEANUP_WORKER_GROUP) == []


def test_catalog_updates_leave_incident_links_alone(monitored: Monitored) -> None:
    save_catalog_system(monitored.handles.catalog_systems, "a", name="A")
    open_incident(monitored, "i1", "a")

    save_catalog_system(monitored.handles.catalog_systems, "a", name="A", metadata={})
    save_catalog_system(monitored.handles.catalog_systems, "a", name="Renamed")
    monitored.rt.drain()

    assert monitored.incidents.incident_ids_for_system("a") == ["i1"]
    assert len({row.seq for row in monitored.handles.incidents.history("i1")}) == 1


def test_stopping_the_cleanup_leaves_links_of_later_deletions(
    monitored: Monitored,
) -> None:
    save_catalog_system(monitored.handles.catalog_systems, "a", name="A")
    open_incident(monitored, "i1", "a")

    monitored.handles.stop_cleanup()
    monitored.handles.stop_cleanup()
    delete_catalog_system(monitored.handles.catalog_systems, "a")
    monitored.rt.drain()

    assert monitored.incidents.incident_ids_for_system("a") == ["i1"]


def test_the_system_cleanup_runs_as_the_incident_system_cleanup_work_queue(
    monitored: Monitored,
) -> None:
    registry = monitored.rt.metrics_registry

    queue_depth = registry.get_sample_value(
        "entity_runtime_mailbox_depth",
        {"actor": "work_queue:catalog-system:incident-system-cleanup"},
    )
    broadcast_depths = [
        sample.labels["actor"]
        for metric in registry.collect()
        if metric.name == "entity_runtime_mailbox_depth"
        for sample in metric.samples
        if sample.labels["actor"].startswith("subscriber:catalog-system:")
    ]

    assert queue_depth == 0
    assert broadcast_depths == []
