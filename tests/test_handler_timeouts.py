from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Container, Iterator
from typing import Any, Literal, NamedTuple

import pytest
from conftest import Ticket, ticket
from redis_server import RedisServer, find_redis_server

from actors._mailbox import DeliveryTracker, Mailbox
from runtime import (
    DefinitionError,
    EntityChanged,
    EntityHandle,
    Runtime,
    Unsubscribe,
    work_queue,
)

TIMEOUT = 0.2
"""The handler timeout of these tests, in seconds."""


def _metric(rt: Runtime, name: str, **labels: str) -> float:
    value = rt.metrics_registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _errors(rt: Runtime, subscriber: str, kind: str = "ticket") -> float:
    return _metric(
        rt, "entity_runtime_subscriber_errors_total", kind=kind, subscriber=subscriber
    )


def _timeouts(rt: Runtime, subscriber: str, kind: str = "ticket") -> float:
    return _metric(
        rt, "entity_runtime_handler_timeouts_total", kind=kind, subscriber=subscriber
    )


class Hang:
    """Holds handler calls until released, and checks their threads end.

    A handler calls the object to hang. ``finish`` (run by the fixture at the
    latest) releases every held call and joins the threads they ran on, so no
    test leaves a thread behind.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self) -> None:
        self.threads.append(threading.current_thread())
        self.entered.set()
        assert self.release.wait(30), "a hung handler was never released"

    def finish(self) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join(5)
        assert not [t for t in self.threads if t.is_alive()]


@pytest.fixture
def hang() -> Iterator[Hang]:
    held = Hang()
    try:
        yield held
    finally:
        held.finish()


def _opened(change: EntityChanged) -> list[str]:
    return ["ticket.opened"] if change.is_create else []


def _hanging_handler(
    hang: Hang,
    on: Container[int],
    then: Literal["skip", "record", "raise"] = "skip",
) -> tuple[Callable[[EntityChanged], None], list[int]]:
    """A handler that hangs on the changes of seq ``on`` and records the others.

    Returns the handler and the seqs it recorded. Once released, a hung call
    returns without recording (``skip``), records its seq late (``record``) or
    raises (``raise``).
    """
    seen: list[int] = []

    def handler(change: EntityChanged) -> None:
        if change.seq in on:
            hang()
            if then == "raise":
                raise RuntimeError("woke up too late")
            if then == "skip":
                return
        seen.append(change.seq)

    return handler, seen


class _Slow(NamedTuple):
    """The ``ticket`` kind, with a hanging subscriber ``slow`` on a timeout."""

    tickets: EntityHandle[Any]
    seen: list[int]
    unsubscribe: Unsubscribe


def _subscribe_slow(
    rt: Runtime,
    hang: Hang,
    on: Container[int],
    then: Literal["skip", "record", "raise"] = "skip",
) -> _Slow:
    """Define ``ticket`` and subscribe ``_hanging_handler`` to it as ``slow``."""
    tickets = rt.define_entity("ticket", Ticket)
    slow, seen = _hanging_handler(hang, on, then)

    unsubscribe = rt.on_entity_changed("ticket", slow, name="slow", timeout=TIMEOUT)

    return _Slow(tickets, seen, unsubscribe)


def _subscribe_worker(
    rt: Runtime, worker: Callable[[EntityChanged], None], max_attempts: int
) -> None:
    """Subscribe ``worker`` to ``ticket`` in the work queue ``jobs``, on a timeout."""
    rt.on_entity_changed(
        "ticket",
        worker,
        work_queue("jobs", max_attempts=max_attempts, backoff=0.0),
        name="worker",
        timeout=TIMEOUT,
    )


def test_a_hung_broadcast_subscriber_fails_that_change_and_goes_on_in_order(
    rt: Runtime, hang: Hang, caplog: pytest.LogCaptureFixture
) -> None:
    """The hung change is failed; the same subscriber gets every later one."""
    tickets, slow_seen, _ = _subscribe_slow(rt, hang, on={2})
    other_seen: list[int] = []
    rt.on_entity_changed("ticket", lambda c: other_seen.append(c.seq), name="other")

    with caplog.at_level(logging.ERROR, logger="actors._consumers"), rt:
        tickets.mutate_many([(f"t-{i}", lambda prev: ticket()) for i in range(6)])
        tickets.mutate("t-1", lambda prev: ticket(status="closed"))
        rt.drain(timeout=5)

        assert slow_seen == [1, 3, 4, 5, 6, 7]
        assert other_seen == [1, 2, 3, 4, 5, 6, 7]
        assert _errors(rt, "slow") == 1
        assert _timeouts(rt, "slow") == 1
        assert _errors(rt, "other") == 0
        hang.finish()
        tickets.mutate("t-9", lambda prev: ticket())
        rt.drain(timeout=5)

    assert slow_seen == [1, 3, 4, 5, 6, 7, 8]
    assert _errors(rt, "slow") == 1
    (record,) = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert record.levelname == "ERROR"
    assert record.getMessage().startswith(
        "subscriber slow timed out on ticket/t-1 seq=2: no return within 0.2 s"
    )
    assert rt.stop().clean


def test_drain_waits_for_the_timeout_and_the_changes_after_it(
    rt: Runtime, hang: Hang
) -> None:
    """drain() neither hangs on the stuck call nor returns before what follows."""
    tickets, seen, _ = _subscribe_slow(rt, hang, on={1}, then="record")

    with rt:
        started = time.monotonic()
        tickets.mutate_many([(f"t-{i}", lambda prev: ticket()) for i in range(50)])
        rt.drain(timeout=5)
        took = time.monotonic() - started

        assert seen == list(range(2, 51))
        assert TIMEOUT <= took < 2.0
        rt.drain(timeout=5, until_idle=True)


def test_stop_does_not_wait_for_an_abandoned_call_and_reports_it(
    rt: Runtime, hang: Hang
) -> None:
    """A call still stuck at stop() is reported as abandoned, not waited for."""
    tickets, seen, _ = _subscribe_slow(rt, hang, on={1}, then="record")

    rt.start()
    tickets.mutate("t-1", lambda prev: ticket())
    tickets.mutate("t-2", lambda prev: ticket())
    assert hang.entered.wait(5)
    started = time.monotonic()
    report = rt.stop()
    took = time.monotonic() - started

    assert seen == [2]
    assert took < 2.0
    assert not report.clean
    assert report.abandoned == ("subscriber:ticket:slow",)
    assert report.undelivered == ()
    assert report.stuck_consumers == ()
    hang.finish()
    # The abandoned call still finishes its own work; nothing else runs.
    assert seen == [2, 1]


def test_the_replacement_is_watched_too(rt: Runtime, hang: Hang) -> None:
    """A subscriber that hangs again is taken over again."""
    tickets, seen, _ = _subscribe_slow(rt, hang, on={2, 4})

    with rt:
        tickets.mutate_many([(f"t-{i}", lambda prev: ticket()) for i in range(6)])
        rt.drain(timeout=5)

        assert seen == [1, 3, 5, 6]
        assert _timeouts(rt, "slow") == 2
        assert len(hang.threads) == 2
        assert hang.threads[0] is not hang.threads[1]
        hang.finish()

    assert rt.stop().clean


def test_unsubscribing_during_a_hung_call_still_closes_its_deliveries(
    rt: Runtime, hang: Hang
) -> None:
    """The stuck call of an ended subscription times out; nothing replaces it."""
    tickets, seen, unsubscribe = _subscribe_slow(rt, hang, on={1})

    with rt:
        tickets.mutate_many([(f"t-{i}", lambda prev: ticket()) for i in range(3)])
        assert hang.entered.wait(5)
        unsubscribe()
        rt.drain(timeout=5)

        assert seen == []
        assert _timeouts(rt, "slow") == 1
        hang.finish()
        tickets.mutate("t-9", lambda prev: ticket())
        rt.drain(timeout=5)

    assert seen == []
    assert rt.stop().clean


def test_a_released_call_neither_delivers_again_nor_counts_again(
    rt: Runtime, hang: Hang
) -> None:
    """Once taken over, the old thread's late return or raise changes nothing."""
    tickets, seen, _ = _subscribe_slow(rt, hang, on={2}, then="raise")

    with rt:
        for i in range(4):
            tickets.mutate(f"t-{i}", lambda prev: ticket())
        rt.drain(timeout=5)
        hang.finish()
        for i in range(4, 8):
            tickets.mutate(f"t-{i}", lambda prev: ticket())
        rt.drain(timeout=5)

        assert seen == [1, 3, 4, 5, 6, 7, 8]
        assert _errors(rt, "slow") == 1
        assert _timeouts(rt, "slow") == 1

    assert rt.stop().clean


