from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from runtime._errors import DefinitionError
from runtime._events import EntityChanged

logger = logging.getLogger(__name__)

Backoff = Callable[[int], float]


@dataclasses.dataclass(frozen=True, slots=True)
class Broadcast:
    """Run the handler for every change, in every runtime instance.

    A handler that raises is logged and counted; the change is not retried.
    """


LONGEST_PAUSE = 86_400.0 * 365
"""The longest pause between two attempts, in seconds (a year)."""

MAX_ATTEMPTS = 1_000_000
"""The most attempts a work queue may make for one change."""


@dataclasses.dataclass(frozen=True, slots=True)
class WorkQueue:
    """Run the handler once per change per worker group, with retries.

    Attributes:
        worker_group: handlers sharing a group (and a kind) compete for the
            changes: each change goes to one of them, chosen by id, so the
            changes of one id always reach the same handler in commit order.
        max_attempts: calls before the change is dead-lettered.
        backoff: the pause before attempt ``n + 1`` after attempt ``n`` failed.
    """

    worker_group: str
    max_attempts: int
    backoff: Backoff

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (from 1).

        A backoff function's answer is kept between 0 and ``LONGEST_PAUSE``;
        one that is not a number (or NaN) means no pause, with a warning, so a
        bad function never loses the change it was retrying.
        """
        try:
            pause = float(self.backoff(attempt))
        except Exception:
            logger.warning(
                "work queue %s: its backoff function failed for attempt %d; "
                "retrying without a pause",
                self.worker_group,
                attempt,
                exc_info=True,
            )
            return 0.0
        if pause != pause:
            logger.warning(
                "work queue %s: its backoff function gave NaN for attempt %d; "
                "retrying without a pause",
                self.worker_group,
                attempt,
            )
            return 0.0
        return min(max(0.0, pause), LONGEST_PAUSE)


def broadcast() -> Broadcast:
    """Deliver every change to the handler in every instance (the default)."""
    return Broadcast()


def work_queue(
    worker_group: str,
    max_attempts: int = 5,
    backoff: float | Backoff = 0.1,
    max_backoff: float = 30.0,
) -> WorkQueue:
    """Deliver each change once per ``worker_group``, retrying failures.

    Args:
        worker_group: the name of the group of competing handlers.
        max_attempts: how many times a failing handler is called for one
            change before the change is recorded as a dead letter.
        backoff: seconds before the first retry, doubled for each further
            retry and capped at ``max_backoff``; or a function of the failed
            attempt's number returning the pause in seconds.
        max_backoff: the longest pause between two attempts.
    """
    if not isinstance(worker_group, str) or not worker_group:
        raise DefinitionError(
            f"worker_group must be a non-empty string, got {worker_group!r}"
        )
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_ATTEMPTS
    ):
        raise DefinitionError(
            f"max_attempts must be a whole number from 1 to {MAX_ATTEMPTS}, got "
            f"{max_attempts!r}"
        )
    if not _is_pause(max_backoff):
        raise DefinitionError(
            f"max_backoff must be seconds from 0 to {LONGEST_PAUSE:g}, got "
            f"{max_backoff!r}"
        )

    if callable(backoff):
        pause: Backoff = backoff
    elif _is_pause(backoff):
        base, cap = float(backoff), float(max_backoff)

        def pause(attempt: int) -> float:
            return min(cap, base * 2.0 ** min(attempt - 1, 64))

    else:
        raise DefinitionError(
            f"backoff must be seconds from 0 to {LONGEST_PAUSE:g} or a function, "
            f"got {backoff!r}"
        )
    return WorkQueue(worker_group, max_attempts, pause)


def _is_pause(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 <= value <= LONGEST_PAUSE
    )


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A change that a work-queue handler failed on every attempt.

    With a bus, also a change another instance sent that a bus work queue
    refused on arrival (``attempts`` 0, its kind not necessarily defined here),
    or a change the bus never published because it is too large
    (``worker_group`` empty, ``subscriber`` ``"bus"``, ``attempts`` 0).

    Attributes:
        worker_group: the group whose handler failed.
        subscriber: the handler's name.
        change: the change that was not handled.
        error: the last error, as ``"TypeName: message"``.
        attempts: how many calls were made.
        failed_at: when the last attempt failed.
    """

    worker_group: str
    subscriber: str
    change: EntityChanged
    error: str
    attempts: int
    failed_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """Return the dead letter as plain data (for logs and reports)."""
        return {
            "worker_group": self.worker_group,
            "subscriber": self.subscriber,
            "kind": self.change.kind,
            "id": self.change.id,
            "seq": self.change.seq,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at.isoformat(),
        }
