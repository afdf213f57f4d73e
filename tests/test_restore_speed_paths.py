"""The fast paths of restoring agree with the straightforward code they skip.

Restoring checks every decoded value (:func:`_json_clean`, falling back to the
located walk for the message), checks every change's shape, freezes every
value and appends every change to the log in one loop. Each test here keeps
the plain version as a reference, written out below, and checks that the fast
one finds the same problems, names the same places and builds the same log.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from sys import intern
from typing import Any
from unittest import mock

import msgspec
import pytest
from conftest import Ticket, ticket
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import Runtime, diff_states, thaw
from runtime import _log as log_module
from runtime._durability import (
    ChangeRecord,
    _check_change,
    _decode_rows,
    _has_common_shape,
    load_data_dir,
    restore_into_log,
)
from runtime._engine import check_timestamp
from runtime._events import ReadOnlyDict, ReadOnlyList, freeze
from runtime._log import TransitionLog, _Block, _Entity
from runtime._persistence import (
    UnencodableValueError,
    _json_clean,
    decode_value,
    encode_value,
    read_snapshot,
)
from runtime.testing import FakeClock

LOW, HIGH = -(2**63), 2**64 - 1

# --- references: the plain versions of the checks -------------------------------


def reference_problem(value: Any) -> tuple[list[Any], str] | None:
    """The first part of ``value`` that is not JSON-compatible, or None.

    Depth first, from the last child of each container to the first, as the
    runtime's located walk goes: returns the keys and indexes leading to the
    part and the reason given for it.
    """
    pending: list[tuple[Any, list[Any]]] = [(value, [])]
    while pending:
        part, path = pending.pop()
        if part is None or type(part) in (str, float, bool):
            continue
        if type(part) is int:
            if LOW <= part <= HIGH:
                continue
            return path, (
                f"int {part} does not fit in 64 bits (the format holds "
                "-2**63 to 2**64-1); store it as a string instead"
            )
        if isinstance(part, dict):
            for key, child in part.items():
                if type(key) is not str:
                    return path, f"has a key {_shown(key)}; keys must be str"
                pending.append((child, [*path, key]))
            continue
        if isinstance(part, list):
            for index, child in enumerate(part):
                pending.append((child, [*path, index]))
            continue
        return path, (
            f"{_shown(part)} is not JSON-compatible (use dict, list, str, "
            "int, float, bool or None)"
        )
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _located(root: str, path: list[Any]) -> str:
    return root + "".join(f"[{key!r}]" for key in path)


def reference_freeze(value: Any) -> Any:
    """A read-only deep copy, recursing into every member."""
    if type(value) in (ReadOnlyDict, ReadOnlyList):
        return value
    if isinstance(value, dict):
        return ReadOnlyDict({k: reference_freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return ReadOnlyList([reference_freeze(v) for v in value])
    return value


def reference_check_change(change: ChangeRecord) -> None:
    """Every test of a decoded change in turn, each naming what is wrong."""
    if type(change.seq) is not int or change.seq < 1:
        raise ValueError(f"seq {change.seq!r} is not a positive integer")
    for name, value in (
        ("kind", change.kind),
        ("id", change.id),
        ("actor", change.actor),
    ):
        if type(value) is not str or value == "":
            raise ValueError(f"{name} {value!r} is not a non-empty string")
    if not (change.run_id is None or type(change.run_id) is str):
        raise ValueError(f"run_id {change.run_id!r} is not a string")
    if type(change.ts) is not int and type(change.ts) is not float:
        raise ValueError(f"time {change.ts!r} is not a number")
    check_timestamp(float(change.ts), f"seq {change.seq}'s time")
    if not (change.next_state is None or isinstance(change.next_state, dict)):
        raise ValueError(f"next state {change.next_state!r:.60} is not a mapping")
    if not isinstance(change.rows, list) or len(change.rows) == 0:
        raise ValueError("no rows")
    for row in change.rows:
        if not isinstance(row, list) or len(row) != 3:
            raise ValueError(f"row {row!r:.60} is not a [field, before, after] triple")
        if not (row[0] is None or type(row[0]) is str):
            raise ValueError(f"field {row[0]!r} is not a string")


def reference_restore(log: TransitionLog, changes: list[ChangeRecord]) -> None:
    """Append each change through append_rows, values frozen the plain way."""
    for change in changes:
        log.append_rows(
            change.seq,
            change.kind,
            change.id,
            change.ts,
            change.actor,
            change.run_id,
            [[f, reference_freeze(b), reference_freeze(a)] for f, b, a in change.rows],
            change.changed_fields,
        )


# --- strategies -----------------------------------------------------------------


class _Text(str):
    """A str subclass: not one of the JSON types itself."""


_GOOD_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(LOW, HIGH),
    st.integers(-5, 5),
    st.floats(),
    st.text(max_size=6),
)
_BAD_LEAVES = st.one_of(
    st.binary(max_size=3),
    st.integers(min_value=HIGH + 1),
    st.integers(max_value=LOW - 1),
    st.datetimes(timezones=st.just(UTC)),
    st.builds(_Text, st.text(max_size=3)),
    st.decimals(allow_nan=False, places=2),
    st.frozensets(st.integers(0, 3), max_size=2),
)
_BAD_KEYS = st.one_of(
    st.integers(-3, 3),
    st.none(),
    st.floats(allow_nan=False),
    st.tuples(st.integers(0, 2)),
    st.binary(max_size=2),
)


def _trees(leaves: st.SearchStrategy[Any], bad: bool) -> st.SearchStrategy[Any]:
    keys = st.text(max_size=4) | _BAD_KEYS if bad else st.text(max_size=4)

    def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        shapes = st.lists(children, max_size=4) | st.dictionaries(
            keys, children, max_size=4
        )
        if bad:
            shapes |= st.tuples(children, children)
        # Read-only containers are dict and list subclasses: accepted too.
        return shapes | shapes.map(freeze)

    return st.recursive(leaves, containers, max_leaves=24)


_GOOD_VALUES = _trees(_GOOD_LEAVES, bad=False)
_MIXED_VALUES = _trees(_GOOD_LEAVES | _BAD_LEAVES, bad=True)
_VALUES = _GOOD_VALUES | _MIXED_VALUES


def _nested(depth: int, shape: str, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if shape == "list" else {f"k{level % 3}": value}
    return value


# --- the JSON-compatibility check ------------------------------------------------


@given(value=_VALUES)
@settings(max_examples=600)
def test_the_fast_check_finds_a_problem_exactly_when_the_located_walk_does(
    value: Any,
) -> None:
    assert _json_clean(value) is (reference_problem(value) is None)


@given(value=_VALUES)
@settings(max_examples=600)
def test_encoding_refuses_what_the_located_walk_refuses_naming_the_same_part(
    value: Any,
) -> None:
    expected = reference_problem(value)

    if expected is None:
        assert msgspec.msgpack.decode(encode_value(value)) == value or _has_nan(value)
        return
    with pytest.raises(UnencodableValueError) as caught:
        encode_value(value, what="record")

    path, reason = expected
    assert caught.value.where == _located("record", path)
    assert caught.value.reason == reason


@given(value=_VALUES)
@settings(max_examples=600)
def test_decoding_refuses_what_the_located_walk_refuses_naming_the_same_part(
    value: Any,
) -> None:
    try:
        data = msgspec.msgpack.encode(value)
    except (OverflowError, TypeError):
        return  # not even MessagePack: nothing on disk can hold it
    raw = msgspec.msgpack.decode(data)
    expected = reference_problem(raw)

    if expected is None:
        assert msgspec.msgpack.encode(decode_value(data)) == data
        return
    with pytest.raises(ValueError) as caught:
        decode_value(data)

    path, reason = expected
    assert str(caught.value) == f"{_located('value', path)}: {reason}"


@given(
    depth=st.integers(1, 3000),
    shape=st.sampled_from(["list", "dict"]),
    leaf=_GOOD_LEAVES | _BAD_LEAVES,
)
@settings(max_examples=60)
def test_deeply_nested_values_are_judged_and_located_alike(
    depth: int, shape: str, leaf: Any
) -> None:
    value = _nested(depth, shape, leaf)
    expected = reference_problem(value)

    assert _json_clean(value) is (expected is None)
    if expected is not None:
        with pytest.raises(UnencodableValueError) as caught:
            encode_value(value)
        assert caught.value.where == _located("value", expected[0])


@given(value=_trees(_GOOD_LEAVES | _BAD_LEAVES, bad=True))
@settings(max_examples=300)
def test_skipping_the_int_range_agrees_for_ints_that_fit(value: Any) -> None:
    def fits(part: Any) -> bool:
        if type(part) is int:
            return LOW <= part <= HIGH
        if isinstance(part, dict):
            return all(fits(v) for v in part.values())
        if isinstance(part, list | tuple):
            return all(fits(v) for v in part)
        return True

    if fits(value):
        assert _json_clean(value, ints_fit=True) is (reference_problem(value) is None)


@pytest.mark.parametrize(
    ("marker", "size"),
    [
        *[(0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)],
        *[(0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)],
    ],
)
def test_every_messagepack_int_decodes_within_the_range_the_check_skips(
    marker: int, size: int
) -> None:
    """Why ``ints_fit`` is safe for decoded values: no encoding goes further."""
    payloads = [b"\x00" * size, b"\xff" * size, b"\x80" + b"\x00" * (size - 1)]
    payloads.append(b"\x7f" + b"\xff" * (size - 1))

    decoded = [msgspec.msgpack.decode(bytes([marker]) + p) for p in payloads]

    assert all(type(n) is int and LOW <= n <= HIGH for n in decoded)
    bits = 8 * size
    if marker <= 0xCF:
        assert max(decoded) == 2**bits - 1
    else:
        assert min(decoded) == -(2 ** (bits - 1))


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return value != value
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


# --- freeze ---------------------------------------------------------------------


def _same_frozen(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _same_frozen(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _same_frozen(a, b)
    else:
        assert got is want


@given(value=_VALUES)
@settings(max_examples=400)
def test_freeze_builds_what_the_plain_recursion_builds(value: Any) -> None:
    got = freeze(value)

    _same_frozen(got, reference_freeze(value))
    if type(value) in (ReadOnlyDict, ReadOnlyList) or not isinstance(
        value, dict | list
    ):
        assert got is value


# --- the shape check of a change -------------------------------------------------

_ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**64),
    st.floats(),
    st.text(max_size=3),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_ROWS = st.one_of(
    st.lists(
        st.one_of(
            st.tuples(st.none() | st.text(max_size=3), _ANYTHING, _ANYTHING).map(list),
            st.lists(_ANYTHING, max_size=4),
            _ANYTHING,
        ),
        max_size=3,
    ),
    _ANYTHING,
)


@given(
    seq=st.one_of(st.integers(1, 10**6), _ANYTHING),
    names=st.tuples(*[st.sampled_from(["k", "", "x-1"]) | _ANYTHING] * 3),
    run_id=st.one_of(st.none(), st.text(max_size=2), _ANYTHING),
    ts=st.one_of(st.floats(0, 4e9), st.integers(-(2**63), 2**63), _ANYTHING),
    next_state=st.one_of(
        st.none(), st.dictionaries(st.text(), st.integers()), _ANYTHING
    ),
    rows=_ROWS,
)
@settings(max_examples=800)
def test_the_shape_check_of_a_change_raises_as_the_plain_checks_do(
    seq: Any,
    names: tuple[Any, Any, Any],
    run_id: Any,
    ts: Any,
    next_state: Any,
    rows: Any,
) -> None:
    kind, entity_id, actor = names
    change = ChangeRecord(
        seq, kind, entity_id, ts, actor, run_id, True, next_state, rows
    )

    expected = _outcome(reference_check_change, change)

    assert _outcome(_check_change, change) == expected
    if _has_common_shape(change):
        assert expected is None


def test_a_common_change_takes_the_shortcut() -> None:
    change = ChangeRecord(
        3, "k", "a", 1.5e9, "system", None, False, None, [["s", None, 1]]
    )

    assert _has_common_shape(change)


def _outcome(check: Callable[[ChangeRecord], None], change: ChangeRecord) -> Any:
    try:
        check(change)
    except Exception as err:
        return type(err), str(err)
    return None


# --- building the log -------------------------------------------------------------

_STATE_VALUES = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.text(max_size=3),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from("pq"), st.integers(0, 3) | st.none(), max_size=2),
)
_STATES = st.none() | st.dictionaries(
    st.sampled_from("abcd"), _STATE_VALUES, max_size=4
)
_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["e1", "e2", "e3", "e4", "e5"]),
        _STATES,
        st.floats(-2.0, 5.0),
        st.sampled_from(["system", "alice", "bob"]),
        st.none() | st.sampled_from(["r1", "r2"]),
    ),
    min_size=10,
    max_size=80,
)


def _written_log(
    steps: list[tuple[str, dict[str, Any] | None, float, str, str | None]],
) -> TransitionLog:
    log = TransitionLog()
    states: dict[str, dict[str, Any] | None] = {}
    now = 1.0e9
    for entity_id, next_state, dt, actor, run_id in steps:
        prev = states.get(entity_id)
        _, fields = diff_states(prev, next_state)
        if not fields:
            continue
        now += dt
        log.append_change(
            "k", entity_id, prev, next_state, fields, now, actor=actor, run_id=run_id
        )
        states[entity_id] = next_state
    return log


def _read_back(log: TransitionLog, journal_from: int) -> list[ChangeRecord]:
    """The log's changes as a restore reads them: snapshot rows, then journal."""
    encoded = decode_value(encode_value(list(log.snapshot_changes().encoded())))
    snapshot = _decode_rows(encoded[:journal_from])
    journal = []
    for seq, kind, entity_id, ts, actor, run_id, rows in encoded[journal_from:]:
        change = ChangeRecord(
            seq, kind, entity_id, ts, actor, run_id, False, None, rows
        )
        record = decode_value(encode_value(change.encode()))
        journal.append(ChangeRecord.decode(record))
    return snapshot + journal


