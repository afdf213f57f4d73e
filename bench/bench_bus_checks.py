"""What checking bus entries costs per entry, beside decoding them unchecked.

Run: ``python -m bench.bench_bus_checks [--entries N] [--rounds R]`` (needs the
``redis`` extra; the reader part also ``redis-server`` on the PATH, started on
a free 127.0.0.1 port and stopped at the end).

Both parts run the same entries two ways, in alternating rounds in one
process, and print the best round of each in microseconds per entry:

* decoding alone: :func:`runtime._redis_bus.decode_change`, which only
  decodes, beside :func:`runtime._redis_bus.check_entry` with the kind's
  schema check of recorded states, as a runtime's bus readers call it; one
  line per shape of change;
* a :class:`~runtime._redis_bus.BroadcastReader` reading a stream of flat
  updates from Redis to a handler that counts: one that only decodes (as
  readers did before they checked entries) beside one that checks them.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import pydantic

from bench.bench_bus import private_redis
from runtime import EntityChanged, compile_schema
from runtime._redis_bus import (
    BroadcastReader,
    Delivery,
    Fields,
    RedisBus,
    check_entry,
    decode_change,
    encode_change,
)


@dataclass
class Check:
    """The three-field state of ``bench.bench_bus``."""

    status: Literal["healthy", "degraded", "unhealthy"]
    severity: Literal["minor", "major"]
    updates: int


@dataclass
class Incident:
    """A state with a list and a mapping next to scalars."""

    title: str
    status: str
    system_ids: list[str]
    counts: dict[str, int] = field(default_factory=dict)


class CheckModel(pydantic.BaseModel):
    """:class:`Check` as a pydantic model."""

    status: Literal["healthy", "degraded", "unhealthy"]
    severity: Literal["minor", "major"]
    updates: int


class CheckStruct(msgspec.Struct):
    """:class:`Check` as a msgspec Struct."""

    status: Literal["healthy", "degraded", "unhealthy"]
    severity: Literal["minor", "major"]
    updates: int


_CHECK_PREV = {"status": "healthy", "severity": "minor", "updates": 41}
_CHECK_NEXT = {"status": "degraded", "severity": "minor", "updates": 42}
_INCIDENT_PREV = {
    "title": "database latency",
    "status": "open",
    "system_ids": [f"sys-{n}" for n in range(10)],
    "counts": {f"c{n}": n for n in range(5)},
}
_INCIDENT_NEXT = {**_INCIDENT_PREV, "status": "resolved", "counts": {"c0": 1}}

SHAPES: dict[str, tuple[Any, dict[str, Any] | None, dict[str, Any]]] = {
    "flat update (dataclass)": (Check, _CHECK_PREV, _CHECK_NEXT),
    "flat create (dataclass)": (Check, None, _CHECK_NEXT),
    "nested update (dataclass)": (Incident, _INCIDENT_PREV, _INCIDENT_NEXT),
    "flat update (pydantic)": (CheckModel, _CHECK_PREV, _CHECK_NEXT),
    "flat update (msgspec)": (CheckStruct, _CHECK_PREV, _CHECK_NEXT),
}


def _entries(
    prev: dict[str, Any] | None, nxt: dict[str, Any], count: int
) -> list[bytes]:
    # Distinct ids and seqs, so that no two entries are the same bytes.
    return [
        encode_change(
            EntityChanged(kind="check", id=f"c{n}", prev=prev, next=nxt, seq=n + 1)
        )
        for n in range(count)
    ]


def _best(run: Callable[[], None], count: int, rounds: list[float]) -> None:
    started = time.perf_counter()
    run()
    rounds.append((time.perf_counter() - started) / count * 1e6)


def measure(entries: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Return ``{shape: (decode µs, check µs)}``, the best round of each."""
    results = {}
    for name, (schema, prev, nxt) in SHAPES.items():
        payloads = _entries(prev, nxt, entries)
        validate = compile_schema(schema).restore_validator

        def decode(payloads: list[bytes] = payloads) -> None:
            for payload in payloads:
                decode_change(payload)

        def check(
            payloads: list[bytes] = payloads,
            validate: Callable[[Any, str, str], Any] = validate,
        ) -> None:
            for payload in payloads:
                check_entry(payload, "check", validate)

        check()  # once before timing, so that a refusal shows at once
        plain: list[float] = []
        checked: list[float] = []
        for _ in range(rounds):
            _best(decode, entries, plain)
            _best(check, entries, checked)
        results[name] = (min(plain), min(checked))
    return results


class _DecodingReader(BroadcastReader):
    """A reader that only decodes its entries, as readers did before checking."""

    def _decode(self, entry_id: str, fields: Fields) -> EntityChanged:
        return decode_change(fields[b"change"])


class _Count:
    def __init__(self, target: int) -> None:
        self.seen = 0
        self.target = target
        self.done = threading.Event()

    def __call__(self, change: EntityChanged, delivery: Delivery) -> None:
        self.seen += 1
        if self.seen == self.target:
            self.done.set()


def _drain(bus: RedisBus, reader: type[BroadcastReader], entries: int) -> float:
    count = _Count(entries)
    validate = compile_schema(Check).restore_validator
    started = time.perf_counter()
    with reader(
        bus,
        "check",
        f"bench-{time.monotonic_ns()}",
        count,
        start="earliest",
        check_state=validate,
    ):
        if not count.done.wait(600):
            raise RuntimeError(f"only {count.seen} of {entries} entries were read")
    return (time.perf_counter() - started) / entries * 1e6


def measure_readers(entries: int, rounds: int) -> tuple[float, float]:
    """Return (decoding reader µs, checking reader µs) per entry, best rounds."""
    with (
        private_redis() as url,
        RedisBus(url, instance_id="bench", maxlen=entries * 2) as bus,
    ):
        for payload in _entries(_CHECK_PREV, _CHECK_NEXT, entries):
            bus.publish(decode_change(payload))
        if not bus.flush(60):
            raise RuntimeError("the entries were not all published")
        plain: list[float] = []
        checked: list[float] = []
        for _ in range(rounds):
            plain.append(_drain(bus, _DecodingReader, entries))
            checked.append(_drain(bus, BroadcastReader, entries))
    return min(plain), min(checked)


def main() -> None:
    """Parse the arguments, measure, print one line per shape and the readers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    results = measure(args.entries, args.rounds)
    print(f"{'shape':28} {'decode µs':>10} {'check µs':>10} {'ratio':>6} {'added':>7}")
    for name, (plain, checked) in results.items():
        print(
            f"{name:28} {plain:10.2f} {checked:10.2f} {checked / plain:6.2f} "
            f"{checked - plain:7.2f}"
        )
    plain, checked = measure_readers(args.entries, args.rounds)
    print(
        f"{'reader, flat updates':28} {plain:10.2f} {checked:10.2f} "
        f"{checked / plain:6.2f} {checked - plain:7.2f}"
    )


if __name__ == "__main__":
    main()
