from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pykka

from actors._mailbox import Mailbox, Taken
from runtime._delivery import DeadLetter, WorkQueue
from runtime._diff import diff_states
from runtime._errors import HandlerExitError
from runtime._events import EntityChanged, ReadOnlyDict
from runtime._metrics import RuntimeMetrics
from runtime._secrets import RunSecrets, mask_text, mask_value

logger = logging.getLogger(__name__)

WAKE = "wake"
"""The only message a consumer actor receives: its mailbox has work."""

TAKE_AT_ONCE = 256
"""Deliveries a consumer takes from its mailbox per lock; bounds its batch."""

_clock = time.perf_counter

WATCHDOG_CHECKS_PER_TIMEOUT = 4
"""How often the watchdog looks at a watched call within its timeout."""

_MIN_TICK = 0.005
_MAX_TICK = 1.0


class _ThreadRole(threading.local):
    kind_shard: tuple[str, int] | None = None
    consumer: str | None = None

    @property
    def internal(self) -> bool:
        return self.kind_shard is not None or self.consumer is not None


thread_role = _ThreadRole()
"""Marks runtime threads: ``kind_shard`` on kind actors, ``consumer`` on others."""


def call_handler(handler: Callable[..., Any], *args: Any) -> None:
    """Call a handler; run it to completion if it returns an awaitable.

    Raises:
        HandlerExitError: the handler raised something that is not an
            ``Exception`` (``SystemExit``, ``KeyboardInterrupt``, ...), which
            would otherwise stop every actor of the process.
    """
    try:
        result = handler(*args)
        if result is not None and inspect.isawaitable(result):

            async def _finish() -> Any:
                return await result

            asyncio.run(_finish())
    except Exception:
        raise
    except BaseException as exit_:
        raise _exit_error(exit_) from exit_


def call_user(function: Callable[..., Any], *args: Any) -> Any:
    """Call a deriver or payload mapper; see :func:`call_handler` on exits."""
    try:
        return function(*args)
    except Exception:
        raise
    except BaseException as exit_:
        raise _exit_error(exit_) from exit_


def _exit_error(exit_: BaseException) -> HandlerExitError:
    return HandlerExitError(
        f"raised {type(exit_).__name__}({exit_}); on a runtime thread this is a "
        "failed call, not a way to stop the program"
    )


def handler_name(handler: Callable[..., Any]) -> str:
    """A readable name for a handler, for logs and metric labels."""
    name = getattr(handler, "__qualname__", None) or type(handler).__name__
    module = getattr(handler, "__module__", None)
    return f"{module}.{name}" if module else name


class CallWatch:
    """The handler call in progress on one consumer actor, for the watchdog.

    The consumer thread stores the start of each handler call (of each
    attempt, for a work queue) in ``started`` and clears it when the call
    returns: two attribute stores per call. It also keeps ``batch``, the
    deliveries it took last; its mailbox's ``started`` says which of them is
    in hand. The :class:`Watchdog` reads ``started``; once a call has run for
    ``timeout`` seconds it takes the delivery over (:meth:`take_over`) and the
    runtime hands the rest of the batch to a replacement actor. Each actor has
    a watch of its own, so an abandoned thread never writes to its
    replacement's.

    NOTE: the consumer decides whether its call is still its own without a
    lock: it clears ``started``, then reads ``abandoned`` (and only when that
    is set asks :meth:`lost`, which waits for the lock). The watchdog sets
    ``abandoned`` under the lock and then reads ``started`` again, withdrawing
    if the call ended meanwhile. In any interleaving one of the two sees the
    other's store, so a delivery is finished by the consumer or by the
    watchdog, never by both and never by neither.
    """

    __slots__ = (
        "abandoned",
        "attempt",
        "batch",
        "handler",
        "lock",
        "name",
        "seqs",
        "started",
        "stopped",
        "timeout",
    )

    def __init__(self, name: str, handler: str, timeout: float) -> None:
        self.name = name
        self.handler = handler
        self.timeout = timeout
        self.started = 0.0
        self.abandoned = False
        self.stopped = False
        self.batch: Taken = []
        self.attempt = 1
        self.seqs: Sequence[int] = ()
        """The seqs of the delivery taken over, once it was."""
        self.lock = threading.Lock()

    def lost(self) -> bool:
        """Whether the watchdog took the call over; waits for its decision."""
        with self.lock:
            return self.abandoned

    def take_over(self, now: float) -> bool:
        """Abandon the call in progress if it has run ``timeout`` seconds.

        Returns True when it did: the delivery in hand and the rest of
        ``batch`` then belong to the caller, and the consumer thread, should
        its call ever return, does nothing more.
        """
        started = self.started
        if not started or now - started < self.timeout:
            return False

        with self.lock:
            if self.abandoned:
                return False
            self.abandoned = True
            if self.started != started:
                # The call returned (or the next one began) meanwhile.
                self.abandoned = False
                return False
        return True