def _columns(log: TransitionLog) -> Any:
    """Everything the log stores, with entities named by their keys."""

    def value(v: Any) -> Any:
        return (type(v), thaw(v) if isinstance(v, dict | list) else v)

    def block(b: _Block) -> Any:
        return (
            b.key,
            b.base,
            list(b.seqs),
            list(b.times),
            [None if e is None else (e.kind, e.id) for e in b.ents],
            list(b.actors),
            list(b.run_ids),
            list(b.starts),
            list(b.fields),
            [value(v) for v in b.befores],
            [value(v) for v in b.afters],
            type(b.fields),
            b.dead,
            b.gone,
        )

    def entity(e: _Entity) -> Any:
        return (
            list(e.seqs),
            list(e.times),
            list(e.places),
            {f: list(seqs) for f, seqs in e.by_field.items()},
            e.nrows,
            e.ordered,
            e.removed,
        )

    return (
        [block(b) for b in log._blocks.values()],
        {key: entity(e) for key, e in log._entities.items()},
        None if log._open is None else log._open.key,
        len(log),
        log.last_seq,
    )


@given(steps=_STEPS, split=st.integers(0, 40), prune=st.booleans())
@settings(max_examples=200)
def test_a_restored_log_is_the_log_it_was_written_from(
    steps: list[Any], split: int, prune: bool
) -> None:
    with mock.patch.object(log_module, "_BLOCK_CHANGES", 3):
        written = _written_log(steps)
        if prune:
            written.prune(max_rows=2)
        changes = _read_back(written, split)
        restored, plain = TransitionLog(), TransitionLog()

        count = restore_into_log(restored, changes)
        reference_restore(plain, changes)

        restored.check()
        assert count == len(changes)
        assert _columns(restored) == _columns(plain)
        assert list(restored.changes_since(0)) == list(written.changes_since(0))
        for kind, entity_id in written.entity_keys():
            assert restored.history(kind, entity_id) == written.history(kind, entity_id)
            for field in "abcd":
                assert restored.history(kind, entity_id, field) == written.history(
                    kind, entity_id, field
                )
                assert restored.last_change(
                    kind, entity_id, field
                ) == written.last_change(kind, entity_id, field)
        assert sorted(restored.entity_keys()) == sorted(written.entity_keys())
        for b in restored._blocks.values():
            for f in b.fields:
                assert f is None or f is intern(f)


