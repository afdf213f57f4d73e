from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sortedcontainers import SortedDict

from runtime._events import SYSTEM_ACTOR, Transition

logger = logging.getLogger(__name__)


class _EntityRows:
    """The rows of one entity, in sequence order, with a per-field index."""

    __slots__ = ("by_field", "in_time_order", "rows", "times")

    def __init__(self) -> None:
        self.rows: list[Transition] = []
        self.times: list[float] = []
        self.by_field: dict[str, list[Transition]] = {}
        self.in_time_order = True

    def add(self, row: Transition, fields: Sequence[str]) -> None:
        if self.times and row.timestamp < self.times[-1]:
            self.in_time_order = False
        self.rows.append(row)
        self.times.append(row.timestamp)
        for field in fields:
            self.by_field.setdefault(field, []).append(row)


def _between(
    rows: list[Transition], since: float | None, until: float | None, ordered: bool
) -> list[Transition]:
    if since is None and until is None:
        return list(rows)
    if not ordered:
        return [
            r
            for r in rows
            if (since is None or r.timestamp >= since)
            and (until is None or r.timestamp < until)
        ]

    lo = 0 if since is None else bisect.bisect_left(rows, since, key=_timestamp)
    hi = len(rows) if until is None else bisect.bisect_left(rows, until, key=_timestamp)
    return rows[lo:hi]


def _timestamp(row: Transition) -> float:
    return row.timestamp


def change_rows(
    prev: Mapping[str, Any] | None,
    next_state: Mapping[str, Any] | None,
    changed_fields: Sequence[str],
) -> list[list[Any]]:
    """Return the ``[field, before, after]`` triples of one change.

    A tombstone is the single triple ``[None, prev, None]``.
    """
    if next_state is None:
        return [[None, prev, None]]
    if prev is None:
        return [[f, None, next_state.get(f)] for f in changed_fields]
    return [[f, prev.get(f), next_state.get(f)] for f in changed_fields]


