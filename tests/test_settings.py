from __future__ import annotations

import math
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pykka
import pytest
from conftest import Ticket, ticket

from runtime import DefinitionError, InvalidTimeError, Runtime, work_queue

NUMBERS_THAT_ARE_NOT: list[Any] = [None, "1", True, False, math.nan, [1]]
"""Values refused by every numeric setting that does not take None."""

BAD_SETTINGS: dict[str, list[Any]] = {
    "mailbox_size": [*NUMBERS_THAT_ARE_NOT, 2.5, 1.0, 0, -1, math.inf],
    "backpressure_timeout": [*NUMBERS_THAT_ARE_NOT, -5, math.inf, -math.inf],
    "stop_timeout": [*NUMBERS_THAT_ARE_NOT, -5, math.inf, 10**400],
    "max_dead_letters": [*NUMBERS_THAT_ARE_NOT, 2.5, 0, -1],
    "journal_interval": [*NUMBERS_THAT_ARE_NOT, 0, -0.05, math.inf],
    "journal_fsync": ["bogus", None, 1, "ALWAYS", ["always"]],
    "snapshot_every": ["1", True, math.nan, 2.5, 0, -1],
    "snapshot_interval": ["1", True, math.nan, 0, -1, math.inf],
    "keep_snapshots": [*NUMBERS_THAT_ARE_NOT, 2.5, 0, -1],
    "retention_max_age": ["1", True, math.nan, 0, -1, math.inf, timedelta(0)],
    "retention_max_rows": ["1", True, math.nan, 2.5, 0, -1],
    "retention_removed_after": [
        *NUMBERS_THAT_ARE_NOT,
        -1,
        math.inf,
        timedelta(seconds=-1),
    ],
    "housekeeping_interval": [*NUMBERS_THAT_ARE_NOT, 0, -1, math.inf],
    "clock": [5, "time", 1.5],
    "data_dir": [5, 1.5, ["x"], True],
    "recover_damaged": ["yes", 1, None],
    "metrics": ["no", 0, None],
    "freeze_gc": ["yes", 1, None],
}

CASES = [(name, value) for name, values in BAD_SETTINGS.items() for value in values]


@pytest.mark.parametrize("with_data_dir", [False, True], ids=["memory", "data-dir"])
@pytest.mark.parametrize(("name", "value"), CASES, ids=[repr(c) for c in CASES])
def test_a_bad_setting_is_refused_naming_it_and_nothing_starts(
    tmp_path: Path, name: str, value: Any, with_data_dir: bool
) -> None:
    settings = {"data_dir": tmp_path / "data" if with_data_dir else None}
    settings[name] = value
    threads = set(threading.enumerate())

    with pytest.raises(DefinitionError) as refused:
        Runtime(**settings)

    message = str(refused.value)
    assert message.startswith(f"{name} must be ")
    assert f"got {value!r}; nothing started" in message
    assert set(threading.enumerate()) <= threads
    assert not pykka.ActorRegistry.get_all()
    assert not (tmp_path / "data").exists()


GOOD_SETTINGS: list[tuple[str, Any]] = [
    ("backpressure_timeout", 0),
    ("stop_timeout", 0),
    ("stop_timeout", 0.25),
    ("snapshot_every", None),
    ("snapshot_interval", None),
    ("retention_max_age", None),
    ("retention_max_age", timedelta(hours=1)),
    ("retention_max_rows", None),
    ("retention_removed_after", 0),
    ("retention_removed_after", timedelta(days=2)),
    ("mailbox_size", 1),
    ("keep_snapshots", 1),
]


@pytest.mark.parametrize(("name", "value"), GOOD_SETTINGS)
def test_edge_values_that_make_sense_are_accepted(name: str, value: Any) -> None:
    rt = Runtime(**{name: value})

    with rt:
        pass

    assert rt.stop().clean


@pytest.mark.parametrize("bad", [None, -1, math.nan, math.inf, "1", True])
def test_bad_wait_timeouts_are_refused_and_nothing_waits(bad: Any) -> None:
    rt = Runtime()
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        with pytest.raises(DefinitionError, match=r"drain\(\)'s timeout must be"):
            rt.drain(timeout=bad)
        with pytest.raises(DefinitionError, match=r"wait_until\(\)'s timeout must"):
            tickets.wait_until("t-1", lambda state: True, timeout=bad)
        if bad is not None:
            with pytest.raises(DefinitionError, match=r"stop\(\)'s timeout must be"):
                rt.stop(timeout=bad)
        still_running = rt.running

    assert still_running
    assert not rt.running
    assert tickets.get("t-1") == ticket()


@pytest.mark.parametrize(
    "setting", ["backpressure_timeout", "stop_timeout", "handler_timeout"]
)
def test_waits_longer_than_any_timer_are_refused(setting: str) -> None:
    with pytest.raises(DefinitionError, match=r"up to 1e\+09|at most 1e\+09"):
        Runtime(**{setting: 1e10})


