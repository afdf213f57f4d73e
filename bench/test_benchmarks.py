"""pytest-benchmark scenarios of the runtime, one per function, with fixed sizes.

Outside the default test run; run them with::

    python -m pytest bench -p no:cacheprovider --benchmark-only

Each scenario runs a fixed number of rounds (one operation per round) after a
few warm-up rounds, so results of two runs compare; save a baseline with
``--benchmark-autosave`` and compare with ``--benchmark-compare``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench._modes import PROBE_ID, PROBE_ROWS, build_large_log
from bench._workload import (
    KIND,
    CountingDeriver,
    CountingSubscriber,
    ItemState,
    WideState,
    item_state,
)
from runtime import EntityHandle, Runtime

logger = logging.getLogger(__name__)

QUICK = os.environ.get("ENTITY_RUNTIME_BENCH_QUICK") == "1"
"""Tiny sizes, only to check that every scenario still runs (the test suite)."""

ROUNDS = 20 if QUICK else 2_000
"""Timed rounds of the mutate scenarios (one mutation each)."""

WARMUP = 2 if QUICK else 100
"""Untimed rounds before them."""

HISTORY_ROUNDS = 100 if QUICK else 20_000
"""Timed ``history`` calls."""

LARGE_LOG_CHANGES = 2_500 if QUICK else 250_000
"""Four-field changes in the large log: 1,000,000 rows (plus the creates)."""

LARGE_LOG_IDS = 100 if QUICK else 10_000

BATCH = 100
"""``(id, apply)`` pairs per ``mutate_many`` call."""

STORE_ENTITIES = 500 if QUICK else 100_000
"""Entities in the store that the snapshot and restore scenarios write and read."""

PERSISTENCE_ROUNDS = 3 if QUICK else 10

Handle = EntityHandle[ItemState]


class _Items:
    """A started runtime with the item kind, one created item and its consumers."""

    def __init__(self, subscribers: int, derive: bool) -> None:
        self.rt = Runtime(mailbox_size=ROUNDS + WARMUP + 10)
        self.handle: Handle = self.rt.define_entity(KIND, ItemState)
        self.deriver = CountingDeriver()
        if derive:
            self.rt.register_change_deriver(KIND, self.deriver)
        self.subscribers = [
            CountingSubscriber(window=1_000) for _ in range(subscribers)
        ]
        for number, subscriber in enumerate(self.subscribers):
            self.rt.on_entity_changed(KIND, subscriber, name=f"counter-{number}")
        self.rt.start()
        self.handle.mutate("x-0", functools.partial(item_state, 0))
        self._steps = itertools.count(1)
        self.steps_taken = 0
        """Steps made so far (rounds run; one when benchmarks are disabled)."""

    def next_apply(self) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
        """An ``apply`` that moves ``x-0`` one step on: a real change."""
        self.steps_taken = next(self._steps)
        return functools.partial(item_state, self.steps_taken)


@pytest.fixture
def items_factory() -> Iterator[Callable[..., _Items]]:
    """Build item runtimes; every one is stopped after the scenario."""
    built: list[_Items] = []

    def build(subscribers: int = 0, derive: bool = False) -> _Items:
        built.append(_Items(subscribers, derive))
        return built[-1]

    yield build
    for items in built:
        items.rt.stop()


@pytest.fixture(scope="module")
def large_log() -> EntityHandle[WideState]:
    """A stopped runtime whose log holds about 1,000,000 rows; its handle."""
    _rt, handle, _rows = build_large_log(LARGE_LOG_CHANGES, LARGE_LOG_IDS)
    return handle


def test_mutate_changed(benchmark: Any, items_factory: Callable[..., _Items]) -> None:
    """A blocking ``mutate`` that changes two or three fields; no consumers."""
    items = items_factory()

    benchmark.pedantic(
        lambda: items.handle.mutate("x-0", items.next_apply()),
        rounds=ROUNDS,
        warmup_rounds=WARMUP,
    )

    assert items.rt.log.last_seq == 1 + items.steps_taken


def test_mutate_unchanged(benchmark: Any, items_factory: Callable[..., _Items]) -> None:
    """A blocking ``mutate`` whose state is unchanged: records and emits nothing."""
    items = items_factory(subscribers=1, derive=True)
    same = functools.partial(item_state, 0)

    benchmark.pedantic(
        lambda: items.handle.mutate("x-0", same), rounds=ROUNDS, warmup_rounds=WARMUP
    )

    items.rt.drain()
    assert items.rt.log.last_seq == 1
    assert items.subscribers[0].count == 1


def test_mutate_derive_one_subscriber(
    benchmark: Any, items_factory: Callable[..., _Items]
) -> None:
    """A changing ``mutate`` then ``drain()``: through the deriver and 1 subscriber."""
    items = items_factory(subscribers=1, derive=True)

    def mutate_and_deliver() -> None:
        items.handle.mutate("x-0", items.next_apply())
        items.rt.drain()

    benchmark.pedantic(mutate_and_deliver, rounds=ROUNDS, warmup_rounds=WARMUP)

    assert items.subscribers[0].count == 1 + items.steps_taken


def test_mutate_derive_ten_subscribers(
    benchmark: Any, items_factory: Callable[..., _Items]
) -> None:
    """A changing ``mutate`` then ``drain()``: the deriver and 10 subscribers."""
    items = items_factory(subscribers=10, derive=True)

    def mutate_and_deliver() -> None:
        items.handle.mutate("x-0", items.next_apply())
        items.rt.drain()

    benchmark.pedantic(mutate_and_deliver, rounds=ROUNDS, warmup_rounds=WARMUP)

    assert [s.count for s in items.subscribers] == [1 + items.steps_taken] * 10


def test_history_on_a_large_log(
    benchmark: Any, large_log: EntityHandle[WideState]
) -> None:
    """``history(id)`` answering 10 rows from a log of about 1,000,000 rows."""
    rows = benchmark.pedantic(
        large_log.history, args=(PROBE_ID,), rounds=HISTORY_ROUNDS, warmup_rounds=100
    )

    assert len(rows) == PROBE_ROWS


def test_mutate_many_through_derive_and_one_subscriber(
    benchmark: Any, items_factory: Callable[..., _Items]
) -> None:
    """One ``mutate_many`` of 100 ids, then ``drain()``: deriver and 1 subscriber."""
    items = items_factory(subscribers=1, derive=True)
    steps = itertools.count(1)
    calls = []

    def batch_and_deliver() -> None:
        step = next(steps)
        items.handle.mutate_many(
            [(f"x-{i}", functools.partial(item_state, step)) for i in range(BATCH)]
        )
        items.rt.drain()
        calls.append(step)

    benchmark.pedantic(batch_and_deliver, rounds=ROUNDS, warmup_rounds=WARMUP)

    assert items.subscribers[0].count == 1 + len(calls) * BATCH


def _fill_store(data_dir: Path) -> Runtime:
    rt = Runtime(data_dir=data_dir, snapshot_every=None, snapshot_interval=None)
    handle = rt.define_entity(KIND, ItemState)
    rt.start()
    for start in range(0, STORE_ENTITIES, 1_000):
        handle.mutate_many(
            [
                (f"x-{i}", functools.partial(item_state, 0))
                for i in range(start, min(start + 1_000, STORE_ENTITIES))
            ]
        )
    return rt


def test_snapshot_of_a_large_store(benchmark: Any, tmp_path: Path) -> None:
    """``snapshot()`` of 100,000 entities and their rows, one change apart."""
    rt = _fill_store(tmp_path / "data")
    handle: Handle = rt.handle(KIND)
    steps = itertools.count(1)

    def change_one() -> tuple[tuple[()], dict[str, Any]]:
        handle.mutate("x-0", functools.partial(item_state, next(steps)))
        return (), {}

    try:
        path = benchmark.pedantic(
            rt.snapshot, setup=change_one, rounds=PERSISTENCE_ROUNDS, warmup_rounds=1
        )
    finally:
        rt.stop()

    assert path is not None
    assert path.exists()


def test_restore_of_a_large_store(benchmark: Any, tmp_path: Path) -> None:
    """Starting a runtime on a data dir of 100,000 entities (snapshot + journal)."""
    data_dir = tmp_path / "data"
    filled = _fill_store(data_dir)
    filled.snapshot()
    filled.handle(KIND).mutate("x-0", functools.partial(item_state, 1))
    filled.stop()

    def restore() -> int:
        rt = Runtime(data_dir=data_dir, snapshot_every=None, snapshot_interval=None)
        handle: Handle = rt.define_entity(KIND, ItemState)
        rt.start()
        try:
            return len(handle.ids())
        finally:
            rt.stop()

    restored = benchmark.pedantic(restore, rounds=PERSISTENCE_ROUNDS, warmup_rounds=1)

    assert restored == STORE_ENTITIES
