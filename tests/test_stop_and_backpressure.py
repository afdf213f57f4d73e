"""Bounds that hold when consumers fall behind or the runtime stops mid-write."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Ticket, ticket

from actors._kind import HAND_ON_AFTER
from runtime import (
    BackpressureError,
    DataDirError,
    DeliveryTimeoutError,
    EntityChanged,
    Runtime,
    RuntimeStoppedError,
)
from runtime._durability import ChangeRecord, DataDir
from runtime._persistence import JournalWriter, read_journal


def _wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def test_a_burst_against_a_blocked_deriver_waits_once_and_records_nothing() -> None:
    timeout = 0.3
    rt = Runtime(mailbox_size=2, backpressure_timeout=timeout)
    tickets = rt.define_entity("ticket", Ticket)
    release = threading.Event()
    rt.register_change_deriver("ticket", lambda c: release.wait(30) and [])

    with rt:
        for i in range(3):
            tickets.mutate(f"t-{i}", lambda prev: ticket())
        recorded = rt.log.last_seq
        started = time.monotonic()
        futures = [
            tickets.mutate_async(f"u-{i}", lambda prev: ticket()) for i in range(10)
        ]
        errors = [f.exception(timeout=30) for f in futures]
        waited = time.monotonic() - started
        after = rt.log.last_seq
        release.set()

    assert recorded == 3
    assert after == 3
    assert all(isinstance(e, BackpressureError) for e in errors)
    # Ten writes each waiting in turn would take ten timeouts.
    assert waited < 5 * timeout


def test_the_deriver_mailbox_bound_holds_for_a_large_batch() -> None:
    rt = Runtime(mailbox_size=2, backpressure_timeout=30)
    tickets = rt.define_entity("ticket", Ticket)
    depths: list[float] = []

    def slow_deriver(change: EntityChanged) -> list[str]:
        depth = rt.metrics_registry.get_sample_value(
            "entity_runtime_mailbox_depth", {"actor": "derive:ticket"}
        )
        depths.append(depth or 0.0)
        time.sleep(0.0005)
        return []

    rt.register_change_deriver("ticket", slow_deriver)

    with rt:
        tickets.mutate_many([(f"t-{i}", lambda prev: ticket()) for i in range(300)])
        rt.drain(timeout=30)

    assert len(depths) == 300
    assert max(depths) <= 2


def test_writes_running_when_stop_gives_up_are_refused_and_record_nothing() -> None:
    rt = Runtime(stop_timeout=0.3)
    tickets = rt.define_entity("ticket", Ticket)
    seen: list[int] = []
    rt.on_entity_changed("ticket", lambda c: seen.append(c.seq), name="audit")
    entered = threading.Event()

    def slow(prev: Any) -> dict[str, Any]:
        entered.set()
        time.sleep(1.0)
        return ticket()

    rt.start()
    tickets.mutate("t-0", lambda prev: ticket())
    rt.drain(timeout=10)
    slow_write = tickets.mutate_async("t-1", slow)
    assert entered.wait(10)
    queued = tickets.mutate_async("t-2", lambda prev: ticket())
    report = rt.stop()
    slow_error = slow_write.exception(timeout=10)
    queued_error = queued.exception(timeout=10)

    assert report.stuck_consumers == ("kind:ticket/0",)
    assert report.undelivered == ()
    assert isinstance(slow_error, RuntimeStoppedError)
    assert "ticket/t-1: the runtime stopped while this write was running" in str(
        slow_error
    )
    assert tickets.get("t-1") is None
    assert tickets.history("t-1") == []
    assert rt.log.last_seq == 1
    assert seen == [1]
    assert isinstance(queued_error, RuntimeStoppedError)
    assert tickets.get("t-2") is None


def test_a_write_finishing_after_stop_closed_the_journal_is_refused_as_stopped(
    tmp_path: Path,
) -> None:
    rt = Runtime(data_dir=tmp_path, stop_timeout=0.3)
    tickets = rt.define_entity("ticket", Ticket)
    entered, gate = threading.Event(), threading.Event()

    def slow(prev: Any) -> dict[str, Any]:
        entered.set()
        assert gate.wait(20)
        return ticket()

    with rt:
        tickets.mutate("t-0", lambda prev: ticket())
        slow_write = tickets.mutate_async("t-1", slow)
        try:
            assert entered.wait(10)
        finally:
            rt.stop()
            gate.set()
        error = slow_write.exception(timeout=10)

    again = Runtime(data_dir=tmp_path)
    again_tickets = again.define_entity("ticket", Ticket)
    with again:
        restored = again_tickets.ids()

    assert isinstance(error, RuntimeStoppedError)
    assert "ticket/t-1" in str(error)
    assert "nothing recorded" in str(error)
    assert tickets.get("t-1") is None
    assert tickets.history("t-1") == []
    assert restored == ["t-0"]


def _gated(started: threading.Event, gate: threading.Event) -> Any:
    def apply(prev: Any) -> dict[str, Any]:
        started.set()
        assert gate.wait(30)
        return ticket()

    return apply


def _commit_a_then_block_b(
    tickets: Any, b_gate: threading.Event, committed: tuple[str, ...] = ("a",)
) -> tuple[Any, Any]:
    """Run ``committed`` ("a") and "b" in one burst: they commit, then b's
    apply blocks on ``b_gate``. Returns the last committed write's future and
    b's, once b's apply has begun."""
    first_started, first_gate = threading.Event(), threading.Event()
    b_started = threading.Event()
    first = tickets.mutate_async("t-0", _gated(first_started, first_gate))
    assert first_started.wait(10)
    for entity_id in committed:
        a = tickets.mutate_async(entity_id, lambda prev: ticket())
    b = tickets.mutate_async("b", _gated(b_started, b_gate))
    first_gate.set()
    first.get(timeout=10)
    assert b_started.wait(10)
    return a, b


def test_a_change_waiting_behind_a_stuck_write_of_its_burst_is_in_the_stop_report() -> (
    None
):
    # a's change is never handed to the subscriber: the report must say so
    # instead of calling nothing undelivered, and drain() afterwards cannot
    # wait for it.
    seen: list[str] = []
    rt = Runtime(stop_timeout=0.5)
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", lambda c: seen.append(c.id), name="audit")
    b_gate = threading.Event()

    rt.start()
    a, b = _commit_a_then_block_b(tickets, b_gate)
    a_seq = tickets.history("a")[0].seq
    try:
        report = rt.stop()
    finally:
        b_gate.set()
    a.get(timeout=10)
    b_error = b.exception(timeout=10)
    with pytest.raises(RuntimeStoppedError, match=f"kind:ticket/0 seq={a_seq}"):
        rt.drain(timeout=10)

    assert not report.clean
    assert "kind:ticket/0" in report.stuck_consumers
    assert ("kind:ticket/0", a_seq) in report.undelivered
    assert "a" not in seen
    assert isinstance(b_error, RuntimeStoppedError)
    assert tickets.get("b") is None


def test_a_drain_timeout_names_a_kind_actor_holding_committed_changes() -> None:
    rt = Runtime(stop_timeout=5.0)
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", lambda c: None)
    b_gate = threading.Event()

    with rt:
        _, b = _commit_a_then_block_b(tickets, b_gate)
        a_seq = tickets.history("a")[0].seq
        try:
            with pytest.raises(DeliveryTimeoutError) as caught:
                rt.drain(timeout=0.3)
        finally:
            b_gate.set()
        b.get(timeout=10)
        rt.drain(timeout=10)

    assert f"kind:ticket/0 (seqs {a_seq})" in str(caught.value)
    assert "a handler is running" not in str(caught.value)


def test_changes_held_past_the_hand_on_time_are_delivered_before_a_slow_apply() -> None:
    # a and b commit in one burst, b's apply taking longer than HAND_ON_AFTER;
    # c's apply then blocks. a and b must reach the subscriber and their
    # callers, and drain() return, while c's apply still runs.
    seen: list[str] = []
    rt = Runtime()
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", lambda c: seen.append(c.id))
    first_started, first_gate = threading.Event(), threading.Event()
    c_started, c_gate = threading.Event(), threading.Event()

    def slow(prev: Any) -> dict[str, Any]:
        time.sleep(HAND_ON_AFTER * 2)
        return ticket()

    with rt:
        first = tickets.mutate_async("t-0", _gated(first_started, first_gate))
        assert first_started.wait(10)
        a = tickets.mutate_async("a", lambda prev: ticket())
        b = tickets.mutate_async("b", slow)
        c = tickets.mutate_async("c", _gated(c_started, c_gate))
        first_gate.set()
        try:
            assert c_started.wait(10)
            answered = [a.done(), b.done()]
            rt.drain(timeout=10)
            seen_while_c_ran = list(seen)
            c_was_running = not c.done()
        finally:
            c_gate.set()
        c.get(timeout=10)
        first.get(timeout=10)
        rt.drain(timeout=10)

    assert answered == [True, True]
    assert seen_while_c_ran == ["t-0", "a", "b"]
    assert c_was_running
    assert seen == ["t-0", "a", "b", "c"]


def test_a_drain_timeout_counts_every_change_a_kind_actor_holds() -> None:
    rt = Runtime(stop_timeout=5.0)
    tickets = rt.define_entity("ticket", Ticket)
    rt.on_entity_changed("ticket", lambda c: None)
    b_gate = threading.Event()

    with rt:
        _, b = _commit_a_then_block_b(tickets, b_gate, ("a1", "a2", "a3"))
        seqs = [tickets.history(i)[0].seq for i in ("a1", "a2", "a3")]
        try:
            with pytest.raises(DeliveryTimeoutError) as caught:
                rt.drain(timeout=0.3)
        finally:
            b_gate.set()
        b.get(timeout=10)
        rt.drain(timeout=10)

    assert str(caught.value).startswith(f"3 changes up to seq {seqs[-1]} ")
    assert f"(oldest seqs: {seqs})" in str(caught.value)
    assert f"kind:ticket/0 (seqs {', '.join(map(str, seqs))})" in str(caught.value)


def _journalled(tmp_path: Path, fsync: str) -> tuple[DataDir, JournalWriter]:
    data_dir = DataDir(tmp_path, fsync=fsync)
    data_dir.open()
    data_dir.start_journal(1)
    data_dir.journal(ChangeRecord(1, "k", "a", 1.0, "me", None, True, {"n": 1}, []))
    writer = data_dir._journal
    assert writer is not None
    return data_dir, writer


def test_a_change_journalled_as_stop_closes_the_journal_is_refused_as_stopped(
    tmp_path: Path,
) -> None:
    # The journal's writer closes between the data dir's look at it and the
    # append: the write is refused like any write after stop.
    data_dir, writer = _journalled(tmp_path, "always")
    writer.close()

    with pytest.raises(RuntimeStoppedError, match="closed the journal"):
        data_dir.journal(ChangeRecord(2, "k", "b", 2.0, "me", None, True, {}, []))
    data_dir.close()

    assert [r["c"][0] for r in _records(tmp_path)] == [1]


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_a_sync_that_finds_the_journal_closed_cleanly_has_nothing_left_to_do(
    tmp_path: Path, fsync: str
) -> None:
    # close() fsyncs what was appended: the group commit that follows it must
    # not report the change as not durable.
    data_dir, writer = _journalled(tmp_path, fsync)
    writer.close()

    data_dir.sync()
    data_dir.close()

    assert [r["c"][0] for r in _records(tmp_path)] == [1]


def _records(directory: Path) -> list[Any]:
    return read_journal(directory).records


def _stop_with_fault(
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    faulty: Callable[..., None],
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """Write t-1 and t-2, stop with ``os.<name>`` replaced by ``faulty``, restart.

    Returns the stop report and the states the restart restored.
    """
    rt = Runtime(data_dir=directory, **options)
    tickets = rt.define_entity("ticket", Ticket)
    rt.start()
    tickets.mutate("t-1", lambda prev: ticket(status="working"))
    tickets.mutate("t-2", lambda prev: ticket(status="closed"))
    with monkeypatch.context() as patched:
        patched.setattr(os, name, faulty)
        report = rt.stop()

    again = Runtime(data_dir=directory)
    again_tickets = again.define_entity("ticket", Ticket)
    with again:
        restored = again_tickets.get_many(["t-1", "t-2"])
    assert report == rt.stop()
    return report, restored


_WRITTEN = {"t-1": ticket(status="working"), "t-2": ticket(status="closed")}


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _fsync_failing_for(marker: str, error: OSError) -> Callable[[int], None]:
    """``os.fsync`` raising ``error`` for files whose path holds ``marker``."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if marker in _path_of(fd):
            raise error
        real_fsync(fd)

    return fsync


