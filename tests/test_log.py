from __future__ import annotations

import dataclasses
import gc
import weakref
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import _log, diff_states
from runtime._events import Transition
from runtime._log import TransitionLog


def _log_with_history() -> TransitionLog:
    log = TransitionLog()
    log.append_change("k", "a", None, {"s": 1, "t": "x"}, ("s", "t"), at=100.0)
    log.append_change("k", "b", None, {"s": 5, "t": "y"}, ("s", "t"), at=101.0)
    log.append_change("k", "a", {"s": 1, "t": "x"}, {"s": 2, "t": "x"}, ("s",), 110.0)
    log.append_change("k", "a", {"s": 2, "t": "x"}, {"s": 3, "t": "z"}, ("s", "t"), 120)
    log.append_change("k", "a", {"s": 3, "t": "z"}, None, ("s", "t"), at=130.0)
    return log


def test_sequence_numbers_increase_by_one_per_change() -> None:
    log = _log_with_history()

    seqs = [rows[0].seq for rows in log.changes_since(0)]

    assert seqs == [1, 2, 3, 4, 5]
    assert log.last_seq == 5
    assert len(log) == 8
    log.check()


def test_history_returns_only_that_entity_in_commit_order() -> None:
    log = _log_with_history()

    rows = log.history("k", "a")

    assert [(r.seq, r.field) for r in rows] == [
        (1, "s"),
        (1, "t"),
        (3, "s"),
        (4, "s"),
        (4, "t"),
        (5, None),
    ]
    assert rows[-1].tombstone
    assert rows[-1].before == {"s": 3, "t": "z"}
    assert rows[-1].after is None


def test_history_by_field_includes_the_tombstone() -> None:
    log = _log_with_history()

    rows = log.history("k", "a", field="t")

    assert [(r.seq, r.before, r.after) for r in rows] == [
        (1, None, "x"),
        (4, "x", "z"),
        (5, {"s": 3, "t": "z"}, None),
    ]


def test_history_time_window_is_inclusive_then_exclusive() -> None:
    log = _log_with_history()

    rows = log.history("k", "a", field="s", since=110.0, until=130.0)

    assert [r.seq for r in rows] == [3, 4]


def test_history_of_an_unknown_entity_is_empty() -> None:
    log = _log_with_history()

    assert log.history("k", "nope") == []
    assert log.history("other", "a") == []
    assert log.history("k", "a", field="nope") == []


def test_last_change_and_count_since_use_the_field_index() -> None:
    log = _log_with_history()

    last = log.last_change("k", "a", "t")
    count = log.count_since("k", "a", "s", since=110.0)

    assert last is not None
    assert last.seq == 5
    assert count == 3


def test_rows_out_of_time_order_are_still_filtered_correctly() -> None:
    log = TransitionLog()
    log.append_change("k", "a", None, {"s": 1}, ("s",), at=200.0)
    log.append_change("k", "a", {"s": 1}, {"s": 2}, ("s",), at=100.0)
    log.append_change("k", "a", {"s": 2}, {"s": 3}, ("s",), at=300.0)

    rows = log.history("k", "a", since=150.0)

    assert [r.seq for r in rows] == [1, 3]


def test_restored_sequence_must_come_after_the_last_one() -> None:
    log = _log_with_history()

    with pytest.raises(ValueError, match="not after the log's last sequence 5"):
        log.append_change("k", "c", None, {"s": 1}, ("s",), at=1.0, seq=5)

    assert log.last_seq == 5
    log.check()


def test_changes_since_skips_what_was_seen() -> None:
    log = _log_with_history()

    seqs = [rows[0].seq for rows in log.changes_since(3)]

    assert seqs == [4, 5]


def test_prune_forgets_entities_removed_long_enough_ago() -> None:
    log = _log_with_history()
    log.append_change("k", "c", None, {"s": 1}, ("s",), at=140.0)

    dropped = log.prune(max_rows=1, removed_before=131.0)

    assert log.history("k", "a") == []
    assert [r.seq for r in log.history("k", "c")] == [6]
    assert [r.seq for r in log.history("k", "b")] == [2, 2]
    assert dropped == 6
    log.check()


