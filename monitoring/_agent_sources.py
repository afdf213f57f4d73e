from __future__ import annotations

import dataclasses
import hashlib
import heapq
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from monitoring._agent_config import AgentConfig

logger = logging.getLogger(__name__)

MAX_CHECK_ID = 1024
"""The longest check id the runtime accepts; longer ids are shortened."""

FIRST_TIME = datetime(1, 1, 2, tzinfo=UTC).timestamp()
LAST_TIME = datetime(9999, 12, 30, tzinfo=UTC).timestamp()
"""The record times the runtime accepts (POSIX seconds, years 1 to 9999)."""

DEFAULT_SCRAPE_PATH = "/metrics"
"""The path whose targets' check ids carry only ``host:port``, not the path."""

MAX_SCRAPE_BYTES = 32 * 1024 * 1024
"""The largest scrape response read; a larger one counts as a failed scrape."""

# Filesystems that hold data; pseudo and read-only image filesystems (proc,
# tmpfs, squashfs snaps, ...) are always "full" or meaningless and left out.
_DISK_FSTYPES = frozenset(
    {
        "btrfs",
        "exfat",
        "ext2",
        "ext3",
        "ext4",
        "f2fs",
        "hfsplus",
        "jfs",
        "nfs",
        "nfs4",
        "ntfs",
        "ntfs3",
        "overlay",
        "reiserfs",
        "vfat",
        "xfs",
        "zfs",
        "bcachefs",
        "cifs",
        "fuseblk",
    }
)

# Direct connections only: proxy settings in the environment must not send a
# scrape anywhere but the URL the user gave.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One metric sample, ready to be judged.

    Attributes:
        check_id: the id of the check entity it feeds (``system/metric``).
        system: the system the check belongs to.
        metric: the series, e.g. ``disk_used_percent{mountpoint="/"}``.
        name: the metric name that families match on.
        value: the value (NaN and infinities are possible).
        at: the record time, POSIX seconds.
    """

    check_id: str
    system: str
    metric: str
    name: str
    value: float
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """The samples of one read (a poll, a scrape, or one replayed row).

    ``at`` is the time the batch stands for: the clock follows it.
    """

    at: float
    samples: Sequence[Sample]


class Source(Protocol):
    """Where samples come from."""

    description: str
    """One line for the live view and the summary."""

    replay: bool
    """True when times come from records (the clock follows the samples)."""

    total: int | None
    """How many samples a replay holds (``None`` for live sources)."""

    def batches(self, stop: threading.Event) -> Iterator[Batch]:
        """Yield batches until the source ends or ``stop`` is set."""
        ...


def recordable_time(at: float) -> bool:
    """Whether a change can be recorded at ``at``: between the years 1 and 9999.

    False for NaN and infinities. A sample outside this range (typically a
    millisecond timestamp read as seconds) is invalid input: the sources drop
    it and count it, and the agent never writes it.
    """
    return FIRST_TIME <= at <= LAST_TIME


def shown(value: object, limit: int = 60) -> str:
    """Quote a value from the input for a message: escaped to ASCII, shortened.

    Control characters and other bytes from a damaged file come out as
    escapes (``\\x1b``), never raw, and a long value is cut to ``limit``
    characters.
    """
    text = ascii(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def make_check_id(system: str, metric: str) -> str:
    """Build a check id that the runtime accepts: printable, at most 1,024 chars.

    Non-printable characters are escaped (``\\x1c``); an id that is still too
    long keeps its start and ends in a hash of the whole, so it stays unique.
    """
    raw = f"{system}/{metric}"
    if not raw.isprintable():
        raw = "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)
    if len(raw) > MAX_CHECK_ID:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        raw = f"{raw[: MAX_CHECK_ID - 17]}~{digest}"
    return raw


def series_name(name: str, labels: Mapping[str, str]) -> str:
    """Format a series as ``name{a="x",b="y"}``, labels sorted; no braces if none."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{_escape(labels[key])}"' for key in sorted(labels))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- the machine itself ------------------------------------------------------


@dataclasses.dataclass
class _CpuTimes:
    busy: float
    total: float


