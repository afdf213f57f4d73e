"""Where samples come from: Prometheus payloads and endpoints, CSV files, /proc."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from path_server import serve_paths
from raw_server import raw_server

import monitoring._agent_sources as sources_module
from monitoring import (
    Agent,
    Batch,
    HostSource,
    ReplaySource,
    Sample,
    ScrapeSource,
    Selector,
    SelectorError,
    load_agent_config,
    load_label_windows,
    make_check_id,
    parse_exposition,
    parse_timestamp,
    read_series_file,
)
from monitoring._agent_sources import NoUsableRowsError, check_scrape_url

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO.parent / "shared" / "data" / "prometheus"
ALLTYPES = PROMETHEUS / "prometheus/model/textparse/testdata/alltypes.237mfs.prom.txt"
TESTDATA = PROMETHEUS / "prometheus/pkg/textparse/testdata.txt"
E2E = PROMETHEUS / "node_exporter/collector/fixtures/e2e-output.txt"
EVERYTHING = [Selector.parse('{__name__=~".+"}')]

PAYLOADS = {
    # file: (samples, NaN samples) as the data's README counts them
    "alltypes": (ALLTYPES, 1857, 12),
    "testdata": (TESTDATA, 410, 147),
    "e2e": (E2E, 3027, 0),
}

needs_payloads = pytest.mark.skipif(
    not PROMETHEUS.is_dir(), reason=f"payloads not found at {PROMETHEUS}"
)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# -- Prometheus text payloads -------------------------------------------------------


@needs_payloads
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_every_sample_of_each_payload_is_parsed(name: str) -> None:
    """Sample counts and NaN counts match the payloads' README."""
    path, count, nans = PAYLOADS[name]

    samples = parse_exposition(read(path), system="t", at=1.0, selectors=EVERYTHING)

    assert len(samples) == count
    assert sum(math.isnan(s.value) for s in samples) == nans
    assert len({s.check_id for s in samples}) == count
    assert all(s.at == 1.0 and s.system == "t" for s in samples)


@needs_payloads
def test_a_label_with_a_control_byte_stays_one_sample_with_a_printable_id() -> None:
    """node_dmi_info has a raw 0x1C in a label value (a line break to splitlines)."""
    samples = parse_exposition(
        read(E2E), system="t", at=0.0, selectors=[Selector.parse("node_dmi_info")]
    )

    (dmi,) = samples
    assert "\x1c" in dmi.metric
    assert dmi.check_id.isprintable()
    assert "\\x1c" in dmi.check_id
    assert 'product_sku="SKU=NotProvided;ModelName=PowerEdge R6515"' in dmi.metric


@needs_payloads
def test_values_beyond_int64_and_negative_bytes_stay_floats() -> None:
    """Near-2^64 and negative gauges from the fixtures are kept as they are."""
    samples = parse_exposition(read(E2E), system="t", at=0.0, selectors=EVERYTHING)
    values = {s.name: s.value for s in samples}

    assert values["node_zfs_zil_zil_itx_needcopy_bytes"] == 1.8446744073709537e19
    assert values["node_zfs_arc_memory_available_bytes"] == -9.223372036854776e17


@needs_payloads
def test_every_payload_sample_becomes_a_check_the_runtime_accepts(
    tmp_path: Path,
) -> None:
    """All 5,294 series of the three payloads as checks in one agent run."""
    samples = [
        sample
        for name, (path, _, _) in sorted(PAYLOADS.items())
        for sample in parse_exposition(
            read(path), system=name, at=1_700_000_000.0, selectors=EVERYTHING
        )
    ]

    agent = Agent(_Once(samples), load_agent_config())
    with agent:
        summary = agent.run()

        assert summary.checks == 1857 + 410 + 3027
        assert summary.stats.non_finite == 147 + 12
        assert set(summary.systems) == {"alltypes", "testdata", "e2e"}
        assert agent.health.get("e2e")["total_checks"] == 3027


