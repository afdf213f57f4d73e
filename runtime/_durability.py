from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from sys import intern
from typing import Any

from runtime._engine import check_entity_id, check_timestamp
from runtime._errors import (
    EntityRuntimeError,
    InvalidIdError,
    RuntimeStoppedError,
    SchemaError,
)
from runtime._events import ReadOnlyDict, freeze
from runtime._log import TransitionLog
from runtime._persistence import (
    CorruptFileError,
    DataDirError,
    DataDirLock,
    JournalClosedError,
    JournalWriter,
    LoadedSnapshot,
    file_seq,
    list_journals,
    list_snapshots,
    load_newest_snapshot,
    prune_snapshots,
    read_journal,
    write_snapshot,
)

logger = logging.getLogger(__name__)

PAYLOAD_FORMAT = 1
"""The layout of the snapshot payload and journal records written here."""

FSYNC_MODES = ("always", "interval", "never")


class RestoreError(EntityRuntimeError, RuntimeError):
    """The data directory cannot be restored without losing recorded changes."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One recorded change, as journalled and restored.

    ``rows`` are ``[field, before, after]`` triples (a tombstone is
    ``[None, prev, None]``). ``next_state`` is the full state after the change
    for store-backed kinds (``None`` for a tombstone or a plugin-backed kind).
    """

    seq: int
    kind: str
    id: str
    ts: float
    actor: str
    run_id: str | None
    store_backed: bool
    next_state: Any
    rows: list[list[Any]]

    def encode(self) -> dict[str, Any]:
        """The journal record of this change."""
        return {
            "c": [
                self.seq,
                self.kind,
                self.id,
                self.ts,
                self.actor,
                self.run_id,
                self.store_backed,
                self.next_state,
                self.rows,
            ]
        }

    @classmethod
    def decode(cls, record: Mapping[str, Any]) -> ChangeRecord:
        """Rebuild a change from its journal record."""
        seq, kind, entity_id, ts, actor, run_id, store_backed, nxt, rows = record["c"]
        return cls(seq, kind, entity_id, ts, actor, run_id, store_backed, nxt, rows)

    @property
    def changed_fields(self) -> list[str]:
        """The fields the change touched (all of ``prev``'s for a tombstone)."""
        first = self.rows[0]
        if first[0] is None:
            return list(first[1] or ())
        return [row[0] for row in self.rows]


@dataclasses.dataclass
class RestoredData:
    """Everything a data directory holds, read without starting a runtime."""

    seq: int = 0
    states: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    store_backed: dict[str, bool] = dataclasses.field(default_factory=dict)
    changes: list[ChangeRecord] = dataclasses.field(default_factory=list)
    snapshot: Path | None = None
    journal_records: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    journal_damage: CorruptFileError | None = None
    """Where the journal was unreadable before its end (not a torn tail)."""
    damaged_files: list[Path] = dataclasses.field(default_factory=list)
    """Files not (fully) used: corrupt snapshots, and journals from the first
    damaged record on, including later journals that could not be replayed."""
    journal_files: list[Path] = dataclasses.field(default_factory=list)
    """The journal files that were read, in replay order."""

    def damaged_snapshots(self) -> list[Path]:
        """The damaged files that are snapshots."""
        return [p for p in self.damaged_files if p.name.startswith("snapshot-")]

    def source_of(self, kind: str, entity_id: str) -> tuple[Path | None, int | None]:
        """The file and seq that the restored state of ``kind/entity_id`` came from.

        The entity's last change names both; an entity without a change came
        from the snapshot's states, at no known seq. Scans every change: meant
        for error messages, not for a loop.
        """
        for change in reversed(self.changes):
            if change.id == entity_id and change.kind == kind:
                return self._file_holding(change.seq), change.seq
        return self.snapshot, None

    def _file_holding(self, seq: int) -> Path | None:
        if self.snapshot is not None and seq <= file_seq(self.snapshot):
            return self.snapshot
        holding = [p for p in self.journal_files if file_seq(p) <= seq]
        return holding[-1] if holding else None

    @property
    def damaged(self) -> bool:
        """Whether a corrupt file was passed over (a torn tail is not damage)."""
        return bool(self.problems)


