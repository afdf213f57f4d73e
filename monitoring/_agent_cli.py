from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
"""Exit codes: clean stop, runtime failure, bad arguments or configuration."""

EXIT_INTERRUPTED = 130
"""Exit code after a second Ctrl-C, which interrupts without a clean stop."""

DEFAULT_DATA_DIR = ".entity-runtime"
DEFAULT_METRICS_PORT = 9464


class _UsageError(Exception):
    """Bad arguments or configuration: exit code 2."""


def add_agent_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``agent`` subcommand to the ``entity-runtime`` parser.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The subcommand's parser; its ``run`` default is :func:`run_agent`.
    """
    agent: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run the monitoring agent on this machine, Prometheus endpoints "
        "or recorded series",
        description="Turn metric samples into check, health and incident "
        "entities. With no source it watches this machine (CPU, memory, load, "
        "disks from /proc). Ctrl-C or SIGTERM stops it cleanly.",
    )
    sources = agent.add_argument_group("sources (default: this machine)")
    sources.add_argument(
        "--scrape",
        action="append",
        metavar="URL",
        default=[],
        help="a Prometheus text endpoint to scrape (repeatable)",
    )
    sources.add_argument(
        "--match",
        action="append",
        metavar="SELECTOR",
        default=[],
        help="with --scrape: a series selector such as 'node_load1' or "
        "'node_filesystem_avail_bytes{mountpoint=\"/\"}' (repeatable); every "
        "matching sample becomes a check (default: the metrics the config has "
        "thresholds for)",
    )
    sources.add_argument(
        "--replay",
        action="append",
        metavar="PATH",
        default=[],
        help="a timestamp,value CSV file or a folder of them (repeatable); one "
        "check per file, its folder as the system",
    )
    sources.add_argument(
        "--speed",
        type=float,
        metavar="N",
        help="replay at N times real time (default: as fast as possible)",
    )
    sources.add_argument(
        "--labels",
        metavar="FILE",
        help="with --replay: anomaly windows (NAB combined_windows.json) to "
        "score the incidents against",
    )
    agent.add_argument(
        "--config",
        metavar="FILE.toml",
        help="thresholds and hold times, merged onto the built-in defaults",
    )
    agent.add_argument(
        "--print-config",
        action="store_true",
        help="print the built-in default configuration and exit",
    )
    agent.add_argument(
        "--interval",
        metavar="DURATION",
        help="how often live sources are read (default from the config: 5s)",
    )
    agent.add_argument(
        "--duration",
        metavar="DURATION",
        help="stop by itself after this long, e.g. 10s or 5m (default: run "
        "until stopped, or to the end of a replay)",
    )
    agent.add_argument(
        "--report",
        metavar="FILE.json",
        help="write the summary and the incident timeline as JSON",
    )
    agent.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        metavar="PORT",
        help=f"serve metrics on 127.0.0.1:PORT (default {DEFAULT_METRICS_PORT}; "
        "0 turns it off)",
    )
    agent.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"where state, log and journal are kept and restored from "
        f"(default {DEFAULT_DATA_DIR})",
    )
    agent.add_argument(
        "--fsync",
        choices=["always", "interval", "never"],
        default="interval",
        help="journal durability (default interval: survives a killed "
        "process; 'always' also survives power loss, slower)",
    )
    agent.add_argument(
        "--no-live",
        action="store_true",
        help="no live view, only the summary at the end (the default when "
        "the output is not a terminal)",
    )
    agent.set_defaults(run=run_agent)
    return agent


def run_agent(args: argparse.Namespace) -> int:
    """Run the ``agent`` subcommand; return its exit code.

    SIGINT and SIGTERM are handled from the start, setup included: a signal
    while the configuration, the sources or the data directory are being
    read stops the agent cleanly too (exit 0, nothing run). A second SIGINT
    interrupts at once (exit 130).

    Returns:
        0 after a clean stop (end of a replay, ``--duration``, Ctrl-C or
        SIGTERM); 2 for bad arguments or configuration; 1 when the runtime
        failed or did not stop cleanly.
    """
    from monitoring._agent_config import DEFAULT_CONFIG_TOML

    if args.print_config:
        sys.stdout.write(DEFAULT_CONFIG_TOML)
        return EXIT_OK
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            return _setup_and_run(args, stop)
    except KeyboardInterrupt:
        print("entity-runtime agent: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _setup_and_run(args: argparse.Namespace, stop: threading.Event) -> int:
    try:
        agent, duration = _build(args)
    except _UsageError as err:
        print(f"entity-runtime agent: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        logger.debug("agent could not be set up", exc_info=True)
        print(f"entity-runtime agent: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if stop.is_set():
            print(
                "entity-runtime agent: stopped before it started; nothing was run",
                file=sys.stderr,
            )
            return EXIT_OK
        return _run(agent, args, duration, stop)
    finally:
        agent.close()


def _build(args: argparse.Namespace) -> tuple[Any, float | None]:
    from monitoring._agent import Agent
    from monitoring._agent_config import (
        MAX_DURATION,
        MAX_INTERVAL,
        AgentConfigError,
        load_agent_config,
        parse_duration,
    )
    from monitoring._agent_sources import (
        HostSource,
        ReplaySource,
        ScrapeSource,
        Selector,
        SelectorError,
        load_label_windows,
    )

    try:
        config = load_agent_config(args.config)
    except AgentConfigError as err:
        raise _UsageError(str(err)) from None

    interval = config.interval
    if args.interval is not None:
        interval = _duration("--interval", args.interval, parse_duration)
        if not 0 < interval <= MAX_INTERVAL:
            raise _UsageError(
                f"--interval must be more than 0 and at most 1 day, got {args.interval}"
            )
    duration = None
    if args.duration is not None:
        duration = _duration("--duration", args.duration, parse_duration)
        if duration > MAX_DURATION:
            raise _UsageError(
                f"--duration must be at most 100 years, got {args.duration}"
            )
    if args.speed is not None and not args.speed > 0:
        raise _UsageError(f"--speed must be more than 0, got {args.speed:g}")
    if args.replay and args.scrape:
        raise _UsageError("--replay and --scrape cannot be combined")
    if args.labels and not args.replay:
        raise _UsageError("--labels needs --replay")
    if args.speed is not None and not args.replay:
        raise _UsageError("--speed needs --replay")
    if args.match and not args.scrape:
        raise _UsageError("--match needs --scrape")
    if not 0 <= args.metrics_port <= 65535:
        raise _UsageError(f"--metrics-port must be 0 to 65535, got {args.metrics_port}")
    if args.report is not None:
        _check_report_path(args.report)
        _refuse_report_over_inputs(args)

    try:
        if args.replay:
            source: Any = ReplaySource(args.replay)
        elif args.scrape:
            selectors = [Selector.parse(text) for text in args.match]
            source = ScrapeSource(
                args.scrape, interval, selectors=selectors, config=config
            )
        else:
            source = HostSource(interval)
        labels = load_label_windows(args.labels) if args.labels else None
    except (SelectorError, FileNotFoundError, ValueError) as err:
        raise _UsageError(str(err)) from None
    except OSError as err:
        raise _UsageError(f"{err.filename or ''}: {err.strerror or err}") from None

    data_dir = Path(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise _UsageError(f"--data-dir {data_dir}: exists and is not a directory")
    agent = Agent(
        source,
        config,
        data_dir=data_dir,
        metrics_port=args.metrics_port or None,
        journal_fsync=args.fsync,
        labels=labels,
        speed=args.speed,
    )
    return agent, duration


def _check_report_path(path: str) -> None:
    """Make sure the report can be written, before anything runs."""
    target = Path(path)
    kind = _special_kind(target)
    if kind is not None:
        raise _UsageError(
            f"--report {path}: is {kind}, not a regular file; give the path of a "
            "regular file (it is replaced) or of one that does not exist yet"
        )
    folder = target.parent
    if not folder.is_dir():
        raise _UsageError(f"--report {path}: no such directory {folder}")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.")
    except OSError as err:
        raise _UsageError(
            f"--report {path}: cannot write in {folder}: {err.strerror or err}"
        ) from None
    os.close(handle)
    os.unlink(probe)


def _refuse_report_over_inputs(args: argparse.Namespace) -> None:
    # The report replaces its file: never one the agent reads or keeps.
    report = Path(os.path.realpath(args.report))
    data_dir = Path(os.path.realpath(args.data_dir))
    if report.is_relative_to(data_dir):
        raise _UsageError(
            f"--report {args.report}: is inside --data-dir {args.data_dir}, whose "
            "files hold the agent's state; write the report elsewhere"
        )

    inputs = [("--config", args.config), ("--labels", args.labels)]
    inputs += [("--replay", path) for path in args.replay]
    for option, given in inputs:
        if given is None:
            continue
        if report == Path(os.path.realpath(given)):
            raise _UsageError(
                f"--report {args.report}: would replace {option} {given}, which the "
                "agent reads; write the report elsewhere"
            )


def _special_kind(path: Path) -> str | None:
    # What is at ``path`` when it exists and is not a regular file. A symbolic
    # link counts as one whatever it points to: the report replaces the link.
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _duration(option: str, text: str, parse: Any) -> float:
    try:
        seconds = parse(text)
    except ValueError as err:
        raise _UsageError(f"{option} {err}") from None
    if seconds is None:
        raise _UsageError(f"{option} cannot be 'off'")
    return float(seconds)


def _run(
    agent: Any, args: argparse.Namespace, duration: float | None, stop: threading.Event
) -> int:
    from rich.console import Console

    from monitoring._agent_view import LiveView, summary_lines
    from runtime import EntityRuntimeError, MetricsBindError

    console = Console()
    live = not args.no_live and console.is_terminal
    timer = None
    if duration is not None:
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True
        timer.start()

    try:
        view = LiveView(agent, console) if live else contextlib.nullcontext()
        with view:
            summary = agent.run(stop)
    except MetricsBindError as err:
        logger.debug("agent failed", exc_info=True)
        port = args.metrics_port
        if err.errno == errno.EADDRINUSE:
            reason = (
                f"127.0.0.1:{port} is already in use; choose another port with "
                "--metrics-port PORT (0 serves no metrics)"
            )
        else:
            reason = str(err)
        print(
            f"entity-runtime agent: error: --metrics-port {port}: {reason}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (EntityRuntimeError, OSError) as err:
        logger.debug("agent failed", exc_info=True)
        print(f"entity-runtime agent: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:
        logger.exception("agent failed")
        print(f"entity-runtime agent: error: {err!r}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if timer is not None:
            timer.cancel()

    kept = [f"  data dir    {args.data_dir} (checks and incidents carry over)"]
    if args.metrics_port:
        kept.append(
            f"  metrics     were served on http://127.0.0.1:{args.metrics_port}/metrics"
        )
    for line in [*summary_lines(summary), *kept]:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if args.report:
        try:
            write_report(args.report, summary.to_report())
        except OSError as err:
            print(
                f"entity-runtime agent: error: --report {args.report}: "
                f"{err.strerror or err}",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    if summary.dead_letters or not summary.clean_stop:
        print(
            f"entity-runtime agent: {summary.dead_letters} automation deliveries "
            f"failed for good (clean stop: {summary.clean_stop}); see the log",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Make SIGINT and SIGTERM set ``stop``; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.info("%s received; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {
        sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> None:
    """Write the JSON report atomically (a temporary file renamed into place).

    Only a regular file at ``path`` is replaced: a symbolic link, a
    directory, a named pipe, a device or a socket there is left as it is.

    Raises:
        OSError: the report cannot be written, or ``path`` exists and is not
            a regular file; its ``filename`` is ``path`` (never the
            temporary file) and nothing is left behind.
    """
    target = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}."
        )
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(target)) from err
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
            file.write("\n")

        # NOTE: checked as late as possible, since the path may have changed
        # during the run; the rename itself cannot be told to refuse.
        kind = _special_kind(target)
        if kind is not None:
            raise OSError(
                errno.EEXIST,
                f"is {kind}, not a regular file; not replaced",
                str(target),
            )
        os.replace(temporary, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror or str(err), str(target)) from err
        raise
