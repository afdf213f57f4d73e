"""The agent on recorded NAB series: every file, exact expectations, data quirks."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from monitoring import (
    CHECK_KIND,
    Agent,
    AgentSummary,
    IncidentRecord,
    ReplaySource,
    load_agent_config,
    load_label_windows,
)

REPO = Path(__file__).resolve().parent.parent
NAB = REPO.parent / "shared" / "data" / "nab"
NAB_DATA = NAB / "data"
WINDOWS = NAB / "labels" / "combined_windows.json"
KNOWN_CAUSE = NAB_DATA / "realKnownCause"
AWS = NAB_DATA / "realAWSCloudwatch"

pytestmark = pytest.mark.skipif(
    not NAB_DATA.is_dir(), reason=f"NAB data not found at {NAB_DATA}"
)

# Families for every NAB series, so that each file can change status.
NAB_CONFIG = """
[agent]
resolve_after = "30m"

[defaults]
for = "10m"
recover_for = "10m"
stale_after = "2h"

[families.cpu]
match = ["*cpu_utilization*"]
degraded_above = 80
unhealthy_above = 95

[families.disk_write]
match = ["*disk_write_bytes*"]
degraded_above = 1e8
unhealthy_above = 4e8

[families.network]
match = ["*network_in*", "*NetworkIn*"]
degraded_above = 5e6
unhealthy_above = 2e7

[families.requests]
match = ["elb_request_count*"]
degraded_above = 250
unhealthy_above = 400

[families.grok]
match = ["grok_asg_anomaly"]
degraded_below = 20
unhealthy_below = 5

[families.latency]
match = ["ec2_request_latency*"]
degraded_above = 50
unhealthy_above = 60

[families.ambient]
match = ["ambient_temperature*"]
degraded_above = 80
unhealthy_above = 84
degraded_below = 62
unhealthy_below = 59

[families.machine]
match = ["machine_temperature*"]
degraded_above = 100
unhealthy_above = 104
degraded_below = 60
unhealthy_below = 30
for = "15m"

[families.taxi]
match = ["nyc_taxi"]
degraded_above = 30000
unhealthy_above = 35000

[families.keys]
match = ["rogue_agent_key_*"]
degraded_above = 0.5
unhealthy_above = 50
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _close_agents() -> Iterator[None]:
    yield
    while OPEN_AGENTS:
        OPEN_AGENTS.pop().close()


OPEN_AGENTS: list[Agent] = []


def replay(
    paths: list[Path],
    config_text: str | None,
    tmp_path: Path,
    **options: Any,
) -> tuple[Agent, AgentSummary]:
    """Replay files to the end; the agent stays readable until the test ends."""
    config = load_agent_config(
        None if config_text is None else write_config(tmp_path, config_text)
    )
    agent = Agent(ReplaySource(paths), config, retention_rows=None, **options)
    OPEN_AGENTS.append(agent)
    return agent, agent.run()


