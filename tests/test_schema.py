from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime import DefinitionError, ReadOnlyDict, SchemaError, compile_schema
from runtime._schema import StateSchema, _compile_record


@dataclass
class Check:
    name: str
    status: Literal["healthy", "degraded"]
    value: float
    count: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    history: list[int] = field(default_factory=list)
    note: str | None = None
    anything: Any = None


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


def _valid(**more: Any) -> dict[str, Any]:
    return {"name": "cpu", "status": "healthy", "value": 0.5, **more}


def test_defaults_are_filled_in_and_the_result_is_read_only() -> None:
    schema = compile_schema(Check)

    state = schema.validate(_valid(), "check", "c-1")

    assert state == {
        "name": "cpu",
        "status": "healthy",
        "value": 0.5,
        "count": 0,
        "labels": {},
        "history": [],
        "note": None,
        "anything": None,
    }
    assert isinstance(state, ReadOnlyDict)
    with pytest.raises(TypeError, match="read-only"):
        state["count"] = 2  # type: ignore[index]
    with pytest.raises(TypeError, match="read-only"):
        state["history"].append(1)


def test_validation_copies_so_later_changes_to_the_input_do_not_leak() -> None:
    schema = compile_schema(Check)
    raw = _valid(history=[1])

    state = schema.validate(raw, "check", "c-1")
    raw["history"].append(2)

    assert state["history"] == [1]


def test_ints_are_accepted_as_floats_and_stored_as_floats() -> None:
    state = compile_schema(Check).validate(_valid(value=3), "check", "c-1")

    assert state["value"] == 3.0
    assert type(state["value"]) is float


@pytest.mark.parametrize(
    ("state", "field", "reason"),
    [
        (_valid(status="on fire"), "status", "must be one of 'healthy', 'degraded'"),
        ({"name": "cpu", "status": "healthy"}, "value", "is missing"),
        (_valid(colour="red"), "colour", "is not in the schema"),
        (_valid(count=True), "count", "must be an integer"),
        (_valid(count=1.5), "count", "must be an integer"),
        (_valid(value="1"), "value", "must be a number"),
        (_valid(value=math.nan), "value", "must be a finite number"),
        (_valid(value=math.inf), "value", "must be a finite number"),
        (_valid(labels={"a": 1}), "labels.a", "must be a string"),
        (_valid(labels={1: "a"}), "labels", "key that is not a string"),
        (_valid(history=(1, 2)), "history", "must be a list"),
        (_valid(history=[1, "2"]), "history[1]", "must be an integer"),
        (_valid(anything=b"raw"), "anything", "JSON-compatible"),
        (_valid(anything={"x": {1, 2}}), "anything.x", "JSON-compatible"),
        (_valid(anything=[math.nan]), "anything[0]", "finite"),
        (_valid(anything={2: "x"}), "anything", "key that is not a string"),
        (_valid(anything=2**70), "anything", "64 bits"),
        (_valid(name="bad \udc80"), "name", "lone surrogates"),
    ],
)
def test_invalid_states_name_the_field_and_what_was_wrong(
    state: dict[str, Any], field: str, reason: str
) -> None:
    schema = compile_schema(Check)

    with pytest.raises(SchemaError) as caught:
        schema.validate(state, "check", "c-1")

    assert caught.value.field == field
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"check/c-1: field {field!r}")
    assert str(caught.value).endswith("nothing recorded")


def test_a_state_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"^check/c-1: must be a mapping, got \["):
        compile_schema(Check).validate(["cpu"], "check", "c-1")


def test_a_cycle_is_refused_not_looped_on() -> None:
    looped: dict[str, Any] = {}
    looped["self"] = looped

    with pytest.raises(SchemaError, match="deeper than"):
        compile_schema(Check).validate(_valid(anything=looped), "check", "c-1")


def test_enums_are_stored_by_value() -> None:
    @dataclass
    class Paint:
        colour: Colour

    schema = compile_schema(Paint)

    assert schema.validate({"colour": Colour.RED}, "paint", "p")["colour"] == "red"
    assert schema.validate({"colour": "blue"}, "paint", "p")["colour"] == "blue"
    with pytest.raises(SchemaError, match="must be one of 'red', 'blue'"):
        schema.validate({"colour": "green"}, "paint", "p")


def test_unsupported_annotations_are_refused_at_definition() -> None:
    @dataclass
    class Odd:
        when: bytes

    with pytest.raises(DefinitionError, match=r"Odd\.when: unsupported annotation"):
        compile_schema(Odd)


