"""The runtime on a shared Redis bus, against real redis-server processes.

Every test starts its own server on a free 127.0.0.1 port (`RedisServer`).
The test with three instances runs them as separate processes of
``tests/bus_instance.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from child_processes import ChildProcesses
from redis_server import RedisServer, find_redis_server

from runtime import (
    EntityChanged,
    ReentrantCallError,
    Runtime,
    broadcast,
    work_queue,
)
from runtime._redis_bus import (
    Delivery,
    NotOwnerError,
    PartitionMap,
    PartitionMapMismatchError,
    RedisBus,
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
INSTANCE_SCRIPT = Path(__file__).resolve().parent / "bus_instance.py"
CLAIM_IDLE_MS = 800
BUS_OPTIONS: dict[str, Any] = {
    "block_ms": 100,
    "claim_idle_ms": CLAIM_IDLE_MS,
    "retry_backoff": 0.02,
    "max_retry_backoff": 0.2,
    "socket_timeout": 2.0,
}


@dataclasses.dataclass
class Counter:
    """A ticket's state here: how many writes it has had."""

    n: int


class Recorder:
    """A handler that records ``(instance, id, n)`` of what it got, with a wait."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.items: list[tuple[str, str, int]] = []
        self.deliveries: list[Delivery] = []
        self._cond = threading.Condition()

    def __call__(self, change: EntityChanged) -> None:
        assert change.next is not None
        with self._cond:
            self.items.append((self.instance, change.id, change.next["n"]))
            self._cond.notify_all()

    def with_delivery(self, change: EntityChanged, delivery: Delivery) -> None:
        with self._cond:
            self.deliveries.append(delivery)
        self(change)

    def wait_for(self, count: int, timeout: float = 15.0) -> None:
        with self._cond:
            done = self._cond.wait_for(lambda: len(self.items) >= count, timeout)
        assert done, f"timed out waiting for {count} changes; got {self.items}"


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    """Poll ``predicate`` until it holds, or fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {described}")
        time.sleep(0.01)


def per_id(items: list[tuple[str, str, int]]) -> dict[str, list[int]]:
    """Group the ``n`` of recorded changes by id, in the order received."""
    grouped: dict[str, list[int]] = collections.defaultdict(list)
    for _, entity_id, n in items:
        grouped[entity_id].append(n)
    return dict(grouped)


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
    """A plain client on the test's server, to look at what the runtimes wrote."""
    plain = redis.Redis.from_url(server.url)
    try:
        yield plain
    finally:
        plain.close()


def make_runtime(url: str, name: str, **options: Any) -> Runtime:
    """A runtime with a bus of its own on ``url``, under ``name``."""
    return Runtime(
        bus=RedisBus(url, instance_id=name, **BUS_OPTIONS), stop_timeout=5.0, **options
    )


# -- two instances in one process --------------------------------------------


def test_two_runtimes_see_each_others_changes_and_share_a_work_queue_once(
    server: RedisServer,
) -> None:
    runtimes = {name: make_runtime(server.url, name) for name in ("alpha", "beta")}
    seen = {name: Recorder(name) for name in runtimes}
    worked = {name: Recorder(name) for name in runtimes}
    handles = {}
    for name, rt in runtimes.items():
        handles[name] = rt.define_entity(KIND, Counter)
        rt.on_entity_changed(KIND, seen[name], broadcast(), name="audit")
        rt.on_entity_changed(
            KIND, worked[name].with_delivery, work_queue("mailer"), name="mailer"
        )
        rt.start()

    try:
        for n in range(1, 21):
            handles["alpha"].mutate(f"a-{n % 3}", lambda prev, n=n: {"n": n})
            handles["beta"].mutate(f"b-{n % 3}", lambda prev, n=n: {"n": n})
        seen["alpha"].wait_for(40)
        seen["beta"].wait_for(40)
        wait_until(
            lambda: len(worked["alpha"].items) + len(worked["beta"].items) >= 40,
            15,
            "40 work-queue calls",
        )
        time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)  # room for a second delivery
    finally:
        reports = [rt.stop() for rt in runtimes.values()]

    expected = {
        f"{p}-{i}": [n for n in range(1, 21) if n % 3 == i]
        for p in "ab"
        for i in range(3)
    }
    assert per_id(seen["alpha"].items) == expected
    assert per_id(seen["beta"].items) == expected
    calls = collections.Counter(
        (entity_id, n) for r in worked.values() for _, entity_id, n in r.items
    )
    assert len(calls) == 40
    assert set(calls.values()) == {1}, f"handled more than once: {calls}"
    origins = {d.origin for r in worked.values() for d in r.deliveries}
    assert origins == {"alpha", "beta"}
    assert all(report.clean and report.unpublished == 0 for report in reports)


