from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from typing import Any, Generic, TypeVar

import pykka

from actors._consumers import WAKE, thread_role
from actors._mailbox import DeliveryTracker, Mailbox
from runtime._engine import KindEngine
from runtime._errors import (
    ActorFailedError,
    BackpressureError,
    DurabilityError,
    RuntimeStoppedError,
)
from runtime._events import EntityChanged

logger = logging.getLogger(__name__)

T = TypeVar("T")

MUTATE = 1
REMOVE = 2


class MutationFuture(concurrent.futures.Future[T], Generic[T]):
    """The result of a non-blocking mutation.

    ``get(timeout=...)`` blocks the calling thread like pykka's futures;
    ``await future`` suspends an ``asyncio`` task without blocking its loop.
    Errors of the mutation (schema, ``apply``, stopped runtime) are raised by
    both.
    """

    def get(self, timeout: float | None = None) -> T:
        """Wait for the mutation and return its result."""
        try:
            return self.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"the mutation did not finish within {timeout} seconds"
            ) from None

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()


class BatchResult:
    """Collects the results of one ``mutate_many`` call.

    Each request of the batch reports into its own slot; the caller waits once
    for all of them instead of once per mutation.
    """

    def __init__(self, size: int) -> None:
        self.results: list[Any] = [None] * size
        self.errors: dict[int, BaseException] = {}
        self._left = size
        self._lock = threading.Lock()
        self._done = threading.Event()
        if size == 0:
            self._done.set()

    def slot(self, index: int) -> _Slot:
        """The future-like slot for the request at ``index``."""
        return _Slot(self, index)

    def _finish(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every request of the batch has finished."""
        return self._done.wait(timeout)


class _Slot:
    """One request's place in a :class:`BatchResult` (a minimal future)."""

    __slots__ = ("_batch", "_filled", "_index")

    def __init__(self, batch: BatchResult, index: int) -> None:
        self._batch = batch
        self._index = index
        self._filled = False

    def done(self) -> bool:
        return self._filled

    def set_result(self, result: Any) -> None:
        self._batch.results[self._index] = result
        self._filled = True
        self._batch._finish()

    def set_exception(self, error: BaseException) -> None:
        self._batch.errors[self._index] = error
        self._filled = True
        self._batch._finish()


class Request:
    """One mutation or removal on its way to a kind actor."""

    __slots__ = (
        "actor",
        "apply",
        "at",
        "entity_id",
        "future",
        "op",
        "run_id",
        "submitted",
    )

    def __init__(
        self,
        op: int,
        entity_id: str,
        apply: Callable[..., Any] | None,
        actor: str,
        run_id: str | None,
        at: float | None,
        future: MutationFuture[Any] | _Slot,
    ) -> None:
        self.op = op
        self.entity_id = entity_id
        self.apply = apply
        self.actor = actor
        self.run_id = run_id
        self.at = at
        self.future = future
        self.submitted = time.perf_counter()


class RequestQueue:
    """The queue of requests in front of one kind actor.

    Writers append here and wake the actor with one pykka message only when it
    is idle; the actor then takes every waiting request in one step. A burst
    of pipelined mutations thus costs one pykka message, not one per mutation.
    Thread-safe; any number of producers, one consumer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: deque[Request] = deque()
        self._scheduled = False
        self.wake: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._requests)

    def put(self, request: Request) -> None:
        """Queue one request, waking the actor if it is idle."""
        with self._lock:
            self._requests.append(request)
            if self._scheduled:
                return
            self._scheduled = True
        self.wake()

    def put_many(self, requests: list[Request]) -> None:
        """Queue several requests at once, waking the actor if it is idle."""
        with self._lock:
            self._requests.extend(requests)
            if self._scheduled:
                return
            self._scheduled = True
        self.wake()

    def take_all(self) -> deque[Request] | None:
        """Take every waiting request; ``None`` (and idle) when there are none."""
        with self._lock:
            if not self._requests:
                self._scheduled = False
                return None
            taken, self._requests = self._requests, deque()
            return taken


class KindActor(pykka.ThreadingActor):
    """Serialises the mutations of one kind (or of one shard of its ids).

    Every request for an id goes to the same actor, which runs the whole write
    path for it before taking the next: two writers of one id never diff
    against the same ``prev``. After a commit the change is handed to the
    kind's subscribers and deriver stage, and only then is the caller's future
    resolved, so a caller that sees its result can ``drain`` and find its
    change delivered.

    Back-pressure: before running a request the actor waits (up to
    ``backpressure_timeout`` seconds) for room in the deriver stage's mailbox;
    if none appears, the request fails with :class:`BackpressureError` and
    nothing is recorded.

    Runs on a daemon thread: a program that exits without ``stop()`` is not
    kept alive by it (the runtime's exit hook stops it first when it can).
    """

    use_daemon_thread = True

    def __init__(
        self,
        engine: KindEngine,
        shard: int,
        publish: Callable[[EntityChanged], None],
        deriver_box: Callable[[], Mailbox | None],
        tracker: DeliveryTracker,
        backpressure_timeout: float,
        mutate_seconds: Any,
        requests: RequestQueue,
        sync: Callable[[], None] | None = None,
        restarts: Any = None,
    ) -> None:
        super().__init__()
        self._restarts = restarts
        self.requests = requests
        self._sync = sync
        self.engine = engine
        self.shard = shard
        self._publish = publish
        self._deriver_box = deriver_box
        self._tracker = tracker
        self._backpressure_timeout = backpressure_timeout
        self._mutate_seconds = mutate_seconds

    def on_start(self) -> None:
        thread_role.kind_shard = (self.engine.kind, self.shard)

    def on_stop(self) -> None:
        left = self.requests.take_all()
        for request in left or ():
            request.future.set_exception(
                RuntimeStoppedError(
                    f"{self.engine.kind}/{request.entity_id}: the runtime stopped "
                    "before this mutation ran; nothing recorded"
                )
            )
            self._tracker.finish_mutation()

    def on_receive(self, message: Any) -> None:
        if message == WAKE:
            while True:
                batch = self.requests.take_all()
                if batch is None:
                    return
                try:
                    self._handle_batch(batch)
                except Exception as bug:
                    self._recover(batch, bug)
        elif isinstance(message, Request):
            try:
                self._handle(message)
            except Exception as bug:
                self._recover((message,), bug)
        else:
            logger.warning(
                "kind actor %s/%d got an unexpected message %r",
                self.engine.kind,
                self.shard,
                message,
            )

    def _handle(self, request: Request) -> None:
        self._handle_batch((request,))

    def _handle_batch(self, batch: Iterable[Request]) -> None:
        outcomes: list[tuple[Request, Any, EntityChanged | None, BaseException | None]]
        outcomes = []
        for request in batch:
            try:
                result, change = self._run(request)
            except BaseException as err:
                outcomes.append((request, None, None, err))
            else:
                outcomes.append((request, result, change, None))

        if self._sync is not None and any(o[2] is not None for o in outcomes):
            outcomes = self._make_durable(outcomes)

        for request, result, change, error in outcomes:
            if change is not None:
                self._hand_off(change)
            self._mutate_seconds.observe(time.perf_counter() - request.submitted)
            if error is None:
                request.future.set_result(result)
            else:
                request.future.set_exception(error)
            self._tracker.finish_mutation()

    def _hand_off(self, change: EntityChanged) -> None:
        try:
            self._publish(change)
        except Exception:
            # The change is committed; a failure to hand it to its consumers
            # must not hide that from the caller or leave drain() waiting.
            self._restarts.inc()
            logger.exception(
                "kind actor %s/%d: %s/%s seq=%d is committed but could not be "
                "handed to every consumer",
                self.engine.kind,
                self.shard,
                change.kind,
                change.id,
                change.seq,
            )
            self._tracker.done((change.seq,))

    def _recover(self, batch: Iterable[Request], bug: Exception) -> None:
        """Fail back what a failure outside user code left unanswered, then go on.

        The actor keeps no state of its own between bursts (the store and the
        log are the engine's), so carrying on with the next burst is a restart.
        """
        self._restarts.inc()
        unanswered = [r for r in batch if not r.future.done()]
        logger.error(
            "kind actor %s/%d failed outside user code (%s: %s); %d mutations in "
            "flight are failed back; restarting",
            self.engine.kind,
            self.shard,
            type(bug).__name__,
            bug,
            len(unanswered),
            exc_info=bug,
        )
        for request in unanswered:
            request.future.set_exception(
                ActorFailedError(
                    f"{self.engine.kind}/{request.entity_id}: the kind actor failed "
                    f"({type(bug).__name__}: {bug}) while handling this mutation; "
                    "it may have been applied: check get() or history()"
                )
            )
            self._tracker.finish_mutation()

    def _make_durable(
        self,
        outcomes: list[tuple[Request, Any, EntityChanged | None, BaseException | None]],
    ) -> list[tuple[Request, Any, EntityChanged | None, BaseException | None]]:
        # Group commit: one fsync makes every change of the burst durable
        # before any of them is acknowledged or delivered.
        try:
            self._sync()  # type: ignore[misc]
        except Exception as err:
            logger.exception(
                "kind actor %s/%d: fsync of the journal failed; %d changes are "
                "applied in memory but may not be durable",
                self.engine.kind,
                self.shard,
                sum(1 for o in outcomes if o[2] is not None),
            )
            return [
                (
                    request,
                    result if change is None else None,
                    change,
                    error
                    if change is None
                    else DurabilityError(
                        f"{change.kind}/{change.id} seq={change.seq}: applied in "
                        f"memory, but the journal could not be made durable: {err}"
                    ),
                )
                for request, result, change, error in outcomes
            ]
        return outcomes

    def _run(self, request: Request) -> tuple[Any, EntityChanged | None]:
        box = self._deriver_box()
        if box is not None and not box.wait_for_space(self._backpressure_timeout):
            self.engine.count_failed()
            raise BackpressureError(
                f"{self.engine.kind}/{request.entity_id}: the deriver stage has "
                f"{len(box)} changes waiting and made no room within "
                f"{self._backpressure_timeout} s; nothing recorded"
            )

        engine = self.engine
        if request.op == MUTATE:
            return engine.mutate(
                request.entity_id,
                request.apply,  # type: ignore[arg-type]
                request.actor,
                request.run_id,
                request.at,
            )
        change = engine.remove(
            request.entity_id, request.apply, request.actor, request.run_id, request.at
        )
        return change is not None, change
