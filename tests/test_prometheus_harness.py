"""The Prometheus test harness against a real server and a plain metrics target.

These tests use only `prometheus_client`, not the runtime, so a failure here
points at the harness or at the Prometheus install rather than at our code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_server import (
    PrometheusQueryError,
    PrometheusServer,
    find_prometheus_binary,
)

pytestmark = pytest.mark.skipif(
    find_prometheus_binary() is None,
    reason=(
        "no prometheus binary on PATH or at /usr/bin/prometheus; "
        "install the Debian 'prometheus' package, as .ci/run does"
    ),
)

INITIAL_EVENTS = 7


@dataclass
class MetricsTarget:
    """A `prometheus_client` HTTP endpoint serving one counter."""

    address: str
    counter: Counter


@pytest.fixture
def target() -> Iterator[MetricsTarget]:
    """Serve a fresh registry on a free 127.0.0.1 port, counter already at 7."""
    registry = CollectorRegistry()
    counter = Counter(
        "harness_events", "Events counted by the harness test.", registry=registry
    )
    for _ in range(INITIAL_EVENTS):
        counter.inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)

    yield MetricsTarget(f"127.0.0.1:{server.server_port}", counter)

    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def prometheus(target: MetricsTarget, tmp_path: Path) -> Iterator[PrometheusServer]:
    """A Prometheus scraping only ``target`` every second, stopped afterwards."""
    with PrometheusServer(
        targets=[target.address], scrape_interval="1s", tmp_dir=tmp_path
    ) as server:
        yield server


def test_scraped_counter_reads_back_exact_value(
    prometheus: PrometheusServer, target: MetricsTarget
) -> None:
    """A counter incremented 7 times reads back as exactly 7.0 with its labels."""
    prometheus.wait_for_scrape(target.address)

    result = prometheus.query("harness_events_total")

    assert result == [
        (
            {
                "__name__": "harness_events_total",
                "instance": target.address,
                "job": "harness",
            },
            float(INITIAL_EVENTS),
        )
    ]


def test_wait_for_sees_increments_made_after_the_first_scrape(
    prometheus: PrometheusServer, target: MetricsTarget
) -> None:
    """`wait_for` keeps polling until later scrapes pick up new increments."""
    prometheus.wait_for_scrape(target.address)

    target.counter.inc(3)
    result = prometheus.wait_for(
        "harness_events_total",
        lambda samples: [value for _, value in samples] == [10.0],
        timeout=15,
    )

    assert [value for _, value in result] == [10.0]


def test_only_the_given_targets_are_scraped(
    prometheus: PrometheusServer, target: MetricsTarget
) -> None:
    """The config has no self-scrape or other jobs: one ``up`` series only."""
    prometheus.wait_for_scrape(target.address)

    result = prometheus.query("up")

    assert result == [
        ({"__name__": "up", "instance": target.address, "job": "harness"}, 1.0)
    ]


def test_wait_for_timeout_names_expression_and_last_result(
    prometheus: PrometheusServer, target: MetricsTarget
) -> None:
    """On timeout, the AssertionError shows what was awaited and what was seen."""
    prometheus.wait_for_scrape(target.address)

    def never(samples: list[tuple[dict[str, str], float]]) -> bool:
        return False

    with pytest.raises(AssertionError, match=r"^timed out after 0\.5s") as info:
        prometheus.wait_for("harness_events_total", never, timeout=0.5)

    message = str(info.value)
    assert "'harness_events_total' to satisfy never" in message
    assert "last result: [({'__name__': 'harness_events_total'" in message
    assert "7.0)]" in message


def test_invalid_query_is_reported_with_prometheus_reason(
    prometheus: PrometheusServer,
) -> None:
    """A query Prometheus cannot parse raises at once with its error text."""
    with pytest.raises(
        PrometheusQueryError, match=r"^prometheus rejected query 'sum\(' \(HTTP 400\)"
    ):
        prometheus.query("sum(")


def test_non_loopback_target_is_refused_before_starting() -> None:
    """Targets off this machine are rejected, so no scrape leaves loopback."""
    with pytest.raises(ValueError, match=r"^target '10\.0\.0\.1:80' must be"):
        PrometheusServer(targets=["10.0.0.1:80"])


def test_server_is_stopped_and_temporary_directory_removed_on_exit(
    target: MetricsTarget,
) -> None:
    """Leaving the context stops the process and removes the directory it made."""
    with PrometheusServer(targets=[target.address]) as server:
        workdir = server.config_path.parent
        process = server.process
        assert workdir.is_dir()

    assert process is not None
    assert process.returncode is not None
    assert not workdir.exists()
