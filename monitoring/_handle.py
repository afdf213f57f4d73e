from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

logger = logging.getLogger(__name__)

State = Mapping[str, Any]
"""A reactive state as the runtime hands it out: a read-only mapping."""


class SupportsEntityWrites(Protocol):
    """The part of :class:`runtime.EntityHandle` the monitoring helpers use.

    Any object with these two methods will do, which keeps the helpers
    testable with a small fake.
    """

    def mutate(
        self,
        entity_id: str,
        apply: Callable[[State | None], State],
        /,
        *,
        actor: str = ...,
        run_id: str | None = ...,
    ) -> State:
        """Serialise ``apply`` for the id, record the diff and return ``next``."""
        ...

    def remove(
        self,
        entity_id: str,
        apply: Callable[[State | None], None] | None = ...,
        /,
        *,
        actor: str = ...,
        run_id: str | None = ...,
    ) -> object:
        """Run ``apply`` to delete the entity and record the tombstone."""
        ...
