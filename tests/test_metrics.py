"""The runtime's Prometheus series, read back over HTTP and parsed.

Every test drives a real ``Runtime``, serves its registry on a free 127.0.0.1
port and reads the exposition the way a scraper would, then parses it with
``prometheus_client.parser``.
"""

from __future__ import annotations

import errno
import inspect
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Ticket, ticket
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from runtime import (
    ApplyError,
    DefinitionError,
    EntityRuntimeError,
    Runtime,
    SchemaError,
    work_queue,
)
from runtime._metrics import MetricsBindError, MetricsServer, RuntimeMetrics
from runtime.testing import FakeClock

# Requests for 127.0.0.1 must never be sent through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

ODD_KIND = 'odd "kind" \\ name'
ODD_GROUP = 'group\n"g"\\1'
ODD_SUBSCRIBER = 'sub\n"s"\\1'
ODD_EVENT = 'event\n"e"\\1'


def _fail(*args: Any) -> Any:
    raise RuntimeError("boom")


def _closed_event(change: Any) -> list[str]:
    return ["ticket.closed"] if change.delta.get("status") == "closed" else []


def _scrape_text(server: MetricsServer) -> str:
    with _OPENER.open(server.url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode("utf-8")


def _scrape(server: MetricsServer) -> dict[str, Metric]:
    text = _scrape_text(server)
    return {family.name: family for family in text_string_to_metric_families(text)}


def _values(
    families: dict[str, Metric], sample: str, *labels: str
) -> dict[tuple[str, ...], float]:
    """The samples named ``sample``, keyed by the values of ``labels`` in order."""
    return {
        tuple(s.labels[name] for name in labels): s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample
    }


def _wait_for_sample(
    rt: Runtime, name: str, expected: float, timeout: float = 5.0
) -> None:
    deadline = time.monotonic() + timeout
    while rt.metrics_registry.get_sample_value(name) != expected:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{name} did not reach {expected} within {timeout} s; "
                f"last value: {rt.metrics_registry.get_sample_value(name)}"
            )
        time.sleep(0.01)


@pytest.fixture
def served(rt: Runtime) -> Iterator[MetricsServer]:
    """The runtime's registry served on a free loopback port, closed afterwards."""
    server = rt.metrics.serve(0, "127.0.0.1")
    try:
        yield server
    finally:
        rt.metrics.close()


@pytest.fixture
def driven(rt: Runtime) -> list[str]:
    """A running runtime that has touched every series; returns the triggers."""
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_change_deriver("ticket", _closed_event)
    rt.register_change_deriver("ticket", _fail)
    fired: list[str] = []
    rt.on_trigger("ticket.closed", lambda e, p, c: fired.append(e), name="notify")
    rt.on_entity_changed("ticket", _fail, name="flaky")
    rt.on_entity_changed(
        "ticket",
        _fail,
        delivery=work_queue("cleanup", max_attempts=1, backoff=0),
        name="janitor",
    )
    rt.start()

    tickets.mutate("t-1", lambda prev: ticket())
    tickets.mutate("t-1", lambda prev: {**prev, "status": "closed"})
    tickets.mutate("t-1", lambda prev: prev)
    tickets.mutate("t-1", lambda prev: prev)
    with pytest.raises(SchemaError):
        tickets.mutate("t-2", lambda prev: ticket(severity="urgent"))
    with pytest.raises(ApplyError):
        tickets.mutate("t-2", _fail)
    rt.drain()

    # NOTE: the kind actor observes mutate_seconds after it has resolved the
    # caller's future, so the last observation may land just after mutate().
    _wait_for_sample(rt, "entity_runtime_mutate_seconds_count", 6.0)
    return fired


EXPECTED_SERIES = {
    "entity_runtime_mutations": ("counter", {"kind", "outcome"}),
    "entity_runtime_transitions": ("counter", {"kind"}),
    "entity_runtime_changes": ("counter", {"kind"}),
    "entity_runtime_triggers": ("counter", {"event"}),
    "entity_runtime_deriver_errors": ("counter", {"kind"}),
    "entity_runtime_subscriber_errors": ("counter", {"kind", "subscriber"}),
    "entity_runtime_dead_letters": ("counter", {"worker_group"}),
    "entity_runtime_mailbox_depth": ("gauge", {"actor"}),
    "entity_runtime_mutate_seconds": ("histogram", set()),
    "entity_runtime_delivery_seconds": ("histogram", set()),
    "entity_runtime_entities": ("gauge", {"kind"}),
    "entity_runtime_log_rows": ("gauge", set()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SERIES))
