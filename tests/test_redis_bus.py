"""The Redis change bus against real redis-server processes the tests start.

Every test gets its own server on a free 127.0.0.1 port (`RedisServer`). The
tests with several instances run them as separate processes: this module is
also a script (see `_worker_main`), started with ``sys.executable``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from child_processes import ChildProcesses
from redis_server import RedisServer, find_redis_server

from runtime import DeadLetter, EntityChanged, EntityRuntimeError, ReadOnlyDict
from runtime._redis_bus import (
    FORMAT_VERSION,
    BroadcastReader,
    BusClosedError,
    ChangeTooLargeError,
    Delivery,
    InvalidEntryError,
    NotOwnerError,
    PartitionMap,
    RedisBus,
    UndecodableEntryError,
    WorkQueueReader,
    check_entry,
    decode_change,
    encode_change,
)

pytestmark = pytest.mark.skipif(
    find_redis_server() is None,
    reason=(
        "no redis-server on PATH or at /usr/bin/redis-server; "
        "install the Debian 'redis-server' package, as .ci/run does"
    ),
)

KIND = "ticket"
ROOT = Path(__file__).resolve().parent.parent
CLAIM_IDLE_MS = 800
BUS_OPTIONS: dict[str, Any] = {
    "block_ms": 100,
    "claim_idle_ms": CLAIM_IDLE_MS,
    "retry_backoff": 0.02,
    "max_retry_backoff": 0.2,
    "socket_timeout": 2.0,
}


def make_change(seq: int, **more: Any) -> EntityChanged:
    """Build a change of ticket ``t-<seq % 5>`` with a recognisable state."""
    fields: dict[str, Any] = {
        "kind": KIND,
        "id": f"t-{seq % 5}",
        "prev": {"status": "open", "n": seq - 1},
        "next": {"status": "working", "n": seq},
        "actor": "tester",
        "occurred_at": datetime(2024, 5, 1, 12, 0, seq % 60, 123456, tzinfo=UTC),
        "seq": seq,
        **more,
    }
    return EntityChanged(**fields)


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    """Poll ``predicate`` until it holds, or fail naming what was awaited.

    ``what`` may be a callable, evaluated only on failure (e.g. a log tail).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {described}")
        time.sleep(0.01)


class Collector:
    """A handler that records what it receives, thread-safe, with a wait."""

    def __init__(self, fail: Callable[[EntityChanged, Delivery], bool] | None = None):
        self.items: list[tuple[EntityChanged, Delivery]] = []
        self.calls: list[Delivery] = []
        self._fail = fail
        self._cond = threading.Condition()

    def __call__(self, change: EntityChanged, delivery: Delivery) -> None:
        with self._cond:
            self.calls.append(delivery)
            self._cond.notify_all()
        if self._fail is not None and self._fail(change, delivery):
            raise RuntimeError(f"handler refused seq={change.seq}")
        with self._cond:
            self.items.append((change, delivery))
            self._cond.notify_all()

    @property
    def seqs(self) -> list[int]:
        with self._cond:
            return [change.seq for change, _ in self.items]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[int]:
        """Wait until ``count`` changes were handled; return their seqs."""
        with self._cond:
            done = self._cond.wait_for(lambda: len(self.items) >= count, timeout)
        if not done:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {count} changes; "
                f"got seqs {self.seqs}"
            )
        return self.seqs


@pytest.fixture(autouse=True)
def _no_leftover_bus_threads() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("redis-")]
    assert not left, f"bus threads left running after the test: {left}"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the test's server, to look at what the bus wrote."""
    plain = redis.Redis.from_url(server.url)
    try:
        yield plain
    finally:
        plain.close()


@pytest.fixture
def make_bus(server: RedisServer) -> Iterator[Callable[..., RedisBus]]:
    """Create buses on the test's server; every one is closed afterwards."""
    buses: list[RedisBus] = []

    def make(instance_id: str = "alpha", **options: Any) -> RedisBus:
        bus = RedisBus(
            server.url, instance_id=instance_id, **{**BUS_OPTIONS, **options}
        )
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close(timeout=1.0)


def stream_seqs(client: redis.Redis, key: str) -> list[int]:
    """Return the seqs of the changes in a stream, in stream order."""
    return [decode_change(fields[b"change"]).seq for _, fields in client.xrange(key)]


# -- broadcast --------------------------------------------------------------


