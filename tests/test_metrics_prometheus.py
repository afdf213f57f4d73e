"""The runtime's metrics endpoint as scraped by a real Prometheus server.

Prometheus scrapes the runtime every second; the values are read back through
its HTTP query API, so the exposition is checked against the real text parser,
label handling and counter semantics rather than a reimplementation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Ticket, ticket
from prometheus_server import PrometheusServer, Sample, find_prometheus_binary

from runtime import ApplyError, Runtime, SchemaError

pytestmark = pytest.mark.skipif(
    find_prometheus_binary() is None,
    reason=(
        "no prometheus binary on PATH or at /usr/bin/prometheus; "
        "install the Debian 'prometheus' package, as .ci/run does"
    ),
)

# A kind name with a quote and a backslash, to check that Prometheus's own
# parser accepts the escaped label value and stores it unchanged.
ODD_KIND = 'odd "kind" \\ name'


def _fail(prev: Any) -> Any:
    raise RuntimeError("boom")


def _by_labels(samples: list[Sample], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(found[name] for name in labels): value for found, value in samples}


@pytest.fixture
def target(rt: Runtime) -> Iterator[str]:
    """The runtime's metrics served on a free loopback port, as ``host:port``."""
    server = rt.metrics.serve(0, "127.0.0.1")
    host, port = server.address
    try:
        yield f"{host}:{port}"
    finally:
        rt.metrics.close()


@pytest.fixture
def prometheus(target: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    """A Prometheus scraping only the runtime every second, stopped afterwards."""
    with PrometheusServer(
        targets=[target], scrape_interval="1s", tmp_dir=tmp_path
    ) as server:
        yield server


def test_prometheus_reads_exact_mutation_and_transition_counts(
    rt: Runtime, target: str, prometheus: PrometheusServer
) -> None:
    """Counts by kind and outcome, as scraped, equal the writes that were made."""
    tickets = rt.define_entity("ticket", Ticket)
    odd = rt.define_entity(ODD_KIND, Ticket)
    rt.start()
    prometheus.wait_for_scrape(target)

    for i in range(3):
        tickets.mutate(f"t-{i}", lambda prev: ticket())
    tickets.mutate("t-0", lambda prev: {**prev, "status": "working"})
    tickets.mutate("t-0", lambda prev: {**prev, "status": "closed"})
    for _ in range(3):
        tickets.mutate("t-1", lambda prev: prev)
    for _ in range(2):
        with pytest.raises(SchemaError):
            tickets.mutate("t-9", lambda prev: ticket(severity="urgent"))
    with pytest.raises(ApplyError):
        tickets.mutate("t-9", _fail)
    odd.mutate("o-1", lambda prev: ticket())
    odd.mutate("o-1", lambda prev: {**prev, "tags": ["x"]})
    written_at = time.time()
    # A scrape that starts after the last write sees every count.
    prometheus.wait_for(
        f'timestamp(up{{instance="{target}"}})',
        lambda samples: bool(samples) and samples[0][1] > written_at,
        timeout=30,
    )
    mutations = prometheus.query("entity_runtime_mutations_total")
    transitions = prometheus.query("entity_runtime_transitions_total")

    assert _by_labels(mutations, "kind", "outcome") == {
        ("ticket", "changed"): 5.0,
        ("ticket", "unchanged"): 3.0,
        ("ticket", "rejected"): 2.0,
        ("ticket", "failed"): 1.0,
        (ODD_KIND, "changed"): 2.0,
        (ODD_KIND, "unchanged"): 0.0,
        (ODD_KIND, "rejected"): 0.0,
        (ODD_KIND, "failed"): 0.0,
    }
    # Creating a ticket records its four fields; each later change one.
    assert _by_labels(transitions, "kind") == {("ticket",): 14.0, (ODD_KIND,): 5.0}
    for labels, _ in mutations + transitions:
        assert (labels["job"], labels["instance"]) == ("harness", target)