def utc(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def status_rows(agent: Agent, check_id: str) -> list[tuple[float, str, str]]:
    return [
        (row.at.timestamp(), row.before, row.after)
        for row in agent.checks.history(check_id, field="status")
        if row.before is not None
    ]


# -- the whole data set ---------------------------------------------------------


def test_every_nab_file_replays_with_every_row_accounted_for(tmp_path: Path) -> None:
    """All 24 files in one run: each row is judged or skipped, none lost."""
    started = time.monotonic()

    _, summary = replay(
        [NAB_DATA], NAB_CONFIG, tmp_path, labels=load_label_windows(WINDOWS)
    )

    elapsed = time.monotonic() - started
    stats = summary.stats
    assert summary.checks == 24
    assert stats.samples + stats.out_of_order == 137_301
    assert stats.out_of_order == 11
    assert stats.repeated == 3 * 11 + 1
    assert summary.invalid_lines == 0
    assert set(summary.systems) == {"realAWSCloudwatch", "realKnownCause"}
    assert summary.changes > 100
    assert summary.incidents_opened == summary.triggers["incident.created"]
    assert summary.incidents_resolved == summary.triggers["incident.resolved"]
    assert summary.triggers["healthcheck.system_degraded"] >= summary.incidents_opened
    assert summary.dead_letters == 0
    assert summary.clean_stop
    assert summary.labels is not None
    assert summary.labels.windows_total == sum(
        len(load_label_windows(WINDOWS)[f"{p.parent.name}/{p.name}"])
        for p in NAB_DATA.rglob("*.csv")
    )
    assert 0 < summary.labels.windows_hit <= summary.labels.windows_total
    assert elapsed < 60, f"the whole NAB replay took {elapsed:.1f} s"


def test_every_check_history_moves_forward_in_record_time(tmp_path: Path) -> None:
    """No transition row of any check, health or incident goes back in time."""
    agent, summary = replay([NAB_DATA], NAB_CONFIG, tmp_path)

    for check_id in agent.checks.ids():
        times = [row.at for row in agent.checks.history(check_id)]
        assert times == sorted(times), check_id
    for system in summary.systems:
        times = [row.at for row in agent.health.history(system)]
        assert times == sorted(times), system
    for incident in summary.incidents:
        times = [row.at for row in agent.incidents.history(incident.incident_id)]
        assert times == sorted(times), incident.incident_id
        assert incident.checks, incident.incident_id


def test_each_resolved_incident_waited_for_the_resolve_hold(tmp_path: Path) -> None:
    """An incident resolves only after its system was healthy for resolve_after."""
    agent, summary = replay([KNOWN_CAUSE], NAB_CONFIG, tmp_path)

    resolved = [i for i in summary.incidents if i.resolved_at is not None]
    assert resolved
    for incident in resolved:
        monitoring = [
            at for at, _, status, _ in incident.events if status == "monitoring"
        ]
        assert monitoring, incident.incident_id
        assert incident.resolved_at - monitoring[-1] == pytest.approx(30 * 60)
        health = agent.health.history(incident.system, field="status")
        healthy_at = [r.at.timestamp() for r in health if r.after == "healthy"]
        assert monitoring[-1] in healthy_at


def test_report_has_the_summary_keys_and_the_incident_timeline(tmp_path: Path) -> None:
    """The JSON report carries every key the product asks for."""
    _, summary = replay(
        [AWS / "ec2_disk_write_bytes_c0d644.csv"],
        NAB_CONFIG,
        tmp_path,
        labels=load_label_windows(WINDOWS),
    )

    report = json.loads(json.dumps(summary.to_report()))

    for key in (
        "samples",
        "checks",
        "changes",
        "triggers",
        "incidents_opened",
        "incidents_resolved",
        "incidents",
        "windows_total",
        "windows_hit",
        "incidents_outside_windows",
        "mean_time_to_resolve_seconds",
        "throughput_samples_per_second",
    ):
        assert key in report, key
    assert report["samples"] == 4032
    assert report["windows_total"] == 3
    assert report["incidents"], "expected incidents on this series"
    for incident in report["incidents"]:
        assert set(incident) >= {"system", "opened_at", "resolved_at", "max_severity"}
        assert incident["system"] == "realAWSCloudwatch"
        assert incident["max_severity"] in ("major", "critical")
    assert report["incidents_outside_windows"] <= len(report["incidents"])


# -- exact expectations from a plain loop -----------------------------------------


def expected_run(
    path: Path,
    thresholds: dict[str, float],
    hold: float,
    recover: float,
    stale: float,
    resolve_after: float,
) -> tuple[list[tuple[float, str, str]], list[tuple[float, float | None, str]]]:
    """Status changes and incidents of a one-file replay, computed directly.

    A system with one check is exactly as healthy as that check. Conditions
    are "at least level L" (for getting worse) and "at most level L" (for
    getting better); each has the start of its current unbroken run.
    """
    names = ["healthy", "degraded", "unhealthy"]
    rows = []
    with path.open(newline="", encoding="utf-8") as file:
        for record in csv.DictReader(file):
            rows.append((utc(record["timestamp"]), float(record["value"])))

    def level(value: float) -> int:
        if value > thresholds.get("ua", 1e300) or value < thresholds.get("ub", -1e300):
            return 2
        if value > thresholds.get("da", 1e300) or value < thresholds.get("db", -1e300):
            return 1
        return 0

    status = 0
    at_least: dict[int, float] = {}
    at_most: dict[int, float] = {}
    last: float | None = None
    changes: list[tuple[float, str, str]] = []
    incidents: list[list[Any]] = []
    incident: list[Any] | None = None
    due: float | None = None

    def set_status(t: float, new: int) -> None:
        nonlocal status, incident, due
        changes.append((t, names[status], names[new]))
        if new == 0:
            if incident is not None:
                due = t + resolve_after
        elif status == 0 and incident is None:
            incident = [t, None, "critical" if new == 2 else "major"]
            incidents.append(incident)
        else:
            assert incident is not None
            if new == 2:
                incident[2] = "critical"
            due = None
        status = new

    def resolve_until(t: float) -> None:
        nonlocal incident, due
        if due is not None and due <= t:
            assert incident is not None
            incident[1] = due
            incident, due = None, None

    for t, value in rows:
        if last is not None and t < last:
            continue
        if last is not None and t - last > stale:
            # The series was silent: its check expired back to healthy.
            if status != 0:
                set_status(last + stale, 0)
            at_least.clear()
            at_most.clear()
        resolve_until(t)
        last = t

        lvl = level(value)
        for bound in (1, 2):
            if lvl >= bound:
                at_least.setdefault(bound, t)
            else:
                at_least.pop(bound, None)
        for bound in (0, 1):
            if lvl <= bound:
                at_most.setdefault(bound, t)
            else:
                at_most.pop(bound, None)

        worse = [b for b, s in at_least.items() if b > status and t - s >= hold]
        better = [b for b, s in at_most.items() if b < status and t - s >= recover]
        if worse:
            set_status(t, max(worse))
        elif better:
            set_status(t, min(better))

    if last is not None:
        resolve_until(last)
    return changes, [(i[0], i[1], i[2]) for i in incidents]


EXACT_CASES = {
    "ec2_request_latency_system_failure": (
        {"da": 47, "ua": 52},
        """
[agent]
resolve_after = "20m"
[defaults]
for = "10m"
recover_for = "5m"
stale_after = "30m"
[families.latency]
match = ["ec2_request_latency*"]
degraded_above = 47
unhealthy_above = 52
""",
        (600.0, 300.0, 1800.0, 1200.0),
    ),
    "machine_temperature_system_failure": (
        {"da": 100, "ua": 104, "db": 60, "ub": 30},
        """
[agent]
resolve_after = "30m"
[defaults]
for = "15m"
recover_for = "10m"
stale_after = "1h"
[families.machine]
match = ["machine_temperature*"]
degraded_above = 100
unhealthy_above = 104
degraded_below = 60
unhealthy_below = 30
""",
        (900.0, 600.0, 3600.0, 1800.0),
    ),
}


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
def test_history_and_incidents_equal_an_independent_plain_loop(
    name: str, tmp_path: Path
) -> None:
    """Status history and incidents are exactly what a direct computation gives."""
    thresholds, config, (hold, recover, stale, resolve_after) = EXACT_CASES[name]
    path = KNOWN_CAUSE / f"{name}.csv"
    want_changes, want_incidents = expected_run(
        path, thresholds, hold, recover, stale, resolve_after
    )

    agent, summary = replay([path], config, tmp_path)

    assert status_rows(agent, f"realKnownCause/{name}") == want_changes
    got = [(i.opened_at, i.resolved_at, i.max_severity) for i in summary.incidents]
    assert got == want_incidents
    assert len(want_changes) >= 10, "the case should exercise the hold logic"
    assert len(want_incidents) >= 3
    assert summary.changes == len(want_changes)


# -- data quirks ------------------------------------------------------------------


def test_repeated_dst_timestamps_are_all_judged_without_advancing_time(
    tmp_path: Path,
) -> None:
    """The 12 rows stamped 2014-03-09 03:00:00 are accepted in file order."""
    path = KNOWN_CAUSE / "ec2_request_latency_system_failure.csv"
    config = EXACT_CASES["ec2_request_latency_system_failure"][1]

    agent, summary = replay([path], config, tmp_path)

    assert summary.stats.samples == 4032
    assert summary.stats.repeated == 11
    assert summary.stats.out_of_order == 0
    clamped = utc("2014-03-09 03:00:00")
    rows = agent.checks.history("realKnownCause/ec2_request_latency_system_failure")
    assert all(row.at.timestamp() != clamped or row.field != "status" for row in rows)


def test_a_series_going_back_in_time_has_its_older_rows_skipped(
    tmp_path: Path,
) -> None:
    """machine_temperature repeats 02:00-02:55: 11 older rows are skipped."""
    path = KNOWN_CAUSE / "machine_temperature_system_failure.csv"

    _, summary = replay([path], EXACT_CASES[path.stem][1], tmp_path)

    assert summary.stats.out_of_order == 11
    assert summary.stats.repeated == 1
    assert summary.stats.samples == 22_695 - 11


def test_a_long_gap_restarts_a_pending_change(tmp_path: Path) -> None:
    """The 174 h hole in ambient_temperature: the hold starts again after it."""
    config = """
[defaults]
for = "3h"
stale_after = "2h"
[families.ambient]
match = ["ambient_temperature*"]
degraded_above = 68.5
"""
    path = KNOWN_CAUSE / "ambient_temperature_system_failure.csv"
    check = "realKnownCause/ambient_temperature_system_failure"

    agent, _ = replay([path], config, tmp_path)

    after_gap = utc("2014-04-10 15:00:00")
    pending = agent.checks.history(
        check, field="pending", since=utc("2014-04-03 09:00:00"), until=after_gap + 1
    )
    assert [row.at.timestamp() for row in pending] == [
        utc("2014-04-03 09:00:00"),
        utc("2014-04-03 11:00:00"),
        after_gap,
    ]
    assert pending[1].after == {}
    assert pending[2].after == {"degraded": after_gap}
    moves = [t for t, _, _ in status_rows(agent, check) if after_gap <= t]
    assert moves[0] == utc("2014-04-10 18:00:00")


def test_a_silent_series_returns_its_check_to_healthy(tmp_path: Path) -> None:
    """A degraded check whose series stops expires at last sample + stale_after."""
    config = """
[agent]
resolve_after = "1h"
[defaults]
for = "0s"
recover_for = "0s"
stale_after = "2h"
[families.ambient]
match = ["ambient_temperature*"]
degraded_above = 60
"""
    path = KNOWN_CAUSE / "ambient_temperature_system_failure.csv"
    check = "realKnownCause/ambient_temperature_system_failure"

    agent, summary = replay([path], config, tmp_path)

    changes = status_rows(agent, check)
    assert (utc("2014-04-03 11:00:00"), "degraded", "healthy") in changes
    assert (utc("2014-04-10 15:00:00"), "healthy", "degraded") in changes
    gap_incident = [
        i for i in summary.incidents if i.resolved_at == utc("2014-04-03 12:00:00")
    ]
    assert len(gap_incident) == 1
    assert summary.stats.expired >= 1


def test_crlf_files_read_every_row_with_clean_values(tmp_path: Path) -> None:
    """The rogue_agent files end their lines in CRLF."""
    paths = [KNOWN_CAUSE / "rogue_agent_key_hold.csv"]

    source = ReplaySource(paths)

    (series,) = source.files
    assert series.rows == 1882
    assert series.invalid == []
    assert series.values[0] == pytest.approx(0.0645345240000001)
    assert series.times[-1] == utc("2014-07-25 08:55:00")


def test_a_file_without_a_final_newline_keeps_its_last_row(tmp_path: Path) -> None:
    """nyc_taxi.csv ends right after its last value."""
    source = ReplaySource([KNOWN_CAUSE / "nyc_taxi.csv"])

    (series,) = source.files
    assert series.rows == 10_320
    assert series.times[-1] == utc("2015-01-31 23:30:00")
    assert series.values[-1] == 26288.0


def test_long_runs_of_zeros_are_healthy_values_not_errors(tmp_path: Path) -> None:
    """ec2_disk_write_bytes_c0d644 is 80 % zeros with bursts up to 8.6e8."""
    path = AWS / "ec2_disk_write_bytes_c0d644.csv"

    agent, summary = replay([path], NAB_CONFIG, tmp_path)

    check = "realAWSCloudwatch/ec2_disk_write_bytes_c0d644"
    assert summary.stats.non_finite == 0
    assert summary.changes >= 2
    assert agent.checks.get(check)["status"] == "healthy"
    zeros = [v for v in ReplaySource([path]).files[0].values if v == 0.0]
    assert len(zeros) == 3256


def _overlaps(incident: IncidentRecord, start: float, end: float) -> bool:
    """Whether ``incident`` was open at some time from ``start`` to ``end``."""
    resolved_at = incident.resolved_at or float("inf")
    return incident.opened_at <= end and resolved_at >= start


def test_labels_score_counts_windows_hit_and_incidents_outside(
    tmp_path: Path,
) -> None:
    """An incident overlapping a labelled window of its check counts as a hit."""
    path = AWS / "ec2_disk_write_bytes_c0d644.csv"
    windows = load_label_windows(WINDOWS)

    _, summary = replay([path], NAB_CONFIG, tmp_path, labels=windows)

    score = summary.labels
    assert score is not None
    spans = windows["realAWSCloudwatch/ec2_disk_write_bytes_c0d644.csv"]
    hit = sum(
        any(_overlaps(i, start, end) for i in summary.incidents) for start, end in spans
    )
    outside = sum(
        not any(_overlaps(i, start, end) for start, end in spans)
        for i in summary.incidents
    )
    assert score.windows_total == len(spans) == 3
    assert score.windows_hit == hit
    assert score.incidents_outside_windows == outside
    assert score.per_series == {
        "realAWSCloudwatch/ec2_disk_write_bytes_c0d644.csv": (3, hit)
    }


def test_label_windows_use_their_own_time_format() -> None:
    """Window times carry microseconds; they parse to the CSV's timestamps."""
    windows = load_label_windows(WINDOWS)

    spans = windows["realKnownCause/nyc_taxi.csv"]

    assert len(spans) == 5
    assert all(start < end for start, end in spans)
    assert spans[0][0] == utc("2014-10-30 15:30:00")


# -- record time and persistence ---------------------------------------------------


def test_speed_paces_a_replay_to_record_time(tmp_path: Path) -> None:
    """At speed 6000, an hour of records takes about 0.6 s of wall time."""
    folder = tmp_path / "sys"
    folder.mkdir()
    rows = "".join(f"2024-01-01 00:{m:02d}:00,1\n" for m in range(0, 60, 5))
    rows += "2024-01-01 01:00:00,1\n"
    (folder / "m.csv").write_text("timestamp,value\n" + rows, encoding="utf-8")
    started = time.monotonic()

    _, summary = replay([folder], None, tmp_path, speed=6000)

    elapsed = time.monotonic() - started
    assert summary.stats.samples == 13
    assert 0.55 <= elapsed < 5


def test_in_state_for_measures_record_time_during_a_replay(tmp_path: Path) -> None:
    """The runtime's clock follows the samples, not the wall clock."""
    path = AWS / "ec2_cpu_utilization_fe7f93.csv"

    agent, _ = replay([path], NAB_CONFIG, tmp_path)

    check = "realAWSCloudwatch/ec2_cpu_utilization_fe7f93"
    since = agent.checks.in_state_since(check, "status")
    held = agent.checks.in_state_for(check, "status")
    assert since is not None
    assert held is not None
    assert agent.runtime.clock() == utc("2014-02-28 14:22:00")
    assert held.total_seconds() == utc("2014-02-28 14:22:00") - since.timestamp()


def test_a_second_replay_into_the_same_data_dir_changes_nothing(
    tmp_path: Path,
) -> None:
    """State is restored; replaying the same rows again is a no-op."""
    path = AWS / "ec2_disk_write_bytes_c0d644.csv"
    data_dir = tmp_path / "state"
    _, first = replay([path], NAB_CONFIG, tmp_path, data_dir=data_dir)

    agent, second = replay([path], NAB_CONFIG, tmp_path, data_dir=data_dir)

    assert first.changes > 0
    assert second.changes == 0
    assert second.incidents_opened == 0
    assert second.stats.out_of_order > 3000
    assert second.stats.samples + second.stats.out_of_order == 4032
    assert agent.checks.ids() == ["realAWSCloudwatch/ec2_disk_write_bytes_c0d644"]
    assert agent.runtime.restored is not None
    assert agent.runtime.restored.seq > 0


def test_an_incident_left_open_is_resolved_by_the_next_run(tmp_path: Path) -> None:
    """The automation picks its open incidents up again after a restart."""
    folder = tmp_path / "rack"
    folder.mkdir()
    series = folder / "cpu_utilization_a.csv"
    config = """
[agent]
resolve_after = "10m"
[defaults]
for = "0s"
recover_for = "0s"
[families.cpu]
match = ["*cpu_utilization*"]
degraded_above = 80
"""
    series.write_text(
        "timestamp,value\n2024-01-01 00:00:00,10\n2024-01-01 00:05:00,90\n",
        encoding="utf-8",
    )
    data_dir = tmp_path / "state"
    _, first = replay([series], config, tmp_path, data_dir=data_dir)
    series.write_text(
        "timestamp,value\n2024-01-01 00:10:00,20\n2024-01-01 00:20:00,20\n",
        encoding="utf-8",
    )

    agent, second = replay([series], config, tmp_path, data_dir=data_dir)

    assert [(i.opened_at, i.resolved_at) for i in first.incidents] == [
        (utc("2024-01-01 00:05:00"), None)
    ]
    assert [(i.opened_at, i.resolved_at) for i in second.incidents] == [
        (utc("2024-01-01 00:05:00"), utc("2024-01-01 00:20:00"))
    ]
    assert second.incidents_resolved == 1
    assert agent.incidents.get("inc-rack-1")["status"] == "resolved"


def test_the_check_kind_is_store_backed_and_health_computed_on_read(
    tmp_path: Path,
) -> None:
    """Checks live in the runtime's store; health is derived from them."""
    agent, _ = replay([AWS], NAB_CONFIG, tmp_path)

    assert agent.checks.store_backed
    assert not agent.health.store_backed
    assert agent.checks.kind == CHECK_KIND
    health = agent.health.get("realAWSCloudwatch")
    assert health is not None
    assert health["total_checks"] == 17
    statuses = [s["status"] for s in agent.checks.get_many(agent.checks.ids()).values()]
    assert health["healthy_checks"] == statuses.count("healthy")
