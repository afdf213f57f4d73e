from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pykka

from actors._mailbox import DeliveryTracker, Mailbox, Taken
from runtime._delivery import DeadLetter, WorkQueue
from runtime._diff import diff_states
from runtime._events import EntityChanged, ReadOnlyDict
from runtime._metrics import RuntimeMetrics
from runtime._secrets import RunSecrets, mask_value

logger = logging.getLogger(__name__)

WAKE = "wake"
"""The only message a consumer actor receives: its mailbox has work."""

TAKE_AT_ONCE = 256
"""Deliveries a consumer takes from its mailbox per lock; bounds its batch."""

_clock = time.perf_counter


class _ThreadRole(threading.local):
    kind_shard: tuple[str, int] | None = None
    consumer: str | None = None

    @property
    def internal(self) -> bool:
        return self.kind_shard is not None or self.consumer is not None


thread_role = _ThreadRole()
"""Marks runtime threads: ``kind_shard`` on kind actors, ``consumer`` on others."""


def call_handler(handler: Callable[..., Any], *args: Any) -> None:
    """Call a handler; run it to completion if it returns an awaitable."""
    result = handler(*args)
    if inspect.isawaitable(result):

        async def _finish() -> Any:
            return await result

        asyncio.run(_finish())


def handler_name(handler: Callable[..., Any]) -> str:
    """A readable name for a handler, for logs and metric labels."""
    name = getattr(handler, "__qualname__", None) or type(handler).__name__
    module = getattr(handler, "__module__", None)
    return f"{module}.{name}" if module else name


def merge_changes(older: EntityChanged | None, newer: EntityChanged) -> Any:
    """Fold two queued changes of one id into one, or ``None`` if they cancel."""
    if older is None:
        return newer

    prev = older.prev
    next_state = newer.next
    if prev is None and next_state is None:
        return None
    delta, fields = diff_states(prev, next_state)
    if not fields:
        return None
    return EntityChanged(
        kind=newer.kind,
        id=newer.id,
        prev=prev,
        next=next_state,
        delta=ReadOnlyDict(delta),
        changed_fields=fields,
        actor=newer.actor,
        occurred_at=newer.occurred_at,
        seq=newer.seq,
        run_id=newer.run_id,
    )


def keep_newer(older: Any, newer: Any) -> Any:
    """Fold two queued trigger deliveries: the newer one wins."""
    return newer


