"""Persistence seen through the Runtime: restore, crashes, damage, retention.

The on-disk formats on their own are tested in ``test_persistence_files.py``;
these tests drive a whole ``Runtime`` with a ``data_dir``, and kill real
writer processes (``persistence_writer.py``) where only a crash will do.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import Ticket, ticket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from persistence_writer import KIND, Counter

from runtime import EntityHandle, Runtime, thaw
from runtime._durability import RestoreError, load_data_dir
from runtime._persistence import (
    CorruptFileError,
    DataDirError,
    DataDirLock,
    DataDirLockedError,
    FormatVersionError,
    list_journals,
    list_snapshots,
    read_snapshot,
    write_snapshot,
)
from runtime.testing import FakeClock

REPO_ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("persistence_writer.py")
JOURNAL_HEADER_SIZE = 8
FRAME_HEADER_SIZE = 8
NOBODY = 65534
_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)


# --- helpers -------------------------------------------------------------------


def make_runtime(
    data_dir: Path, clock: FakeClock | None = None, **options: Any
) -> Runtime:
    """A runtime on ``data_dir`` that snapshots only when told to (and at stop)."""
    chosen: dict[str, Any] = {
        "snapshot_every": None,
        "snapshot_interval": None,
        "retention_max_rows": None,
        "stop_timeout": 5.0,
    }
    chosen.update(options)
    return Runtime(clock=clock, data_dir=data_dir, **chosen)


def dump(rt: Runtime) -> dict[str, Any]:
    """Everything a restart must bring back: states, every log row, the seq."""
    rows = [r.to_dict() for batch in rt.log.changes_since(0) for r in batch]
    states = {
        kind: {
            key: thaw(value)
            for key, value in rt.handle(kind).get_many(rt.handle(kind).ids()).items()
        }
        for kind in rt.kinds()
        if rt.handle(kind).store_backed
    }
    return {"rows": rows, "states": states, "seq": rt.log.last_seq}


def record_offsets(path: Path) -> list[int]:
    """Byte offset of each record's frame in one journal file."""
    data = path.read_bytes()
    offsets = []
    offset = JOURNAL_HEADER_SIZE
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack_from(">I", data, offset)
        offset += FRAME_HEADER_SIZE + length
    return offsets


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def file_names(directory: Path) -> list[str]:
    return sorted(
        p.name for p in [*list_snapshots(directory), *list_journals(directory)]
    )


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


@dataclass(frozen=True)
class Ack:
    id: str
    value: int
    seq: int


