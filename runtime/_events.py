from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NoReturn

SYSTEM_ACTOR = "system"
"""The actor recorded for writes that no user or automation made."""

_READ_ONLY_HINT = (
    "runtime states are read-only (they are shared with the store and every "
    "consumer); build a new value instead, e.g. {**prev, 'field': value}"
)


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError(_READ_ONLY_HINT)


class ReadOnlyDict(dict[str, Any]):
    """A ``dict`` that refuses in-place changes.

    States handed out by the runtime (``get``, ``prev``/``next`` of a change,
    transition values) are shared, not copied, so they are read-only. ``dict(x)``
    or ``{**x}`` gives a plain, mutable copy of the top level.
    """

    __slots__ = ()

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        copied: dict[str, Any] = thaw(self)
        return copied

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


class ReadOnlyList(list[Any]):
    """A ``list`` that refuses in-place changes; see :class:`ReadOnlyDict`."""

    __slots__ = ()

    __setitem__ = __delitem__ = _refuse
    append = extend = insert = remove = pop = clear = sort = reverse = _refuse
    __iadd__ = __imul__ = _refuse

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copied: list[Any] = thaw(self)
        return copied

    def __reduce__(self) -> Any:
        return (list, (list(self),))


_SCALARS = frozenset((str, int, float, bool, type(None)))
"""The types :func:`freeze` returns as they are, tested first."""


def freeze(value: Any) -> Any:
    """Return a read-only deep copy of a JSON-compatible value."""
    kind = type(value)
    if kind in _SCALARS or kind is ReadOnlyDict or kind is ReadOnlyList:
        return value
    # Scalar members are tested here rather than in a call each: states are
    # mostly flat, and a restore freezes every one of them.
    if isinstance(value, dict):
        return ReadOnlyDict(
            {k: v if type(v) in _SCALARS else freeze(v) for k, v in value.items()}
        )
    if isinstance(value, list):
        return ReadOnlyList([v if type(v) in _SCALARS else freeze(v) for v in value])
    return value


def thaw(value: Any) -> Any:
    """Return a plain, mutable deep copy of a JSON-compatible value."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [thaw(v) for v in value]
    return value


def _now() -> datetime:
    return datetime.now(UTC)


_CHANGE_FIELDS = (
    "kind",
    "id",
    "prev",
    "next",
    "delta",
    "changed_fields",
    "actor",
    "timestamp",
    "seq",
    "run_id",
)


class EntityChanged(tuple[Any, ...]):
    """One real change of one entity: the ``ENTITY_CHANGED`` event.

    Built by the runtime after a commit; constructible by keyword so that a
    deriver or subscriber can be tested alone. ``prev`` is ``None`` on a create
    and ``next`` is ``None`` on a tombstone. When ``delta`` or
    ``changed_fields`` are left out they are computed from ``prev`` and ``next``.

    Immutable, and stored as a tuple: the runtime builds one per committed
    change on its hot path, where a tuple costs a fraction of an object with
    attributes. Read it by attribute; the tuple form is an implementation
    detail (compare whole changes with ``==`` if needed).

    Attributes:
        kind: the entity kind.
        id: the entity id.
        prev: the state before the change, or ``None`` on a create.
        next: the state after the change, or ``None`` on a tombstone.
        delta: the changed fields with their new values.
        changed_fields: the names of the changed fields, in state order.
        actor: who made the write.
        occurred_at: when it was committed (timezone-aware UTC).
        timestamp: ``occurred_at`` as POSIX seconds.
        seq: the runtime's sequence number of the change; it increases by one
            per committed change, so consumers can order events and spot gaps.
        run_id: the run the write belongs to, if any.
    """

    __slots__ = ()

    def __new__(
        cls,
        *,
        kind: str,
        id: str,
        prev: Mapping[str, Any] | None,
        next: Mapping[str, Any] | None,
        delta: Mapping[str, Any] | None = None,
        changed_fields: Iterable[str] | None = None,
        actor: str = SYSTEM_ACTOR,
        occurred_at: datetime | float | None = None,
        seq: int = 0,
        run_id: str | None = None,
    ) -> EntityChanged:
        if delta is None or changed_fields is None:
            from runtime._diff import diff_states

            found_delta, found_fields = diff_states(prev, next)
            if delta is None:
                delta = found_delta
            if changed_fields is None:
                changed_fields = found_fields
        ts = _now().timestamp() if occurred_at is None else _seconds(occurred_at)
        return tuple.__new__(
            cls,
            (
                kind,
                id,
                prev,
                next,
                delta,
                tuple(changed_fields),
                actor,
                ts,
                seq,
                run_id,
            ),
        )

    kind: str = property(itemgetter(0))  # type: ignore[assignment]
    id: str = property(itemgetter(1))  # type: ignore[assignment]
    prev: Mapping[str, Any] | None = property(itemgetter(2))  # type: ignore[assignment]
    next: Mapping[str, Any] | None = property(itemgetter(3))  # type: ignore[assignment]
    delta: Mapping[str, Any] = property(itemgetter(4))  # type: ignore[assignment]
    changed_fields: tuple[str, ...] = property(itemgetter(5))  # type: ignore[assignment]
    actor: str = property(itemgetter(6))  # type: ignore[assignment]
    timestamp: float = property(itemgetter(7))  # type: ignore[assignment]
    seq: int = property(itemgetter(8))  # type: ignore[assignment]
    run_id: str | None = property(itemgetter(9))  # type: ignore[assignment]

    @property
    def occurred_at(self) -> datetime:
        """When the change was committed (timezone-aware UTC)."""
        return datetime.fromtimestamp(self[7], UTC)

    @property
    def is_create(self) -> bool:
        """Whether the entity did not exist before this change."""
        return self[2] is None and self[3] is not None

    @property
    def is_tombstone(self) -> bool:
        """Whether this change removed the entity."""
        return self[3] is None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value!r}"
            for name, value in zip(_CHANGE_FIELDS, self, strict=True)
        )
        return f"EntityChanged({shown})"

    def __reduce__(self) -> Any:
        return (_rebuild_change, (tuple(self),))


def _rebuild_change(values: tuple[Any, ...]) -> EntityChanged:
    return tuple.__new__(EntityChanged, values)


new_change = functools.partial(tuple.__new__, EntityChanged)
"""Build an :class:`EntityChanged` from its ten values in field order, unchecked.

