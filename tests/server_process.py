"""What the test harnesses of real servers (Redis, Prometheus) have in common.

Each harness runs one private server process on a free 127.0.0.1 port, sends
its output to a log file in the harness's own directory, waits until the
server answers, and stops it with SIGTERM, then SIGKILL. `ServerProcess`
holds that process and log handling; the harness says how to build the
command line and how to tell that the server is ready.

Limitations:
    - The free port is chosen before the server binds it. If another process
      takes it in between, `start_on_free_port` retries on a new port a few
      times, as long as the server's log says the address was in use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 30


def find_binary(name: str, fallback: Path) -> str | None:
    """Return ``name`` found on ``PATH``, else ``fallback`` if executable, else None."""
    found = shutil.which(name)
    if found is not None:
        return found
    if fallback.is_file() and os.access(fallback, os.X_OK):
        return str(fallback)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """One server process with its output in a log file.

    Subclasses set ``log_path`` (a property is fine) and call `spawn`,
    `wait_until_ready`, `terminate` and `reap`. ``start_error`` is the
    exception class raised when the server exits or never becomes ready.
    None of the methods is thread-safe.
    """

    start_error: type[Exception] = RuntimeError
    stop_timeout = 10.0

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """The file that receives the server's stdout and stderr."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def spawn(self, command: list[str], workdir: Path, *, append: bool) -> None:
        """Start ``command`` in ``workdir``, its output going to ``log_path``."""
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab" if append else "wb")
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def wait_until_ready(
        self, is_ready: Callable[[], bool], timeout: float, where: str, poll: float
    ) -> None:
        """Wait until ``is_ready()`` is true.

        Raises:
            start_error: the process exited first, or ``timeout`` passed (the
                process is then killed); the message ends with the log's tail.
        """
        process = self._process
        assert process is not None
        name = Path(str(process.args[0])).name  # type: ignore[index]
        deadline = time.monotonic() + timeout

        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise self.start_error(
                    f"{name} exited with code {process.returncode} before it was "
                    f"ready on {where}; log tail:\n{self.log_tail()}"
                )
            if is_ready():
                return
            time.sleep(poll)

        self.reap()
        raise self.start_error(
            f"{name} was not ready on {where} within {timeout} s; log tail:\n"
            f"{self.log_tail()}"
        )

    def start_on_free_port(
        self, spawn: Callable[[int], None], wait: Callable[[], None]
    ) -> None:
        """Spawn on a free port and wait, retrying if the port was taken."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            spawn(free_port())
            try:
                wait()
            except self.start_error:
                port_taken = "already in use" in self.log_tail().lower()
                if not port_taken or attempt == _START_ATTEMPTS:
                    raise
                self.reap()
            else:
                return

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; close the log. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_log()

    def reap(self) -> None:
        """Kill the process at once (a failed start) and close the log."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()
        self._close_log()

    def log_tail(self) -> str:
        """The last lines of the server's log, or ``(no log)``."""
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, RuntimeError):
            return "(no log)"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
