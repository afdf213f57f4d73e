"""`entity-runtime agent`: arguments, exit codes, signals, live sources, reports."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from path_server import serve_paths
from raw_server import raw_server

from monitoring import (
    DEFAULT_CONFIG_TOML,
    Agent,
    AgentStats,
    AgentSummary,
    HostSource,
    add_agent_parser,
    load_agent_config,
)
from monitoring._agent_cli import write_report
from monitoring._agent_view import summary_lines
from monitoring._cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
NAB = REPO.parent / "shared" / "data" / "nab"
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or (
    "/usr/bin/prometheus-node-exporter"
)
# The same parser wiring the `entity-runtime` command uses.
AGENT_MAIN = """
import argparse, logging, sys
from monitoring import add_agent_parser
parser = argparse.ArgumentParser(prog="entity-runtime")
add_agent_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
logging.basicConfig(level="WARNING")
sys.exit(args.run(args))
"""
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def agent_cli(*argv: str) -> int:
    """Run `entity-runtime agent ARGV` in this process; return its exit code."""
    parser = argparse.ArgumentParser(prog="entity-runtime")
    add_agent_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["agent", *argv])
    return int(args.run(args))


def _run_reporting(data_dir: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    """Run `entity-runtime agent ARGV` on ``data_dir`` with no metrics endpoint.

    Returns the exit code and the JSON report written beside ``data_dir``.
    """
    report = data_dir.with_name("report.json")

    code = agent_cli(
        *argv,
        "--data-dir",
        str(data_dir),
        "--metrics-port",
        "0",
        "--report",
        str(report),
    )

    return code, json.loads(report.read_text(encoding="utf-8"))


def _replay_reporting_to(target: Path, tmp_path: Path) -> int:
    """Replay a short series with ``--report target`` and the state in ``d``."""
    csv = write_series(tmp_path / "sys" / "m.csv", 3)
    return agent_cli(
        "--replay",
        str(csv),
        "--report",
        str(target),
        "--metrics-port",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
    )


def spawn(*argv: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", AGENT_MAIN, "agent", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_series(path: Path, rows: int, value: float = 1.0) -> Path:
    """Write a timestamp,value CSV of ``rows`` rows, five minutes apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{1_700_000_000 + 300 * row},{value}" for row in range(rows)]
    path.write_text("timestamp,value\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def wait_for(predicate: object, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- arguments and configuration -----------------------------------------------


def test_print_config_prints_the_built_in_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The defaults can be copied into a file and edited."""
    code = agent_cli("--print-config")

    out = capsys.readouterr().out
    assert code == 0
    assert out == DEFAULT_CONFIG_TOML
    assert "families" in tomllib.loads(out)


def test_a_bad_config_exits_2_naming_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Configuration errors are usage errors, reported where they are."""
    config = tmp_path / "bad.toml"
    config.write_text("[defaults]\nfor = 5\nrecover_for = 'soon'\n", encoding="utf-8")

    code = agent_cli("--config", str(config), "--data-dir", str(tmp_path / "d"))

    err = capsys.readouterr().err
    assert code == 2
    assert f"{config}:3: defaults.recover_for: must be a duration" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--labels", "x.json"], "--labels needs --replay"),
        (["--match", "up"], "--match needs --scrape"),
        (["--scrape", "http://127.0.0.1:1/m", "--match", "x{a}"], "--match 'x{a}'"),
        (["--scrape", "ftp://host/m"], "http"),
        (["--replay", "no/such/dir"], "no such file or directory"),
        (["--replay", ".", "--scrape", "http://127.0.0.1:1/"], "cannot be combined"),
        (["--duration", "soon"], "--duration must be a duration"),
        (["--interval", "0s"], "--interval must be more than 0"),
        (["--speed", "2"], "--speed needs --replay"),
        (["--metrics-port", "70000"], "--metrics-port must be 0 to 65535"),
        (["--replay", "{csv}", "--labels", "no.json"], "no.json"),
        (["--interval", "1e300"], "--interval must be more than 0 and at most 1 day"),
        (["--interval", "2d"], "--interval must be more than 0 and at most 1 day"),
        (["--duration", "1e300"], "--duration must be at most 100 years"),
        (["--duration", "1e400"], "--duration is too large, got '1e400'"),
        (
            ["--scrape", "http://127.0.0.1:abc/m"],
            "--scrape 'http://127.0.0.1:abc/m': the port must be a number from 1",
        ),
        (
            ["--scrape", "http://127.0.0.1:99999/m"],
            "--scrape 'http://127.0.0.1:99999/m': the port must be a number from 1",
        ),
        (
            ["--scrape", "http://127.0.0.1:1/m", "--scrape", "http://127.0.0.1:1/m"],
            "--scrape 'http://127.0.0.1:1/m' is the same target as",
        ),
        (["--report", "no/such/dir/r.json"], "--report no/such/dir/r.json: no such"),
        (["--report", "{tmp}"], "is a directory"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every argument problem is found before anything starts."""
    csv = write_series(tmp_path / "sys" / "m.csv", 3)
    argv = [a.replace("{csv}", str(csv)).replace("{tmp}", str(tmp_path)) for a in argv]

    code = agent_cli(*argv, "--data-dir", str(tmp_path / "d"))

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_scrape_url_with_a_password_exits_2_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials in a --scrape URL are refused before anything runs."""
    url = "http://alice:s3cretpw@127.0.0.1:1/metrics"
    looked_up: list[object] = []
    lookup = socket.getaddrinfo

    def loopback_only(host: object, *args: Any, **kwargs: Any) -> Any:
        if host != "127.0.0.1":
            looked_up.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "no name lookups in this test")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)

    code = agent_cli(
        "--scrape",
        url,
        "--duration",
        "0.5s",
        "--metrics-port",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
    )

    captured = capsys.readouterr()
    assert code == 2
    assert "--scrape 'http://***@127.0.0.1:1/metrics': a user name or password" in (
        captured.err
    )
    assert "s3cretpw" not in captured.err + captured.out
    assert looked_up == []
    assert not (tmp_path / "d").exists()


