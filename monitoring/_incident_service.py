from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

from monitoring._errors import InvalidInputError, NotFoundError
from monitoring._incident import (
    INCIDENT_KIND,
    INCIDENT_SEVERITIES,
    INCIDENT_STATUSES,
    IncidentSeverity,
    IncidentStatus,
)

logger = logging.getLogger(__name__)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS incidents (
    id          TEXT PRIMARY KEY,
    title       TEXT NOT NULL,
    description TEXT,
    status      TEXT NOT NULL CHECK (status IN {INCIDENT_STATUSES!r}),
    severity    TEXT NOT NULL CHECK (severity IN {INCIDENT_SEVERITIES!r}),
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    resolved_at TEXT
);
CREATE TABLE IF NOT EXISTS incident_systems (
    incident_id TEXT NOT NULL REFERENCES incidents (id) ON DELETE CASCADE,
    system_id   TEXT NOT NULL,
    PRIMARY KEY (incident_id, system_id)
);
CREATE INDEX IF NOT EXISTS incident_systems_by_system
    ON incident_systems (system_id);
"""

_BATCH: Final = 500
"""Ids per ``IN (...)`` query, well under SQLite's bound-parameter limit."""


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final[Any] = _Keep()
"""Marks an :meth:`IncidentService.update_incident` argument to leave as it is."""


@dataclasses.dataclass(frozen=True)
class Incident:
    """One incident as the service stores it.

    Attributes:
        id: the incident id.
        title: a short summary.
        description: the long text, or ``None``.
        status: one of :data:`~monitoring.INCIDENT_STATUSES`.
        severity: one of :data:`~monitoring.INCIDENT_SEVERITIES`.
        system_ids: the affected systems, in the order they were linked.
        created_at: when the incident was opened (UTC).
        updated_at: when it was last written (UTC).
        resolved_at: when it was last resolved, or ``None`` while open.
    """

    id: str
    title: str
    description: str | None
    status: IncidentStatus
    severity: IncidentSeverity
    system_ids: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None