class Retry:
    """A work-queue change whose attempt timed out, queued for the next one."""

    __slots__ = ("attempts", "change", "error")

    def __init__(self, change: EntityChanged, attempts: int, error: str) -> None:
        self.change = change
        self.attempts = attempts
        self.error = error


class Watchdog:
    """Finds handler calls that run past their timeout, on a daemon thread.

    The thread starts with the first :meth:`watch`, so a runtime without
    timeouts runs none. It looks at every watched call
    ``WATCHDOG_CHECKS_PER_TIMEOUT`` times per shortest timeout, so a call is
    taken over at most a quarter of its timeout late. For each call it takes
    over it runs ``on_overdue(owner, watch)`` on its own thread.
    """

    def __init__(self, on_overdue: Callable[[Any, CallWatch], None]) -> None:
        self._on_overdue = on_overdue
        self._watched: dict[CallWatch, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = _MAX_TICK

    def watch(self, watch: CallWatch, owner: Any) -> None:
        """Watch the calls of one consumer actor; does nothing once stopped."""
        with self._lock:
            if self._stop.is_set():
                return
            self._watched[watch] = owner
            tick = watch.timeout / WATCHDOG_CHECKS_PER_TIMEOUT
            self._tick = min(self._tick, max(_MIN_TICK, tick))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="entity-runtime-watchdog", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Stop watching and join the thread; harmless to call again."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def check(self, now: float) -> int:
        """Take over every watched call overdue at ``now``; return how many."""
        with self._lock:
            watched = list(self._watched.items())

        taken = 0
        for watch, owner in watched:
            if watch.stopped:
                self._forget(watch)
                continue
            if not watch.take_over(now):
                continue
            taken += 1
            self._forget(watch)
            try:
                self._on_overdue(owner, watch)
            except Exception:
                logger.exception(
                    "watchdog: replacing consumer %s after a timeout failed",
                    watch.name,
                )
        return taken

    def _forget(self, watch: CallWatch) -> None:
        with self._lock:
            self._watched.pop(watch, None)

    def _loop(self) -> None:
        while not self._stop.wait(self._tick):
            self.check(_clock())


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
        abort: threading.Event,
        delivery_seconds: Any,
        restarts: Any = None,
        flush: Callable[[], None] | None = None,
        watch: CallWatch | None = None,
    ) -> None:
        super().__init__()
        self._restarts = restarts
        self._flush = flush
        self._watch = watch
        self.mailbox = mailbox
        self._process = process
        self._abort = abort
        self._delivery_seconds = delivery_seconds

    def on_start(self) -> None:
        thread_role.consumer = self.mailbox.name

    def on_stop(self) -> None:
        if self._watch is not None:
            self._watch.stopped = True

    def on_receive(self, message: Any) -> None:
        if message != WAKE:
            logger.warning(
                "consumer %s got an unexpected message %r", self.mailbox.name, message
            )
            return
        watch = self._watch
        if watch is not None and watch.abandoned and watch.lost():
            return

        mailbox = self.mailbox
        while not self._abort.is_set():
            taken = mailbox.take_many(TAKE_AT_ONCE)
            if taken is None:
                return
            if not self._work_through(taken, watch):
                assert watch is not None
                logger.warning(
                    "consumer %s: the handler call on seq=%s abandoned after its "
                    "%g s timeout has returned; its thread stops without "
                    "delivering anything more",
                    mailbox.name,
                    ",".join(map(str, watch.seqs)),
                    watch.timeout,
                )
                return

    def _work_through(self, taken: Taken, watch: CallWatch | None) -> bool:
        # Handles one batch. With a watch the batch is shown to the watchdog,
        # and False is returned once the watchdog has taken the batch over:
        # the thread then leaves the tracker, the mailbox and every counter
        # (but the delivery times of what it finished) alone.
        mailbox = self.mailbox
        process, aborted, clock = self._process, self._abort.is_set, _clock
        if watch is not None:
            watch.batch = taken
        waited = []
        handled = 0
        try:
            for item, seqs, queued_at in taken:
                if aborted():
                    break
                mailbox.started = handled + 1
                try:
                    if item is not None:
                        process(item)
                except Exception:
                    if watch is not None and watch.abandoned and watch.lost():
                        return False
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
                if watch is not None and watch.abandoned and watch.lost():
                    return False
                waited.append(clock() - queued_at)
                handled += 1
            if self._flush is not None:
                # Before the batch's seqs are closed, so drain() also waits
                # for what the batch handed on.
                self._flush()
        finally:
            self._delivery_seconds.observe_many(waited)
            if watch is None or not (watch.abandoned and watch.lost()):
                self._release(taken, handled)
        return True

    def _release(self, taken: Taken, handled: int) -> None:
        # The mailbox closes the deliveries in the tracker.
        mailbox = self.mailbox
        mine = mailbox.release(taken)
        if len(mine) > handled:
            skipped = [seq for _, seqs, _ in mine[handled:] for seq in seqs]
            logger.warning(
                "consumer %s: the runtime stopped delivery; %d deliveries "
                "already taken are dropped (seqs %s)",
                mailbox.name,
                len(skipped),
                ", ".join(map(str, skipped)),
            )


