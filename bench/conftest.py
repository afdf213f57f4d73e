"""Fixtures of the pytest-benchmark scenarios."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pykka
import pytest

logger = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _no_leftover_actors() -> Iterator[None]:
    """Fail a scenario that leaves actors running (they would skew the next)."""
    yield
    left = pykka.ActorRegistry.get_all()
    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    assert not left, f"actors left running after the scenario: {left}"
