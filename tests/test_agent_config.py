"""The agent's configuration: defaults, merging, durations and precise errors."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from monitoring import (
    DEFAULT_CONFIG_TOML,
    AgentConfigError,
    load_agent_config,
    parse_duration,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_built_in_defaults_cover_the_machine_metrics() -> None:
    """Every metric of the default source has a family with thresholds."""
    config = load_agent_config()

    for name in (
        "cpu_used_percent",
        "memory_used_percent",
        "disk_used_percent",
        "load1_per_cpu",
    ):
        assert config.has_family(name), name
    assert config.interval == 5.0
    assert config.resolve_after == 900.0
    assert config.rule_for("cpu_used_percent").hold == 300.0


def test_the_default_config_text_is_valid_toml_that_users_can_copy() -> None:
    """--print-config output parses and names every section."""
    data = tomllib.loads(DEFAULT_CONFIG_TOML)

    assert set(data) == {"agent", "defaults", "families"}
    assert "cpu" in data["families"]


def test_a_user_family_overrides_only_the_keys_it_sets(tmp_path: Path) -> None:
    """Merging is key by key: the match patterns and hold stay from the defaults."""
    path = write(tmp_path, "[families.cpu]\ndegraded_above = 70\n")

    rule = load_agent_config(path).rule_for("cpu_used_percent")

    assert rule.degraded_above == 70.0
    assert rule.unhealthy_above == 95.0
    assert rule.hold == 300.0


def test_user_families_are_matched_before_the_defaults(tmp_path: Path) -> None:
    """A new family whose pattern also matches a default family's metric wins."""
    path = write(
        tmp_path,
        '[families.mine]\nmatch = ["cpu_*"]\nunhealthy_above = 50\nfor = "1m"\n',
    )

    rule = load_agent_config(path).rule_for("cpu_used_percent")

    assert rule.family == "mine"
    assert rule.hold == 60.0
    assert rule.degraded_above is None


def test_an_empty_match_switches_a_default_family_off(tmp_path: Path) -> None:
    """`match = []` removes a family; its metrics fall back to no thresholds."""
    path = write(tmp_path, "[families.cpu]\nmatch = []\n")

    config = load_agent_config(path)

    assert not config.has_family("cpu_used_percent")
    assert config.rule_for("cpu_used_percent").classify(100.0) == 0


def test_classify_uses_strict_comparisons_and_nan_breaches_nothing(
    tmp_path: Path,
) -> None:
    """Like PromQL's `>`: equal to a threshold is not over it; NaN never is."""
    path = write(
        tmp_path,
        "[families.t]\nmatch = ['t']\ndegraded_above = 10\nunhealthy_above = 20\n"
        "degraded_below = 0\nunhealthy_below = -10\n",
    )
    rule = load_agent_config(path).rule_for("t")

    levels = [rule.classify(v) for v in (10, 10.5, 20, 21, 0, -0.5, -11, math.nan)]

    assert levels == [0, 1, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        (45, 45.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("0s", 0.0),
        ("off", None),
    ],
)
def test_durations_read_units_and_off(text: object, seconds: float | None) -> None:
    """Durations are seconds or unit strings; "off" disables."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "-5s", "m5", "", "1h-5m", True, [5]])
def test_bad_durations_are_refused(text: object) -> None:
    """Anything that is not a duration raises ValueError naming the value."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e400", "is too large, got '1e400'"),
        (math.inf, "is too large, got inf"),
        ("nan", "must be a duration such as '5m', got 'nan'"),
        ("-1e400", "must be a duration of 0 or more, got '-1e400'"),
    ],
)
def test_durations_that_are_no_finite_number_say_what_is_wrong(
    text: object, message: str
) -> None:
    """Too large is told apart from negative and from not a number."""
    with pytest.raises(ValueError) as caught:
        parse_duration(text)

    assert str(caught.value) == message


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    """The TOML parser's position is kept."""
    path = write(tmp_path, "[agent]\ninterval = \n")

    with pytest.raises(AgentConfigError) as caught:
        load_agent_config(path)

    assert caught.value.line == 2
    assert str(caught.value).startswith(f"{path}:2: TOML syntax")


def test_an_unknown_key_names_the_file_line_and_key(tmp_path: Path) -> None:
    """A typo in a family is reported where it is."""
    path = write(
        tmp_path,
        '# my agent\n\n[families.disk]\nmatch = ["disk_*"]\ndegraded_abve = 80\n',
    )

    with pytest.raises(AgentConfigError) as caught:
        load_agent_config(path)

    err = caught.value
    assert (err.path, err.line, err.key) == (
        str(path),
        5,
        "families.disk.degraded_abve",
    )
    assert str(err).startswith(f"{path}:5: families.disk.degraded_abve: unknown key")


def test_a_wrong_type_names_the_file_line_and_key(tmp_path: Path) -> None:
    """A threshold must be a number."""
    path = write(tmp_path, '[families.cpu]\n\nunhealthy_above = "high"\n')

    with pytest.raises(AgentConfigError, match=r":3: families\.cpu\.unhealthy_above: "):
        load_agent_config(path)


def test_a_bad_duration_names_the_file_line_and_key(tmp_path: Path) -> None:
    """Durations in [defaults] are checked too."""
    path = write(tmp_path, '[defaults]\nfor = "5 minutes"\n')

    with pytest.raises(
        AgentConfigError, match=r":2: defaults\.for: must be a duration"
    ):
        load_agent_config(path)


