from __future__ import annotations

import logging
import threading
import weakref
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from itertools import repeat
from typing import Any

from sortedcontainers import SortedDict

from runtime._events import SYSTEM_ACTOR, Transition

logger = logging.getLogger(__name__)

_SLOT_BITS = 10
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_BLOCK_CHANGES = 1 << _SLOT_BITS
"""Changes per block: large enough that the ``SortedDict`` of blocks stays
small, small enough that copying or compacting one block is cheap."""

_make_row = Transition._from_columns


class _Dead:
    """The field of a pruned row that waits for its block to be compacted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<pruned row>"


_DEAD: Any = _Dead()


class _Block:
    """Columns for up to ``_BLOCK_CHANGES`` consecutive changes.

    Per change: ``seqs``, ``times``, ``ents`` (the change's :class:`_Entity`,
    ``None`` once every row of the change is pruned), ``actors``, ``run_ids``
    and ``starts``, the offsets of its rows (change ``i`` owns rows
    ``starts[i]`` to ``starts[i + 1]``). Per row: ``fields`` (``None`` for a
    tombstone, ``_DEAD`` for a pruned row), ``befores`` and ``afters``.
    ``dead`` counts pruned rows and ``gone`` pruned changes: they keep their
    places (values released) until the block is compacted.

    Only the last block takes appends. A block that a :class:`ChangeView`
    may still read (``epoch`` below a live pin) is never changed in place:
    pruning copies it first. Appends only add past the ends a view recorded,
    so they need no copy.

    A full block is *sealed*: see :meth:`seal`.
    """

    __slots__ = (
        "actors",
        "afters",
        "base",
        "befores",
        "dead",
        "ents",
        "epoch",
        "fields",
        "gone",
        "key",
        "run_ids",
        "seqs",
        "starts",
        "times",
    )

    def __init__(self, key: int, epoch: int) -> None:
        self.key = key
        self.base = key << _SLOT_BITS
        self.epoch = epoch
        # Sequences (and places) are positive: unsigned arrays take an append
        # without the generic argument parsing that signed ones go through.
        self.seqs = array("Q")
        self.times = array("d")
        self.ents: list[_Entity | None] = []
        self.actors: list[str] = []
        self.run_ids: list[str | None] = []
        self.starts = array("I", (0,))
        self.fields: list[Any] = []
        self.befores: list[Any] = []
        self.afters: list[Any] = []
        self.gone = 0
        self.dead = 0

    def copy(self, epoch: int) -> _Block:
        """Return an unshared, unsealed copy of the block's columns."""
        new = _Block(self.key, epoch)
        new.seqs = self.seqs[:]
        new.times = self.times[:]
        new.ents = self.ents[:]
        new.actors = list(self.actors)
        new.run_ids = list(self.run_ids)
        new.starts = self.starts[:]
        new.fields = list(self.fields)
        new.befores = list(self.befores)
        new.afters = list(self.afters)
        new.gone = self.gone
        new.dead = self.dead
        return new

    def seal(self) -> None:
        """Hold the columns of strings and values as tuples; the block is full.

        The cycle collector walks every element of a list on each pass that
        reaches it, but stops tracking a tuple of atomic values (strings,
        numbers, ``None``) after one pass: sealed, a log of scalar rows adds
        about half as much to each full collection. The columns keep their
        list type for the writers, which only change the open block or one
        that :meth:`unseal` has turned back into lists.
        """
        self.actors = tuple(self.actors)  # type: ignore[assignment]
        self.run_ids = tuple(self.run_ids)  # type: ignore[assignment]
        self.fields = tuple(self.fields)  # type: ignore[assignment]
        self.befores = tuple(self.befores)  # type: ignore[assignment]
        self.afters = tuple(self.afters)  # type: ignore[assignment]

    def unseal(self) -> None:
        """Turn sealed columns back into lists, before the block is changed."""
        if type(self.fields) is tuple:
            self.actors = list(self.actors)
            self.run_ids = list(self.run_ids)
            self.fields = list(self.fields)
            self.befores = list(self.befores)
            self.afters = list(self.afters)

    @property
    def live(self) -> int:
        """The number of changes with live rows."""
        return len(self.seqs) - self.gone

    def rows(self, i: int) -> tuple[Transition, ...]:
        """Materialise the live rows of change ``i``."""
        ent = self.ents[i]
        assert ent is not None
        seq, at = self.seqs[i], self.times[i]
        actor, run_id = self.actors[i], self.run_ids[i]
        fields, befores, afters = self.fields, self.befores, self.afters
        return tuple(
            _make_row(
                seq, ent.kind, ent.id, f, befores[r], afters[r], at, actor, run_id
            )
            for r in range(self.starts[i], self.starts[i + 1])
            if (f := fields[r]) is not _DEAD
        )


