"""Pydantic models as state schemas.

:func:`_compile_pydantic` refuses a model whose states could not be stored as
they are given (aliased, computed or excluded fields, a model serializer) and
checks each state with the model in strict mode. A state as stored (an enum's
value, a datetime's ISO string) is accepted where strict validation refuses
it, and a field whose dump is not JSON-compatible is stored in its JSON form
when that validates back to the same value. Pydantic itself is imported only
inside the functions that use it.
"""

from __future__ import annotations

import dataclasses
import datetime
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from runtime._errors import DefinitionError
from runtime._events import ReadOnlyDict
from runtime._schema import (
    _CONTAINERS,
    _NOWHERE,
    MAX_DEPTH,
    StateSchema,
    _check_fields,
    _check_float,
    _check_int,
    _check_str,
    _describe,
    _Invalid,
    _plain_str,
    _raised,
    _shown,
    _step,
    _stored_check,
    _stored_order,
    check_json_value,
)


def _aliased_fields(fields: Mapping[str, Any]) -> list[str]:
    return [
        name
        for name, info in fields.items()
        if any(
            alias is not None and alias != name
            for alias in (info.alias, info.validation_alias, info.serialization_alias)
        )
    ]


def _named_classes(annotation: Any) -> Iterator[type]:
    """The classes an annotation names, inside unions, containers and Annotated."""
    if typing.get_origin(annotation) is None:
        if isinstance(annotation, type):
            yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _named_classes(arg)


def _refuse_nested_aliases(model: Any) -> None:
    """Refuse a model with aliased fields anywhere inside ``model``'s fields.

    A field holding such a model (alone, in a list, a mapping or a union)
    would take its values under the aliases and store them under the field
    names, so a state read back could not be written again.
    """
    seen = {model}
    pending: list[tuple[str, Any]] = [
        (name, info.annotation) for name, info in model.model_fields.items()
    ]
    # Appending while iterating: each field is visited once, in order.
    for path, annotation in pending:
        for cls in _named_classes(annotation):
            if cls in seen:
                continue
            seen.add(cls)
            # Models and pydantic dataclasses list their fields with aliases;
            # plain dataclasses have none but may hold models.
            fields = getattr(cls, "__pydantic_fields__", None)
            if isinstance(fields, dict):
                hints = {name: info.annotation for name, info in fields.items()}
            elif dataclasses.is_dataclass(cls):
                fields, hints = {}, _dataclass_hints(cls)
            elif _is_typeddict(cls):
                # A TypedDict gives its aliases in Annotated[..., Field(...)].
                hints = _dataclass_hints(cls)
                fields = _annotated_field_infos(cls)
            else:
                continue
            decorators = getattr(cls, "__pydantic_decorators__", None)
            if decorators is not None and decorators.model_serializers:
                raise DefinitionError(
                    f"{model.__name__}.{path} holds {cls.__name__}, whose model "
                    "serializer decides the keys it is stored under; nested "
                    "records are keyed by field names like states; remove it"
                )
            aliased = _aliased_fields(fields)
            if aliased:
                raise DefinitionError(
                    f"{model.__name__}.{path} holds {cls.__name__}, whose fields "
                    f"{', '.join(map(repr, aliased))} have an alias; nested "
                    "records are keyed by field names like states, so this field "
                    "could not be written under them; remove the aliases from "
                    f"{cls.__name__}"
                )
            pending.extend((f"{path}.{name}", hint) for name, hint in hints.items())


def _is_typeddict(cls: type) -> bool:
    import typing_extensions

    return typing.is_typeddict(cls) or typing_extensions.is_typeddict(cls)


