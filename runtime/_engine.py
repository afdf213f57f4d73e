from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from threading import get_ident
from typing import Any

from runtime._diff import diff_change, diff_scalars, diff_states
from runtime._errors import (
    ApplyError,
    InvalidIdError,
    InvalidTimeError,
    ReadError,
    RuntimeStoppedError,
    SchemaError,
)
from runtime._events import EntityChanged, ReadOnlyDict, new_change, thaw
from runtime._fast_metrics import PerThreadCells, link_counters
from runtime._log import TransitionLog, change_rows
from runtime._metrics import RuntimeMetrics
from runtime._schema import StateSchema, _Invalid, check_json_value
from runtime._secrets import RunSecrets, mask_text, mask_value

logger = logging.getLogger(__name__)

_APPLY_FAILURES = (Exception, SystemExit, KeyboardInterrupt)
"""What an ``apply`` may raise that fails its mutation with ``ApplyError``.

``apply`` runs on a kind's actor thread, where ``SystemExit`` or
``KeyboardInterrupt`` can only come from the function itself: it is a failed
write, not a request to stop the program.
"""

MAX_ID_LENGTH = 1024
"""The longest entity id accepted, in characters."""

ReadFn = Callable[[list[str]], Mapping[str, Any]]
JournalFn = Callable[[Any], None]
ApplyFn = Callable[[dict[str, Any] | None], Any]
CommitHook = Callable[[EntityChanged], None]

_NO_DELTA = ReadOnlyDict()
"""The delta of every tombstone."""


def check_entity_id(kind: str, entity_id: Any) -> str:
    """Return ``entity_id`` if it is a usable id, or raise :class:`InvalidIdError`.

    Ids are non-empty strings of at most ``MAX_ID_LENGTH`` characters with no
    control characters, so that they survive logs, files and metric labels.
    """
    if type(entity_id) is not str:
        raise InvalidIdError(kind, entity_id, "must be a string")
    if not entity_id:
        raise InvalidIdError(kind, entity_id, "must not be empty")
    if len(entity_id) > MAX_ID_LENGTH:
        raise InvalidIdError(
            kind, entity_id, f"is longer than {MAX_ID_LENGTH} characters"
        )
    if not entity_id.isprintable():
        raise InvalidIdError(
            kind, entity_id, "contains control or other non-printable characters"
        )
    return entity_id


_MIN_TS = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_MAX_TS = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def to_timestamp(
    at: datetime | float | None,
    clock: Callable[[], float],
    what: str = "'at'",
    outcome: str = "nothing recorded",
) -> float:
    """Return ``at`` as POSIX seconds, or the clock's time when ``at`` is None.

    ``what`` names the value in errors and ``outcome`` says what the refusal
    left undone.

    Raises:
        InvalidTimeError: ``at`` is naive, not a number, not finite, or outside
            the years 1 to 9999 (which a ``datetime`` cannot show).
    """
    if at is None:
        return check_clock_reading(clock())
    if isinstance(at, datetime):
        if at.tzinfo is None:
            raise InvalidTimeError(f"{what} must be timezone-aware, got naive {at!r}")
        return at.timestamp()
    if isinstance(at, bool) or not isinstance(at, int | float):
        raise InvalidTimeError(
            f"{what} must be a datetime or POSIX seconds, got {at!r}"
        )
    seconds = math.inf if abs(at) >= 1e300 else float(at)
    return check_timestamp(seconds, what, outcome)


def check_clock_reading(reading: Any) -> float:
    """Return a clock's reading as POSIX seconds, or raise InvalidTimeError.

    A clock must return a float or an int (not a bool) within the years 1 to
    9999; anything else fails the write it was read for, with nothing recorded.
    """
    if isinstance(reading, bool) or not isinstance(reading, int | float):
        raise InvalidTimeError(
            f"the runtime's clock gave {reading!r}, which is not a number of POSIX "
            "seconds; nothing recorded"
        )
    seconds = math.inf if abs(reading) >= 1e300 else float(reading)
    return check_timestamp(seconds, "the runtime's clock")


def check_timestamp(ts: float, what: str, outcome: str = "nothing recorded") -> float:
    """Return ``ts`` if it is a usable POSIX time, else raise InvalidTimeError."""
    if not _MIN_TS <= ts <= _MAX_TS:  # also false for NaN
        raise InvalidTimeError(
            f"{what} gave {ts!r}, which is not a time between the years 1 and 9999 "
            f"(POSIX seconds expected; milliseconds?); {outcome}"
        )
    return ts