def test_every_series_is_exposed_with_its_type_and_labels(
    driven: list[str], served: MetricsServer, name: str
) -> None:
    """Each documented series is served, typed and labelled as documented."""
    kind, label_names = EXPECTED_SERIES[name]

    families = _scrape(served)

    assert name in families, f"{name} missing; served: {sorted(families)}"
    family = families[name]
    assert family.type == kind
    assert family.samples, f"{name} has no samples"
    for sample in family.samples:
        assert set(sample.labels) - {"le"} == label_names, sample


def test_counters_and_gauges_read_back_exact_values(
    driven: list[str], served: MetricsServer
) -> None:
    """Two changes, two unchanged, one rejected, one failed: counted exactly."""
    families = _scrape(served)

    assert _values(families, "entity_runtime_mutations_total", "kind", "outcome") == {
        ("ticket", "changed"): 2.0,
        ("ticket", "unchanged"): 2.0,
        ("ticket", "rejected"): 1.0,
        ("ticket", "failed"): 1.0,
    }
    assert _values(families, "entity_runtime_transitions_total", "kind") == {
        ("ticket",): 5.0
    }
    assert _values(families, "entity_runtime_changes_total", "kind") == {
        ("ticket",): 2.0
    }
    assert _values(families, "entity_runtime_triggers_total", "event") == {
        ("ticket.closed",): 1.0
    }
    assert driven == ["ticket.closed"]
    assert _values(families, "entity_runtime_deriver_errors_total", "kind") == {
        ("ticket",): 2.0
    }
    assert _values(
        families, "entity_runtime_subscriber_errors_total", "kind", "subscriber"
    ) == {("ticket", "flaky"): 2.0, ("ticket", "janitor"): 2.0}
    assert _values(families, "entity_runtime_dead_letters_total", "worker_group") == {
        ("cleanup",): 2.0
    }
    assert _values(families, "entity_runtime_mailbox_depth", "actor") == {
        ("derive:ticket",): 0.0,
        ("trigger:ticket.closed:notify",): 0.0,
        ("subscriber:ticket:flaky",): 0.0,
        ("work_queue:ticket:cleanup",): 0.0,
    }
    assert _values(families, "entity_runtime_entities", "kind") == {("ticket",): 1.0}
    assert _values(families, "entity_runtime_log_rows") == {(): 5.0}


def test_histograms_count_every_mutation_and_every_delivery(
    driven: list[str], served: MetricsServer
) -> None:
    """Six requests are timed; each of the seven deliveries is timed once."""
    families = _scrape(served)

    assert _values(families, "entity_runtime_mutate_seconds_count") == {(): 6.0}
    # Two changes to the deriver stage, the subscriber and the work queue each,
    # and one trigger event to its handler.
    assert _values(families, "entity_runtime_delivery_seconds_count") == {(): 7.0}
    buckets = _values(families, "entity_runtime_mutate_seconds_bucket", "le")
    assert buckets[("+Inf",)] == 6.0


def test_user_label_values_with_quotes_backslashes_and_newlines_round_trip(
    rt: Runtime, served: MetricsServer
) -> None:
    """Names from users are escaped in the exposition and parse back exactly."""
    odd = rt.define_entity(ODD_KIND, Ticket)
    rt.register_change_deriver(ODD_KIND, lambda change: [ODD_EVENT])
    rt.on_trigger(ODD_EVENT, lambda e, p, c: None, name="quiet")
    rt.on_entity_changed(ODD_KIND, _fail, name=ODD_SUBSCRIBER)
    rt.on_entity_changed(
        ODD_KIND,
        _fail,
        delivery=work_queue(ODD_GROUP, max_attempts=1, backoff=0),
        name="janitor",
    )
    rt.start()

    odd.mutate("x-1", lambda prev: ticket())
    rt.drain()
    text = _scrape_text(served)
    families = {f.name: f for f in text_string_to_metric_families(text)}

    assert 'kind="odd \\"kind\\" \\\\ name"' in text
    assert 'worker_group="group\\n\\"g\\"\\\\1"' in text
    assert _values(families, "entity_runtime_mutations_total", "kind", "outcome") == {
        (ODD_KIND, "changed"): 1.0,
        (ODD_KIND, "unchanged"): 0.0,
        (ODD_KIND, "rejected"): 0.0,
        (ODD_KIND, "failed"): 0.0,
    }
    assert _values(
        families, "entity_runtime_subscriber_errors_total", "kind", "subscriber"
    ) == {(ODD_KIND, ODD_SUBSCRIBER): 1.0, (ODD_KIND, "janitor"): 1.0}
    assert _values(families, "entity_runtime_dead_letters_total", "worker_group") == {
        (ODD_GROUP,): 1.0
    }
    assert _values(families, "entity_runtime_triggers_total", "event") == {
        (ODD_EVENT,): 1.0
    }
    assert set(_values(families, "entity_runtime_mailbox_depth", "actor")) == {
        (f"derive:{ODD_KIND}",),
        (f"trigger:{ODD_EVENT}:quiet",),
        (f"subscriber:{ODD_KIND}:{ODD_SUBSCRIBER}",),
        (f"work_queue:{ODD_KIND}:{ODD_GROUP}",),
    }


