from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Ticket, ticket

from actors._consumers import ConsumerActor
from actors._kind import KindActor
from runtime import ActorFailedError, ApplyError, EntityChanged, Runtime, work_queue


def _restarts(rt: Runtime, actor: str) -> float:
    value = rt.metrics_registry.get_sample_value(
        "entity_runtime_actor_restarts_total", {"actor": actor}
    )
    return 0.0 if value is None else value


def test_a_kind_actor_failing_outside_user_code_fails_back_and_carries_on(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    original = KindActor._handle_batch
    broken = threading.Event()
    broken.set()

    def handle_batch(self: KindActor, batch: Any, wakes: Any) -> None:
        if broken.is_set():
            broken.clear()
            raise RuntimeError("simulated bug in the actor loop")
        original(self, batch, wakes)

    monkeypatch.setattr(KindActor, "_handle_batch", handle_batch)

    with caplog.at_level(logging.ERROR), rt:
        with pytest.raises(ActorFailedError, match=r"ticket/t-1: the kind actor fail"):
            tickets.mutate("t-1", lambda prev: ticket())
        after = tickets.mutate("t-2", lambda prev: ticket(status="closed"))
        rt.drain()

    assert after["status"] == "closed"
    assert tickets.get("t-1") is None
    assert _restarts(rt, "kind:ticket/0") == 1
    assert any("restarting" in r.getMessage() for r in caplog.records)


def test_a_hand_off_failure_keeps_the_commit_and_does_not_wedge_drain(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []
    rt.on_entity_changed("ticket", lambda c: seen.append(c.seq))
    calls = {"n": 0}
    original = Runtime._publish

    def publish(
        self: Runtime, changes: list[EntityChanged], wakes: list[Callable[[], None]]
    ) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated hand-off bug")
        original(self, changes, wakes)

    monkeypatch.setattr(Runtime, "_publish", publish)

    with rt:
        first = tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-2", lambda prev: ticket())
        rt.drain(timeout=5)

    assert first == ticket()
    assert tickets.get("t-1") == ticket()
    assert seen == [2]
    assert _restarts(rt, "kind:ticket/0") == 1


def test_a_consumer_failing_outside_its_handler_carries_on(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []
    rt.on_entity_changed("ticket", lambda c: seen.append(c.seq), name="audit")
    original = ConsumerActor.on_receive
    state = {"failed": False}

    def process_once_broken(self: ConsumerActor, message: Any) -> None:
        if not state["failed"] and "audit" in self.mailbox.name:
            state["failed"] = True
            inner = self._process

            def broken(item: Any) -> None:
                self._process = inner
                raise RuntimeError("simulated consumer bug")

            self._process = broken
        original(self, message)

    monkeypatch.setattr(ConsumerActor, "on_receive", process_once_broken)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.drain()
        tickets.mutate("t-2", lambda prev: ticket())
        rt.drain()

    assert seen == [2]
    assert _restarts(rt, "subscriber:ticket:audit") == 1


def _value(rt: Runtime, name: str, **labels: str) -> float:
    found = rt.metrics_registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_handlers_that_raise_exits_fail_their_call_and_stop_nothing() -> None:
    rt = Runtime()
    other = Runtime()
    tickets = rt.define_entity("ticket", Ticket)
    others = other.define_entity("ticket", Ticket)
    healthy: list[int] = []
    triggered: list[int] = []
    attempts: list[int] = []

    def exits(change: EntityChanged) -> None:
        raise SystemExit(3)

    def interrupted_deriver(change: EntityChanged) -> list[str]:
        if change.seq == 1:
            raise KeyboardInterrupt
        return ["ticket.changed"]

    def interrupted_trigger(event: str, payload: Any, change: EntityChanged) -> None:
        triggered.append(change.seq)
        raise KeyboardInterrupt

    def exits_in_work_queue(change: EntityChanged) -> None:
        attempts.append(change.seq)
        raise SystemExit("bye")

    rt.on_entity_changed("ticket", exits, name="exits")
    rt.on_entity_changed("ticket", lambda c: healthy.append(c.seq), name="healthy")
    rt.register_change_deriver("ticket", interrupted_deriver)
    rt.on_trigger("ticket.changed", interrupted_trigger, name="trigger")
    rt.on_entity_changed(
        "ticket",
        exits_in_work_queue,
        delivery=work_queue("jobs", max_attempts=2, backoff=0.001),
        name="job",
    )

    with rt, other:
        for status in ("open", "working", "closed"):
            tickets.mutate("t-1", lambda prev, s=status: ticket(status=s))
        rt.drain(timeout=10)
        later = tickets.mutate("t-2", lambda prev: ticket())
        rt.drain(timeout=10)
        still_other = others.mutate("t-1", lambda prev: ticket())
        letters = rt.dead_letters()
        report = rt.stop()

    assert later == ticket()
    assert still_other == ticket()
    assert healthy == [1, 2, 3, 4]
    assert triggered == [2, 3, 4]
    assert attempts == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [(d.change.seq, d.attempts) for d in letters] == [
        (s, 2) for s in (1, 2, 3, 4)
    ]
    assert all("HandlerExitError: raised SystemExit(bye)" in d.error for d in letters)
    assert (
        _value(
            rt,
            "entity_runtime_subscriber_errors_total",
            kind="ticket",
            subscriber="exits",
        )
        == 4
    )
    assert (
        _value(
            rt,
            "entity_runtime_subscriber_errors_total",
            kind="ticket",
            subscriber="trigger",
        )
        == 3
    )
    assert _value(rt, "entity_runtime_deriver_errors_total", kind="ticket") == 1
    assert report.clean


@pytest.mark.parametrize("exit_", [SystemExit(2), KeyboardInterrupt()])
def test_an_apply_raising_an_exit_fails_its_write_only(
    rt: Runtime, exit_: BaseException
) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    def leaves(prev: Any) -> Any:
        raise exit_

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        with pytest.raises(ApplyError, match=type(exit_).__name__) as failed:
            tickets.mutate("t-1", leaves)
        after = tickets.mutate("t-2", lambda prev: ticket("closed"))

    assert failed.value.__cause__ is exit_
    assert tickets.get("t-1") == ticket()
    assert after == ticket("closed")
    assert rt.log.last_seq == 2
