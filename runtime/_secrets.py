from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from runtime._errors import DefinitionError
from runtime._events import ReadOnlyDict, ReadOnlyList

logger = logging.getLogger(__name__)

MIN_SECRET_LENGTH = 6
"""The shortest secret accepted: shorter ones would mask ordinary words."""

MASK = "***"
"""What a secret is replaced with."""


class RunSecrets:
    """The secret values registered per run, and the masking they imply.

    Values are matched as substrings of every string (values and mapping keys,
    at any depth). Masking builds new read-only values; it never changes the
    value it is given. Thread-safe: registration replaces an immutable entry.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, frozenset[str]] = {}
        self._patterns: dict[str, re.Pattern[str]] = {}

    def register(self, run_id: str, values: Iterable[str]) -> None:
        """Add secret values for ``run_id`` (adding to any registered before)."""
        if not isinstance(run_id, str) or not run_id:
            raise DefinitionError(f"run_id must be a non-empty string, got {run_id!r}")
        if isinstance(values, str):
            raise DefinitionError(
                f"run {run_id}: secrets must be an iterable of strings, got one "
                "string; wrap it in a list"
            )

        found = []
        for index, value in enumerate(values):
            if not isinstance(value, str):
                raise DefinitionError(
                    f"run {run_id}: secret #{index + 1} must be a string, got "
                    f"{type(value).__name__}; nothing registered"
                )
            if len(value) < MIN_SECRET_LENGTH:
                raise DefinitionError(
                    f"run {run_id}: secret #{index + 1} is {len(value)} characters "
                    f"long; secrets must have at least {MIN_SECRET_LENGTH}, so that "
                    "masking does not hide ordinary text; nothing registered"
                )
            found.append(value)

        with self._lock:
            values = self._values.get(run_id, frozenset()) | frozenset(found)
            if not values:
                return
            # Longest first, so a secret that contains another is masked whole.
            ordered = sorted(values, key=len, reverse=True)
            self._values[run_id] = values
            self._patterns[run_id] = re.compile("|".join(map(re.escape, ordered)))
        logger.info("run %s: %d secret values registered", run_id, len(found))

    def end(self, run_id: str) -> bool:
        """Forget the secrets of ``run_id``; return whether it had any."""
        with self._lock:
            self._values.pop(run_id, None)
            return self._patterns.pop(run_id, None) is not None

    def pattern(self, run_id: str | None) -> re.Pattern[str] | None:
        """The compiled secrets of ``run_id``, or ``None`` when it has none.

        Costs one dict lookup. A ``run_id`` that cannot be a key (a caller's
        mistake, refused by the write's own checks) has none.
        """
        if run_id is None or not self._patterns:
            return None
        try:
            return self._patterns.get(run_id)
        except TypeError:
            return None

    def __len__(self) -> int:
        return len(self._patterns)


def mask_text(text: str, pattern: re.Pattern[str]) -> str:
    """Replace every secret in ``text``."""
    return pattern.sub(MASK, text)


def mask_value(value: Any, pattern: re.Pattern[str]) -> Any:
    """Return ``value`` with every secret replaced, at any depth and in keys.

    Strings, bytes (as UTF-8) and the items of lists, tuples, sets and
    mappings are masked; other objects are returned as they are. A masked
    container comes back read-only: mappings as ``ReadOnlyDict``, lists as
    ``ReadOnlyList``, sets as ``frozenset``, bytes as ``bytes``, tuples as
    tuples of their own type when it is a named tuple. Returns the very same
    object when nothing in it matched, so unmasked data is not copied.
    """
    if isinstance(value, str):
        return pattern.sub(MASK, value) if pattern.search(value) else value
    if value is None or isinstance(value, int | float):
        return value

    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        changed = False
        for key, item in value.items():
            new_key = mask_value(key, pattern)
            new_item = mask_value(item, pattern)
            if new_key is not key or new_item is not item:
                changed = True
            if new_key in out:
                suffix = 2
                while f"{new_key}#{suffix}" in out:
                    suffix += 1
                new_key = f"{new_key}#{suffix}"
            out[new_key] = new_item
        return ReadOnlyDict(out) if changed else value

    if isinstance(value, list | tuple | set | frozenset):
        items = [mask_value(item, pattern) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        if isinstance(value, list):
            return ReadOnlyList(items)
        if isinstance(value, set | frozenset):
            return frozenset(items)
        if hasattr(value, "_make"):
            return value._make(items)
        return tuple(items)

    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "surrogateescape")
        if not pattern.search(text):
            return value
        return pattern.sub(MASK, text).encode("utf-8", "surrogateescape")

    return value