def test_two_runtimes_in_one_process_keep_separate_counts(
    rt: Runtime, clock: FakeClock, served: MetricsServer
) -> None:
    """Same kind name in two runtimes: each endpoint shows only its own writes."""
    other = Runtime(clock=clock, stop_timeout=5.0)
    try:
        other_served = other.metrics.serve(0, "127.0.0.1")
        mine = rt.define_entity("ticket", Ticket)
        theirs = other.define_entity("ticket", Ticket)
        rt.start()
        other.start()

        for i in range(3):
            mine.mutate(f"t-{i}", lambda prev: ticket())
        theirs.mutate("t-0", lambda prev: ticket())
        my_families = _scrape(served)
        their_families = _scrape(other_served)
    finally:
        other.metrics.close()
        other.stop()

    assert rt.metrics_registry is not other.metrics_registry
    assert served.address != other_served.address
    mutations = "entity_runtime_mutations_total"
    mine_changed = _values(my_families, mutations, "kind", "outcome")
    theirs_changed = _values(their_families, mutations, "kind", "outcome")
    assert mine_changed[("ticket", "changed")] == 3.0
    assert theirs_changed[("ticket", "changed")] == 1.0
    assert _values(my_families, "entity_runtime_log_rows") == {(): 12.0}
    assert _values(their_families, "entity_runtime_log_rows") == {(): 4.0}


def test_serve_listens_on_loopback_by_default_and_port_zero_reports_real_port(
    rt: Runtime,
) -> None:
    """Without an address the endpoint is loopback only; port 0 is resolved."""
    server = rt.metrics.serve(port=0)
    try:
        host, port = server.address

        with socket.create_connection((host, port), timeout=5):
            pass
    finally:
        rt.metrics.close()

    assert host == "127.0.0.1"
    assert 0 < port <= 65535
    assert server.url == f"http://127.0.0.1:{port}/metrics"
    for signature in (
        inspect.signature(RuntimeMetrics.serve),
        inspect.signature(MetricsServer),
    ):
        assert signature.parameters["addr"].default == "127.0.0.1"
        assert signature.parameters["port"].default == 9464


def test_closing_twice_is_harmless_and_releases_port_and_thread(
    rt: Runtime,
) -> None:
    """``close()`` stops listening and joins its thread; repeating it does nothing."""
    server = rt.metrics.serve(0, "127.0.0.1")
    host, port = server.address

    server.close()
    server.close()
    rt.metrics.close()
    rt.metrics.close()

    assert server.closed
    assert repr(server) == f"MetricsServer('http://127.0.0.1:{port}/metrics', closed)"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()
    assert not [t for t in threading.enumerate() if t.name.endswith(f":{port}")]


def test_runtime_metrics_close_stops_every_server_it_started(rt: Runtime) -> None:
    """Servers started by ``serve`` are all closed by one ``close()``."""
    first = rt.metrics.serve(0, "127.0.0.1")
    second = rt.metrics.serve(0, "127.0.0.1")

    rt.metrics.close()

    assert first.closed
    assert second.closed


def test_server_used_as_context_manager_closes_on_exit(rt: Runtime) -> None:
    """Leaving the ``with`` block closes a server made directly."""
    with MetricsServer(rt.metrics_registry, 0) as server:
        families = _scrape(server)

    assert "entity_runtime_log_rows" in families
    assert server.closed


