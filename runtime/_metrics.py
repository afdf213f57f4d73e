from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

MUTATION_OUTCOMES = ("changed", "unchanged", "rejected", "failed")
"""The ``outcome`` label values of ``entity_runtime_mutations_total``."""


class RuntimeMetrics:
    """The Prometheus series of one runtime, in a registry of its own.

    Each runtime gets its own ``CollectorRegistry``, so two runtimes in one
    process never collide and tests never share counters. Label values that
    come from users (kind names, worker groups, subscriber names) are escaped
    by ``prometheus_client`` when exposed.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        self.mutations = Counter(
            "entity_runtime_mutations",
            "Mutations by kind and outcome (changed, unchanged, rejected, failed).",
            ["kind", "outcome"],
            registry=r,
        )
        self.transitions = Counter(
            "entity_runtime_transitions",
            "Transition rows appended to the log.",
            ["kind"],
            registry=r,
        )
        self.changes = Counter(
            "entity_runtime_changes",
            "ENTITY_CHANGED events emitted.",
            ["kind"],
            registry=r,
        )
        self.triggers = Counter(
            "entity_runtime_triggers",
            "Trigger events derived from changes.",
            ["event"],
            registry=r,
        )
        self.deriver_errors = Counter(
            "entity_runtime_deriver_errors",
            "Derivers or payload mappers that raised.",
            ["kind"],
            registry=r,
        )
        self.subscriber_errors = Counter(
            "entity_runtime_subscriber_errors",
            "Subscriber and trigger handler calls that raised.",
            ["kind", "subscriber"],
            registry=r,
        )
        self.dead_letters = Counter(
            "entity_runtime_dead_letters",
            "Changes that failed every attempt of a work queue.",
            ["worker_group"],
            registry=r,
        )
        self.coalesced = Counter(
            "entity_runtime_coalesced",
            "Queued deliveries folded into a newer one of the same id because "
            "the consumer was behind.",
            ["actor"],
            registry=r,
        )
        self.actor_restarts = Counter(
            "entity_runtime_actor_restarts",
            "Actors restarted after an internal failure.",
            ["actor"],
            registry=r,
        )
        self.mailbox_depth = Gauge(
            "entity_runtime_mailbox_depth",
            "Deliveries waiting in an actor's mailbox.",
            ["actor"],
            registry=r,
        )
        self.mutate_seconds = Histogram(
            "entity_runtime_mutate_seconds",
            "Time from a mutation's submission to its commit or failure.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "entity_runtime_delivery_seconds",
            "Time from a change's commit to its handling by a subscriber.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.entities = Gauge(
            "entity_runtime_entities",
            "Entities currently known per kind (store-backed kinds only).",
            ["kind"],
            registry=r,
        )
        self.log_rows = Gauge(
            "entity_runtime_log_rows",
            "Rows in the in-memory transition log.",
            registry=r,
        )

    def watch_mailbox(self, actor: str, depth: Callable[[], float]) -> None:
        """Expose a mailbox's depth, read at scrape time."""
        self.mailbox_depth.labels(actor=actor).set_function(depth)

    def forget_mailbox(self, actor: str) -> None:
        """Stop exposing a mailbox that no longer exists."""
        try:
            self.mailbox_depth.remove(actor)
        except KeyError:
            logger.debug("mailbox %s was not exposed", actor)