class IncidentService:
    """Keeps incidents and their system links in SQLite.

    Two tables, as a real service keeps them: ``incidents`` (one row per
    incident) and ``incident_systems`` (one row per incident-to-system link,
    deleted with its incident). The service is the current-state storage of the
    plugin-backed ``incident`` kind: :meth:`get_many_entity_states` is that
    kind's ``read``.

    Guarantees:
        - Thread-safe: one connection guarded by a lock, so the runtime's
          workers and the caller's threads may share one service.
        - Every write validates all of its arguments before touching the
          database and runs in one transaction; a write that raises has
          written nothing.
        - Every write returns the incident as stored after the write.

    Args:
        database: a SQLite file (for instance ``data_dir / "incidents.db"``)
            or ``":memory:"`` for a private in-memory database.

    Raises:
        sqlite3.Error: the database cannot be opened (a damaged file, or not
            a SQLite file); the message starts with the file's path.
    """

    def __init__(self, database: str | os.PathLike[str] = ":memory:") -> None:
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                database, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as err:
            raise type(err)(f"{os.fspath(database)}: {err}") from err
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as err:
            # A damaged or foreign file: say which one.
            self._conn.close()
            raise type(err)(f"{os.fspath(database)}: {err}") from err
        logger.debug("incident service opened %s", database)

    def close(self) -> None:
        """Close the database connection; later calls fail."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> IncidentService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create_incident(
        self,
        title: str,
        *,
        severity: str,
        status: str = "investigating",
        system_ids: Sequence[str] = (),
        description: str | None = None,
        incident_id: str | None = None,
    ) -> Incident:
        """Open an incident and link it to its systems.

        Args:
            title: a short, non-empty summary.
            severity: one of ``minor``, ``major``, ``critical``.
            status: the initial status (``investigating`` by default).
            system_ids: the affected systems; a list or tuple of strings.
                Repeats are dropped, the first occurrence's place kept.
            description: the long text, or ``None``.
            incident_id: the id to use; a fresh ``inc-...`` id by default.

        Raises:
            InvalidInputError: an argument is invalid or the id is taken.
        """
        ident = incident_id if incident_id is not None else f"inc-{uuid.uuid4().hex}"
        _check_id(ident, "incident_id")
        _check_text(ident, "title", title, optional=False)
        _check_text(ident, "description", description, optional=True)
        _check_choice(ident, "status", status, INCIDENT_STATUSES)
        _check_choice(ident, "severity", severity, INCIDENT_SEVERITIES)
        systems = _check_system_ids(ident, system_ids)
        now = _now()

        with self._transaction() as conn:
            if _exists(conn, ident):
                raise InvalidInputError(
                    INCIDENT_KIND, ident, "incident_id", "is already taken"
                )

            conn.execute(
                "INSERT INTO incidents (id, title, description, status, severity,"
                " created_at, updated_at, resolved_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ident,
                    title,
                    description,
                    status,
                    severity,
                    now,
                    now,
                    now if status == "resolved" else None,
                ),
            )
            _insert_links(conn, ident, systems)
            return _load(conn, ident)

    def update_incident(
        self,
        incident_id: str,
        *,
        title: str | None = None,
        description: str | None = KEEP,
        status: str | None = None,
        severity: str | None = None,
        system_ids: Sequence[str] | None = None,
    ) -> Incident:
        """Change some fields of an incident; ``None`` leaves a field as it is.

        Moving into ``resolved`` stamps ``resolved_at``; moving out of it (a
        reopen) clears it. ``system_ids`` replaces every link at once.

        Args:
            incident_id: the incident to change.
            title: a new non-empty title.
            description: a new description; ``None`` clears it and
                :data:`KEEP` (the default) leaves it.
            status: a new status.
            severity: a new severity.
            system_ids: the new complete list of affected systems.

        Raises:
            InvalidInputError: an argument is invalid.
            NotFoundError: the service holds no such incident.
        """
        if title is not None:
            _check_text(incident_id, "title", title, optional=False)
        if description is not KEEP:
            _check_text(incident_id, "description", description, optional=True)
        if status is not None:
            _check_choice(incident_id, "status", status, INCIDENT_STATUSES)
        if severity is not None:
            _check_choice(incident_id, "severity", severity, INCIDENT_SEVERITIES)
        systems = None
        if system_ids is not None:
            systems = _check_system_ids(incident_id, system_ids)

        with self._transaction() as conn:
            current = _load_or_raise(conn, incident_id)
            now = _now()
            changes: dict[str, Any] = {"updated_at": now}
            if title is not None:
                changes["title"] = title
            if description is not KEEP:
                changes["description"] = description
            if severity is not None:
                changes["severity"] = severity
            if status is not None and status != current.status:
                changes["status"] = status
                changes["resolved_at"] = now if status == "resolved" else None

            assignments = ", ".join(f"{column} = ?" for column in changes)
            conn.execute(
                f"UPDATE incidents SET {assignments} WHERE id = ?",
                (*changes.values(), incident_id),
            )
            if systems is not None:
                conn.execute(
                    "DELETE FROM incident_systems WHERE incident_id = ?",
                    (incident_id,),
                )
                _insert_links(conn, incident_id, systems)
            return _load(conn, incident_id)

    def resolve_incident(self, incident_id: str) -> Incident:
        """Mark an incident resolved; resolving a resolved incident changes nothing.

        Raises:
            NotFoundError: the service holds no such incident.
        """
        return self.update_incident(incident_id, status="resolved")

    def link_system(self, incident_id: str, system_id: str) -> Incident:
        """Add a system to an incident; linking a linked system changes nothing.

        Raises:
            InvalidInputError: ``system_id`` is not a non-empty string.
            NotFoundError: the service holds no such incident.
        """
        (system,) = _check_system_ids(incident_id, [system_id])

        with self._transaction() as conn:
            _load_or_raise(conn, incident_id)
            _insert_links(conn, incident_id, [system])
            return _load(conn, incident_id)

    def unlink_system(self, incident_id: str, system_id: str) -> Incident:
        """Remove a system from an incident; a missing link is not an error.

        Raises:
            NotFoundError: the service holds no such incident.
        """
        with self._transaction() as conn:
            _load_or_raise(conn, incident_id)
            conn.execute(
                "DELETE FROM incident_systems WHERE incident_id = ? AND system_id = ?",
                (incident_id, system_id),
            )
            return _load(conn, incident_id)

    def delete_incident(self, incident_id: str) -> bool:
        """Delete an incident and its links.

        Returns:
            Whether the incident existed.
        """
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM incidents WHERE id = ?", (incident_id,))
            return cursor.rowcount > 0

    def remove_system_associations(self, system_id: str) -> list[str]:
        """Unlink one system from every incident, in one transaction.

        This bypasses any entity handle; to keep the ``incident`` kind's
        history and triggers in step, unlink each incident through the handle
        instead (see :func:`~monitoring.detach_system_from_incidents`).

        Returns:
            The ids of the incidents that lost the link, sorted.
        """
        with self._transaction() as conn:
            affected = _incident_ids_for_system(conn, system_id)
            conn.execute(
                "DELETE FROM incident_systems WHERE system_id = ?", (system_id,)
            )
            return affected

    def get_incident(self, incident_id: str) -> Incident | None:
        """Return one incident, or ``None`` when the service holds no such id."""
        with self._lock:
            if not _exists(self._conn, incident_id):
                return None
            return _load(self._conn, incident_id)

    def list_incidents(
        self, *, system_id: str | None = None, include_resolved: bool = True
    ) -> list[Incident]:
        """Return incidents ordered by id, optionally only those of one system."""
        with self._lock:
            if system_id is None:
                rows = self._conn.execute("SELECT id FROM incidents ORDER BY id")
                ids = [row["id"] for row in rows]
            else:
                ids = _incident_ids_for_system(self._conn, system_id)
            incidents = [_load(self._conn, ident) for ident in ids]

        if include_resolved:
            return incidents
        return [incident for incident in incidents if incident.status != "resolved"]

    def incident_ids_for_system(self, system_id: str) -> list[str]:
        """Return the ids of the incidents linked to a system, sorted."""
        with self._lock:
            return _incident_ids_for_system(self._conn, system_id)

    def get_many_entity_states(
        self, incident_ids: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """Return the reactive state of each incident the service holds.

        This is the batched ``read`` of the plugin-backed ``incident`` kind:
        two queries per 500 ids (incidents, then their links), under the
        service lock so that a concurrent write is seen entirely or not at all.

        Returns:
            ``{id: {"status", "severity", "system_ids"}}``; ids the service
            does not hold are missing.
        """
        wanted = list(dict.fromkeys(incident_ids))
        states: dict[str, dict[str, Any]] = {}

        with self._lock:
            for start in range(0, len(wanted), _BATCH):
                batch = wanted[start : start + _BATCH]
                marks = ", ".join("?" * len(batch))
                rows = self._conn.execute(
                    f"SELECT id, status, severity FROM incidents WHERE id IN ({marks})",
                    batch,
                )
                for row in rows:
                    states[row["id"]] = {
                        "status": row["status"],
                        "severity": row["severity"],
                        "system_ids": [],
                    }
                links = self._conn.execute(
                    "SELECT incident_id, system_id FROM incident_systems"
                    f" WHERE incident_id IN ({marks}) ORDER BY rowid",
                    batch,
                )
                for row in links:
                    states[row["incident_id"]]["system_ids"].append(row["system_id"])

        return states

    def _transaction(self) -> _Transaction:
        return _Transaction(self._lock, self._conn)


class _Transaction:
    """Holds the service lock and one SQLite transaction; rolls back on error."""

    def __init__(self, lock: threading.RLock, conn: sqlite3.Connection) -> None:
        self._lock = lock
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self._lock.release()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _exists(conn: sqlite3.Connection, incident_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM incidents WHERE id = ?", (incident_id,))
    return row.fetchone() is not None


def _load(conn: sqlite3.Connection, incident_id: str) -> Incident:
    row = conn.execute(
        "SELECT * FROM incidents WHERE id = ?", (incident_id,)
    ).fetchone()
    links = conn.execute(
        "SELECT system_id FROM incident_systems WHERE incident_id = ? ORDER BY rowid",
        (incident_id,),
    )

    return Incident(
        id=row["id"],
        title=row["title"],
        description=row["description"],
        status=row["status"],
        severity=row["severity"],
        system_ids=tuple(link["system_id"] for link in links),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
        resolved_at=_parse_time(row["resolved_at"]),
    )


def _load_or_raise(conn: sqlite3.Connection, incident_id: str) -> Incident:
    if not _exists(conn, incident_id):
        raise NotFoundError(INCIDENT_KIND, incident_id, "no such incident")
    return _load(conn, incident_id)


def _insert_links(
    conn: sqlite3.Connection, incident_id: str, system_ids: Iterable[str]
) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO incident_systems (incident_id, system_id) VALUES (?, ?)",
        [(incident_id, system) for system in system_ids],
    )


def _incident_ids_for_system(conn: sqlite3.Connection, system_id: str) -> list[str]:
    rows = conn.execute(
        "SELECT incident_id FROM incident_systems WHERE system_id = ?"
        " ORDER BY incident_id",
        (system_id,),
    )
    return [row["incident_id"] for row in rows]


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_id(incident_id: object, field: str) -> None:
    if not isinstance(incident_id, str) or not incident_id:
        raise InvalidInputError(
            INCIDENT_KIND,
            "-",
            field,
            f"must be a non-empty string, got {_describe(incident_id)}",
        )


def _check_text(incident_id: str, field: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or (not optional and not value.strip()):
        expected = "a string or None" if optional else "a non-empty string"
        raise InvalidInputError(
            INCIDENT_KIND,
            incident_id,
            field,
            f"must be {expected}, got {_describe(value)}",
        )


def _check_choice(
    incident_id: str, field: str, value: object, choices: tuple[str, ...]
) -> None:
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(choices)
        raise InvalidInputError(
            INCIDENT_KIND, incident_id, field, f"must be one of {listed}, got {value!r}"
        )


def _check_system_ids(incident_id: str, system_ids: object) -> list[str]:
    if not isinstance(system_ids, list | tuple):
        raise InvalidInputError(
            INCIDENT_KIND,
            incident_id,
            "system_ids",
            f"must be a list of system ids, got {_describe(system_ids)}",
        )

    for index, system in enumerate(system_ids):
        if not isinstance(system, str) or not system:
            raise InvalidInputError(
                INCIDENT_KIND,
                incident_id,
                f"system_ids[{index}]",
                f"must be a non-empty string, got {_describe(system)}",
            )
    return list(dict.fromkeys(system_ids))
