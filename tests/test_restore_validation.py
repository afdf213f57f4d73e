"""A restore re-checks what it puts back against the kinds' definitions.

Checksums only say that a file was written whole. These tests craft snapshot
and journal files that pass every checksum but hold what the write path would
never accept (a NaN, an unknown or missing field, a wrongly typed value, an
unusable id) and check that ``start()`` refuses them with a ``RestoreError``
naming the file, the entity, the seq and the problem, and leaves every file as
it was. A schema that changed between runs is the realistic way to get there.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import pydantic
import pytest
from conftest import Ticket, ticket
from hypothesis import given, settings
from hypothesis import strategies as st
from test_persistence_runtime import (
    _assert_unlocked,
    _refused_start,
    _ticket_runtime,
    crash_image,
    dump,
    make_runtime,
)

from runtime import ReadOnlyDict, RestoreError, compile_schema
from runtime._durability import ChangeRecord, load_data_dir
from runtime._persistence import (
    JournalWriter,
    list_snapshots,
    read_snapshot,
    write_snapshot,
)
from runtime.testing import FakeClock

_AT = 1_700_000_000.0
SNAPSHOT = "snapshot-00000000000000000002.snap"
JOURNAL = "journal-00000000000000000003.log"
DROP = object()


@dataclass
class TicketWithOwner:
    """``Ticket`` as it was before its ``owner`` field was removed."""

    status: Literal["open", "working", "closed"]
    severity: Literal["low", "high"]
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] | None = None
    owner: str = "nobody"


# --- helpers -------------------------------------------------------------------


def _written(tmp_path: Path, clock: FakeClock) -> Path:
    """A data dir after t-1 (seq 1) and t-2 (seq 2) were written and a stop.

    It holds the snapshot at seq 2 and the empty journal after it.
    """
    data_dir = tmp_path / "data"
    rt, tickets = _ticket_runtime(data_dir, clock)
    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-2", lambda prev: ticket(severity="high"))
    return data_dir


def _edit_snapshot(data_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the newest snapshot, checksummed, after ``edit`` changed its payload."""
    seq, payload = read_snapshot(list_snapshots(data_dir)[0])
    edit(payload)
    write_snapshot(data_dir, seq, payload)


def _append_change(
    data_dir: Path,
    entity_id: str,
    next_state: dict[str, Any] | None,
    *,
    kind: str = "ticket",
    actor: str = "system",
    run_id: str | None = None,
) -> None:
    """Journal one checksummed change after the snapshot, as a runtime would."""
    seq = load_data_dir(data_dir).seq + 1
    rows = [["status", None, "open"]] if next_state is None else []
    rows += [[name, None, value] for name, value in (next_state or {}).items()]
    backed = next_state is not None
    change = ChangeRecord(
        seq, kind, entity_id, _AT, actor, run_id, backed, next_state, rows
    )
    with JournalWriter(data_dir, fsync="never") as journal:
        journal.append(change.encode())


def _files(data_dir: Path) -> dict[str, bytes]:
    """Every file's bytes, and LOCK by name only (a lock writes its pid there)."""
    return {
        p.name: b"" if p.name == "LOCK" else p.read_bytes()
        for p in sorted(data_dir.iterdir())
    }


def _refused(data_dir: Path, clock: FakeClock, **options: Any) -> str:
    """Start a ticket runtime on ``data_dir``; return the refusal's message.

    Also checks the refusal changed no file, left the runtime stopped and
    released the lock.
    """
    before = _files(data_dir)
    rt, _ = _ticket_runtime(data_dir, clock, **options)

    err = _refused_start(rt, RestoreError)

    assert _files(data_dir) == before
    assert not rt.running
    _assert_unlocked(data_dir)
    return str(err)


def _states(payload: dict[str, Any]) -> dict[str, Any]:
    states: dict[str, Any] = payload["kinds"]["ticket"]["states"]
    return states


