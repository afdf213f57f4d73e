from __future__ import annotations

import math
from collections.abc import Mapping
from math import copysign
from typing import Any

from runtime._events import ReadOnlyDict


def same_value(a: Any, b: Any) -> bool:
    """Compare two JSON-compatible values structurally and strictly by type.

    Unlike ``==``, ``True`` and ``1`` or ``1`` and ``1.0`` are different values,
    because they serialise differently.
    """
    if a is b:
        return True

    kind = type(a)
    if kind is not type(b):
        # dict and list subclasses (the read-only views) compare as their base.
        if isinstance(a, dict) and isinstance(b, dict):
            kind = dict
        elif isinstance(a, list) and isinstance(b, list):
            kind = list
        else:
            return False

    if kind is dict or isinstance(a, dict):
        if len(a) != len(b) or a.keys() != b.keys():
            return False
        return all(same_value(a[k], b[k]) for k in a)
    if kind is list or isinstance(a, list):
        return len(a) == len(b) and all(map(same_value, a, b))
    if kind is float:
        # 0.0 and -0.0 are equal numbers but different values on the wire.
        return a == b and (a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b))
    return bool(a == b)


_MISSING = object()

_EXACT_EQ = frozenset((str, int, bool))
"""Types whose ``==`` between two values of that same type is :func:`same_value`."""


def diff_states(
    prev: Mapping[str, Any] | None, next: Mapping[str, Any] | None
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Return ``(delta, changed_fields)`` between two states.

    ``delta`` maps each changed field to its new value; a field that ``next``
    no longer has maps to ``None``. On a create every field of ``next`` is
    changed; on a tombstone every field of ``prev`` is, with ``delta`` empty.
    Fields are listed in ``next``'s order, then fields only ``prev`` had.
    """
    if next is None:
        return {}, tuple(prev) if prev is not None else ()
    if prev is None:
        return dict(next), tuple(next)

    delta = _delta(prev, next)
    return delta, tuple(delta)


_NO_CHANGE: tuple[ReadOnlyDict, tuple[str, ...]] = (ReadOnlyDict(), ())


def diff_change(
    prev: Mapping[str, Any] | None, next: Mapping[str, Any]
) -> tuple[ReadOnlyDict, tuple[str, ...]]:
    """:func:`diff_states` for a write that keeps the entity, delta read-only.

    The write path's form: the delta goes into the change event as it is, and
    on a create it is ``next`` itself when that is read-only already.
    """
    if prev is None:
        if type(next) is not ReadOnlyDict:
            next = ReadOnlyDict(next)
        return next, tuple(next)

    delta = _delta(prev, next)
    if not delta:
        return _NO_CHANGE
    return ReadOnlyDict(delta), tuple(delta)


def _delta(prev: Mapping[str, Any], next: Mapping[str, Any]) -> dict[str, Any]:
    """The changed fields of ``next`` over ``prev`` with their new values."""
    delta: dict[str, Any] = {}
    get = prev.get
    added = 0
    for field, value in next.items():
        old = get(field, _MISSING)
        if old is value:
            continue
        kind = type(value)
        if kind is type(old) and kind in _EXACT_EQ:
            if old != value:
                delta[field] = value
        elif old is _MISSING:
            delta[field] = value
            added += 1
        elif not same_value(old, value):
            delta[field] = value

    # Every field of ``next`` but the ``added`` ones is in ``prev``: ``prev``
    # has a field that ``next`` lacks only if it has more than that many.
    if len(prev) > len(next) - added:
        for field in prev:
            if field not in next:
                delta[field] = None
    return delta


def diff_scalars(
    prev: Mapping[str, Any] | None, next: ReadOnlyDict
) -> tuple[ReadOnlyDict, tuple[str, ...]]:
    """:func:`diff_change` for a ``next`` whose values are all scalars.

    Scalars are ``str``, ``int``, ``float``, ``bool`` and ``None``: for them
    :func:`same_value` is "same type and ``==``, and the same sign for a zero
    float", one expression per field, which the write path of kinds with flat
    schemas runs instead of the general loop. ``prev`` may hold anything.
    """
    if prev is None:
        return next, tuple(next)

    delta: dict[str, Any] = {}
    get = prev.get
    added = 0
    for field, value in next.items():
        old = get(field, _MISSING)
        if old is not value and (
            old != value
            or type(old) is not type(value)
            or (value == 0.0 and copysign(1.0, old) != copysign(1.0, value))
        ):
            delta[field] = value
            if old is _MISSING:
                added += 1

    # As in _delta: only then can ``prev`` have a field that ``next`` lacks.
    if len(prev) > len(next) - added:
        for field in prev:
            if field not in next:
                delta[field] = None
    if not delta:
        return _NO_CHANGE
    return ReadOnlyDict(delta), tuple(delta)