def _run_pattern(
    secrets: RunSecrets | None, change: EntityChanged
) -> re.Pattern[str] | None:
    if secrets is None or change.run_id is None:
        return None
    return secrets.pattern(change.run_id)


def _shown_error(error: BaseException, pattern: re.Pattern[str] | None) -> str:
    # What a log line adds about a handler's failure: nothing without run
    # secrets (its traceback is logged), else the masked error text instead,
    # since a traceback repeats the message.
    if pattern is None:
        return ""
    return ": " + mask_text(f"{type(error).__name__}: {error}", pattern)


def broadcast_process(
    kind: str,
    name: str,
    handler: Callable[[EntityChanged], Any],
    metrics: RuntimeMetrics,
    watch: CallWatch | None = None,
    secrets: RunSecrets | None = None,
) -> Callable[[EntityChanged], None]:
    """Build the step that hands one change to a broadcast subscriber.

    With a ``watch``, each call is shown to the watchdog; a call it abandoned
    that raises later is neither counted nor logged again. A failure of a
    change whose run has ``secrets`` is logged as its masked text, without
    the traceback.
    """
    errors = metrics.subscriber_errors.labels(kind, name)

    def failed(change: EntityChanged, error: Exception) -> None:
        errors.inc()
        pattern = _run_pattern(secrets, change)
        logger.error(
            "subscriber %s failed on %s/%s seq=%d%s",
            name,
            change.kind,
            change.id,
            change.seq,
            _shown_error(error, pattern),
            exc_info=error if pattern is None else None,
        )

    def process(change: EntityChanged) -> None:
        try:
            call_handler(handler, change)
        except Exception as err:
            failed(change, err)

    if watch is None:
        return process

    def watched(change: EntityChanged) -> None:
        watch.started = _clock()
        try:
            call_handler(handler, change)
        except Exception as err:
            watch.started = 0.0
            if not (watch.abandoned and watch.lost()):
                failed(change, err)
        else:
            watch.started = 0.0

    return watched


def broadcast_timed_out(
    kind: str, name: str, metrics: RuntimeMetrics
) -> Callable[[Any, CallWatch], None]:
    """Build the step that accounts for a subscriber call that timed out."""

    def timed_out(change: EntityChanged, watch: CallWatch) -> None:
        metrics.subscriber_errors.labels(kind, name).inc()
        metrics.handler_timeouts.labels(kind, name).inc()
        logger.error(
            "subscriber %s timed out on %s/%s seq=%d: no return within %g s; the "
            "call is abandoned and a new consumer goes on with the next changes",
            name,
            change.kind,
            change.id,
            change.seq,
            watch.timeout,
        )

    return timed_out


