"""The ``catalog-system`` kind and the clean-up it drives on the incident side."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from monitoring import (
    CATALOG_CREATED,
    CATALOG_DELETED,
    CATALOG_SYSTEM_KIND,
    CATALOG_TRIGGER_PAYLOADS,
    CATALOG_UPDATED,
    CatalogSystemState,
    IncidentService,
    catalog_system_change_to_payload,
    delete_catalog_system,
    derive_catalog_system_events,
    detach_system_from_incidents,
    make_system_cleanup_handler,
    save_catalog_system,
)
from runtime import (
    SYSTEM_ACTOR,
    EntityChanged,
    SchemaError,
    compile_schema,
    freeze,
    validate_value,
)

SHOP = {"name": "Shop", "description": None, "metadata": {"team": "web"}}


def catalog_change(prev: Any, next_state: Any, **extra: Any) -> EntityChanged:
    return EntityChanged(
        kind=CATALOG_SYSTEM_KIND, id="sys-1", prev=prev, next=next_state, **extra
    )


class RecordingHandle:
    """A stand-in for an entity handle that runs ``apply`` and notes each call."""

    def __init__(self) -> None:
        self.mutations: list[tuple[str, Mapping[str, Any]]] = []
        self.removals: list[str] = []

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
        self.mutations.append((entity_id, next_state))
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
        self.removals.append(entity_id)


@pytest.fixture
def incidents() -> Iterator[IncidentService]:
    with IncidentService() as svc:
        svc.create_incident(
            "1", severity="major", system_ids=["sys-1"], incident_id="i1"
        )
        svc.create_incident(
            "2", severity="minor", system_ids=["sys-2", "sys-1"], incident_id="i2"
        )
        svc.create_incident(
            "3", severity="minor", system_ids=["sys-2"], incident_id="i3"
        )
        yield svc


# --- state schema ------------------------------------------------------------


def test_state_allows_a_null_description_and_nested_metadata() -> None:
    schema = compile_schema(CatalogSystemState)

    state = schema.validate(
        {"name": "Shop", "description": None, "metadata": {"tags": ["a"], "tier": 1}},
        CATALOG_SYSTEM_KIND,
        "sys-1",
    )

    assert state["description"] is None
    assert state["metadata"] == {"tags": ["a"], "tier": 1}


def test_state_refuses_metadata_that_is_not_a_mapping() -> None:
    schema = compile_schema(CatalogSystemState)

    with pytest.raises(SchemaError, match=r"field 'metadata' must be a mapping"):
        schema.validate(
            {"name": "Shop", "description": None, "metadata": ["team"]},
            CATALOG_SYSTEM_KIND,
            "sys-1",
        )


# --- deriver and payload -----------------------------------------------------


@pytest.mark.parametrize(
    ("prev", "next_state", "event"),
    [
        (None, SHOP, CATALOG_CREATED),
        (SHOP, {**SHOP, "description": "The shop"}, CATALOG_UPDATED),
        (SHOP, None, CATALOG_DELETED),
    ],
)
def test_each_change_fires_exactly_one_catalog_event(
    prev: Any, next_state: Any, event: str
) -> None:
    change = catalog_change(prev, next_state)

    events = derive_catalog_system_events(change)

    assert events == [event]


def test_update_payload_carries_the_new_state_and_what_changed() -> None:
    change = catalog_change(SHOP, {**SHOP, "name": "Store"})

    payload = catalog_system_change_to_payload(change)

    assert payload == {
        "system_id": "sys-1",
        "name": "Store",
        "description": None,
        "metadata": {"team": "web"},
        "changed_fields": ["name"],
    }


def test_delete_payload_describes_the_system_as_it_was_last() -> None:
    change = catalog_change(SHOP, None)

    payload = catalog_system_change_to_payload(change)

    assert payload["name"] == "Shop"
    assert payload["changed_fields"] == ["name", "description", "metadata"]


def test_payload_metadata_is_a_plain_copy_of_the_state() -> None:
    state = freeze(SHOP)
    change = catalog_change(None, state)

    payload = catalog_system_change_to_payload(change)
    payload["metadata"]["team"] = "ops"

    assert state["metadata"]["team"] == "web"


@pytest.mark.parametrize(
    ("prev", "next_state"),
    [(None, SHOP), (SHOP, {**SHOP, "metadata": {}}), (SHOP, None)],
)
def test_every_fired_trigger_gets_a_payload_its_schema_accepts(
    prev: Any, next_state: Any
) -> None:
    change = catalog_change(prev, next_state)

    (event,) = derive_catalog_system_events(change)
    payload = catalog_system_change_to_payload(change)

    assert validate_value(CATALOG_TRIGGER_PAYLOADS[event], payload, event)["name"]


# --- write helpers -----------------------------------------------------------


def test_save_writes_every_field_with_empty_metadata_by_default() -> None:
    handle = RecordingHandle()

    save_catalog_system(handle, "sys-1", name="Shop")

    assert handle.mutations == [
        ("sys-1", {"name": "Shop", "description": None, "metadata": {}})
    ]


def test_delete_removes_through_the_handle() -> None:
    handle = RecordingHandle()

    delete_catalog_system(handle, "sys-1")

    assert handle.removals == ["sys-1"]


# --- clean-up of deleted systems ---------------------------------------------


def test_cleanup_ignores_creates_and_updates(incidents: IncidentService) -> None:
    handle = RecordingHandle()
    on_change = make_system_cleanup_handler(handle, incidents)

    on_change(catalog_change(None, SHOP))
    on_change(catalog_change(SHOP, {**SHOP, "name": "Store"}))

    assert handle.mutations == []
    assert incidents.incident_ids_for_system("sys-1") == ["i1", "i2"]


def test_cleanup_detaches_a_deleted_system_through_the_incident_handle(
    incidents: IncidentService,
) -> None:
    handle = RecordingHandle()
    on_change = make_system_cleanup_handler(handle, incidents)

    on_change(catalog_change(SHOP, None))

    assert handle.mutations == [
        ("i1", {"status": "investigating", "severity": "major", "system_ids": []}),
        (
            "i2",
            {"status": "investigating", "severity": "minor", "system_ids": ["sys-2"]},
        ),
    ]
    assert incidents.incident_ids_for_system("sys-1") == []
    assert incidents.incident_ids_for_system("sys-2") == ["i2", "i3"]


def test_cleanup_run_twice_changes_nothing_the_second_time(
    incidents: IncidentService,
) -> None:
    first = detach_system_from_incidents(None, incidents, "sys-1")

    second = detach_system_from_incidents(None, incidents, "sys-1")

    assert first == ["i1", "i2"]
    assert second == []


def test_cleanup_skips_an_incident_deleted_before_its_turn(
    incidents: IncidentService,
) -> None:
    class DeletingHandle(RecordingHandle):
        """Deletes ``i1`` just before its unlink, as a concurrent user might."""

        def mutate(self, entity_id: str, apply: Any, /, **kwargs: Any) -> Any:
            if entity_id == "i1":
                incidents.delete_incident("i1")
            return super().mutate(entity_id, apply, **kwargs)

    detached = detach_system_from_incidents(DeletingHandle(), incidents, "sys-1")

    assert detached == ["i2"]
    assert incidents.incident_ids_for_system("sys-1") == []