def test_a_future_takes_any_sensible_timeout_and_refuses_the_rest() -> None:
    rt = Runtime()
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        future = tickets.mutate_async("t-1", lambda prev: ticket())
        results = [future.get(timeout=t) for t in (math.inf, 1e10, 10**400, 5)]
        with pytest.raises(ValueError, match="0 or more seconds, got nan"):
            future.get(timeout=math.nan)
        with pytest.raises(TypeError, match="number of seconds or None, got '1'"):
            future.get(timeout="1")  # type: ignore[arg-type]
        with pytest.raises(DefinitionError, match=r"drain\(\)'s timeout must be"):
            rt.drain(timeout=1e10)
        unsubscribe_error = None
        try:
            rt.on_entity_changed("ticket", lambda c: None, timeout=1e10)
        except DefinitionError as err:
            unsubscribe_error = err

    assert results == [ticket()] * 4
    assert unsubscribe_error is not None
    assert tickets.get("t-1") == ticket()


@pytest.mark.parametrize(
    ("argument", "bad"),
    [
        ("max_attempts", True),
        ("max_attempts", 0),
        ("max_attempts", 10**30),
        ("max_attempts", 2.0),
        ("backoff", 1e10),
        ("backoff", -1),
        ("backoff", math.nan),
        ("backoff", "1"),
        ("max_backoff", math.nan),
        ("max_backoff", -1),
        ("max_backoff", "x"),
        ("max_backoff", 1e10),
        ("max_backoff", True),
    ],
)
def test_bad_work_queue_settings_are_refused(argument: str, bad: Any) -> None:
    with pytest.raises(DefinitionError, match=f"{argument} must be"):
        work_queue("group", **{argument: bad})


@pytest.mark.parametrize(
    "answer", [1e10, math.inf, -5, math.nan, "soon", RuntimeError("no pause")]
)
def test_a_backoff_function_with_a_bad_answer_never_loses_the_change(
    answer: Any,
) -> None:
    rt = Runtime()
    tickets = rt.define_entity("ticket", Ticket)
    attempts: list[int] = []

    def backoff(attempt: int) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer if answer != 1e10 and answer != math.inf else 0.0

    def failing(change: Any) -> None:
        attempts.append(change.seq)
        raise ConnectionError("down")

    if answer in (1e10, math.inf):
        # Huge pauses are capped, not waited for here: checked on delay().
        spec = work_queue("group", max_attempts=2, backoff=lambda n: answer)
        assert spec.delay(1) == 86_400.0 * 365
    rt.on_entity_changed(
        "ticket",
        failing,
        delivery=work_queue("group", max_attempts=2, backoff=backoff),
    )

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.drain(timeout=10)
        letters = rt.dead_letters()

    assert attempts == [1, 1]
    assert [(d.change.seq, d.attempts) for d in letters] == [(1, 2)]


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"since": "x"}, r"since must be a datetime or POSIX seconds, got 'x'"),
        ({"since": True}, r"since must be a datetime or POSIX seconds, got True"),
        ({"until": math.nan}, r"until gave nan, which is not a time between the years"),
        ({"since": 10**400}, r"since gave inf, which is not a time between the years"),
        ({"since": datetime(2024, 1, 1)}, r"since must be timezone-aware"),
    ],
)
def test_bad_history_bounds_are_refused(bounds: Any, message: str) -> None:
    rt = Runtime()
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        with pytest.raises(InvalidTimeError, match=message):
            tickets.history("t-1", **bounds)
        rows = tickets.history("t-1", since=0)

    assert len(rows) == 4


@pytest.mark.parametrize("window", ["x", "5", None, math.nan, -1, math.inf, True])
def test_bad_transition_count_windows_are_refused(window: Any) -> None:
    rt = Runtime()
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        with pytest.raises(DefinitionError, match=r"window must be a number of"):
            tickets.transition_count("t-1", "status", window)
        counted = tickets.transition_count("t-1", "status", timedelta(hours=1))

    assert counted == 1


@pytest.mark.parametrize(
    "reading", ["x", None, True, b"1", [1.0], math.nan, 10**400, -(10**20)]
)
def test_a_clock_giving_no_usable_time_fails_the_write_and_records_nothing(
    reading: Any,
) -> None:
    good = [True]
    rt = Runtime(clock=lambda: 1_700_000_000.0 if good[0] else reading)
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        good[0] = False
        with pytest.raises(InvalidTimeError, match=r"^the runtime's clock gave "):
            tickets.mutate("t-1", lambda prev: ticket(status="closed"))
        good[0] = True
        after = tickets.mutate("t-2", lambda prev: ticket())

    assert tickets.get("t-1")["status"] == "open"
    assert [r.field for r in tickets.history("t-1")] == list(ticket())
    assert after["status"] == "open"
    assert rt.log.last_seq == 2


def test_a_clock_giving_whole_seconds_is_accepted() -> None:
    rt = Runtime(clock=lambda: 1_700_000_000)
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        change_time = tickets.history("t-1")[0].at

    assert change_time.timestamp() == 1_700_000_000.0
