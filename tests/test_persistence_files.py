from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime._events import freeze
from runtime._persistence import (
    JOURNAL_VERSION,
    SNAPSHOT_VERSION,
    CorruptFileError,
    DataDirError,
    DataDirLock,
    DataDirLockedError,
    FormatVersionError,
    JournalClosedError,
    JournalWriter,
    UnencodableValueError,
    encode_value,
    journal_name,
    list_journals,
    list_snapshots,
    load_newest_snapshot,
    prune_snapshots,
    read_journal,
    read_snapshot,
    snapshot_name,
    write_snapshot,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
JOURNAL_HEADER_SIZE = 8
FRAME_HEADER_SIZE = 8

FUZZ = settings(
    max_examples=150,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

PAYLOAD: dict[str, Any] = {
    "states": {"incident/inc-1": {"severity": "high", "tags": ["a", "b"]}},
    "log": [{"seq": 1, "after": 0.1}, {"seq": 2, "after": None}],
    "floats": [0.1, -0.0, 1e308, 5e-324, float("inf")],
    "ints": [0, -(2**63), 2**64 - 1, True, False],
    "text": "snow \u2603, nul \x00, emoji \U0001f600",
    "seq": 2,
}


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write_journal(
    directory: Path, records: list[dict[str, Any]], **kwargs: Any
) -> Path:
    with JournalWriter(directory, **kwargs) as writer:
        for record in records:
            writer.append(record)
        return writer.path


def record_offsets(records: list[dict[str, Any]]) -> list[int]:
    """Byte offset of each record's frame in a single journal file."""
    offsets = []
    offset = JOURNAL_HEADER_SIZE
    for record in records:
        offsets.append(offset)
        offset += FRAME_HEADER_SIZE + len(encode_value(record))
    return offsets


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


RECORDS = [{"seq": n, "field": "count", "after": n * 10} for n in range(1, 6)]


# --- snapshots ---------------------------------------------------------------


def test_snapshot_round_trips_payload_exactly_as_plain_values(tmp_path: Path) -> None:
    frozen = freeze(PAYLOAD)

    path = write_snapshot(tmp_path, 42, frozen)
    seq, payload = read_snapshot(path)

    assert path == tmp_path / "snapshot-00000000000000000042.snap"
    assert seq == 42
    assert repr(payload) == repr(PAYLOAD)
    assert type(payload) is dict
    assert type(payload["states"]["incident/inc-1"]["tags"]) is list
    assert [type(v) for v in payload["ints"]] == [int, int, int, bool, bool]


def test_snapshot_list_is_newest_first_and_ignores_leftover_temp_files(
    tmp_path: Path,
) -> None:
    write_snapshot(tmp_path, 9, {"n": 9})
    write_snapshot(tmp_path, 10, {"n": 10})
    leftover = tmp_path / ".snapshot-crashed.tmp"
    leftover.write_bytes(b"ERSNAP\x00\x01 half written")

    listed = list_snapshots(tmp_path)
    newest = load_newest_snapshot(tmp_path)

    assert listed == [tmp_path / snapshot_name(10), tmp_path / snapshot_name(9)]
    assert newest is not None
    assert (newest.seq, newest.payload, newest.skipped) == (10, {"n": 10}, ())


def test_corrupted_snapshot_byte_raises_corrupt_file_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = write_snapshot(tmp_path, 3, PAYLOAD)
    flip_byte(path, path.stat().st_size - 5)

    with pytest.raises(CorruptFileError, match=r"checksum mismatch") as caught:
        read_snapshot(path)

    assert str(path) in str(caught.value)
    assert caught.value.path == path


def test_truncated_snapshot_reports_length_mismatch(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 3, PAYLOAD)
    path.write_bytes(path.read_bytes()[:-1])

    with pytest.raises(CorruptFileError, match=r"length mismatch") as caught:
        read_snapshot(path)

    assert caught.value.path == path


def test_snapshot_renamed_to_another_seq_is_reported(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 3, PAYLOAD)
    renamed = path.rename(tmp_path / snapshot_name(4))

    with pytest.raises(CorruptFileError, match=r"header says seq 3 .* name says 4"):
        read_snapshot(renamed)


def test_snapshot_from_a_newer_format_raises_format_version_error(
    tmp_path: Path,
) -> None:
    path = write_snapshot(tmp_path, 3, PAYLOAD)
    data = bytearray(path.read_bytes())
    struct.pack_into(">H", data, 6, SNAPSHOT_VERSION + 1)
    path.write_bytes(bytes(data))

    with pytest.raises(FormatVersionError) as caught:
        read_snapshot(path)

    assert str(caught.value) == (
        f"{path} has format version {SNAPSHOT_VERSION + 1}, but this entity-runtime "
        f"reads versions up to {SNAPSHOT_VERSION}; upgrade entity-runtime to read "
        "it (the file was left untouched)"
    )
    assert caught.value.version == SNAPSHOT_VERSION + 1


def test_corrupt_newest_snapshot_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_snapshot(tmp_path, 1, {"n": 1})
    newest = write_snapshot(tmp_path, 2, {"n": 2})
    flip_byte(newest, 30)

    with caplog.at_level(logging.WARNING, logger="runtime._persistence"):
        loaded = load_newest_snapshot(tmp_path)

    assert loaded is not None
    assert (loaded.seq, loaded.payload) == (1, {"n": 1})
    assert [err.path for err in loaded.skipped] == [newest]
    assert f"skipping corrupt snapshot {newest}" in caplog.text


def test_prune_keeps_newest_valid_snapshots_and_unreadable_newer_ones(
    tmp_path: Path,
) -> None:
    for seq in (1, 2, 3, 4):
        write_snapshot(tmp_path, seq, {"n": seq})
    flip_byte(tmp_path / snapshot_name(4), 30)
    leftover = tmp_path / ".snapshot-crashed.tmp"
    leftover.write_bytes(b"partial")

    removed = prune_snapshots(tmp_path, keep=1)

    assert sorted(removed) == sorted(
        [tmp_path / snapshot_name(1), tmp_path / snapshot_name(2), leftover]
    )
    assert list_snapshots(tmp_path) == [
        tmp_path / snapshot_name(4),
        tmp_path / snapshot_name(3),
    ]


def test_missing_directory_has_no_snapshot(tmp_path: Path) -> None:
    missing = tmp_path / "nope"

    assert list_snapshots(missing) == []
    assert load_newest_snapshot(missing) is None


@pytest.mark.parametrize(
    ("value", "where", "reason"),
    [
        ({"n": 2**64}, "payload['n']", rf"int {2**64} does not fit in 64 bits"),
        ({"n": [-(2**63) - 1]}, "payload['n'][0]", rf"int {-(2**63) - 1} does not fit"),
        ({"t": (1, 2)}, "payload['t']", r"tuple .* is not JSON-compatible"),
        ({"s": {1}}, "payload['s']", r"set .* is not JSON-compatible"),
        ({"b": b"x"}, "payload['b']", r"bytes .* is not JSON-compatible"),
        (
            {"at": datetime.datetime(2024, 1, 1)},
            "payload['at']",
            r"datetime .* is not JSON-compatible",
        ),
        ({"d": {1: "x"}}, "payload['d']", r"has a key int 1; keys must be str"),
    ],
)
def test_unencodable_payload_is_refused_naming_the_value_and_nothing_is_written(
    tmp_path: Path, value: dict[str, Any], where: str, reason: str
) -> None:
    pattern = rf"^{re.escape(where)}: {reason}.*; nothing written$"

    with pytest.raises(UnencodableValueError, match=pattern):
        write_snapshot(tmp_path, 1, value)

    assert os.listdir(tmp_path) == []


# --- journal -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["always", "interval", "never"])
def test_journal_round_trips_records_in_each_fsync_mode(
    tmp_path: Path, mode: Any
) -> None:
    records = [freeze({"seq": n, "after": {"v": [n, n / 3]}}) for n in range(200)]

    with JournalWriter(tmp_path, fsync=mode, interval=0.01) as writer:
        for record in records:
            writer.append(record)
        before_close = read_journal(tmp_path).records
    after_close = read_journal(tmp_path)

    assert before_close == records
    assert after_close.records == records
    assert after_close.files == [tmp_path / journal_name(0)]
    assert after_close.torn_tail is None
    assert after_close.complete


def test_interval_mode_runs_a_background_thread_that_close_stops(
    tmp_path: Path,
) -> None:
    def fsync_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("journal-fsync")]

    writer = JournalWriter(tmp_path, fsync="interval", interval=0.01)
    running = fsync_threads()

    writer.close()

    assert len(running) == 1
    assert fsync_threads() == []
    with pytest.raises(JournalClosedError, match=r"is closed$"):
        writer.append({"n": 1})


def test_rotate_starts_a_new_file_and_covered_files_are_removed(
    tmp_path: Path,
) -> None:
    writer = JournalWriter(tmp_path, first_seq=1)
    writer.append({"seq": 1})
    writer.append({"seq": 2})
    writer.rotate(3)
    writer.append({"seq": 3})
    writer.rotate(4)
    writer.append({"seq": 4})

    removed = writer.remove_journals_before(4)
    writer.close()

    assert removed == [tmp_path / journal_name(1), tmp_path / journal_name(3)]
    assert list_journals(tmp_path) == [tmp_path / journal_name(4)]
    assert read_journal(tmp_path).records == [{"seq": 4}]


def test_rotate_refuses_to_go_back_to_a_lower_first_seq(tmp_path: Path) -> None:
    with JournalWriter(tmp_path, first_seq=10) as writer:
        with pytest.raises(ValueError, match=r"starts at 10, asked for 9"):
            writer.rotate(9)

        assert writer.path == tmp_path / journal_name(10)


def test_torn_last_record_is_dropped_with_a_warning_and_earlier_records_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_journal(tmp_path, RECORDS)
    last_offset = record_offsets(RECORDS)[-1]
    size = path.stat().st_size
    os.truncate(path, size - 3)

    with caplog.at_level(logging.WARNING, logger="runtime._persistence"):
        replay = read_journal(tmp_path)

    assert replay.records == RECORDS[:-1]
    assert replay.torn_tail is not None
    assert replay.torn_tail.offset == last_offset
    assert replay.torn_tail.dropped == size - 3 - last_offset
    assert f"journal {path}: dropping an incomplete last record at byte " in caplog.text
    assert f"at byte {last_offset} " in caplog.text


def test_zero_filled_tail_is_treated_as_torn(tmp_path: Path) -> None:
    path = write_journal(tmp_path, RECORDS)
    with path.open("ab") as file:
        file.write(bytes(64))

    replay = read_journal(tmp_path)

    assert replay.records == RECORDS
    assert replay.torn_tail is not None
    assert "zero bytes" in replay.torn_tail.reason


def test_corruption_in_the_middle_raises_naming_file_and_offset(
    tmp_path: Path,
) -> None:
    path = write_journal(tmp_path, RECORDS)
    bad_offset = record_offsets(RECORDS)[2]
    flip_byte(path, bad_offset + FRAME_HEADER_SIZE + 1)

    with pytest.raises(CorruptFileError) as caught:
        read_journal(tmp_path)

    assert caught.value.path == path
    assert caught.value.offset == bad_offset
    assert str(caught.value).startswith(
        f"corrupt file {path} at byte {bad_offset}: record checksum mismatch"
    )


def test_on_corrupt_stop_keeps_the_valid_prefix_and_reports_the_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = JournalWriter(tmp_path, first_seq=1)
    for record in RECORDS:
        writer.append(record)
    writer.rotate(6)
    writer.append({"seq": 6})
    writer.close()
    first = tmp_path / journal_name(1)
    bad_offset = record_offsets(RECORDS)[3]
    flip_byte(first, bad_offset + 5)

    with caplog.at_level(logging.WARNING, logger="runtime._persistence"):
        replay = read_journal(tmp_path, on_corrupt="stop")

    assert replay.records == RECORDS[:3]
    assert not replay.complete
    assert replay.corruption is not None
    assert (replay.corruption.path, replay.corruption.offset) == (first, bad_offset)
    assert replay.unread_files == [tmp_path / journal_name(6)]
    assert f"journal {first}: stopped reading" in caplog.text


def test_incomplete_record_in_an_older_file_is_corruption_not_a_torn_tail(
    tmp_path: Path,
) -> None:
    first = write_journal(tmp_path, RECORDS, first_seq=1)
    write_journal(tmp_path, [{"seq": 6}], first_seq=6)
    os.truncate(first, first.stat().st_size - 2)

    with pytest.raises(CorruptFileError, match=r"incomplete record") as caught:
        read_journal(tmp_path)

    assert caught.value.path == first


def test_empty_files_and_missing_directory_read_as_no_records(
    tmp_path: Path,
) -> None:
    (tmp_path / journal_name(1)).touch()
    (tmp_path / journal_name(5)).touch()

    replay = read_journal(tmp_path)
    missing = read_journal(tmp_path / "missing")

    assert (replay.records, replay.torn_tail, replay.complete) == ([], None, True)
    assert len(replay.files) == 2
    assert (missing.records, missing.files) == ([], [])


def test_journal_from_a_newer_format_raises_format_version_error(
    tmp_path: Path,
) -> None:
    path = write_journal(tmp_path, RECORDS)
    data = bytearray(path.read_bytes())
    struct.pack_into(">H", data, 6, JOURNAL_VERSION + 1)
    path.write_bytes(bytes(data))

    with pytest.raises(FormatVersionError, match=rf"^{re.escape(str(path))} has"):
        read_journal(tmp_path, on_corrupt="stop")


def test_new_writer_cuts_off_a_torn_tail_before_appending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_journal(tmp_path, RECORDS)
    os.truncate(path, path.stat().st_size - 4)

    with caplog.at_level(logging.WARNING, logger="runtime._persistence"):
        write_journal(tmp_path, [{"seq": 99}])
    replay = read_journal(tmp_path)

    assert replay.records == [*RECORDS[:-1], {"seq": 99}]
    assert replay.torn_tail is None
    assert f"journal {path}: dropping an incomplete last record" in caplog.text


def test_unencodable_record_leaves_the_journal_unchanged(tmp_path: Path) -> None:
    writer = JournalWriter(tmp_path)
    writer.append({"seq": 1})
    size = writer.path.stat().st_size

    with pytest.raises(UnencodableValueError, match=r"^record\['big'\]: int "):
        writer.append({"big": 2**80})

    writer.close()
    assert writer.path.stat().st_size == size
    assert read_journal(tmp_path).records == [{"seq": 1}]


# --- lock --------------------------------------------------------------------


def test_second_lock_on_the_same_directory_raises_naming_dir_and_pid(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"

    with DataDirLock(data_dir), pytest.raises(DataDirLockedError) as caught:
        DataDirLock(data_dir).acquire()

    assert caught.value.pid == os.getpid()
    assert str(caught.value).startswith(
        f"data directory {data_dir} is locked by this process (pid {os.getpid()})"
    )
    with DataDirLock(data_dir) as again:
        assert again.held


LOCK_HOLDER = """
import sys, time
from runtime._persistence import DataDirLock
DataDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_is_free_again_after_its_holder_is_killed_with_sigkill(
    tmp_path: Path,
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataDirLockedError, match=rf"\(pid {holder.pid}\)"):
            DataDirLock(tmp_path).acquire()

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        lock = DataDirLock(tmp_path)
        lock.acquire()
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()

    assert holder.returncode == -signal.SIGKILL
    assert lock.held
    lock.release()


@pytest.mark.parametrize("lock_file_exists", [False, True])
def test_lock_on_a_read_only_directory_raises_data_dir_error(
    tmp_path: Path, lock_file_exists: bool
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if lock_file_exists:
        (data_dir / "LOCK").touch()
    data_dir.chmod(0o500)
    try:
        try:
            (data_dir / "probe").touch()
        except PermissionError:
            pass
        else:
            pytest.skip("chmod does not stop writes here (running as root)")

        with pytest.raises(
            DataDirError, match=r"data directory is not writable"
        ) as err:
            DataDirLock(data_dir).acquire()
    finally:
        data_dir.chmod(0o700)

    assert err.value.path == data_dir
    assert err.value.errno == errno.EACCES


# --- disk full -----------------------------------------------------------------


FILL_DISK = """
import resource, signal, sys
from runtime._persistence import DataDirError, JournalWriter, write_snapshot

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
directory = sys.argv[1]
writer = JournalWriter(directory, fsync=sys.argv[2])
count = 0
try:
    while True:
        writer.append({"n": count, "pad": "x" * 100})
        count += 1
except DataDirError as err:
    print(count, err.errno, err, sep="\\n")
writer.close()
try:
    write_snapshot(directory, 7, {"pad": "y" * 10000})
except DataDirError as err:
    print(err.errno, err, sep="\\n")
"""


@pytest.mark.parametrize("mode", ["always", "interval", "never"])
def test_full_disk_raises_a_clear_error_and_keeps_every_acknowledged_record(
    tmp_path: Path, mode: str
) -> None:
    result = run_python(FILL_DISK, str(tmp_path), mode)

    assert result.returncode == 0, result.stderr
    count, journal_errno, journal_error, snap_errno, snap_error = (
        result.stdout.splitlines()
    )
    journal = tmp_path / journal_name(0)
    assert int(journal_errno) == errno.EFBIG
    assert journal_error.startswith(f"{journal}: could not append a record at byte ")
    assert journal_error.endswith(
        "the record was not recorded and the file was cut back to its last whole record"
    )
    replay = read_journal(tmp_path)
    assert replay.records == [{"n": n, "pad": "x" * 100} for n in range(int(count))]
    assert replay.torn_tail is None
    assert int(snap_errno) == errno.EFBIG
    assert snap_error.startswith(f"{tmp_path / snapshot_name(7)}: could not write")
    assert "no snapshot was written" in snap_error
    assert sorted(os.listdir(tmp_path)) == [journal.name]


# --- fuzzing -------------------------------------------------------------------


def valid_snapshot_bytes(tmp_path: Path) -> bytes:
    return write_snapshot(tmp_path, 5, PAYLOAD).read_bytes()


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_snapshot_raise_only_documented_errors(
    tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / snapshot_name(5)
    path.write_bytes(data)

    try:
        read_snapshot(path)
        reported = path
    except (CorruptFileError, FormatVersionError) as err:
        reported = err.path

    assert reported == path


@FUZZ
@given(
    cut=st.integers(min_value=0), flip=st.tuples(st.integers(0), st.integers(1, 255))
)
def test_any_truncation_or_changed_byte_of_a_snapshot_is_detected(
    tmp_path: Path, cut: int, flip: tuple[int, int]
) -> None:
    good = valid_snapshot_bytes(tmp_path)
    truncated = good[: cut % len(good)]
    changed = bytearray(good)
    changed[flip[0] % len(good)] ^= flip[1]
    path = tmp_path / snapshot_name(5)

    for damaged in (truncated, bytes(changed)):
        path.write_bytes(damaged)
        with pytest.raises((CorruptFileError, FormatVersionError)):
            read_snapshot(path)


def journal_bytes(tmp_path: Path) -> bytes:
    directory = tmp_path / "source"
    if not directory.exists():
        write_journal(directory, RECORDS)
    return (directory / journal_name(0)).read_bytes()


def replay_bytes(tmp_path: Path, data: bytes, **kwargs: Any) -> list[dict[str, Any]]:
    directory = tmp_path / "fuzz"
    directory.mkdir(exist_ok=True)
    (directory / journal_name(0)).write_bytes(data)
    return read_journal(directory, **kwargs).records


@FUZZ
@given(cut=st.integers(min_value=0))
def test_any_truncation_of_the_last_journal_file_keeps_a_prefix(
    tmp_path: Path, cut: int
) -> None:
    good = journal_bytes(tmp_path)
    cut %= len(good) + 1

    records = replay_bytes(tmp_path, good[:cut])

    assert records == RECORDS[: len(records)]
    whole = sum(offset <= cut for offset in record_offsets(RECORDS)[1:])
    assert len(records) == (len(RECORDS) if cut == len(good) else whole)


@FUZZ
@given(flip=st.tuples(st.integers(0), st.integers(1, 255)))
def test_a_changed_journal_byte_never_yields_a_record_that_was_not_written(
    tmp_path: Path, flip: tuple[int, int]
) -> None:
    changed = bytearray(journal_bytes(tmp_path))
    changed[flip[0] % len(changed)] ^= flip[1]

    try:
        records = replay_bytes(tmp_path, bytes(changed), on_corrupt="stop")
    except FormatVersionError:
        return

    assert records == RECORDS[: len(records)]
    assert len(records) < len(RECORDS)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_journal_raise_only_documented_errors(
    tmp_path: Path, data: bytes
) -> None:
    records: list[dict[str, Any]] = []
    try:
        records = replay_bytes(tmp_path, data)
        reported = journal_name(0)
    except (CorruptFileError, FormatVersionError) as err:
        reported = err.path.name

    assert reported == journal_name(0)
    assert all(type(record) is dict for record in records)
