"""One function per side-by-side mode, each returning a :class:`ModeResult`."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pykka

from bench._workload import (
    KIND,
    STATUSES,
    CountingDeriver,
    CountingSubscriber,
    ItemState,
    LimitModel,
    Plan,
    WideState,
    build_plan,
    wide_state,
)
from runtime import EntityHandle, Runtime

logger = logging.getLogger(__name__)

PER_CALL = "per_call"
"""Latency basis: each call was timed on its own."""

AMORTISED = "amortised"
"""Latency basis: time per operation over a window or batch of operations."""

DRAIN_TIMEOUT = 600.0
"""Seconds a mode waits for its deliveries before it counts as broken."""


@dataclasses.dataclass
class ModeResult:
    """What one mode measured.

    Attributes:
        name: the mode's name in the report.
        ops: operations done in ``seconds``.
        seconds: wall time of the whole mode, waits for delivery included.
        samples_us: per-operation times, per call or amortised (see ``latency``).
        latency: :data:`PER_CALL` or :data:`AMORTISED`.
        changes_seen: changes the counting subscriber saw (None: no subscriber).
        events: the events the deriver named, by name (None: no deriver).
    """

    name: str
    ops: int
    seconds: float
    samples_us: list[float]
    latency: str
    changes_seen: int | None = None
    events: dict[str, int] | None = None

    @property
    def ops_per_s(self) -> float:
        """Operations per second over the whole mode."""
        return self.ops / self.seconds

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0 to 1) of the samples, by nearest rank.

        With no samples (fewer operations than one window) it is the mean.
        """
        ordered = sorted(self.samples_us) or [self.seconds * 1e6 / self.ops]
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]


@dataclasses.dataclass
class MemoryResult:
    """What the memory run measured, plus the history timings on its log."""

    rows_written: int
    bytes_grown: int
    log_rows: int
    history: ModeResult

    @property
    def bytes_per_row(self) -> float:
        """Traced memory growth per transition row written."""
        return self.bytes_grown / self.rows_written


def _chunks(plan: Plan, size: int) -> Iterator[Plan]:
    for start in range(0, len(plan), size):
        yield plan[start : start + size]


def run_limit(plan: Plan, window: int) -> ModeResult:
    """The bare loop: :class:`LimitModel` over the plan, on this thread."""
    deriver, subscriber = CountingDeriver(), CountingSubscriber(window)
    model = LimitModel(deriver, subscriber)

    started = time.perf_counter()
    model.run(plan)
    seconds = time.perf_counter() - started

    return ModeResult(
        "limit",
        len(plan),
        seconds,
        subscriber.amortised_us(started),
        AMORTISED,
        subscriber.count,
        deriver.fired,
    )


class _ModelActor(pykka.ThreadingActor):
    """A raw pykka actor that runs the bare loop's step for each message."""

    def __init__(self, model: LimitModel) -> None:
        super().__init__()
        self.model = model

    def on_receive(self, message: Any) -> Any:
        if message[0] == "one":
            return self.model.step(message[1], message[2])
        step = self.model.step
        return [step(entity_id, apply) for entity_id, apply in message[1]]


def _with_model_actor(
    name: str, plan: Plan, window: int, drive: Callable[..., tuple[list[float], str]]
) -> ModeResult:
    deriver, subscriber = CountingDeriver(), CountingSubscriber(window)
    ref = _ModelActor.start(LimitModel(deriver, subscriber))
    try:
        started = time.perf_counter()
        samples, latency = drive(ref, plan)
        seconds = time.perf_counter() - started
    finally:
        ref.stop()

    if latency == AMORTISED and not samples:
        samples = subscriber.amortised_us(started)
    return ModeResult(
        name, len(plan), seconds, samples, latency, subscriber.count, deriver.fired
    )


def _drive_ask(ref: pykka.ActorRef[Any], plan: Plan) -> tuple[list[float], str]:
    samples = []
    clock = time.perf_counter
    for entity_id, apply in plan:
        t0 = clock()
        ref.ask(("one", entity_id, apply))
        samples.append((clock() - t0) * 1e6)
    return samples, PER_CALL