class _Once:
    """A source that yields one batch."""

    replay = False
    total = None
    description = "payloads"

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def batches(self, stop: threading.Event) -> Iterator[Batch]:
        yield Batch(self.samples[0].at, self.samples)


def test_without_selectors_only_metrics_with_thresholds_are_kept() -> None:
    """The config decides which series matter when no --match is given."""
    text = 'up 1\nnode_filesystem_avail_bytes{mountpoint="/"} 5e8\nother 3\n'

    samples = parse_exposition(text, system="h", at=0.0, config=load_agent_config())

    assert sorted(s.name for s in samples) == ["node_filesystem_avail_bytes", "up"]


def test_a_sample_timestamp_is_used_and_the_instance_label_names_the_system() -> None:
    """Explicit millisecond timestamps win over the scrape time."""
    text = 'x{instance="db:9100"} 7 1700000000123\n'

    (sample,) = parse_exposition(text, system="h", at=5.0, selectors=EVERYTHING)

    assert sample.at == pytest.approx(1_700_000_000.123)
    assert sample.system == "db:9100"
    assert sample.check_id == 'db:9100/x{instance="db:9100"}'


def test_a_malformed_payload_is_a_value_error() -> None:
    """Parse errors surface (the scrape then counts as failed)."""
    with pytest.raises(ValueError):
        parse_exposition('x{a="b"} abc\n', system="h", at=0.0, selectors=EVERYTHING)


# -- selectors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "name", "labels", "selected"),
    [
        ("node_load1", "node_load1", {}, True),
        ("node_load1", "node_load5", {}, False),
        ('disk{mount="/"}', "disk", {"mount": "/"}, True),
        ('disk{mount="/"}', "disk", {"mount": "/boot"}, False),
        ('disk{mount!="/"}', "disk", {"mount": "/boot"}, True),
        ('{__name__=~"node_.*"}', "node_cpu", {}, True),
        ('{__name__=~"node"}', "node_cpu", {}, False),
        ('x{job!~"a|b", mode="idle"}', "x", {"job": "c", "mode": "idle"}, True),
        ('x{job!~"a|b"}', "x", {"job": "a"}, False),
        ('x{missing=""}', "x", {}, True),
        ('x{q="a\\"b"}', "x", {"q": 'a"b'}, True),
    ],
)
def test_selectors_match_like_promql(
    selector: str, name: str, labels: dict[str, str], selected: bool
) -> None:
    """Exact and anchored-regex matchers, positive and negative."""
    assert Selector.parse(selector).matches(name, labels) is selected


@pytest.mark.parametrize("text", ["", "{}", "x{a}", 'x{a=~"("}', "1abc", 'x{a="b"'])
def test_bad_selectors_are_refused_with_the_selector_quoted(text: str) -> None:
    """The message names the --match value."""
    with pytest.raises(SelectorError, match="--match"):
        Selector.parse(text)


# -- scraping a real HTTP endpoint ------------------------------------------------


@contextlib.contextmanager
def serve(payload: bytes) -> Iterator[str]:
    """Serve one payload at /metrics on a free 127.0.0.1 port; yield its URL."""
    with serve_paths({"/metrics": payload}) as base:
        yield f"{base}/metrics"


@needs_payloads
def test_a_scrape_reads_the_payload_and_adds_an_up_sample() -> None:
    """Over real HTTP: every selected sample plus up = 1."""
    with serve(ALLTYPES.read_bytes()) as url:
        source = ScrapeSource([url], 1.0, selectors=EVERYTHING)

        samples = source.scrape(url, 10.0)

    up = [s for s in samples if s.name == "up"]
    assert len(samples) == 1857 + 1
    assert [s.value for s in up] == [1.0]
    assert source.errors == 0


def test_a_target_that_cannot_be_scraped_reports_up_zero() -> None:
    """A refused connection is a sample too: up = 0 for that target."""
    with serve(b"") as url:
        pass
    source = ScrapeSource([url], 1.0, selectors=EVERYTHING, timeout=2.0)

    samples = source.scrape(url, 10.0)

    assert [(s.name, s.value) for s in samples] == [("up", 0.0)]
    assert source.errors == 1


