from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime._errors import DefinitionError, EntityRuntimeError
from runtime._fast_metrics import FastCounter, FastHistogram

logger = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9464
"""The port ``serve`` listens on unless told otherwise."""

DEFAULT_METRICS_ADDR = "127.0.0.1"
"""The address ``serve`` listens on unless told otherwise: loopback only."""

_JOIN_TIMEOUT = 5.0

_LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

MUTATION_OUTCOMES = ("changed", "unchanged", "rejected", "failed")
"""The ``outcome`` label values of ``entity_runtime_mutations_total``."""


class MetricsBindError(EntityRuntimeError, OSError):
    """The metrics endpoint could not listen on the address asked for.

    Raised when the port is taken, the address is not one of this machine's,
    the name does not resolve, or binding is not permitted. Nothing is left
    listening. The underlying ``OSError`` is kept as ``__cause__`` and
    ``error``, and its ``errno`` is copied, so handlers that test for
    ``errno.EADDRINUSE`` keep working.

    Attributes:
        host: the address asked for.
        port: the port asked for.
        error: the ``OSError`` raised by the socket layer.
    """

    def __init__(self, host: str, port: int, error: OSError) -> None:
        self.host = host
        self.port = port
        self.error = error
        where = _format_address(host, port)
        if error.errno == errno.EADDRINUSE:
            reason = "the address is already in use"
            hint = "; pick another port, or port=0 for a free one"
        else:
            reason = (error.strerror or str(error) or type(error).__name__).lower()
            hint = ""
        super().__init__(f"cannot serve metrics on {where}: {reason}{hint}")
        # NOTE: only errno is copied; with strerror set too, OSError.__str__
        # would print the bare system message instead of the one above.
        self.errno = error.errno


class MetricsServer:
    """Serves one registry in the Prometheus text format over HTTP.

    Exists so that a runtime's metrics can be scraped without touching the
    process-wide default registry, and so that whoever starts the endpoint
    can also stop it: ``prometheus_client.start_http_server`` alone leaves a
    daemon thread and a listening socket behind with no way to release them.

    The HTTP machinery is ``prometheus_client``'s own: every ``GET`` (on any
    path; ``/metrics`` by convention) collects the registry at that moment,
    and content negotiation (OpenMetrics, gzip) is the library's. Requests
    are answered on short-lived daemon threads; the accept loop runs on a
    daemon thread named after the address.

    Guarantees:
        - On return the socket is bound and listening, so a scrape made right
          away succeeds; ``address`` is the address actually bound (the real
          port when ``port`` was 0).
        - A constructor that raises leaves nothing listening and no thread.
        - ``close()`` stops accepting, closes the socket and joins the accept
          thread before it returns; it is thread-safe and idempotent.

    Args:
        registry: the registry to expose.
        port: TCP port from 0 to 65535; 0 lets the system pick a free one.
        addr: host name or IP address to listen on; loopback by default, so
            the endpoint is not reachable from other machines unless asked.

    Raises:
        DefinitionError: ``port`` is not an int from 0 to 65535, or ``addr``
            is not a non-empty string; nothing started.
        MetricsBindError: the address could not be bound (for example, it is
            already in use); nothing started.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        port: int = DEFAULT_METRICS_PORT,
        addr: str = DEFAULT_METRICS_ADDR,
    ) -> None:
        _check_port(port)
        _check_addr(addr)

        try:
            server, thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as err:
            raise MetricsBindError(addr, port, err) from err

        host, bound_port = server.server_address[:2]
        self._address: tuple[str, int] = (str(host), int(bound_port))
        self._server: WSGIServer | None = server
        self._thread = thread
        self._lock = threading.Lock()
        thread.name = f"metrics-http-{_format_address(*self._address)}"
        logger.info("serving metrics on %s", self.url)

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` bound; the real port when 0 was asked for."""
        return self._address

    @property
    def url(self) -> str:
        """The scrape URL, such as ``http://127.0.0.1:9464/metrics``."""
        return f"http://{_format_address(*self._address)}/metrics"

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._server is None

    def close(self) -> None:
        """Stop serving, close the socket and join the accept thread.

        Blocks for up to about half a second (the accept loop's poll
        interval). Requests already being answered finish on their own daemon
        threads. Calling it again, from any thread, does nothing.
        """
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return

        server.shutdown()
        server.server_close()

        self._thread.join(_JOIN_TIMEOUT)
        if self._thread.is_alive():
            logger.warning(
                "metrics server on %s: accept thread still running %.0f s after "
                "shutdown; leaving it behind (daemon)",
                self.url,
                _JOIN_TIMEOUT,
            )
        logger.info("stopped serving metrics on %s", self.url)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "serving"
        return f"MetricsServer({self.url!r}, {state})"