class Writer:
    """A ``persistence_writer.py`` process whose stdout is read line by line."""

    def __init__(self, tmp_path: Path, mode: str, data_dir: Path, *args: str):
        self._stderr_path = tmp_path / f"writer-{time.monotonic_ns()}.err"
        self._stderr = self._stderr_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), mode, str(data_dir), *args],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.close()

    def stderr(self) -> str:
        self._stderr.flush()
        return self._stderr_path.read_text()

    def read_until(self, predicate: Callable[[str], bool]) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line.endswith("\n"):
                raise AssertionError(
                    f"writer ended (rc={self.proc.wait(timeout=10)}) before the "
                    f"expected line; stderr:\n{self.stderr()}"
                )
            self.lines.append(line.rstrip("\n"))
            if predicate(self.lines[-1]):
                return self.lines[-1]

    def read_acks(self, count: int) -> None:
        """Read until the writer has acknowledged ``count`` changes."""
        for _ in range(count):
            self.read_until(lambda text: text.startswith("ack "))

    def ready(self) -> tuple[int, dict[str, Any]]:
        line = self.read_until(lambda text: text.startswith("ready "))
        _, seq, states = line.split(" ", 2)
        return int(seq), json.loads(states)

    def kill(self) -> None:
        """SIGKILL the writer and collect every complete line it printed."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        rest = self.proc.stdout.read()
        self.lines.extend(line for line in rest.split("\n")[:-1])
        assert self.proc.returncode == -signal.SIGKILL

    def acks(self) -> list[Ack]:
        found = []
        for line in self.lines:
            if line.startswith("ack "):
                _, entity_id, value, seq = line.split()
                found.append(Ack(entity_id, int(value), int(seq)))
        return found

    def tries(self) -> list[tuple[str, int]]:
        return [
            (line.split()[1], int(line.split()[2]))
            for line in self.lines
            if line.startswith("try ")
        ]


def killed_writer(
    tmp_path: Path, data_dir: Path, *args: str
) -> tuple[list[Ack], list[str]]:
    """Run the writer in ``hold`` mode, SIGKILL it once it has written, return acks."""
    with Writer(tmp_path, "hold", data_dir, *args) as writer:
        writer.ready()
        writer.read_until(lambda line: line == "held")
        writer.kill()
    return writer.acks(), writer.lines


def start_counter_runtime(data_dir: Path, **options: Any) -> Runtime:
    rt = make_runtime(data_dir, **options)
    rt.define_entity(KIND, Counter)
    return rt


def counter_values(rt: Runtime) -> dict[str, int]:
    handle = rt.handle(KIND)
    return {key: state["value"] for key, state in handle.get_many(handle.ids()).items()}


def last_values(acks: list[Ack]) -> dict[str, int]:
    values: dict[str, int] = {}
    for ack in acks:
        values[ack.id] = ack.value
    return values


def value_rows(rt: Runtime) -> dict[int, tuple[str, int]]:
    """seq -> (id, value) of every restored counter change."""
    return {
        row.seq: (row.id, row.after)
        for batch in rt.log.changes_since(0)
        for row in batch
        if row.field == "value"
    }


def _damage_record(journal: Path, index: int) -> None:
    """Flip one byte in the body of the ``index``-th record of ``journal``."""
    flip_byte(journal, record_offsets(journal)[index] + FRAME_HEADER_SIZE + 2)


def _ticket_runtime(
    data_dir: Path, clock: FakeClock, **options: Any
) -> tuple[Runtime, EntityHandle[Any]]:
    """A ``make_runtime`` runtime with the ``ticket`` kind defined, and its handle."""
    rt = make_runtime(data_dir, clock, **options)
    return rt, rt.define_entity("ticket", Ticket)


def _write_one_ticket(data_dir: Path, clock: FakeClock) -> None:
    """Leave ``data_dir`` as a runtime leaves it after one write and a stop."""
    rt, tickets = _ticket_runtime(data_dir, clock)
    with rt:
        tickets.mutate("t-1", lambda prev: ticket())


def _start_read_stop(
    rt: Runtime,
    read: Callable[[Runtime], _T],
    *,
    starting: AbstractContextManager[object] | None = None,
) -> _T:
    """Start ``rt``, return ``read(rt)`` and stop it, whatever fails on the way.

    The start alone runs inside ``starting``, so that a test can capture the
    logs of the restore and nothing else.
    """
    try:
        with starting or nullcontext():
            rt.start()
        return read(rt)
    finally:
        rt.stop()


def _refused_start(rt: Runtime, error: type[_E], match: str | None = None) -> _E:
    """Start ``rt``, expecting ``error`` (matching ``match``); stop it; return it."""
    try:
        with pytest.raises(error, match=match) as caught:
            rt.start()
    finally:
        rt.stop()

    return caught.value


def _assert_unlocked(data_dir: Path) -> None:
    """The lock of ``data_dir`` can be taken: a refused start let it go."""
    with DataDirLock(data_dir) as lock:
        assert lock.held


@dataclass(frozen=True)
class _Counters:
    """What a counter runtime holds right after its start."""

    values: dict[str, int]
    rows: dict[int, tuple[str, int]]
    seqs: list[int]
    seq: int


def _read_counters(rt: Runtime) -> _Counters:
    return _Counters(
        values=counter_values(rt),
        rows=value_rows(rt),
        seqs=sorted({r.seq for batch in rt.log.changes_since(0) for r in batch}),
        seq=rt.log.last_seq,
    )


def _values_and_seq(rt: Runtime) -> dict[str, Any]:
    """The counter values and the last restored seq."""
    return {"values": counter_values(rt), "seq": rt.log.last_seq}


def _read_counters_then_write(rt: Runtime, entity_id: str) -> tuple[_Counters, int]:
    """Read the counters, then write ``entity_id`` once; return them and its seq."""
    found = _read_counters(rt)

    rt.handle(KIND).mutate(entity_id, lambda prev: {"value": -1})

    return found, rt.log.last_seq


def _restore_counters(
    data_dir: Path,
    *,
    starting: AbstractContextManager[object] | None = None,
    **options: Any,
) -> _Counters:
    """Start a counter runtime on ``data_dir``, read what it restored, stop it."""
    return _start_read_stop(
        start_counter_runtime(data_dir, **options), _read_counters, starting=starting
    )


# --- crashes: SIGKILL at random moments ------------------------------------------


KILL_ROUNDS = 10


def test_acknowledged_changes_survive_sigkill_at_random_moments(
    tmp_path: Path,
) -> None:
    rng = random.Random(8675309)
    data_dir = tmp_path / "data"
    verified_seq = 0
    current: dict[str, int] = {}
    acked: list[Ack] = []
    applied_unacked: set[tuple[str, int]] = set()

    for round_no in range(KILL_ROUNDS):
        with Writer(
            tmp_path,
            "write",
            data_dir,
            f"--seed={rng.randrange(2**32)}",
            f"--base={(round_no + 1) * 1_000_000}",
            "--ids=5",
            "--snapshot-every=15",
        ) as writer:
            ready_seq, ready_states = writer.ready()
            writer.read_acks(rng.randint(1, 150))
            time.sleep(rng.random() * 0.004)
            writer.kill()
        acks, tries = writer.acks(), writer.tries()
        pending = tries[len(acks)] if len(tries) > len(acks) else None
        acked.extend(acks)
        found = _restore_counters(data_dir)
        leftovers = [p.name for p in data_dir.iterdir() if p.name.endswith(".tmp")]

        assert ready_seq == verified_seq
        assert {key: state["value"] for key, state in ready_states.items()} == current
        assert tries[: len(acks)] == [(a.id, a.value) for a in acks]
        assert len(tries) - len(acks) in (0, 1)
        assert found.seqs == list(range(1, found.seq + 1)), "a gap in the restored seqs"
        for ack in acked:
            assert found.rows.get(ack.seq) == (ack.id, ack.value), f"lost {ack}"
        unacked = set(found.rows.values()) - {(a.id, a.value) for a in acked}
        assert unacked <= applied_unacked | {pending}, f"never attempted: {unacked}"
        expected = {**current, **last_values(acks)}
        if pending is not None and pending in unacked:
            expected[pending[0]] = pending[1]
        assert found.values == expected
        assert found.seq == ready_seq + len(acks) + (pending in unacked)
        assert leftovers == []
        assert len(list_snapshots(data_dir)) <= 2
        applied_unacked |= unacked
        current, verified_seq = found.values, found.seq


# --- damaged or unusual data directories -----------------------------------------


def test_torn_journal_tail_after_a_kill_keeps_the_prefix_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    acks, _ = killed_writer(tmp_path, data_dir, "--count=6", "--ids=2")
    (journal,) = list_journals(data_dir)
    last = record_offsets(journal)[-1]
    size = journal.stat().st_size
    os.truncate(journal, last + (size - last) // 2)
    rt = start_counter_runtime(data_dir)

    found, next_seq = _start_read_stop(
        rt,
        lambda rt: _read_counters_then_write(rt, "e9"),
        starting=caplog.at_level(logging.WARNING, logger="runtime"),
    )

    assert found.seq == acks[-2].seq
    assert found.values == last_values(acks[:-1])
    assert next_seq == found.seq + 1
    assert f"journal {journal}: dropping an incomplete last record at byte {last}" in (
        caplog.text
    )


def test_torn_journal_header_after_a_stop_is_cut_off_with_a_warning(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock)
    with first:
        tickets.mutate("t-1", lambda prev: ticket())
        tickets.mutate("t-1", lambda prev: ticket(status="working"))
        before = dump(first)
    newest = list_journals(data_dir)[-1]
    os.truncate(newest, 3)
    second, _ = _ticket_runtime(data_dir, clock)

    after = _start_read_stop(
        second, dump, starting=caplog.at_level(logging.WARNING, logger="runtime")
    )

    assert after == before
    assert f"journal {newest}: dropping an incomplete last record at byte 0" in (
        caplog.text
    )


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_corrupt_newest_snapshot_falls_back_to_the_previous_one_and_loses_nothing(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    data_dir = tmp_path / "data"
    if how == "killed":
        acks, _ = killed_writer(
            tmp_path, data_dir, "--count=9", "--ids=3", "--snapshot-at=3,6"
        )
        expected = {"values": last_values(acks), "seq": 9}
    else:
        first, tickets = _ticket_runtime(data_dir, clock, keep_snapshots=2)
        with first:
            tickets.mutate("t-1", lambda prev: ticket())
            first.snapshot()
            tickets.mutate("t-1", lambda prev: ticket(status="working"))
            tickets.mutate("t-2", lambda prev: ticket(severity="high"))
            first.snapshot()
            tickets.remove("t-2")
            tickets.mutate("t-1", lambda prev: ticket(status="closed", tags=["x"]))
            expected = dump(first)
    newest, previous = list_snapshots(data_dir)
    flip_byte(newest, 40)
    damaged_bytes = newest.read_bytes()
    rt = make_runtime(data_dir, clock, keep_snapshots=2)
    if how == "killed":
        rt.define_entity(KIND, Counter)
        read = _values_and_seq
    else:
        rt.define_entity("ticket", Ticket)
        read = dump

    restored, used = _start_read_stop(
        rt,
        lambda rt: (read(rt), rt.restored),
        starting=caplog.at_level(logging.WARNING, logger="runtime"),
    )

    assert restored == expected
    assert used is not None
    assert used.snapshot == previous
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any(str(newest) in r.getMessage() for r in errors), caplog.text
    # The damaged file is kept as it was, and the fresh snapshot (which may
    # take its name) is not set aside with it.
    assert (data_dir / f"{newest.name}.damaged").read_bytes() == damaged_bytes
    assert read_snapshot(list_snapshots(data_dir)[0])[0] == expected["seq"]


def test_journal_alone_rebuilds_everything_when_it_covers_from_seq_1(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    acks, _ = killed_writer(tmp_path, data_dir, "--count=8", "--ids=3")
    for path in list_snapshots(data_dir):
        path.unlink()
    journals = file_names(data_dir)

    found = _restore_counters(data_dir)

    assert journals == ["journal-00000000000000000001.log"]
    assert found.values == last_values(acks)
    assert found.rows == {a.seq: (a.id, a.value) for a in acks}
    assert found.seq == 8


@pytest.mark.parametrize(
    ("write_after", "gap"),
    [
        (True, "the journal continues at seq 2 (expected 1)"),
        (False, "the journal journal-00000000000000000002.log starts at seq 2"),
    ],
)
def test_missing_snapshots_and_a_later_journal_fail_with_a_restore_error_naming_the_gap(
    tmp_path: Path, clock: FakeClock, write_after: bool, gap: str
) -> None:
    # Without a write after the snapshot, the journal after it is empty: its
    # name alone shows the gap.
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock)
    with first:
        tickets.mutate("t-1", lambda prev: ticket())
        first.snapshot()
        if write_after:
            tickets.mutate("t-1", lambda prev: ticket(status="working"))
    for path in list_snapshots(data_dir):
        path.unlink()
    journals = file_names(data_dir)
    rt, _ = _ticket_runtime(data_dir, clock)

    message = str(_refused_start(rt, RestoreError))

    assert "cannot restore without a gap" in message
    assert str(data_dir) in message
    assert gap in message
    assert file_names(data_dir) == journals
    _assert_unlocked(data_dir)


@pytest.mark.parametrize("exists", [False, True])
def test_empty_or_missing_data_dir_starts_fresh_at_seq_1(
    tmp_path: Path, clock: FakeClock, exists: bool
) -> None:
    data_dir = tmp_path / "data"
    if exists:
        data_dir.mkdir()
    rt, tickets = _ticket_runtime(data_dir, clock)

    try:
        rt.start()
        tickets.mutate("t-1", lambda prev: ticket())
        rows = tickets.history("t-1")
        restored = rt.restored
    finally:
        rt.stop()

    assert restored is not None
    assert (restored.seq, restored.snapshot, restored.journal_records) == (0, None, 0)
    assert not restored.damaged
    assert {r.seq for r in rows} == {1}
    assert file_names(data_dir) == [
        "journal-00000000000000000002.log",
        "snapshot-00000000000000000001.snap",
    ]


@pytest.mark.parametrize("which", ["snapshot", "journal"])
def test_data_dir_from_a_newer_format_version_is_refused_and_left_untouched(
    tmp_path: Path, clock: FakeClock, which: str
) -> None:
    data_dir = tmp_path / "data"
    _write_one_ticket(data_dir, clock)
    target = (list_snapshots if which == "snapshot" else list_journals)(data_dir)[-1]
    data = bytearray(target.read_bytes())
    data[6:8] = struct.pack(">H", 2)
    target.write_bytes(bytes(data))
    files = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"}
    rt, _ = _ticket_runtime(data_dir, clock)

    refused = _refused_start(rt, FormatVersionError)

    assert str(refused) == (
        f"{target} has format version 2, but this entity-runtime reads versions "
        "up to 1; upgrade entity-runtime to read it (the file was left untouched)"
    )
    assert {
        p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"
    } == files
    _assert_unlocked(data_dir)


READ_ONLY_START = """
import os, sys
from dataclasses import dataclass
from runtime import Runtime
from runtime._persistence import DataDirError

