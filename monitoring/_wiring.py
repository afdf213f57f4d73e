from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from monitoring._catalog import (
    CATALOG_SYSTEM_KIND,
    CatalogSystemState,
    catalog_system_change_to_payload,
    derive_catalog_system_events,
)
from monitoring._errors import NotFoundError
from monitoring._handle import SupportsEntityWrites
from monitoring._health import (
    HEALTH_KIND,
    HealthService,
    HealthState,
    derive_health_events,
    health_change_to_payload,
)
from monitoring._incident import (
    INCIDENT_KIND,
    IncidentState,
    create_incident_read,
    derive_incident_events,
    incident_change_to_payload,
    to_incident_entity_state,
    write_incident_entity,
)
from monitoring._incident_service import IncidentService
from runtime import (
    SYSTEM_ACTOR,
    ApplyError,
    EntityChanged,
    EntityHandle,
    Runtime,
    Unsubscribe,
    work_queue,
)

logger = logging.getLogger(__name__)

CLEANUP_WORKER_GROUP = "incident-system-cleanup"
"""The work-queue group that detaches deleted systems from incidents."""


@dataclasses.dataclass(frozen=True)
class MonitoringHandles:
    """The entity handles :func:`install_monitoring` defined.

    Attributes:
        incidents: the plugin-backed ``incident`` handle.
        health: the compute-on-read ``health`` handle.
        catalog_systems: the store-backed ``catalog-system`` handle.
        stop_cleanup: unsubscribes the system clean-up; calling it twice is
            harmless.
    """

    incidents: EntityHandle[Any]
    health: EntityHandle[Any]
    catalog_systems: EntityHandle[Any]
    stop_cleanup: Unsubscribe


def detach_system_from_incidents(
    handle: SupportsEntityWrites | None,
    service: IncidentService,
    system_id: str,
    *,
    actor: str = SYSTEM_ACTOR,
    run_id: str | None = None,
) -> list[str]:
    """Remove one system from every incident that lists it, one write each.

    Each incident is unlinked through the ``incident`` handle, so each records
    its own change and fires ``incident.updated``. An incident deleted
    meanwhile is skipped; one that already lost the link is an unchanged
    write. Running it again for the same system does nothing.

    Args:
        handle: the ``incident`` entity handle, or ``None``.
        service: the incident service holding the links.
        system_id: the system to detach.
        actor: recorded with each incident's change.
        run_id: the run the clean-up belongs to, if any.

    Returns:
        The ids of the incidents that were linked and still exist, sorted.
    """
    detached = []

    for incident_id in service.incident_ids_for_system(system_id):

        def unlink(incident_id: str = incident_id) -> dict[str, Any]:
            return to_incident_entity_state(
                service.unlink_system(incident_id, system_id)
            )

        try:
            write_incident_entity(
                handle, incident_id, unlink, actor=actor, run_id=run_id
            )
        except (ApplyError, NotFoundError) as err:
            cause = err.error if isinstance(err, ApplyError) else err
            if not isinstance(cause, NotFoundError):
                raise
            logger.debug(
                "%s/%s: deleted before system %r was detached; skipped",
                INCIDENT_KIND,
                incident_id,
                system_id,
            )
            continue
        detached.append(incident_id)

    logger.debug("detached system %r from %d incident(s)", system_id, len(detached))
    return detached


def make_system_cleanup_handler(
    incidents: SupportsEntityWrites | None, service: IncidentService
) -> Callable[[EntityChanged], None]:
    """Return the ``catalog-system`` subscriber that detaches deleted systems.

    The handler acts on tombstones only and ignores every other change. It is
    idempotent, so a retried delivery does no harm.
    """

    def on_catalog_system_changed(change: EntityChanged) -> None:
        if not change.is_tombstone:
            return

        logger.debug(
            "%s/%s: deleted at seq %d; detaching it from incidents",
            change.kind,
            change.id,
            change.seq,
        )
        detach_system_from_incidents(
            incidents, service, change.id, run_id=change.run_id
        )

    return on_catalog_system_changed


def install_monitoring(
    rt: Runtime,
    *,
    incident_service: IncidentService,
    health_service: HealthService,
) -> MonitoringHandles:
    """Define the monitoring kinds on a runtime and wire their reactions.

    Defines ``incident`` (plugin-backed, read from ``incident_service``),
    ``health`` (computed on read from ``health_service``) and
    ``catalog-system`` (kept by the runtime); registers each kind's deriver
    and payload mapper; declares the raw check results as non-reactive state;
    and subscribes the system clean-up to ``catalog-system`` changes as the
    ``incident-system-cleanup`` work queue, so each deletion is cleaned up
    once across every runtime sharing that group.

    Call it once per runtime, before ``start()``.

    Raises:
        runtime.DefinitionError: one of the kinds is already defined.
    """
    incidents = rt.define_entity(
        INCIDENT_KIND, IncidentState, read=create_incident_read(incident_service)
    )
    health = rt.define_entity(
        HEALTH_KIND, HealthState, read=health_service.get_many_entity_states
    )
    catalog_systems = rt.define_entity(CATALOG_SYSTEM_KIND, CatalogSystemState)

    rt.declare_non_reactive_state(
        "health_check_results",
        reason="raw-sample",
        note="each check's latest outcome; only the per-system summary is reactive",
    )

    rt.register_change_deriver(
        INCIDENT_KIND, derive_incident_events, to_payload=incident_change_to_payload
    )
    rt.register_change_deriver(
        HEALTH_KIND, derive_health_events, to_payload=health_change_to_payload
    )
    rt.register_change_deriver(
        CATALOG_SYSTEM_KIND,
        derive_catalog_system_events,
        to_payload=catalog_system_change_to_payload,
    )

    stop_cleanup = rt.on_entity_changed(
        CATALOG_SYSTEM_KIND,
        make_system_cleanup_handler(incidents, incident_service),
        delivery=work_queue(CLEANUP_WORKER_GROUP),
    )
    return MonitoringHandles(incidents, health, catalog_systems, stop_cleanup)