class KindDefinition:
    """What ``define_entity`` recorded about one kind."""

    def __init__(
        self, kind: str, schema: StateSchema, read: ReadFn | None, shards: int
    ) -> None:
        self.kind = kind
        self.schema = schema
        self.read = read
        self.shards = shards

    @property
    def store_backed(self) -> bool:
        """Whether the runtime keeps this kind's current state itself."""
        return self.read is None


class KindEngine:
    """The single write path of one kind: snapshot, apply, validate, diff, commit.

    Not an actor itself: the kind's actor calls it from its own thread, which
    is what serialises the mutations of one id. Reads of the store from other
    threads are safe (single dict operations on immutable states).
    """

    def __init__(
        self,
        definition: KindDefinition,
        log: TransitionLog,
        metrics: RuntimeMetrics,
        clock: Callable[[], float],
        on_commit: CommitHook,
    ) -> None:
        self.definition = definition
        self.kind = definition.kind
        self.store: dict[str, ReadOnlyDict] = {}
        self._log = log
        self._clock = clock
        self._on_commit = on_commit
        self.journal: JournalFn | None = None
        """Called with each change's record before it is applied (persistence)."""
        self.secrets: RunSecrets | None = None
        """Run secrets to mask in rows, events and errors of writes with a run."""

        self._store_backed = definition.store_backed
        self._flat = definition.store_backed and definition.schema.flat
        """Store-backed, and states hold only scalars (a shallow copy is a copy)."""
        self._validate = definition.schema.validator
        self._diff = diff_scalars if definition.schema.flat else diff_change

        kind = self.kind
        self._changed = metrics.mutations.labels(kind, "changed")
        self._unchanged = metrics.mutations.labels(kind, "unchanged")
        self._rejected = metrics.mutations.labels(kind, "rejected")
        self._failed = metrics.mutations.labels(kind, "failed")
        self._committed = (
            link_counters(
                self._changed,
                metrics.transitions.labels(kind),
                metrics.changes.labels(kind),
            )
            if metrics.enabled
            else PerThreadCells(3)
        )
        """Per-thread cells of the three counters every commit bumps."""
        self._cells: tuple[int | None, list[float]] = (None, [])
        """The cells of the thread that committed last, with its id."""
        self.log_commits = logger.isEnabledFor(logging.DEBUG)
        """Whether commits are logged (at debug level); see :meth:`begin_burst`."""
        self._first_commit: dict[int, Callable[[int], None]] = {}
        """Per kind-actor thread, what its burst's first commit calls."""
        self._closed = False
        """Set by :meth:`close`: every later commit is refused."""
        if definition.store_backed:
            metrics.entities.labels(kind).set_function(lambda: len(self.store))

    def begin_burst(self, on_first_commit: Callable[[int], None] | None = None) -> None:
        """Start a burst of writes on the calling thread (a kind actor).

        Re-reads the logger's level, which decides whether commits are logged:
        a level change takes effect from the next burst, and a commit costs no
        logger call when debug logging is off. ``on_first_commit`` is called
        with the sequence number of the burst's first commit, under the log's
        lock, so a reader of ``last_seq`` under that lock never sees the
        change before the callback has run. :meth:`end_burst` forgets it.
        """
        self.log_commits = logger.isEnabledFor(logging.DEBUG)
        if on_first_commit is not None:
            self._first_commit[get_ident()] = on_first_commit

    def end_burst(self) -> None:
        """End the calling thread's burst (see :meth:`begin_burst`)."""
        self._first_commit.pop(get_ident(), None)

    def close(self) -> None:
        """Refuse every later commit with :class:`RuntimeStoppedError`.

        Called when the runtime stops, under the log's lock: a write whose
        ``apply`` was still running when ``stop()`` gave up on its kind actor
        then records nothing, instead of committing a change that no consumer
        would ever be handed and that the stop report could not list.
        """
        with self._log.lock:
            self._closed = True

    def count_failed(self) -> None:
        """Count a mutation refused before it reached the write path."""
        self._failed.inc()

    def read_states(self, ids: Sequence[str]) -> dict[str, ReadOnlyDict]:
        """Return the current states of ``ids`` that exist, read-only."""
        read = self.definition.read
        if read is None:
            store = self.store
            return {i: store[i] for i in ids if i in store}

        try:
            found = read(list(ids))
        except Exception as err:
            raise ReadError(self.kind, f"raised {type(err).__name__}: {err}") from err
        if not isinstance(found, Mapping):
            raise ReadError(
                self.kind,
                f"returned {type(found).__name__}, expected a mapping of id to state",
            )

        out = {}
        for entity_id in ids:
            state = found.get(entity_id)
            if state is None:
                continue
            try:
                out[entity_id] = check_json_value(state, "", 1)
            except _Invalid as err:
                raise ReadError(
                    self.kind,
                    f"returned an unusable state for {entity_id!r}: "
                    f"{err.path or 'state'} {err.reason}",
                ) from None
            if not isinstance(out[entity_id], dict):
                raise ReadError(
                    self.kind,
                    f"returned {type(state).__name__} for {entity_id!r}, "
                    "expected a mapping",
                )
        return out

    def mutate(
        self,
        entity_id: str,
        apply: ApplyFn,
        actor: str,
        run_id: str | None,
        at: float | None,
    ) -> tuple[ReadOnlyDict, EntityChanged | None]:
        """Run one mutation; return the validated next state and the change.

        The change is ``None`` when the write changed nothing. Nothing is
        recorded when ``apply`` raises or its result fails the schema.
        """
        if self._flat:
            # The common case, inlined: a store-backed kind of scalar fields.
            prev = self.store.get(entity_id)
            try:
                raw = apply(None if prev is None else dict(prev))
            except _APPLY_FAILURES as err:
                raise self._apply_failed(entity_id, err, run_id) from err
        else:
            prev = self._snapshot(entity_id)
            raw = self._apply(entity_id, apply, prev, run_id)

        refused: SchemaError | None = None
        try:
            next_state = self._validate(raw, self.kind, entity_id)
        except SchemaError as err:
            self._rejected.inc()
            pattern = self._secret_pattern(run_id)
            if pattern is None:
                raise
            refused = _masked_schema_error(err, pattern)
        if refused is not None:
            # Raised outside the handler, so the unmasked error is not its context.
            raise refused

        delta, changed_fields = self._diff(prev, next_state)
        if not changed_fields:
            self._unchanged.inc()
            return next_state, None

        change = self._commit(
            entity_id, prev, next_state, delta, changed_fields, actor, run_id, at
        )
        return next_state, change

    def remove(
        self,
        entity_id: str,
        apply: Callable[[dict[str, Any] | None], Any] | None,
        actor: str,
        run_id: str | None,
        at: float | None,
    ) -> EntityChanged | None:
        """Remove one entity; return the tombstone change, or ``None``.

        Removing an entity that does not exist is a no-op: ``apply`` is not
        called and nothing is recorded.
        """
        prev = self._snapshot(entity_id)
        if prev is None:
            self._unchanged.inc()
            return None

        if apply is not None:
            self._apply(entity_id, apply, prev, run_id)

        _, changed_fields = diff_states(prev, None)
        return self._commit(
            entity_id, prev, None, _NO_DELTA, changed_fields, actor, run_id, at
        )

    def _snapshot(self, entity_id: str) -> ReadOnlyDict | None:
        if self.definition.read is None:
            return self.store.get(entity_id)
        try:
            return self.read_states([entity_id]).get(entity_id)
        except ReadError:
            self._failed.inc()
            raise

    def _apply(
        self,
        entity_id: str,
        apply: ApplyFn,
        prev: ReadOnlyDict | None,
        run_id: str | None = None,
    ) -> Any:
        if prev is None:
            given = None
        elif self._flat:
            given = dict(prev)
        else:
            given = thaw(prev)
        try:
            return apply(given)
        except _APPLY_FAILURES as err:
            raise self._apply_failed(entity_id, err, run_id) from err

    def _apply_failed(
        self, entity_id: str, err: BaseException, run_id: str | None
    ) -> ApplyError:
        self._failed.inc()
        failure = ApplyError(self.kind, entity_id, err)
        pattern = self._secret_pattern(run_id)
        if pattern is not None:
            failure.args = (mask_text(str(failure), pattern),)
        return failure

    def _secret_pattern(self, run_id: str | None) -> re.Pattern[str] | None:
        if run_id is None or self.secrets is None:
            return None
        return self.secrets.pattern(run_id)

    def _commit(
        self,
        entity_id: str,
        prev: ReadOnlyDict | None,
        next_state: ReadOnlyDict | None,
        delta: ReadOnlyDict,
        changed_fields: tuple[str, ...],
        actor: str,
        run_id: str | None,
        at: float | None,
    ) -> EntityChanged:
        if at is None:
            ts = self._clock()
            if type(ts) is not float or not _MIN_TS <= ts <= _MAX_TS:
                ts = check_clock_reading(ts)
        else:
            ts = at
        kind = self.kind
        log = self._log
        store_backed = self._store_backed

        # Rows are built as triples only when they are journaled or masked (or
        # the change is a tombstone); otherwise the log takes them straight
        # from the states.
        pattern = None if run_id is None else self._secret_pattern(run_id)
        spec: list[list[Any]] | None = None
        shown_prev, shown_next, shown_delta = prev, next_state, delta
        if pattern is not None or self.journal is not None or next_state is None:
            spec = change_rows(prev, next_state, changed_fields)
        if pattern is not None:
            # Rows and events show masked values; the store keeps the state.
            spec = [
                [f, mask_value(b, pattern), mask_value(a, pattern)]
                for f, b, a in spec  # type: ignore[union-attr]
            ]
            shown_prev = mask_value(prev, pattern)
            shown_next = mask_value(next_state, pattern)
            shown_delta = mask_value(delta, pattern)

        with log.lock:
            if self._closed:
                self._failed.inc()
                raise RuntimeStoppedError(
                    f"{kind}/{entity_id}: the runtime stopped while this write was "
                    "running; nothing recorded"
                )
            seq = log.last_seq + 1
            if spec is None:
                log.append_states(
                    seq,
                    kind,
                    entity_id,
                    ts,
                    actor,
                    run_id,
                    prev,
                    changed_fields,
                    delta.values(),
                )
            else:
                if self.journal is not None:
                    self._journal_change(
                        seq,
                        entity_id,
                        ts,
                        actor,
                        run_id,
                        store_backed,
                        next_state,
                        spec,
                    )
                log.append_rows(
                    seq, kind, entity_id, ts, actor, run_id, spec, changed_fields
                )
            if self._first_commit:
                opener = self._first_commit.pop(get_ident(), None)
                if opener is not None:
                    opener(seq)
            if store_backed:
                if next_state is None:
                    del self.store[entity_id]
                else:
                    self.store[entity_id] = next_state
            change = new_change(
                (
                    kind,
                    entity_id,
                    shown_prev,
                    shown_next,
                    shown_delta,
                    changed_fields,
                    actor,
                    ts,
                    seq,
                    run_id,
                )
            )
            self._on_commit(change)

        owner, cells = self._cells
        if owner != get_ident():
            cells = self._committed.mine()
            self._cells = (get_ident(), cells)
        cells[0] += 1
        cells[1] += len(changed_fields) if spec is None else len(spec)
        cells[2] += 1
        if self.log_commits:
            logger.debug(
                "committed %s/%s seq=%d fields=%s", kind, entity_id, seq, changed_fields
            )
        return change

    def _journal_change(
        self,
        seq: int,
        entity_id: str,
        ts: float,
        actor: str,
        run_id: str | None,
        store_backed: bool,
        next_state: ReadOnlyDict | None,
        spec: list[list[Any]],
    ) -> None:
        from runtime._durability import ChangeRecord
        from runtime._persistence import DataDirError

        record = ChangeRecord(
            seq,
            self.kind,
            entity_id,
            ts,
            actor,
            run_id,
            store_backed,
            next_state if store_backed else None,
            spec,
        )
        try:
            self.journal(record)  # type: ignore[misc]
        except RuntimeStoppedError as err:
            self._failed.inc()
            raise RuntimeStoppedError(
                f"{self.kind}/{entity_id} seq={seq}: {err}; nothing recorded"
            ) from err
        except DataDirError as err:
            self._failed.inc()
            raise DataDirError(
                err.path,
                f"{self.kind}/{entity_id} seq={seq}: could not journal the change "
                f"({err.reason}); nothing recorded",
                err,
            ) from err

    def restore(self, entity_id: str, state: ReadOnlyDict | None) -> None:
        """Put a recorded state back in the store (used when restoring)."""
        if state is None:
            self.store.pop(entity_id, None)
        else:
            self.store[entity_id] = state


def _masked_schema_error(err: SchemaError, pattern: re.Pattern[str]) -> SchemaError:
    """A copy of ``err`` with the run's secrets masked in its field and reason."""
    field = None if err.field is None else mask_text(err.field, pattern)
    masked = SchemaError(err.kind, err.entity_id, field, mask_text(err.reason, pattern))
    masked.args = tuple(
        mask_text(arg, pattern) if isinstance(arg, str) else arg for arg in masked.args
    )
    return masked


def monotonic() -> float:
    """Seconds from a monotonic clock (for latencies, never for timestamps)."""
    return time.perf_counter()