def _decode_rows(rows: Iterable[Any]) -> list[ChangeRecord]:
    changes = [
        ChangeRecord(seq, kind, i, ts, actor, run_id, False, None, spec)
        for seq, kind, i, ts, actor, run_id, spec in rows
    ]
    for change in changes:
        _check_change(change)
    return changes


def _check_change(change: ChangeRecord) -> None:
    """Raise ``ValueError`` unless a decoded change has the recorded shape."""
    if _has_common_shape(change):
        return

    if type(change.seq) is not int or change.seq < 1:
        raise ValueError(f"seq {change.seq!r} is not a positive integer")
    for name in ("kind", "id", "actor"):
        value = getattr(change, name)
        if type(value) is not str or not value:
            raise ValueError(f"{name} {value!r} is not a non-empty string")
    if change.run_id is not None and type(change.run_id) is not str:
        raise ValueError(f"run_id {change.run_id!r} is not a string")
    if type(change.ts) not in (int, float):
        raise ValueError(f"time {change.ts!r} is not a number")
    check_timestamp(float(change.ts), f"seq {change.seq}'s time")
    if change.next_state is not None and not isinstance(change.next_state, dict):
        raise ValueError(f"next state {change.next_state!r:.60} is not a mapping")
    if not isinstance(change.rows, list) or not change.rows:
        raise ValueError("no rows")
    for row in change.rows:
        if not isinstance(row, list) or len(row) != 3:
            raise ValueError(f"row {row!r:.60} is not a [field, before, after] triple")
        if row[0] is not None and type(row[0]) is not str:
            raise ValueError(f"field {row[0]!r} is not a string")


def _has_common_shape(change: ChangeRecord) -> bool:
    """Whether ``change`` has the shape every written change has.

    True only for a change that passes every test of :func:`_check_change`
    (with a float time). A restore checks every change: this tests them all
    at once and formats no message, and a change it does not accept goes
    through the tests one by one, which name the first thing wrong.
    """
    seq, run_id, ts = change.seq, change.run_id, change.ts
    kind, entity_id, actor = change.kind, change.id, change.actor
    next_state, rows = change.next_state, change.rows
    if not (
        type(seq) is int
        and seq > 0
        and type(kind) is str
        and kind != ""
        and type(entity_id) is str
        and entity_id != ""
        and type(actor) is str
        and actor != ""
        and (run_id is None or type(run_id) is str)
        and type(ts) is float
        and (next_state is None or isinstance(next_state, dict))
        and type(rows) is list
        and rows
    ):
        return False

    for row in rows:
        if type(row) is not list or len(row) != 3:
            return False
        field = row[0]
        if field is not None and type(field) is not str:
            return False

    try:
        check_timestamp(ts, "the time")
    except ValueError:
        return False
    return True


def load_data_dir(directory: str | Path) -> RestoredData:
    """Read the newest valid snapshot and the journal after it.

    Pure reading: takes no lock and changes no file, so it can inspect the data
    directory of a running runtime.

    Raises:
        FormatVersionError: a file was written by a newer version.
        RestoreError: a corrupt snapshot or journal leaves a gap of changes
            that no other file covers.
    """
    with _gc_paused():
        return _load_data_dir(Path(directory))


