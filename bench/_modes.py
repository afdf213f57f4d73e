"""One function per side-by-side mode, each returning a :class:`ModeResult`."""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.metadata
import logging
import math
import queue
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

import pykka

from bench._workload import (
    KIND,
    STATUSES,
    Apply,
    CountingDeriver,
    CountingSubscriber,
    ItemState,
    LimitModel,
    Plan,
    WideState,
    build_plan,
    check_item,
    wide_state,
)
from runtime import EntityHandle, Runtime

try:
    from eventsourcing.application import (
        AggregateNotFoundError,
        Application,
        ProcessingEvent,
    )
    from eventsourcing.dispatch import singledispatchmethod
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.system import Follower, SingleThreadedRunner, System
    from eventsourcing.utils import EnvType
except ImportError:
    _HAS_EVENTSOURCING = False
else:
    _HAS_EVENTSOURCING = True

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


def run_pykka_pipelined(plan: Plan, window: int) -> ModeResult:
    """Raw pykka: ``ask(block=False)`` for every mutation, then wait for all."""
    return _with_model_actor("pykka_pipelined", plan, window, _drive_pipelined)


def run_pykka_batched(plan: Plan, window: int, size: int) -> ModeResult:
    """Raw pykka: one blocking ``ask`` carrying ``size`` mutations at a time."""
    name = f"pykka_batched_{size}"
    return _with_model_actor(name, plan, window, _batched_driver(size))


_END = None
"""What a stage of the plain-thread pipeline passes on after its last item."""


def _stage(
    inbox: queue.SimpleQueue[Any], work: Callable[[Any], Any]
) -> threading.Thread:
    # A thread that calls work(item) on everything its inbox receives until _END.
    def loop() -> None:
        get = inbox.get
        while (item := get()) is not _END:
            work(item)
        work(_END)

    thread = threading.Thread(target=loop, name="bench-stage", daemon=True)
    thread.start()
    return thread


def run_python_stages(plan: Plan, window: int, size: int | None) -> ModeResult:
    """The runtime's shape with none of its work: plain threads and queues.

    A writer thread runs the bare loop's write (apply, check, diff, rows,
    store), a deriver thread derives each change and a subscriber thread
    counts it, as in the runtime, joined by ``queue.SimpleQueue`` hand-offs
    (one put per mutation and per change, or per batch of ``size``). There
    are no futures, events, indexes, metrics or back-pressure: its
    throughput is what this shape allows in Python, the floor any actor
    runtime built like this one stands on.

    Without ``size`` it is pipelined: every mutation submitted, then one wait
    for the last. With ``size``, each call hands over ``size`` mutations and
    waits until they are written, as ``mutate_many`` does; deriving and
    delivery go on behind it.
    """
    deriver, subscriber = CountingDeriver(), CountingSubscriber(window)
    to_writer: queue.SimpleQueue[Any] = queue.SimpleQueue()
    to_deriver: queue.SimpleQueue[Any] = queue.SimpleQueue()
    to_subscriber: queue.SimpleQueue[Any] = queue.SimpleQueue()
    written: queue.SimpleQueue[Any] = queue.SimpleQueue()
    events = deriver.events

    if size is None:
        model = LimitModel(None, to_deriver.put)
        step = model.step

        def write(item: Any) -> None:
            if item is _END:
                to_deriver.put(_END)
                written.put(_END)
            else:
                step(item[0], item[1])

        def derive(item: Any) -> None:
            if item is not _END:
                events(item[2], item[3])
            to_subscriber.put(item)

        def deliver(item: Any) -> None:
            if item is not _END:
                subscriber(item)

    else:
        changes: list[Any] = []
        model = LimitModel(None, changes.append)
        step = model.step

        def write(item: Any) -> None:
            if item is _END:
                to_deriver.put(_END)
                return
            for entity_id, apply in item:
                step(entity_id, apply)
            to_deriver.put(changes.copy())
            changes.clear()
            written.put(item)

        def derive(item: Any) -> None:
            if item is not _END:
                for change in item:
                    events(change[2], change[3])
            to_subscriber.put(item)

        def deliver(item: Any) -> None:
            if item is not _END:
                for change in item:
                    subscriber(change)

    threads = [
        _stage(to_subscriber, deliver),
        _stage(to_deriver, derive),
        _stage(to_writer, write),
    ]
    samples: list[float] = []
    started = time.perf_counter()
    if size is None:
        put = to_writer.put
        for item in plan:
            put(item)
        to_writer.put(_END)
        written.get()
    else:
        clock = time.perf_counter
        for batch in _chunks(plan, size):
            t0 = clock()
            to_writer.put(batch)
            written.get()
            samples.append((clock() - t0) * 1e6 / len(batch))
        to_writer.put(_END)
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started

    if size is None:
        name = "python_stages_pipelined"
        samples = subscriber.amortised_us(started)
    else:
        name = f"python_stages_batched_{size}"
    return ModeResult(
        name, len(plan), seconds, samples, AMORTISED, subscriber.count, deriver.fired
    )


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