def test_only_http_urls_are_scraped() -> None:
    """file:// and friends are refused up front."""
    with pytest.raises(ValueError, match="http"):
        ScrapeSource(["file:///etc/passwd"], 1.0)


# -- recorded CSV files --------------------------------------------------------------


def test_csv_reading_handles_bom_crlf_blank_lines_and_no_final_newline(
    tmp_path: Path,
) -> None:
    """Line-format variety gives the same rows."""
    path = tmp_path / "sys" / "m.csv"
    path.parent.mkdir()
    path.write_bytes(
        b"\xef\xbb\xbftimestamp,value\r\n2024-01-01 00:00:00,1\r\n\r\n"
        b"2024-01-01 00:05:00,2.5"
    )

    series = read_series_file(path)

    assert series.values == [1.0, 2.5]
    assert series.times == [1704067200.0, 1704067500.0]
    assert (series.system, series.metric, series.check_id) == ("sys", "m", "sys/m")
    assert series.label_key == "sys/m.csv"


def test_unreadable_csv_lines_are_skipped_with_their_line_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad rows do not stop a replay; each is logged with file and line."""
    path = tmp_path / "m.csv"
    path.write_text(
        "timestamp,value\n2024-01-01 00:00:00,1\nnot a time,2\n"
        "2024-01-01 00:10:00,x\n2024-01-01 00:15:00,1,2\n2024-01-01 00:20:00,4\n",
        encoding="utf-8",
    )

    series = read_series_file(path)

    assert series.values == [1.0, 4.0]
    assert [line for line, _ in series.invalid] == [3, 4, 5]
    assert f"{path}:3: skipped" in caplog.text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2014-03-09 03:00:00", 1394334000.0),
        ("2014-02-26 13:45:00.000000", 1393422300.0),
        ("2014-03-09T03:00:00+01:00", 1394330400.0),
        ("1394334000", 1394334000.0),
    ],
)
def test_timestamps_without_offset_are_utc(text: str, seconds: float) -> None:
    """Naive times are UTC; offsets and POSIX seconds are honoured."""
    assert parse_timestamp(text) == seconds
    assert datetime.fromtimestamp(parse_timestamp(text), UTC).tzinfo is UTC


def test_a_replay_merges_files_in_record_time(tmp_path: Path) -> None:
    """Two series interleave by time; ties keep file order."""
    folder = tmp_path / "sys"
    folder.mkdir()
    (folder / "a.csv").write_text("1,1\n3,3\n", encoding="utf-8")
    (folder / "b.csv").write_text("1,10\n2,20\n", encoding="utf-8")

    source = ReplaySource([tmp_path])
    order = [(b.at, b.samples[0].metric) for b in source.batches(threading.Event())]

    assert order == [(1.0, "a"), (1.0, "b"), (2.0, "b"), (3.0, "a")]
    assert source.total == 4


def test_a_replay_of_a_missing_path_names_it(tmp_path: Path) -> None:
    """A typo in --replay is reported, not silently ignored."""
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ReplaySource([tmp_path / "nothing-here"])


def test_check_ids_stay_within_the_runtime_limits() -> None:
    """Long ids are shortened with a hash; control characters are escaped."""
    long_a = make_check_id("s", "x" * 2000 + "a")
    long_b = make_check_id("s", "x" * 2000 + "b")

    assert len(long_a) == 1024
    assert long_a != long_b
    assert make_check_id("s", "a\x1cb") == "s/a\\x1cb"


# -- this machine ----------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_the_machine_source_reads_cpu_memory_load_and_disks() -> None:
    """Two reads: the second has CPU use, both have the rest, all in range."""
    source = HostSource(1.0, system="box")

    first = source.read(1.0)
    # NOTE: /proc/stat counts in ticks (10 ms); give the CPUs time to tick.
    time.sleep(0.2)
    second = source.read(2.0)

    first_names = {s.name for s in first}
    second_names = {s.name for s in second}
    assert {"memory_used_percent", "load1_per_cpu", "disk_used_percent"} <= first_names
    assert "cpu_used_percent" not in first_names
    assert "cpu_used_percent" in second_names
    for sample in second:
        assert sample.system == "box"
        assert sample.at == 2.0
        if sample.name.endswith("_percent"):
            assert 0.0 <= sample.value <= 100.0, sample


def test_the_machine_source_skips_pseudo_and_duplicate_mounts(tmp_path: Path) -> None:
    """Only data filesystems count, once per device."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mounts").write_text(
        "/dev/vda / ext4 rw 0 0\nproc /proc proc rw 0 0\n"
        "/dev/vda /etc/hosts ext4 rw 0 0\n/dev/loop0 /snap/x squashfs ro 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n",
        encoding="utf-8",
    )
    (proc / "loadavg").write_text("0.50 0.40 0.30 1/100 42\n", encoding="utf-8")

    samples = HostSource(1.0, system="box", proc=proc).read(1.0)

    disks = [s.metric for s in samples if s.name == "disk_used_percent"]
    assert disks == ['disk_used_percent{mountpoint="/"}']
    load = [s.value for s in samples if s.name == "load1_per_cpu"]
    assert load == [pytest.approx(0.5 / (os.cpu_count() or 1))]


