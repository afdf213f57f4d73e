from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from monitoring._agent_checks import (
    CHECK_KIND,
    CheckIndex,
    CheckState,
    expire_check,
    is_settled,
    make_health_read,
    new_check_state,
    step_check,
    summarise_checks,
)
from monitoring._agent_config import AgentConfig, CheckRule
from monitoring._agent_incidents import AUTOMATION_WORKER_GROUP, IncidentAutomation
from monitoring._agent_report import (
    IncidentRecord,
    IncidentTimeline,
    LabelScore,
    StatusChange,
    attribute_checks,
    build_incidents,
    iso,
    score_labels,
)
from monitoring._agent_sources import (
    Batch,
    ReplaySource,
    Sample,
    Source,
    recordable_time,
)
from monitoring._health import (
    HEALTH_KIND,
    HealthState,
    derive_health_events,
    health_change_to_payload,
)
from monitoring._incident import (
    INCIDENT_KIND,
    IncidentState,
    create_incident_read,
    derive_incident_events,
    incident_change_to_payload,
)
from monitoring._incident_service import IncidentService
from runtime import EntityHandle, Runtime, work_queue

logger = logging.getLogger(__name__)

AGENT_ACTOR = "agent"
"""The actor recorded with the agent's check and health writes."""

INCIDENT_DB = "incidents.db"
"""The incident service's SQLite file inside the data directory."""


class RecordClock:
    """The runtime's clock during a replay: the record time of the samples.

    The agent moves it to each accepted sample's time; it never goes back, so
    ``in_state_for`` and ``transition_count`` windows measure record time.
    It only ever shows a time the runtime can record (years 1 to 9999).
    Thread-safe.
    """

    def __init__(self, start: float) -> None:
        if not recordable_time(start):
            raise ValueError(f"not a time between the years 1 and 9999: {start!r}")
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def follow(self, at: float) -> None:
        """Move to ``at`` unless that is in the past or not a recordable time."""
        with self._lock:
            if at > self._now and recordable_time(at):
                self._now = at


@dataclasses.dataclass
class AgentStats:
    """Running counters of one agent run; read by the live view.

    Attributes:
        samples: samples accepted (judged against their check's rule).
        out_of_order: samples skipped because they were older than the
            previous accepted sample of the same series.
        repeated: accepted samples whose time equals the previous one's.
        non_finite: accepted samples whose value was NaN or infinite.
        invalid_times: samples refused because their time is not one the
            runtime can record (outside the years 1 to 9999, or NaN).
        check_writes: check states written (status or pending changed).
        status_changes: check status changes.
        expired: checks that went back to healthy because their series
            stopped reporting.
        first_at, last_at: record times of the first and last accepted sample.
        started: ``time.monotonic()`` at the start of the run.
    """

    samples: int = 0
    out_of_order: int = 0
    repeated: int = 0
    non_finite: int = 0
    invalid_times: int = 0
    check_writes: int = 0
    status_changes: int = 0
    expired: int = 0
    first_at: float | None = None
    last_at: float | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def seen(self) -> int:
        """Samples read from the source, accepted or skipped."""
        return self.samples + self.out_of_order


