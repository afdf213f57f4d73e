"""Pydantic fields whose values are not JSON are stored in their JSON form.

A datetime is stored as its ISO string, an IntEnum as its int, a tuple or a
set as a list, and that form, given back in a read-modify-write, is accepted
and stored unchanged. A value whose JSON form would not validate back to the
same value (a NaN that JSON mode makes null, bytes that are not UTF-8, a
tuple held by an ``Any`` field) is refused with a ``SchemaError`` naming the
field. Tests named ``test_guard_...`` hold before JSON forms existed as well:
states that were storable then are stored exactly as they were.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import os
import pathlib
import subprocess
import sys
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import pydantic
import pytest
from conftest import typed
from hypothesis import given
from hypothesis import strategies as st
from test_persistence_runtime import crash_image, make_runtime

from runtime import Runtime, SchemaError, _schema_pydantic, compile_schema, thaw
from runtime._schema import _Invalid, check_json_value
from runtime._schema_pydantic import _same_stored
from runtime.testing import FakeClock

# --- helpers -------------------------------------------------------------------


def _refused(rt: Runtime, kind: str, state: dict[str, Any]) -> SchemaError:
    """The refusal of writing ``state`` over ``e-1``, checked to record nothing."""
    handle = rt.handle(kind)
    before = (handle.get("e-1"), rt.log.last_seq, len(rt.log))

    with pytest.raises(SchemaError) as caught:
        handle.mutate("e-1", lambda prev: state)

    assert (handle.get("e-1"), rt.log.last_seq, len(rt.log)) == before
    return caught.value


class _Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class _Ratio(enum.Enum):
    HALF = 0.5
    ALL = 1.0


class _Point(pydantic.BaseModel):
    at: dt.datetime
    level: _Level = _Level.LOW


_PARIS = zoneinfo.ZoneInfo("Europe/Paris")
_UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")

# A field's annotation, a value written to it, and the JSON form it is stored as.
_JSON_FORMS: list[tuple[Any, Any, Any]] = [
    (
        dt.datetime,
        dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC),
        "2024-05-01T12:30:00Z",
    ),
    (dt.datetime, dt.datetime(2024, 5, 1, 12, 30, 0, 5), "2024-05-01T12:30:00.000005"),
    # A named zone is stored as its offset at that time.
    (dt.datetime, dt.datetime(2024, 1, 1, tzinfo=_PARIS), "2024-01-01T00:00:00+01:00"),
    (dt.date, dt.date(2024, 2, 29), "2024-02-29"),
    (dt.time, dt.time(23, 59, 1), "23:59:01"),
    (dt.timedelta, dt.timedelta(hours=1, microseconds=5), "PT1H0.000005S"),
    (uuid.UUID, _UUID, str(_UUID)),
    (
        decimal.Decimal,
        decimal.Decimal("1.100000000000000000001"),
        "1.100000000000000000001",
    ),
    (_Level, _Level.HIGH, 2),
    (_Ratio, _Ratio.HALF, 0.5),
    (tuple[int, str], (1, "a"), [1, "a"]),
    (tuple[dt.date, ...], (dt.date(2024, 1, 2),), ["2024-01-02"]),
    (set[str], {"b", "c", "a"}, ["a", "b", "c"]),
    (frozenset[int], frozenset({3, 1, 2}), [1, 2, 3]),
    (bytes, b"abc", "abc"),
    (pathlib.Path, pathlib.Path("/var/log"), "/var/log"),
    (dict[int, str], {1: "a", 20: "b"}, {"1": "a", "20": "b"}),
    (list[dt.date], [dt.date(2024, 1, 1)], ["2024-01-01"]),
    (dt.datetime | None, dt.datetime(2024, 1, 1), "2024-01-01T00:00:00"),
    (
        _Point,
        _Point(at=dt.datetime(2024, 1, 1), level=_Level.HIGH),
        {"at": "2024-01-01T00:00:00", "level": 2},
    ),
    (
        list[_Point],
        [{"at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}],
        [{"at": "2024-01-01T00:00:00Z", "level": 1}],
    ),
]


def _model(annotation: Any) -> type[pydantic.BaseModel]:
    """A model with ``value`` of ``annotation`` and a plain ``count``."""
    return pydantic.create_model("Holder", value=(annotation, None), count=(int, 0))


# --- stored in JSON form, read back and written back -----------------------------


@pytest.mark.parametrize(
    ("annotation", "value", "stored"),
    _JSON_FORMS,
    ids=[repr(annotation) for annotation, _, _ in _JSON_FORMS],
)
def test_a_field_is_stored_in_its_json_form_and_written_back(
    rt: Runtime, annotation: Any, value: Any, stored: Any
) -> None:
    holders = rt.define_entity("holder", _model(annotation))
    rt.start()

    first = holders.mutate("e-1", lambda prev: {"value": value})
    again = holders.mutate("e-1", lambda prev: {**prev, "count": prev["count"] + 1})

    assert typed(first) == typed({"value": stored, "count": 0})
    assert typed(again) == typed({"value": stored, "count": 1})
    assert typed(holders.get("e-1")) == typed(again)
    assert [row.field for row in holders.history("e-1")] == ["value", "count", "count"]


class _Stamped(pydantic.BaseModel):
    at: dt.datetime
    level: _Level = _Level.LOW
    pair: tuple[int, int] = (0, 0)
    tags: set[str] = set()
    points: list[_Point] = []
    count: int = 0


_STAMPED = {
    "at": dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
    "level": _Level.HIGH,
    "pair": (1, 2),
    "tags": {"web", "db"},
    "points": [_Point(at=dt.datetime(2024, 5, 2))],
}
_STAMPED_STORED = {
    "at": "2024-05-01T00:00:00Z",
    "level": 2,
    "pair": [1, 2],
    "tags": ["db", "web"],
    "points": [{"at": "2024-05-02T00:00:00", "level": 1}],
    "count": 0,
}


def test_python_values_may_be_mixed_with_stored_forms(rt: Runtime) -> None:
    # The stored level (an int) fails strict validation; the new datetime and
    # the new point are Python values that strict validation accepts.
    stamped = rt.define_entity("stamped", _Stamped)
    rt.start()
    stamped.mutate("e-1", lambda prev: _STAMPED)
    later = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)

    state = stamped.mutate(
        "e-1",
        lambda prev: {
            **prev,
            "at": later,
            "points": [*prev["points"], {"at": later, "level": _Level.HIGH}],
        },
    )

    assert typed(state) == typed(
        {
            **_STAMPED_STORED,
            "at": "2024-06-01T00:00:00Z",
            "points": [
                {"at": "2024-05-02T00:00:00", "level": 1},
                {"at": "2024-06-01T00:00:00Z", "level": 2},
            ],
        }
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"at": "yesterday"}, "at"),
        # A stored form is accepted only exactly as stored ("Z" for UTC).
        ({"at": "2024-05-01T00:00:00+00:00"}, "at"),
        ({"count": "5"}, "count"),
        ({"count": 1.0}, "count"),
        ({"level": 3}, "level"),
        ({"level": "2"}, "level"),
        ({"pair": [1, "2"]}, "pair"),
        # A set's stored form lists its items sorted.
        ({"tags": ["web", "db"]}, "tags"),
        ({"points": [{"at": "2024-05-02T00:00:00", "level": True}]}, "points.0.level"),
    ],
)
def test_a_value_that_is_not_the_stored_form_is_still_refused(
    rt: Runtime, change: dict[str, Any], field: str
) -> None:
    stamped = rt.define_entity("stamped", _Stamped)
    rt.start()
    first = stamped.mutate("e-1", lambda prev: _STAMPED)

    error = _refused(rt, "stamped", {**first, **change})

    assert error.field == field
    assert stamped.get("e-1") == _STAMPED_STORED


class _Scalars(pydantic.BaseModel):
    at: dt.datetime | None = None
    count: int = 0
    flag: bool = False
    level: float = 0.0


@pytest.mark.parametrize(
    ("change", "field"),
    [({"count": "5"}, "count"), ({"flag": 1}, "flag"), ({"level": "1.5"}, "level")],
)
def test_coercions_stay_refused_next_to_a_stored_datetime(
    rt: Runtime, change: dict[str, Any], field: str
) -> None:
    # The stored datetime string sends the state down the stored-form path,
    # where loose validation would coerce these.
    scalars = rt.define_entity("scalars", _Scalars)
    rt.start()
    first = scalars.mutate("e-1", lambda prev: {"at": dt.datetime(2024, 1, 1)})

    error = _refused(rt, "scalars", {**first, **change})

    assert error.field == field
    assert "as stored it would be" in error.reason


def test_guard_coercions_stay_refused_without_stored_forms(rt: Runtime) -> None:
    scalars = rt.define_entity("scalars", _Scalars)
    rt.start()
    scalars.mutate("e-1", lambda prev: {"count": 1})

    fields = [
        _refused(rt, "scalars", change).field
        for change in ({"count": "5"}, {"flag": 1}, {"level": "1.5"})
    ]

    assert fields == ["count", "flag", "level"]


class _FrozenStamp(pydantic.BaseModel):
    at: dt.datetime = pydantic.Field(frozen=True)
    count: int = 0


class _StrictStamp(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, frozen=True)
    at: dt.datetime
    level: _Level = _Level.LOW
    count: int = 0


@pytest.mark.parametrize("model", [_FrozenStamp, _StrictStamp])
def test_frozen_and_strict_models_store_and_take_back_json_forms(
    rt: Runtime, model: type[pydantic.BaseModel]
) -> None:
    stamps = rt.define_entity("stamp", model)
    rt.start()

    first = stamps.mutate("e-1", lambda prev: {"at": dt.datetime(2024, 1, 1)})
    again = stamps.mutate("e-1", lambda prev: {**prev, "count": 1})

    assert first["at"] == "2024-01-01T00:00:00"
    assert again == {**first, "count": 1}
    assert _refused(rt, "stamp", {**again, "count": "2"}).field == "count"


class _Drifting(pydantic.BaseModel):
    at: dt.datetime
    note: str = ""

    @pydantic.field_validator("at")
    @classmethod
    def _later(cls, at: dt.datetime) -> dt.datetime:
        # Each validation moves the time: a state given back would not keep it.
        return at + dt.timedelta(hours=1)


def test_a_json_form_that_validates_back_to_another_value_is_refused(
    rt: Runtime,
) -> None:
    drifting = rt.define_entity("drifting", _Drifting)
    rt.start()

    error = _refused(rt, "drifting", {"at": dt.datetime(2024, 1, 1), "note": "a"})

    assert error.field == "at"
    assert error.reason == (
        "would change when stored in JSON form: stored as '2024-01-01T01:00:00', "
        "it validates back as datetime.datetime(2024, 1, 1, 2, 0) (datetime), not "
        "datetime.datetime(2024, 1, 1, 1, 0) (datetime)"
    )
    assert drifting.get("e-1") is None


# --- what JSON mode would change is refused ---------------------------------------


class _Floats(pydantic.BaseModel):
    # Every state holds a datetime, so every state has a field in JSON form.
    at: dt.datetime = dt.datetime(2024, 1, 1)
    level: float = 0.0
    maybe: float | None = None
    many: tuple[float, ...] = ()
    point: _Point | None = None
    anything: Any = None


@pytest.mark.parametrize("config", ["null", "constants", "strings"])
@pytest.mark.parametrize(
    ("change", "field", "shown"),
    [
        ({"level": math.nan}, "level", "nan"),
        ({"maybe": math.inf}, "maybe", "inf"),
        ({"many": (1.0, -math.inf)}, "many[1]", "-inf"),
        ({"anything": [1, {"x": math.nan}]}, "anything[1].x", "nan"),
    ],
)
def test_a_non_finite_float_is_refused_never_stored_as_null(
    rt: Runtime,
    config: Literal["null", "constants", "strings"],
    change: dict[str, Any],
    field: str,
    shown: str,
) -> None:
    floats = rt.define_entity("floats", _with_inf_nan(config))
    rt.start()
    floats.mutate("e-1", lambda prev: {"level": 1.5})

    error = _refused(rt, "floats", change)

    assert error.field == field
    assert error.reason == f"must be a finite number, got {shown}"


def _with_inf_nan(
    setting: Literal["null", "constants", "strings"],
) -> type[pydantic.BaseModel]:
    """``_Floats`` with NaN and infinities in JSON mode given as ``setting``."""

    class Configured(_Floats):
        model_config = pydantic.ConfigDict(ser_json_inf_nan=setting)

    return Configured


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        # 2**64 does not fit, in JSON form or not.
        (
            {"many": (1.0, 2.0), "anything": [2**64]},
            "anything[0]",
            "must fit in 64 bits",
        ),
        (
            {"anything": (1, 2)},
            "anything",
            "must be a JSON-compatible value, got (1, 2)",
        ),
        ({"anything": {1: "a"}}, "anything", "has a key that is not a string: 1 (int)"),
        ({"anything": {"a"}}, "anything", "must be a JSON-compatible value, got {'a'}"),
        (
            {"anything": dt.date(2024, 1, 1)},
            "anything",
            "would change when stored in JSON form: stored as '2024-01-01', it "
            "validates back as '2024-01-01' (str), not datetime.date(2024, 1, 1)",
        ),
        ({"anything": _Level.LOW}, "anything", "would change when stored in JSON"),
        (
            {"anything": object()},
            "anything",
            "must be a JSON-compatible value, got <object object at",
        ),
    ],
)
def test_an_any_field_stores_only_json_values_as_they_are(
    rt: Runtime, change: dict[str, Any], field: str, reason: str
) -> None:
    # A field typed Any has no type to validate a JSON form back to.
    floats = rt.define_entity("floats", _Floats)
    rt.start()
    floats.mutate("e-1", lambda prev: {"anything": [1, "a"]})

    error = _refused(rt, "floats", change)

    assert error.field == field
    assert error.reason.startswith(reason)


class _Blob(pydantic.BaseModel):
    data: bytes = b""
    count: int = 0


def test_bytes_that_are_not_utf8_are_refused_with_a_clear_error(rt: Runtime) -> None:
    blobs = rt.define_entity("blob", _Blob)
    rt.start()
    blobs.mutate("e-1", lambda prev: {"data": b"ok"})

    error = _refused(rt, "blob", {"data": b"\xff\xfe"})

    assert error.field == "data"
    assert error.reason.startswith(
        "must be UTF-8 to be stored as text, got b'\\xff\\xfe' (bytes)"
    )
    assert error.__cause__ is None


class _Base64Blob(_Blob):
    model_config = pydantic.ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class _Base64OutOnly(_Blob):
    model_config = pydantic.ConfigDict(ser_json_bytes="base64")


def test_base64_bytes_are_stored_and_written_back(rt: Runtime) -> None:
    blobs = rt.define_entity("blob", _Base64Blob)
    rt.start()

    first = blobs.mutate("e-1", lambda prev: {"data": b"\xff\xfe"})
    again = blobs.mutate("e-1", lambda prev: {**prev, "count": 1})

    assert first == {"data": "__4=", "count": 0}
    assert again == {"data": "__4=", "count": 1}


def test_base64_bytes_that_would_read_back_as_their_text_are_refused(
    rt: Runtime,
) -> None:
    # Without val_json_bytes="base64" the stored text would validate back as
    # the bytes of the text itself.
    blobs = rt.define_entity("blob", _Base64OutOnly)
    rt.start()
    blobs.mutate("e-1", lambda prev: {"count": 1})

    error = _refused(rt, "blob", {"data": b"\xff"})

    assert error.field == "data"
    assert error.reason == (
        "would change when stored in JSON form: stored as '_w==', it validates "
        "back as b'_w==' (bytes), not b'\\xff' (bytes)"
    )


class _Durations(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(ser_json_timedelta="float")
    span: dt.timedelta = dt.timedelta()


def test_a_value_whose_json_form_loses_precision_is_refused(rt: Runtime) -> None:
    durations = rt.define_entity("durations", _Durations)
    rt.start()
    kept = durations.mutate("e-1", lambda prev: {"span": dt.timedelta(seconds=1.5)})

    error = _refused(
        rt, "durations", {"span": dt.timedelta(days=10**8, microseconds=1)}
    )

    assert kept == {"span": 1.5}
    assert error.field == "span"
    assert error.reason.startswith("would change when stored in JSON form")


# --- restore ----------------------------------------------------------------------


def test_json_forms_restore_from_a_snapshot_and_a_journal(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    rt = make_runtime(data_dir, clock)
    stamped = rt.define_entity("stamped", _Stamped)
    with rt:
        stamped.mutate("e-1", lambda prev: _STAMPED)
        rt.snapshot()
        stamped.mutate("e-2", lambda prev: {**_STAMPED, "count": 2})
        crashed = crash_image(data_dir, tmp_path / "crashed")

    again = make_runtime(crashed, clock)
    restored = again.define_entity("stamped", _Stamped)
    with again:
        states = [restored.get("e-1"), restored.get("e-2")]
        written = restored.mutate("e-2", lambda prev: {**prev, "count": 3})

    assert [typed(s) for s in states] == [
        typed(_STAMPED_STORED),
        typed({**_STAMPED_STORED, "count": 2}),
    ]
    assert typed(written) == typed({**_STAMPED_STORED, "count": 3})


class _Plain(pydantic.BaseModel):
    count: int = 0


class _PlainWithStamps(_Plain):
    since: dt.datetime = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    level: _Level = _Level.HIGH
    pair: tuple[int, int] = (1, 2)
    tags: frozenset[str] = frozenset({"b", "a"})
    first: _Point = _Point(at=dt.datetime(2023, 1, 1))
    seen: list[dt.date] = pydantic.Field(default_factory=lambda: [dt.date(2024, 1, 1)])


def test_defaults_filled_into_restored_states_are_in_json_form(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    rt = make_runtime(data_dir, clock)
    plain = rt.define_entity("plain", _Plain)
    with rt:
        plain.mutate("e-1", lambda prev: {"count": 1})

    again = make_runtime(data_dir, clock)
    stamped = again.define_entity("plain", _PlainWithStamps)
    with again:
        state = stamped.get("e-1")
        written = stamped.mutate("e-1", lambda prev: {**prev, "count": 2})

    filled = {
        "count": 1,
        "since": "2024-01-01T00:00:00Z",
        "level": 2,
        "pair": [1, 2],
        "tags": ["a", "b"],
        "first": {"at": "2023-01-01T00:00:00", "level": 1},
        "seen": ["2024-01-01"],
    }
    assert typed(state) == typed(filled)
    assert typed(written) == typed({**filled, "count": 2})


def test_guard_a_state_written_without_json_forms_restores_as_recorded(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    rt = make_runtime(data_dir, clock)
    scalars = rt.define_entity("scalars", _Scalars)
    with rt:
        written = scalars.mutate("e-1", lambda prev: {"count": 1})

    again = make_runtime(data_dir, clock)
    restored = again.define_entity("scalars", _Scalars)
    with again:
        state = restored.get("e-1")

    assert typed(written) == typed(
        {"at": None, "count": 1, "flag": False, "level": 0.0}
    )
    assert typed(state) == typed(written)


# --- states that needed no JSON form are stored as before ----------------------------


class _Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass
class _Spot:
    x: int
    label: str | None = None


class _Inner(pydantic.BaseModel):
    n: int
    tags: list[str] = []


class _Flat(pydantic.BaseModel):
    name: str
    count: int
    level: float = 0
    on: bool = False
    note: str | None = None


class _Shapes(pydantic.BaseModel):
    tags: list[str] = []
    labels: dict[str, int] = {}
    rows: list[dict[str, float]] = []
    inner: _Inner | None = None
    spots: list[_Spot] = []


class _Free(pydantic.BaseModel):
    anything: Any = None
    extra: dict[str, Any] | None = None
    level: Literal["low", "high"] = "low"
    color: _Color = _Color.RED


_text = st.text(max_size=4)
_ints = st.one_of(st.integers(-5, 5), st.integers(-(2**64), 2**65))
_floats = st.one_of(st.floats(), st.integers(-3, 3))
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), _ints, _floats, _text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)
    ),
    max_leaves=6,
)
_inner = st.fixed_dictionaries({"n": _ints}, optional={"tags": st.lists(_text)})
_spot = st.fixed_dictionaries({"x": _ints}, optional={"label": st.none() | _text})

_STATES: dict[type[pydantic.BaseModel], st.SearchStrategy[dict[str, Any]]] = {
    _Flat: st.fixed_dictionaries(
        {"name": _text, "count": _ints},
        optional={
            "level": _floats,
            "on": st.booleans() | st.just(1),
            "note": st.none() | _text | st.just(5),
        },
    ),
    _Shapes: st.fixed_dictionaries(
        {},
        optional={
            "tags": st.lists(_text, max_size=3),
            "labels": st.dictionaries(_text, _ints, max_size=3),
            "rows": st.lists(st.dictionaries(_text, _floats, max_size=2), max_size=2),
            "inner": st.none() | _inner | _inner.map(lambda d: _Inner(**d)),
            "spots": st.lists(_spot | _spot.map(lambda d: _Spot(**d)), max_size=2),
        },
    ),
    _Free: st.fixed_dictionaries(
        {},
        optional={
            "anything": _json | st.just((1, 2)) | st.just({1: 2}),
            "extra": st.none() | st.dictionaries(_text, _json, max_size=2),
            "level": st.sampled_from(["low", "high", "mid"]),
            "color": st.sampled_from([_Color.BLUE, "blue", "green"]),
        },
    ),
}


def _as_before(model: type[pydantic.BaseModel], state: dict[str, Any]) -> Any:
    """What a write of ``state`` stored before JSON forms, or None if refused.

    The check as it was: strict validation and a Python-mode dump, or a
    loosely validated dump that gives back exactly what was given.
    """
    try:
        try:
            dumped = model.model_validate(state, strict=True).model_dump()
        except pydantic.ValidationError:
            dumped = model.model_validate(state).model_dump()
            if not _same_stored(dumped, state):
                return None
        return check_json_value(dumped)
    except (pydantic.ValidationError, _Invalid):
        return None


def _now(model: type[pydantic.BaseModel], state: dict[str, Any]) -> Any:
    try:
        return compile_schema(model).validate(state, "kind", "e-1")
    except SchemaError:
        return None


@given(st.data(), st.sampled_from(sorted(_STATES, key=lambda m: m.__name__)))
def test_guard_states_storable_before_are_stored_exactly_as_before(
    data: st.DataObject, model: type[pydantic.BaseModel]
) -> None:
    state = data.draw(_STATES[model])

    before = _as_before(model, state)
    now = _now(model, state)

    if before is not None:
        assert now is not None
        assert typed(now) == typed(before)
        # A state read back is written back as before too.
        assert typed(_now(model, dict(now))) == typed(_as_before(model, dict(now)))


class _SometimesStamped(_Flat):
    at: dt.datetime | None = None


def test_a_model_that_stored_a_json_form_stores_other_states_as_before(
    rt: Runtime,
) -> None:
    # Once a state needed a JSON form, the model's states go field by field.
    stamped = rt.define_entity("stamped", _SometimesStamped)
    rt.start()
    stamped.mutate(
        "e-0", lambda prev: {"name": "a", "count": 0, "at": dt.datetime(2024, 1, 1)}
    )
    states: list[dict[str, Any]] = [
        {"name": "n", "count": 1, "level": 2},
        {"name": "n", "count": 2**64 - 1, "level": 0.5, "on": True, "note": None},
    ]

    written = [stamped.mutate(f"e-{i}", _setting(s)) for i, s in enumerate(states, 1)]

    assert [typed(w) for w in written] == [
        typed(_as_before(_SometimesStamped, s)) for s in states
    ]
    assert written[0]["level"] == 2
    assert type(written[0]["level"]) is float
    assert _refused(rt, "stamped", {"name": "n", "count": 2**64}).field == "count"


def _setting(state: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    return lambda prev: state


# --- msgspec already stores JSON forms ---------------------------------------------


class _StampedStruct(msgspec.Struct):
    at: dt.datetime
    level: _Level = _Level.LOW
    amount: decimal.Decimal = decimal.Decimal("0")
    data: bytes = b""
    count: int = 0


def test_guard_msgspec_structs_store_and_take_back_json_forms(rt: Runtime) -> None:
    stamped = rt.define_entity("stamped", _StampedStruct)
    rt.start()
    at = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)

    first = stamped.mutate(
        "e-1",
        lambda prev: {
            "at": at,
            "level": _Level.HIGH,
            "amount": decimal.Decimal("1.10"),
            "data": b"\xff",
        },
    )
    again = stamped.mutate("e-1", lambda prev: {**prev, "count": 1})

    stored = {
        "at": "2024-05-01T00:00:00Z",
        "level": 2,
        "amount": "1.10",
        "data": "/w==",
        "count": 0,
    }
    assert typed(first) == typed(stored)
    assert typed(again) == typed({**stored, "count": 1})
    assert _refused(rt, "stamped", {**again, "at": "yesterday"}).field == "at"


# --- sets of sets, many keys, unions, time zones ---------------------------------


class _Edges(pydantic.BaseModel):
    edges: set[frozenset[int]] = set()
    members: set[frozenset[int] | int] = set()
    count: int = 0


# Sets whose items a new set built from them (as the Python dump is) lists in
# another order than they do.
_EDGES = [
    {
        frozenset({8, -6, 13}),
        frozenset({5, 11, -19, 14, -9}),
        frozenset({0, -15}),
        frozenset({1, 3, 16, -15, -10}),
        frozenset(),
    },
    {
        frozenset({10, 2, -3}),
        frozenset({5, 6, 9, 12, -18}),
        frozenset({2, 5, 12, 14, -15}),
        frozenset({-16}),
        frozenset({-7}),
        frozenset(),
    },
]


@pytest.mark.parametrize("edges", _EDGES)
def test_a_set_of_sets_is_stored_sorted_and_written_back_unchanged(
    rt: Runtime, edges: set[frozenset[int]]
) -> None:
    handle = rt.define_entity("edges", _Edges)
    rt.start()

    first = handle.mutate("e-1", lambda prev: {"edges": edges})
    again = handle.mutate("e-1", lambda prev: {**prev, "count": 1})

    expected = sorted(sorted(items) for items in edges)
    assert typed(first["edges"]) == typed(expected)
    assert typed(again) == typed({"edges": expected, "members": [], "count": 1})
    assert [row.field for row in handle.history("e-1")] == [
        "edges",
        "members",
        "count",
        "count",
    ]


def _built_backwards(items: set[Any]) -> set[Any]:
    """The same set, its items added in the reverse order."""
    rebuilt: set[Any] = set()
    for item in reversed(list(items)):
        rebuilt.add(item)
    return rebuilt


@given(
    st.sets(st.frozensets(st.integers(-20, 20), max_size=5), max_size=10),
    st.sets(st.frozensets(st.integers(-3, 3), max_size=3) | st.integers(-5, 5)),
)
def test_sets_of_sets_are_stored_the_same_however_built(
    edges: set[frozenset[int]], members: set[frozenset[int] | int]
) -> None:
    schema = compile_schema(_Edges)
    state = {"edges": edges, "members": members}
    rebuilt = {name: _built_backwards(items) for name, items in state.items()}

    stored = thaw(schema.validate(state, "edges", "e-1"))
    again = thaw(schema.validate({**stored, "count": 1}, "edges", "e-1"))

    assert typed(thaw(schema.validate(rebuilt, "edges", "e-1"))) == typed(stored)
    assert typed(again) == typed({**stored, "count": 1})
    assert stored["edges"] == sorted(sorted(items) for items in edges)


def test_a_set_of_strings_is_stored_the_same_in_every_process(
    tmp_path: Path,
) -> None:
    # String hashes, and so a set's iteration order, differ between processes.
    script = tmp_path / "store.py"
    script.write_text(
        "import json, pydantic\n"
        "from runtime import compile_schema, thaw\n"
        "class M(pydantic.BaseModel):\n"
        "    v: set[frozenset[str]] = set()\n"
        "value = {frozenset(w) for w in ('ab', 'cd', 'ef', 'abc', 'x', 'yz')}\n"
        "print(json.dumps(thaw(compile_schema(M).validate({'v': value}, 'k', 'e'))))\n"
    )
    root = Path(__file__).resolve().parent.parent
    outputs = set()
    for seed in ("1", "2", "3"):
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)},
        )
        outputs.add(done.stdout)

    assert len(outputs) == 1
    assert json.loads(outputs.pop())["v"][0] == ["a", "b"]


class _Counts(pydantic.BaseModel):
    by_id: dict[int, int] = {}
    updated: dt.datetime | None = None


def test_int_keys_given_back_next_to_a_new_value_are_compared_once(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each key given back as a string is refused by strict validation; the
    # mapping they lead to is compared once, not once per key.
    schema = compile_schema(_Counts)
    stored = thaw(schema.validate({"by_id": {i: i for i in range(300)}}, "c", "e"))
    compared = [0]
    same_stored = _schema_pydantic._same_stored

    def counted(dumped: Any, given: Any) -> bool:
        compared[0] += 1
        return same_stored(dumped, given)

    monkeypatch.setattr(_schema_pydantic, "_same_stored", counted)

    state = schema.validate({**stored, "updated": dt.datetime(2024, 1, 1)}, "c", "e")

    assert thaw(state)["by_id"] == stored["by_id"]
    assert compared[0] < 5 * 300


class _InOrder(pydantic.BaseModel):
    at: dt.datetime
    color: _Color = _Color.RED
    code: int | str = pydantic.Field(0, union_mode="left_to_right")


@pytest.mark.parametrize(
    "stored_form", [{"at": "2024-01-01T00:00:00"}, {"color": "red"}]
)
def test_a_left_to_right_union_keeps_what_strict_validation_gives(
    rt: Runtime, stored_form: dict[str, Any]
) -> None:
    # Validated loosely (as the stored forms need), "007" would become 7.
    handle = rt.define_entity("in-order", _InOrder)
    rt.start()
    handle.mutate("e-1", lambda prev: {"at": dt.datetime(2024, 1, 1), "code": "7"})

    state = handle.mutate("e-1", lambda prev: {**prev, **stored_form, "code": "007"})

    assert typed(state["code"]) == typed("007")
    assert [(row.before, row.after) for row in handle.history("e-1", field="code")] == [
        (None, "7"),
        ("7", "007"),
    ]


@pytest.mark.parametrize(
    ("at", "stored"),
    [
        # The repeated hour of a DST change, either time, and the skipped hour.
        (dt.datetime(2021, 10, 31, 2, 30, tzinfo=_PARIS), "2021-10-31T02:30:00+02:00"),
        (
            dt.datetime(2021, 10, 31, 2, 30, fold=1, tzinfo=_PARIS),
            "2021-10-31T02:30:00+01:00",
        ),
        (dt.datetime(2021, 3, 28, 2, 30, tzinfo=_PARIS), "2021-03-28T02:30:00+01:00"),
    ],
)
def test_a_zoned_time_around_a_dst_change_is_stored_with_its_offset(
    rt: Runtime, at: dt.datetime, stored: str
) -> None:
    handle = rt.define_entity("point", _Point)
    rt.start()

    first = handle.mutate("e-1", lambda prev: {"at": at})
    again = handle.mutate("e-1", lambda prev: {**prev, "level": 2})

    assert first["at"] == stored
    assert again["at"] == stored


def test_a_time_whose_offset_would_change_shows_both_offsets(rt: Runtime) -> None:
    # Before 1911 Paris was 9 minutes 21 seconds ahead of UTC: the ISO form
    # keeps only the minutes.
    rt.define_entity("point", _Point)
    rt.start()

    error = _refused(rt, "point", {"at": dt.datetime(1900, 1, 1, tzinfo=_PARIS)})

    assert error.field == "at"
    assert error.reason.endswith(
        "it validates back as 1900-01-01T00:00:00+00:09 (datetime), "
        "not 1900-01-01T00:00:00+00:09:21 (datetime)"
    )


class _Sequences(pydantic.BaseModel):
    pair: tuple[int, ...] | list[int] = []
    numbers: set[int] | list[int] = []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"pair": (1, 2)},
            "must be a JSON-compatible value, got (1, 2) (tuple), and its JSON "
            "form [1, 2] would validate back as [1, 2] (list)",
        ),
        (
            {"numbers": {2, 1}},
            "must be a JSON-compatible value, got {1, 2} (set), and its JSON "
            "form [1, 2] would validate back as [1, 2] (list)",
        ),
    ],
)
def test_a_container_whose_json_form_comes_back_as_another_says_so(
    rt: Runtime, change: dict[str, Any], reason: str
) -> None:
    rt.define_entity("sequences", _Sequences)
    rt.start()

    error = _refused(rt, "sequences", change)

    assert (error.field, error.reason) == (next(iter(change)), reason)


class _NeedsDatetime(pydantic.BaseModel):
    at: dt.datetime

    @pydantic.field_validator("at", mode="before")
    @classmethod
    def _only_datetimes(cls, at: Any) -> Any:
        if not isinstance(at, dt.datetime):
            raise TypeError("give a datetime")
        return at


def test_a_validator_raising_on_the_json_form_names_the_field(rt: Runtime) -> None:
    rt.define_entity("needs", _NeedsDatetime)
    rt.start()

    error = _refused(rt, "needs", {"at": dt.datetime(2024, 1, 1)})

    assert error.field == "at"
    assert error.reason == (
        "could not be checked to validate back from its JSON form when stored "
        "(TypeError: give a datetime)"
    )