BLOCKING_ROUNDS = 10
"""Alternating rounds of :func:`run_blocking_pair`."""


def run_blocking_pair(
    plan: Plan, window: int, rounds: int = BLOCKING_ROUNDS
) -> tuple[ModeResult, ModeResult]:
    """Raw pykka's blocking ``ask`` and the runtime's blocking ``mutate``.

    Each call is timed. The plan is split into ``rounds`` parts, and each
    part goes first through one ``ask`` per mutation to a pykka actor running
    the bare loop's step, then through the runtime's ``mutate``: the two
    alternate, so a change in the machine's load (which moves a thread's
    wake-up time, and with it every per-call time) reaches both alike. The
    runtime's ``drain()`` at the end counts in its time.

    Returns:
        The ``pykka_ask`` and ``runtime_mutate`` results.
    """
    deriver, subscriber = CountingDeriver(), CountingSubscriber(window)
    ref = _ModelActor.start(LimitModel(deriver, subscriber))
    ask_samples: list[float] = []
    mutate_samples: list[float] = []
    ask_seconds = mutate_seconds = 0.0
    clock = time.perf_counter

    try:
        with _RuntimeRun(plan, window) as run:
            mutate = run.handle.mutate
            for part in _chunks(plan, max(1, -(-len(plan) // rounds))):
                started = clock()
                ask_samples += _drive_ask(ref, part)[0]
                ask_seconds += clock() - started

                started = clock()
                for entity_id, apply in part:
                    t0 = clock()
                    mutate(entity_id, apply)
                    mutate_samples.append((clock() - t0) * 1e6)
                mutate_seconds += clock() - started

            started = clock()
            run.rt.drain(timeout=DRAIN_TIMEOUT)
            mutate_seconds += clock() - started
    finally:
        ref.stop()

    ask = ModeResult(
        "pykka_ask",
        len(plan),
        ask_seconds,
        ask_samples,
        PER_CALL,
        subscriber.count,
        deriver.fired,
    )
    blocking = run.result(
        "runtime_mutate", len(plan), mutate_seconds, mutate_samples, PER_CALL
    )
    return ask, blocking


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


def eventsourcing_version() -> str | None:
    """The installed ``eventsourcing`` version, or None when it is not installed.

    It comes only with the ``bench`` extra, so the test extra (and CI) runs
    without it and the runner skips :func:`run_eventsourcing`.
    """
    if not _HAS_EVENTSOURCING:
        return None
    return importlib.metadata.version("eventsourcing")


EVENTSOURCING_SETUP = (
    "an Aggregate per id (one Created or Changed event per real change, holding "
    "the changed fields) in an Application with in-memory (POPO) persistence and "
    "its aggregate cache on; a Follower in a System run by SingleThreadedRunner "
    "derives the events and calls the subscriber"
)
"""How the eventsourcing mode is built, in one line for the report."""


def run_eventsourcing(plan: Plan, window: int) -> ModeResult:
    """The workload written with the ``eventsourcing`` library's own idioms.

    Each mutation goes through ``Items.mutate``: load the id's aggregate from
    the application's repository (none yet: a create), apply the plan's
    callable to a copy of its state, validate with :func:`check_item`, diff,
    and only on a real change trigger one event holding the changed fields
    and ``save`` it. Each call is timed on its own.

    The processing step is the library's normal one for an application that
    others react to: a :class:`~eventsourcing.system.System` in which a
    ``Follower`` follows the application, run by ``SingleThreadedRunner``.
    After each ``save`` the runner has the follower pull the new notification
    from the application's notification log, rebuild the domain event and run
    its ``policy``, which keeps each id's state (to give the deriver the
    previous and next state), calls the same :class:`CountingDeriver` and
    hands the change to the same :class:`CountingSubscriber`; the follower
    records its tracking position. So every timed call includes its change's
    processing.

    Both choices give eventsourcing its fastest normal set-up, so the ratio
    to it is not flattered: a single thread, because under the GIL a
    threaded runner adds hand-offs but no parallelism; and the repository's
    aggregate cache (``AGGREGATE_CACHE_MAXSIZE``, the counterpart of the
    runtime's in-memory store), so a load fast-forwards a cached aggregate
    instead of replaying all of its events. Persistence is the default
    in-memory POPO module, named explicitly so that an environment variable
    cannot swap it.

    Raises:
        ModuleNotFoundError: eventsourcing is not installed.
    """
    if not _HAS_EVENTSOURCING:
        raise ModuleNotFoundError(
            "the eventsourcing mode needs the eventsourcing library; install the "
            "bench extra: pip install -e '.[bench]'"
        )
    deriver, subscriber = CountingDeriver(), CountingSubscriber(window)
    ids = len({entity_id for entity_id, _ in plan})
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.popo",
        "AGGREGATE_CACHE_MAXSIZE": str(ids),
    }
    runner: SingleThreadedRunner[UUID] = SingleThreadedRunner(_SYSTEM, env=env)
    runner.start()

    try:
        runner.get(_Derivation).attach(deriver, subscriber)
        mutate, clock = runner.get(_Items).mutate, time.perf_counter
        samples = []

        started = clock()
        for entity_id, apply in plan:
            t0 = clock()
            mutate(entity_id, apply)
            samples.append((clock() - t0) * 1e6)
        seconds = clock() - started
    finally:
        runner.stop()

    return ModeResult(
        "eventsourcing",
        len(plan),
        seconds,
        samples,
        PER_CALL,
        subscriber.count,
        deriver.fired,
    )


if _HAS_EVENTSOURCING:

    class _Item(Aggregate):
        """One entity of the workload; its id is derived from its name."""

        class Created(Aggregate.Created):
            name: str
            status: str
            severity: str
            updates: int

        class Changed(Aggregate.Event):
            fields: dict[str, Any]

        @staticmethod
        def create_id(name: str) -> UUID:
            return uuid5(NAMESPACE_URL, f"/{KIND}/{name}")

        @event(Created)
        def __init__(self, name: str, status: str, severity: str, updates: int):
            self.name = name
            self.status = status
            self.severity = severity
            self.updates = updates

        @event(Changed)
        def change(self, fields: dict[str, Any]) -> None:
            for field, value in fields.items():
                setattr(self, field, value)

        def as_state(self) -> dict[str, Any]:
            return {
                "status": self.status,
                "severity": self.severity,
                "updates": self.updates,
            }

    class _Items(Application):
        """The write side: one :meth:`mutate` per mutation of the plan."""

        def mutate(self, entity_id: str, apply: Apply) -> dict[str, Any]:
            """Run one mutation; return the next state."""
            try:
                item: _Item | None = self.repository.get(_Item.create_id(entity_id))
            except AggregateNotFoundError:
                item = None
            prev = None if item is None else item.as_state()

            nxt = apply(None if prev is None else dict(prev))

            check_item(nxt)

            if item is None or prev is None:  # both or neither; mypy needs both
                item = _Item(entity_id, **nxt)
            else:
                delta = {f: v for f, v in nxt.items() if prev[f] != v}
                if not delta:
                    return nxt
                item.change(delta)

            self.save(item)
            return nxt

    class _Derivation(Follower):
        """The processing step: derives each change's events, hands it on."""

        def __init__(self, env: EnvType | None = None) -> None:
            super().__init__(env)
            self.states: dict[UUID, tuple[str, dict[str, Any]]] = {}
            self.deriver = CountingDeriver()
            self.subscriber = CountingSubscriber(1)

        def attach(
            self, deriver: CountingDeriver, subscriber: CountingSubscriber
        ) -> None:
            """Use this deriver and subscriber from now on."""
            self.deriver, self.subscriber = deriver, subscriber

        @singledispatchmethod
        def policy(self, domain_event: Any, processing_event: Any) -> None:
            """Ignore events of any other type (there are none)."""

        @policy.register
        def _(self, domain_event: _Item.Created, processing: ProcessingEvent) -> None:
            nxt = {
                "status": domain_event.status,
                "severity": domain_event.severity,
                "updates": domain_event.updates,
            }
            self.states[domain_event.originator_id] = (domain_event.name, nxt)
            self._hand_on(domain_event.name, None, nxt, nxt, processing)

        @policy.register
        def _(self, domain_event: _Item.Changed, processing: ProcessingEvent) -> None:
            name, prev = self.states[domain_event.originator_id]
            nxt = {**prev, **domain_event.fields}
            self.states[domain_event.originator_id] = (name, nxt)
            self._hand_on(name, prev, nxt, domain_event.fields, processing)

        def _hand_on(
            self,
            name: str,
            prev: dict[str, Any] | None,
            nxt: dict[str, Any],
            delta: dict[str, Any],
            processing: ProcessingEvent,
        ) -> None:
            tracking = processing.tracking
            seq = None if tracking is None else tracking.notification_id
            self.deriver.events(prev, nxt)
            self.subscriber((KIND, name, prev, nxt, delta, seq))

    _SYSTEM = System(pipes=[[_Items, _Derivation]])


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