@dataclass
class Item:
    n: int

os.chdir(sys.argv[1])
if os.geteuid() == 0:
    os.setgid(int(sys.argv[2]))
    os.setuid(int(sys.argv[2]))
rt = Runtime(data_dir=".")
rt.define_entity("item", Item)
print("constructed", flush=True)
try:
    rt.start()
except DataDirError as err:
    print(type(err).__name__, err.errno, err, sep="\\n")
else:
    print("started")
rt.stop()
"""


def test_read_only_data_dir_fails_at_start_with_a_clear_data_dir_error(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    _write_one_ticket(data_dir, clock)
    files = file_names(data_dir)
    data_dir.chmod(0o555)

    try:
        result = subprocess.run(
            [sys.executable, "-c", READ_ONLY_START, str(data_dir), str(NOBODY)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        data_dir.chmod(0o755)

    assert result.returncode == 0, result.stderr
    constructed, kind, err_no, message = result.stdout.splitlines()
    assert constructed == "constructed"
    assert kind == "DataDirError"
    assert int(err_no) == errno.EACCES
    assert message.startswith(".: data directory is not writable")
    assert file_names(data_dir) == files


def test_data_dir_below_a_regular_file_fails_at_start_with_a_clear_data_dir_error(
    tmp_path: Path, clock: FakeClock
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    rt, _ = _ticket_runtime(blocker / "data", clock)

    try:
        with pytest.raises(DataDirError) as caught:
            rt.start()
        running = rt.running
    finally:
        rt.stop()

    assert caught.value.errno == errno.ENOTDIR
    assert str(caught.value) == (
        f"{blocker / 'data'}: could not create the data directory (Not a directory)"
    )
    assert not running


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, list[str], Callable[[], bool]]]:
    """A nearly full disk: a 64 KiB tmpfs if mounting works, else RLIMIT_FSIZE.

    Yields the directory, extra writer arguments and a function that frees
    space (returns False when it cannot).
    """
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )

    def grow() -> bool:
        if not mounted:
            return False
        subprocess.run(
            ["mount", "-o", "remount,size=4m", str(mount_point)],
            check=True,
            capture_output=True,
        )
        return True

    try:
        yield mount_point, [] if mounted else ["--fsize=49152"], grow
    finally:
        if mounted:
            done = subprocess.run(["umount", str(mount_point)], check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(
    tmp_path: Path, data_dir: Path, extra: list[str]
) -> tuple[list[Ack], list[str]]:
    with Writer(tmp_path, "fill", data_dir, "--ids=3", *extra) as writer:
        writer.ready()
        writer.read_until(lambda line: line == "stopped")
        writer.proc.wait(timeout=30)
    assert writer.proc.returncode == 0, writer.stderr()
    return writer.acks(), writer.lines


def test_full_disk_refuses_the_write_saying_nothing_was_recorded_and_keeps_acks(
    tmp_path: Path,
    small_disk: tuple[Path, list[str], Callable[[], bool]],
) -> None:
    directory, extra, grow = small_disk
    data_dir = directory / "data"

    acks, lines = fill_disk(tmp_path, data_dir, extra)
    grow()
    found, next_seq = _start_read_stop(
        start_counter_runtime(data_dir), lambda rt: _read_counters_then_write(rt, "e0")
    )

    reported = dict(line.split(" ", 1) for line in lines if " " in line)
    err_no, message = reported["error"].split(" ", 1)
    failed_id = next(
        line.split()[1] for line in reversed(lines) if line.startswith("try ")
    )
    state_id, state = reported["state"].split(" ", 1)
    assert len(acks) > 10
    assert int(err_no) in (errno.ENOSPC, errno.EFBIG)
    assert f"{KIND}/{failed_id} seq={acks[-1].seq + 1}: could not journal" in message
    assert message.endswith("nothing recorded")
    assert state_id == failed_id
    assert json.loads(state)["value"] == last_values(acks)[failed_id]
    assert int(reported["seq"]) == acks[-1].seq
    assert found.values == last_values(acks)
    assert found.rows == {a.seq: (a.id, a.value) for a in acks}
    assert next_seq == acks[-1].seq + 1


def test_second_runtime_on_the_same_data_dir_is_refused_until_the_first_stops(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock)
    second, again = _ticket_runtime(data_dir, clock)

    try:
        first.start()
        tickets.mutate("t-1", lambda prev: ticket())
        with pytest.raises(DataDirLockedError) as caught:
            second.start()
        refused_running = second.running
        first.stop()
        second.start()
        restored = again.get("t-1")
    finally:
        first.stop()
        second.stop()

    assert str(caught.value).startswith(f"data directory {data_dir} is locked by")
    assert caught.value.pid == os.getpid()
    assert not refused_running
    assert restored == ticket()


# --- what a restart brings back --------------------------------------------------


IDS3 = ("t-1", "t-2", "t-3")


def test_states_history_and_sequence_survive_a_restart_exactly(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock)
    extra = {"f": 0.1, "big": 2**63 - 1, "neg": -(2**63), "text": "snow \u2603"}
    with first:
        tickets.mutate("t-1", lambda prev: ticket(extra=extra), actor="alice")
        clock.advance(1.25)
        tickets.mutate(
            "t-1", lambda prev: {**prev, "tags": ["a", "b"]}, actor="bob", run_id="r1"
        )
        tickets.mutate("t-2", lambda prev: ticket(severity="high"))
        clock.advance(3)
        tickets.remove("t-2", actor="carol", run_id="r2")
        tickets.mutate("t-2", lambda prev: ticket(status="working"))
        tickets.mutate("t-3", lambda prev: ticket())
        tickets.remove("t-3")
        tickets.mutate("t-1", lambda prev: prev)
        before = dump(first)
        histories = {i: [r.to_dict() for r in tickets.history(i)] for i in IDS3}
        since = tickets.in_state_since("t-1", "tags")
    second, again = _ticket_runtime(data_dir, clock)

    try:
        second.start()
        after = dump(second)
        histories_after = {i: [r.to_dict() for r in again.history(i)] for i in IDS3}
        since_after = again.in_state_since("t-1", "tags")
        gone = again.get("t-3")
        again.mutate("t-4", lambda prev: ticket())
        next_seq = second.log.last_seq
    finally:
        second.stop()

    assert after == before
    assert histories_after == histories
    assert since_after == since
    assert gone is None
    assert before["seq"] == 7
    assert next_seq == 8
    tombstones = [r for r in after["rows"] if r["tombstone"]]
    assert [(r["seq"], r["id"], r["actor"], r["run_id"]) for r in tombstones] == [
        (4, "t-2", "carol", "r2"),
        (7, "t-3", "system", None),
    ]


def test_plugin_backed_kind_persists_only_its_log_and_reads_its_state(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    table: dict[str, dict[str, Any]] = {}

    def read(ids: list[str]) -> dict[str, Any]:
        return {i: table[i] for i in ids if i in table}

    def write(value: str) -> Callable[[Any], dict[str, Any]]:
        def apply(prev: Any) -> dict[str, Any]:
            table["t-1"] = ticket(status=value)
            return table["t-1"]

        return apply

    first = make_runtime(data_dir, clock)
    plugin = first.define_entity("plugged", Ticket, read=read)
    with first:
        plugin.mutate("t-1", write("open"))
        plugin.mutate("t-1", write("working"))
        history = [r.to_dict() for r in plugin.history("t-1")]
    table["t-1"] = ticket(status="closed")
    second = make_runtime(data_dir, clock)
    again = second.define_entity("plugged", Ticket, read=read)

    try:
        second.start()
        state = again.get("t-1")
        history_after = [r.to_dict() for r in again.history("t-1")]
        restored = second.restored
    finally:
        second.stop()

    assert state == ticket(status="closed")
    assert history_after == history
    assert restored is not None
    assert "plugged" not in load_data_dir(data_dir).states
    _, payload = read_snapshot(list_snapshots(data_dir)[0])
    assert payload["kinds"]["plugged"] == {"store_backed": False, "states": {}}


def test_kind_missing_at_start_is_kept_and_comes_back_when_defined_later(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock)
    hosts = first.define_entity("host", Ticket)
    with first:
        hosts.mutate("h-1", lambda prev: ticket(tags=["db"]))
        hosts.mutate("h-1", lambda prev: ticket(status="working", tags=["db"]))
        tickets.mutate("t-1", lambda prev: ticket())
        host_history = [r.to_dict() for r in hosts.history("h-1")]
    for round_no in range(2):
        without, only = _ticket_runtime(data_dir, clock)
        with caplog.at_level(logging.WARNING, logger="actors"), without:
            only.mutate("t-1", lambda prev, n=round_no: {**prev, "tags": [str(n)]})

    later, _ = _ticket_runtime(data_dir, clock)
    try:
        with caplog.at_level(logging.WARNING, logger="actors"):
            later.start()
        defined = later.define_entity("host", Ticket)
        state_after_start = defined.get("h-1")
        history_after_start = [r.to_dict() for r in defined.history("h-1")]
        defined.mutate("h-1", lambda prev: {**prev, "status": "closed"})
    finally:
        later.stop()
    last, _ = _ticket_runtime(data_dir, clock)
    final = last.define_entity("host", Ticket)
    with last:
        final_state = final.get("h-1")
        final_seq = last.log.last_seq

    assert state_after_start == ticket(status="working", tags=["db"])
    assert history_after_start == host_history
    assert final_state == ticket(status="closed", tags=["db"])
    assert final_seq == 6
    warnings = [r.getMessage() for r in caplog.records if "host" in r.getMessage()]
    assert len(warnings) == 3
    assert "holds kind host, which is not defined; its 1 states are kept" in warnings[0]


def test_stop_writes_a_final_snapshot_and_the_next_start_replays_no_journal(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock)
    with first:
        for status in ("open", "working", "closed"):
            tickets.mutate("t-1", lambda prev, s=status: ticket(status=s))
    second, _ = _ticket_runtime(data_dir, clock)

    restored = _start_read_stop(second, lambda rt: rt.restored)

    assert file_names(data_dir) == [
        "journal-00000000000000000004.log",
        "snapshot-00000000000000000003.snap",
    ]
    assert restored is not None
    assert restored.snapshot == data_dir / "snapshot-00000000000000000003.snap"
    assert (restored.seq, restored.journal_records) == (3, 0)
    # What was decoded lives on in the log and the store only.
    assert (restored.changes, restored.states) == ([], {})


def test_automatic_snapshots_follow_snapshot_every_and_old_files_are_pruned(
    tmp_path: Path, clock: FakeClock
) -> None:
    data_dir = tmp_path / "data"
    rt, tickets = _ticket_runtime(
        data_dir,
        clock,
        snapshot_every=5,
        keep_snapshots=2,
        housekeeping_interval=0.01,
    )
    observed = []

    try:
        rt.start()
        for batch in range(1, 5):
            for n in range(5):
                tickets.mutate(
                    "t-1", lambda prev, n=n, b=batch: ticket(tags=[f"{b}{n}"])
                )
            newest = 5 * batch
            kept = [s for s in (newest - 5, newest) if s > 0]
            expected = sorted(
                [f"snapshot-{s:020d}.snap" for s in kept]
                + [f"journal-{s + 1:020d}.log" for s in kept]
            )
            observed.append(wait_for(lambda e=expected: file_names(data_dir) == e))
        for n in range(4):
            tickets.mutate("t-1", lambda prev, n=n: ticket(tags=[f"last{n}"]))
        time.sleep(0.2)
        before_stop = file_names(data_dir)
    finally:
        rt.stop()

    assert observed == [True, True, True, True]
    assert before_stop == [
        "journal-00000000000000000016.log",
        "journal-00000000000000000021.log",
        "snapshot-00000000000000000015.snap",
        "snapshot-00000000000000000020.snap",
    ]
    assert file_names(data_dir) == [
        "journal-00000000000000000021.log",
        "journal-00000000000000000025.log",
        "snapshot-00000000000000000020.snap",
        "snapshot-00000000000000000024.snap",
    ]


# --- retention -----------------------------------------------------------------


FIELDS = ("status", "severity", "tags", "extra")


def test_retention_drops_old_and_excess_rows_but_keeps_each_fields_newest_row(
    tmp_path: Path, clock: FakeClock
) -> None:
    rt, tickets = _ticket_runtime(
        tmp_path / "data", clock, retention_max_age=3600, retention_max_rows=3
    )
    keys = [(i, f) for i in ("old", "busy") for f in FIELDS]

    try:
        rt.start()
        tickets.mutate("old", lambda prev: ticket())
        clock.advance(10)
        tickets.mutate("old", lambda prev: ticket(status="working"))
        clock.advance(7200)
        tickets.mutate("old", lambda prev: ticket(status="working", severity="high"))
        tickets.mutate("busy", lambda prev: ticket())
        for n in range(2, 11):
            tickets.mutate("busy", lambda prev, n=n: {**prev, "tags": [str(n)]})
        since = {key: tickets.in_state_since(*key) for key in keys}
        rows_before = len(rt.log)

        dropped = rt.apply_retention()

        old = [(r.seq, r.field) for r in tickets.history("old")]
        busy = [(r.seq, r.field) for r in tickets.history("busy")]
        since_after = {key: tickets.in_state_since(*key) for key in keys}
        rt.log.check()
        rows_after = len(rt.log)
    finally:
        rt.stop()

    assert old == [(1, "tags"), (1, "extra"), (2, "status"), (3, "severity")]
    assert busy == [
        (4, "status"),
        (4, "severity"),
        (4, "extra"),
        (11, "tags"),
        (12, "tags"),
        (13, "tags"),
    ]
    assert since_after == since
    assert since[("old", "status")] == clock.now() - timedelta(seconds=7200)
    assert rows_before - rows_after == dropped == 9


def test_retention_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock, retention_max_rows=2)
    with first:
        for n in range(6):
            tickets.mutate("t-1", lambda prev, n=n: ticket(tags=[str(n)]))
        first.apply_retention()
        pruned = dump(first)
    second, _ = _ticket_runtime(data_dir, clock, retention_max_rows=None)

    restored = _start_read_stop(second, dump)

    assert restored == pruned
    assert [r["seq"] for r in restored["rows"]] == [1, 1, 1, 5, 6]
    assert restored["seq"] == 6


# --- model-based: random writes and restarts -------------------------------------


IDS = ("a", "b", "c")
MUTATION = st.tuples(
    st.just("mutate"),
    st.sampled_from(IDS),
    st.sampled_from(["open", "working", "closed"]),
    st.sampled_from(["low", "high"]),
    st.lists(st.sampled_from(["x", "y"]), max_size=2),
)
FSYNC_MODES = st.sampled_from(["always", "interval", "never"])
OPERATION = st.one_of(
    MUTATION,
    MUTATION,
    st.tuples(st.just("remove"), st.sampled_from(IDS)),
    st.tuples(st.just("snapshot")),
    st.tuples(st.sampled_from(["restart", "crash"]), FSYNC_MODES),
)


class Model:
    """What the runtime should hold: states, rows and the sequence."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[tuple[Any, ...]]] = {i: [] for i in IDS}
        self.seq = 0

    def mutate(self, entity_id: str, new: dict[str, Any], at: float) -> None:
        prev = self.states.get(entity_id)
        changed = [f for f in new if prev is None or prev[f] != new[f]]
        if not changed:
            return
        self.seq += 1
        for field in changed:
            before = None if prev is None else prev[field]
            row = (self.seq, field, before, new[field], False, at)
            self.rows[entity_id].append(row)
        self.states[entity_id] = new

    def remove(self, entity_id: str, at: float) -> None:
        prev = self.states.pop(entity_id, None)
        if prev is None:
            return
        self.seq += 1
        self.rows[entity_id].append((self.seq, None, prev, None, True, at))


