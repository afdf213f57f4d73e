"""State schemas: how the states of a kind are checked before they are stored.

Holds what every kind of schema shares: the checks of JSON-compatible values
(:func:`check_json_value` and the ``_Invalid`` error that names where a value
failed), :class:`StateSchema`, the compilation of dataclasses, the check of
recorded states, and :func:`compile_schema`. Pydantic models are compiled in
:mod:`runtime._schema_pydantic` and msgspec Structs in
:mod:`runtime._schema_msgspec`; ``compile_schema`` imports each only when it is
given such a schema, so importing the runtime does not import pydantic.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from runtime._errors import DefinitionError, SchemaError
from runtime._events import ReadOnlyDict, ReadOnlyList

MAX_DEPTH = 64
"""How deeply values may nest; deeper values (and cycles) are refused."""

MAX_VALUES = 1_000_000
"""The most values (list items and mapping entries, at any depth) that one
free-form (``Any``) value of a state may hold."""

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_Check = Callable[[Any], Any]


class _Invalid(Exception):
    """A value failed a check; ``path`` names where (``status``, ``tags[2]``).

    Checks are given no path, so a value that passes costs no path string:
    each container a failure passes on its way out appends its step (a key
    or field name, or a list index) to ``steps``, and ``path`` is joined
    from them when it is read. ``base`` is where the checked value itself is.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.base = path
        self.steps: list[str | int] = []
        self.reason = reason

    def at(self, step: str | int) -> _Invalid:
        """Add the step to the part that failed, from the container holding it."""
        self.steps.append(step)
        return self

    @property
    def path(self) -> str:
        path = self.base
        for step in reversed(self.steps):
            path = f"{path}[{step}]" if isinstance(step, int) else _join(path, step)
        return path


def _shown(value: Any, longest: int) -> str:
    """``repr(value)`` cut to ``longest`` characters, even if ``__repr__`` raises."""
    try:
        shown = repr(value)
    except Exception:
        shown = f"<{type(value).__name__} object>"
    if len(shown) > longest:
        shown = shown[: longest - 3] + "..."
    return shown


def _describe(value: Any) -> str:
    return f"{_shown(value, 60)} ({type(value).__name__})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_field(key: Any, listed: str) -> _Invalid:
    """The error for a key of a state or record that is not one of its fields.

    A string key is named as the field's path; an empty or non-string key
    cannot be, so the reason shows it instead.
    """
    expected = f"(expected fields: {listed or 'none'})"
    if isinstance(key, str) and key:
        name = str.__str__(key)
        if len(name) > _LONGEST_SHOWN_KEY:
            name = name[: _LONGEST_SHOWN_KEY - 3] + "..."
        return _Invalid("", f"is not in the schema {expected}").at(name)
    if isinstance(key, str):
        return _Invalid("", f"has a field with an empty name {expected}")
    shown = _shown(key, _LONGEST_SHOWN_KEY)
    return _Invalid("", f"has a key {shown} that is not a field name {expected}")


def _uncomparable_key(key: Any, err: Exception) -> _Invalid:
    """The error for a key whose ``__eq__`` or ``__hash__`` raised."""
    return _Invalid(
        "",
        f"has a key {_shown(key, _LONGEST_SHOWN_KEY)} that cannot be compared "
        f"with the field names ({_raised(err)})",
    )


