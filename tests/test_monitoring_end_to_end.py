"""A system's life from creation to deletion, through health and an incident."""

from __future__ import annotations

import functools

from monitoring_triggers import TriggerLog

from monitoring import (
    HealthService,
    IncidentService,
    delete_catalog_system,
    evaluate_system,
    install_monitoring,
    record_check_result,
    save_catalog_system,
    to_incident_entity_state,
    write_incident_entity,
)
from runtime import Runtime

SHOP = {
    "system_id": "shop",
    "name": "Shop",
    "description": "The web shop",
    "metadata": {"team": "web"},
    "changed_fields": ["name", "description", "metadata"],
}
SHOP_DEGRADED = {
    "system_id": "shop",
    "previous_status": "healthy",
    "new_status": "degraded",
    "healthy_checks": 1,
    "total_checks": 2,
}


def test_system_lifecycle_fires_the_expected_triggers_in_order() -> None:
    health = HealthService()
    with IncidentService() as incidents:
        rt = Runtime()
        handles = install_monitoring(
            rt, incident_service=incidents, health_service=health
        )
        triggers = TriggerLog(rt)

        with rt:
            # The system is created and its two checks start out unrun.
            save_catalog_system(
                handles.catalog_systems,
                "shop",
                name="Shop",
                description="The web shop",
                metadata={"team": "web"},
            )
            for check_id in ("ping", "checkout"):
                evaluate_system(
                    handles.health,
                    health,
                    "shop",
                    functools.partial(health.add_check, "shop", check_id),
                )

            # One check passes, the other fails: the system degrades.
            record_check_result(handles.health, health, "shop", "ping", True)
            record_check_result(handles.health, health, "shop", "checkout", False)

            # An incident opens for it.
            write_incident_entity(
                handles.incidents,
                "inc-1",
                lambda: to_incident_entity_state(
                    incidents.create_incident(
                        "Checkout failing",
                        severity="major",
                        system_ids=["shop"],
                        incident_id="inc-1",
                    )
                ),
            )

            # The system is deleted; the clean-up detaches it from the incident.
            delete_catalog_system(handles.catalog_systems, "shop")
            handles.incidents.wait_until(
                "inc-1",
                lambda state: state is not None and state["system_ids"] == [],
                timeout=5,
            )

            # The incident is resolved.
            write_incident_entity(
                handles.incidents,
                "inc-1",
                lambda: to_incident_entity_state(incidents.resolve_incident("inc-1")),
                actor="ana",
            )
            rt.drain()

            events = triggers.events()
            links = handles.incidents.history("inc-1", field="system_ids")
            record = incidents.get_incident("inc-1")

    assert events == [
        ("catalog.created", SHOP),
        ("healthcheck.system_degraded", SHOP_DEGRADED),
        ("healthcheck.system_health_changed", SHOP_DEGRADED),
        (
            "incident.created",
            {
                "incident_id": "inc-1",
                "system_ids": ["shop"],
                "severity": "major",
                "status": "investigating",
                "status_change": "investigating",
            },
        ),
        ("catalog.deleted", SHOP),
        (
            "incident.updated",
            {
                "incident_id": "inc-1",
                "system_ids": [],
                "severity": "major",
                "status": "investigating",
            },
        ),
        (
            "incident.resolved",
            {
                "incident_id": "inc-1",
                "system_ids": [],
                "severity": "major",
                "status": "resolved",
                "status_change": "resolved",
            },
        ),
    ]
    assert triggers.invalid == []
    assert [(row.before, row.after, row.actor) for row in links] == [
        (None, ["shop"], "system"),
        (["shop"], [], "system"),
    ]
    assert record is not None
    assert record.system_ids == ()
    assert record.resolved_at is not None
