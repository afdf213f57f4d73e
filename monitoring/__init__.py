"""Monitoring entities on the reactive runtime: incidents, health, catalog systems.

Three kinds, one per way a kind can keep its state:

- ``incident`` is plugin-backed: :class:`IncidentService` keeps incidents and
  their system links in SQLite, and the runtime reads the reactive subset
  (``status``, ``severity``, ``system_ids``) from it. Writes go through
  :func:`write_incident_entity` and :func:`remove_incident_entity`, whose
  ``apply`` performs the real database write.
- ``health`` is computed on read: :class:`HealthService` holds each system's
  checks and their latest results, and a system's ``status``,
  ``healthy_checks`` and ``total_checks`` are derived from them on every read.
  Writes go through :func:`evaluate_system` and :func:`record_check_result`.
- ``catalog-system`` is store-backed: the runtime keeps ``name``,
  ``description`` and ``metadata`` itself.

Each kind has a pure deriver (``derive_*_events``) that names the trigger
events a change fires, a payload mapper, and a payload schema per trigger
(``*_TRIGGER_PAYLOADS``, dataclasses for :func:`runtime.validate_value`).
:func:`install_monitoring` defines the three kinds on a runtime, registers
the derivers and subscribes the clean-up that detaches a deleted catalog
system from every incident (work queue ``incident-system-cleanup``).

:class:`Agent` is the monitoring agent built on these kinds: it turns metric
samples (this machine, Prometheus endpoints, recorded series) into ``check``
entities, computes each system's ``health`` from its checks, and opens and
resolves incidents through :class:`IncidentAutomation`; ``entity-runtime
agent`` runs it.

Errors raised on purpose derive from :class:`MonitoringError`; a write that
raises one has written nothing. Raised inside a runtime ``apply`` they reach
the caller wrapped in :class:`runtime.ApplyError` (the original is its
``error``).

Limitations:
    - A health write made on :class:`HealthService` directly, outside
      :func:`evaluate_system`, is never recorded as a change: the runtime
      reads health from the service, so the next evaluation already sees it
      as ``prev``.
    - Only the latest result of each check is kept; the results themselves
      are declared non-reactive (``raw-sample``), not logged.
    - Deleting a catalog system detaches it from incidents but leaves its
      checks and ``health`` entity; use :func:`remove_system_health`.
    - Detaching a system writes each incident separately, not in one
      transaction; if the clean-up stops midway, the work queue's retry
      finishes it, and already detached incidents are unchanged writes.
    - An incident's title, description and timestamps live only in the
      service; changing them alone records nothing and fires nothing.
"""

from __future__ import annotations

import logging