@dataclasses.dataclass
class AgentSummary:
    """What one run of the agent did; ``to_report()`` gives the JSON report.

    Attributes:
        source: the source's description.
        stats: the run's counters.
        checks: checks known at the end.
        systems: ``{system: status}`` at the end.
        changes: check status changes in the run.
        entity_changes: committed changes by kind in the run.
        triggers: trigger events derived in the run, by name.
        incidents: the incidents touched in the run.
        incidents_opened, incidents_resolved: counts in the run.
        seconds: wall-clock duration of the run.
        invalid_lines: unreadable lines skipped by a replay, samples a
            scrape dropped for their timestamp, and samples refused for
            their time (``stats.invalid_times``).
        restored_checks: checks restored from the data directory at start.
        no_thresholds: metric names no family with thresholds matched (their
            checks stay healthy).
        dead_letters: automation deliveries that failed for good.
        clean_stop: whether the runtime stopped with everything delivered.
        labels: the label score (with ``labels``), or ``None``.
    """

    source: str
    stats: AgentStats
    checks: int
    systems: dict[str, str]
    changes: int
    entity_changes: dict[str, int]
    triggers: dict[str, int]
    incidents: list[IncidentRecord]
    incidents_opened: int
    incidents_resolved: int
    seconds: float
    invalid_lines: int = 0
    restored_checks: int = 0
    no_thresholds: list[str] = dataclasses.field(default_factory=list)
    dead_letters: int = 0
    clean_stop: bool = True
    labels: LabelScore | None = None

    @property
    def mean_time_to_resolve(self) -> float | None:
        """Mean seconds from opening to resolution of the incidents resolved."""
        spans = [
            i.resolved_at - i.opened_at
            for i in self.incidents
            if i.resolved_at is not None
        ]
        return sum(spans) / len(spans) if spans else None

    @property
    def throughput(self) -> float:
        """Samples read per wall-clock second."""
        return self.stats.seen / self.seconds if self.seconds > 0 else 0.0

    def to_report(self) -> dict[str, Any]:
        """The JSON report: summary keys, then the incident timeline."""
        report: dict[str, Any] = {
            "source": self.source,
            "samples": self.stats.samples,
            "skipped_out_of_order": self.stats.out_of_order,
            "repeated_timestamps": self.stats.repeated,
            "non_finite_values": self.stats.non_finite,
            "invalid_lines": self.invalid_lines,
            "checks": self.checks,
            "restored_checks": self.restored_checks,
            "metrics_without_thresholds": self.no_thresholds,
            "changes": self.changes,
            "check_writes": self.stats.check_writes,
            "expired_checks": self.stats.expired,
            "entity_changes": self.entity_changes,
            "triggers": self.triggers,
            "incidents_opened": self.incidents_opened,
            "incidents_resolved": self.incidents_resolved,
            "mean_time_to_resolve_seconds": self.mean_time_to_resolve,
            "systems": self.systems,
            "seconds": round(self.seconds, 3),
            "throughput_samples_per_second": round(self.throughput, 1),
            "dead_letters": self.dead_letters,
            "clean_stop": self.clean_stop,
            "incidents": [incident.to_json() for incident in self.incidents],
        }
        if self.labels is not None:
            report["windows_total"] = self.labels.windows_total
            report["windows_hit"] = self.labels.windows_hit
            report["incidents_outside_windows"] = self.labels.incidents_outside_windows
            report["unlabelled_series"] = self.labels.unlabelled_series
            report["windows_by_series"] = {
                key: {"windows": total, "hit": hit}
                for key, (total, hit) in self.labels.per_series.items()
            }
        return report