def parse_cpu_times(stat: str) -> _CpuTimes:
    """Read the aggregate ``cpu`` line of ``/proc/stat`` (ticks since boot).

    Busy time is everything but ``idle`` and ``iowait``; ``guest`` times are
    already inside ``user`` and ``nice`` and are not counted twice.
    """
    for line in stat.split("\n"):
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [float(f) for f in fields[1:]]
            ticks += [0.0] * (8 - len(ticks))
            total = sum(ticks[:8])
            idle = ticks[3] + ticks[4]
            return _CpuTimes(busy=total - idle, total=total)
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def parse_meminfo(text: str) -> dict[str, float]:
    """Read ``/proc/meminfo`` into ``{field: bytes}``."""
    found = {}
    for line in text.split("\n"):
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            factor = 1024.0 if len(parts) > 1 and parts[1] == "kB" else 1.0
            found[key.strip()] = float(parts[0]) * factor
    return found


def disk_mounts(mounts: str) -> list[str]:
    """Pick the mount points of data filesystems from ``/proc/self/mounts``.

    One mount point per device (the shortest path, so bind mounts of the same
    device are not counted twice); pseudo filesystems are left out.
    """
    by_device: dict[str, str] = {}
    for line in mounts.split("\n"):
        fields = line.split()
        if len(fields) < 3 or fields[2] not in _DISK_FSTYPES:
            continue
        device = fields[0]
        mountpoint = _unescape_mount(fields[1])
        known = by_device.get(device)
        if known is None or len(mountpoint) < len(known):
            by_device[device] = mountpoint
    return sorted(by_device.values())


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


class HostSource:
    """This machine's CPU, memory, load and disks, read from ``/proc`` and statvfs.

    Every ``interval`` seconds it yields, for system ``hostname``:

    - ``cpu_used_percent``: busy share of all CPUs since the previous read
      (from the second read on);
    - ``memory_used_percent``: ``1 - MemAvailable / MemTotal``;
    - ``load1_per_cpu``: the 1-minute load average divided by the CPU count;
    - ``disk_used_percent{mountpoint=...}`` per mounted data filesystem, as
      ``df`` computes it: used / (used + available to unprivileged users).

    Nothing needs to be installed. A file that cannot be read is logged once
    and its metrics are left out of that read.
    """

    replay = False
    total = None

    def __init__(
        self,
        interval: float,
        *,
        system: str | None = None,
        proc: str | os.PathLike[str] = "/proc",
    ) -> None:
        self.interval = interval
        self.system = system or socket.gethostname() or "localhost"
        self._proc = Path(proc)
        self._cpu: _CpuTimes | None = None
        self._cpus = os.cpu_count() or 1
        self._failed: set[str] = set()
        self.description = f"this machine ({self.system}), every {interval:g} s"

    def batches(self, stop: threading.Event) -> Iterator[Batch]:
        """Read the machine now and then every ``interval`` seconds until ``stop``."""
        while not stop.is_set():
            now = time.time()
            yield Batch(now, self.read(now))
            stop.wait(self.interval)

    def read(self, now: float) -> list[Sample]:
        """Take one reading of every metric, stamped ``now``."""
        values: list[tuple[str, dict[str, str], float]] = []

        stat = self._read_text("stat")
        if stat is not None:
            cpu = parse_cpu_times(stat)
            previous, self._cpu = self._cpu, cpu
            if previous is not None and cpu.total > previous.total:
                busy = (cpu.busy - previous.busy) / (cpu.total - previous.total)
                values.append(("cpu_used_percent", {}, 100.0 * busy))

        meminfo = self._read_text("meminfo")
        if meminfo is not None:
            memory = parse_meminfo(meminfo)
            total, available = memory.get("MemTotal"), memory.get("MemAvailable")
            if total and available is not None:
                values.append(
                    ("memory_used_percent", {}, 100.0 * (1 - available / total))
                )

        loadavg = self._read_text("loadavg")
        if loadavg is not None:
            values.append(("load1_per_cpu", {}, float(loadavg.split()[0]) / self._cpus))

        mounts = self._read_text("self/mounts")
        for mountpoint in disk_mounts(mounts or ""):
            used = self._disk_used(mountpoint)
            if used is not None:
                values.append(("disk_used_percent", {"mountpoint": mountpoint}, used))

        samples = []
        for name, labels, value in values:
            metric = series_name(name, labels)
            check_id = make_check_id(self.system, metric)
            samples.append(Sample(check_id, self.system, metric, name, value, now))
        return samples

    def _read_text(self, name: str) -> str | None:
        path = self._proc / name
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            if name not in self._failed:
                self._failed.add(name)
                logger.warning(
                    "cannot read %s (%s); its metrics are left out", path, err
                )
            return None

    def _disk_used(self, mountpoint: str) -> float | None:
        try:
            st = os.statvfs(mountpoint)
        except OSError as err:
            if mountpoint not in self._failed:
                self._failed.add(mountpoint)
                logger.warning("cannot statvfs %s (%s); left out", mountpoint, err)
            return None
        used = st.f_blocks - st.f_bfree
        usable = used + st.f_bavail
        return None if usable <= 0 else 100.0 * used / usable


