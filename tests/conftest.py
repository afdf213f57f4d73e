from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pykka
import pytest
from hypothesis import HealthCheck, settings

from runtime import Runtime, thaw
from runtime.testing import FakeClock

# Deadlines make property tests flaky on shared, busy machines; speed is
# measured by the benchmarks instead.
settings.register_profile(
    "default",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")


@dataclass
class Ticket:
    """A small schema used across the runtime's tests."""

    status: Literal["open", "working", "closed"]
    severity: Literal["low", "high"]
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] | None = None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(clock: FakeClock) -> Iterator[Runtime]:
    """A runtime on a fake clock, stopped (with every actor) after the test."""
    runtime = Runtime(clock=clock, stop_timeout=5.0)
    try:
        yield runtime
    finally:
        runtime.stop()


@pytest.fixture(autouse=True)
def _no_leftover_actors() -> Iterator[None]:
    yield
    left = pykka.ActorRegistry.get_all()
    pykka.ActorRegistry.stop_all(block=True, timeout=5)
    assert not left, f"actors left running after the test: {left}"


def ticket(status: str = "open", severity: str = "low", **more: Any) -> dict[str, Any]:
    """Build a Ticket state."""
    return {"status": status, "severity": severity, "tags": [], "extra": None, **more}


def typed(value: Any) -> Any:
    """``value`` thawed, each scalar paired with its type: equal means same types."""
    value = thaw(value)
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value), value)