def _drive_pipelined(ref: pykka.ActorRef[Any], plan: Plan) -> tuple[list[float], str]:
    futures = [ref.ask(("one", i, a), block=False) for i, a in plan]
    for future in futures:
        future.get()
    return [], AMORTISED


def _batched_driver(size: int) -> Callable[..., tuple[list[float], str]]:
    def drive(ref: pykka.ActorRef[Any], plan: Plan) -> tuple[list[float], str]:
        samples = []
        clock = time.perf_counter
        for batch in _chunks(plan, size):
            t0 = clock()
            ref.ask(("many", batch))
            samples.append((clock() - t0) * 1e6 / len(batch))
        return samples, AMORTISED

    return drive


def run_pykka_ask(plan: Plan, window: int) -> ModeResult:
    """Raw pykka: one blocking ``ask`` per mutation, each call timed."""
    return _with_model_actor("pykka_ask", plan, window, _drive_ask)


def run_pykka_pipelined(plan: Plan, window: int) -> ModeResult:
    """Raw pykka: ``ask(block=False)`` for every mutation, then wait for all."""
    return _with_model_actor("pykka_pipelined", plan, window, _drive_pipelined)


def run_pykka_batched(plan: Plan, window: int, size: int) -> ModeResult:
    """Raw pykka: one blocking ``ask`` carrying ``size`` mutations at a time."""
    name = f"pykka_batched_{size}"
    return _with_model_actor(name, plan, window, _batched_driver(size))


class _RuntimeRun:
    """A started runtime with the workload's kind, deriver and one subscriber.

    The mailboxes are sized to hold the whole plan, so the subscriber never
    has changes folded together and must see every one of them.
    """

    def __init__(self, plan: Plan, window: int) -> None:
        self.deriver = CountingDeriver()
        self.subscriber = CountingSubscriber(window)
        self.rt = Runtime(mailbox_size=max(10_000, len(plan) + 1))
        self.handle: EntityHandle[ItemState] = self.rt.define_entity(KIND, ItemState)
        self.rt.register_change_deriver(KIND, self.deriver)
        self.rt.on_entity_changed(KIND, self.subscriber, name="counter")

    def __enter__(self) -> _RuntimeRun:
        self.rt.start()
        return self

    def __exit__(self, *exc: object) -> None:
        report = self.rt.stop()
        if not report.clean:
            logger.warning("benchmark runtime stopped unclean: %s", report)

    def result(
        self, name: str, ops: int, seconds: float, samples: list[float], latency: str
    ) -> ModeResult:
        return ModeResult(
            name,
            ops,
            seconds,
            samples,
            latency,
            self.subscriber.count,
            self.deriver.fired,
        )


def run_runtime_mutate(plan: Plan, window: int) -> ModeResult:
    """The runtime's blocking ``mutate``, each call timed, then ``drain()``."""
    with _RuntimeRun(plan, window) as run:
        mutate, clock = run.handle.mutate, time.perf_counter
        samples = []

        started = clock()
        for entity_id, apply in plan:
            t0 = clock()
            mutate(entity_id, apply)
            samples.append((clock() - t0) * 1e6)
        run.rt.drain(timeout=DRAIN_TIMEOUT)
        seconds = clock() - started

    return run.result("runtime_mutate", len(plan), seconds, samples, PER_CALL)


def run_runtime_pipelined(plan: Plan, window: int) -> ModeResult:
    """The runtime's ``mutate_async`` for every mutation, then wait and drain."""
    with _RuntimeRun(plan, window) as run:
        submit = run.handle.mutate_async

        started = time.perf_counter()
        futures = [submit(entity_id, apply) for entity_id, apply in plan]
        for future in futures:
            future.get(timeout=DRAIN_TIMEOUT)
        run.rt.drain(timeout=DRAIN_TIMEOUT)
        seconds = time.perf_counter() - started

    samples = run.subscriber.amortised_us(started)
    return run.result("runtime_mutate_async", len(plan), seconds, samples, AMORTISED)


def has_mutate_many() -> bool:
    """Whether :class:`EntityHandle` offers ``mutate_many``."""
    return hasattr(EntityHandle, "mutate_many")


