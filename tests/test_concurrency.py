"""The runtime under concurrent writers, writing subscribers, slow consumers and stop.

Every test synchronises on events and joins with timeouts; nothing asserts on
how long something took. Randomness comes from fixed seeds.
"""

from __future__ import annotations

import functools
import itertools
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from runtime import (
    DeliveryTimeoutError,
    EntityChanged,
    MutationFuture,
    ReentrantCallError,
    Runtime,
    RuntimeStoppedError,
    work_queue,
)

SEED = 20260101
JOIN_TIMEOUT = 60.0


@dataclass
class Tally:
    """A counter that also remembers who incremented it, in commit order."""

    count: int
    writers: list[str] = field(default_factory=list)


@dataclass
class Step:
    """How far an entity has progressed."""

    step: int


@dataclass
class Trail:
    """An append-only list of observations."""

    items: list[Any] = field(default_factory=list)


class Recorder:
    """A thread-safe list of what a handler saw, with an event at a target count."""

    def __init__(self, target: int | None = None) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []
        self.target = target
        self.reached = threading.Event()

    def add(self, item: Any) -> None:
        with self.lock:
            self.items.append(item)
            if self.target is not None and len(self.items) >= self.target:
                self.reached.set()

    def snapshot(self) -> list[Any]:
        with self.lock:
            return list(self.items)


def increment(tag: str, prev: dict[str, Any] | None) -> dict[str, Any]:
    """Read-modify-write: one more, and who did it.

    Sleeping between the read and the write hands the GIL to other threads, so
    two writers that were not serialised would both build on the same ``prev``.
    """
    prev = prev or {"count": 0, "writers": []}
    time.sleep(0)
    return {"count": prev["count"] + 1, "writers": [*prev["writers"], tag]}


def run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    """Run each target on its own thread, released together; return their errors."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            target()
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=(t,), name=f"writer-{i}")
        for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert not [t.name for t in threads if t.is_alive()], "writer threads hung"
    return errors


def wait_for(condition: Callable[[], bool]) -> bool:
    """Poll ``condition`` until it holds; False after ``JOIN_TIMEOUT`` seconds."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def assert_chained_in_order(changes: list[EntityChanged]) -> None:
    """Per id: seqs increase and each prev is the previous change's next."""
    last: dict[str, EntityChanged] = {}
    for change in changes:
        before = last.get(change.id)
        if before is None:
            assert change.prev is None, change
        else:
            assert change.seq > before.seq, (before.seq, change.seq)
            assert change.prev == before.next, change.seq
        last[change.id] = change


@pytest.fixture
def make_runtime() -> Iterator[Callable[..., Runtime]]:
    """Build runtimes that are all stopped after the test."""
    made: list[Runtime] = []

    def make(**kwargs: Any) -> Runtime:
        kwargs.setdefault("stop_timeout", 20.0)
        runtime = Runtime(**kwargs)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.stop()


