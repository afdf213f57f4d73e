"""Run test programs as separate processes, each writing its stderr to a log.

The multi-instance tests run each instance as its own Python process, stopped
by closing its stdin (the program then shuts down cleanly) and killed only if
it does not exit in time. Their logs are what a failing test shows.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import IO


class ChildProcesses:
    """Named child processes with their stderr in ``<name>.log`` under ``log_dir``.

    Args:
        log_dir: where the logs go (a test's ``tmp_path``).
        cwd: the directory the children run in.
        stop_timeout: seconds `stop` waits for a child that was told to stop.
    """

    def __init__(self, log_dir: Path, cwd: Path, stop_timeout: float) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.stop_timeout = stop_timeout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def spawn(self, name: str, argv: list[str]) -> None:
        """Start ``argv`` as child ``name``, its stdin a pipe that `stop` closes."""
        log = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=self.cwd,
        )

    def log_tail(self) -> str:
        """The end of every child's log, one section per child."""
        return "\n".join(
            f"--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self, name: str) -> int:
        """Close a child's stdin (it then shuts down) and return its exit code."""
        process = self.processes[name]
        assert process.stdin is not None
        process.stdin.close()
        return process.wait(timeout=self.stop_timeout)

    def close(self) -> None:
        """Tell every child to stop, kill those that do not, close the logs."""
        for process in self.processes.values():
            if process.stdin is not None and not process.stdin.closed:
                process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
