"""Helpers for testing code that runs on entity-runtime.

``FakeClock`` gives a runtime a clock that only moves when told to, so tests
of durations (``in_state_for``, ``transition_count`` windows, hold times) are
exact and instant.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

logger = logging.getLogger(__name__)

__all__ = ["FakeClock"]


class FakeClock:
    """A clock for ``Runtime(clock=...)`` that moves only when advanced.

    Calling it returns the current POSIX time in seconds. Thread-safe.

    Args:
        start: the initial time (timezone-aware datetime or POSIX seconds);
            default 2026-01-01T00:00:00Z.
    """

    def __init__(self, start: datetime | float | None = None) -> None:
        if start is None:
            start = datetime(2026, 1, 1, tzinfo=UTC)
        if isinstance(start, datetime):
            if start.tzinfo is None:
                raise ValueError(f"start must be timezone-aware, got {start!r}")
            start = start.timestamp()
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def now(self) -> datetime:
        """The current time as a timezone-aware UTC datetime."""
        return datetime.fromtimestamp(self(), UTC)

    def advance(self, by: timedelta | float) -> None:
        """Move the clock forward by ``by`` (seconds or a timedelta)."""
        seconds = by.total_seconds() if isinstance(by, timedelta) else float(by)
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; got {seconds} s")
        with self._lock:
            self._now += seconds

    def set(self, when: datetime | float) -> None:
        """Jump to ``when`` (may go backwards, to test clocks that do)."""
        with self._lock:
            self._now = when.timestamp() if isinstance(when, datetime) else float(when)
