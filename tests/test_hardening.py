"""The runtime under load, faults and hostile input, with secrets kept secret.

Each test tries hard to break one guarantee: bounded memory behind a stalled
subscriber, gap-free reading by sequence number, agreement with a plain model
under random faults, crash safety of snapshots, retention and restore, the
write path and the loaders against hostile input, and secrets in metrics.

Randomness comes from fixed seeds. ``ENTITY_RUNTIME_STRESS_SECONDS`` makes the
stress test run longer; ``ENTITY_RUNTIME_STALL_CHANGES`` feeds the stalled
subscriber more changes (1000000 for the full run, about eight minutes: the
default fits about a minute on a busy 2-core machine, since tracemalloc slows
every allocation); ``ENTITY_RUNTIME_FUZZ_EXAMPLES`` sets the examples of the
two fuzz tests.
"""

from __future__ import annotations

import enum
import functools
import gc
import http.client
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pykka
import pytest
from conftest import Ticket, ticket
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import runtime._durability as durability
from runtime import (
    ApplyError,
    EntityChanged,
    InvalidIdError,
    Runtime,
    SchemaError,
    Transition,
    thaw,
    work_queue,
)
from runtime._durability import RestoreError
from runtime._persistence import (
    CorruptFileError,
    DataDirError,
    FormatVersionError,
    JournalWriter,
    list_journals,
    write_snapshot,
)
from runtime.testing import FakeClock

SEED = 20260604
REPO_ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("hardening_writer.py")
JOIN_TIMEOUT = 60.0
JOURNAL_HEADER = 8
FRAME_HEADER = 8
DOCUMENTED_LOAD_ERRORS = (
    CorruptFileError,
    FormatVersionError,
    RestoreError,
    DataDirError,
)


# --- shared helpers ---------------------------------------------------------------


@dataclass
class Level:
    """A single number."""

    n: int


@dataclass
class Item:
    """An entity owned by one writer thread of the stress test."""

    owner: str
    n: int
    tags: list[str] = field(default_factory=list)


@dataclass
class Blob:
    """Anything JSON-compatible, for the write-path fuzz."""

    value: Any
    label: str = ""


def bump(prev: dict[str, Any] | None) -> dict[str, Any]:
    """Read-modify-write: 0 on create, then one more each time."""
    return {"n": 0 if prev is None else prev["n"] + 1}


def explode(prev: Any) -> Any:
    raise RuntimeError("apply failed on purpose")


def sample(rt: Runtime, name: str, **labels: str) -> float:
    """One sample of the runtime's registry (0 when the series has none yet)."""
    value = rt.metrics_registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    """Run each target on its own thread, released together; return the errors."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            target()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not [t for t in threads if t.is_alive()], "threads hung"
    return errors


def wait_for(condition: Callable[[], bool], timeout: float = JOIN_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class Seen:
    """A thread-safe list of what a handler was given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Any] = []

    def add(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)

    def items(self) -> list[Any]:
        with self._lock:
            return list(self._items)


def replay_rows(changes: list[tuple[Transition, ...]]) -> dict[tuple[str, str], list]:
    """Rebuild, per entity, the state after each change from the log's rows."""
    states: dict[tuple[str, str], list[dict[str, Any] | None]] = defaultdict(list)
    for rows in changes:
        key = (rows[0].kind, rows[0].id)
        history = states[key]
        if rows[0].tombstone:
            history.append(None)
            continue
        state = dict(history[-1]) if history and history[-1] is not None else {}
        for row in rows:
            state[row.field] = thaw(row.after)
        history.append(state)
    return dict(states)


# --- load: a stalled subscriber fed a great many changes --------------------------

