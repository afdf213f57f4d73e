from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


class DeliveryTracker:
    """Counts, per sequence number, the deliveries not yet finished.

    A change is *open* from its commit until the last consumer it was handed to
    has finished with it (handled, failed for good or dropped). ``drain`` waits
    until no change at or below a given sequence is open, which is how
    ``Runtime.drain`` knows that everything committed so far was delivered.
    """

    CLOSED = 0
    ACCEPTING = 1
    INTERNAL_ONLY = 2

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._open: dict[int, int] = {}
        self._waiting = 0
        # Admission has a lock of its own, held only for a few integer
        # operations: every write takes it, and it must not queue behind the
        # delivery bookkeeping that kind actors and consumers do under _cond.
        self._count_lock = threading.Lock()
        self._pending = 0
        self._admission = self.CLOSED

    def set_admission(self, mode: int) -> None:
        """Open or close the gate for new mutations (see ``admit``)."""
        with self._count_lock:
            self._admission = mode

    def admit(self, internal: bool, count: int = 1) -> bool:
        """Count ``count`` submitted mutations, if the gate lets them in.

        While the runtime stops, only mutations made from the runtime's own
        consumer threads (``internal``) are let in, so that subscribers can
        finish the cascades of changes that were committed before the stop.
        """
        with self._count_lock:
            mode = self._admission
            if mode == self.ACCEPTING or (mode == self.INTERNAL_ONLY and internal):
                self._pending += count
                return True
            return False

    def finish_mutation(self) -> None:
        """Mark one admitted mutation as finished (committed or failed)."""
        self.finish_mutations(1)

    def finish_mutations(self, count: int) -> None:
        """Mark ``count`` admitted mutations as finished."""
        with self._count_lock:
            self._pending -= count
        if self._waiting:
            # A waiter holds _cond from its check of _pending until it sleeps,
            # so this notification cannot fall between the two.
            with self._cond:
                self._cond.notify_all()

    def wait_mutations(self, timeout: float | None) -> bool:
        """Wait until no admitted mutation is pending; False on timeout."""
        return self._wait_for(lambda: not self._pending, timeout)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no mutation is pending and nothing is being delivered."""
        return self._wait_for(lambda: not self._open and not self._pending, timeout)

    def _wait_for(self, done: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while not done():
                    remaining = (
                        None if deadline is None else deadline - time.monotonic()
                    )
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._waiting -= 1

    def add(self, seq: int, count: int = 1) -> None:
        """Count ``count`` more pending deliveries of change ``seq``."""
        with self._cond:
            self._open[seq] = self._open.get(seq, 0) + count

    def add_many(self, seqs: Iterable[int]) -> None:
        """Count one more pending delivery of each change in ``seqs``."""
        with self._cond:
            opened = self._open
            get = opened.get
            for seq in seqs:
                opened[seq] = get(seq, 0) + 1

    def done(self, seqs: Iterable[int]) -> None:
        """Mark one pending delivery of each change in ``seqs`` as finished."""
        with self._cond:
            opened = self._open
            for seq in seqs:
                left = opened[seq] - 1
                if left:
                    opened[seq] = left
                else:
                    del opened[seq]
            if self._waiting:
                self._cond.notify_all()

    def open_count(self) -> int:
        """The number of changes with deliveries still pending."""
        with self._cond:
            return len(self._open)

    def open_up_to(self, seq: int) -> list[int]:
        """The sequence numbers at or below ``seq`` still being delivered."""
        with self._cond:
            return sorted(s for s in self._open if s <= seq)

    def wait(self, seq: int, timeout: float | None) -> bool:
        """Wait until no change at or below ``seq`` is open; False on timeout."""
        return self._wait_for(lambda: not self._open or min(self._open) > seq, timeout)


_KEY, _ITEM, _SEQS, _QUEUED_AT = range(4)
"""Slots of a queued entry, a list ``[key, item, seqs, queued_at]``.