from monitoring._agent import Agent, AgentStats, AgentSummary, RecordClock
from monitoring._agent_checks import (
    CHECK_KIND,
    CheckState,
    expire_check,
    new_check_state,
    step_check,
    summarise_checks,
)
from monitoring._agent_cli import add_agent_parser, run_agent
from monitoring._agent_config import (
    DEFAULT_CONFIG_TOML,
    AgentConfig,
    AgentConfigError,
    CheckRule,
    load_agent_config,
    parse_duration,
)
from monitoring._agent_incidents import (
    AUTOMATION_WORKER_GROUP,
    IncidentAutomation,
    OpenIncident,
)
from monitoring._agent_report import IncidentRecord, LabelScore, StatusChange
from monitoring._agent_sources import (
    Batch,
    HostSource,
    ReplaySource,
    Sample,
    ScrapeSource,
    Selector,
    SelectorError,
    SeriesFile,
    Source,
    load_label_windows,
    make_check_id,
    parse_exposition,
    parse_timestamp,
    read_series_file,
)
from monitoring._catalog import (
    CATALOG_CREATED,
    CATALOG_DELETED,
    CATALOG_SYSTEM_KIND,
    CATALOG_TRIGGER_PAYLOADS,
    CATALOG_UPDATED,
    CatalogSystemPayload,
    CatalogSystemState,
    catalog_system_change_to_payload,
    delete_catalog_system,
    derive_catalog_system_events,
    save_catalog_system,
)
from monitoring._errors import InvalidInputError, MonitoringError, NotFoundError
from monitoring._handle import SupportsEntityWrites
from monitoring._health import (
    HEALTH_KIND,
    HEALTH_STATUSES,
    HEALTH_TRIGGER_PAYLOADS,
    SYSTEM_DEGRADED,
    SYSTEM_HEALTH_CHANGED,
    SYSTEM_HEALTHY,
    HealthService,
    HealthState,
    HealthStatus,
    SystemDegradedPayload,
    SystemHealthChangedPayload,
    SystemHealthyPayload,
    derive_health_events,
    evaluate_system,
    health_change_to_payload,
    record_check_result,
    remove_system_health,
)
from monitoring._incident import (
    INCIDENT_CREATED,
    INCIDENT_KIND,
    INCIDENT_RESOLVED,
    INCIDENT_SEVERITIES,
    INCIDENT_STATUSES,
    INCIDENT_TRIGGER_PAYLOADS,
    INCIDENT_UPDATED,
    IncidentCreatedPayload,
    IncidentResolvedPayload,
    IncidentSeverity,
    IncidentState,
    IncidentStatus,
    IncidentUpdatedPayload,
    create_incident_read,
    derive_incident_events,
    incident_change_to_payload,
    remove_incident_entity,
    to_incident_entity_state,
    write_incident_entity,
)
from monitoring._incident_service import KEEP, Incident, IncidentService
from monitoring._wiring import (
    CLEANUP_WORKER_GROUP,
    MonitoringHandles,
    detach_system_from_incidents,
    install_monitoring,
    make_system_cleanup_handler,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AUTOMATION_WORKER_GROUP",
    "CATALOG_CREATED",
    "CATALOG_DELETED",
    "CATALOG_SYSTEM_KIND",
    "CATALOG_TRIGGER_PAYLOADS",
    "CATALOG_UPDATED",
    "CHECK_KIND",
    "CLEANUP_WORKER_GROUP",
    "DEFAULT_CONFIG_TOML",
    "HEALTH_KIND",
    "HEALTH_STATUSES",
    "HEALTH_TRIGGER_PAYLOADS",
    "INCIDENT_CREATED",
    "INCIDENT_KIND",
    "INCIDENT_RESOLVED",
    "INCIDENT_SEVERITIES",
    "INCIDENT_STATUSES",
    "INCIDENT_TRIGGER_PAYLOADS",
    "INCIDENT_UPDATED",
    "KEEP",
    "SYSTEM_DEGRADED",
    "SYSTEM_HEALTHY",
    "SYSTEM_HEALTH_CHANGED",
    "Agent",
    "AgentConfig",
    "AgentConfigError",
    "AgentStats",
    "AgentSummary",
    "Batch",
    "CatalogSystemPayload",
    "CatalogSystemState",
    "CheckRule",
    "CheckState",
    "HealthService",
    "HealthState",
    "HealthStatus",
    "HostSource",
    "Incident",
    "IncidentAutomation",
    "IncidentCreatedPayload",
    "IncidentRecord",
    "IncidentResolvedPayload",
    "IncidentService",
    "IncidentSeverity",
    "IncidentState",
    "IncidentStatus",
    "IncidentUpdatedPayload",
    "InvalidInputError",
    "LabelScore",
    "MonitoringError",
    "MonitoringHandles",
    "NotFoundError",
    "OpenIncident",
    "RecordClock",
    "ReplaySource",
    "Sample",
    "ScrapeSource",
    "Selector",
    "SelectorError",
    "SeriesFile",
    "Source",
    "StatusChange",
    "SupportsEntityWrites",
    "SystemDegradedPayload",
    "SystemHealthChangedPayload",
    "SystemHealthyPayload",
    "add_agent_parser",
    "catalog_system_change_to_payload",
    "create_incident_read",
    "delete_catalog_system",
    "derive_catalog_system_events",
    "derive_health_events",
    "derive_incident_events",
    "detach_system_from_incidents",
    "evaluate_system",
    "expire_check",
    "health_change_to_payload",
    "incident_change_to_payload",
    "install_monitoring",
    "load_agent_config",
    "load_label_windows",
    "make_check_id",
    "make_system_cleanup_handler",
    "new_check_state",
    "parse_duration",
    "parse_exposition",
    "parse_timestamp",
    "read_series_file",
    "record_check_result",
    "remove_incident_entity",
    "remove_system_health",
    "run_agent",
    "save_catalog_system",
    "step_check",
    "summarise_checks",
    "to_incident_entity_state",
    "write_incident_entity",
]