def trigger_process(
    name: str,
    handler: Callable[[str, Any, EntityChanged], Any],
    metrics: RuntimeMetrics,
    watch: CallWatch | None = None,
    secrets: RunSecrets | None = None,
) -> Callable[[tuple[str, Any, EntityChanged]], None]:
    """Build the step that hands one trigger event to a trigger handler.

    With a ``watch``, each call is shown to the watchdog, and failures of a
    run with ``secrets`` are logged masked, as for :func:`broadcast_process`.
    """

    def failed(event: str, change: EntityChanged, error: Exception) -> None:
        metrics.subscriber_errors.labels(change.kind, name).inc()
        pattern = _run_pattern(secrets, change)
        logger.error(
            "trigger handler %s failed on %s for %s/%s seq=%d%s",
            name,
            event,
            change.kind,
            change.id,
            change.seq,
            _shown_error(error, pattern),
            exc_info=error if pattern is None else None,
        )

    def process(item: tuple[str, Any, EntityChanged]) -> None:
        event, payload, change = item
        try:
            call_handler(handler, event, payload, change)
        except Exception as err:
            failed(event, change, err)

    if watch is None:
        return process

    def watched(item: tuple[str, Any, EntityChanged]) -> None:
        event, payload, change = item
        watch.started = _clock()
        try:
            call_handler(handler, event, payload, change)
        except Exception as err:
            watch.started = 0.0
            if not (watch.abandoned and watch.lost()):
                failed(event, change, err)
        else:
            watch.started = 0.0

    return watched


def trigger_timed_out(
    name: str, metrics: RuntimeMetrics
) -> Callable[[Any, CallWatch], None]:
    """Build the step that accounts for a trigger handler call that timed out."""

    def timed_out(item: tuple[str, Any, EntityChanged], watch: CallWatch) -> None:
        event, _, change = item
        metrics.subscriber_errors.labels(change.kind, name).inc()
        metrics.handler_timeouts.labels(change.kind, name).inc()
        logger.error(
            "trigger handler %s timed out on %s for %s/%s seq=%d: no return within "
            "%g s; the call is abandoned and a new consumer goes on with the next "
            "events",
            name,
            event,
            change.kind,
            change.id,
            change.seq,
            watch.timeout,
        )

    return timed_out


