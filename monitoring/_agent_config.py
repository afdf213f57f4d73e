from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HEALTHY, DEGRADED, UNHEALTHY = 0, 1, 2
"""Check levels, best first; ``LEVEL_NAMES[level]`` is the status name."""

LEVEL_NAMES: tuple[str, ...] = ("healthy", "degraded", "unhealthy")

DEFAULT_CONFIG_NAME = "<built-in defaults>"

DEFAULT_CONFIG_TOML = """\
# entity-runtime agent: thresholds and hold times.
#
# A user file (--config) is merged onto these defaults key by key: a family
# with the name of a default family changes only the keys it sets, and
# `match = []` switches a default family off. Durations are seconds or
# strings such as "500ms", "30s", "5m", "1h30m", "2d"; "off" disables one.

[agent]
interval = "5s"          # how often live sources are read
resolve_after = "15m"    # a system healthy this long resolves its open incident

[defaults]               # what every family inherits unless it sets its own
for = "5m"               # a worse status must hold this long before it counts
recover_for = "5m"       # a better status must hold this long before it counts
stale_after = "1h"       # a longer gap between samples restarts pending changes

# A family applies to every metric whose name matches one of its glob
# patterns; the first family that matches wins (user families first). A value
# above `*_above` or below `*_below` breaches that level; NaN breaches none.

[families.cpu]
match = ["cpu_used_percent", "*cpu_utilization*"]
degraded_above = 85
unhealthy_above = 95

[families.memory]
match = ["memory_used_percent"]
degraded_above = 90
unhealthy_above = 97

[families.disk]
match = ["disk_used_percent"]
degraded_above = 85
unhealthy_above = 95

[families.load]
match = ["load1_per_cpu"]
degraded_above = 1.5
unhealthy_above = 3

[families.node_filesystem]
match = ["node_filesystem_avail_bytes"]
unhealthy_below = 1e9
for = "1m"

[families.up]
match = ["up"]
unhealthy_below = 1
for = "0s"
recover_for = "0s"
"""

MAX_INTERVAL = 86400.0
"""The longest interval between two reads of a live source: one day."""

MAX_DURATION = 100 * 365 * 86400.0
"""The longest duration any setting accepts: 100 years."""

_INTERVAL_LIMIT = (MAX_INTERVAL, "1 day")
_DURATION_LIMIT = (MAX_DURATION, "100 years")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_AGENT_KEYS = {"interval", "resolve_after"}
_HOLD_KEYS = {"for", "recover_for", "stale_after"}
_THRESHOLD_KEYS = (
    "degraded_above",
    "unhealthy_above",
    "degraded_below",
    "unhealthy_below",
)
_FAMILY_KEYS = {"match", *_HOLD_KEYS, *_THRESHOLD_KEYS}