def test_prune_keeps_a_recent_tombstone_and_each_fields_newest_row() -> None:
    log = _log_with_history()

    log.prune(max_rows=1, older_than=1000.0, removed_before=129.0)

    rows = log.history("k", "a")
    assert [r.seq for r in rows] == [5]
    assert rows[0].tombstone
    log.check()


def test_append_rows_returns_how_many_rows_it_recorded() -> None:
    log = TransitionLog()

    count = log.append_rows(
        1, "k", "a", 10.0, "system", None, [["s", None, 1], ["t", None, 2]], ("s", "t")
    )

    assert count == 2
    assert len(log) == 2
    assert [r.field for r in log.history("k", "a")] == ["s", "t"]


class _Value:
    """A value that can be watched with a weak reference."""


def test_prune_releases_dropped_values_and_emptied_blocks() -> None:
    log = TransitionLog()
    refs: list[weakref.ref[_Value]] = []
    latest: dict[str, list[_Value | None]] = {}
    for seq in range(1, 5001):
        entity_id = f"e{seq % 10}"
        before = latest.get(entity_id, [None, None])
        after = [_Value(), _Value()]
        refs += [weakref.ref(v) for v in after]
        spec = [["s", before[0], after[0]], ["t", before[1], after[1]]]
        log.append_rows(seq, "k", entity_id, float(seq), "system", None, spec, ())
        latest[entity_id] = list(after)
    blocks_before = log.block_count()
    del after, before, spec
    latest.clear()

    dropped = log.prune(max_rows=1)
    gc.collect()

    assert dropped == 10_000 - 20
    assert len(log) == 20
    assert blocks_before == 5
    assert log.block_count() == 1
    assert sum(ref() is not None for ref in refs) == 40
    assert [r.seq for r in log.history("k", "e3")] == [4993, 4993]
    log.check()


def test_a_snapshot_view_keeps_what_it_saw_while_the_log_moves_on() -> None:
    log = _log_with_history()
    view = log.snapshot_changes()
    seen = list(log.snapshot_changes().encoded())

    log.prune(max_rows=1, older_than=1000.0, removed_before=1000.0)
    log.append_change("k", "c", None, {"s": 1}, ("s",), at=140.0)

    assert len(view) == 5
    assert list(view.encoded()) == seen
    assert [rows[0].seq for rows in view] == [1, 2, 3, 4, 5]
    assert seen[4] == [
        5,
        "k",
        "a",
        130.0,
        "system",
        None,
        [[None, seen[4][6][0][1], None]],
    ]
    assert [rows[0].seq for rows in log.changes_since(0)] == [2, 6]
    log.check()


IDS = ("a", "b", "c")
FIELDS = ("s", "t", "u")


@dataclasses.dataclass(eq=False)
class _ModelRow:
    """One row of the plain list model; ``indexed`` are the fields it counts under."""

    seq: int
    id: str
    field: str | None
    before: Any
    after: Any
    ts: float
    actor: str
    run_id: str | None
    indexed: tuple[str, ...]

    def public(self) -> tuple[Any, ...]:
        tombstone = self.field is None
        return (self.seq, "k", self.id, self.field, self.before, self.after, self.ts,
                self.actor, self.run_id, tombstone)  # fmt: skip


def _public(row: Transition) -> tuple[Any, ...]:
    return (row.seq, row.kind, row.id, row.field, row.before, row.after,
            row.timestamp, row.actor, row.run_id, row.tombstone)  # fmt: skip


class _ListLog:
    """The transition log as one plain list, pruned the obvious way."""

    def __init__(self) -> None:
        self.rows: list[_ModelRow] = []

    def of(self, entity_id: str, field: str | None = None) -> list[_ModelRow]:
        return [
            r
            for r in self.rows
            if r.id == entity_id and (field is None or field in r.indexed)
        ]

    def changes(self, after: int) -> list[list[tuple[Any, ...]]]:
        grouped: dict[int, list[tuple[Any, ...]]] = {}
        for row in self.rows:
            if row.seq > after:
                grouped.setdefault(row.seq, []).append(row.public())
        return list(grouped.values())

    def prune(
        self,
        older_than: float | None,
        max_rows: int | None,
        removed_before: float | None,
    ) -> int:
        doomed: set[int] = set()
        for entity_id in IDS:
            rows = self.of(entity_id)
            if not rows:
                continue
            last = rows[-1]
            if not (
                (max_rows is not None and len(rows) > max_rows)
                or (older_than is not None and rows[0].ts < older_than)
                or (
                    removed_before is not None
                    and last.field is None
                    and last.ts < removed_before
                )
            ):
                continue
            removed = last.field is None
            if removed_before is not None and removed and last.ts < removed_before:
                doomed.update(id(r) for r in rows)
                continue
            newest = {
                id(self.of(entity_id, f)[-1]) for f in FIELDS if self.of(entity_id, f)
            }
            cut = len(rows) - max_rows if max_rows is not None else 0
            doomed.update(
                id(r)
                for index, r in enumerate(rows)
                if id(r) not in newest
                and (index < cut or (older_than is not None and r.ts < older_than))
            )
        self.rows = [r for r in self.rows if id(r) not in doomed]
        return len(doomed)