# -- Prometheus text endpoints -------------------------------------------------


_SELECTOR = re.compile(r"^\s*([A-Za-z_:][A-Za-z0-9_:]*)?\s*(?:\{(.*)\})?\s*$", re.S)
_MATCHER = re.compile(
    r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)', re.S
)


class SelectorError(ValueError):
    """A ``--match`` selector is not valid PromQL selector syntax."""


@dataclasses.dataclass(frozen=True)
class Selector:
    """A PromQL-style series selector: ``name{label="v", other=~"re.*"}``.

    Supports ``=``, ``!=``, ``=~`` and ``!~``; regular expressions are fully
    anchored, as in PromQL. ``__name__`` may be matched like any label.
    """

    text: str
    matchers: tuple[tuple[str, str, str | re.Pattern[str]], ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse a selector.

        Raises:
            SelectorError: the text is not a selector; the message quotes it.
        """
        found = _SELECTOR.match(text)
        if not found or not (found.group(1) or found.group(2)):
            raise SelectorError(
                f"--match {text!r}: expected a selector such as "
                "'node_load1' or 'node_filesystem_avail_bytes{mountpoint=\"/\"}'"
            )
        matchers: list[tuple[str, str, str | re.Pattern[str]]] = []
        if found.group(1):
            matchers.append(("__name__", "=", found.group(1)))
        body = (found.group(2) or "").strip()
        position = 0
        while position < len(body):
            part = _MATCHER.match(body, position)
            if not part:
                raise SelectorError(
                    f"--match {text!r}: cannot read the label matcher at "
                    f"{body[position:]!r}"
                )
            label, op, raw = part.group(1), part.group(2), part.group(3)
            value = _unquote(raw)
            if op in ("=~", "!~"):
                try:
                    matchers.append((label, op, re.compile(value)))
                except re.error as err:
                    raise SelectorError(
                        f"--match {text!r}: bad regular expression {value!r}: {err}"
                    ) from None
            else:
                matchers.append((label, op, value))
            position = part.end()
        return cls(text, tuple(matchers))

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        """Whether a series with this name and these labels is selected."""
        for label, op, want in self.matchers:
            have = name if label == "__name__" else labels.get(label, "")
            if op == "=":
                ok = have == want
            elif op == "!=":
                ok = have != want
            elif op == "=~":
                ok = want.fullmatch(have) is not None  # type: ignore[union-attr]
            else:
                ok = want.fullmatch(have) is None  # type: ignore[union-attr]
            if not ok:
                return False
        return True


def _unquote(raw: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), raw)


def parse_exposition(
    text: str,
    *,
    system: str,
    at: float,
    selectors: Sequence[Selector] = (),
    config: AgentConfig | None = None,
    path: str = DEFAULT_SCRAPE_PATH,
) -> list[Sample]:
    """Turn a Prometheus text payload into samples, with ``prometheus_client``.

    A sample is kept when it matches one of ``selectors``; with no
    selectors, when ``config`` has a family with thresholds for its name.
    Samples without a timestamp (the usual case) are stamped ``at``. The
    check's system is the ``instance`` label when present, else ``system``.

    ``path`` is the path (and query) the payload was read from. The check id
    of a series without an ``instance`` label is ``system/series`` for the
    default path ``/metrics`` and ``system<path>/series`` for any other
    (``host:9100/probe?target=x/up``), so targets on one ``host:port``
    never feed one check. A series with an ``instance`` label is that
    instance's, whichever target it came from: ``instance/series``.

    Raises:
        ValueError: the payload is not valid text exposition format.
    """
    target = system if path == DEFAULT_SCRAPE_PATH else f"{system}{path}"
    samples = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels = sample.name, sample.labels
            if selectors:
                if not any(s.matches(name, labels) for s in selectors):
                    continue
            elif config is None or not config.has_family(name):
                continue
            instance = labels.get("instance")
            owner, prefix = (instance, instance) if instance else (system, target)
            metric = series_name(name, labels)
            stamp = at if sample.timestamp is None else float(sample.timestamp)
            samples.append(
                Sample(
                    make_check_id(prefix, metric),
                    owner,
                    metric,
                    name,
                    float(sample.value),
                    stamp,
                )
            )
    return samples


def check_scrape_url(url: str) -> tuple[str, str]:
    """Validate a ``--scrape`` URL; return its system and its ``up`` series.

    The system is the URL's ``host:port``; the ``up`` series carries the path
    (and query), so two URLs of one ``host:port`` have an ``up`` check each.

    Raises:
        ValueError: not an http(s) URL with a host, a port outside 1 to 65535,
            a user name or password in it, or spaces or control characters in
            it; the message quotes the URL with any user name and password
            replaced by ``***``.
    """
    system, path = _scrape_target(url)
    return system, series_name("up", {"path": path})


def _scrape_target(url: str) -> tuple[str, str]:
    # The (host:port, path and query) pair that tells two targets apart.
    quoted = shown(_without_userinfo(url), 200)
    if not url.isprintable() or any(c.isspace() for c in url):
        raise ValueError(
            f"--scrape {quoted}: a URL cannot contain spaces or control characters"
        )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as err:
        raise ValueError(f"--scrape {quoted}: {err}") from None
    if "@" in parts.netloc:
        raise ValueError(
            f"--scrape {quoted}: a user name or password in the URL is not "
            "supported (the agent does not log in to targets); scrape an "
            "endpoint that needs no login"
        )
    try:
        hostname, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(
            f"--scrape {quoted}: the port must be a number from 1 to 65535"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--scrape {quoted}: expected an http:// or https:// URL")
    if not hostname:
        raise ValueError(f"--scrape {quoted}: no host name")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(
            f"--scrape {quoted}: the port must be a number from 1 to 65535, got {port}"
        )
    system = parts.netloc
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return system, path


def _without_userinfo(url: str) -> str:
    # The URL as it may be shown: a user name and password become "***". In
    # a URL without "//" no authority can be told apart, so every part that
    # ends in "@" is hidden.
    head, slashes, rest = url.partition("//")
    if not slashes:
        return re.sub(r"[^/?#]*@", "***@", url)
    ends = [found for found in (rest.find(c) for c in "/?#") if found >= 0]
    end = min(ends, default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return url
    return f"{head}//***@{authority.rpartition('@')[2]}{rest[end:]}"


def _scrape_targets(urls: Sequence[str]) -> dict[str, tuple[str, str, str]]:
    # {url: (system, path and query, up series)}, in the order given.
    targets: dict[str, tuple[str, str, str]] = {}
    seen: dict[tuple[str, str], str] = {}
    for url in urls:
        system, path = _scrape_target(url)
        first = seen.setdefault((system, path), url)
        if url in targets or first != url:
            raise ValueError(
                f"--scrape {shown(url, 200)} is the same target as "
                f"{shown(first, 200)} (same host, port, path and query): its "
                "checks would be fed twice; give each target once"
            )
        targets[url] = (system, path, series_name("up", {"path": path}))
    return targets


class ScrapeTooLargeError(ValueError):
    """A scrape response was larger than :data:`MAX_SCRAPE_BYTES`."""


@dataclasses.dataclass
class _Scraped:
    """What one scrape of one target gave: samples, or why it failed."""

    samples: list[Sample] = dataclasses.field(default_factory=list)
    error: str | None = None
    invalid: int = 0


class ScrapeSource:
    """Prometheus text endpoints, scraped every ``interval`` seconds.

    Each scrape's samples that match the selectors become checks (see
    :func:`parse_exposition`; a target whose path is not ``/metrics`` has
    that path in its check ids). Each URL also yields a synthetic ``up``
    sample (``up{path="/metrics"}`` in the system ``host:port``), 1 when the
    scrape worked and 0 when it failed, so an unreachable target becomes an
    unhealthy check rather than silence. Only ``http`` and ``https`` URLs
    without a user name or password are accepted; proxies from the
    environment are not used. Two URLs of one
    ``host:port``, path and query (the same URL twice, or one in ``http``
    and ``https``) are refused: they would feed the same checks.

    The targets are scraped at the same time, each on a thread of its own,
    and each has ``min(timeout, interval)`` seconds to answer in full: a
    target that is slower, answers with something that is not HTTP, closes
    the connection early or sends more than :data:`MAX_SCRAPE_BYTES` counts
    as a failed scrape, and never holds the others up. When ``stop`` is set
    during a scrape, the scrape is abandoned at once and yields nothing.
    Samples whose own timestamp is not a time between the years 1 and 9999
    are dropped and counted in ``invalid``.
    """

    replay = False
    total = None

    def __init__(
        self,
        urls: Sequence[str],
        interval: float,
        *,
        selectors: Sequence[Selector] = (),
        config: AgentConfig | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise ValueError(
                f"interval and timeout must be more than 0, got {interval!r} "
                f"and {timeout!r}"
            )
        self._targets = _scrape_targets(urls)
        self.urls = list(self._targets)
        self.interval = interval
        self.selectors = list(selectors)
        self.config = config
        self.timeout = timeout
        self.errors = 0
        self.invalid = 0
        self._failing: set[str] = set()
        self._warned_invalid: set[str] = set()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self.description = f"scrape of {', '.join(self.urls)} every {interval:g} s"

    @property
    def scrape_timeout(self) -> float:
        """Seconds each target has to answer in full: ``min(timeout, interval)``."""
        return min(self.timeout, self.interval)

    def batches(self, stop: threading.Event) -> Iterator[Batch]:
        """Scrape every target now, then every ``interval`` seconds, until ``stop``."""
        while not stop.is_set():
            started = time.monotonic()
            now = time.time()
            samples = self.scrape_all(now, stop)
            if stop.is_set():
                return
            yield Batch(now, samples)
            stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def scrape_all(
        self, now: float, stop: threading.Event | None = None
    ) -> list[Sample]:
        """Scrape every target once, concurrently.

        Returns ``[]`` when ``stop`` is set before the scrapes finish.
        """
        timeout = self.scrape_timeout
        deadline = time.monotonic() + timeout
        lock = threading.Lock()
        results: dict[str, _Scraped] = {}
        finished = threading.Event()

        def work(url: str) -> None:
            try:
                scraped = self._read(url, now, timeout, deadline)
            finally:
                with self._busy_lock:
                    self._busy.discard(url)
            with lock:
                results[url] = scraped
                if len(results) == len(self.urls):
                    finished.set()

        for url in self.urls:
            with self._busy_lock, lock:
                if url in self._busy:
                    # The previous scrape of this target has not given up
                    # yet (a name that does not resolve, say): no second one.
                    results[url] = _Scraped(error="the previous scrape still runs")
                    continue
                self._busy.add(url)
            # NOTE: daemon threads: a target still answering when the run
            # ends must not keep the process alive (its reads stop at the
            # deadline anyway).
            threading.Thread(
                target=work, args=(url,), name=f"scrape {url}", daemon=True
            ).start()
        with lock:
            if len(results) == len(self.urls):
                finished.set()
        while not finished.is_set():
            if stop is not None and stop.is_set():
                return []
            left = deadline - time.monotonic()
            if left <= 0:
                break
            finished.wait(min(left, 0.05))
        with lock:
            done = dict(results)

        samples: list[Sample] = []
        for url in self.urls:
            scraped = done.get(url)
            if scraped is None:
                scraped = _Scraped(error=f"no complete answer within {timeout:g} s")
            samples.extend(self._settle(url, scraped, now))
        return samples

    def scrape(self, url: str, now: float) -> list[Sample]:
        """Scrape one target once; failures are logged and give ``up`` = 0."""
        timeout = self.scrape_timeout
        scraped = self._read(url, now, timeout, time.monotonic() + timeout)
        return self._settle(url, scraped, now)

    def _read(self, url: str, now: float, timeout: float, deadline: float) -> _Scraped:
        # Runs on a scrape thread: touches nothing shared, never raises.
        system, path, _ = self._targets[url]
        try:
            text = _fetch(url, timeout, deadline)
            samples = parse_exposition(
                text,
                system=system,
                at=now,
                selectors=self.selectors,
                config=self.config,
                path=path,
            )
        except (OSError, http.client.HTTPException, ValueError) as err:
            return _Scraped(error=_describe_error(err))
        except Exception as err:
            # A target's answer must never take the agent down, whatever the
            # parser makes of it.
            logger.debug("scrape of %s failed", url, exc_info=True)
            return _Scraped(error=_describe_error(err))
        kept = [sample for sample in samples if recordable_time(sample.at)]
        return _Scraped(samples=kept, invalid=len(samples) - len(kept))

    def _settle(self, url: str, scraped: _Scraped, now: float) -> list[Sample]:
        system, _, up = self._targets[url]
        if scraped.error is not None:
            self.errors += 1
            if url not in self._failing:
                logger.warning("scrape of %s failed: %s", url, scraped.error)
            self._failing.add(url)
            return [Sample(make_check_id(system, up), system, up, "up", 0.0, now)]

        if scraped.invalid:
            self.invalid += scraped.invalid
            if url not in self._warned_invalid:
                self._warned_invalid.add(url)
                logger.warning(
                    "scrape of %s: %d sample(s) with a timestamp outside the years "
                    "1 to 9999 skipped (milliseconds expected)",
                    url,
                    scraped.invalid,
                )
        if url in self._failing:
            self._failing.discard(url)
            logger.info("scrape of %s works again", url)
        up_sample = Sample(make_check_id(system, up), system, up, "up", 1.0, now)
        return [*scraped.samples, up_sample]


def _fetch(url: str, timeout: float, deadline: float) -> str:
    with _OPENER.open(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length", "").strip()
        expected = int(length) if length.isdigit() else None
        if expected is not None and expected > MAX_SCRAPE_BYTES:
            raise ScrapeTooLargeError(
                f"the response is {expected:,} bytes; at most "
                f"{MAX_SCRAPE_BYTES:,} are read"
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete answer within {timeout:g} s")
            chunk = response.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_SCRAPE_BYTES:
                raise ScrapeTooLargeError(
                    f"the response is larger than {MAX_SCRAPE_BYTES:,} bytes"
                )
            chunks.append(chunk)
        if expected is not None and not response.chunked and size < expected:
            # NOTE: read1 returns b"" on a connection closed early instead of
            # raising, so a cut-off body is caught here.
            raise http.client.IncompleteRead(b"", expected - size)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _describe_error(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(
        err, urllib.error.HTTPError
    ):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, http.client.IncompleteRead):
        return "IncompleteRead: the connection closed before the whole answer came"
    text = ascii(str(err) or type(err).__name__)[1:-1]
    if len(text) > 120:
        text = f"{text[:117]}..."
    return f"{type(err).__name__}: {text}"


# -- recorded CSV series -------------------------------------------------------


@dataclasses.dataclass
class SeriesFile:
    """One recorded ``timestamp,value`` file and what reading it found.

    Attributes:
        path: the file.
        label_key: ``<folder>/<file>``, the key NAB's label files use.
        system: the folder name (the check's system).
        metric: the file name without ``.csv``.
        check_id: the check it feeds.
        times: the record times, in file order (POSIX seconds).
        values: the values, in file order.
        invalid: ``(line, reason)`` of each line that could not be read.
    """

    path: Path
    label_key: str
    system: str
    metric: str
    check_id: str
    times: list[float]
    values: list[float]
    invalid: list[tuple[int, str]]

    @property
    def rows(self) -> int:
        """The number of samples read."""
        return len(self.times)


def parse_timestamp(text: str) -> float:
    """Parse a record time to POSIX seconds.

    Accepts ISO 8601 dates and times (``2014-02-14 14:30:00``, with ``T``,
    fractions of a second or an offset) and plain POSIX seconds. A time
    without an offset is taken as UTC: recorded series such as NAB's carry no
    zone, so their daylight-saving quirks show up as repeated or backward
    times rather than being "corrected".

    Eight digits that form a calendar date (``20140101``) are refused as
    ambiguous: a date without dashes, or POSIX seconds in 1970 to 1973.
    Digits grouped with ``_`` (which Python's ``float`` reads) are refused.

    Raises:
        ValueError: not a time, an ambiguous one, or not one between the
            years 1 and 9999 (such as POSIX milliseconds); the message quotes
            the text, escaped and shortened.
    """
    stamp = text.strip()
    if "_" in stamp:
        raise ValueError(f"not a time: {shown(text)} (digits grouped with _)")
    if _COMPACT_DATE.fullmatch(stamp):
        _refuse_compact_date(stamp, text)
    try:
        if stamp and (stamp[0].isdigit() and "-" not in stamp and ":" not in stamp):
            seconds = float(stamp)
        else:
            when = datetime.fromisoformat(stamp)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp()
    except (ValueError, OverflowError):
        raise ValueError(f"not a time: {shown(text)}") from None
    if not recordable_time(seconds):
        raise ValueError(
            f"{shown(text)} is not a time between the years 1 and 9999 "
            "(POSIX seconds expected, not milliseconds)"
        )
    return seconds


_COMPACT_DATE = re.compile(r"[0-9]{8}")


def _refuse_compact_date(stamp: str, text: str) -> None:
    # Eight digits that are no calendar date can only be POSIX seconds.
    try:
        day = datetime.strptime(stamp, "%Y%m%d")
    except ValueError:
        return
    seconds = datetime.fromtimestamp(float(stamp), UTC)
    raise ValueError(
        f"{shown(text)} is ambiguous: a date written without dashes "
        f"({day:%Y-%m-%d}) or POSIX seconds ({seconds:%Y-%m-%d %H:%M:%S}); "
        "write the date as YYYY-MM-DD"
    )


def read_series_file(path: str | os.PathLike[str]) -> SeriesFile:
    """Read one ``timestamp,value`` CSV file.

    Handles a UTF-8 byte order mark, CRLF line endings, a missing final
    newline and blank lines. The first line is a header when its value column
    is not a number. A line that cannot be read (wrong number of columns, a
    bad or ambiguous time as :func:`parse_timestamp` reads it, a value that
    is not a number or has digits grouped with ``_``) is skipped, logged
    with its line number and listed in ``invalid``; rows are kept in file
    order, repeats and all. Messages quote the file's text escaped and
    shortened, never raw.

    Raises:
        OSError: the file cannot be read.
    """
    file = Path(path)
    text = file.read_bytes().decode("utf-8-sig", errors="replace")
    times: list[float] = []
    values: list[float] = []
    invalid: list[tuple[int, str]] = []

    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        stamp, comma, raw = line.partition(",")
        if not comma or "," in raw:
            if number == 1 and comma:
                continue
            invalid.append((number, "expected two columns, timestamp,value"))
            continue
        try:
            value = float(raw)
        except ValueError:
            if number == 1:
                continue
            invalid.append((number, f"not a number: {shown(raw)}"))
            continue
        if "_" in raw:
            invalid.append(
                (number, f"not a number: {shown(raw)} (digits grouped with _)")
            )
            continue
        try:
            at = parse_timestamp(stamp)
        except ValueError as err:
            invalid.append((number, str(err)))
            continue
        times.append(at)
        values.append(value)

    for number, reason in invalid[:5]:
        logger.warning("%s:%d: skipped: %s", file, number, reason)
    if len(invalid) > 5:
        logger.warning("%s: %d more unreadable lines skipped", file, len(invalid) - 5)

    system, metric = _series_names(file)
    return SeriesFile(
        path=file,
        label_key=f"{file.parent.name}/{file.name}",
        system=system,
        metric=metric,
        check_id=make_check_id(system, metric),
        times=times,
        values=values,
        invalid=invalid,
    )


def _series_names(file: Path) -> tuple[str, str]:
    return file.parent.name or "replay", file.stem


def find_series_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories (searched recursively for ``*.csv``), sorted.

    A file reached twice (given twice, or also inside a given directory) is
    kept once.

    Raises:
        FileNotFoundError: a path does not exist, or a directory has no CSV.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.csv") if p.is_file())
            if not files:
                raise FileNotFoundError(f"--replay {raw}: no .csv files in it")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"--replay {raw}: no such file or directory")
    unique: dict[Path, Path] = {}
    for file in found:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


class NoUsableRowsError(ValueError):
    """A replay has not a single row to replay; the message names the files."""


class ReplaySource:
    """Recorded ``timestamp,value`` series, replayed in record time.

    One check per file, named after the file, in the system named after its
    folder. The files are merged into one stream ordered by record time (ties
    in file order), so the checks of one system are judged at the same
    moments and the clock only moves forward. Within a file, rows keep their
    file order: a row older than the series' previous one reaches the agent
    out of order, and the agent skips it (see ``Agent``).

    A file without a single usable row (empty, only a header, or every line
    unreadable) is left out with a warning; ``invalid`` counts the
    unreadable lines of every file read.

    The whole of each file is read up front (about 40 bytes per sample).

    Raises:
        FileNotFoundError: a path does not exist, or a directory has no CSV.
        ValueError: two files would feed the same check (same folder and
            file name under different parents).
        NoUsableRowsError: no file has a usable row.
    """

    replay = True

    def __init__(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        found = find_series_files(paths)
        owners: dict[str, Path] = {}
        for file in found:
            check_id = make_check_id(*_series_names(file))
            other = owners.setdefault(check_id, file)
            if other is not file:
                raise ValueError(
                    f"--replay: {other} and {file} would both be the check "
                    f"{check_id!r} (a check is named after the folder and the "
                    "file); replay them in separate runs or rename one"
                )
        read = [read_series_file(path) for path in found]
        empty = [series for series in read if not series.rows]
        if len(empty) == len(read):
            raise NoUsableRowsError(
                f"--replay: no usable rows in {_some_paths(empty)} (empty, only "
                "a header, or no line of timestamp,value that could be read)"
            )
        for series in empty:
            logger.warning(
                "%s: no usable rows (empty, only a header, or no line could be "
                "read); left out",
                series.path,
            )
        self.files = [series for series in read if series.rows]
        self.empty_files = [series.path for series in empty]
        self.invalid = sum(len(series.invalid) for series in read)
        self.total = sum(f.rows for f in self.files)
        systems = {f.system for f in self.files}
        self.description = (
            f"replay of {len(self.files)} series in {len(systems)} system(s)"
        )

    def batches(self, stop: threading.Event) -> Iterator[Batch]:
        """Yield one batch per row, in record time, until the end or ``stop``."""
        streams = [_rows(index, series) for index, series in enumerate(self.files)]
        files = self.files
        for count, (at, index, row) in enumerate(heapq.merge(*streams)):
            if count % 512 == 0 and stop.is_set():
                return
            series = files[index]
            sample = Sample(
                series.check_id,
                series.system,
                series.metric,
                series.metric,
                series.values[row],
                at,
            )
            yield Batch(at, (sample,))


def _some_paths(series: Sequence[SeriesFile], limit: int = 5) -> str:
    names = ", ".join(str(s.path) for s in series[:limit])
    if len(series) > limit:
        names += f" and {len(series) - limit} more"
    return names


def _rows(index: int, series: SeriesFile) -> Iterator[tuple[float, int, int]]:
    # heapq.merge takes each stream as sorted; a backward row simply comes
    # out right after its predecessor, and the agent skips it as out of order.
    for row, at in enumerate(series.times):
        yield at, index, row


def load_label_windows(
    path: str | os.PathLike[str],
) -> dict[str, list[tuple[float, float]]]:
    """Read anomaly windows in NAB's ``combined_windows.json`` format.

    The format is ``{"<folder>/<file>.csv": [["start", "end"], ...]}``, times
    are strings like ``2014-02-26 13:45:00.000000`` (taken as UTC, like the
    series); a window may not start after it ends.

    Raises:
        ValueError: not that format; the message names the file and the key.
        OSError: the file cannot be read.
    """
    name = os.fspath(path)
    try:
        data = json.loads(Path(name).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: not JSON: {err}") from None
    except RecursionError:
        raise ValueError(
            f"{name}: nested too deeply to be read; expected an object of "
            "file -> windows"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected an object of file -> windows")

    windows: dict[str, list[tuple[float, float]]] = {}
    for key, spans in data.items():
        series = shown(key, 200)
        if not isinstance(spans, list):
            raise ValueError(f"{name}: {series}: expected a list of [start, end]")
        parsed = []
        for span in spans:
            if not (isinstance(span, list) and len(span) == 2):
                raise ValueError(
                    f"{name}: {series}: expected [start, end], got {shown(span)}"
                )
            for stamp in span:
                if not isinstance(stamp, str):
                    raise ValueError(
                        f"{name}: {series}: bad time in {shown(span)}: expected a "
                        "string such as '2014-02-26 13:45:00.000000', got "
                        f"{shown(stamp)}"
                    )
            try:
                start, end = parse_timestamp(span[0]), parse_timestamp(span[1])
            except ValueError as err:
                raise ValueError(
                    f"{name}: {series}: bad time in {shown(span)}: {err}"
                ) from None
            if start > end:
                raise ValueError(
                    f"{name}: {series}: the window {shown(span)} starts after it ends"
                )
            parsed.append((start, end))
        windows[key] = parsed
    return windows