def test_inverted_thresholds_are_refused(tmp_path: Path) -> None:
    """degraded_above must not lie above unhealthy_above."""
    path = write(
        tmp_path,
        "[families.x]\nmatch = ['x']\ndegraded_above = 90\nunhealthy_above = 80\n",
    )

    with pytest.raises(
        AgentConfigError, match=r":3: families\.x\.degraded_above: 90 is above"
    ):
        load_agent_config(path)


def _default_line(family: str, key: str) -> int:
    """The line of ``key`` in the built-in ``[families.<family>]`` table."""
    lines = DEFAULT_CONFIG_TOML.split("\n")
    table = lines.index(f"[families.{family}]")
    return next(
        number
        for number, line in enumerate(lines[table:], start=table + 1)
        if line.startswith(f"{key} =")
    )


@pytest.mark.parametrize(
    ("family", "text", "key", "reason"),
    [
        (
            "cpu",
            "unhealthy_above = 50",
            "unhealthy_above",
            "50 is below degraded_above (85 in <built-in defaults>:{line})",
        ),
        (
            "cpu",
            "degraded_above = 99",
            "degraded_above",
            "99 is above unhealthy_above (95 in <built-in defaults>:{line})",
        ),
        (
            "node_filesystem",
            "degraded_below = 5e8",
            "degraded_below",
            "5e+08 is below unhealthy_below (1e+09 in <built-in defaults>:{line})",
        ),
        (
            "node_filesystem",
            "unhealthy_above = 5e8",
            "unhealthy_above",
            "5e+08 is not above unhealthy_below (1e+09 in <built-in defaults>:{line})"
            "; the *_below thresholds must lie under the *_above ones",
        ),
    ],
)
def test_a_threshold_at_odds_with_a_default_is_blamed_on_the_user_file(
    family: str, text: str, key: str, reason: str, tmp_path: Path
) -> None:
    """The error names the user's file, line and key, and the default it meets."""
    path = write(tmp_path, f"# my thresholds\n[families.{family}]\n{text}\n")
    other = reason.split(" (")[0].split()[-1]
    reason = reason.format(line=_default_line(family, other))

    with pytest.raises(AgentConfigError) as caught:
        load_agent_config(path)

    err = caught.value
    assert (err.path, err.line, err.key) == (str(path), 3, f"families.{family}.{key}")
    assert str(err) == f"{path}:3: families.{family}.{key}: {reason}"


def test_thresholds_at_odds_in_one_file_name_no_other_file(tmp_path: Path) -> None:
    """When one file sets both, the message has the values and no location."""
    path = write(
        tmp_path,
        "[families.x]\nmatch = ['x']\nunhealthy_below = 5\ndegraded_above = 4\n",
    )

    with pytest.raises(AgentConfigError) as caught:
        load_agent_config(path)

    assert str(caught.value) == (
        f"{path}:3: families.x.unhealthy_below: 5 is not below degraded_above (4); "
        "the *_below thresholds must lie under the *_above ones"
    )


def test_a_family_without_match_is_refused(tmp_path: Path) -> None:
    """A new family needs its patterns; the error points at its table."""
    path = write(tmp_path, "[agent]\n\n[families.orphan]\nunhealthy_above = 1\n")

    with pytest.raises(AgentConfigError, match=r":3: families\.orphan: has no 'match'"):
        load_agent_config(path)


def test_an_unknown_section_is_refused(tmp_path: Path) -> None:
    """Only agent, defaults and families exist."""
    path = write(tmp_path, "[agent]\ninterval = 1\n[alerts]\nx = 1\n")

    with pytest.raises(AgentConfigError, match=r":3: alerts: unknown section"):
        load_agent_config(path)


def test_a_missing_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    """Unreadable files are configuration errors too."""
    path = tmp_path / "nope.toml"

    with pytest.raises(AgentConfigError, match=r"nope\.toml:1: cannot read the file"):
        load_agent_config(path)


@pytest.mark.parametrize(
    ("text", "line", "key", "reason"),
    [
        ("[agent]\n\ninterval = 1e300\n", 3, "agent.interval", "at most 1 day"),
        ('[agent]\ninterval = "2d"\n', 2, "agent.interval", "at most 1 day"),
        ("[defaults]\nfor = 1e300\n", 2, "defaults.for", "at most 100 years"),
        ('[agent]\nresolve_after = "40000d"\n', 2, "agent.resolve_after", "100 years"),
    ],
)
def test_durations_too_long_to_wait_for_are_refused(
    text: str, line: int, key: str, reason: str, tmp_path: Path
) -> None:
    """No setting may ask for a wait no clock or timer can take."""
    path = write(tmp_path, text)

    with pytest.raises(AgentConfigError, match=reason) as caught:
        load_agent_config(path)

    assert (caught.value.line, caught.value.key) == (line, key)


@pytest.mark.parametrize(
    "text",
    [
        '[agent]\n\n[families]\n# cpu\ncpu = { match = ["x"], for = "soon" }\n',
        '\n\n\n\nfamilies.cpu = { match = ["x"], for = "soon" }\n',
        '# top level\n\n\n\nfamilies = { cpu = { match = ["x"], for = "soon" } }\n',
    ],
    ids=["in-a-table", "dotted", "nested"],
)
def test_an_error_inside_an_inline_table_points_at_its_line(
    text: str, tmp_path: Path
) -> None:
    """An inline table is on one line: that line is the key's."""
    path = write(tmp_path, text)

    with pytest.raises(AgentConfigError) as caught:
        load_agent_config(path)

    assert (caught.value.line, caught.value.key) == (5, "families.cpu.for")
