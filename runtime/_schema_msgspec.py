"""msgspec Structs as state schemas.

:func:`_compile_msgspec` refuses a Struct whose states would not be a mapping
of exactly its fields (renamed fields, a tag, ``array_like``,
``omit_defaults``), checks each state by converting it to the Struct, and
stores what ``msgspec.to_builtins`` makes of it. :class:`_MsgspecForms` builds
the checks and fixes a Struct needs beyond that, for the parts ``to_builtins``
would turn into other values or list in no fixed order: free-form values,
sets, tuples and keys that are not strings.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

from runtime._errors import DefinitionError
from runtime._events import ReadOnlyDict
from runtime._schema import (
    _CONTAINERS,
    _NOWHERE,
    StateSchema,
    _Check,
    _check_any,
    _check_fields,
    _check_str,
    _describe,
    _dict_check,
    _Invalid,
    _join,
    _list_check,
    _optional_check,
    _plain_str,
    _raised,
    _shown,
    _step,
    _stored_check,
    _stored_order,
    check_json_value,
)

_MSGSPEC_PATH = re.compile(r"(?:at|in) `\$\.([A-Za-z0-9_]+)")
"""The field msgspec names: ``at `$.count```, or ``at `key` in `$.by_id```."""

_MSGSPEC_KEY_AT = re.compile(r" - at `key` in `\$([^`]*)`")
"""Where msgspec refused a mapping's key: ``$.tags``, ``$.rows[2]``, ``$.m[...]``."""

_MSGSPEC_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")


def _msgspec_refusal(value: Any, message: str) -> _Invalid:
    """The error for msgspec's refusal of ``value``, showing a refused key.

    msgspec names the type of a key it refuses but not the key itself, so
    the key is looked up at the place the message names.
    """
    at = _MSGSPEC_KEY_AT.search(message)
    if at is not None:
        try:
            found = _non_str_key(value, at.group(1))
        except Exception:
            found = None
        if found is not None:
            path, key = found
            return _Invalid(path, f"has a key that is not a string: {_describe(key)}")
    path_at = _MSGSPEC_PATH.search(message)
    return _Invalid(path_at.group(1) if path_at else "", message)


def _non_str_key(value: Any, where: str) -> tuple[str, Any] | None:
    """The path and key of the first non-``str`` key of the mapping at ``where``.

    ``where`` is msgspec's path below ``$``; ``[...]`` stands for any value
    of a mapping, so each is tried.
    """
    places = [("", value)]
    for step in _MSGSPEC_STEP.finditer(where):
        name, index = step.groups()
        reached = []
        for path, part in places:
            if name is not None and isinstance(part, Mapping) and name in part:
                reached.append((_join(path, name), part[name]))
            elif name is not None and hasattr(part, "__struct_fields__"):
                reached.append((_join(path, name), getattr(part, name, None)))
            elif index is not None and isinstance(part, list | tuple):
                if int(index) < len(part):
                    reached.append((f"{path}[{index}]", part[int(index)]))
            elif name is None and index is None and isinstance(part, Mapping):
                reached.extend(
                    (_join(path, key) if isinstance(key, str) else path, item)
                    for key, item in part.items()
                )
        places = reached

    for path, part in places:
        if isinstance(part, Mapping):
            for key in part:
                if not isinstance(key, str):
                    return path, key
    return None


def _msgspec_unbuilt(obj: Any, names: tuple[str, ...], err: Exception) -> _Invalid:
    """The error for a converted state that ``msgspec.to_builtins`` refused."""
    import msgspec

    reason = f"must be a JSON-compatible value ({_raised(err)})"
    for name in names:
        try:
            msgspec.to_builtins(getattr(obj, name), str_keys=True)
        except Exception:
            return _Invalid(name, reason)
    return _Invalid("", reason)


def _renamed_fields(struct: Any) -> list[str]:
    return [
        name
        for name, key in zip(
            struct.__struct_fields__, struct.__struct_encode_fields__, strict=True
        )
        if name != key
    ]