def test_a_work_queue_retries_a_timed_out_attempt_on_the_replacement(
    rt: Runtime, hang: Hang
) -> None:
    """Attempt 1 hangs, attempt 2 succeeds: no dead letter, each id in order."""
    tickets = rt.define_entity("ticket", Ticket)
    attempts: dict[int, int] = {}
    handled: list[tuple[str, int]] = []

    def worker(change: EntityChanged) -> None:
        attempts[change.seq] = attempts.get(change.seq, 0) + 1
        if change.seq == 1 and attempts[1] == 1:
            hang()
            return
        handled.append((change.id, change.seq))

    _subscribe_worker(rt, worker, max_attempts=3)

    with rt:
        tickets.mutate_many(
            [
                ("t-1", lambda prev: ticket()),
                ("t-1", lambda prev: ticket(status="working")),
                ("t-2", lambda prev: ticket()),
                ("t-1", lambda prev: ticket(status="closed")),
            ]
        )
        rt.drain(timeout=5)
        hang.finish()
        rt.drain(timeout=5)

    assert handled == [("t-1", 1), ("t-1", 2), ("t-2", 3), ("t-1", 4)]
    assert attempts == {1: 2, 2: 1, 3: 1, 4: 1}
    assert rt.dead_letters() == []
    assert _errors(rt, "worker") == 1
    assert _timeouts(rt, "worker") == 1
    assert _metric(rt, "entity_runtime_dead_letters_total", worker_group="jobs") == 0