def _close_failing_for(marker: str) -> Callable[[int], None]:
    """``os.close`` closing, then raising EIO, for files whose path holds ``marker``."""
    real_close = os.close

    def close(fd: int) -> None:
        path = _path_of(fd)
        real_close(fd)
        if marker in path:
            raise OSError(errno.EIO, "injected I/O error at close")

    return close


def test_a_failing_final_fsync_still_lets_stop_finish_and_unlock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failing = _fsync_failing_for("journal-", OSError(errno.EIO, "injected I/O error"))

    with caplog.at_level(logging.ERROR):
        report, restored = _stop_with_fault(
            tmp_path, monkeypatch, "fsync", failing, journal_fsync="interval"
        )

    assert not report.clean
    # The final snapshot starts a new journal, whose header fsync fails too.
    snapshot_problem, close_problem = report.data_dir_errors
    assert "final snapshot of" in snapshot_problem
    assert "closing the journal in" in close_problem
    assert "injected I/O error" in close_problem
    assert close_problem in caplog.text
    assert restored == _WRITTEN


def test_a_journal_whose_close_fails_is_reported_and_stop_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems (NFS, FUSE) report a failed write-back only at close.
    failing = _close_failing_for("journal-")

    report, restored = _stop_with_fault(tmp_path, monkeypatch, "close", failing)

    assert not report.clean
    # The final snapshot closes the journal it replaces; stop closes the new one.
    replaced, last = report.data_dir_errors
    assert "final snapshot of" in replaced
    assert "closing the journal in" in last
    assert "closing the file failed (injected I/O error at close)" in last
    assert restored == _WRITTEN


