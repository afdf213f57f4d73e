from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import msgspec
import pydantic
import pytest
from conftest import Ticket, ticket

from runtime import (
    MASK,
    ApplyError,
    DefinitionError,
    EntityChanged,
    EntityHandle,
    InvalidIdError,
    Runtime,
    SchemaError,
    work_queue,
)

TOKEN = "sk-live-4f9a8b7c"


def _everything_seen(rt: Runtime, kind: str = "ticket") -> dict[str, list[Any]]:
    seen: dict[str, list[Any]] = {"changes": [], "payloads": []}
    rt.on_entity_changed(kind, seen["changes"].append)
    rt.register_change_deriver(
        kind, lambda c: ["ticket.any"], to_payload=lambda c: {"next": c.next}
    )
    rt.on_trigger("ticket.any", lambda e, p, c: seen["payloads"].append(p))
    return seen


def test_secrets_are_masked_in_rows_events_and_payloads_but_not_in_the_state(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _everything_seen(rt)
    rt.register_run_secrets("run-1", [TOKEN])
    secret_state = ticket(
        tags=[f"token={TOKEN}"], extra={"auth": {TOKEN: [f"Bearer {TOKEN}"]}}
    )

    with rt:
        returned = tickets.mutate("t-1", lambda prev: secret_state, run_id="run-1")
        rt.drain()

    shown = json.dumps(
        [
            [r.to_dict() for r in tickets.history("t-1")],
            [[c.prev, c.next, c.delta] for c in seen["changes"]],
            seen["payloads"],
        ]
    )
    assert TOKEN not in shown
    assert f"token={MASK}" in shown
    assert seen["changes"][0].next["extra"] == {"auth": {MASK: [f"Bearer {MASK}"]}}
    assert returned == secret_state
    assert tickets.get("t-1") == secret_state


def test_writes_of_other_runs_or_without_a_run_are_not_masked(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _everything_seen(rt)
    rt.register_run_secrets("run-1", [TOKEN])

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(tags=[TOKEN]), run_id="run-2")
        tickets.mutate("t-2", lambda prev: ticket(tags=[TOKEN]))
        rt.drain()

    assert [c.next["tags"] for c in seen["changes"]] == [[TOKEN], [TOKEN]]


def test_secrets_expire_with_their_run(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _everything_seen(rt)
    rt.register_run_secrets("run-1", [TOKEN])

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(tags=[TOKEN]), run_id="run-1")
        ended = rt.end_run("run-1")
        ended_again = rt.end_run("run-1")
        tickets.mutate("t-2", lambda prev: ticket(tags=[TOKEN]), run_id="run-1")
        rt.drain()

    assert ended is True
    assert ended_again is False
    assert [c.next["tags"] for c in seen["changes"]] == [[MASK], [TOKEN]]


def test_masked_keys_that_collide_stay_distinct(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _everything_seen(rt)
    other = "pw-secret-2"
    rt.register_run_secrets("run-1", [TOKEN, other])

    with rt:
        tickets.mutate(
            "t-1",
            lambda prev: ticket(extra={TOKEN: 1, other: 2}),
            run_id="run-1",
        )
        rt.drain()

    assert seen["changes"][0].next["extra"] == {MASK: 1, f"{MASK}#2": 2}


def test_error_messages_of_a_run_do_not_leak_its_secrets(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])

    def leaky(prev: Any) -> Any:
        raise ValueError(f"could not use {TOKEN}")

    with caplog.at_level(logging.DEBUG), rt:
        with pytest.raises(SchemaError) as bad_state:
            tickets.mutate("t-1", lambda prev: {"status": TOKEN}, run_id="run-1")
        with pytest.raises(ApplyError) as bad_apply:
            tickets.mutate("t-1", leaky, run_id="run-1")

    assert TOKEN not in str(bad_state.value)
    assert MASK in str(bad_state.value)
    assert TOKEN not in str(bad_apply.value)
    assert TOKEN not in caplog.text
    assert rt.log.last_seq == 0


def test_dead_letters_of_a_run_do_not_hold_its_secrets(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])

    def failing(change: EntityChanged) -> None:
        raise RuntimeError(f"cannot send {change.next}")

    rt.on_entity_changed(
        "ticket", failing, delivery=work_queue("g", max_attempts=1, backoff=0)
    )

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(tags=[TOKEN]), run_id="run-1")
        rt.drain()

    letters = rt.dead_letters()
    assert len(letters) == 1
    assert TOKEN not in repr(letters[0])
    assert TOKEN not in json.dumps(letters[0].to_dict())


