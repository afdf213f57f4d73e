"""A trigger recorder for the monitoring tests: every trigger, payload checked."""

from __future__ import annotations

import threading
from typing import Any

from monitoring import (
    CATALOG_TRIGGER_PAYLOADS,
    HEALTH_TRIGGER_PAYLOADS,
    INCIDENT_TRIGGER_PAYLOADS,
)
from runtime import EntityChanged, Runtime, SchemaError, validate_value

PAYLOAD_SCHEMAS = {
    **INCIDENT_TRIGGER_PAYLOADS,
    **HEALTH_TRIGGER_PAYLOADS,
    **CATALOG_TRIGGER_PAYLOADS,
}


class TriggerLog:
    """Collects every monitoring trigger and checks its payload on arrival."""

    def __init__(self, rt: Runtime) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[int, str, dict[str, Any]]] = []
        self.invalid: list[str] = []
        for event in PAYLOAD_SCHEMAS:
            rt.on_trigger(event, self._collect)

    def _collect(self, event: str, payload: Any, change: EntityChanged) -> None:
        try:
            validate_value(PAYLOAD_SCHEMAS[event], payload, event)
        except SchemaError as err:
            with self._lock:
                self.invalid.append(str(err))
        with self._lock:
            self._events.append((change.seq, event, payload))

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Every trigger so far, in commit order (by name within one change)."""
        with self._lock:
            ordered = sorted(self._events, key=lambda item: (item[0], item[1]))
        return [(event, payload) for _, event, payload in ordered]