def test_a_restore_across_full_sized_blocks_matches_the_plain_restore() -> None:
    steps = [
        (
            f"e{i % 700}",
            None if i % 11 == 10 else {"a": i % 5, "b": [i % 3], "c": {"n": i % 2}},
            0.25,
            ("system", "alice")[i % 2],
            None if i % 3 else f"r{i % 4}",
        )
        for i in range(4000)
    ]
    written = _written_log(steps)
    changes = _read_back(written, 2500)
    restored, plain = TransitionLog(), TransitionLog()

    restore_into_log(restored, changes)
    reference_restore(plain, changes)

    restored.check()
    assert restored.block_count() >= 3
    assert _columns(restored) == _columns(plain)
    assert list(restored.changes_since(0)) == list(written.changes_since(0))


def test_restoring_in_two_parts_builds_the_same_log_as_in_one() -> None:
    with mock.patch.object(log_module, "_BLOCK_CHANGES", 4):
        written = _written_log(
            [(f"e{i % 3}", {"a": i, "b": [i]}, 1.0, "system", None) for i in range(30)]
            + [("e1", None, 1.0, "alice", "r1")]
        )
        changes = _read_back(written, 10)
        whole, parts = TransitionLog(), TransitionLog()

        restore_into_log(whole, changes)
        restore_into_log(parts, changes[:13])
        restore_into_log(parts, changes[13:])

        parts.check()
        assert _columns(parts) == _columns(whole)