The write path's constructor: no defaults are computed and nothing is
converted, so ``changed_fields`` must already be a tuple and the time POSIX
seconds.
"""


def _seconds(at: datetime | float) -> float:
    return at.timestamp() if isinstance(at, datetime) else float(at)


class Transition:
    """One row of the transition log: one field of one entity changed once.

    A change of three fields writes three rows sharing one ``seq``. A removal
    writes one tombstone row with ``field=None``, ``before`` the last state,
    ``after=None`` and ``tombstone=True``.
    """

    __slots__ = (
        "_ts",
        "actor",
        "after",
        "before",
        "field",
        "id",
        "kind",
        "run_id",
        "seq",
        "tombstone",
    )

    def __init__(
        self,
        seq: int,
        kind: str,
        id: str,
        field: str | None,
        before: Any,
        after: Any,
        at: datetime | float,
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
        tombstone: bool = False,
    ) -> None:
        self.seq = seq
        self.kind = kind
        self.id = id
        self.field = field
        self.before = before
        self.after = after
        self._ts = at if type(at) is float else _seconds(at)
        self.actor = actor
        self.run_id = run_id
        self.tombstone = tombstone

    @staticmethod
    def _from_columns(
        seq: int,
        kind: str,
        id: str,
        field: str | None,
        before: Any,
        after: Any,
        ts: float,
        actor: str,
        run_id: str | None,
    ) -> Transition:
        """Build a row read back from the log's columns (``ts`` is a float).

        Skips ``__init__`` and its time conversion: the log materialises rows
        on every read, so this is the hot path of ``history``.
        """
        row: Transition = object.__new__(Transition)
        row.seq = seq
        row.kind = kind
        row.id = id
        row.field = field
        row.before = before
        row.after = after
        row._ts = ts
        row.actor = actor
        row.run_id = run_id
        row.tombstone = field is None
        return row

    @property
    def at(self) -> datetime:
        """When the change was committed (timezone-aware UTC)."""
        return datetime.fromtimestamp(self._ts, UTC)

    @property
    def timestamp(self) -> float:
        """``at`` as seconds since the epoch."""
        return self._ts

    def _key(self) -> tuple[Any, ...]:
        return (
            self.seq,
            self.kind,
            self.id,
            self.field,
            self.before,
            self.after,
            self._ts,
            self.actor,
            self.run_id,
            self.tombstone,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Transition):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        what = "tombstone" if self.tombstone else f"{self.field}"
        return (
            f"Transition(seq={self.seq}, {self.kind}/{self.id} {what}: "
            f"{self.before!r} -> {self.after!r}, actor={self.actor!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the row as a plain dict (``at`` as an ISO 8601 string)."""
        return {
            "seq": self.seq,
            "kind": self.kind,
            "id": self.id,
            "field": self.field,
            "before": thaw(self.before),
            "after": thaw(self.after),
            "at": self.at.isoformat(),
            "actor": self.actor,
            "run_id": self.run_id,
            "tombstone": self.tombstone,
        }


def unique_in_order(names: Iterable[str]) -> list[str]:
    """Return ``names`` without repeats, keeping the first occurrence's place."""
    return list(dict.fromkeys(names))
