"""The code base passes its own lint, format and type checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["runtime", "actors", "monitoring", "bench"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_ruff_finds_no_lint_errors() -> None:
    done = _run("ruff", "check", ".")

    assert done.returncode == 0, done.stdout + done.stderr


def test_code_is_ruff_formatted() -> None:
    done = _run("ruff", "format", "--check", ".")

    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_no_type_errors_in_the_packages() -> None:
    done = _run("mypy", *PACKAGES)

    assert done.returncode == 0, done.stdout + done.stderr