def _refuse_nested_renames(struct: Any) -> None:
    """Refuse a Struct with renamed fields anywhere inside ``struct``'s fields.

    A field holding such a Struct (alone, in a list, a mapping or a union)
    would be written under the renamed keys, never under the field names a
    state is given with.
    """
    import msgspec

    types = msgspec.inspect
    seen: set[type] = set()
    pending: list[tuple[str, Any]] = [("", types.type_info(struct))]
    # Appending while iterating: each field is visited once, in order.
    for path, node in pending:
        # Records (Structs, dataclasses, ...) may hold themselves: each once.
        cls: Any = getattr(node, "cls", None)
        if cls is not None:
            if cls in seen:
                continue
            seen.add(cls)
        if isinstance(node, types.StructType) and cls is not struct:
            renamed = _renamed_fields(cls)
            if renamed:
                inner = cls.__name__
                raise DefinitionError(
                    f"{struct.__name__}.{path} holds {inner}, whose fields "
                    f"{', '.join(map(repr, renamed))} are renamed; nested records "
                    "are keyed by field names like states, so this field could "
                    f"not be written under them; remove rename= from {inner}"
                )
        for member in (getattr(node, name) for name in node.__struct_fields__):
            for part in member if isinstance(member, tuple) else (member,):
                if isinstance(part, types.Field):
                    pending.append((_join(path, part.name), part.type))
                elif isinstance(part, types.Type):
                    pending.append((path, part))


_FormCheck = Callable[[Any], object]
"""Raises ``_Invalid`` where a converted value's free-form parts are not JSON;
what it returns is used only where it is a stored form (see
:meth:`_MsgspecForms.stored_check`)."""

_FormFix = Callable[[Any, Any], Any]
"""``(converted, built)``: the stored form of a converted value, from the
form ``built`` that ``msgspec.to_builtins`` gave for it."""

_Built = typing.TypeVar("_Built", bound=Callable[..., Any])


