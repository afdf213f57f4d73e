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
from collections.abc import Callable, Iterator
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

ROUNDS = 2_000
"""Timed rounds of the mutate scenarios (one mutation each)."""

WARMUP = 100
"""Untimed rounds before them."""

HISTORY_ROUNDS = 20_000
"""Timed ``history`` calls."""

LARGE_LOG_CHANGES = 250_000
"""Four-field changes in the large log: 1,000,000 rows (plus the creates)."""

LARGE_LOG_IDS = 10_000

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

    def next_apply(self) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
        """An ``apply`` that moves ``x-0`` one step on: a real change."""
        return functools.partial(item_state, next(self._steps))


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

    assert items.rt.log.last_seq == 1 + WARMUP + ROUNDS


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

    assert items.subscribers[0].count == 1 + WARMUP + ROUNDS


def test_mutate_derive_ten_subscribers(
    benchmark: Any, items_factory: Callable[..., _Items]
) -> None:
    """A changing ``mutate`` then ``drain()``: the deriver and 10 subscribers."""
    items = items_factory(subscribers=10, derive=True)

    def mutate_and_deliver() -> None:
        items.handle.mutate("x-0", items.next_apply())
        items.rt.drain()

    benchmark.pedantic(mutate_and_deliver, rounds=ROUNDS, warmup_rounds=WARMUP)

    assert [s.count for s in items.subscribers] == [1 + WARMUP + ROUNDS] * 10


def test_history_on_a_large_log(
    benchmark: Any, large_log: EntityHandle[WideState]
) -> None:
    """``history(id)`` answering 10 rows from a log of about 1,000,000 rows."""
    rows = benchmark.pedantic(
        large_log.history, args=(PROBE_ID,), rounds=HISTORY_ROUNDS, warmup_rounds=100
    )

    assert len(rows) == PROBE_ROWS
