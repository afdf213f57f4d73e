"""freeze_gc: long-lived states leave the cycle collector's walks, and come back."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Ticket, ticket

from runtime import DefinitionError, Runtime


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """Leave the collector as the test found it, whatever the test did."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def _walked(obj: object) -> bool:
    """Whether the cycle collector still walks ``obj`` (it is not frozen)."""
    return any(o is obj for o in gc.get_objects())


def _fill(data_dir: Path, count: int) -> None:
    rt = Runtime(data_dir=data_dir)
    tickets = rt.define_entity("ticket", Ticket)
    with rt:
        for i in range(count):
            tickets.mutate(f"t-{i}", lambda prev: ticket())


def test_restored_states_are_frozen_until_stop(tmp_path: Path) -> None:
    _fill(tmp_path / "data", 50)
    rt = Runtime(data_dir=tmp_path / "data", freeze_gc=True)
    tickets = rt.define_entity("ticket", Ticket)

    rt.start()
    state = tickets.get("t-7")
    frozen_while_running = not _walked(state)
    count_while_running = gc.get_freeze_count()
    rt.stop()

    assert state == ticket()
    assert frozen_while_running
    assert count_while_running > 50
    assert gc.get_freeze_count() == 0
    assert _walked(state)


def test_without_freeze_gc_nothing_is_frozen(tmp_path: Path) -> None:
    _fill(tmp_path / "data", 20)
    rt = Runtime(data_dir=tmp_path / "data")
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        state = tickets.get("t-3")
        walked = _walked(state)
        frozen = gc.get_freeze_count()

    assert walked
    assert frozen == 0


def test_a_snapshot_freezes_what_was_written_before_it(tmp_path: Path) -> None:
    rt = Runtime(data_dir=tmp_path / "data", freeze_gc=True)
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        before = tickets.mutate("t-1", lambda prev: ticket())
        walked_before = _walked(before)
        rt.snapshot()
        walked_after = _walked(before)
        later = tickets.mutate("t-2", lambda prev: ticket("closed"))
        later_walked = _walked(later)

    assert walked_before
    assert not walked_after
    assert later_walked
    assert tickets.get("t-1") == ticket()


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.0])
def test_freeze_gc_must_be_a_bool(bad: object) -> None:
    with pytest.raises(DefinitionError, match=r"freeze_gc must be True or False"):
        Runtime(freeze_gc=bad)  # type: ignore[arg-type]

    assert gc.get_freeze_count() == 0