def _raised(err: BaseException) -> str:
    """``TypeName: message`` of an exception from user code, cut short."""
    try:
        text = str(err)
    except Exception:
        text = ""
    if len(text) > _LONGEST_SHOWN_ERROR:
        text = text[: _LONGEST_SHOWN_ERROR - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


_LONGEST_SHOWN_KEY = 64
"""Keys longer than this are cut short in error messages."""

_LONGEST_SHOWN_ERROR = 200
"""The message of an exception raised by a value's code is cut to this length."""


def _plain_str(value: str) -> str:
    """The characters of a str subclass, which is what is stored.

    Not ``str(value)``: a ``(str, Enum)`` member shows as ``"Color.RED"``
    there, and a subclass's ``__str__`` may do anything, raise included.
    """
    return str.__str__(value)


def _check_str(value: Any) -> str:
    if type(value) is not str:
        if isinstance(value, str):
            return _check_str(_plain_str(value))
        raise _Invalid("", f"must be a string, got {_describe(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid("", "must be valid Unicode (no lone surrogates)") from None
    return value


def _check_int(value: Any) -> int:
    if type(value) is not int:
        raise _Invalid("", f"must be an integer, got {_describe(value)}")
    if not _INT_MIN <= value <= _INT_MAX:
        raise _Invalid("", f"must fit in 64 bits, got {value}")
    return value


def _check_float(value: Any) -> float:
    kind = type(value)
    if kind is int:
        value = float(_check_int(value))
    elif kind is not float:
        raise _Invalid("", f"must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise _Invalid("", f"must be a finite number, got {value!r}")
    return float(value)


def _check_bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _Invalid("", f"must be true or false, got {_describe(value)}")
    return value


def _check_none(value: Any) -> None:
    if value is not None:
        raise _Invalid("", f"must be null, got {_describe(value)}")


def check_json_value(value: Any, path: str = "", depth: int = 0) -> Any:
    """Return a read-only copy of a JSON-compatible value, or raise ``_Invalid``.

    JSON-compatible means: ``None``, ``bool``, 64-bit ``int``, finite ``float``,
    ``str``, ``list`` and ``dict`` with string keys, nested at most
    ``MAX_DEPTH`` levels. Tuples, sets, bytes and other objects are refused,
    because they would not come back as what went in. ``path`` is where
    ``value`` is and ``depth`` how deeply it is nested there. Unlike an ``Any``
    field's check it sets no limit to how many values it copies: its callers
    pass whole states or values a library has already built.
    """
    try:
        return _json_value(value, depth, [_NO_LIMIT])
    except _Invalid as err:
        err.base = path
        raise


_NO_LIMIT = 2**62


def _json_value(value: Any, depth: int, left: list[int]) -> Any:
    # ``left`` counts down the values the whole check may still copy: shared
    # lists (``[row] * 1000`` nested a few levels) would otherwise make a copy
    # that grows exponentially with the depth.
    kind = type(value)
    if kind is str:
        return _check_str(value)
    if isinstance(value, str):
        # str subclasses (StrEnum members) are stored as plain strings.
        return _check_str(_plain_str(value))
    if kind is int:
        return _check_int(value)
    if kind is float:
        return _check_float(value)
    if value is None or kind is bool:
        return value
    if depth >= MAX_DEPTH:
        raise _Invalid("", f"nests deeper than {MAX_DEPTH} levels (or is a cycle)")

    depth += 1
    if isinstance(value, dict):
        left[0] -= len(value)
        if left[0] < 0:
            raise _TooMany("", _TOO_MANY)
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Invalid("", f"has a key that is not a string: {_describe(key)}")
            _check_str(key)
            try:
                out[key] = _json_value(item, depth, left)
            except _Invalid as err:
                err.at(key)
                raise
        return ReadOnlyDict(out)
    if isinstance(value, list):
        left[0] -= len(value)
        if left[0] < 0:
            raise _TooMany("", _TOO_MANY)
        items: list[Any] = []
        try:
            for item in value:
                items.append(_json_value(item, depth, left))
        except _Invalid as err:
            # The item that failed is the first one not appended.
            err.at(len(items))
            raise
        return ReadOnlyList(items)
    raise _Invalid("", f"must be a JSON-compatible value, got {_describe(value)}")


def _check_any(value: Any) -> Any:
    # Known limit: the count is per Any value, so list[Any] and dict[str, Any]
    # fields give each item its own MAX_VALUES (one shared big value repeated
    # still copies item count times the limit).
    try:
        return _json_value(value, 1, [MAX_VALUES])
    except _TooMany:
        # Named as the whole free-form value, not where the count ran out.
        raise _Invalid("", _TOO_MANY) from None


class _TooMany(_Invalid):
    """A free-form value holds more than ``MAX_VALUES`` values (no path kept)."""

    def at(self, step: str | int) -> _Invalid:
        return self


_TOO_MANY = f"holds more than {MAX_VALUES:,} values in all"


class StateSchema:
    """A compiled schema: validates a state and returns its read-only copy.

    Compiled once per kind from a dataclass, a pydantic model or a msgspec
    Struct. ``validate`` rejects missing fields (unless the schema gives them a
    default, which is then filled in), extra fields and wrongly typed values,
    and refuses values that are not JSON-compatible.
    """

    def __init__(
        self,
        source: Any,
        fields: tuple[str, ...],
        check: Callable[[Any], ReadOnlyDict],
        flat: bool = False,
        quick: _Validator | None = None,
        stored: Callable[[Any], ReadOnlyDict] | None = None,
    ) -> None:
        self.source = source
        self.fields = fields
        self.flat = flat
        """Whether every valid state holds only scalars (no lists or mappings)."""
        self.validator: _Validator = (
            functools.partial(_validate_with, check) if quick is None else quick
        )
        """:meth:`validate` as a plain function (generated for flat schemas)."""
        self.restore_validator: _Validator = (
            self.validator
            if stored is None
            else functools.partial(_validate_with, stored)
        )
        """Checks a state as recorded (restored from a data dir, or read from
        the bus).

        It must accept every state :attr:`validator` returned and leave it
        as it is: the dataclass check does (it is the same check), but a
        pydantic model's or msgspec Struct's check need not (an enum field
        refuses its stored string in strict mode; a validator or serializer
        may change the value each time), so for those a recorded state is
        checked for what the runtime itself guarantees: a JSON-compatible
        mapping of exactly the schema's fields, the missing ones with a
        default filled in.
        """

    @property
    def name(self) -> str:
        """The schema type's name."""
        return getattr(self.source, "__name__", repr(self.source))

    def validate(self, value: Any, kind: str, entity_id: str) -> ReadOnlyDict:
        """Return the validated, read-only state or raise :class:`SchemaError`.

        Code that raises while the state is checked (a key's ``__eq__``, a
        validator of the schema) refuses the state too; the error's cause is
        what it raised.
        """
        return self.validator(value, kind, entity_id)


_Validator = Callable[[Any, str, str], ReadOnlyDict]


def _validate_with(
    check: Callable[[Any], ReadOnlyDict], value: Any, kind: str, entity_id: str
) -> ReadOnlyDict:
    try:
        return check(value)
    except _Invalid as err:
        field = err.path or None
        # The cause is kept when the value's own code raised (None otherwise).
        raise SchemaError(kind, entity_id, field, err.reason) from err.__cause__
    except RecursionError:
        raise SchemaError(
            kind, entity_id, None, "nests too deeply (or is a cycle)"
        ) from None
    except Exception as err:
        # Code in the value (a key's __eq__, a mapping's __iter__, ...) or in
        # the schema (a validator, a default factory) raised.
        raise SchemaError(
            kind, entity_id, None, f"could not be checked: {_raised(err)}"
        ) from err


def _literal_check(options: tuple[Any, ...]) -> _Check:
    allowed = {(type(o), o) for o in options}
    listed = ", ".join(repr(o) for o in options)

    def check(value: Any) -> Any:
        try:
            ok = (type(value), value) in allowed
        except Exception:
            # Unhashable, or a __hash__ or __eq__ that raises: not an option.
            ok = False
        if not ok:
            raise _Invalid("", f"must be one of {listed}, got {_describe(value)}")
        return value

    return check


def _enum_check(cls: type[enum.Enum]) -> _Check:
    values = [m.value for m in cls]
    inner = _literal_check(tuple(values))

    def check(value: Any) -> Any:
        if isinstance(value, cls):
            value = value.value
        return inner(value)

    return check


def _union_check(options: list[_Check], names: list[str]) -> _Check:
    listed = " or ".join(names)

    def check(value: Any) -> Any:
        for option in options:
            try:
                return option(value)
            except _Invalid:
                continue
        raise _Invalid("", f"must be {listed}, got {_describe(value)}")

    return check


def _optional_check(inner: _Check) -> _Check:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def _list_check(item: _Check) -> _Check:
    def check(value: Any) -> Any:
        if not isinstance(value, list):
            raise _Invalid("", f"must be a list, got {_describe(value)}")
        items: list[Any] = []
        try:
            for v in value:
                items.append(item(v))
        except _Invalid as err:
            # The item that failed is the first one not appended.
            err.at(len(items))
            raise
        return ReadOnlyList(items)

    return check


def _dict_check(item: _Check) -> _Check:
    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Invalid("", f"must be a mapping, got {_describe(value)}")
        out = {}
        for key, v in value.items():
            if type(key) is not str:
                raise _Invalid("", f"has a key that is not a string: {_describe(key)}")
            _check_str(key)
            try:
                out[key] = item(v)
            except _Invalid as err:
                err.at(key)
                raise
        return ReadOnlyDict(out)

    return check


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or repr(annotation)


def _compile_annotation(annotation: Any, where: str) -> _Check:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if annotation is Any or annotation is object:
        return _check_any
    if annotation is str:
        return _check_str
    if annotation is bool:
        return _check_bool
    if annotation is int:
        return _check_int
    if annotation is float:
        return _check_float
    if annotation is None or annotation is type(None):
        return _check_none
    if origin is typing.Annotated:
        return _compile_annotation(args[0], where)
    if origin is typing.Literal:
        return _literal_check(args)
    if origin is typing.Union or origin is types.UnionType:
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and len(args) == 2:
            return _optional_check(_compile_annotation(others[0], where))
        checks = [_compile_annotation(a, where) for a in args]
        return _union_check(checks, [_type_name(a) for a in args])
    if origin is list or annotation is list:
        return _list_check(_compile_annotation(args[0], where) if args else _check_any)
    if origin is dict or annotation is dict:
        if args and args[0] is not str:
            raise DefinitionError(f"{where}: mapping keys must be str, got {args[0]!r}")
        return _dict_check(_compile_annotation(args[1], where) if args else _check_any)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_check(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _compile_record(annotation)
    raise DefinitionError(
        f"{where}: unsupported annotation {annotation!r}; use str, int, float, "
        "bool, None, Any, Literal, list[...], dict[str, ...], unions, enums or "
        "nested dataclasses"
    )


def _scalar_test(annotation: Any, var: str, consts: dict[str, Any]) -> str | None:
    """An expression that is true when ``var`` passes ``annotation``'s check unchanged.

    Only for scalar annotations: a value it accepts is valid and would come
    out of the full check as the very same value, so a state whose fields all
    pass can be stored without running the full check. ``None`` means there
    is no such shortcut for this annotation (containers, unions, enums).
    A value the test refuses may still be valid: the full check decides.
    Constants the expression names are added to ``consts``.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if annotation is str:
        # Only ASCII skips the check for lone surrogates.
        return f"(type({var}) is str and {var}.isascii())"
    if annotation is int:
        return f"(type({var}) is int and _INT_MIN <= {var} <= _INT_MAX)"
    if annotation is float:
        return f"(type({var}) is float and _isfinite({var}))"
    if annotation is bool:
        return f"type({var}) is bool"
    if annotation is None or annotation is type(None):
        return f"{var} is None"
    if origin is typing.Annotated:
        return _scalar_test(args[0], var, consts)
    if origin is typing.Literal:
        return _literal_test(args, var, consts)
    if (origin is typing.Union or origin is types.UnionType) and len(args) == 2:
        others = [a for a in args if a is not type(None)]
        inner = _scalar_test(others[0], var, consts) if len(others) == 1 else None
        return None if inner is None else f"({var} is None or {inner})"
    return None


def _literal_test(
    options: tuple[Any, ...], var: str, consts: dict[str, Any]
) -> str | None:
    if not all(type(o) in (str, int, bool) for o in options):
        return None
    n = len(consts)
    allowed, kinds = f"_allowed{n}", f"_kinds{n}"
    if all(type(o) is str for o in options):
        consts[allowed] = frozenset(options)
        return f"(type({var}) is str and {var} in {allowed})"
    # ``1 == True``: compare type and value together.
    consts[allowed] = frozenset((type(o), o) for o in options)
    consts[kinds] = frozenset(type(o) for o in options)
    return f"(type({var}) in {kinds} and (type({var}), {var}) in {allowed})"


def _compile_record(cls: type) -> Callable[[Any], ReadOnlyDict]:
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as err:
        raise DefinitionError(
            f"cannot resolve the annotations of {cls.__name__}: {err}"
        ) from err

    specs: list[tuple[str, _Check, Any]] = []
    for f in dataclasses.fields(cls):
        check = _compile_annotation(hints[f.name], f"{cls.__name__}.{f.name}")
        if f.default is not dataclasses.MISSING:
            default: Any = ("value", f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = ("factory", f.default_factory)
        else:
            default = None
        specs.append((f.name, check, default))
    names = {name for name, _, _ in specs}
    listed = ", ".join(name for name, _, _ in specs)

    def check_record(value: Any) -> ReadOnlyDict:
        if not isinstance(value, Mapping):
            raise _Invalid("", f"must be a mapping, got {_describe(value)}")

        for key in value:
            try:
                known = key in names
            except Exception as err:
                raise _uncomparable_key(key, err) from err
            if not known:
                raise _unknown_field(key, listed)

        out = {}
        try:
            for name, check, default in specs:
                if name in value:
                    out[name] = check(value[name])
                elif default is None:
                    raise _Invalid("", "is missing")
                else:
                    how, given = default
                    out[name] = check(given() if how == "factory" else given)
        except _Invalid as err:
            # ``name`` is the field being checked when it failed.
            err.at(name)
            raise
        return ReadOnlyDict(out)

    return check_record


def _flat_dataclass_check(
    cls: type, full: Callable[[Any], ReadOnlyDict]
) -> _Validator | None:
    """A shortcut validator for dataclasses whose fields are all scalars.

    Returns ``None`` when some field is not a scalar. Otherwise the returned
    validator accepts a plain ``dict`` holding exactly the fields, each passing
    its scalar test, and returns them read-only under the schema's own field
    names, in the schema's order; anything else goes to ``full``,
    which gives the same answer or the error with its field path.

    The validator is generated source with one inline test per field (the
    way ``dataclasses`` builds ``__init__``): it runs on every write, where a
    call per field would cost more than copying the whole state.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    consts: dict[str, Any] = {
        "ReadOnlyDict": ReadOnlyDict,
        "_INT_MIN": _INT_MIN,
        "_INT_MAX": _INT_MAX,
        "_isfinite": math.isfinite,
        "_full": functools.partial(_validate_with, full),
    }
    reads = []
    tests = []
    items = []
    for i, f in enumerate(dataclasses.fields(cls)):
        test = _scalar_test(hints[f.name], f"v{i}", consts)
        if test is None:
            return None
        # str.__repr__: the name goes into source text, so no override of
        # __repr__ may change what it says.
        name = str.__repr__(f.name)
        reads.append(f"v{i} = value[{name}]")
        tests.append(test)
        items.append(f"{name}: v{i}")

    source = "\n".join(
        [
            "def check(value, kind, entity_id):",
            f"    if type(value) is dict and len(value) == {len(tests)}:",
            "        try:",
            # "pass" keeps the block valid for a dataclass without fields.
            *(f"            {read}" for read in reads or ["pass"]),
            # A missing name, or a key's __eq__ that raised: the full check
            # says which.
            "        except Exception:",
            "            pass",
            "        else:",
            f"            if {' and '.join(tests) or 'True'}:",
            # The schema's own names as keys: a key that only compares equal
            # to a name (a str subclass or enum, say) is not kept.
            f"                return ReadOnlyDict({{{', '.join(items)}}})",
            "    return _full(value, kind, entity_id)",
        ]
    )
    exec(compile(source, f"<flat check of {cls.__qualname__}>", "exec"), consts)
    check: _Validator = consts["check"]
    return check


def _check_fields(value: Any, names: tuple[str, ...]) -> None:
    if not isinstance(value, Mapping):
        raise _Invalid("", f"must be a mapping, got {_describe(value)}")
    for key in value:
        try:
            known = key in names
        except Exception as err:
            raise _uncomparable_key(key, err) from err
        if not known:
            raise _unknown_field(key, ", ".join(names))


def _stored_check(
    names: tuple[str, ...],
    required: Callable[[str], bool],
    defaults: Callable[[Mapping[str, Any], list[str]], dict[str, Any]],
) -> Callable[[Any], ReadOnlyDict]:
    """The check of a recorded state of a pydantic or msgspec schema.

    ``defaults(state, missing)`` gives the stored form of the defaults of the
    ``missing`` fields (called only when a recorded state lacks a field that
    has one: a field added since it was written).
    """

    known = frozenset(names)

    def check(value: Any) -> ReadOnlyDict:
        # A plain dict of exactly the schema's fields needs neither step, and
        # one of plain scalars is stored as it is.
        if type(value) is not dict or value.keys() != known:
            _check_fields(value, names)
            missing = [name for name in names if name not in value]
        elif _plain_scalars(value):
            return ReadOnlyDict(value)
        else:
            missing = []
        if missing:
            for name in missing:
                if required(name):
                    raise _Invalid(name, "is missing and has no default")
            value = {**defaults(value, missing), **value}
            value = {name: value[name] for name in names}
        state: ReadOnlyDict = check_json_value(value)
        return state

    return check


def _plain_scalars(value: dict[str, Any]) -> bool:
    """Whether :func:`check_json_value` keeps every key and value as it is.

    That is: keys of type ``str``, and values each an ASCII ``str``, a 64-bit
    ``int``, a finite ``float``, a ``bool`` or ``None``; anything else
    (non-ASCII text included) is left to the full check.
    """
    for key, item in value.items():
        if type(key) is not str:
            return False
        kind = type(item)
        if kind is str:
            if not item.isascii():
                return False
        elif kind is int:
            if not _INT_MIN <= item <= _INT_MAX:
                return False
        elif kind is float:
            if not math.isfinite(item):
                return False
        elif item is not None and kind is not bool:
            return False
    return True


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _step(key: Any) -> str | int:
    """A key or position as a path names it: other keys than str or int by repr."""
    return key if isinstance(key, str | int) else _shown(key, _LONGEST_SHOWN_KEY)


_NOWHERE = object()


def _stored_order(value: Any) -> tuple[Any, ...]:
    """A sort key for stored values of any types, the same in every process.

    None, then booleans, numbers, strings, lists and mappings (frozen
    records), each by value.
    """
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, list | tuple):
        return (4, tuple(_stored_order(item) for item in value))
    if isinstance(value, dict):
        return (5, tuple((k, _stored_order(item)) for k, item in value.items()))
    return (6, type(value).__name__, repr(value))


def compile_schema(spec: Any) -> StateSchema:
    """Compile a state schema from a dataclass, pydantic model or msgspec Struct.

    Raises:
        DefinitionError: the schema is none of those, uses an annotation
            that cannot describe JSON-compatible data, or keys its records
            (its own or nested ones) by other names than their fields.
    """
    if isinstance(spec, StateSchema):
        return spec
    if isinstance(spec, type) and dataclasses.is_dataclass(spec):
        full = _compile_record(spec)
        names = tuple(f.name for f in dataclasses.fields(spec))
        quick = _flat_dataclass_check(spec, full)
        return StateSchema(spec, names, full, flat=quick is not None, quick=quick)
    if isinstance(spec, type) and hasattr(spec, "model_validate"):
        from runtime._schema_pydantic import _compile_pydantic

        return _compile_pydantic(spec)
    if isinstance(spec, type) and hasattr(spec, "__struct_fields__"):
        from runtime._schema_msgspec import _compile_msgspec

        return _compile_msgspec(spec)
    raise DefinitionError(
        f"state schema must be a dataclass, a pydantic model or a msgspec Struct, "
        f"got {spec!r}"
    )


def validate_value(spec: Any, value: Any, what: str = "value") -> ReadOnlyDict:
    """Validate ``value`` against a schema outside any kind (e.g. a payload).

    Raises:
        SchemaError: with ``kind`` set to ``what`` and the failing field.
    """
    return compile_schema(spec).validate(value, what, "-")