def _rebuild(key: int, epoch: int, parts: Sequence[_Block]) -> _Block:
    """Return one block holding the live changes and rows of ``parts``."""
    new = _Block(key, epoch)
    fields, befores, afters = new.fields, new.befores, new.afters

    for block in parts:
        starts = block.starts
        for i, ent in enumerate(block.ents):
            if ent is None:
                continue
            new.seqs.append(block.seqs[i])
            new.times.append(block.times[i])
            new.ents.append(ent)
            new.actors.append(block.actors[i])
            new.run_ids.append(block.run_ids[i])
            for r in range(starts[i], starts[i + 1]):
                if block.fields[r] is not _DEAD:
                    fields.append(block.fields[r])
                    befores.append(block.befores[r])
                    afters.append(block.afters[r])
            new.starts.append(len(fields))

    return new


class _Entity:
    """The index of one entity's changes, in sequence order.

    ``seqs``, ``times`` and ``places`` have one entry per change with live
    rows; a place is the key of the block holding the change shifted left by
    ``_SLOT_BITS``, plus the change's slot in that block (rewritten when the
    block is compacted), so one array finds a change without a search.
    ``by_field`` maps a field to the seqs of its rows, one entry per row (a
    tombstone counts under every field the entity had). Entries are seqs, not
    positions, so pruning the oldest changes never renumbers what stays.
    """

    __slots__ = (
        "by_field",
        "id",
        "kind",
        "nrows",
        "ordered",
        "places",
        "removed",
        "seqs",
        "times",
    )

    def __init__(self, kind: str, entity_id: str) -> None:
        self.kind = kind
        self.id = entity_id
        self.seqs = array("Q")
        self.times = array("d")
        self.places = array("Q")
        self.by_field: dict[str | None, array[int]] = {}
        self.nrows = 0
        self.ordered = True
        self.removed = False