def test_persisted_rows_are_masked(tmp_path: Path) -> None:
    rt = Runtime(data_dir=tmp_path)
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(tags=[TOKEN]), run_id="run-1")
    restored = Runtime(data_dir=tmp_path)
    again = restored.define_entity("ticket", Ticket)
    with restored:
        rows = [r.to_dict() for r in again.history("t-1")]
        state = again.get("t-1")

    assert TOKEN not in json.dumps(rows)
    assert state == ticket(tags=[TOKEN])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["short"], "at least 6"),
        ([TOKEN, 12345678], "must be a string"),
        (TOKEN, "wrap it in a list"),
    ],
)
def test_bad_secrets_are_refused_and_nothing_registered(
    rt: Runtime, values: Any, message: str
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _everything_seen(rt)

    with pytest.raises(DefinitionError, match=message):
        rt.register_run_secrets("run-1", values)
    with rt:
        tickets.mutate("t-1", lambda prev: ticket(tags=[TOKEN]), run_id="run-1")
        rt.drain()

    assert seen["changes"][0].next["tags"] == [TOKEN]


def _keep(prev: Any) -> Any:
    return ticket(status="working")


Write = Callable[[EntityHandle[Any]], Any]

REFUSED_WRITES: list[tuple[str, Write, type[Exception], str]] = [
    (
        "id containing a secret",
        lambda h: h.mutate(f"t-{TOKEN}", _keep, run_id="run-1"),
        InvalidIdError,
        r"^ticket: id 't-\*\*\*' contains a secret of run run-1; ids are keys and "
        r"are never masked, so they must not contain one; nothing recorded$",
    ),
    (
        "id equal to a secret",
        lambda h: h.mutate(TOKEN, _keep, run_id="run-1"),
        InvalidIdError,
        r"^ticket: id '\*\*\*' contains a secret of run run-1",
    ),
    (
        "id containing a secret and a control character",
        lambda h: h.mutate(f"t-{TOKEN}\n", _keep, run_id="run-1"),
        InvalidIdError,
        r"id 't-\*\*\*\\n' contains a secret",
    ),
    (
        "mutate_async with an id containing a secret",
        lambda h: h.mutate_async(f"t-{TOKEN}", _keep, run_id="run-1"),
        InvalidIdError,
        "contains a secret of run run-1",
    ),
    (
        "remove of an id containing a secret",
        lambda h: h.remove(f"t-{TOKEN}", run_id="run-1"),
        InvalidIdError,
        "contains a secret of run run-1",
    ),
    (
        "remove_async of an id containing a secret",
        lambda h: h.remove_async(f"t-{TOKEN}", run_id="run-1"),
        InvalidIdError,
        "contains a secret of run run-1",
    ),
    (
        "actor containing a secret",
        lambda h: h.mutate("t-1", _keep, actor=f"bot:{TOKEN}", run_id="run-1"),
        DefinitionError,
        r"^ticket/t-1: actor 'bot:\*\*\*' contains a secret of run run-1; actors "
        r"are recorded as given and never masked, so they must not contain one; "
        r"nothing recorded$",
    ),
    (
        "actor containing a secret and a control character",
        lambda h: h.mutate("t-1", _keep, actor=f"{TOKEN}\n", run_id="run-1"),
        DefinitionError,
        r"actor '\*\*\*\\n' contains a secret",
    ),
    (
        "mutate_many with one id containing a secret",
        lambda h: h.mutate_many(
            [("t-2", _keep), (f"t-{TOKEN}", _keep), ("t-3", _keep)], run_id="run-1"
        ),
        InvalidIdError,
        r"^ticket: id 't-\*\*\*' contains a secret of run run-1",
    ),
    (
        "mutate_many with an actor containing a secret",
        lambda h: h.mutate_many(
            [("t-1", _keep), ("t-2", _keep)], actor=f"bot:{TOKEN}", run_id="run-1"
        ),
        DefinitionError,
        r"^ticket: actor 'bot:\*\*\*' contains a secret of run run-1",
    ),
    (
        "a non-callable apply for an id containing a secret",
        lambda h: h.mutate(f"t-{TOKEN}", "not callable", run_id="run-1"),
        InvalidIdError,
        r"^ticket: id 't-\*\*\*' contains a secret of run run-1",
    ),
    (
        "a non-callable apply holding a secret",
        lambda h: h.mutate("t-1", f"key {TOKEN}", run_id="run-1"),
        DefinitionError,
        r"^ticket/t-1: apply must be callable, got 'key \*\*\*'; nothing recorded$",
    ),
    (
        "a non-callable remove apply holding a secret",
        lambda h: h.remove_async("t-1", [TOKEN], run_id="run-1"),
        DefinitionError,
        r"^ticket/t-1: apply must be callable or None, got \['\*\*\*'\]",
    ),
    (
        "mutate_many with a malformed item holding a secret",
        lambda h: h.mutate_many(
            [("t-2", _keep), (f"t-{TOKEN}", "not callable")], run_id="run-1"
        ),
        DefinitionError,
        r"^ticket: item 1 must be an \(id, apply\) pair .*'t-\*\*\*'",
    ),
    (
        "an id given as bytes holding a secret",
        lambda h: h.mutate(TOKEN.encode(), _keep, run_id="run-1"),
        InvalidIdError,
        r"^ticket: id b'\*\*\*' must be a string; nothing recorded$",
    ),
    (
        "a long id given as a list, cut inside its secret",
        lambda h: h.mutate(["x" * 50 + TOKEN], _keep, run_id="run-1"),
        InvalidIdError,
        r"^ticket: id \['x+\*\*\*'\] must be a string",
    ),
    (
        "remove_async of an id given as bytes holding a secret",
        lambda h: h.remove_async(TOKEN.encode(), run_id="run-1"),
        InvalidIdError,
        r"^ticket: id b'\*\*\*' must be a string",
    ),
    (
        "an actor given as a list holding a secret",
        lambda h: h.mutate("t-1", _keep, actor=[TOKEN], run_id="run-1"),
        DefinitionError,
        r"^ticket/t-1: actor must be a non-empty printable string, got "
        r"\['\*\*\*'\]; nothing recorded$",
    ),
    (
        "an actor given as bytes holding a secret",
        lambda h: h.mutate("t-1", _keep, actor=TOKEN.encode(), run_id="run-1"),
        DefinitionError,
        r"got b'\*\*\*'; nothing recorded$",
    ),
    (
        "mutate_many with an id given as bytes holding a secret",
        lambda h: h.mutate_many(
            [("t-2", _keep), (TOKEN.encode(), _keep)], run_id="run-1"
        ),
        InvalidIdError,
        r"^ticket: id b'\*\*\*' must be a string",
    ),
    (
        "mutate_many with an actor given as bytes holding a secret",
        lambda h: h.mutate_many([("t-2", _keep)], actor=TOKEN.encode(), run_id="run-1"),
        DefinitionError,
        r"^ticket: actor must be a non-empty printable string, got b'\*\*\*'",
    ),
]


def _recorded(rt: Runtime, tickets: EntityHandle[Any]) -> Any:
    return (
        rt.log.last_seq,
        len(rt.log),
        sorted(tickets.ids()),
        tickets.get("t-1"),
        [r.to_dict() for r in tickets.history("t-1")],
    )


@pytest.mark.parametrize(
    ("write", "error", "message"),
    [case[1:] for case in REFUSED_WRITES],
    ids=[case[0] for case in REFUSED_WRITES],
)
def test_writes_whose_id_or_actor_holds_a_secret_of_their_run_are_refused(
    rt: Runtime,
    caplog: pytest.LogCaptureFixture,
    write: Write,
    error: type[Exception],
    message: str,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _everything_seen(rt)
    rt.register_run_secrets("run-1", [TOKEN])

    with caplog.at_level(logging.DEBUG), rt:
        tickets.mutate("t-1", lambda prev: ticket(tags=[TOKEN]), run_id="run-1")
        rt.drain()
        before = _recorded(rt, tickets)
        with pytest.raises(error, match=message) as refused:
            write(tickets)
        rt.drain()
        after = _recorded(rt, tickets)

    assert TOKEN not in str(refused.value)
    assert TOKEN not in repr(refused.value.args)
    assert TOKEN not in str(getattr(refused.value, "entity_id", ""))
    assert TOKEN not in caplog.text
    assert after == before
    assert before[0] == 1
    assert before[3] == ticket(tags=[TOKEN])
    assert [c.seq for c in seen["changes"]] == [1]
    assert len(seen["payloads"]) == 1


def test_ids_and_actors_holding_a_secret_are_accepted_without_its_run(
    rt: Runtime,
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    seen = _everything_seen(rt)
    rt.register_run_secrets("run-1", [TOKEN])
    secret_id = f"t-{TOKEN}"
    actor = f"bot:{TOKEN}"

    with rt:
        tickets.mutate(secret_id, _keep, actor=actor, run_id="run-2")
        tickets.mutate_many([(TOKEN, _keep)], actor=actor)
        tickets.remove(secret_id, actor=actor)
        rt.end_run("run-1")
        tickets.mutate(secret_id, _keep, actor=actor, run_id="run-1")
        rt.drain()

    assert [(c.id, c.actor, c.run_id) for c in seen["changes"]] == [
        (secret_id, actor, "run-2"),
        (TOKEN, actor, None),
        (secret_id, actor, None),
        (secret_id, actor, "run-1"),
    ]
    assert sorted(tickets.ids()) == sorted([secret_id, TOKEN])


def test_a_run_id_that_cannot_be_a_key_is_refused_as_before(rt: Runtime) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])

    with rt, pytest.raises(DefinitionError, match="run_id must be a non-empty"):
        tickets.mutate("t-1", _keep, run_id=["run-1"])  # type: ignore[arg-type]

    assert rt.log.last_seq == 0


@dataclass
class Labelled:
    """A schema with a mapping whose keys are the caller's."""

    name: str
    labels: dict[str, int] = field(default_factory=dict)


class LabelledStruct(msgspec.Struct):
    name: str
    labels: dict[str, int] = {}


class LabelledModel(pydantic.BaseModel):
    name: str
    labels: dict[str, int] = {}


@pytest.mark.parametrize("schema", [Labelled, LabelledStruct, LabelledModel])
@pytest.mark.parametrize(
    "state",
    [
        {"name": "n", TOKEN: 1},
        {"name": "n", f"x-{TOKEN}": 1},
        {"name": "n", "labels": {f"k-{TOKEN}": "bad"}},
        {"name": "n", "labels": {TOKEN: [TOKEN]}},
    ],
    ids=["extra-field", "extra-field-part", "bad-label", "bad-label-list"],
)
def test_schema_errors_of_a_run_mask_its_secrets_in_field_names(
    rt: Runtime, caplog: pytest.LogCaptureFixture, schema: Any, state: Any
) -> None:
    labelled = rt.define_entity("labelled", schema)
    rt.register_run_secrets("run-1", [TOKEN])

    with caplog.at_level(logging.DEBUG), rt, pytest.raises(SchemaError) as refused:
        labelled.mutate("l-1", lambda prev: state, run_id="run-1")

    error = refused.value
    assert TOKEN not in str(error)
    assert TOKEN not in repr(error.args)
    assert TOKEN not in str(error.field)
    assert TOKEN not in error.reason
    if not (schema is LabelledStruct and "labels" in state):
        assert MASK in str(error)
    assert error.__context__ is None or TOKEN not in str(error.__context__)
    assert TOKEN not in caplog.text
    assert rt.log.last_seq == 0


class _Leaky(RuntimeError):
    """A handler's failure whose text holds a secret of the run."""

    def __init__(self) -> None:
        super().__init__(f"the service refused key {TOKEN}")


def _raises_leaky(*args: Any) -> None:
    raise _Leaky


def _write_to_leaky_handlers(
    rt: Runtime, caplog: pytest.LogCaptureFixture, run_id: str, max_attempts: int
) -> None:
    """Write one ticket of ``run_id`` to a subscriber, worker and trigger that leak.

    Every handler raises ``_Leaky``; the worker gets ``max_attempts`` tries.
    The secrets are those of ``run-1``; every log record is captured.
    """
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])
    rt.on_entity_changed("ticket", _raises_leaky, name="subscriber")
    rt.on_entity_changed(
        "ticket",
        _raises_leaky,
        work_queue("jobs", max_attempts=max_attempts, backoff=0),
    )
    rt.register_change_deriver("ticket", lambda c: ["ticket.any"])
    rt.on_trigger("ticket.any", _raises_leaky, name="trigger")

    with caplog.at_level(logging.DEBUG), rt:
        tickets.mutate("t-1", lambda prev: ticket(), run_id=run_id)
        rt.drain()