def test_a_change_out_of_order_is_refused_as_append_rows_refuses_it() -> None:
    change = ChangeRecord(
        5, "k", "a", 1.5e9, "system", None, False, None, [["s", 1, 2]]
    )
    older = dataclasses.replace(change, seq=4)
    restored, plain = TransitionLog(), TransitionLog()

    with pytest.raises(ValueError) as got:
        restore_into_log(restored, [change, older])
    with pytest.raises(ValueError) as want:
        reference_restore(plain, [change, older])

    assert str(got.value) == str(want.value)
    assert _columns(restored) == _columns(plain)


def test_an_int_time_is_stored_as_a_float_as_append_rows_stores_it() -> None:
    change = ChangeRecord(
        1, "k", "a", 1_500_000_000, "me", "r", False, None, [["s", 1, 2]]
    )
    restored, plain = TransitionLog(), TransitionLog()

    restore_into_log(restored, [change])
    reference_restore(plain, [change])

    assert _columns(restored) == _columns(plain)
    assert type(restored.history("k", "a")[0].timestamp) is float


# --- through a runtime -------------------------------------------------------------


def _ticket_runtime(data_dir: Path, clock: FakeClock) -> Runtime:
    rt = Runtime(
        clock=clock,
        data_dir=data_dir,
        snapshot_every=None,
        snapshot_interval=None,
        retention_max_rows=None,
        stop_timeout=5.0,
    )
    rt.define_entity("ticket", Ticket)
    return rt