class _MsgspecForms:
    """What a Struct's values need beyond ``msgspec.to_builtins``, by type.

    ``to_builtins`` silently turns what a free-form slot (``Any``,
    ``object``, a bare ``list`` or ``dict``) holds into another value: a
    datetime into a string, a set into a list, an enum member into its
    value, so the state would read back as something else than was written.
    :meth:`check` gives the check that refuses such parts, as the other
    schema kinds do. ``to_builtins`` also lists a set's items in iteration
    order, which differs between equal sets (and between processes: string
    hashes are randomised), and keeps tuples as tuples; :meth:`fix` gives
    the step that sorts the one and lists the other. Both are ``None`` for a
    type that holds no such part, so Structs without them pay nothing.
    """

    def __init__(self) -> None:
        import msgspec

        self._types = msgspec.inspect
        # By id: inspect's nodes are not hashable; the Struct's type info
        # keeps them alive while the checks are built.
        self._checks: dict[int, _FormCheck | None] = {}
        self._fixes: dict[int, _FormFix | None] = {}

    def check(self, node: Any) -> _FormCheck | None:
        """The check of the free-form parts of a value of ``node``'s type."""
        return self._built(self._checks, node, self.is_free_form, self._build_check)

    def stored_check(self, node: Any) -> _Check | None:
        """A check that returns the stored form of a value of ``node``'s type.

        Only for types that hold nothing but free-form values (``Any``,
        ``list[Any]``, ``dict[str, Any]``, a bare ``list`` or ``dict``, or one
        of those or ``None``): the copy their free-form check makes is what
        is stored, so it need not be made again from ``to_builtins``'s form.
        """
        node = self._unwrapped(node)
        t = self._types
        if self.is_free_form(node):
            return _check_any
        if isinstance(node, t.ListType) and self.is_free_form(node.item_type):
            return _list_check(_check_any)
        if isinstance(node, t.DictType) and self.is_free_form(node.value_type):
            key = self._unwrapped(node.key_type)
            if self.is_free_form(key):
                return _dict_check(_check_any)
            if isinstance(key, t.StrType):
                return _str_keyed_check
        if isinstance(node, t.UnionType) and len(node.types) == 2:
            value, other = (self._unwrapped(m) for m in node.types)
            if isinstance(value, t.NoneType):
                value, other = other, value
            inner = self.stored_check(value)
            if inner is not None and isinstance(other, t.NoneType):
                return _optional_check(inner)
        return None

    def has_keys_stored_as_strings(self, node: Any) -> bool:
        """Whether a value of ``node``'s type may hold keys that are not str."""
        return self._reaches(
            node, lambda part: self._is_mapping(part) and not self._str_keyed(part)
        )

    def fix(self, node: Any) -> _FormFix | None:
        """The fix of the builtin form of a value of ``node``'s type."""
        return self._built(self._fixes, node, self._needs_fix, self._build_fix)

    def _built(
        self,
        cache: dict[int, _Built | None],
        node: Any,
        needed: Callable[[Any], bool],
        build: Callable[[Any], _Built],
    ) -> _Built | None:
        """``build(node)``, once per type node, or None where no part is ``needed``."""
        node = self._unwrapped(node)
        key = id(node)
        if key in cache:
            return cache[key]
        if not self._reaches(node, needed):
            cache[key] = None
            return None

        # A record may hold itself: its fields reach it through this.
        made: list[_Built] = []
        cache[key] = typing.cast("_Built", lambda *args: made[0](*args))
        function = build(node)
        made.append(function)
        cache[key] = function
        return function

    def _unwrapped(self, node: Any) -> Any:
        while isinstance(node, self._types.Metadata):
            node = node.type
        return node

    def is_free_form(self, node: Any) -> bool:
        """Whether ``node`` is a free-form type (``Any``, ``object``)."""
        node = self._unwrapped(node)
        t = self._types
        return isinstance(node, t.AnyType) or (
            isinstance(node, t.CustomType) and node.cls is object
        )

    def _is_mapping(self, node: Any) -> bool:
        # FrozenDictType (Python 3.15) has the same attributes as DictType.
        return isinstance(node, self._types.DictType) or (
            type(node).__name__ == "FrozenDictType"
        )

    def _needs_fix(self, node: Any) -> bool:
        t = self._types
        if self._is_mapping(node):
            return not self._str_keyed(node)
        return isinstance(
            node,
            t.SetType
            | t.FrozenSetType
            | t.VarTupleType
            | t.TupleType
            | t.NamedTupleType,
        )

    def _str_keyed(self, node: Any) -> bool:
        """Whether a mapping's keys are strings, so no two are stored as one."""
        key = self._unwrapped(node.key_type)
        return isinstance(key, self._types.StrType) or self.is_free_form(key)

    def _reaches(self, node: Any, found: Callable[[Any], bool]) -> bool:
        """Whether ``node`` or a type inside it is ``found``."""
        t = self._types
        seen: set[int] = set()
        pending = [node]
        while pending:
            part = self._unwrapped(pending.pop())
            if id(part) in seen:
                continue
            seen.add(id(part))
            if found(part):
                return True
            for name in part.__struct_fields__:
                member = getattr(part, name)
                for inner in member if isinstance(member, tuple) else (member,):
                    if isinstance(inner, t.Field):
                        pending.append(inner.type)
                    elif isinstance(inner, t.Type):
                        pending.append(inner)
        return False

    def _build_check(self, node: Any) -> _FormCheck:
        t = self._types
        if self.is_free_form(node):
            # A dataclass's Any field check, with its MAX_VALUES limit per
            # free-form value; the copy it returns is not needed.
            return _check_any
        if isinstance(node, t.ListType | t.VarTupleType):
            return _items_form_check(self.check(node.item_type))
        if isinstance(node, t.SetType | t.FrozenSetType):
            return _set_form_check(self.check(node.item_type))
        if isinstance(node, t.TupleType):
            return _positions_form_check([self.check(i) for i in node.item_types])
        if self._is_mapping(node):
            free_keys = self.is_free_form(self._unwrapped(node.key_type))
            return _mapping_form_check(free_keys, self.check(node.value_type))
        if isinstance(node, t.StructType | t.DataclassType | t.NamedTupleType):
            return _record_form_check(self._field_checks(node), getattr)
        if isinstance(node, t.TypedDictType):
            return _record_form_check(self._field_checks(node), _dict_get)
        if isinstance(node, t.UnionType):
            members = [self._unwrapped(m) for m in node.types]
            free = any(self.is_free_form(m) for m in members)
            # With a free-form member, a value no other member made is
            # free-form: the others are listed even where they hold none.
            options = [
                (self._matcher(m), self.check(m))
                for m in members
                if not self.is_free_form(m) and (free or self.check(m) is not None)
            ]
            return _union_form_check(options, free)
        raise DefinitionError(f"cannot check the free-form parts of {node!r}")

    def _field_checks(self, node: Any) -> list[tuple[str, _FormCheck]]:
        return [
            (f.name, check)
            for f in node.fields
            if (check := self.check(f.type)) is not None
        ]

    def _build_fix(self, node: Any) -> _FormFix:
        t = self._types
        if isinstance(node, t.ListType | t.VarTupleType):
            return _items_form_fix(self.fix(node.item_type))
        if isinstance(node, t.SetType | t.FrozenSetType):
            plainly = self._sorts_plainly(node.item_type)
            return _set_form_fix(self.fix(node.item_type), plainly)
        if isinstance(node, t.TupleType):
            return _positions_form_fix([self.fix(i) for i in node.item_types])
        if isinstance(node, t.NamedTupleType):
            return _positions_form_fix([self.fix(f.type) for f in node.fields])
        if self._is_mapping(node):
            keyed = not self._str_keyed(node)
            return _mapping_form_fix(keyed, self.fix(node.value_type))
        if isinstance(node, t.StructType | t.DataclassType | t.TypedDictType):
            fixes = [
                (f.name, fix)
                for f in node.fields
                if (fix := self.fix(f.type)) is not None
            ]
            if isinstance(node, t.StructType) and node.array_like:
                # Listed in field order, after the tag if there is one.
                first = 0 if node.tag is None else 1
                at = {f.name: first + i for i, f in enumerate(node.fields)}
                return _listed_record_form_fix([(at[n], n, f) for n, f in fixes])
            read = _dict_get if isinstance(node, t.TypedDictType) else getattr
            return _record_form_fix(fixes, read)
        if isinstance(node, t.UnionType):
            options = [
                (self._matcher(m), fix)
                for m in map(self._unwrapped, node.types)
                if not self.is_free_form(m) and (fix := self.fix(m)) is not None
            ]
            return _union_form_fix(options)
        raise DefinitionError(f"cannot store the builtin form of {node!r}")

    def _sorts_plainly(self, node: Any) -> bool:
        """Whether the stored forms of ``node``'s values are all strings or
        all numbers, which ``sorted`` orders as :func:`_stored_order` does."""
        node = self._unwrapped(node)
        t = self._types
        if isinstance(node, t.LiteralType):
            kinds = {type(v) for v in node.values}
            return kinds == {str} or kinds == {int}
        # Scalars, and the types stored as strings (or, an enum, as values of
        # one type).
        return isinstance(
            node,
            t.StrType
            | t.IntType
            | t.FloatType
            | t.EnumType
            | t.DateTimeType
            | t.DateType
            | t.TimeType
            | t.TimeDeltaType
            | t.UUIDType
            | t.DecimalType
            | t.BytesType,
        )

    def _matcher(self, node: Any) -> Callable[[Any], bool]:
        """Whether a converted value was made for the union member ``node``.

        msgspec allows one member of each kind (one array-like, one
        mapping-like, ...) in a union, so the value's type tells which.
        """
        import decimal
        import uuid

        import msgspec

        t = self._types
        exact: dict[type, tuple[type, ...]] = {
            t.NoneType: (type(None),),
            t.BoolType: (bool,),
            t.IntType: (int,),
            t.FloatType: (float,),
            t.StrType: (str,),
            t.BytesType: (bytes,),
            t.ByteArrayType: (bytearray,),
            t.MemoryViewType: (memoryview,),
            t.DateTimeType: (datetime.datetime,),
            t.DateType: (datetime.date,),
            t.TimeType: (datetime.time,),
            t.TimeDeltaType: (datetime.timedelta,),
            t.UUIDType: (uuid.UUID,),
            t.DecimalType: (decimal.Decimal,),
            t.RawType: (msgspec.Raw,),
            t.ExtType: (msgspec.msgpack.Ext,),
            t.ListType: (list,),
            t.SetType: (set,),
            t.FrozenSetType: (frozenset,),
            t.VarTupleType: (tuple,),
            t.TupleType: (tuple,),
            t.DictType: (dict,),
            # Not isinstance: a TypedDict class refuses it.
            t.TypedDictType: (dict,),
        }
        kinds = exact.get(type(node))
        if kinds is None and isinstance(node, t.LiteralType):
            kinds = tuple({type(v) for v in node.values})
        if kinds is not None:
            return lambda value: type(value) in kinds
        cls = getattr(node, "cls", None)
        if isinstance(cls, type):
            # Records, enums and custom types.
            return lambda value: isinstance(value, cls)
        return lambda value: False