class TransitionLog:
    """The ordered, indexed, in-memory log of every field change.

    Rows are kept in a ``SortedDict`` keyed by sequence number (one entry per
    change, holding that change's rows) and indexed by ``(kind, id)`` and by
    field, so that the queries of one entity cost O(log n + k) for k rows
    answered, whatever the size of the log.

    The log also owns the runtime's sequence counter: ``append_change`` assigns
    the next number and appends the rows atomically, under the log's lock, so
    sequence order is commit order. All methods are thread-safe.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._changes: SortedDict = SortedDict()
        self._entities: dict[tuple[str, str], _EntityRows] = {}
        self._row_count = 0
        self.last_seq = 0

    def __len__(self) -> int:
        """The number of rows in the log."""
        return self._row_count

    def clear(self) -> None:
        """Forget every row and restart numbering (a failed restore's undo)."""
        with self.lock:
            self._changes.clear()
            self._entities.clear()
            self._row_count = 0
            self.last_seq = 0

    def append_change(
        self,
        kind: str,
        entity_id: str,
        prev: Mapping[str, Any] | None,
        next_state: Mapping[str, Any] | None,
        changed_fields: Sequence[str],
        at: float,
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
        seq: int | None = None,
    ) -> tuple[int, tuple[Transition, ...]]:
        """Record one change and return its sequence number and rows.

        A tombstone (``next_state is None``) is one row with ``field=None``.
        ``seq`` is given only when restoring a recorded change; it must be
        higher than every sequence already in the log.
        """
        with self.lock:
            if seq is None:
                seq = self.last_seq + 1
            spec = change_rows(prev, next_state, changed_fields)
            rows = self.append_rows(
                seq, kind, entity_id, at, actor, run_id, spec, changed_fields
            )
            return seq, rows

    def append_rows(
        self,
        seq: int,
        kind: str,
        entity_id: str,
        at: float,
        actor: str,
        run_id: str | None,
        spec: Sequence[Sequence[Any]],
        changed_fields: Sequence[str],
    ) -> tuple[Transition, ...]:
        """Record one change given as ``[field, before, after]`` triples.

        A tombstone is the single triple ``[None, prev, None]``; its
        ``changed_fields`` are the fields ``prev`` had. Used by the write path
        (which journals the same triples first) and by restores.

        Raises:
            ValueError: ``seq`` is not after the log's last sequence.
        """
        with self.lock:
            if seq <= self.last_seq:
                raise ValueError(
                    f"sequence {seq} is not after the log's last sequence "
                    f"{self.last_seq}"
                )

            rows = tuple(
                Transition(
                    seq,
                    kind,
                    entity_id,
                    field,
                    before,
                    after,
                    at,
                    actor,
                    run_id,
                    field is None,
                )
                for field, before, after in spec
            )

            self._index(kind, entity_id, seq, rows, changed_fields)
            self.last_seq = seq
            return rows

    def advance_to(self, seq: int) -> None:
        """Continue numbering after ``seq`` (restores with no rows left)."""
        with self.lock:
            self.last_seq = max(self.last_seq, seq)

    def _index(
        self,
        kind: str,
        entity_id: str,
        seq: int,
        rows: tuple[Transition, ...],
        changed_fields: Sequence[str],
    ) -> None:
        self._changes[seq] = rows
        self._row_count += len(rows)

        entity = self._entities.get((kind, entity_id))
        if entity is None:
            entity = self._entities[(kind, entity_id)] = _EntityRows()
        if rows[0].tombstone:
            entity.add(rows[0], changed_fields)
        else:
            for row in rows:
                entity.add(row, (row.field,))  # type: ignore[arg-type]

    def history(
        self,
        kind: str,
        entity_id: str,
        field: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[Transition]:
        """Return the rows of one entity in sequence order.

        Args:
            field: only rows of this field (tombstones count as a change of
                every field the entity had).
            since: only rows at or after this POSIX time.
            until: only rows before this POSIX time.

        Cost: O(log n + k) when the entity's rows are in time order (the
        normal case), O(rows of the entity) otherwise.
        """
        with self.lock:
            entity = self._entities.get((kind, entity_id))
            if entity is None:
                return []
            rows = entity.rows if field is None else entity.by_field.get(field, [])
            return _between(rows, since, until, entity.in_time_order)

    def last_change(self, kind: str, entity_id: str, field: str) -> Transition | None:
        """Return the newest row of one field of one entity, or ``None``."""
        with self.lock:
            entity = self._entities.get((kind, entity_id))
            if entity is None:
                return None
            rows = entity.by_field.get(field)
            return rows[-1] if rows else None

    def count_since(self, kind: str, entity_id: str, field: str, since: float) -> int:
        """Count the rows of one field at or after ``since`` (POSIX time)."""
        with self.lock:
            entity = self._entities.get((kind, entity_id))
            if entity is None:
                return 0
            rows = entity.by_field.get(field, [])
            return len(_between(rows, since, None, entity.in_time_order))

    def changes_since(self, seq: int) -> Iterator[tuple[Transition, ...]]:
        """Yield the rows of every change after ``seq``, in sequence order.

        The rows are copied out under the lock in one step, so a concurrent
        writer cannot make the iteration skip or repeat a change.
        """
        with self.lock:
            found = list(self._changes.irange(minimum=seq, inclusive=(False, True)))
            batches = [self._changes[s] for s in found]
        yield from batches

    def prune(
        self,
        older_than: float | None = None,
        max_rows: int | None = None,
        batch: int = 200,
        removed_before: float | None = None,
    ) -> int:
        """Drop old rows; return how many were dropped.

        A row goes when it is older than ``older_than`` (POSIX time) or when
        its entity has more than ``max_rows`` newer rows. The newest row of
        each field of an entity always stays, so ``in_state_since`` keeps its
        answer however long a field has held its value; but an entity whose
        last row is a tombstone from before ``removed_before`` is forgotten
        entirely, so ids that come and go do not pile up.

        The lock is taken only to copy the entity index and then for
        ``batch`` entities at a time, so writers are never held up for long.
        """
        if older_than is None and max_rows is None and removed_before is None:
            return 0

        with self.lock:
            entities = list(self._entities.items())
        keys = [
            key
            for key, entity in entities
            if (max_rows is not None and len(entity.rows) > max_rows)
            or (older_than is not None and entity.times[0] < older_than)
            or (
                removed_before is not None
                and entity.rows[-1].tombstone
                and entity.times[-1] < removed_before
            )
        ]

        dropped = 0
        for start in range(0, len(keys), batch):
            with self.lock:
                for key in keys[start : start + batch]:
                    dropped += self._prune_entity(
                        key, older_than, max_rows, removed_before
                    )
        if dropped:
            logger.debug("retention dropped %d transition rows", dropped)
        return dropped

    def _prune_entity(
        self,
        key: tuple[str, str],
        older_than: float | None,
        max_rows: int | None,
        removed_before: float | None = None,
    ) -> int:
        entity = self._entities.get(key)
        if entity is None or not entity.rows:
            return 0

        last = entity.rows[-1]
        if (
            removed_before is not None
            and last.tombstone
            and last.timestamp < removed_before
        ):
            return self._forget_entity(key, entity)

        keep_newest = {id(rows[-1]) for rows in entity.by_field.values()}
        cut = len(entity.rows) - max_rows if max_rows is not None else 0
        doomed = [
            row
            for index, row in enumerate(entity.rows)
            if id(row) not in keep_newest
            and (index < cut or (older_than is not None and row.timestamp < older_than))
        ]
        if not doomed:
            return 0

        gone = {id(row) for row in doomed}
        entity.rows = [r for r in entity.rows if id(r) not in gone]
        entity.times = [r.timestamp for r in entity.rows]
        for field, rows in list(entity.by_field.items()):
            left = [r for r in rows if id(r) not in gone]
            entity.by_field[field] = left
        for seq in {row.seq for row in doomed}:
            left_rows = tuple(r for r in self._changes[seq] if id(r) not in gone)
            if left_rows:
                self._changes[seq] = left_rows
            else:
                del self._changes[seq]
        self._row_count -= len(doomed)
        return len(doomed)

    def _forget_entity(self, key: tuple[str, str], entity: _EntityRows) -> int:
        gone = {id(row) for row in entity.rows}
        for seq in {row.seq for row in entity.rows}:
            rows = self._changes.get(seq)
            if rows is None:
                continue
            left_rows = tuple(r for r in rows if id(r) not in gone)
            if left_rows:
                self._changes[seq] = left_rows
            else:
                del self._changes[seq]
        del self._entities[key]
        self._row_count -= len(gone)
        return len(gone)

    def snapshot_changes(self) -> list[tuple[Transition, ...]]:
        """Return every change's rows in sequence order (call under ``lock``)."""
        return list(self._changes.values())

    def entity_keys(self) -> list[tuple[str, str]]:
        """Return every ``(kind, id)`` that has rows in the log."""
        with self.lock:
            return list(self._entities)

    def check(self) -> None:
        """Verify the log's invariants; raise ``AssertionError`` if broken.

        Used by tests after random operations: sequence keys increase, every
        indexed row is in the main log, row counts agree.
        """
        with self.lock:
            seqs = list(self._changes.keys())
            assert seqs == sorted(set(seqs)), "sequence keys out of order"
            assert not seqs or seqs[-1] <= self.last_seq
            total = sum(len(rows) for rows in self._changes.values())
            assert total == self._row_count, (total, self._row_count)
            for (kind, entity_id), entity in self._entities.items():
                entity_seqs = [r.seq for r in entity.rows]
                assert entity_seqs == sorted(entity_seqs), (kind, entity_id)
                for row in entity.rows:
                    assert row.kind == kind
                    assert row.id == entity_id
                    assert any(r is row for r in self._changes[row.seq])
                for field, rows in entity.by_field.items():
                    for row in rows:
                        assert row.tombstone or row.field == field
