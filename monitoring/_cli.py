"""The ``entity-runtime`` command line."""

from __future__ import annotations

import argparse
import functools
import logging
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``entity-runtime`` command; return its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
