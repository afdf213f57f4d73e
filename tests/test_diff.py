from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from runtime import EntityChanged, ReadOnlyDict, diff_states, same_value
from runtime._diff import diff_change, diff_scalars

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
states = st.dictionaries(st.sampled_from("abcde"), json_values, max_size=5)


def test_create_lists_every_field_as_changed() -> None:
    delta, fields = diff_states(None, {"status": "open", "tags": ["a"]})

    assert delta == {"status": "open", "tags": ["a"]}
    assert fields == ("status", "tags")


def test_tombstone_lists_every_previous_field_with_an_empty_delta() -> None:
    delta, fields = diff_states({"status": "open", "tags": []}, None)

    assert delta == {}
    assert fields == ("status", "tags")


def test_unchanged_state_has_no_changed_fields() -> None:
    state = {"status": "open", "tags": ["a", {"k": [1, 2]}]}

    delta, fields = diff_states(state, {"status": "open", "tags": ["a", {"k": [1, 2]}]})

    assert delta == {}
    assert fields == ()


def test_nested_list_change_is_detected_by_value() -> None:
    prev = {"tags": ["a", ["b", "c"]], "n": 1}

    delta, fields = diff_states(prev, {"tags": ["a", ["b", "d"]], "n": 1})

    assert fields == ("tags",)
    assert delta == {"tags": ["a", ["b", "d"]]}


def test_nested_dict_change_is_detected_by_value() -> None:
    prev = {"meta": {"a": {"b": 1}}, "n": 1}

    delta, fields = diff_states(prev, {"meta": {"a": {"b": 2}}, "n": 1})

    assert fields == ("meta",)
    assert delta["meta"] == {"a": {"b": 2}}


def test_list_order_matters() -> None:
    _, fields = diff_states({"tags": ["a", "b"]}, {"tags": ["b", "a"]})

    assert fields == ("tags",)


def test_dict_key_order_does_not_matter() -> None:
    _, fields = diff_states({"m": {"a": 1, "b": 2}}, {"m": {"b": 2, "a": 1}})

    assert fields == ()


def test_values_that_serialise_differently_are_different() -> None:
    assert not same_value(True, 1)
    assert not same_value(1, 1.0)
    assert not same_value(0, False)
    assert not same_value([1], [True])
    assert same_value({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})


def test_field_dropped_from_the_next_state_maps_to_none() -> None:
    delta, fields = diff_states({"a": 1, "b": 2}, {"a": 1})

    assert fields == ("b",)
    assert delta == {"b": None}


def test_change_event_computes_delta_when_built_by_keyword() -> None:
    change = EntityChanged(
        kind="incident",
        id="inc-1",
        prev={"status": "open", "severity": "low"},
        next={"status": "closed", "severity": "low"},
    )

    assert change.delta == {"status": "closed"}
    assert change.changed_fields == ("status",)
    assert change.occurred_at.tzinfo is not None
    assert not change.is_create
    assert not change.is_tombstone


@given(states, states)
def test_diff_changed_fields_are_exactly_the_fields_that_differ(
    prev: dict[str, Any], nxt: dict[str, Any]
) -> None:
    delta, fields = diff_states(prev, nxt)

    expected = {
        k
        for k in set(prev) | set(nxt)
        if k not in prev or k not in nxt or not same_value(prev[k], nxt[k])
    }
    assert set(fields) == expected
    assert len(fields) == len(set(fields))
    for k in fields:
        assert same_value(delta[k], nxt.get(k))


@given(states)
def test_diff_of_a_state_with_its_copy_is_empty(state: dict[str, Any]) -> None:
    import copy

    assert diff_states(state, copy.deepcopy(state)) == ({}, ())


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-2, 2)
    | st.sampled_from([0.0, -0.0, 1.0, 2.5])
    | st.sampled_from(["", "a", "b"])
)
scalar_states = st.dictionaries(st.sampled_from("abcde"), scalars, max_size=5)


@given(st.none() | states, scalar_states)
def test_the_write_path_diffs_agree_with_diff_states(
    prev: dict[str, Any] | None, nxt: dict[str, Any]
) -> None:
    """diff_change, and diff_scalars for scalar states, give diff_states' answer."""
    expected = diff_states(prev, nxt)
    frozen = ReadOnlyDict(nxt)

    for diff in (diff_change, diff_scalars):
        delta, fields = diff(prev, frozen)

        assert type(delta) is ReadOnlyDict
        assert (dict(delta), fields) == expected
        assert [type(v) for v in delta.values()] == [
            type(v) for v in expected[0].values()
        ]