STALL_IDS = 1_000
STALL_MAILBOX = 100
STALL_CHUNK = 1_000
STALL_WARM = 4 * STALL_IDS
STALL_CHANGES = max(
    4 * STALL_WARM,
    int(os.environ.get("ENTITY_RUNTIME_STALL_CHANGES", "80000"))
    // (4 * STALL_CHUNK)
    * (4 * STALL_CHUNK),
)
STALL_TIMEOUT = max(300, STALL_CHANGES // 1_000)
"""Seconds the stalled run may take: traced, it writes 1,000 to 3,000 changes/s."""


@dataclass(frozen=True)
class StallRun:
    """What feeding a stalled subscriber showed (see ``stalled_run``)."""

    changes: int
    seconds: float
    slowest_chunk: float
    memory: dict[int, int]
    all_acknowledged_while_stalled: bool
    handler_calls_while_stalled: int
    coalesced: float
    depth: float
    changed: float
    log_rows: int
    clean_stop: bool
    delivered_after_release: list[EntityChanged]


@pytest.fixture(scope="module")
def stalled_run() -> StallRun:
    """Feed ``STALL_CHANGES`` changes over ``STALL_IDS`` ids to a stalled subscriber.

    The subscriber blocks on an event from its first change until the end of
    the run. A retention pass after every chunk keeps the log at one row per
    entity, so what is left to grow is what the runtime keeps for the
    subscriber. Traced memory is read once the mailbox is in its steady state,
    then after a quarter, a half and all of the changes.
    """
    rt = Runtime(mailbox_size=STALL_MAILBOX, retention_max_rows=1, stop_timeout=30.0)
    levels = rt.define_entity("level", Level)
    entered, release = threading.Event(), threading.Event()
    calls = Seen()

    def stalled(change: EntityChanged) -> None:
        calls.add(change)
        entered.set()
        release.wait(600)

    rt.on_entity_changed("level", stalled, name="stalled")
    marks = {STALL_WARM, STALL_CHANGES // 4, STALL_CHANGES // 2, STALL_CHANGES}
    memory: dict[int, int] = {}
    slowest = 0.0
    rt.start()
    try:
        levels.mutate("e0", bump)
        assert entered.wait(JOIN_TIMEOUT)
        unacknowledged = 0
        tracemalloc.start()
        started = time.perf_counter()
        try:
            written = 1
            while written < STALL_CHANGES:
                chunk_started = time.perf_counter()
                end = min(STALL_CHANGES, (written // STALL_CHUNK + 1) * STALL_CHUNK)
                chunk = [
                    levels.mutate_async(f"e{i % STALL_IDS}", bump)
                    for i in range(written, end)
                ]
                chunk[-1].get(timeout=JOIN_TIMEOUT)
                unacknowledged += sum(
                    not f.done() or f.exception() is not None for f in chunk
                )
                del chunk
                written = end
                slowest = max(slowest, time.perf_counter() - chunk_started)
                rt.apply_retention()
                if written in marks:
                    gc.collect()
                    memory[written] = tracemalloc.get_traced_memory()[0]
            seconds = time.perf_counter() - started
        finally:
            tracemalloc.stop()
        stalled_throughout = not release.is_set()
        calls_while_stalled = len(calls.items())
        coalesced = sample(
            rt, "entity_runtime_coalesced_total", actor="subscriber:level:stalled"
        )
        depth = sample(
            rt, "entity_runtime_mailbox_depth", actor="subscriber:level:stalled"
        )
        changed = sample(
            rt, "entity_runtime_mutations_total", kind="level", outcome="changed"
        )
        log_rows = len(rt.log)
    finally:
        release.set()
        report = rt.stop()

    return StallRun(
        changes=STALL_CHANGES,
        seconds=seconds,
        slowest_chunk=slowest,
        memory=memory,
        all_acknowledged_while_stalled=unacknowledged == 0 and stalled_throughout,
        handler_calls_while_stalled=calls_while_stalled,
        coalesced=coalesced,
        depth=depth,
        changed=changed,
        log_rows=log_rows,
        clean_stop=report.clean,
        delivered_after_release=calls.items(),
    )


@pytest.mark.timeout(STALL_TIMEOUT)
def test_a_stalled_subscriber_neither_holds_up_the_writer_nor_loses_the_count(
    stalled_run: StallRun,
) -> None:
    run = stalled_run

    folded_into_waiting = run.changes - 1 - run.depth
    waiting = run.delivered_after_release[1:]
    newest = run.changes // STALL_IDS - 1

    assert run.all_acknowledged_while_stalled
    assert run.handler_calls_while_stalled == 1
    assert run.slowest_chunk < 5.0, "a chunk of writes waited like back-pressure"
    assert run.changed == run.changes
    assert run.depth == STALL_IDS <= STALL_MAILBOX + STALL_IDS
    assert run.coalesced == folded_into_waiting > 0
    assert run.log_rows == STALL_IDS
    assert run.clean_stop
    assert len(run.delivered_after_release) == 1 + STALL_IDS
    assert sorted(c.id for c in waiting) == sorted(f"e{i}" for i in range(STALL_IDS))
    assert all(c.next == {"n": newest} for c in waiting)
    assert all(c.prev == ({"n": 0} if c.id == "e0" else None) for c in waiting)


@pytest.mark.timeout(STALL_TIMEOUT)
def test_a_stalled_subscriber_keeps_memory_bounded_whatever_the_change_count(
    stalled_run: StallRun,
) -> None:
    run = stalled_run
    base = run.memory[STALL_WARM]

    after_quarter = run.memory[run.changes // 4] - base
    after_all = run.memory[run.changes] - base

    assert after_all <= 2 * max(after_quarter, 0) + 512 * 1024, (
        f"traced memory grew {after_quarter} bytes over the first quarter of "
        f"{run.changes} changes and {after_all} bytes over all of them"
    )


# --- load: reading the log by sequence number under concurrent writers ---------


def test_a_consumer_reading_by_sequence_sees_every_change_once_and_in_order() -> None:
    writers, writes_each, ids = 8, 1_500, [f"x{i}" for i in range(8)]
    rt = Runtime(stop_timeout=20.0)
    handles = [
        rt.define_entity("left", Level, shards=4),
        rt.define_entity("right", Level, shards=2),
    ]
    writing = threading.Event()
    writing.set()
    read: list[tuple[Transition, ...]] = []
    out_of_order: list[tuple[int, int]] = []
    reads_while_writing = [0]

    def consume() -> None:
        cursor = 0
        while True:
            still_writing = writing.is_set()
            batch = list(rt.log.changes_since(cursor))
            reads_while_writing[0] += bool(batch) and still_writing
            for rows in batch:
                if rows[0].seq <= cursor:
                    out_of_order.append((cursor, rows[0].seq))
                cursor = rows[0].seq
                read.append(rows)
            if not still_writing and cursor >= rt.log.last_seq:
                return
            time.sleep(0)

    def write(number: int) -> None:
        rng = random.Random(SEED + number)
        pending = []
        for _ in range(writes_each):
            handle, entity_id = rng.choice(handles), rng.choice(ids)
            if rng.random() < 0.5:
                handle.mutate(entity_id, bump)
            else:
                pending.append(handle.mutate_async(entity_id, bump))
        for future in pending:
            future.get(timeout=JOIN_TIMEOUT)

    consumer = threading.Thread(target=consume)
    rt.start()
    try:
        consumer.start()
        errors = run_threads([functools.partial(write, n) for n in range(writers)])
        writing.clear()
        consumer.join(JOIN_TIMEOUT)
        finals = {
            (h.kind, i): state["n"]
            for h in handles
            for i, state in h.get_many(ids).items()
        }
    finally:
        writing.clear()
        rt.stop()

    seqs = [rows[0].seq for rows in read]
    per_entity: dict[tuple[str, str], list[Transition]] = defaultdict(list)
    for rows in read:
        per_entity[(rows[0].kind, rows[0].id)].extend(rows)

    assert errors == []
    assert not consumer.is_alive()
    assert out_of_order == []
    assert reads_while_writing[0] > 10
    assert seqs == list(range(1, writers * writes_each + 1))
    for key, rows in per_entity.items():
        assert [r.after for r in rows] == list(range(len(rows))), key
        assert [r.before for r in rows] == [None, *range(len(rows) - 1)], key
        assert finals[key] == len(rows) - 1


# --- load: a seeded stress test against a plain model ---------------------------

STRESS_SECONDS = float(os.environ.get("ENTITY_RUNTIME_STRESS_SECONDS", "3"))
STRESS_WRITERS = 6
IDS_PER_WRITER = 5
TALLY_IDS = [f"tally-{i}" for i in range(4)]
TAGS = ["red", "green", "blue", "grey"]
JOBS_ATTEMPTS = 3


@dataclass
class Observed:
    """What one writer thread saw its own writes return."""

    changes: dict[str, list[dict[str, Any] | None]] = field(
        default_factory=lambda: defaultdict(list)
    )
    tallies: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    unchanged: int = 0
    failed: int = 0
    rejected: int = 0


def advance(owner: str, tags: list[str], prev: dict[str, Any] | None) -> Any:
    return {"owner": owner, "n": 0 if prev is None else prev["n"] + 1, "tags": tags}


def keep(prev: dict[str, Any] | None) -> Any:
    return prev if prev is not None else {"owner": "keeper", "n": 0, "tags": []}


def misfit(prev: Any) -> Any:
    return {"owner": 7, "n": "seven"}


def stress_writer(
    number: int, items: Any, tallies: Any, deadline: float, seen: Observed
) -> None:
    """Random writes, with faults, to the ids this thread owns and to shared tallies.

    Only this thread writes its ids, so what its calls return is the whole
    truth about them; the tallies are shared, so only their counts are known.
    """
    rng = random.Random(SEED * 1_000 + number)
    owner = f"w{number}"
    mine = [f"{owner}-{k}" for k in range(IDS_PER_WRITER)]
    known: dict[str, Any] = dict.fromkeys(mine)

    def landed(entity_id: str, state: Any) -> None:
        if known[entity_id] is not None and state == known[entity_id]:
            seen.unchanged += 1
            return
        known[entity_id] = thaw(state)
        seen.changes[entity_id].append(known[entity_id])

    while time.monotonic() < deadline:
        roll, fault = rng.random(), rng.random()
        if roll < 0.2:
            entity_id = rng.choice(TALLY_IDS)
            seen.tallies[entity_id].append(tallies.mutate(entity_id, bump)["n"])
            continue
        entity_id = rng.choice(mine)
        if roll < 0.3:
            try:
                removed = items.remove(entity_id, explode if fault < 0.3 else None)
            except ApplyError:
                assert known[entity_id] is not None, "apply called for a missing id"
                seen.failed += 1
                continue
            assert removed == (known[entity_id] is not None)
            if removed:
                known[entity_id] = None
                seen.changes[entity_id].append(None)
            else:
                seen.unchanged += 1
        elif roll < 0.38:
            burst = [rng.sample(TAGS, rng.randint(0, 3)) for _ in range(3)]
            futures = [
                items.mutate_async(entity_id, functools.partial(advance, owner, tags))
                for tags in burst
            ]
            for future in futures:
                landed(entity_id, future.get(timeout=JOIN_TIMEOUT))
        elif fault < 0.1:
            with pytest.raises(ApplyError):
                items.mutate(entity_id, explode)
            seen.failed += 1
        elif fault < 0.15:
            with pytest.raises(SchemaError):
                items.mutate(entity_id, misfit)
            seen.rejected += 1
        elif fault < 0.3:
            landed(entity_id, items.mutate(entity_id, keep))
        else:
            tags = rng.sample(TAGS, rng.randint(0, 3))
            landed(
                entity_id,
                items.mutate(entity_id, functools.partial(advance, owner, tags)),
            )


def by_entity(changes: list[EntityChanged]) -> dict[str, list[EntityChanged]]:
    found: dict[str, list[EntityChanged]] = defaultdict(list)
    for change in changes:
        found[change.id].append(change)
    return dict(found)


@pytest.mark.parametrize("persisted", [False, True], ids=["in-memory", "data-dir"])
def test_seeded_stress_with_faults_agrees_with_a_plain_model(
    tmp_path: Path, persisted: bool
) -> None:
    options: dict[str, Any] = {"retention_max_rows": None}
    if persisted:
        options.update(
            data_dir=tmp_path / "data", snapshot_every=2_000, housekeeping_interval=0.05
        )
    rt = Runtime(mailbox_size=1_000_000, stop_timeout=30.0, **options)
    items = rt.define_entity("item", Item, shards=3)
    tallies = rt.define_entity("tally", Level, shards=2)
    audit, mirror, tally_watch, removed_events = Seen(), Seen(), Seen(), Seen()
    jobs_done, attempts = Seen(), Counter()

    def audited(change: EntityChanged) -> None:
        audit.add(change)
        if change.seq % 5 == 0:
            raise RuntimeError(f"audit refuses seq {change.seq}")

    def watched(change: EntityChanged) -> None:
        tally_watch.add(change)
        if change.seq % 3 == 0:
            raise RuntimeError(f"watch refuses seq {change.seq}")

    def job(change: EntityChanged) -> None:
        attempts[change.seq] += 1
        if change.seq % 11 == 0:
            raise ConnectionError(f"seq {change.seq} never goes through")
        if change.seq % 7 == 0 and attempts[change.seq] == 1:
            raise ConnectionError(f"seq {change.seq} goes through on a retry")
        jobs_done.add(change)

    def derive(change: EntityChanged) -> list[str]:
        if change.seq % 13 == 0:
            raise ValueError(f"deriver refuses seq {change.seq}")
        return ["item.removed"] if change.next is None else []

    rt.on_entity_changed("item", audited, name="audit")
    rt.on_entity_changed("item", mirror.add, name="mirror")
    rt.on_entity_changed("tally", watched, name="watch")
    rt.on_entity_changed(
        "item",
        job,
        delivery=work_queue("jobs", max_attempts=JOBS_ATTEMPTS, backoff=0.0005),
        name="job",
    )
    rt.register_change_deriver("item", derive)
    rt.on_trigger("item.removed", lambda e, p, c: removed_events.add(c.seq))
    observed = [Observed() for _ in range(STRESS_WRITERS)]
    deadline = time.monotonic() + STRESS_SECONDS

    rt.start()
    try:
        errors = run_threads(
            [
                functools.partial(stress_writer, n, items, tallies, deadline, seen)
                for n, seen in enumerate(observed)
            ]
        )
        rt.drain(timeout=JOIN_TIMEOUT)
        log = list(rt.log.changes_since(0))
        rt.log.check()
        every_id = [
            f"w{n}-{k}" for n in range(STRESS_WRITERS) for k in range(IDS_PER_WRITER)
        ]
        states = items.get_many(every_id)
        tally_states = tallies.get_many(TALLY_IDS)
        counted = {
            (name, tuple(sorted(labels.items()))): value
            for metric in rt.metrics_registry.collect()
            for name, labels, value in (
                (s.name, s.labels, s.value) for s in metric.samples
            )
        }
        last_seq = rt.log.last_seq
        letters = rt.dead_letters()
    finally:
        report = rt.stop()
    restored = (log, states)
    if persisted:
        again = Runtime(**options)
        again.define_entity("item", Item)
        again.define_entity("tally", Level)
        try:
            again.start()
            restored = (
                list(again.log.changes_since(0)),
                again.handle("item").get_many(every_id),
            )
        finally:
            again.stop()

    def metric(name: str, **labels: str) -> float:
        return counted.get((name, tuple(sorted(labels.items()))), 0.0)

    model: dict[tuple[str, str], list[Any]] = {}
    for seen in observed:
        for entity_id, history in seen.changes.items():
            model[("item", entity_id)] = history
    tally_counts = Counter()
    for seen in observed:
        for entity_id, counts in seen.tallies.items():
            tally_counts[entity_id] += len(counts)
    for entity_id in TALLY_IDS:
        if tally_counts[entity_id]:
            model[("tally", entity_id)] = [
                {"n": n} for n in range(tally_counts[entity_id])
            ]
    item_log = [rows for rows in log if rows[0].kind == "item"]
    item_seqs = [rows[0].seq for rows in item_log]
    tally_seqs = [rows[0].seq for rows in log if rows[0].kind == "tally"]
    tombstones = [rows[0].seq for rows in item_log if rows[0].tombstone]
    dead = [s for s in item_seqs if s % 11 == 0]
    retried = [s for s in item_seqs if s % 7 == 0 and s % 11 != 0]
    model_items = {
        key[1]: history for key, history in model.items() if key[0] == "item"
    }

    # the log against the model
    assert errors == []
    assert [rows[0].seq for rows in log] == list(range(1, last_seq + 1))
    assert replay_rows(log) == model
    for entity_id in TALLY_IDS:
        returned = sorted(n for seen in observed for n in seen.tallies[entity_id])
        assert returned == list(range(tally_counts[entity_id])), entity_id
    # the states against the model
    assert states == {
        i: history[-1] for i, history in model_items.items() if history[-1] is not None
    }
    assert {i: s["n"] for i, s in tally_states.items()} == {
        i: c - 1 for i, c in tally_counts.items() if c
    }
    # what each subscriber saw
    for seen_changes in (audit.items(), mirror.items()):
        grouped = by_entity(seen_changes)
        assert sorted(c.seq for c in seen_changes) == item_seqs
        assert {i: [thaw(c.next) for c in cs] for i, cs in grouped.items()} == {
            i: h for i, h in model_items.items() if h
        }
        for changes in grouped.values():
            assert [c.seq for c in changes] == sorted(c.seq for c in changes)
            assert [thaw(c.prev) for c in changes] == [
                None,
                *(thaw(c.next) for c in changes[:-1]),
            ]
    assert sorted(c.seq for c in tally_watch.items()) == tally_seqs
    for changes in by_entity(tally_watch.items()).values():
        assert [c.next["n"] for c in changes] == list(range(len(changes)))
    assert sorted(c.seq for c in jobs_done.items()) == sorted(
        set(item_seqs) - set(dead)
    )
    for changes in by_entity(jobs_done.items()).values():
        assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    assert sorted((d.change.seq, d.attempts) for d in letters) == [
        (s, JOBS_ATTEMPTS) for s in dead
    ]
    assert sorted(removed_events.items()) == [s for s in tombstones if s % 13]
    # the counters
    changed = len(item_seqs)
    assert metric("entity_runtime_mutations_total", kind="item", outcome="changed") == (
        changed
    )
    assert metric(
        "entity_runtime_mutations_total", kind="item", outcome="unchanged"
    ) == sum(o.unchanged for o in observed)
    assert metric("entity_runtime_mutations_total", kind="item", outcome="failed") == (
        sum(o.failed for o in observed)
    )
    assert metric(
        "entity_runtime_mutations_total", kind="item", outcome="rejected"
    ) == sum(o.rejected for o in observed)
    assert metric(
        "entity_runtime_mutations_total", kind="tally", outcome="changed"
    ) == len(tally_seqs)
    assert metric("entity_runtime_changes_total", kind="item") == changed
    assert metric("entity_runtime_transitions_total", kind="item") == sum(
        len(rows) for rows in item_log
    )
    assert metric("entity_runtime_log_rows") == sum(len(rows) for rows in log)
    assert metric("entity_runtime_entities", kind="item") == len(states)
    assert metric(
        "entity_runtime_subscriber_errors_total", kind="item", subscriber="audit"
    ) == sum(1 for s in item_seqs if s % 5 == 0)
    assert metric(
        "entity_runtime_subscriber_errors_total", kind="tally", subscriber="watch"
    ) == sum(1 for s in tally_seqs if s % 3 == 0)
    assert metric(
        "entity_runtime_subscriber_errors_total", kind="item", subscriber="job"
    ) == JOBS_ATTEMPTS * len(dead) + len(retried)
    assert metric("entity_runtime_dead_letters_total", worker_group="jobs") == len(dead)
    assert metric("entity_runtime_deriver_errors_total", kind="item") == sum(
        1 for s in item_seqs if s % 13 == 0
    )
    assert metric("entity_runtime_triggers_total", event="item.removed") == len(
        removed_events.items()
    )
    assert not [k for k, v in counted.items() if k[0].endswith("coalesced_total") and v]
    assert report.clean
    # what a restart restores (with a data dir)
    assert [r.to_dict() for rows in restored[0] for r in rows] == [
        r.to_dict() for rows in log for r in rows
    ]
    assert restored[1] == states
    assert changed > 200


# --- faults: a hung subscriber and one that keeps failing ------------------------


def test_a_hung_subscriber_and_a_failing_work_queue_leave_the_others_untouched(
    clock: FakeClock,
) -> None:
    changes, stop_timeout = 20, 1.0
    rt = Runtime(clock=clock, stop_timeout=stop_timeout)
    tickets = rt.define_entity("ticket", Ticket)
    entered, release = threading.Event(), threading.Event()
    healthy, jobs, attempts = Seen(), Seen(), Counter()

    def hung(change: EntityChanged) -> None:
        entered.set()
        release.wait(JOIN_TIMEOUT)

    def always_failing(change: EntityChanged) -> None:
        attempts[change.seq] += 1
        raise ConnectionError(f"endpoint down for {change.id}")

    rt.on_entity_changed("ticket", hung, name="hung")
    rt.on_entity_changed(
        "ticket",
        always_failing,
        delivery=work_queue("failing", max_attempts=3, backoff=0.001),
        name="failing",
    )
    rt.on_entity_changed("ticket", healthy.add, name="healthy")
    rt.on_entity_changed(
        "ticket", jobs.add, delivery=work_queue("jobs", max_attempts=3), name="jobs"
    )
    rt.start()
    try:
        for i in range(changes):
            status = ("open", "working", "closed")[i % 3]
            tickets.mutate(f"t-{i % 4}", lambda prev, s=status: ticket(status=s))
        assert entered.wait(JOIN_TIMEOUT)
        assert wait_for(lambda: len(rt.dead_letters()) == changes)
        assert wait_for(lambda: len(jobs.items()) == changes)
        started = time.monotonic()
        report = rt.stop()
        took = time.monotonic() - started
    finally:
        release.set()
        for ref in pykka.ActorRegistry.get_all():
            ref.stop(block=True, timeout=5)

    letters = rt.dead_letters()

    assert took < stop_timeout + 3.0
    assert report.stuck_consumers == ("subscriber:ticket:hung",)
    assert report.undelivered == tuple(
        ("subscriber:ticket:hung", seq) for seq in range(2, changes + 1)
    )
    assert [c.seq for c in healthy.items()] == list(range(1, changes + 1))
    assert [c.seq for c in jobs.items()] == list(range(1, changes + 1))
    assert [(d.change.seq, d.attempts, d.worker_group) for d in letters] == [
        (seq, 3, "failing") for seq in range(1, changes + 1)
    ]
    assert all("ConnectionError: endpoint down for t-" in d.error for d in letters)
    assert attempts == dict.fromkeys(range(1, changes + 1), 3)
    assert (
        sample(
            rt,
            "entity_runtime_subscriber_errors_total",
            kind="ticket",
            subscriber="failing",
        )
        == 3 * changes
    )
    assert sample(rt, "entity_runtime_dead_letters_total", worker_group="failing") == (
        changes
    )
    for untouched in ("healthy", "jobs", "hung"):
        assert (
            sample(
                rt,
                "entity_runtime_subscriber_errors_total",
                kind="ticket",
                subscriber=untouched,
            )
            == 0
        )


# --- faults: SIGKILL during snapshots, retention and restore ---------------------


@dataclass(frozen=True)
class Ack:
    id: str
    value: int
    seq: int


class CrashWriter:
    """A ``hardening_writer.py`` process whose output is read line by line."""

    def __init__(self, tmp_path: Path, mode: str, data_dir: Path, *args: str):
        self._stderr_path = tmp_path / f"writer-{time.monotonic_ns()}.err"
        self._stderr = self._stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), mode, str(data_dir), *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def __enter__(self) -> CrashWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.close()

    def read_until(self, predicate: Callable[[str], bool]) -> str:
        while True:
            try:
                line = self._queue.get(timeout=JOIN_TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    f"writer silent; stderr:\n{self.stderr()}"
                ) from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(
                    f"writer ended (rc={self.proc.wait(timeout=10)}) before the "
                    f"expected line; stderr:\n{self.stderr()}"
                )
            self.lines.append(line)
            if predicate(line):
                return line

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text()

    def kill(self, *, may_have_ended: bool = False) -> None:
        """SIGKILL the process and collect every complete line it printed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(10)
        while (line := self._queue.get_nowait()) is not None:
            self.lines.append(line)
        if may_have_ended and self.proc.returncode == 0:
            return
        assert self.proc.returncode == -signal.SIGKILL, self.stderr()

    def acks(self) -> list[Ack]:
        return [
            Ack(parts[1], int(parts[2]), int(parts[3]))
            for parts in (line.split() for line in self.lines)
            if parts[0] == "ack"
        ]


@dataclass
class CounterState:
    """The state ``hardening_writer.py`` writes."""

    value: int
    pad: str = ""


def _keep_all_runtime(data_dir: Path, **options: Any) -> Runtime:
    """A runtime on ``data_dir`` that keeps every row and snapshots only when told."""
    return Runtime(
        data_dir=data_dir,
        snapshot_every=None,
        snapshot_interval=None,
        retention_max_rows=None,
        **options,
    )


def restore_counters(data_dir: Path, **options: Any) -> dict[str, Any]:
    """Start a runtime on ``data_dir`` and return what it restored, then stop it."""
    rt = _keep_all_runtime(data_dir, **options)
    counters = rt.define_entity("counter", CounterState)
    try:
        rt.start()
        log = list(rt.log.changes_since(0))
        found = {
            "seq": rt.log.last_seq,
            "values": {
                i: s["value"] for i, s in counters.get_many(counters.ids()).items()
            },
            "value_rows": [
                (row.seq, row.id, row.after)
                for rows in log
                for row in rows
                if row.field == "value"
            ],
            "seqs": [rows[0].seq for rows in log],
            "snapshot_seq": rt.restored.seq - rt.restored.journal_records,
            "damaged": rt.restored.damaged,
        }
        rt.log.check()
    finally:
        rt.stop()
    found["leftovers"] = sorted(p.name for p in data_dir.iterdir() if "tmp" in p.name)
    return found


def check_restored(
    found: dict[str, Any],
    acks: list[Ack],
    pending: tuple[str, int] | None,
    every_seq: bool,
) -> None:
    """The restore holds every acknowledged change, at most the one write that
    was in flight besides, no duplicate and no skipped sequence.
    """
    extra = found["seq"] - len(acks)
    expected = {ack.id: ack.value for ack in acks}
    if extra == 1 and pending is not None:
        expected[pending[0]] = pending[1]
    by_seq = {ack.seq: (ack.id, ack.value) for ack in acks}
    if pending is not None:
        by_seq[len(acks) + 1] = pending

    assert extra in (0, 1), (found["seq"], len(acks))
    assert [a.seq for a in acks] == list(range(1, len(acks) + 1))
    assert found["values"] == expected
    assert [r for r in found["value_rows"] if by_seq.get(r[0]) != r[1:]] == []
    assert found["seqs"] == sorted(set(found["seqs"]))
    assert found["seqs"][-1] == found["seq"]
    if every_seq:
        assert found["seqs"] == list(range(1, found["seq"] + 1))
    else:
        after_snapshot = [s for s in found["seqs"] if s > found["snapshot_seq"]]
        assert after_snapshot == list(
            range(found["snapshot_seq"] + 1, found["seq"] + 1)
        )
    assert not found["damaged"]
    assert found["leftovers"] == []


def _fill_and_kill(tmp_path: Path, data_dir: Path, ids: int, count: int) -> list[str]:
    """Write ``count`` changes to ``data_dir``, SIGKILL the writer, return its lines."""
    with CrashWriter(
        tmp_path, "fill", data_dir, f"--ids={ids}", f"--count={count}", "--pad=32"
    ) as writer:
        writer.read_until(lambda line: line == "held")
        writer.kill()

    return writer.lines


def in_flight(acks: list[Ack], base: int, ids: int) -> tuple[str, int]:
    """The write a writer started after its last acknowledged one."""
    n = acks[-1].value - base + 1
    return f"e{n % ids}", base + n


def test_sigkill_while_snapshots_are_written_restores_the_last_acknowledged_state(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    data_dir, ids = tmp_path / "data", 6
    acks: list[Ack] = []
    killed_mid_write = 0

    for round_no in range(12):
        if round_no >= 4 and killed_mid_write >= 3:
            break
        base = (round_no + 1) * 1_000
        with CrashWriter(
            tmp_path,
            "snapshots",
            data_dir,
            f"--ids={ids}",
            "--pad=1500000",
            f"--base={base}",
        ) as writer:
            writer.read_until(lambda line: line.startswith("ready "))
            for _ in range(rng.randint(1, 5)):
                writer.read_until(lambda line: line == "begin snapshot")
            time.sleep(rng.random() * 0.025)
            writer.kill()
        killed_mid_write += any(p.suffix == ".tmp" for p in data_dir.iterdir())
        acks.extend(writer.acks())
        pending = in_flight(acks, base, ids)
        found = restore_counters(data_dir)

        check_restored(found, acks, pending, every_seq=True)
        if found["seq"] > len(acks):
            acks.append(Ack(*pending, found["seq"]))

    assert killed_mid_write >= 1, "no kill landed while a snapshot was written"


def test_sigkill_during_retention_restores_the_last_acknowledged_state(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED + 1)
    data_dir, ids = tmp_path / "data", 3
    acks: list[Ack] = []

    for round_no in range(6):
        base = (round_no + 1) * 1_000
        with CrashWriter(
            tmp_path,
            "retention",
            data_dir,
            f"--ids={ids}",
            "--every=4",
            "--max-rows=2",
            "--pad=20000",
            f"--base={base}",
        ) as writer:
            writer.read_until(lambda line: line.startswith("ready "))
            for _ in range(rng.randint(1, 6)):
                writer.read_until(lambda line: line == "begin retention")
            time.sleep(rng.random() * 0.004)
            writer.kill()
        acks.extend(writer.acks())
        pending = in_flight(acks, base, ids)
        found = restore_counters(data_dir)
        value_seqs: dict[str, list[int]] = defaultdict(list)
        for seq, entity_id, _ in found["value_rows"]:
            value_seqs[entity_id].append(seq)
        acked_seqs: dict[str, list[int]] = defaultdict(list)
        for ack in [*acks, Ack(*pending, len(acks) + 1)]:
            if ack.seq <= found["seq"]:
                acked_seqs[ack.id].append(ack.seq)

        check_restored(found, acks, pending, every_seq=False)
        for entity_id, seqs in value_seqs.items():
            assert seqs == acked_seqs[entity_id][-len(seqs) :], entity_id
        if found["seq"] > len(acks):
            acks.append(Ack(*pending, found["seq"]))

    assert len(found["value_rows"]) < found["seq"], "retention pruned nothing"


def test_sigkill_while_restoring_a_large_journal_then_restoring_again_loses_nothing(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED + 2)
    data_dir, ids, count = tmp_path / "data", 50, 25_000
    filled = _fill_and_kill(tmp_path, data_dir, ids, count)
    (journal,) = list_journals(data_dir)
    with journal.open("ab") as torn:
        torn.write(b"\x00\x00\x01\x00\xde\xad\xbe\xefhalf a rec")
    rehearsal = tmp_path / "rehearsal"
    shutil.copytree(data_dir, rehearsal)
    started = time.monotonic()
    with CrashWriter(tmp_path, "restore", rehearsal) as restorer:
        restorer.read_until(lambda line: line.startswith("ready "))
    restore_takes = time.monotonic() - started
    killed_mid_restore = 0

    for _ in range(4):
        with CrashWriter(tmp_path, "restore", data_dir) as restorer:
            time.sleep(rng.uniform(0.2, 0.95) * restore_takes)
            restorer.kill(may_have_ended=True)
        killed_mid_restore += not any(
            line.startswith("ready ") for line in restorer.lines
        )
    found = restore_counters(data_dir)

    assert filled[-2:] == [f"acked {count}", "held"]
    assert killed_mid_restore >= 1, "no kill landed during a restore"
    assert found["seq"] == count
    assert found["seqs"] == list(range(1, count + 1))
    assert found["value_rows"] == [(n + 1, f"e{n % ids}", n) for n in range(count)]
    assert found["values"] == {f"e{k}": count - ids + k for k in range(ids)}
    assert not found["damaged"]


# --- hostile input: the write path -------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("ENTITY_RUNTIME_FUZZ_EXAMPLES", "100"))
ACCEPT, REJECT, EITHER = "accept", "reject", "either"
MAX_ID = 1_024


class Shade(enum.IntEnum):
    DARK = 1


class Text(str):
    """A ``str`` subclass, as some libraries hand them out."""


class Real(float):
    """A ``float`` subclass."""


def combine(verdicts: list[str]) -> str:
    if REJECT in verdicts:
        return REJECT
    return EITHER if EITHER in verdicts else ACCEPT


def has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def verdict(value: Any, depth: int = 1, path: tuple[int, ...] = ()) -> str:
    """Whether the README says a field value is accepted.

    JSON-compatible values only (64-bit ints, finite floats, valid Unicode,
    lists, dicts with ``str`` keys), nested at most 64 levels; the exact
    boundary of "levels" is left open (``EITHER``) between 60 and 68.
    ``str`` subclasses are strings.
    """
    kind = type(value)
    if value is None or kind is bool:
        return ACCEPT
    if kind is int:
        return ACCEPT if -(2**63) <= value <= 2**64 - 1 else REJECT
    if kind is float:
        return ACCEPT if math.isfinite(value) else REJECT
    if isinstance(value, str):
        return REJECT if has_surrogate(value) else ACCEPT
    if not isinstance(value, list | dict) or id(value) in path:
        return REJECT
    if depth > 68:
        return REJECT
    inner = (*path, id(value))
    if isinstance(value, list):
        found = [verdict(v, depth + 1, inner) for v in value]
    else:
        found = [
            REJECT if type(k) is not str or has_surrogate(k) else ACCEPT for k in value
        ]
        found += [verdict(v, depth + 1, inner) for v in value.values()]
    if depth >= 60:
        found.append(EITHER)
    return combine(found)


def state_verdict(state: Any) -> str:
    if not isinstance(state, dict) or "value" not in state:
        return REJECT
    if set(state) - {"value", "label"}:
        return REJECT
    label = state.get("label", "")
    if not isinstance(label, str) or has_surrogate(label):
        return REJECT
    return verdict(state["value"])


def id_is_valid(entity_id: Any) -> bool:
    return (
        type(entity_id) is str
        and 0 < len(entity_id) <= MAX_ID
        and entity_id.isprintable()
    )


def canon(value: Any) -> Any:
    """A form that tells apart what ``==`` does not (1, 1.0, True; 0.0, -0.0)."""
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        return ("int", value)
    if type(value) is float:
        return ("float", value.hex())
    if isinstance(value, str):
        return ("str", str(value))
    if isinstance(value, list):
        return ("list", tuple(canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, canon(v)) for k, v in value.items())))
    raise AssertionError(f"not a stored value: {value!r}")


def nest(depth: int, shape: str) -> Any:
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if shape == "list" else {f"k{level}": value}
    return value


def cycle(shape: str) -> Any:
    if shape == "list":
        loop: list[Any] = [1]
        loop.append(loop)
        return loop
    if shape == "dict":
        ring: dict[str, Any] = {"a": 1}
        ring["self"] = ring
        return ring
    outer: dict[str, Any] = {"inner": [{"x": None}]}
    outer["inner"][0]["x"] = outer
    return outer


def mostly(usual: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """Draw from ``usual`` two times in three, else from ``hostile``."""
    return st.integers(0, 2).flatmap(lambda k: usual if k else hostile)


HUGE = 1_500_000
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["\ud800", "a\udfffb", "\x00\x1f\x7f", "\u2028\u200b", ""]),
    st.integers(1, HUGE).map(lambda n: "s" * n),
)
foreign = st.one_of(
    st.binary(max_size=4),
    st.tuples(st.integers()),
    st.frozensets(st.integers(), max_size=2),
    st.builds(object),
    st.just(datetime(2026, 1, 1, tzinfo=UTC)),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.complex_numbers(max_magnitude=10, allow_nan=False, allow_infinity=False),
    st.just(Shade.DARK),
    st.builds(Real, st.floats(-1, 1)),
    st.builds(Text, st.text(max_size=4)),
)
keys = st.one_of(
    st.text(max_size=6),
    st.text(max_size=6),
    st.integers(),
    st.none(),
    st.tuples(st.text(max_size=2)),
    st.builds(Text, st.text(max_size=3)),
    st.just("\udc00"),
)
values = st.recursive(
    st.one_of(scalars, scalars, foreign),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=12,
)
plain_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner)
    ),
    max_leaves=12,
)
field_values = mostly(
    plain_values,
    st.one_of(
        values,
        st.builds(nest, st.integers(1, 100), st.sampled_from(["list", "dict"])),
        st.builds(cycle, st.sampled_from(["list", "dict", "nested"])),
    ),
)
states = mostly(
    st.one_of(
        st.builds(lambda v: {"value": v}, field_values),
        st.builds(
            lambda v, label: {"value": v, "label": label},
            field_values,
            st.one_of(st.text(max_size=5), st.builds(Text, st.text(max_size=5))),
        ),
    ),
    st.one_of(
        st.builds(lambda v: {"value": v, "label": 7}, field_values),
        st.none(),
        st.lists(st.integers(), max_size=2),
        st.tuples(st.integers()),
        st.text(max_size=3),
        st.dictionaries(keys, scalars, max_size=3),
    ),
)


entity_ids = mostly(
    st.sampled_from(["b-1", "b-2", "b-3"]),
    st.one_of(
        st.text(min_size=1, max_size=12),
        st.sampled_from(
            ["", " ", "a\nb", "tab\tid", "\x00", "\u200b", "\ud800", "bell\x07"]
        ),
        st.integers(MAX_ID - 2, MAX_ID + 2).map(lambda n: "z" * n),
        st.integers(10_000, 200_000).map(lambda n: "i" * n),
        st.integers(),
        st.none(),
        st.binary(max_size=3),
    ),
)


def expected_state(state: dict[str, Any]) -> Any:
    return canon({"label": "", **state})


def stored_states(rt: Runtime, ids: list[str]) -> dict[str, Any]:
    blobs = rt.handle("blob")
    return {i: canon(blobs.get(i)) for i in ids}


def logged_states(rt: Runtime) -> dict[str, Any]:
    rebuilt = replay_rows(list(rt.log.changes_since(0)))
    return {key[1]: canon(history[-1]) for key, history in rebuilt.items()}


def blob_runtime(data_dir: Path) -> Runtime:
    rt = _keep_all_runtime(data_dir, stop_timeout=10.0)
    rt.define_entity("blob", Blob)
    return rt


def attempt(blobs: Any, entity_id: Any, state: Any) -> Any:
    """Write ``state``; return what ``mutate`` returned or the error it raised."""
    try:
        return blobs.mutate(entity_id, lambda prev: state)
    except (InvalidIdError, SchemaError) as err:
        return err


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(writes=st.lists(st.tuples(entity_ids, states), min_size=1, max_size=5))
@example(
    writes=[
        ("b-1", {"value": "h" * 4_000_000}),
        ("b-2", {"value": nest(63, "list"), "label": "deep"}),
        ("b-2", {"value": nest(64, "dict")}),
        ("b-2", {"value": nest(100, "list")}),
        ("b-3", {"value": [-0.0, 0.0, 1e308, 5e-324, 2**64 - 1, -(2**63)]}),
    ]
)
@example(
    writes=[
        ("b-1", {"value": {"nan": math.nan}}),
        ("b-1", {"value": [math.inf]}),
        ("b-1", {"value": {1: "int key"}}),
        ("b-1", {"value": cycle("nested")}),
        ("b-1", {"value": (1, 2)}),
        ("b-1", {"value": 2**64}),
        ("b-1", {"value": "lone \udc80"}),
        ("b-1", {"value": b"bytes"}),
    ]
)
@example(
    writes=[
        ("z" * MAX_ID, {"value": 1}),
        ("z" * (MAX_ID + 1), {"value": 1}),
        ("", {"value": 1}),
        ("ctl\x1b[31m", {"value": 1}),
        ("i" * 5_000_000, {"value": 1}),
        (42, {"value": 1}),
    ]
)
def test_hostile_writes_are_stored_exactly_or_refused_with_nothing_recorded(
    writes: list[tuple[Any, Any]],
) -> None:
    expected: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, journal_only = Path(tmp) / "data", Path(tmp) / "journal-only"
        rt = blob_runtime(data_dir)
        blobs = rt.handle("blob")
        try:
            rt.start()
            for entity_id, state in writes:
                valid_id, judged = id_is_valid(entity_id), state_verdict(state)
                before = (rt.log.last_seq, len(rt.log))
                outcome = attempt(blobs, entity_id, state)
                after = (rt.log.last_seq, len(rt.log))
                event(f"{type(outcome).__name__}")
                if isinstance(outcome, InvalidIdError):
                    assert not valid_id
                    assert (outcome.kind, bool(outcome.reason)) == ("blob", True)
                    assert "nothing recorded" in str(outcome)
                    assert len(str(outcome)) < 300
                    assert after == before
                elif isinstance(outcome, SchemaError):
                    assert valid_id
                    assert judged != ACCEPT, f"refused a valid state: {outcome}"
                    assert (outcome.kind, outcome.entity_id) == ("blob", entity_id)
                    assert outcome.reason
                    assert "nothing recorded" in str(outcome)
                    assert len(str(outcome)) < 2_000 + len(entity_id)
                    assert after == before
                    assert stored_states(rt, list(expected)) == expected
                else:
                    assert valid_id
                    assert judged != REJECT, f"accepted an invalid state {state!r}"
                    assert canon(outcome) == expected_state(state)
                    expected[entity_id] = expected_state(state)
                    assert stored_states(rt, list(expected)) == expected
                    assert logged_states(rt) == expected
            last_seq = rt.log.last_seq
            shutil.copytree(data_dir, journal_only)
        finally:
            rt.stop()

        for restored_from in (data_dir, journal_only):
            again = blob_runtime(restored_from)
            try:
                again.start()
                restored = (
                    again.log.last_seq,
                    stored_states(again, list(expected)),
                    logged_states(again),
                )
            finally:
                again.stop()

            assert restored == (last_seq, expected, expected)


class Colour(enum.StrEnum):
    RED = "red"


def test_a_str_subclass_is_accepted_in_any_field_as_in_a_str_field(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.start()
    in_a_str_field = tickets.mutate("t-1", lambda prev: ticket(tags=[Colour.RED]))

    in_an_any_field = tickets.mutate(
        "t-2", lambda prev: ticket(extra={"colour": Colour.RED})
    )

    assert type(in_a_str_field["tags"][0]) is str
    assert in_an_any_field["extra"] == {"colour": "red"}
    assert type(in_an_any_field["extra"]["colour"]) is str


# --- hostile input: the loaders, through the runtime ------------------------------

SAMPLE_WRITES = 30
NEWEST_JOURNAL = "journal-00000000000000000021.log"


def sample_state(n: int) -> dict[str, Any]:
    status = ("open", "working", "closed")[n % 3]
    return ticket(status=status, tags=[f"w{n}"], extra={"n": n})


def expected_at(seq: int) -> dict[str, Any]:
    """The ticket states after the first ``seq`` writes of ``build_sample``."""
    return {f"t-{n % 4}": sample_state(n) for n in range(seq)}


def build_sample(directory: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A data dir with two snapshots and two journals, copied from a live runtime.

    Writes 10 changes, a snapshot, 10 more, a snapshot, 10 more: the copy holds
    ``snapshot-10``, ``snapshot-20``, the journal from 11 (which snapshot-10
    needs) and the journal from 21 (the changes no snapshot holds).
    """
    live, sample_dir = directory / "live", directory / "sample"
    rt = _keep_all_runtime(live)
    tickets = rt.define_entity("ticket", Ticket)
    try:
        rt.start()
        for n in range(SAMPLE_WRITES):
            tickets.mutate(f"t-{n % 4}", lambda prev, n=n: sample_state(n))
            if n + 1 in (10, 20):
                rt.snapshot()
        rows = [r.to_dict() for batch in rt.log.changes_since(0) for r in batch]
        shutil.copytree(live, sample_dir)
    finally:
        rt.stop()
    return sample_dir, rows


def restore_tickets(
    data_dir: Path, **options: Any
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    rt = _keep_all_runtime(data_dir, **options)
    tickets = rt.define_entity("ticket", Ticket)
    try:
        rt.start()
        rt.log.check()
        return (
            rt.log.last_seq,
            {i: thaw(s) for i, s in tickets.get_many(tickets.ids()).items()},
            [r.to_dict() for batch in rt.log.changes_since(0) for r in batch],
        )
    finally:
        rt.stop()


def damage(data: bytes, how: str, where: int, junk: bytes, mask: int) -> bytes:
    if how == "truncate":
        return data[: where % (len(data) + 1)]
    if how == "flip" and data:
        changed = bytearray(data)
        changed[where % len(data)] ^= mask
        return bytes(changed)
    if how == "splice" and data:
        at = where % len(data)
        return data[:at] + junk + data[at + len(junk) :]
    if how == "append":
        return data + junk
    return junk


def start_with_deadline(data_dir: Path, seconds: float, **options: Any) -> Any:
    """Restore ``data_dir`` on a thread; return what it restored or raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["restored"] = restore_tickets(data_dir, **options)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"start() hung on {data_dir}"
    return outcome.get("restored", outcome.get("error"))


@pytest.mark.parametrize("recover_damaged", [False, True])
def test_damaged_files_in_a_data_dir_restore_a_valid_prefix_or_fail_clearly(
    tmp_path: Path, recover_damaged: bool
) -> None:
    sample_dir, rows = build_sample(tmp_path)
    files = sorted(p.name for p in sample_dir.iterdir() if p.name != "LOCK")
    targets = [
        *files,
        "snapshot-00000000000000000040.snap",
        "journal-00000000000000000025.log",
        "journal-00000000000000000031.log",
    ]
    rows_by_seq: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        rows_by_seq[row["seq"]].append(row)
    outcomes: Counter[str] = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    @given(
        target=st.sampled_from(targets),
        how=st.sampled_from(["truncate", "flip", "splice", "append", "replace"]),
        where=st.integers(min_value=0),
        junk=st.binary(max_size=64),
        mask=st.integers(1, 255),
    )
    def check(target: str, how: str, where: int, junk: bytes, mask: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "data"
            shutil.copytree(sample_dir, data_dir)
            path = data_dir / target
            original = path.read_bytes() if path.exists() else b""
            path.write_bytes(damage(original, how, where, junk, mask))

            found = start_with_deadline(data_dir, 30.0, recover_damaged=recover_damaged)
            if isinstance(found, BaseException):
                outcomes[type(found).__name__] += 1
                assert isinstance(found, DOCUMENTED_LOAD_ERRORS), repr(found)
                assert str(data_dir) in str(found)
                return
            seq, states, restored_rows = found
            again = start_with_deadline(data_dir, 30.0, recover_damaged=False)
            outcomes["restored"] += 1

            assert seq == SAMPLE_WRITES or (target == NEWEST_JOURNAL and seq >= 20)
            assert restored_rows == [
                r for s in range(1, seq + 1) for r in rows_by_seq[s]
            ]
            assert states == expected_at(seq)
            assert again == found

    assert files == [
        "journal-00000000000000000011.log",
        "journal-00000000000000000021.log",
        "snapshot-00000000000000000010.snap",
        "snapshot-00000000000000000020.snap",
    ]
    check()
    assert outcomes["restored"] > 0


GOOD_ROW = ["status", None, "open"]
GOOD_STATE = ticket()


def change_record(**changed: Any) -> dict[str, Any]:
    """A journal record of a well-formed change at seq 31, with fields replaced."""
    fields = {
        "seq": 31,
        "kind": "ticket",
        "id": "t-0",
        "ts": 1_767_225_600.0,
        "actor": "system",
        "run_id": None,
        "store_backed": True,
        "next": GOOD_STATE,
        "rows": [GOOD_ROW],
    }
    fields.update(changed)
    return {"c": list(fields.values())}


def snapshot_payload(**changed: Any) -> dict[str, Any]:
    """A snapshot payload at seq 40, with fields replaced."""
    return {"format": 1, "seq": 40, "kinds": {}, "changes": [], **changed}


def _plant(sample_dir: Path, where: str, payload: dict[str, Any]) -> None:
    """Add ``payload``, checksummed, as snapshot 40 or as the next journal record."""
    if where == "snapshot":
        write_snapshot(sample_dir, 40, payload)
    else:
        with JournalWriter(sample_dir, fsync="never") as journal:
            journal.append(payload)


@pytest.mark.parametrize(
    ("where", "payload"),
    [
        pytest.param("snapshot", {"format": 1, "seq": 40}, id="snapshot-no-kinds"),
        pytest.param(
            "snapshot", snapshot_payload(kinds="ticket"), id="snapshot-kinds-not-a-map"
        ),
        pytest.param(
            "snapshot", snapshot_payload(format="1"), id="snapshot-format-not-an-int"
        ),
        pytest.param(
            "snapshot",
            snapshot_payload(changes=[[41, "t"]]),
            id="snapshot-change-too-short",
        ),
        pytest.param(
            "snapshot",
            snapshot_payload(
                kinds={"ticket": {"store_backed": True, "states": ["t-0"]}}
            ),
            id="snapshot-states-not-a-map",
        ),
        pytest.param("journal", {"x": 1}, id="journal-record-without-change"),
        pytest.param(
            "journal", {"c": [31, "ticket", "t-0"]}, id="journal-change-too-short"
        ),
        pytest.param("journal", change_record(seq="31"), id="journal-seq-not-an-int"),
        pytest.param("journal", change_record(rows=[]), id="journal-change-no-rows"),
        pytest.param(
            "journal",
            change_record(ts="noon"),
            id="journal-time-not-a-number",
        ),
        pytest.param(
            "journal",
            change_record(ts=math.nan),
            id="journal-time-nan",
        ),
        pytest.param(
            "journal",
            change_record(ts=1e300),
            id="journal-time-out-of-range",
        ),
        pytest.param(
            "journal",
            change_record(rows=[["status", None, "open", "extra"]]),
            id="journal-row-of-four",
        ),
        pytest.param(
            "snapshot",
            snapshot_payload(
                changes=[[40, "ticket", "t-0", "noon", "system", None, [GOOD_ROW]]]
            ),
            id="snapshot-row-time-not-a-number",
        ),
    ],
)
def test_a_checksummed_file_of_the_wrong_shape_fails_start_with_a_documented_error(
    tmp_path: Path, where: str, payload: dict[str, Any]
) -> None:
    sample_dir, _ = build_sample(tmp_path)
    _plant(sample_dir, where, payload)

    found = start_with_deadline(sample_dir, 30.0)

    assert isinstance(found, DOCUMENTED_LOAD_ERRORS), repr(found)
    assert str(sample_dir) in str(found)


def malformed_restored(data_dir: Path) -> Any:
    """Start on ``data_dir``; return what is malformed in what it restored.

    Returns the error when ``start()`` refuses, else a list of problems: ids
    that are not valid, states that are not mappings, rows whose kind, id or
    field is not a string.
    """
    rt = Runtime(data_dir=data_dir, snapshot_every=None, snapshot_interval=None)
    rt.define_entity("ticket", Ticket)
    try:
        rt.start()
    except Exception as err:
        return err
    try:
        store = rt._engine("ticket").store
        problems = [
            f"id {i!r}" for i in store if not (isinstance(i, str) and id_is_valid(i))
        ]
        problems += [f"state {s!r}" for s in store.values() if not isinstance(s, dict)]
        problems += [
            f"row {r.seq}: {r.kind!r}/{r.id!r}/{r.field!r}"
            for rows in rt.log.changes_since(0)
            for r in rows
            if not isinstance(r.kind, str)
            or not isinstance(r.id, str)
            or not (r.tombstone or isinstance(r.field, str))
        ]
        return problems
    finally:
        rt.stop()


@pytest.mark.parametrize(
    ("where", "payload"),
    [
        pytest.param("journal", change_record(next="x"), id="journal-state-str"),
        pytest.param("journal", change_record(id=None), id="journal-id-none"),
        pytest.param("journal", change_record(kind=5), id="journal-kind-int"),
        pytest.param(
            "journal", change_record(rows=[[5, None, "open"]]), id="journal-field-int"
        ),
        pytest.param(
            "snapshot",
            snapshot_payload(
                kinds={"ticket": {"store_backed": True, "states": {"t-0": "x"}}}
            ),
            id="snapshot-state-str",
        ),
    ],
)
def test_a_checksummed_file_of_the_wrong_types_is_refused_not_restored(
    tmp_path: Path, where: str, payload: dict[str, Any]
) -> None:
    sample_dir, _ = build_sample(tmp_path)
    _plant(sample_dir, where, payload)

    found = malformed_restored(sample_dir)

    assert isinstance(found, DOCUMENTED_LOAD_ERRORS) or found == [], repr(found)


# --- faults: crashing or failing while recovering from damage ---------------


def corrupt_record(journal: Path, index: int) -> None:
    """Flip one byte in the body of the ``index``-th record of a journal file."""
    data = bytearray(journal.read_bytes())
    offset = JOURNAL_HEADER
    for _ in range(index):
        offset += FRAME_HEADER + int.from_bytes(data[offset : offset + 4], "big")
    data[offset + FRAME_HEADER + 1] ^= 0xFF
    journal.write_bytes(bytes(data))


def test_sigkill_while_recovering_from_a_damaged_journal_keeps_the_valid_prefix(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED + 3)
    ids, count, damaged_at = 50, 25_000, 20_000
    pristine = tmp_path / "pristine"
    _fill_and_kill(tmp_path, pristine, ids, count)
    (journal,) = list_journals(pristine)
    corrupt_record(journal, damaged_at)
    untouched = sorted(p.name for p in pristine.iterdir())
    found, files_at_kill, killed_mid_recovery = [], [], 0

    for round_no in range(3):
        data_dir = tmp_path / f"data-{round_no}"
        shutil.copytree(pristine, data_dir)
        with CrashWriter(
            tmp_path, "restore", data_dir, "--recover-damaged"
        ) as restorer:
            touched = wait_for(
                lambda d=data_dir: sorted(p.name for p in d.iterdir()) != untouched,
                timeout=30.0,
            )
            time.sleep(0 if round_no == 0 else rng.uniform(0, 0.1))
            restorer.kill(may_have_ended=True)
        files_at_kill.append(sorted(p.name for p in data_dir.iterdir()))
        killed_mid_recovery += touched and not restorer.lines
        found.append(restore_counters(data_dir, recover_damaged=True))

    assert killed_mid_recovery >= 1, files_at_kill
    for after_kill in found:
        assert after_kill["seq"] == damaged_at, files_at_kill
        assert after_kill["seqs"] == list(range(1, damaged_at + 1))
        assert after_kill["values"] == {
            f"e{k}": damaged_at - ids + k for k in range(ids)
        }


def test_a_start_whose_fresh_snapshot_fails_after_damage_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample_dir, _ = build_sample(tmp_path)
    newest = sample_dir / "snapshot-00000000000000000020.snap"
    newest.write_bytes(newest.read_bytes()[:-1] + b"?")
    real_write = durability.write_snapshot

    def full_disk(directory: Any, *args: Any, **kwargs: Any) -> Any:
        raise DataDirError(
            directory, "could not write the snapshot", OSError(28, "No space")
        )

    rt = Runtime(data_dir=sample_dir, snapshot_every=None, snapshot_interval=None)
    rt.define_entity("ticket", Ticket)
    monkeypatch.setattr(durability, "write_snapshot", full_disk)
    try:
        with pytest.raises(DataDirError):
            rt.start()
        monkeypatch.setattr(durability, "write_snapshot", real_write)
        retried = attempt_start(rt)
    finally:
        rt.stop()
        if rt._data_dir is not None:
            rt._data_dir.close()

    assert retried == SAMPLE_WRITES, repr(retried)


def attempt_start(rt: Runtime) -> Any:
    """Start ``rt``; return the restored sequence number or the error raised."""
    try:
        rt.start()
    except Exception as err:
        return err
    return rt.log.last_seq


# --- secrets ------------------------------------------------------------------------

TOKEN = "sk-live-4f9a8b7c"


def test_no_secret_reaches_a_metric_label_or_the_loopback_metrics_endpoint(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])

    def tag_events(change: EntityChanged) -> list[str]:
        return [f"tag.{tag}" for tag in (change.next or {}).get("tags", [])]

    def refuse(change: EntityChanged) -> None:
        raise RuntimeError(f"cannot deliver {dict(change.next or {})}")

    def leak(prev: Any) -> Any:
        raise ValueError(f"token {TOKEN} rejected")

    rt.register_change_deriver("ticket", tag_events)
    rt.on_entity_changed(
        "ticket", refuse, delivery=work_queue("notify", max_attempts=1, backoff=0)
    )
    rt.start()
    host, port = rt.serve_metrics(port=0)
    secret_state = ticket(tags=[TOKEN, f"x-{TOKEN}"], extra={TOKEN: TOKEN})
    tickets.mutate("t-1", lambda prev: secret_state, run_id="run-1")
    with pytest.raises(InvalidIdError):
        tickets.mutate(f"id-{TOKEN}", lambda prev: ticket(), run_id="run-1")
    with pytest.raises(SchemaError):
        tickets.mutate("t-1", lambda prev: {"status": TOKEN}, run_id="run-1")
    with pytest.raises(ApplyError):
        tickets.mutate("t-2", leak, run_id="run-1")
    rt.drain()
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        served = connection.getresponse().read().decode()
    finally:
        connection.close()
    labels = [
        value
        for metric in rt.metrics_registry.collect()
        for s in metric.samples
        for value in s.labels.values()
    ]

    assert host == "127.0.0.1"
    assert [v for v in labels if TOKEN in v] == []
    assert TOKEN not in served
    assert sample(rt, "entity_runtime_triggers_total", event="tag.***") == 1
    assert sample(rt, "entity_runtime_triggers_total", event="tag.x-***") == 1
    assert sample(rt, "entity_runtime_dead_letters_total", worker_group="notify") == 1
    assert tickets.get("t-1") == secret_state