def _str_keyed_check(value: Any) -> ReadOnlyDict:
    """The stored form of a ``dict[str, Any]`` value msgspec has converted.

    Its keys are strings: a str subclass (a StrEnum member) is stored as
    its characters, as ``to_builtins`` stores it.
    """
    out = {}
    for key, item in value.items():
        name = key if type(key) is str else _plain_str(key)
        _check_str(name)
        try:
            out[name] = _check_any(item)
        except _Invalid as err:
            err.at(name)
            raise
    return ReadOnlyDict(out)


def _dict_get(value: Any, name: str) -> Any:
    return value.get(name, _NOWHERE)


def _items_form_check(item: _FormCheck | None) -> _FormCheck:
    def check(value: Any) -> None:
        if item is None:
            return
        for i, part in enumerate(value):
            try:
                item(part)
            except _Invalid as err:
                err.at(i)
                raise

    return check


def _set_form_check(item: _FormCheck | None) -> _FormCheck:
    # A set's items have no position to name: the set is named.
    def check(value: Any) -> None:
        if item is None:
            return
        for part in value:
            item(part)

    return check


def _positions_form_check(items: list[_FormCheck | None]) -> _FormCheck:
    def check(value: Any) -> None:
        for i, (item, part) in enumerate(zip(items, value, strict=False)):
            if item is not None:
                try:
                    item(part)
                except _Invalid as err:
                    err.at(i)
                    raise

    return check


