"""The workload that every side-by-side mode runs: states, plan, deriver, subscriber."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

logger = logging.getLogger(__name__)

KIND = "item"
"""The kind name used by the runtime modes."""

STATUSES = ("investigating", "identified", "monitoring", "resolved")
"""The statuses every entity cycles through, one step per mutation."""

SEVERITIES = ("minor", "major")

CREATED, UPDATED, RESOLVED = "x.created", "x.updated", "x.resolved"
"""The trigger events of the workload's deriver."""

_FIELDS = frozenset(("status", "severity", "updates"))
_STATUS_SET = frozenset(STATUSES)
_SEVERITY_SET = frozenset(SEVERITIES)
_MISSING = object()

Apply = Callable[[dict[str, Any] | None], dict[str, Any]]
Plan = list[tuple[str, Apply]]


@dataclasses.dataclass
class ItemState:
    """The three-field state of the throughput workload."""

    status: Literal["investigating", "identified", "monitoring", "resolved"]
    severity: Literal["minor", "major"]
    updates: int


@dataclasses.dataclass
class WideState:
    """The four-field state of the memory run: every write changes all four."""

    status: Literal["investigating", "identified", "monitoring", "resolved"]
    priority: int
    updates: int
    score: float


def item_state(step: int, prev: dict[str, Any] | None) -> dict[str, Any]:
    """Return the state of an item after ``step`` mutations (0 creates it).

    Consecutive steps always differ in ``status`` and ``updates``, and every
    fourth step also flips ``severity``, so every mutation is a real change of
    two or three fields.
    """
    return {
        "status": STATUSES[step % 4],
        "severity": SEVERITIES[(step // 4) % 2],
        "updates": step,
    }


def wide_state(step: int, prev: dict[str, Any] | None) -> dict[str, Any]:
    """Return the memory run's state after ``step`` writes; all four fields move."""
    return {
        "status": STATUSES[step % 4],
        "priority": step % 5,
        "updates": step,
        "score": step / 4,
    }


def build_plan(mutations: int, ids: int, state: Any = item_state) -> Plan:
    """Return ``mutations`` ``(id, apply)`` pairs that visit ``ids`` ids in turn.

    Mutation ``i`` goes to id ``i % ids`` and is that id's step ``i // ids``,
    so the first ``ids`` mutations create the entities and every later one
    changes an existing entity. The plan is built once and shared by every
    mode, so building the ``apply`` callables is never timed.
    """
    names = [f"x-{i}" for i in range(ids)]
    return [
        (names[i % ids], functools.partial(state, i // ids)) for i in range(mutations)
    ]


def derive_events(prev: dict[str, Any] | None, nxt: dict[str, Any]) -> list[str]:
    """Name the events one change fires, like the incident deriver does.

    A create fires ``x.created``, a move into ``resolved`` fires
    ``x.resolved``, and any other change fires ``x.updated``.
    """
    if prev is None:
        return [CREATED]
    if nxt["status"] == "resolved" and prev["status"] != "resolved":
        return [RESOLVED]
    return [UPDATED]


class CountingDeriver:
    """The workload's deriver, counting the events it names.

    Called with an ``EntityChanged`` by the runtime (on its deriver thread) and
    through :meth:`events` by the bare loop and the pykka actors; only one
    thread calls it at a time in every mode.
    """

    def __init__(self) -> None:
        self.fired: dict[str, int] = {}

    def events(self, prev: dict[str, Any] | None, nxt: dict[str, Any]) -> list[str]:
        """Derive and count the events of one change."""
        names = derive_events(prev, nxt)
        fired = self.fired
        for name in names:
            fired[name] = fired.get(name, 0) + 1
        return names

    def __call__(self, change: Any) -> list[str]:
        return self.events(change.prev, change.next)


class CountingSubscriber:
    """Counts the changes it sees and stamps the time after every ``window``.

    The stamps give an amortised per-change time for the pipelined modes,
    where timing single calls would mean nothing: the time between two stamps
    divided by ``window``.
    """

    def __init__(self, window: int) -> None:
        self.count = 0
        self.window = window
        self.stamps: list[float] = []

    def __call__(self, change: Any) -> None:
        self.count += 1
        if self.count % self.window == 0:
            self.stamps.append(time.perf_counter())

    def amortised_us(self, started: float) -> list[float]:
        """Per-change µs of each complete window since ``started``."""
        edges = [started, *self.stamps]
        return [(b - a) * 1e6 / self.window for a, b in itertools.pairwise(edges)]


def check_item(state: Any) -> None:
    """A hand-written version of the schema check, for the bare loop."""
    if (
        type(state) is not dict
        or state.keys() != _FIELDS
        or state["status"] not in _STATUS_SET
        or state["severity"] not in _SEVERITY_SET
        or type(state["updates"]) is not int
    ):
        raise ValueError(f"not an item state: {state!r}")


def _derive_elsewhere(prev: dict[str, Any] | None, nxt: dict[str, Any]) -> None:
    """The derive step of a :class:`LimitModel` whose changes a later stage derives."""


class LimitModel:
    """The whole write path as a bare, single-threaded loop body.

    One :meth:`step` reads the previous state, applies, validates, diffs,
    appends one row per changed field to a list, derives and calls the
    subscriber: what the runtime does, without actors, locks, events or
    indexes. Its throughput is *the limit* the other modes are compared to.

    Without a deriver, :meth:`step` only writes and hands each change, as a
    ``(kind, id, prev, next, delta, seq)`` tuple, to ``subscriber``: the
    first stage of a pipeline whose later stages derive and deliver.
    """

    def __init__(
        self,
        deriver: CountingDeriver | None,
        subscriber: Callable[[tuple[Any, ...]], Any],
    ):
        self.store: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[Any, ...]] = []
        self.seq = 0
        self._derive = _derive_elsewhere if deriver is None else deriver.events
        self._subscriber = subscriber

    def step(self, entity_id: str, apply: Apply) -> dict[str, Any]:
        """Run one mutation; return the next state."""
        prev = self.store.get(entity_id)
        nxt = apply(None if prev is None else dict(prev))
        check_item(nxt)

        if prev is None:
            delta = dict(nxt)
        else:
            delta = {f: v for f, v in nxt.items() if prev.get(f, _MISSING) != v}
        if not delta:
            return nxt

        self.seq += 1
        seq, at, append = self.seq, time.time(), self.log.append
        for field, value in delta.items():
            before = None if prev is None else prev.get(field)
            append((seq, KIND, entity_id, field, before, value, at))
        self.store[entity_id] = nxt

        self._derive(prev, nxt)
        self._subscriber((KIND, entity_id, prev, nxt, delta, seq))
        return nxt

    def run(self, plan: Plan) -> None:
        """Run every mutation of ``plan`` in order."""
        step = self.step
        for entity_id, apply in plan:
            step(entity_id, apply)


def sample_plan(plan: Plan, ids: int, every: int) -> Plan:
    """Return the mutations of every ``every``-th id of ``plan``, in plan order.

    Each kept id keeps its whole life (its create and every later step), so
    the sample has the same mix of creates and updates and the same history
    per id as the whole plan; a prefix of the plan would not (its first
    ``ids`` mutations are all creates). Relies on :func:`build_plan` visiting
    the ``ids`` ids in turn, so that ``plan[:ids]`` names each id once.
    """
    kept = {entity_id for entity_id, _ in plan[:ids:every]}
    return [(entity_id, apply) for entity_id, apply in plan if entity_id in kept]