@pytest.mark.parametrize("port", [-1, 65536, "9464", 9464.0, True, None])
def test_bad_port_is_refused_before_anything_starts(rt: Runtime, port: Any) -> None:
    """Ports must be ints from 0 to 65535; bools and strings are refused."""
    with pytest.raises(
        DefinitionError,
        match=r"^metrics port must be an int from 0 to 65535 \(0 picks a free "
        r"port\), got .*; nothing started$",
    ):
        rt.metrics.serve(port, "127.0.0.1")


@pytest.mark.parametrize("addr", ["", None, 127, b"127.0.0.1"])
def test_bad_addr_is_refused_before_anything_starts(rt: Runtime, addr: Any) -> None:
    """The address must be a non-empty string."""
    with pytest.raises(
        DefinitionError,
        match=r"^metrics addr must be a non-empty host name or IP address such as "
        r"'127\.0\.0\.1', got .*; nothing started$",
    ):
        rt.metrics.serve(0, addr)


def test_port_in_use_raises_an_os_error_naming_the_address(
    rt: Runtime, served: MetricsServer
) -> None:
    """A taken port is refused with the address; the first server keeps serving."""
    port = served.address[1]

    with pytest.raises(
        MetricsBindError,
        match=rf"^cannot serve metrics on 127\.0\.0\.1:{port}: the address is "
        r"already in use; pick another port, or port=0 for a free one$",
    ) as info:
        rt.metrics.serve(port, "127.0.0.1")

    error = info.value
    assert isinstance(error, OSError)
    assert isinstance(error, EntityRuntimeError)
    assert error.errno == errno.EADDRINUSE
    assert (error.host, error.port) == ("127.0.0.1", port)
    assert isinstance(error.__cause__, OSError)
    assert "entity_runtime_log_rows" in _scrape(served)


def test_serving_and_closing_are_logged_at_info(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """Start and stop of the endpoint are lifecycle events, logged at INFO."""
    caplog.set_level(logging.INFO, logger="runtime._metrics")

    server = rt.metrics.serve(0, "127.0.0.1")
    rt.metrics.close()

    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"serving metrics on {server.url}"),
        ("INFO", f"stopped serving metrics on {server.url}"),
    ]


def test_runtime_serve_metrics_binds_loopback_and_stops_with_the_runtime(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.start()
    host, port = rt.serve_metrics(port=0)
    tickets.mutate("t-1", lambda prev: ticket())

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    rt.stop()

    assert host == "127.0.0.1"
    assert 'entity_runtime_mutations_total{kind="ticket",outcome="changed"} 1.0' in text
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
        pass


def test_snapshot_series_appear_with_a_data_dir(tmp_path: Any) -> None:
    rt = Runtime(data_dir=tmp_path)
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        before = rt.metrics_registry.get_sample_value(
            "entity_runtime_snapshot_age_seconds"
        )
        tickets.mutate("t-1", lambda prev: ticket())
        rt.snapshot()
        age = rt.metrics_registry.get_sample_value(
            "entity_runtime_snapshot_age_seconds"
        )
        count = rt.metrics_registry.get_sample_value(
            "entity_runtime_snapshot_seconds_count"
        )

    assert before is not None
    assert before != before  # NaN before the first snapshot
    assert age is not None
    assert 0 <= age < 60
    assert count == 1


def test_lock_free_counters_lose_no_increment_across_threads() -> None:
    from prometheus_client import CollectorRegistry

    from runtime._fast_metrics import FastCounter, FastHistogram

    registry = CollectorRegistry()
    counter = FastCounter("hits", "Hits.", ["kind"], registry=registry)
    histogram = FastHistogram("waits", "Waits.", [0.1, 1.0], registry=registry)

    def work() -> None:
        child = counter.labels("a")
        for _ in range(20_000):
            child.inc()
            histogram.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert registry.get_sample_value("hits_total", {"kind": "a"}) == 80_000
    assert registry.get_sample_value("waits_count") == 80_000
    assert registry.get_sample_value("waits_bucket", {"le": "0.1"}) == 0
    assert registry.get_sample_value("waits_bucket", {"le": "1.0"}) == 80_000
    assert registry.get_sample_value("waits_sum") == 40_000