def _mapping_form_check(free_keys: bool, item: _FormCheck | None) -> _FormCheck:
    def check(value: Any) -> None:
        for key, part in value.items():
            if free_keys:
                if type(key) is not str:
                    raise _Invalid(
                        "", f"has a key that is not a string: {_describe(key)}"
                    )
                _check_str(key)
            if item is not None:
                try:
                    item(part)
                except _Invalid as err:
                    err.at(_step(key))
                    raise

    return check


def _record_form_check(
    fields: list[tuple[str, _FormCheck]], read: Callable[[Any, str], Any]
) -> _FormCheck:
    def check(value: Any) -> None:
        for name, field_check in fields:
            part = read(value, name)
            if part is _NOWHERE:
                continue
            try:
                field_check(part)
            except _Invalid as err:
                err.at(name)
                raise

    return check


def _union_form_check(
    options: list[tuple[Callable[[Any], bool], _FormCheck | None]], free: bool
) -> _FormCheck:
    def check(value: Any) -> None:
        for matches, option in options:
            if matches(value):
                if option is not None:
                    option(value)
                return
        if free:
            _check_any(value)

    return check


def _items_form_fix(item: _FormFix | None) -> _FormFix:
    def fix(conv: Any, out: Any) -> Any:
        if item is None:
            # A tuple's items, listed.
            return list(out)
        items: list[Any] = []
        try:
            for part, built in zip(conv, out, strict=True):
                items.append(item(part, built))
        except _Invalid as err:
            err.at(len(items))
            raise
        return items

    return fix


def _set_form_fix(item: _FormFix | None, plainly: bool) -> _FormFix:
    """Sort a set's stored items: their order then depends only on the items.

    ``plainly`` when they are all strings or all numbers: a key function
    would cost more than the sort.
    """

    def fix(conv: Any, out: Any) -> Any:
        if item is not None:
            # ``to_builtins`` lists the set in its iteration order, as zip does.
            out = [item(part, built) for part, built in zip(conv, out, strict=True)]
        return sorted(out) if plainly else sorted(out, key=_stored_order)

    return fix


def _positions_form_fix(items: list[_FormFix | None]) -> _FormFix:
    def fix(conv: Any, out: Any) -> Any:
        fixed = list(out)
        for i, item in enumerate(items):
            if item is not None and i < len(fixed):
                try:
                    fixed[i] = item(conv[i], fixed[i])
                except _Invalid as err:
                    err.at(i)
                    raise
        return fixed

    return fix


def _mapping_form_fix(keyed: bool, item: _FormFix | None) -> _FormFix:
    def fix(conv: Any, out: Any) -> Any:
        # Known limit: this sees keys after convert, which already merged a
        # given {"1": 1, 1: 2} for dict[int, int] into one key (one value is
        # dropped silently); collisions made by to_builtins are caught here.
        if keyed and len(out) != len(conv):
            # Keys stored as strings: 1 and "1", or two NaNs, become one.
            raise _Invalid(
                "",
                "has keys that would be stored as the same string: "
                f"{_shown(list(conv), 60)}",
            )
        if item is not None:
            for part, (key, built) in zip(conv.values(), out.items(), strict=True):
                try:
                    out[key] = item(part, built)
                except _Invalid as err:
                    err.at(key)
                    raise
        return out

    return fix


