"""Kind actors hold consumer wake-ups back for at most ``wake_delay``."""

from __future__ import annotations

import math
import threading
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