def test_a_bus_work_queue_masks_run_secrets_in_its_retries_and_dead_letters(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = "s3cr3t-token-value"
    rt = make_runtime(server.url, "alpha")
    tickets = rt.define_entity(KIND, Counter)
    calls: list[int] = []

    def mailer(change: EntityChanged) -> None:
        calls.append(change.next["n"])
        raise ValueError(f"the mail server refused {token}")

    rt.on_entity_changed(
        KIND, mailer, work_queue("mailer", max_attempts=2, backoff=0.01), name="m"
    )
    rt.register_run_secrets("run-1", [token])

    with caplog.at_level(logging.DEBUG), rt:
        tickets.mutate("t-1", lambda prev: {"n": 1}, run_id="run-1")
        tickets.mutate("t-2", lambda prev: {"n": 2})
        wait_until(lambda: len(rt.dead_letters("mailer")) == 2, 15, "2 dead letters")
        letters = {d.change.id: d for d in rt.dead_letters("mailer")}

    assert sorted(calls) == [1, 1, 2, 2]
    masked, plain = letters["t-1"], letters["t-2"]
    assert masked.error == "MaskedHandlerError: ValueError: the mail server refused ***"
    assert plain.error == f"ValueError: the mail server refused {token}"
    assert masked.attempts == plain.attempts == 2
    assert all(
        token not in record.getMessage() and token not in (record.exc_text or "")
        for record in caplog.records
        if "t-1" in record.getMessage()
    )


def test_handlers_fed_by_the_bus_may_not_stop_or_drain_the_runtime(
    server: RedisServer,
) -> None:
    writer, reader = make_runtime(server.url, "alpha"), make_runtime(server.url, "beta")
    refused: list[type[BaseException]] = []

    def stops(change: EntityChanged) -> None:
        try:
            reader.stop()
        except ReentrantCallError as err:
            refused.append(type(err))

    def drains(change: EntityChanged) -> None:
        try:
            reader.drain()
        except ReentrantCallError as err:
            refused.append(type(err))

    handle = writer.define_entity(KIND, Counter)
    reader.define_entity(KIND, Counter)
    reader.on_entity_changed(KIND, stops, broadcast(), name="stops")
    reader.on_entity_changed(KIND, drains, work_queue("drainers"), name="drains")
    writer.start()
    reader.start()

    try:
        handle.mutate("a-1", lambda prev: {"n": 1})
        wait_until(lambda: len(refused) >= 2, 10, "both handlers to be refused")
    finally:
        writer.stop()
        reader.stop()

    assert refused == [ReentrantCallError, ReentrantCallError]


# -- ownership ---------------------------------------------------------------


def test_write_for_an_id_another_instance_owns_is_refused_and_nothing_recorded(
    server: RedisServer, client: redis.Redis
) -> None:
    partitions = PartitionMap(["alpha", "beta"], partitions=16)
    ids = [f"t-{i}" for i in range(40)]
    foreign = next(i for i in ids if partitions.owner(KIND, i) == "beta")
    own = next(i for i in ids if partitions.owner(KIND, i) == "alpha")
    rt = make_runtime(server.url, "alpha", partitions=partitions)
    tickets = rt.define_entity(KIND, Counter)

    with rt:
        with pytest.raises(NotOwnerError) as single:
            tickets.mutate(foreign, lambda prev: {"n": 1})
        with pytest.raises(NotOwnerError):
            tickets.mutate_many(
                [(own, lambda prev: {"n": 2}), (foreign, lambda prev: {"n": 2})]
            )
        tickets.mutate(own, lambda prev: {"n": 3})
        assert rt.bus is not None
        assert rt.bus.flush(5)

        states = (tickets.get(foreign), tickets.get(own))
        history = tickets.history(foreign)

    assert single.value.owner == "beta"
    assert "'beta'" in str(single.value)
    assert states == (None, {"n": 3})
    assert history == []
    assert client.xlen(f"entity-runtime:changes:{KIND}") == 1


def test_instance_with_another_partition_count_refuses_to_start(
    server: RedisServer, client: redis.Redis
) -> None:
    names = ["alpha", "beta"]
    alpha = make_runtime(
        server.url, "alpha", partitions=PartitionMap(names, partitions=64)
    )
    beta = make_runtime(
        server.url, "beta", partitions=PartitionMap(names, partitions=65)
    )
    alpha.define_entity(KIND, Counter)
    beta.define_entity(KIND, Counter)

    with alpha:
        with pytest.raises(PartitionMapMismatchError) as refused:
            beta.start()
        recorded = client.hkeys("entity-runtime:partition-maps")
        beta.stop()

    assert (refused.value.other, refused.value.other_partitions) == ("alpha", 64)
    assert re.fullmatch(
        r"instance 'alpha' runs with 64 partitions \(recorded at \S+ in "
        r"entity-runtime:partition-maps\), this instance 'beta' with 65: both would "
        r"take writes for most ids; give every instance the same PartitionMap \(if "
        r"'alpha' no longer runs, remove its record: HDEL "
        r"entity-runtime:partition-maps alpha\); not started",
        str(refused.value),
    )
    assert recorded == [b"alpha"]
    assert client.hkeys("entity-runtime:partition-maps") == []


def test_partition_count_may_change_once_the_instances_stopped(
    server: RedisServer,
) -> None:
    names = ["alpha", "beta"]
    larger = PartitionMap(names, partitions=65)
    before = make_runtime(
        server.url, "alpha", partitions=PartitionMap(names, partitions=64)
    )
    before.define_entity(KIND, Counter)
    with before:
        pass
    after = make_runtime(server.url, "beta", partitions=larger)
    tickets = after.define_entity(KIND, Counter)
    own = next(
        i for i in (f"t-{n}" for n in range(50)) if larger.owner(KIND, i) == "beta"
    )

    with after:
        state = tickets.mutate(own, lambda prev: {"n": 1})

    assert state == {"n": 1}


def test_instance_started_on_a_new_instance_list_warns_of_the_shared_partitions(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    old = PartitionMap(["alpha", "beta"], partitions=64)
    new = PartitionMap(["alpha", "beta", "gamma"], partitions=64)
    shared = [p for p, pair in new.moved(old).items() if pair == ("gamma", "alpha")]
    alpha = make_runtime(server.url, "alpha", partitions=old)
    gamma = make_runtime(server.url, "gamma", partitions=new)

    with caplog.at_level(logging.WARNING, logger="runtime._redis_bus"), alpha, gamma:
        pass

    (warning,) = [
        r.getMessage()
        for r in caplog.records
        if "runs with the instances" in r.getMessage()
    ]
    assert len(shared) > 0
    assert re.fullmatch(
        r"redis bus gamma: instance 'alpha' runs with the instances alpha, beta "
        r"\(recorded at \S+\), this one with alpha, beta, gamma; until they agree "
        rf"both take writes for the ids of {len(shared)} partitions \(see "
        r"PartitionMap\.moved\(\)\)",
        warning,
    )


# -- outages -----------------------------------------------------------------


def test_changes_committed_while_redis_restarts_are_all_delivered_afterwards() -> None:
    with RedisServer(appendonly=True) as server:
        writer = make_runtime(server.url, "alpha")
        reader = make_runtime(server.url, "beta")
        tickets = writer.define_entity(KIND, Counter)
        reader.define_entity(KIND, Counter)
        seen, worked = Recorder("beta"), Recorder("beta")
        reader.on_entity_changed(KIND, seen, name="audit")
        reader.on_entity_changed(KIND, worked, work_queue("mailer"), name="mailer")
        writer.start()
        reader.start()
        try:
            for n in range(1, 6):
                tickets.mutate("t-1", lambda prev, n=n: {"n": n})
            seen.wait_for(5)
            worked.wait_for(5)

            server.stop()
            for n in range(6, 11):
                tickets.mutate("t-1", lambda prev, n=n: {"n": n})
            bus = writer.bus
            assert bus is not None
            wait_until(lambda: not bus.connected, 5, "the outage to be noticed")
            local_state = tickets.get("t-1")
            server.start()
            seen.wait_for(10)
            worked.wait_for(10)
        finally:
            reports = [writer.stop(), reader.stop()]
        samples = {
            name: writer.metrics_registry.get_sample_value(f"entity_runtime_bus_{name}")
            for name in (
                "published_total",
                "queued_total",
                "dropped_total",
                "reconnects_total",
                "outbox",
            )
        }

    assert local_state == {"n": 10}
    assert per_id(seen.items) == {"t-1": list(range(1, 11))}
    assert [n for _, _, n in worked.items] == list(range(1, 11))
    assert samples == {
        "published_total": 10.0,
        "queued_total": 5.0,
        "dropped_total": 0.0,
        "reconnects_total": 1.0,
        "outbox": 0.0,
    }
    assert [report.unpublished for report in reports] == [0, 0]


# -- what other instances send -----------------------------------------------


@dataclasses.dataclass
class Labelled:
    """A newer version of :class:`Counter`, with a field that has a default."""

    n: int
    label: str = "none"


@dataclasses.dataclass
class Note:
    """A state with a text field that may hold a run's secret."""

    note: str


def _entry(
    entity_id: str, prev: Any, next: Any, seq: int, kind: str = KIND
) -> dict[str, Any]:
    # A stream entry as another program could write it: a change whose delta
    # matches its states.
    change = EntityChanged(kind=kind, id=entity_id, prev=prev, next=next, seq=seq)
    return {"change": encode_change(change), "origin": "elsewhere"}


def test_remote_change_breaking_the_schema_is_a_dead_letter_and_the_rest_arrives(
    server: RedisServer, client: redis.Redis
) -> None:
    writer, reader = make_runtime(server.url, "alpha"), make_runtime(server.url, "beta")
    tickets = writer.define_entity(KIND, Counter)
    reader.define_entity(KIND, Counter)
    seen, worked = Recorder("beta"), Recorder("beta")
    reader.on_entity_changed(KIND, seen, name="audit")
    reader.on_entity_changed(KIND, worked, work_queue("mailer"), name="mailer")
    stream = f"entity-runtime:changes:{KIND}"

    with writer, reader:
        client.xadd(stream, _entry("t-1", None, {"n": "one"}, 1))
        client.xadd(stream, _entry("t-2", {"n": 1}, {"n": 2, "extra": True}, 2))
        client.xadd(stream, _entry("o-1", None, {"n": 1}, 3, kind="other"))
        tickets.mutate("t-3", lambda prev: {"n": 3})
        seen.wait_for(1)
        worked.wait_for(1)
        wait_until(lambda: len(reader.dead_letters()) == 3, 10, "three dead letters")
        replayed = reader.replay_dead_letters()
        letters = reader.dead_letters("mailer")

    assert seen.items == worked.items == [("beta", "t-3", 3)]
    assert replayed == 0
    assert [(letter.change.id, letter.error) for letter in letters] == [
        (
            "t-1",
            "refused: next does not fit this instance's schema: field 'n' must be "
            "an integer, got 'one' (str)",
        ),
        (
            "t-2",
            "refused: next does not fit this instance's schema: field 'extra' is "
            "not in the schema (expected fields: n)",
        ),
        ("o-1", "refused: it is of kind 'other', not of this stream's kind 'ticket'"),
    ]
    assert [letter.attempts for letter in letters] == [0, 0, 0]


def test_instances_with_two_versions_of_a_schema_fill_defaults_and_refuse_the_rest(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = make_runtime(server.url, "alpha"), make_runtime(server.url, "beta")
    old_tickets = old.define_entity(KIND, Counter)
    new_tickets = new.define_entity(KIND, Labelled)
    at_old, at_new = Recorder("alpha"), Recorder("beta")
    got_at_new: list[EntityChanged] = []
    old.on_entity_changed(KIND, at_old, name="audit")
    new.on_entity_changed(KIND, at_new, name="audit")
    new.on_entity_changed(KIND, got_at_new.append, name="keep")

    with caplog.at_level(logging.ERROR, logger="runtime._redis_bus"), old, new:
        old_tickets.mutate("t-1", lambda prev: {"n": 1})
        new_tickets.mutate("t-2", lambda prev: {"n": 2, "label": "new"})
        at_new.wait_for(2)
        at_old.wait_for(1)
        wait_until(
            lambda: any("t-2" in r.getMessage() for r in caplog.records),
            10,
            "the old instance to refuse the new state",
        )
        wait_until(lambda: len(got_at_new) == 2, 10, "both changes at the new one")

    assert at_old.items == [("alpha", "t-1", 1)]
    (from_old,) = [c for c in got_at_new if c.id == "t-1"]
    assert from_old.next == {"n": 1, "label": "none"}
    assert from_old.delta == {"n": 1}
    (refusal,) = [r.getMessage() for r in caplog.records if "t-2" in r.getMessage()]
    assert "field 'label' is not in the schema (expected fields: n)" in refusal


def test_remote_change_with_masked_run_secrets_still_arrives(
    server: RedisServer,
) -> None:
    first, second = "s3cr3t-first", "s3cr3t-second"
    writer, reader = make_runtime(server.url, "alpha"), make_runtime(server.url, "beta")
    notes = writer.define_entity(KIND, Note)
    reader.define_entity(KIND, Note)
    got: list[EntityChanged] = []
    reader.on_entity_changed(KIND, got.append, name="audit")
    writer.register_run_secrets("run-1", [first, second])

    with writer, reader:
        notes.mutate("t-1", lambda prev: {"note": first}, run_id="run-1")
        notes.mutate("t-1", lambda prev: {"note": second}, run_id="run-1")
        wait_until(lambda: len(got) == 2, 10, "both changes")

    assert [change.next for change in got] == [{"note": "***"}, {"note": "***"}]
    assert got[1].changed_fields == ("note",)


# -- oversized changes -------------------------------------------------------


@dataclasses.dataclass
class Blob:
    """A state that can be made as large as a test needs."""

    n: int
    data: str


def test_change_too_large_for_the_server_is_a_dead_letter_and_the_rest_flows(
    server: RedisServer, client: redis.Redis
) -> None:
    # 1 MiB is the smallest argument limit Redis accepts; the bus's own
    # max_entry_bytes is higher, so the server is what refuses the entry.
    client.config_set("proto-max-bulk-len", 1024 * 1024)
    writer, reader = make_runtime(server.url, "alpha"), make_runtime(server.url, "beta")
    blobs = writer.define_entity("blob", Blob)
    reader.define_entity("blob", Blob)
    seen = Recorder("beta")
    reader.on_entity_changed("blob", seen, name="audit")
    big = "x" * (2 * 1024 * 1024)

    with writer, reader:
        blobs.mutate("b-1", lambda prev: {"n": 1, "data": "small"})
        blobs.mutate("b-2", lambda prev: {"n": 2, "data": big})
        blobs.mutate("b-3", lambda prev: {"n": 3, "data": "small"})
        seen.wait_for(2)
        letters = writer.dead_letters()
        too_large = writer.metrics_registry.get_sample_value(
            "entity_runtime_bus_too_large_total"
        )

    assert seen.items == [("beta", "b-1", 1), ("beta", "b-3", 3)]
    (letter,) = letters
    assert (letter.worker_group, letter.change.id, letter.change.seq) == ("", "b-2", 2)
    assert letter.change.next == {"n": 2, "data": big}
    assert letter.error.startswith("blob/b-2 seq=2: its bus entry is 4,194,")
    assert "refused" in letter.error
    assert too_large == 1.0


def test_change_over_max_entry_bytes_is_a_dead_letter_and_the_write_succeeds(
    server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    rt = Runtime(
        bus=RedisBus(
            server.url, instance_id="alpha", max_entry_bytes=1000, **BUS_OPTIONS
        )
    )
    blobs = rt.define_entity("blob", Blob)

    with caplog.at_level(logging.ERROR), rt:
        blobs.mutate("b-1", lambda prev: {"n": 1, "data": "small"})
        state = blobs.mutate("b-2", lambda prev: {"n": 2, "data": "y" * 2000})
        blobs.mutate("b-3", lambda prev: {"n": 3, "data": "small"})
        assert rt.bus is not None
        assert rt.bus.flush()
        letters = rt.dead_letters()

    assert state == {"n": 2, "data": "y" * 2000}
    assert client.xlen("entity-runtime:changes:blob") == 2
    (letter,) = letters
    assert letter.change.id == "b-2"
    assert re.fullmatch(
        r"blob/b-2 seq=2: its bus entry is 4,\d{3} bytes, over the bus's "
        r"max_entry_bytes of 1,000; nothing published",
        letter.error,
    )
    (record,) = [r for r in caplog.records if "b-2" in r.getMessage()]
    assert "kept in dead_letters()" in record.getMessage()
    assert record.exc_info is None


# -- separate processes ------------------------------------------------------


class Instances(ChildProcesses):
    """Runs ``tests/bus_instance.py`` processes and reads what they recorded."""

    def __init__(self, tmp_path: Path, url: str, prefix: str, names: list[str]) -> None:
        super().__init__(tmp_path, ROOT, stop_timeout=20)
        self.url = url
        self.prefix = prefix
        self.names = names

    def start(self, name: str, writes: int, stall_on: int = 0) -> None:
        argv = [
            sys.executable,
            str(INSTANCE_SCRIPT),
            self.url,
            self.prefix,
            name,
            ",".join(self.names),
            str(writes),
            str(stall_on),
        ]
        self.spawn(name, argv)


@pytest.fixture
def instances(
    tmp_path: Path, server: RedisServer
) -> Iterator[Callable[..., Instances]]:
    made: list[Instances] = []

    def make(prefix: str, names: list[str]) -> Instances:
        running = Instances(tmp_path, server.url, prefix, names)
        made.append(running)
        return running

    yield make
    for running in made:
        running.close()


def _texts(client: redis.Redis, key: str) -> list[str]:
    return [item.decode() for item in client.lrange(key, 0, -1)]


def _handled(client: redis.Redis, prefix: str) -> list[tuple[str, str, int]]:
    lines = _texts(client, f"{prefix}:test:handled")
    return [
        (name, key, int(attempt))
        for name, key, attempt in (line.split() for line in lines)
    ]


def _start_and_write(
    client: redis.Redis, cluster: Instances, writes: int, stall_on: int
) -> dict[str, list[str]]:
    """Start the instances (the first with ``stall_on``), let each write.

    Returns what each broadcast handler received, once every instance got
    every change.
    """
    prefix, names = cluster.prefix, cluster.names
    for index, name in enumerate(names):
        cluster.start(name, writes, stall_on if index == 0 else 0)
    wait_until(lambda: client.llen(f"{prefix}:test:ready") == 3, 30, cluster.log_tail)

    for name in names:
        client.rpush(f"{prefix}:test:go:{name}", 1)
    wait_until(lambda: client.llen(f"{prefix}:test:written") == 3, 30, cluster.log_tail)
    wait_until(
        lambda: all(
            client.llen(f"{prefix}:test:broadcast:{name}") >= 3 * writes
            for name in names
        ),
        30,
        cluster.log_tail,
    )
    return {name: _texts(client, f"{prefix}:test:broadcast:{name}") for name in names}


def _wait_all_handled(client: redis.Redis, cluster: Instances, count: int) -> None:
    def every_change_handled() -> bool:
        return len({key for _, key, _ in _handled(client, cluster.prefix)}) == count

    wait_until(every_change_handled, 30, cluster.log_tail)
    time.sleep(CLAIM_IDLE_MS / 1000 * 1.5)  # room for a second delivery to show


def test_three_instance_processes_all_get_every_broadcast_and_share_work_once(
    client: redis.Redis, instances: Callable[..., Instances]
) -> None:
    writes = 20
    cluster = instances("three", ["i1", "i2", "i3"])

    broadcasts = _start_and_write(client, cluster, writes, stall_on=0)
    _wait_all_handled(client, cluster, 3 * writes)
    codes = [cluster.stop(name) for name in cluster.names]

    handled = _handled(client, cluster.prefix)
    per_change = collections.Counter(key for _, key, _ in handled)
    assert len(per_change) == 3 * writes
    assert set(per_change.values()) == {1}, f"handled more than once: {per_change}"
    assert {attempt for _, _, attempt in handled} == {1}
    assert len({name for name, _, _ in handled}) >= 2, "the work was not shared"
    for name, lines in broadcasts.items():
        got = per_id([(name, line.split()[0], int(line.split()[1])) for line in lines])
        assert len(lines) == 3 * writes, name
        assert all(ns == sorted(ns) for ns in got.values()), (name, got)
    assert codes == [0, 0, 0], cluster.log_tail()


def test_work_of_an_instance_killed_mid_handling_is_handled_by_the_others(
    client: redis.Redis, instances: Callable[..., Instances]
) -> None:
    writes = 20
    cluster = instances("kill", ["victim", "i2", "i3"])
    _start_and_write(client, cluster, writes, stall_on=5)
    stalled = client.blpop([f"{cluster.prefix}:test:stalled"], timeout=20)
    assert stalled is not None, cluster.log_tail()
    stalled_key = stalled[1].decode().split()[1]

    cluster.processes["victim"].send_signal(signal.SIGKILL)
    killed = cluster.processes["victim"].wait(timeout=10)
    _wait_all_handled(client, cluster, 3 * writes)
    codes = [cluster.stop(name) for name in ("i2", "i3")]

    handled = _handled(client, cluster.prefix)
    per_change = collections.Counter(key for _, key, _ in handled)
    duplicates = {key: count - 1 for key, count in per_change.items() if count > 1}
    redone = [(name, attempt) for name, key, attempt in handled if key == stalled_key]
    assert killed == -signal.SIGKILL
    assert len(per_change) == 3 * writes
    # The victim handled stalled_key but died before acknowledging it, so it
    # ran twice; nothing else did.
    assert duplicates == {stalled_key: 1}
    assert redone[0] == ("victim", 1)
    assert redone[1][0] in {"i2", "i3"}
    assert redone[1][1] == 2
    assert codes == [0, 0], cluster.log_tail()


# -- without a bus -----------------------------------------------------------


def test_runtime_without_a_bus_works_where_redis_cannot_be_imported() -> None:
    script = """
import sys
sys.modules["redis"] = None  # any import of redis now fails
from runtime import Runtime
import dataclasses

@dataclasses.dataclass
class Counter:
    n: int

seen = []
with Runtime() as rt:
    tickets = rt.define_entity("ticket", Counter)
    rt.on_entity_changed("ticket", seen.append)
    tickets.mutate("t-1", lambda prev: {"n": 1})
    rt.drain()
print(len(seen), sorted(m for m in sys.modules if m.startswith("redis")))
"""

    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1 ['redis']"