def run_runtime_batched(plan: Plan, window: int, size: int) -> ModeResult:
    """The runtime's ``mutate_many`` with ``size`` ``(id, apply)`` pairs a call.

    Raises:
        TypeError: ``mutate_many`` does not take a list of ``(id, apply)``.
    """
    with _RuntimeRun(plan, window) as run:
        mutate_many = run.handle.mutate_many  # type: ignore[attr-defined]
        clock = time.perf_counter
        samples = []

        started = clock()
        for batch in _chunks(plan, size):
            t0 = clock()
            mutate_many(batch)
            samples.append((clock() - t0) * 1e6 / len(batch))
        run.rt.drain(timeout=DRAIN_TIMEOUT)
        seconds = clock() - started

    name = f"runtime_mutate_many_{size}"
    return run.result(name, len(plan), seconds, samples, AMORTISED)


PROBE_ID = "probe"
"""The entity of the history query: 10 rows, written among the bulk."""

PROBE_ROWS = 10


def _probe_update(step: int, prev: dict[str, Any] | None) -> dict[str, Any]:
    assert prev is not None
    return {**prev, "status": STATUSES[step % 4], "updates": prev["updates"] + 1}


def build_large_log(
    changes: int,
    ids: int,
    on_window: Callable[[], None] | None = None,
    chunk: int = 5_000,
) -> tuple[Runtime, EntityHandle[WideState], int]:
    """Write ``changes`` four-field changes over ``ids`` ids through a runtime.

    The ids (and the probe entity) are created first; then ``on_window`` is
    called, the changes are written with ``mutate_async`` in chunks of
    ``chunk``, and the probe gets three two-field changes along the way, so
    ``history(PROBE_ID)`` answers 10 rows. The runtime has no consumers and is
    stopped before returning (reads still work).

    Returns:
        The stopped runtime, the kind's handle and the log's row count when
        ``on_window`` was called.
    """
    rt = Runtime(mailbox_size=10_000)
    handle: EntityHandle[WideState] = rt.define_entity("row", WideState)
    plan = build_plan(ids + changes, ids, wide_state)
    probe_at = {len(plan) * k // 4: k for k in (1, 2, 3)}

    with rt:
        for future in [handle.mutate_async(i, a) for i, a in plan[:ids]]:
            future.get(timeout=DRAIN_TIMEOUT)
        handle.mutate(PROBE_ID, lambda prev: wide_state(0, prev))
        rows_before = len(rt.log)
        if on_window is not None:
            on_window()

        for start in range(ids, len(plan), chunk):
            batch = plan[start : start + chunk]
            last = [handle.mutate_async(i, a) for i, a in batch][-1]
            last.get(timeout=DRAIN_TIMEOUT)
            for at, step in probe_at.items():
                if start <= at < start + chunk:
                    handle.mutate(PROBE_ID, functools.partial(_probe_update, step))

    return rt, handle, rows_before


def run_memory_and_history(changes: int, ids: int, calls: int) -> MemoryResult:
    """Measure bytes per row while writing ``4 * changes`` rows, then ``history``.

    Traced memory (``tracemalloc``) is started once the ids exist, so growth
    is what the new rows cost: row objects, the sequence index and the
    per-entity and per-field lists. The store holds one state per id
    throughout, so it does not grow.
    """
    was_tracing = tracemalloc.is_tracing()
    traced_before = [0]

    def start_tracing() -> None:
        gc.collect()
        tracemalloc.start()
        traced_before[0] = tracemalloc.get_traced_memory()[0]

    try:
        rt, handle, rows_before = build_large_log(changes, ids, start_tracing)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - traced_before[0]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    rows_written = len(rt.log) - rows_before

    history = _time_history(handle, calls)
    history.name = f"history_{PROBE_ROWS}_rows"
    return MemoryResult(rows_written, grown, len(rt.log), history)


def _time_history(handle: EntityHandle[Any], calls: int) -> ModeResult:
    clock = time.perf_counter
    samples = []

    started = clock()
    for _ in range(calls):
        t0 = clock()
        rows = handle.history(PROBE_ID)
        samples.append((clock() - t0) * 1e6)
    seconds = clock() - started

    if len(rows) != PROBE_ROWS:
        raise RuntimeError(f"history({PROBE_ID!r}) gave {len(rows)} rows, not 10")
    return ModeResult("history", calls, seconds, samples, PER_CALL)
