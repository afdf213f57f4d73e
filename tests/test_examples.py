from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_example_prints_the_trigger_and_the_status_history() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "incident.resolved",
        "1 None -> investigating",
        "2 investigating -> resolved",
    ]


def test_readme_quickstart_is_the_example_file() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()

    assert example.strip() in readme


def test_demo_command_prints_the_monitoring_triggers() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "monitoring._cli", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )

    assert done.returncode == 0, done.stderr
    events = [line.split()[1] for line in done.stdout.splitlines()[:-1]]
    assert events == [
        "catalog.created",
        "healthcheck.system_degraded",
        "incident.created",
        "healthcheck.system_healthy",
        "incident.resolved",
        "catalog.deleted",
        "incident.updated",
    ]


def test_nab_agent_config_example_is_the_one_the_replay_tests_check() -> None:
    from test_agent_replay import NAB_CONFIG

    example = (ROOT / "examples" / "nab-agent.toml").read_text()

    body = "\n".join(line for line in example.splitlines() if not line.startswith("#"))
    assert body.strip() == NAB_CONFIG.strip()