A list rather than an object: one is built per delivery on the hot path. A
folded entry keeps only its first seq open (see ``Mailbox.put_many``).
"""


Taken = list[tuple[Any, Sequence[int], float]]
"""Deliveries taken from a mailbox: ``(item, seqs kept open, queued_at)`` each."""


Merge = Callable[[Any, Any], Any]

_PUT_BACK = object()
# The key of a delivery queued again by ``Mailbox.hand_over``: never any
# entity's, so no later delivery is folded into it.


class Mailbox:
    """The bounded, optionally coalescing queue in front of one consumer actor.

    The pykka inbox only carries wake-up messages; the deliveries themselves
    wait here, so that the bound and the coalescing can be applied.

    Policy when the consumer is behind (``capacity`` entries waiting):

    * coalescing mailboxes (subscribers, trigger handlers) fold a new delivery
      into the newest waiting delivery with the same key (the entity id), so
      the consumer still sees every id's latest state, in commit order, and
      memory stays bounded by ``capacity`` plus one entry per distinct key.
      Each fold is counted in ``coalesced``. ``merge`` may return ``None`` to
      say the two deliveries cancel out (an entity created and removed).
    * non-coalescing mailboxes (the deriver stage) never drop or fold; their
      producers call ``wait_for_space`` before committing, so a writer is held
      back (and finally refused, with nothing recorded) instead.

    Thread-safe; any number of producers, one consumer.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        tracker: DeliveryTracker,
        merge: Merge | None = None,
        coalesced_metric: Any = None,
    ) -> None:
        self.name = name
        self._coalesced_metric = coalesced_metric
        self.capacity = capacity
        self.coalesced = 0
        self._tracker = tracker
        self._merge = merge
        self._cond = threading.Condition(threading.Lock())
        self._entries: deque[list[Any]] = deque()
        self._newest: dict[Hashable, list[Any]] = {}
        self._space_waiters = 0
        self._scheduled = False
        self._closed = False
        self._in_hand: Taken = []
        self._claimed_from = 0
        self.started = 0
        """How many deliveries of the consumer's current batch it has started."""
        self.wake: Callable[[], None] = lambda: None

    @property
    def closed(self) -> bool:
        """Whether the mailbox refuses deliveries (its consumer was retired)."""
        return self._closed

    def __len__(self) -> int:
        """Deliveries not started yet: queued, or taken but not begun."""
        return len(self._entries) + max(0, len(self._in_hand) - self.started)

    def put(self, key: Hashable, item: Any, seq: int) -> bool:
        """Queue one delivery; return False if the mailbox is closed."""
        return self.put_many(((key, item, seq),))

    def put_many(
        self,
        deliveries: Iterable[tuple[Hashable, Any, int]],
        wakes: list[Callable[[], None]] | None = None,
    ) -> bool:
        """Queue ``(key, item, seq)`` deliveries in order, under one lock.

        Each is queued (or folded) exactly as :meth:`put` would; the consumer
        is woken once, or, when ``wakes`` is given, the wake-up is appended
        there for the caller to make soon after (it must). Returns False,
        queueing nothing, if the mailbox is closed.
        """
        queued_at = time.perf_counter()
        with self._cond:
            if self._closed:
                return False

            entries = self._entries
            merge = self._merge
            opened = []
            if merge is None:
                for key, item, seq in deliveries:
                    entries.append([key, item, (seq,), queued_at])
                    opened.append(seq)
            else:
                newest_of = self._newest
                for key, item, seq in deliveries:
                    newest = newest_of.get(key)
                    if newest is not None and len(self) >= self.capacity:
                        # NOTE: the entry keeps only its first seq open in the
                        # tracker: that seq is lower than every seq folded into
                        # it, so drain() still waits for the entry, and memory
                        # does not grow with the number of folds.
                        newest[_ITEM] = merge(newest[_ITEM], item)
                        self.coalesced += 1
                        if self._coalesced_metric is not None:
                            self._coalesced_metric.inc()
                        continue
                    entry = [key, item, (seq,), queued_at]
                    entries.append(entry)
                    newest_of[key] = entry
                    opened.append(seq)

            if not opened:
                return True
            self._tracker.add_many(opened)
            wake = not self._scheduled
            self._scheduled = True

        if wake:
            if wakes is None:
                self.wake()
            else:
                wakes.append(self.wake)
        return True

    def wait_for_space(self, timeout: float) -> bool:
        """Wait until fewer than ``capacity`` deliveries wait; False on timeout."""
        if len(self) < self.capacity:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            self._space_waiters += 1
            try:
                while len(self) >= self.capacity and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._space_waiters -= 1

    def take_many(self, limit: int) -> Taken | None:
        """Remove up to ``limit`` of the oldest deliveries, oldest first.

        Returns ``None`` (and marks the mailbox unscheduled, so the next put
        wakes the consumer) when nothing waits.
        """
        with self._cond:
            entries = self._entries
            if not entries:
                self._scheduled = False
                return None

            count = min(limit, len(entries))
            newest_of = self._newest
            taken = []
            for _ in range(count):
                key, item, seqs, queued_at = entry = entries.popleft()
                if newest_of and newest_of.get(key) is entry:
                    del newest_of[key]
                taken.append((item, seqs, queued_at))
            self._in_hand = taken
            self.started = 0
            return taken

    def release(self, taken: Taken) -> Taken:
        """End the consumer's work on ``taken``; return what it must still close.

        That is every delivery of ``taken`` unless :meth:`close` already
        claimed the ones not started, in which case only the started ones
        (``started`` counts them) are left to the consumer.
        """
        with self._cond:
            if self._space_waiters:
                self._cond.notify_all()
            if self._in_hand is taken:
                self._in_hand = []
                return taken
            # A delivery started after close() claimed it stays the closer's.
            return taken[: self._claimed_from]

    def hand_over(
        self, taken: Taken, position: int, retry: Any = None
    ) -> tuple[list[int], bool]:
        """Take ``taken`` over from a consumer abandoned at ``position``.

        For a consumer whose handler call timed out: the deliveries before
        ``position`` are finished, and so is the one at ``position`` unless
        ``retry`` (the item to try it again with) is given. The rest (the
        retry first) are queued again ahead of everything waiting, in their
        order, so a replacement consumer sees them before anything queued
        later; their seqs stay open and are not counted again, and nothing is
        ever folded into them. The caller wakes the replacement.

        If :meth:`close` came first, the deliveries it claimed are the
        closer's and nothing is queued again.

        Returns:
            The seqs the caller must close, and whether ``retry`` was queued.
        """
        with self._cond:
            if self._in_hand is not taken:
                mine = taken[: self._claimed_from]
                return [seq for _, seqs, _ in mine for seq in seqs], False

            self._in_hand = []
            _, stuck, stuck_at = taken[position]
            done = [seq for _, seqs, _ in taken[:position] for seq in seqs]
            rest = taken[position + 1 :]
            if retry is None:
                done.extend(stuck)
            else:
                rest.insert(0, (retry, stuck, stuck_at))
            entries = self._entries
            for item, seqs, queued_at in reversed(rest):
                entries.appendleft([_PUT_BACK, item, seqs, queued_at])
            self._scheduled = True
            return done, retry is not None

    def close(self) -> list[tuple[Any, list[int]]]:
        """Refuse further deliveries and return (and forget) what still waits.

        What still waits includes the deliveries the consumer has taken but
        not started; from then on they are the caller's to account for, and
        :meth:`release` will not return them to the consumer.
        """
        with self._cond:
            self._closed = True
            in_hand, self._in_hand = self._in_hand, []
            self._claimed_from = self.started
            left = [
                (item, list(seqs)) for item, seqs, _ in in_hand[self._claimed_from :]
            ]
            left += [(e[_ITEM], list(e[_SEQS])) for e in self._entries]
            self._entries.clear()
            self._newest.clear()
            self._cond.notify_all()
            return left