def crash_image(source: Path, target: Path) -> Path:
    """Copy a running runtime's files, as a kill -9 would leave them on disk.

    Every mode hands each record to the operating system before the mutation
    returns, so an idle runtime's files are what a crash would leave.
    """
    target.mkdir()
    for path in source.iterdir():
        if path.name != "LOCK":
            shutil.copy2(path, target / path.name)
    return target


def observe(handle: Any, rt: Runtime) -> tuple[Any, ...]:
    states = {i: thaw(s) for i, s in handle.get_many(IDS).items()}
    rows = {
        i: [
            (r.seq, r.field, thaw(r.before), thaw(r.after), r.tombstone, r.timestamp)
            for r in handle.history(i)
        ]
        for i in IDS
    }
    return states, rows, rt.log.last_seq


@settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(operations=st.lists(OPERATION, max_size=25), first_mode=FSYNC_MODES)
def test_random_writes_and_restarts_match_a_plain_model(
    tmp_path_factory: pytest.TempPathFactory,
    operations: list[tuple[Any, ...]],
    first_mode: str,
) -> None:
    base = tmp_path_factory.mktemp("model")
    data_dir = base / "data-0"
    clock = FakeClock()
    model = Model()
    checks = 0

    def open_runtime(mode: str) -> tuple[Runtime, Any]:
        rt, handle = _ticket_runtime(data_dir, clock, journal_fsync=mode)
        rt.start()
        return rt, handle

    rt, handle = open_runtime(first_mode)
    try:
        for number, op in enumerate([*operations, ("restart", first_mode)]):
            clock.advance(1)
            if op[0] == "mutate":
                _, entity_id, status, severity, tags = op
                new = ticket(status=status, severity=severity, tags=tags)
                handle.mutate(entity_id, lambda prev, new=new: new)
                model.mutate(entity_id, new, clock())
            elif op[0] == "remove":
                handle.remove(op[1])
                model.remove(op[1], clock())
            elif op[0] == "snapshot":
                rt.snapshot()
            else:
                if op[0] == "crash":
                    data_dir = crash_image(data_dir, base / f"data-{number + 1}")
                rt.stop()
                rt, handle = open_runtime(op[1])

                observed = observe(handle, rt)

                assert observed == (model.states, model.rows, model.seq)
                checks += 1
    finally:
        rt.stop()

    assert checks >= 1


