"""Where samples come from: Prometheus payloads and endpoints, CSV files, /proc."""

from __future__ import annotations

import contextlib
import http.server
import math
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

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
    make_check_id,
    parse_exposition,
    parse_timestamp,
    read_series_file,
)

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
    """Serve one payload on a free 127.0.0.1 port; yield its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


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