class ChangeView:
    """A frozen view of the log's changes, read outside the log's lock.

    Taking the view copies only block references and their current lengths
    (O(blocks)), under the lock. The blocks are *pinned* while the view is
    alive: pruning copies a pinned block before changing it, and appends only
    add past the recorded ends, so iterating later sees exactly the changes
    of the moment the view was taken, however the log moves on meanwhile.

    ``len()`` is the number of changes; iterating yields each change's rows
    as a tuple of :class:`Transition`, in sequence order; :meth:`encoded`
    yields the snapshot records.
    """

    __slots__ = ("__weakref__", "_count", "_parts")

    def __init__(self, parts: list[tuple[_Block, int, int]], count: int) -> None:
        self._parts = parts
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[Transition, ...]]:
        for block, lo, hi in self._parts:
            ents = block.ents
            for i in range(lo, hi):
                if ents[i] is not None:
                    yield block.rows(i)

    def encoded(self) -> Iterator[list[Any]]:
        """Yield ``[seq, kind, id, time, actor, run_id, rows]`` per change.

        ``rows`` are the ``[field, before, after]`` triples of the change (a
        tombstone is ``[None, prev, None]``): the snapshot's change records.
        """
        for block, lo, hi in self._parts:
            ents, starts = block.ents, block.starts
            fields, befores, afters = block.fields, block.befores, block.afters
            for i in range(lo, hi):
                ent = ents[i]
                if ent is None:
                    continue
                rows = [
                    [f, befores[r], afters[r]]
                    for r in range(starts[i], starts[i + 1])
                    if (f := fields[r]) is not _DEAD
                ]
                at, actor, run_id = block.times[i], block.actors[i], block.run_ids[i]
                yield [block.seqs[i], ent.kind, ent.id, at, actor, run_id, rows]


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

    Rows are stored as columns, not objects: a ``SortedDict`` keyed by the
    first sequence number of each *block* holds up to ``_BLOCK_CHANGES``
    changes in arrays and lists (one entry per change for its sequence, time,
    entity, actor and run id, one per row for field, before and after), so a
    row costs a few machine words plus its values. Each ``(kind, id)`` has an
    index of its changes (sequences, times and places in blocks, in arrays)
    and, per field, the sequences of that field's rows, so the queries of one
    entity cost O(log n + k) for k rows answered, whatever the size of the
    log. :class:`Transition` objects are built only when rows are read, so a
    read costs more than handing out stored objects would (a few microseconds
    for ten rows) while a row takes about a third of the memory.

    The log also owns the runtime's sequence counter: ``append_change``
    assigns the next number and appends the rows atomically, under the log's
    lock, so sequence order is commit order. All methods are thread-safe.

    Pruned rows are marked dead in place and their values released at once; a
    block that becomes mostly dead is compacted (joined with the block before
    it when both fit in one), and an empty block is dropped.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._blocks: SortedDict = SortedDict()
        self._open: _Block | None = None
        self._entities: dict[tuple[str, str], _Entity] = {}
        self._row_count = 0
        self._epoch = 0
        self._pins: list[tuple[int, weakref.ref[ChangeView]]] = []
        self.last_seq = 0

    def __len__(self) -> int:
        """The number of rows in the log."""
        return self._row_count

    def clear(self) -> None:
        """Forget every row and restart numbering (a failed restore's undo)."""
        with self.lock:
            self._blocks.clear()
            self._open = None
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
            self.append_rows(
                seq, kind, entity_id, at, actor, run_id, spec, changed_fields
            )
            block = self._open
            assert block is not None
            return seq, block.rows(len(block.seqs) - 1)

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
    ) -> int:
        """Record one change given as ``[field, before, after]`` triples.

        A tombstone is the single triple ``[None, prev, None]``; its
        ``changed_fields`` are the fields ``prev`` had. Used by the write path
        (which journals the same triples first) and by restores. Returns the
        number of rows recorded; no row object is built.

        Cost: amortised O(rows of the change); a new block is added to the
        ``SortedDict`` once every ``_BLOCK_CHANGES`` changes.

        Raises:
            ValueError: ``seq`` is not after the log's last sequence, or
                ``spec`` is empty.
        """
        # acquire/release rather than ``with``: on a call this short, the
        # context manager protocol is a measurable share of the cost.
        lock = self.lock
        lock.acquire()
        try:
            if seq <= self.last_seq:
                raise ValueError(
                    f"sequence {seq} is not after the log's last sequence "
                    f"{self.last_seq}"
                )
            try:
                tombstone = spec[0][0] is None
            except IndexError:
                raise ValueError(
                    f"change {seq} of {kind}/{entity_id} has no rows"
                ) from None
            if type(at) is not float:
                at = at.timestamp() if isinstance(at, datetime) else float(at)

            block = self._open
            if block is None or len(block.seqs) >= _BLOCK_CHANGES:
                if block is not None:
                    block.seal()
                block = self._open = _Block(seq, self._epoch)
                self._blocks[seq] = block
            slot = len(block.seqs)
            entity = self._entities.get((kind, entity_id))
            if entity is None:
                entity = self._entities[(kind, entity_id)] = _Entity(kind, entity_id)

            block.seqs.append(seq)
            block.times.append(at)
            block.ents.append(entity)
            block.actors.append(actor)
            block.run_ids.append(run_id)
            fields, befores, afters = block.fields, block.befores, block.afters
            by_field = entity.by_field
            if tombstone:
                for field, before, after in spec:
                    fields.append(field)
                    befores.append(before)
                    afters.append(after)
                for name in changed_fields:
                    _index_row(by_field, name, seq)
            else:
                for field, before, after in spec:
                    fields.append(field)
                    befores.append(before)
                    afters.append(after)
                    try:
                        by_field[field].append(seq)
                    except KeyError:
                        by_field[field] = array("Q", (seq,))
            block.starts.append(len(fields))

            times = entity.times
            if times and at < times[-1]:
                entity.ordered = False
            entity.seqs.append(seq)
            times.append(at)
            entity.places.append(block.base + slot)
            entity.removed = field is None
            count = len(spec)
            entity.nrows += count
            self._row_count += count
            self.last_seq = seq
            return count
        finally:
            lock.release()

    def append_states(
        self,
        seq: int,
        kind: str,
        entity_id: str,
        at: float,
        actor: str,
        run_id: str | None,
        prev: Mapping[str, Any] | None,
        changed_fields: tuple[str, ...],
        afters: Iterable[Any],
    ) -> None:
        """Record one change that keeps its entity, straight from its states.

        Records what :meth:`append_rows` records for the triples of
        :func:`change_rows`, without building them: ``afters`` are the new
        values of ``changed_fields`` in order (``None`` for a field the entity
        lost), ``prev`` gives the old ones. The write path's common case: the
        caller holds ``lock``, numbers the change ``last_seq + 1``, gives at
        least one field and needs nothing masked or journaled.
        """
        if type(at) is not float:
            at = at.timestamp() if isinstance(at, datetime) else float(at)

        block = self._open
        if block is None or len(block.seqs) >= _BLOCK_CHANGES:
            if block is not None:
                block.seal()
            block = self._open = _Block(seq, self._epoch)
            self._blocks[seq] = block
        key = (kind, entity_id)
        entity = self._entities.get(key)
        if entity is None:
            entity = self._entities[key] = _Entity(kind, entity_id)

        # One extend per row column: the rows never exist as triples.
        place = block.base + len(block.seqs)
        block.seqs.append(seq)
        block.times.append(at)
        block.ents.append(entity)
        block.actors.append(actor)
        block.run_ids.append(run_id)
        fields = block.fields
        fields.extend(changed_fields)
        if prev is None:
            block.befores.extend(repeat(None, len(changed_fields)))
        else:
            block.befores.extend(map(prev.get, changed_fields))
        block.afters.extend(afters)
        block.starts.append(len(fields))

        by_field = entity.by_field
        for field in changed_fields:
            try:
                by_field[field].append(seq)
            except KeyError:
                by_field[field] = array("Q", (seq,))
        times = entity.times
        if times and at < times[-1]:
            entity.ordered = False
        entity.seqs.append(seq)
        times.append(at)
        entity.places.append(place)
        entity.removed = False
        count = len(changed_fields)
        entity.nrows += count
        self._row_count += count
        self.last_seq = seq

    def advance_to(self, seq: int) -> None:
        """Continue numbering after ``seq`` (restores with no rows left)."""
        with self.lock:
            self.last_seq = max(self.last_seq, seq)

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
            if field is None:
                return self._rows_between(entity, since, until)

            index = entity.by_field.get(field)
            if not index:
                return []
            picked = _field_window(entity, index, since, until)
            out: list[Transition] = []
            last = None
            for seq in picked:
                if seq != last:
                    self._field_rows(entity, seq, field, out)
                    last = seq
            return out

    def last_change(self, kind: str, entity_id: str, field: str) -> Transition | None:
        """Return the newest row of one field of one entity, or ``None``."""
        with self.lock:
            entity = self._entities.get((kind, entity_id))
            if entity is None:
                return None
            index = entity.by_field.get(field)
            if not index:
                return None
            out: list[Transition] = []
            self._field_rows(entity, index[-1], field, out)
            return out[-1]

    def has_field(self, kind: str, entity_id: str, field: str) -> bool:
        """Whether the log holds a row of ``field`` for one entity."""
        with self.lock:
            entity = self._entities.get((kind, entity_id))
            return entity is not None and bool(entity.by_field.get(field))

    def count_since(self, kind: str, entity_id: str, field: str, since: float) -> int:
        """Count the rows of one field at or after ``since`` (POSIX time)."""
        with self.lock:
            entity = self._entities.get((kind, entity_id))
            if entity is None:
                return 0
            index = entity.by_field.get(field)
            if not index:
                return 0
            return len(_field_window(entity, index, since, None))

    def changes_since(self, seq: int) -> Iterator[tuple[Transition, ...]]:
        """Yield the rows of every change after ``seq``, in sequence order.

        The changes are pinned under the lock in one step (a
        :class:`ChangeView`), so a concurrent writer or prune cannot make the
        iteration skip or repeat a change; rows are built as they are yielded.
        """
        with self.lock:
            view = self._view(seq)
        yield from view

    def snapshot_changes(self) -> ChangeView:
        """Return a frozen view of every change (call under ``lock``).

        Cost under the lock: O(blocks), not O(rows); the view is read and
        encoded after the lock is released (see :class:`ChangeView`).
        """
        with self.lock:
            return self._view(0)

    def entity_keys(self) -> list[tuple[str, str]]:
        """Return every ``(kind, id)`` that has rows in the log."""
        with self.lock:
            return list(self._entities)

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
        Dropped rows release their values at once; then, one block per taking
        of the lock, emptied blocks are dropped and mostly dead ones compacted.
        """
        if older_than is None and max_rows is None and removed_before is None:
            return 0

        with self.lock:
            entities = list(self._entities.items())
        keys = [
            key
            for key, entity in entities
            if _may_prune(entity, older_than, max_rows, removed_before)
        ]

        dropped = 0
        touched: set[int] = set()
        for start in range(0, len(keys), batch):
            with self.lock:
                for key in keys[start : start + batch]:
                    dropped += self._prune_entity(
                        key, older_than, max_rows, removed_before, touched
                    )
        for block_key in sorted(touched):
            with self.lock:
                self._tidy(block_key)
        if dropped:
            logger.debug("retention dropped %d transition rows", dropped)
        return dropped

    def block_count(self) -> int:
        """The number of blocks the log's changes are stored in."""
        with self.lock:
            return len(self._blocks)

    def check(self) -> None:
        """Verify the log's invariants; raise ``AssertionError`` if broken.

        Used by tests after random operations: block keys and sequences
        increase, column lengths and live counts agree, every entity's index
        points at live rows of that entity and every live change is indexed,
        row counts agree.
        """
        with self.lock:
            total = 0
            changes = 0
            previous_seq = 0
            for key, block in self._blocks.items():
                assert block.key == key, (key, block.key)
                assert block.seqs, f"empty block {key}"
                assert previous_seq < key <= block.seqs[0], key
                assert list(block.seqs) == sorted(set(block.seqs)), key
                previous_seq = block.seqs[-1]
                n = len(block.seqs)
                assert len(block.times) == len(block.ents) == n
                assert len(block.actors) == len(block.run_ids) == n
                assert len(block.starts) == n + 1
                assert block.starts[0] == 0
                assert list(block.starts) == sorted(block.starts)
                rows = len(block.fields)
                assert block.starts[-1] == rows
                assert len(block.befores) == len(block.afters) == rows
                dead = [r for r in range(rows) if block.fields[r] is _DEAD]
                assert len(dead) == block.dead, (key, len(dead), block.dead)
                assert all(block.befores[r] is block.afters[r] is None for r in dead)
                live = 0
                for i, ent in enumerate(block.ents):
                    span = range(block.starts[i], block.starts[i + 1])
                    alive = sum(block.fields[r] is not _DEAD for r in span)
                    if ent is None:
                        assert alive == 0, (key, i)
                        continue
                    assert alive > 0, (key, i)
                    assert self._entities[(ent.kind, ent.id)] is ent
                    live += 1
                    total += alive
                assert live == block.live, (key, live, block.live)
                changes += live
            assert previous_seq <= self.last_seq
            assert self._open is None or self._open is self._blocks.values()[-1]
            assert self._open is None or type(self._open.fields) is list
            assert total == self._row_count, (total, self._row_count)

            indexed = 0
            for key, entity in self._entities.items():
                self._check_entity(key, entity)
                indexed += len(entity.seqs)
            assert indexed == changes, (indexed, changes)

    def _check_entity(self, key: tuple[str, str], entity: _Entity) -> None:
        assert key == (entity.kind, entity.id)
        seqs = list(entity.seqs)
        assert seqs, key
        assert seqs == sorted(set(seqs)), key
        assert len(entity.times) == len(entity.places) == len(seqs)
        if entity.ordered:
            assert list(entity.times) == sorted(entity.times), key

        nrows = 0
        last_field: Any = _DEAD
        expected: dict[str | None, Counter[int]] = {}
        tombstones: set[int] = set()
        for p, seq in enumerate(seqs):
            block, i = self._locate(entity, p)
            assert block.seqs[i] == seq, (key, p)
            assert block.ents[i] is entity, (key, p)
            assert block.times[i] == entity.times[p], (key, p)
            span = range(block.starts[i], block.starts[i + 1])
            live = [block.fields[r] for r in span if block.fields[r] is not _DEAD]
            nrows += len(live)
            last_field = live[-1]
            if None in live:
                tombstones.add(seq)
                continue
            for field in live:
                expected.setdefault(field, Counter())[seq] += 1
        assert nrows == entity.nrows, (key, nrows, entity.nrows)
        assert entity.removed == (last_field is None), key

        # Every row is indexed under its field; a tombstone under any fields.
        for field, index in entity.by_field.items():
            assert index, (key, field)
            assert list(index) == sorted(index), (key, field)
            got = Counter(seq for seq in index if seq not in tombstones)
            assert got == expected.pop(field, Counter()), (key, field)
            assert set(index) <= set(seqs), (key, field)
        assert not expected, (key, list(expected))

    def _locate(self, entity: _Entity, p: int) -> tuple[_Block, int]:
        place = entity.places[p]
        block: _Block = self._blocks[place >> _SLOT_BITS]
        return block, place & _SLOT_MASK

    def _rows_between(
        self, entity: _Entity, since: float | None, until: float | None
    ) -> list[Transition]:
        times = entity.times
        if since is None and until is None:
            positions: Sequence[int] = range(len(times))
        elif entity.ordered:
            lo = 0 if since is None else bisect_left(times, since)
            hi = len(times) if until is None else bisect_left(times, until)
            positions = range(lo, hi)
        else:
            positions = [
                p
                for p, t in enumerate(times)
                if (since is None or t >= since) and (until is None or t < until)
            ]

        out: list[Transition] = []
        blocks, seqs = self._blocks, entity.seqs
        places = entity.places
        kind, entity_id = entity.kind, entity.id
        for p in positions:
            seq = seqs[p]
            place = places[p]
            block = blocks[place >> _SLOT_BITS]
            i = place & _SLOT_MASK
            at, actor, run_id = times[p], block.actors[i], block.run_ids[i]
            fields, befores, afters = block.fields, block.befores, block.afters
            for r in range(block.starts[i], block.starts[i + 1]):
                f = fields[r]
                if f is not _DEAD:
                    out.append(
                        _make_row(
                            seq,
                            kind,
                            entity_id,
                            f,
                            befores[r],
                            afters[r],
                            at,
                            actor,
                            run_id,
                        )
                    )
        return out

    def _field_rows(
        self, entity: _Entity, seq: int, field: str, out: list[Transition]
    ) -> None:
        p = bisect_left(entity.seqs, seq)
        block, i = self._locate(entity, p)
        at, actor, run_id = entity.times[p], block.actors[i], block.run_ids[i]
        fields, befores, afters = block.fields, block.befores, block.afters
        for r in range(block.starts[i], block.starts[i + 1]):
            f = fields[r]
            if f is None or f == field:
                out.append(
                    _make_row(
                        seq,
                        entity.kind,
                        entity.id,
                        f,
                        befores[r],
                        afters[r],
                        at,
                        actor,
                        run_id,
                    )
                )

    def _view(self, after: int) -> ChangeView:
        """Pin the blocks holding changes after ``after`` (under ``lock``)."""
        blocks = self._blocks
        first = max(blocks.bisect_right(after) - 1, 0)
        parts: list[tuple[_Block, int, int]] = []
        count = 0
        for key in blocks.islice(first):
            block: _Block = blocks[key]
            hi = len(block.seqs)
            lo = bisect_right(block.seqs, after) if block.seqs[0] <= after else 0
            parts.append((block, lo, hi))
            if lo == 0:
                count += block.live
            else:
                count += sum(e is not None for e in block.ents[lo:hi])

        view = ChangeView(parts, count)
        self._pins = [pin for pin in self._pins if pin[1]() is not None]
        self._epoch += 1
        self._pins.append((self._epoch, weakref.ref(view)))
        return view

    def _writable(self, key: int) -> _Block:
        """Return block ``key`` unsealed, first replaced by a copy if a view pins it."""
        block: _Block = self._blocks[key]
        if self._pins:
            self._pins = [pin for pin in self._pins if pin[1]() is not None]
            pinned_below = max((epoch for epoch, _ in self._pins), default=0)
            if block.epoch < pinned_below:
                old, block = block, block.copy(self._epoch)
                self._blocks[key] = block
                if self._open is old:
                    self._open = block
        block.unseal()
        return block

    def _prune_entity(
        self,
        key: tuple[str, str],
        older_than: float | None,
        max_rows: int | None,
        removed_before: float | None,
        touched: set[int],
    ) -> int:
        entity = self._entities.get(key)
        if entity is None:
            return 0
        if (
            removed_before is not None
            and entity.removed
            and entity.times[-1] < removed_before
        ):
            return self._forget_entity(key, entity, touched)

        # Only changes before both the row cut and the time cut can lose rows
        # (every change when times are out of order).
        seqs, times, n = entity.seqs, entity.times, len(entity.seqs)
        cut = entity.nrows - max_rows if max_rows is not None else 0
        if older_than is None:
            time_end = 0
        elif entity.ordered:
            time_end = bisect_left(times, older_than)
        else:
            time_end = n
        newest: dict[int, list[str | None]] = {}
        for field, index in entity.by_field.items():
            newest.setdefault(index[-1], []).append(field)

        doomed: list[tuple[int, list[int], bool]] = []
        row_index = 0
        end = 0
        while end < n and (end < time_end or row_index < cut):
            p = end
            end += 1
            block, i = self._locate(entity, p)
            fields = block.fields
            kept = _kept_rows(block, i, newest[seqs[p]]) if seqs[p] in newest else ()
            old = older_than is not None and times[p] < older_than
            gone = []
            live = 0
            for r in range(block.starts[i], block.starts[i + 1]):
                if fields[r] is _DEAD:
                    continue
                if (row_index < cut or old) and r not in kept:
                    gone.append(r)
                row_index += 1
                live += 1
            if gone:
                doomed.append((p, gone, len(gone) == live))
        if not doomed:
            return 0

        dropped = self._drop_rows(entity, doomed, end, touched)
        if not entity.seqs:
            del self._entities[key]
        return dropped

    def _drop_rows(
        self,
        entity: _Entity,
        doomed: list[tuple[int, list[int], bool]],
        end: int,
        touched: set[int],
    ) -> int:
        """Kill ``doomed`` rows, all among the first ``end`` changes; reindex.

        Each entry is a change's position, its rows to kill and whether that
        leaves the change without rows.
        """
        seqs = entity.seqs
        limit = seqs[end] if end < len(seqs) else None
        dropped = 0
        emptied: set[int] = set()
        lost: dict[str | None, dict[int, int]] = {}
        tombstones: set[int] = set()
        for p, rows, empties in doomed:
            place = entity.places[p]
            block = self._writable(place >> _SLOT_BITS)
            touched.add(block.key)
            fields, befores, afters = block.fields, block.befores, block.afters
            seq = seqs[p]
            for r in rows:
                field = fields[r]
                if field is None:
                    tombstones.add(seq)
                else:
                    counts = lost.get(field)
                    if counts is None:
                        counts = lost[field] = {}
                    counts[seq] = counts.get(seq, 0) + 1
                fields[r] = _DEAD
                befores[r] = afters[r] = None
            block.dead += len(rows)
            dropped += len(rows)
            if empties:
                block.ents[place & _SLOT_MASK] = None
                block.gone += 1
                emptied.add(p)

        if emptied:
            keep = [p for p in range(end) if p not in emptied]
            for name in ("seqs", "times", "places"):
                column = getattr(entity, name)
                fresh = array(column.typecode, [column[p] for p in keep])
                fresh += column[end:]
                setattr(entity, name, fresh)
        for field, index in list(entity.by_field.items()):
            gone = lost.get(field)
            if gone is None and not tombstones:
                continue
            stop = len(index) if limit is None else bisect_left(index, limit)
            fresh = array("Q", _without(index[:stop], gone or {}, tombstones))
            if len(fresh) == stop:
                continue
            fresh += index[stop:]
            if fresh:
                entity.by_field[field] = fresh
            else:
                del entity.by_field[field]

        entity.nrows -= dropped
        self._row_count -= dropped
        if limit is None and entity.seqs:
            block, i = self._locate(entity, len(entity.seqs) - 1)
            span = range(block.starts[i], block.starts[i + 1])
            live = [block.fields[r] for r in span if block.fields[r] is not _DEAD]
            entity.removed = live[-1] is None
        return dropped

    def _forget_entity(
        self, key: tuple[str, str], entity: _Entity, touched: set[int]
    ) -> int:
        for place in entity.places:
            block = self._writable(place >> _SLOT_BITS)
            i = place & _SLOT_MASK
            touched.add(block.key)
            for r in range(block.starts[i], block.starts[i + 1]):
                if block.fields[r] is not _DEAD:
                    block.fields[r] = _DEAD
                    block.befores[r] = block.afters[r] = None
                    block.dead += 1
            block.ents[i] = None
            block.gone += 1

        del self._entities[key]
        self._row_count -= entity.nrows
        return entity.nrows

    def _tidy(self, key: int) -> None:
        """Drop block ``key`` if empty, compact it if mostly dead (under lock).

        A compacted block joins the block before it when both fit in one, so
        blocks that keep only a few long-lived rows do not pile up.
        """
        blocks = self._blocks
        block: _Block | None = blocks.get(key)
        if block is None:
            return
        if not block.live:
            del blocks[key]
            if self._open is block:
                self._open = None
            return
        if block.dead * 2 < len(block.fields):
            return

        index = blocks.index(key)
        before: _Block | None = blocks.peekitem(index - 1)[1] if index else None
        if before is not None and before.live + block.live <= _BLOCK_CHANGES:
            merged = _rebuild(before.key, self._epoch, (before, block))
            del blocks[key]
        else:
            merged = _rebuild(key, self._epoch, (block,))
        blocks[merged.key] = merged
        if self._open is block:
            self._open = merged
        else:
            merged.seal()
        for i, ent in enumerate(merged.ents):
            assert ent is not None
            p = bisect_left(ent.seqs, merged.seqs[i])
            ent.places[p] = merged.base + i


