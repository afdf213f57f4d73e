"""Run a private, real Redis server for tests.

Tests of the Redis bus need the real engine: its stream commands, consumer
groups, blocking reads and what a restart does to connected clients, not an
imitation. `RedisServer` starts one `redis-server` process per use, listening
only on 127.0.0.1 on a free port, with its own temporary directory, no RDB
snapshots and (unless asked) no append-only file, and stops it on exit.

Limitations:
    - The free port is chosen before Redis binds it (see `server_process`);
      `restart` must reuse the port and fails if it was taken meanwhile.
    - Data survives `restart` only with ``appendonly=True``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType

from server_process import ServerProcess, find_binary


class RedisStartError(RuntimeError):
    """redis-server exited or did not answer PING; the message ends with its log."""


def find_redis_server() -> str | None:
    """
    Locate the redis-server executable.

    Returns:
        The path found on ``PATH``, else ``/usr/bin/redis-server`` when it is
        an executable file, else ``None`` (tests then skip).
    """
    return find_binary("redis-server", Path("/usr/bin/redis-server"))


class RedisServer(ServerProcess):
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

    start_error = RedisStartError

    def __init__(
        self,
        *,
        appendonly: bool = False,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self.appendonly = appendonly
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self._binary = binary
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        """The server's URL, such as ``redis://127.0.0.1:41234/0``."""
        if self.port is None:
            raise RuntimeError("RedisServer was never started; enter it first")
        return f"redis://127.0.0.1:{self.port}/0"

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

        self.start_on_free_port(
            lambda port: self._spawn(binary, port), self._wait_until_ready
        )

    def stop(self) -> None:
        """
        Stop redis-server if it runs, keeping its port and directory.

        Sends SIGTERM (Redis then closes its clients and flushes the
        append-only file) and SIGKILL if it has not exited within
        ``stop_timeout``. Safe to call twice.
        """
        self.terminate()

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
        self.spawn(command, workdir, append=True)

    def _wait_until_ready(self) -> None:
        port = self.port
        assert port is not None
        self.wait_until_ready(
            lambda: _answers_ping(port), self.start_timeout, f"port {port}", 0.02
        )


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