@pytest.mark.parametrize("shards", [1, 3])
def test_concurrent_read_modify_writes_lose_nothing_and_reach_every_consumer_once(
    make_runtime: Callable[..., Runtime], shards: int
) -> None:
    ids = [f"c{i}" for i in range(4)]
    threads, ops = 8, 400
    total = threads * ops
    rt = make_runtime()
    tallies = rt.define_entity("tally", Tally, shards=shards)
    subscribers = [Recorder() for _ in range(3)]
    for recorder in subscribers:
        rt.on_entity_changed("tally", recorder.add)
    queue_workers = [Recorder(), Recorder()]
    for recorder in queue_workers:
        rt.on_entity_changed("tally", recorder.add, work_queue("tally-workers"))
    rt.register_change_deriver(
        "tally",
        lambda c: ["tally.bumped", *([] if c.next["count"] % 10 else ["tally.tenth"])],
    )
    bumped, tenth = Recorder(), Recorder()
    rt.on_trigger("tally.bumped", lambda event, payload, c: bumped.add(c))
    rt.on_trigger("tally.tenth", lambda event, payload, c: tenth.add(c))
    rt.start()
    submitted: dict[str, Counter[str]] = {}

    def writer(index: int) -> None:
        rng = random.Random(SEED + index)
        name = f"w{index}"
        per_id: Counter[str] = Counter()
        futures: list[MutationFuture[Any]] = []
        for _ in range(ops):
            entity_id = rng.choice(ids)
            apply = functools.partial(increment, f"{name}:{per_id[entity_id]}")
            per_id[entity_id] += 1
            if rng.random() < 0.5:
                tallies.mutate(entity_id, apply)
            else:
                futures.append(tallies.mutate_async(entity_id, apply))
        for future in futures:
            future.get(timeout=JOIN_TIMEOUT)
        submitted[name] = per_id

    errors = run_threads([functools.partial(writer, i) for i in range(threads)])
    rt.drain(timeout=30)

    assert errors == []
    every_seq = list(range(1, total + 1))
    assert [batch[0].seq for batch in rt.log.changes_since(0)] == every_seq
    assert rt.log.last_seq == total
    rt.log.check()
    for entity_id in ids:
        state = tallies.get(entity_id)
        expected = sum(per_id[entity_id] for per_id in submitted.values())
        assert state is not None
        assert state["count"] == expected
        assert len(state["writers"]) == expected
        for name in submitted:
            tags = [t for t in state["writers"] if t.split(":")[0] == name]
            assert tags == [f"{name}:{k}" for k in range(submitted[name][entity_id])]
        counts = [row.after for row in tallies.history(entity_id, "count")]
        assert counts == list(range(1, expected + 1))
    for recorder in subscribers:
        seen = recorder.snapshot()
        assert sorted(c.seq for c in seen) == every_seq
        assert_chained_in_order(seen)
        assert all(c.next["count"] == c.prev["count"] + 1 for c in seen if c.prev)
    shared = [c for recorder in queue_workers for c in recorder.snapshot()]
    assert sorted(c.seq for c in shared) == every_seq
    for recorder in queue_workers:
        assert_chained_in_order(recorder.snapshot())
    assert sorted(c.seq for c in bumped.snapshot()) == every_seq
    by_seq = {c.seq: c for c in subscribers[0].snapshot()}
    tenths = sorted(s for s, c in by_seq.items() if c.next["count"] % 10 == 0)
    assert sorted(c.seq for c in tenth.snapshot()) == tenths


