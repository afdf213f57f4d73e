from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from conftest import Ticket, ticket

from runtime import (
    SYSTEM_ACTOR,
    ApplyError,
    DefinitionError,
    DeliveryTimeoutError,
    EntityChanged,
    InvalidIdError,
    InvalidTimeError,
    MutationBatchError,
    ReadError,
    ReentrantCallError,
    Runtime,
    RuntimeStoppedError,
    SchemaError,
    UnknownFieldError,
    UnknownKindError,
)
from runtime.testing import FakeClock


def _record(rt: Runtime) -> list[EntityChanged]:
    seen: list[EntityChanged] = []
    rt.on_entity_changed("ticket", seen.append)
    return seen


def _snapshot(rt: Runtime) -> tuple[Any, ...]:
    """What a failed write must leave untouched: log rows, states, sequence."""
    rows = [r.to_dict() for batch in rt.log.changes_since(0) for r in batch]
    states = {
        k: rt.handle(k).get_many(rt.handle(k).ids())
        for k in rt.kinds()
        if rt.handle(k).store_backed
    }
    return rows, states, rt.log.last_seq


def test_mutate_creates_then_changes_and_records_each_field(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _record(rt)

    with rt:
        created = tickets.mutate("t-1", lambda prev: ticket())
        changed = tickets.mutate("t-1", lambda prev: {**prev, "status": "working"})
        rt.drain()

    assert created == ticket()
    assert changed["status"] == "working"
    assert [(c.seq, c.changed_fields) for c in seen] == [
        (1, ("status", "severity", "tags", "extra")),
        (2, ("status",)),
    ]
    assert seen[0].prev is None
    assert seen[1].prev == ticket()
    assert seen[1].delta == {"status": "working"}
    assert seen[1].actor == SYSTEM_ACTOR
    assert [(r.seq, r.field, r.before, r.after) for r in tickets.history("t-1")] == [
        (1, "status", None, "open"),
        (1, "severity", None, "low"),
        (1, "tags", None, []),
        (1, "extra", None, None),
        (2, "status", "open", "working"),
    ]


def test_unchanged_write_records_nothing_and_emits_no_event(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _record(rt)
    fired: list[str] = []
    rt.register_change_deriver("ticket", lambda c: ["ticket.touched"])
    rt.on_trigger("ticket.touched", lambda e, p, c: fired.append(e))

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(tags=["a"]))
        rt.drain()
        before = _snapshot(rt)
        result = tickets.mutate("t-1", lambda prev: ticket(tags=["a"]))
        rt.drain()

    assert result == ticket(tags=["a"])
    assert _snapshot(rt) == before
    assert len(seen) == 1
    assert fired == ["ticket.touched"]
    samples = {
        s.labels["outcome"]: s.value
        for m in rt.metrics_registry.collect()
        if m.name == "entity_runtime_mutations"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert samples["changed"] == 1
    assert samples["unchanged"] == 1


def test_apply_gets_a_mutable_copy_and_cannot_corrupt_the_store(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    def edit_in_place(prev: dict[str, Any] | None) -> dict[str, Any]:
        assert prev is not None
        prev["tags"].append("x")
        prev["status"] = "closed"
        return prev

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        stored = tickets.get("t-1")
        tickets.mutate("t-1", edit_in_place)

    assert stored == ticket()
    assert tickets.get("t-1") == ticket(status="closed", tags=["x"])


def test_states_handed_out_are_read_only(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _record(rt)

    with rt:
        result = tickets.mutate("t-1", lambda prev: ticket(tags=["a"]))
        rt.drain()
        got = tickets.get("t-1")

    assert got is not None
    with pytest.raises(TypeError, match="read-only"):
        got["status"] = "closed"  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        result["tags"].append("b")
    with pytest.raises(TypeError, match="read-only"):
        seen[0].next["tags"].clear()  # type: ignore[index]
    assert tickets.get("t-1") == ticket(tags=["a"])
    assert dict(got) == ticket(tags=["a"])


def test_remove_records_a_tombstone_and_a_change_with_no_next(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _record(rt)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        removed = tickets.remove("t-1")
        removed_again = tickets.remove("t-1")
        rt.drain()

    assert removed is True
    assert removed_again is False
    assert tickets.get("t-1") is None
    assert seen[-1].next is None
    assert seen[-1].is_tombstone
    assert seen[-1].prev == ticket()
    assert len(seen) == 2
    last = tickets.history("t-1")[-1]
    assert last.tombstone
    assert last.field is None
    assert last.before == ticket()


def test_removing_a_missing_entity_does_not_call_apply(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    calls: list[Any] = []

    with rt:
        removed = tickets.remove("nope", apply=calls.append)

    assert removed is False
    assert calls == []
    assert rt.log.last_seq == 0


def test_in_state_queries_follow_the_clock(rt: Runtime, clock: FakeClock) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        opened_at = clock.now()
        clock.advance(60)
        tickets.mutate("t-1", lambda prev: {**prev, "severity": "high"})
        clock.advance(30)
        tickets.mutate("t-1", lambda prev: {**prev, "status": "working"})
        clock.advance(45)
        tickets.mutate("t-1", lambda prev: {**prev, "status": "open"})
        clock.advance(15)

        assert tickets.in_state_since("t-1", "severity") == opened_at + timedelta(
            seconds=60
        )
        assert tickets.in_state_for("t-1", "severity") == timedelta(seconds=90)
        assert tickets.in_state_for("t-1", "status") == timedelta(seconds=15)
        assert tickets.transition_count("t-1", "status", timedelta(seconds=60)) == 2
        assert tickets.transition_count("t-1", "status", timedelta(hours=1)) == 3
        assert tickets.transition_count("t-1", "status", 10) == 0
        assert tickets.in_state_since("nope", "status") is None
        assert tickets.in_state_for("nope", "status") is None


def test_history_filters_by_field_and_time(rt: Runtime, clock: FakeClock) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        start = clock.now()
        for status in ("working", "closed", "open"):
            clock.advance(10)
            tickets.mutate("t-1", lambda prev, s=status: ticket(status=s))

    rows = tickets.history(
        "t-1",
        field="status",
        since=start + timedelta(seconds=20),
        until=start + timedelta(seconds=30),
    )

    assert [(r.before, r.after) for r in rows] == [("working", "closed")]
    assert rows[0].at == start + timedelta(seconds=20)


def test_mutate_at_records_the_given_time(rt: Runtime, clock: FakeClock) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    when = clock.now() - timedelta(days=1)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(), at=when)

    assert tickets.history("t-1")[0].at == when
    assert tickets.in_state_for("t-1", "status") == timedelta(days=1)


def test_actor_and_run_id_are_recorded(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _record(rt)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(), actor="alice", run_id="run-7")
        rt.drain()

    assert seen[0].actor == "alice"
    assert seen[0].run_id == "run-7"
    assert {(r.actor, r.run_id) for r in tickets.history("t-1")} == {("alice", "run-7")}


def test_mutate_async_returns_a_future_usable_from_threads(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        futures = [
            tickets.mutate_async(f"t-{i}", lambda prev: ticket()) for i in range(50)
        ]
        results = [f.get(timeout=5) for f in futures]

    assert results == [ticket()] * 50
    assert len(tickets.ids()) == 50


def test_mutate_async_is_awaitable_from_asyncio(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    async def write_two() -> list[Any]:
        first = tickets.mutate_async("t-1", lambda prev: ticket())
        second = tickets.mutate_async("t-2", lambda prev: ticket(status="closed"))
        return list(await asyncio.gather(first, second))

    with rt:
        results = asyncio.run(write_two())

    assert [r["status"] for r in results] == ["open", "closed"]


def test_mutate_async_failure_is_raised_by_get_and_await(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        future = tickets.mutate_async("t-1", lambda prev: {"status": "bogus"})
        with pytest.raises(SchemaError):
            future.get(timeout=5)

        async def awaited() -> None:
            await tickets.mutate_async("t-1", lambda prev: 1 / 0)

        with pytest.raises(ApplyError):
            asyncio.run(awaited())


def test_get_many_returns_only_existing_entities(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("a", lambda prev: ticket())
        tickets.mutate("b", lambda prev: ticket(status="closed"))

    assert tickets.get_many(["a", "b", "c"]) == {
        "a": ticket(),
        "b": ticket(status="closed"),
    }


def test_wait_until_returns_when_another_thread_makes_the_state_true(
    rt: Runtime,
) -> None:
    import threading

    tickets = rt.define_entity("ticket", Ticket)
    started = threading.Event()

    def closer() -> None:
        started.wait()
        tickets.mutate("t-1", lambda prev: ticket(status="working"))
        tickets.mutate("t-1", lambda prev: ticket(status="closed"))

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        writer = threading.Thread(target=closer)
        writer.start()
        started.set()
        state = tickets.wait_until(
            "t-1", lambda s: s is not None and s["status"] == "closed", timeout=5
        )
        writer.join()

    assert state is not None
    assert state["status"] == "closed"


def test_wait_until_times_out_with_the_last_state(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        with pytest.raises(DeliveryTimeoutError, match=r"ticket/t-1: .* 0.05 s"):
            tickets.wait_until("t-1", lambda s: s["status"] == "closed", timeout=0.05)


WAITS_INSIDE_AN_APPLY: list[tuple[str, Callable[[Runtime], Any], str]] = [
    ("drain", lambda rt: rt.drain(timeout=3), r"^drain\(\) was called from"),
    (
        "drain until idle",
        lambda rt: rt.drain(timeout=3, until_idle=True),
        r"^drain\(\) was called from",
    ),
    (
        "wait_until",
        lambda rt: rt.handle("ticket").wait_until("a", lambda s: False, timeout=3),
        r"^ticket/a: wait_until\(\) was called from",
    ),
]


@pytest.mark.parametrize("burst", [False, True], ids=["mutate", "mutate_many"])
@pytest.mark.parametrize(
    ("wait", "message"),
    [case[1:] for case in WAITS_INSIDE_AN_APPLY],
    ids=[case[0] for case in WAITS_INSIDE_AN_APPLY],
)
def test_waiting_for_the_runtime_inside_an_apply_is_refused_at_once(
    rt: Runtime, burst: bool, wait: Callable[[Runtime], Any], message: str
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    refused: list[ReentrantCallError] = []

    def waits(prev: Any) -> Any:
        try:
            wait(rt)
        except ReentrantCallError as err:
            refused.append(err)
        return ticket(status="working")

    with rt:
        started = time.monotonic()
        if burst:
            tickets.mutate_many([("a", lambda prev: ticket()), ("b", waits)])
        else:
            tickets.mutate("b", waits)
        took = time.monotonic() - started

    assert len(refused) == 1
    assert took < 1.0
    with pytest.raises(ReentrantCallError, match=message):
        raise refused[0]
    assert "actor thread" in str(refused[0])
    assert tickets.get("b") == ticket(status="working")


def test_drain_inside_a_subscriber_is_refused_at_once(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    refused: list[ReentrantCallError] = []

    def drains(change: EntityChanged) -> None:
        try:
            rt.drain(timeout=3)
        except ReentrantCallError as err:
            refused.append(err)

    rt.on_entity_changed("ticket", drains)

    with rt:
        started = time.monotonic()
        tickets.mutate("a", lambda prev: ticket())
        rt.drain()
        took = time.monotonic() - started

    assert len(refused) == 1
    assert took < 1.0
    assert str(refused[0]).startswith("drain() was called from")


# -- plugin-backed kinds ----------------------------------------------------


class _Table:
    """A caller-owned store for a plugin-backed kind."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.reads: list[list[str]] = []

    def read(self, ids: list[str]) -> dict[str, Any]:
        self.reads.append(list(ids))
        return {i: self.rows[i] for i in ids if i in self.rows}

    def write(self, entity_id: str, state: dict[str, Any]) -> dict[str, Any]:
        self.rows[entity_id] = dict(state)
        return state


def test_plugin_backed_kind_reads_prev_and_lets_apply_write(rt: Runtime) -> None:
    table = _Table()
    tickets = rt.define_entity("ticket", Ticket, read=table.read)
    seen = _record(rt)

    with rt:
        tickets.mutate("t-1", lambda prev: table.write("t-1", ticket()))
        tickets.mutate(
            "t-1", lambda prev: table.write("t-1", {**prev, "status": "closed"})
        )
        tickets.remove("t-1", apply=lambda prev: table.rows.pop("t-1"))
        rt.drain()

    assert table.rows == {}
    assert [c.changed_fields for c in seen][1] == ("status",)
    assert seen[1].prev == ticket()
    assert seen[2].next is None
    assert ["t-1"] in table.reads
    assert tickets.get("t-1") is None


def test_plugin_backed_get_many_is_one_batched_read(rt: Runtime) -> None:
    table = _Table()
    table.rows = {"a": ticket(), "b": ticket(status="closed")}
    tickets = rt.define_entity("ticket", Ticket, read=table.read)

    found = tickets.get_many(["a", "b", "c"])

    assert table.reads == [["a", "b", "c"]]
    assert set(found) == {"a", "b"}


# -- bad input gets a clear error and records nothing ---------------------


@pytest.fixture
def busy(rt: Runtime) -> Runtime:
    """A started runtime with some recorded history, to check nothing changes."""
    tickets = rt.define_entity("ticket", Ticket)
    rt.start()
    tickets.mutate("t-1", lambda prev: ticket())
    tickets.mutate("t-2", lambda prev: ticket(status="working"))
    tickets.mutate("t-1", lambda prev: ticket(status="closed"))
    rt.drain()
    return rt


def test_a_state_failing_the_schema_is_rejected_and_nothing_recorded(
    busy: Runtime,
) -> None:
    tickets = busy.handle("ticket")
    before = _snapshot(busy)

    with pytest.raises(SchemaError) as caught:
        tickets.mutate("t-1", lambda prev: {**prev, "severity": "urgent"})

    assert str(caught.value) == (
        "ticket/t-1: field 'severity' must be one of 'low', 'high', got 'urgent' "
        "(str); nothing recorded"
    )
    assert caught.value.kind == "ticket"
    assert caught.value.entity_id == "t-1"
    assert caught.value.field == "severity"
    assert _snapshot(busy) == before


def test_an_apply_that_raises_records_nothing_and_reaches_the_caller(
    busy: Runtime,
) -> None:
    tickets = busy.handle("ticket")
    before = _snapshot(busy)

    def broken(prev: Any) -> Any:
        raise KeyError("no such field")

    with pytest.raises(ApplyError, match=r"^ticket/t-1: apply raised KeyError") as e:
        tickets.mutate("t-1", broken)

    assert isinstance(e.value.__cause__, KeyError)
    assert _snapshot(busy) == before


def test_an_apply_of_a_removal_that_raises_keeps_the_entity(busy: Runtime) -> None:
    tickets = busy.handle("ticket")
    before = _snapshot(busy)

    with pytest.raises(ApplyError):
        tickets.remove("t-1", apply=lambda prev: 1 / 0)

    assert _snapshot(busy) == before
    assert tickets.get("t-1") is not None


@pytest.mark.parametrize(
    ("bad_id", "reason"),
    [
        ("", "must not be empty"),
        (17, "must be a string"),
        ("x" * 2000, "longer than"),
        ("a\nb", "non-printable"),
        ("tab\there", "non-printable"),
    ],
)
def test_bad_ids_are_refused_and_nothing_recorded(
    busy: Runtime, bad_id: Any, reason: str
) -> None:
    tickets = busy.handle("ticket")
    before = _snapshot(busy)

    with pytest.raises(InvalidIdError, match=reason):
        tickets.mutate(bad_id, lambda prev: ticket())

    assert _snapshot(busy) == before


def test_unknown_kind_is_an_error_naming_the_known_kinds(busy: Runtime) -> None:
    with pytest.raises(UnknownKindError, match=r"unknown kind 'tickt'.*'ticket'"):
        busy.handle("tickt")
    with pytest.raises(UnknownKindError):
        busy.on_entity_changed("tickt", print)
    with pytest.raises(UnknownKindError):
        busy.register_change_deriver("tickt", lambda c: [])


def test_duplicate_or_empty_kind_is_refused(busy: Runtime) -> None:
    before = _snapshot(busy)

    with pytest.raises(DefinitionError, match="'ticket' is already defined"):
        busy.define_entity("ticket", Ticket)
    with pytest.raises(DefinitionError, match="non-empty"):
        busy.define_entity("", Ticket)

    assert busy.kinds() == ["ticket"]
    assert _snapshot(busy) == before


def test_a_schema_without_fields_is_refused_for_a_kind(busy: Runtime) -> None:
    @dataclasses.dataclass
    class Marker:
        pass

    before = _snapshot(busy)

    with pytest.raises(DefinitionError, match="marker: the state schema Marker has no"):
        busy.define_entity("marker", Marker)

    assert busy.kinds() == ["ticket"]
    assert _snapshot(busy) == before


def test_non_callable_read_or_apply_is_refused(busy: Runtime) -> None:
    tickets = busy.handle("ticket")
    before = _snapshot(busy)
    not_callable: Any = {"t-1": ticket()}

    with pytest.raises(DefinitionError, match="read must be callable"):
        busy.define_entity("other", Ticket, read=not_callable)
    with pytest.raises(DefinitionError, match="apply must be callable"):
        tickets.mutate("t-1", ticket())  # type: ignore[arg-type]

    assert busy.kinds() == ["ticket"]
    assert _snapshot(busy) == before


@pytest.mark.parametrize(
    ("given", "shown"),
    [("t-1", "'t-1'"), (b"t-1", "b't-1'"), (None, "None"), (7, "7")],
)
def test_get_many_refuses_one_string_or_a_non_iterable(
    busy: Runtime, given: Any, shown: str
) -> None:
    # A string is iterable: its characters would be read as ids ('t', '-', '1').
    tickets = busy.handle("ticket")
    tickets.mutate("1", lambda prev: ticket())
    before = _snapshot(busy)

    with pytest.raises(TypeError) as caught:
        tickets.get_many(given)

    assert str(caught.value) == (
        f"ticket: get_many takes an iterable of ids, got {shown}; use get() for a "
        "single id"
    )
    assert _snapshot(busy) == before


def test_field_queries_refuse_a_bad_id_and_a_field_never_known(busy: Runtime) -> None:
    tickets = busy.handle("ticket")
    before = _snapshot(busy)
    calls: list[Callable[[], Any]] = [
        lambda: tickets.history("t-1", field="staus"),
        lambda: tickets.in_state_since("t-1", "staus"),
        lambda: tickets.in_state_for("t-1", "staus"),
        lambda: tickets.transition_count("t-1", "staus", 60),
    ]

    for call in calls:
        with pytest.raises(UnknownFieldError) as caught:
            call()
        assert str(caught.value).startswith(
            "ticket: unknown field 'staus'; the schema's fields: 'status', "
            "'severity', 'tags', 'extra'"
        )
    with pytest.raises(InvalidIdError, match="ticket: id 5 must be a string"):
        tickets.history(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidIdError, match="ticket: id 5 must be a string"):
        tickets.transition_count(5, "status", 60)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"history\(\)'s field must be a field name"):
        tickets.history("t-1", field=1)  # type: ignore[arg-type]

    assert _snapshot(busy) == before


def test_fields_of_the_schema_or_with_rows_are_queried_and_others_refused(
    busy: Runtime,
) -> None:
    tickets = busy.handle("ticket")
    # Rows of a field the schema does not have (dropped from it since).
    busy.log.append_change(
        "ticket", "t-1", None, {"owner": "ann"}, ["owner"], busy.clock()
    )

    owned = tickets.history("t-1", field="owner")
    never_written = tickets.history("t-3", field="tags")

    assert [(r.field, r.after) for r in owned] == [("owner", "ann")]
    assert never_written == []
    with pytest.raises(UnknownFieldError):
        tickets.history("t-2", field="owner")


def test_wait_until_refuses_a_predicate_that_is_not_callable(busy: Runtime) -> None:
    tickets = busy.handle("ticket")

    with pytest.raises(TypeError) as caught:
        tickets.wait_until("t-1", "closed", timeout=0)  # type: ignore[arg-type]

    assert str(caught.value) == (
        "ticket: wait_until()'s predicate must be callable (state -> bool), got "
        "'closed'; nothing waited for"
    )


@pytest.mark.parametrize(
    ("shards", "shown"), [(True, "True"), (0, "0"), (257, "257"), (2.0, "2.0")]
)
def test_shards_outside_one_to_the_limit_are_refused(
    busy: Runtime, shards: Any, shown: str
) -> None:
    before = _snapshot(busy)

    with pytest.raises(DefinitionError) as caught:
        busy.define_entity("other", Ticket, shards=shards)

    assert str(caught.value) == (
        "other: shards must be a whole number from 1 to 256 (each shard is a "
        f"thread), got {shown}"
    )
    assert busy.kinds() == ["ticket"]
    assert _snapshot(busy) == before


def test_overlong_kind_and_subscription_names_are_refused(busy: Runtime) -> None:
    before = _snapshot(busy)

    with pytest.raises(DefinitionError, match="is longer than 1024 characters"):
        busy.define_entity("k" * 1025, Ticket)
    with pytest.raises(DefinitionError, match=r"ticket: name 'ss.*longer than 1024"):
        busy.on_entity_changed("ticket", print, name="s" * 1025)
    with pytest.raises(DefinitionError, match="ticket: name must be a string or None"):
        busy.on_entity_changed("ticket", print, name=5)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="ev: name must be a string or None"):
        busy.on_trigger("ev", lambda e, p, c: None, name=5)  # type: ignore[arg-type]

    assert busy.kinds() == ["ticket"]
    assert _snapshot(busy) == before


def test_a_trigger_handler_that_cannot_take_event_payload_change_is_refused(
    busy: Runtime,
) -> None:
    def one(change: Any) -> None:
        pass

    with pytest.raises(DefinitionError) as caught:
        busy.on_trigger("ev", one)

    assert str(caught.value).startswith(
        "ev: handler must take (event, payload, change), got "
    )
    assert "(change: 'Any')" in str(caught.value)
    busy.on_trigger("ev", lambda *args: None)
    busy.on_trigger("ev", lambda e, p, c, extra=None: None)


@pytest.mark.parametrize(
    ("read", "message"),
    [
        (lambda ids: [ticket()], "returned list, expected a mapping"),
        (lambda ids: {"x-1": "open"}, "returned str for 'x-1'"),
        (lambda ids: {"x-1": {"a": float("nan")}}, "unusable state"),
        (lambda ids: 1 / 0, "raised ZeroDivisionError"),
    ],
)
def test_a_read_returning_garbage_is_a_clear_error_and_records_nothing(
    busy: Runtime, read: Any, message: str
) -> None:
    others = busy.define_entity("other", Ticket, read=read)
    applied: list[Any] = []
    before = _snapshot(busy)

    with pytest.raises(ReadError, match=message):
        others.mutate("x-1", lambda prev: applied.append(prev) or ticket())

    assert applied == []
    assert _snapshot(busy) == before


def test_bad_non_reactive_declarations_are_refused(rt: Runtime) -> None:
    rt.declare_non_reactive_state("check_runs", reason="raw-sample", note="samples")

    with pytest.raises(DefinitionError, match="reason must be one of raw-sample"):
        rt.declare_non_reactive_state("tokens", reason="secret")
    with pytest.raises(DefinitionError, match="already declared"):
        rt.declare_non_reactive_state("check_runs", reason="bookkeeping")

    assert [(d.name, d.reason, d.note) for d in rt.non_reactive_states()] == [
        ("check_runs", "raw-sample", "samples")
    ]


def test_writing_before_start_or_after_stop_is_a_clear_error(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with pytest.raises(RuntimeStoppedError, match="not started"):
        tickets.mutate("t-1", lambda prev: ticket())
    rt.start()
    tickets.mutate("t-1", lambda prev: ticket())
    first = rt.stop()
    second = rt.stop()

    assert first.clean
    assert second is first
    with pytest.raises(RuntimeStoppedError, match="stopped"):
        tickets.mutate("t-2", lambda prev: ticket())
    with pytest.raises(RuntimeStoppedError, match="stopped"):
        rt.start()
    with pytest.raises(RuntimeStoppedError, match="stopped"):
        rt.define_entity("other", Ticket)
    assert tickets.get("t-1") == ticket()
    assert tickets.get("t-2") is None


def test_mutating_the_same_kind_from_inside_apply_is_refused(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    def nested(prev: Any) -> Any:
        tickets.mutate("t-2", lambda p: ticket())
        return ticket()

    with rt, pytest.raises(ApplyError, match="would wait for itself"):
        tickets.mutate("t-1", nested)

    assert rt.log.last_seq == 0


def test_the_logger_names_kind_id_and_seq(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with caplog.at_level(logging.DEBUG, logger="runtime"), rt:
        tickets.mutate("t-9", lambda prev: ticket())

    assert any("ticket/t-9 seq=1" in r.getMessage() for r in caplog.records)


def test_mutate_many_applies_every_item_in_order_with_its_own_event(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket, shards=3)
    seen = _record(rt)
    items = [(f"t-{i % 4}", lambda prev, i=i: ticket(tags=[str(i)])) for i in range(20)]

    with rt:
        results = tickets.mutate_many(items, actor="batch")
        rt.drain()

    assert [r["tags"] for r in results] == [[str(i)] for i in range(20)]
    assert sorted(c.seq for c in seen) == list(range(1, 21))
    for entity in range(4):
        mine = [c for c in seen if c.id == f"t-{entity}"]
        assert [c.next["tags"][0] for c in mine] == [
            str(i) for i in range(20) if i % 4 == entity
        ]
    assert {c.actor for c in seen} == {"batch"}


def test_mutate_many_reports_failed_items_and_applies_the_others(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    items = [
        ("t-1", lambda prev: ticket()),
        ("t-2", lambda prev: {"status": "bogus"}),
        ("t-3", lambda prev: 1 / 0),
        ("t-4", lambda prev: ticket(status="closed")),
    ]

    with rt, pytest.raises(MutationBatchError) as caught:
        tickets.mutate_many(items)

    assert set(caught.value.errors) == {1, 2}
    assert isinstance(caught.value.errors[1], SchemaError)
    assert isinstance(caught.value.errors[2], ApplyError)
    assert caught.value.results[0] == ticket()
    assert caught.value.results[3] == ticket(status="closed")
    assert "2 of 4 mutations failed (the others were applied)" in str(caught.value)
    assert sorted(tickets.ids()) == ["t-1", "t-4"]


def test_mutate_many_with_a_bad_item_applies_nothing(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        with pytest.raises(InvalidIdError):
            tickets.mutate_many([("t-1", lambda prev: ticket()), ("", lambda p: p)])
        no_apply: Any = None
        with pytest.raises(DefinitionError, match="item 1 must be an"):
            tickets.mutate_many([("t-1", lambda prev: ticket()), ("t-2", no_apply)])
        empty = tickets.mutate_many([])

    assert empty == []
    assert rt.log.last_seq == 0


@pytest.mark.parametrize(
    ("at", "message"),
    [
        (1_700_000_000_000.0, "milliseconds"),
        (float("nan"), "not a time between"),
        (float("inf"), "not a time between"),
        ("2026-01-01", "must be a datetime or POSIX seconds"),
    ],
)
def test_an_unrecordable_time_is_refused_and_nothing_recorded(
    busy: Runtime, at: Any, message: str
) -> None:
    tickets = busy.handle("ticket")
    before = _snapshot(busy)

    with pytest.raises(InvalidTimeError, match=message):
        tickets.mutate("t-1", lambda prev: ticket(status="working"), at=at)

    assert _snapshot(busy) == before


def test_a_clock_that_returns_nonsense_fails_the_write_and_records_nothing() -> None:
    rt = Runtime(clock=lambda: 1e300)
    tickets = rt.define_entity("ticket", Ticket)

    with rt, pytest.raises(InvalidTimeError, match="runtime's clock"):
        tickets.mutate("t-1", lambda prev: ticket())

    assert rt.log.last_seq == 0
    assert tickets.get("t-1") is None


def test_ids_that_come_and_go_do_not_pile_up_in_the_log(clock: FakeClock) -> None:
    rt = Runtime(clock=clock, retention_max_rows=2, retention_removed_after=3600)
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        for round_ in range(3):
            for i in range(50):
                tickets.mutate(f"r{round_}-{i}", lambda prev: ticket())
                tickets.remove(f"r{round_}-{i}")
            clock.advance(7200)
            rt.apply_retention()
        recent = tickets.history("r2-0")

    assert len(rt.log) == 0
    assert recent == []
    rt.log.check()


def test_a_program_that_exits_without_stop_is_not_kept_alive(tmp_path: Any) -> None:
    import subprocess
    import sys

    script = tmp_path / "forgets_stop.py"
    script.write_text(
        "from dataclasses import dataclass\n"
        "from runtime import Runtime\n"
        "@dataclass\n"
        "class S:\n"
        "    n: int\n"
        f"rt = Runtime(data_dir={str(tmp_path / 'data')!r})\n"
        "h = rt.define_entity('k', S)\n"
        "rt.on_entity_changed('k', lambda c: None)\n"
        "rt.start()\n"
        "h.mutate('a', lambda prev: {'n': 1})\n"
        "raise SystemExit(0)\n"
    )

    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "data").glob("snapshot-*.snap"))