# -- broken targets, bad times, bad files ---------------------------------------------


def assert_clean(message: str) -> None:
    """Input quoted in a message is escaped to printable ASCII and shortened."""
    assert message.isascii(), message
    assert message.isprintable(), message
    assert len(message) < 300, message


GARBAGE_ANSWERS = {
    "not-http": b"\x00\xff\x1b[31mgarbage\r\n\r\n",
    "closed-without-answer": b"",
    "cut-off-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nup 1\n",
    "header-line-too-long": b"HTTP/1.1 200 OK\r\nX-Long: "
    + b"a" * 70_000
    + b"\r\n\r\n",
    "too-many-headers": b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 200 + b"\r\n",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "cut-off-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ff\r\nup 1\n",
    "binary-payload": b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n\x00\x01{\x02\x03}",
    "says-too-large": b"HTTP/1.1 200 OK\r\nContent-Length: 40000000\r\n\r\nup 1\n",
    "is-too-large": b"HTTP/1.1 200 OK\r\n\r\n" + b"#\n" * (17 * 1024 * 1024),
    "http-error": b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(GARBAGE_ANSWERS))
def test_a_target_answering_broken_http_is_a_failed_scrape(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Protocol errors, cut-off and oversized answers give up = 0, never a crash."""
    with raw_server(GARBAGE_ANSWERS[case]) as url:
        source = ScrapeSource([url], 5.0, selectors=EVERYTHING)
        (batch,) = itertools.islice(source.batches(threading.Event()), 1)

    assert [(s.name, s.value) for s in batch.samples] == [("up", 0.0)]
    assert source.errors == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"scrape of {url} failed" in warning
    assert_clean(warning)


def test_a_slow_target_holds_up_neither_the_others_nor_the_stop() -> None:
    """Targets are scraped at once, each within the interval; stop ends a scrape."""
    with (
        raw_server(None) as slow,
        serve(b"up 1\n") as fast,
    ):
        source = ScrapeSource([slow, fast], 0.5, selectors=EVERYTHING)
        started = time.monotonic()
        (batch,) = itertools.islice(source.batches(threading.Event()), 1)
        took = time.monotonic() - started

        stop = threading.Event()
        threading.Timer(0.2, stop.set).start()
        stopping = time.monotonic()
        late = list(ScrapeSource([slow], 30.0).batches(stop))
        stopped_after = time.monotonic() - stopping

    ups = {s.check_id.split("/")[0]: s.value for s in batch.samples if s.name == "up"}
    slow_target, fast_target = slow.split("/")[2], fast.split("/")[2]
    assert ups == {slow_target: 0.0, fast_target: 1.0}
    assert 0.4 < took < 2.0
    assert late == []
    assert stopped_after < 1.5


def test_two_urls_of_one_host_and_port_have_an_up_check_each() -> None:
    """The up check carries the path (and query) of its URL."""
    with serve(b"") as url:
        pass
    base = url.rsplit("/", 1)[0]
    urls = [f"{base}/a", f"{base}/b", f"{base}/probe?target=x"]
    source = ScrapeSource(urls, 1.0, timeout=2.0)

    samples = source.scrape_all(10.0)

    target = base.split("/")[2]
    assert [s.check_id for s in samples] == [
        f'{target}/up{{path="/a"}}',
        f'{target}/up{{path="/b"}}',
        f'{target}/up{{path="/probe?target=x"}}',
    ]
    assert {s.system for s in samples} == {target}


def test_targets_on_one_host_and_port_feed_checks_of_their_own() -> None:
    """Every check id of a target carries its path, unless the path is /metrics."""
    payloads = {
        "/hot": b"cpu_used_percent 99\n",
        "/cold": b"cpu_used_percent 1\n",
        "/probe?target=x": b"cpu_used_percent 7\n",
        "/metrics": b"cpu_used_percent 50\n",
    }
    with serve_paths(payloads) as base:
        urls = [base + path for path in payloads]
        source = ScrapeSource(urls, 1.0, config=load_agent_config(), timeout=2.0)

        samples = source.scrape_all(10.0)

    target = base.split("/")[2]
    assert {s.check_id: s.value for s in samples if s.name != "up"} == {
        f"{target}/hot/cpu_used_percent": 99.0,
        f"{target}/cold/cpu_used_percent": 1.0,
        f"{target}/probe?target=x/cpu_used_percent": 7.0,
        f"{target}/cpu_used_percent": 50.0,
    }
    assert {s.system for s in samples} == {target}
    assert {s.metric for s in samples if s.name != "up"} == {"cpu_used_percent"}


def test_a_series_with_an_instance_label_is_named_after_the_instance() -> None:
    """The instance label names the system, whichever path the series came from."""
    text = 'x{instance="db:9100"} 7\ny 1\n'

    samples = parse_exposition(
        text, system="h:1", path="/federate", at=5.0, selectors=EVERYTHING
    )

    assert [s.check_id for s in samples] == [
        'db:9100/x{instance="db:9100"}',
        "h:1/federate/y",
    ]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://127.0.0.1:9100/metrics", "http://127.0.0.1:9100/metrics"),
        ("http://127.0.0.1:9100/metrics", "https://127.0.0.1:9100/metrics"),
        ("http://127.0.0.1:9100", "http://127.0.0.1:9100/"),
        ("http://127.0.0.1:9100/m?a=1", "http://127.0.0.1:9100/m?a=1#part"),
    ],
)
def test_one_scrape_target_given_twice_is_refused(first: str, second: str) -> None:
    """Two URLs of one host:port, path and query would feed the same checks."""
    with pytest.raises(ValueError, match="is the same target as") as caught:
        ScrapeSource([first, "http://127.0.0.1:9100/other", second], 1.0)

    message = str(caught.value)
    assert message.startswith(f"--scrape {second!r} is the same target as {first!r}")
    assert "give each target once" in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:abc/m", "port must be a number from 1 to 65535"),
        ("http://127.0.0.1:99999/m", "port must be a number from 1 to 65535"),
        ("http://127.0.0.1:0/m", "port must be a number from 1 to 65535"),
        ("http://[::1/m", "--scrape"),
        ("http://127.0.0.1:9100/a b", "spaces or control characters"),
        ("http://127.0.0.1:9100/\x1b[31m", "spaces or control characters"),
        ("http://:9100/m", "no host name"),
    ],
)
def test_a_scrape_url_that_cannot_be_opened_is_refused_up_front(
    url: str, message: str
) -> None:
    """The URL is checked when the source is made, not at the first scrape."""
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        ScrapeSource([url], 1.0)

    assert str(caught.value).isprintable()


@pytest.mark.parametrize(
    ("url", "shown_as"),
    [
        (
            "http://alice:s3cretpw@127.0.0.1:9100/metrics",
            "'http://***@127.0.0.1:9100/metrics'",
        ),
        ("https://s3cretpw@127.0.0.1:9100/m", "'https://***@127.0.0.1:9100/m'"),
        ("http://a:s3cretpw@b@127.0.0.1:9100/m", "'http://***@127.0.0.1:9100/m'"),
        ("http://alice:s3cretpw@127.0.0.1:abc/m", "'http://***@127.0.0.1:abc/m'"),
        ("http://alice:s3cretpw@/m", "'http://***@/m'"),
        ("http:/alice:s3cretpw@127.0.0.1/m", "'http:/***@127.0.0.1/m'"),
        ("alice:s3cretpw@127.0.0.1:9100/m", "'***@127.0.0.1:9100/m'"),
    ],
)
def test_a_scrape_url_with_a_user_or_password_is_refused_without_showing_them(
    url: str, shown_as: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials in a URL are refused up front; no name is looked up."""
    looked_up: list[object] = []

    def no_lookups(host: object, *args: object, **kwargs: object) -> None:
        looked_up.append(host)
        raise OSError("no name lookups in this test")

    monkeypatch.setattr(sources_module.socket, "getaddrinfo", no_lookups)

    with pytest.raises(ValueError, match=re.escape(f"--scrape {shown_as}: ")) as caught:
        ScrapeSource([url], 1.0)

    assert "s3cretpw" not in str(caught.value)
    assert "alice" not in str(caught.value)
    assert looked_up == []


def test_user_info_in_a_scrape_url_is_named_as_the_reason() -> None:
    """The message says what is wrong with the URL and what to do instead."""
    with pytest.raises(ValueError) as caught:
        check_scrape_url("http://alice:s3cretpw@127.0.0.1:9100/metrics")

    assert str(caught.value) == (
        "--scrape 'http://***@127.0.0.1:9100/metrics': a user name or password "
        "in the URL is not supported (the agent does not log in to targets); "
        "scrape an endpoint that needs no login"
    )


def test_scrape_samples_with_times_past_year_9999_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Millisecond-looking or absurd sample timestamps never reach the agent."""
    payload = b"x 1 99999999999999999999\ny 2 NaN\nz 3 1700000000000\n"
    with serve(payload) as url:
        source = ScrapeSource([url], 1.0, selectors=EVERYTHING)
        samples = source.scrape(url, 10.0)

    assert sorted((s.name, s.at) for s in samples) == [
        ("up", 10.0),
        ("z", 1_700_000_000.0),
    ]
    assert source.invalid == 2
    assert "2 sample(s) with a timestamp outside the years 1 to 9999" in caplog.text


@pytest.mark.parametrize(
    "text",
    ["1700000000000", "99999999999999999999", "1e30", "253402300800", "0001-01-01"],
)
def test_times_outside_the_years_1_to_9999_are_not_times(text: str) -> None:
    """Such a time could never be recorded; it is refused where it is read."""
    with pytest.raises(ValueError, match="not a time between the years 1 and 9999"):
        parse_timestamp(text)


@pytest.mark.parametrize("text", ["20140101", "19991231"])
def test_a_date_without_dashes_is_refused_as_ambiguous(text: str) -> None:
    """Eight digits are a compact date or POSIX seconds of 1970: neither is guessed."""
    with pytest.raises(ValueError) as caught:
        parse_timestamp(text)

    message = str(caught.value)
    assert message.startswith(f"{text!r} is ambiguous: a date written without dashes")
    assert f"({text[:4]}-{text[4:6]}-{text[6:]})" in message
    assert "POSIX seconds (197" in message


def test_an_eight_digit_number_that_is_no_date_is_posix_seconds() -> None:
    """Only a number that reads as a real calendar date is ambiguous."""
    assert parse_timestamp("12345678") == 12_345_678.0


def test_csv_numbers_with_digits_grouped_by_underscores_are_invalid_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Python reads 1_000 as 1000; a CSV file does not mean that, so it is refused."""
    path = tmp_path / "m.csv"
    path.write_text(
        "timestamp,value\n2014-01-01 00:00:00,1_000\n1_388_534_700,2\n"
        "20140101,3\n2014-01-01 00:15:00,4\n",
        encoding="utf-8",
    )

    series = read_series_file(path)

    assert series.values == [4.0]
    reasons = dict(series.invalid)
    assert reasons[2] == "not a number: '1_000' (digits grouped with _)"
    assert reasons[3] == "not a time: '1_388_534_700' (digits grouped with _)"
    assert reasons[4].startswith("'20140101' is ambiguous")
    assert f"{path}:2: skipped: not a number: '1_000'" in caplog.text
    assert f"{path}:4: skipped: '20140101' is ambiguous" in caplog.text


def test_a_header_with_an_underscore_is_still_a_header(tmp_path: Path) -> None:
    """A first line whose value column is no number at all is the header."""
    path = tmp_path / "m.csv"
    path.write_text("time_stamp,cpu_value\n1700000000,1\n", encoding="utf-8")

    series = read_series_file(path)

    assert (series.values, series.invalid) == ([1.0], [])


def test_csv_rows_with_times_past_year_9999_are_invalid_lines(tmp_path: Path) -> None:
    """A millisecond epoch row is skipped like any unreadable line."""
    path = tmp_path / "m.csv"
    path.write_text(
        "timestamp,value\n1700000000,1\n1700000000000,12.5\n1700000060,2\n",
        encoding="utf-8",
    )

    series = read_series_file(path)

    assert series.times == [1_700_000_000.0, 1_700_000_060.0]
    assert [line for line, _ in series.invalid] == [3]


def test_an_agent_refuses_samples_it_cannot_record_and_carries_on() -> None:
    """Whatever a source yields, a time past year 9999 is counted, never written."""
    good = Sample("s/m", "s", "m", "m", 1.0, 1_700_000_000.0)
    bad = Sample("s/m", "s", "m", "m", 2.0, 1e17)
    nan = Sample("s/n", "s", "n", "n", 2.0, math.nan)
    agent = Agent(_Once([good, bad, nan]), load_agent_config())
    with agent:
        summary = agent.run()

        assert summary.stats.samples == 1
        assert summary.stats.invalid_times == 2
        assert summary.invalid_lines == 2
        assert agent.checks.ids() == ["s/m"]
        assert agent.stop_report.clean


RANDOM_BYTES = random.Random(7).randbytes(6000)


@pytest.mark.parametrize(
    "content",
    [b"", b"timestamp,value\n", b"\r\n\r\n", RANDOM_BYTES, b"a,b\nx,1\n2024-01-01,y\n"],
    ids=["empty", "header-only", "blank", "random-bytes", "all-rows-bad"],
)
def test_a_replay_without_a_usable_row_is_refused_naming_the_file(
    content: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to replay is an error, not an empty run."""
    path = tmp_path / "sys" / "m.csv"
    path.parent.mkdir()
    path.write_bytes(content)

    with pytest.raises(NoUsableRowsError, match=re.escape(str(path))):
        ReplaySource([path])

    for record in caplog.records:
        assert_clean(record.getMessage())


def test_unreadable_lines_are_quoted_escaped_and_shortened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Control bytes and long junk never reach the log raw."""
    path = tmp_path / "m.csv"
    path.write_bytes(
        b"2024-01-01 00:00:00,1\n\x1b[2J\x07,2\n2024-01-01 00:05:00,"
        + b"9" * 50
        + b"x" * 5000
        + b"\n\xff\xfe,3\n"
    )

    series = read_series_file(path)

    assert [line for line, _ in series.invalid] == [2, 3, 4]
    assert "\\x1b[2J\\x07" in series.invalid[0][1]
    for record in caplog.records:
        assert_clean(record.getMessage())


def test_a_replay_leaves_out_files_without_rows_and_counts_their_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One empty file among good ones is a warning, not an error."""
    folder = tmp_path / "sys"
    folder.mkdir()
    (folder / "good.csv").write_text("1700000000,1\n", encoding="utf-8")
    (folder / "bad.csv").write_text("1700000000000,1\nx\n", encoding="utf-8")

    source = ReplaySource([folder])

    assert [f.metric for f in source.files] == ["good"]
    assert source.invalid == 2
    assert source.description == "replay of 1 series in 1 system(s)"
    assert f"{folder / 'bad.csv'}: no usable rows" in caplog.text


def test_files_that_would_share_a_check_are_refused(tmp_path: Path) -> None:
    """a/sys/m.csv and b/sys/m.csv would both be sys/m: say so, merge nothing."""
    for parent in ("a", "b"):
        path = tmp_path / parent / "sys" / "m.csv"
        path.parent.mkdir(parents=True)
        path.write_text("1700000000,1\n", encoding="utf-8")

    with pytest.raises(ValueError, match="would both be the check 'sys/m'") as caught:
        ReplaySource([tmp_path])

    assert str(tmp_path / "a" / "sys" / "m.csv") in str(caught.value)
    assert str(tmp_path / "b" / "sys" / "m.csv") in str(caught.value)


def test_a_file_given_twice_is_replayed_once(tmp_path: Path) -> None:
    """The same file through a folder and by name is one series."""
    path = tmp_path / "sys" / "m.csv"
    path.parent.mkdir()
    path.write_text("1700000000,1\n", encoding="utf-8")

    source = ReplaySource([tmp_path, path, tmp_path / "sys" / ".." / "sys" / "m.csv"])

    assert len(source.files) == 1
    assert source.total == 1


def test_a_labels_file_nested_too_deeply_is_refused_naming_it(tmp_path: Path) -> None:
    """JSON nested deeper than the parser goes is a clear error, not a crash."""
    path = tmp_path / "windows.json"
    path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", encoding="utf-8")

    with pytest.raises(ValueError) as caught:
        load_label_windows(path)

    assert str(caught.value) == (
        f"{path}: nested too deeply to be read; expected an object of file -> windows"
    )


@pytest.mark.parametrize("span", [[1, 2], ["2024-01-01 00:00:00", None]])
def test_a_label_window_time_that_is_not_text_is_refused(
    span: list[object], tmp_path: Path
) -> None:
    """Window times are strings, as in NAB's files; the message says so."""
    path = tmp_path / "windows.json"
    path.write_text(json.dumps({"sys/m.csv": [span]}), encoding="utf-8")

    with pytest.raises(ValueError) as caught:
        load_label_windows(path)

    bad = span[0] if not isinstance(span[0], str) else span[1]
    assert str(caught.value) == (
        f"{path}: 'sys/m.csv': bad time in {span!r}: expected a string such as "
        f"'2014-02-26 13:45:00.000000', got {bad!r}"
    )


def test_a_label_window_that_starts_after_it_ends_is_refused(tmp_path: Path) -> None:
    """The message names the file and the series."""
    path = tmp_path / "windows.json"
    path.write_text(
        json.dumps(
            {
                "sys/m.csv": [
                    ["2024-01-02 00:00:00.000000", "2024-01-01 00:00:00.000000"]
                ]
            }
        ),
        encoding="utf-8",
    )

    with pytest.raises(ValueError, match="starts after it ends") as caught:
        load_label_windows(path)

    assert str(path) in str(caught.value)
    assert "sys/m.csv" in str(caught.value)


def test_a_target_stuck_past_its_deadline_is_not_scraped_twice_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A scrape that has not given up yet is not joined by another one."""
    release = threading.Event()
    calls: list[str] = []

    def stuck(url: str, timeout: float, deadline: float) -> str:
        calls.append(url)
        release.wait(10)
        return "up 1\n"

    monkeypatch.setattr(sources_module, "_fetch", stuck)
    source = ScrapeSource(["http://127.0.0.1:9/m"], 0.2)
    try:
        first = source.scrape_all(1.0)
        second = source.scrape_all(2.0)
    finally:
        release.set()

    assert [s.value for s in first] == [0.0]
    assert [s.value for s in second] == [0.0]
    assert calls == ["http://127.0.0.1:9/m"]
    assert source.errors == 2
