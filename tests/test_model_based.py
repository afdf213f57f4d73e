"""The runtime against a plain Python model, under random sequences of operations.

A hypothesis state machine drives one runtime (on a fake clock) and a model made
of dicts and lists through creates, updates, unchanged writes, rejected states,
failing ``apply`` calls, removals and clock moves, and checks after every step
that reads, the transition log, the change events seen by a subscriber and the
trigger events fired by the derivers all agree with the model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from runtime import SYSTEM_ACTOR, ApplyError, EntityChanged, Runtime, SchemaError
from runtime.testing import FakeClock

KIND = "job"
IDS = ("j1", "j2", "j3")
FIELDS = ("status", "attempts", "tags", "extra")
DEFAULTS: dict[str, Any] = {"tags": [], "extra": None}
WINDOWS = (0, 0.25, 1, 60, 10**7)


@dataclass
class Job:
    """The state schema the machine writes."""

    status: Literal["queued", "running", "done"]
    attempts: int
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] | None = None


def typed(value: Any) -> Any:
    """A comparison key that tells ``1``, ``1.0`` and ``True`` apart."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, typed(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("list", tuple(typed(v) for v in value))
    return (type(value).__name__, value)


def full_state(write: dict[str, Any]) -> dict[str, Any]:
    """The state the schema should make of ``write`` (defaults filled in)."""
    return {name: write.get(name, DEFAULTS.get(name)) for name in FIELDS}