def _check_port(port: object) -> None:
    if type(port) is not int or not 0 <= port <= 65535:
        raise DefinitionError(
            "metrics port must be an int from 0 to 65535 (0 picks a free port), "
            f"got {port!r}; nothing started"
        )


def _check_addr(addr: object) -> None:
    if not isinstance(addr, str) or not addr:
        raise DefinitionError(
            "metrics addr must be a non-empty host name or IP address such as "
            f"'127.0.0.1', got {addr!r}; nothing started"
        )


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Off:
    """A series that records nothing (metrics turned off)."""

    def labels(self, *args: Any, **kwargs: Any) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        return None

    def observe(self, amount: float) -> None:
        return None

    def observe_many(self, amounts: Any) -> None:
        return None

    def set(self, value: float) -> None:
        return None

    def set_function(self, function: Callable[[], float]) -> None:
        return None

    def remove(self, *labels: Any) -> None:
        return None


class RuntimeMetrics:
    """The Prometheus series of one runtime, in a registry of its own.

    Each runtime gets its own ``CollectorRegistry``, so two runtimes in one
    process never collide and tests never share counters. Label values that
    come from users (kind names, worker groups, subscriber names) are escaped
    by ``prometheus_client`` when exposed.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, enabled: bool = True
    ) -> None:
        self.enabled = True
        self.registry = registry if registry is not None else CollectorRegistry()
        self._servers: list[MetricsServer] = []
        self._servers_lock = threading.Lock()
        r = self.registry

        self.mutations = FastCounter(
            "entity_runtime_mutations",
            "Mutations by kind and outcome (changed, unchanged, rejected, failed).",
            ["kind", "outcome"],
            registry=r,
        )
        self.transitions = FastCounter(
            "entity_runtime_transitions",
            "Transition rows appended to the log.",
            ["kind"],
            registry=r,
        )
        self.changes = FastCounter(
            "entity_runtime_changes",
            "ENTITY_CHANGED events emitted.",
            ["kind"],
            registry=r,
        )
        self.triggers = FastCounter(
            "entity_runtime_triggers",
            "Trigger events derived from changes.",
            ["event"],
            registry=r,
        )
        self.deriver_errors = Counter(
            "entity_runtime_deriver_errors",
            "Derivers or payload mappers that raised.",
            ["kind"],
            registry=r,
        )
        self.subscriber_errors = FastCounter(
            "entity_runtime_subscriber_errors",
            "Subscriber and trigger handler calls that raised.",
            ["kind", "subscriber"],
            registry=r,
        )
        self.dead_letters = Counter(
            "entity_runtime_dead_letters",
            "Changes that failed every attempt of a work queue.",
            ["worker_group"],
            registry=r,
        )
        self.handler_timeouts = Counter(
            "entity_runtime_handler_timeouts",
            "Subscriber and trigger handler calls abandoned after running past "
            "their timeout (also counted in entity_runtime_subscriber_errors).",
            ["kind", "subscriber"],
            registry=r,
        )
        self.coalesced = FastCounter(
            "entity_runtime_coalesced",
            "Queued deliveries folded into a newer one of the same id because "
            "the consumer was behind.",
            ["actor"],
            registry=r,
        )
        self.actor_restarts = Counter(
            "entity_runtime_actor_restarts",
            "Actors that failed outside user code and carried on.",
            ["actor"],
            registry=r,
        )
        self.mailbox_depth = Gauge(
            "entity_runtime_mailbox_depth",
            "Deliveries waiting in an actor's mailbox.",
            ["actor"],
            registry=r,
        )
        self.mutate_seconds = FastHistogram(
            "entity_runtime_mutate_seconds",
            "Time from a mutation's submission to its commit or failure.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = FastHistogram(
            "entity_runtime_delivery_seconds",
            "Time from queueing a change or trigger event for a consumer until "
            "the consumer finished with it (retries included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.entities = Gauge(
            "entity_runtime_entities",
            "Entities currently known per kind (store-backed kinds only).",
            ["kind"],
            registry=r,
        )
        self.log_rows = Gauge(
            "entity_runtime_log_rows",
            "Rows in the in-memory transition log.",
            registry=r,
        )

        if not enabled:
            self._disable()

    def _disable(self) -> None:
        # Every series becomes a no-op; the registry stays (and stays empty
        # of samples), so serving it still works.
        off = _Off()
        for name, value in list(vars(self).items()):
            if isinstance(
                value, Counter | Gauge | Histogram | FastCounter | FastHistogram
            ):
                self.registry.unregister(value)
                setattr(self, name, off)
        self.enabled = False

    def watch_mailbox(self, actor: str, depth: Callable[[], float]) -> None:
        """Expose a mailbox's depth, read at scrape time."""
        self.mailbox_depth.labels(actor=actor).set_function(depth)

    def forget_mailbox(self, actor: str) -> None:
        """Stop exposing a mailbox that no longer exists."""
        try:
            self.mailbox_depth.remove(actor)
        except KeyError:
            logger.debug("mailbox %s was not exposed", actor)

    def add_snapshot_metrics(self, age: Callable[[], float]) -> Any:
        """Add the snapshot series (runtimes with a data directory only).

        Returns the ``entity_runtime_snapshot_seconds`` histogram; ``age`` is
        read at scrape time for ``entity_runtime_snapshot_age_seconds``.
        """
        if not self.enabled:
            return _Off()
        seconds = Histogram(
            "entity_runtime_snapshot_seconds",
            "Time to capture, encode and write one snapshot.",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )
        gauge = Gauge(
            "entity_runtime_snapshot_age_seconds",
            "Seconds since the last snapshot was written (NaN before the first).",
            registry=self.registry,
        )
        gauge.set_function(age)
        return seconds

    def add_bus_metrics(self, bus: BusCounters) -> None:
        """Expose a change bus's counters, read from ``bus`` at scrape time.

        Adds ``entity_runtime_bus_published_total``, ``..._queued_total``,
        ``..._dropped_total``, ``..._too_large_total``, ``..._reconnects_total``
        (counters), ``entity_runtime_bus_outbox`` (changes waiting for the bus
        server) and ``entity_runtime_bus_connected`` (1 or 0). Does nothing
        when metrics are off.
        """
        if not self.enabled:
            return
        self.registry.register(_BusCollector(bus))

    def serve(
        self, port: int = DEFAULT_METRICS_PORT, addr: str = DEFAULT_METRICS_ADDR
    ) -> MetricsServer:
        """Serve this registry over HTTP until ``close()``.

        Listens on loopback unless ``addr`` says otherwise. May be called more
        than once (for example on two addresses); ``close()`` stops every
        server started here. The server may also be closed on its own.

        Args:
            port: TCP port from 0 to 65535; 0 lets the system pick a free one.
            addr: host name or IP address to listen on.

        Returns:
            The running server; its ``address`` is the ``(host, port)`` bound.

        Raises:
            DefinitionError: bad ``port`` or ``addr``; nothing started.
            MetricsBindError: the address could not be bound; nothing started.
        """
        server = MetricsServer(self.registry, port, addr)

        with self._servers_lock:
            self._servers.append(server)
        return server

    def close(self) -> None:
        """Close every server ``serve`` started; harmless to call again.

        The series themselves stay readable through ``registry``.
        """
        with self._servers_lock:
            servers, self._servers = self._servers, []

        for server in servers:
            server.close()


