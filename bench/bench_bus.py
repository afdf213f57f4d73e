"""Changes per second through the Redis Streams bus, beside the local runtime.

Run: ``python -m bench.bench_bus [--changes N]`` (needs ``redis-server`` on the
PATH and the ``redis`` extra). Starts its own Redis on a free 127.0.0.1 port.

Measured side by side in one process, on the same workload (pipelined
``mutate_async`` over 1,000 ids, one broadcast subscriber counting):

* ``local``: one runtime, no bus;
* ``bus``: the writing runtime publishes to Redis, and a second runtime's
  subscriber receives every change through the bus; the rate is changes
  delivered to that remote subscriber per second, end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from runtime import EntityChanged, Runtime

logger = logging.getLogger(__name__)


@dataclass
class Check:
    """A three-field state."""

    status: Literal["healthy", "degraded", "unhealthy"]
    severity: Literal["minor", "major"]
    updates: int


STATUSES = ("healthy", "degraded", "unhealthy")


def _writer(i: int) -> Any:
    state = {"status": STATUSES[i % 3], "severity": "minor", "updates": i}
    return lambda prev: state


class _Counter:
    def __init__(self, target: int) -> None:
        self.seen = 0
        self.target = target
        self.done = threading.Event()

    def __call__(self, change: EntityChanged) -> None:
        self.seen += 1
        if self.seen >= self.target:
            self.done.set()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_all(rt: Runtime, changes: int) -> None:
    checks = rt.handle("check")
    futures = [checks.mutate_async(f"c{i % 1000}", _writer(i)) for i in range(changes)]
    for future in futures:
        future.get()


def _local(changes: int) -> float:
    rt = Runtime(mailbox_size=changes + 1)
    rt.define_entity("check", Check)
    counter = _Counter(changes)
    rt.on_entity_changed("check", counter)

    with rt:
        started = time.perf_counter()
        _write_all(rt, changes)
        counter.done.wait(600)
        return changes / (time.perf_counter() - started)


def _through_bus(url: str, changes: int) -> float:
    from runtime._redis_bus import RedisBus

    def bus(name: str) -> RedisBus:
        return RedisBus(url, instance_id=name, block_ms=100, maxlen=changes * 2)

    reader = Runtime(bus=bus("reader"), mailbox_size=changes + 1)
    reader.define_entity("check", Check)
    counter = _Counter(changes)
    reader.on_entity_changed("check", counter, name="remote-count")
    writer = Runtime(bus=bus("writer"))
    writer.define_entity("check", Check)

    with reader, writer:
        started = time.perf_counter()
        _write_all(writer, changes)
        if not counter.done.wait(600):
            raise RuntimeError(f"only {counter.seen} of {changes} changes arrived")
        return changes / (time.perf_counter() - started)


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """Start a redis-server of its own on 127.0.0.1 (no persistence); yield its URL.

    Raises:
        SystemExit: no ``redis-server`` is installed.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found; install it (Debian: redis-server)")
    port = _free_port()

    with tempfile.TemporaryDirectory() as directory:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", directory]
        server = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _wait_for_port(port)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(10)


def run(changes: int) -> dict[str, Any]:
    """Start a private Redis, measure both paths, return ops/s and the ratio."""
    with private_redis() as url:
        local = _local(changes)
        bus = _through_bus(url, changes)
    return {"changes": changes, "local": local, "bus": bus, "bus_vs_local": bus / local}


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not listen on 127.0.0.1:{port}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20_000)
    args = parser.parse_args(argv)

    result = run(args.changes)

    print(
        f"{result['changes']:,} changes: local {result['local']:,.0f} changes/s, "
        f"through the bus to another runtime {result['bus']:,.0f} changes/s "
        f"({result['bus_vs_local']:.2f} of local)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