def _everything(rt: Runtime) -> dict[str, Any]:
    tickets = rt.handle("ticket")
    ids = sorted({key[1] for key in rt.log.entity_keys()})
    return {
        "rows": [r.to_dict() for batch in rt.log.changes_since(0) for r in batch],
        "states": {i: thaw(s) for i, s in tickets.get_many(tickets.ids()).items()},
        "history": {i: [r.to_dict() for r in tickets.history(i)] for i in ids},
        "since": {
            (i, f): tickets.in_state_since(i, f)
            for i in ids
            for f in ("status", "severity", "tags", "extra")
        },
        "seq": rt.log.last_seq,
    }


@pytest.fixture
def small_blocks() -> Iterator[None]:
    with mock.patch.object(log_module, "_BLOCK_CHANGES", 8):
        yield


@pytest.mark.usefixtures("small_blocks")
def test_a_runtime_restores_from_snapshot_and_journal_what_it_wrote(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir, copy = tmp_path / "data", tmp_path / "copy"
    first = _ticket_runtime(data_dir, clock)
    tickets = first.handle("ticket")
    with first:
        for step in range(40):
            key = f"t-{step % 7}"
            clock.advance(0.5)
            if step % 9 == 8:
                tickets.remove(key, actor="carol", run_id=f"r{step}")
                continue
            state = ticket(
                status=("open", "working", "closed")[step % 3],
                tags=[f"s{step}"] * (step % 3),
                extra={"n": step, "deep": {"list": [step, None]}},
            )
            tickets.mutate(key, lambda prev, state=state: state, actor=f"a{step % 2}")
            if step == 23:
                first.snapshot()
        shutil.copytree(data_dir, copy)
        before = _everything(first)
        snapshot_seq = first.log.last_seq
    # stop() wrote a final snapshot of the same changes into data_dir.

    second = _ticket_runtime(copy, clock)
    with second:
        after = _everything(second)
        written_again = second.snapshot()

    assert second.restored is not None
    assert second.restored.journal_records > 0
    assert after == before
    assert after["seq"] == snapshot_seq
    assert written_again is not None
    newest = sorted(data_dir.glob("snapshot-*.snap"))[-1]
    assert read_snapshot(written_again) == read_snapshot(newest)


def test_decoded_rows_keep_their_plain_lists_in_restored_data(tmp_path: Path) -> None:
    """The loader hands out changes as before: rows are the decoded lists."""
    rt = _ticket_runtime(tmp_path, FakeClock())
    with rt:
        rt.handle("ticket").mutate("t", lambda prev: ticket(extra={"x": [1]}))

    data = load_data_dir(tmp_path)

    (change,) = data.changes
    assert type(change.rows) is list
    assert all(type(row) is list for row in change.rows)
    assert [row[0] for row in change.rows] == ["status", "severity", "tags", "extra"]