_writes = st.tuples(
    st.just("write"),
    st.sampled_from(IDS),
    st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True),
    st.integers(-2, 6),
    st.integers(1, 3),
    st.sampled_from([None, "run-1"]),
)
_steps = st.one_of(
    _writes,
    _writes,
    st.tuples(
        st.just("remove"),
        st.sampled_from(IDS),
        st.lists(st.sampled_from(FIELDS), max_size=3, unique=True),
        st.integers(0, 6),
        st.integers(1, 2),
        st.none(),
    ),
    st.tuples(
        st.just("prune"),
        st.none() | st.integers(0, 80),
        st.none() | st.integers(0, 5),
        st.none() | st.integers(0, 80),
        st.integers(1, 3),
        st.none(),
    ),
    st.tuples(st.just("view"), st.none(), st.none(), st.none(), st.none(), st.none()),
)


@given(steps=st.lists(_steps, max_size=60))
@settings(max_examples=200)
def test_log_agrees_with_a_plain_list_across_blocks(
    steps: list[tuple[Any, ...]],
) -> None:
    """Random appends, tombstones, prunes and snapshot views over blocks of 4."""
    with mock.patch.object(_log, "_BLOCK_CHANGES", 4):
        log = TransitionLog()
        model = _ListLog()
        views: list[tuple[Any, list[list[Any]]]] = []
        now = 0.0
        counter = 0

        for step in steps:
            action = step[0]
            if action in ("write", "remove"):
                _, entity_id, fields, dt, gap, run_id = step
                now += dt
                seq = log.last_seq + gap
                counter += 1
                if action == "write":
                    spec = [[f, counter - 1, counter] for f in fields]
                    indexed = [(f,) for f in fields]
                else:
                    spec = [[None, {"n": counter}, None]]
                    indexed = [tuple(fields)]
                count = log.append_rows(
                    seq, "k", entity_id, now, "someone", run_id, spec, fields
                )
                assert count == len(spec)
                model.rows += [
                    _ModelRow(seq, entity_id, f, b, a, now, "someone", run_id, idx)
                    for (f, b, a), idx in zip(spec, indexed, strict=True)
                ]
            elif action == "prune":
                _, older_than, max_rows, removed_before, batch, _ = step
                dropped = log.prune(older_than, max_rows, batch, removed_before)
                assert dropped == model.prune(older_than, max_rows, removed_before)
            else:
                view = log.snapshot_changes()
                views.append((view, [_encode(rows) for rows in model.changes(0)]))

            log.check()
            _assert_agrees(log, model)
            for view, expected in views:
                assert list(view.encoded()) == expected


def _encode(rows: list[tuple[Any, ...]]) -> list[Any]:
    seq, kind, entity_id, _, _, _, ts, actor, run_id, _ = rows[0]
    return [seq, kind, entity_id, ts, actor, run_id, [[r[3], r[4], r[5]] for r in rows]]