def test_a_work_queue_handler_that_always_hangs_is_dead_lettered(
    rt: Runtime, hang: Hang
) -> None:
    """Each attempt times out; the change becomes a replayable dead letter."""
    tickets = rt.define_entity("ticket", Ticket)
    attempts: list[int] = []
    handled: list[int] = []
    healed = threading.Event()

    def worker(change: EntityChanged) -> None:
        if change.id == "t-1" and not healed.is_set():
            attempts.append(change.seq)
            hang()
            return
        handled.append(change.seq)

    _subscribe_worker(rt, worker, max_attempts=2)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-2", lambda prev: ticket())
        rt.drain(timeout=5)

        (letter,) = rt.dead_letters("jobs")
        assert (letter.change.seq, letter.attempts, letter.subscriber) == (
            1,
            2,
            "worker",
        )
        assert letter.error == ("TimeoutError: timed out after 0.2 s; call abandoned")
        assert attempts == [1, 1]
        assert handled == [2]
        assert _errors(rt, "worker") == 2
        assert _timeouts(rt, "worker") == 2
        assert (
            _metric(rt, "entity_runtime_dead_letters_total", worker_group="jobs") == 1
        )

        healed.set()
        assert rt.replay_dead_letters("jobs") == 1
        rt.drain(timeout=5)
        hang.finish()
        rt.drain(timeout=5)

    assert handled == [2, 1]
    assert attempts == [1, 1]
    assert rt.dead_letters() == []
    assert _errors(rt, "worker") == 2


def test_a_hung_trigger_handler_fails_that_event_and_goes_on(
    rt: Runtime, hang: Hang, caplog: pytest.LogCaptureFixture
) -> None:
    """A trigger handler call past its timeout is failed, not retried."""
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_change_deriver("ticket", _opened)
    fired: list[tuple[str, int]] = []

    def on_opened(event: str, payload: Any, change: EntityChanged) -> None:
        if change.id == "t-1":
            hang()
            return
        fired.append((event, change.seq))

    rt.on_trigger("ticket.opened", on_opened, name="opened", timeout=TIMEOUT)

    with caplog.at_level(logging.ERROR, logger="actors._consumers"), rt:
        for i in range(1, 4):
            tickets.mutate(f"t-{i}", lambda prev: ticket())
        rt.drain(timeout=5)

        assert fired == [("ticket.opened", 2), ("ticket.opened", 3)]
        assert _errors(rt, "opened") == 1
        assert _timeouts(rt, "opened") == 1
        hang.finish()

    (message,) = [r.getMessage() for r in caplog.records if "timed out" in r.message]
    assert message.startswith(
        "trigger handler opened timed out on ticket.opened for ticket/t-1 seq=1: "
        "no return within 0.2 s"
    )
    assert rt.stop().clean