def _load_data_dir(directory: Path) -> RestoredData:
    data = RestoredData()

    loaded = load_newest_snapshot(directory)
    for skipped in loaded.skipped if loaded else _all_corrupt(directory):
        data.problems.append(str(skipped))
        data.damaged_files.append(skipped.path)
        logger.error("snapshot %s is corrupt (%s); falling back", skipped.path, skipped)
    if loaded is not None:
        try:
            _read_payload(data, loaded)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise CorruptFileError(
                loaded.path,
                f"the snapshot's contents have an unexpected shape ({err!r})",
            ) from err

    replay = read_journal(directory, on_corrupt="stop", after_seq=data.seq)
    data.journal_files = replay.files
    if replay.corruption is not None:
        data.journal_damage = replay.corruption
        data.problems.append(str(replay.corruption))
        data.damaged_files.append(replay.corruption.path)
        data.damaged_files.extend(replay.unread_files)
        logger.error(
            "journal damaged: %s; restoring the %d records before it",
            replay.corruption,
            len(replay.records),
        )

    expected = data.seq + 1
    for index, record in enumerate(replay.records):
        try:
            change = ChangeRecord.decode(record)
            _check_change(change)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise RestoreError(
                f"{directory}: journal record {index} after seq {expected - 1} has "
                f"an unexpected shape ({err!r}); nothing was changed on disk"
            ) from err
        if change.seq < expected:
            continue
        if change.seq > expected:
            damage = "; ".join(data.problems) or "no damaged file found"
            raise RestoreError(
                f"{directory}: cannot restore without a gap: the newest usable "
                f"snapshot ends at seq {data.seq} and the journal continues at "
                f"seq {change.seq} (expected {expected}); move the damaged "
                f"files aside to start from what is left ({damage})"
            )
        _apply(data, change)
        data.journal_records += 1
        expected += 1

    _refuse_lost_changes(directory, data, replay.files, expected - 1)
    return data


def _refuse_lost_changes(
    directory: Path, data: RestoredData, journals: list[Path], covered: int
) -> None:
    """Raise RestoreError if the files show changes past ``covered`` that are lost.

    A damaged snapshot held every change up to its seq, and a journal file
    starts where the snapshot before it ended: when no usable file holds the
    changes in between, starting would silently drop them (and renumber new
    changes over them), so nothing is changed on disk and the start is refused.
    """
    lost_in = [p for p in data.damaged_snapshots() if file_seq(p) > covered]
    if lost_in:
        newest = max(lost_in, key=file_seq)
        raise RestoreError(
            f"{directory}: cannot restore without losing changes: the damaged "
            f"snapshot {newest.name} held changes up to seq {file_seq(newest)}, "
            f"and no usable snapshot or journal holds those after seq {covered}; "
            "nothing was changed on disk. Put back a good copy of the file, or "
            "move the damaged files and the journals after them aside to start "
            "from what is left"
        )
    if journals and file_seq(journals[0]) > data.seq + 1:
        raise RestoreError(
            f"{directory}: cannot restore without a gap: the newest usable "
            f"snapshot ends at seq {data.seq} but the journal {journals[0].name} "
            f"starts at seq {file_seq(journals[0])}; nothing was changed on disk. "
            "Put back the missing snapshot or journal, or move the journals "
            "aside to start from what is left"
        )


def _read_payload(data: RestoredData, loaded: LoadedSnapshot) -> None:
    payload = loaded.payload
    if payload.get("format", 0) > PAYLOAD_FORMAT:
        raise RestoreError(
            f"{loaded.path}: payload format {payload.get('format')} is newer "
            f"than this version supports ({PAYLOAD_FORMAT})"
        )
    data.seq = loaded.seq
    data.snapshot = loaded.path
    for kind, info in payload["kinds"].items():
        if type(kind) is not str or type(info["store_backed"]) is not bool:
            raise ValueError(f"kind entry {kind!r} is malformed")
        data.store_backed[kind] = info["store_backed"]
        if info["store_backed"]:
            states = info["states"]
            if not isinstance(states, dict) or not all(
                type(k) is str and isinstance(v, dict) for k, v in states.items()
            ):
                raise ValueError(f"states of kind {kind!r} are not id -> mapping")
            data.states[kind] = dict(states)
    data.changes = _decode_rows(payload["changes"])
    beyond = [c.seq for c in data.changes if c.seq > loaded.seq]
    if beyond:
        raise ValueError(
            f"change seq {beyond[0]} is after the snapshot's own seq {loaded.seq}"
        )


