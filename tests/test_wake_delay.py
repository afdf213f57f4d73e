"""Kind actors hold consumer wake-ups back for at most ``wake_delay``."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any

import pytest
from conftest import Ticket, ticket

from runtime import DefinitionError, EntityChanged, Runtime


@pytest.mark.parametrize(
    "value", [-0.001, math.nan, math.inf, 1.5, "0.002", True, None, [0.1]]
)
def test_a_bad_wake_delay_is_refused_before_anything_starts(value: Any) -> None:
    with pytest.raises(DefinitionError, match=r"^wake_delay must be"):
        Runtime(wake_delay=value)


@pytest.mark.parametrize("value", [0, 0.0, 0.002, 1])
def test_wake_delays_from_zero_to_one_second_are_accepted(value: float) -> None:
    with Runtime(wake_delay=value) as rt:
        tickets = rt.define_entity("ticket", Ticket)
        rt.start()
        assert tickets.mutate("t-1", lambda prev: ticket())["status"] == "open"


@pytest.mark.parametrize("wake_delay", [0.0, 0.002, 1.0])
def test_a_stream_of_blocking_writes_reaches_every_consumer_in_order(
    wake_delay: float,
) -> None:
    seen: list[int] = []
    fired: list[int] = []
    rt = Runtime(wake_delay=wake_delay, stop_timeout=5.0)
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_change_deriver("ticket", lambda change: ["ticket.changed"])
    rt.on_entity_changed("ticket", lambda change: seen.append(change.seq))
    rt.on_trigger("ticket.changed", lambda name, payload, c: fired.append(c.seq))

    with rt:
        for n in range(200):
            status = "open" if n % 2 else "closed"
            tickets.mutate(f"t-{n % 7}", lambda prev, s=status: ticket(status=s))
        rt.drain(timeout=10.0)
        committed = rt.log.last_seq

    assert seen == list(range(1, committed + 1))
    assert fired == seen


def test_held_wake_ups_are_made_before_a_writer_waits_for_the_deriver_stage() -> None:
    # Three bursts of one write each, with the consumer wake-ups held across
    # them (wake_delay is long, and each next write is queued before the
    # burst ends): after two, the stage's mailbox (size 2) is full and asleep.
    # The third write must wake it before waiting for room, or it would be
    # refused with BackpressureError once backpressure_timeout passed.
    rt = Runtime(mailbox_size=2, backpressure_timeout=5.0, wake_delay=1.0)
    tickets = rt.define_entity("ticket", Ticket)
    derived: list[int] = []
    rt.register_change_deriver("ticket", lambda c: derived.append(c.seq) or [])
    started = [threading.Event() for _ in range(3)]
    gates = [threading.Event() for _ in range(3)]

    def gated(n: int) -> Any:
        def apply(prev: Any) -> dict[str, Any]:
            started[n].set()
            assert gates[n].wait(10)
            return ticket(status="working")

        return apply

    with rt:
        first = tickets.mutate_async("t-0", gated(0))
        assert started[0].wait(10)
        second = tickets.mutate_async("t-1", gated(1))
        gates[0].set()
        assert started[1].wait(10)
        third = tickets.mutate_async("t-2", gated(2))
        gates[1].set()
        assert started[2].wait(10)
        gates[2].set()
        results = [f.get(timeout=10) for f in (first, second, third)]
        rt.drain(timeout=10.0)

    assert [r["status"] for r in results] == ["working"] * 3
    assert derived == [1, 2, 3]


def test_held_wake_ups_are_made_when_the_runtime_stops() -> None:
    seen: list[EntityChanged] = []
    rt = Runtime(wake_delay=1.0, stop_timeout=5.0)
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", seen.append)

    rt.start()
    futures = [tickets.mutate_async(f"t-{n}", lambda p: ticket()) for n in range(50)]
    for future in futures:
        future.get(timeout=10)
    report = rt.stop()

    assert report.clean
    assert [c.id for c in seen] == [f"t-{n}" for n in range(50)]


def _on_shard(shard: int, shards: int, prefix: str) -> list[str]:
    # Ids are spread over shards by hash(), which differs from run to run.
    return [
        i for i in (f"{prefix}-{n}" for n in range(200)) if hash(i) % shards == shard
    ]


def _gated(started: threading.Event, gate: threading.Event) -> Any:
    def apply(prev: Any) -> dict[str, Any]:
        started.set()
        assert gate.wait(20)
        return ticket(status="working")

    return apply


def _hold_then_block(
    handle: Any, first_id: str, second_id: str, second_gate: threading.Event
) -> Any:
    """Write ``first_id`` in a burst of its own while ``second_id`` is queued.

    The first write's consumer wake-ups are then held (the next write came at
    once); the second's apply blocks on ``second_gate``. Returns the second
    write's future.
    """
    a_started, a_gate, b_started = (
        threading.Event(),
        threading.Event(),
        threading.Event(),
    )
    first = handle.mutate_async(first_id, _gated(a_started, a_gate))
    assert a_started.wait(10)
    second = handle.mutate_async(second_id, _gated(b_started, second_gate))
    a_gate.set()
    first.get(timeout=10)
    assert b_started.wait(10)
    return second


def test_a_change_reaches_its_subscriber_while_a_later_apply_is_still_running() -> None:
    # "a" ends its burst while "b" is already queued, so a's wake-up is held;
    # b's apply then blocks until the subscriber has seen "a".
    seen: list[str] = []
    arrived = threading.Event()
    rt = Runtime(wake_delay=0.05, stop_timeout=5.0)
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", lambda c: (seen.append(c.id), arrived.set()))

    with rt:
        second = _hold_then_block(tickets, "a", "b", arrived)
        delivered_during_b = arrived.wait(10)
        arrived.set()
        second.get(timeout=10)

    assert delivered_during_b
    assert seen == ["a", "b"]


def test_drain_wakes_consumers_whose_wake_ups_are_held() -> None:
    seen: list[str] = []
    rt = Runtime(wake_delay=1.0, stop_timeout=5.0)
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", lambda c: seen.append(c.id))
    b_gate = threading.Event()

    with rt:
        second = _hold_then_block(tickets, "a", "b", b_gate)
        rt.drain(timeout=0.5)  # well under wake_delay
        drained = list(seen)
        b_gate.set()
        second.get(timeout=10)

    assert drained == ["a"]


def test_a_writer_on_another_shard_wakes_the_deriver_stage_before_waiting() -> None:
    # Shard 0 holds the stage's wake-up while its next apply blocks; shard 1
    # then fills the stage's mailbox and must wake it rather than wait out
    # backpressure_timeout (shorter than wake_delay) and be refused.
    rt = Runtime(
        mailbox_size=2, backpressure_timeout=0.5, wake_delay=1.0, stop_timeout=5.0
    )
    tickets = rt.define_entity("ticket", Ticket, shards=2)
    derived: list[str] = []
    rt.register_change_deriver("ticket", lambda c: derived.append(c.id) or [])
    zero, one = _on_shard(0, 2, "z")[:2], _on_shard(1, 2, "o")[:4]
    b_gate = threading.Event()

    with rt:
        second = _hold_then_block(tickets, zero[0], zero[1], b_gate)
        others = [tickets.mutate(i, lambda prev: ticket()) for i in one]
        b_gate.set()
        second.get(timeout=10)
        rt.drain(timeout=10)

    assert [o["status"] for o in others] == ["open"] * 4
    assert sorted(derived) == sorted([*zero, *one])


def test_drain_releases_a_wake_up_held_after_it_began() -> None:
    # The future's callback runs on the kind actor after "a" is handed on and
    # before its wake-up is held: drain() starts in that gap, and must still
    # not wait out wake_delay (longer than its timeout).
    seen: list[str] = []
    rt = Runtime(wake_delay=1.0, stop_timeout=5.0)
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", lambda c: seen.append(c.id))
    a_started, a_gate = threading.Event(), threading.Event()
    in_callback, b_gate = threading.Event(), threading.Event()

    def slow_callback(future: Any) -> None:
        in_callback.set()
        time.sleep(0.1)

    with rt:
        first = tickets.mutate_async("a", _gated(a_started, a_gate))
        assert a_started.wait(10)
        first.add_done_callback(slow_callback)
        second = tickets.mutate_async("b", _gated(threading.Event(), b_gate))
        a_gate.set()
        assert in_callback.wait(10)
        rt.drain(timeout=0.6)
        drained = list(seen)
        b_gate.set()
        second.get(timeout=10)

    assert drained == ["a"]


def test_an_idle_subscriber_is_woken_before_held_changes_would_fold() -> None:
    # Blocking writes in a loop keep their wake-ups held (wake_delay is long):
    # the subscriber is woken once half its mailbox is full, so it gets every
    # change on its own, none folded into another.
    got: list[tuple[int | None, int]] = []
    rt = Runtime(mailbox_size=100, wake_delay=1.0, stop_timeout=5.0)
    counters = rt.define_entity("counter", Count)
    rt.on_entity_changed(
        "counter", lambda c: got.append((c.prev and c.prev["n"], c.next["n"]))
    )

    with rt:
        for n in range(1, 601):
            counters.mutate(f"c-{n % 10}", lambda prev, n=n: {"n": n})
        rt.drain(timeout=10)

    assert len(got) == 600
    assert all(before is None or after - before == 10 for before, after in got)


@dataclasses.dataclass
class Count:
    n: int
