from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import inspect
import logging
import math
import os
import re
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import pykka

from actors._consumers import (
    CallWatch,
    ConsumerActor,
    Deriver,
    DeriverStage,
    Watchdog,
    WorkGroup,
    broadcast_process,
    broadcast_timed_out,
    call_handler,
    handler_name,
    keep_newer,
    merge_changes,
    thread_role,
    trigger_process,
    trigger_timed_out,
)
from actors._kind import (
    DEFAULT_WAKE_DELAY,
    MUTATE,
    REMOVE,
    BatchResult,
    KindActor,
    MutationFuture,
    Request,
    RequestQueue,
    WakeReleaser,
    new_request,
)
from actors._mailbox import DeliveryTracker, Mailbox
from runtime._delivery import Broadcast, DeadLetter, WorkQueue
from runtime._durability import (
    FSYNC_MODES,
    DataDir,
    RestoredData,
    RestoreError,
    check_restored_ids,
    check_restored_names,
    restore_into_log,
    restore_refusal,
    validated_states,
)
from runtime._engine import (
    MAX_ID_LENGTH,
    KindDefinition,
    KindEngine,
    check_entity_id,
    to_timestamp,
)
from runtime._errors import (
    DefinitionError,
    DeliveryTimeoutError,
    InvalidIdError,
    MaskedHandlerError,
    MutationBatchError,
    ReentrantCallError,
    RuntimeStoppedError,
    SchemaError,
    UnknownFieldError,
    UnknownKindError,
)
from runtime._events import SYSTEM_ACTOR, EntityChanged, ReadOnlyDict, Transition
from runtime._log import TransitionLog
from runtime._metrics import (
    DEFAULT_METRICS_ADDR,
    DEFAULT_METRICS_PORT,
    RuntimeMetrics,
)
from runtime._schema import compile_schema
from runtime._secrets import RunSecrets, mask_text

if TYPE_CHECKING:
    # Only for annotations: redis is imported when a bus is actually used.
    from runtime._redis_bus import (
        BroadcastReader,
        Delivery,
        PartitionMap,
        RedisBus,
        WorkQueueReader,
    )

logger = logging.getLogger(__name__)

S = TypeVar("S")

MAX_SHARDS = 256
"""The most shards (each an actor thread) one kind may have."""

NON_REACTIVE_REASONS = ("raw-sample", "sensitive", "externally-owned", "bookkeeping")
"""The reasons ``declare_non_reactive_state`` accepts."""

_NEW, _RUNNING, _STOPPING, _STOPPED = "new", "running", "stopping", "stopped"

_REMOTE_SEQ = 1 << 62
# Deliveries of changes committed by other instances are tracked under this
# number, above every local seq: drain() (which waits for local seqs) does not
# wait for them, while stop() and drain(until_idle=True) do.


@dataclasses.dataclass(frozen=True, slots=True)
class NonReactiveState:
    """State that is deliberately not an entity, and why."""

    name: str
    reason: str
    note: str


@dataclasses.dataclass(frozen=True, slots=True)
class StopReport:
    """What ``stop()`` could not finish.

    Attributes:
        clean: everything committed was delivered and every thread stopped.
        undelivered: ``(consumer, seq)`` pairs that never reached a consumer;
            ``(kind actor, seq)`` for a change committed in a burst whose
            actor was still stuck in a later write's ``apply``, so that no
            consumer got it.
        stuck_consumers: consumers whose handler was still running at the end.
        unpublished: committed changes the bus could not publish before it
            was closed (other instances never see them; always 0 without a
            bus).
        abandoned: consumers with a handler call that was abandoned after
            its timeout and had still not returned at the end (its daemon
            thread is left behind; the delivery was already accounted for).
        data_dir_errors: what went wrong with the data directory while
            stopping: a final snapshot that could not be written (the
            journal still holds every change; the next start replays it) or
            a journal whose last flush and fsync failed (changes since its
            previous fsync may not be on disk). Also logged.
    """

    clean: bool
    undelivered: tuple[tuple[str, int], ...] = ()
    stuck_consumers: tuple[str, ...] = ()
    unpublished: int = 0
    abandoned: tuple[str, ...] = ()
    data_dir_errors: tuple[str, ...] = ()


class Unsubscribe:
    """Calling it ends a subscription; calling it again does nothing."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel: Callable[[], None] | None = cancel
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()


class _Consumer:
    """One consumer actor and its mailbox (subscriber, trigger handler, ...).

    With a ``timeout``, each actor started for it gets a :class:`CallWatch`
    and runs the process step ``watched(watch)`` builds; ``timed_out(item,
    watch)`` accounts for a delivery whose call the watchdog abandoned and
    returns what to queue again (a work queue's retry) or ``None``.
    """

    def __init__(
        self,
        mailbox: Mailbox,
        process: Callable[[Any], None],
        flush: Callable[[], None] | None = None,
        *,
        label: str = "",
        timeout: float | None = None,
        watched: Callable[[CallWatch], Callable[[Any], None]] | None = None,
        timed_out: Callable[[Any, CallWatch], Any] | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.process = process
        self.flush = flush
        self.ref: pykka.ActorRef[Any] | None = None
        self.label = label
        self.timeout = timeout if watched is not None else None
        self.watched = watched
        self.timed_out = timed_out
        self.watch: CallWatch | None = None


class _Feed:
    """A bus reader serving one subscription, created when the runtime starts.

    Readers cannot be restarted once closed, so the reader is built by
    ``make`` on :meth:`start`; after :meth:`close` the feed stays closed.
    """

    def __init__(
        self, name: str, make: Callable[[], BroadcastReader | WorkQueueReader]
    ) -> None:
        self.name = name
        self._make = make
        self._reader: BroadcastReader | WorkQueueReader | None = None
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Create and start the reader, once; does nothing after close."""
        with self._lock:
            if self._closed or self._reader is not None:
                return
            self._reader = self._make().start()

    def close(self) -> None:
        """Close the reader (waiting for the handler call in progress)."""
        with self._lock:
            self._closed = True
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


class _BusWorkGroup:
    """The handlers of one worker group of one kind, fed by the bus.

    One :class:`WorkQueueReader` per group and kind hands each change to
    :meth:`handle` in the reader's thread; the change goes to one handler,
    picked by a stable hash of its id. A handler that raises is counted and
    the error passed on, so the reader retries and finally dead-letters it;
    for a change written with run secrets, the error passed on is a
    :class:`MaskedHandlerError`, since the reader logs it and stores it in
    the bus's dead letters.
    """

    def __init__(
        self,
        kind: str,
        spec: WorkQueue,
        metrics: RuntimeMetrics,
        secrets: RunSecrets,
    ) -> None:
        self.kind = kind
        self.spec = spec
        self.name = f"work_queue:{kind}:{spec.worker_group}"
        self.handlers: list[tuple[str, Callable[..., Any], bool]] = []
        self.feed: _Feed | None = None
        self._metrics = metrics
        self._secrets = secrets

    def handle(self, change: EntityChanged, delivery: Delivery) -> None:
        """Run the chosen handler; raises what it raised."""
        thread_role.consumer = self.name
        handlers = self.handlers
        if not handlers:
            return  # the group is being left; its reader is closing
        name, handler, wants_delivery = handlers[
            zlib.crc32(change.id.encode("utf-8", "surrogatepass")) % len(handlers)
        ]
        try:
            if wants_delivery:
                call_handler(handler, change, delivery)
            else:
                call_handler(handler, change)
        except Exception as err:
            self._metrics.subscriber_errors.labels(self.kind, name).inc()
            pattern = None
            if change.run_id is not None:
                pattern = self._secrets.pattern(change.run_id)
            if pattern is None:
                raise
            shown = mask_text(f"{type(err).__name__}: {err}", pattern)
        else:
            return
        # Raised outside the handler, so the unmasked error is not its context.
        raise MaskedHandlerError(shown)


def _takes_positional(handler: Callable[..., Any], count: int) -> bool:
    # Whether handler(*count arguments) binds; True when the signature is
    # unknown (some builtins), where only the call can tell.
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def _consumer_label(where: str, name: Any, handler: Callable[..., Any]) -> str:
    # The name a subscription is known by in logs and metric labels (which
    # escape any character); without one, the handler's own name.
    if name is None or name == "":
        return handler_name(handler)
    if type(name) is not str:
        raise DefinitionError(
            f"{where}: name must be a string or None, got {name!r:.80}; nothing "
            "subscribed"
        )
    if len(name) > MAX_ID_LENGTH:
        raise DefinitionError(
            f"{where}: name {name[:40]!r}... is longer than {MAX_ID_LENGTH} "
            "characters; nothing subscribed"
        )
    return name


def _wants_delivery(handler: Callable[..., Any]) -> bool:
    # A handler with two required positional parameters gets the Delivery.
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty
    ]
    return len(positional) >= 2


class _Kind:
    """Everything the runtime keeps about one kind."""

    def __init__(self, definition: KindDefinition, engine: KindEngine) -> None:
        self.definition = definition
        self.engine = engine
        self.refs: list[pykka.ActorRef[Any]] = []
        self.queues: list[RequestQueue] = []
        self.boxes: tuple[Mailbox, ...] = ()
        self.stage: DeriverStage | None = None
        self.deriver: _Consumer | None = None
        self.groups: dict[str, tuple[WorkGroup, _Consumer]] = {}
        self.bus_groups: dict[str, _BusWorkGroup] = {}

    @property
    def deriver_box(self) -> Mailbox | None:
        return None if self.deriver is None else self.deriver.mailbox


def _as_timestamp(value: datetime | float | None, what: str) -> float | None:
    # A query's time bound as POSIX seconds; None (no bound) stays None.
    if value is None:
        return None
    return to_timestamp(value, time.time, what, "nothing returned")