def test_a_close_failing_after_a_failed_fsync_leaves_the_fsync_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, writer = _journalled(tmp_path, "interval")

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", _fsync_failing_for("journal-", OSError(5, "bad")))
        patched.setattr(os, "close", _close_failing_for("journal-"))
        with pytest.raises(DataDirError) as caught:
            writer.close()
    data_dir.close()

    assert "fsync failed (bad)" in str(caught.value)
    assert "closing the file failed" not in str(caught.value)


def test_a_new_journal_whose_header_and_close_fail_is_refused_and_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, writer = _journalled(tmp_path, "always")

    with monkeypatch.context() as patched:
        failing = _fsync_failing_for("00000005.log", OSError(5, "bad"))
        patched.setattr(os, "fsync", failing)
        patched.setattr(os, "close", _close_failing_for("00000005.log"))
        with pytest.raises(DataDirError) as caught:
            writer.rotate(5)
    names = sorted(p.name for p in tmp_path.glob("journal-*"))
    data_dir.close()

    assert "could not write the journal header (bad)" in str(caught.value)
    assert names == ["journal-00000000000000000001.log"]


def test_a_failing_final_snapshot_is_reported_and_the_journal_restores_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_space = OSError(errno.ENOSPC, "injected: no space left")
    failing = _fsync_failing_for(".snapshot-", no_space)

    with caplog.at_level(logging.ERROR):
        report, restored = _stop_with_fault(tmp_path, monkeypatch, "fsync", failing)

    assert not report.clean
    assert not report.undelivered
    [problem] = report.data_dir_errors
    assert "final snapshot of" in problem
    assert "injected: no space left" in problem
    assert "journal still holds every change" in problem
    assert problem in caplog.text
    assert restored == _WRITTEN


def test_a_stop_with_a_healthy_data_dir_reports_no_data_dir_errors(
    tmp_path: Path,
) -> None:
    rt = Runtime(data_dir=tmp_path)
    tickets = rt.define_entity("ticket", Ticket)
    rt.start()
    tickets.mutate("t-1", lambda prev: ticket(status="working"))

    report = rt.stop()

    assert report.clean
    assert report.data_dir_errors == ()
    assert len(list(tmp_path.glob("snapshot-*.snap"))) == 1
