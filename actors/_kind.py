from __future__ import annotations

import asyncio
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

_allocate_lock = threading.Lock
_perf_counter = time.perf_counter

T = TypeVar("T")

MUTATE = 1
REMOVE = 2

_ACCEPTING = DeliveryTracker.ACCEPTING

BURST = 256
"""Requests a kind actor runs before handing their changes on and answering.

Fewer when their applies are slow: see ``HAND_ON_AFTER``.
"""

HAND_ON_AFTER = 0.005
"""Seconds a kind actor holds a burst's committed changes before the next apply.

A burst of fast writes (up to ``BURST`` of them) ends well within this
time. When its applies are slow (a plugin-backed kind writing to its own
storage, say), the actor hands on, makes durable and answers what it has
committed so far before it starts the next apply once this time has passed
since the oldest change it holds.
"""

LINGER = 0.0005
"""Seconds a kind actor holding consumer wake-ups waits for the next write.

A caller writing one blocking ``mutate`` after another sends its next write
within this time: the actor takes it without consumer threads having woken
in between to compete for the interpreter (see ``KindActor``).
"""

DEFAULT_WAKE_DELAY = 0.002
"""The default of ``Runtime(wake_delay=...)``, in seconds."""


def _wait_seconds(timeout: Any) -> float | None:
    # A caller's timeout for waiting on a future: None or more than any timer
    # can wait means no limit.
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout != timeout or timeout < 0:
        raise ValueError(f"timeout must be 0 or more seconds, got {timeout!r}")
    if timeout >= threading.TIMEOUT_MAX / 2:
        return None
    return float(timeout)