class BusCounters(Protocol):
    """What the bus series read: the counters of ``runtime.RedisBus``."""

    published: int
    queued: int
    dropped: int
    too_large: int
    reconnects: int

    @property
    def outbox_size(self) -> int: ...

    @property
    def connected(self) -> bool: ...


_BUS_COUNTERS = (
    ("published", "Changes appended to the bus's streams."),
    (
        "queued",
        "Changes that waited in the local outbox because the bus server was "
        "unreachable.",
    ),
    (
        "dropped",
        "Changes dropped from the full outbox, never seen by other instances.",
    ),
    (
        "too_large",
        "Changes too large to be a stream entry, never seen by other instances.",
    ),
    ("reconnects", "Times the bus server became reachable again after an outage."),
)


class _BusCollector(Collector):
    """Reads a bus's plain-int counters when the registry is scraped."""

    def __init__(self, bus: BusCounters) -> None:
        self._bus = bus

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        bus = self._bus
        for name, text in _BUS_COUNTERS:
            yield CounterMetricFamily(
                f"entity_runtime_bus_{name}", text, value=getattr(bus, name)
            )
        yield GaugeMetricFamily(
            "entity_runtime_bus_outbox",
            "Changes waiting in the local outbox for the bus server.",
            value=bus.outbox_size,
        )
        yield GaugeMetricFamily(
            "entity_runtime_bus_connected",
            "1 while the last attempt to reach the bus server succeeded, else 0.",
            value=1 if bus.connected else 0,
        )