def _assert_agrees(log: TransitionLog, model: _ListLog) -> None:
    assert len(log) == len(model.rows)
    for after in (0, 3, 7):
        got = [[_public(r) for r in rows] for rows in log.changes_since(after)]
        assert got == model.changes(after)

    for entity_id in IDS:
        rows = model.of(entity_id)
        assert [_public(r) for r in log.history("k", entity_id)] == [
            r.public() for r in rows
        ]
        for since, until in ((None, 9.0), (4.0, None), (3.0, 12.0)):
            assert [
                _public(r) for r in log.history("k", entity_id, None, since, until)
            ] == [
                r.public()
                for r in rows
                if (since is None or r.ts >= since) and (until is None or r.ts < until)
            ]
        for field in FIELDS:
            of_field = model.of(entity_id, field)
            assert [_public(r) for r in log.history("k", entity_id, field)] == [
                r.public() for r in of_field
            ]
            assert [
                _public(r) for r in log.history("k", entity_id, field, 3.0, 12.0)
            ] == [r.public() for r in of_field if 3.0 <= r.ts < 12.0]
            last = log.last_change("k", entity_id, field)
            if of_field:
                assert last is not None
                assert _public(last) == of_field[-1].public()
            else:
                assert last is None
            for since in (0.0, 5.0, 10.0):
                assert log.count_since("k", entity_id, field, since) == sum(
                    r.ts >= since for r in of_field
                )


_scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["a", "b"])
_flat_states = st.none() | st.dictionaries(
    st.sampled_from("pqrs"), _scalars, max_size=4
)


def _log_contents(log: TransitionLog) -> Any:
    """Everything the log answers, plus its per-entity index, for comparing."""
    contents: list[Any] = [list(log.snapshot_changes().encoded()), len(log)]
    for kind, entity_id in sorted(log.entity_keys()):
        entity = log._entities[(kind, entity_id)]
        contents.append(
            (
                log.history(kind, entity_id),
                {f: list(seqs) for f, seqs in entity.by_field.items()},
                list(entity.seqs),
                list(entity.times),
                list(entity.places),
                entity.nrows,
                entity.ordered,
                entity.removed,
            )
        )
        for field in "pqrs":
            contents.append(log.history(kind, entity_id, field))
            contents.append(log.last_change(kind, entity_id, field))
    return contents


@given(
    steps=st.lists(
        st.tuples(st.sampled_from("xyz"), _flat_states, st.integers(-2, 5)),
        max_size=40,
    )
)
@settings(max_examples=200)
def test_append_states_records_what_the_triples_record(
    steps: list[tuple[str, dict[str, Any] | None, int]],
) -> None:
    """The write path's shortcut matches append_rows of change_rows, row for row."""
    with mock.patch.object(_log, "_BLOCK_CHANGES", 4):
        by_triples, by_states = TransitionLog(), TransitionLog()
        states: dict[str, dict[str, Any] | None] = {}
        now = 0.0

        for entity_id, next_state, dt in steps:
            prev = states.get(entity_id)
            delta, fields = diff_states(prev, next_state)
            if not fields:
                continue
            now += dt
            seq = by_triples.last_seq + 1
            spec = _log.change_rows(prev, next_state, fields)
            by_triples.append_rows(
                seq, "k", entity_id, now, "someone", None, spec, fields
            )
            if next_state is None:
                by_states.append_rows(
                    seq, "k", entity_id, now, "someone", None, spec, fields
                )
            else:
                with by_states.lock:
                    by_states.append_states(
                        seq,
                        "k",
                        entity_id,
                        now,
                        "someone",
                        None,
                        prev,
                        fields,
                        delta.values(),
                    )
            states[entity_id] = next_state

        by_triples.check()
        by_states.check()
        assert by_states.last_seq == by_triples.last_seq
        assert _log_contents(by_states) == _log_contents(by_triples)


def test_full_blocks_keep_scalar_rows_out_of_the_collectors_walks() -> None:
    with mock.patch.object(_log, "_BLOCK_CHANGES", 4):
        log = TransitionLog()
        for n in range(1, 11):
            state = {"count": n, "status": "up" if n % 2 else "down"}
            log.append_change("k", f"e-{n % 3}", None, state, ("count", "status"), n)
        gc.collect()
        *full, last = log._blocks.values()
        before = {i: [r.after for r in log.history("k", i)] for i in ("e-0", "e-1")}

        sealed = [
            not gc.is_tracked(b.fields) and not gc.is_tracked(b.afters) for b in full
        ]
        open_tracked = gc.is_tracked(last.fields)
        dropped = log.prune(max_rows=2)
        log.check()
        after = {i: [r.after for r in log.history("k", i)] for i in ("e-0", "e-1")}

    assert sealed == [True, True]
    assert open_tracked
    assert dropped == 20 - 3 * 2  # ten changes of two rows; two rows kept per id
    assert after == {i: rows[-2:] for i, rows in before.items()}