class WorkGroup:
    """The handlers of one worker group for one kind, fed by one mailbox.

    Each change goes to one handler, picked by the change's id, so every id's
    changes reach the same handler in commit order. A failing call is retried
    after the group's backoff; after the last attempt the change becomes a dead
    letter. Retries wait on the consumer's own thread, which holds back the
    group's later changes: that is what keeps each id in order.

    An attempt that the watchdog abandons (``timeout``) counts as failed: the
    change is queued again ahead of the group's later changes as a
    :class:`Retry`, which the replacement consumer picks up after the backoff,
    or it is dead-lettered if that was the last attempt.

    The failures of a change whose run has ``secrets`` are logged and
    dead-lettered with those secrets masked, and logged without tracebacks.
    """

    def __init__(
        self,
        kind: str,
        spec: WorkQueue,
        metrics: RuntimeMetrics,
        abort: threading.Event,
        dead_letter: Callable[[DeadLetter], None],
        secrets: RunSecrets | None = None,
    ) -> None:
        self.kind = kind
        self.spec = spec
        self.handlers: list[tuple[str, Callable[[EntityChanged], Any]]] = []
        self._metrics = metrics
        self._abort = abort
        self._dead_letter = dead_letter
        self._secrets = secrets

    def process(
        self, item: EntityChanged | Retry, watch: CallWatch | None = None
    ) -> None:
        """Handle one change with retries; dead-letter it after the last try.

        With a ``watch``, each attempt is shown to the watchdog, and ``item``
        may be a :class:`Retry` of a change whose attempt timed out.
        """
        handlers = self.handlers
        if not handlers:
            return
        if isinstance(item, Retry):
            change, attempt, last_error = item.change, item.attempts, item.error
        else:
            change, attempt, last_error = item, 0, ""
        name, handler = handlers[hash(change.id) % len(handlers)]
        spec = self.spec
        errors = self._metrics.subscriber_errors.labels(self.kind, name)

        if attempt and self._abort.wait(spec.delay(attempt)):
            # A retry after a timed-out attempt, cut short by stop().
            stopped = f"runtime stopped before attempt {attempt + 1}; {last_error}"
            self.bury(change, name, stopped, attempt)
            return
        while attempt < spec.max_attempts:
            attempt += 1
            if watch is not None:
                watch.handler = name
                watch.attempt = attempt
                watch.started = _clock()
            try:
                call_handler(handler, change)
            except Exception as err:
                if watch is not None:
                    watch.started = 0.0
                    if watch.abandoned and watch.lost():
                        return
                errors.inc()
                pattern = _run_pattern(self._secrets, change)
                last_error = f"{type(err).__name__}: {err}"
                if pattern is not None:
                    last_error = mask_text(last_error, pattern)
                logger.warning(
                    "work queue %s: %s failed on %s/%s seq=%d (attempt %d of %d)%s",
                    spec.worker_group,
                    name,
                    change.kind,
                    change.id,
                    change.seq,
                    attempt,
                    spec.max_attempts,
                    "" if pattern is None else f": {last_error}",
                    exc_info=pattern is None,
                )
            else:
                if watch is not None:
                    watch.started = 0.0
                return
            if attempt < spec.max_attempts and self._abort.wait(spec.delay(attempt)):
                last_error = f"runtime stopped before attempt {attempt + 1}; " + (
                    last_error
                )
                break

        self.bury(change, name, last_error, attempt)

    def timed_out(self, item: EntityChanged | Retry, watch: CallWatch) -> Retry | None:
        """Account for an attempt the watchdog abandoned.

        Returns the :class:`Retry` to queue again, or ``None`` when that was
        the last attempt and the change is now a dead letter.
        """
        change = item.change if isinstance(item, Retry) else item
        name, attempt, spec = watch.handler, watch.attempt, self.spec
        error = f"TimeoutError: timed out after {watch.timeout:g} s; call abandoned"
        self._metrics.subscriber_errors.labels(self.kind, name).inc()
        self._metrics.handler_timeouts.labels(self.kind, name).inc()
        logger.error(
            "work queue %s: %s timed out on %s/%s seq=%d (attempt %d of %d): no "
            "return within %g s; the call is abandoned and a new consumer goes on",
            spec.worker_group,
            name,
            change.kind,
            change.id,
            change.seq,
            attempt,
            spec.max_attempts,
            watch.timeout,
        )
        if attempt < spec.max_attempts:
            return Retry(change, attempt, error)
        self.bury(change, name, error, attempt)
        return None

    def bury(self, change: EntityChanged, name: str, error: str, attempts: int) -> None:
        """Record ``change`` as a dead letter of ``name``'s group.

        ``error`` is masked with the secrets of the change's run, if any.
        """
        spec = self.spec
        pattern = _run_pattern(self._secrets, change)
        if pattern is not None:
            error = mask_text(error, pattern)

        letter = DeadLetter(
            worker_group=spec.worker_group,
            subscriber=name,
            change=change,
            error=error,
            attempts=attempts,
            failed_at=datetime.now(UTC),
        )
        self._metrics.dead_letters.labels(spec.worker_group).inc()
        logger.error(
            "work queue %s: %s/%s seq=%d dead-lettered after %d attempts: %s",
            spec.worker_group,
            change.kind,
            change.id,
            change.seq,
            attempts,
            error,
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
        self._derivers: tuple[Deriver, ...] = ()
        self._only: Deriver | None = None
        self._metrics = metrics
        self._errors = metrics.deriver_errors.labels(kind)
        self._trigger_boxes = trigger_boxes
        self._triggers: dict[str, Any] = {}
        self._fired: dict[str, int] = {}
        self._held: dict[Mailbox, list[tuple[Any, Any, int]]] = {}

    @property
    def derivers(self) -> tuple[Deriver, ...]:
        """The kind's derivers, in registration order."""
        return self._derivers

    @derivers.setter
    def derivers(self, derivers: tuple[Deriver, ...]) -> None:
        self._derivers = derivers
        only = derivers[0] if len(derivers) == 1 else None
        self._only = only if only is not None and only.to_payload is None else None

    def derive(self, change: EntityChanged) -> list[tuple[str, Any]]:
        """Return the ``(event, payload)`` pairs one change fires."""
        only = self._only
        if only is not None:
            # The common case, a single deriver without a payload mapper:
            # nothing to unite, and every payload is the change itself.
            try:
                names = call_user(only.derive, change)
                if type(names) is not list or not _all_str(names):
                    names = _event_names(names)
            except Exception as err:
                self._failed(
                    err, change, "deriver %s failed on %s/%s seq=%d%s", (only.name,)
                )
                return []
            if len(names) < 2:
                return [(names[0], change)] if names else []
            return [(event, change) for event in dict.fromkeys(names)]

        chosen: dict[str, Deriver] = {}
        for deriver in self.derivers:
            try:
                names = call_user(deriver.derive, change)
                if type(names) is not list or not _all_str(names):
                    names = _event_names(names)
            except Exception as err:
                self._failed(
                    err, change, "deriver %s failed on %s/%s seq=%d%s", (deriver.name,)
                )
                continue
            for event in names:
                chosen.setdefault(event, deriver)

        fired = []
        pattern = _run_pattern(self._secrets, change)
        for event, deriver in chosen.items():
            if deriver.to_payload is None:
                fired.append((event, change))
                continue
            try:
                payload = call_user(deriver.to_payload, change)
                if pattern is not None:
                    payload = mask_value(payload, pattern)
                fired.append((event, payload))
            except Exception as err:
                self._failed(
                    err,
                    change,
                    "payload mapper of %s failed for %s on %s/%s seq=%d%s",
                    (deriver.name, event),
                )
        return fired

    def _failed(
        self,
        error: Exception,
        change: EntityChanged,
        message: str,
        names: tuple[str, ...],
    ) -> None:
        # With run secrets the masked error text replaces the traceback,
        # which would repeat the message unmasked.
        self._errors.inc()
        pattern = _run_pattern(self._secrets, change)
        logger.error(
            message,
            *names,
            change.kind,
            change.id,
            change.seq,
            _shown_error(error, pattern),
            exc_info=error if pattern is None else None,
        )

    def process(self, change: EntityChanged) -> None:
        """Derive one change's events; hold them for their handlers until flush."""
        fired = self.derive(change)
        if not fired:
            return

        boxes = self._trigger_boxes()
        counts, held = self._fired, self._held
        for event, payload in fired:
            # Counted here, added to the metric once per batch by flush.
            counts[event] = counts.get(event, 0) + 1
            targets = boxes.get(event)
            if not targets:
                continue
            delivery = ((event, change.id), (event, payload, change), change.seq)
            for box in targets:
                waiting = held.get(box)
                if waiting is None:
                    held[box] = [delivery]
                else:
                    waiting.append(delivery)

    def flush(self) -> None:
        """Count the events fired since the last flush, then queue them for
        their handlers, one lock per box."""
        if self._fired:
            counts, self._fired = self._fired, {}
            triggers = self._triggers
            for event, count in counts.items():
                counter = triggers.get(event)
                if counter is None:
                    counter = triggers[event] = self._metrics.triggers.labels(event)
                counter.inc(count)

        held, self._held = self._held, {}
        for box, deliveries in held.items():
            if not box.put_many(deliveries):
                logger.error(
                    "%s: %d trigger events derived after %s was closed (the runtime "
                    "is stopping) are not delivered: %s",
                    self.kind,
                    len(deliveries),
                    box.name,
                    ", ".join(f"{item[0]} seq={seq}" for _, item, seq in deliveries),
                )


def _all_str(names: list[Any]) -> bool:
    if len(names) == 1:
        # The usual answer, checked without the generator all() needs.
        return type(names[0]) is str
    return all(type(name) is str for name in names)


def _event_names(names: Any) -> list[str]:
    """Check a deriver's answer that is not plainly a list of str."""
    if not isinstance(names, str):
        names = list(names)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"must return a list of event names, got {names!r}")
    return names  # type: ignore[no-any-return]


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