class Completion:
    """Resolves the mutation futures of one kind actor and wakes their waiters.

    One lock serves every future of the actor, and a whole burst of results
    is published under a single acquisition, so a future costs no lock of its
    own to create or to resolve. A thread that waits for a future blocks on a
    lock of its own, which only that future's resolution releases: waiters
    of other futures are not woken.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def resolve(self, outcomes: Iterable[tuple[MutationFuture[Any], Any, Any]]) -> None:
        """Set ``(future, result, error)`` outcomes; an error wins when given."""
        callbacks = []
        waiters: list[Any] = []
        with self._lock:
            for future, result, error in outcomes:
                if future._done:
                    continue
                future._result = result
                future._error = error
                future._done = True
                if future._waiters is not None:
                    waiters += future._waiters
                if future._callbacks:
                    callbacks.append(future)

        for waiter in waiters:
            waiter.release()
        for future in callbacks:
            future._run_callbacks()

    def wait(self, future: MutationFuture[Any], timeout: float | None) -> bool:
        """Block until ``future`` is resolved; False if ``timeout`` ran out.

        Raises:
            TypeError: ``timeout`` is not a number of seconds or None.
            ValueError: ``timeout`` is NaN or negative.
        """
        timeout = _wait_seconds(timeout)
        waiter = _allocate_lock()
        waiter.acquire()
        with self._lock:
            if future._done:
                return True
            if future._waiters is None:
                future._waiters = [waiter]
            else:
                future._waiters.append(waiter)

        if waiter.acquire(True, -1 if timeout is None else timeout):
            return True
        with self._lock:
            if future._done:
                # Resolved while the wait ran out: resolve() releases the
                # waiter, which is never used again.
                return True
            future._waiters.remove(waiter)  # type: ignore[union-attr]
            return False

    def add_callback(
        self, future: MutationFuture[Any], callback: Callable[[Any], None]
    ) -> bool:
        """Register ``callback`` unless ``future`` is done; False if it is."""
        with self._lock:
            if future._done:
                return False
            if future._callbacks is None:
                future._callbacks = []
            future._callbacks.append(callback)
            return True


class MutationFuture(Generic[T]):
    """The result of a non-blocking mutation.

    ``get(timeout=...)`` blocks the calling thread like pykka's futures;
    ``await future`` suspends an ``asyncio`` task without blocking its loop.
    Errors of the mutation (schema, ``apply``, stopped runtime) are raised by
    both. ``result``, ``exception``, ``done`` and ``add_done_callback`` work as
    on a ``concurrent.futures.Future``.
    """

    __slots__ = ("_callbacks", "_completion", "_done", "_error", "_result", "_waiters")

    def __init__(self, completion: Completion | None = None) -> None:
        self._completion = Completion() if completion is None else completion
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], None]] | None = None
        self._waiters: list[Any] | None = None
        """Locks that threads waiting in ``get`` block on, released when done."""

    def done(self) -> bool:
        """Whether the mutation has finished, with a result or an error."""
        return self._done

    def get(self, timeout: float | None = None) -> T:
        """Wait for the mutation and return its result.

        Raises:
            TimeoutError: the mutation did not finish within ``timeout``.
        """
        if not self._done and not self._completion.wait(self, timeout):
            raise TimeoutError(
                f"the mutation did not finish within {timeout} seconds"
            ) from None
        if timeout is not None:
            _wait_seconds(timeout)
        if self._error is not None:
            raise self._error
        result: T = self._result
        return result

    def result(self, timeout: float | None = None) -> T:
        """Same as :meth:`get`."""
        return self.get(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the mutation; return its error, or ``None`` on success."""
        if not self._done and not self._completion.wait(self, timeout):
            raise TimeoutError(f"the mutation did not finish within {timeout} seconds")
        if timeout is not None:
            _wait_seconds(timeout)
        return self._error

    def add_done_callback(self, callback: Callable[[MutationFuture[T]], None]) -> None:
        """Call ``callback(future)`` once it is done (now, if it already is)."""
        if not self._completion.add_callback(self, callback):
            callback(self)

    def set_result(self, result: T) -> None:
        """Resolve with ``result`` (runtime use)."""
        self._completion.resolve(((self, result, None),))

    def set_exception(self, error: BaseException) -> None:
        """Resolve with ``error`` (runtime use)."""
        self._completion.resolve(((self, None, error),))

    def _run_callbacks(self) -> None:
        for callback in self._callbacks or ():
            try:
                callback(self)
            except Exception:
                logger.exception("a done-callback of a mutation future failed")

    def __await__(self) -> Generator[Any, None, T]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()

        def _copy(_: MutationFuture[T]) -> None:
            if waiter.done():
                return
            if self._error is not None:
                waiter.set_exception(self._error)
            else:
                waiter.set_result(self._result)

        def _hand_to_loop(future: MutationFuture[T]) -> None:
            loop.call_soon_threadsafe(_copy, future)

        self.add_done_callback(_hand_to_loop)
        return waiter.__await__()


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

    def slots(self) -> list[_Slot]:
        """The slots of every request, in order."""
        return [_Slot(self, index) for index in range(len(self.results))]

    def _finish(self, count: int = 1) -> None:
        with self._lock:
            self._left -= count
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

    def fill(self, result: Any, error: BaseException | None) -> BatchResult:
        """Record the outcome without counting it finished; return the batch.

        The caller counts a burst's slots of one batch finished at once with
        ``batch._finish(n)``.
        """
        if error is None:
            self._batch.results[self._index] = result
        else:
            self._batch.errors[self._index] = error
        self._filled = True
        return self._batch


class Request:
    """One mutation or removal on its way to a kind actor; see :func:`new_request`."""

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

    op: int
    entity_id: str
    apply: Callable[..., Any] | None
    actor: str
    run_id: str | None
    at: float | None
    future: MutationFuture[Any] | _Slot
    submitted: float
    """When it was submitted (``time.perf_counter``)."""


def new_request(
    op: int,
    entity_id: str,
    apply: Callable[..., Any] | None,
    actor: str,
    run_id: str | None,
    at: float | None,
    future: MutationFuture[Any] | _Slot,
) -> Request:
    """Build a :class:`Request` submitted now."""
    # Request has no __init__: calling a class whose __init__ is Python code
    # costs a quarter more per write than filling a bare instance here.
    request = Request()
    request.op = op
    request.entity_id = entity_id
    request.apply = apply
    request.actor = actor
    request.run_id = run_id
    request.at = at
    request.future = future
    request.submitted = _perf_counter()
    return request


