"""msgspec Structs store a value that reads back as what was written.

A free-form slot (``Any``, ``object``, a bare ``list`` or ``dict``,
``list[Any]``, ``dict[str, Any]``, an ``Any`` in a nested Struct) holding a
value ``msgspec.to_builtins`` would turn into another one (a datetime, set,
tuple, Decimal, UUID, bytes, an enum member, a Struct) is refused with a
``SchemaError`` naming the field, as dataclass and pydantic schemas refuse it;
typed fields keep their builtin forms. Sets are stored sorted, so writing a
state back unchanged records nothing; tuples are stored as lists and keys
that are not strings as strings, both converting back. Tests named
``test_guard_...`` hold before these changes as well.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
from conftest import typed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_persistence_runtime import make_runtime

from runtime import Runtime, SchemaError, compile_schema, thaw
from runtime.testing import FakeClock

# --- helpers -------------------------------------------------------------------


def _seen(rt: Runtime, kind: str, entity_id: str = "e-1") -> Any:
    """What a refused write must leave as it was: state, history and log."""
    handle = rt.handle(kind)
    rows = [
        (r.seq, r.field, thaw(r.before), thaw(r.after))
        for r in handle.history(entity_id)
    ]
    return typed(handle.get(entity_id)), rows, rt.log.last_seq, len(rt.log)


def _refused(rt: Runtime, kind: str, state: dict[str, Any]) -> SchemaError:
    """The refusal of writing ``state`` over ``e-1``, checked to record nothing."""
    before = _seen(rt, kind)

    with pytest.raises(SchemaError) as caught:
        rt.handle(kind).mutate("e-1", lambda prev: state)

    assert _seen(rt, kind) == before
    return caught.value


def _write_first_doc(rt: Runtime) -> None:
    """Define the ``doc`` kind, start ``rt`` and write ``e-1``."""
    docs = rt.define_entity("doc", _Doc)
    rt.start()
    docs.mutate("e-1", lambda prev: {"count": 1})


def _written_back(rt: Runtime, kind: str, entity_id: str = "e-1") -> Any:
    """Write the state back unchanged; check that no change was recorded."""
    handle = rt.handle(kind)
    before = (len(handle.history(entity_id)), rt.log.last_seq)

    state = handle.mutate(entity_id, lambda prev: dict(prev))

    assert (len(handle.history(entity_id)), rt.log.last_seq) == before
    return state


class _Color(enum.Enum):
    RED = "red"


class _Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class _Size(enum.StrEnum):
    SMALL = "small"


class _Inner(msgspec.Struct):
    note: Any = None
    tags: set[str] = set()


@dataclasses.dataclass
class _Spot:
    x: int = 0


class _Doc(msgspec.Struct):
    count: int = 0
    anything: Any = None
    obj: object = None
    bare_list: list = []  # type: ignore[type-arg]
    bare_dict: dict = {}  # type: ignore[type-arg]
    items: list[Any] = []
    labels: dict[str, Any] = {}
    inner: _Inner = msgspec.field(default_factory=_Inner)
    inners: list[_Inner] = []
    maybe: list[Any] | None = None


@dataclasses.dataclass
class _DocDataclass:
    count: int = 0
    anything: Any = None
    items: list[Any] = dataclasses.field(default_factory=list)


_AT = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
_UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


# --- free-form slots holding values msgspec would change -------------------------


@pytest.mark.parametrize(
    ("state", "field", "kind"),
    [
        ({"anything": _AT}, "anything", "datetime"),
        ({"anything": dt.date(2024, 5, 1)}, "anything", "date"),
        ({"anything": frozenset({1})}, "anything", "frozenset"),
        ({"anything": _Level.HIGH}, "anything", "_Level"),
        ({"anything": _Inner()}, "anything", "_Inner"),
        ({"anything": _Spot()}, "anything", "_Spot"),
        ({"obj": {"a", "b"}}, "obj", "set"),
        ({"bare_dict": {"x": decimal.Decimal("1.5")}}, "bare_dict.x", "Decimal"),
        ({"items": [1, _UUID]}, "items[1]", "UUID"),
        ({"labels": {"raw": b"\x00"}}, "labels.raw", "bytes"),
        (
            {"inner": {"note": {"when": [dt.date(2024, 1, 1)]}}},
            "inner.note.when[0]",
            "date",
        ),
        ({"inners": [{}, {"note": _Color.RED}]}, "inners[1].note", "_Color"),
        ({"inner": _Inner(note=_AT)}, "inner.note", "datetime"),
        ({"maybe": [dt.time(1, 2)]}, "maybe[0]", "time"),
    ],
)
def test_a_free_form_slot_holding_a_value_msgspec_would_change_is_refused(
    rt: Runtime, state: dict[str, Any], field: str, kind: str
) -> None:
    docs = rt.define_entity("doc", _Doc)
    rt.start()
    docs.mutate("e-1", lambda prev: {"count": 1, "anything": {"a": [1, "x"]}})

    error = _refused(rt, "doc", state)

    assert error.field == field
    assert error.reason.startswith("must be a JSON-compatible value, got ")
    assert error.reason.endswith(f"({kind})")
    assert thaw(docs.get("e-1"))["anything"] == {"a": [1, "x"]}


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"anything": {"k": (1,)}}, "anything.k"),
        ({"bare_list": [1, (2, 3)]}, "bare_list[1]"),
    ],
)
def test_guard_a_tuple_in_a_free_form_slot_is_refused(
    rt: Runtime, state: dict[str, Any], field: str
) -> None:
    _write_first_doc(rt)

    error = _refused(rt, "doc", state)

    assert error.field == field
    assert error.reason.startswith("must be a JSON-compatible value, got (")
    assert error.reason.endswith("(tuple)")


def test_the_refusal_is_the_one_a_dataclass_schema_gives(rt: Runtime) -> None:
    structs = rt.define_entity("struct", _Doc)
    dataclasses_ = rt.define_entity("dataclass", _DocDataclass)
    rt.start()
    structs.mutate("e-1", lambda prev: {"count": 1})
    dataclasses_.mutate("e-1", lambda prev: {"count": 1})

    for state in ({"anything": {"when": [_AT]}}, {"items": [1, {2, 3}]}):
        by_struct = _refused(rt, "struct", state)
        by_dataclass = _refused(rt, "dataclass", state)

        assert (by_struct.field, by_struct.reason) == (
            by_dataclass.field,
            by_dataclass.reason,
        )


def test_guard_json_values_in_free_form_slots_are_stored_as_given(
    rt: Runtime,
) -> None:
    docs = rt.define_entity("doc", _Doc)
    rt.start()
    state = {
        "count": 2,
        "anything": {"b": [1, 2.5, None, True], "a": {"deep": "x"}},
        "obj": [1, "two"],
        "bare_list": [{"k": 1}],
        "bare_dict": {"z": 1, "a": 2},
        "items": [1, "x", [None]],
        "labels": {"z": {"y": 1}, "a": []},
        "inner": {"note": {"n": 1}},
        "inners": [{"note": [1]}],
        "maybe": None,
    }

    written = docs.mutate("e-1", lambda prev: state)
    again = _written_back(rt, "doc")

    expected = {**state, "inner": {"note": {"n": 1}, "tags": []}}
    expected["inners"] = [{"note": [1], "tags": []}]
    assert typed(written) == typed(expected)
    # The user's key order is kept, not sorted.
    assert list(written["anything"]) == ["b", "a"]
    assert list(written["labels"]) == ["z", "a"]
    assert typed(again) == typed(written)


def test_guard_a_str_enum_member_in_a_free_form_slot_is_stored_as_its_string(
    rt: Runtime,
) -> None:
    docs = rt.define_entity("doc", _Doc)
    rt.start()

    written = docs.mutate("e-1", lambda prev: {"anything": _Size.SMALL})

    assert type(written["anything"]) is str
    assert written["anything"] == "small"


class _Stamped(msgspec.Struct):
    at: dt.datetime
    day: dt.date = dt.date(2024, 1, 1)
    level: _Level = _Level.LOW
    size: _Size = _Size.SMALL
    amount: decimal.Decimal = decimal.Decimal("0")
    ident: uuid.UUID = _UUID
    data: bytes = b""
    span: dt.timedelta = dt.timedelta(0)


_STAMPED_STORED = {
    "at": "2024-05-01T12:30:00Z",
    "day": "2024-01-01",
    "level": 2,
    "size": "small",
    "amount": "1.10",
    "ident": "12345678-1234-5678-1234-567812345678",
    "data": "/w==",
    "span": "PT1S",
}


def test_guard_typed_fields_keep_their_builtin_forms(rt: Runtime) -> None:
    stamped = rt.define_entity("stamped", _Stamped)
    rt.start()

    written = stamped.mutate(
        "e-1",
        lambda prev: {
            "at": _AT,
            "level": _Level.HIGH,
            "amount": decimal.Decimal("1.10"),
            "data": b"\xff",
            "span": dt.timedelta(seconds=1),
        },
    )
    again = _written_back(rt, "stamped")

    assert typed(written) == typed(_STAMPED_STORED)
    assert typed(again) == typed(_STAMPED_STORED)


# --- the value limit ---------------------------------------------------------------


def _shared_rows(levels: int) -> list[Any]:
    """A list whose every level holds the level below twice: 2**levels leaves."""
    value: list[Any] = [1]
    for _ in range(levels):
        value = [value, value]
    return value


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"anything": _shared_rows(20)}, "anything"),
        ({"items": [0, _shared_rows(20)]}, "items[1]"),
        ({"inner": {"note": {"rows": _shared_rows(20)}}}, "inner.note"),
    ],
)
def test_a_free_form_value_past_the_value_limit_is_refused(
    rt: Runtime, state: dict[str, Any], field: str
) -> None:
    _write_first_doc(rt)

    error = _refused(rt, "doc", state)

    assert error.field == field
    assert error.reason == "holds more than 1,000,000 values in all"


def test_guard_each_item_of_a_list_of_free_form_values_has_its_own_limit(
    rt: Runtime,
) -> None:
    # As for a dataclass: 786,430 values each, 1,572,860 in all.
    structs = rt.define_entity("struct", _Doc)
    dataclasses_ = rt.define_entity("dataclass", _DocDataclass)
    rt.start()
    rows = _shared_rows(18)

    by_struct = structs.mutate("e-1", lambda prev: {"items": [rows, rows]})
    by_dataclass = dataclasses_.mutate("e-1", lambda prev: {"items": [rows, rows]})

    assert len(by_struct["items"]) == len(by_dataclass["items"]) == 2


# --- sets --------------------------------------------------------------------------


class _Frozen(msgspec.Struct, frozen=True):
    x: int


class _Tagged(msgspec.Struct):
    tags: set[str] = set()
    ids: frozenset[int] = frozenset()
    by_name: dict[str, set[str]] = {}
    groups: list[frozenset[str]] = []
    inner: _Inner = msgspec.field(default_factory=_Inner)
    mixed: set[int | str] = set()
    points: set[_Frozen] = set()
    maybe: set[str] | None = None


_NAMES = [f"tag-{i:02}" for i in range(20)]


def test_sets_are_stored_sorted(rt: Runtime) -> None:
    tagged = rt.define_entity("tagged", _Tagged)
    rt.start()
    names = set(_NAMES)

    written = tagged.mutate(
        "e-1",
        lambda prev: {
            "tags": names,
            "ids": frozenset({40, 3, 17, -5}),
            "by_name": {"b": names, "a": {"y", "x"}},
            "groups": [frozenset(names), frozenset()],
            "inner": {"tags": names},
            "maybe": names,
        },
    )

    assert written["tags"] == _NAMES
    assert written["ids"] == [-5, 3, 17, 40]
    assert thaw(written["by_name"]) == {"b": _NAMES, "a": ["x", "y"]}
    assert thaw(written["groups"]) == [_NAMES, []]
    assert written["inner"]["tags"] == _NAMES
    assert written["maybe"] == _NAMES


def test_sets_whose_items_cannot_be_compared_are_stored_in_a_fixed_order(
    rt: Runtime,
) -> None:
    tagged = rt.define_entity("tagged", _Tagged)
    rt.start()
    mixed = {"d", 3, "b", 1, "c", 2, "a"}

    first = tagged.mutate(
        "e-1", lambda prev: {"mixed": mixed, "points": {_Frozen(2), _Frozen(1)}}
    )
    # The same sets, given as lists in another order.
    second = tagged.mutate(
        "e-2",
        lambda prev: {
            "mixed": ["a", 2, "c", 1, "b", 3, "d"],
            "points": [{"x": 1}, {"x": 2}],
        },
    )

    assert first["mixed"] == [1, 2, 3, "a", "b", "c", "d"]
    assert thaw(first["points"]) == [{"x": 1}, {"x": 2}]
    assert typed(second) == typed(first)


def test_a_set_written_back_unchanged_records_no_change(rt: Runtime) -> None:
    tagged = rt.define_entity("tagged", _Tagged)
    rt.start()
    # 7 and 15 want the same slot of a small set's table: each new set built
    # from the other's items lists them the other way round. (Strings move
    # between processes too: their hashes are randomised.)
    written = tagged.mutate(
        "e-1",
        lambda prev: {"ids": [7, 15], "groups": [["x", "y"]], "mixed": [15, "a", 7]},
    )
    again = _written_back(rt, "tagged")
    once_more = _written_back(rt, "tagged")

    assert written["ids"] == [7, 15]
    assert thaw(written["mixed"]) == [7, 15, "a"]
    assert typed(again) == typed(once_more) == typed(written)


@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(names=st.lists(st.text(max_size=6), unique=True, max_size=25), data=st.data())
def test_any_set_of_strings_is_stored_sorted_and_written_back_unchanged(
    rt: Runtime, names: list[str], data: st.DataObject
) -> None:
    if "tagged" not in rt.kinds():
        rt.define_entity("tagged", _Tagged)
        rt.start()
    tagged = rt.handle("tagged")
    # Built in a random order, as an apply might build it.
    order = data.draw(st.permutations(names))
    tags: set[str] = set()
    for name in order:
        tags.add(name)

    written = tagged.mutate("e-1", lambda prev: {"tags": tags})
    again = _written_back(rt, "tagged")

    assert written["tags"] == sorted(names)
    assert again["tags"] == sorted(names)


# --- tuples and keys that are not strings --------------------------------------------


class _Pair(NamedTuple):
    left: int
    right: set[str]


class _Shaped(msgspec.Struct):
    pair: tuple[int, str] = (0, "")
    row: tuple[int, ...] = ()
    rows: list[tuple[int, int]] = []
    named: _Pair | None = None
    by_id: dict[int, str] = {}
    by_uuid: dict[uuid.UUID, int] = {}
    by_level: dict[_Level, float] = {}
    rates: dict[float, str] = {}
    by_either: dict[int | str, int] = {}


_SHAPED = {
    "pair": (1, "a"),
    "row": (3, 1, 2),
    "rows": [(1, 2), (3, 4)],
    "named": _Pair(7, {"b", "a"}),
    "by_id": {2: "two", 1: "one"},
    "by_uuid": {_UUID: 1},
    "by_level": {_Level.HIGH: 0.5},
    "rates": {1.5: "x", -2.0: "y"},
    "by_either": {1: 1, "a": 2},
}

_SHAPED_STORED = {
    "pair": [1, "a"],
    "row": [3, 1, 2],
    "rows": [[1, 2], [3, 4]],
    "named": [7, ["a", "b"]],
    "by_id": {"2": "two", "1": "one"},
    "by_uuid": {str(_UUID): 1},
    "by_level": {"2": 0.5},
    "rates": {"1.5": "x", "-2.0": "y"},
    "by_either": {"1": 1, "a": 2},
}


def test_tuples_are_stored_as_lists_and_keys_as_strings(rt: Runtime) -> None:
    shaped = rt.define_entity("shaped", _Shaped)
    rt.start()

    written = shaped.mutate("e-1", lambda prev: _SHAPED)
    again = _written_back(rt, "shaped")
    # The stored form, given as a new state, is stored as it is.
    given_stored = shaped.mutate("e-2", lambda prev: _SHAPED_STORED)

    assert typed(written) == typed(_SHAPED_STORED)
    assert typed(again) == typed(_SHAPED_STORED)
    assert typed(given_stored) == typed(_SHAPED_STORED)


@pytest.mark.parametrize(
    "state",
    [
        {"by_either": {1: 1, "1": 2}},
        {"rates": {float("nan"): "a", float("-nan"): "b"}},
    ],
)
def test_keys_that_would_be_stored_as_one_string_are_refused(
    rt: Runtime, state: dict[str, Any]
) -> None:
    shaped = rt.define_entity("shaped", _Shaped)
    rt.start()
    shaped.mutate("e-1", lambda prev: {"by_id": {1: "one"}})

    error = _refused(rt, "shaped", state)

    assert error.field == next(iter(state))
    assert error.reason.startswith("has keys that would be stored as the same string")


class _Keyed(msgspec.Struct):
    by_id: dict[int, str] = {}


def test_a_key_of_the_wrong_type_is_refused_naming_its_field(rt: Runtime) -> None:
    keyed = rt.define_entity("keyed", _Keyed)
    rt.start()
    keyed.mutate("e-1", lambda prev: {})

    error = _refused(rt, "keyed", {"by_id": {"one": "x"}})

    assert error.field == "by_id"


# --- restore -----------------------------------------------------------------------


class _Everything(msgspec.Struct):
    count: int = 0
    tags: set[str] = set()
    mixed: set[int | str] = set()
    pair: tuple[int, str] = (0, "")
    by_id: dict[int, str] = {}
    at: dt.datetime | None = None
    anything: Any = None
    inner: _Inner = msgspec.field(default_factory=_Inner)


def _everything(n: int) -> dict[str, Any]:
    return {
        "count": n,
        "tags": set(_NAMES),
        "mixed": {"b", 2, "a", 1},
        "pair": (n, "x"),
        "by_id": {n: "n", 1: "one"},
        "at": _AT,
        "anything": {"z": [1, {"y": None}], "a": "first"},
        "inner": {"note": [n], "tags": {"q", "p"}},
    }


def _everything_stored(n: int) -> dict[str, Any]:
    return {
        "count": n,
        "tags": _NAMES,
        "mixed": [1, 2, "a", "b"],
        "pair": [n, "x"],
        "by_id": {str(n): "n", "1": "one"},
        "at": "2024-05-01T12:30:00Z",
        "anything": {"z": [1, {"y": None}], "a": "first"},
        "inner": {"note": [n], "tags": ["p", "q"]},
    }


def _observed(rt: Runtime) -> Any:
    handle = rt.handle("all")
    ids = sorted(handle.ids())
    states = {i: typed(handle.get(i)) for i in ids}
    rows = {
        i: [
            (r.seq, r.field, typed(r.before), typed(r.after)) for r in handle.history(i)
        ]
        for i in ids
    }
    return states, rows, rt.log.last_seq


def test_states_restore_from_a_data_dir_as_they_were_stored(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    rt = make_runtime(data_dir, clock)
    every = rt.define_entity("all", _Everything)
    with rt:
        every.mutate("e-1", lambda prev: _everything(1))
        rt.snapshot()
        every.mutate("e-2", lambda prev: _everything(2))
        every.mutate("e-1", lambda prev: {**prev, "count": 10})
        before = _observed(rt)

    again = make_runtime(data_dir, clock)
    again.define_entity("all", _Everything)
    with again:
        after = _observed(again)
        for entity_id in ("e-1", "e-2"):
            _written_back(again, "all", entity_id)
        rewritten = _observed(again)

    assert after == before
    assert rewritten == before
    assert before[0]["e-2"] == typed(_everything_stored(2))
    assert before[0]["e-1"] == typed({**_everything_stored(1), "count": 10})


def test_defaults_filled_into_restored_states_are_stored_forms(
    tmp_path: Path, clock: FakeClock
) -> None:
    class Before(msgspec.Struct):
        count: int = 0

    class After(msgspec.Struct):
        count: int = 0
        tags: frozenset[str] = frozenset(_NAMES)
        pair: tuple[int, int] = (1, 2)
        by_id: dict[int, str] = msgspec.field(default_factory=lambda: {3: "c"})

    data_dir = tmp_path / "data"
    rt = make_runtime(data_dir, clock)
    rt.define_entity("all", Before)
    with rt:
        rt.handle("all").mutate("e-1", lambda prev: {"count": 1})

    again = make_runtime(data_dir, clock)
    grown = again.define_entity("all", After)
    with again:
        state = grown.get("e-1")
        written = grown.mutate("e-1", lambda prev: {**prev, "count": 2})

    filled = {"count": 1, "tags": _NAMES, "pair": [1, 2], "by_id": {"3": "c"}}
    assert typed(state) == typed(filled)
    assert typed(written) == typed({**filled, "count": 2})


# --- the compiled checks -------------------------------------------------------------


class _Tree(msgspec.Struct):
    children: list[_Tree] = []
    data: Any = None
    seen: set[str] = set()


def test_a_struct_that_holds_itself_is_checked_and_sorted_at_every_level() -> None:
    schema = compile_schema(_Tree)
    deep = {"children": [{"children": [{"data": {"x": 1}, "seen": {"b", "a"}}]}]}

    state = schema.validate(deep, "tree", "t-1")

    assert thaw(state)["children"][0]["children"][0] == {
        "children": [],
        "data": {"x": 1},
        "seen": ["a", "b"],
    }
    with pytest.raises(SchemaError) as caught:
        schema.validate(
            {"children": [{}, {"children": [{"data": {1}}]}]}, "tree", "t-1"
        )
    assert caught.value.field == "children[1].children[0].data"


def test_guard_a_struct_without_free_form_set_or_tuple_fields_stores_as_before(
    rt: Runtime,
) -> None:
    class Plain(msgspec.Struct):
        count: int
        name: str
        ratio: float = 0.0
        names: list[str] = []
        scores: dict[str, int] = {}

    plain = rt.define_entity("plain", Plain)
    rt.start()
    state = {"count": 1, "name": "n", "names": ["b", "a"], "scores": {"z": 1, "a": 2}}

    written = plain.mutate("e-1", lambda prev: state)
    _written_back(rt, "plain")

    assert typed(written) == typed({**state, "ratio": 0.0})
    assert list(written["scores"]) == ["z", "a"]
    assert _refused(rt, "plain", {**state, "count": "1"}).field == "count"