def test_subscribers_writing_other_kinds_the_same_kind_and_the_same_id_all_land(
    make_runtime: Callable[..., Runtime],
) -> None:
    last_step, threads, per_thread = 5, 4, 5
    order_ids = [f"o{t}-{i}" for t in range(threads) for i in range(per_thread)]
    rt = make_runtime()
    orders = rt.define_entity("order", Step)
    audits = rt.define_entity("audit", Trail)

    def advance_same_id(change: EntityChanged) -> None:
        if change.next is None or change.id.endswith("~copy"):
            return
        if change.next["step"] < last_step:
            orders.mutate(change.id, lambda prev: {"step": prev["step"] + 1})

    def mirror_to_same_kind(change: EntityChanged) -> None:
        if change.next is None or change.id.endswith("~copy"):
            return
        step = change.next["step"]
        orders.mutate_async(f"{change.id}~copy", lambda prev: {"step": step})

    def audit_other_kind(change: EntityChanged) -> None:
        if change.next is None or change.id.endswith("~copy"):
            return
        step = change.next["step"]
        audits.mutate(
            change.id, lambda prev: {"items": [*(prev or {"items": []})["items"], step]}
        )

    def record_finished(event: str, payload: Any, change: EntityChanged) -> None:
        audits.mutate(
            "finished",
            lambda prev: {"items": [*(prev or {"items": []})["items"], change.id]},
        )

    rt.on_entity_changed("order", advance_same_id)
    rt.on_entity_changed("order", mirror_to_same_kind)
    rt.on_entity_changed("order", audit_other_kind)
    rt.register_change_deriver(
        "order",
        lambda c: (
            ["order.finished"]
            if c.next is not None
            and c.next["step"] == last_step
            and not c.id.endswith("~copy")
            else []
        ),
    )
    rt.on_trigger("order.finished", record_finished)
    rt.start()

    def create_orders(t: int) -> None:
        for i in range(per_thread):
            orders.mutate(f"o{t}-{i}", lambda prev: {"step": 0})

    errors = run_threads([functools.partial(create_orders, t) for t in range(threads)])
    for order_id in order_ids:
        orders.wait_until(order_id, lambda s: s == {"step": last_step}, timeout=30)
    audits.wait_until(
        "finished", lambda s: s is not None and len(s["items"]) == len(order_ids), 30
    )
    rt.drain(timeout=30, until_idle=True)

    assert errors == []
    for order_id in order_ids:
        assert orders.get(order_id) == {"step": last_step}
        assert orders.get(f"{order_id}~copy") == {"step": last_step}
        assert audits.get(order_id) == {"items": list(range(last_step + 1))}
    assert sorted(audits.get("finished")["items"]) == sorted(order_ids)
    expected_changes = len(order_ids) * (last_step + 1) * 3 + len(order_ids)
    assert rt.log.last_seq == expected_changes
    seqs = [batch[0].seq for batch in rt.log.changes_since(0)]
    assert seqs == list(range(1, expected_changes + 1))


def test_a_blocked_subscriber_holds_up_neither_the_writer_nor_other_consumers(
    make_runtime: Callable[..., Runtime],
) -> None:
    changes = 60
    rt = make_runtime()
    tallies = rt.define_entity("tally", Tally)
    release, entered = threading.Event(), threading.Event()
    slow, fast, triggered = Recorder(), Recorder(changes), Recorder(changes)

    def slow_handler(change: EntityChanged) -> None:
        slow.add(change)
        entered.set()
        release.wait(JOIN_TIMEOUT)

    rt.on_entity_changed("tally", slow_handler)
    rt.on_entity_changed("tally", fast.add)
    rt.register_change_deriver("tally", lambda change: ["tally.bumped"])
    rt.on_trigger("tally.bumped", lambda event, payload, c: triggered.add(c))
    rt.start()

    try:
        tallies.mutate("t0", functools.partial(increment, "main"))
        assert entered.wait(JOIN_TIMEOUT)
        for i in range(1, changes):
            tallies.mutate(f"t{i % 3}", functools.partial(increment, "main"))
        written_while_blocked = not release.is_set()
        fast_done = fast.reached.wait(JOIN_TIMEOUT)
        triggers_done = triggered.reached.wait(JOIN_TIMEOUT)
        slow_seen_while_blocked = [c.seq for c in slow.snapshot()]
        with pytest.raises(DeliveryTimeoutError, match="slow_handler"):
            rt.drain(timeout=0.2)
    finally:
        release.set()
    rt.drain(timeout=30)

    assert written_while_blocked
    assert fast_done
    assert triggers_done
    assert slow_seen_while_blocked == [1]
    assert [c.seq for c in fast.snapshot()] == list(range(1, changes + 1))
    assert [c.seq for c in slow.snapshot()] == list(range(1, changes + 1))
    assert_chained_in_order(slow.snapshot())