def test_the_runtime_default_timeout_applies_unless_a_subscription_sets_one(
    clock: Any, hang: Hang
) -> None:
    """handler_timeout covers subscriptions without a timeout of their own."""
    rt = Runtime(clock=clock, stop_timeout=5.0, handler_timeout=TIMEOUT)
    tickets = rt.define_entity("ticket", Ticket)
    hangs_once, defaulted = _hanging_handler(hang, on={1})
    patient: list[int] = []

    def slow(change: EntityChanged) -> None:
        time.sleep(0.3)
        patient.append(change.seq)

    rt.on_entity_changed("ticket", hangs_once, name="defaulted")
    rt.on_entity_changed("ticket", slow, name="patient", timeout=5)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-2", lambda prev: ticket())
        rt.drain(timeout=5)
        hang.finish()

    assert defaulted == [2]
    assert patient == [1, 2]
    assert _timeouts(rt, "defaulted") == 1
    assert _errors(rt, "patient") == 0
    assert rt.stop().clean


def test_without_a_timeout_a_slow_handler_is_not_failed(rt: Runtime) -> None:
    """No timeout configured: a handler taking 0.3 s just finishes."""
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []

    def slow(change: EntityChanged) -> None:
        time.sleep(0.3)
        seen.append(change.seq)

    rt.on_entity_changed("ticket", slow, name="slow")
    rt.on_entity_changed(
        "ticket", slow, work_queue("jobs", max_attempts=1), name="slow-worker"
    )

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-2", lambda prev: ticket())
        rt.drain(timeout=5)

    assert sorted(seen) == [1, 1, 2, 2]
    assert _errors(rt, "slow") == 0
    assert _errors(rt, "slow-worker") == 0
    assert rt.dead_letters() == []
    assert rt.stop().clean


@pytest.mark.parametrize(
    "bad", [0, 0.0, -1, -0.5, math.nan, math.inf, 10**400, "1", True, False, [1]]
)
def test_a_bad_timeout_is_refused_and_nothing_is_subscribed(
    rt: Runtime, bad: Any
) -> None:
    """Timeouts must be positive finite seconds or None."""
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_change_deriver("ticket", _opened)
    calls: list[int] = []
    pattern = (
        r"timeout must be a number of seconds, more than 0 and at most 1e\+09 "
        r"\(or None\)"
    )

    with pytest.raises(DefinitionError, match=rf"^ticket: {pattern}") as raised:
        rt.on_entity_changed("ticket", lambda c: calls.append(1), timeout=bad)
    assert f"got {bad!r}; nothing subscribed" in str(raised.value)
    with pytest.raises(DefinitionError, match=rf"^ticket: {pattern}"):
        rt.on_entity_changed(
            "ticket", lambda c: calls.append(2), work_queue("jobs"), timeout=bad
        )
    with pytest.raises(DefinitionError, match=rf"^ticket.opened: {pattern}"):
        rt.on_trigger("ticket.opened", lambda e, p, c: calls.append(3), timeout=bad)
    with pytest.raises(
        DefinitionError,
        match=r"^handler_timeout must be a number of seconds, more than 0",
    ):
        Runtime(handler_timeout=bad)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.drain(timeout=5)
    assert calls == []


def test_handlers_of_one_worker_group_must_share_a_timeout(rt: Runtime) -> None:
    """A second member with another timeout is refused; the group is unchanged."""
    rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", print, work_queue("jobs"), timeout=1.0)

    with pytest.raises(
        DefinitionError,
        match=r"^ticket: worker group 'jobs' has timeout 1\.0, .* got timeout 2\.0",
    ):
        rt.on_entity_changed("ticket", print, work_queue("jobs"), timeout=2.0)
    rt.on_entity_changed("ticket", print, work_queue("jobs"), timeout=1)