class ConsumerActor(pykka.ThreadingActor):
    """A pykka actor that works through one :class:`Mailbox`.

    The pykka inbox only carries ``WAKE``; on each one the actor handles
    deliveries until its mailbox is empty (or the runtime aborts delivery), so
    one wake-up serves a whole burst. ``process`` must not raise: failures of
    user code are caught and accounted for by the process functions below.
    Runs on its own daemon thread, so that a handler stuck forever cannot keep
    the process alive after ``stop()`` gave up on it.
    """

    use_daemon_thread = True

    def __init__(
        self,
        mailbox: Mailbox,
        process: Callable[[Any], None],
        tracker: DeliveryTracker,
        abort: threading.Event,
        delivery_seconds: Any,
        restarts: Any = None,
        flush: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._restarts = restarts
        self._flush = flush
        self.mailbox = mailbox
        self._process = process
        self._tracker = tracker
        self._abort = abort
        self._delivery_seconds = delivery_seconds

    def on_start(self) -> None:
        thread_role.consumer = self.mailbox.name

    def on_receive(self, message: Any) -> None:
        if message != WAKE:
            logger.warning(
                "consumer %s got an unexpected message %r", self.mailbox.name, message
            )
            return

        mailbox = self.mailbox
        while not self._abort.is_set():
            taken = mailbox.take_many(TAKE_AT_ONCE)
            if taken is None:
                return
            self._work_through(taken)

    def _work_through(self, taken: Taken) -> None:
        mailbox = self.mailbox
        process, observe, clock = self._process, self._delivery_seconds.observe, _clock
        handled = 0
        try:
            for item, seqs, queued_at in taken:
                if self._abort.is_set():
                    break
                mailbox.started = handled + 1
                try:
                    if item is not None:
                        process(item)
                except Exception:
                    # Handlers' own failures are caught by the process step;
                    # this is a failure of the runtime's code. The consumer
                    # keeps no state between deliveries, so it carries on.
                    if self._restarts is not None:
                        self._restarts.inc()
                    logger.exception(
                        "consumer %s failed outside its handler on seqs=%s; the "
                        "delivery is dropped and the consumer carries on",
                        mailbox.name,
                        seqs,
                    )
                observe(clock() - queued_at)
                handled += 1
            if self._flush is not None:
                # Before the batch's seqs are closed, so drain() also waits
                # for what the batch handed on.
                self._flush()
        finally:
            mine = mailbox.release(taken)
            skipped = [seq for _, seqs, _ in mine[handled:] for seq in seqs]
            if skipped:
                logger.warning(
                    "consumer %s: the runtime stopped delivery; %d deliveries "
                    "already taken are dropped (seqs %s)",
                    mailbox.name,
                    len(skipped),
                    ", ".join(map(str, skipped[:20])),
                )
            self._tracker.done([seq for _, seqs, _ in mine for seq in seqs])


def broadcast_process(
    kind: str,
    name: str,
    handler: Callable[[EntityChanged], Any],
    metrics: RuntimeMetrics,
) -> Callable[[EntityChanged], None]:
    """Build the step that hands one change to a broadcast subscriber."""
    errors = metrics.subscriber_errors.labels(kind, name)

    def process(change: EntityChanged) -> None:
        try:
            call_handler(handler, change)
        except Exception:
            errors.inc()
            logger.exception(
                "subscriber %s failed on %s/%s seq=%d",
                name,
                change.kind,
                change.id,
                change.seq,
            )

    return process


def trigger_process(
    name: str,
    handler: Callable[[str, Any, EntityChanged], Any],
    metrics: RuntimeMetrics,
) -> Callable[[tuple[str, Any, EntityChanged]], None]:
    """Build the step that hands one trigger event to a trigger handler."""

    def process(item: tuple[str, Any, EntityChanged]) -> None:
        event, payload, change = item
        try:
            call_handler(handler, event, payload, change)
        except Exception:
            metrics.subscriber_errors.labels(change.kind, name).inc()
            logger.exception(
                "trigger handler %s failed on %s for %s/%s seq=%d",
                name,
                event,
                change.kind,
                change.id,
                change.seq,
            )

    return process


class WorkGroup:
    """The handlers of one worker group for one kind, fed by one mailbox.

    Each change goes to one handler, picked by the change's id, so every id's
    changes reach the same handler in commit order. A failing call is retried
    after the group's backoff; after the last attempt the change becomes a dead
    letter. Retries wait on the consumer's own thread, which holds back the
    group's later changes: that is what keeps each id in order.
    """

    def __init__(
        self,
        kind: str,
        spec: WorkQueue,
        metrics: RuntimeMetrics,
        abort: threading.Event,
        dead_letter: Callable[[DeadLetter], None],
    ) -> None:
        self.kind = kind
        self.spec = spec
        self.handlers: list[tuple[str, Callable[[EntityChanged], Any]]] = []
        self._metrics = metrics
        self._abort = abort
        self._dead_letter = dead_letter

    def process(self, change: EntityChanged) -> None:
        """Handle one change with retries; dead-letter it after the last try."""
        handlers = self.handlers
        if not handlers:
            return
        name, handler = handlers[hash(change.id) % len(handlers)]
        spec = self.spec
        errors = self._metrics.subscriber_errors.labels(self.kind, name)

        attempt = 0
        last_error = ""
        while attempt < spec.max_attempts:
            attempt += 1
            try:
                call_handler(handler, change)
                return
            except Exception as err:
                errors.inc()
                last_error = f"{type(err).__name__}: {err}"
                logger.warning(
                    "work queue %s: %s failed on %s/%s seq=%d (attempt %d of %d)",
                    spec.worker_group,
                    name,
                    change.kind,
                    change.id,
                    change.seq,
                    attempt,
                    spec.max_attempts,
                    exc_info=True,
                )
            if attempt < spec.max_attempts and self._abort.wait(spec.delay(attempt)):
                last_error = f"runtime stopped before attempt {attempt + 1}; " + (
                    last_error
                )
                break

        letter = DeadLetter(
            worker_group=spec.worker_group,
            subscriber=name,
            change=change,
            error=last_error,
            attempts=attempt,
            failed_at=datetime.now(UTC),
        )
        self._metrics.dead_letters.labels(spec.worker_group).inc()
        logger.error(
            "work queue %s: %s/%s seq=%d dead-lettered after %d attempts: %s",
            spec.worker_group,
            change.kind,
            change.id,
            change.seq,
            attempt,
            last_error,
        )
        self._dead_letter(letter)


class DeriverStage:
    """Turns one kind's changes into trigger events and hands them out.

    Derivers run in registration order; their outputs are united and
    de-duplicated. A deriver or payload mapper that raises (or returns
    something that is not a list of names) is skipped, logged and counted; the
    others still run. The payload of an event comes from the ``to_payload`` of
    the first deriver that named it (the change itself when it has none).
    """

    def __init__(
        self,
        kind: str,
        metrics: RuntimeMetrics,
        trigger_boxes: Callable[[], Mapping[str, tuple[Mailbox, ...]]],
        secrets: RunSecrets | None = None,
    ) -> None:
        self.kind = kind
        self._secrets = secrets
        self.derivers: tuple[Deriver, ...] = ()
        self._metrics = metrics
        self._errors = metrics.deriver_errors.labels(kind)
        self._trigger_boxes = trigger_boxes
        self._triggers: dict[str, Any] = {}
        self._held: dict[Mailbox, list[tuple[Any, Any, int]]] = {}

    def derive(self, change: EntityChanged) -> list[tuple[str, Any]]:
        """Return the ``(event, payload)`` pairs one change fires."""
        chosen: dict[str, Deriver] = {}
        for deriver in self.derivers:
            try:
                names = deriver.derive(change)
                if not isinstance(names, str):
                    names = list(names)
                if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                    raise TypeError(f"must return a list of event names, got {names!r}")
            except Exception:
                self._errors.inc()
                logger.exception(
                    "deriver %s failed on %s/%s seq=%d",
                    deriver.name,
                    change.kind,
                    change.id,
                    change.seq,
                )
                continue
            for event in names:
                chosen.setdefault(event, deriver)

        fired = []
        pattern = (
            None if self._secrets is None else self._secrets.pattern(change.run_id)
        )
        for event, deriver in chosen.items():
            if deriver.to_payload is None:
                fired.append((event, change))
                continue
            try:
                payload = deriver.to_payload(change)
                if pattern is not None:
                    payload = mask_value(payload, pattern)
                fired.append((event, payload))
            except Exception:
                self._errors.inc()
                logger.exception(
                    "payload mapper of %s failed for %s on %s/%s seq=%d",
                    deriver.name,
                    event,
                    change.kind,
                    change.id,
                    change.seq,
                )
        return fired

    def process(self, change: EntityChanged) -> None:
        """Derive one change's events; hold them for their handlers until flush."""
        fired = self.derive(change)
        if not fired:
            return

        boxes = self._trigger_boxes()
        triggers, held = self._triggers, self._held
        for event, payload in fired:
            counter = triggers.get(event)
            if counter is None:
                counter = triggers[event] = self._metrics.triggers.labels(event)
            counter.inc()
            delivery = ((event, change.id), (event, payload, change), change.seq)
            for box in boxes.get(event, ()):
                waiting = held.get(box)
                if waiting is None:
                    held[box] = [delivery]
                else:
                    waiting.append(delivery)

    def flush(self) -> None:
        """Queue the trigger events held since the last flush, one lock per box."""
        held, self._held = self._held, {}
        for box, deliveries in held.items():
            box.put_many(deliveries)


class Deriver:
    """One registered deriver with its optional payload mapper."""

    __slots__ = ("derive", "name", "to_payload")

    def __init__(
        self,
        derive: Callable[[EntityChanged], Any],
        to_payload: Callable[[EntityChanged], Any] | None,
    ) -> None:
        self.derive = derive
        self.to_payload = to_payload
        self.name = handler_name(derive)
