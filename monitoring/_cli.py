"""The ``entity-runtime`` command line."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def _demo(args: argparse.Namespace) -> int:
    from monitoring import (
        HealthService,
        IncidentService,
        delete_catalog_system,
        evaluate_system,
        install_monitoring,
        record_check_result,
        save_catalog_system,
        to_incident_entity_state,
        write_incident_entity,
    )
    from runtime import EntityChanged, Runtime

    health = HealthService()
    fired: list[tuple[int, str, Any]] = []

    def collect(event: str, payload: Any, change: EntityChanged) -> None:
        fired.append((change.seq, event, payload))

    with IncidentService() as incident_service:
        rt = Runtime()
        handles = install_monitoring(
            rt, incident_service=incident_service, health_service=health
        )
        for event in (
            "catalog.created",
            "catalog.deleted",
            "healthcheck.system_degraded",
            "healthcheck.system_healthy",
            "incident.created",
            "incident.updated",
            "incident.resolved",
        ):
            rt.on_trigger(event, collect)

        with rt:
            save_catalog_system(handles.catalog_systems, "shop", name="Shop")
            evaluate_system(
                handles.health,
                health,
                "shop",
                functools.partial(health.add_check, "shop", "checkout"),
            )
            record_check_result(handles.health, health, "shop", "checkout", False)
            write_incident_entity(
                handles.incidents,
                "inc-1",
                lambda: to_incident_entity_state(
                    incident_service.create_incident(
                        "Checkout failing",
                        severity="major",
                        system_ids=["shop"],
                        incident_id="inc-1",
                    )
                ),
            )
            record_check_result(handles.health, health, "shop", "checkout", True)
            write_incident_entity(
                handles.incidents,
                "inc-1",
                lambda: to_incident_entity_state(
                    incident_service.resolve_incident("inc-1")
                ),
            )
            delete_catalog_system(handles.catalog_systems, "shop")
            rt.drain(timeout=10, until_idle=True)

    for seq, event, payload in sorted(fired, key=lambda f: (f[0], f[1])):
        print(f"seq={seq:<3} {event:<32} {payload}")
    print(f"{rt.log.last_seq} changes, {len(rt.log)} transition rows")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime
    from pathlib import Path

    from runtime import EntityRuntimeError
    from runtime._durability import load_data_dir

    directory = Path(args.data_dir)
    if not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return 2
    try:
        data = load_data_dir(directory)
    except EntityRuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    ids_by_kind: dict[str, set[str]] = {}
    for change in data.changes:
        ids_by_kind.setdefault(change.kind, set()).add(change.id)

    if args.kind is None:
        print(f"{directory}: seq={data.seq}, {len(data.changes)} changes in the log")
        if data.snapshot is not None:
            print(
                f"snapshot {data.snapshot.name} "
                f"+ {data.journal_records} journal records"
            )
        for problem in data.problems:
            print(f"damaged: {problem}")
        kinds = sorted(set(ids_by_kind) | set(data.states))
        for kind in kinds:
            backed = data.store_backed.get(kind, True)
            count = len(data.states.get(kind, {})) if backed else len(ids_by_kind[kind])
            how = "entities" if backed else "ids in the log (plugin-backed)"
            print(f"  {kind}: {count} {how}")
        return 0

    if args.kind not in data.store_backed and args.kind not in ids_by_kind:
        print(f"error: no kind {args.kind!r} in {directory}", file=sys.stderr)
        return 2
    if args.id is None:
        ids = sorted(data.states.get(args.kind) or ids_by_kind.get(args.kind, set()))
        for entity_id in ids:
            print(entity_id)
        return 0

    state = data.states.get(args.kind, {}).get(args.id)
    rows = [
        {
            "seq": c.seq,
            "at": datetime.fromtimestamp(c.ts, UTC).isoformat(),
            "actor": c.actor,
            "run_id": c.run_id,
            "field": field,
            "before": before,
            "after": after,
        }
        for c in data.changes
        if c.kind == args.kind and c.id == args.id
        for field, before, after in c.rows
    ]
    if state is None and not rows:
        print(f"error: no entity {args.kind}/{args.id} in {directory}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"kind": args.kind, "id": args.id, "state": state, "history": rows},
            indent=2,
            default=str,
        )
    )
    return 0


def _fraction(text: str) -> float:
    from bench._compare import parse_fraction

    return parse_fraction(text)


def _bench(args: argparse.Namespace) -> int:
    from bench import run_cli

    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``entity-runtime`` command."""
    parser = argparse.ArgumentParser(
        prog="entity-runtime",
        description="An actor-based, in-memory runtime for reactive entities.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default WARNING)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run a short monitoring scenario and print its trigger events"
    )
    demo.set_defaults(run=_demo)

    from monitoring import add_agent_parser

    add_agent_parser(commands)

    inspect = commands.add_parser(
        "inspect",
        help="list the kinds, entities and history kept in a data directory",
        description="Read a data directory without starting a runtime: with no "
        "KIND, list kinds and entity counts; with KIND, its ids; with KIND and "
        "ID, that entity's state and history as JSON.",
    )
    inspect.add_argument("--data-dir", required=True, help="the data directory")
    inspect.add_argument("kind", nargs="?", help="a kind to list")
    inspect.add_argument("id", nargs="?", help="an entity to show")
    inspect.set_defaults(run=_inspect)

    bench = commands.add_parser(
        "bench",
        help="compare the runtime with a bare loop and raw pykka on one workload",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a scaled-down workload (under a minute)"
    )
    bench.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    bench.add_argument(
        "--plot", metavar="FILE.png", help="also write a bar chart (needs matplotlib)"
    )
    bench.add_argument(
        "--compare",
        metavar="BASELINE.json",
        help="compare the ratios with an earlier --json report of the same size; "
        "exit 3 if one moved the wrong way by more than --tolerance",
    )
    bench.add_argument(
        "--tolerance",
        type=_fraction,
        default=0.2,
        metavar="FRACTION",
        help="how far a ratio may move the wrong way, as a fraction of the "
        "baseline's value, before it counts as a regression (default 0.2)",
    )
    bench.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``entity-runtime`` command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except BrokenPipeError:
        # The reader went away (``entity-runtime inspect ... | head``): stop
        # quietly, and keep Python from complaining while it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