def test_a_mailbox_hands_a_stuck_batch_over_in_order() -> None:
    """hand_over closes what was handled and queues the rest first, in order."""
    tracker = DeliveryTracker()
    box = Mailbox("box", 10, tracker)
    box.put_many([(i, f"item-{i}", i) for i in range(1, 5)])
    batch = box.take_many(3)
    assert batch is not None
    box.put(9, "item-9", 9)
    box.started = 2

    done, requeued = box.hand_over(batch, 1, retry="retry-2")

    assert (done, requeued) == ([1], True)
    tracker.done(done)
    rest = box.take_many(10)
    assert rest is not None
    assert [(item, list(seqs)) for item, seqs, _ in rest] == [
        ("retry-2", [2]),
        ("item-3", [3]),
        ("item-4", [4]),
        ("item-9", [9]),
    ]
    box.release(rest)
    assert tracker.open_count() == 0


def test_a_closed_mailbox_keeps_what_it_claimed_from_a_stuck_batch() -> None:
    """After close(), hand_over leaves the claimed deliveries to the closer."""
    tracker = DeliveryTracker()
    box = Mailbox("box", 10, tracker)
    box.put_many([(i, f"item-{i}", i) for i in range(1, 5)])
    batch = box.take_many(10)
    assert batch is not None
    box.started = 2
    claimed = box.close()

    done, requeued = box.hand_over(batch, 1)

    assert (done, requeued) == ([1, 2], False)
    assert [seqs for _, seqs in claimed] == [[3], [4]]
    assert len(box) == 0


def test_calls_ending_around_their_timeout_are_accounted_exactly_once(
    rt: Runtime,
) -> None:
    """Seeded race: calls end just before, at or after the timeout.

    Every change reaches the broadcast subscriber once, in order; every
    work-queue call either timed out or succeeded, and each change that did
    not become a dead letter succeeded exactly once.
    """
    rng = random.Random(7)
    lock = threading.Lock()
    tickets = rt.define_entity("ticket", Ticket)
    broadcast_calls: list[int] = []
    worker_calls: collections.Counter[int] = collections.Counter()

    def pause() -> None:
        with lock:
            seconds = rng.uniform(0.6 * TIMEOUT / 10, 1.4 * TIMEOUT / 10)
        time.sleep(seconds)

    def subscriber(change: EntityChanged) -> None:
        with lock:
            broadcast_calls.append(change.seq)
        pause()

    def worker(change: EntityChanged) -> None:
        with lock:
            worker_calls[change.seq] += 1
        pause()

    rt.on_entity_changed("ticket", subscriber, name="sub", timeout=TIMEOUT / 10)
    rt.on_entity_changed(
        "ticket",
        worker,
        work_queue("jobs", max_attempts=3, backoff=0.0),
        name="worker",
        timeout=TIMEOUT / 10,
    )
    statuses = ("open", "working", "closed")
    items = [
        (f"t-{i % 7}", lambda prev, s=statuses[i % 3]: ticket(status=s))
        for i in range(150)
    ]

    with rt:
        for start in range(0, len(items), 50):
            tickets.mutate_many(items[start : start + 50])
        rt.drain(timeout=60, until_idle=True)
        last = rt.log.last_seq

        dead = len(rt.dead_letters("jobs"))
        assert broadcast_calls == list(range(1, last + 1))
        assert sorted(worker_calls) == list(range(1, last + 1))
        assert max(worker_calls.values()) <= 3
        assert sum(worker_calls.values()) == _timeouts(rt, "worker") + last - dead
        assert _errors(rt, "worker") == _timeouts(rt, "worker")
        assert _errors(rt, "sub") == _timeouts(rt, "sub")


@pytest.mark.skipif(find_redis_server() is None, reason="no redis-server here")
def test_a_work_queue_on_the_bus_takes_no_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bus work queues refuse a timeout; the runtime default is skipped, loudly."""
    from runtime import RedisBus

    with RedisServer() as server:
        bus = RedisBus(server.url, instance_id="a", block_ms=100)
        rt = Runtime(bus=bus, handler_timeout=1.0, stop_timeout=5.0)
        try:
            rt.define_entity("ticket", Ticket)

            with pytest.raises(
                DefinitionError,
                match=r"^ticket: work queue 'jobs' runs on the bus, which has no ",
            ):
                rt.on_entity_changed("ticket", print, work_queue("jobs"), timeout=1)
            with caplog.at_level(logging.WARNING, logger="actors._runtime"):
                rt.on_entity_changed("ticket", print, work_queue("jobs"), name="w")
            rt.on_entity_changed("ticket", print, name="b", timeout=1.0)
        finally:
            rt.stop()

    assert "handler_timeout=1 s does not apply to w" in caplog.text