def _record_form_fix(
    fields: list[tuple[str, _FormFix]], read: Callable[[Any, str], Any]
) -> _FormFix:
    def fix(conv: Any, out: Any) -> Any:
        for name, field_fix in fields:
            # A default left out (omit_defaults) is not in ``out``.
            if name in out:
                try:
                    out[name] = field_fix(read(conv, name), out[name])
                except _Invalid as err:
                    err.at(name)
                    raise
        return out

    return fix


def _listed_record_form_fix(fields: list[tuple[int, str, _FormFix]]) -> _FormFix:
    def fix(conv: Any, out: Any) -> Any:
        for i, name, field_fix in fields:
            if i < len(out):
                try:
                    out[i] = field_fix(getattr(conv, name), out[i])
                except _Invalid as err:
                    err.at(name)
                    raise
        return out

    return fix


def _union_form_fix(options: list[tuple[Callable[[Any], bool], _FormFix]]) -> _FormFix:
    def fix(conv: Any, out: Any) -> Any:
        for matches, option in options:
            if matches(conv):
                return option(conv, out)
        return out

    return fix


def _check_forms(
    obj: Any, checks: tuple[tuple[str, _FormCheck], ...]
) -> dict[str, Any]:
    """Refuse a converted Struct whose free-form parts are not JSON.

    Returns what each check returned, by field: for a field checked by a
    stored check, the read-only copy to store.
    """
    results = {}
    try:
        for name, check in checks:
            results[name] = check(getattr(obj, name))
    except _Invalid as err:
        # ``name`` is the field being checked when it failed.
        err.at(name)
        unencodable = _unencodable(obj, err)
        if unencodable is not None:
            raise unencodable from None
        raise
    return results


def _fix_forms(
    obj: Any, plain: dict[str, Any], fixes: tuple[tuple[str, _FormFix], ...]
) -> None:
    """Put the stored form of the fields that need a fix into ``plain``."""
    try:
        for name, fix in fixes:
            plain[name] = fix(getattr(obj, name), plain[name])
    except _Invalid as err:
        err.at(name)
        raise


def _unencodable(obj: Any, err: _Invalid) -> _Invalid | None:
    """msgspec's reason for refusing the part of ``obj`` a free-form check refused.

    An object ``to_builtins`` has no form for (rather than one it would turn
    into another value) is refused with msgspec's reason and named by its
    field, as it was before free-form parts were checked. ``None`` when the
    part is not such an object.
    """
    import msgspec

    steps = list(reversed(err.steps))
    part = _msgspec_part(obj, steps)
    if (
        part is _NOWHERE
        or isinstance(part, _CONTAINERS)
        or hasattr(part, "__struct_fields__")
        or dataclasses.is_dataclass(part)
    ):
        # Not tried: to_builtins would copy all of it, however large.
        return None
    try:
        msgspec.to_builtins(part)
    except Exception as raised:
        reason = f"must be a JSON-compatible value ({_raised(raised)})"
        return _Invalid(str(steps[0]), reason)
    return None


def _msgspec_part(value: Any, steps: list[str | int]) -> Any:
    """The part of a converted value that ``steps`` lead to, or ``_NOWHERE``."""
    for step in steps:
        try:
            if isinstance(value, Mapping):
                value = value.get(step, _NOWHERE)
            elif isinstance(value, list | tuple) and type(step) is int:
                value = value[step] if 0 <= step < len(value) else _NOWHERE
            elif isinstance(step, str):
                value = getattr(value, step, _NOWHERE)
            else:
                value = _NOWHERE
        except Exception:
            value = _NOWHERE
        if value is _NOWHERE:
            break
    return value


