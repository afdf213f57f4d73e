from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

import pykka
import pytest
from conftest import Ticket, ticket

from runtime import (
    BackpressureError,
    DefinitionError,
    DeliveryTimeoutError,
    EntityChanged,
    Runtime,
    work_queue,
)


def _metric(rt: Runtime, name: str, **labels: str) -> float:
    value = rt.metrics_registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _status_events(change: EntityChanged) -> list[str]:
    if change.is_create:
        return ["ticket.opened"]
    if "status" in change.changed_fields:
        return ["ticket.status", "ticket.changed"]
    return ["ticket.changed"]


def test_derivers_are_united_in_registration_order_without_repeats(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    fired: list[tuple[int, str]] = []
    rt.register_change_deriver("ticket", _status_events)
    rt.register_change_deriver("ticket", lambda c: ["ticket.changed", "ticket.any"])
    rt.register_change_deriver("ticket", lambda c: [])
    for event in ("ticket.opened", "ticket.status", "ticket.changed", "ticket.any"):
        rt.on_trigger(event, lambda e, p, c: fired.append((c.seq, e)))

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-1", lambda prev: ticket(status="closed"))
        rt.drain()

    assert sorted(fired) == [
        (1, "ticket.any"),
        (1, "ticket.changed"),
        (1, "ticket.opened"),
        (2, "ticket.any"),
        (2, "ticket.changed"),
        (2, "ticket.status"),
    ]
    stage = rt._kind("ticket").stage
    assert stage is not None
    change = EntityChanged(kind="ticket", id="x", prev=ticket(), next=ticket("closed"))
    assert [e for e, _ in stage.derive(change)] == [
        "ticket.status",
        "ticket.changed",
        "ticket.any",
    ]


def test_payload_comes_from_the_deriver_that_named_the_event(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    payloads: dict[str, Any] = {}
    rt.register_change_deriver(
        "ticket", lambda c: ["ticket.a"], to_payload=lambda c: {"from": "first"}
    )
    rt.register_change_deriver(
        "ticket",
        lambda c: ["ticket.a", "ticket.b"],
        to_payload=lambda c: {"from": "second", "id": c.id},
    )
    rt.register_change_deriver("ticket", lambda c: ["ticket.c"])
    for event in ("ticket.a", "ticket.b", "ticket.c"):
        rt.on_trigger(event, lambda e, p, c: payloads.__setitem__(e, p))

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.drain()

    assert payloads["ticket.a"] == {"from": "first"}
    assert payloads["ticket.b"] == {"from": "second", "id": "t-1"}
    assert isinstance(payloads["ticket.c"], EntityChanged)
    assert payloads["ticket.c"].id == "t-1"


def test_a_failing_deriver_is_skipped_counted_and_logged(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    fired: list[str] = []

    def broken(change: EntityChanged) -> list[str]:
        raise RuntimeError("deriver bug")

    rt.register_change_deriver("ticket", broken)
    not_a_list: Any = lambda c: "not-a-list"  # noqa: E731
    rt.register_change_deriver("ticket", not_a_list)
    rt.register_change_deriver(
        "ticket", lambda c: ["ticket.bad-payload"], to_payload=lambda c: 1 / 0
    )
    rt.register_change_deriver("ticket", lambda c: ["ticket.ok"])
    rt.on_trigger("ticket.ok", lambda e, p, c: fired.append(e))
    rt.on_trigger("ticket.bad-payload", lambda e, p, c: fired.append(e))

    with caplog.at_level(logging.ERROR), rt:
        state = tickets.mutate("t-1", lambda prev: ticket())
        rt.drain()

    assert state == ticket()
    assert fired == ["ticket.ok"]
    assert _metric(rt, "entity_runtime_deriver_errors_total", kind="ticket") == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken failed on ticket/t-1 seq=1" in m for m in messages)
    assert any("payload mapper" in m and "ticket.bad-payload" in m for m in messages)
    assert tickets.history("t-1")[0].seq == 1


def test_a_failing_subscriber_does_not_stop_the_others_or_the_writer(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []

    def broken(change: EntityChanged) -> None:
        raise ValueError(f"cannot handle {change.id}")

    rt.on_entity_changed("ticket", broken, name="broken")
    rt.on_entity_changed("ticket", lambda c: seen.append(c.seq))

    with caplog.at_level(logging.ERROR), rt:
        for i in range(5):
            tickets.mutate(f"t-{i}", lambda prev: ticket())
        rt.drain()

    assert seen == [1, 2, 3, 4, 5]
    assert (
        _metric(
            rt,
            "entity_runtime_subscriber_errors_total",
            kind="ticket",
            subscriber="broken",
        )
        == 5
    )
    assert any(
        "subscriber broken failed on ticket/t-3 seq=4" in r.getMessage()
        for r in caplog.records
    )
    assert len(tickets.ids()) == 5


def test_a_stalled_subscriber_does_not_block_writers_or_other_subscribers(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    release = threading.Event()
    stalled_seen: list[int] = []
    fast_seen: list[int] = []

    def stalled(change: EntityChanged) -> None:
        release.wait(10)
        stalled_seen.append(change.seq)

    rt.on_entity_changed("ticket", stalled)
    rt.on_entity_changed("ticket", lambda c: fast_seen.append(c.seq))
    rt.register_change_deriver("ticket", lambda c: ["ticket.any"])
    triggered: list[int] = []
    rt.on_trigger("ticket.any", lambda e, p, c: triggered.append(c.seq))

    with rt:
        for i in range(100):
            tickets.mutate(f"t-{i % 7}", lambda prev, i=i: ticket(tags=[str(i)]))
        fast_done = tickets.wait_until("t-0", lambda s: s is not None, timeout=1)
        with pytest.raises(DeliveryTimeoutError, match="subscriber:ticket:"):
            rt.drain(timeout=0.2)
        progress_while_stalled = (len(fast_seen), len(triggered), len(stalled_seen))
        release.set()
        rt.drain(timeout=10)

    assert fast_done is not None
    assert progress_while_stalled[:2] == (100, 100)
    assert progress_while_stalled[2] <= 1
    assert stalled_seen == list(range(1, 101))


def test_each_subscriber_sees_every_ids_events_in_commit_order(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    logs: list[list[EntityChanged]] = [[], [], []]
    for log in logs:
        rt.on_entity_changed("ticket", log.append)

    with rt:
        futures = [
            tickets.mutate_async(f"t-{i % 5}", lambda prev, i=i: ticket(tags=[str(i)]))
            for i in range(300)
        ]
        for future in futures:
            future.get(timeout=10)
        rt.drain()

    for log in logs:
        assert [c.seq for c in log] == list(range(1, 301))
        for entity in range(5):
            mine = [c for c in log if c.id == f"t-{entity}"]
            for before, after in itertools.pairwise(mine):
                assert after.prev == before.next


def test_an_async_handler_is_run_to_completion(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[str] = []

    async def handler(change: EntityChanged) -> None:
        seen.append(change.id)

    rt.on_entity_changed("ticket", handler)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.drain()

    assert seen == ["t-1"]


def test_unsubscribe_stops_deliveries_and_is_harmless_twice(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []
    fired: list[int] = []
    rt.register_change_deriver("ticket", lambda c: ["ticket.any"])
    unsubscribe = rt.on_entity_changed("ticket", lambda c: seen.append(c.seq))
    untrigger = rt.on_trigger("ticket.any", lambda e, p, c: fired.append(c.seq))

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.drain()
        unsubscribe()
        unsubscribe()
        untrigger()
        untrigger()
        tickets.mutate("t-1", lambda prev: ticket(status="closed"))
        rt.drain()

    assert seen == [1]
    assert fired == [1]


def test_subscribing_while_running_receives_later_changes(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.on_entity_changed("ticket", lambda c: seen.append(c.seq))
        tickets.mutate("t-1", lambda prev: ticket(status="closed"))
        rt.drain()

    assert seen == [2]


def test_a_subscriber_far_behind_gets_changes_of_one_id_folded(clock: Any) -> None:
    rt = Runtime(clock=clock, mailbox_size=4)
    tickets = rt.define_entity("ticket", Ticket)
    release = threading.Event()
    seen: list[EntityChanged] = []

    def slow(change: EntityChanged) -> None:
        release.wait(10)
        seen.append(change)

    rt.on_entity_changed("ticket", slow, name="slow")

    try:
        with rt:
            tickets.mutate("a", lambda prev: ticket(tags=["0"]))
            for i in range(1, 50):
                tickets.mutate("b", lambda prev, i=i: ticket(tags=[str(i)]))
            tickets.mutate("a", lambda prev: ticket(tags=["last"]))
            release.set()
            rt.drain(timeout=10)
    finally:
        rt.stop()

    by_id = {c.id: [x for x in seen if x.id == c.id] for c in seen}
    assert len(seen) < 51
    assert by_id["b"][-1].next == ticket(tags=["49"])
    assert by_id["a"][-1].next == ticket(tags=["last"])
    for changes in by_id.values():
        assert [c.seq for c in changes] == sorted(c.seq for c in changes)
        for before, after in itertools.pairwise(changes):
            assert after.prev == before.next
    folded = _metric(
        rt, "entity_runtime_coalesced_total", actor="subscriber:ticket:slow"
    )
    assert folded == 51 - len(seen)


def test_a_full_deriver_stage_holds_writers_back_then_refuses(clock: Any) -> None:
    rt = Runtime(clock=clock, mailbox_size=2, backpressure_timeout=0.2)
    tickets = rt.define_entity("ticket", Ticket)
    release = threading.Event()

    def stuck_deriver(change: EntityChanged) -> list[str]:
        release.wait(10)
        return []

    rt.register_change_deriver("ticket", stuck_deriver)

    try:
        with rt:
            for i in range(3):
                tickets.mutate(f"t-{i}", lambda prev: ticket())
            recorded = rt.log.last_seq
            with pytest.raises(BackpressureError, match=r"ticket/t-9: .*nothing"):
                tickets.mutate("t-9", lambda prev: ticket())
            after = rt.log.last_seq
            release.set()
            rt.drain(timeout=10)
            tickets.mutate("t-9", lambda prev: ticket())
    finally:
        rt.stop()

    assert recorded == 3
    assert after == 3
    assert tickets.get("t-9") == ticket()


# -- work queues --------------------------------------------------------------


def test_work_queue_retries_then_succeeds(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    attempts: list[int] = []

    def flaky(change: EntityChanged) -> None:
        attempts.append(change.seq)
        if len(attempts) < 3:
            raise ConnectionError("backend down")

    rt.on_entity_changed(
        "ticket", flaky, delivery=work_queue("cleanup", max_attempts=5, backoff=0.001)
    )

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.drain()

    assert attempts == [1, 1, 1]
    assert rt.dead_letters() == []


def test_work_queue_dead_letters_after_the_last_attempt_and_replays(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    healthy = threading.Event()
    handled: list[int] = []

    def handler(change: EntityChanged) -> None:
        if not healthy.is_set():
            raise ConnectionError("backend down")
        handled.append(change.seq)

    rt.on_entity_changed(
        "ticket", handler, delivery=work_queue("cleanup", max_attempts=2, backoff=0)
    )

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-2", lambda prev: ticket())
        rt.drain()
        letters = rt.dead_letters("cleanup")
        healthy.set()
        replayed = rt.replay_dead_letters("cleanup")
        rt.drain()

    assert [(d.change.seq, d.attempts) for d in letters] == [(1, 2), (2, 2)]
    assert letters[0].error == "ConnectionError: backend down"
    assert letters[0].to_dict()["worker_group"] == "cleanup"
    assert replayed == 2
    assert handled == [1, 2]
    assert rt.dead_letters() == []
    assert _metric(rt, "entity_runtime_dead_letters_total", worker_group="cleanup") == 2


def test_work_queue_runs_each_change_once_per_group(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    first: list[int] = []
    second: list[int] = []
    other_group: list[int] = []
    rt.on_entity_changed("ticket", lambda c: first.append(c.seq), work_queue("g"))
    rt.on_entity_changed("ticket", lambda c: second.append(c.seq), work_queue("g"))
    rt.on_entity_changed("ticket", lambda c: other_group.append(c.seq), work_queue("h"))

    with rt:
        for i in range(40):
            tickets.mutate(f"t-{i}", lambda prev: ticket())
        rt.drain()

    assert sorted(first + second) == list(range(1, 41))
    assert not set(first) & set(second)
    assert other_group == list(range(1, 41))


def test_stop_interrupts_a_retry_wait_and_keeps_the_change_as_a_dead_letter(
    clock: Any,
) -> None:
    rt = Runtime(clock=clock, stop_timeout=0.2)
    tickets = rt.define_entity("ticket", Ticket)

    def failing(change: EntityChanged) -> None:
        raise ConnectionError("down")

    rt.on_entity_changed(
        "ticket", failing, delivery=work_queue("g", max_attempts=3, backoff=60)
    )
    rt.start()
    tickets.mutate("t-1", lambda prev: ticket())

    report = rt.stop()

    letters = rt.dead_letters()
    assert [(d.change.seq, d.attempts) for d in letters] == [(1, 1)]
    assert "runtime stopped before attempt 2" in letters[0].error
    assert report.undelivered == ()


def test_stop_delivers_everything_committed_before_it_returns(clock: Any) -> None:
    rt = Runtime(clock=clock)
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []
    cascaded: list[int] = []
    audit = rt.define_entity("audit", Ticket)

    def slowish(change: EntityChanged) -> None:
        threading.Event().wait(0.001)
        seen.append(change.seq)
        audit.mutate(change.id, lambda prev: ticket(status="closed"))

    rt.on_entity_changed("ticket", slowish)
    rt.on_entity_changed("audit", lambda c: cascaded.append(c.seq))
    rt.start()
    futures = [
        tickets.mutate_async(f"t-{i}", lambda prev: ticket()) for i in range(200)
    ]

    report = rt.stop()

    assert report.clean
    assert all(f.done() for f in futures)
    ticket_seqs = [
        rows[0].seq for rows in rt.log.changes_since(0) if rows[0].kind == "ticket"
    ]
    assert sorted(seen) == ticket_seqs
    assert len(ticket_seqs) == 200
    assert len(cascaded) == 200
    assert len(audit.ids()) == 200


def test_stop_reports_what_a_stuck_subscriber_never_got(
    clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rt = Runtime(clock=clock, stop_timeout=0.3)
    tickets = rt.define_entity("ticket", Ticket)
    release = threading.Event()
    rt.on_entity_changed("ticket", lambda c: release.wait(10), name="stuck")
    rt.start()
    for i in range(3):
        tickets.mutate(f"t-{i}", lambda prev: ticket())

    with caplog.at_level(logging.WARNING):
        report = rt.stop()
    release.set()
    # The stuck handler's thread was left behind; once released, it ends.
    for ref in pykka.ActorRegistry.get_all():
        ref.stop(block=True, timeout=5)

    assert not report.clean
    assert [seq for _, seq in report.undelivered] == [2, 3]
    assert report.stuck_consumers == ("subscriber:ticket:stuck",)
    assert any("2 deliveries undelivered" in r.getMessage() for r in caplog.records)


def test_drain_until_idle_waits_for_cascading_writes(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    audit = rt.define_entity("audit", Ticket)
    audited: list[int] = []

    def copy_to_audit(change: EntityChanged) -> None:
        threading.Event().wait(0.002)
        audit.mutate(change.id, lambda prev: ticket(status="closed"))

    rt.on_entity_changed("ticket", copy_to_audit)
    rt.on_entity_changed("audit", lambda c: audited.append(c.seq))

    with rt:
        for i in range(20):
            tickets.mutate(f"t-{i}", lambda prev: ticket())
        rt.drain(timeout=10, until_idle=True)
        audited_when_idle = len(audited)

    assert audited_when_idle == 20
    assert len(audit.ids()) == 20


@pytest.mark.parametrize("shards", [1, 2])
def test_drain_does_not_wait_for_an_apply_that_has_committed_nothing(
    rt: Runtime, shards: int
) -> None:
    # A slow apply on one kind has committed nothing; a change of another
    # kind committed meanwhile is all drain() has to wait for.
    slow = rt.define_entity("slow", Ticket, shards=shards)
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[str] = []
    rt.on_entity_changed("ticket", lambda c: seen.append(c.id))
    started, gate = threading.Event(), threading.Event()

    def held(prev: Any) -> dict[str, Any]:
        started.set()
        assert gate.wait(20)
        return ticket(status="closed")

    with rt:
        stuck = slow.mutate_async("s-1", held)
        try:
            assert started.wait(10)
            tickets.mutate("t-1", lambda prev: ticket())
            rt.drain(timeout=2)
            drained = list(seen)
        finally:
            gate.set()
        stuck.get(timeout=10)
        rt.drain(timeout=10)

    assert drained == ["t-1"]
    assert slow.get("s-1") == ticket(status="closed")


def test_an_async_deriver_is_refused_at_registration(rt: Runtime) -> None:
    rt.define_entity("ticket", Ticket)

    async def derive(change: EntityChanged) -> list[str]:
        return ["ticket.any"]

    with pytest.raises(DefinitionError, match="plain function"):
        rt.register_change_deriver("ticket", derive)
