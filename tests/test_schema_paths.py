"""Where a refused state is wrong: the field path and message of each refusal.

A valid value is built around one bad part planted at a known place, so the
path the schema must report is known before it is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitoring._incident import IncidentState
from runtime import SchemaError, compile_schema
from runtime._schema import MAX_DEPTH, _Invalid, check_json_value

Step = str | int


def _path(steps: list[Step], base: str = "") -> str:
    """The path a schema names: ``a.b`` for a key, ``a[2]`` for a list index."""
    path = base
    for step in steps:
        if isinstance(step, int):
            path = f"{path}[{step}]"
        else:
            path = f"{path}.{step}" if path else step
    return path


# Keys that look like paths themselves, or are empty, are still joined as they are.
_keys = st.one_of(
    st.sampled_from(["", "a", "a.b", "x[0]", "it's", "é", "k" * 80]),
    st.text(max_size=5),
)

_good_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4).filter(lambda s: s.isascii()),
)

_good_json = st.recursive(
    _good_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)
    ),
    max_leaves=10,
)

# A bad value and the reason its refusal gives.
_bad_leaves = st.sampled_from(
    [
        (math.nan, "must be a finite number, got nan"),
        (-math.inf, "must be a finite number, got -inf"),
        (2**64, "must fit in 64 bits, got 18446744073709551616"),
        (-(2**63) - 1, "must fit in 64 bits, got -9223372036854775809"),
        ((1, 2), "must be a JSON-compatible value, got (1, 2) (tuple)"),
        (b"x", "must be a JSON-compatible value, got b'x' (bytes)"),
        ({1}, "must be a JSON-compatible value, got {1} (set)"),
        ("a\ud800", "must be valid Unicode (no lone surrogates)"),
        ({1: "x"}, "has a key that is not a string: 1 (int)"),
        ({"ok": 1, None: 2}, "has a key that is not a string: None (NoneType)"),
    ]
)


@st.composite
def _planted(draw: st.DrawFn, bad: Any, max_steps: int = 6) -> tuple[Any, list[Step]]:
    """A valid JSON value holding ``bad`` at the returned steps, valid elsewhere."""
    value = bad
    steps: list[Step] = []
    for _ in range(draw(st.integers(0, max_steps))):
        if draw(st.booleans()):
            before = draw(st.lists(_good_json, max_size=2))
            after = draw(st.lists(_good_json, max_size=2))
            value = [*before, value, *after]
            steps.insert(0, len(before))
        else:
            key = draw(_keys)
            others = draw(st.dictionaries(_keys, _good_json, max_size=3))
            others.pop(key, None)
            # The bad part's key lands among the others, not always last.
            at = draw(st.integers(0, len(others)))
            items = list(others.items())
            value = dict([*items[:at], (key, value), *items[at:]])
            steps.insert(0, key)
    return value, steps


@dataclass
class _Doc:
    name: str
    extra: dict[str, Any] | None = None
    anything: Any = None


class _PydanticDoc(pydantic.BaseModel):
    name: str
    extra: dict[str, Any] | None = None
    anything: Any = None


class _MsgspecDoc(msgspec.Struct):
    name: str
    extra: dict[str, Any] | None = None
    anything: Any = None


def _refusal(spec: Any, state: Any) -> SchemaError:
    with pytest.raises(SchemaError) as caught:
        compile_schema(spec).validate(state, "doc", "d-1")
    return caught.value


@given(st.data(), _bad_leaves, st.sampled_from(["extra", "anything"]))
def test_a_bad_part_of_a_free_form_field_is_named_by_its_path(
    data: st.DataObject, bad: tuple[Any, str], where: str
) -> None:
    leaf, reason = bad
    value, steps = data.draw(_planted(leaf))
    if where == "extra" and not isinstance(value, dict):
        value, steps = {"k": value}, ["k", *steps]

    error = _refusal(_Doc, {"name": "n", where: value})

    assert error.field == _path(steps, where)
    assert error.reason == reason
    assert str(error) == f"doc/d-1: field {error.field!r} {reason}; nothing recorded"


@given(st.data(), st.sampled_from([(math.nan, "nan"), (math.inf, "inf")]))
@pytest.mark.parametrize("spec", [_PydanticDoc, _MsgspecDoc])
def test_a_bad_part_the_model_lets_through_is_named_by_its_path(
    spec: Any, data: st.DataObject, bad: tuple[float, str]
) -> None:
    leaf, shown = bad
    value, steps = data.draw(_planted(leaf))

    error = _refusal(spec, {"name": "n", "anything": value})

    assert error.field == _path(steps, "anything")
    assert error.reason == f"must be a finite number, got {shown}"


@given(_good_json, _good_json)
def test_valid_free_form_fields_come_back_equal(extra: Any, anything: Any) -> None:
    extra = {"k": extra}

    state = compile_schema(_Doc).validate(
        {"name": "n", "extra": extra, "anything": anything}, "doc", "d-1"
    )

    assert state == {"name": "n", "extra": extra, "anything": anything}


@given(st.data(), _bad_leaves, st.sampled_from(["", "x", "a.b"]), st.integers(0, 2))
def test_check_json_value_names_the_bad_part_below_the_path_it_is_given(
    data: st.DataObject, bad: tuple[Any, str], base: str, depth: int
) -> None:
    leaf, reason = bad
    value, steps = data.draw(_planted(leaf))

    with pytest.raises(_Invalid) as caught:
        check_json_value(value, base, depth)

    assert (caught.value.path, caught.value.reason) == (_path(steps, base), reason)


@pytest.mark.parametrize("shape", ["list", "dict"])
@pytest.mark.parametrize("levels", [MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 80])
def test_a_value_too_deep_is_refused_where_it_gets_too_deep(
    shape: str, levels: int
) -> None:
    value: Any = 1
    for _ in range(levels):
        value = [value] if shape == "list" else {"k": value}
    state = {"name": "n", "anything": value}

    # The field's value is one level down; a container at MAX_DEPTH is refused.
    allowed = MAX_DEPTH - 1
    if levels <= allowed:
        checked = compile_schema(_Doc).validate(state, "doc", "d-1")
        assert checked == {**state, "extra": None}
        return
    step: Step = 0 if shape == "list" else "k"
    error = _refusal(_Doc, state)
    assert error.field == _path([step] * allowed, "anything")
    assert error.reason == f"nests deeper than {MAX_DEPTH} levels (or is a cycle)"


@pytest.mark.parametrize("shape", ["list", "dict"])
def test_a_cycle_is_refused_where_it_gets_too_deep(shape: str) -> None:
    value: Any
    if shape == "list":
        value = []
        value.append(value)
        step: Step = 0
    else:
        value = {}
        value["self"] = value
        step = "self"

    error = _refusal(_Doc, {"name": "n", "extra": {"c": value}})

    # Each value of a dict[str, Any] starts one level down, like an Any field.
    assert error.field == _path(["c", *[step] * (MAX_DEPTH - 1)], "extra")
    assert error.reason == f"nests deeper than {MAX_DEPTH} levels (or is a cycle)"


# --- nested records -------------------------------------------------------------


@dataclass
class _Point:
    x: int
    label: str | None = None


@dataclass
class _Shape:
    name: str
    points: list[_Point]
    by_name: dict[str, _Point] = field(default_factory=dict)
    grid: list[list[_Point]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


_points = st.builds(
    lambda x, label: {"x": x, "label": label},
    st.integers(-5, 5),
    st.one_of(st.none(), st.text(max_size=3).filter(str.isascii)),
)


@st.composite
def _shape_with_a_bad_point(draw: st.DrawFn) -> tuple[dict[str, Any], list[Step]]:
    """A valid ``_Shape`` state and the steps to one of its points, to spoil."""
    state: dict[str, Any] = {
        "name": "s",
        "points": draw(st.lists(_points, max_size=3)),
        "by_name": draw(st.dictionaries(_keys, _points, max_size=3)),
        "grid": draw(st.lists(st.lists(_points, max_size=2), max_size=2)),
    }
    places: list[list[Step]] = [["points", i] for i in range(len(state["points"]))]
    places += [["by_name", key] for key in state["by_name"]]
    places += [
        ["grid", i, j] for i, row in enumerate(state["grid"]) for j in range(len(row))
    ]
    if not places:
        state["points"].append(draw(_points))
        places.append(["points", 0])
    return state, draw(st.sampled_from(places))


def _at(state: Any, steps: list[Step]) -> Any:
    for step in steps:
        state = state[step]
    return state


_FIELDS = "(expected fields: x, label)"


@given(
    _shape_with_a_bad_point(),
    st.sampled_from(["wrong type", "missing", "unknown", "long unknown", "not a name"]),
)
def test_a_bad_nested_record_is_named_by_its_path(
    planted: tuple[dict[str, Any], list[Step]], defect: str
) -> None:
    state, steps = planted
    point = _at(state, steps)
    if defect == "wrong type":
        point["x"] = "1"
        where, reason = _path([*steps, "x"]), "must be an integer, got '1' (str)"
    elif defect == "missing":
        del point["x"]
        where, reason = _path([*steps, "x"]), "is missing"
    elif defect == "unknown":
        point["y"] = 1
        where, reason = _path([*steps, "y"]), f"is not in the schema {_FIELDS}"
    elif defect == "long unknown":
        point["z" * 100] = 1
        cut = "z" * 61 + "..."
        where, reason = _path([*steps, cut]), f"is not in the schema {_FIELDS}"
    else:
        point[7] = 1
        where = _path(steps)
        reason = f"has a key 7 that is not a field name {_FIELDS}"

    error = _refusal(_Shape, state)

    assert (error.field, error.reason) == (where, reason)


@given(_shape_with_a_bad_point())
def test_valid_nested_records_come_back_with_their_defaults(
    planted: tuple[dict[str, Any], list[Step]],
) -> None:
    state, _ = planted

    checked = compile_schema(_Shape).validate(state, "shape", "s-1")

    assert checked == {**state, "tags": []}


@given(
    st.lists(st.text(max_size=3).filter(str.isascii), max_size=4),
    st.integers(0, 4),
    st.sampled_from(
        [(5, "5 (int)"), (None, "None (NoneType)"), (["a"], "['a'] (list)")]
    ),
)
def test_a_bad_item_of_a_list_of_strings_is_named_by_its_index(
    tags: list[str], index: int, bad: tuple[Any, str]
) -> None:
    index = min(index, len(tags))
    tags.insert(index, bad[0])
    state = {"status": "fixing", "severity": "minor", "system_ids": tags}

    error = _refusal(IncidentState, state)

    assert error.field == f"system_ids[{index}]"
    assert error.reason == f"must be a string, got {bad[1]}"