class EntityHandle(Generic[S]):
    """The typed handle of one kind, returned by ``Runtime.define_entity``.

    Writes go through ``mutate``/``remove`` (blocking) or their ``_async``
    forms (returning a :class:`MutationFuture`). Reads never block on the
    kind's actor: they read the store (or call the kind's ``read``) and the
    transition log directly.
    """

    def __init__(self, runtime: Runtime, kind: str) -> None:
        self._rt = runtime
        self.kind = kind
        self._entry = runtime._kinds.get(kind)
        # A kind is never undefined, so its entry is looked up once; the
        # entry's actors and queues still change with start() and stop().
        self._one_shard = self._entry is not None and self._entry.definition.shards == 1

    def __repr__(self) -> str:
        return f"EntityHandle({self.kind!r})"

    def mutate(
        self,
        entity_id: str,
        apply: Callable[[dict[str, Any] | None], Any],
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
        at: datetime | float | None = None,
    ) -> ReadOnlyDict:
        """Change one entity through the single write path and wait for it.

        ``apply(prev)`` gets a mutable copy of the current state (``None`` if
        the entity does not exist) and returns the next state. The runtime
        validates it, diffs it against ``prev`` and, only on a real change,
        records it and emits one ``EntityChanged``.

        Args:
            entity_id: the entity's id.
            apply: builds (or, for a plugin-backed kind, writes) the next state.
            actor: who makes the write.
            run_id: the run the write belongs to.
            at: the time to record (default: the runtime's clock).

        Returns:
            The validated next state, read-only.

        Raises:
            SchemaError: the next state failed the schema; nothing recorded.
            ApplyError: ``apply`` raised; nothing recorded.
            RuntimeStoppedError: the runtime is not running.
        """
        return self.mutate_async(entity_id, apply, actor, run_id, at).get()

    def mutate_async(
        self,
        entity_id: str,
        apply: Callable[[dict[str, Any] | None], Any],
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
        at: datetime | float | None = None,
    ) -> MutationFuture[ReadOnlyDict]:
        """Submit a mutation without waiting; see :meth:`mutate`.

        Mutations of one id submitted from one thread are applied in
        submission order.
        """
        # The common write is handled here, a call shorter than through
        # Runtime._submit: no run, no time, no partition map, one shard, not
        # from a kind's actor, an id and an actor that already passed their
        # checks, and a gate open to every writer. Any other write takes
        # Runtime._submit and every check there.
        runtime = self._rt
        if (
            run_id is None
            and at is None
            and type(entity_id) is str
            and entity_id in _IDS_SEEN
            and type(actor) is str
            and actor in _ACTORS_SEEN
            and callable(apply)
            and self._one_shard
            and runtime.partitions is None
            and thread_role.kind_shard is None
        ):
            queues = self._entry.queues  # type: ignore[union-attr]
            if queues:
                queue = queues[0]
                future: MutationFuture[ReadOnlyDict] = MutationFuture(queue.completion)
                if queue.submit(
                    new_request(MUTATE, entity_id, apply, actor, None, None, future)
                ):
                    return future
        return runtime._submit(
            self.kind, MUTATE, entity_id, apply, actor, run_id, at, self._entry
        )

    def mutate_many(
        self,
        items: Iterable[tuple[str, Callable[[dict[str, Any] | None], Any]]],
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
        at: datetime | float | None = None,
        timeout: float | None = None,
    ) -> list[ReadOnlyDict]:
        """Apply many mutations in one call and wait for all of them.

        Each ``(id, apply)`` item goes through the single write path exactly as
        with :meth:`mutate` (each id still serialised, each real change its own
        event and sequence number); the items of one id are applied in the
        order given. Handing them over in one step is what makes this the
        fastest way to write many entities.

        Returns:
            The validated next states, in the order of ``items``.

        Raises:
            MutationBatchError: some items failed; every other item was
                applied, and the error holds each item's result or error.
            RuntimeStoppedError: the runtime is not running; nothing applied.
            DeliveryTimeoutError: not every item finished within ``timeout``.
        """
        batch = self._rt._submit_many(self.kind, list(items), actor, run_id, at)
        if not batch.wait(timeout):
            raise DeliveryTimeoutError(
                f"{self.kind}: mutate_many did not finish within {timeout} s"
            )
        if batch.errors:
            raise MutationBatchError(batch.results, dict(batch.errors))
        return batch.results

    def remove(
        self,
        entity_id: str,
        apply: Callable[[dict[str, Any] | None], Any] | None = None,
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
        at: datetime | float | None = None,
    ) -> bool:
        """Remove one entity (the tombstone) and wait for it.

        ``apply(prev)``, if given, performs the caller's own delete. Removing
        an entity that does not exist is a no-op: ``apply`` is not called.

        Returns:
            True if the entity existed and was removed.
        """
        return bool(self.remove_async(entity_id, apply, actor, run_id, at).get())

    def remove_async(
        self,
        entity_id: str,
        apply: Callable[[dict[str, Any] | None], Any] | None = None,
        actor: str = SYSTEM_ACTOR,
        run_id: str | None = None,
        at: datetime | float | None = None,
    ) -> MutationFuture[bool]:
        """Submit a removal without waiting; see :meth:`remove`."""
        return self._rt._submit(
            self.kind, REMOVE, entity_id, apply, actor, run_id, at, self._entry
        )

    def get(self, entity_id: str) -> ReadOnlyDict | None:
        """Return the current state (read-only), or ``None`` if it does not exist."""
        check_entity_id(self.kind, entity_id)
        return self._rt._engine(self.kind).read_states([entity_id]).get(entity_id)

    def get_many(self, entity_ids: Iterable[str]) -> dict[str, ReadOnlyDict]:
        """Return the current states of the ids that exist, in one batched read.

        Raises:
            TypeError: ``entity_ids`` is a single string or not iterable.
            InvalidIdError: one of the ids is not a usable id.
        """
        if isinstance(entity_ids, str | bytes) or not isinstance(entity_ids, Iterable):
            raise TypeError(
                f"{self.kind}: get_many takes an iterable of ids, got "
                f"{entity_ids!r:.80}; use get() for a single id"
            )

        ids = [check_entity_id(self.kind, i) for i in entity_ids]
        return self._rt._engine(self.kind).read_states(ids)

    @property
    def store_backed(self) -> bool:
        """Whether the runtime keeps this kind's state (no ``read`` given)."""
        return self._rt._engine(self.kind).definition.store_backed

    def ids(self) -> list[str]:
        """Return the ids of a store-backed kind's entities."""
        engine = self._rt._engine(self.kind)
        if not engine.definition.store_backed:
            raise DefinitionError(
                f"{self.kind} is plugin-backed: its ids live in the caller's storage"
            )
        return list(engine.store)

    def history(
        self,
        entity_id: str,
        field: str | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
    ) -> list[Transition]:
        """Return the entity's transition rows in commit order.

        ``since`` is inclusive and ``until`` exclusive. Cost: O(log n + k).

        Raises:
            InvalidIdError: ``entity_id`` is not a usable id.
            UnknownFieldError: ``field`` is not in the schema and was never
                recorded for this entity.
        """
        check_entity_id(self.kind, entity_id)
        if field is not None:
            self._check_field(entity_id, field, "history()")
        return self._rt.log.history(
            self.kind,
            entity_id,
            field,
            _as_timestamp(since, "history()'s since"),
            _as_timestamp(until, "history()'s until"),
        )

    def in_state_since(self, entity_id: str, field: str) -> datetime | None:
        """When ``field`` last changed, or ``None`` if the entity does not exist.

        Raises:
            InvalidIdError: ``entity_id`` is not a usable id.
            UnknownFieldError: ``field`` is not in the schema and was never
                recorded for this entity.
        """
        if self.get(entity_id) is None:
            return None
        self._check_field(entity_id, field, "in_state_since()")
        row = self._rt.log.last_change(self.kind, entity_id, field)
        return None if row is None else row.at

    def in_state_for(self, entity_id: str, field: str) -> timedelta | None:
        """How long ``field`` has held its value, by the runtime's clock."""
        since = self.in_state_since(entity_id, field)
        if since is None:
            return None
        return timedelta(seconds=self._rt.clock() - since.timestamp())

    def transition_count(
        self, entity_id: str, field: str, window: timedelta | float
    ) -> int:
        """Count the changes of ``field`` within the last ``window``."""
        seconds = _check_seconds(
            "transition_count()'s window",
            window,
            zero=True,
            timedelta_ok=True,
            outcome="nothing counted",
        )
        check_entity_id(self.kind, entity_id)
        self._check_field(entity_id, field, "transition_count()")
        since = self._rt.clock() - seconds
        return self._rt.log.count_since(self.kind, entity_id, field, since)

    def _check_field(self, entity_id: str, field: Any, call: str) -> None:
        # A field a query may name: one of the schema's, or one that rows of
        # this entity hold (a field since removed from the schema).
        if type(field) is not str:
            raise TypeError(
                f"{self.kind}: {call}'s field must be a field name (a string), "
                f"got {field!r:.80}"
            )
        fields = self._rt._engine(self.kind).definition.schema.fields
        if field in fields or self._rt.log.has_field(self.kind, entity_id, field):
            return
        raise UnknownFieldError(self.kind, field, fields)

    def wait_until(
        self,
        entity_id: str,
        predicate: Callable[[ReadOnlyDict | None], bool],
        timeout: float = 5.0,
    ) -> ReadOnlyDict | None:
        """Wait until the entity's state satisfies ``predicate``; return it.

        The predicate is checked now and then after each commit of this
        entity (woken by the commit, never by polling).

        Raises:
            DeliveryTimeoutError: the predicate did not hold within ``timeout``.
            ReentrantCallError: called from inside an ``apply`` (on a kind's
                actor thread, which would hold up the writes it waits for).
        """
        if not callable(predicate):
            raise TypeError(
                f"{self.kind}: wait_until()'s predicate must be callable (state -> "
                f"bool), got {predicate!r:.80}; nothing waited for"
            )
        timeout = _check_seconds(
            "wait_until()'s timeout", timeout, zero=True, outcome="nothing waited for"
        )
        return self._rt._wait_until(self.kind, entity_id, predicate, timeout)