class RequestQueue:
    """The queue of requests in front of one kind actor.

    Writers append here and wake the actor with one pykka message only when it
    is idle; the actor then takes every waiting request in one step. A burst
    of pipelined mutations thus costs one pykka message, not one per mutation.
    Thread-safe; any number of producers, one consumer.

    The queue shares the admission lock of ``tracker``, so that :meth:`submit`
    counts a write as admitted and queues it in a single acquisition.
    """

    def __init__(self, tracker: DeliveryTracker | None = None) -> None:
        self.completion = Completion()
        """Resolves the futures of the requests queued here."""
        self._tracker = DeliveryTracker() if tracker is None else tracker
        self._lock = self._tracker.admission_lock
        self._requests: deque[Request] = deque()
        self._backlog: deque[Request] = deque()
        """Requests already taken from the shared queue; only the actor uses it."""
        self._scheduled = False
        self.wake: Callable[[], None] = lambda: None
        self._lingering = False
        self._arrival = threading.Condition(self._lock)
        """Notified on a new request while the actor waits in :meth:`take`."""
        self._held: list[Callable[[], None]] = []
        """Consumer wake-ups the actor holds back (see ``KindActor``)."""
        self.unhanded: list[_Outcome] = []
        """The outcomes of the burst the actor runs that it has not handed on."""

    def unhanded_seqs(self) -> list[int]:
        """The seqs of changes the actor committed but has not handed on yet.

        Read by ``stop()`` when the actor is stuck in a slow ``apply``: those
        changes are in the log and the store, but no consumer has them.
        """
        return [o[2].seq for o in list(self.unhanded) if o[2] is not None]

    @property
    def holding(self) -> bool:
        """Whether consumer wake-ups are held back."""
        return bool(self._held)

    def hold(self, wakes: list[Callable[[], None]]) -> bool:
        """Hold ``wakes`` back (emptying it); True if none were held before."""
        with self._lock:
            first = not self._held
            self._held += wakes
        wakes.clear()
        return first

    def release_held(self) -> None:
        """Make every held wake-up now; any thread may call it."""
        with self._lock:
            held, self._held = self._held, []
        _make(held)

    def __len__(self) -> int:
        return len(self._requests) + len(self._backlog)

    def submit(self, request: Request) -> bool:
        """Admit and queue one request, waking the actor if it is idle.

        Returns False, with nothing counted or queued, unless the tracker's
        gate is open to every writer: the caller then admits the write with
        ``DeliveryTracker.admit`` (which knows about internal writers) and
        queues it with :meth:`put`.
        """
        tracker = self._tracker
        lock = self._lock
        # acquire/release rather than "with": on this path per write, the
        # context-manager protocol costs as much again as the lock itself.
        lock.acquire()
        try:
            if tracker.admission != _ACCEPTING:
                return False
            tracker.pending += 1
            self._requests.append(request)
            if self._scheduled:
                if self._lingering:
                    self._arrival.notify()
                return True
            self._scheduled = True
        finally:
            lock.release()
        self.wake()
        return True

    def put(self, request: Request) -> None:
        """Queue one request, waking the actor if it is idle."""
        with self._lock:
            self._requests.append(request)
            if self._scheduled:
                if self._lingering:
                    self._arrival.notify()
                return
            self._scheduled = True
        self.wake()

    def put_many(self, requests: list[Request]) -> None:
        """Queue several requests at once, waking the actor if it is idle."""
        with self._lock:
            self._requests.extend(requests)
            if self._scheduled:
                if self._lingering:
                    self._arrival.notify()
                return
            self._scheduled = True
        self.wake()

    def take_all(self) -> deque[Request] | None:
        """Take every waiting request; ``None`` (and idle) when there are none."""
        with self._lock:
            taken, self._backlog = self._backlog, deque()
            taken.extend(self._requests)
            self._requests.clear()
            if not taken:
                self._scheduled = False
                return None
            return taken

    def take(self, limit: int, linger: float = 0.0) -> list[Request] | None:
        """Take up to ``limit`` of the oldest requests; ``None`` (and idle) if none.

        With ``linger``, wait up to that many seconds for a request when none
        is waiting (the actor stays scheduled meanwhile, so writers notify it
        instead of sending a message). Everything waiting is moved out of the
        shared queue in one swap, so writers never wait for the lock while the
        actor copies requests out.
        """
        backlog = self._backlog
        if not backlog:
            with self._lock:
                if not self._requests and linger > 0:
                    self._lingering = True
                    try:
                        self._arrival.wait(linger)
                    finally:
                        self._lingering = False
                if not self._requests:
                    self._scheduled = False
                    return None
                backlog, self._requests = self._requests, deque()
            self._backlog = backlog
        if len(backlog) <= limit:
            taken = list(backlog)
            backlog.clear()
            return taken
        popleft = backlog.popleft
        return [popleft() for _ in range(limit)]


