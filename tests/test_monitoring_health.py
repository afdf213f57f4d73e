"""The compute-on-read ``health`` kind: rule, service, deriver, payloads, helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from monitoring import (
    HEALTH_KIND,
    HEALTH_TRIGGER_PAYLOADS,
    SYSTEM_DEGRADED,
    SYSTEM_HEALTH_CHANGED,
    SYSTEM_HEALTHY,
    HealthService,
    HealthState,
    InvalidInputError,
    NotFoundError,
    SystemDegradedPayload,
    derive_health_events,
    evaluate_system,
    health_change_to_payload,
    record_check_result,
    remove_system_health,
)
from runtime import (
    SYSTEM_ACTOR,
    EntityChanged,
    SchemaError,
    compile_schema,
    validate_value,
)


def health(status: str, healthy: int = 0, total: int = 1) -> dict[str, Any]:
    return {"status": status, "healthy_checks": healthy, "total_checks": total}


def health_change(prev: Any, next_state: Any) -> EntityChanged:
    return EntityChanged(kind=HEALTH_KIND, id="sys-1", prev=prev, next=next_state)


class PluginHandle:
    """A stand-in for a plugin-backed handle: reads ``prev``, applies, diffs."""

    def __init__(self, read: Callable[[list[str]], Mapping[str, Any]]) -> None:
        self.read = read
        self.changes: list[tuple[str, Any, Any]] = []

    def mutate(
        self,
        entity_id: str,
        apply: Callable[[Any], Mapping[str, Any]],
        /,
        *,
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
    ) -> Mapping[str, Any]:
        prev = self.read([entity_id]).get(entity_id)
        next_state = apply(prev)
        if next_state != prev:
            self.changes.append((entity_id, prev, next_state))
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
        prev = self.read([entity_id]).get(entity_id)
        if prev is None:
            return
        if apply is not None:
            apply(prev)
        self.changes.append((entity_id, prev, None))


@pytest.fixture
def service() -> HealthService:
    svc = HealthService()
    svc.add_check("sys-1", "ping")
    svc.add_check("sys-1", "http")
    return svc


# --- the health rule ---------------------------------------------------------


def test_system_whose_checks_have_not_run_reads_as_healthy() -> None:
    svc = HealthService()
    svc.add_check("sys-1", "ping")

    states = svc.get_many_entity_states(["sys-1"])

    assert states == {"sys-1": health("healthy", 0, 1)}


def test_one_failing_check_of_two_reads_as_degraded(service: HealthService) -> None:
    service.record_result("sys-1", "ping", True)
    service.record_result("sys-1", "http", False)

    state = service.compute_state("sys-1")

    assert state == health("degraded", 1, 2)


def test_every_reporting_check_failing_reads_as_unhealthy(
    service: HealthService,
) -> None:
    service.record_result("sys-1", "http", False)

    state = service.compute_state("sys-1")

    assert state == health("unhealthy", 0, 2)


def test_only_the_latest_result_of_a_check_counts(service: HealthService) -> None:
    service.record_result("sys-1", "http", False)
    service.record_result("sys-1", "http", True)

    state = service.compute_state("sys-1")

    assert state == health("healthy", 1, 2)


def test_a_disabled_check_is_not_counted(service: HealthService) -> None:
    service.record_result("sys-1", "ping", True)
    service.record_result("sys-1", "http", False)

    service.set_check_enabled("sys-1", "http", False)

    assert service.compute_state("sys-1") == health("healthy", 1, 1)


def test_a_system_with_no_enabled_check_reads_as_healthy_with_zero_counts(
    service: HealthService,
) -> None:
    service.set_check_enabled("sys-1", "ping", False)
    service.remove_check("sys-1", "http")

    state = service.compute_state("sys-1")

    assert state == health("healthy", 0, 0)


def test_unknown_and_removed_systems_are_missing_from_the_read(
    service: HealthService,
) -> None:
    service.add_check("sys-2", "ping")

    service.remove_system("sys-2")

    assert set(service.get_many_entity_states(["sys-1", "sys-2", "sys-3"])) == {"sys-1"}
    assert service.system_ids() == ["sys-1"]


def test_computed_states_satisfy_the_state_schema(service: HealthService) -> None:
    service.record_result("sys-1", "http", False)

    state = service.compute_state("sys-1")
    validated = compile_schema(HealthState).validate(state, HEALTH_KIND, "sys-1")

    assert validated == health("unhealthy", 0, 2)


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda svc: svc.record_result("sys-9", "ping", False),
            NotFoundError,
            r"^health/sys-9: no such system; nothing recorded$",
        ),
        (
            lambda svc: svc.record_result("sys-1", "dns", False),
            NotFoundError,
            r"^health/sys-1: no check 'dns'; nothing recorded$",
        ),
        (
            lambda svc: svc.record_result("sys-1", "ping", "down"),
            InvalidInputError,
            r"^health/sys-1: 'healthy' must be True or False, got 'down' \(str\)",
        ),
        (
            lambda svc: svc.add_check("sys-1", "ping"),
            InvalidInputError,
            r"^health/sys-1: 'check_id' 'ping' already exists",
        ),
        (
            lambda svc: svc.add_check("sys-1", ""),
            InvalidInputError,
            r"^health/sys-1: 'check_id' must be a non-empty string",
        ),
        (
            lambda svc: svc.set_check_enabled("sys-1", "ping", 0),
            InvalidInputError,
            r"^health/sys-1: 'enabled' must be True or False",
        ),
    ],
)
def test_bad_input_is_refused_by_name_and_the_health_stays(
    service: HealthService, call: Any, error: type[Exception], message: str
) -> None:
    service.record_result("sys-1", "ping", True)
    before = service.get_many_entity_states(["sys-1", "sys-9"])

    with pytest.raises(error, match=message):
        call(service)

    assert service.get_many_entity_states(["sys-1", "sys-9"]) == before


# --- deriver -----------------------------------------------------------------


@pytest.mark.parametrize("before", ["degraded", "unhealthy"])
def test_recovery_fires_system_healthy_and_health_changed(before: str) -> None:
    change = health_change(health(before), health("healthy", 1))

    events = derive_health_events(change)

    assert events == [SYSTEM_HEALTHY, SYSTEM_HEALTH_CHANGED]


@pytest.mark.parametrize("after", ["degraded", "unhealthy"])
def test_leaving_healthy_fires_system_degraded_and_health_changed(after: str) -> None:
    change = health_change(health("healthy", 1), health(after))

    events = derive_health_events(change)

    assert events == [SYSTEM_DEGRADED, SYSTEM_HEALTH_CHANGED]


@pytest.mark.parametrize(
    ("before", "after"), [("degraded", "unhealthy"), ("unhealthy", "degraded")]
)
def test_move_between_unhealthy_statuses_fires_only_health_changed(
    before: str, after: str
) -> None:
    change = health_change(health(before, 1, 3), health(after, 1, 3))

    events = derive_health_events(change)

    assert events == [SYSTEM_HEALTH_CHANGED]


def test_count_change_without_a_status_move_fires_nothing() -> None:
    change = health_change(health("healthy", 0, 1), health("healthy", 1, 1))

    events = derive_health_events(change)

    assert events == []


@pytest.mark.parametrize(
    ("prev", "next_state"), [(None, health("healthy")), (health("unhealthy"), None)]
)
def test_create_and_tombstone_fire_nothing(prev: Any, next_state: Any) -> None:
    change = health_change(prev, next_state)

    events = derive_health_events(change)

    assert events == []


# --- payload -----------------------------------------------------------------


def test_payload_names_the_system_both_statuses_and_the_counts() -> None:
    change = health_change(health("healthy", 2, 2), health("degraded", 1, 2))

    payload = health_change_to_payload(change)

    assert payload == {
        "system_id": "sys-1",
        "previous_status": "healthy",
        "new_status": "degraded",
        "healthy_checks": 1,
        "total_checks": 2,
    }


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("healthy", "degraded"),
        ("healthy", "unhealthy"),
        ("degraded", "healthy"),
        ("unhealthy", "healthy"),
        ("degraded", "unhealthy"),
        ("unhealthy", "degraded"),
    ],
)
def test_every_fired_trigger_gets_a_payload_its_schema_accepts(
    before: str, after: str
) -> None:
    change = health_change(health(before, 1, 2), health(after, 1, 2))

    payload = health_change_to_payload(change)

    for event in derive_health_events(change):
        validate_value(HEALTH_TRIGGER_PAYLOADS[event], payload, event)


def test_degraded_schema_rejects_a_recovery_payload() -> None:
    payload = health_change_to_payload(
        health_change(health("unhealthy"), health("healthy", 1))
    )

    with pytest.raises(SchemaError, match=r"field 'previous_status' must be one of"):
        validate_value(SystemDegradedPayload, payload, SYSTEM_DEGRADED)


# --- write helpers -----------------------------------------------------------


def test_recording_a_result_diffs_against_the_health_before_it(
    service: HealthService,
) -> None:
    handle = PluginHandle(service.get_many_entity_states)

    returned = record_check_result(handle, service, "sys-1", "http", False)

    assert returned == health("unhealthy", 0, 2)
    assert handle.changes == [
        ("sys-1", health("healthy", 0, 2), health("unhealthy", 0, 2))
    ]


def test_a_result_recorded_outside_the_helper_is_invisible_to_the_diff(
    service: HealthService,
) -> None:
    handle = PluginHandle(service.get_many_entity_states)
    service.record_result("sys-1", "http", False)

    evaluate_system(handle, service, "sys-1")

    assert handle.changes == []


def test_first_check_of_a_new_system_creates_its_health_entity() -> None:
    svc = HealthService()
    handle = PluginHandle(svc.get_many_entity_states)

    evaluate_system(handle, svc, "sys-2", lambda: svc.add_check("sys-2", "ping"))

    assert handle.changes == [("sys-2", None, health("healthy", 0, 1))]


def test_evaluating_an_unknown_system_raises_and_records_nothing() -> None:
    svc = HealthService()
    handle = PluginHandle(svc.get_many_entity_states)

    with pytest.raises(NotFoundError, match=r"^health/sys-9: no such system"):
        evaluate_system(handle, svc, "sys-9")

    assert handle.changes == []


def test_helpers_still_write_when_no_handle_is_wired(service: HealthService) -> None:
    returned = record_check_result(None, service, "sys-1", "ping", False)
    remove_system_health(None, service, "sys-1")

    assert returned == health("unhealthy", 0, 2)
    assert service.system_ids() == []


def test_removing_a_system_records_the_end_of_its_health(
    service: HealthService,
) -> None:
    handle = PluginHandle(service.get_many_entity_states)

    remove_system_health(handle, service, "sys-1")
    remove_system_health(handle, service, "sys-1")

    assert handle.changes == [("sys-1", health("healthy", 0, 2), None)]
    assert service.compute_state("sys-1") is None
