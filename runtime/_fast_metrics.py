from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class PerThreadCells:
    """Slots that each thread updates alone, summed when scraped.

    Updating a slot takes no lock: only its own thread ever writes it, so no
    increment is lost, and a scrape sums the slots (a value read mid-update is
    at most one update behind). A thread that ends leaves its slot, so counts
    never go down.
    """

    __slots__ = ("_local", "_lock", "_size", "slots")

    def __init__(self, size: int) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._size = size
        self.slots: list[list[float]] = []

    def mine(self) -> list[float]:
        slot: list[float] | None = getattr(self._local, "slot", None)
        if slot is None:
            slot = [0.0] * self._size
            self._local.slot = slot
            with self._lock:
                self.slots.append(slot)
        return slot

    def total(self) -> list[float]:
        with self._lock:
            slots = list(self.slots)
        sums = [0.0] * self._size
        for slot in slots:
            for i, value in enumerate(slot):
                sums[i] += value
        return sums


class _CounterChild:
    __slots__ = ("_base", "_cells", "_index")

    def __init__(self) -> None:
        self._cells = PerThreadCells(1)
        self._index = 0
        self._base = 0.0

    def inc(self, amount: float = 1) -> None:
        self._cells.mine()[self._index] += amount

    def value(self) -> float:
        return self._base + self._cells.total()[self._index]


def link_counters(*children: _CounterChild) -> PerThreadCells:
    """Back several counter children with one set of per-thread slots.

    Code that bumps the children together then finds its thread's slot once
    (``cells = linked.mine()``) and adds to ``cells[i]`` for the i-th child;
    the children's own ``inc`` and their scraped values keep working, and
    counts they had before linking are kept.
    """
    linked = PerThreadCells(len(children))
    for index, child in enumerate(children):
        child._base = child.value()
        child._cells = linked
        child._index = index
    return linked


class FastCounter(Collector):
    """A counter for hot paths: no lock per increment (see ``PerThreadCells``).

    Exposed like a ``prometheus_client`` counter (``<name>_total``); children
    are created by ``labels(...)`` and cached, so hot code binds them once.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}
        self._lock = threading.Lock()
        if not self._labelnames:
            self._children[()] = _CounterChild()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: Any, **named: Any) -> _CounterChild:
        key = (
            tuple(str(named[n]) for n in self._labelnames)
            if named
            else tuple(str(v) for v in values)
        )
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, _CounterChild())
        return child

    def inc(self, amount: float = 1) -> None:
        self._children[()].inc(amount)

    def describe(self) -> list[Any]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            self._name, self._documentation, labels=self._labelnames
        )
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            family.add_metric(list(key), child.value())
        yield family


class FastHistogram(Collector):
    """A label-less histogram for hot paths: no lock per observation."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [float(b) for b in buckets]
        # One cell per bucket, one for +Inf, then the sum.
        self._cells = PerThreadCells(len(self._bounds) + 2)
        if registry is not None:
            registry.register(self)

    def observe(self, amount: float) -> None:
        cells = self._cells.mine()
        cells[bisect.bisect_left(self._bounds, amount)] += 1
        cells[-1] += amount

    def observe_many(self, amounts: Iterable[float]) -> None:
        """Observe several values at once (one slot lookup for all)."""
        cells, bounds, where = self._cells.mine(), self._bounds, bisect.bisect_left
        total = 0.0
        for amount in amounts:
            cells[where(bounds, amount)] += 1
            total += amount
        cells[-1] += total

    def describe(self) -> list[Any]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Any]:
        totals = self._cells.total()
        cumulative = []
        running = 0.0
        for bound, count in zip(
            [*self._bounds, float("inf")], totals[:-1], strict=True
        ):
            running += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            cumulative.append((label, running))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], cumulative, sum_value=totals[-1])
        yield family