_Outcome = tuple[Request, Any, EntityChanged | None, BaseException | None]


class WakeReleaser:
    """Makes the consumer wake-ups kind actors hold once their delay is up.

    One daemon thread per runtime, started with the first hold. A kind actor
    calls :meth:`release_later` when it starts holding wake-ups in a request
    queue (once per holding spell, not per change); the thread then makes
    them at the deadline unless the actor has made them already. This bounds
    how late a consumer is woken even while the actor is busy in a slow
    ``apply``, and frees a deriver stage that a writer on another shard waits
    for.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: dict[RequestQueue, float] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False

    def release_later(self, queue: RequestQueue, delay: float) -> None:
        """Make ``queue``'s held wake-ups in ``delay`` seconds at the latest."""
        with self._cond:
            if self._stopped:
                release_now = True
            else:
                release_now = False
                if queue not in self._due:
                    self._due[queue] = time.perf_counter() + delay
                    if self._thread is None:
                        self._thread = threading.Thread(
                            target=self._loop,
                            name="entity-runtime-wake-releaser",
                            daemon=True,
                        )
                        self._thread.start()
                    elif len(self._due) == 1:
                        self._cond.notify()
        if release_now:
            queue.release_held()

    def release_all(self) -> None:
        """Make every held wake-up now (a writer is about to wait, or drain())."""
        with self._cond:
            due, self._due = list(self._due), {}
        for queue in due:
            queue.release_held()

    def stop(self) -> None:
        """Make every held wake-up and end the thread; harmless to repeat."""
        with self._cond:
            self._stopped = True
            due, self._due = list(self._due), {}
            thread = self._thread
            self._cond.notify()
        for queue in due:
            queue.release_held()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._due and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                now = time.perf_counter()
                ready = [q for q, at in self._due.items() if at <= now]
                if not ready:
                    self._cond.wait(min(self._due.values()) - now)
                    continue
                for queue in ready:
                    del self._due[queue]
            for queue in ready:
                try:
                    queue.release_held()
                except Exception:
                    logger.exception("wake releaser: making held wake-ups failed")


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

    Consumer wake-ups are held back, up to ``wake_delay`` seconds after the
    first change that needed one: callers are answered at once, and while
    writes keep coming (or arrive within ``LINGER`` of each other, as blocking
    writes in a loop do) the actor goes on with them, so consumer threads do
    not wake after every change to compete for the interpreter with the
    writer and the actor. The consumers then take the held changes in one
    batch. Held wake-ups are made before any back-pressure wait, when the
    actor runs out of writes, and by the runtime's :class:`WakeReleaser` when
    the delay is up, whatever the actor is doing (a slow ``apply`` included).

    Runs on a daemon thread: a program that exits without ``stop()`` is not
    kept alive by it (the runtime's exit hook stops it first when it can).
    """

    use_daemon_thread = True

    def __init__(
        self,
        engine: KindEngine,
        shard: int,
        publish: Callable[[list[EntityChanged], list[Callable[[], None]]], None],
        deriver_box: Callable[[], Mailbox | None],
        tracker: DeliveryTracker,
        backpressure_timeout: float,
        mutate_seconds: Any,
        requests: RequestQueue,
        sync: Callable[[], None] | None = None,
        restarts: Any = None,
        abort: threading.Event | None = None,
        releaser: WakeReleaser | None = None,
        wake_delay: float = DEFAULT_WAKE_DELAY,
    ) -> None:
        super().__init__()
        self._releaser = releaser
        self._wake_delay = wake_delay if releaser is not None else 0.0
        self._restarts = restarts
        self._abort = abort
        self._stalled = False
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
            self._run_bursts()
        else:
            logger.warning(
                "kind actor %s/%d got an unexpected message %r",
                self.engine.kind,
                self.shard,
                message,
            )

    def _run_bursts(self) -> None:
        # Run bursts until no write comes. With a wake_delay the consumers'
        # wake-ups are held in the request queue, and the releaser makes them
        # once the delay is up even while a slow apply keeps this thread busy
        # (see the class doc); without one they are made after each burst.
        requests = self.requests
        releaser = self._releaser
        wakes: list[Callable[[], None]] = []
        try:
            while True:
                linger = LINGER if requests.holding else 0.0
                batch = requests.take(BURST, linger)
                if batch is None:
                    return
                try:
                    self._handle_batch(batch, wakes)
                except Exception as bug:
                    self._recover(batch, bug)
                if not self._wake_delay:
                    _make(wakes)
                elif wakes and requests.hold(wakes):
                    assert releaser is not None
                    releaser.release_later(requests, self._wake_delay)
        finally:
            _make(wakes)
            requests.release_held()

    def _release_all_held(self) -> None:
        self.requests.release_held()
        if self._releaser is not None:
            self._releaser.release_all()

    def _handle_batch(
        self, batch: Iterable[Request], wakes: list[Callable[[], None]]
    ) -> None:
        """Run one burst; add the consumer wake-ups it needs to ``wakes``."""
        # The burst's first commit opens a floor in the tracker at its seq:
        # every later change of the burst has a higher one, so keeping the
        # floor open until the changes are handed on makes drain() wait for
        # them without a tracker update per change. A burst that commits
        # nothing (a slow apply, say) opens none and holds no drain() up.
        tracker = self._tracker
        floors: list[int] = []

        def open_floor(seq: int) -> None:
            tracker.add(seq)
            floors.append(seq)

        def close_segment(outcomes: list[_Outcome]) -> None:
            # Its changes are handed on: close its floor, let the next commit
            # open another, and answer its callers.
            if floors:
                tracker.done(floors)
                floors.clear()
                engine.begin_burst(open_floor)
            self._answer(outcomes)

        engine = self.engine
        engine.begin_burst(open_floor)
        try:
            self._run_all(batch, wakes, close_segment)
        finally:
            # A failure outside user code may leave a floor open: close it.
            engine.end_burst()
            if floors:
                tracker.done(floors)

    def _answer(self, outcomes: list[_Outcome]) -> None:
        tracker = self._tracker

        answered = time.perf_counter()
        self._mutate_seconds.observe_many([answered - o[0].submitted for o in outcomes])
        resolved = []
        filled: dict[BatchResult, int] = {}
        for request, result, _change, error in outcomes:
            future = request.future
            if isinstance(future, _Slot):
                of = future.fill(result, error)
                filled[of] = filled.get(of, 0) + 1
            else:
                resolved.append((future, result, error))
        if resolved:
            self.requests.completion.resolve(resolved)
        for of, count in filled.items():
            of._finish(count)
        tracker.finish_mutations(len(outcomes))

    def _run_all(
        self,
        batch: Iterable[Request],
        wakes: list[Callable[[], None]],
        close_segment: Callable[[list[_Outcome]], None],
    ) -> None:
        """Run, make durable and hand on one burst, in segments.

        The changes are handed on at the end of the burst, or earlier: when
        the deriver stage's mailbox could not take them all (its bound counts
        the changes not handed on yet), or before an apply that would start
        ``HAND_ON_AFTER`` seconds or more after the oldest change held. Each
        segment's outcomes go to ``close_segment`` once it is handed on.
        """
        segment: list[_Outcome] = []
        requests = self.requests
        requests.unhanded = segment
        waiting = 0
        held_since = 0.0
        box = self._deriver_box()
        abort = self._abort
        self._stalled = False
        for request in batch:
            if abort is not None and abort.is_set():
                segment.append((request, None, None, self._stopped_error(request)))
                continue
            # One read of the mailbox's length serves both of its checks.
            depth = 0
            if box is not None:
                depth = len(box)
                if not waiting and depth >= box.capacity:
                    # The stage must be awake before the writer waits for it,
                    # whichever shard holds its wake-up.
                    _make(wakes)
                    self._release_all_held()
            if waiting and (
                (box is not None and depth + waiting >= box.capacity)
                or _perf_counter() - held_since >= HAND_ON_AFTER
            ):
                handed = self._finish_segment(segment, wakes)
                segment, waiting = [], 0
                requests.unhanded = segment
                close_segment(handed)
                _make(wakes)
                self._release_all_held()
                if box is not None:
                    depth = len(box)

            try:
                result, change = self._run(request, box, depth)
            except BaseException as err:
                segment.append((request, None, None, err))
            else:
                segment.append((request, result, change, None))
                if change is not None:
                    if not waiting:
                        held_since = _perf_counter()
                    waiting += 1

        handed = self._finish_segment(segment, wakes)
        requests.unhanded = []
        close_segment(handed)

    def _finish_segment(
        self, segment: list[_Outcome], wakes: list[Callable[[], None]]
    ) -> list[_Outcome]:
        if self._sync is not None and any(o[2] is not None for o in segment):
            segment = self._make_durable(segment)

        changes = [o[2] for o in segment if o[2] is not None]
        if changes:
            self._hand_off(changes, wakes)
        return segment

    def _stopped_error(self, request: Request) -> RuntimeStoppedError:
        return RuntimeStoppedError(
            f"{self.engine.kind}/{request.entity_id}: the runtime stopped before "
            "this mutation ran; nothing recorded"
        )

    def _hand_off(
        self, changes: list[EntityChanged], wakes: list[Callable[[], None]]
    ) -> None:
        try:
            self._publish(changes, wakes)
        except Exception:
            # The changes are committed; a failure to hand them to their
            # consumers must not hide that from the callers or leave drain()
            # waiting.
            self._restarts.inc()
            logger.exception(
                "kind actor %s/%d: %d changes (%s) are committed but could not be "
                "handed to every consumer",
                self.engine.kind,
                self.shard,
                len(changes),
                ", ".join(f"{c.kind}/{c.id} seq={c.seq}" for c in changes[:5]),
            )

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

    def _run(
        self, request: Request, box: Mailbox | None, depth: int
    ) -> tuple[Any, EntityChanged | None]:
        """Run one request, first waiting for room if ``depth`` fills ``box``."""
        if box is not None and depth >= box.capacity:
            # One wait per burst: once the stage made no room in time, the
            # burst's later writes are refused at once instead of each waiting.
            if self._stalled or not box.wait_for_space(self._backpressure_timeout):
                self._stalled = True
                self.engine.count_failed()
                raise BackpressureError(
                    f"{self.engine.kind}/{request.entity_id}: the deriver stage has "
                    f"{len(box)} changes waiting and made no room within "
                    f"{self._backpressure_timeout} s; nothing recorded"
                )
            if box.closed:
                raise self._stopped_error(request)

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


def _make(wakes: list[Callable[[], None]]) -> None:
    """Make the consumer wake-ups in ``wakes`` and empty it."""
    for wake in wakes:
        wake()
    wakes.clear()