def test_a_subscriber_past_its_mailbox_bound_gets_folded_changes_that_still_chain(
    make_runtime: Callable[..., Runtime],
) -> None:
    changes, ids = 80, ["a", "b", "c"]
    rt = make_runtime(mailbox_size=4)
    tallies = rt.define_entity("tally", Tally)
    release, entered = threading.Event(), threading.Event()
    slow = Recorder()

    def slow_handler(change: EntityChanged) -> None:
        slow.add(change)
        entered.set()
        release.wait(JOIN_TIMEOUT)

    rt.on_entity_changed("tally", slow_handler)
    rt.start()
    rng = random.Random(SEED)

    try:
        tallies.mutate("a", functools.partial(increment, "main"))
        assert entered.wait(JOIN_TIMEOUT)
        for _ in range(changes - 1):
            tallies.mutate(rng.choice(ids), functools.partial(increment, "main"))
    finally:
        release.set()
    rt.drain(timeout=30)

    seen = slow.snapshot()
    folded = sum(
        sample.value
        for metric in rt.metrics_registry.collect()
        if metric.name == "entity_runtime_coalesced"
        for sample in metric.samples
        if sample.name == "entity_runtime_coalesced_total"
    )
    assert len(seen) < changes
    assert folded > 0
    assert_chained_in_order(seen)
    for entity_id in ids:
        last = [c for c in seen if c.id == entity_id][-1]
        assert last.next == tallies.get(entity_id)
        assert last.seq == tallies.history(entity_id)[-1].seq


def test_stop_while_writers_write_finishes_or_refuses_each_write_and_delivers_all(
    make_runtime: Callable[..., Runtime],
) -> None:
    ids = [f"s{i}" for i in range(5)]
    threads, safety_cap = 6, 200_000
    rt = make_runtime(mailbox_size=1_000_000, stop_timeout=30.0)
    tallies = rt.define_entity("tally", Tally)
    echoes = rt.define_entity("echo", Step)
    seen, echoed = Recorder(target=100), Recorder()
    echo_refused = Recorder()

    def echo_each_change(change: EntityChanged) -> None:
        seen.add(change.seq)
        try:
            echoes.mutate(change.id, lambda prev: {"step": change.next["count"]})
        except RuntimeStoppedError:
            echo_refused.add(change.seq)

    rt.on_entity_changed("tally", echo_each_change)
    rt.on_entity_changed("echo", lambda change: echoed.add(change.seq))
    rt.start()
    landed: dict[str, Counter[str]] = {}
    refused = Recorder()

    def writer(index: int) -> None:
        rng = random.Random(SEED + index)
        done: Counter[str] = Counter()
        futures: list[tuple[str, MutationFuture[Any]]] = []
        for k in itertools.count():
            assert k < safety_cap, "stop() never refused a write"
            entity_id = rng.choice(ids)
            apply = functools.partial(increment, f"w{index}")
            try:
                if k % 3 == 0:
                    futures.append((entity_id, tallies.mutate_async(entity_id, apply)))
                else:
                    tallies.mutate(entity_id, apply)
                    done[entity_id] += 1
            except RuntimeStoppedError:
                refused.add(index)
                break
        for entity_id, future in futures:
            try:
                future.get(timeout=JOIN_TIMEOUT)
                done[entity_id] += 1
            except RuntimeStoppedError:
                refused.add(index)
        landed[f"w{index}"] = done

    at_stop: dict[str, Any] = {}

    def stopper() -> None:
        assert seen.reached.wait(JOIN_TIMEOUT)
        at_stop["report"] = rt.stop()
        at_stop["tally_seqs"] = seen.snapshot()
        at_stop["echo_seqs"] = echoed.snapshot()

    errors = run_threads(
        [*(functools.partial(writer, i) for i in range(threads)), stopper]
    )

    assert errors == []
    assert at_stop["report"].clean, at_stop["report"]
    assert set(refused.snapshot()) == set(range(threads))
    tally_seqs, echo_seqs = at_stop["tally_seqs"], at_stop["echo_seqs"]
    assert len(tally_seqs) == len(set(tally_seqs))
    assert sorted(tally_seqs + echo_seqs) == list(range(1, rt.log.last_seq + 1))
    assert echo_refused.snapshot() == []
    assert len(echo_seqs) == len(tally_seqs)
    rt.log.check()
    for entity_id in ids:
        state = tallies.get(entity_id)
        count = 0 if state is None else state["count"]
        assert count == sum(done[entity_id] for done in landed.values())


