from __future__ import annotations

import collections
import logging
import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from monitoring._agent_report import iso

if TYPE_CHECKING:
    from monitoring._agent import Agent, AgentSummary

logger = logging.getLogger(__name__)

_STATUS_STYLE = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}


def format_duration(seconds: float | None) -> str:
    """Format seconds for people: ``45s``, ``12m 5s``, ``3h 12m``, ``2d 4h``."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{seconds:.3g}s" if seconds < 10 else f"{secs}s"


class LiveView:
    """A terminal view of a running agent, refreshed a few times a second.

    Shows samples per second, the systems by status, the open incidents and,
    for a replay, a progress bar. Rendering runs on rich's refresh thread and
    only reads the agent (counters, the health of each system, the open
    incidents), so it never slows the writes down by more than those reads.
    """

    def __init__(self, agent: Agent, console: Console | None = None) -> None:
        self.agent = agent
        self.console = console or Console()
        self._rates: collections.deque[tuple[float, int]] = collections.deque(maxlen=8)
        self._progress: Progress | None = None
        self._task: Any = None
        total = agent.source.total
        if total:
            self._progress = Progress(
                TextColumn("replay"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("replay", total=total)
        self._stderr = sys.stderr
        self._streams: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._live = Live(
            console=self.console,
            get_renderable=self.render,
            refresh_per_second=4,
            transient=False,
        )

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        # Log handlers keep the stream they were made with; point them at the
        # live display's stand-in so log lines print above the view.
        self._streams = [
            (handler, handler.setStream(sys.stderr))
            for handler in logging.getLogger().handlers
            if isinstance(handler, logging.StreamHandler)
            and handler.stream in (sys.__stderr__, self._stderr)
        ]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handler, stream in self._streams:
            handler.setStream(stream)
        self._live.__exit__(exc_type, exc, tb)

    def rate(self) -> float:
        """Samples per second over the last couple of seconds."""
        now, seen = time.monotonic(), self.agent.stats.seen
        self._rates.append((now, seen))
        first_time, first_seen = self._rates[0]
        if now - first_time <= 0:
            return 0.0
        return (seen - first_seen) / (now - first_time)

    def render(self) -> RenderableType:
        """Build the current view."""
        agent = self.agent
        stats = agent.stats
        head = Text(agent.source.description, style="bold")
        numbers = Text(
            f"{self.rate():,.0f} samples/s · {stats.samples:,} samples · "
            f"{stats.status_changes:,} status changes"
        )
        if stats.last_at is not None:
            numbers.append(f" · at {iso(stats.last_at)[:16].replace('T', ' ')}")

        systems = agent.health.get_many(agent.index.systems())
        counts = collections.Counter(state["status"] for state in systems.values())
        line = Text("systems: ")
        for status in ("healthy", "degraded", "unhealthy"):
            line.append(f"{status} {counts.get(status, 0)}  ", _STATUS_STYLE[status])

        incidents = Table(
            "incident", "system", "severity", "status", box=None, padding=(0, 2)
        )
        open_now = agent.automation.open_incidents()
        for item in open_now[:8]:
            incidents.add_row(item.incident_id, item.system, item.severity, item.status)
        parts: list[RenderableType] = [head, numbers, line]
        parts.append(
            incidents if open_now else Text("no open incidents", style="green")
        )
        if len(open_now) > 8:
            parts.append(Text(f"... and {len(open_now) - 8} more"))
        if self._progress is not None:
            self._progress.update(self._task, completed=stats.seen)
            parts.append(self._progress)
        return Group(*parts)


def summary_lines(summary: AgentSummary) -> list[str]:
    """The end-of-run summary as plain text lines."""
    stats = summary.stats
    skipped = []
    if stats.out_of_order:
        skipped.append(f"{stats.out_of_order:,} out of order skipped")
    if stats.repeated:
        skipped.append(f"{stats.repeated:,} repeated timestamps")
    if summary.invalid_lines:
        skipped.append(f"{summary.invalid_lines:,} unreadable lines")
    systems = ", ".join(f"{s} {status}" for s, status in summary.systems.items())
    triggers = ", ".join(f"{name} {n:,}" for name, n in summary.triggers.items())

    lines = [
        f"entity-runtime agent: {summary.source}",
        f"  samples     {stats.samples:,}"
        + (f" ({'; '.join(skipped)})" if skipped else ""),
        f"  checks      {summary.checks:,} in {len(summary.systems)} system(s)"
        + (f": {systems}" if 0 < len(summary.systems) <= 4 else ""),
        f"  changes     {summary.changes:,} status changes "
        f"({stats.check_writes:,} check writes)",
        f"  triggers    {triggers or 'none'}",
        f"  incidents   {summary.incidents_opened:,} opened, "
        f"{summary.incidents_resolved:,} resolved, mean time to resolve "
        f"{format_duration(summary.mean_time_to_resolve)}",
    ]
    if summary.labels is not None:
        score = summary.labels
        lines.append(
            f"  labels      {score.windows_hit} of {score.windows_total} windows hit; "
            f"{score.incidents_outside_windows} of {len(summary.incidents)} "
            "incidents outside every window"
        )
    lines.append(
        f"  throughput  {summary.throughput:,.0f} samples/s "
        f"({stats.seen:,} in {format_duration(summary.seconds)})"
    )
    if summary.no_thresholds:
        names = summary.no_thresholds
        shown = ", ".join(names[:3]) + (
            f" and {len(names) - 3} more" if len(names) > 3 else ""
        )
        lines.append(
            f"  note        {len(names)} metric(s) match no family with thresholds "
            f"and stay healthy: {shown} (add families with --config)"
        )
    if summary.dead_letters or not summary.clean_stop:
        lines.append(
            f"  problems    {summary.dead_letters} dead letters, "
            f"clean stop: {summary.clean_stop}"
        )
    return lines
