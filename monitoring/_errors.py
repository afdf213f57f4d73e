from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class MonitoringError(Exception):
    """Base class of every error the monitoring package raises on purpose."""


class InvalidInputError(MonitoringError, ValueError):
    """A write was given a value it cannot store; nothing was written.

    Attributes:
        kind: the entity kind the write was for (``incident``, ``health``).
        entity_id: the id the write was for, or ``"-"`` when none was known yet.
        field: the offending argument or field.
        reason: what was wrong and what was expected.
    """

    def __init__(self, kind: str, entity_id: str, field: str, reason: str) -> None:
        self.kind = kind
        self.entity_id = entity_id
        self.field = field
        self.reason = reason
        super().__init__(f"{kind}/{entity_id}: {field!r} {reason}; nothing recorded")


class NotFoundError(MonitoringError, LookupError):
    """A write or lookup named something the service does not hold.

    Attributes:
        kind: the entity kind the write was for.
        entity_id: the id that was looked up.
        reason: what was missing.
    """

    def __init__(self, kind: str, entity_id: str, reason: str) -> None:
        self.kind = kind
        self.entity_id = entity_id
        self.reason = reason
        super().__init__(f"{kind}/{entity_id}: {reason}; nothing recorded")