def _compile_msgspec(struct: Any) -> StateSchema:
    import msgspec

    names = tuple(struct.__struct_fields__)
    renamed = _renamed_fields(struct)
    if renamed:
        raise DefinitionError(
            f"{struct.__name__}: fields {', '.join(map(repr, renamed))} are renamed; "
            "states are keyed by field names, so such a schema could accept no "
            "state; remove rename="
        )
    config = struct.__struct_config__
    shaping = [
        option
        for option, on in (
            ("tag", config.tag is not None),
            ("array_like", config.array_like),
            ("omit_defaults", config.omit_defaults),
        )
        if on
    ]
    if shaping:
        raise DefinitionError(
            f"{struct.__name__}: {', '.join(shaping)} would store states that are "
            "not a mapping of exactly its fields; remove them"
        )
    try:
        info: Any = msgspec.inspect.type_info(struct)
    except (TypeError, NameError) as err:
        # msgspec refuses some annotations only here (an Enum mixing str and
        # int values, a name that does not resolve).
        raise DefinitionError(
            f"{struct.__name__}: msgspec cannot use this Struct: {err}"
        ) from err
    _refuse_nested_renames(struct)

    forms = _MsgspecForms()
    # Fields whose check returns their stored form, and the other checks.
    whole = {f.name: c for f in info.fields if (c := forms.stored_check(f.type))}
    checks = tuple(
        (f.name, part)
        for f in info.fields
        if (part := whole.get(f.name) or forms.check(f.type))
    )
    fixes = tuple((f.name, fix) for f in info.fields if (fix := forms.fix(f.type)))

    # Keys of other types than str (int, float, UUID, ...) are stored as
    # strings and taken back from them, as in JSON. Only Structs with such
    # keys ask for it: str_keys makes a convert call about twice as dear.
    str_keys = forms.has_keys_stored_as_strings(info)
    set_field = msgspec.structs.force_setattr

    def check(value: Any) -> ReadOnlyDict:
        _check_fields(value, names)
        try:
            # strict=True is convert's default; passing any keyword argument
            # makes the call half as dear again.
            obj = msgspec.convert(dict(value), struct)
        except msgspec.ValidationError as err:
            raise _msgspec_refusal(value, str(err)) from None
        try:
            plain = msgspec.to_builtins(obj)
        except (TypeError, ValueError) as err:
            # An object msgspec has no plain form for.
            raise _msgspec_unbuilt(obj, names, err) from None
        return check_json_value(plain)  # type: ignore[no-any-return]

    # A check of its own for Structs with free-form, set, tuple or non-str
    # key parts: the others do not pay for them on every write.
    def check_forms(value: Any) -> ReadOnlyDict:
        _check_fields(value, names)
        try:
            obj = (
                msgspec.convert(dict(value), struct, str_keys=True)
                if str_keys
                else msgspec.convert(dict(value), struct)
            )
        except msgspec.ValidationError as err:
            raise _msgspec_refusal(value, str(err)) from None
        # Before to_builtins, which would copy a free-form value of any size.
        results = _check_forms(obj, checks)
        # Their stored form is in ``results``: to_builtins need not copy
        # them. The converted Struct is this check's own.
        for name in whole:
            set_field(obj, name, None)
        try:
            plain = (
                msgspec.to_builtins(obj, str_keys=True)
                if str_keys
                else msgspec.to_builtins(obj)
            )
        except (TypeError, ValueError) as err:
            raise _msgspec_unbuilt(obj, names, err) from None
        _fix_forms(obj, plain, fixes)
        if not whole:
            return check_json_value(plain)  # type: ignore[no-any-return]

        # The check of a field holding only free-form values made the copy
        # to store; the other fields are checked one by one, as the whole
        # state would be, so that copy is not made twice.
        out = {}
        for name, part in plain.items():
            if name in whole:
                out[name] = results[name]
            else:
                out[name] = check_json_value(part, name, 1)
        return ReadOnlyDict(out)

    fields = {f.name: f for f in info.fields}
    checked = dict(checks)
    fixed = dict(fixes)

    def stored_default(name: str, given: Any) -> Any:
        # As a write would store it.
        try:
            if name in checked:
                checked[name](given)
            built = msgspec.to_builtins(given, str_keys=True)
            if name in fixed:
                built = fixed[name](given, built)
        except _Invalid as err:
            err.at(name)
            raise
        return built

    def defaults(value: Mapping[str, Any], missing: list[str]) -> dict[str, Any]:
        found = {}
        for name in missing:
            info = fields[name]
            if info.default is not msgspec.NODEFAULT:
                found[name] = stored_default(name, info.default)
            else:
                found[name] = stored_default(name, info.default_factory())
        return found

    def required(name: str) -> bool:
        return bool(fields[name].required)

    stored = _stored_check(names, required, defaults)
    return StateSchema(
        struct, names, check_forms if checks or fixes else check, stored=stored
    )