def test_a_schema_that_is_not_a_record_type_is_refused() -> None:
    with pytest.raises(DefinitionError, match="must be a dataclass"):
        compile_schema(dict)


class PydanticCheck(pydantic.BaseModel):
    name: str
    status: Literal["healthy", "degraded"]
    count: int = 0


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "has a field with an empty name (expected fields: name, status"),
        (1, "has a key 1 that is not a field name (expected fields: name, status"),
    ],
)
@pytest.mark.parametrize("spec", [Check, PydanticCheck])
def test_a_key_that_cannot_name_a_field_is_shown_in_the_error(
    spec: Any, key: Any, reason: str
) -> None:
    schema = compile_schema(spec)
    state = {"name": "cpu", "status": "healthy", key: 1}

    with pytest.raises(SchemaError) as caught:
        schema.validate(state, "check", "c-1")

    assert caught.value.field is None
    assert str(caught.value).startswith(f"check/c-1: {reason}")


def test_pydantic_models_validate_and_name_the_failing_field() -> None:
    schema = compile_schema(PydanticCheck)

    state = schema.validate({"name": "cpu", "status": "healthy"}, "check", "c")
    with pytest.raises(SchemaError) as caught:
        schema.validate({"name": "cpu", "status": "nope"}, "check", "c")
    with pytest.raises(SchemaError, match="'extra' is not in the schema"):
        schema.validate({"name": "a", "status": "healthy", "extra": 1}, "check", "c")

    assert state == {"name": "cpu", "status": "healthy", "count": 0}
    assert caught.value.field == "status"


class StructCheck(msgspec.Struct):
    name: str
    status: Literal["healthy", "degraded"]
    count: int = 0


def test_msgspec_structs_validate_and_name_the_failing_field() -> None:
    schema = compile_schema(StructCheck)

    state = schema.validate({"name": "cpu", "status": "healthy"}, "check", "c")
    with pytest.raises(SchemaError) as caught:
        schema.validate({"name": "cpu", "status": "healthy", "count": "1"}, "k", "c")

    assert state == {"name": "cpu", "status": "healthy", "count": 0}
    assert caught.value.field == "count"


def test_pydantic_schemas_are_strict_too() -> None:
    schema = compile_schema(PydanticCheck)

    with pytest.raises(SchemaError) as caught:
        schema.validate({"name": "cpu", "status": "healthy", "count": "5"}, "k", "c")

    assert caught.value.field == "count"


@dataclass
class Flat:
    name: str
    status: Literal["up", "down"]
    level: Literal[1, 2, True]
    value: float
    count: int
    on: bool
    note: Annotated[str, "doc"] | None
    gone: None
    extra: int = 7


_flat_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**65)
    | st.floats()
    | st.sampled_from(["up", "down", "x", "\u2603", "\ud800", 1, 2, 1.0])
    | st.lists(st.integers(), max_size=1)
)


_flat_valid = {
    "name": st.sampled_from(["cpu", "\u2603"]),
    "status": st.sampled_from(["up", "down"]),
    "level": st.sampled_from([1, 2, True]),
    "value": st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 3),
    "count": st.integers(-(2**63), 2**64 - 1),
    "on": st.booleans(),
    "note": st.none() | st.sampled_from(["", "a"]),
    "gone": st.none(),
}
_flat_inputs = (
    st.fixed_dictionaries(_flat_valid, optional={"extra": st.integers(0, 3)})
    | st.fixed_dictionaries(
        {k: v | _flat_values for k, v in _flat_valid.items()},
        optional={"extra": st.integers(0, 3) | _flat_values, "other": st.none()},
    )
    | st.dictionaries(st.sampled_from([*_flat_valid, "extra", "other"]), _flat_values)
)


@given(_flat_inputs)
def test_the_flat_fast_check_agrees_with_the_full_check(value: dict[str, Any]) -> None:
    """The generated check of a scalar dataclass accepts, returns and refuses
    exactly what the general dataclass check does."""
    schema = compile_schema(Flat)
    full = StateSchema(Flat, schema.fields, _compile_record(Flat))
    assert schema.flat

    try:
        expected: Any = full.validate(value, "k", "i")
    except SchemaError as err:
        expected = (err.field, err.reason, str(err))
    try:
        got: Any = schema.validate(value, "k", "i")
    except SchemaError as err:
        got = (err.field, err.reason, str(err))

    assert type(got) is type(expected)
    if isinstance(got, dict):
        # Same keys, values and types, in the schema's order.
        assert [(type(k), k, type(v), v) for k, v in got.items()] == [
            (type(k), k, type(v), v) for k, v in expected.items()
        ]
    else:
        assert got == expected