def test_failing_handlers_of_a_run_keep_its_secrets_out_of_logs_and_dead_letters(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    _write_to_leaky_handlers(rt, caplog, run_id="run-1", max_attempts=2)

    letters = rt.dead_letters()
    assert [letter.error for letter in letters] == [
        f"_Leaky: the service refused key {MASK}"
    ]
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(failures) == 5
    assert not any(r.exc_info for r in failures)
    assert all(MASK in r.getMessage() for r in failures)
    assert TOKEN not in caplog.text


def test_failing_handlers_without_a_run_still_log_their_tracebacks(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    _write_to_leaky_handlers(rt, caplog, run_id="run-2", max_attempts=1)

    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 3
    assert rt.dead_letters()[0].error == f"_Leaky: the service refused key {TOKEN}"


class _Pair(NamedTuple):
    name: str
    value: Any


PAYLOADS: list[tuple[str, Any, Any]] = [
    ("tuple", (f"k={TOKEN}", 1), (f"k={MASK}", 1)),
    ("nested tuple", {"t": (1, [TOKEN])}, {"t": (1, [MASK])}),
    ("named tuple", _Pair("key", TOKEN), _Pair("key", MASK)),
    ("set", {TOKEN, "plain"}, frozenset({MASK, "plain"})),
    ("frozenset", frozenset({(TOKEN, 1)}), frozenset({(MASK, 1)})),
    ("mapping proxy", MappingProxyType({"k": TOKEN}), {"k": MASK}),
    ("tuple key", {(TOKEN, 1): "v"}, {(MASK, 1): "v"}),
    ("bytes", f"Bearer {TOKEN}".encode(), f"Bearer {MASK}".encode()),
    ("bytearray", bytearray(TOKEN.encode()), MASK.encode()),
]


@pytest.mark.parametrize(
    ("payload", "masked"),
    [case[1:] for case in PAYLOADS],
    ids=[case[0] for case in PAYLOADS],
)
def test_payloads_of_a_run_are_masked_in_any_container(
    rt: Runtime, payload: Any, masked: Any
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])
    rt.register_change_deriver(
        "ticket", lambda c: ["ticket.any"], to_payload=lambda c: payload
    )
    seen: list[Any] = []
    rt.on_trigger("ticket.any", lambda e, p, c: seen.append(p))

    with rt:
        tickets.mutate("t-1", lambda prev: ticket(), run_id="run-1")
        tickets.mutate("t-2", lambda prev: ticket())
        rt.drain()

    assert seen == [masked, payload]
    assert type(seen[0]) is type(masked) or isinstance(masked, dict)
    assert TOKEN not in repr(seen[0])


def test_failing_derivers_and_payload_mappers_of_a_run_keep_its_secrets_out_of_logs(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    tickets = rt.define_entity("ticket", Ticket)
    rt.register_run_secrets("run-1", [TOKEN])

    def leaky_deriver(change: EntityChanged) -> list[str]:
        raise ValueError(f"cannot derive with {TOKEN}")

    def leaky_mapper(change: EntityChanged) -> Any:
        raise ValueError(f"cannot map with {TOKEN}")

    rt.register_change_deriver("ticket", leaky_deriver)
    rt.register_change_deriver("ticket", lambda c: ["ticket.seen"], leaky_mapper)

    with caplog.at_level(logging.DEBUG), rt:
        tickets.mutate("t-1", lambda prev: ticket(), run_id="run-1")
        rt.drain()

    errors = rt.metrics_registry.get_sample_value(
        "entity_runtime_deriver_errors_total", {"kind": "ticket"}
    )
    assert errors == 2
    assert TOKEN not in caplog.text
    assert "cannot derive with ***" in caplog.text
    assert "cannot map with ***" in caplog.text