def _annotated_field_infos(cls: type) -> dict[str, Any]:
    """The pydantic ``Field`` infos a TypedDict's ``Annotated`` hints carry."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:
        return {}
    found = {}
    for name, hint in hints.items():
        for extra in getattr(hint, "__metadata__", ()):
            if all(hasattr(extra, a) for a in ("alias", "validation_alias")):
                found[name] = extra
    return found


def _dataclass_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        # Unresolvable names: pydantic reports them when it builds the model.
        return {}


def _compile_pydantic(model: Any) -> StateSchema:
    from pydantic import ValidationError

    names = tuple(model.model_fields)
    aliased = _aliased_fields(model.model_fields)
    if aliased:
        raise DefinitionError(
            f"{model.__name__}: fields {', '.join(map(repr, aliased))} have an alias; "
            "states are keyed by field names, so such a schema could accept no "
            "state; remove the aliases"
        )
    computed = list(getattr(model, "model_computed_fields", {}))
    if computed:
        raise DefinitionError(
            f"{model.__name__}: computed fields {', '.join(map(repr, computed))} "
            "would be stored in the state and then refused as unknown keys on the "
            "next write; compute them from the state when reading instead"
        )
    if model.__pydantic_decorators__.model_serializers:
        raise DefinitionError(
            f"{model.__name__}: a model serializer decides what a state holds; "
            "states are exactly the model's fields; remove it"
        )
    excluded = [
        name
        for name, info in model.model_fields.items()
        if info.exclude or getattr(info, "exclude_if", None) is not None
    ]
    if excluded:
        raise DefinitionError(
            f"{model.__name__}: fields {', '.join(map(repr, excluded))} are excluded "
            "from the model's dump, so no stored state would hold them and the "
            "next write from it would lack them; remove exclude="
        )
    _refuse_nested_aliases(model)

    # Set once a state of this model was stored with a JSON form; see
    # _converted.
    converts = [False]
    in_order = _has_left_to_right_union(model)

    # Known limit: pydantic copies an Any field's value in model_dump before
    # MAX_VALUES is counted, so shared nested lists there (2**40 leaves from
    # 40 levels) still take exponential time. msgspec values are counted
    # before to_builtins copies them.
    def check(value: Any) -> ReadOnlyDict:
        _check_fields(value, names)
        given = dict(value)
        try:
            built = model.model_validate(given, strict=True)
        except ValidationError as err:
            # A state as stored (an enum's value, a datetime's ISO string, a
            # nested dataclass as a mapping, a serializer's output) fails
            # strict validation; it is accepted when each part strict
            # validation refused is what validating loosely stores there.
            return _stored_form(model, given, err, converts, in_order)
        # _pydantic_stored, inline: a call less on every write.
        dumped = built.model_dump(mode="python")
        if not converts[0]:
            try:
                return check_json_value(dumped)  # type: ignore[no-any-return]
            except _Invalid:
                pass
        return _converted(model, built, dumped, converts)

    def defaults(value: Mapping[str, Any], missing: list[str]) -> dict[str, Any]:
        # Built as a write would store them: nested models dumped, serializers
        # applied, factories given the other fields, JSON forms where needed.
        built = model.model_construct(**value)
        return _pydantic_stored(model, built, converts, set(missing), verify=False)

    def required(name: str) -> bool:
        return bool(model.model_fields[name].is_required())

    stored = _stored_check(names, required, defaults)
    return StateSchema(model, names, check, stored=stored)


def _pydantic_stored(
    model: Any,
    built: Any,
    converts: list[bool],
    include: set[str] | None = None,
    verify: bool = True,
) -> ReadOnlyDict:
    """The state stored for the validated model instance ``built``.

    A field is stored as its Python-mode dump when that is JSON-compatible,
    so states that need no conversion are stored as they always were (JSON
    mode would turn an int default of a float field into a float, and apply
    serializers meant only for JSON output); any other field in its JSON
    form, see :func:`_converted`. ``include`` limits the state to those
    fields.
    """
    dumped = built.model_dump(mode="python", include=include)
    if not converts[0]:
        try:
            return check_json_value(dumped)  # type: ignore[no-any-return]
        except _Invalid:
            pass
    return _converted(model, built, dumped, converts, verify)


def _converted(
    model: Any,
    built: Any,
    dumped: dict[str, Any],
    converts: list[bool],
    verify: bool = True,
) -> ReadOnlyDict:
    """The state with the fields whose ``dumped`` value is not JSON in JSON form.

    A field's JSON form (a datetime's ISO string, a list for a tuple) is
    refused (``_Invalid`` naming the part) when it would hide a value no
    state may hold (NaN, which JSON mode makes null), when pydantic has
    none (bytes that are not UTF-8), or, if ``verify``, when it would not
    validate back to the same value (a tuple held by an ``Any`` field would
    come back as a list). ``converts[0]`` is set once a field was converted:
    from then on the model's states come here first, field by field, which
    gives the same state as checking them whole but spares the refusal a
    state with a datetime meets there (its message is built around the
    value's repr).
    """
    out: dict[str, Any] = {}
    failed: list[str] = []
    for name, value in dumped.items():
        if type(value) in _JSON_SCALARS or isinstance(value, str | dict | list):
            try:
                out[name] = check_json_value(value, name, 1)
                continue
            except _Invalid:
                pass
        # NaN and infinities become null in JSON mode; a 65-bit int or a lone
        # surrogate would stay: refused with the reason a state that needs no
        # JSON form gets.
        _refuse_unstorable(value, name)
        failed.append(name)
    if not failed:
        return ReadOnlyDict(out)

    in_json = _json_dump(built, failed, dumped)
    for name in failed:
        form = _sorted_sets(dumped[name], in_json[name])
        out[name] = check_json_value(form, name, 1)
    state = ReadOnlyDict({name: out[name] for name in dumped})
    if verify:
        _refuse_changed(model, built, dumped, state, failed)
    converts[0] = True
    return state


def _refuse_changed(
    model: Any,
    built: Any,
    dumped: dict[str, Any],
    state: ReadOnlyDict,
    failed: list[str],
) -> None:
    """Raise ``_Invalid`` if a ``failed`` field of ``state`` validates back changed.

    Validated loosely, as a state given back would be, each must give its
    ``dumped`` value again.
    """
    from pydantic import ValidationError

    try:
        back = _validated_again(model, built, state, failed)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc = first.get("loc", ())
        reached = _reached(state, loc)
        stored_as = "" if reached is _NOWHERE else f" as {_shown(reached, 60)}"
        refused = _Invalid(
            _field_of(loc),
            f"would not validate back when stored{stored_as} "
            f"({first.get('msg', str(err))})",
        )
        for key in reversed(loc[1:]):
            refused.at(_step(key))
        raise refused from None
    for name in failed:
        steps = _difference(dumped[name], back[name])
        if steps is not None:
            raise _changed(name, steps, dumped[name], back[name], state[name])


def _validated_again(
    model: Any, built: Any, state: ReadOnlyDict, failed: list[str]
) -> dict[str, Any]:
    """The Python dump of the ``failed`` fields validated from ``state``.

    Each is assigned to a copy of ``built`` with validation, which runs that
    field's validators and the model's, not every field's again (a long
    list next to a datetime would double the cost of each write). A frozen
    field cannot be assigned: the whole state is validated then.
    """
    from pydantic import ValidationError

    again = built.model_copy()
    validator = model.__pydantic_validator__
    name = failed[0]
    try:
        for name in failed:
            validator.validate_assignment(again, name, state[name], strict=False)
    except ValidationError as err:
        if err.errors()[0].get("type") != "frozen_field":
            raise
        try:
            again = model.model_validate(state, strict=False)
        except ValidationError:
            raise
        except Exception as raised:
            where = failed[0] if len(failed) == 1 else ""
            raise _not_checked_back(where, raised) from raised
    except Exception as raised:
        # A validator that takes only the Python value (a datetime) raised
        # when given its JSON form.
        raise _not_checked_back(name, raised) from raised
    dumped: dict[str, Any] = again.model_dump(mode="python", include=set(failed))
    return dumped


def _not_checked_back(name: str, raised: Exception) -> _Invalid:
    return _Invalid(
        name,
        "could not be checked to validate back from its JSON form when stored "
        f"({_raised(raised)})",
    )


_JSON_SCALARS = frozenset((int, float, bool, type(None)))


def _refuse_unstorable(value: Any, path: str) -> None:
    """Raise ``_Invalid`` for a part of a dumped field that no form could store.

    That is a non-finite float, an int beyond 64 bits, a string with a lone
    surrogate, or nesting deeper than ``MAX_DEPTH``; other objects, tuples,
    sets and non-string keys are left to the field's JSON form.
    """
    try:
        _unstorable(value, 1)
    except _Invalid as err:
        err.base = path
        raise


def _unstorable(value: Any, depth: int) -> None:
    kind = type(value)
    if isinstance(value, str):
        _check_str(_plain_str(value))
    elif kind is int:
        _check_int(value)
    elif kind is float:
        _check_float(value)
    elif isinstance(value, _CONTAINERS):
        if depth >= MAX_DEPTH:
            raise _Invalid("", f"nests deeper than {MAX_DEPTH} levels (or is a cycle)")
        for key, item in _parts(value):
            if isinstance(key, str):
                _check_str(key)
            try:
                _unstorable(item, depth + 1)
            except _Invalid as err:
                err.at(_step(key))
                raise


def _parts(value: Any) -> Iterable[tuple[Any, Any]]:
    """The keys (or positions) and items of a dumped container."""
    return value.items() if isinstance(value, dict) else enumerate(value)


def _json_dump(built: Any, failed: list[str], dumped: dict[str, Any]) -> Any:
    """The JSON-mode dump of the ``failed`` fields of ``built``.

    Raises ``_Invalid`` naming the part pydantic has no JSON form for.
    """
    try:
        return built.model_dump(mode="json", include=set(failed))
    except Exception:
        pass

    # Which field and part: dumped one field at a time, then part by part.
    for name in failed:
        try:
            built.model_dump(mode="json", include={name})
        except Exception as err:
            found = _without_json_form(dumped[name])
            if found is None:
                raise _Invalid(name, f"has no JSON form ({_raised(err)})") from err
            found.base = name
            raise found from None
    raise _Invalid("", "has no JSON form")


def _without_json_form(value: Any) -> _Invalid | None:
    """The error for the first part of ``value`` pydantic cannot turn into JSON."""
    from pydantic_core import to_jsonable_python

    if isinstance(value, _CONTAINERS):
        for key, item in _parts(value):
            found = _without_json_form(item)
            if found is not None:
                return found.at(_step(key))
        return None
    try:
        to_jsonable_python(value)
    except Exception as err:
        if isinstance(value, bytes | bytearray) and isinstance(err, UnicodeError):
            return _Invalid(
                "",
                f"must be UTF-8 to be stored as text, got {_describe(value)} (a "
                "model with ser_json_bytes='base64' and val_json_bytes='base64' "
                "stores any bytes)",
            )
        return _Invalid(
            "",
            f"must be a JSON-compatible value, got {_describe(value)}, and has "
            f"no JSON form ({_raised(err)})",
        )
    return None


def _sorted_sets(dumped: Any, in_json: Any) -> Any:
    """``in_json`` with the lists that hold sets in ``dumped`` sorted.

    A set's JSON form lists its items in iteration order, which depends on
    how the set was built (and on string hashes, which differ between
    processes); sorted, the same set is always stored the same way, so a
    stored form given back dumps to itself.
    """
    if isinstance(dumped, set | frozenset) and isinstance(in_json, list):
        return _shaped(_shape(dumped), in_json)
    if isinstance(dumped, dict) and isinstance(in_json, dict):
        if len(dumped) != len(in_json):
            return in_json
        return {
            key: _sorted_sets(a, b)
            for a, (key, b) in zip(dumped.values(), in_json.items(), strict=True)
        }
    if isinstance(dumped, list | tuple) and isinstance(in_json, list):
        if len(dumped) != len(in_json):
            return in_json
        return [_sorted_sets(a, b) for a, b in zip(dumped, in_json, strict=True)]
    return in_json


# Where a dumped value holds sets, as a tree of tuples: a set's items need
# not iterate in the order its JSON form lists them (the dump builds a new
# set), so its items cannot be paired with theirs; what is kept of them is
# the distinct shapes of its items, matched to each listed item by form.
# Shapes are ordered tuples (never sets) so that the choice among several
# is the same in every process.
_LEAF = ("leaf",)


def _shape(value: Any) -> tuple[Any, ...]:
    if isinstance(value, set | frozenset):
        return ("set", tuple(sorted({_shape(item) for item in value})))
    if isinstance(value, list | tuple):
        return ("seq", tuple(_shape(item) for item in value))
    if isinstance(value, dict):
        return ("map", tuple(_shape(item) for item in value.values()))
    return _LEAF


def _fits(shape: tuple[Any, ...], in_json: Any) -> bool:
    kind = shape[0]
    if kind == "set":
        return isinstance(in_json, list)
    if kind == "seq":
        return isinstance(in_json, list) and len(in_json) == len(shape[1])
    if kind == "map":
        return isinstance(in_json, dict) and len(in_json) == len(shape[1])
    return not isinstance(in_json, list | dict)


def _shaped(shape: tuple[Any, ...], in_json: Any) -> Any:
    """``in_json`` with the lists that ``shape`` marks as sets sorted."""
    kind = shape[0]
    if kind == "leaf" or not _fits(shape, in_json):
        return in_json
    if kind == "seq":
        return [_shaped(a, b) for a, b in zip(shape[1], in_json, strict=True)]
    if kind == "map":
        return {
            key: _shaped(a, b)
            for a, (key, b) in zip(shape[1], in_json.items(), strict=True)
        }
    options = shape[1]
    if options == (_LEAF,):
        items = list(in_json)
    else:
        items = [_shaped(_first_fitting(options, item), item) for item in in_json]
    kinds = {type(item) for item in items}
    if kinds <= {int, float} or kinds == {str}:
        return sorted(items)
    return sorted(items, key=_stored_order)


def _first_fitting(options: tuple[Any, ...], in_json: Any) -> tuple[Any, ...]:
    for shape in options:
        if _fits(shape, in_json):
            return shape  # type: ignore[no-any-return]
    return _LEAF


def _difference(given: Any, back: Any) -> list[Any] | None:
    """The keys to the first part of ``back`` that is not ``given``, or None.

    Types must match, except that an int may come back as the same float,
    and times must keep their UTC offset.
    """
    if type(given) is not type(back):
        if type(given) is int and type(back) is float and given == back:
            return None
        return []
    if isinstance(given, dict | list | tuple):
        try:
            if len(given) != len(back) or (
                isinstance(given, dict) and any(key not in back for key in given)
            ):
                return []
        except Exception:
            # A key's __eq__ or __hash__ raised.
            return []
        for key, item in _parts(given):
            inner = _difference(item, back[key])
            if inner is not None:
                return [key, *inner]
        return None
    try:
        same = bool(given == back)
        if isinstance(given, datetime.datetime | datetime.time):
            # Equal instants at the same offset are the same wall time: only
            # those ``==`` tells apart are compared by wall time (which
            # builds two naive copies, a cost a long list would feel).
            if same:
                same = given.utcoffset() == back.utcoffset()
            else:
                same = _same_time(given, back)
    except Exception:
        same = False
    return None if same else []


def _same_time(given: Any, back: Any) -> bool:
    """Whether two datetimes (or times) have the same wall time and UTC offset.

    Not ``==``: aware datetimes of different time zones compare by instant,
    and are never equal when either is in a repeated or skipped hour (a
    named zone's ``2:30`` on the night of a DST change against the offset
    it is stored with), though the same wall time at the same offset is
    the same instant. ``fold`` only picks the offset, so it is not compared.
    """
    return bool(
        given.utcoffset() == back.utcoffset()
        and given.replace(tzinfo=None, fold=0) == back.replace(tzinfo=None, fold=0)
    )


def _reached(value: Any, keys: Iterable[Any]) -> Any:
    """The part of ``value`` the ``keys`` lead to, or ``_NOWHERE``."""
    for key in keys:
        if isinstance(value, Mapping):
            found = key in value
        else:
            found = isinstance(value, list | tuple) and (
                type(key) is int and -len(value) <= key < len(value)
            )
        if not found:
            return _NOWHERE
        value = value[key]
    return value


def _changed(
    name: str, keys: list[Any], dumped: Any, back: Any, stored: Any
) -> _Invalid:
    """The error for a field whose JSON form validated back to another value.

    ``keys`` lead to the part that changed in the field's ``dumped`` value,
    ``back`` is the field validated again from its ``stored`` JSON form. A
    container that changed (a tuple held by an ``Any`` field that came back
    as a list, a mapping whose keys came back as strings) is refused as
    not JSON-compatible, as in a state that needs no conversion.
    """
    given = _reached(dumped, keys)
    shown = _reached(stored, keys)
    err: _Invalid | None = None
    if isinstance(given, _CONTAINERS):
        try:
            check_json_value(given)
        except _Invalid as refused:
            err = refused
            if not refused.steps and shown is not _NOWHERE:
                # The container itself is what changed (a tuple of an Any
                # field or of ``tuple | list`` came back as a list): a JSON
                # form is taken only when it validates back to the same value.
                err = _Invalid(
                    "",
                    f"{refused.reason}, and its JSON form {_shown(shown, 60)} "
                    f"would validate back as {_describe(_reached(back, keys))}",
                )
    if err is None:
        stored_as = "" if shown is _NOWHERE else f"stored as {_shown(shown, 60)}, "
        err = _Invalid(
            "",
            f"would change when stored in JSON form: {stored_as}it validates back "
            f"as {_describe_apart(_reached(back, keys), given)}",
        )
    for key in reversed(keys):
        err.at(_step(key))
    err.base = name
    return err


def _describe_apart(back: Any, given: Any) -> str:
    """``"<back>, not <given>"``, described so that they differ.

    Datetimes and times whose UTC offsets differ are shown in ISO form: their
    reprs are cut before the time zone, where they differ.
    """
    if isinstance(back, datetime.datetime | datetime.time) and isinstance(
        given, datetime.datetime | datetime.time
    ):
        try:
            if back.utcoffset() != given.utcoffset():
                return (
                    f"{back.isoformat()} ({type(back).__name__}), "
                    f"not {given.isoformat()} ({type(given).__name__})"
                )
        except Exception:
            pass
    return f"{_describe(back)}, not {_describe(given)}"


def _stored_form(
    model: Any,
    given: dict[str, Any],
    refused: Any,
    converts: list[bool],
    in_order: bool = False,
) -> ReadOnlyDict:
    """The state stored for ``given``, which strict validation ``refused``.

    ``given`` is validated loosely and stored; each part strict validation
    refused must be in the stored state as given (see :func:`_same_stored`),
    or ``_Invalid`` names it. Loose validation turns ``"5"`` into ``5`` and
    ``1`` into ``True``, so those stay refused, while a datetime's ISO
    string, an enum's value or a nested dataclass as a mapping is what a
    state read back holds. Parts strict validation accepted (a new datetime
    next to a stored enum value) are stored like any valid value, as strict
    validation gives them: if the model has a ``left_to_right`` union
    (``in_order``), where loose validation may take ``"007"`` as ``7``, the
    fields strict validation accepted are validated again strictly.
    """
    from pydantic import ValidationError

    try:
        built = model.model_validate(given, strict=False)
    except ValidationError as err:
        # Refused loosely too: its reason says more ("should be 'red' or
        # 'blue'" rather than "should be an instance of Color").
        raise _refusal(err.errors(include_url=False)[0]) from None
    if in_order:
        built = _strict_where_accepted(model, built, given, refused)
    try:
        stored = _pydantic_stored(model, built, converts)
    except _Invalid as err:
        # A part strict validation let through cannot be stored (a NaN, say):
        # that is the state's fault, not its stored forms'.
        for error in _errors(refused):
            if err.base == _field_of(error.get("loc", ())):
                raise _refusal(error) from None
        raise
    if _same_stored(stored, given):
        # All of it as stored (a state read back and written back): then so
        # is each part that strict validation refused, and they need not be
        # listed.
        return stored

    # Errors that lead to the same parts (each refused key of a mapping leads
    # to the whole mapping) compare them once: a mapping of n keys given back
    # in stored form would otherwise cost n * n.
    compared: set[tuple[Any, ...]] = set()
    for error in _errors(refused):
        loc = error.get("loc", ())
        at_stored, at_given, whole, steps = _both_reached(stored, given, loc)
        if steps in compared:
            continue
        if not _same_stored(at_stored, at_given):
            raise _refusal(error, at_stored if whole else _NOWHERE)
        compared.add(steps)
    return stored


def _has_left_to_right_union(model: Any) -> bool:
    """Whether any part of ``model`` (nested models too) is a ``left_to_right`` union.

    Given input that strict validation accepts, only such a union can give
    another value validated loosely (the first member that takes it loosely
    wins: ``"007"`` becomes ``7`` in ``int | str``).
    """
    pending: list[Any] = [model.__pydantic_core_schema__]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if node.get("type") == "union" and node.get("mode") == "left_to_right":
                return True
            pending.extend(node.values())
        elif isinstance(node, list | tuple):
            pending.extend(node)
    return False


def _strict_where_accepted(
    model: Any, built: Any, given: dict[str, Any], refused: Any
) -> Any:
    """``built`` (validated loosely) with the fields strict validation accepted
    validated strictly again from ``given``.

    Each is assigned to ``built``, which runs that field's validators (and
    the model's) once, as validating ``given`` strictly would have; a field
    whose loose value is already what was given is left as it is. A frozen
    model cannot be assigned to: it is validated whole then, the refused
    fields given as validated loosely.
    """
    from pydantic import ValidationError

    # Known limit: only whole top-level fields are validated strictly again,
    # so a left-to-right union nested in a field that strict validation
    # refused (a list of models holding a datetime's ISO string) keeps the
    # loose result there ("007" stored as 7).
    failed = {_field_of(error.get("loc", ())) for error in _errors(refused)}
    accepted = [
        name
        for name, value in given.items()
        if name not in failed and not _same_value(getattr(built, name), value)
    ]
    validator = model.__pydantic_validator__
    try:
        for name in accepted:
            validator.validate_assignment(built, name, given[name], strict=True)
    except ValidationError as err:
        if err.errors()[0].get("type") != "frozen_field":
            raise _refusal(err.errors(include_url=False)[0]) from None
        mixed = {
            name: getattr(built, name) if name in failed else value
            for name, value in given.items()
        }
        try:
            built = model.model_validate(mixed, strict=True)
        except ValidationError as again:
            raise _refusal(again.errors(include_url=False)[0]) from None
    return built


def _same_value(validated: Any, given: Any) -> bool:
    try:
        return type(validated) is type(given) and bool(validated == given)
    except Exception:
        return False


def _errors(refused: Any) -> list[Any]:
    """The errors of a ``ValidationError``, without what goes unused here."""
    errors: list[Any] = refused.errors(
        include_url=False, include_context=False, include_input=False
    )
    return errors


def _refusal(error: Mapping[str, Any], stored: Any = _NOWHERE) -> _Invalid:
    """The ``_Invalid`` for one of pydantic's validation errors.

    ``stored`` is what the refused part would be stored as, if it was
    valid loosely: the value that may be given in its place.
    """
    loc = ".".join(str(p) for p in error.get("loc", ()))
    reason = error.get("msg", "is not valid")
    if stored is not _NOWHERE:
        reason = f"{reason}; as stored it would be {_shown(stored, 60)}"
    return _Invalid(loc, reason)


def _field_of(loc: tuple[Any, ...]) -> str:
    return str(loc[0]) if loc else ""


def _both_reached(
    stored: Any, given: Any, loc: tuple[Any, ...]
) -> tuple[Any, Any, bool, tuple[Any, ...]]:
    """The parts of ``stored`` and ``given`` at an error's ``loc``.

    Also returned: whether all of ``loc`` was followed, and the steps that
    were. Where a step reaches nothing in either (a union member's name, a
    key stored as a string), the parts where it starts are returned:
    comparing more than the refused part can only refuse more. A refused key
    of a mapping (the key, then ``"[key]"``) is compared as the whole mapping.
    """
    keys = list(loc)
    whole = "[key]" not in keys
    if not whole:
        keys = keys[: max(keys.index("[key]") - 1, 0)]
    for at, key in enumerate(keys):
        inner_stored = _reached(stored, [key])
        inner_given = _reached(given, [key])
        if inner_stored is _NOWHERE or inner_given is _NOWHERE:
            return stored, given, False, tuple(keys[:at])
        stored, given = inner_stored, inner_given
    return stored, given, whole, tuple(keys)


def _same_stored(dumped: Any, given: Any) -> bool:
    """Whether ``dumped`` is ``given``: equal, and no value turned into another type.

    Loose validation turns ``"5"`` into ``5`` and ``1`` into ``True``; both
    compare equal or change type, so they count as different. A str
    subclass (an enum member dumped by value) counts as its string, an int
    given for a float (as strict validation takes it) as that float, and a
    mapping may lack keys that the dump fills with defaults.
    """
    if isinstance(dumped, str) and isinstance(given, str):
        return str.__eq__(dumped, given) is True
    if isinstance(dumped, dict) and isinstance(given, dict):
        return all(
            key in dumped and _same_stored(dumped[key], given[key]) for key in given
        )
    if type(dumped) is float and type(given) is int:
        return dumped == given
    if isinstance(dumped, list) and isinstance(given, list):
        return len(dumped) == len(given) and all(
            _same_stored(a, b) for a, b in zip(dumped, given, strict=True)
        )
    return type(dumped) is type(given) and bool(dumped == given)
