from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from operator import itemgetter
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
        # Admission has a lock of its own, held only for a few operations:
        # every write takes it, and it must not queue behind the delivery
        # bookkeeping that kind actors and consumers do under _cond.
        self.admission_lock = threading.Lock()
        """Guards ``admission`` and ``pending``.

        The request queues share it, to admit and queue a write in one
        acquisition (see ``RequestQueue.submit``). Nothing done while holding
        it takes it again.
        """
        self.pending = 0
        """Mutations admitted and not finished yet."""
        self.admission = self.CLOSED
        """The gate for new mutations: one of the three modes above."""

    def set_admission(self, mode: int) -> None:
        """Open or close the gate for new mutations (see ``admit``)."""
        with self.admission_lock:
            self.admission = mode

    def admit(self, internal: bool, count: int = 1) -> bool:
        """Count ``count`` submitted mutations, if the gate lets them in.

        While the runtime stops, only mutations made from the runtime's own
        consumer threads (``internal``) are let in, so that subscribers can
        finish the cascades of changes that were committed before the stop.
        """
        with self.admission_lock:
            mode = self.admission
            if mode == self.ACCEPTING or (mode == self.INTERNAL_ONLY and internal):
                self.pending += count
                return True
            return False

    def finish_mutation(self) -> None:
        """Mark one admitted mutation as finished (committed or failed)."""
        self.finish_mutations(1)

    def finish_mutations(self, count: int) -> None:
        """Mark ``count`` admitted mutations as finished."""
        with self.admission_lock:
            self.pending -= count
        if self._waiting:
            # A waiter holds _cond from its check of pending until it sleeps,
            # so this notification cannot fall between the two.
            with self._cond:
                self._cond.notify_all()

    def wait_mutations(self, timeout: float | None) -> bool:
        """Wait until no admitted mutation is pending; False on timeout."""
        return self._wait_for(lambda: not self.pending, timeout)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no mutation is pending and nothing is being delivered."""
        return self._wait_for(lambda: not self._open and not self.pending, timeout)

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


Taken = list[Sequence[Any]]
"""Deliveries taken from a mailbox: ``(item, seqs kept open, queued_at)`` each.

