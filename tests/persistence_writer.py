"""A writer process for the persistence tests that need a real process.

Run as ``python tests/persistence_writer.py MODE DATA_DIR [options]``. Every
line it prints is flushed at once, so a test reading the pipe sees exactly
what happened before the process died:

- ``ready <seq> <states as JSON>`` once the runtime has restored and started;
- ``try <id> <value>`` before a mutation is submitted;
- ``ack <id> <value> <seq>`` after the mutation returned;
- ``error <errno> <message>`` when a mutation raised ``DataDirError``;
- ``state <id> <state as JSON>`` and ``seq <n>`` after that error;
- ``stopped`` after ``stop()`` returned.

Modes:

- ``write``: mutate random ids for ever (until killed) with
  ``journal_fsync="always"`` and frequent automatic snapshots.
- ``hold``: write ``--count`` changes (taking a snapshot after the changes
  listed in ``--snapshot-at``), print ``held``, then sleep until killed.
- ``fill``: write padded changes until the disk is full, then report the
  error, the state of the failed id and the sequence, and stop.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from runtime import Runtime
from runtime._persistence import DataDirError

KIND = "counter"


@dataclass
class Counter:
    """The state every writer mode writes."""

    value: int
    pad: str = ""


def say(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def open_runtime(
    data_dir: str, snapshot_every: int | None, recover_damaged: bool = False
) -> Runtime:
    return Runtime(
        data_dir=data_dir,
        journal_fsync="always",
        snapshot_every=snapshot_every,
        snapshot_interval=None,
        keep_snapshots=2,
        retention_max_rows=None,
        housekeeping_interval=0.005,
        recover_damaged=recover_damaged,
    )


def states_json(rt: Runtime) -> str:
    handle = rt.handle(KIND)
    states = handle.get_many(handle.ids())
    return json.dumps({key: dict(value) for key, value in sorted(states.items())})


def write_one(rt: Runtime, entity_id: str, value: int, pad: str = "") -> int:
    handle = rt.handle(KIND)
    say("try", entity_id, value)
    handle.mutate(entity_id, lambda prev: {"value": value, "pad": pad})
    seq = handle.history(entity_id, field="value")[-1].seq
    say("ack", entity_id, value, seq)
    return seq


def run_write(rt: Runtime, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    for n in range(10**9):
        entity_id = f"e{rng.randrange(args.ids)}"
        write_one(rt, entity_id, args.base + n)


def run_hold(rt: Runtime, args: argparse.Namespace) -> None:
    snapshot_at = {int(n) for n in args.snapshot_at.split(",") if n}
    for n in range(args.count):
        write_one(rt, f"e{n % args.ids}", args.base + n)
        if n + 1 in snapshot_at:
            say("snapshot", rt.snapshot())
    say("held")
    time.sleep(120)


def run_fill(rt: Runtime, args: argparse.Namespace) -> None:
    handle = rt.handle(KIND)
    pad = "x" * 300
    for n in range(10**6):
        entity_id = f"e{n % args.ids}"
        try:
            write_one(rt, entity_id, args.base + n, pad)
        except DataDirError as err:
            say("error", err.errno, str(err).replace("\n", " "))
            say("state", entity_id, json.dumps(dict(handle.get(entity_id) or {})))
            say("seq", rt.log.last_seq)
            break
    rt.stop()
    say("stopped")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["write", "hold", "fill"])
    parser.add_argument("data_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", type=int, default=0)
    parser.add_argument("--ids", type=int, default=4)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--snapshot-every", type=int, default=None)
    parser.add_argument("--snapshot-at", default="")
    parser.add_argument("--fsize", type=int, default=None)
    parser.add_argument("--recover-damaged", action="store_true")
    args = parser.parse_args()

    if args.fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))

    rt = open_runtime(args.data_dir, args.snapshot_every, args.recover_damaged)
    rt.define_entity(KIND, Counter)
    rt.start()
    say("ready", rt.log.last_seq, states_json(rt))
    try:
        {"write": run_write, "hold": run_hold, "fill": run_fill}[args.mode](rt, args)
    finally:
        rt.stop()


if __name__ == "__main__":
    main()
