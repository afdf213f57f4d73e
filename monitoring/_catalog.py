from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from monitoring._handle import State, SupportsEntityWrites
from runtime import SYSTEM_ACTOR, EntityChanged, thaw

logger = logging.getLogger(__name__)

CATALOG_SYSTEM_KIND = "catalog-system"
"""The entity kind of a system in the catalog."""

CATALOG_CREATED = "catalog.created"
CATALOG_UPDATED = "catalog.updated"
CATALOG_DELETED = "catalog.deleted"


@dataclasses.dataclass(frozen=True)
class CatalogSystemState:
    """A catalog system: a name, an optional description and free metadata."""

    name: str
    description: str | None
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CatalogSystemPayload:
    """Payload of every catalog trigger.

    On ``catalog.deleted`` the fields describe the system as it was last.
    """

    system_id: str
    name: str
    description: str | None
    metadata: dict[str, Any]
    changed_fields: list[str]


CATALOG_TRIGGER_PAYLOADS: Mapping[str, type] = {
    CATALOG_CREATED: CatalogSystemPayload,
    CATALOG_UPDATED: CatalogSystemPayload,
    CATALOG_DELETED: CatalogSystemPayload,
}
"""The payload schema each catalog trigger declares, by trigger name."""


def derive_catalog_system_events(change: EntityChanged) -> list[str]:
    """Turn one ``catalog-system`` change into its trigger event.

    A create fires ``catalog.created``, a tombstone ``catalog.deleted`` and
    every other change ``catalog.updated``; exactly one event per change.

    Args:
        change: the committed change of one catalog system.
    """
    if change.is_create:
        return [CATALOG_CREATED]
    if change.is_tombstone:
        return [CATALOG_DELETED]
    return [CATALOG_UPDATED]


def catalog_system_change_to_payload(change: EntityChanged) -> dict[str, Any]:
    """Build the payload of a catalog trigger from the change behind it.

    Keys: ``system_id``, ``name``, ``description`` and ``metadata`` of the new
    state (of the last state on a tombstone) and ``changed_fields``.

    Returns:
        A new, mutable dict (``metadata`` a plain copy) that validates against
        :class:`CatalogSystemPayload`.
    """
    state = change.next if change.next is not None else change.prev or {}
    metadata = state.get("metadata") or {}

    return {
        "system_id": change.id,
        "name": state.get("name"),
        "description": state.get("description"),
        "metadata": thaw(dict(metadata)),
        "changed_fields": list(change.changed_fields),
    }


def save_catalog_system(
    handle: SupportsEntityWrites,
    system_id: str,
    *,
    name: str,
    description: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> Mapping[str, Any]:
    """Create a catalog system, or replace every field of an existing one.

    Saving the same values again is an unchanged write: nothing is recorded
    and no trigger fires.

    Args:
        handle: the ``catalog-system`` entity handle.
        system_id: the system's id.
        name: the system's name.
        description: a description, or ``None``.
        metadata: free JSON-compatible metadata; empty when ``None``.
        actor: who made the write, recorded with the change.
        run_id: the run the write belongs to, if any.

    Returns:
        The validated state as stored.

    Raises:
        runtime.SchemaError: a field has the wrong type; nothing recorded.
    """
    state = {
        "name": name,
        "description": description,
        "metadata": thaw(dict(metadata or {})),
    }

    def apply(_prev: State | None) -> Mapping[str, Any]:
        return state

    return handle.mutate(system_id, apply, actor=actor, run_id=run_id)


def delete_catalog_system(
    handle: SupportsEntityWrites,
    system_id: str,
    *,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> None:
    """Delete a catalog system; deleting an unknown system is a no-op."""
    handle.remove(system_id, None, actor=actor, run_id=run_id)