class Runtime:
    """An in-memory runtime of reactive entities on pykka actors.

    Define kinds, derivers and subscribers, then ``start()`` (or use ``with``).
    Each kind runs on its own actor(s), which serialise the mutations of each
    id; derivers, trigger handlers and subscribers each run on their own actor
    behind a bounded mailbox, so a slow consumer never blocks a writer or
    another consumer.

    Args:
        clock: returns the current POSIX time in seconds (default
            ``time.time``); see ``runtime.testing.FakeClock``.
        mailbox_size: deliveries a consumer may have waiting before its
            mailbox starts folding changes of the same id together (and, for
            the deriver stage, before writers are held back).
        backpressure_timeout: how long a writer waits for a full deriver stage
            before its mutation is refused.
        stop_timeout: how long ``stop()`` waits for deliveries to finish.
        max_dead_letters: how many dead letters are kept (oldest dropped).
        data_dir: where to keep snapshots and the journal; ``None`` keeps
            everything in memory only. Restored at ``start()``.
        journal_fsync: ``"always"`` (every change is on disk before its
            mutation returns), ``"interval"`` (fsynced in the background at
            most ``journal_interval`` seconds later) or ``"never"``.
        journal_interval: see ``journal_fsync``.
        snapshot_every: take a snapshot after this many changes (``None``:
            only on demand and at ``stop()``).
        snapshot_interval: also take one after this many seconds with changes.
        keep_snapshots: how many snapshots to keep (older ones are pruned,
            with the journal they make unnecessary).
        retention_max_age: drop log rows older than this many seconds (by the
            runtime's clock); ``None`` keeps them whatever their age.
        retention_max_rows: keep at most this many rows per entity (the newest
            row of each field always stays); ``None`` for no limit.
        retention_removed_after: forget every row of a removed entity this
            long (seconds or a timedelta) after its tombstone.
        housekeeping_interval: how often the background thread checks for
            snapshots and retention, in seconds.
        recover_damaged: when the journal is damaged before its end (not a
            torn last record), start from the changes before the damage
            instead of refusing with ``RestoreError``; the damaged files are
            renamed ``*.damaged`` and kept.
        metrics: ``False`` turns every Prometheus series into a no-op (the
            registry stays, empty), for measuring what counting costs.
        bus: a ``runtime.RedisBus`` shared with other instances, or ``None``
            (the default: one process, nothing imports redis). With a bus,
            every committed change is also published to it (errors are logged,
            never raised into the write); ``broadcast()`` subscribers also
            receive the changes other instances commit; ``work_queue(group)``
            subscriptions share each change among the instances of the group
            (at least once) instead of handling local changes locally. The
            runtime closes the bus in ``stop()``.
        partitions: a ``runtime.PartitionMap`` naming the bus's instance:
            writes for ids another instance owns are refused with
            ``NotOwnerError`` before anything is queued. Needs ``bus``. At
            ``start()`` it is compared with the maps the other instances
            recorded on the bus (``RedisBus.record_partition_map``).
        handler_timeout: seconds a subscriber or trigger handler call may run
            before it is treated as failed, for subscriptions that give no
            ``timeout`` of their own; ``None`` (the default) sets no limit.
            See ``on_entity_changed``.
        freeze_gc: move everything alive to Python's permanent GC generation
            (``gc.freeze()``) after a restore, after each snapshot and once a
            minute of housekeeping, and ``gc.unfreeze()`` at ``stop()``. The
            cycle collector then no longer walks millions of long-lived states
            and index arrays, which otherwise pauses every thread for a second
            or more at a million entities. Objects frozen are still freed when
            their last reference goes; only reference cycles alive at a freeze
            wait for ``stop()``. Process-wide: for a program built around one
            runtime (the agent turns it on), not for one that freezes the
            collector itself.
        wake_delay: the longest a committed change waits before its
            subscribers and deriver stage are woken, in seconds (at most 1).
            Kind actors hold wake-ups back while writes keep coming, so that
            consumer threads do not wake after every change of a stream of
            blocking writes; ``0`` wakes them after every burst of writes.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        mailbox_size: int = 10_000,
        backpressure_timeout: float = 5.0,
        stop_timeout: float = 10.0,
        max_dead_letters: int = 10_000,
        data_dir: str | os.PathLike[str] | None = None,
        journal_fsync: str = "always",
        journal_interval: float = 0.05,
        snapshot_every: int | None = 100_000,
        snapshot_interval: float | None = 300.0,
        keep_snapshots: int = 2,
        retention_max_age: float | timedelta | None = None,
        retention_max_rows: int | None = 10_000,
        retention_removed_after: float | timedelta = 86_400.0,
        housekeeping_interval: float = 1.0,
        recover_damaged: bool = False,
        metrics: bool = True,
        bus: RedisBus | None = None,
        partitions: PartitionMap | None = None,
        handler_timeout: float | None = None,
        freeze_gc: bool = False,
        wake_delay: float = DEFAULT_WAKE_DELAY,
    ) -> None:
        mailbox_size = _check_count("mailbox_size", mailbox_size)
        if not isinstance(journal_fsync, str) or journal_fsync not in FSYNC_MODES:
            raise DefinitionError(
                f"journal_fsync must be one of {', '.join(FSYNC_MODES)}, got "
                f"{journal_fsync!r}; nothing started"
            )
        backpressure_timeout = _check_seconds(
            "backpressure_timeout", backpressure_timeout, zero=True
        )
        stop_timeout = _check_seconds("stop_timeout", stop_timeout, zero=True)
        wake_delay = _check_seconds(
            "wake_delay", wake_delay, zero=True, most=_LONGEST_WAKE_DELAY
        )
        max_dead_letters = _check_count("max_dead_letters", max_dead_letters)
        journal_interval = _check_seconds("journal_interval", journal_interval)
        snapshot_every = _check_count("snapshot_every", snapshot_every, none=True)
        snapshot_interval = _check_seconds(
            "snapshot_interval", snapshot_interval, none=True
        )
        keep_snapshots = _check_count("keep_snapshots", keep_snapshots)
        max_age = _check_seconds(
            "retention_max_age", retention_max_age, none=True, timedelta_ok=True
        )
        retention_max_rows = _check_count(
            "retention_max_rows", retention_max_rows, none=True
        )
        removed_after = _check_seconds(
            "retention_removed_after",
            retention_removed_after,
            zero=True,
            timedelta_ok=True,
        )
        housekeeping_interval = _check_seconds(
            "housekeeping_interval", housekeeping_interval
        )
        if clock is not None and not callable(clock):
            raise DefinitionError(
                f"clock must be a function returning POSIX seconds, or None, got "
                f"{clock!r}; nothing started"
            )
        if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
            raise DefinitionError(
                f"data_dir must be a path (str or os.PathLike) or None, got "
                f"{data_dir!r}; nothing started"
            )
        for flag, value in (
            ("recover_damaged", recover_damaged),
            ("metrics", metrics),
            ("freeze_gc", freeze_gc),
        ):
            if not isinstance(value, bool):
                raise DefinitionError(
                    f"{flag} must be True or False, got {value!r}; nothing started"
                )

        self._handler_timeout = _check_seconds(
            "handler_timeout", handler_timeout, none=True
        )
        self._freeze_gc = freeze_gc
        self._retiring: list[tuple[str, Any]] = []
        """Stops of the actors of ended subscriptions, awaited by stop()."""
        self._watchdog = Watchdog(self._take_over)
        self._abandoned: list[CallWatch] = []
        if partitions is not None:
            if bus is None:
                raise DefinitionError(
                    "partitions need a bus: ownership is checked for the bus's "
                    "instance_id"
                )
            if bus.instance_id not in partitions.instances:
                raise DefinitionError(
                    f"the bus's instance {bus.instance_id!r} is not one of the "
                    f"partition map's instances {list(partitions.instances)!r}"
                )
        self.bus = bus
        """The change bus given at construction, or ``None``."""
        self.partitions = partitions
        """Which instance owns each id, or ``None`` (every id is writable)."""
        self._instance_id = "" if bus is None else bus.instance_id
        self._feeds: list[_Feed] = []
        self.clock: Callable[[], float] = clock if clock is not None else time.time
        self.log = TransitionLog()
        self.metrics = RuntimeMetrics(enabled=metrics)
        self.metrics_registry = self.metrics.registry
        self.metrics.log_rows.set_function(lambda: len(self.log))
        self._mailbox_size = mailbox_size
        self._backpressure_timeout = backpressure_timeout
        self._wake_delay = wake_delay
        self._releaser = WakeReleaser()
        self._stop_timeout = stop_timeout
        self._max_dead_letters = max_dead_letters

        self._lock = threading.RLock()
        self._state = _NEW
        self._stop_report: StopReport | None = None
        self._stopped = threading.Event()
        self._tracker = DeliveryTracker()
        self._abort = threading.Event()
        self._kinds: dict[str, _Kind] = {}
        self._non_reactive: dict[str, NonReactiveState] = {}
        self._consumers: list[_Consumer] = []
        self._trigger_boxes: dict[str, tuple[Mailbox, ...]] = {}
        self._names: dict[str, int] = {}
        self._waiters: dict[tuple[str, str], tuple[threading.Event, ...]] = {}
        self._waiters_lock = threading.Lock()
        self._dead_letters: list[DeadLetter] = []
        self._dead_lock = threading.Lock()
        self._secrets = RunSecrets()

        self._data_dir = (
            None
            if data_dir is None
            else DataDir(
                data_dir,
                journal_fsync,
                journal_interval,
                keep_snapshots,
                recover_damaged,
            )
        )
        self._snapshot_every = snapshot_every
        self._snapshot_interval = snapshot_interval
        self._retention_max_age = max_age
        self._retention_max_rows = retention_max_rows
        self._retention_removed_after = removed_after
        self._housekeeping_interval = housekeeping_interval
        self._housekeeper: threading.Thread | None = None
        self._housekeeping_stop = threading.Event()
        self._orphans: dict[str, tuple[bool, dict[str, Any]]] = {}
        self.restored: RestoredData | None = None
        """What ``start()`` restored from ``data_dir`` (``None`` without one):
        where from, up to which seq, and any damage; its ``changes`` and
        ``states`` are left empty, since the log and the store hold them."""
        self._snapshot_seconds = (
            None
            if self._data_dir is None
            else self.metrics.add_snapshot_metrics(self._seconds_since_snapshot)
        )
        if bus is not None:
            self.metrics.add_bus_metrics(bus)
            bus.on_too_large(self._keep_unpublished)

    # -- definitions ----------------------------------------------------------

    def define_entity(
        self,
        kind: str,
        state: Any,
        read: Callable[[list[str]], Mapping[str, Any]] | None = None,
        *,
        shards: int = 1,
    ) -> EntityHandle[Any]:
        """Define a kind and return its handle.

        Args:
            kind: a unique, non-empty name.
            state: the schema of the state (dataclass, pydantic model or
                msgspec Struct).
            read: for a plugin-backed kind, ``read(ids) -> {id: state}``
                reading the caller's own storage; ``None`` for a store-backed
                kind, whose state the runtime keeps.
            shards: how many actors share the kind's ids (by hash of the id).
                One is enough unless a slow ``apply`` of one id must not hold
                up the others.

        Raises:
            DefinitionError: empty or duplicate kind, a ``read`` that is not
                callable, a schema that is not supported or has no fields, bad
                ``shards``.
            RestoreError: defined after ``start()``, the kind's restored states
                fail its schema (or hold a bad id); the kind stays undefined
                and its restored data stays kept.
        """
        if not isinstance(kind, str) or not kind or not kind.isprintable():
            raise DefinitionError(
                f"kind must be a non-empty printable string, got {kind!r}"
            )
        if len(kind) > MAX_ID_LENGTH:
            raise DefinitionError(
                f"kind {kind[:40]!r}... is longer than {MAX_ID_LENGTH} characters"
            )
        if read is not None and not callable(read):
            raise DefinitionError(
                f"{kind}: read must be callable (ids -> {{id: state}}) or None, "
                f"got {read!r}"
            )
        if type(shards) is not int or not 1 <= shards <= MAX_SHARDS:
            raise DefinitionError(
                f"{kind}: shards must be a whole number from 1 to {MAX_SHARDS} (each "
                f"shard is a thread), got {shards!r}"
            )
        schema = compile_schema(state)
        if not schema.fields:
            raise DefinitionError(
                f"{kind}: the state schema {schema.name} has no fields; a change "
                "is recorded field by field, so an entity of such a kind could "
                "never be created"
            )

        with self._lock:
            self._check_usable("define a kind")
            if kind in self._kinds:
                raise DefinitionError(f"kind {kind!r} is already defined")

            definition = KindDefinition(kind, schema, read, shards)
            restored = self._restored_orphans(definition)
            engine = KindEngine(
                definition, self.log, self.metrics, self.clock, self._on_commit
            )
            entry = _Kind(definition, engine)
            self._kinds[kind] = entry
            engine.secrets = self._secrets
            if self._data_dir is not None:
                engine.journal = self._data_dir.journal
            self._orphans.pop(kind, None)
            engine.store.update(restored)
            if self._state == _RUNNING:
                self._start_kind(entry)

        logger.debug("defined kind %s (%s)", kind, schema.name)
        return EntityHandle(self, kind)

    def handle(self, kind: str) -> EntityHandle[Any]:
        """Return the handle of a defined kind."""
        self._kind(kind)
        return EntityHandle(self, kind)

    def kinds(self) -> list[str]:
        """Return the defined kinds, in definition order."""
        return list(self._kinds)

    def declare_non_reactive_state(
        self, name: str, reason: str, note: str = ""
    ) -> None:
        """Record state that is deliberately not an entity.

        Args:
            name: what the state is called.
            reason: one of ``raw-sample``, ``sensitive``, ``externally-owned``,
                ``bookkeeping``.
            note: a free-text explanation.
        """
        if not isinstance(name, str) or not name:
            raise DefinitionError(f"name must be a non-empty string, got {name!r}")
        if reason not in NON_REACTIVE_REASONS:
            raise DefinitionError(
                f"{name}: reason must be one of {', '.join(NON_REACTIVE_REASONS)}, "
                f"got {reason!r}"
            )
        with self._lock:
            if name in self._non_reactive:
                raise DefinitionError(f"{name!r} is already declared")
            self._non_reactive[name] = NonReactiveState(name, reason, note)

    def non_reactive_states(self) -> list[NonReactiveState]:
        """Return the non-reactive state declarations, in declaration order."""
        return list(self._non_reactive.values())

    def register_change_deriver(
        self,
        kind: str,
        derive: Callable[[EntityChanged], Iterable[str]],
        to_payload: Callable[[EntityChanged], Any] | None = None,
    ) -> None:
        """Register a pure function from a change to trigger event names.

        Several derivers may serve one kind: their names are united in
        registration order without repeats. ``to_payload`` builds the payload
        of the events this deriver names (default: the change itself).
        """
        if not callable(derive):
            raise DefinitionError(f"{kind}: derive must be callable, got {derive!r}")
        if inspect.iscoroutinefunction(derive) or inspect.isasyncgenfunction(derive):
            raise DefinitionError(
                f"{kind}: derive must be a plain function returning event names, "
                f"got the async {derive!r}"
            )
        if to_payload is not None and not callable(to_payload):
            raise DefinitionError(
                f"{kind}: to_payload must be callable or None, got {to_payload!r}"
            )

        with self._lock:
            self._check_usable("register a deriver")
            entry = self._kind(kind)
            if entry.stage is None:
                entry.stage = DeriverStage(
                    kind, self.metrics, lambda: self._trigger_boxes, self._secrets
                )
            entry.stage.derivers = (*entry.stage.derivers, Deriver(derive, to_payload))
            if entry.deriver is None:
                mailbox = self._mailbox(f"derive:{kind}", None)
                entry.deriver = _Consumer(
                    mailbox, entry.stage.process, entry.stage.flush
                )
                if self._state == _RUNNING:
                    self._start_consumer(entry.deriver)

    def on_entity_changed(
        self,
        kind: str,
        handler: Callable[[EntityChanged], Any],
        delivery: Broadcast | WorkQueue | None = None,
        *,
        name: str | None = None,
        timeout: float | None = None,
    ) -> Unsubscribe:
        """Subscribe a handler to every change of a kind.

        The handler runs on its own actor; it sees the changes of each id in
        commit order. A handler that raises is logged and counted, and (with
        ``work_queue``) retried, then dead-lettered. If it falls more than the
        mailbox size behind, queued changes of one id are folded into one
        (``prev`` of the oldest, ``next`` of the newest), and counted.

        A call that runs longer than ``timeout`` seconds (default: the
        runtime's ``handler_timeout``; ``None`` there too means no limit) is
        treated like one that raised: logged at ERROR, counted in
        ``entity_runtime_subscriber_errors_total`` and
        ``entity_runtime_handler_timeouts_total``, and for a work queue
        retried (the timeout applies to each attempt), then dead-lettered. The
        stuck call is abandoned, not interrupted: a new actor takes over the
        mailbox and goes on with the next changes in order, and whatever the
        old call does when it returns is ignored (its side effects stay).
        Handlers of one worker group share one timeout. With a bus, a work
        queue takes no timeout.

        With a bus, a ``broadcast()`` handler also receives the changes other
        instances commit (in per-id order per instance, resuming after a
        restart under the same name), and a ``work_queue(group)`` handler
        receives each change committed by any instance of the group once, at
        least once when an instance fails; a handler with two required
        positional parameters gets ``(change, delivery)``, the ``Delivery``
        naming the stream entry, the origin instance and the attempt.

        Returns:
            A callable that ends the subscription (harmless to call twice).
        """
        if not callable(handler):
            raise DefinitionError(f"{kind}: handler must be callable, got {handler!r}")
        delivery = Broadcast() if delivery is None else delivery
        if not isinstance(delivery, Broadcast | WorkQueue):
            raise DefinitionError(
                f"{kind}: delivery must be broadcast() or work_queue(...), "
                f"got {delivery!r}"
            )
        given = _check_seconds(
            f"{kind}: timeout", timeout, none=True, outcome="nothing subscribed"
        )
        on_bus = self.bus is not None
        if given is not None and on_bus and isinstance(delivery, WorkQueue):
            raise DefinitionError(
                f"{kind}: work queue {delivery.worker_group!r} runs on the bus, "
                f"which has no handler timeout; got timeout={timeout!r}; nothing "
                "subscribed"
            )
        seconds = self._handler_timeout if given is None else given
        label = _consumer_label(kind, name, handler)

        with self._lock:
            self._check_usable("subscribe")
            entry = self._kind(kind)
            if isinstance(delivery, WorkQueue):
                return self._join_work_group(entry, delivery, label, handler, seconds)

            mailbox = self._mailbox(f"subscriber:{kind}:{label}", merge_changes)
            consumer = _Consumer(
                mailbox,
                broadcast_process(
                    kind, label, handler, self.metrics, secrets=self._secrets
                ),
                label=label,
                timeout=seconds,
                watched=lambda watch: broadcast_process(
                    kind, label, handler, self.metrics, watch, self._secrets
                ),
                timed_out=broadcast_timed_out(kind, label, self.metrics),
            )
            self._consumers.append(consumer)
            if self._state == _RUNNING:
                self._start_consumer(consumer)
            entry.boxes = (*entry.boxes, mailbox)
            feed = None if self.bus is None else self._remote_feed(kind, mailbox)

        return Unsubscribe(functools.partial(self._unsubscribe, entry, consumer, feed))

    def on_trigger(
        self,
        event: str,
        handler: Callable[[str, Any, EntityChanged], Any],
        *,
        name: str | None = None,
        timeout: float | None = None,
    ) -> Unsubscribe:
        """Subscribe ``handler(event, payload, change)`` to a trigger event.

        Runs on its own actor like a subscriber; if it falls more than the
        mailbox size behind, queued events of the same name and id are folded
        into the newest one, and counted. A call that runs longer than
        ``timeout`` seconds (default: the runtime's ``handler_timeout``) is
        abandoned and counted as failed, as for a broadcast subscriber (see
        ``on_entity_changed``); the event is not retried.
        """
        if not isinstance(event, str) or not event:
            raise DefinitionError(f"event must be a non-empty string, got {event!r}")
        if not callable(handler):
            raise DefinitionError(f"{event}: handler must be callable, got {handler!r}")
        if not _takes_positional(handler, 3):
            raise DefinitionError(
                f"{event}: handler must take (event, payload, change), got "
                f"{handler_name(handler)} with the parameters "
                f"{inspect.signature(handler)}"
            )
        given = _check_seconds(
            f"{event}: timeout", timeout, none=True, outcome="nothing subscribed"
        )
        seconds = self._handler_timeout if given is None else given
        label = _consumer_label(event, name, handler)

        with self._lock:
            self._check_usable("subscribe")
            mailbox = self._mailbox(f"trigger:{event}:{label}", keep_newer)
            consumer = _Consumer(
                mailbox,
                trigger_process(label, handler, self.metrics, secrets=self._secrets),
                label=label,
                timeout=seconds,
                watched=lambda watch: trigger_process(
                    label, handler, self.metrics, watch, self._secrets
                ),
                timed_out=trigger_timed_out(label, self.metrics),
            )
            self._consumers.append(consumer)
            if self._state == _RUNNING:
                self._start_consumer(consumer)
            boxes = dict(self._trigger_boxes)
            boxes[event] = (*boxes.get(event, ()), mailbox)
            self._trigger_boxes = boxes

        return Unsubscribe(functools.partial(self._untrigger, event, consumer))

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> Runtime:
        """Start every actor; a second call while running does nothing.

        Raises:
            RuntimeStoppedError: the runtime was stopped (create a new one).
            PartitionMapMismatchError: with ``partitions``, another instance
                on the bus runs with a different partition count; nothing
                started (``stop()`` closes the bus).
        """
        with self._lock:
            if self._state == _RUNNING:
                return self
            self._check_usable("start")
            if self.bus is not None and self.partitions is not None:
                self.bus.record_partition_map(self.partitions)
            if self._data_dir is not None:
                self._restore(self._data_dir)

            for entry in self._kinds.values():
                self._start_kind(entry)
            for consumer in self._consumers:
                self._start_consumer(consumer)
            self._tracker.set_admission(DeliveryTracker.ACCEPTING)
            self._state = _RUNNING
            for feed in self._feeds:
                feed.start()
            self._start_housekeeping()
            atexit.register(_stop_at_exit, weakref.ref(self))

        logger.info("runtime started with kinds %s", ", ".join(self._kinds) or "none")
        return self

    def stop(self, timeout: float | None = None) -> StopReport:
        """Stop accepting writes, deliver what was committed, stop every thread.

        New writes from outside are refused at once; writes that subscribers
        make while handling earlier changes are still let in, so cascades
        finish. Waits up to ``timeout`` seconds (default: the runtime's
        ``stop_timeout``) for every delivery, then stops the actors. What could
        not be delivered is logged and returned. A second call returns the
        first call's report.
        """
        if thread_role.internal:
            raise ReentrantCallError(
                "stop() was called from one of the runtime's own threads, which "
                "would wait for itself; call it from the thread that owns the runtime"
            )
        timeout = _check_seconds(
            "stop()'s timeout", timeout, zero=True, none=True, outcome="not stopped"
        )
        with self._lock:
            state = self._state
            if state == _RUNNING:
                self._state = _STOPPING
            elif state == _NEW:
                self._state = _STOPPED
                unpublished = self._close_bus(self._stop_timeout)
                self._stop_report = StopReport(
                    clean=not unpublished, unpublished=unpublished
                )
                self.metrics.close()
                self._stopped.set()
        if state != _RUNNING:
            # Never started, already stopped, or another thread is stopping it:
            # wait for that stop to finish and share its report.
            self._stopped.wait()
            return self._stop_report or StopReport(clean=True)

        try:
            return self._stop_running(timeout)
        finally:
            if self._freeze_gc:
                gc.unfreeze()
            with self._lock:
                self._state = _STOPPED
            self._stopped.set()

    def _stop_running(self, timeout: float | None) -> StopReport:
        wait = self._stop_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        tracker = self._tracker

        # Bus readers first: what they already queued is delivered below, and
        # their handlers' own writes are still let in while they finish.
        self._close_feeds()

        tracker.set_admission(DeliveryTracker.INTERNAL_ONLY)
        tracker.wait_idle(wait)
        tracker.set_admission(DeliveryTracker.CLOSED)
        tracker.wait_mutations(max(0.1, deadline - time.monotonic()))

        stuck = []
        undelivered: list[tuple[str, int]] = []
        for entry in self._kinds.values():
            for shard, ref in enumerate(entry.refs):
                try:
                    ref.stop(block=True, timeout=max(0.1, deadline - time.monotonic()))
                except pykka.Timeout:
                    name = f"kind:{entry.engine.kind}/{shard}"
                    stuck.append(name)
                    # The stuck write's apply may still return: it records
                    # nothing now. What the actor committed earlier in its
                    # burst has not been handed to any consumer.
                    entry.engine.close()
                    unhanded = entry.queues[shard].unhanded_seqs()
                    undelivered.extend((name, seq) for seq in unhanded)
            entry.engine.close()
            entry.refs = []
            entry.queues = []
        self._releaser.stop()

        # No consumer is replaced from here on: what a stuck call still holds
        # is reported below like any other stuck consumer's.
        self._watchdog.stop()
        self._abort.set()
        # Deriver stages first: trigger events they still derive then find
        # their handlers' mailboxes open, and are reported with them below.
        for consumer in sorted(self._all_consumers(), key=lambda c: c.flush is None):
            for _item, seqs in consumer.mailbox.close():
                undelivered.extend((consumer.mailbox.name, s) for s in seqs)
                tracker.done(seqs)
        stuck += self._stop_consumers(self._all_consumers(), deadline)
        stuck += self._wait_retired(deadline)
        unpublished = self._close_bus(deadline - time.monotonic())
        self._stop_housekeeping()
        disk_errors = self._close_data_dir()
        self.metrics.close()

        abandoned = sorted({w.name for w in self._abandoned if not w.stopped})
        report = StopReport(
            clean=not (undelivered or stuck or unpublished or abandoned or disk_errors),
            undelivered=tuple(undelivered),
            stuck_consumers=tuple(stuck),
            unpublished=unpublished,
            abandoned=tuple(abandoned),
            data_dir_errors=disk_errors,
        )
        if abandoned:
            logger.warning(
                "runtime stopped while handler calls abandoned after their timeout "
                "still ran in: %s; their daemon threads are left behind",
                ", ".join(abandoned),
            )
        if undelivered:
            logger.warning(
                "runtime stopped with %d deliveries undelivered (first: %s)",
                len(undelivered),
                ", ".join(f"{n} seq={s}" for n, s in undelivered[:5]),
            )
        if stuck:
            logger.warning(
                "runtime stopped while handlers still ran in: %s", ", ".join(stuck)
            )
        with self._lock:
            self._state = _STOPPED
            self._stop_report = report
        self._stopped.set()
        logger.info("runtime stopped (clean=%s)", report.clean)
        return report

    def _close_bus(self, timeout: float) -> int:
        # Every commit has been handed to the bus by now; give its outbox the
        # time left (at least a moment) to reach Redis.
        bus = self.bus
        if bus is None:
            return 0
        unpublished = bus.close(timeout=max(0.5, timeout))
        if unpublished:
            logger.warning(
                "runtime stopped with %d committed changes not published to the "
                "bus at %s; other instances will not see them",
                unpublished,
                bus.where,
            )
        return unpublished

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the runtime accepts writes."""
        return self._state == _RUNNING

    def drain(self, timeout: float = 5.0, *, until_idle: bool = False) -> None:
        """Wait until every change committed so far has been delivered.

        Delivered means: handed to every deriver, trigger handler and
        subscriber and handled by it (or failed for good: logged, counted,
        dead-lettered). Changes committed after the call began are not waited
        for, unless ``until_idle`` is set: then the call waits until no
        mutation is pending and nothing is being delivered, which includes the
        cascades of changes that handlers write while handling others (it may
        never return while other threads keep writing).

        Raises:
            DeliveryTimeoutError: deliveries were still running after
                ``timeout`` seconds; the message names the oldest open changes.
            ReentrantCallError: called from one of the runtime's own threads
                (an ``apply``, a deriver or a handler), which would wait for
                itself.
        """
        if thread_role.kind_shard is not None:
            raise ReentrantCallError(
                "drain() was called from inside an apply, on a kind's actor thread, "
                "which hands on the changes drain() waits for only after the apply "
                "returns; call it from outside the runtime's applies and handlers"
            )
        if thread_role.consumer is not None:
            raise ReentrantCallError(
                "drain() was called from a consumer's own thread, which would "
                "wait for itself; call it from outside the runtime's handlers"
            )
        timeout = _check_seconds(
            "drain()'s timeout", timeout, zero=True, outcome="nothing waited for"
        )
        report = self._stop_report
        if report is not None and report.undelivered:
            raise RuntimeStoppedError(
                f"the runtime stopped with {len(report.undelivered)} changes it "
                "could not deliver, which no drain() can wait for (first: "
                + ", ".join(f"{n} seq={q}" for n, q in report.undelivered[:5])
                + "); see the report stop() returned"
            )
        with self.log.lock:
            # Under the lock: a commit registers its delivery before releasing
            # it, so every seq read here is already tracked.
            target = self.log.last_seq
        if self._wait_releasing(target, until_idle, timeout):
            return
        held = {
            f"kind:{kind}/{shard}": seqs
            for kind, entry in list(self._kinds.items())
            for shard, queue in enumerate(list(entry.queues))
            if (seqs := queue.unhanded_seqs())
        }
        # A burst's unhanded changes keep only its first seq open in the
        # tracker: count each of them.
        waiting = sorted(
            {*self._tracker.open_up_to(target)}.union(
                s for seqs in held.values() for s in seqs if s <= target
            )
        )
        behind = [
            f"{c.mailbox.name} ({len(c.mailbox)} waiting)"
            for c in self._all_consumers()
            if len(c.mailbox)
        ]
        holding = [
            f"{name} (seqs {', '.join(map(str, seqs[:5]))})"
            for name, seqs in held.items()
        ]
        if holding:
            behind.append(
                "kind actors whose burst is still running, with committed "
                f"changes not handed on yet: {', '.join(holding)}"
            )
        raise DeliveryTimeoutError(
            f"{len(waiting)} changes up to seq {target} were still being delivered "
            f"after {timeout} s (oldest seqs: {waiting[:5]}); consumers behind: "
            f"{'; '.join(behind) or 'none with a backlog (a handler is running)'}"
        )

    def _wait_releasing(
        self, target: int, until_idle: bool, timeout: float | None
    ) -> bool:
        # drain()'s wait, in slices: before each, the consumer wake-ups that
        # kind actors hold are made, so drain() never waits out wake_delay,
        # even for a wake-up an actor was about to hold when drain() began.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._releaser.release_all()
            left = None if deadline is None else deadline - time.monotonic()
            wait = _DRAIN_SLICE if left is None else max(0.0, min(_DRAIN_SLICE, left))
            if until_idle:
                if self._tracker.wait_idle(wait):
                    return True
            elif self._tracker.wait(target, wait):
                return True
            if left is not None and left <= _DRAIN_SLICE:
                return False

    # -- run secrets ----------------------------------------------------------

    def register_run_secrets(self, run_id: str, values: Iterable[str]) -> None:
        """Register secret values of a run, to be masked in what others see.

        Writes made with this ``run_id`` show every occurrence of these values
        (as substrings, at any depth, in values and mapping keys) as ``***`` in
        their transition rows, change events, trigger payloads, error messages
        and dead letters. The state itself (``get``, the journal's copy of a
        store-backed state) is the caller's and is not altered. Registering
        again adds values.

        Raises:
            DefinitionError: a value is not a string or is shorter than
                ``runtime.MIN_SECRET_LENGTH`` characters; nothing registered.
        """
        self._secrets.register(run_id, values)

    def end_run(self, run_id: str) -> bool:
        """Forget a run's secrets; return whether it had any.

        Changes committed before are already masked; payloads derived after
        this call from such a change are masked only by what the change shows.
        """
        return self._secrets.end(run_id)

    # -- metrics --------------------------------------------------------------

    def serve_metrics(
        self, port: int = DEFAULT_METRICS_PORT, addr: str = DEFAULT_METRICS_ADDR
    ) -> tuple[str, int]:
        """Serve this runtime's metrics over HTTP until ``stop()``.

        Listens on 127.0.0.1 unless told otherwise; ``port=0`` picks a free
        port. Returns the ``(host, port)`` actually bound.

        Raises:
            DefinitionError: a bad port or address; nothing started.
            MetricsBindError: the address could not be bound (in use, ...).
        """
        self._check_usable("serve metrics")
        return self.metrics.serve(port, addr).address

    # -- persistence ----------------------------------------------------------

    def snapshot(self) -> Path | None:
        """Write a snapshot now; return its path (``None`` if nothing changed).

        Raises:
            DefinitionError: the runtime has no ``data_dir``.
            RuntimeStoppedError: the runtime is not running.
        """
        if self._data_dir is None:
            raise DefinitionError(
                "snapshot() needs a data_dir; this runtime keeps everything in "
                "memory only"
            )
        self._check_running("take a snapshot")
        path = self._data_dir.snapshot(
            self.log, self._capture_states, self._snapshot_seconds
        )
        self._freeze_long_lived("snapshot")
        return path

    def apply_retention(self) -> int:
        """Drop log rows past the retention limits now; return how many."""
        now = self.clock()
        older_than = (
            None if self._retention_max_age is None else now - self._retention_max_age
        )
        return self.log.prune(
            older_than,
            self._retention_max_rows,
            removed_before=now - self._retention_removed_after,
        )

    def _capture_states(self) -> dict[str, tuple[bool, dict[str, Any]]]:
        # NOTE: called under the log's lock, which every commit holds while it
        # updates a store, so the stores and the log agree with each other.
        kinds: dict[str, tuple[bool, dict[str, Any]]] = dict(self._orphans)
        for kind, entry in self._kinds.items():
            backed = entry.definition.store_backed
            kinds[kind] = (backed, dict(entry.engine.store) if backed else {})
        return kinds

    def _kept_states(
        self, definition: KindDefinition, states: dict[str, Any]
    ) -> dict[str, ReadOnlyDict]:
        """A defined kind's restored states, checked as its schema says.

        Raises:
            RestoreError: the kind is plugin-backed but states were kept for
                it (its next snapshot would drop them).
            SchemaError, InvalidIdError: a state or id the kind refuses.
        """
        if not states:
            return {}
        if not definition.store_backed:
            assert self._data_dir is not None
            raise _states_of_plugin_kind(
                self._data_dir.directory, definition.kind, states
            )
        validate = definition.schema.restore_validator
        return validated_states(definition.kind, states, validate)

    def _restored_orphans(self, definition: KindDefinition) -> dict[str, ReadOnlyDict]:
        """The states restored for a kind defined after ``start()``, checked."""
        orphan = self._orphans.get(definition.kind)
        if orphan is None:
            return {}

        try:
            return self._kept_states(definition, orphan[1])
        except (SchemaError, InvalidIdError) as err:
            assert self._data_dir is not None
            where = self._data_dir.directory
            # The changes were dropped after the restore: no file or seq known.
            raise restore_refusal(RestoredData(), where, err) from err

    def _restore(self, data_dir: DataDir) -> None:
        data = data_dir.open()
        try:
            try:
                check_restored_names(data, data_dir.directory)
                restore_into_log(self.log, data.changes)
                self.log.advance_to(data.seq)
                for kind, states in data.states.items():
                    entry = self._kinds.get(kind)
                    if entry is not None:
                        kept = self._kept_states(entry.definition, states)
                        entry.engine.store.update(kept)
                    else:
                        backed = data.store_backed.get(kind, True)
                        self._orphans[kind] = (backed, states)
                check_restored_ids(self.log)
            except (SchemaError, InvalidIdError) as err:
                # Whole files holding what the write path refuses: a definition
                # that changed since, or an edited file. Not damage, so
                # recover_damaged does not skip it either.
                raise restore_refusal(data, data_dir.directory, err) from err
            except (ValueError, TypeError, OverflowError, RecursionError) as err:
                # Files whose checksums hold but whose changes cannot be
                # rebuilt (out of order, nested too deeply, malformed rows).
                raise RestoreError(
                    f"{data_dir.directory}: the recorded changes could not be "
                    f"rebuilt ({type(err).__name__}: {err}); nothing was changed "
                    "on disk"
                ) from err
            for kind in self._orphans:
                logger.warning(
                    "data dir %s holds kind %s, which is not defined; its %d states "
                    "are kept and written to later snapshots",
                    data_dir.directory,
                    kind,
                    len(self._orphans[kind][1]),
                )
            if data.damaged:
                # Damaged snapshots go aside first, as the fresh one may take
                # the name of one of them; the fresh snapshot is durable before
                # any damaged journal is set aside, so a crash in between
                # still finds the valid prefix.
                damaged_snapshots = data.damaged_snapshots()
                data_dir.set_aside(damaged_snapshots)
                data_dir.snapshot(
                    self.log, self._capture_states, self._snapshot_seconds
                )
                data_dir.set_aside(
                    [p for p in data.damaged_files if p not in damaged_snapshots]
                )
            data_dir.start_journal(data.seq + 1)
        except BaseException:
            # Leave the runtime as it was before start(), so it can be retried.
            self.log.clear()
            for entry in self._kinds.values():
                entry.engine.store.clear()
            self._orphans.clear()
            data_dir.close()
            raise

        # The decoded changes and states are in the log and the store now:
        # kept here as well, they would hold every restored value twice.
        self.restored = dataclasses.replace(data, changes=[], states={})
        self._freeze_long_lived("restore")
        logger.info(
            "restored %s: seq=%d from %s and %d journal records",
            data_dir.directory,
            data.seq,
            data.snapshot.name if data.snapshot else "no snapshot",
            data.journal_records,
        )

    def _seconds_since_snapshot(self) -> float:
        if self._data_dir is None or self._data_dir.last_snapshot_at is None:
            return math.nan
        return time.time() - self._data_dir.last_snapshot_at

    def _start_housekeeping(self) -> None:
        self._housekeeping_stop.clear()
        self._housekeeper = threading.Thread(
            target=self._housekeeping_loop,
            name="entity-runtime-housekeeping",
            daemon=True,
        )
        self._housekeeper.start()

    def _stop_housekeeping(self) -> None:
        self._housekeeping_stop.set()
        if self._housekeeper is not None:
            self._housekeeper.join()
            self._housekeeper = None

    def _housekeeping_loop(self) -> None:
        last_retention = time.monotonic()
        while not self._housekeeping_stop.wait(self._housekeeping_interval):
            try:
                if (
                    time.monotonic() - last_retention
                    >= 60 * self._housekeeping_interval
                ):
                    last_retention = time.monotonic()
                    self.apply_retention()
                    self._freeze_long_lived("housekeeping")
                if self._snapshot_due():
                    self.apply_retention()
                    self._data_dir.snapshot(  # type: ignore[union-attr]
                        self.log, self._capture_states, self._snapshot_seconds
                    )
                    self._freeze_long_lived("snapshot")
            except Exception:
                logger.exception("housekeeping failed; will try again")

    def _freeze_long_lived(self, after: str) -> None:
        if not self._freeze_gc:
            return
        gc.freeze()
        logger.debug(
            "after %s: %d objects in the permanent GC generation",
            after,
            gc.get_freeze_count(),
        )

    def _snapshot_due(self) -> bool:
        data_dir = self._data_dir
        if data_dir is None:
            return False
        pending = self.log.last_seq - data_dir.last_snapshot_seq
        if pending <= 0:
            return False
        if self._snapshot_every is not None and pending >= self._snapshot_every:
            return True
        if self._snapshot_interval is None:
            return False
        since = data_dir.last_snapshot_at
        return since is None or time.time() - since >= self._snapshot_interval

    def _close_data_dir(self) -> tuple[str, ...]:
        # Returns what went wrong, for the stop report; stop() finishes either
        # way: the threads are stopped and the directory is unlocked.
        data_dir = self._data_dir
        if data_dir is None:
            return ()

        errors = []
        try:
            self.apply_retention()
            data_dir.snapshot(self.log, self._capture_states, self._snapshot_seconds)
        except Exception as err:
            message = (
                f"final snapshot of {data_dir.directory} failed "
                f"({type(err).__name__}: {err}); the journal still holds every change"
            )
            logger.exception("%s", message)
            errors.append(message)
        finally:
            try:
                data_dir.close()
            except Exception as err:
                # The journal's own errors say what may not be on disk.
                message = f"closing the journal in {data_dir.directory} failed: {err}"
                logger.exception("%s", message)
                errors.append(message)
        return tuple(errors)

    # -- dead letters ---------------------------------------------------------

    def dead_letters(self, worker_group: str | None = None) -> list[DeadLetter]:
        """Return the dead letters (of one worker group, or all), oldest first."""
        with self._dead_lock:
            return [
                d
                for d in self._dead_letters
                if worker_group is None or d.worker_group == worker_group
            ]

    def replay_dead_letters(self, worker_group: str | None = None) -> int:
        """Queue dead letters for their worker group again; return how many.

        Letters whose group has no handler any more stay in the list.
        """
        with self._lock:
            self._check_running("replay dead letters")
            with self._dead_lock:
                keep: list[tuple[DeadLetter, Any]] = []
                replay: list[tuple[DeadLetter, Any]] = []
                for letter in self._dead_letters:
                    # A bus's dead letter may hold a kind not defined here.
                    entry = self._kinds.get(letter.change.kind)
                    group = (
                        None if entry is None else entry.groups.get(letter.worker_group)
                    )
                    wanted = worker_group is None or letter.worker_group == worker_group
                    (replay if wanted and group is not None else keep).append(
                        (letter, group)
                    )
                self._dead_letters = [letter for letter, _ in keep]

        for letter, group in replay:
            change = letter.change
            group[1].mailbox.put(change.id, change, change.seq)  # type: ignore[index]
        logger.info("replayed %d dead letters", len(replay))
        return len(replay)

    def _keep_unpublished(self, change: EntityChanged, error: Exception) -> None:
        # A change the bus will never publish is a dead letter of no group.
        self._record_dead_letter(
            DeadLetter("", "bus", change, str(error), 0, datetime.now(UTC))
        )

    def _record_dead_letter(self, letter: DeadLetter) -> None:
        with self._dead_lock:
            self._dead_letters.append(letter)
            overflow = len(self._dead_letters) - self._max_dead_letters
            if overflow > 0:
                dropped = self._dead_letters[:overflow]
                del self._dead_letters[:overflow]
                logger.warning(
                    "dead-letter list full: dropped %d oldest (first %s/%s seq=%d)",
                    overflow,
                    dropped[0].change.kind,
                    dropped[0].change.id,
                    dropped[0].change.seq,
                )

    # -- internals ------------------------------------------------------------

    def _kind(self, kind: str) -> _Kind:
        entry = self._kinds.get(kind)
        if entry is None:
            raise UnknownKindError(kind, list(self._kinds))
        return entry

    def _engine(self, kind: str) -> KindEngine:
        return self._kind(kind).engine

    def _mailbox(self, name: str, merge: Any) -> Mailbox:
        unique = self._unique(name)
        return Mailbox(
            unique,
            self._mailbox_size,
            self._tracker,
            merge,
            self.metrics.coalesced.labels(unique) if merge is not None else None,
        )

    def _unique(self, name: str) -> str:
        count = self._names.get(name, 0) + 1
        self._names[name] = count
        return name if count == 1 else f"{name}#{count}"

    def _check_usable(self, what: str) -> None:
        if self._state in (_STOPPING, _STOPPED):
            raise RuntimeStoppedError(
                f"cannot {what}: the runtime is stopped; create a new Runtime"
            )

    def _check_running(self, what: str) -> None:
        self._check_usable(what)
        if self._state != _RUNNING:
            raise RuntimeStoppedError(
                f"cannot {what}: the runtime is not started; call start() or use "
                "'with runtime:'"
            )

    def _all_consumers(self) -> list[_Consumer]:
        found = list(self._consumers)
        for entry in self._kinds.values():
            if entry.deriver is not None:
                found.append(entry.deriver)
            found.extend(consumer for _, consumer in entry.groups.values())
        return found

    def _start_kind(self, entry: _Kind) -> None:
        if entry.deriver is not None and entry.deriver.ref is None:
            self._start_consumer(entry.deriver)
        for _, consumer in entry.groups.values():
            if consumer.ref is None:
                self._start_consumer(consumer)
        for shard in range(entry.definition.shards):
            requests = RequestQueue(self._tracker)
            ref = KindActor.start(
                entry.engine,
                shard,
                self._publish,
                lambda entry=entry: entry.deriver_box,
                self._tracker,
                self._backpressure_timeout,
                self.metrics.mutate_seconds,
                requests,
                self._group_sync(),
                self.metrics.actor_restarts.labels(f"kind:{entry.engine.kind}/{shard}"),
                self._abort,
                self._releaser if self._wake_delay else None,
                self._wake_delay,
            )
            requests.wake = functools.partial(_wake, ref, f"kind:{entry.engine.kind}")
            entry.refs.append(ref)
            entry.queues.append(requests)

    def _group_sync(self) -> Callable[[], None] | None:
        data_dir = self._data_dir
        if data_dir is None or data_dir.fsync != "always":
            return None
        return data_dir.sync

    def _start_consumer(self, consumer: _Consumer, *, replacing: bool = False) -> None:
        if consumer.ref is not None:
            return
        mailbox = consumer.mailbox
        process, watch = consumer.process, None
        if consumer.timeout is not None and consumer.watched is not None:
            watch = CallWatch(mailbox.name, consumer.label, consumer.timeout)
            process = consumer.watched(watch)
        ref = ConsumerActor.start(
            mailbox,
            process,
            self._abort,
            self.metrics.delivery_seconds,
            self.metrics.actor_restarts.labels(mailbox.name),
            consumer.flush,
            watch=watch,
        )
        consumer.ref = ref
        consumer.watch = watch
        mailbox.wake = functools.partial(_wake, ref, mailbox.name)
        self.metrics.watch_mailbox(mailbox.name, lambda: len(mailbox))
        if watch is not None:
            self._watchdog.watch(watch, (consumer, ref))
        # A replacement is always woken: the mailbox is still marked as
        # scheduled by the actor it replaces, so no put would wake it.
        if replacing or len(mailbox):
            mailbox.wake()

    def _take_over(self, owner: Any, watch: CallWatch) -> None:
        """Replace a consumer actor whose handler call ran past its timeout.

        Runs on the watchdog's thread once ``watch.take_over`` has decided.
        The stuck delivery is accounted for by the consumer's ``timed_out``
        (failed, or a work queue's retry); the rest of the abandoned batch goes
        back to the front of the mailbox, and a new actor carries on with it.
        """
        consumer, old = owner
        mailbox = consumer.mailbox
        batch, watch.batch = watch.batch, []
        position = mailbox.started - 1
        item, watch.seqs, _ = batch[position]
        assert consumer.timed_out is not None
        retry = consumer.timed_out(item, watch)

        with self._lock:
            done, requeued = mailbox.hand_over(batch, position, retry)
            self._tracker.done(done)
            self._abandoned = [w for w in self._abandoned if not w.stopped]
            self._abandoned.append(watch)
            if consumer.ref is old and not self._abort.is_set():
                consumer.ref = None
                self._start_consumer(consumer, replacing=True)
            elif retry is not None and not requeued:
                logger.warning(
                    "consumer %s ended while its call was stuck; the timed-out "
                    "delivery (seq=%s) is not retried",
                    mailbox.name,
                    ",".join(map(str, watch.seqs)),
                )

        # The abandoned actor is no longer the runtime's: it leaves the
        # registry now and stops as soon as its call returns, if ever.
        pykka.ActorRegistry.unregister(old)
        try:
            old.stop(block=False)
        except pykka.ActorDeadError:
            logger.debug("abandoned consumer of %s had already stopped", mailbox.name)

    def _stop_consumers(self, consumers: list[_Consumer], deadline: float) -> list[str]:
        futures = []
        for consumer in consumers:
            if consumer.ref is not None:
                futures.append((consumer, consumer.ref.stop(block=False)))
                consumer.ref = None

        stuck = []
        for consumer, future in futures:
            try:
                future.get(timeout=max(0.05, deadline - time.monotonic()))
            except pykka.Timeout:
                stuck.append(consumer.mailbox.name)
            self.metrics.forget_mailbox(consumer.mailbox.name)
        return stuck

    def _join_work_group(
        self,
        entry: _Kind,
        spec: WorkQueue,
        label: str,
        handler: Callable[[EntityChanged], Any],
        timeout: float | None,
    ) -> Unsubscribe:
        kind = entry.definition.kind
        if self.bus is not None:
            if timeout is not None:
                logger.warning(
                    "%s: work queue %s runs on the bus, which has no handler "
                    "timeout; handler_timeout=%g s does not apply to %s",
                    kind,
                    spec.worker_group,
                    timeout,
                    label,
                )
            return self._join_bus_group(entry, spec, label, handler)
        found = entry.groups.get(spec.worker_group)
        if found is not None and found[1].timeout != timeout:
            raise DefinitionError(
                f"{kind}: worker group {spec.worker_group!r} has timeout "
                f"{found[1].timeout!r}, and its handlers share one consumer; got "
                f"timeout {timeout!r} for {label}; nothing subscribed"
            )
        if found is None:
            group = WorkGroup(
                entry.definition.kind,
                spec,
                self.metrics,
                self._abort,
                self._record_dead_letter,
                self._secrets,
            )
            mailbox = self._mailbox(
                f"work_queue:{entry.definition.kind}:{spec.worker_group}",
                merge_changes,
            )
            consumer = _Consumer(
                mailbox,
                group.process,
                label=spec.worker_group,
                timeout=timeout,
                watched=functools.partial(_watched_group, group),
                timed_out=group.timed_out,
            )
            entry.groups[spec.worker_group] = (group, consumer)
            if self._state == _RUNNING:
                self._start_consumer(consumer)
            entry.boxes = (*entry.boxes, mailbox)
        else:
            group, consumer = found
        member = (label, handler)
        group.handlers = [*group.handlers, member]

        def leave() -> None:
            with self._lock:
                group.handlers = [h for h in group.handlers if h is not member]
                if group.handlers:
                    return
                entry.groups.pop(spec.worker_group, None)
                self._drop_consumer(entry, consumer)

        return Unsubscribe(leave)

    def _join_bus_group(
        self,
        entry: _Kind,
        spec: WorkQueue,
        label: str,
        handler: Callable[..., Any],
    ) -> Unsubscribe:
        # NOTE: called with self._lock held. One reader per kind and group;
        # local commits reach the group only through the bus.
        from runtime._redis_bus import WorkQueueReader

        bus = self.bus
        assert bus is not None
        kind = entry.definition.kind
        check_state = entry.definition.schema.restore_validator
        group = entry.bus_groups.get(spec.worker_group)
        if group is None:
            group = _BusWorkGroup(kind, spec, self.metrics, self._secrets)
            dead = self.metrics.dead_letters.labels(spec.worker_group)

            def on_dead_letter(letter: DeadLetter) -> None:
                dead.inc()
                self._record_dead_letter(letter)

            def make(group: _BusWorkGroup = group) -> WorkQueueReader:
                return WorkQueueReader(
                    bus,
                    kind,
                    spec.worker_group,
                    group.handle,
                    max_attempts=spec.max_attempts,
                    backoff=spec.backoff,
                    name=group.name,
                    on_dead_letter=on_dead_letter,
                    batch_size=1,
                    check_state=check_state,
                    state_fields=entry.definition.schema.fields,
                )

            group.feed = _Feed(group.name, make)
            entry.bus_groups[spec.worker_group] = group
            self._add_feed(group.feed)
        member = (label, handler, _wants_delivery(handler))
        group.handlers = [*group.handlers, member]

        def leave() -> None:
            with self._lock:
                group.handlers = [h for h in group.handlers if h is not member]
                if group.handlers:
                    return
                entry.bus_groups.pop(spec.worker_group, None)
            if group.feed is not None:
                self._drop_feed(group.feed)

        return Unsubscribe(leave)

    def _unsubscribe(
        self, entry: _Kind, consumer: _Consumer, feed: _Feed | None = None
    ) -> None:
        if feed is not None:
            self._drop_feed(feed)
        with self._lock:
            if consumer in self._consumers:
                self._consumers.remove(consumer)
            self._drop_consumer(entry, consumer)

    def _remote_feed(self, kind: str, mailbox: Mailbox) -> _Feed:
        # NOTE: called with self._lock held.
        from runtime._redis_bus import BroadcastReader

        bus = self.bus
        assert bus is not None
        name = mailbox.name
        take = functools.partial(_take_remote, mailbox)
        check_state = self._kinds[kind].definition.schema.restore_validator

        def make() -> BroadcastReader:
            return BroadcastReader(
                bus,
                kind,
                name,
                take,
                state_key=f"{bus.instance_id}:{name}",
                include_own=False,
                check_state=check_state,
                state_fields=self._kinds[kind].definition.schema.fields,
            )

        feed = _Feed(name, make)
        self._add_feed(feed)
        return feed

    def _add_feed(self, feed: _Feed) -> None:
        # NOTE: called with self._lock held.
        self._feeds.append(feed)
        if self._state == _RUNNING:
            feed.start()

    def _drop_feed(self, feed: _Feed) -> None:
        with self._lock:
            if feed in self._feeds:
                self._feeds.remove(feed)
        feed.close()

    def _close_feeds(self) -> None:
        # Readers wait up to block_ms for a blocking read to return, so they
        # are closed side by side rather than one after the other.
        with self._lock:
            feeds, self._feeds = self._feeds, []
        closers = [
            threading.Thread(target=feed.close, name=f"close:{feed.name}")
            for feed in feeds
        ]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join()

    def _drop_consumer(self, entry: _Kind, consumer: _Consumer) -> None:
        entry.boxes = tuple(b for b in entry.boxes if b is not consumer.mailbox)
        self._retire(consumer)

    def _untrigger(self, event: str, consumer: _Consumer) -> None:
        with self._lock:
            if consumer in self._consumers:
                self._consumers.remove(consumer)
            boxes = dict(self._trigger_boxes)
            left = tuple(b for b in boxes.get(event, ()) if b is not consumer.mailbox)
            if left:
                boxes[event] = left
            else:
                boxes.pop(event, None)
            self._trigger_boxes = boxes
            self._retire(consumer)

    def _wait_retired(self, deadline: float) -> list[str]:
        """Wait for the actors of ended subscriptions; name those still running."""
        retiring, self._retiring = self._retiring, []
        stuck = []
        for name, future in retiring:
            try:
                future.get(timeout=max(0.05, deadline - time.monotonic()))
            except pykka.Timeout:
                stuck.append(name)
            except Exception:
                logger.debug("the actor of ended subscription %s failed to stop", name)
        return stuck

    def _retire(self, consumer: _Consumer) -> None:
        for _, seqs in consumer.mailbox.close():
            self._tracker.done(seqs)
        if consumer.ref is not None:
            self._retiring.append(
                (consumer.mailbox.name, consumer.ref.stop(block=False))
            )
            consumer.ref = None
            self.metrics.forget_mailbox(consumer.mailbox.name)

    def _submit(
        self,
        kind: str,
        op: int,
        entity_id: str,
        apply: Callable[..., Any] | None,
        actor: str,
        run_id: str | None,
        at: datetime | float | None,
        entry: _Kind | None = None,
    ) -> MutationFuture[Any]:
        if entry is None:
            entry = self._kind(kind)
        # A write with no run, no time and no partition map, whose id and
        # actor already passed their checks, has only apply left to check; any
        # other write takes every check in _check_write.
        if (
            run_id is None
            and at is None
            and type(entity_id) is str
            and entity_id in _IDS_SEEN
            and type(actor) is str
            and actor in _ACTORS_SEEN
            and (callable(apply) or (apply is None and op == REMOVE))
            and self.partitions is None
        ):
            ts = None
        else:
            ts = self._check_write(kind, op, entity_id, apply, actor, run_id, at)
        shards = entry.definition.shards
        shard = 0 if shards == 1 else hash(entity_id) % shards
        inside = thread_role.kind_shard
        if inside is not None and inside == (kind, shard):
            raise ReentrantCallError(
                f"{kind}/{entity_id}: mutate was called from inside an apply of the "
                "same kind, which would wait for itself; return the state instead, "
                "or write from a subscriber"
            )

        try:
            queue = entry.queues[shard]
        except IndexError:
            pass
        else:
            future: MutationFuture[Any] = MutationFuture(queue.completion)
            if queue.submit(
                new_request(op, entity_id, apply, actor, run_id, ts, future)
            ):
                return future

        # The gate is not open to every writer (or the actors are not running).
        if not self._tracker.admit(thread_role.internal):
            self._check_running("write")
            raise RuntimeStoppedError(
                f"{kind}/{entity_id}: the runtime is stopping; nothing recorded"
            )
        try:
            queue = entry.queues[shard]
        except IndexError:
            self._tracker.finish_mutation()
            raise RuntimeStoppedError(
                f"{kind}/{entity_id}: the kind's actor is not running; nothing recorded"
            ) from None
        future = MutationFuture(queue.completion)
        queue.put(new_request(op, entity_id, apply, actor, run_id, ts, future))
        return future

    def _check_write(
        self,
        kind: str,
        op: int,
        entity_id: str,
        apply: Callable[..., Any] | None,
        actor: str,
        run_id: str | None,
        at: datetime | float | None,
    ) -> float | None:
        # Every check of one write's arguments; returns its time (or None).
        pattern = self._secrets.pattern(run_id)
        if pattern is None:
            check_entity_id(kind, entity_id)
        else:
            _refuse_secret_in_id(kind, entity_id, run_id, pattern)
            _check_masked(pattern, check_entity_id, kind, entity_id)
        _remember_id(entity_id)
        if run_id is not None or type(actor) is not str or actor not in _ACTORS_SEEN:
            where = f"{kind}/{entity_id}"
            _check_masked(pattern, _check_actor_and_run, where, actor, run_id, pattern)
            _remember_actor(actor)
        if not callable(apply) and (op == MUTATE or apply is not None):
            shown = repr(apply) if pattern is None else mask_text(repr(apply), pattern)
            needed = "callable" if op == MUTATE else "callable or None"
            raise DefinitionError(
                f"{kind}/{entity_id}: apply must be {needed}, got {shown}; "
                "nothing recorded"
            )
        if self.partitions is not None:
            self.partitions.check_owner(self._instance_id, kind, entity_id)
        return None if at is None else to_timestamp(at, self.clock)

    def _submit_many(
        self,
        kind: str,
        items: list[tuple[str, Callable[..., Any]]],
        actor: str,
        run_id: str | None,
        at: datetime | float | None,
    ) -> BatchResult:
        entry = self._kind(kind)
        pattern = self._secrets.pattern(run_id)
        seen = _IDS_SEEN
        for index, item in enumerate(items):
            # A plain pair of an id that already passed its check and a
            # callable has nothing left to check without run secrets.
            if (
                type(item) is tuple
                and len(item) == 2
                and type(item[0]) is str
                and item[0] in seen
                and pattern is None
                and callable(item[1])
            ):
                continue
            if not isinstance(item, tuple) or len(item) != 2 or not callable(item[1]):
                shown = (
                    repr(item) if pattern is None else mask_text(repr(item), pattern)
                )
                raise DefinitionError(
                    f"{kind}: item {index} must be an (id, apply) pair with a "
                    f"callable apply, got {shown}; nothing applied"
                )
            if pattern is not None:
                _refuse_secret_in_id(kind, item[0], run_id, pattern)
            _check_masked(pattern, check_entity_id, kind, item[0])
            _remember_id(item[0])
        _check_masked(pattern, _check_actor_and_run, kind, actor, run_id, pattern)
        partitions = self.partitions
        if partitions is not None:
            for entity_id, _ in items:
                partitions.check_owner(self._instance_id, kind, entity_id)
        ts = None if at is None else to_timestamp(at, self.clock)
        shards = entry.definition.shards
        inside = thread_role.kind_shard
        if inside is not None and inside[0] == kind:
            raise ReentrantCallError(
                f"{kind}: mutate_many was called from inside an apply of the same "
                "kind, which would wait for itself; nothing applied"
            )

        batch = BatchResult(len(items))
        if not items:
            return batch
        if not self._tracker.admit(thread_role.internal, len(items)):
            self._check_running("write")
            raise RuntimeStoppedError(
                f"{kind}: the runtime is stopping; nothing applied"
            )
        queues = entry.queues
        if len(queues) < shards:
            for _ in items:
                self._tracker.finish_mutation()
            raise RuntimeStoppedError(
                f"{kind}: the kind's actor is not running; nothing applied"
            )

        slots = batch.slots()
        if shards == 1:
            queues[0].put_many(
                [
                    new_request(MUTATE, entity_id, apply, actor, run_id, ts, slot)
                    for (entity_id, apply), slot in zip(items, slots, strict=True)
                ]
            )
            return batch

        per_shard: list[list[Request]] = [[] for _ in range(shards)]
        for (entity_id, apply), slot in zip(items, slots, strict=True):
            per_shard[hash(entity_id) % shards].append(
                new_request(MUTATE, entity_id, apply, actor, run_id, ts, slot)
            )
        for shard, requests in enumerate(per_shard):
            if requests:
                queues[shard].put_many(requests)
        return batch

    def _on_commit(self, change: EntityChanged) -> None:
        # NOTE: runs under the log's lock, on the kind's actor, which keeps the
        # change open for drain() until it is handed on (see KindActor).
        if self._waiters:
            waiters = self._waiters.get((change.kind, change.id))
            if waiters:
                for event in waiters:
                    event.set()

    def _publish(
        self, changes: list[EntityChanged], wakes: list[Callable[[], None]]
    ) -> None:
        """Hand committed changes (all of one kind) to their consumers, in order.

        The consumers' wake-ups are appended to ``wakes``: the kind actor makes
        them after answering its callers, so that a blocked caller is not kept
        waiting behind the consumers it just woke.
        """
        entry = self._kinds[changes[0].kind]
        boxes = entry.boxes
        deriver = entry.deriver
        if boxes or deriver is not None:
            # One list for every mailbox: the deriver stage's ignores the keys.
            by_id = [(c.id, c, c.seq) for c in changes]
            for box in boxes:
                if not box.put_many(by_id, wakes):
                    _log_too_late(box, changes)
            if deriver is not None and not deriver.mailbox.put_many(by_id, wakes):
                _log_too_late(deriver.mailbox, changes)

        bus = self.bus
        if bus is not None:
            for change in changes:
                self._publish_to_bus(bus, change)

    def _publish_to_bus(self, bus: RedisBus, change: EntityChanged) -> None:
        try:
            bus.publish(change)
        except Exception as err:
            # The change is committed and cannot be undone: the bus's
            # failure must not reach the writer or the kind's actor.
            from runtime._redis_bus import ChangeTooLargeError

            if isinstance(err, ChangeTooLargeError):
                logger.error(
                    "%s; the change is committed here and kept in dead_letters(); "
                    "other instances will not see it",
                    err,
                )
                self._keep_unpublished(change, err)
                return
            logger.exception(
                "%s/%s seq=%d is committed but could not be published to the "
                "bus; other instances will not see it",
                change.kind,
                change.id,
                change.seq,
            )

    def _wait_until(
        self,
        kind: str,
        entity_id: str,
        predicate: Callable[[ReadOnlyDict | None], bool],
        timeout: float,
    ) -> ReadOnlyDict | None:
        if thread_role.kind_shard is not None:
            raise ReentrantCallError(
                f"{kind}/{entity_id}: wait_until() was called from inside an apply, "
                "on a kind's actor thread, which would hold up the writes it waits "
                "for; return the state instead, or wait from a subscriber"
            )

        handle: EntityHandle[Any] = EntityHandle(self, kind)
        key = (kind, entity_id)
        event = threading.Event()
        with self._waiters_lock:
            self._waiters[key] = (*self._waiters.get(key, ()), event)

        try:
            deadline = time.monotonic() + timeout
            while True:
                state = handle.get(entity_id)
                if predicate(state):
                    return state
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeliveryTimeoutError(
                        f"{kind}/{entity_id}: the predicate did not hold within "
                        f"{timeout} s; last state: {dict(state) if state else None}"
                    )
                event.wait(remaining)
                event.clear()
        finally:
            with self._waiters_lock:
                left = tuple(e for e in self._waiters.get(key, ()) if e is not event)
                if left:
                    self._waiters[key] = left
                else:
                    self._waiters.pop(key, None)


LONGEST_WAIT = 1e9
"""The longest time in seconds (about 31 years) a setting or wait may give.

Longer ones overflow the platform's timers when waited for.
"""

_LONGEST_WAKE_DELAY = 1.0
"""The most ``wake_delay`` may be: longer would only starve consumers."""

_DRAIN_SLICE = 0.05
"""Seconds between drain()'s releases of held consumer wake-ups."""


@overload
def _check_count(name: str, value: Any) -> int: ...


@overload
def _check_count(name: str, value: Any, *, none: bool) -> int | None: ...


def _check_count(name: str, value: Any, *, none: bool = False) -> int | None:
    # A Runtime setting that counts something: a whole number, 1 or more.
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DefinitionError(
            f"{name} must be a whole number, 1 or more{' (or None)' if none else ''}"
            f", got {value!r}; nothing started"
        )
    return value


@overload
def _check_seconds(
    name: str,
    value: Any,
    *,
    zero: bool = ...,
    timedelta_ok: bool = ...,
    outcome: str = ...,
    most: float = ...,
) -> float: ...


@overload
def _check_seconds(
    name: str,
    value: Any,
    *,
    zero: bool = ...,
    none: bool,
    timedelta_ok: bool = ...,
    outcome: str = ...,
    most: float = ...,
) -> float | None: ...


def _check_seconds(
    name: str,
    value: Any,
    *,
    zero: bool = False,
    none: bool = False,
    timedelta_ok: bool = False,
    outcome: str = "nothing started",
    most: float = LONGEST_WAIT,
) -> float | None:
    # A number of seconds: finite, positive (or 0 where ``zero``), at most
    # ``most``.
    if value is None and none:
        return None

    seconds = math.nan
    if isinstance(value, timedelta) and timedelta_ok:
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    if seconds <= most and (seconds > 0 or (zero and seconds == 0)):
        return seconds

    kinds = "number of seconds or a timedelta" if timedelta_ok else "number of seconds"
    least = "0 or more" if zero else "more than 0"
    raise DefinitionError(
        f"{name} must be a {kinds}, {least} and at most {most:g}"
        f"{' (or None)' if none else ''}, got {value!r}; {outcome}"
    )


def _watched_group(group: WorkGroup, watch: CallWatch) -> Callable[[Any], None]:
    return functools.partial(group.process, watch=watch)


def _stop_at_exit(ref: weakref.ref[Runtime]) -> None:
    runtime = ref()
    if runtime is not None and runtime.running:
        logger.warning("the program is exiting without stop(); stopping the runtime")
        runtime.stop()


def _refuse_secret_in_id(
    kind: str, entity_id: Any, run_id: str | None, pattern: re.Pattern[str]
) -> None:
    if isinstance(entity_id, str) and pattern.search(entity_id):
        raise InvalidIdError(
            kind,
            mask_text(entity_id, pattern),
            f"contains a secret of run {run_id}; ids are keys and are never "
            "masked, so they must not contain one",
        )


_ACTORS_SEEN: set[str] = {SYSTEM_ACTOR}
"""Actor strings that passed ``_check_actor_and_run``, to skip the check next time.

Only the actor's own format is remembered: a write with a ``run_id`` (whose
secrets may forbid the actor) is always checked in full.
"""

_ACTORS_REMEMBERED = 4096

_IDS_SEEN: set[str] = set()
"""Entity ids that passed ``check_entity_id``, to skip the check next time.

The check depends on the id alone, so one set serves every kind and runtime.
A write with a ``run_id`` (whose secrets may forbid the id) is always checked
in full.
"""

_IDS_REMEMBERED = 16_384
_ID_REMEMBERED_LENGTH = 128


def _remember_id(entity_id: str) -> None:
    # Only exact strings are remembered: a str subclass could match another
    # id through its own __eq__ and __hash__. Long ids are not worth the
    # memory; a full set is emptied, so the ids in use now are remembered.
    if type(entity_id) is not str or len(entity_id) > _ID_REMEMBERED_LENGTH:
        return
    if len(_IDS_SEEN) >= _IDS_REMEMBERED:
        _IDS_SEEN.clear()
    _IDS_SEEN.add(entity_id)


def _remember_actor(actor: str) -> None:
    # Exact strings only, as for ids; the set stops growing once full.
    if type(actor) is str and len(_ACTORS_SEEN) < _ACTORS_REMEMBERED:
        _ACTORS_SEEN.add(actor)


def _stopped(future: Any) -> bool:
    try:
        future.get(timeout=0)
    except pykka.Timeout:
        return False
    except Exception:
        logger.debug("an ended subscription's actor stopped with an error")
    return True


def _log_too_late(box: Mailbox, changes: list[EntityChanged]) -> None:
    logger.error(
        "%d changes reached %s after it was closed (the runtime stopped while "
        "their burst of writes ran) and are not delivered to it: %s",
        len(changes),
        box.name,
        ", ".join(f"{c.kind}/{c.id} seq={c.seq}" for c in changes),
    )


def _check_masked(
    pattern: re.Pattern[str] | None, check: Callable[..., Any], *args: Any
) -> None:
    # Run a write's argument check; with run secrets, what it refuses is raised
    # again with those secrets masked, and without the unmasked error as context.
    if pattern is None:
        check(*args)
        return

    try:
        check(*args)
    except InvalidIdError as err:
        if not pattern.search(repr(err.entity_id)):
            raise
        shown = _Shown(mask_text(repr(err.entity_id), pattern))
        refused: Exception = InvalidIdError(err.kind, shown, err.reason)
    except DefinitionError as err:
        if not pattern.search(str(err)):
            raise
        refused = DefinitionError(mask_text(str(err), pattern))
    else:
        return
    raise refused


def _states_of_plugin_kind(
    directory: Path, kind: str, states: dict[str, Any]
) -> RestoreError:
    # Its next snapshot would hold no states for a plugin-backed kind.
    return RestoreError(
        f"{directory}: kind {kind!r} is defined plugin-backed (with read=), but the "
        f"files hold {len(states)} states it recorded while store-backed, which the "
        "next snapshot would drop; nothing was changed on disk. Define it without "
        "read= to keep them (remove its entities first to switch it over), or move "
        "the snapshot and journal files aside"
    )


class _Shown:
    """A refused value, shown by its masked ``repr`` only."""

    __slots__ = ("shown",)

    def __init__(self, shown: str) -> None:
        self.shown = shown

    def __repr__(self) -> str:
        return self.shown


def _check_actor_and_run(
    where: str, actor: Any, run_id: Any, pattern: re.Pattern[str] | None
) -> None:
    if pattern is not None and isinstance(actor, str) and pattern.search(actor):
        raise DefinitionError(
            f"{where}: actor {mask_text(actor, pattern)!r} contains a secret of run "
            f"{run_id}; actors are recorded as given and never masked, so they must "
            "not contain one; nothing recorded"
        )

    for name, value, optional in (("actor", actor, False), ("run_id", run_id, True)):
        if value is None and optional:
            continue
        if not isinstance(value, str) or not value or not value.isprintable():
            raise DefinitionError(
                f"{where}: {name} must be a non-empty printable string"
                f"{' or None' if optional else ''}, got {value!r}; nothing recorded"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DefinitionError(
                f"{where}: {name} must be valid Unicode (no lone surrogates); "
                "nothing recorded"
            ) from None


def _take_remote(mailbox: Mailbox, change: EntityChanged, delivery: Delivery) -> None:
    # Runs in a broadcast reader's thread: queue another instance's change for
    # the subscription's consumer. Keyed by origin and id, so folding (when the
    # consumer is behind) never mixes two instances' changes of one id.
    thread_role.consumer = mailbox.name
    if not mailbox.put((delivery.origin, change.id), change, _REMOTE_SEQ):
        logger.debug(
            "%s is closed; %s/%s seq=%d from %s not queued",
            mailbox.name,
            change.kind,
            change.id,
            change.seq,
            delivery.origin,
        )


def _wake(ref: pykka.ActorRef[Any], name: str) -> None:
    try:
        ref.tell("wake")
    except pykka.ActorDeadError:
        logger.debug("consumer %s is stopped; its mailbox is closed", name)