A queued delivery is stored in this form, so that taking it builds nothing:
a tuple in a mailbox that never folds, a list ``[item, seqs, queued_at]`` in
a coalescing one, whose ``item`` a later delivery may replace. ``seqs`` holds
exactly one seq: a folded entry keeps only its first seq open (see
``Mailbox.put_many``).
"""


Merge = Callable[[Any, Any], Any]

_PUT_BACK = object()
# The key of a delivery queued again by ``Mailbox.hand_over``: never any
# entity's, so no later delivery is folded into it.

_seq_of = itemgetter(2)


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

    Open deliveries are counted in the tracker per *lot*, not per seq: each
    :meth:`put_many` that queues something keeps its lowest seq (the lot's
    floor) open once, and the mailbox counts, in queue order, how many of
    the lot's deliveries are still queued or in the consumer's hands. The
    lot's floor is closed when the last of them is finished, so drain()
    waits for every delivery at or below its target, at the price of one
    tracker update per lot instead of two per delivery. Deliveries that leave
    the mailbox unfinished (:meth:`close`, :meth:`hand_over`) are moved to
    per-seq counts for their new owner to close.

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
        self._entries: deque[Sequence[Any]] = deque()
        # The keys of the queued entries, in the same order (coalescing
        # mailboxes only): a separate deque keeps the entries themselves in
        # the shape a consumer takes them in.
        self._keys: deque[Hashable] = deque()
        self._newest: dict[Hashable, list[Any]] = {}
        # [floor, deliveries left] per lot, oldest first (see the class doc):
        # they cover the consumer's batch in hand, then the queued entries.
        self._lots: deque[list[int]] = deque()
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
        # Without max(): kind actors ask this before every write.
        in_hand = len(self._in_hand) - self.started
        return len(self._entries) + in_hand if in_hand > 0 else len(self._entries)

    def put(self, key: Hashable, item: Any, seq: int) -> bool:
        """Queue one delivery; return False if the mailbox is closed."""
        return self.put_many(((key, item, seq),))

    def put_many(
        self,
        deliveries: Sequence[tuple[Hashable, Any, int]],
        wakes: list[Callable[[], None]] | None = None,
    ) -> bool:
        """Queue ``(key, item, seq)`` deliveries in order, under one lock.

        Each is queued (or folded) exactly as :meth:`put` would; the consumer
        is woken once, or, when ``wakes`` is given, the wake-up is appended
        there for the caller to make soon after (it must). Returns False,
        queueing nothing, if the mailbox is closed. A mailbox that never folds
        ignores the keys.
        """
        queued_at = time.perf_counter()
        with self._cond:
            if self._closed:
                return False

            if self._merge is None:
                if not deliveries:
                    return True
                self._entries.extend(
                    [(item, (seq,), queued_at) for _, item, seq in deliveries]
                )
                self._open_lot(min(map(_seq_of, deliveries)), len(deliveries))
            elif not self._put_folding(deliveries, queued_at):
                return True
            wake = not self._scheduled
            self._scheduled = True
            # A wake-up handed to ``wakes`` may be held back for a while (see
            # KindActor): once half the mailbox fills with the consumer idle,
            # it is woken now rather than left to fold what held wake-ups
            # kept from it (one burst alone can still fill a small mailbox).
            # A second wake-up is a no-op for the consumer.
            now = (
                not wake
                and wakes is not None
                and not self._in_hand
                and (len(self._entries) * 2 >= self.capacity)
            )

        if wake:
            if wakes is None:
                self.wake()
            else:
                wakes.append(self.wake)
        elif now:
            self.wake()
        return True

    def _put_folding(
        self, deliveries: Sequence[tuple[Hashable, Any, int]], queued_at: float
    ) -> bool:
        # put_many for a coalescing mailbox, under its lock; returns whether
        # anything was queued (rather than folded).
        entries, keys, newest_of = self._entries, self._keys, self._newest
        merge = self._merge
        assert merge is not None
        # The room left before folding starts: len(self) with the queued
        # entries counted as they grow, instead of a call per delivery.
        room = self.capacity - max(0, len(self._in_hand) - self.started)
        opened = []
        folded = 0
        try:
            for key, item, seq in deliveries:
                newest = newest_of.get(key)
                if newest is not None and len(entries) >= room:
                    # NOTE: the entry keeps only its first seq open in the
                    # tracker: that seq is lower than every seq folded into
                    # it, so drain() still waits for the entry, and memory
                    # does not grow with the number of folds.
                    newest[0] = merge(newest[0], item)
                    folded += 1
                    continue
                entry = [item, (seq,), queued_at]
                entries.append(entry)
                keys.append(key)
                newest_of[key] = entry
                opened.append(seq)
        finally:
            if folded:
                self.coalesced += folded
                if self._coalesced_metric is not None:
                    self._coalesced_metric.inc(folded)
            if opened:
                self._open_lot(min(opened), len(opened))
        return bool(opened)

    def _open_lot(self, floor: int, count: int) -> None:
        self._lots.append([floor, count])
        self._tracker.add(floor)

    def _finish(self, count: int, newest: bool = False) -> None:
        # Close ``count`` deliveries of the lots, from the oldest (or the
        # newest) on, and the floors of the lots that are then finished.
        lots = self._lots
        floors = []
        while count:
            lot = lots[-1] if newest else lots[0]
            if lot[1] > count:
                lot[1] -= count
                break
            count -= lot[1]
            floors.append(lot[0])
            if newest:
                lots.pop()
            else:
                lots.popleft()
        if floors:
            self._tracker.done(floors)

    def _hand_on(
        self, gone: Sequence[Sequence[Any]], newest: bool = False
    ) -> list[int]:
        # Move deliveries leaving the mailbox unfinished from their lots to
        # per-seq counts, and return those seqs for their new owner to close.
        seqs = [seq for _, entry_seqs, _ in gone for seq in entry_seqs]
        if gone:
            # Opened before the lots are closed, so no seq is ever uncovered.
            self._tracker.add_many(seqs)
            self._finish(len(gone), newest)
        return seqs

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

            taken: Taken
            if len(entries) <= limit:
                taken = list(entries)
                entries.clear()
                if self._merge is not None:
                    self._keys.clear()
                    self._newest.clear()
            else:
                popleft = entries.popleft
                taken = [popleft() for _ in range(limit)]
                if self._merge is not None:
                    newest_of, next_key = self._newest, self._keys.popleft
                    for entry in taken:
                        key = next_key()
                        if newest_of.get(key) is entry:
                            del newest_of[key]
            self._in_hand = taken
            self.started = 0
            return taken

    def release(self, taken: Taken) -> Taken:
        """End the consumer's work on ``taken`` and close what was its own.

        That is every delivery of ``taken`` unless :meth:`close` already
        claimed the ones not started, in which case only the started ones
        (``started`` counts them) were the consumer's. Returns those, all now
        finished in the tracker.
        """
        with self._cond:
            if self._space_waiters:
                self._cond.notify_all()
            if self._in_hand is taken:
                self._in_hand = []
                mine = taken
            else:
                # A delivery started after close() claimed it stays the
                # closer's.
                mine = taken[: self._claimed_from]
            if mine:
                self._finish(len(mine))
            return mine

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
                return self._hand_on(taken[: self._claimed_from]), False

            self._in_hand = []
            _, stuck, stuck_at = taken[position]
            rest = taken[position + 1 :]
            if retry is None:
                done = self._hand_on(taken[: position + 1])
            else:
                done = self._hand_on(taken[:position])
                rest.insert(0, [retry, stuck, stuck_at])
            entries = self._entries
            for item, seqs, queued_at in reversed(rest):
                entries.appendleft([item, seqs, queued_at])
                if self._merge is not None:
                    self._keys.appendleft(_PUT_BACK)
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
            # The newest of the lots' deliveries: the started ones in hand
            # stay the consumer's, to close in release().
            claimed = [*in_hand[self._claimed_from :], *self._entries]
            self._hand_on(claimed, newest=True)
            left = [(item, list(seqs)) for item, seqs, _ in claimed]
            self._entries.clear()
            self._keys.clear()
            self._newest.clear()
            self._cond.notify_all()
            return left