def _rename(payload: dict[str, Any], old: str, new: str) -> None:
    """Give entity ``old`` the id ``new`` in the states and in the changes."""
    states = _states(payload)
    states[new] = states.pop(old)
    for change in payload["changes"]:
        if change[2] == old:
            change[2] = new


# --- bad contents in the snapshot ----------------------------------------------

BAD_STATES = [
    pytest.param(
        {"extra": {"load": math.nan}},
        "field 'extra.load' must be a finite number, got nan",
        id="nan",
    ),
    pytest.param(
        {"owner": "ann"},
        "field 'owner' is not in the schema (expected fields: status, severity, "
        "tags, extra)",
        id="unknown-field",
    ),
    pytest.param(
        {"status": 5},
        "field 'status' must be one of 'open', 'working', 'closed', got 5 (int)",
        id="wrong-type",
    ),
    pytest.param(
        {"severity": DROP},
        "field 'severity' is missing",
        id="missing-field",
    ),
]


def _with(state: dict[str, Any], bad: dict[str, Any]) -> dict[str, Any]:
    """``state`` with ``bad``'s fields set, and those set to ``DROP`` left out."""
    changed = {**state, **bad}
    return {k: v for k, v in changed.items() if v is not DROP}


@pytest.mark.parametrize(("bad", "reason"), BAD_STATES)
def test_a_snapshot_state_the_schema_refuses_is_refused_naming_it(
    tmp_path: Path, clock: FakeClock, bad: dict[str, Any], reason: str
) -> None:
    data_dir = _written(tmp_path, clock)

    def spoil(payload: dict[str, Any]) -> None:
        _states(payload)["t-1"] = _with(_states(payload)["t-1"], bad)

    _edit_snapshot(data_dir, spoil)

    message = _refused(data_dir, clock)

    assert f"{data_dir / SNAPSHOT} (seq 1): ticket/t-1: {reason}; " in message
    assert "nothing was changed on disk" in message
    assert "did its schema change" in message


@pytest.mark.parametrize(
    ("bad_id", "reason"),
    [
        ("t\x00-1", "contains control or other non-printable characters"),
        ("t-\n1", "contains control or other non-printable characters"),
        ("t" * 1025, "is longer than 1024 characters"),
    ],
    ids=["nul", "newline", "too-long"],
)
def test_a_snapshot_id_the_write_path_refuses_is_refused_naming_it(
    tmp_path: Path, clock: FakeClock, bad_id: str, reason: str
) -> None:
    data_dir = _written(tmp_path, clock)
    _edit_snapshot(data_dir, lambda payload: _rename(payload, "t-1", bad_id))

    message = _refused(data_dir, clock)

    shown = repr(bad_id) if len(bad_id) < 60 else repr(bad_id)[:57] + "..."
    assert f"{data_dir / SNAPSHOT} (seq 1): ticket: id {shown} {reason}" in message
    assert "so the file was edited or comes from elsewhere" in message


def test_an_empty_id_held_only_by_the_snapshot_states_is_refused(
    tmp_path: Path, clock: FakeClock
) -> None:
    # No change names it, so the message can name the file but no seq.
    data_dir = _written(tmp_path, clock)
    _edit_snapshot(data_dir, lambda payload: _states(payload).update({"": ticket()}))

    message = _refused(data_dir, clock)

    assert f"{data_dir / SNAPSHOT}: ticket: id '' must not be empty;" in message


# --- bad contents in the journal -----------------------------------------------


@pytest.mark.parametrize(("bad", "reason"), BAD_STATES)
def test_a_journalled_state_the_schema_refuses_is_refused_naming_it(
    tmp_path: Path, clock: FakeClock, bad: dict[str, Any], reason: str
) -> None:
    data_dir = _written(tmp_path, clock)
    _append_change(data_dir, "t-2", _with(ticket(status="working"), bad))

    message = _refused(data_dir, clock)

    assert f"{data_dir / JOURNAL} (seq 3): ticket/t-2: {reason}; " in message


