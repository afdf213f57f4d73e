from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime
from typing import Any

from runtime._errors import DefinitionError
from runtime._events import EntityChanged

Backoff = Callable[[int], float]


@dataclasses.dataclass(frozen=True, slots=True)
class Broadcast:
    """Run the handler for every change, in every runtime instance.

    A handler that raises is logged and counted; the change is not retried.
    """


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
        """Seconds to wait after failed attempt number ``attempt`` (from 1)."""
        return max(0.0, float(self.backoff(attempt)))


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
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise DefinitionError(f"max_attempts must be 1 or more, got {max_attempts!r}")

    if callable(backoff):
        pause: Backoff = backoff
    elif isinstance(backoff, int | float) and backoff >= 0:
        base = float(backoff)

        def pause(attempt: int) -> float:
            return min(max_backoff, base * 2.0 ** (attempt - 1))

    else:
        raise DefinitionError(
            f"backoff must be seconds (>= 0) or a function, got {backoff!r}"
        )
    return WorkQueue(worker_group, max_attempts, pause)


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A change that a work-queue handler failed on every attempt.

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