class AgentConfigError(ValueError):
    """A configuration file (or a value in it) cannot be used.

    The message reads ``FILE:LINE: KEY: REASON`` so an editor can jump to it.

    Attributes:
        path: the file, or ``<built-in defaults>``.
        line: the 1-based line of the offending key (or of the syntax error).
        key: the dotted key, e.g. ``families.cpu.for``; ``None`` for a syntax
            error.
        reason: what is wrong and what was expected.
    """

    def __init__(self, path: str, line: int, key: str | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.reason = reason
        where = f"{path}:{line}"
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


@dataclasses.dataclass(frozen=True, slots=True)
class CheckRule:
    """Thresholds and hold times for one metric family.

    Attributes:
        family: the family's name (``-`` for metrics that no family matches).
        degraded_above, unhealthy_above, degraded_below, unhealthy_below:
            the thresholds (``None``: not used); comparisons are strict, as
            in PromQL, so a value equal to a threshold does not breach it.
        hold: seconds a worse status must hold before the check takes it.
        recover_hold: seconds a better status must hold.
        stale_after: a gap between two samples of one series longer than
            this restarts its pending changes (``None``: never).
    """

    family: str
    degraded_above: float | None = None
    unhealthy_above: float | None = None
    degraded_below: float | None = None
    unhealthy_below: float | None = None
    hold: float = 300.0
    recover_hold: float = 300.0
    stale_after: float | None = 3600.0

    @property
    def has_thresholds(self) -> bool:
        """Whether any threshold is set (a check without one is always healthy)."""
        return any(getattr(self, key) is not None for key in _THRESHOLD_KEYS)

    def classify(self, value: float) -> int:
        """Return the level a single sample breaches (``HEALTHY`` for NaN)."""
        if _breaches(value, self.unhealthy_above, self.unhealthy_below):
            return UNHEALTHY
        if _breaches(value, self.degraded_above, self.degraded_below):
            return DEGRADED
        return HEALTHY


def _breaches(value: float, above: float | None, below: float | None) -> bool:
    # NOTE: every comparison with NaN is false, so NaN breaches nothing.
    return (above is not None and value > above) or (
        below is not None and value < below
    )


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """The agent's settings, validated.

    Attributes:
        interval: seconds between two reads of a live source.
        resolve_after: seconds a system must stay healthy before its open
            incident is resolved.
        families: the families in matching order.
        fallback: the rule of metrics no family matches (no thresholds).
        sources: the files the configuration was read from, in merge order.
    """

    interval: float
    resolve_after: float
    families: tuple[tuple[tuple[str, ...], CheckRule], ...]
    fallback: CheckRule
    sources: tuple[str, ...] = ()
    _cache: dict[str, CheckRule] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    def rule_for(self, metric_name: str) -> CheckRule:
        """Return the rule of the first family whose pattern matches the name.

        Cost: one pass over the patterns per new name; cached afterwards.
        """
        rule = self._cache.get(metric_name)
        if rule is not None:
            return rule
        rule = self.fallback
        for patterns, candidate in self.families:
            if any(fnmatch.fnmatchcase(metric_name, p) for p in patterns):
                rule = candidate
                break
        self._cache[metric_name] = rule
        return rule

    def has_family(self, metric_name: str) -> bool:
        """Whether a family with thresholds covers the metric name."""
        return self.rule_for(metric_name).has_thresholds


def parse_duration(value: object) -> float | None:
    """Parse ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"off"`` or a number of seconds.

    Returns:
        Seconds (``None`` for ``"off"``).

    Raises:
        ValueError: not a duration (NaN included), negative, or too large to
            be a number of seconds (``1e400``, infinity).
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as '5m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "off":
            return None
        seconds = _parse_duration_text(text, value)
    else:
        raise ValueError(f"must be a duration such as '5m', got {value!r}")
    if math.isnan(seconds):
        raise ValueError(f"must be a duration such as '5m', got {value!r}")
    if seconds == math.inf:
        raise ValueError(f"is too large, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must be a duration of 0 or more, got {value!r}")
    return seconds


def _parse_duration_text(text: str, original: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(
            f"must be a duration such as '30s', '5m' or '1h30m', got {original!r}"
        )
    return total


def load_agent_config(
    path: str | os.PathLike[str] | None = None, *, defaults: bool = True
) -> AgentConfig:
    """Read the built-in defaults, merge a user file onto them and validate.

    Args:
        path: a TOML file, or ``None`` for the defaults alone.
        defaults: merge onto the built-in defaults (``False``: the file alone).

    Returns:
        The validated configuration.

    Raises:
        AgentConfigError: unreadable file, TOML syntax error, unknown key,
            wrong type or inconsistent thresholds; the message names the
            file, the line and the key.
    """
    layers: list[_Layer] = []
    if defaults:
        layers.append(_Layer.parse(DEFAULT_CONFIG_NAME, DEFAULT_CONFIG_TOML, 0))
    if path is not None:
        name = os.fspath(path)
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise AgentConfigError(
                name, 1, None, f"cannot read the file: {err}"
            ) from err
        layers.append(_Layer.parse(name, text, len(layers)))

    for layer in layers:
        layer.check_shape()
    config = _merge(layers)
    logger.debug(
        "agent config from %s: %d families",
        ", ".join(layer.name for layer in layers) or "nothing",
        len(config.families),
    )
    return config


@dataclasses.dataclass
class _Layer:
    name: str
    text: str
    data: dict[str, Any]
    rank: int
    """Its place in the merge order: a later layer overrides an earlier one."""

    @classmethod
    def parse(cls, name: str, text: str, rank: int) -> _Layer:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            found = re.search(r"\(at line (\d+)", str(err))
            line = int(found.group(1)) if found else 1
            reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))
            raise AgentConfigError(name, line, None, f"TOML syntax: {reason}") from None
        return cls(name, text, data, rank)

    def error(self, key: str, reason: str) -> AgentConfigError:
        return AgentConfigError(self.name, locate_key(self.text, key), key, reason)

    def check_shape(self) -> None:
        for section, value in self.data.items():
            if section not in ("agent", "defaults", "families"):
                raise self.error(
                    section, "unknown section; expected agent, defaults or families"
                )
            if not isinstance(value, dict):
                raise self.error(section, "must be a table ([...])")

        for key in self.data.get("agent", {}):
            if key not in _AGENT_KEYS:
                raise self.error(f"agent.{key}", _unknown(key, _AGENT_KEYS))
        for key in self.data.get("defaults", {}):
            if key not in _HOLD_KEYS:
                raise self.error(f"defaults.{key}", _unknown(key, _HOLD_KEYS))
        for family, table in self.data.get("families", {}).items():
            if not isinstance(table, dict):
                raise self.error(f"families.{family}", "must be a table")
            for key in table:
                if key not in _FAMILY_KEYS:
                    raise self.error(
                        f"families.{family}.{key}", _unknown(key, _FAMILY_KEYS)
                    )


def _unknown(key: str, known: Iterable[str]) -> str:
    return f"unknown key {key!r}; expected one of {', '.join(sorted(known))}"


def _merge(layers: list[_Layer]) -> AgentConfig:
    # Each value is kept with the layer it came from, so a validation error
    # can name the right file and line.
    agent: dict[str, tuple[Any, _Layer]] = {}
    defaults: dict[str, tuple[Any, _Layer]] = {}
    families: dict[str, dict[str, tuple[Any, _Layer]]] = {}
    declared: dict[str, _Layer] = {}
    order: list[str] = []

    for layer in reversed(layers):
        for name in layer.data.get("families", {}):
            if name not in order:
                order.append(name)
    for layer in layers:
        for key, value in layer.data.get("agent", {}).items():
            agent[key] = (value, layer)
        for key, value in layer.data.get("defaults", {}).items():
            defaults[key] = (value, layer)
        for name, table in layer.data.get("families", {}).items():
            declared.setdefault(name, layer)
            target = families.setdefault(name, {})
            for key, value in table.items():
                target[key] = (value, layer)

    interval = _duration(
        agent, "agent", "interval", 5.0, allow_off=False, most=_INTERVAL_LIMIT
    )
    if interval <= 0:
        value, layer = agent["interval"]
        raise layer.error("agent.interval", f"must be more than 0, got {value!r}")
    resolve_after = _duration(agent, "agent", "resolve_after", 900.0, allow_off=False)
    hold = _duration(defaults, "defaults", "for", 300.0, allow_off=False)
    recover = _duration(defaults, "defaults", "recover_for", 300.0, allow_off=False)
    stale = _duration(defaults, "defaults", "stale_after", 3600.0, allow_off=True)

    built = []
    for name in order:
        table = families[name]
        patterns = _patterns(table, name, declared[name])
        if not patterns:
            continue
        rule = CheckRule(
            family=name,
            hold=_duration(table, f"families.{name}", "for", hold, allow_off=False),
            recover_hold=_duration(
                table, f"families.{name}", "recover_for", recover, allow_off=False
            ),
            stale_after=_duration(
                table, f"families.{name}", "stale_after", stale, allow_off=True
            ),
            **_thresholds(table, name),
        )
        built.append((patterns, rule))

    fallback = CheckRule("-", hold=hold, recover_hold=recover, stale_after=stale)
    return AgentConfig(
        interval=interval,
        resolve_after=resolve_after,
        families=tuple(built),
        fallback=fallback,
        sources=tuple(layer.name for layer in layers),
    )


def _duration(
    table: Mapping[str, tuple[Any, _Layer]],
    prefix: str,
    key: str,
    default: float | None,
    *,
    allow_off: bool,
    most: tuple[float, str] = _DURATION_LIMIT,
) -> Any:
    if key not in table:
        return default
    value, layer = table[key]
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise layer.error(f"{prefix}.{key}", str(err)) from None
    if seconds is None and not allow_off:
        raise layer.error(f"{prefix}.{key}", "cannot be 'off'; use '0s' for no hold")
    limit, words = most
    if seconds is not None and seconds > limit:
        raise layer.error(
            f"{prefix}.{key}", f"must be at most {words} ({limit:g} s), got {value!r}"
        )
    return seconds


def _patterns(
    table: Mapping[str, tuple[Any, _Layer]], name: str, declared: _Layer
) -> tuple[str, ...]:
    if "match" not in table:
        raise declared.error(
            f"families.{name}", "has no 'match' (a list of metric name patterns)"
        )
    value, layer = table["match"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise layer.error(
            f"families.{name}.match",
            f"must be a list of non-empty glob patterns, got {value!r}",
        )
    return tuple(value)


def _thresholds(
    table: Mapping[str, tuple[Any, _Layer]], name: str
) -> dict[str, float | None]:
    found: dict[str, float | None] = {}
    for key in _THRESHOLD_KEYS:
        if key not in table:
            found[key] = None
            continue
        value, layer = table[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise layer.error(
                f"families.{name}.{key}", f"must be a finite number, got {value!r}"
            )
        found[key] = float(value)

    degraded_above, unhealthy_above = found["degraded_above"], found["unhealthy_above"]
    degraded_below, unhealthy_below = found["degraded_below"], found["unhealthy_below"]
    if (
        degraded_above is not None
        and unhealthy_above is not None
        and degraded_above > unhealthy_above
    ):
        raise _at_odds(
            table,
            name,
            ("degraded_above", "is above", "unhealthy_above"),
            ("unhealthy_above", "is below", "degraded_above"),
        )
    if (
        degraded_below is not None
        and unhealthy_below is not None
        and degraded_below < unhealthy_below
    ):
        raise _at_odds(
            table,
            name,
            ("degraded_below", "is below", "unhealthy_below"),
            ("unhealthy_below", "is above", "degraded_below"),
        )
    given = {key: value for key, value in found.items() if value is not None}
    lows = [key for key in ("degraded_below", "unhealthy_below") if key in given]
    highs = [key for key in ("degraded_above", "unhealthy_above") if key in given]
    if lows and highs:
        # The highest *_below and the lowest *_above: the pair that clashes
        # if any does (ties keep the degraded_* key).
        low = max(lows, key=given.__getitem__)
        high = min(highs, key=given.__getitem__)
        if given[low] >= given[high]:
            raise _at_odds(
                table,
                name,
                (low, "is not below", high),
                (high, "is not above", low),
                "; the *_below thresholds must lie under the *_above ones",
            )
    return found


def _at_odds(
    table: Mapping[str, tuple[Any, _Layer]],
    name: str,
    first: tuple[str, str, str],
    second: tuple[str, str, str],
    note: str = "",
) -> AgentConfigError:
    # Two thresholds of one family clash. The error goes to the key set in
    # the later file (the user's file rather than the built-in defaults),
    # worded from that key's side: ``first`` when both come from one file.
    key, verb, other = first
    if table[second[0]][1].rank > table[first[0]][1].rank:
        key, verb, other = second
    value, layer = table[key]
    other_value, other_layer = table[other]
    where = ""
    if other_layer is not layer:
        line = locate_key(other_layer.text, f"families.{name}.{other}")
        where = f" in {other_layer.name}:{line}"
    return layer.error(
        f"families.{name}.{key}",
        f"{value:g} {verb} {other} ({other_value:g}{where}){note}",
    )


_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(r"^\s*([A-Za-z0-9_\-\.\"' ]+?)\s*=")


def locate_key(text: str, dotted: str) -> int:
    """Return the 1-based line that sets a dotted key in a TOML text.

    Understands table headers, (dotted) keys and inline tables (a TOML inline
    table is on one line, so a key inside one is on the line of the key that
    holds the table). Falls back to the line of the key's table, then to
    line 1.
    """
    wanted = dotted.split(".")
    best = 1
    table: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        header = _TABLE_HEADER.match(line)
        if header:
            table = _split_key(header.group(1))
            if table == wanted:
                return number
            if table == wanted[: len(table)] and len(table) < len(wanted):
                best = number
            continue
        found = _KEY_LINE.match(line)
        if found:
            key = table + _split_key(found.group(1))
            if key == wanted:
                return number
            if key == wanted[: len(key)] and line[found.end() :].lstrip()[:1] == "{":
                return number
    return best


def _split_key(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in key.split(".")]