def _index_row(by_field: dict[str | None, array[int]], field: str, seq: int) -> None:
    index = by_field.get(field)
    if index is None:
        index = by_field[field] = array("Q")
    index.append(seq)


def _without(seqs: array[int], gone: dict[int, int], tombstones: set[int]) -> list[int]:
    """``seqs`` less ``gone`` (a count per seq) and every tombstone seq."""
    left = []
    for seq in seqs:
        count = gone.get(seq)
        if count:
            gone[seq] = count - 1
        elif seq not in tombstones:
            left.append(seq)
    return left


def _kept_rows(block: _Block, i: int, fields: list[str | None] | None) -> set[int]:
    """The rows of change ``i`` that are the newest row of one of ``fields``."""
    kept: set[int] = set()
    for field in fields or ():
        for r in reversed(range(block.starts[i], block.starts[i + 1])):
            f = block.fields[r]
            if f is None or f == field:
                kept.add(r)
                break
    return kept


def _field_window(
    entity: _Entity, index: array[int], since: float | None, until: float | None
) -> Sequence[int]:
    """The entries of a field index (seqs, one per row) within a time window."""
    if since is None and until is None:
        return index
    seqs, times = entity.seqs, entity.times
    if entity.ordered:
        n = len(times)
        lo = 0 if since is None else bisect_left(times, since)
        hi = n if until is None else bisect_left(times, until)
        first = bisect_left(index, seqs[lo]) if lo < n else len(index)
        stop = bisect_left(index, seqs[hi]) if hi < n else len(index)
        return index[first:stop]
    return [
        seq
        for seq in index
        if (since is None or times[bisect_left(seqs, seq)] >= since)
        and (until is None or times[bisect_left(seqs, seq)] < until)
    ]


def _may_prune(
    entity: _Entity,
    older_than: float | None,
    max_rows: int | None,
    removed_before: float | None,
) -> bool:
    """Whether an entity may have rows to drop (read without the lock)."""
    times = entity.times
    if not times:
        return False
    return (
        (max_rows is not None and entity.nrows > max_rows)
        or (older_than is not None and times[0] < older_than)
        or (
            removed_before is not None and entity.removed and times[-1] < removed_before
        )
    )
