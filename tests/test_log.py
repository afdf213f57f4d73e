from __future__ import annotations

import pytest

from runtime._log import TransitionLog


def _log_with_history() -> TransitionLog:
    log = TransitionLog()
    log.append_change("k", "a", None, {"s": 1, "t": "x"}, ("s", "t"), at=100.0)
    log.append_change("k", "b", None, {"s": 5, "t": "y"}, ("s", "t"), at=101.0)
    log.append_change("k", "a", {"s": 1, "t": "x"}, {"s": 2, "t": "x"}, ("s",), 110.0)
    log.append_change("k", "a", {"s": 2, "t": "x"}, {"s": 3, "t": "z"}, ("s", "t"), 120)
    log.append_change("k", "a", {"s": 3, "t": "z"}, None, ("s", "t"), at=130.0)
    return log


def test_sequence_numbers_increase_by_one_per_change() -> None:
    log = _log_with_history()

    seqs = [rows[0].seq for rows in log.changes_since(0)]

    assert seqs == [1, 2, 3, 4, 5]
    assert log.last_seq == 5
    assert len(log) == 8
    log.check()


def test_history_returns_only_that_entity_in_commit_order() -> None:
    log = _log_with_history()

    rows = log.history("k", "a")

    assert [(r.seq, r.field) for r in rows] == [
        (1, "s"),
        (1, "t"),
        (3, "s"),
        (4, "s"),
        (4, "t"),
        (5, None),
    ]
    assert rows[-1].tombstone
    assert rows[-1].before == {"s": 3, "t": "z"}
    assert rows[-1].after is None


def test_history_by_field_includes_the_tombstone() -> None:
    log = _log_with_history()

    rows = log.history("k", "a", field="t")

    assert [(r.seq, r.before, r.after) for r in rows] == [
        (1, None, "x"),
        (4, "x", "z"),
        (5, {"s": 3, "t": "z"}, None),
    ]


def test_history_time_window_is_inclusive_then_exclusive() -> None:
    log = _log_with_history()

    rows = log.history("k", "a", field="s", since=110.0, until=130.0)

    assert [r.seq for r in rows] == [3, 4]


def test_history_of_an_unknown_entity_is_empty() -> None:
    log = _log_with_history()

    assert log.history("k", "nope") == []
    assert log.history("other", "a") == []
    assert log.history("k", "a", field="nope") == []


def test_last_change_and_count_since_use_the_field_index() -> None:
    log = _log_with_history()

    last = log.last_change("k", "a", "t")
    count = log.count_since("k", "a", "s", since=110.0)

    assert last is not None
    assert last.seq == 5
    assert count == 3


def test_rows_out_of_time_order_are_still_filtered_correctly() -> None:
    log = TransitionLog()
    log.append_change("k", "a", None, {"s": 1}, ("s",), at=200.0)
    log.append_change("k", "a", {"s": 1}, {"s": 2}, ("s",), at=100.0)
    log.append_change("k", "a", {"s": 2}, {"s": 3}, ("s",), at=300.0)

    rows = log.history("k", "a", since=150.0)

    assert [r.seq for r in rows] == [1, 3]


def test_restored_sequence_must_come_after_the_last_one() -> None:
    log = _log_with_history()

    with pytest.raises(ValueError, match="not after the log's last sequence 5"):
        log.append_change("k", "c", None, {"s": 1}, ("s",), at=1.0, seq=5)

    assert log.last_seq == 5
    log.check()


def test_changes_since_skips_what_was_seen() -> None:
    log = _log_with_history()

    seqs = [rows[0].seq for rows in log.changes_since(3)]

    assert seqs == [4, 5]


def test_prune_forgets_entities_removed_long_enough_ago() -> None:
    log = _log_with_history()
    log.append_change("k", "c", None, {"s": 1}, ("s",), at=140.0)

    dropped = log.prune(max_rows=1, removed_before=131.0)

    assert log.history("k", "a") == []
    assert [r.seq for r in log.history("k", "c")] == [6]
    assert [r.seq for r in log.history("k", "b")] == [2, 2]
    assert dropped == 6
    log.check()


def test_prune_keeps_a_recent_tombstone_and_each_fields_newest_row() -> None:
    log = _log_with_history()

    log.prune(max_rows=1, older_than=1000.0, removed_before=129.0)

    rows = log.history("k", "a")
    assert [r.seq for r in rows] == [5]
    assert rows[0].tombstone
    log.check()