def test_stop_from_a_subscriber_is_refused_and_leaves_the_owner_able_to_stop(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime()
    tallies = rt.define_entity("tally", Tally)
    refusals = Recorder(target=1)

    def stop_from_handler(change: EntityChanged) -> None:
        try:
            rt.stop()
        except ReentrantCallError as err:
            refusals.add(err)

    rt.on_entity_changed("tally", stop_from_handler)
    rt.start()

    tallies.mutate("t", functools.partial(increment, "main"))
    refused_in_handler = refusals.reached.wait(JOIN_TIMEOUT)
    report = rt.stop()

    assert refused_in_handler
    assert report.clean
    assert not rt.running
    with pytest.raises(RuntimeStoppedError):
        tallies.mutate("t", functools.partial(increment, "after-stop"))


def test_a_second_stop_during_the_first_waits_for_it_and_shares_its_report(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime()
    tallies = rt.define_entity("tally", Tally)
    release, entered = threading.Event(), threading.Event()
    delivered = Recorder()

    def slow_handler(change: EntityChanged) -> None:
        entered.set()
        release.wait(JOIN_TIMEOUT)
        delivered.add(change.seq)

    rt.on_entity_changed("tally", slow_handler)
    rt.start()
    tallies.mutate("t", functools.partial(increment, "main"))
    assert entered.wait(JOIN_TIMEOUT)
    first: dict[str, Any] = {}
    first_stop = threading.Thread(target=lambda: first.update(report=rt.stop()))
    first_stop.start()
    assert wait_for(lambda: not rt.running)
    # The release comes later than the second stop() call below in practice;
    # the assertions hold whichever comes first.
    releaser = threading.Timer(0.3, release.set)
    releaser.start()

    try:
        second = rt.stop()
        released_before_second_returned = release.is_set()
        delivered_before_second_returned = delivered.snapshot()
    finally:
        release.set()
        releaser.cancel()
        first_stop.join(JOIN_TIMEOUT)

    assert released_before_second_returned
    assert delivered_before_second_returned == [1]
    assert not first_stop.is_alive()
    assert second is first["report"]
    assert second.clean


def test_drain_waits_for_every_change_already_visible_in_the_log(
    make_runtime: Callable[..., Runtime],
) -> None:
    rt = make_runtime()
    tallies = rt.define_entity("tally", Tally)
    delivered: set[int] = set()
    delivered_lock = threading.Lock()

    def record(change: EntityChanged) -> None:
        with delivered_lock:
            delivered.add(change.seq)

    rt.on_entity_changed("tally", record)
    rt.start()
    writing = threading.Event()

    def writer(index: int) -> None:
        for k in itertools.count():
            if not writing.is_set():
                return
            tallies.mutate_async(f"d{index}-{k % 7}", functools.partial(increment, "w"))
            if k % 50 == 0:
                tallies.mutate(f"d{index}", functools.partial(increment, "w"))

    writing.set()
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    switch_interval = sys.getswitchinterval()
    # A fine thread interleaving widens the window between the rows of a change
    # becoming visible and its delivery being registered.
    sys.setswitchinterval(1e-5)
    missed: list[int] = []

    try:
        for thread in writers:
            thread.start()
        assert wait_for(lambda: rt.log.last_seq >= 200)
        enough = rt.log.last_seq + 10_000
        while not missed and rt.log.last_seq < enough:
            assert all(thread.is_alive() for thread in writers)
            visible = rt.log.last_seq
            rt.drain(timeout=10)
            with delivered_lock:
                if visible not in delivered:
                    missed.append(visible)
    finally:
        sys.setswitchinterval(switch_interval)
        writing.clear()
        for thread in writers:
            thread.join(JOIN_TIMEOUT)

    assert missed == []
