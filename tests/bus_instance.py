"""One runtime instance on a shared Redis bus, run as a separate process.

Started by ``tests/test_runtime_bus.py`` with ``sys.executable``::

    bus_instance.py URL PREFIX NAME INSTANCES WRITES STALL_ON

The instance owns its share of the ids ``t-0`` ... ``t-29`` (by a
``PartitionMap`` of the comma-separated ``INSTANCES``). It subscribes a
broadcast handler and a ``work_queue("mailer")`` handler to ``ticket`` and
records, in Redis lists under ``PREFIX:test:``, what each one handled, so the
test can count across processes:

- ``ready``: its name, once its runtime has started;
- ``broadcast:NAME``: ``"<id> <n>"`` per change its broadcast handler got;
- ``handled``: ``"NAME <id>:<n> <attempt>"`` per work-queue call;
- ``stalled``: ``"NAME <id>:<n>"`` when it hangs (see below);
- ``written``: its name, once its writes are committed and published.

After the test pushes to ``go``, it makes ``WRITES`` writes over its own ids,
each with a rising ``n``. With ``STALL_ON=k`` (not 0) its work-queue handler
hangs after recording its k-th call, before returning, to be killed there.
It runs until its stdin is closed, then stops its runtime; the exit code is 0
when every committed change was published.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any

from runtime import EntityChanged, Runtime, work_queue
from runtime._redis_bus import Delivery, PartitionMap, RedisBus

KIND = "ticket"
IDS = [f"t-{i}" for i in range(30)]
BUS_OPTIONS: dict[str, Any] = {
    "block_ms": 100,
    "claim_idle_ms": 800,
    "retry_backoff": 0.02,
    "max_retry_backoff": 0.2,
    "socket_timeout": 2.0,
}


@dataclasses.dataclass
class Counter:
    """The state of a ticket in these tests: how many writes it has had."""

    n: int


def main(
    url: str, prefix: str, name: str, instances: list[str], writes: int, stall_on: int
) -> int:
    """Run one instance until stdin closes; return the exit code."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    bus = RedisBus(url, instance_id=name, stream_prefix=prefix, **BUS_OPTIONS)
    partitions = PartitionMap(instances, partitions=64)
    recorder = bus.new_client()
    calls = 0

    def on_broadcast(change: EntityChanged) -> None:
        assert change.next is not None
        recorder.rpush(
            f"{prefix}:test:broadcast:{name}", f"{change.id} {change.next['n']}"
        )

    def on_work(change: EntityChanged, delivery: Delivery) -> None:
        nonlocal calls
        assert change.next is not None
        key = f"{change.id}:{change.next['n']}"
        recorder.rpush(f"{prefix}:test:handled", f"{name} {key} {delivery.attempt}")
        calls += 1
        if calls == stall_on:
            recorder.rpush(f"{prefix}:test:stalled", f"{name} {key}")
            time.sleep(600)

    runtime = Runtime(bus=bus, partitions=partitions)
    tickets = runtime.define_entity(KIND, Counter)
    runtime.on_entity_changed(KIND, on_broadcast, name="audit")
    runtime.on_entity_changed(KIND, on_work, work_queue("mailer"), name="mailer")
    runtime.start()
    recorder.rpush(f"{prefix}:test:ready", name)

    recorder.blpop([f"{prefix}:test:go:{name}"], timeout=60)
    mine = [i for i in IDS if partitions.owner(KIND, i) == name]
    for n in range(1, writes + 1):
        entity_id = mine[n % len(mine)]
        tickets.mutate(entity_id, lambda prev, n=n: {"n": n})
    runtime.drain()
    bus.flush(timeout=10)
    recorder.rpush(f"{prefix}:test:written", name)

    sys.stdin.read()
    report = runtime.stop()
    recorder.close()
    return 0 if report.unpublished == 0 else 1


if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1],
            sys.argv[2],
            sys.argv[3],
            sys.argv[4].split(","),
            int(sys.argv[5]),
            int(sys.argv[6]),
        )
    )