class _Key(enum.StrEnum):
    STATUS = "status"


class _LooksLikeValue:
    """A key that only compares equal to the field name ``value``."""

    def __hash__(self) -> int:
        return hash("value")

    def __eq__(self, other: object) -> bool:
        return other == "value" or isinstance(other, _LooksLikeValue)


def _flat_sample() -> dict[str, Any]:
    """A valid state of every ``Flat`` field, which the generated check takes."""
    return {
        "name": "cpu",
        "status": "up",
        "level": 1,
        "value": 1.0,
        "count": 3,
        "on": True,
        "note": None,
        "gone": None,
        "extra": 7,
    }


@pytest.mark.parametrize("flat", [True, False])
def test_keys_equal_to_field_names_are_stored_as_the_schemas_own_names(
    flat: bool,
) -> None:
    schema = compile_schema(Flat if flat else Check)
    given: dict[Any, Any] = _flat_sample() if flat else {"name": "cpu"}
    del given["name"]
    given.pop("status", None)
    given.pop("value", None)
    given = {
        _Key.STATUS: "down" if flat else "degraded",
        _LooksLikeValue(): 2.5,
        **given,
        "name": "cpu",
    }

    state = schema.validate(given, "check", "c-1")

    assert [type(k) for k in given][:2] == [_Key, _LooksLikeValue]
    assert all(type(k) is str for k in state)
    assert list(state) == list(schema.fields)
    assert (state["status"], state["value"]) == (given[_Key.STATUS], 2.5)


def test_a_dataclass_without_fields_is_a_schema_of_empty_states() -> None:
    @dataclass
    class Empty:
        pass

    schema = compile_schema(Empty)

    assert schema.validate({}, "marker", "m-1") == {}
    with pytest.raises(SchemaError, match="field 'x' is not in the schema"):
        schema.validate({"x": 1}, "marker", "m-1")


class _Renamed(msgspec.Struct, rename="camel"):
    foo_bar: int
    plain: int = 0


class _Aliased(pydantic.BaseModel):
    foo_bar: int = pydantic.Field(alias="fooBar")
    by_choice: int = pydantic.Field(0, validation_alias=pydantic.AliasChoices("a", "b"))
    plain: int = 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_Renamed, "_Renamed: fields 'foo_bar' are renamed"),
        (_Aliased, "_Aliased: fields 'foo_bar', 'by_choice' have an alias"),
    ],
)
def test_a_schema_whose_keys_are_not_its_field_names_is_refused(
    spec: Any, message: str
) -> None:
    with pytest.raises(DefinitionError, match=message):
        compile_schema(spec)


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("k" * 100_000, "field '" + "k" * 61 + "...' is not in the schema"),
        (_BadRepr(), "has a key <_BadRepr object> that is not a field name"),
        (("x" * 200,), "has a key ('" + "x" * 59 + "... that is not a field name"),
    ],
)
def test_an_unknown_key_is_shown_short_whatever_it_is(key: Any, shown: str) -> None:
    schema = compile_schema(Check)

    with pytest.raises(SchemaError) as caught:
        schema.validate({**_valid(), key: 1}, "check", "c-1")

    assert shown in str(caught.value)
    assert len(str(caught.value)) < 300


class _Tagged(msgspec.Struct, tag=True):
    x: int = 0


class _ArrayLike(msgspec.Struct, array_like=True):
    x: int = 0


class _OmitsDefaults(msgspec.Struct, omit_defaults=True):
    x: int = 0


class _Computed(pydantic.BaseModel):
    a: int

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def doubled(self) -> int:
        return self.a * 2


class _Excluded(pydantic.BaseModel):
    a: int
    secret: str = pydantic.Field("", exclude=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_Excluded, "_Excluded: fields 'secret' are excluded from the model's dump"),
        (_Tagged, "_Tagged: tag would store states"),
        (_ArrayLike, "_ArrayLike: array_like would store states"),
        (_OmitsDefaults, "_OmitsDefaults: omit_defaults would store states"),
        (_Computed, "_Computed: computed fields 'doubled' would be stored"),
    ],
)
def test_a_schema_that_would_store_other_keys_than_its_fields_is_refused(
    spec: Any, message: str
) -> None:
    with pytest.raises(DefinitionError, match=message):
        compile_schema(spec)