def plain(value: Any) -> Any:
    """A plain, mutable deep copy (what ``apply`` is entitled to receive)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# -- strategies ------------------------------------------------------------------

any_values = st.sampled_from(
    [0, 1, 1.0, True, False, "1", None, [], [1], [1.0], {"k": 1}, {"k": True}]
)
extras = st.none() | st.dictionaries(
    st.sampled_from(["x", "y"]), any_values, max_size=2
)
writes = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["queued", "running", "done"]),
        "attempts": st.integers(0, 3),
    },
    optional={
        "tags": st.lists(st.sampled_from(["a", "b"]), max_size=2),
        "extra": extras,
    },
)
ids = st.sampled_from(IDS)
actors = st.sampled_from([SYSTEM_ACTOR, "alice"])
run_ids = st.sampled_from([None, "run-1"])
# A history bound: none, the time of one of the entity's rows (by index), or
# some seconds before the clock's current time (negative: after it).
bounds = st.none() | st.tuples(
    st.sampled_from(["row", "back"]),
    st.sampled_from([-30, -0.25, 0, 0.25, 1, 2, 7.5, 100, 5000]),
)
advances = st.sampled_from([0.25, 1.0, 7.5, 60.0, 3600.0]) | st.integers(0, 100)

GOOD = {"status": "queued", "attempts": 0, "tags": [], "extra": None}
INVALID_STATES: list[tuple[Any, str | None]] = [
    ({**GOOD, "status": "bogus"}, "status"),
    ({**GOOD, "attempts": "1"}, "attempts"),
    ({**GOOD, "attempts": True}, "attempts"),
    ({**GOOD, "attempts": 1.0}, "attempts"),
    ({**GOOD, "attempts": 2**64}, "attempts"),
    ({**GOOD, "tags": "ab"}, "tags"),
    ({**GOOD, "tags": ["a", 1]}, "tags[1]"),
    ({**GOOD, "extra": {"x": float("nan")}}, "extra.x"),
    ({**GOOD, "extra": {"x": (1, 2)}}, "extra.x"),
    ({**GOOD, "extra": {"x": {1, 2}}}, "extra.x"),
    ({**GOOD, "extra": {1: "x"}}, "extra"),
    ({**GOOD, "unknown": 1}, "unknown"),
    ({"attempts": 0}, "status"),
    (None, None),
    (["queued", 0], None),
]


# -- derivers (pure functions of the change) ---------------------------------------


def derive_status(change: EntityChanged) -> list[str]:
    if change.next is None:
        return ["job.removed"]
    if "status" in change.changed_fields:
        return [f"job.{change.next['status']}"]
    return []


def derive_any(change: EntityChanged) -> list[str]:
    done = change.next is not None and change.next["status"] == "done"
    return ["job.changed", "job.changed", *(["job.done"] if done else [])]


def any_payload(change: EntityChanged) -> dict[str, Any]:
    return {"seq": change.seq, "id": change.id}


def derive_fragile(change: EntityChanged) -> Any:
    attempts = None if change.next is None else change.next["attempts"]
    if attempts == 3:
        raise RuntimeError("this deriver fails on purpose")
    if attempts == 1:
        return "job.not-a-list"
    return ["job.second-try"] if attempts == 2 else []


TRIGGERS = (
    "job.queued",
    "job.running",
    "job.done",
    "job.removed",
    "job.changed",
    "job.second-try",
)


def expected_triggers(change: dict[str, Any]) -> tuple[list[tuple[str, Any]], int]:
    """The (event, payload) pairs one modelled change fires, and deriver failures."""
    next_state = change["next"]
    names: list[tuple[str, str]] = []
    if next_state is None:
        names.append(("job.removed", "change"))
    elif "status" in change["changed_fields"]:
        names.append((f"job.{next_state['status']}", "change"))
    names.append(("job.changed", "any"))
    if next_state is not None and next_state["status"] == "done":
        names.append(("job.done", "any"))

    failures = 0
    attempts = None if next_state is None else next_state["attempts"]
    if attempts in (1, 3):
        failures = 1
    elif attempts == 2:
        names.append(("job.second-try", "change"))

    fired: dict[str, Any] = {}
    for event, source in names:
        if event not in fired:
            payload = (
                ("change", change["seq"])
                if source == "change"
                else ("dict", {"seq": change["seq"], "id": change["id"]})
            )
            fired[event] = payload
    return list(fired.items()), failures


# -- the machine ---------------------------------------------------------------------


class RuntimeVersusModel(RuleBasedStateMachine):
    """Drives one runtime and a dict-and-list model with the same operations."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.rt = Runtime(clock=self.clock, stop_timeout=5.0)
        self.handle = self.rt.define_entity(KIND, Job)

        self.seen_lock = threading.Lock()
        self.seen_changes: list[EntityChanged] = []
        self.seen_triggers: dict[str, list[tuple[Any, EntityChanged]]] = {
            event: [] for event in TRIGGERS
        }
        self.rt.on_entity_changed(KIND, self._on_change)
        self.rt.register_change_deriver(KIND, derive_status)
        self.rt.register_change_deriver(KIND, derive_any, to_payload=any_payload)
        self.rt.register_change_deriver(KIND, derive_fragile)
        for event in TRIGGERS:
            self.rt.on_trigger(event, self._trigger_recorder(event))

        # The model.
        self.states: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {i: [] for i in IDS}
        self.changes: list[dict[str, Any]] = []
        self.outcomes = {"changed": 0, "unchanged": 0, "rejected": 0, "failed": 0}
        self.deriver_failures = 0
        self.seq = 0

        self.rt.start()

    def teardown(self) -> None:
        report = self.rt.stop()
        assert report.clean, report

    # -- recorders (run on the runtime's threads) -------------------------------------

    def _on_change(self, change: EntityChanged) -> None:
        with self.seen_lock:
            self.seen_changes.append(change)

    def _trigger_recorder(self, event: str) -> Any:
        def record(name: str, payload: Any, change: EntityChanged) -> None:
            assert name == event
            with self.seen_lock:
                self.seen_triggers[event].append((payload, change))

        return record

    # -- the model's commit ------------------------------------------------------

    def _model_commit(
        self,
        entity_id: str,
        next_state: dict[str, Any] | None,
        actor: str,
        run_id: str | None,
    ) -> None:
        prev = self.states.get(entity_id)
        if next_state is None:
            changed = list(FIELDS)
            delta: dict[str, Any] = {}
        elif prev is None:
            changed = list(FIELDS)
            delta = dict(next_state)
        else:
            changed = [f for f in FIELDS if typed(prev[f]) != typed(next_state[f])]
            delta = {f: next_state[f] for f in changed}
        if not changed:
            self.outcomes["unchanged"] += 1
            return

        self.seq += 1
        now = self.clock()
        if next_state is None:
            self.rows[entity_id].append(
                {
                    "seq": self.seq,
                    "field": None,
                    "before": prev,
                    "after": None,
                    "tombstone": True,
                    "at": now,
                    "actor": actor,
                    "run_id": run_id,
                }
            )
            del self.states[entity_id]
        else:
            for name in changed:
                self.rows[entity_id].append(
                    {
                        "seq": self.seq,
                        "field": name,
                        "before": None if prev is None else prev[name],
                        "after": next_state[name],
                        "tombstone": False,
                        "at": now,
                        "actor": actor,
                        "run_id": run_id,
                    }
                )
            self.states[entity_id] = next_state

        change = {
            "id": entity_id,
            "seq": self.seq,
            "prev": prev,
            "next": next_state,
            "delta": delta,
            "changed_fields": tuple(changed),
            "actor": actor,
            "run_id": run_id,
            "at": now,
        }
        self.changes.append(change)
        self.outcomes["changed"] += 1
        self.deriver_failures += expected_triggers(change)[1]

    def _recording_apply(self, result: Any) -> tuple[list[Any], Any]:
        calls: list[Any] = []

        def apply(prev: dict[str, Any] | None) -> Any:
            calls.append(plain(prev))
            return plain(result)

        return calls, apply

    def _assert_apply_saw_model(self, calls: list[Any], entity_id: str) -> None:
        assert len(calls) == 1
        assert typed(calls[0]) == typed(self.states.get(entity_id))

    # -- rules ---------------------------------------------------------------------

    @rule(entity_id=ids, write=writes, actor=actors, run_id=run_ids)
    def write_state(
        self, entity_id: str, write: dict[str, Any], actor: str, run_id: str | None
    ) -> None:
        calls, apply = self._recording_apply(write)

        returned = self.handle.mutate(entity_id, apply, actor=actor, run_id=run_id)

        self._assert_apply_saw_model(calls, entity_id)
        expected = full_state(write)
        assert typed(returned) == typed(expected)
        self._model_commit(entity_id, expected, actor, run_id)

    @rule(entity_id=ids, reorder=st.booleans(), drop_defaults=st.booleans())
    def rewrite_current_state(
        self, entity_id: str, reorder: bool, drop_defaults: bool
    ) -> None:
        current = self.states.get(entity_id)
        if current is None:
            return
        write = dict(plain(current))
        if reorder and write["extra"]:
            write["extra"] = dict(reversed(list(write["extra"].items())))
        if drop_defaults:
            for name, default in DEFAULTS.items():
                if typed(write[name]) == typed(default):
                    del write[name]
        calls, apply = self._recording_apply(write)

        returned = self.handle.mutate(entity_id, apply)

        self._assert_apply_saw_model(calls, entity_id)
        assert typed(returned) == typed(current)
        self._model_commit(entity_id, current, SYSTEM_ACTOR, None)

    @rule(
        entity_id=ids, value=st.sampled_from([1, 1.0, True, 0, 0.0, False, [1], [True]])
    )
    def retype_an_extra_value(self, entity_id: str, value: Any) -> None:
        current = self.states.get(entity_id)
        if current is None:
            return
        write = {**plain(current), "extra": {"x": value}}

        self.handle.mutate(entity_id, lambda prev: write)

        self._model_commit(entity_id, full_state(write), SYSTEM_ACTOR, None)

    @rule(entity_id=ids)
    def bump_attempts_in_place(self, entity_id: str) -> None:
        calls: list[Any] = []

        def apply(prev: dict[str, Any] | None) -> dict[str, Any]:
            calls.append(plain(prev))
            if prev is None:
                return {"status": "queued", "attempts": 0}
            prev["attempts"] += 1
            prev["tags"].append("bump")
            return prev

        returned = self.handle.mutate(entity_id, apply, actor="bumper")

        self._assert_apply_saw_model(calls, entity_id)
        current = self.states.get(entity_id)
        if current is None:
            expected = full_state({"status": "queued", "attempts": 0})
        else:
            expected = {
                **current,
                "attempts": current["attempts"] + 1,
                "tags": [*current["tags"], "bump"],
            }
        assert typed(returned) == typed(expected)
        self._model_commit(entity_id, expected, "bumper", None)

    @rule(entity_id=ids, case=st.sampled_from(INVALID_STATES))
    def write_invalid_state(self, entity_id: str, case: tuple[Any, str | None]) -> None:
        bad, expected_field = case

        with pytest.raises(SchemaError) as raised:
            self.handle.mutate(entity_id, lambda prev: bad)

        assert raised.value.kind == KIND
        assert raised.value.entity_id == entity_id
        assert raised.value.field == expected_field
        assert str(raised.value).endswith("nothing recorded")
        self.outcomes["rejected"] += 1

    @rule(entity_id=ids)
    def apply_raises(self, entity_id: str) -> None:
        failure = ValueError("apply fails on purpose")

        def apply(prev: dict[str, Any] | None) -> Any:
            raise failure

        with pytest.raises(ApplyError) as raised:
            self.handle.mutate(entity_id, apply)

        assert raised.value.error is failure
        assert raised.value.__cause__ is failure
        assert (raised.value.kind, raised.value.entity_id) == (KIND, entity_id)
        self.outcomes["failed"] += 1

    @rule(entity_id=ids, actor=actors, run_id=run_ids)
    def remove(self, entity_id: str, actor: str, run_id: str | None) -> None:
        calls, apply = self._recording_apply(None)
        existed = entity_id in self.states

        removed = self.handle.remove(entity_id, apply, actor=actor, run_id=run_id)

        assert removed is existed
        if existed:
            self._assert_apply_saw_model(calls, entity_id)
            self._model_commit(entity_id, None, actor, run_id)
        else:
            assert calls == []
            self.outcomes["unchanged"] += 1

    @rule(entity_id=ids)
    def remove_with_failing_apply(self, entity_id: str) -> None:
        def apply(prev: dict[str, Any] | None) -> None:
            raise KeyError("delete fails on purpose")

        if entity_id not in self.states:
            assert self.handle.remove(entity_id, apply) is False
            self.outcomes["unchanged"] += 1
            return

        with pytest.raises(ApplyError):
            self.handle.remove(entity_id, apply)

        self.outcomes["failed"] += 1

    @rule(seconds=advances)
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(seconds=st.sampled_from([0.25, 30.0, 5000.0]))
    def clock_jumps_back(self, seconds: float) -> None:
        self.clock.set(self.clock() - seconds)

    def _bound(self, entity_id: str, pick: tuple[str, float] | None) -> float | None:
        if pick is None:
            return None
        how, value = pick
        times = [r["at"] for r in self.rows[entity_id]]
        if how == "row" and times:
            return times[int(value) % len(times)]
        return self.clock() - value

    @rule(
        entity_id=ids,
        field_name=st.sampled_from([None, *FIELDS]),
        since_pick=bounds,
        until_pick=bounds,
    )
    def history_window_matches_model(
        self,
        entity_id: str,
        field_name: str | None,
        since_pick: tuple[str, float] | None,
        until_pick: tuple[str, float] | None,
    ) -> None:
        since = self._bound(entity_id, since_pick)
        until = self._bound(entity_id, until_pick)

        rows = self.handle.history(
            entity_id,
            field_name,
            since=None if since is None else datetime.fromtimestamp(since, UTC),
            until=until,
        )

        expected = [
            r
            for r in self.rows[entity_id]
            if (field_name is None or r["tombstone"] or r["field"] == field_name)
            and (since is None or r["at"] >= since)
            and (until is None or r["at"] < until)
        ]
        assert [self._row(r) for r in rows] == [
            self._model_row(r, entity_id) for r in expected
        ]

    # -- invariants ---------------------------------------------------------------

    @staticmethod
    def _row(row: Any) -> tuple[Any, ...]:
        return (
            row.seq,
            row.kind,
            row.id,
            row.field,
            typed(row.before),
            typed(row.after),
            row.tombstone,
            row.at,
            row.actor,
            row.run_id,
        )

    @staticmethod
    def _model_row(row: dict[str, Any], entity_id: str) -> tuple[Any, ...]:
        return (
            row["seq"],
            KIND,
            entity_id,
            row["field"],
            typed(row["before"]),
            typed(row["after"]),
            row["tombstone"],
            datetime.fromtimestamp(row["at"], UTC),
            row["actor"],
            row["run_id"],
        )

    @invariant()
    def reads_match_model(self) -> None:
        for entity_id in IDS:
            assert typed(self.handle.get(entity_id)) == typed(
                self.states.get(entity_id)
            )
        many = self.handle.get_many([*IDS, "never-written", IDS[0]])
        assert {i: typed(s) for i, s in many.items()} == {
            i: typed(s) for i, s in self.states.items()
        }
        assert sorted(self.handle.ids()) == sorted(self.states)

    @invariant()
    def history_matches_model(self) -> None:
        for entity_id in IDS:
            rows = self.handle.history(entity_id)
            expected = [self._model_row(r, entity_id) for r in self.rows[entity_id]]
            assert [self._row(r) for r in rows] == expected

    @invariant()
    def log_is_gap_free_and_consistent(self) -> None:
        self.rt.log.check()

        batches = list(self.rt.log.changes_since(0))
        seqs = [batch[0].seq for batch in batches]
        assert seqs == list(range(1, self.seq + 1))
        assert all(row.seq == batch[0].seq for batch in batches for row in batch)
        assert self.rt.log.last_seq == self.seq
        assert len(self.rt.log) == sum(len(rows) for rows in self.rows.values())

    @invariant()
    def durations_match_model(self) -> None:
        now = self.clock()
        for entity_id in IDS:
            for name in FIELDS:
                times = [
                    r["at"]
                    for r in self.rows[entity_id]
                    if r["tombstone"] or r["field"] == name
                ]
                exists = entity_id in self.states
                since = self.handle.in_state_since(entity_id, name)
                held = self.handle.in_state_for(entity_id, name)

                if exists:
                    assert since == datetime.fromtimestamp(times[-1], UTC)
                    assert held == timedelta(seconds=now - times[-1])
                else:
                    assert since is None
                    assert held is None
                for window in WINDOWS:
                    count = sum(1 for t in times if t >= now - window)
                    got = self.handle.transition_count(entity_id, name, window)
                    assert got == count, (entity_id, name, window)
                    by_delta = self.handle.transition_count(
                        entity_id, name, timedelta(seconds=window)
                    )
                    assert by_delta == count

    @invariant()
    def subscriber_saw_model_changes(self) -> None:
        self.rt.drain(timeout=10)

        with self.seen_lock:
            seen = list(self.seen_changes)
        assert [c.seq for c in seen] == [c["seq"] for c in self.changes]
        for got, want in zip(seen, self.changes, strict=True):
            assert (got.kind, got.id) == (KIND, want["id"])
            assert typed(got.prev) == typed(want["prev"])
            assert typed(got.next) == typed(want["next"])
            assert typed(dict(got.delta)) == typed(want["delta"])
            assert got.changed_fields == want["changed_fields"]
            assert (got.actor, got.run_id) == (want["actor"], want["run_id"])
            assert got.occurred_at == datetime.fromtimestamp(want["at"], UTC)
            assert got.occurred_at.tzinfo is UTC

    @invariant()
    def triggers_match_derivers(self) -> None:
        self.rt.drain(timeout=10)

        expected: dict[str, list[Any]] = {event: [] for event in TRIGGERS}
        for change in self.changes:
            for event, payload in expected_triggers(change)[0]:
                expected[event].append((change["seq"], payload))
        with self.seen_lock:
            seen = {event: list(got) for event, got in self.seen_triggers.items()}
        for event in TRIGGERS:
            got = []
            for payload, change in seen[event]:
                if isinstance(payload, EntityChanged):
                    assert payload is change
                    got.append((change.seq, ("change", payload.seq)))
                else:
                    got.append((change.seq, ("dict", payload)))
            assert got == expected[event], event

    @invariant()
    def metrics_count_outcomes(self) -> None:
        self.rt.drain(timeout=10)

        registry = self.rt.metrics_registry
        for outcome, count in self.outcomes.items():
            value = registry.get_sample_value(
                "entity_runtime_mutations_total", {"kind": KIND, "outcome": outcome}
            )
            assert (value or 0) == count, outcome
        failures = registry.get_sample_value(
            "entity_runtime_deriver_errors_total", {"kind": KIND}
        )
        assert (failures or 0) == self.deriver_failures


def test_runtime_matches_a_plain_model_under_random_operations() -> None:
    run_state_machine_as_test(
        RuntimeVersusModel,
        settings=settings(
            max_examples=250,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