def test_a_journalled_id_the_write_path_refuses_is_refused_naming_it(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written(tmp_path, clock)
    _append_change(data_dir, "t-\x1b[31m", ticket())

    message = _refused(data_dir, clock)

    assert (
        f"{data_dir / JOURNAL} (seq 3): ticket: id 't-\\x1b[31m' contains control"
        in message
    )


def test_a_removed_entitys_bad_id_in_the_journal_is_refused_too(
    tmp_path: Path, clock: FakeClock
) -> None:
    # A tombstone leaves no state, only rows in the log: the id is still checked.
    data_dir = _written(tmp_path, clock)
    _append_change(data_dir, "t\t1", ticket())
    seq = load_data_dir(data_dir).seq + 1
    tombstone = ChangeRecord(
        seq, "ticket", "t\t1", _AT, "system", None, True, None, [[None, ticket(), None]]
    )
    with JournalWriter(data_dir, fsync="never") as journal:
        journal.append(tombstone.encode())

    message = _refused(data_dir, clock)

    assert f"{data_dir / JOURNAL} (seq 4): ticket: id 't\\t1' contains" in message


def test_a_plugin_backed_kind_has_only_its_ids_checked(
    tmp_path: Path, clock: FakeClock
) -> None:
    # Its rows may hold what the schema refuses: its state is the caller's,
    # and the runtime never puts a state of it back.
    data_dir = _written(tmp_path, clock)
    _append_change(data_dir, "p-1", None, kind="plugged")
    nan_rows = [["status", None, math.nan]]
    change = ChangeRecord(
        4, "plugged", "p-2", _AT, "system", None, False, None, nan_rows
    )
    with JournalWriter(data_dir, fsync="never") as journal:
        journal.append(change.encode())
    rt, _ = _ticket_runtime(data_dir, clock)
    rt.define_entity("plugged", Ticket, read=lambda ids: {})
    with rt:
        assert rt.log.last_seq == 4
    _append_change(data_dir, "p\x00", None, kind="plugged")
    before = _files(data_dir)
    again, _ = _ticket_runtime(data_dir, clock)
    again.define_entity("plugged", Ticket, read=lambda ids: {})

    err = _refused_start(again, RestoreError)

    assert "(seq 5): plugged: id 'p\\x00' contains control" in str(err)
    assert _files(data_dir) == before


BAD_NAMES = [
    ({"actor": "sys\ntem"}, "ticket/t-2: actor 'sys\\ntem'"),
    ({"actor": "\u200b"}, "ticket/t-2: actor '\\u200b'"),
    ({"run_id": ""}, "ticket/t-2: run id ''"),
    ({"run_id": "r\x00"}, "ticket/t-2: run id 'r\\x00'"),
    ({"kind": "tick\x07et"}, "tick\x07et/t-2: kind 'tick\\x07et'"),
]


@pytest.mark.parametrize(("names", "shown"), BAD_NAMES)
def test_a_journalled_name_the_write_path_refuses_is_refused_naming_it(
    tmp_path: Path, clock: FakeClock, names: dict[str, str], shown: str
) -> None:
    data_dir = _written(tmp_path, clock)
    _append_change(data_dir, "t-2", ticket(status="working"), **names)

    message = _refused(data_dir, clock)

    assert (
        f"{data_dir / JOURNAL} (seq 3): {shown} is not a non-empty printable string;"
        in message
    )
    assert "so the file was edited or comes from elsewhere" in message
    assert "nothing was changed on disk" in message


def test_a_snapshot_actor_the_write_path_refuses_is_refused_naming_it(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written(tmp_path, clock)

    def spoil(payload: dict[str, Any]) -> None:
        payload["changes"][0][4] = "ops\x1b[31m"

    _edit_snapshot(data_dir, spoil)

    message = _refused(data_dir, clock)

    assert (
        f"{data_dir / SNAPSHOT} (seq 1): ticket/t-1: actor 'ops\\x1b[31m' is not"
        in message
    )


def test_guard_printable_names_of_every_script_restore(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written(tmp_path, clock)
    _append_change(data_dir, "t-2", ticket(status="working"), actor="Ölçer-東京")
    _append_change(data_dir, "t-1", ticket(status="closed"), run_id="r 1/β")

    rt, tickets = _ticket_runtime(data_dir, clock)
    with rt:
        actors = [t.actor for t in tickets.history("t-2")]
        runs = [t.run_id for t in tickets.history("t-1")]

    assert "Ölçer-東京" in actors
    assert "r 1/β" in runs


# --- how the refusal behaves -----------------------------------------------------


@pytest.mark.parametrize("recover_damaged", [False, True])
def test_recover_damaged_does_not_skip_the_check(
    tmp_path: Path, clock: FakeClock, recover_damaged: bool
) -> None:
    data_dir = _written(tmp_path, clock)
    _append_change(data_dir, "t-1", ticket(extra={"x": math.inf}))

    message = _refused(data_dir, clock, recover_damaged=recover_damaged)

    assert "field 'extra.x' must be a finite number, got inf" in message
    assert "recover_damaged=True does not skip this check" in message


def test_a_removed_field_is_refused_and_the_old_definition_still_restores(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written_with(tmp_path, clock, TicketWithOwner, ticket(owner="ann"))

    message = _refused(data_dir, clock)
    old = make_runtime(data_dir, clock)
    restored = old.define_entity("ticket", TicketWithOwner)
    with old:
        state = restored.get("t-1")

    assert "ticket/t-1: field 'owner' is not in the schema" in message
    assert "start with the definition the files were written with" in message
    assert state == ticket(owner="ann")


def test_a_field_added_with_a_default_is_filled_in_on_restore(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written(tmp_path, clock)
    rt = make_runtime(data_dir, clock)
    tickets = rt.define_entity("ticket", TicketWithOwner)

    with rt:
        state = tickets.get("t-1")
        history = [r.field for r in tickets.history("t-1")]

    assert state == ticket(owner="nobody")
    assert "owner" not in history


def test_a_kind_defined_after_start_has_its_kept_states_checked(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written_with(
        tmp_path, clock, TicketWithOwner, ticket(owner="ann"), "host", "h-1"
    )
    rt = make_runtime(data_dir, clock)

    with rt:
        with pytest.raises(RestoreError) as caught:
            rt.define_entity("host", Ticket)
        kinds_after_refusal = rt.kinds()
        state = rt.define_entity("host", TicketWithOwner).get("h-1")

    assert f"{data_dir}: host/h-1: field 'owner' is not in the schema" in str(
        caught.value
    )
    assert kinds_after_refusal == []
    assert state == ticket(owner="ann")


def test_states_of_a_kind_now_defined_plugin_backed_are_refused_not_dropped(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written(tmp_path, clock)
    before = _files(data_dir)
    rt = make_runtime(data_dir, clock)
    rt.define_entity("ticket", Ticket, read=lambda ids: {})

    err = _refused_start(rt, RestoreError)
    again = make_runtime(data_dir, clock)
    tickets = again.define_entity("ticket", Ticket)
    with again:
        kept = tickets.get_many(["t-1", "t-2"])

    assert "kind 'ticket' is defined plugin-backed (with read=)" in str(err)
    assert "the files hold 2 states" in str(err)
    assert _files(data_dir) == before
    assert kept == {"t-1": ticket(), "t-2": ticket(severity="high")}


def test_a_kind_switches_to_plugin_backed_once_its_entities_are_removed(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written(tmp_path, clock)
    rt, tickets = _ticket_runtime(data_dir, clock)
    with rt:
        tickets.remove("t-1")
        tickets.remove("t-2")
    plugged = make_runtime(data_dir, clock)
    handle = plugged.define_entity("ticket", Ticket, read=lambda ids: {})

    with plugged:
        fields = [r.field for r in handle.history("t-1")]

    assert fields[:2] == ["status", "severity"]
    assert len(fields) > 2  # the tombstone row is kept too


def test_a_plugin_backed_kind_defined_after_start_refuses_kept_states(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written_with(tmp_path, clock, Ticket, ticket(), "host", "h-1")
    rt = make_runtime(data_dir, clock)

    with rt:
        with pytest.raises(RestoreError, match="kind 'host' is defined plugin-backed"):
            rt.define_entity("host", Ticket, read=lambda ids: {})
        state = rt.define_entity("host", Ticket).get("h-1")

    assert state == ticket()


class _Status(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class _PydanticTicket(pydantic.BaseModel):
    status: _Status = _Status.OPEN
    balance: int = 0
    deposit: int = 0

    @pydantic.model_validator(mode="after")
    def _book(self) -> _PydanticTicket:
        # Not idempotent: checking a stored state again would book it twice.
        self.balance += self.deposit
        return self


class _PydanticTicketWithNote(_PydanticTicket):
    note: str = "none"
    tags: list[str] = pydantic.Field(default_factory=lambda: ["new"])


class _StructTicket(msgspec.Struct):
    status: _Status = _Status.OPEN
    balance: int = 0


class _StructTicketWithNote(_StructTicket):
    note: str = "none"
    tags: list[str] = msgspec.field(default_factory=lambda: ["new"])


class _StructTicketNeedingNote(_StructTicket, kw_only=True):
    note: str


_CLOSED = {"status": _Status.CLOSED, "balance": 10}


def _written_with(
    tmp_path: Path,
    clock: FakeClock,
    schema: type,
    state: dict[str, Any] = _CLOSED,
    kind: str = "ticket",
    entity_id: str = "t-1",
) -> Path:
    """A data dir after one write of ``state`` under ``schema`` and a stop."""
    data_dir = tmp_path / "data"
    rt = make_runtime(data_dir, clock)
    handle = rt.define_entity(kind, schema)
    with rt:
        handle.mutate(entity_id, lambda prev: state)
    return data_dir


def _restored(data_dir: Path, clock: FakeClock, schema: type) -> Any:
    rt = make_runtime(data_dir, clock)
    handle = rt.define_entity("ticket", schema)
    with rt:
        return handle.get("t-1")


@pytest.mark.parametrize("schema", [_PydanticTicket, _StructTicket])
def test_a_library_schema_restores_its_states_exactly_as_recorded(
    tmp_path: Path, clock: FakeClock, schema: type
) -> None:
    # An enum field's stored string fails pydantic's strict check, and a
    # validator may change a state each time it runs: neither may refuse or
    # alter a recorded state.
    data_dir = _written_with(tmp_path, clock, schema)
    recorded = _restored(data_dir, clock, schema)

    again = [_restored(data_dir, clock, schema) for _ in range(2)]

    assert recorded["status"] == "closed"
    assert recorded["balance"] == 10
    assert again == [recorded, recorded]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (_PydanticTicket, _PydanticTicketWithNote),
        (_StructTicket, _StructTicketWithNote),
    ],
)
def test_a_library_schema_fills_fields_added_with_a_default(
    tmp_path: Path, clock: FakeClock, old: type, new: type
) -> None:
    data_dir = _written_with(tmp_path, clock, old)

    state = _restored(data_dir, clock, new)

    assert state["note"] == "none"
    assert state["tags"] == ["new"]
    assert state["status"] == "closed"
    assert list(state) == list(compile_schema(new).fields)


class _Owner(pydantic.BaseModel):
    name: str = "nobody"


class _PydanticTicketWithOwner(_PydanticTicket):
    owner: _Owner = _Owner()
    previous: int = pydantic.Field(default_factory=lambda data: data["balance"] - 1)


def test_a_pydantic_default_is_filled_in_as_a_write_would_store_it(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written_with(tmp_path, clock, _PydanticTicket)
    rt = make_runtime(data_dir, clock)
    tickets = rt.define_entity("ticket", _PydanticTicketWithOwner)

    with rt:
        state = tickets.get("t-1")
        again = tickets.mutate("t-1", lambda prev: dict(prev))

    assert state["owner"] == {"name": "nobody"}
    assert state["previous"] == 9
    assert again == state


def test_a_library_schema_refuses_a_field_added_without_a_default(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written_with(tmp_path, clock, _StructTicket)
    before = _files(data_dir)
    rt = make_runtime(data_dir, clock)
    rt.define_entity("ticket", _StructTicketNeedingNote)

    err = _refused_start(rt, RestoreError)

    assert "ticket/t-1: field 'note' is missing and has no default" in str(err)
    assert _files(data_dir) == before


def test_a_library_schema_refuses_a_recorded_unknown_field_and_nan(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = _written_with(tmp_path, clock, _PydanticTicketWithNote)
    rt = make_runtime(data_dir, clock)
    rt.define_entity("ticket", _PydanticTicket)
    unknown = _refused_start(rt, RestoreError)
    _edit_snapshot(data_dir, lambda p: _states(p)["t-1"].update(balance=math.nan))
    before = _files(data_dir)
    again = make_runtime(data_dir, clock)
    again.define_entity("ticket", _PydanticTicketWithNote)

    nan = _refused_start(again, RestoreError)

    assert "ticket/t-1: field 'note' is not in the schema" in str(unknown)
    assert "field 'balance' must be a finite number, got nan" in str(nan)
    assert _files(data_dir) == before


# --- a normal run still restores exactly ----------------------------------------

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner)
    ),
    max_leaves=8,
)
STATE = st.builds(
    ticket,
    status=st.sampled_from(["open", "working", "closed"]),
    severity=st.sampled_from(["low", "high"]),
    tags=st.lists(st.text(max_size=5), max_size=3),
    extra=st.none() | st.dictionaries(st.text(max_size=4), JSON_VALUE, max_size=3),
)
ENTITY_ID = st.sampled_from(["a", "b", "snow \u2603", "x" * 1024])
WRITE = st.one_of(
    st.tuples(st.just("mutate"), ENTITY_ID, STATE),
    st.tuples(st.just("remove"), ENTITY_ID),
)


@settings(max_examples=40, deadline=None, database=None)
@given(
    writes=st.lists(WRITE, max_size=12),
    snapshot_after=st.integers(min_value=0, max_value=12),
    crash=st.booleans(),
)
def test_a_normal_run_restores_exactly_through_the_checks(
    tmp_path_factory: pytest.TempPathFactory,
    writes: list[tuple[Any, ...]],
    snapshot_after: int,
    crash: bool,
) -> None:
    # A crash image restores the changes after the snapshot from the journal;
    # a stop writes a final snapshot that holds them all.
    base = tmp_path_factory.mktemp("run")
    data_dir = base / "data"
    clock = FakeClock()
    first, tickets = _ticket_runtime(data_dir, clock)
    plugin = first.define_entity("plugged", Ticket, read=lambda ids: {})

    with first:
        for number, write in enumerate(writes):
            clock.advance(1)
            if write[0] == "mutate":
                tickets.mutate(write[1], lambda prev, s=write[2]: s)
                plugin.mutate(write[1], lambda prev, s=write[2]: s)
            elif write[1] in tickets.ids():
                tickets.remove(write[1])
            if number + 1 == snapshot_after:
                first.snapshot()
        before = dump(first)
        if crash:
            data_dir = crash_image(data_dir, base / "crashed")
    second, again = _ticket_runtime(data_dir, clock)
    second.define_entity("plugged", Ticket, read=lambda ids: {})

    with second:
        after = dump(second)
        frozen = all(type(again.get(i)) is ReadOnlyDict for i in again.ids())

    assert after == before
    assert frozen
