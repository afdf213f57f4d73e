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

import pytest

from monitoring import (
    DEFAULT_CONFIG_TOML,
    Agent,
    HostSource,
    add_agent_parser,
    load_agent_config,
)

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
        (
            ["--replay", str(NAB / "data" / "realKnownCause"), "--labels", "no.json"],
            "no.json",
        ),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every argument problem is found before anything starts."""
    code = agent_cli(*argv, "--data-dir", str(tmp_path / "d"))

    assert code == 2
    assert message in capsys.readouterr().err


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
    report = tmp_path / "report.json"

    code = agent_cli(
        "--duration",
        "1.5s",
        "--interval",
        "0.2s",
        "--data-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        "0",
        "--report",
        str(report),
    )

    out = capsys.readouterr().out
    data = json.loads(report.read_text(encoding="utf-8"))
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
        str(NAB / "data" / "realKnownCause" / "nyc_taxi.csv"),
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
    assert "no open incidents" in out or "inc-realKnownCause-" in out
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
    report = tmp_path / "nab.json"

    code = agent_cli(
        "--replay",
        str(NAB / "data" / "realKnownCause"),
        "--labels",
        str(NAB / "labels" / "combined_windows.json"),
        "--report",
        str(report),
        "--data-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        "0",
    )

    out = capsys.readouterr().out
    data = json.loads(report.read_text(encoding="utf-8"))
    assert code == 0
    assert "windows hit" in out
    assert "mean time to resolve" in out
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
    report = tmp_path / "report.json"
    with node_exporter() as url:
        code = agent_cli(
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
            "--data-dir",
            str(tmp_path / "state"),
            "--metrics-port",
            "0",
            "--report",
            str(report),
        )

    data = json.loads(report.read_text(encoding="utf-8"))
    target = url.split("/")[2]
    assert code == 0
    assert data["checks"] >= 4
    assert data["samples"] >= 2 * data["checks"]
    assert data["systems"] == {target: "healthy"}
    assert data["incidents"] == []


def test_an_unreachable_target_opens_a_critical_incident(tmp_path: Path) -> None:
    """Scraping a closed port gives up = 0: the target's system is unhealthy."""
    report = tmp_path / "report.json"
    url = f"http://127.0.0.1:{free_port()}/metrics"

    code = agent_cli(
        "--scrape",
        url,
        "--interval",
        "0.2s",
        "--duration",
        "1s",
        "--data-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        "0",
        "--report",
        str(report),
    )

    data = json.loads(report.read_text(encoding="utf-8"))
    assert code == 0
    assert data["incidents_opened"] == 1
    (incident,) = data["incidents"]
    assert incident["system"] == url.split("/")[2]
    assert incident["max_severity"] == "critical"
    assert incident["checks"] == [f"{url.split('/')[2]}/up"]
