"""Run a private, real Redis server for tests.

Tests of the Redis bus need the real engine: its stream commands, consumer
groups, blocking reads and what a restart does to connected clients, not an
imitation. `RedisServer` starts one `redis-server` process per use, listening
only on 127.0.0.1 on a free port, with its own temporary directory, no RDB
snapshots and (unless asked) no append-only file, and stops it on exit.

Limitations:
    - The free port is chosen before Redis binds it. If another process takes
      it in between, the first start is retried on a new port a few times;
      `restart` must reuse the port and fails if it was taken meanwhile.
    - Data survives `restart` only with ``appendonly=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

_FALLBACK_BINARY = Path("/usr/bin/redis-server")
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 30


class RedisStartError(RuntimeError):
    """redis-server exited or did not answer PING; the message ends with its log."""


def find_redis_server() -> str | None:
    """
    Locate the redis-server executable.

    Returns:
        The path found on ``PATH``, else ``/usr/bin/redis-server`` when it is
        an executable file, else ``None`` (tests then skip).
    """
    found = shutil.which("redis-server")
    if found is not None:
        return found
    if _FALLBACK_BINARY.is_file() and os.access(_FALLBACK_BINARY, os.X_OK):
        return str(_FALLBACK_BINARY)
    return None


class RedisServer:
    """
    A private redis-server process on a free 127.0.0.1 port.

    Use it as a context manager. Entering creates a temporary directory,
    starts Redis in it and blocks until it answers ``PING``. `stop` and `start`
    (or `restart`) stop the process and start it again on the same port with
    the same directory, so an append-only file written before is loaded again.
    Leaving stops the process (SIGTERM, then SIGKILL after ``stop_timeout``)
    and removes the directory.

    Example::

        with RedisServer(appendonly=True) as server:
            client = redis.Redis.from_url(server.url)
            ...
            server.restart()  # same port, same data

    None of the methods is thread-safe.

    Args:
        appendonly (bool): Keep an append-only file (``appendfsync everysec``)
            so streams and groups survive `restart`. Redis flushes and fsyncs
            it on a SIGTERM shutdown.
        binary (str | None): redis-server executable; found with
            `find_redis_server` when ``None``.
        start_timeout (float): Seconds to wait for ``PING`` to be answered.
        stop_timeout (float): Seconds to wait after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.appendonly = appendonly
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self._binary = binary
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's URL, such as ``redis://127.0.0.1:41234/0``."""
        if self.port is None:
            raise RuntimeError("RedisServer was never started; enter it first")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the redis-server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        """The file that receives redis-server's output."""
        return self._workdir() / "redis.log"

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """
        Start redis-server and wait until it answers ``PING``.

        The first start picks a free port (retrying on a new one if it was
        taken); later starts reuse it.

        Raises:
            RedisStartError: If no binary is found, or Redis exits or does not
                answer within ``start_timeout``. The process is stopped and the
                message ends with the tail of its log.
        """
        if self.running:
            raise RuntimeError(f"RedisServer is already running on port {self.port}")
        binary = self._binary or find_redis_server()
        if binary is None:
            raise RedisStartError(
                "no redis-server on PATH or at /usr/bin/redis-server; "
                "install the Debian 'redis-server' package"
            )
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="redis-test-"))

        if self.port is not None:
            self._spawn(binary, self.port)
            self._wait_until_ready()
            return

        for attempt in range(1, _START_ATTEMPTS + 1):
            self._spawn(binary, _free_port())
            try:
                self._wait_until_ready()
            except RedisStartError:
                if "already in use" not in self._log_tail() or (
                    attempt == _START_ATTEMPTS
                ):
                    raise
                self._reap()
            else:
                return

    def stop(self) -> None:
        """
        Stop redis-server if it runs, keeping its port and directory.

        Sends SIGTERM (Redis then closes its clients and flushes the
        append-only file) and SIGKILL if it has not exited within
        ``stop_timeout``. Safe to call twice.
        """
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop the server and start it again on the same port and directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory; safe to call twice."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _workdir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("RedisServer is not running; enter it first")
        return self._dir

    def _spawn(self, binary: str, port: int) -> None:
        workdir = self._workdir()
        self.port = port
        command = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--loglevel",
            "notice",
        ]

        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def _reap(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _wait_until_ready(self) -> None:
        process = self._process
        assert process is not None
        assert self.port is not None
        deadline = time.monotonic() + self.start_timeout

        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RedisStartError(
                    f"redis-server exited with code {process.returncode} before "
                    f"answering PING on port {self.port}; log tail:\n"
                    f"{self._log_tail()}"
                )
            if _answers_ping(self.port):
                return
            time.sleep(0.02)

        self._reap()
        raise RedisStartError(
            f"redis-server did not answer PING on port {self.port} within "
            f"{self.start_timeout} s; log tail:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    # A raw PING keeps the harness independent of the client under test. A
    # server still loading its append-only file answers -LOADING, not +PONG.
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock,
    ):
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
    return False