# --- damaged files and failed starts -----------------------------------------


def test_corrupt_journal_already_covered_by_the_newest_snapshot_hides_no_change(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    acks, _ = killed_writer(
        tmp_path, data_dir, "--count=9", "--ids=3", "--snapshot-at=3,6"
    )
    _damage_record(data_dir / "journal-00000000000000000004.log", 0)

    found = _restore_counters(data_dir)

    assert found.seq == 9
    assert found.values == last_values(acks)


def test_changes_acknowledged_after_a_damaged_restore_survive_the_next_kill(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    killed_writer(tmp_path, data_dir, "--count=6", "--ids=2", "--snapshot-at=2")
    _damage_record(data_dir / "journal-00000000000000000003.log", 2)
    acks, lines = killed_writer(
        tmp_path, data_dir, "--count=3", "--ids=2", "--base=100", "--recover-damaged"
    )

    found = _restore_counters(data_dir)

    assert lines[0].startswith("ready 4 ")
    assert [a.seq for a in acks] == [5, 6, 7]
    assert found.seq == 7
    assert all(found.rows.get(a.seq) == (a.id, a.value) for a in acks)


def test_restart_after_a_damaged_restore_brings_back_exactly_what_was_stopped(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    killed_writer(tmp_path, data_dir, "--count=9", "--ids=3", "--snapshot-at=3,6")
    _damage_record(data_dir / "journal-00000000000000000004.log", 0)
    first = start_counter_runtime(data_dir)
    with first:
        first.handle(KIND).mutate("e0", lambda prev: {"value": -7})
        stopped = dump(first)

    restored = _start_read_stop(start_counter_runtime(data_dir), dump)

    assert restored == stopped


def test_corrupt_first_record_after_the_snapshot_restores_the_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    acks, _ = killed_writer(
        tmp_path, data_dir, "--count=6", "--ids=3", "--snapshot-at=3"
    )
    journal = data_dir / "journal-00000000000000000004.log"
    _damage_record(journal, 0)

    found = _restore_counters(
        data_dir,
        starting=caplog.at_level(logging.ERROR, logger="runtime"),
        recover_damaged=True,
    )

    assert found.seq == 3
    assert found.values == last_values(acks[:3])
    assert str(journal) in caplog.text


def test_start_that_failed_on_a_full_disk_can_be_retried_once_space_is_freed(
    tmp_path: Path,
    small_disk: tuple[Path, list[str], Callable[[], bool]],
) -> None:
    directory, extra, grow = small_disk
    if extra:
        pytest.skip("needs a tmpfs to keep the disk full for an in-process start")
    data_dir = directory / "data"
    acks, _ = fill_disk(tmp_path, data_dir, extra)
    rt = start_counter_runtime(data_dir)

    try:
        with pytest.raises(DataDirError, match="No space left on device"):
            rt.start()
        grow()
        rt.start()
        restored = counter_values(rt)
    finally:
        rt.stop()

    assert restored == last_values(acks)


def test_journal_damaged_before_its_end_is_refused_by_default_and_left_as_is(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    killed_writer(tmp_path, data_dir, "--count=9", "--ids=3", "--snapshot-at=3")
    journal = data_dir / "journal-00000000000000000004.log"
    _damage_record(journal, 2)
    files_before = sorted(p.name for p in data_dir.iterdir())
    bytes_before = journal.read_bytes()
    rt = start_counter_runtime(data_dir)

    _refused_start(rt, RestoreError, match=r"recover_damaged=True to continue from")

    assert sorted(p.name for p in data_dir.iterdir()) == files_before
    assert journal.read_bytes() == bytes_before
    again = start_counter_runtime(data_dir, recover_damaged=True)
    with again:
        assert again.log.last_seq == 5
    assert (data_dir / f"{journal.name}.damaged").exists()


@pytest.mark.parametrize(("mode", "synced"), [("always", True), ("never", False)])
def test_an_acknowledged_write_was_fsynced_only_with_fsync_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, synced: bool
) -> None:
    import os

    calls: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    rt = start_counter_runtime(tmp_path / "data", journal_fsync=mode)
    rt.start()
    counts = []

    try:
        monkeypatch.setattr(os, "fsync", recording_fsync)
        for value in range(5):
            before = len(calls)
            rt.handle(KIND).mutate("e0", lambda prev, v=value: {"value": v})
            counts.append(len(calls) - before)
        monkeypatch.undo()
    finally:
        rt.stop()

    assert all(n >= 1 for n in counts) if synced else counts == [0] * 5


@pytest.mark.parametrize("journal_kept", [True, False])
def test_a_damaged_only_snapshot_is_refused_and_left_as_is(
    tmp_path: Path, clock: FakeClock, journal_kept: bool
) -> None:
    # After a clean stop the directory holds one snapshot and the empty journal
    # after it: with the snapshot damaged, no file holds its changes.
    data_dir = tmp_path / "data"
    first, tickets = _ticket_runtime(data_dir, clock)
    with first:
        for n in range(5):
            tickets.mutate(f"t-{n}", lambda prev: ticket())
    if not journal_kept:
        for journal in list_journals(data_dir):
            journal.unlink()
    (snapshot,) = list_snapshots(data_dir)
    flip_byte(snapshot, 200)
    before = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"}

    for _ in range(2):
        rt, _ = _ticket_runtime(data_dir, clock)
        _refused_start(rt, RestoreError, match="held changes up to seq 5")

    after = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"}
    assert after == before


_AT = 1_700_000_000.0


def _crafted_snapshot(tmp_path: Path, seq: int, changes: list[Any]) -> Path:
    """A data dir holding one valid snapshot file at ``seq`` with ``changes``."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    payload = {
        "format": 1,
        "seq": seq,
        "kinds": {"ticket": {"store_backed": True, "states": {}}},
        "changes": changes,
    }
    write_snapshot(data_dir, seq, payload)
    return data_dir


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            [
                [2, "ticket", "t-1", _AT, "system", None, [["status", None, "open"]]],
                [1, "ticket", "t-2", _AT, "system", None, [["status", None, "open"]]],
            ],
            "sequence 1 is not after",
        ),
        (
            [[1, "ticket", "t-1", _AT, "system", None, [[None, 5, None]]]],
            "TypeError",
        ),
    ],
)
def test_a_checksummed_snapshot_whose_changes_cannot_be_rebuilt_is_refused(
    tmp_path: Path, clock: FakeClock, changes: list[Any], reason: str
) -> None:
    data_dir = _crafted_snapshot(tmp_path, 2, changes)
    before = file_names(data_dir)

    rt, _ = _ticket_runtime(data_dir, clock)
    _refused_start(rt, RestoreError, match=f"could not be rebuilt.*{reason}")

    assert file_names(data_dir) == before
    assert gc.isenabled()


def test_a_snapshot_holding_changes_after_its_own_seq_is_refused(
    tmp_path: Path, clock: FakeClock
) -> None:
    changes = [
        [1, "ticket", "t-1", _AT, "system", None, [["status", None, "open"]]],
        [7, "ticket", "t-2", _AT, "system", None, [["status", None, "open"]]],
    ]
    data_dir = _crafted_snapshot(tmp_path, 1, changes)
    before = file_names(data_dir)

    rt, _ = _ticket_runtime(data_dir, clock)
    _refused_start(rt, CorruptFileError, match="change seq 7 is after the snapshot's")

    assert file_names(data_dir) == before
