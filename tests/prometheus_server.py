"""Run a real Prometheus server for tests and read what it scraped.

Tests that check our metrics end to end need the real scraper and query engine:
the text exposition parser, label handling and counter semantics of Prometheus
itself, not a reimplementation. `PrometheusServer` starts one private
Prometheus process per use, on a free 127.0.0.1 port, with a configuration that
scrapes only the targets it is given (no self-scrape, no alerting, no remote
storage), and stops it on exit.

Queries go through the HTTP API with `urllib`, bypassing any proxy settings
from the environment, so the only address ever contacted is the server's own.

Limitations:
    - Targets must be on a loopback host (`127.0.0.1`, `localhost`, `[::1]`).
    - Only instant queries (`/api/v1/query`) are offered; range queries are not.
    - The free port is chosen before Prometheus binds it (see
      `server_process`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from server_process import ServerProcess, find_binary

Sample = tuple[dict[str, str], float]
"""One element of a query result: the series labels and the sample value."""

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})

# An opener without proxy handling: http_proxy and friends in the environment
# must not send requests for 127.0.0.1 anywhere else.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PrometheusStartError(RuntimeError):
    """Prometheus exited or did not become ready; the message ends with its log."""


class PrometheusQueryError(ValueError):
    """Prometheus rejected a query, or answered with a result type not supported."""


def find_prometheus_binary() -> str | None:
    """
    Locate the Prometheus server executable.

    Returns:
        The path found on ``PATH``, else ``/usr/bin/prometheus`` when it is an
        executable file, else ``None``.
    """
    return find_binary("prometheus", Path("/usr/bin/prometheus"))


class PrometheusServer(ServerProcess):
    """
    A private Prometheus process that scrapes the given targets.

    Use it as a context manager. Entering writes ``prometheus.yml`` into the
    working directory, starts Prometheus on a free 127.0.0.1 port and blocks
    until ``/-/ready`` answers. Leaving sends SIGTERM, then SIGKILL if the
    process has not exited after ``stop_timeout`` seconds, closes the log and
    removes the working directory if this object created it.

    The scrape job is named ``job_name``, so every scraped series carries
    ``job`` and ``instance`` (the target exactly as given) labels.

    Example::

        with PrometheusServer(targets=["127.0.0.1:8000"]) as prom:
            prom.wait_for_scrape("127.0.0.1:8000")
            samples = prom.query("app_requests_total")

    All methods block the calling thread; none of them is thread-safe.

    Args:
        targets (Sequence[str]): ``host:port`` addresses to scrape, each on a
            loopback host.
        scrape_interval (str): Prometheus duration between scrapes, also used
            as the rule evaluation interval.
        tmp_dir (str | os.PathLike[str] | None): Directory for the config,
            TSDB and log. Created (and later removed) when ``None``; a given
            directory is left in place for inspection.
        binary (str | None): Prometheus executable; found with
            `find_prometheus_binary` when ``None``.
        job_name (str): Name of the scrape job, the ``job`` label value.
        metrics_path (str): HTTP path scraped on every target.
        start_timeout (float): Seconds to wait for ``/-/ready``.
        stop_timeout (float): Seconds to wait after SIGTERM before SIGKILL.

    Raises:
        ValueError: If ``targets`` is empty or names a non-loopback host.
    """

    start_error = PrometheusStartError

    def __init__(
        self,
        targets: Sequence[str],
        scrape_interval: str = "1s",
        tmp_dir: str | os.PathLike[str] | None = None,
        *,
        binary: str | None = None,
        job_name: str = "harness",
        metrics_path: str = "/metrics",
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if not targets:
            raise ValueError("PrometheusServer needs at least one target, got none")
        for target in targets:
            host = target.rpartition(":")[0]
            if host not in _LOOPBACK_HOSTS:
                raise ValueError(
                    f"target {target!r} must be host:port on a loopback host "
                    f"({', '.join(sorted(_LOOPBACK_HOSTS))}); nothing started"
                )

        super().__init__()
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.job_name = job_name
        self.metrics_path = metrics_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self._binary = binary
        self._given_dir = None if tmp_dir is None else Path(tmp_dir)
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server, such as ``http://127.0.0.1:41234``."""
        if self.port is None:
            raise RuntimeError("PrometheusServer is not running; enter it first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The Prometheus process while the server runs, else ``None``."""
        return self._process

    @property
    def log_path(self) -> Path:
        """File that receives Prometheus's stdout and stderr."""
        return self._workdir() / "prometheus.log"

    @property
    def config_path(self) -> Path:
        """The generated ``prometheus.yml``."""
        return self._workdir() / "prometheus.yml"

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """
        Write the config, start Prometheus and wait until it is ready.

        Raises:
            PrometheusStartError: If no binary is found, or Prometheus exits or
                is not ready within ``start_timeout``. The process is stopped
                and the message ends with the tail of its log.
        """
        if self._process is not None:
            raise RuntimeError("PrometheusServer is already running")
        binary = self._binary or find_prometheus_binary()
        if binary is None:
            raise PrometheusStartError(
                "no prometheus binary on PATH or at /usr/bin/prometheus; "
                "install the Debian 'prometheus' package"
            )

        if self._given_dir is not None:
            self._given_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self._given_dir
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
        self.config_path.write_text(self._render_config(), encoding="utf-8")

        try:
            self.start_on_free_port(
                lambda port: self._spawn(binary, port), self._wait_until_ready
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Prometheus if it runs and release its files; safe to call twice."""
        self.terminate()
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self.port = None

    def query(self, expr: str) -> list[Sample]:
        """
        Evaluate an instant PromQL query now.

        Args:
            expr (str): The PromQL expression.

        Returns:
            One ``(labels, value)`` pair per series for a vector result, in the
            order Prometheus returns them, or a single pair with empty labels
            for a scalar. Values are floats, so ``NaN`` and infinities pass
            through.

        Raises:
            PrometheusQueryError: If Prometheus rejects the expression or
                returns a range vector or string.
        """
        params = urllib.parse.urlencode({"query": expr})
        body = self._get_json(f"/api/v1/query?{params}", expr)
        data = body["data"]
        result_type = data["resultType"]

        if result_type == "vector":
            return [
                (dict(item["metric"]), float(item["value"][1]))
                for item in data["result"]
            ]
        if result_type == "scalar":
            return [({}, float(data["result"][1]))]
        raise PrometheusQueryError(
            f"query {expr!r} returned a {result_type} result; only instant "
            "vectors and scalars are supported"
        )

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Sample]], bool],
        timeout: float = 30.0,
        interval: float = 0.2,
    ) -> list[Sample]:
        """
        Poll a query until its result satisfies a predicate.

        Args:
            expr (str): The PromQL expression, as for `query`.
            predicate (Callable[[list[Sample]], bool]): Called with each result.
            timeout (float): Seconds to keep polling.
            interval (float): Seconds between polls.

        Returns:
            The first result for which ``predicate`` returned true.

        Raises:
            AssertionError: If ``timeout`` passes first; the message holds the
                expression and the last result seen.
            PrometheusQueryError: At once, if the expression is rejected.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {expr!r} to "
                    f"satisfy {getattr(predicate, '__name__', predicate)}; "
                    f"last result: {result!r}"
                )
            time.sleep(interval)

    def wait_for_scrape(self, target: str, timeout: float = 30.0) -> None:
        """
        Wait until Prometheus has scraped ``target`` successfully.

        Args:
            target (str): The target exactly as passed to the constructor.
            timeout (float): Seconds to wait.

        .. note::
            Prometheus 2.x applies new targets at most every 5 seconds, so the
            first scrape lands about 5 seconds after start-up, whatever the
            scrape interval.

        Raises:
            AssertionError: If ``up`` for the target is not 1 within
                ``timeout``; the message holds the last ``up`` result.
        """

        def target_is_up(result: list[Sample]) -> bool:
            return any(value == 1.0 for _, value in result)

        self.wait_for(f"up{{instance={_promql_string(target)}}}", target_is_up, timeout)

    def _workdir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("PrometheusServer is not running; enter it first")
        return self._dir

    def _render_config(self) -> str:
        # JSON strings are valid YAML scalars, which saves escaping by hand.
        targets = ", ".join(json.dumps(target) for target in self.targets)
        interval = json.dumps(self.scrape_interval)
        return (
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  evaluation_interval: {interval}\n"
            "scrape_configs:\n"
            f"  - job_name: {json.dumps(self.job_name)}\n"
            f"    metrics_path: {json.dumps(self.metrics_path)}\n"
            "    static_configs:\n"
            f"      - targets: [{targets}]\n"
        )

    def _spawn(self, binary: str, port: int) -> None:
        workdir = self._workdir()
        self.port = port
        listen = f"127.0.0.1:{port}"
        command = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={listen}",
            # Set explicitly so no URL is derived from the machine's hostname.
            f"--web.external-url=http://{listen}/",
            "--log.level=info",
        ]
        self.spawn(command, workdir, append=False)

    def _wait_until_ready(self) -> None:
        self.wait_until_ready(self._is_ready, self.start_timeout, self.url, 0.1)

    def _is_ready(self) -> bool:
        try:
            with _OPENER.open(f"{self.url}/-/ready", timeout=2.0) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as err:
            err.close()
            return False
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _get_json(self, path: str, expr: str) -> dict[str, Any]:
        try:
            with _OPENER.open(f"{self.url}{path}", timeout=10.0) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as err:
            # The API answers 400/422 with a JSON body that names the problem.
            with err:
                detail = err.read().decode("utf-8", errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("error", detail)
            raise PrometheusQueryError(
                f"prometheus rejected query {expr!r} (HTTP {err.code}): {detail}"
            ) from None

        if body.get("status") != "success":
            raise PrometheusQueryError(
                f"prometheus rejected query {expr!r}: {body.get('error', body)}"
            )
        return body


def _promql_string(value: str) -> str:
    # PromQL string literals accept the same escapes as JSON strings.
    return json.dumps(value)