def _all_corrupt(directory: Path) -> list[CorruptFileError]:
    if list_snapshots(directory):
        return [
            CorruptFileError(path, "no snapshot in the directory passes its checks")
            for path in list_snapshots(directory)[:1]
        ]
    return []


def _apply(data: RestoredData, change: ChangeRecord) -> None:
    data.changes.append(change)
    data.seq = change.seq
    data.store_backed.setdefault(change.kind, change.store_backed)
    if not change.store_backed:
        return
    states = data.states.setdefault(change.kind, {})
    if change.next_state is None:
        states.pop(change.id, None)
    else:
        states[change.id] = change.next_state


def restore_into_log(log: TransitionLog, changes: Iterable[ChangeRecord]) -> int:
    """Append restored changes to an empty log; return how many.

    Fields, actors and run ids are interned and values frozen, as the write
    path stores them.
    """
    count = 0
    with _gc_paused():
        for change in changes:
            spec = [
                [None if f is None else intern(f), freeze(before), freeze(after)]
                for f, before, after in change.rows
            ]
            run_id = change.run_id
            log.append_rows(
                change.seq,
                change.kind,
                change.id,
                change.ts,
                intern(change.actor),
                None if run_id is None else intern(run_id),
                spec,
                change.changed_fields,
            )
            count += 1
    return count


def validated_states(
    kind: str,
    states: Mapping[str, Any],
    validate: Callable[[Any, str, str], ReadOnlyDict],
) -> dict[str, ReadOnlyDict]:
    """Return restored states of ``kind`` as the write path would store them.

    Each id must pass :func:`check_entity_id` and each state ``validate``, the
    schema's check of recorded states (``StateSchema.restore_validator``),
    which also returns the state read-only (with the schema's defaults filled
    in), so no separate freezing pass is needed. Only the final state of each
    entity is checked, not every change that led to it.

    Raises:
        InvalidIdError: the first id the write path would refuse.
        SchemaError: the first state the schema refuses.
    """
    return {
        entity_id: validate(state, kind, check_entity_id(kind, entity_id))
        for entity_id, state in states.items()
    }


def check_restored_ids(log: TransitionLog) -> None:
    """Raise :class:`InvalidIdError` for the first id of ``log`` the write path refuses.

    Covers the ids no state holds: plugin-backed kinds, removed entities.
    """
    for kind, entity_id in log.entity_keys():
        check_entity_id(kind, entity_id)


def check_restored_names(data: RestoredData, directory: Path) -> None:
    """Raise :class:`RestoreError` for a kind, actor or run id the write path refuses.

    The write path records only non-empty printable names, so any other name
    comes from an edited file (its checksum still holds). Each distinct name
    is checked once; the message names the first change that holds a bad one.
    """
    changes = data.changes
    names = {c.kind for c in changes} | {c.actor for c in changes}
    names |= {c.run_id for c in changes if c.run_id is not None}
    bad = {name for name in names if not name or not name.isprintable()}
    if not bad:
        return

    change = next(
        c for c in changes if c.kind in bad or c.actor in bad or c.run_id in bad
    )
    what, name = next(
        (what, name)
        for what, name in (
            ("kind", change.kind),
            ("actor", change.actor),
            ("run id", change.run_id),
        )
        if name in bad
    )
    path = data._file_holding(change.seq) or directory
    raise RestoreError(
        f"{path} (seq {change.seq}): {change.kind}/{change.id}: {what} {name!r:.60} "
        "is not a non-empty printable string; nothing was changed on disk. The "
        "write path never records such a name, so the file was edited or comes "
        "from elsewhere: put back a good copy, or move the snapshot and journal "
        "files aside to start without them"
    )