def test_published_change_reaches_a_broadcast_reader_with_every_field_intact(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    received = Collector()
    created = make_change(
        1,
        prev=None,
        next={"status": "open", "tags": ["db", "ünïcode ✓"], "extra": {"w": 0.1}},
        run_id="run-7",
    )
    removed = make_change(2, id="t-1", prev=created.next, next=None)

    with BroadcastReader(bus, KIND, "audit", received):
        bus.publish(created)
        bus.publish(removed)
        received.wait_for(2)

    (first, first_delivery), (second, second_delivery) = received.items
    assert first == created
    assert second == removed
    assert second.is_tombstone
    assert type(first.next) is ReadOnlyDict
    assert first.occurred_at.tzinfo is not None
    assert first.changed_fields == ("status", "tags", "extra")
    assert first_delivery.origin == "alpha"
    assert first_delivery.kind == KIND
    assert first_delivery.attempt == 1
    assert first_delivery.position < second_delivery.position
    ((_, fields),) = client.xrange(bus.stream_key(KIND), count=1)
    assert set(fields) == {b"change", b"origin"}


def test_two_broadcast_readers_each_receive_every_change_in_order(
    make_bus: Callable[..., RedisBus],
) -> None:
    bus = make_bus()
    audit, mirror = Collector(), Collector()
    changes = [make_change(seq) for seq in range(1, 51)]

    with (
        BroadcastReader(bus, KIND, "audit", audit),
        BroadcastReader(bus, KIND, "mirror", mirror),
    ):
        for change in changes:
            bus.publish(change)
        audit.wait_for(50)
        mirror.wait_for(50)

    assert audit.seqs == list(range(1, 51))
    assert mirror.seqs == list(range(1, 51))
    positions = [delivery.position for _, delivery in audit.items]
    assert positions == sorted(positions)
    assert len(set(positions)) == 50


def test_restarted_broadcast_reader_resumes_right_after_its_last_processed_entry(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    before, after = Collector(), Collector()
    with BroadcastReader(bus, KIND, "audit", before) as reader:
        for seq in range(1, 5):
            bus.publish(make_change(seq))
        before.wait_for(4)
        last_entry = before.items[-1][1].entry_id
    for seq in range(5, 11):
        bus.publish(make_change(seq))
    assert bus.flush()

    with BroadcastReader(bus, KIND, "audit", after) as resumed:
        after.wait_for(6)
        time.sleep(0.3)  # room for a replay or a duplicate to show up

    assert before.seqs == [1, 2, 3, 4]
    assert after.seqs == [5, 6, 7, 8, 9, 10]
    assert reader.offset == last_entry
    stored = client.hget(bus.offsets_key, f"{KIND}:alpha:audit")
    assert stored is not None
    assert stored.decode() == resumed.offset == after.items[-1][1].entry_id


def test_new_broadcast_reader_starts_after_the_latest_entry_by_default(
    make_bus: Callable[..., RedisBus],
) -> None:
    bus = make_bus()
    bus.publish(make_change(1))
    assert bus.flush()
    latest, earliest = Collector(), Collector()

    with (
        BroadcastReader(bus, KIND, "latest", latest),
        BroadcastReader(bus, KIND, "earliest", earliest, start="earliest"),
    ):
        bus.publish(make_change(2))
        latest.wait_for(1)
        earliest.wait_for(2)

    assert latest.seqs == [2]
    assert earliest.seqs == [1, 2]


def test_broadcast_reader_can_skip_the_changes_its_own_instance_published(
    make_bus: Callable[..., RedisBus],
) -> None:
    alpha, beta = make_bus("alpha"), make_bus("beta")
    received = Collector()

    with BroadcastReader(alpha, KIND, "audit", received, include_own=False) as reader:
        alpha.publish(make_change(1))
        assert alpha.flush()
        beta.publish(make_change(2))
        received.wait_for(1)
        wait_until(lambda: reader.skipped == 1, 5, "the own change to be skipped")

    assert received.seqs == [2]
    assert received.items[0][1].origin == "beta"


def test_broadcast_handler_that_raises_is_logged_and_the_reader_moves_on(
    make_bus: Callable[..., RedisBus], caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus()
    received = Collector(fail=lambda change, _: change.seq == 2)

    with (
        caplog.at_level(logging.ERROR, logger="runtime._redis_bus"),
        BroadcastReader(bus, KIND, "audit", received) as reader,
    ):
        for seq in (1, 2, 3):
            bus.publish(make_change(seq))
        received.wait_for(2)

    assert received.seqs == [1, 3]
    assert reader.failed == 1
    assert reader.handled == 2
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert re.search(
        r"handler raised on ticket/t-2 seq=2 \(entry \S+ from alpha\)",
        record.getMessage(),
    )
    assert record.exc_info is not None


# -- work queues ------------------------------------------------------------


def test_work_queue_handler_that_fails_twice_is_retried_and_acknowledged_once(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    received = Collector(fail=lambda _, delivery: delivery.attempt < 3)

    with WorkQueueReader(
        bus, KIND, "mailer", received, max_attempts=3, backoff=0.01
    ) as reader:
        bus.publish(make_change(1))
        received.wait_for(1)
        wait_until(lambda: reader.handled == 1, 5, "the entry to be acknowledged")

    assert [d.attempt for d in received.calls] == [1, 2, 3]
    assert reader.failed == 2
    assert reader.dead_lettered == 0
    assert client.xpending(bus.stream_key(KIND), "mailer")["pending"] == 0


def test_work_queue_handler_that_keeps_failing_ends_in_the_dead_letter_stream(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    always_fails = Collector(fail=lambda _change, _delivery: True)
    letters: list[DeadLetter] = []

    with WorkQueueReader(
        bus,
        KIND,
        "mailer",
        always_fails,
        max_attempts=3,
        backoff=0.01,
        name="send_mail",
        on_dead_letter=letters.append,
    ) as reader:
        bus.publish(make_change(7))
        bus.publish(make_change(8))
        wait_until(lambda: reader.dead_lettered == 2, 10, "two dead letters")

    assert [d.attempt for d in always_fails.calls] == [1, 2, 3, 1, 2, 3]
    assert client.xpending(bus.stream_key(KIND), "mailer")["pending"] == 0
    (seven, eight) = letters
    assert (seven.change.seq, eight.change.seq) == (7, 8)
    assert seven.attempts == 3
    assert seven.error == "RuntimeError: handler refused seq=7"
    assert seven.subscriber == "send_mail"
    assert seven.worker_group == "mailer"
    dead = client.xrange(bus.dead_letter_key("mailer"))
    assert [decode_change(fields[b"change"]).seq for _, fields in dead] == [7, 8]
    assert dead[0][1][b"attempts"] == b"3"
    assert dead[0][1][b"origin"] == b"alpha"
    assert [letter.change.seq for letter in bus.dead_letters("mailer")] == [7, 8]


def test_entry_left_pending_by_a_vanished_consumer_is_claimed_with_its_attempt_number(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    stream = bus.stream_key(KIND)
    client.xgroup_create(stream, "mailer", id="0", mkstream=True)
    bus.publish(make_change(1))
    assert bus.flush()
    # A consumer takes the entry and disappears without acknowledging it.
    taken = client.xreadgroup("mailer", "ghost", {stream: ">"}, count=1)
    assert len(taken[0][1]) == 1
    received = Collector()

    started = time.monotonic()
    with WorkQueueReader(bus, KIND, "mailer", received) as reader:
        received.wait_for(1)
        waited = time.monotonic() - started

    (_, delivery) = received.items[0]
    assert delivery.attempt == 2
    assert delivery.reader == "alpha"
    assert reader.claimed == 1
    assert waited >= CLAIM_IDLE_MS / 1000 * 0.9
    assert client.xpending(stream, "mailer")["pending"] == 0


def test_entry_delivered_more_than_max_attempts_is_dead_lettered_without_a_call(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    stream = bus.stream_key(KIND)
    client.xgroup_create(stream, "mailer", id="0", mkstream=True)
    bus.publish(make_change(1))
    assert bus.flush()
    client.xreadgroup("mailer", "crashed", {stream: ">"}, count=1)
    received = Collector()

    with WorkQueueReader(bus, KIND, "mailer", received, max_attempts=1) as reader:
        wait_until(lambda: reader.dead_lettered == 1, 10, "a dead letter")

    assert received.calls == []
    ((_, fields),) = client.xrange(bus.dead_letter_key("mailer"))
    assert (
        fields[b"error"]
        == b"delivered 2 times without being acknowledged (max_attempts=1)"
    )


def test_entry_that_cannot_be_decoded_is_dead_lettered(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    received = Collector()

    with WorkQueueReader(bus, KIND, "mailer", received) as reader:
        client.xadd(bus.stream_key(KIND), {"change": b"\xc1garbage", "origin": "x"})
        bus.publish(make_change(2))
        received.wait_for(1)
        wait_until(lambda: reader.dead_lettered == 1, 5, "a dead letter")

    assert received.seqs == [2]
    ((_, fields),) = client.xrange(bus.dead_letter_key("mailer"))
    assert fields[b"error"].startswith(b"not an encoded change")
    assert fields[b"origin"] == b"x"


def wire(**fields: Any) -> bytes:
    """Encode a change entry by hand, as another program could write one.

    Starts from a valid update of ticket ``t-1`` and applies ``fields``.
    """
    entry: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "kind": KIND,
        "id": "t-1",
        "prev": {"status": "open", "n": 1},
        "next": {"status": "open", "n": 2},
        "delta": {"n": 2},
        "changed_fields": ["n"],
        "actor": "tester",
        "occurred_at": "2024-05-01T12:00:00+00:00",
        "seq": 1,
        "run_id": None,
        **fields,
    }
    return msgspec.msgpack.encode(entry)


REFUSED_ENTRIES = {
    "another kind": (
        {"kind": "other"},
        "it is of kind 'other', not of this stream's kind 'ticket'",
    ),
    "an empty id": ({"id": ""}, "its id must not be empty"),
    "an id with a newline": (
        {"id": "t-1\nforged"},
        "its id contains control or other non-printable characters",
    ),
    "seq 0": ({"seq": 0}, "seq must be 1 or more, got 0"),
    "a negative seq": ({"seq": -5}, "seq must be 1 or more, got -5"),
    "an empty actor": ({"actor": ""}, "actor '' is not a non-empty printable string"),
    "an empty run id": (
        {"run_id": ""},
        "run id '' is not a non-empty printable string",
    ),
    "no states": (
        {"prev": None, "next": None, "delta": {}, "changed_fields": []},
        "prev and next are both null",
    ),
    "no change": (
        {"next": {"status": "open", "n": 1}, "delta": {}, "changed_fields": []},
        "prev and next are the same state",
    ),
    "a field listed that did not change": (
        {"delta": {"status": "open", "n": 2}, "changed_fields": ["status", "n"]},
        "changed_fields ['status', 'n'] are not the fields prev and next differ "
        "in, ['n']",
    ),
    "a changed field left out": (
        {"next": {"status": "done", "n": 2}},
        "changed_fields ['n'] are not the fields prev and next differ in, "
        "['status', 'n']",
    ),
    "a delta value that is not next's": (
        {"delta": {"n": 999}},
        "delta does not hold next's values of the changed fields",
    ),
    "a delta value of another type": (
        {"delta": {"n": 2.0}},
        "delta does not hold next's values of the changed fields",
    ),
    "a create whose delta is not next": (
        {"prev": None, "delta": {"n": 2}, "changed_fields": ["status", "n"]},
        "delta does not hold next's values of the changed fields",
    ),
    "a removal with a delta": (
        {"next": None, "delta": {"n": 1}, "changed_fields": ["status", "n"]},
        "delta does not hold next's values of the changed fields",
    ),
}


@pytest.mark.parametrize("case", REFUSED_ENTRIES)
def test_entry_the_runtime_would_never_write_is_refused_with_its_reason(
    case: str,
) -> None:
    fields, reason = REFUSED_ENTRIES[case]

    with pytest.raises(InvalidEntryError) as refused:
        check_entry(wire(**fields), KIND)

    assert refused.value.reason == reason
    change = refused.value.change
    assert str(refused.value) == f"{change.kind}/{change.id} seq={change.seq}: " + (
        f"refused: {reason}"
    )


def test_entry_checks_accept_what_the_bus_publishes() -> None:
    changes = [
        make_change(1),
        make_change(2, prev=None, next={"status": "open", "tags": ["a", "b"]}),
        make_change(3, prev={"status": "open", "gone": 1}, next=None),
        make_change(
            4, prev={"a": {"x": 1, "y": 2}}, next={"a": {"y": 2, "x": 1}, "b": 0}
        ),
        make_change(5, prev={"a": 1, "b": 0.0}, next={"a": True, "b": -0.0}),
        make_change(6, prev={"a": 1, "gone": "x"}, next={"a": 1, "new": "y"}),
    ]

    decoded = [check_entry(encode_change(change), KIND) for change in changes]

    assert decoded == changes
    assert decoded[3].changed_fields == ("b",)
    assert decoded[4].changed_fields == ("a", "b")
    assert decoded[5].delta == {"new": "y", "gone": None}


def test_entry_states_are_checked_and_returned_by_check_state() -> None:
    def check_state(state: Any, kind: str, entity_id: str) -> ReadOnlyDict:
        if type(state["n"]) is not int:
            raise ValueError(f"{kind}/{entity_id}: n must be an int")
        return ReadOnlyDict({**state, "checked": True})

    accepted = check_entry(wire(), KIND, check_state)
    with pytest.raises(InvalidEntryError) as refused:
        check_entry(
            wire(next={"status": "open", "n": "2"}, delta={"n": "2"}),
            KIND,
            check_state,
        )

    assert accepted.prev == {"status": "open", "n": 1, "checked": True}
    assert accepted.next == {"status": "open", "n": 2, "checked": True}
    assert accepted.delta == {"n": 2}
    assert refused.value.reason == (
        "next does not fit this instance's schema: ticket/t-1: n must be an int"
    )


def test_entry_whose_state_check_raises_something_else_is_refused_too() -> None:
    def broken_check(state: Any, kind: str, entity_id: str) -> ReadOnlyDict:
        raise KeyError("status")

    with pytest.raises(InvalidEntryError) as refused:
        check_entry(wire(), KIND, broken_check)

    assert refused.value.reason == (
        "prev could not be checked against this instance's schema: KeyError: 'status'"
    )


def test_entry_with_a_run_id_and_masked_values_is_accepted_unchecked() -> None:
    def status_check(state: Any, kind: str, entity_id: str) -> ReadOnlyDict:
        if state["status"] not in ("open", "done"):
            raise ValueError(f"status must be open or done, got {state['status']!r}")
        return ReadOnlyDict(state)

    # Two secrets masked alike make a changed field look unchanged; a masked
    # value need not fit the schema.
    masked = {"status": "***", "n": 1}
    alike = {"prev": masked, "next": masked, "delta": {"status": "***"}}
    alike["changed_fields"] = ["status"]
    unfit = {"prev": {"status": "open", "n": 1}, "next": masked}
    unfit.update(delta={"status": "***"}, changed_fields=["status"])

    accepted = [
        check_entry(wire(**fields, run_id="run-1"), KIND, status_check)
        for fields in (alike, unfit)
    ]
    with pytest.raises(InvalidEntryError, match="prev and next are the same state"):
        check_entry(wire(**alike), KIND, status_check)
    with pytest.raises(InvalidEntryError, match="status must be open or done"):
        check_entry(wire(**unfit), KIND, status_check)

    assert [change.next for change in accepted] == [masked, masked]
    assert [change.changed_fields for change in accepted] == [("status",)] * 2


MASKED_BUT_MALFORMED = {
    "a field the schema lacks": (
        {"next": {"status": "open", "n": 2, "extra": "***"}},
        "its fields ['extra', 'n', 'status'] are not the schema's ['n', 'status']",
    ),
    "a field renamed": (
        {"next": {"bogus": "***", "n": [1]}},
        "its fields ['bogus', 'n'] are not the schema's ['n', 'status']",
    ),
    "a change of no field": (
        {"next": {"status": "***", "n": 1}, "delta": {}, "changed_fields": []},
        "it changes no field",
    ),
    "a delta of another field": (
        {"next": {"status": "***", "n": 1}, "delta": {"n": 1}},
        "its delta holds other fields than the changed ones",
    ),
    "a changed field no state has": (
        {
            "next": {"status": "***", "n": 1},
            "delta": {"x": 1},
            "changed_fields": ["x"],
        },
        "changed_fields ['x'] name fields its states lack",
    ),
}


@pytest.mark.parametrize("case", MASKED_BUT_MALFORMED)
def test_a_masked_entry_must_still_hold_the_schema_s_fields_and_a_change(
    case: str,
) -> None:
    # Masking makes values equal or ill-typed; it never adds, drops or
    # renames fields, nor makes a change of nothing.
    fields, reason = MASKED_BUT_MALFORMED[case]
    changed = {"changed_fields": ["status"], "delta": {"status": "***"}, **fields}

    with pytest.raises(InvalidEntryError) as caught:
        check_entry(wire(**changed, run_id="run-1"), KIND, state_fields=("status", "n"))

    assert str(caught.value).endswith(f"as a change with masked secrets: {reason}")


def test_a_masked_entry_of_the_schema_s_fields_is_still_accepted() -> None:
    masked = {"status": "***", "n": 1}
    entry = wire(
        prev={"status": "***", "n": 1},
        next=masked,
        delta={"status": "***"},
        changed_fields=["status"],
        run_id="run-1",
    )

    change = check_entry(entry, KIND, state_fields=("status", "n"))

    assert change.next == masked
    assert change.changed_fields == ("status",)


def nested(depth: int) -> Any:
    """A list nested ``depth`` levels: near Python's recursion limit at 950."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


TOO_DEEP = r"a value nests too deeply|maximum recursion depth exceeded"


def test_entry_nested_too_deeply_is_undecodable() -> None:
    deep = nested(950)

    with pytest.raises(UndecodableEntryError, match=TOO_DEEP) as refused:
        check_entry(wire(next={"status": "open", "n": deep}, delta={"n": deep}), KIND)

    assert not isinstance(refused.value, InvalidEntryError)


def test_broadcast_reader_skips_entries_it_refuses_and_reads_on(
    make_bus: Callable[..., RedisBus],
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = make_bus()
    received = Collector()
    deep = nested(950)
    stream = bus.stream_key(KIND)

    with (
        caplog.at_level(logging.ERROR, logger="runtime._redis_bus"),
        BroadcastReader(bus, KIND, "audit", received) as reader,
    ):
        client.xadd(stream, {"change": wire(kind="other", seq=1), "origin": "x"})
        client.xadd(stream, {"change": wire(id="", seq=2), "origin": "x"})
        client.xadd(stream, {"change": wire(seq=3, delta={"n": 9}), "origin": "x"})
        deep_entry = wire(seq=4, next={"n": deep}, delta={"n": deep})
        client.xadd(stream, {"change": deep_entry, "origin": "x"})
        bus.publish(make_change(5))
        received.wait_for(1)

    assert received.seqs == [5]
    assert reader.failed == 4
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4
    assert re.search(
        r"skipped entry \S+ of x: other/t-1 seq=1: refused: it is of kind", errors[0]
    )
    assert "ticket/ seq=2: refused: its id must not be empty" in errors[1]
    assert "ticket/t-1 seq=3: refused: delta does not hold" in errors[2]
    assert re.search(TOO_DEEP, errors[3])


def test_work_queue_dead_letters_entries_it_refuses_with_the_change_and_reason(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    received = Collector()
    letters: list[DeadLetter] = []
    stream = bus.stream_key(KIND)

    with WorkQueueReader(
        bus, KIND, "mailer", received, name="send_mail", on_dead_letter=letters.append
    ) as reader:
        client.xadd(stream, {"change": wire(seq=-1), "origin": "x"})
        client.xadd(stream, {"change": b"\xc1garbage", "origin": "x"})
        bus.publish(make_change(2))
        received.wait_for(1)
        wait_until(lambda: reader.dead_lettered == 2, 5, "two dead letters")

    assert received.seqs == [2]
    (letter,) = letters
    assert (letter.change.id, letter.change.seq) == ("t-1", -1)
    assert letter.error == "refused: seq must be 1 or more, got -1"
    assert (letter.attempts, letter.subscriber, letter.worker_group) == (
        0,
        "send_mail",
        "mailer",
    )
    refused, garbage = (
        fields for _, fields in client.xrange(bus.dead_letter_key("mailer"))
    )
    assert refused[b"error"] == b"refused: seq must be 1 or more, got -1"
    assert refused[b"attempts"] == b"0"
    assert garbage[b"error"].startswith(b"not an encoded change")
    assert client.xpending(stream, "mailer")["pending"] == 0


def test_bus_dead_letters_leave_out_entries_that_hold_no_change(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus()
    always_fails = Collector(fail=lambda _change, _delivery: True)

    with WorkQueueReader(bus, KIND, "mailer", always_fails, max_attempts=1) as reader:
        client.xadd(bus.stream_key(KIND), {"change": b"\xc1garbage", "origin": "x"})
        bus.publish(make_change(2))
        wait_until(lambda: reader.dead_lettered == 2, 5, "two dead letters")

    assert client.xlen(bus.dead_letter_key("mailer")) == 2
    (letter,) = bus.dead_letters("mailer")
    assert letter.change.seq == 2
    assert letter.error == "RuntimeError: handler refused seq=2"


def test_restarted_consumer_takes_back_the_entries_it_was_given(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus(claim_idle_ms=60_000)
    stream = bus.stream_key(KIND)
    client.xgroup_create(stream, "mailer", id="0", mkstream=True)
    bus.publish(make_change(1))
    assert bus.flush()
    # Delivered to consumer "alpha" before it crashed.
    client.xreadgroup("mailer", "alpha", {stream: ">"}, count=1)
    received = Collector()

    with WorkQueueReader(bus, KIND, "mailer", received):
        received.wait_for(1, timeout=5)

    assert received.items[0][1].attempt == 2
    assert client.xpending(stream, "mailer")["pending"] == 0


def test_handler_slower_than_the_visibility_timeout_runs_twice_and_is_counted(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    slow_bus = make_bus("slow", claim_idle_ms=300)
    fast_bus = make_bus("fast", claim_idle_ms=300)
    started = threading.Event()

    def slow_handler(change: EntityChanged, delivery: Delivery) -> None:
        started.set()
        time.sleep(0.9)

    fast = Collector()
    with WorkQueueReader(slow_bus, KIND, "mailer", slow_handler) as slow:
        slow_bus.publish(make_change(1))
        assert started.wait(5)
        with WorkQueueReader(fast_bus, KIND, "mailer", fast) as other:
            fast.wait_for(1)
            wait_until(lambda: slow.handled == 1, 5, "the slow handler to finish")

    assert other.claimed == 1
    assert fast.items[0][1].attempt == 2
    assert slow.duplicates == 1
    assert client.xpending(slow_bus.stream_key(KIND), "mailer")["pending"] == 0


def test_work_queue_carries_on_after_redis_restarts_without_its_data(
    server: RedisServer, make_bus: Callable[..., RedisBus]
) -> None:
    bus = make_bus()
    received = Collector()

    with WorkQueueReader(bus, KIND, "mailer", received):
        for seq in (1, 2):
            bus.publish(make_change(seq))
        received.wait_for(2)
        server.restart()  # no append-only file: the stream and group are gone
        for seq in (3, 4):
            bus.publish(make_change(seq))
        received.wait_for(4)

    assert received.seqs == [1, 2, 3, 4]


def test_resumed_broadcast_reader_reports_entries_trimmed_before_it_read_them(
    make_bus: Callable[..., RedisBus], caplog: pytest.LogCaptureFixture
) -> None:
    # MAXLEN ~ trims whole stream nodes (100 entries each), so it takes a few
    # hundred entries to trim anything.
    bus = make_bus(maxlen=10)
    first, later = Collector(), Collector()
    with BroadcastReader(bus, KIND, "audit", first):
        bus.publish(make_change(1))
        first.wait_for(1)
    for seq in range(2, 400):
        bus.publish(make_change(seq))
    assert bus.flush()

    with (
        caplog.at_level(logging.WARNING, logger="runtime._redis_bus"),
        BroadcastReader(bus, KIND, "audit", later) as resumed,
    ):
        wait_until(lambda: resumed.gaps == 1, 5, "the gap to be reported")
        later.wait_for(1)

    assert later.seqs[0] > 2
    assert later.seqs == list(range(later.seqs[0], later.seqs[0] + len(later.seqs)))
    assert any(
        "no longer holds this reader's position" in r.getMessage()
        for r in caplog.records
    )


# -- separate processes -----------------------------------------------------


class Workers(ChildProcesses):
    """Runs bus instances as separate processes of this module."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, ROOT, stop_timeout=15)

    def start(self, url: str, prefix: str, name: str, stall_on: int = 0) -> None:
        argv = [sys.executable, __file__, "worker", url, prefix, name, str(stall_on)]
        self.spawn(name, argv)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    running = Workers(tmp_path)
    try:
        yield running
    finally:
        running.close()


def _texts(client: redis.Redis, key: str) -> list[str]:
    return [item.decode() for item in client.lrange(key, 0, -1)]


def test_three_instances_share_a_work_queue_exactly_once_and_all_get_every_broadcast(
    server: RedisServer,
    client: redis.Redis,
    make_bus: Callable[..., RedisBus],
    workers: Workers,
) -> None:
    prefix, names = "three", ["w1", "w2", "w3"]
    for name in names:
        workers.start(server.url, prefix, name)
    wait_until(lambda: client.llen(f"{prefix}:test:ready") == 3, 30, workers.log_tail)
    publisher = make_bus("publisher", stream_prefix=prefix)

    for seq in range(1, 61):
        publisher.publish(make_change(seq))
    wait_until(
        lambda: client.llen(f"{prefix}:test:handled") >= 60, 30, workers.log_tail
    )
    time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)  # room for a second delivery to show
    codes = [workers.stop(name) for name in names]

    handled = [line.split() for line in _texts(client, f"{prefix}:test:handled")]
    per_seq = collections.Counter(int(seq) for _, seq, _ in handled)
    assert sorted(per_seq) == list(range(1, 61))
    assert set(per_seq.values()) == {1}, f"handled more than once: {per_seq}"
    assert {attempt for _, _, attempt in handled} == {"1"}
    assert len({name for name, _, _ in handled}) >= 2, "the work was not shared"
    for name in names:
        broadcast = [int(s) for s in _texts(client, f"{prefix}:test:broadcast:{name}")]
        assert broadcast == list(range(1, 61)), name
    assert codes == [0, 0, 0], workers.log_tail()


def test_changes_of_an_instance_killed_mid_handling_are_handled_by_the_others(
    server: RedisServer,
    client: redis.Redis,
    make_bus: Callable[..., RedisBus],
    workers: Workers,
) -> None:
    prefix = "kill"
    workers.start(server.url, prefix, "victim", stall_on=3)
    workers.start(server.url, prefix, "w2")
    workers.start(server.url, prefix, "w3")
    wait_until(lambda: client.llen(f"{prefix}:test:ready") == 3, 30, workers.log_tail)
    publisher = make_bus("publisher", stream_prefix=prefix)
    for seq in range(1, 61):
        publisher.publish(make_change(seq))

    stalled = client.blpop([f"{prefix}:test:stalled"], timeout=20)
    assert stalled is not None, workers.log_tail()
    stalled_seq = int(stalled[1].split()[1])
    workers.processes["victim"].send_signal(signal.SIGKILL)
    assert workers.processes["victim"].wait(timeout=10) == -signal.SIGKILL

    def every_seq_handled() -> bool:
        lines = _texts(client, f"{prefix}:test:handled")
        return {int(line.split()[1]) for line in lines} == set(range(1, 61))

    wait_until(every_seq_handled, 30, workers.log_tail)
    time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)
    codes = [workers.stop(name) for name in ("w2", "w3")]

    handled = [line.split() for line in _texts(client, f"{prefix}:test:handled")]
    per_seq = collections.Counter(int(seq) for _, seq, _ in handled)
    duplicates = {seq: n - 1 for seq, n in per_seq.items() if n > 1}
    # The victim handled stalled_seq but died before acknowledging it, so it
    # ran twice; nothing else should have.
    assert duplicates == {stalled_seq: 1}
    redone = [(name, int(att)) for name, seq, att in handled if int(seq) == stalled_seq]
    assert redone[0] == ("victim", 1)
    assert redone[1][0] in {"w2", "w3"}
    assert redone[1][1] == 2
    assert client.xpending(f"{prefix}:changes:{KIND}", "mailer")["pending"] == 0
    assert codes == [0, 0], workers.log_tail()


# -- outages ----------------------------------------------------------------


def test_changes_published_during_a_redis_restart_arrive_afterwards_in_order() -> None:
    with RedisServer(appendonly=True) as server:
        bus = RedisBus(server.url, instance_id="alpha", **BUS_OPTIONS)
        broadcast, work = Collector(), Collector()
        audit = BroadcastReader(bus, KIND, "audit", broadcast).start()
        WorkQueueReader(bus, KIND, "mailer", work).start()
        try:
            for seq in range(1, 6):
                bus.publish(make_change(seq))
            broadcast.wait_for(5)
            work.wait_for(5)

            server.stop()
            for seq in range(6, 11):
                bus.publish(make_change(seq))
            wait_until(lambda: not bus.connected, 5, "the outage to be noticed")
            during_outage = (broadcast.seqs, bus.outbox_size, bus.queued)
            server.start()
            broadcast.wait_for(10)
            work.wait_for(10)
        finally:
            lost = bus.close()

        stream = redis.Redis.from_url(server.url)
        try:
            in_stream = stream_seqs(stream, bus.stream_key(KIND))
        finally:
            stream.close()

    assert during_outage == ([1, 2, 3, 4, 5], 5, 5)
    assert broadcast.seqs == list(range(1, 11))
    assert sorted(work.seqs) == list(range(1, 11))
    assert in_stream == list(range(1, 11))
    assert (bus.published, bus.queued, bus.dropped, bus.reconnects) == (10, 5, 0, 1)
    assert audit.reconnects >= 1
    assert lost == 0


def test_a_full_outbox_drops_the_oldest_changes_and_logs_an_error(
    server: RedisServer,
    client: redis.Redis,
    make_bus: Callable[..., RedisBus],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = make_bus(outbox_limit=3)
    server.stop()

    with caplog.at_level(logging.WARNING, logger="runtime._redis_bus"):
        for seq in range(1, 6):
            bus.publish(make_change(seq))
        wait_until(lambda: bus.dropped == 2, 5, "two drops")
        assert bus.outbox_size == 3
        server.start()
        assert bus.flush(timeout=10)

    assert stream_seqs(client, bus.stream_key(KIND)) == [3, 4, 5]
    assert (bus.published, bus.dropped, bus.reconnects) == (3, 2, 1)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert re.search(
        r"outbox full .* dropped the oldest, ticket/t-[12] seq=[12],", errors[0]
    )
    assert re.search(
        r"outbox drained; 2 changes were dropped while it was full", errors[-1]
    )


# -- oversized changes --------------------------------------------------------

MIB = 1024 * 1024


def test_change_over_the_servers_argument_limit_is_set_aside_and_the_rest_published(
    make_bus: Callable[..., RedisBus],
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 1 MiB is the smallest limit Redis accepts; the bus's own limit is higher.
    client.config_set("proto-max-bulk-len", MIB)
    bus = make_bus()
    big = make_change(2, next={"status": "working", "blob": "x" * (2 * MIB)})

    with caplog.at_level(logging.ERROR, logger="runtime._redis_bus"):
        for change in (make_change(1), big, make_change(3)):
            bus.publish(change)
        flushed = bus.flush(timeout=10)

    assert flushed
    assert stream_seqs(client, bus.stream_key(KIND)) == [1, 3]
    assert (bus.published, bus.too_large, bus.queued) == (2, 1, 0)
    assert bus.connected
    (record,) = [r for r in caplog.records if "seq=2" in r.getMessage()]
    assert re.search(
        r"ticket/t-2 seq=2: its bus entry is 4,194,\d{3} bytes, which redis at "
        r"127\.0\.0\.1:\d+/0 refused",
        record.getMessage(),
    )


def test_change_over_the_servers_limit_is_passed_to_the_too_large_listeners(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    client.config_set("proto-max-bulk-len", MIB)
    bus = make_bus()
    refused: list[tuple[EntityChanged, EntityRuntimeError]] = []
    bus.on_too_large(lambda change, err: refused.append((change, err)))
    big = make_change(1, next={"blob": "y" * (3 * MIB)})

    bus.publish(big)
    bus.publish(make_change(2))
    assert bus.flush(timeout=10)

    ((change, err),) = refused
    assert change == big
    assert (err.kind, err.entity_id, err.seq) == ("ticket", "t-1", 1)
    assert err.size > 3 * MIB
    assert stream_seqs(client, bus.stream_key(KIND)) == [2]


def test_change_over_max_entry_bytes_is_refused_at_publish_naming_its_size(
    make_bus: Callable[..., RedisBus], client: redis.Redis
) -> None:
    bus = make_bus(max_entry_bytes=2000)

    bus.publish(make_change(1))
    with pytest.raises(
        ChangeTooLargeError,
        match=r"^ticket/t-2 seq=2: its bus entry is 6,\d{3} bytes, over the bus's "
        r"max_entry_bytes of 2,000; nothing published$",
    ) as refused:
        bus.publish(make_change(2, next={"blob": "z" * 3000}))
    bus.publish(make_change(3))
    assert bus.flush()

    assert refused.value.limit == 2000
    assert stream_seqs(client, bus.stream_key(KIND)) == [1, 3]
    assert (bus.published, bus.too_large) == (2, 1)


def test_max_entry_bytes_must_be_a_positive_int(server: RedisServer) -> None:
    with pytest.raises(
        EntityRuntimeError, match=r"^max_entry_bytes must be 1 or more, got 0$"
    ):
        RedisBus(server.url, instance_id="alpha", max_entry_bytes=0)


def test_large_change_published_while_redis_is_down_waits_and_arrives(
    server: RedisServer, client: redis.Redis, make_bus: Callable[..., RedisBus]
) -> None:
    bus = make_bus()
    server.stop()

    for change in (
        make_change(1),
        make_change(2, next={"blob": "w" * (2 * MIB)}),
        make_change(3),
    ):
        bus.publish(change)
    wait_until(lambda: not bus.connected, 5, "the outage to be noticed")
    server.start()
    flushed = bus.flush(timeout=10)

    assert flushed
    assert stream_seqs(client, bus.stream_key(KIND)) == [1, 2, 3]
    assert (bus.published, bus.too_large, bus.queued) == (3, 0, 3)


def test_publish_is_refused_after_close_and_close_stops_every_thread(
    make_bus: Callable[..., RedisBus],
) -> None:
    bus = make_bus()
    reader = BroadcastReader(bus, KIND, "audit", Collector()).start()
    bus.publish(make_change(1))

    left = bus.close()

    assert left == 0
    assert not reader.running
    with pytest.raises(
        BusClosedError,
        match=r"^ticket/t-2 seq=2: the bus is closed; nothing published$",
    ):
        bus.publish(make_change(2))
    assert [t.name for t in threading.enumerate() if t.name.startswith("redis-")] == []


def test_server_harness_restarts_on_the_same_port_and_keeps_appendonly_data() -> None:
    with RedisServer(appendonly=True) as server:
        plain = redis.Redis.from_url(server.url)
        try:
            plain.set("kept", "yes")
            port = server.port
            server.restart()
            value = plain.get("kept")
        finally:
            plain.close()

    assert server.port == port
    assert value == b"yes"


# -- partitions -------------------------------------------------------------


def test_partition_map_gives_the_same_owners_in_another_process() -> None:
    instances = ["alpha", "beta", "gamma"]
    ids = [f"inc-{n}" for n in range(300)]
    here = PartitionMap(instances)

    result = subprocess.run(
        [sys.executable, __file__, "owners", json.dumps(instances), json.dumps(ids)],
        capture_output=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "4242"},
        timeout=60,
    )

    assert json.loads(result.stdout) == [here.owner(KIND, i) for i in ids]


def test_partition_map_spreads_ids_over_instances() -> None:
    partition_map = PartitionMap(["alpha", "beta", "gamma"])

    owners = collections.Counter(
        partition_map.owner(KIND, f"inc-{n}") for n in range(3000)
    )

    assert set(owners) == {"alpha", "beta", "gamma"}
    assert all(700 <= count <= 1300 for count in owners.values()), owners


def test_adding_an_instance_moves_partitions_only_to_it() -> None:
    before = PartitionMap(["alpha", "beta", "gamma"])
    after = PartitionMap(["alpha", "beta", "gamma", "delta"])

    moved = before.moved(after)

    assert {new for _old, new in moved.values()} == {"delta"}
    assert set(moved) == set(after.partitions_of("delta"))
    assert 150 <= len(moved) <= 360  # about a quarter of 1024


def test_losing_an_instance_moves_only_its_partitions() -> None:
    before = PartitionMap(["alpha", "beta", "gamma"])
    after = PartitionMap(["alpha", "gamma"])

    moved = before.moved(after)

    assert set(moved) == set(before.partitions_of("beta"))
    assert {new for _old, new in moved.values()} == {"alpha", "gamma"}


def test_write_for_an_id_owned_elsewhere_is_refused_naming_the_owner() -> None:
    partition_map = PartitionMap(["alpha", "beta"])
    foreign = next(
        f"inc-{n}"
        for n in range(100)
        if partition_map.owner(KIND, f"inc-{n}") == "beta"
    )

    with pytest.raises(NotOwnerError) as caught:
        partition_map.check_owner("alpha", KIND, foreign)

    error = caught.value
    assert isinstance(error, EntityRuntimeError)
    assert (error.owner, error.instance, error.entity_id) == ("beta", "alpha", foreign)
    assert str(error) == (
        f"ticket/{foreign}: owned by instance 'beta' (partition {error.partition}), "
        "not by this instance 'alpha'; nothing recorded; send the write to 'beta'"
    )
    partition_map.check_owner("beta", KIND, foreign)


# -- the worker process -----------------------------------------------------


def _worker_main(url: str, prefix: str, name: str, stall_on: int) -> None:
    """One instance: a broadcast reader and a work-queue reader on ``KIND``.

    Records in Redis lists what it handled, so the test can count across
    processes. With ``stall_on=n`` it hangs after recording its n-th
    work-queue change, before acknowledging it, to be killed there. Runs
    until its stdin is closed, then closes its bus.
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    bus = RedisBus(url, instance_id=name, stream_prefix=prefix, **BUS_OPTIONS)
    recorder = bus.new_client()
    handled = 0

    def on_broadcast(change: EntityChanged, delivery: Delivery) -> None:
        recorder.rpush(f"{prefix}:test:broadcast:{name}", change.seq)

    def on_work(change: EntityChanged, delivery: Delivery) -> None:
        nonlocal handled
        time.sleep(0.01)
        recorder.rpush(
            f"{prefix}:test:handled", f"{name} {change.seq} {delivery.attempt}"
        )
        handled += 1
        if handled == stall_on:
            recorder.rpush(f"{prefix}:test:stalled", f"{name} {change.seq}")
            time.sleep(600)

    BroadcastReader(bus, KIND, "audit", on_broadcast, start="earliest").start()
    WorkQueueReader(
        bus, KIND, "mailer", on_work, start="earliest", batch_size=1
    ).start()
    recorder.rpush(f"{prefix}:test:ready", name)
    sys.stdin.read()

    left = bus.close()
    recorder.close()
    sys.exit(1 if left else 0)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        _worker_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1] == "owners":
        owners_map = PartitionMap(json.loads(sys.argv[2]))
        print(json.dumps([owners_map.owner(KIND, i) for i in json.loads(sys.argv[3])]))
