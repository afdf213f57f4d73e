"""The write path's shortcuts (remembered ids and actors) keep every check."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import pytest

from actors import _runtime
from runtime import Runtime
from runtime._errors import (
    DefinitionError,
    InvalidIdError,
    InvalidTimeError,
    ReentrantCallError,
    RuntimeStoppedError,
)
from tests.conftest import Ticket, ticket

TOKEN = "s3cr3t-t0ken-value"


class _EqualsAnything(str):
    """A str whose hash copies another string's and which equals anything."""

    __slots__ = ("_like",)

    def __new__(cls, text: str, like: str) -> _EqualsAnything:
        made = super().__new__(cls, text)
        made._like = like
        return made

    def __hash__(self) -> int:
        return hash(self._like)

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False


def test_a_bad_id_is_refused_after_good_ids_were_remembered(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-1", lambda prev: ticket("working"))

        for bad, reason in (
            ("t-1\n", "non-printable"),
            ("", "must not be empty"),
            (1, "must be a string"),
            ("x" * 1025, "longer than"),
        ):
            with pytest.raises(InvalidIdError, match=reason):
                tickets.mutate(bad, lambda prev: ticket())  # type: ignore[arg-type]
            with pytest.raises(InvalidIdError, match=reason):
                tickets.mutate_async(bad, lambda prev: ticket())  # type: ignore[arg-type]
            items: list[Any] = [("t-1", lambda prev: ticket()), (bad, print)]
            with pytest.raises(InvalidIdError, match=reason):
                tickets.mutate_many(items)

        assert tickets.get("t-1") == ticket("working")
    assert rt.log.last_seq == 2


def test_a_str_subclass_id_is_checked_even_if_it_equals_a_remembered_id(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    sneaky = _EqualsAnything("bad\x00id", like="t-1")

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        assert sneaky == "t-1"
        assert hash(sneaky) == hash("t-1")

        with pytest.raises(InvalidIdError, match="must be a string"):
            tickets.mutate(sneaky, lambda prev: ticket())
        with pytest.raises(InvalidIdError, match="must be a string"):
            tickets.mutate_many([(sneaky, lambda prev: ticket())])

    assert rt.log.last_seq == 1


def test_a_str_subclass_actor_is_never_remembered(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    lookalike = _EqualsAnything("bot", like="bad\x00actor")

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(), actor=lookalike)

        assert all(type(actor) is str for actor in _runtime._ACTORS_SEEN)
        with pytest.raises(DefinitionError, match="actor must be a non-empty"):
            tickets.mutate("t-1", lambda prev: ticket("working"), actor="bad\x00actor")
        with pytest.raises(DefinitionError, match="actor must be a non-empty"):
            tickets.mutate_many(
                [("t-1", lambda prev: ticket("working"))], actor="bad\x00actor"
            )

    assert rt.log.last_seq == 1


def test_remembered_ids_and_actors_are_checked_for_a_runs_secrets(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    leaky_id, leaky_actor = f"t-{TOKEN}", f"bot-{TOKEN}"

    with rt:
        # Without a run these are ordinary strings, and they are remembered.
        tickets.mutate(leaky_id, lambda prev: ticket(), actor=leaky_actor)
        rt.register_run_secrets("run-1", [TOKEN])

        with pytest.raises(InvalidIdError, match="contains a secret") as bad_id:
            tickets.mutate(leaky_id, lambda prev: ticket("working"), run_id="run-1")
        with pytest.raises(InvalidIdError, match="contains a secret"):
            tickets.mutate_many(
                [(leaky_id, lambda prev: ticket("working"))], run_id="run-1"
            )
        with pytest.raises(DefinitionError, match="contains a secret") as bad_actor:
            tickets.mutate(
                "t-2", lambda prev: ticket(), actor=leaky_actor, run_id="run-1"
            )

    assert TOKEN not in str(bad_id.value)
    assert TOKEN not in str(bad_actor.value)
    assert rt.log.last_seq == 1


def test_a_remembered_id_still_needs_a_callable_apply(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())

        with pytest.raises(DefinitionError, match="apply must be callable"):
            tickets.mutate("t-1", None)  # type: ignore[arg-type]
        with pytest.raises(DefinitionError, match="apply must be callable or None"):
            tickets.remove("t-1", "nope")  # type: ignore[arg-type]
        with pytest.raises(DefinitionError, match="must be an \\(id, apply\\) pair"):
            tickets.mutate_many([("t-1", "nope")])  # type: ignore[list-item]

    assert rt.log.last_seq == 1


def test_a_remembered_id_still_has_its_time_checked(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())

        with pytest.raises(InvalidTimeError):
            tickets.mutate(
                "t-1", lambda prev: ticket("working"), at=datetime(2024, 1, 1)
            )
        with pytest.raises(InvalidTimeError):
            tickets.mutate_many(
                [("t-1", lambda prev: ticket("working"))], at=float("nan")
            )

    assert rt.log.last_seq == 1


def test_a_remembered_id_is_refused_from_inside_an_apply_of_its_kind(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    refused: list[BaseException] = []

    def nested(prev: Any) -> Any:
        try:
            tickets.mutate_async("t-1", lambda p: ticket())
        except ReentrantCallError as err:
            refused.append(err)
        return ticket("working")

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-2", nested)

    assert len(refused) == 1
    assert "would wait for itself" in str(refused[0])


def test_a_remembered_id_is_refused_before_start_and_after_stop(
    clock: Any,
) -> None:
    rt = Runtime(clock=clock)
    tickets = rt.define_entity("ticket", Ticket)

    with pytest.raises(RuntimeStoppedError, match="not started"):
        tickets.mutate_async("t-1", lambda prev: ticket())
    with rt:
        tickets.mutate("t-1", lambda prev: ticket())

    with pytest.raises(RuntimeStoppedError, match="stopped"):
        tickets.mutate_async("t-1", lambda prev: ticket("working"))
    with pytest.raises(RuntimeStoppedError, match="stopped"):
        tickets.mutate_many([("t-1", lambda prev: ticket("working"))])
    assert rt.log.last_seq == 1


def test_a_remembered_id_still_has_its_owner_checked(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)

    class _NotMine:
        def check_owner(self, instance: str, kind: str, entity_id: str) -> None:
            raise LookupError(f"{kind}/{entity_id} is owned elsewhere")

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        rt.partitions = _NotMine()  # type: ignore[assignment]
        try:
            with pytest.raises(LookupError, match="owned elsewhere"):
                tickets.mutate_async("t-1", lambda prev: ticket("working"))
            with pytest.raises(LookupError, match="owned elsewhere"):
                tickets.mutate_many([("t-1", lambda prev: ticket("working"))])
        finally:
            rt.partitions = None

    assert rt.log.last_seq == 1


def test_the_remembered_ids_stay_bounded() -> None:
    for index in range(_runtime._IDS_REMEMBERED + 10):
        _runtime._remember_id(f"bounded-{index}")
    _runtime._remember_id("long" * 100)
    _runtime._remember_id(_EqualsAnything("odd", like="t-1"))

    assert len(_runtime._IDS_SEEN) <= _runtime._IDS_REMEMBERED
    assert "long" * 100 not in _runtime._IDS_SEEN
    assert all(type(seen) is str for seen in _runtime._IDS_SEEN)


def test_a_future_waited_for_by_several_threads_wakes_each_of_them(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    gate = threading.Event()
    results: list[Any] = []

    def held(prev: Any) -> Any:
        gate.wait(5)
        return ticket()

    with rt:
        future = tickets.mutate_async("t-1", held)
        with pytest.raises(TimeoutError):
            future.get(timeout=0.01)
        waiters = [
            threading.Thread(target=lambda: results.append(future.get(timeout=5)))
            for _ in range(3)
        ]
        for waiter in waiters:
            waiter.start()
        gate.set()
        for waiter in waiters:
            waiter.join(5)

        assert future.get(timeout=0) == ticket()
    assert results == [ticket()] * 3
