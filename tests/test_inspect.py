from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Ticket, ticket

from runtime import Runtime
from runtime.testing import FakeClock


def _inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitoring._cli", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _fill(data_dir: Path) -> None:
    clock = FakeClock()
    rt = Runtime(data_dir=data_dir, clock=clock)
    tickets = rt.define_entity("ticket", Ticket)
    rows: dict[str, Any] = {"a-1": ticket()}
    rt.define_entity(
        "remote", Ticket, read=lambda ids: {i: rows[i] for i in ids if i in rows}
    )
    with rt:
        tickets.mutate("t-1", lambda prev: ticket(), actor="alice")
        clock.advance(5)
        tickets.mutate("t-1", lambda prev: ticket(status="closed"))
        tickets.mutate("t-2", lambda prev: ticket())
        rt.snapshot()
        tickets.remove("t-2")
        rt.handle("remote").mutate("a-1", lambda prev: ticket(severity="high"))


def test_inspect_lists_kinds_with_their_entity_counts(tmp_path: Path) -> None:
    _fill(tmp_path)

    done = _inspect("--data-dir", str(tmp_path))

    assert done.returncode == 0, done.stderr
    assert "seq=5, 5 changes in the log" in done.stdout
    assert "  ticket: 1 entities" in done.stdout
    assert "  remote: 1 ids in the log (plugin-backed)" in done.stdout


def test_inspect_shows_one_entitys_state_and_history(tmp_path: Path) -> None:
    _fill(tmp_path)

    ids = _inspect("--data-dir", str(tmp_path), "ticket")
    shown = _inspect("--data-dir", str(tmp_path), "ticket", "t-1")

    assert ids.stdout.split() == ["t-1"]
    entity = json.loads(shown.stdout)
    assert entity["state"] == ticket(status="closed")
    assert [(r["seq"], r["field"], r["after"]) for r in entity["history"]] == [
        (1, "status", "open"),
        (1, "severity", "low"),
        (1, "tags", []),
        (1, "extra", None),
        (2, "status", "closed"),
    ]
    assert entity["history"][0]["actor"] == "alice"
    assert entity["history"][4]["at"] == "2026-01-01T00:00:05+00:00"


def test_inspect_of_a_missing_entity_or_dir_is_a_clear_error(tmp_path: Path) -> None:
    _fill(tmp_path)

    missing_entity = _inspect("--data-dir", str(tmp_path), "ticket", "nope")
    missing_kind = _inspect("--data-dir", str(tmp_path), "nope")
    missing_dir = _inspect("--data-dir", str(tmp_path / "absent"))

    assert missing_entity.returncode == 2
    assert "no entity ticket/nope" in missing_entity.stderr
    assert missing_kind.returncode == 2
    assert "no kind 'nope'" in missing_kind.stderr
    assert missing_dir.returncode == 2
    assert "is not a directory" in missing_dir.stderr


def test_inspect_reads_a_directory_a_running_runtime_holds(tmp_path: Path) -> None:
    rt = Runtime(data_dir=tmp_path)
    tickets = rt.define_entity("ticket", Ticket)

    with rt:
        tickets.mutate("t-1", lambda prev: ticket())
        done = _inspect("--data-dir", str(tmp_path), "ticket", "t-1")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == ticket()


def test_inspect_piped_into_a_reader_that_stops_early_exits_quietly(
    tmp_path: Path,
) -> None:
    rt = Runtime(data_dir=tmp_path)
    tickets = rt.define_entity("ticket", Ticket)
    with rt:
        tickets.mutate_many([(f"t-{i}", lambda prev: ticket()) for i in range(20_000)])
    command = [sys.executable, "-m", "monitoring._cli", "inspect", "--data-dir"]

    listing = subprocess.Popen(
        [*command, str(tmp_path), "ticket"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert listing.stdout is not None
    first = listing.stdout.readline()
    listing.stdout.close()
    listing.wait(timeout=60)
    assert listing.stderr is not None
    err = listing.stderr.read().decode()
    listing.stderr.close()

    assert first.startswith(b"t-")
    assert listing.returncode == 0
    assert "Traceback" not in err