class Agent:
    """Turns metric samples into check, health and incident entities.

    The flow of one sample:

    1. It is judged against its check's rule (:meth:`AgentConfig.rule_for`)
       and applied to the ``check`` entity with :func:`step_check`; a sample
       that changes neither the status nor what is pending needs no write,
       and none is made (it would be an unchanged write anyway).
    2. A write that changes a check's status (and the write that creates a
       check) runs inside a write of the system's ``health`` entity, which is
       computed on read from the system's checks; so the health change is
       recorded with the check change that caused it.
    3. The health deriver names the trigger events; the
       :class:`IncidentAutomation`, subscribed to ``health`` as a work queue,
       opens, escalates and resolves incidents; the incident deriver fires
       ``incident.created`` / ``.updated`` / ``.resolved``.

    Every write passes ``at=`` the sample's time. During a replay the runtime
    runs on a :class:`RecordClock` that follows the samples, so hold times,
    ``in_state_for`` and the incident timeline are all in record time. After
    each health change the agent drains the runtime, so the automation has
    acted before the next sample and the outcome does not depend on thread
    timing.

    Time going backwards: a sample older than the previous accepted sample of
    its series is skipped and counted (``out_of_order``); one with the same
    time is accepted in order (``repeated``) and time does not advance
    between the two, so it can start or break a pending change but never
    complete one. After a restart, a series' previous sample time is taken to
    be the time of its check's last recorded change.

    Silence: a series with no sample for longer than its ``stale_after``
    supports no status any more, so its check goes back to healthy at the
    last sample's time plus ``stale_after`` (see :func:`expire_check`), as
    an alert on a vanished series resolves in Prometheus. During a replay
    this happens when the clock (moved by any series) passes that time, or
    just before the series' next sample after a long gap.

    Not thread-safe: :meth:`run` processes samples on the calling thread
    and is called once; other threads may read the handles, ``stats`` and
    :meth:`IncidentAutomation.open_incidents` while it runs.

    Args:
        source: where samples come from.
        config: thresholds and hold times.
        data_dir: where the runtime keeps snapshots and its journal, and the
            incident service its SQLite file; ``None`` keeps everything in
            memory.
        metrics_port: serve the runtime's metrics on 127.0.0.1 at this port
            (``0`` picks a free port, ``None`` serves none).
        journal_fsync: the runtime's journal durability.
        retention_rows: the runtime's log rows kept per entity (``None``: all).
        labels: anomaly windows (``{label_key: [(start, end)]}``) to score a
            replay's incidents against.
        speed: replay at this many times real time (``None``: as fast as
            possible).
    """

    def __init__(
        self,
        source: Source,
        config: AgentConfig,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        metrics_port: int | None = None,
        journal_fsync: str = "interval",
        retention_rows: int | None = 10_000,
        labels: dict[str, list[tuple[float, float]]] | None = None,
        speed: float | None = None,
    ) -> None:
        if speed is not None and not speed > 0:
            raise ValueError(f"speed must be more than 0, got {speed!r}")
        self.source = source
        self.config = config
        self.labels = labels
        self.speed = speed
        self.metrics_port = metrics_port
        self.metrics_address: tuple[str, int] | None = None
        self.stats = AgentStats()
        self.status_changes: list[StatusChange] = []
        self.index = CheckIndex()

        self.clock: RecordClock | None = None
        if source.replay:
            self.clock = RecordClock(_first_time(source))
        self.data_dir = None if data_dir is None else Path(data_dir)
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.incident_service = IncidentService(
            ":memory:" if self.data_dir is None else self.data_dir / INCIDENT_DB
        )
        self.runtime = Runtime(
            clock=self.clock,
            data_dir=self.data_dir,
            journal_fsync=journal_fsync,
            retention_max_rows=retention_rows,
            stop_timeout=30.0,
            freeze_gc=True,
        )
        self._define(self.runtime)
        self._last_at: dict[str, float] = {}
        self._rules: dict[str, CheckRule] = {}
        self._expiries: list[tuple[float, str]] = []
        self._expires: dict[str, float] = {}
        self._known: set[str] = set()
        self._restored_checks = 0
        self._warned: set[str] = set()
        self._warned_times: set[str] = set()
        self._initial: dict[str, tuple[str, str]] = {}
        self._opened_before: dict[str, tuple[str, float, str]] = {}

    def _define(self, rt: Runtime) -> None:
        self.checks: EntityHandle[Any] = rt.define_entity(CHECK_KIND, CheckState)
        self.health: EntityHandle[Any] = rt.define_entity(
            HEALTH_KIND,
            HealthState,
            read=make_health_read(self.index, self.checks.get_many),
        )
        self.incidents: EntityHandle[Any] = rt.define_entity(
            INCIDENT_KIND,
            IncidentState,
            read=create_incident_read(self.incident_service),
        )
        rt.register_change_deriver(
            HEALTH_KIND, derive_health_events, to_payload=health_change_to_payload
        )
        rt.register_change_deriver(
            INCIDENT_KIND, derive_incident_events, to_payload=incident_change_to_payload
        )

        rt.declare_non_reactive_state(
            "agent_series_last_sample",
            reason="raw-sample",
            note="each series' latest sample time and value; only a check's "
            "status, pending changes and the value behind its last change are "
            "reactive",
        )
        rt.declare_non_reactive_state(
            "agent_check_index",
            reason="bookkeeping",
            note="which checks belong to which system; rebuilt from the check "
            "states at start",
        )
        rt.declare_non_reactive_state(
            "agent_incident_resolve_due",
            reason="bookkeeping",
            note="when each recovering system's incident is due to be resolved; "
            "rebuilt from the incident service and the health history at start",
        )

        self.automation = IncidentAutomation(
            self.incidents,
            self.health,
            self.incident_service,
            self.config.resolve_after,
        )
        rt.on_entity_changed(
            HEALTH_KIND,
            self.automation.on_health_changed,
            delivery=work_queue(AUTOMATION_WORKER_GROUP),
            name="incident-automation",
        )
        self.timeline = IncidentTimeline(rt)

        registry = rt.metrics_registry
        self._samples_metric = Counter(
            "entity_runtime_agent_samples",
            "Samples read by the agent, by outcome (accepted, out_of_order).",
            ["outcome"],
            registry=registry,
        )
        self._accepted = self._samples_metric.labels("accepted")
        self._skipped = self._samples_metric.labels("out_of_order")
        self._status_metric = Counter(
            "entity_runtime_agent_status_changes",
            "Check status changes committed by the agent.",
            registry=registry,
        )
        Gauge(
            "entity_runtime_agent_open_incidents",
            "Incidents the agent's automation has open.",
            registry=registry,
        ).set_function(lambda: len(self.automation.open_incidents()))

    # -- the run ------------------------------------------------------------------

    def now(self) -> float:
        """The agent's current time: record time in a replay, else wall time."""
        return self.clock() if self.clock is not None else time.time()

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        on_batch: Callable[[Agent], None] | None = None,
    ) -> AgentSummary:
        """Start the runtime, process the source until it ends or ``stop`` is set.

        Stops the runtime at the end in every case: deliveries are drained and
        a final snapshot written (with a ``data_dir``). Reads (``checks``,
        ``health``, ``incidents``) keep working until :meth:`close`. Call it
        once.

        Args:
            stop: set it (from any thread or a signal handler) to end the run.
            on_batch: called after each batch, on this thread.

        Returns:
            The run's summary.

        Raises:
            runtime.EntityRuntimeError: the runtime failed (data directory
                locked or damaged beyond repair, a write refused, ...).
            runtime.MetricsBindError: the metrics port is taken.
        """
        stop = stop if stop is not None else threading.Event()
        rt = self.runtime
        started = time.monotonic()
        self.stats = AgentStats(started=started)

        try:
            rt.start()
            if self.metrics_port is not None:
                self.metrics_address = rt.serve_metrics(self.metrics_port)
                logger.info("metrics on http://%s:%d/metrics", *self.metrics_address)
            self._restore()
            logger.info("agent started: %s", self.source.description)

            self._loop(stop, on_batch)
            self.fire_timers(self.now())
            rt.drain(timeout=60.0, until_idle=True)
            summary = self._summarise(time.monotonic() - started)
        finally:
            self.stop_report = rt.stop()

        summary.clean_stop = self.stop_report.clean
        logger.info(
            "agent stopped: %d samples, %d status changes, %d incidents opened",
            summary.stats.samples,
            summary.changes,
            summary.incidents_opened,
        )
        return summary

    def close(self) -> None:
        """Stop the runtime if it still runs and close the incident database."""
        self.runtime.stop()
        self.incident_service.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _restore(self) -> None:
        for check_id, state in self.checks.get_many(self.checks.ids()).items():
            self.index.add(state["system"], check_id)
            self._known.add(check_id)
            self._initial[check_id] = (state["system"], state["status"])
            last = self._last_change(check_id)
            if last is not None:
                self._last_at[check_id] = last
            if last is not None and not is_settled(state):
                rule = self.config.rule_for(state["metric"].partition("{")[0])
                self._rules.setdefault(check_id, rule)
                self._schedule_expiry(check_id, last, rule)
        for incident in self.incident_service.list_incidents():
            history = self.incidents.history(incident.id, field="status")
            opened = history[0].at.timestamp() if history else self.now()
            system = incident.system_ids[0] if incident.system_ids else "-"
            self._opened_before[incident.id] = (system, opened, incident.severity)
        self.automation.reconcile(self.index.systems(), self.now())
        self._restored_checks = len(self._initial)
        if self._initial:
            logger.info(
                "restored %d checks in %d systems, %d open incidents",
                len(self._initial),
                len(self.index.systems()),
                len(self.automation.open_incidents()),
            )

    def _loop(
        self, stop: threading.Event, on_batch: Callable[[Agent], None] | None
    ) -> None:
        pace = _Pacer(self.speed) if self.source.replay and self.speed else None
        for batch in self.source.batches(stop):
            if stop.is_set():
                break
            if pace is not None and not pace.wait(batch.at, stop):
                break
            self._handle(batch)
            if on_batch is not None:
                on_batch(self)

    def _handle(self, batch: Batch) -> None:
        samples = [s for s in batch.samples if self._recordable(s)]
        if recordable_time(batch.at):
            self.fire_timers(batch.at)
        fresh: dict[str, dict[str, Sample]] = {}
        for sample in samples:
            if sample.check_id not in self._known:
                fresh.setdefault(sample.system, {}).setdefault(sample.check_id, sample)
        for system, news in fresh.items():
            self._create_checks(system, list(news.values()))
        for sample in samples:
            self.process(sample)

    def _recordable(self, sample: Sample) -> bool:
        if recordable_time(sample.at):
            return True
        self.stats.invalid_times += 1
        if sample.check_id not in self._warned_times:
            self._warned_times.add(sample.check_id)
            logger.warning(
                "%s/%s: sample time %r is not between the years 1 and 9999; "
                "skipped (POSIX seconds expected)",
                CHECK_KIND,
                sample.check_id,
                sample.at,
            )
        return False

    def fire_timers(self, now: float) -> None:
        """Run, in time order, what time alone does up to ``now``.

        Two things happen with no sample: a check whose series has been
        silent for longer than its ``stale_after`` expires (see
        :func:`expire_check`), and an incident whose system has been healthy
        for ``resolve_after`` is resolved (due at or before ``now``). On a
        tie the resolution goes first.
        """
        while True:
            expiry = self._next_expiry(now)
            due = self.automation.next_due()
            if due is not None and due > now:
                due = None
            if expiry is None and due is None:
                return
            if due is not None and (expiry is None or due <= expiry[0]):
                self._follow(due)
                self.automation.fire_due(due)
                continue
            assert expiry is not None
            heapq.heappop(self._expiries)
            self._expire(expiry[1], expiry[0])

    def _next_expiry(self, now: float) -> tuple[float, str] | None:
        heap = self._expiries
        while heap and heap[0][0] < now:
            at, check_id = heap[0]
            if self._expires.get(check_id) == at:
                return heap[0]
            heapq.heappop(heap)
        return None

    def _schedule_expiry(self, check_id: str, last: float, rule: CheckRule) -> None:
        if rule.stale_after is None:
            return
        at = last + rule.stale_after
        self._expires[check_id] = at
        heapq.heappush(self._expiries, (at, check_id))

    def _expire(self, check_id: str, at: float) -> None:
        del self._expires[check_id]
        state = self.checks.get(check_id)
        if state is None or expire_check(state) is None:
            return
        self._follow(at)
        self.stats.expired += 1
        logger.info(
            "%s/%s: no sample since %s; back to healthy",
            CHECK_KIND,
            check_id,
            iso(at - (self._rules[check_id].stale_after or 0.0)),
        )

        def apply(prev: dict[str, Any] | None) -> dict[str, Any]:
            current = prev if prev is not None else state
            return expire_check(current) or current

        self._write(check_id, state["system"], state, expire_check(state), apply, at)

    def _follow(self, at: float) -> None:
        if self.clock is not None:
            self.clock.follow(at)

    def process(self, sample: Sample) -> None:
        """Judge one sample and write what it changes (see the class docs).

        A sample whose time the runtime cannot record (outside the years 1
        to 9999, or NaN) is counted in ``stats.invalid_times`` and dropped.
        """
        if not self._recordable(sample):
            return
        check_id = sample.check_id
        at = sample.at
        last = self._last_at.get(check_id)
        if last is not None and at < last:
            self.stats.out_of_order += 1
            self._skipped.inc()
            return

        stats = self.stats
        stats.samples += 1
        self._accepted.inc()
        if last == at:
            stats.repeated += 1
        if stats.first_at is None:
            stats.first_at = at
        stats.last_at = at
        self._last_at[check_id] = at
        self._follow(at)

        rule = self._rule(sample)
        value = sample.value
        if not math.isfinite(value):
            stats.non_finite += 1

        found = self.checks.get(check_id)
        if found is None:
            self._create_checks(sample.system, [sample])
            found = self.checks.get(check_id)
        state: Mapping[str, Any] = found or new_check_state(
            sample.system, sample.metric
        )
        level = rule.classify(value)
        nxt = step_check(state, level, value, at, rule)
        if not is_settled(nxt if nxt is not None else state):
            self._schedule_expiry(check_id, at, rule)
        if nxt is None:
            return

        def apply(prev: dict[str, Any] | None) -> Mapping[str, Any]:
            current = prev if prev is not None else state
            return step_check(current, level, value, at, rule) or current

        self._write(check_id, sample.system, state, nxt, apply, at)

    def _write(
        self,
        check_id: str,
        system: str,
        state: Any,
        nxt: Any,
        apply: Callable[[dict[str, Any] | None], Mapping[str, Any]],
        at: float,
    ) -> None:
        self.stats.check_writes += 1
        if nxt["status"] == state["status"]:
            self.checks.mutate(check_id, apply, actor=AGENT_ACTOR, at=at)
            return

        def write_health(_prev: Any) -> dict[str, Any]:
            self.checks.mutate(check_id, apply, actor=AGENT_ACTOR, at=at)
            return self._compute_health(system)

        self.health.mutate(system, write_health, actor=AGENT_ACTOR, at=at)
        self.stats.status_changes += 1
        self._status_metric.inc()
        self.status_changes.append(
            StatusChange(at, check_id, system, state["status"], nxt["status"])
        )
        logger.debug(
            "%s/%s: %s -> %s at %s",
            CHECK_KIND,
            check_id,
            state["status"],
            nxt["status"],
            iso(at),
        )
        # The automation must have seen this health change before the clock
        # moves on, or a resolution could be judged on stale health.
        self.runtime.drain(timeout=60.0, until_idle=True)

    def _create_checks(self, system: str, samples: list[Sample]) -> None:
        # One health write for all the new checks of a system in a batch, so
        # a first scrape of N series costs one health computation, not N.
        def write_health(_prev: Any) -> dict[str, Any]:
            for sample in samples:
                fresh = new_check_state(system, sample.metric)
                self.checks.mutate(
                    sample.check_id,
                    functools.partial(_keep_or, fresh),
                    actor=AGENT_ACTOR,
                    at=sample.at,
                )
                self.index.add(system, sample.check_id)
            return self._compute_health(system)

        at = max(sample.at for sample in samples)
        self.health.mutate(system, write_health, actor=AGENT_ACTOR, at=at)
        for sample in samples:
            self._known.add(sample.check_id)
            self._initial.setdefault(sample.check_id, (system, "healthy"))

    def _compute_health(self, system: str) -> dict[str, Any]:
        states = self.checks.get_many(self.index.checks_of(system))
        return summarise_checks(states.values())

    def _rule(self, sample: Sample) -> CheckRule:
        rule = self._rules.get(sample.check_id)
        if rule is None:
            rule = self.config.rule_for(sample.name)
            self._rules[sample.check_id] = rule
            if not rule.has_thresholds and sample.name not in self._warned:
                self._warned.add(sample.name)
                logger.info(
                    "%s/%s: no family with thresholds matches metric %r; "
                    "its checks stay healthy",
                    CHECK_KIND,
                    sample.check_id,
                    sample.name,
                )
        return rule

    def _last_change(self, check_id: str) -> float | None:
        if self.checks.get(check_id) is None:
            return None
        times = [
            since.timestamp()
            for field in ("status", "pending", "value")
            if (since := self.checks.in_state_since(check_id, field)) is not None
        ]
        return max(times) if times else None

    # -- the summary --------------------------------------------------------------

    def _summarise(self, seconds: float) -> AgentSummary:
        registry = self.runtime.metrics_registry
        triggers: dict[str, int] = {}
        changes: dict[str, int] = {}
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == "entity_runtime_triggers_total" and sample.value:
                    triggers[sample.labels["event"]] = int(sample.value)
                elif sample.name == "entity_runtime_changes_total" and sample.value:
                    changes[sample.labels["kind"]] = int(sample.value)

        events = self.timeline.events()
        incidents = build_incidents(events, self._opened_before)
        end = self.now()
        attribute_checks(incidents, self.status_changes, self._initial, end)

        systems = self.health.get_many(self.index.systems())
        summary = AgentSummary(
            source=self.source.description,
            stats=self.stats,
            checks=len(self.checks.ids()),
            systems={system: state["status"] for system, state in systems.items()},
            changes=self.stats.status_changes,
            entity_changes=dict(sorted(changes.items())),
            triggers=dict(sorted(triggers.items())),
            incidents=incidents,
            incidents_opened=sum(1 for e in events if e.event == "incident.created"),
            incidents_resolved=sum(1 for e in events if e.event == "incident.resolved"),
            seconds=seconds,
            dead_letters=len(self.runtime.dead_letters()),
            restored_checks=self._restored_checks,
            no_thresholds=sorted(self._warned),
        )
        invalid = getattr(self.source, "invalid", 0)
        summary.invalid_lines = self.stats.invalid_times + (
            invalid if isinstance(invalid, int) else 0
        )
        if isinstance(self.source, ReplaySource) and self.labels is not None:
            keys = {f.check_id: f.label_key for f in self.source.files}
            summary.labels = score_labels(incidents, self.labels, keys, end)
        return summary


def _keep_or(fresh: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
    return prev if prev is not None else fresh


class _Pacer:
    """Holds a replay back to ``speed`` times real time."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.first: float | None = None
        self.wall = 0.0

    def wait(self, at: float, stop: threading.Event) -> bool:
        if self.first is None:
            self.first, self.wall = at, time.monotonic()
            return True
        due = self.wall + (at - self.first) / self.speed
        # NOTE: wait in bounded steps: a tiny speed makes the delay larger
        # than a wait accepts (or infinite).
        while (delay := due - time.monotonic()) > 0:
            if stop.wait(min(delay, 3600.0)):
                return False
        return True


def _first_time(source: Source) -> float:
    if isinstance(source, ReplaySource):
        firsts = [
            f.times[0] for f in source.files if f.times and recordable_time(f.times[0])
        ]
        if firsts:
            return min(firsts)
    return time.time()
