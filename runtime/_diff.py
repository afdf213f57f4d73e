from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


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

    delta: dict[str, Any] = {}
    get = prev.get
    for field, value in next.items():
        old = get(field, _MISSING)
        if old is value:
            continue
        kind = type(value)
        if kind is type(old) and kind in _EXACT_EQ:
            if old != value:
                delta[field] = value
        elif old is _MISSING or not same_value(old, value):
            delta[field] = value
    for field in prev:
        if field not in next:
            delta[field] = None
    return delta, tuple(delta)