def restore_refusal(
    data: RestoredData, directory: Path, err: SchemaError | InvalidIdError
) -> RestoreError:
    """The :class:`RestoreError` for a restored id or state the write path refuses.

    A file that passed its checksum was written whole, so this is no damage
    that ``recover_damaged`` could skip: the files and the definitions
    disagree, and the message says how to go on.
    """
    path, seq = data.source_of(err.kind, err.entity_id)
    where = str(path or directory) + ("" if seq is None else f" (seq {seq})")
    what = str(err).removesuffix("; nothing recorded")
    if isinstance(err, InvalidIdError):
        cause = (
            "The write path never records such an id, so the file was edited or "
            "comes from elsewhere: put back a good copy"
        )
    else:
        cause = (
            "The state does not fit the kind's current definition (did its schema "
            "change since the file was written?): start with the definition the "
            "files were written with"
        )
    return RestoreError(
        f"{where}: {what}; nothing was changed on disk. {cause}, or move the "
        "snapshot and journal files aside to start without them; "
        "recover_damaged=True does not skip this check"
    )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold the cycle collector off while a restore builds its objects.

    Loading and restoring allocate a few containers per row and free none
    in cycles, and a heap that grows that fast sets off a full collection
    each time it grows by a quarter: with the collector running, about
    half the restore's time went to collections that found nothing. The
    collector is on again (if it was) as soon as the block ends, and its
    next pass takes the new objects once.
    """
    if not gc.isenabled():
        yield
        return

    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class DataDir:
    """The runtime's side of a data directory: lock, journal and snapshots.

    Opening takes the directory's lock (refused while another runtime holds
    it; a crashed holder does not leave it stuck) and checks the directory is
    writable, so a read-only directory fails at start, not at the first write.

    Every committed change is journalled by :meth:`journal` before it is
    applied in memory and acknowledged: with ``fsync="always"`` an
    acknowledged change survives ``kill -9``. Snapshots are written by
    :meth:`snapshot`, which captures the state under the log's lock (cheap:
    states and rows are immutable, so only references are copied), rotates the
    journal at the same point, and encodes and writes outside the lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fsync: str = "always",
        interval: float = 0.05,
        keep_snapshots: int = 2,
        recover_damaged: bool = False,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(
                f"journal_fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}"
            )
        if keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be 1 or more, got {keep_snapshots}")
        self.directory = Path(directory)
        self.fsync = fsync
        self.interval = interval
        self.keep_snapshots = keep_snapshots
        self.recover_damaged = recover_damaged
        self.last_snapshot_seq = 0
        self.last_snapshot_at: float | None = None
        self._lock = DataDirLock(self.directory)
        self._journal: JournalWriter | None = None
        self._closed = False
        self._snapshot_lock = threading.Lock()

    def open(self) -> RestoredData:
        """Lock the directory and read what it holds.

        Damaged files are listed in the result; the caller writes a fresh
        snapshot and then sets them aside with :meth:`set_aside` (renamed
        ``<name>.damaged``, never deleted).
        """
        self._lock.acquire()
        try:
            data = load_data_dir(self.directory)
            damage = data.journal_damage
            if damage is not None and not self.recover_damaged:
                raise RestoreError(
                    f"{damage}: the journal is damaged before its end, so the "
                    f"changes after seq {data.seq} cannot be restored in order; "
                    "nothing was changed on disk. Start with "
                    f"recover_damaged=True to continue from seq {data.seq} (the "
                    "damaged files are then renamed *.damaged and kept), or "
                    "repair the file"
                )
        except BaseException:
            self._lock.release()
            raise
        self.last_snapshot_seq = data.seq - data.journal_records
        if data.snapshot is not None and data.snapshot.exists():
            self.last_snapshot_at = data.snapshot.stat().st_mtime
        return data

    def set_aside(self, paths: Iterable[Path]) -> None:
        """Rename damaged files to ``<name>.damaged``, keeping them for a look."""
        for path in paths:
            if not path.exists():
                continue
            aside = path.with_name(f"{path.name}.damaged")
            path.replace(aside)
            logger.error("moved damaged file %s aside to %s", path, aside.name)

    def start_journal(self, next_seq: int) -> None:
        """Start appending to a fresh journal file from ``next_seq``."""
        self._journal = JournalWriter(
            self.directory,
            first_seq=next_seq,
            fsync=self.fsync,  # type: ignore[arg-type]
            interval=self.interval,
        )

    def journal(self, change: ChangeRecord) -> None:
        """Append one change; raises :class:`DataDirError` if it cannot.

        With ``fsync="always"`` the change is not durable until :meth:`sync`
        returns: the kind actors append a whole burst of changes, then sync
        once before acknowledging any of them (group commit).
        """
        journal = self._journal
        if journal is None:
            if self._closed:
                raise self._stopped()
            raise DataDirError(self.directory, "the journal is not open")
        try:
            journal.append(change.encode(), trusted=True, sync=False)
        except JournalClosedError:
            # close() ran between the read above and the append.
            raise self._stopped() from None

    def sync(self) -> None:
        """Make every journalled change durable (see :meth:`journal`).

        Once :meth:`close` has returned, every change appended before it is
        durable (the close fsyncs the journal), so a sync that finds the
        journal closed has nothing left to do.
        """
        journal = self._journal
        if journal is None:
            return
        try:
            journal.sync()
        except JournalClosedError:
            if journal.failed is not None:
                raise journal.failed from None

    def _stopped(self) -> RuntimeStoppedError:
        return RuntimeStoppedError(
            f"the runtime stopped and closed the journal in {self.directory}"
        )

    def snapshot(
        self,
        log: TransitionLog,
        capture_states: Callable[[], dict[str, tuple[bool, dict[str, Any]]]],
        seconds: Any = None,
    ) -> Path | None:
        """Write a snapshot of the current state and log; prune old files.

        Returns the snapshot's path, or ``None`` when nothing changed since the
        last one.
        """
        with self._snapshot_lock:
            started = time.perf_counter()

            with log.lock:
                seq = log.last_seq
                if seq == self.last_snapshot_seq and self.last_snapshot_at is not None:
                    return None
                kinds = capture_states()
                changes = log.snapshot_changes()
                if self._journal is not None:
                    self._journal.rotate(seq + 1)

            payload = {
                "format": PAYLOAD_FORMAT,
                "seq": seq,
                "kinds": {
                    kind: {"store_backed": backed, "states": states}
                    for kind, (backed, states) in kinds.items()
                },
                "changes": list(changes.encoded()),
            }
            path = write_snapshot(self.directory, seq, payload, trusted=True)
            self.last_snapshot_seq = seq
            self.last_snapshot_at = time.time()

            prune_snapshots(self.directory, keep=self.keep_snapshots)
            kept = list_snapshots(self.directory)
            oldest = int(kept[-1].name.split("-")[1].split(".")[0]) if kept else seq
            if self._journal is not None:
                self._journal.remove_journals_before(oldest + 1)

            took = time.perf_counter() - started
            if seconds is not None:
                seconds.observe(took)
            logger.info(
                "snapshot %s at seq=%d: %d changes, %.3f s",
                path.name,
                seq,
                len(changes),
                took,
            )
            return path

    def close(self) -> None:
        """Flush and close the journal and release the lock; idempotent.

        Raises:
            DataDirError: the journal's final fsync failed; the journal is
                closed and the lock released all the same.
        """
        # Closed is set first: a write that then finds no journal knows why.
        if self._journal is not None:
            self._closed = True
        journal, self._journal = self._journal, None
        try:
            if journal is not None:
                journal.close()
        finally:
            if self._lock.held:
                self._lock.release()

    def journal_files(self) -> list[Path]:
        """The journal files in the directory, in replay order."""
        return list_journals(self.directory)
