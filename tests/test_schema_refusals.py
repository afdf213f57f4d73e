"""Bad input is refused with a clear error, never a hang or a raw exception.

Values that hold themselves, schemas whose nested records are keyed by other
names than their fields, keys that msgspec refuses without showing them, and
keys or values whose own ``__repr__``, ``__eq__`` or ``__hash__`` raise.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import pydantic
import pytest
from typing_extensions import TypedDict

from runtime import DefinitionError, Runtime, SchemaError, compile_schema
from runtime._persistence import (
    UnencodableValueError,
    _json_clean,
    _json_problem,
    decode_value,
    encode_value,
)
from runtime._schema import MAX_DEPTH, MAX_VALUES

# --- values that hold themselves ----------------------------------------------


def _list_holding_itself() -> list[Any]:
    looped: list[Any] = []
    looped.append(looped)
    return looped


def _dict_holding_itself() -> dict[str, Any]:
    looped: dict[str, Any] = {"n": 1}
    looped["self"] = looped
    return looped


def _cycle_deep_inside() -> dict[str, Any]:
    inner: list[Any] = [1, "two"]
    outer = {"rows": [[inner]], "ok": {"a": [1, 2]}}
    inner.append({"back": outer})
    return outer


def _cycle_after_many_levels() -> list[Any]:
    looped: list[Any] = []
    bottom = looped
    for _ in range(MAX_DEPTH * 2):
        below: list[Any] = []
        bottom.append(below)
        bottom = below
    bottom.append(looped)
    return looped


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("make", "where", "kind"),
    [
        (_list_holding_itself, "record[0]", "list"),
        (_dict_holding_itself, "record['self']", "dict"),
        (_cycle_deep_inside, "record['rows'][0][0][2]['back']", "dict"),
        (
            _cycle_after_many_levels,
            "record" + "[0]" * (MAX_DEPTH * 2 + 1),
            "list",
        ),
    ],
)
def test_encoding_a_value_that_holds_itself_is_refused_naming_where(
    make: Any, where: str, kind: str
) -> None:
    value = make()

    with pytest.raises(UnencodableValueError) as caught:
        encode_value(value, what="record")

    assert caught.value.where == where
    assert caught.value.reason.startswith(f"is a {kind} that holds itself (a cycle)")
    assert str(caught.value).endswith("; nothing written")


@pytest.mark.timeout(20)
def test_the_checks_behind_encoding_end_on_a_cycle() -> None:
    value = _dict_holding_itself()

    assert _json_clean(value) is False
    assert _json_problem(value) == (
        (None, "self"),
        "is a dict that holds itself (a cycle), which no encoding can represent",
    )


def test_a_value_shared_by_two_parents_is_not_a_cycle() -> None:
    shared = {"n": [1, 2]}
    value = {"a": shared, "b": [shared, shared]}

    assert decode_value(encode_value(value)) == value
    assert _json_problem(value) is None


@pytest.mark.parametrize("shape", ["list", "dict"])
def test_a_value_deeper_than_a_state_may_nest_is_still_encoded(shape: str) -> None:
    value: Any = "leaf"
    for _ in range(MAX_DEPTH * 3):
        value = [value] if shape == "list" else {"k": value}

    assert decode_value(encode_value(value)) == value


def test_a_value_too_deep_for_the_encoder_is_refused_not_raised() -> None:
    value: Any = 1
    for _ in range(5_000):
        value = [value]

    with pytest.raises(UnencodableValueError, match=r"^record: nests too deeply"):
        encode_value(value, what="record")


# --- nested records keyed by other names than their fields ---------------------


class _Renamed(msgspec.Struct, rename="camel"):
    foo_bar: int = 0


class _Plain(msgspec.Struct):
    inner: _Renamed | None = None


class _Tree(msgspec.Struct):
    children: list[_Tree] = []
    value: int = 0


@dataclass
class _Holder:
    renamed: dict[str, _Renamed]


class _Aliased(pydantic.BaseModel):
    foo_bar: int = pydantic.Field(0, alias="fooBar")


class _Middle(pydantic.BaseModel):
    deeper: list[_Aliased] = []


class _Node(pydantic.BaseModel):
    children: list[_Node] = []
    value: int = 0


@pydantic.dataclasses.dataclass
class _AliasedDataclass:
    x: int = pydantic.Field(0, alias="X")


_RENAMED = "holds _Renamed, whose fields 'foo_bar' are renamed"
_ALIASED = "holds _Aliased, whose fields 'foo_bar' have an alias"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([("inner", _Renamed)], rf"^Outer\.inner {_RENAMED}"),
        ([("n", int), ("many", list[_Renamed])], rf"^Outer\.many {_RENAMED}"),
        ([("by_key", dict[str, _Renamed])], rf"^Outer\.by_key {_RENAMED}"),
        ([("maybe", _Renamed | None)], rf"^Outer\.maybe {_RENAMED}"),
        ([("plain", _Plain)], rf"^Outer\.plain\.inner {_RENAMED}"),
        ([("held", _Holder)], rf"^Outer\.held\.renamed {_RENAMED}"),
    ],
)
def test_a_struct_holding_a_renamed_struct_is_refused_at_definition(
    fields: list[tuple[str, Any]], message: str
) -> None:
    outer = msgspec.defstruct("Outer", fields)

    with pytest.raises(DefinitionError, match=message) as caught:
        compile_schema(outer)

    assert str(caught.value).endswith("remove rename= from _Renamed")


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (_Aliased, rf"^Outer\.inner {_ALIASED}"),
        (list[_Aliased], rf"^Outer\.inner {_ALIASED}"),
        (dict[str, _Aliased] | None, rf"^Outer\.inner {_ALIASED}"),
        (_Middle, rf"^Outer\.inner\.deeper {_ALIASED}"),
        (
            _AliasedDataclass,
            r"^Outer\.inner holds _AliasedDataclass, whose fields 'x' have an alias",
        ),
    ],
)
def test_a_model_holding_an_aliased_model_is_refused_at_definition(
    annotation: Any, message: str
) -> None:
    outer = pydantic.create_model("Outer", inner=(annotation, ...))

    with pytest.raises(DefinitionError, match=message):
        compile_schema(outer)


@pytest.mark.parametrize("spec", [_Tree, _Node])
def test_records_that_hold_themselves_without_renames_still_compile(
    spec: Any,
) -> None:
    schema = compile_schema(spec)

    state = schema.validate({"children": [{"value": 2}]}, "tree", "t-1")

    assert state["children"][0]["value"] == 2


class _StrAndIntValues(enum.Enum):
    NAMED = "named"
    NUMBERED = 1


class _MixedEnumField(msgspec.Struct):
    level: _StrAndIntValues


class _UnresolvedName(msgspec.Struct):
    level: Missing  # type: ignore[name-defined]  # noqa: F821


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (_MixedEnumField, "Enums must contain either all str or all int values"),
        (_UnresolvedName, "name 'Missing' is not defined"),
    ],
)
def test_a_struct_msgspec_cannot_inspect_is_refused_at_definition(
    spec: Any, reason: str
) -> None:
    rt = Runtime()

    with pytest.raises(DefinitionError) as caught:
        rt.define_entity("k", spec)

    assert str(caught.value).startswith(
        f"{spec.__name__}: msgspec cannot use this Struct: "
    )
    assert reason in str(caught.value)
    assert rt.kinds() == []


# --- keys msgspec refuses --------------------------------------------------------


class _Level(enum.IntEnum):
    LOW = 1


class _Keyed(msgspec.Struct):
    counts: dict[str, int] = {}
    rows: list[dict[str, int]] = []
    nested: dict[str, dict[str, int]] = {}


@pytest.mark.parametrize(
    ("state", "field", "shown"),
    [
        ({"counts": {_Level.LOW: 1}}, "counts", "<_Level.LOW: 1> (_Level)"),
        ({"counts": {"a": 1, 7: 2}}, "counts", "7 (int)"),
        ({"counts": {None: 1}}, "counts", "None (NoneType)"),
        ({"rows": [{}, {2.5: 1}]}, "rows[1]", "2.5 (float)"),
        ({"nested": {"a": {}, "b": {(1,): 2}}}, "nested.b", "(1,) (tuple)"),
        (
            {"counts": {("x" * 200,): 1}},
            "counts",
            "('" + "x" * 55 + "... (tuple)",
        ),
    ],
)
def test_a_key_msgspec_refuses_is_shown_with_its_field(
    state: dict[str, Any], field: str, shown: str
) -> None:
    schema = compile_schema(_Keyed)

    with pytest.raises(SchemaError) as caught:
        schema.validate(state, "keyed", "k-1")

    assert caught.value.field == field
    assert caught.value.reason == f"has a key that is not a string: {shown}"


# --- keys and values whose own methods raise, through the write path -------------


class _ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


class _EqRaises(str):
    """Equal in hash to the str it was made from; comparing it raises."""

    __hash__ = str.__hash__

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq exploded")


class _StrRaises(str):
    def __str__(self) -> str:
        raise RuntimeError("str exploded")


class _HashRaises:
    def __hash__(self) -> int:
        raise RuntimeError("hash exploded")

    def __repr__(self) -> str:
        return "_HashRaises()"


@dataclass
class _Doc:
    n: int = 0
    labels: dict[str, Any] = field(default_factory=dict)
    anything: Any = None
    level: Literal["low", "high"] = "low"


@dataclass
class _Scalars:
    n: int = 0
    name: str = ""


class _DocModel(pydantic.BaseModel):
    n: int = 0
    labels: dict[str, Any] = {}
    anything: Any = None


class _DocStruct(msgspec.Struct):
    n: int = 0
    labels: dict[str, Any] = {}
    anything: Any = None


@pytest.mark.parametrize(
    ("schema", "state", "reason"),
    [
        (
            _Doc,
            {"labels": {_ReprRaises(): 1}},
            "field 'labels' has a key that is not a string: <_ReprRaises object>",
        ),
        (
            _Doc,
            {"anything": [_ReprRaises()]},
            "field 'anything[0]' must be a JSON-compatible value, got "
            "<_ReprRaises object>",
        ),
        (
            _Doc,
            {"level": _HashRaises()},
            "field 'level' must be one of 'low', 'high', got _HashRaises()",
        ),
        (
            _Doc,
            {_EqRaises("n"): 1},
            "has a key 'n' that cannot be compared with the field names "
            "(RuntimeError: eq exploded)",
        ),
        (
            _Scalars,
            {_EqRaises("n"): 1, "name": "x"},
            "has a key 'n' that cannot be compared with the field names "
            "(RuntimeError: eq exploded)",
        ),
        (
            _DocModel,
            {"labels": {"k": _ReprRaises()}},
            "field 'labels.k' must be a JSON-compatible value, got "
            "<_ReprRaises object>",
        ),
        (
            _DocModel,
            {_EqRaises("zzz"): 1},
            "has a key 'zzz' that cannot be compared with the field names",
        ),
        (
            _DocStruct,
            {"anything": {"k": _ReprRaises()}},
            "field 'anything' must be a JSON-compatible value (TypeError: "
            "Encoding objects of type _ReprRaises is unsupported)",
        ),
        (
            _DocStruct,
            {"labels": {_ReprRaises(): 1}},
            "field 'labels' has a key that is not a string: <_ReprRaises object>",
        ),
    ],
)
def test_a_state_whose_parts_raise_is_refused_and_nothing_recorded(
    rt: Runtime, schema: type, state: dict[str, Any], reason: str
) -> None:
    docs = rt.define_entity("doc", schema)
    rt.start()
    first = docs.mutate("d-1", lambda prev: {"n": 1})
    before = (docs.get("d-1"), rt.log.last_seq, len(rt.log))

    with pytest.raises(SchemaError) as caught:
        docs.mutate("d-1", lambda prev: state)

    assert str(caught.value).startswith(f"doc/d-1: {reason}")
    assert str(caught.value).endswith("; nothing recorded")
    assert (docs.get("d-1"), rt.log.last_seq, len(rt.log)) == before
    assert docs.get("d-1") == first


def test_a_schema_check_that_raises_is_reported_as_the_states_refusal(
    rt: Runtime,
) -> None:
    class Checked(pydantic.BaseModel):
        n: int = 0

        @pydantic.field_validator("n")
        @classmethod
        def _refuse_seven(cls, n: int) -> int:
            if n == 7:
                raise LookupError("seven is taken")
            return n

    checked = rt.define_entity("checked", Checked)
    rt.start()
    checked.mutate("c-1", lambda prev: {"n": 1})
    before = (checked.get("c-1"), rt.log.last_seq, len(rt.log))

    with pytest.raises(SchemaError) as caught:
        checked.mutate("c-1", lambda prev: {"n": 7})

    assert str(caught.value) == (
        "checked/c-1: could not be checked: LookupError: seven is taken; "
        "nothing recorded"
    )
    assert isinstance(caught.value.__cause__, LookupError)
    assert (checked.get("c-1"), rt.log.last_seq, len(rt.log)) == before


def _shared_rows(levels: int) -> list[Any]:
    """A list whose every level holds the level below twice: 2**levels leaves."""
    value: list[Any] = [1]
    for _ in range(levels):
        value = [value, value]
    return value


def test_a_free_form_value_expanding_past_the_value_limit_is_refused(
    rt: Runtime,
) -> None:
    # 2**40 leaves once copied: without a limit the check would run for days.
    docs = rt.define_entity("doc", _Doc)
    rt.start()
    docs.mutate("d-1", lambda prev: {"n": 1})
    before = (docs.get("d-1"), rt.log.last_seq, len(rt.log))

    with pytest.raises(SchemaError) as caught:
        docs.mutate("d-1", lambda prev: {"anything": _shared_rows(40)})

    assert caught.value.field == "anything"
    assert f"holds more than {MAX_VALUES:,} values in all" in str(caught.value)
    assert (docs.get("d-1"), rt.log.last_seq, len(rt.log)) == before


def test_the_value_limit_counts_every_list_item_and_mapping_entry() -> None:
    # 1,000 rows of 999 items, plus the 1,000 rows themselves: exactly the limit.
    row = list(range(MAX_VALUES // 1000 - 1))
    at_limit = [row] * 1000
    check = compile_schema(_Doc).validator

    state = check({"anything": at_limit}, "doc", "d-1")
    with pytest.raises(SchemaError) as caught:
        check({"anything": [*at_limit, 1]}, "doc", "d-1")

    assert len(state["anything"]) == 1000
    assert state["anything"][999] == row
    assert caught.value.field == "anything"


class _AliasedPoint(TypedDict):
    x: Annotated[int, pydantic.Field(alias="X")]


class _HoldsAliasedPoint(pydantic.BaseModel):
    origin: _AliasedPoint


class _SerializedItself(pydantic.BaseModel):
    a: int = 0

    @pydantic.model_serializer
    def _as_upper(self) -> dict[str, Any]:
        return {"A": self.a}


class _HoldsSerialized(pydantic.BaseModel):
    inner: list[_SerializedItself] = []


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            _HoldsAliasedPoint,
            "_HoldsAliasedPoint.origin holds _AliasedPoint, whose fields 'x' have "
            "an alias",
        ),
        (
            _HoldsSerialized,
            "_HoldsSerialized.inner holds _SerializedItself, whose model serializer "
            "decides the keys",
        ),
        (_SerializedItself, "_SerializedItself: a model serializer decides"),
    ],
)
def test_records_keyed_other_than_by_their_fields_are_refused_at_definition(
    model: type, message: str
) -> None:
    with pytest.raises(DefinitionError) as caught:
        compile_schema(model)

    assert str(caught.value).startswith(message)


class _Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass
class _Point:
    x: int = 0


class _Painted(pydantic.BaseModel):
    color: _Color = _Color.RED
    at: _Point = _Point()
    count: int = 0
    flag: bool = False
    shown: int = 0

    @pydantic.field_serializer("shown")
    def _as_text(self, shown: int) -> str:
        return str(shown)


def test_a_pydantic_state_read_back_can_be_written_back(rt: Runtime) -> None:
    # Stored forms fail pydantic's strict mode: an enum's value, a nested
    # dataclass as a mapping, a serializer's output.
    painted = rt.define_entity("painted", _Painted)
    rt.start()
    first = painted.mutate(
        "p-1", lambda prev: {"color": _Color.BLUE, "at": _Point(2), "shown": 7}
    )

    again = painted.mutate("p-1", lambda prev: dict(prev))

    stored = {"color": "blue", "at": {"x": 2}, "count": 0, "flag": False, "shown": "7"}
    assert first == stored
    assert again == first
    assert len(painted.history("p-1")) == len(first)


@pytest.mark.parametrize(
    ("given", "field"),
    [({"count": "5"}, "count"), ({"flag": 1}, "flag"), ({"color": "green"}, "color")],
)
def test_pydantic_still_refuses_what_loose_validation_would_coerce(
    rt: Runtime, given: dict[str, Any], field: str
) -> None:
    painted = rt.define_entity("painted", _Painted)
    rt.start()

    with pytest.raises(SchemaError) as caught:
        painted.mutate("p-1", lambda prev: given)

    assert caught.value.field == field
    assert painted.get("p-1") is None


class _Counts(pydantic.BaseModel):
    counts: list[int] = []


class _CountsStruct(msgspec.Struct):
    counts: list[int] = []


@pytest.mark.parametrize("schema", [_Counts, _CountsStruct])
def test_the_value_limit_leaves_typed_fields_of_library_schemas_alone(
    rt: Runtime, schema: type
) -> None:
    counts = rt.define_entity("counts", schema)
    rt.start()

    state = counts.mutate("c-1", lambda prev: {"counts": list(range(MAX_VALUES + 1))})

    assert len(state["counts"]) == MAX_VALUES + 1


@pytest.mark.skipif(
    "exclude_if" not in inspect.signature(pydantic.Field).parameters,
    reason="this pydantic has no exclude_if",
)
def test_a_pydantic_field_excluded_by_a_condition_is_refused() -> None:
    class Sometimes(pydantic.BaseModel):
        a: int = 0
        b: int | None = pydantic.Field(None, exclude_if=lambda v: v is None)

    with pytest.raises(DefinitionError, match="fields 'b' are excluded"):
        compile_schema(Sometimes)


class _Mixed(str, enum.Enum):  # noqa: UP042 (the mixin is the case tested)
    # str() of such a member is "_Mixed.BLUE", its characters are "blue".
    BLUE = "blue"


@pytest.mark.parametrize("schema", [_Doc, _DocModel])
def test_str_subclasses_are_stored_by_their_characters(
    rt: Runtime, schema: type
) -> None:
    docs = rt.define_entity("doc", schema)
    rt.start()

    state = docs.mutate(
        "d-1", lambda prev: {"labels": {"a": _Mixed.BLUE, "b": _StrRaises("v")}}
    )
    again = docs.mutate("d-1", lambda prev: dict(prev))

    assert state["labels"] == {"a": "blue", "b": "v"}
    assert all(type(v) is str for v in state["labels"].values())
    assert again == state


def test_a_scalar_str_field_stores_a_subclass_by_its_characters(rt: Runtime) -> None:
    scalars = rt.define_entity("scalars", _Scalars)
    rt.start()

    state = scalars.mutate("s-1", lambda prev: {"n": 2, "name": _StrRaises("v")})

    assert state["name"] == "v"
    assert type(state["name"]) is str


class _Gauge(pydantic.BaseModel):
    color: _Color = _Color.RED
    level: float = 0


def test_a_partial_pydantic_state_in_stored_form_is_completed_and_written_back(
    rt: Runtime,
) -> None:
    # The default 0 of a float field is stored as given (an int); validating
    # it loosely makes it 0.0, which is the same number.
    gauges = rt.define_entity("gauge", _Gauge)
    rt.start()

    first = gauges.mutate("g-1", lambda prev: {"color": "blue"})
    again = gauges.mutate("g-1", lambda prev: {**prev, "level": 2})

    assert first == {"color": "blue", "level": 0}
    assert again == {"color": "blue", "level": 2.0}
