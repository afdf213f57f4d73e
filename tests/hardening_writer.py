"""A process for the crash tests of ``test_hardening.py``.

Run as ``python tests/hardening_writer.py MODE DATA_DIR [options]``. Every line
it prints is flushed at once, so a test reading the pipe knows exactly what
happened before the process was killed:

- ``ready <seq>`` once the runtime has restored and started;
- ``ack <id> <value> <seq>`` after a blocking mutation returned;
- ``acked <count>`` after the first ``count`` pipelined writes all returned;
- ``begin <what>`` / ``end <what>`` around a snapshot or a retention pass;
- ``held`` when a mode is done writing and waits to be killed;
- ``stopped`` after ``stop()`` returned.

Modes (write ``i`` sets entity ``e<i % ids>`` to ``value=base + i``):

- ``snapshots``: blocking writes of entities with a large ``pad``, a snapshot
  after every one (``snapshot_every=1`` in the background as well), for ever.
- ``retention``: blocking writes with ``retention_max_rows`` small and one
  snapshot kept; every ``--every`` writes, a retention pass and a snapshot.
- ``fill``: ``--count`` pipelined writes and no snapshot at all, so the whole
  history stays in the journal; then ``held``.
- ``restore``: start (restoring the data dir, past damage with
  ``--recover-damaged``), print ``ready``, stop.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from runtime import Runtime

KIND = "counter"


@dataclass
class Counter:
    """The state every mode writes."""

    value: int
    pad: str = ""


def say(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def pad_for(entity_id: str, size: int) -> str:
    return (entity_id + ":" + "x" * size)[: max(size, 0)]


def blocking_write(rt: Runtime, n: int, args: argparse.Namespace) -> None:
    handle = rt.handle(KIND)
    entity_id = f"e{n % args.ids}"
    value = args.base + n
    pad = pad_for(entity_id, args.pad)
    handle.mutate(entity_id, lambda prev: {"value": value, "pad": pad})
    seq = handle.history(entity_id, field="value")[-1].seq
    say("ack", entity_id, value, seq)


def run_snapshots(rt: Runtime, args: argparse.Namespace) -> None:
    for n in range(10**9):
        blocking_write(rt, n, args)
        say("begin", "snapshot")
        rt.snapshot()
        say("end", "snapshot")


def run_retention(rt: Runtime, args: argparse.Namespace) -> None:
    for n in range(10**9):
        blocking_write(rt, n, args)
        if (n + 1) % args.every == 0:
            say("begin", "retention")
            rt.apply_retention()
            rt.snapshot()
            say("end", "retention")


def run_fill(rt: Runtime, args: argparse.Namespace) -> None:
    handle = rt.handle(KIND)
    burst = 500
    for start in range(0, args.count, burst):
        last = None
        for n in range(start, min(args.count, start + burst)):
            entity_id = f"e{n % args.ids}"
            last = handle.mutate_async(
                entity_id,
                lambda prev, n=n: {"value": args.base + n, "pad": "p" * args.pad},
            )
        assert last is not None
        last.get(timeout=60)
        say("acked", min(args.count, start + burst))
    say("held")
    time.sleep(120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["snapshots", "retention", "fill", "restore"])
    parser.add_argument("data_dir")
    parser.add_argument("--ids", type=int, default=4)
    parser.add_argument("--base", type=int, default=0)
    parser.add_argument("--pad", type=int, default=0)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--recover-damaged", action="store_true")
    args = parser.parse_args()

    options: dict[str, Any] = {
        "snapshot_every": None,
        "snapshot_interval": None,
        "retention_max_rows": None,
        "housekeeping_interval": 0.002,
    }
    if args.recover_damaged:
        options["recover_damaged"] = True
    if args.mode == "snapshots":
        options.update(snapshot_every=1, keep_snapshots=2)
    elif args.mode == "retention":
        options.update(retention_max_rows=args.max_rows, keep_snapshots=1)
    elif args.mode == "fill":
        options.update(journal_fsync="never")
    rt = Runtime(data_dir=args.data_dir, **options)
    rt.define_entity(KIND, Counter)
    rt.start()
    say("ready", rt.log.last_seq)
    try:
        if args.mode == "snapshots":
            run_snapshots(rt, args)
        elif args.mode == "retention":
            run_retention(rt, args)
        elif args.mode == "fill":
            run_fill(rt, args)
    finally:
        rt.stop()
        say("stopped")


if __name__ == "__main__":
    main()