def test_the_summary_says_where_state_was_kept_and_metrics_were_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()

    code = agent_cli(
        "--duration",
        "0.3s",
        "--metrics-port",
        str(port),
        "--data-dir",
        str(tmp_path / "d"),
    )

    out = capsys.readouterr().out
    assert code == 0
    assert f"  data dir    {tmp_path / 'd'} (checks and incidents carry over)" in out
    assert f"  metrics     were served on http://127.0.0.1:{port}/metrics" in out


def test_a_locked_data_dir_exits_1(tmp_path: Path) -> None:
    """A second agent on the same data directory is a runtime failure."""
    data_dir = tmp_path / "state"
    first = spawn(
        "--interval", "0.2s", "--data-dir", str(data_dir), "--metrics-port", "0"
    )
    try:
        wait_for(lambda: list(data_dir.glob("journal-*")), what="the first agent")

        second = spawn(
            "--duration", "1s", "--data-dir", str(data_dir), "--metrics-port", "0"
        )
        _, err = second.communicate(timeout=30)

        assert second.returncode == 1
        assert "lock" in err.lower()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0


# -- the default source and stopping -------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_the_default_source_runs_for_a_duration_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No source given: this machine, until --duration, then exit 0."""
    code, data = _run_reporting(
        tmp_path / "state", "--duration", "1.5s", "--interval", "0.2s"
    )

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("entity-runtime agent: this machine")
    assert data["samples"] >= 3 * 4
    assert data["checks"] >= 4
    assert list(data["systems"]) == [socket.gethostname()]
    assert data["changes"] == 0, "no status can change within the 5 min hold"
    assert data["incidents"] == []
    assert list((tmp_path / "state").glob("snapshot-*.snap"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_agent_cleanly_and_state_is_restored(
    signum: signal.Signals, tmp_path: Path
) -> None:
    """Ctrl-C or SIGTERM: drained, snapshot written, exit 0; the next run restores."""
    data_dir = tmp_path / "state"
    agent = spawn(
        "--interval", "0.1s", "--data-dir", str(data_dir), "--metrics-port", "0"
    )
    wait_for(lambda: list(data_dir.glob("journal-*")), what="the agent to start")
    time.sleep(0.5)

    agent.send_signal(signum)
    out, err = agent.communicate(timeout=30)

    assert agent.returncode == 0, err
    assert "entity-runtime agent: this machine" in out
    assert list(data_dir.glob("snapshot-*.snap"))
    again = spawn(
        "--duration",
        "0.3s",
        "--data-dir",
        str(data_dir),
        "--metrics-port",
        "0",
        "--report",
        str(tmp_path / "r.json"),
    )
    again.communicate(timeout=30)
    assert again.returncode == 0
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["restored_checks"] >= 4
    assert report["checks"] == report["restored_checks"]


def test_the_live_view_shows_rates_systems_incidents_and_progress(
    tmp_path: Path,
) -> None:
    """On a terminal the agent redraws a view while it runs."""
    agent = spawn(
        "--replay",
        str(write_series(tmp_path / "sys" / "m.csv", 10320)),
        "--speed",
        "500000",
        "--duration",
        "2s",
        "--data-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        "0",
        FORCE_COLOR="1",
        COLUMNS="120",
    )

    out, err = agent.communicate(timeout=30)

    assert agent.returncode == 0, err
    assert "samples/s" in out
    assert "systems:" in out
    assert "no open incidents" in out or "inc-sys-" in out
    assert "replay" in out
    assert "/10320" in out


# -- metrics -------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_metrics_are_served_on_loopback_while_the_agent_runs() -> None:
    """The runtime's series and the agent's own counters, over HTTP."""
    agent = Agent(HostSource(0.1, system="box"), load_agent_config(), metrics_port=0)
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: agent.stats.samples > 4, what="samples")
        host, port = agent.metrics_address or ("", 0)

        with _DIRECT.open(f"http://{host}:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        stop.set()
        runner.join(timeout=30)
        agent.close()

    assert host == "127.0.0.1"
    assert 'entity_runtime_agent_samples_total{outcome="accepted"}' in body
    assert 'entity_runtime_entities{kind="check"}' in body


# -- replay through the command ------------------------------------------------


@pytest.mark.skipif(not NAB.is_dir(), reason="NAB data not found")
def test_a_replay_with_labels_prints_the_summary_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's second example, on one folder."""
    code, data = _run_reporting(
        tmp_path / "state",
        "--replay",
        str(NAB / "data" / "realKnownCause"),
        "--labels",
        str(NAB / "labels" / "combined_windows.json"),
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "windows hit" in out
    assert "mean time to resolve" in out
    assert (
        f"  data dir    {tmp_path / 'state'} (checks and incidents carry over)" in out
    )
    assert "  metrics " not in out  # --metrics-port 0 serves none
    assert data["samples"] + data["skipped_out_of_order"] == 69_561
    assert data["checks"] == 7
    assert data["windows_total"] == 19
    assert data["incidents_opened"] == len(
        [i for i in data["incidents"] if i["events"][0]["event"] == "incident.created"]
    )
    assert set(data["triggers"]) >= {"incident.created", "healthcheck.system_degraded"}


# -- a real node_exporter ------------------------------------------------------


@contextlib.contextmanager
def node_exporter() -> Iterator[str]:
    """Start prometheus-node-exporter on a free 127.0.0.1 port; yield its URL."""
    for _ in range(3):
        port = free_port()
        process = subprocess.Popen(
            [
                NODE_EXPORTER,
                f"--web.listen-address=127.0.0.1:{port}",
                "--collector.disable-defaults",
                "--collector.cpu",
                "--collector.meminfo",
                "--collector.loadavg",
                "--collector.filesystem",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            wait_for(lambda url=url: _answers(url), timeout=10, what="node_exporter")
        except AssertionError:
            process.kill()
            process.communicate()
            continue
        try:
            yield url
        finally:
            process.terminate()
            process.communicate(timeout=10)
        return
    raise AssertionError("node_exporter did not start on three free ports")


def _answers(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists(NODE_EXPORTER), reason="no node_exporter")
def test_scraping_a_real_node_exporter_turns_matched_series_into_checks(
    tmp_path: Path,
) -> None:
    """Every sample matching --match becomes a check of the target's system."""
    with node_exporter() as url:
        code, data = _run_reporting(
            tmp_path / "state",
            "--scrape",
            url,
            "--match",
            "node_load1",
            "--match",
            'node_filesystem_avail_bytes{mountpoint="/"}',
            "--match",
            '{__name__=~"node_memory_Mem(Total|Available)_bytes"}',
            "--interval",
            "0.2s",
            "--duration",
            "1.5s",
        )

    target = url.split("/")[2]
    assert code == 0
    assert data["checks"] >= 4
    assert data["samples"] >= 2 * data["checks"]
    assert data["systems"] == {target: "healthy"}
    assert data["incidents"] == []


def test_an_unreachable_target_opens_a_critical_incident(tmp_path: Path) -> None:
    """Scraping a closed port gives up = 0: the target's system is unhealthy."""
    url = f"http://127.0.0.1:{free_port()}/metrics"

    code, data = _run_reporting(
        tmp_path / "state", "--scrape", url, "--interval", "0.2s", "--duration", "1s"
    )

    assert code == 0
    assert data["incidents_opened"] == 1
    (incident,) = data["incidents"]
    assert incident["system"] == url.split("/")[2]
    assert incident["max_severity"] == "critical"
    assert incident["checks"] == [f'{url.split("/")[2]}/up{{path="/metrics"}}']


def test_two_paths_of_one_port_are_judged_apart(tmp_path: Path) -> None:
    """/hot opens an incident of its own check; /cold stays healthy, no flapping."""
    config = tmp_path / "cpu.toml"
    config.write_text(
        '[families.cpu]\nmatch = ["cpu_used_percent"]\nfor = "0s"\n'
        'recover_for = "0s"\n',
        encoding="utf-8",
    )
    payloads = {"/hot": b"cpu_used_percent 99\n", "/cold": b"cpu_used_percent 1\n"}

    with serve_paths(payloads) as base:
        code, data = _run_reporting(
            tmp_path / "state",
            "--scrape",
            f"{base}/hot",
            "--scrape",
            f"{base}/cold",
            "--config",
            str(config),
            "--interval",
            "0.2s",
            "--duration",
            "1.2s",
        )

    target = base.split("/")[2]
    assert code == 0
    assert data["checks"] == 4
    assert data["changes"] == 1
    assert data["incidents_opened"] == 1
    (incident,) = data["incidents"]
    assert incident["checks"] == [f"{target}/hot/cpu_used_percent"]
    assert incident["max_severity"] == "critical"


# -- bad input and a hostile environment ------------------------------------------


def inspect(data_dir: Path, *argv: str) -> int:
    """Run `entity-runtime inspect --data-dir DATA_DIR ARGV` in this process."""
    return int(cli_main(["inspect", "--data-dir", str(data_dir), *argv]))


def test_times_past_year_9999_are_invalid_lines_and_the_data_dir_stays_usable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Millisecond epochs: nothing to replay is exit 2; among good rows, skipped."""
    state = tmp_path / "state"
    only_ms = tmp_path / "ms" / "m.csv"
    only_ms.parent.mkdir()
    only_ms.write_text("1700000000000,12.5\n1700000060000,13\n", encoding="utf-8")

    code = agent_cli("--replay", str(only_ms), "--data-dir", str(state))

    err = capsys.readouterr().err
    assert code == 2
    assert f"no usable rows in {only_ms}" in err

    mixed = tmp_path / "sys" / "m.csv"
    mixed.parent.mkdir()
    mixed.write_text(
        "timestamp,value\n1700000000,1\n1700000000000,12.5\n1700000060,2\n"
        "99999999999999999999,3\n",
        encoding="utf-8",
    )
    for _ in range(2):
        code, data = _run_reporting(state, "--replay", str(mixed))

        assert code == 0
        assert data["invalid_lines"] == 2
        assert data["checks"] == 1
    assert data["restored_checks"] == 1
    assert inspect(state) == 0
    assert inspect(state, "check", "sys/m") == 0


def test_scraped_times_past_year_9999_are_invalid_and_the_data_dir_stays_usable(
    tmp_path: Path,
) -> None:
    """A sample timestamp of 99999999999999999999 ms is dropped, never written."""
    payload = b"x 1 99999999999999999999\n"
    state = tmp_path / "state"
    with raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    ) as url:
        for _ in range(2):
            code, data = _run_reporting(
                state,
                "--scrape",
                url,
                "--match",
                "x",
                "--interval",
                "0.2s",
                "--duration",
                "0.7s",
            )

            assert code == 0
            assert data["invalid_lines"] >= 1
            assert data["checks"] == 1, "only the target's up check"
            assert data["incidents"] == []
    assert inspect(state) == 0


@pytest.mark.parametrize(
    "content",
    [b"", b"timestamp,value\r\n", bytes(range(256)) * 8],
    ids=["empty", "header-only", "binary"],
)
def test_a_replay_with_no_usable_row_exits_2_naming_the_files(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing to replay is a usage error; junk is never echoed raw."""
    for name in ("a.csv", "b.csv"):
        path = tmp_path / "sys" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)

    code = agent_cli(
        "--replay", str(tmp_path / "sys"), "--data-dir", str(tmp_path / "d")
    )

    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "sys" / "a.csv") in err
    assert str(tmp_path / "sys" / "b.csv") in err
    assert err.isascii()
    assert all(line.isprintable() for line in err.splitlines())
    assert not (tmp_path / "d").exists()


def test_report_write_errors_name_the_report_not_a_temporary_file(
    tmp_path: Path,
) -> None:
    """Whatever fails while writing, the error is about the path asked for."""
    taken = tmp_path / "taken"
    taken.mkdir()
    missing = tmp_path / "missing" / "r.json"

    for target in (taken, missing):
        with pytest.raises(OSError) as caught:
            write_report(target, {"samples": 1})

        assert caught.value.filename == str(target)
        assert f".{target.name}." not in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert list(taken.iterdir()) == []


def _special_file(kind: str, folder: Path) -> Path:
    """Make a path in ``folder`` that exists and is not a regular file."""
    path = folder / f"{kind}.json"
    if kind == "symlink":
        (folder / "real.json").write_text('{"keep": "me"}\n', encoding="utf-8")
        path.symlink_to("real.json")
    elif kind == "dangling-symlink":
        path.symlink_to("missing.json")
    elif kind == "symlink-to-folder":
        (folder / "sub").mkdir()
        path.symlink_to("sub")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    return path


SPECIAL_FILES = {
    "symlink": "is a symbolic link",
    "dangling-symlink": "is a symbolic link",
    "symlink-to-folder": "is a symbolic link",
    "fifo": "is a named pipe (FIFO)",
    "socket": "is a socket",
}


@pytest.mark.parametrize("kind", sorted(SPECIAL_FILES))
def test_a_report_path_that_is_not_a_regular_file_exits_2_untouched(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--report replaces a regular file only; anything else is refused up front."""
    target = _special_file(kind, tmp_path)
    before = os.lstat(target)

    code = _replay_reporting_to(target, tmp_path)

    err = capsys.readouterr().err
    assert code == 2
    assert f"--report {target}: {SPECIAL_FILES[kind]}, not a regular file" in err
    assert os.lstat(target).st_mode == before.st_mode
    assert os.lstat(target).st_ino == before.st_ino
    if kind == "symlink":
        assert (tmp_path / "real.json").read_text() == '{"keep": "me"}\n'
    assert not (tmp_path / "d").exists()


def test_a_report_replaces_an_existing_regular_file(tmp_path: Path) -> None:
    """An earlier report at the path is replaced as a whole."""
    target = tmp_path / "r.json"
    target.write_text("old and longer than the new report\n", encoding="utf-8")

    code = _replay_reporting_to(target, tmp_path)

    assert code == 0
    assert json.loads(target.read_text(encoding="utf-8"))["samples"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "r.json", "sys"]


def test_a_report_over_the_agent_s_state_or_inputs_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _replay_reporting_to(tmp_path / "first.json", tmp_path) == 0
    state = tmp_path / "d"
    kept = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    config = tmp_path / "agent.toml"
    config.write_text("[families.cpu]\ndegraded_above = 80\n", encoding="utf-8")
    capsys.readouterr()

    over_state = _replay_reporting_to(sorted(kept)[0], tmp_path)
    state_err = capsys.readouterr().err
    over_config = agent_cli(
        "--replay",
        str(tmp_path / "sys" / "m.csv"),
        "--config",
        str(config),
        "--report",
        str(config),
        "--metrics-port",
        "0",
        "--data-dir",
        str(state),
    )
    config_err = capsys.readouterr().err

    assert over_state == over_config == 2
    assert f"is inside --data-dir {state}, whose files hold the agent's state" in (
        state_err
    )
    assert f"would replace --config {config}, which the agent reads" in config_err
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == kept
    assert config.read_text(encoding="utf-8") == "[families.cpu]\ndegraded_above = 80\n"


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_report_is_not_written_over_a_special_file_made_during_the_run(
    kind: str, tmp_path: Path
) -> None:
    """write_report itself refuses to replace anything but a regular file."""
    target = _special_file(kind, tmp_path)
    before = os.lstat(target)

    with pytest.raises(OSError, match="not a regular file") as caught:
        write_report(target, {"samples": 1})

    assert caught.value.filename == str(target)
    assert os.lstat(target).st_ino == before.st_ino
    assert not list(tmp_path.glob(f".{target.name}.*"))


def test_a_metrics_port_in_use_names_it_and_suggests_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 turns the metrics off in the command, so it is not offered as a free port."""
    csv = write_series(tmp_path / "sys" / "m.csv", 3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]

        code = agent_cli(
            "--replay",
            str(csv),
            "--data-dir",
            str(tmp_path / "state"),
            "--metrics-port",
            str(port),
        )

    err = capsys.readouterr().err
    assert code == 1
    assert f"--metrics-port {port}: 127.0.0.1:{port} is already in use" in err
    assert "another port" in err
    assert "port=0" not in err


def test_a_damaged_incident_database_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error says which file is not a database."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "incidents.db").write_bytes(b"not a database\n" * 300)

    code = agent_cli(
        "--replay",
        str(write_series(tmp_path / "sys" / "m.csv", 3)),
        "--data-dir",
        str(state),
        "--metrics-port",
        "0",
    )

    err = capsys.readouterr().err
    assert code == 1
    assert f"{state / 'incidents.db'}: file is not a database" in err


def test_an_empty_run_summary_lists_no_systems() -> None:
    """No systems: no dangling colon."""
    summary = AgentSummary(
        source="nothing",
        stats=AgentStats(),
        checks=0,
        systems={},
        changes=0,
        entity_changes={},
        triggers={},
        incidents=[],
        incidents_opened=0,
        incidents_resolved=0,
        seconds=0.0,
    )

    lines = summary_lines(summary)

    assert "  checks      0 in 0 system(s)" in lines
    assert not any(line.rstrip().endswith(":") for line in lines)


# Sends itself a signal at one step of the setup, then runs the agent command.
SIGNAL_DURING_SETUP = """
import argparse, logging, os, signal, sys
import monitoring._agent as agent_module
import monitoring._agent_sources as sources
from monitoring import add_agent_parser

step, name = sys.argv[1], sys.argv[2]

def signalled(original):
    def call(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, name))
        return original(*args, **kwargs)
    return call

if step == "reading":
    sources.read_series_file = signalled(sources.read_series_file)
elif step == "opening":
    agent_module.Runtime = signalled(agent_module.Runtime)
else:
    agent_module.Agent._restore = signalled(agent_module.Agent._restore)
parser = argparse.ArgumentParser(prog="entity-runtime")
add_agent_parser(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[3:])
logging.basicConfig(level="WARNING")
sys.exit(args.run(args))
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("step", ["reading", "opening", "restoring"])
def test_a_signal_during_setup_stops_cleanly(
    step: str, signame: str, tmp_path: Path
) -> None:
    """Reading the CSVs, opening or restoring the data dir: exit 0, dir usable."""
    csv = write_series(tmp_path / "sys" / "m.csv", 50, value=99.0)
    state = tmp_path / "state"
    argv = ["--replay", str(csv), "--data-dir", str(state), "--metrics-port", "0"]

    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_SETUP, step, signame, "agent", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert agent_cli(*argv, "--no-live") == 0
    assert inspect(state) == 0


def test_a_slow_target_does_not_hold_the_run_past_its_duration(
    tmp_path: Path,
) -> None:
    """A target that never answers is abandoned when --duration is up."""
    with raw_server(None) as slow:
        started = time.monotonic()
        code, data = _run_reporting(
            tmp_path / "state",
            "--scrape",
            slow,
            "--interval",
            "5s",
            "--duration",
            "0.5s",
        )
        took = time.monotonic() - started

    assert code == 0
    assert took < 4.0
    assert data["incidents"] == []


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler (read from /proc)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_is_still_loading_exits_quietly(
    tmp_path: Path, delay: float, signum: int
) -> None:
    # NOTE: until the interpreter runs the command's first line, no program can
    # handle a signal; the test therefore waits for the command's handler.
    command = shutil.which("entity-runtime", path=str(Path(sys.executable).parent))
    assert command is not None
    process = subprocess.Popen(
        [
            command,
            "agent",
            "--duration",
            "20s",
            "--no-live",
            "--metrics-port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not _catches_sigterm(process.pid) and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay)

    process.send_signal(signum)
    _, err = process.communicate(timeout=60)

    assert process.returncode == 0, err
    assert "Traceback" not in err
