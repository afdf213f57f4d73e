"""A change bus on Redis Streams, shared by several runtime instances.

Every committed change of a kind is appended to one Redis stream for that kind,
``<prefix>:changes:<kind>``, trimmed to about ``maxlen`` entries. Each entry has
two fields: ``change``, the change encoded as MessagePack (by msgspec; see
:func:`encode_change`), and ``origin``, the id of the instance that committed it.

- :class:`RedisBus` appends changes (:meth:`RedisBus.publish`). Publishing never
  waits for Redis: changes go to a local, bounded outbox, in order, and one
  background thread appends them in batches. While Redis is unreachable the
  outbox keeps them and the thread retries with a doubling back-off; once Redis
  answers again they are appended in the order they were published.
- :class:`BroadcastReader` hands every entry of a kind's stream to a handler, in
  stream order, and stores the id of the last entry it processed in the hash
  ``<prefix>:offsets``, so a reader restarted under the same ``state_key``
  resumes right after it.
- :class:`WorkQueueReader` shares a kind's stream among the instances of a
  worker group through a Redis consumer group: each entry goes to one of them,
  is acknowledged after its handler returned, is claimed by another instance if
  it stays unacknowledged longer than ``claim_idle_ms`` (its instance crashed),
  and goes to the dead-letter stream ``<prefix>:dead:<worker_group>`` after its
  last attempt.
- :class:`PartitionMap` says which instance owns (is the one writer of) an id.

Delivery guarantees:

- Publishing: at most ``outbox_limit`` changes wait for Redis (plus one batch
  being sent). Past that the **oldest waiting change is dropped**, with an ERROR
  record and the ``dropped`` counter; writes are never refused, because
  :meth:`RedisBus.publish` runs after the local commit, which cannot be undone.
  A batch whose reply was lost is sent again but not appended twice: a small
  server-side script skips what this bus already appended. A change too large
  to be an entry is set aside (``too_large``), not retried; see
  :class:`RedisBus`.
- Broadcast and work queues: **at least once**. A reader that crashes after its
  handler returned but before it stored its offset (broadcast) or acknowledged
  the entry (work queue) sees the entry again, and a work-queue handler slower
  than ``claim_idle_ms`` may run on two instances at once. Handlers get a
  :class:`Delivery` (stream entry id, origin instance, attempt) next to the
  change so they can be idempotent: the entry id orders the changes of a kind
  and, with one writer per id, those of one id.
- Readers hand on only what :func:`check_entry` accepts: a change the runtime
  could have written to that stream. Anything else is skipped (broadcast) or
  dead-lettered (work queue), and the entries after it are read on.

Logging contract: a handler that raised is logged at ERROR with the traceback
(broadcast) or at WARNING while it will be retried and ERROR when the entry is
dead-lettered (work queue); Redis becoming unreachable and reachable again is
logged at WARNING once per outage, with how many changes waited and were
dropped; a dropped change, a change set aside as too large and an entry a
reader refuses at ERROR. Messages name the kind, id and sequence, and the
reader.

Limitations:

- The outbox lives in memory: changes not yet appended when the process dies
  are lost to the other instances (the local journal still has them).
- One Redis server (or a primary with replicas). The publishing script touches
  several streams at once, which Redis Cluster refuses unless they share a slot.
- A reader that falls more than ``maxlen`` entries behind misses the entries
  trimmed in between; this is detected (from the stream's first entry), logged
  at WARNING and counted in ``gaps``, not repaired.
- A work-queue entry goes to whichever instance asks first, so two changes of
  one id may be handled by two instances at the same time; use the entry id to
  discard a change older than one already handled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import msgspec
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from runtime._delivery import Backoff, DeadLetter, work_queue
from runtime._diff import same_value
from runtime._engine import check_entity_id
from runtime._errors import (
    DefinitionError,
    EntityRuntimeError,
    InvalidIdError,
    SchemaError,
)
from runtime._events import EntityChanged, ReadOnlyDict, freeze
from runtime._secrets import MASK

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The version of the encoded change that this code writes and reads."""

Start = Literal["latest", "earliest"]
Fields = Mapping[bytes, bytes]
ChangeHandler = Callable[[EntityChanged, "Delivery"], object]
StateCheck = Callable[[Any, str, str], ReadOnlyDict]
"""Checks a state ``(state, kind, id)``: returns it read-only, or raises to refuse."""

_MARKER_TTL_SECONDS = 86_400
_GAP_CHECK_SECONDS = 5.0

DEFAULT_MAX_ENTRY_BYTES = 64 * 1024 * 1024
"""The default ``max_entry_bytes``: an eighth of Redis's default argument limit."""

_SMALLEST_SERVER_LIMIT = 1024 * 1024
"""The lowest ``proto-max-bulk-len`` Redis accepts: no smaller entry is refused."""

_BATCH_BYTES = 4 * 1024 * 1024
"""A batch is cut before its entries pass this size; a larger entry goes alone."""

# Appends a batch to the streams, skipping entries this bus (instance and
# incarnation) already appended: a batch whose reply was lost is sent again.
# KEYS: the marker, then one stream per entry; ARGV: maxlen, origin, marker
# TTL, then per entry its outbox number and payload (entry KEYS[i] has its
# number at ARGV[2i] and its payload at ARGV[2i + 1]).
_PUBLISH_SCRIPT = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local added = 0
for i = 2, #KEYS do
  local number = tonumber(ARGV[2 * i])
  if number > last then
    redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*',
      'change', ARGV[2 * i + 1], 'origin', ARGV[2])
    redis.call('SET', KEYS[1], number)
    last = number
    added = added + 1
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return added
"""


class NotOwnerError(EntityRuntimeError, RuntimeError):
    """A write for an id that another instance owns was refused; nothing recorded.

    Attributes:
        kind: the entity kind.
        entity_id: the entity id.
        owner: the instance that owns the id and takes its writes.
        instance: the instance that refused the write.
        partition: the id's partition.
    """

    def __init__(
        self, kind: str, entity_id: str, owner: str, instance: str, partition: int
    ) -> None:
        self.kind = kind
        self.entity_id = entity_id
        self.owner = owner
        self.instance = instance
        self.partition = partition
        super().__init__(
            f"{kind}/{entity_id}: owned by instance {owner!r} (partition "
            f"{partition}), not by this instance {instance!r}; nothing recorded; "
            f"send the write to {owner!r}"
        )


class PartitionMapMismatchError(DefinitionError):
    """Another instance on the bus runs with a different number of partitions.

    The two would compute different owners for most ids and both take writes
    for them, so this instance refuses to start.

    Attributes:
        instance: this instance.
        partitions: this instance's partition count.
        other: the instance whose record disagrees.
        other_partitions: its partition count.
    """

    def __init__(
        self,
        instance: str,
        partitions: int,
        other: str,
        other_partitions: int,
        key: str,
        recorded_at: str,
    ) -> None:
        self.instance = instance
        self.partitions = partitions
        self.other = other
        self.other_partitions = other_partitions
        super().__init__(
            f"instance {other!r} runs with {other_partitions} partitions (recorded "
            f"at {recorded_at} in {key}), this instance {instance!r} with "
            f"{partitions}: both would take writes for most ids; give every "
            f"instance the same PartitionMap (if {other!r} no longer runs, remove "
            f"its record: HDEL {key} {other}); not started"
        )


class BusClosedError(EntityRuntimeError, RuntimeError):
    """The bus or reader was closed; create a new one."""


class UnencodableChangeError(EntityRuntimeError, ValueError):
    """A change holds a value MessagePack cannot carry; nothing was published."""

    def __init__(self, change: EntityChanged, reason: str) -> None:
        self.kind = change.kind
        self.entity_id = change.id
        self.seq = change.seq
        self.reason = reason
        super().__init__(
            f"{change.kind}/{change.id} seq={change.seq}: cannot be encoded for "
            f"the bus ({reason}); nothing published"
        )


class ChangeTooLargeError(EntityRuntimeError, ValueError):
    """A change is too large to be a stream entry; it was never published.

    Attributes:
        kind: the entity kind.
        entity_id: the entity id.
        seq: the change's sequence number.
        size: the size of its encoded entry, in bytes.
        limit: the bus's ``max_entry_bytes``, or ``None`` when the server
            itself refused the entry.
    """

    def __init__(
        self,
        kind: str,
        entity_id: str,
        seq: int,
        size: int,
        limit: int | None,
        why: str,
    ) -> None:
        self.kind = kind
        self.entity_id = entity_id
        self.seq = seq
        self.size = size
        self.limit = limit
        super().__init__(
            f"{kind}/{entity_id} seq={seq}: its bus entry is {size:,} bytes, {why}; "
            "nothing published"
        )


class UndecodableEntryError(EntityRuntimeError, ValueError):
    """A stream entry is not a change this code can read."""


class InvalidEntryError(UndecodableEntryError):
    """A stream entry holds a change a reader refuses (see :func:`check_entry`).

    Attributes:
        change: the change as decoded, states read-only and unchecked.
        reason: what is wrong with it.
    """

    def __init__(self, change: EntityChanged, reason: str) -> None:
        self.change = change
        self.reason = reason
        super().__init__(
            f"{change.kind}/{change.id} seq={change.seq}: refused: {reason}"
        )


# -- encoding -----------------------------------------------------------------


class _WireChange(msgspec.Struct, frozen=True):
    v: int
    kind: str
    id: str
    prev: dict[str, Any] | None
    next: dict[str, Any] | None
    delta: dict[str, Any]
    changed_fields: list[str]
    actor: str
    occurred_at: str
    seq: int
    run_id: str | None


def _refuse_ext(code: int, data: memoryview) -> Any:
    raise ValueError(f"MessagePack extension type {code} is not allowed")


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_WireChange, ext_hook=_refuse_ext)


def _as_dict(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    return dict(value)


def encode_change(change: EntityChanged) -> bytes:
    """Encode a change as a MessagePack map, the ``change`` field of an entry.

    The map holds ``v`` (the format version), ``kind``, ``id``, ``prev``,
    ``next``, ``delta``, ``changed_fields``, ``actor``, ``occurred_at`` (ISO
    8601 with its UTC offset), ``seq`` and ``run_id``.

    Raises:
        UnencodableChangeError: a value is not JSON-compatible (never for a
            change whose states passed their kind's schema).
    """
    wire = _WireChange(
        v=FORMAT_VERSION,
        kind=change.kind,
        id=change.id,
        prev=_as_dict(change.prev),
        next=_as_dict(change.next),
        delta=_as_dict(change.delta) or {},
        changed_fields=list(change.changed_fields),
        actor=change.actor,
        occurred_at=change.occurred_at.isoformat(),
        seq=change.seq,
        run_id=change.run_id,
    )
    try:
        return _ENCODER.encode(wire)
    except (TypeError, OverflowError, msgspec.EncodeError) as err:
        raise UnencodableChangeError(change, str(err)) from err


def decode_change(data: bytes) -> EntityChanged:
    """Decode what :func:`encode_change` wrote; states come back read-only.

    Decoding never runs code. The change equals the one encoded: ``prev``,
    ``next`` and ``delta`` as :class:`~runtime.ReadOnlyDict`, ``occurred_at``
    timezone-aware.

    Raises:
        UndecodableEntryError: the bytes are not an encoded change of a known
            format version; the message says why.
    """
    wire, occurred_at = _decode_wire(data)
    try:
        return _from_wire(wire, occurred_at, freeze(wire.prev), freeze(wire.next))
    except RecursionError:
        raise UndecodableEntryError(_TOO_DEEP) from None


def _decode_wire(data: bytes) -> tuple[_WireChange, datetime]:
    try:
        wire = _DECODER.decode(data)
        occurred_at = datetime.fromisoformat(wire.occurred_at)
    except (msgspec.DecodeError, ValueError, RecursionError) as err:
        raise UndecodableEntryError(f"not an encoded change: {err}") from None
    if wire.v != FORMAT_VERSION:
        raise UndecodableEntryError(
            f"{wire.kind}/{wire.id} seq={wire.seq}: format version {wire.v} is "
            f"not supported (this code reads version {FORMAT_VERSION})"
        )
    if occurred_at.tzinfo is None:
        occurred_at = occurred_at.replace(tzinfo=UTC)
    return wire, occurred_at


_TOO_DEEP = "not an encoded change: a value nests too deeply"


def _from_wire(
    wire: _WireChange, occurred_at: datetime, prev: Any, next: Any
) -> EntityChanged:
    return EntityChanged(
        kind=wire.kind,
        id=wire.id,
        prev=prev,
        next=next,
        delta=freeze(wire.delta),
        changed_fields=tuple(wire.changed_fields),
        actor=wire.actor,
        occurred_at=occurred_at,
        seq=wire.seq,
        run_id=wire.run_id,
    )


def check_entry(
    data: bytes,
    kind: str,
    check_state: StateCheck | None = None,
    state_fields: Collection[str] | None = None,
) -> EntityChanged:
    """Decode an entry of ``kind``'s stream, refusing what the runtime never writes.

    Besides decoding (:func:`decode_change`), refuses a change whose kind is
    not ``kind``, whose id the write path refuses (empty, too long, not
    printable), whose seq is below 1, whose actor or run id is empty or not
    printable, or whose ``delta`` and ``changed_fields`` are not the diff of
    its ``prev`` and ``next`` (a create lists every field of ``next``, a
    removal every field of ``prev``; a change of nothing is refused too).
    With ``check_state``, ``prev`` and ``next`` must also pass it and come
    back as it returns them (a schema's check of recorded states fills in
    defaults).

    A change with a run id may hold secrets masked as ``***``, which need
    not fit the schema or the diff (two secrets masked alike look equal):
    when its states or delta hold the mask, the identity checks still apply,
    and masking cannot add, drop or rename fields, so its states must hold
    exactly ``state_fields`` (the schema's fields, when given), its
    ``changed_fields`` must name some of their fields and its delta exactly
    those (none for a removal). Costs one diff of the states plus the state
    checks: a few microseconds for a small flat state.

    Raises:
        UndecodableEntryError: the bytes are not an encoded change.
        InvalidEntryError: the change is refused; the error holds it and
            names what is wrong.
    """
    wire, occurred_at = _decode_wire(data)
    try:
        return _checked(wire, occurred_at, kind, check_state, state_fields)
    except RecursionError:
        raise UndecodableEntryError(_TOO_DEEP) from None


def _checked(
    wire: _WireChange,
    occurred_at: datetime,
    kind: str,
    check_state: StateCheck | None,
    state_fields: Collection[str] | None,
) -> EntityChanged:
    problem = _identity_problem(wire, kind)
    if problem is not None:
        raise InvalidEntryError(
            _from_wire(wire, occurred_at, freeze(wire.prev), freeze(wire.next)),
            problem,
        )

    prev, next = wire.prev, wire.next
    problem = _diff_problem(wire)
    if problem is None and check_state is not None and prev is not None:
        try:
            prev = check_state(prev, kind, wire.id)
        except Exception as err:
            problem = _schema_problem("prev", err)
    if problem is None and check_state is not None and next is not None:
        try:
            next = check_state(next, kind, wire.id)
        except Exception as err:
            problem = _schema_problem("next", err)
    if problem is None:
        return _from_wire(wire, occurred_at, freeze(prev), freeze(next))

    change = _from_wire(wire, occurred_at, freeze(wire.prev), freeze(wire.next))
    if wire.run_id is not None and _holds_mask((wire.prev, wire.next, wire.delta)):
        masked = _masked_shape_problem(wire, state_fields)
        if masked is None:
            return change
        problem = f"{problem}, and as a change with masked secrets: {masked}"
    raise InvalidEntryError(change, problem)


def _masked_shape_problem(
    wire: _WireChange, state_fields: Collection[str] | None
) -> str | None:
    # What masking cannot explain: fields added, dropped or renamed, a change
    # of no field, a delta of other fields than the changed ones.
    held = [state for state in (wire.prev, wire.next) if state is not None]
    if state_fields is not None:
        expected = set(state_fields)
        for state in held:
            if set(state) != expected:
                return (
                    f"its fields {sorted(state)!r:.120} are not the schema's "
                    f"{sorted(expected)!r:.120}"
                )
    changed = wire.changed_fields
    if not changed:
        return "it changes no field"
    known = set().union(*held)
    if not set(changed) <= known:
        return f"changed_fields {changed!r:.120} name fields its states lack"
    delta = set(wire.delta)
    if (wire.next is None and delta) or (
        wire.next is not None and delta != set(changed)
    ):
        return "its delta holds other fields than the changed ones"
    return None


def _schema_problem(state: str, err: Exception) -> str:
    # Whatever the check raised refuses the entry: a reader must not stop on
    # one entry its check cannot handle.
    if isinstance(err, SchemaError):
        where = f"field {err.field!r} " if err.field else ""
        return f"{state} does not fit this instance's schema: {where}{err.reason}"
    if isinstance(err, ValueError):
        return f"{state} does not fit this instance's schema: {err}"
    return (
        f"{state} could not be checked against this instance's schema: "
        f"{type(err).__name__}: {err}"
    )


def _identity_problem(wire: _WireChange, kind: str) -> str | None:
    if wire.kind != kind:
        return f"it is of kind {wire.kind!r:.60}, not of this stream's kind {kind!r}"
    try:
        check_entity_id(kind, wire.id)
    except InvalidIdError as err:
        return f"its id {err.reason}"
    if wire.seq < 1:
        return f"seq must be 1 or more, got {wire.seq}"
    if not wire.actor or not wire.actor.isprintable():
        return f"actor {wire.actor!r:.60} is not a non-empty printable string"
    run_id = wire.run_id
    if run_id is not None and (not run_id or not run_id.isprintable()):
        return f"run id {run_id!r:.60} is not a non-empty printable string"
    return None


def _diff_problem(wire: _WireChange) -> str | None:
    # The write path's diff (diff_states): a create lists every field of
    # next, with next as its delta; a removal every field of prev, with an
    # empty delta; an update the fields whose values differ, with next's.
    prev, next = wire.prev, wire.next
    if next is None:
        if prev is None:
            return "prev and next are both null"
        fields = list(prev)
        delta: dict[str, Any] = {}
    elif prev is None:
        fields = list(next)
        delta = next
    else:
        fields = _changed_fields(prev, next)
        delta = {field: next.get(field) for field in fields}
    if not fields:
        return "prev and next are the same state"
    if wire.changed_fields != fields:
        return (
            f"changed_fields {wire.changed_fields!r:.120} are not the fields prev "
            f"and next differ in, {fields!r:.120}"
        )
    # Equal encodings: the same keys in the same order, and values equal
    # strictly by type (1, 1.0 and True differ), cheaper than comparing.
    if _ENCODER.encode(wire.delta) != _ENCODER.encode(delta):
        return "delta does not hold next's values of the changed fields"
    return None


_MISSING = object()
_EXACT_EQ = frozenset((str, int, bool))


def _changed_fields(prev: dict[str, Any], next: dict[str, Any]) -> list[str]:
    # The fields diff_states() lists, in its order. Two values that encode
    # alike are the same value; only values that do not (a mapping with its
    # keys in another order, say) are compared by same_value().
    encode = _ENCODER.encode
    fields = []
    added = 0
    for field, value in next.items():
        old = prev.get(field, _MISSING)
        kind = type(value)
        if kind is type(old) and kind in _EXACT_EQ:
            if old != value:
                fields.append(field)
        elif old is _MISSING:
            fields.append(field)
            added += 1
        elif encode(old) != encode(value) and not same_value(old, value):
            fields.append(field)
    if len(prev) > len(next) - added:
        fields.extend(field for field in prev if field not in next)
    return fields


def _holds_mask(value: Any) -> bool:
    # Whether a masked secret shows anywhere in value (keys included).
    if isinstance(value, str):
        return MASK in value
    if isinstance(value, dict):
        return any(_holds_mask(k) or _holds_mask(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_mask(item) for item in value)
    return False


def entry_position(entry_id: str) -> tuple[int, int]:
    """Return a stream entry id (``"<ms>-<n>"``) as a sortable pair of ints."""
    millis, _, number = entry_id.partition("-")
    return int(millis), int(number or 0)


# -- partitions ---------------------------------------------------------------


class PartitionMap:
    """Which instance owns (is the only writer of) each entity id.

    An id's partition is ``crc32(kind + NUL + id) % partitions``; each partition
    is owned by the instance with the highest ``blake2b(instance, partition)``
    weight (rendezvous hashing). Both hashes are fixed functions of their input,
    unlike Python's salted ``hash()``, so every process given the same instance
    list computes the same owners.

    How ownership moves: when an instance is added, only the partitions it now
    wins move, all to it (about ``1/n`` of them); when one is removed, only its
    own partitions move, spread over the others. Every other id keeps its owner.

    Lookups are O(1) (one crc32 and an index); building the map costs
    ``partitions * len(instances)`` hashes. Immutable, so thread-safe.

    Args:
        instances: the instance ids, each a non-empty string, no repeats.
        partitions: how many partitions the ids are spread over; every
            instance must use the same number.

    Raises:
        DefinitionError: no instances, a repeated or empty instance id, or
            fewer than one partition.
    """

    def __init__(self, instances: Sequence[str], *, partitions: int = 1024) -> None:
        names = list(instances)
        if not names:
            raise DefinitionError("a PartitionMap needs at least one instance")
        for name in names:
            if not isinstance(name, str) or not name:
                raise DefinitionError(
                    f"instance ids must be non-empty strings, got {name!r}"
                )
        if len(set(names)) != len(names):
            raise DefinitionError(f"instance ids must not repeat, got {names!r}")
        if not isinstance(partitions, int) or partitions < 1:
            raise DefinitionError(f"partitions must be 1 or more, got {partitions!r}")

        self.instances: tuple[str, ...] = tuple(names)
        self.partitions = partitions
        self._owners = tuple(
            max(names, key=lambda name: (_weight(name, p), name))
            for p in range(partitions)
        )

    def __repr__(self) -> str:
        return f"PartitionMap({list(self.instances)!r}, partitions={self.partitions})"

    def partition(self, kind: str, entity_id: str) -> int:
        """Return the partition of an id, from 0 to ``partitions - 1``."""
        key = f"{kind}\x00{entity_id}".encode("utf-8", "surrogatepass")
        return zlib.crc32(key) % self.partitions

    def owner(self, kind: str, entity_id: str) -> str:
        """Return the instance that owns an id."""
        return self._owners[self.partition(kind, entity_id)]

    def owner_of_partition(self, partition: int) -> str:
        """Return the instance that owns a partition."""
        return self._owners[partition]

    def partitions_of(self, instance: str) -> list[int]:
        """Return the partitions an instance owns, in increasing order."""
        return [p for p, owner in enumerate(self._owners) if owner == instance]

    def check_owner(self, instance: str, kind: str, entity_id: str) -> None:
        """Refuse a write for an id that ``instance`` does not own.

        Raises:
            NotOwnerError: another instance owns the id; the error names it.
        """
        partition = self.partition(kind, entity_id)
        owner = self._owners[partition]
        if owner != instance:
            raise NotOwnerError(kind, entity_id, owner, instance, partition)

    def moved(self, other: PartitionMap) -> dict[int, tuple[str, str]]:
        """Return the partitions whose owner differs in ``other``.

        Returns:
            ``{partition: (owner here, owner in other)}``.

        Raises:
            DefinitionError: the maps have different partition counts.
        """
        if other.partitions != self.partitions:
            raise DefinitionError(
                f"cannot compare maps of {self.partitions} and {other.partitions} "
                "partitions"
            )
        return {
            p: (mine, theirs)
            for p, (mine, theirs) in enumerate(
                zip(self._owners, other._owners, strict=True)
            )
            if mine != theirs
        }


def _weight(instance: str, partition: int) -> int:
    digest = hashlib.blake2b(
        f"{instance}\x00{partition}".encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


# -- publishing ---------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Outgoing:
    number: int
    stream: str
    payload: bytes
    kind: str
    id: str
    seq: int


@dataclasses.dataclass(slots=True)
class _Outage:
    since: float
    queued: int = 0


@dataclasses.dataclass(slots=True)
class _Drops:
    count: int
    first: _Outgoing
    last: _Outgoing


class RedisBus:
    """Publishes committed changes to Redis Streams, one stream per kind.

    Create one bus per runtime instance and call :meth:`publish` for every
    committed change, in commit order per id. Readers
    (:class:`BroadcastReader`, :class:`WorkQueueReader`) are created on a bus
    and closed with it.

    :meth:`publish` never blocks on Redis and never fails because Redis is
    down: the change goes to a bounded in-memory outbox, and a background
    thread (``redis-bus-publisher:<instance_id>``) appends waiting changes in
    batches, in the order they were published. When Redis is unreachable it
    retries with a back-off doubling from ``retry_backoff`` to
    ``max_retry_backoff`` seconds; changes published meanwhile wait, up to
    ``outbox_limit``. Past that the oldest waiting change is dropped (ERROR
    record, ``dropped`` counter), so the newest changes, which carry the
    current states, survive a long outage.

    Counters (plain ints, for metrics):

    - ``published``: changes appended to Redis.
    - ``queued``: changes that had to wait because Redis was unreachable.
    - ``dropped``: changes dropped from a full outbox, never published.
    - ``too_large``: changes never published because they are too large (see
      ``max_entry_bytes``).
    - ``reconnects``: times Redis became reachable again after an outage.

    A change too large to be an entry is set aside, never published, and the
    changes before and after it are published as usual. Most are refused by
    :meth:`publish` itself (over ``max_entry_bytes``). One that passes that
    limit but not the server's (``proto-max-bulk-len``, or a connection lost
    while sending it) is sent alone, twice; if it fails again while the
    server still answers ``PING``, it is logged at ERROR, counted and passed
    to the :meth:`on_too_large` callbacks. An entry under 1 MiB, the smallest
    limit Redis accepts, is never taken for too large: its failures are
    outages, retried.

    Args:
        url: the Redis URL, e.g. ``redis://127.0.0.1:6379/0``; never logged
            (it may hold a password), only its host, port and database.
        instance_id: this instance's id, written as each entry's ``origin``
            and used as its consumer name in work-queue groups.
        stream_prefix: the prefix of every key the bus uses.
        maxlen: each stream is trimmed to about this many entries.
        outbox_limit: how many changes may wait for Redis.
        claim_idle_ms: the visibility timeout of work queues: an entry
            delivered but unacknowledged this long is claimed by another
            instance. Longer than any handler may take.
        block_ms: how long a reader waits for new entries in one call; also
            bounds how long closing a reader takes.
        batch_size: the most changes appended in one round trip (a batch is
            also cut before its entries pass 4 MiB).
        max_entry_bytes: the largest encoded change :meth:`publish` accepts.
            Keep it under the server's ``proto-max-bulk-len`` (512 MiB by
            default): a larger entry costs the publisher a lost connection
            before it is set aside.
        retry_backoff: the first pause after Redis failed, in seconds.
        max_retry_backoff: the longest pause between two tries.
        socket_timeout: seconds to wait for Redis to answer (on top of
            ``block_ms`` for blocking reads) or to accept a connection.

    Raises:
        DefinitionError: an argument is out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        instance_id: str,
        stream_prefix: str = "entity-runtime",
        maxlen: int = 100_000,
        outbox_limit: int = 100_000,
        claim_idle_ms: int = 30_000,
        block_ms: int = 1000,
        batch_size: int = 500,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        retry_backoff: float = 0.05,
        max_retry_backoff: float = 5.0,
        socket_timeout: float = 5.0,
    ) -> None:
        if not isinstance(instance_id, str) or not instance_id:
            raise DefinitionError(
                f"instance_id must be a non-empty string, got {instance_id!r}"
            )
        if not isinstance(stream_prefix, str) or not stream_prefix:
            raise DefinitionError(
                f"stream_prefix must be a non-empty string, got {stream_prefix!r}"
            )
        for name, value in (
            ("maxlen", maxlen),
            ("outbox_limit", outbox_limit),
            ("claim_idle_ms", claim_idle_ms),
            ("block_ms", block_ms),
            ("batch_size", batch_size),
            ("max_entry_bytes", max_entry_bytes),
        ):
            if not isinstance(value, int) or value < 1:
                raise DefinitionError(f"{name} must be 1 or more, got {value!r}")
        if retry_backoff < 0 or max_retry_backoff < retry_backoff:
            raise DefinitionError(
                f"need 0 <= retry_backoff <= max_retry_backoff, got {retry_backoff} "
                f"and {max_retry_backoff}"
            )

        self.url = url
        self.instance_id = instance_id
        self.stream_prefix = stream_prefix
        self.maxlen = maxlen
        self.outbox_limit = outbox_limit
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.batch_size = batch_size
        self.max_entry_bytes = max_entry_bytes
        self.retry_backoff = retry_backoff
        self.max_retry_backoff = max_retry_backoff
        self.socket_timeout = socket_timeout
        self.incarnation = uuid.uuid4().hex
        """Unique per bus object: tells this run's entries from a restart's."""

        self.published = 0
        self.queued = 0
        self.dropped = 0
        self.too_large = 0
        self.reconnects = 0

        self._client = self.new_client()
        self.where = _describe(self._client)
        """Host, port and database of the server, for messages (no password)."""
        self._script = self._client.register_script(_PUBLISH_SCRIPT)
        self._marker = f"{stream_prefix}:published:{instance_id}:{self.incarnation}"
        self._numbers = itertools.count(1)
        self._outbox: deque[_Outgoing] = deque()
        self._in_flight = 0
        self._cond = threading.Condition()
        self._outage: _Outage | None = None
        self._drops: _Drops | None = None
        self._closing = False
        self._abandon = False
        self._closed = False
        self._readers: list[_Reader] = []
        self._too_large_callbacks: list[
            Callable[[EntityChanged, ChangeTooLargeError], object]
        ] = []
        self._recorded_map = False

        self._thread = threading.Thread(
            target=self._publish_loop,
            name=f"redis-bus-publisher:{instance_id}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return (
            f"RedisBus({self.where}, instance_id={self.instance_id!r}, "
            f"stream_prefix={self.stream_prefix!r})"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- keys and clients ---------------------------------------------------

    def stream_key(self, kind: str) -> str:
        """Return the stream of a kind's changes."""
        return f"{self.stream_prefix}:changes:{kind}"

    def dead_letter_key(self, worker_group: str) -> str:
        """Return the dead-letter stream of a worker group."""
        return f"{self.stream_prefix}:dead:{worker_group}"

    @property
    def offsets_key(self) -> str:
        """The hash of broadcast readers' last processed entry ids."""
        return f"{self.stream_prefix}:offsets"

    @property
    def partition_maps_key(self) -> str:
        """The hash of the partition map each running instance uses."""
        return f"{self.stream_prefix}:partition-maps"

    def new_client(self) -> redis.Redis:
        """Return a new client on the bus's server; the caller closes it.

        Commands are retried once at once (a pooled connection may have died
        with a server restart); longer outages are the caller's to wait out.
        """
        return redis.Redis.from_url(
            self.url,
            socket_timeout=self.socket_timeout + self.block_ms / 1000,
            socket_connect_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 1),
            client_name=f"entity-runtime:{self.instance_id}",
        )

    # -- publishing ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the last attempt to reach Redis succeeded."""
        return self._outage is None

    @property
    def outbox_size(self) -> int:
        """Changes waiting to be appended, including a batch being sent."""
        with self._cond:
            return len(self._outbox) + self._in_flight

    def publish(self, change: EntityChanged) -> None:
        """Queue a committed change for its kind's stream; never waits for Redis.

        Thread-safe. Changes are appended in the order of the calls, so call
        it in commit order (per id at least). The change is encoded now, in
        the calling thread: later changes to the objects it holds do not
        matter.

        Raises:
            UnencodableChangeError: the change holds a value MessagePack
                cannot carry; nothing is queued.
            ChangeTooLargeError: the encoded change is over
                ``max_entry_bytes``; nothing is queued (counted in
                ``too_large``).
            BusClosedError: the bus is closing or closed.
        """
        payload = encode_change(change)
        if len(payload) > self.max_entry_bytes:
            with self._cond:
                self.too_large += 1
            raise ChangeTooLargeError(
                change.kind,
                change.id,
                change.seq,
                len(payload),
                self.max_entry_bytes,
                f"over the bus's max_entry_bytes of {self.max_entry_bytes:,}",
            )
        outgoing = _Outgoing(
            0, self.stream_key(change.kind), payload, change.kind, change.id, change.seq
        )

        with self._cond:
            if self._closing:
                raise BusClosedError(
                    f"{change.kind}/{change.id} seq={change.seq}: the bus is "
                    "closed; nothing published"
                )
            if len(self._outbox) >= self.outbox_limit:
                self._drop_oldest()
            outgoing.number = next(self._numbers)
            self._outbox.append(outgoing)
            if self._outage is not None:
                self._outage.queued += 1
                self.queued += 1
            self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every change published so far is appended to Redis.

        Returns:
            ``True`` when the outbox emptied, ``False`` when ``timeout``
            seconds passed first (for example while Redis is down).
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._outbox and not self._in_flight, timeout
            )

    def close(self, timeout: float = 5.0) -> int:
        """Close the readers, publish what waits, stop the thread, disconnect.

        First closes every reader still open on this bus (their handlers may
        still publish), then refuses further publishes and gives the outbox up
        to ``timeout`` seconds to empty. Changes still waiting after that are
        not published: they are logged at ERROR and returned as a count. A
        second call returns 0.
        """
        with self._cond:
            if self._closed or self._closing:
                return 0
            readers = list(self._readers)
        for reader in readers:
            reader.close()
        with self._cond:
            self._closing = True
            self._cond.notify_all()

        flushed = self.flush(timeout)
        if self._recorded_map and flushed:
            self._forget_partition_map()
        with self._cond:
            self._abandon = True
            self._cond.notify_all()
        self._thread.join(self.socket_timeout * 2 + 1)
        with self._cond:
            left = list(self._outbox)
        if self._thread.is_alive():
            logger.warning(
                "redis bus %s: the publisher thread is still waiting for redis at "
                "%s; leaving it behind",
                self.instance_id,
                self.where,
            )
        else:
            self._client.close()
        self._closed = True

        if not flushed and left:
            logger.error(
                "redis bus %s closed with %d changes not published to %s "
                "(first %s/%s seq=%d, last %s/%s seq=%d); other instances will "
                "not see them",
                self.instance_id,
                len(left),
                self.where,
                left[0].kind,
                left[0].id,
                left[0].seq,
                left[-1].kind,
                left[-1].id,
                left[-1].seq,
            )
            return len(left)
        logger.debug("redis bus %s closed", self.instance_id)
        return 0

    def ping(self) -> bool:
        """Whether Redis answers now (one round trip, from the calling thread)."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def record_partition_map(self, partitions: PartitionMap) -> bool:
        """Record the partition map this instance runs with; refuse a conflict.

        Each instance records its map (partition count and instance list)
        under its instance id in the hash :attr:`partition_maps_key`, and
        :meth:`close` removes the record. A record of another instance with a
        different partition count is a conflict: most ids would have two
        owners. A different instance list with the same count is what a
        restart onto a new list looks like while the others still run the old
        one: logged at WARNING with how many partitions both instances claim.
        A record left by an instance that died stays until it starts again
        (or is removed by hand, as the error says).

        Returns:
            ``True`` when recorded and compared; ``False`` when Redis could
            not be reached (logged at WARNING; nothing compared).

        Raises:
            PartitionMapMismatchError: another instance recorded a different
                partition count; this instance's record is removed again.
        """
        key = self.partition_maps_key
        mine = {
            "partitions": partitions.partitions,
            "instances": sorted(partitions.instances),
            "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(key, self.instance_id, json.dumps(mine))
            pipe.hgetall(key)
            records: Any = pipe.execute()[1]
        except redis.RedisError as err:
            logger.warning(
                "redis bus %s: could not compare partition maps with the other "
                "instances (redis at %s: %s: %s); started without",
                self.instance_id,
                self.where,
                type(err).__name__,
                err,
            )
            return False
        self._recorded_map = True

        for raw_name, raw_record in records.items():
            name = _text(raw_name)
            if name == self.instance_id:
                continue
            try:
                theirs = json.loads(raw_record)
                count = int(theirs["partitions"])
                instances = [str(i) for i in theirs["instances"]]
                recorded_at = str(theirs.get("recorded_at", "?"))
            except (ValueError, TypeError, KeyError):
                logger.warning(
                    "redis bus %s: the partition map recorded by %r in %s cannot be "
                    "read; not compared",
                    self.instance_id,
                    name,
                    key,
                )
                continue
            if count != partitions.partitions:
                self._forget_partition_map()
                raise PartitionMapMismatchError(
                    self.instance_id,
                    partitions.partitions,
                    name,
                    count,
                    key,
                    recorded_at,
                )
            if instances != mine["instances"]:
                self._warn_other_instances(partitions, name, instances, recorded_at)
        return True

    def _warn_other_instances(
        self,
        partitions: PartitionMap,
        other: str,
        instances: list[str],
        recorded_at: str,
    ) -> None:
        try:
            theirs = PartitionMap(instances, partitions=partitions.partitions)
        except DefinitionError:
            return  # an instance list no PartitionMap accepts: nothing to say
        both = [
            p
            for p, (here, there) in partitions.moved(theirs).items()
            if here == self.instance_id and there == other
        ]
        logger.warning(
            "redis bus %s: instance %r runs with the instances %s (recorded at %s), "
            "this one with %s; until they agree both take writes for the ids of %d "
            "partitions (see PartitionMap.moved())",
            self.instance_id,
            other,
            ", ".join(instances),
            recorded_at,
            ", ".join(sorted(partitions.instances)),
            len(both),
        )

    def _forget_partition_map(self) -> None:
        try:
            self._client.hdel(self.partition_maps_key, self.instance_id)
        except redis.RedisError as err:
            logger.debug(
                "redis bus %s: its partition map record stays in %s (%s)",
                self.instance_id,
                self.partition_maps_key,
                err,
            )
        self._recorded_map = False

    def on_too_large(
        self, callback: Callable[[EntityChanged, ChangeTooLargeError], object]
    ) -> None:
        """Call ``callback(change, error)`` for each queued change the server refused.

        Covers the changes set aside by the publisher thread, which runs the
        callbacks (exceptions are logged); a change over ``max_entry_bytes``
        is refused by :meth:`publish` instead, to its caller.
        """
        with self._cond:
            self._too_large_callbacks.append(callback)

    def dead_letters(self, worker_group: str, limit: int = 1000) -> list[DeadLetter]:
        """Return the oldest ``limit`` dead letters of a worker group.

        Entries that hold no change (one a reader could not decode) are left
        out: a :class:`~runtime.DeadLetter` holds a change. The stream keeps
        their bytes and the reason; they count towards ``limit``.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        reply: Any = self._client.xrange(
            self.dead_letter_key(worker_group), count=limit
        )
        letters = []
        for entry_id, fields in reply:
            try:
                change = decode_change(fields.get(b"change", b""))
            except UndecodableEntryError:
                logger.debug(
                    "redis bus %s: dead letter %s of %s holds no change; left out",
                    self.instance_id,
                    _text(entry_id),
                    worker_group,
                )
                continue
            letters.append(
                DeadLetter(
                    worker_group=_text(fields[b"worker_group"]),
                    subscriber=_text(fields[b"subscriber"]),
                    change=change,
                    error=_text(fields[b"error"]),
                    attempts=int(fields[b"attempts"]),
                    failed_at=datetime.fromisoformat(_text(fields[b"failed_at"])),
                )
            )
        return letters

    def _register(self, reader: _Reader) -> None:
        with self._cond:
            if self._closing:
                raise BusClosedError(f"{reader!r}: the bus is closed; not started")
            self._readers.append(reader)

    def _unregister(self, reader: _Reader) -> None:
        with self._cond:
            if reader in self._readers:
                self._readers.remove(reader)

    def _drop_oldest(self) -> None:
        # NOTE: called with self._cond held. The in-flight batch cannot be
        # recalled; it is trimmed after a failed send (see _publish_loop).
        if not self._outbox:
            return
        dropped = self._outbox.popleft()
        self.dropped += 1
        drops = self._drops
        if drops is not None:
            drops.count += 1
            drops.last = dropped
            logger.debug(
                "redis bus %s: outbox full; dropped %s/%s seq=%d",
                self.instance_id,
                dropped.kind,
                dropped.id,
                dropped.seq,
            )
        else:
            self._drops = _Drops(1, dropped, dropped)
            logger.error(
                "redis bus %s: outbox full (%d changes waiting for %s); dropped the "
                "oldest, %s/%s seq=%d, which other instances will never see; "
                "further drops are counted and summarised when it drains",
                self.instance_id,
                self.outbox_limit,
                self.where,
                dropped.kind,
                dropped.id,
                dropped.seq,
            )

    def _publish_loop(self) -> None:
        delay = self.retry_backoff
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: bool(self._outbox) or self._closing or self._abandon
                )
                if self._abandon or not self._outbox:
                    return
                batch = self._take_batch()
                self._in_flight = len(batch)

            done, refused, error = self._send_batch(batch)
            for item in refused:
                self._set_aside(item)

            with self._cond:
                self._in_flight = 0
                self.published += done - len(refused)
                self.too_large += len(refused)
                if error is not None:
                    self._outbox.extendleft(reversed(batch[done:]))
                    while len(self._outbox) > self.outbox_limit:
                        self._drop_oldest()
                    self._unreachable(error)
                    self._cond.wait_for(lambda: self._abandon, delay)
                else:
                    if self._outage is not None:
                        self._reachable()
                    if not self._outbox and self._drops is not None:
                        self._report_drops()
                    self._cond.notify_all()

            if error is not None:
                delay = min(max(delay * 2, 0.01), self.max_retry_backoff)
            else:
                delay = self.retry_backoff

    def _take_batch(self) -> list[_Outgoing]:
        # NOTE: called with self._cond held and the outbox not empty.
        outbox = self._outbox
        first = outbox.popleft()
        batch = [first]
        size = len(first.payload)
        while outbox and len(batch) < self.batch_size:
            size += len(outbox[0].payload)
            if size > _BATCH_BYTES:
                break
            batch.append(outbox.popleft())
        return batch

    def _send_batch(
        self, batch: list[_Outgoing]
    ) -> tuple[int, list[_Outgoing], redis.RedisError | None]:
        # Returns how many changes of the batch are dealt with (published or
        # refused), the refused ones, and the error that stopped the rest.
        try:
            self._send(batch)
        except redis.RedisError as err:
            if not _may_be_too_large(err) or not any(
                len(item.payload) >= _SMALLEST_SERVER_LIMIT for item in batch
            ):
                return 0, [], err
            return self._send_apart(batch, err)
        return len(batch), [], None

    def _send_apart(
        self, batch: list[_Outgoing], error: redis.RedisError
    ) -> tuple[int, list[_Outgoing], redis.RedisError | None]:
        # The server cuts the connection on an argument over its limit, which
        # an outage does too: only a server that still answers tells them
        # apart. Each change is then sent alone (the client tries twice), so
        # one refused change takes no other with it.
        if not self.ping():
            return 0, [], error
        refused: list[_Outgoing] = []
        for done, item in enumerate(batch):
            try:
                self._send([item])
            except redis.RedisError as err:
                if (
                    len(item.payload) < _SMALLEST_SERVER_LIMIT
                    or not _may_be_too_large(err)
                    or not self.ping()
                ):
                    return done, refused, err
                refused.append(item)
        return len(batch), refused, None

    def _set_aside(self, item: _Outgoing) -> None:
        error = ChangeTooLargeError(
            item.kind,
            item.id,
            item.seq,
            len(item.payload),
            None,
            f"which redis at {self.where} refused (it dropped the connection "
            "while the entry was sent alone, twice, and then answered PING; "
            "is the entry over its proto-max-bulk-len?)",
        )
        logger.error(
            "redis bus %s set a change aside: %s; other instances will not see it",
            self.instance_id,
            error,
        )

        with self._cond:
            callbacks = list(self._too_large_callbacks)
        if not callbacks:
            return
        change = decode_change(item.payload)
        for callback in callbacks:
            try:
                callback(change, error)
            except Exception:
                logger.exception(
                    "redis bus %s: a too-large callback raised on %s/%s seq=%d",
                    self.instance_id,
                    item.kind,
                    item.id,
                    item.seq,
                )

    def _send(self, batch: list[_Outgoing]) -> None:
        keys = [self._marker, *(item.stream for item in batch)]
        args: list[Any] = [self.maxlen, self.instance_id, _MARKER_TTL_SECONDS]
        for item in batch:
            args += (item.number, item.payload)
        self._script(keys=keys, args=args, client=self._client)

        if logger.isEnabledFor(logging.DEBUG):
            for item in batch:
                logger.debug(
                    "published %s/%s seq=%d to %s",
                    item.kind,
                    item.id,
                    item.seq,
                    item.stream,
                )

    def _unreachable(self, err: redis.RedisError) -> None:
        # NOTE: called with self._cond held.
        if self._outage is not None:
            logger.debug(
                "redis bus %s: %s still unreachable (%s: %s); %d changes waiting",
                self.instance_id,
                self.where,
                type(err).__name__,
                err,
                len(self._outbox),
            )
            return

        waiting = len(self._outbox)
        self._outage = _Outage(since=time.monotonic(), queued=waiting)
        self.queued += waiting
        first = self._outbox[0]
        logger.warning(
            "redis bus %s: %s %s (%s: %s); keeping changes in a local "
            "outbox of up to %d, in order, until it takes them; first waiting: "
            "%s/%s seq=%d",
            self.instance_id,
            self.where,
            _failure(err),
            type(err).__name__,
            err,
            self.outbox_limit,
            first.kind,
            first.id,
            first.seq,
        )

    def _reachable(self) -> None:
        # NOTE: called with self._cond held.
        outage = self._outage
        assert outage is not None
        self._outage = None
        self.reconnects += 1
        logger.warning(
            "redis bus %s: %s reachable again after %.1f s; %d changes waited "
            "and are published in order; %d dropped from the full outbox so far",
            self.instance_id,
            self.where,
            time.monotonic() - outage.since,
            outage.queued,
            0 if self._drops is None else self._drops.count,
        )

    def _report_drops(self) -> None:
        # NOTE: called with self._cond held, once the outbox has drained.
        drops = self._drops
        assert drops is not None
        self._drops = None
        logger.error(
            "redis bus %s: outbox drained; %d changes were dropped while it was "
            "full (first %s/%s seq=%d, last %s/%s seq=%d); other instances never "
            "saw them",
            self.instance_id,
            drops.count,
            drops.first.kind,
            drops.first.id,
            drops.first.seq,
            drops.last.kind,
            drops.last.id,
            drops.last.seq,
        )


# -- readers ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """How a change reached a reader: what an idempotent handler needs.

    Attributes:
        kind: the kind (the stream) the entry came from.
        entry_id: the stream entry id, ``"<ms>-<n>"``; increases along the
            stream, so it orders the changes of a kind, and with one writer
            per id, the changes of an id (see :attr:`position`).
        origin: the instance that committed the change. ``(origin,
            change.seq)`` identifies a change within one run of that instance.
        attempt: 1 for the first delivery; for work queues, Redis's delivery
            count of the entry (retries and claims after a crash add one).
        reader: the broadcast reader's state key, or the work-queue consumer.
    """

    kind: str
    entry_id: str
    origin: str
    attempt: int
    reader: str

    @property
    def position(self) -> tuple[int, int]:
        """``entry_id`` as a sortable pair of ints."""
        return entry_position(self.entry_id)


class _Reader:
    """The thread, client and reconnect logic shared by the readers.

    Every entry goes through :func:`check_entry` before its handler: one that
    cannot be decoded, or holds a change the runtime would never have written
    to this kind's stream (``check_state`` adds the kind's schema), is not
    handed to the handler.
    """

    role = "reader"

    def __init__(
        self,
        bus: RedisBus,
        kind: str,
        label: str,
        batch_size: int,
        check_state: StateCheck | None,
        state_fields: Collection[str] | None = None,
    ) -> None:
        if not isinstance(kind, str) or not kind:
            raise DefinitionError(f"kind must be a non-empty string, got {kind!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DefinitionError(f"batch_size must be 1 or more, got {batch_size!r}")
        if check_state is not None and not callable(check_state):
            raise DefinitionError(
                f"{kind}: check_state must be callable, got {check_state!r}"
            )
        self.bus = bus
        self.kind = kind
        self._check_state = check_state
        self._state_fields = None if state_fields is None else tuple(state_fields)
        self.stream = bus.stream_key(kind)
        self.label = label
        self._batch_size = batch_size
        self.handled = 0
        self.failed = 0
        self.reconnects = 0
        self.gaps = 0
        self._client = bus.new_client()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prepared = False
        self._down_since: float | None = None
        self._next_gap_check = 0.0
        self._gap_reported: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind!r}, {self.label!r})"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """Whether the reader's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        """Start reading in a thread of its own; returns the reader.

        Tries once, in the calling thread, to set up its position (so entries
        published after ``start()`` returns are not missed); if Redis is
        unreachable the thread keeps trying.

        Raises:
            BusClosedError: the reader or its bus was closed.
        """
        if self._closed:
            raise BusClosedError(f"{self!r} was closed; create a new one")
        if self._thread is not None:
            return self
        self.bus._register(self)
        try:
            self._prepare()
            self._prepared = True
        except redis.RedisError as err:
            self._unreachable(err)

        self._thread = threading.Thread(
            target=self._run, name=f"redis-{self.role}:{self.kind}:{self.label}"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop reading and disconnect; safe to call twice.

        Waits for the handler call in progress, and for a blocking read (at
        most ``block_ms``), up to ``timeout`` seconds (default: ``block_ms``
        plus the socket timeout plus 5 s).
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        wait = (
            timeout
            if timeout is not None
            else self.bus.block_ms / 1000 + self.bus.socket_timeout + 5
        )
        if self._thread is not None:
            self._thread.join(wait)
            if self._thread.is_alive():
                logger.warning(
                    "%r: its handler is still running after %.1f s; leaving its "
                    "thread behind",
                    self,
                    wait,
                )
        self._client.close()
        self.bus._unregister(self)

    def _run(self) -> None:
        delay = self.bus.retry_backoff
        while not self._stop.is_set():
            try:
                if not self._prepared:
                    self._prepare()
                    self._prepared = True
                if time.monotonic() >= self._next_gap_check:
                    self._check_gap()
                    self._next_gap_check = time.monotonic() + _GAP_CHECK_SECONDS
                self._step()
            except redis.RedisError as err:
                if self._stop.is_set():
                    return
                self._on_error(err)
                self._unreachable(err)
                self._stop.wait(delay)
                delay = min(max(delay * 2, 0.01), self.bus.max_retry_backoff)
                continue
            except Exception:
                logger.exception("%r failed outside its handler; retrying", self)
                self._stop.wait(delay)
                delay = min(max(delay * 2, 0.01), self.bus.max_retry_backoff)
                continue

            if self._down_since is not None:
                self._reachable()
            delay = self.bus.retry_backoff

    def _prepare(self) -> None:
        """Set up the read position; runs until it succeeds once."""

    def _on_error(self, err: redis.RedisError) -> None:
        """React to a failed command before the back-off."""

    def _step(self) -> None:
        """Read and handle one batch (or wait up to block_ms for one)."""
        raise NotImplementedError

    def _position(self) -> str | None:
        """The id of the last entry this reader (or its group) read."""
        return None

    def _check_gap(self) -> None:
        # Trimming removes the oldest entries, so a position older than the
        # stream's first entry was itself trimmed: at least ``maxlen`` entries
        # came after it, and unless none of them was trimmed, some were lost.
        # Redis keeps no count that would tell exactly.
        position = self._position()
        if position is None or position in ("0-0", self._gap_reported):
            return
        try:
            info = self._client.xinfo_stream(self.stream)
        except redis.ResponseError:
            return  # no stream yet
        first = info.get("recorded-first-entry-id")
        if first is None or not int(info.get("length", 0)):
            return
        first_id = _text(first)
        if entry_position(first_id) > entry_position(position):
            self.gaps += 1
            self._gap_reported = position
            logger.warning(
                "%r: the stream %s no longer holds this reader's position %s "
                "(first entry now %s): it was trimmed, or redis lost its data, "
                "and entries after it were probably dropped unread (raise maxlen "
                "or keep the reader running)",
                self,
                self.stream,
                position,
                first_id,
            )

    def _unreachable(self, err: redis.RedisError) -> None:
        if self._down_since is not None:
            logger.debug("%r: redis still unreachable (%s)", self, err)
            return
        self._down_since = time.monotonic()
        logger.warning(
            "%r: redis at %s %s (%s: %s); retrying with back-off up to %.1f s",
            self,
            self.bus.where,
            _failure(err),
            type(err).__name__,
            err,
            self.bus.max_retry_backoff,
        )

    def _reachable(self) -> None:
        assert self._down_since is not None
        seconds = time.monotonic() - self._down_since
        self._down_since = None
        self.reconnects += 1
        self._next_gap_check = 0.0
        logger.warning(
            "%r: redis at %s reachable again after %.1f s; reading on",
            self,
            self.bus.where,
            seconds,
        )

    def _decode(self, entry_id: str, fields: Fields) -> EntityChanged:
        payload = fields.get(b"change")
        if payload is None:
            raise UndecodableEntryError(f"entry {entry_id} has no 'change' field")
        return check_entry(payload, self.kind, self._check_state, self._state_fields)


class BroadcastReader(_Reader):
    """Hands every change of a kind's stream to a handler, resuming after restarts.

    ``handler(change, delivery)`` runs in the reader's own thread
    (``redis-broadcast:<kind>:<state_key>``), one entry at a time, in stream
    order, so the changes of each id arrive in commit order. After the
    handlers of a read batch returned, the id of its last entry is stored
    under ``state_key`` in the hash ``<prefix>:offsets``; a reader started
    later with the same ``state_key`` (after a restart, on any instance)
    resumes right after it: no gap, no replay of an entry whose id was stored.
    A batch holds what had arrived, up to ``batch_size`` entries (one when the
    reader keeps up); the entries of a batch handled but not yet stored when
    the process died are delivered again (at least once).

    A handler that raises is logged at ERROR with the traceback and counted in
    ``failed``; the entry counts as processed and is not retried, as with a
    local ``broadcast()`` subscriber. An entry that cannot be decoded or is
    refused by :func:`check_entry` is logged at ERROR, counted in ``failed``
    and skipped.

    Counters: ``handled``, ``failed``, ``skipped`` (own changes, see
    ``include_own``), ``reconnects``, ``gaps``.

    Args:
        bus: the bus whose server and prefix to use.
        kind: the kind whose stream to read.
        consumer_name: a name for the handler, for messages and the default
            ``state_key``.
        handler: called as ``handler(change, delivery)``.
        state_key: where the position is stored; default
            ``"<instance_id>:<consumer_name>"``. Two readers must not share
            one.
        start: where a reader with no stored position begins: ``"latest"``
            (after the stream's last entry when it starts) or ``"earliest"``
            (the oldest entry still in the stream).
        include_own: ``False`` skips the changes this bus's instance
            published (the runtime already delivered them locally); they still
            advance the position.
        batch_size: the most entries read, handled and stored per round trip.
        check_state: checks each ``prev`` and ``next`` as ``check_state(state,
            kind, id)``, returning the state to deliver or raising (a
            ``ValueError`` such as ``SchemaError``; anything it raises refuses
            the entry); the runtime passes the kind's schema check of recorded
            states. ``None`` checks no schema.
        state_fields: the fields every state of the kind holds; a change with
            masked secrets (see :func:`check_entry`) must hold exactly these.
    """

    role = "broadcast"

    def __init__(
        self,
        bus: RedisBus,
        kind: str,
        consumer_name: str,
        handler: ChangeHandler,
        *,
        state_key: str | None = None,
        start: Start = "latest",
        include_own: bool = True,
        batch_size: int = 100,
        check_state: StateCheck | None = None,
        state_fields: Collection[str] | None = None,
    ) -> None:
        if not callable(handler):
            raise DefinitionError(f"{kind}: handler must be callable, got {handler!r}")
        if start not in ("latest", "earliest"):
            raise DefinitionError(
                f"start must be 'latest' or 'earliest', got {start!r}"
            )
        key = (
            state_key if state_key is not None else f"{bus.instance_id}:{consumer_name}"
        )
        super().__init__(bus, kind, key, batch_size, check_state, state_fields)
        self.consumer_name = consumer_name
        self.state_key = key
        self.skipped = 0
        self._handler = handler
        self._start_at = start
        self._include_own = include_own
        self._field = f"{kind}:{key}"
        self._offset: str | None = None
        self._stored: str | None = None

    @property
    def offset(self) -> str | None:
        """The id of the last entry processed (or the starting point)."""
        return self._offset

    def _position(self) -> str | None:
        return self._offset

    def _prepare(self) -> None:
        if self._offset is not None:
            return
        stored: Any = self._client.hget(self.bus.offsets_key, self._field)
        if stored is not None:
            self._offset = self._stored = _text(stored)
            logger.info("%r resumes after entry %s", self, self._offset)
            return

        offset = "0-0"
        if self._start_at == "latest":
            last: Any = self._client.xrevrange(self.stream, count=1)
            if last:
                offset = _text(last[0][0])
        self._client.hset(self.bus.offsets_key, self._field, offset)
        self._offset = self._stored = offset
        logger.info("%r starts after entry %s", self, offset)

    def _step(self) -> None:
        assert self._offset is not None
        if self._stored != self._offset:
            self._store()
        reply = self._client.xread(
            {self.stream: self._offset},
            count=self._batch_size,
            block=self.bus.block_ms,
        )

        for entry_id, fields in _read_entries(reply):
            if self._stop.is_set():
                break
            self._deliver(entry_id, fields)
            self._offset = entry_id
        if self._stored != self._offset:
            self._store()

    def _store(self) -> None:
        offset = self._offset
        assert offset is not None
        self._client.hset(self.bus.offsets_key, self._field, offset)
        self._stored = offset

    def _deliver(self, entry_id: str, fields: Fields) -> None:
        origin = _text(fields.get(b"origin", b"?"))
        if not self._include_own and origin == self.bus.instance_id:
            self.skipped += 1
            return
        try:
            change = self._decode(entry_id, fields)
        except UndecodableEntryError as err:
            self.failed += 1
            logger.error("%r: skipped entry %s of %s: %s", self, entry_id, origin, err)
            return

        delivery = Delivery(self.kind, entry_id, origin, 1, self.state_key)
        try:
            self._handler(change, delivery)
        except Exception:
            self.failed += 1
            logger.exception(
                "%r: handler raised on %s/%s seq=%d (entry %s from %s); not retried",
                self,
                change.kind,
                change.id,
                change.seq,
                entry_id,
                origin,
            )
            return
        self.handled += 1


class WorkQueueReader(_Reader):
    """Shares a kind's changes among the instances of a worker group.

    The group is a Redis consumer group named ``worker_group`` on the kind's
    stream (created if missing, with the stream); this reader is its consumer
    ``consumer`` (default: the bus's ``instance_id``). Each entry is delivered
    to one consumer of the group and acknowledged (``XACK``) after
    ``handler(change, delivery)`` returned, once per read batch (up to
    ``batch_size`` entries). Runs in its own thread
    (``redis-work_queue:<kind>:<worker_group>``), one entry at a time.

    - A handler that raises is retried by this reader after ``backoff``
      (as for ``work_queue()``: seconds doubled per retry up to
      ``max_backoff``, or a function of the failed attempt); each retry claims
      the entry again, which adds one to its delivery count in Redis, so
      ``delivery.attempt`` is that count and survives a crash.
    - An entry left unacknowledged longer than ``claim_idle_ms`` (its
      consumer crashed or hangs) is claimed (``XAUTOCLAIM``) by another
      consumer, checked every ``claim_idle_ms / 2``. On start a consumer
      first takes back the entries it was given before a restart.
    - When attempt ``max_attempts`` fails, or an entry arrives with a delivery
      count above it (its consumers kept crashing), or it cannot be decoded,
      or :func:`check_entry` refuses it, the entry is appended to
      ``<prefix>:dead:<worker_group>`` and acknowledged in one transaction,
      logged at ERROR and counted in ``dead_lettered``. Each such entry that
      holds a change is passed to ``on_dead_letter`` (a refused one with
      ``attempts`` 0); one that cannot be decoded holds none, so it is only
      in the stream, with its bytes and the reason.

    Delivery is at least once: a consumer that crashes between its handlers'
    return and the acknowledgement of their batch, or a handler slower than
    ``claim_idle_ms``, makes the entry run twice. A late acknowledgement of
    an entry another consumer already acknowledged is counted in
    ``duplicates``. Changes of one id may reach different consumers, so they
    are ordered within one consumer only; ``delivery.entry_id`` orders them.

    Counters: ``handled``, ``failed`` (handler calls that raised), ``claimed``,
    ``duplicates``, ``dead_lettered``, ``reconnects``, ``gaps``.

    Args:
        bus: the bus whose server and prefix to use.
        kind: the kind whose stream to read.
        worker_group: the consumer group; instances sharing it share the work.
        handler: called as ``handler(change, delivery)``.
        max_attempts: handler calls (deliveries) before dead-lettering.
        backoff: seconds before the first retry, or a function of the failed
            attempt number returning the pause.
        max_backoff: the longest pause between two attempts.
        consumer: this reader's consumer name (default: ``bus.instance_id``);
            a restarted instance must reuse it to take back its entries.
        start: where a new group begins: ``"latest"`` (entries added after
            it is created) or ``"earliest"`` (every entry in the stream).
        name: the handler's name, recorded in dead letters.
        on_dead_letter: called (in the reader's thread) with each
            :class:`~runtime.DeadLetter`; exceptions are logged.
        batch_size: entries taken per read; entries taken wait in this
            reader, their idle time running, so keep it small.
        check_state: checks each ``prev`` and ``next``; see
            :class:`BroadcastReader`.
        state_fields: see :class:`BroadcastReader`.
    """

    role = "work_queue"

    def __init__(
        self,
        bus: RedisBus,
        kind: str,
        worker_group: str,
        handler: ChangeHandler,
        *,
        max_attempts: int = 5,
        backoff: float | Backoff = 0.1,
        max_backoff: float = 30.0,
        consumer: str | None = None,
        start: Start = "latest",
        name: str | None = None,
        on_dead_letter: Callable[[DeadLetter], object] | None = None,
        batch_size: int = 10,
        check_state: StateCheck | None = None,
        state_fields: Collection[str] | None = None,
    ) -> None:
        if not callable(handler):
            raise DefinitionError(f"{kind}: handler must be callable, got {handler!r}")
        if start not in ("latest", "earliest"):
            raise DefinitionError(
                f"start must be 'latest' or 'earliest', got {start!r}"
            )
        spec = work_queue(worker_group, max_attempts, backoff, max_backoff)
        super().__init__(bus, kind, worker_group, batch_size, check_state, state_fields)
        self.worker_group = worker_group
        self.consumer = consumer if consumer is not None else bus.instance_id
        self.name: str = name or str(getattr(handler, "__qualname__", handler))
        self.max_attempts = max_attempts
        self.claimed = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self._spec = spec
        self._handler = handler
        self._on_dead_letter = on_dead_letter
        self._start_at = start
        self._claim_every = max(bus.claim_idle_ms / 2000, 0.01)
        self._next_claim = 0.0
        self._history: str | None = "0-0"
        self._unacked: list[str] = []
        self._lost_group = False

    def __repr__(self) -> str:
        return (
            f"WorkQueueReader({self.kind!r}, {self.worker_group!r}, "
            f"consumer={self.consumer!r})"
        )

    def _position(self) -> str | None:
        try:
            groups: Any = self._client.xinfo_groups(self.stream)
        except redis.ResponseError:
            return None  # no stream (yet): nothing to check
        for group in groups:
            if _text(group["name"]) == self.worker_group:
                return _text(group["last-delivered-id"])
        return None

    def _reachable(self) -> None:
        super()._reachable()
        # Entries given to this consumer whose reply was lost in the outage
        # are in its pending list: take them back now rather than after
        # claim_idle_ms.
        self._history = "0-0"

    def _prepare(self) -> None:
        # After the group vanished, the stream holds only entries published
        # since, so the group is re-created at the stream's start.
        start = "$" if self._start_at == "latest" and not self._lost_group else "0"
        try:
            self._client.xgroup_create(
                self.stream, self.worker_group, id=start, mkstream=True
            )
            logger.info("%r created the group at %s", self, start)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._lost_group = False

    def _on_error(self, err: redis.RedisError) -> None:
        if isinstance(err, redis.ResponseError) and "NOGROUP" in str(err):
            logger.warning(
                "%r: the group or its stream is gone (redis restarted without its "
                "data?); re-creating it from the stream's start",
                self,
            )
            self._lost_group = True
            self._prepared = False
            self._history = None
            self._unacked.clear()

    def _step(self) -> None:
        # Acknowledge what was handled before an outage, then take back what
        # this consumer was given before (a restart, a lost reply), then claim
        # what crashed consumers left, then read new entries.
        self._ack_handled()

        if self._history is not None:
            self._read_history()
            return

        if time.monotonic() >= self._next_claim:
            self._claim()
            self._next_claim = time.monotonic() + self._claim_every

        block = min(self.bus.block_ms, max(1, int(self._claim_every * 1000)))
        reply = self._client.xreadgroup(
            self.worker_group,
            self.consumer,
            {self.stream: ">"},
            count=self._batch_size,
            block=block,
        )
        for entry_id, fields in _read_entries(reply):
            if self._stop.is_set():
                break  # the rest stays pending: taken back on restart or claimed
            self._handle(entry_id, fields, 1)
        self._ack_handled()

    def _read_history(self) -> None:
        assert self._history is not None
        reply = self._client.xreadgroup(
            self.worker_group,
            self.consumer,
            {self.stream: self._history},
            count=self._batch_size,
        )
        entries = _read_entries(reply)
        if not entries:
            self._history = None
            return

        counts = self._delivery_counts([entry_id for entry_id, _ in entries])
        for entry_id, fields in entries:
            if self._stop.is_set():
                break
            self._history = entry_id
            self._handle(entry_id, fields, counts.get(entry_id, 1), taken_back=True)
        self._ack_handled()

    def _claim(self) -> None:
        cursor = "0-0"
        while not self._stop.is_set():
            reply: Any = self._client.xautoclaim(
                self.stream,
                self.worker_group,
                self.consumer,
                min_idle_time=self.bus.claim_idle_ms,
                start_id=cursor,
                count=self._batch_size,
            )
            cursor = _text(reply[0])
            entries = [(_text(raw_id), fields or {}) for raw_id, fields in reply[1]]
            deleted = reply[2] if len(reply) > 2 else []
            for raw_id in deleted:
                self.gaps += 1
                logger.warning(
                    "%r: entry %s was trimmed from %s before any consumer "
                    "acknowledged it; it is lost",
                    self,
                    _text(raw_id),
                    self.stream,
                )

            if entries:
                ids = [entry_id for entry_id, _ in entries]
                counts = self._delivery_counts(ids)
                self.claimed += len(ids)
                logger.warning(
                    "%r claimed %d entries idle for over %d ms (first %s)",
                    self,
                    len(ids),
                    self.bus.claim_idle_ms,
                    ids[0],
                )
                for entry_id, fields in entries:
                    if self._stop.is_set():
                        break
                    self._handle(entry_id, fields, counts.get(entry_id, 1))
                self._ack_handled()
            if cursor == "0-0":
                return

    def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        pipe = self._client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(
                self.stream,
                self.worker_group,
                min=entry_id,
                max=entry_id,
                count=1,
                consumername=self.consumer,
            )
        counts = {}
        replies: list[Any] = pipe.execute()
        for rows in replies:
            for row in rows:
                counts[_text(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _handle(
        self,
        entry_id: str,
        fields: Fields,
        attempt: int,
        *,
        taken_back: bool = False,
    ) -> None:
        origin = _text(fields.get(b"origin", b"?"))
        if not fields:
            # A pending entry trimmed from the stream comes back without fields.
            self.gaps += 1
            logger.warning(
                "%r: entry %s was trimmed from %s before it was handled; it is lost",
                self,
                entry_id,
                self.stream,
            )
            self._unacked.append(entry_id)
            return
        try:
            change = self._decode(entry_id, fields)
        except InvalidEntryError as err:
            error = f"refused: {err.reason}"
            self._dead_letter(err.change, entry_id, fields, origin, 0, error)
            return
        except UndecodableEntryError as err:
            self._dead_letter_raw(entry_id, fields, origin, attempt, str(err))
            return
        if attempt > self.max_attempts:
            self._dead_letter(
                change,
                entry_id,
                fields,
                origin,
                attempt - 1,
                f"delivered {attempt} times without being acknowledged "
                f"(max_attempts={self.max_attempts})",
            )
            return
        if taken_back:
            logger.info(
                "%r took back %s/%s seq=%d (entry %s, attempt %d) given to it "
                "before a restart",
                self,
                change.kind,
                change.id,
                change.seq,
                entry_id,
                attempt,
            )

        delivered_at = time.monotonic()
        while True:
            delivery = Delivery(self.kind, entry_id, origin, attempt, self.consumer)
            try:
                self._handler(change, delivery)
            except Exception as err:
                self.failed += 1
                error = f"{type(err).__name__}: {err}"
                if attempt >= self.max_attempts:
                    self._dead_letter(
                        change, entry_id, fields, origin, attempt, error, err
                    )
                    return
                pause = self._spec.delay(attempt)
                logger.warning(
                    "%r: attempt %d of %d failed on %s/%s seq=%d (entry %s): %s; "
                    "retrying in %.2f s",
                    self,
                    attempt,
                    self.max_attempts,
                    change.kind,
                    change.id,
                    change.seq,
                    entry_id,
                    error,
                    pause,
                )
                if self._stop.wait(pause):
                    return  # left pending: taken back on restart or claimed
                if not self._take_again(entry_id, delivered_at):
                    return
                delivered_at = time.monotonic()
                attempt += 1
                continue
            break

        self.handled += 1
        self._unacked.append(entry_id)

    def _take_again(self, entry_id: str, delivered_at: float) -> bool:
        # Claiming adds one to the delivery count. The idle floor makes the
        # claim fail if another consumer took the entry in the meantime.
        idle_ms = int((time.monotonic() - delivered_at) * 1000 * 0.8)
        taken = self._client.xclaim(
            self.stream,
            self.worker_group,
            self.consumer,
            min_idle_time=idle_ms,
            message_ids=[entry_id],
        )
        if taken:
            return True
        logger.warning(
            "%r: entry %s was taken over or acknowledged by another consumer "
            "during the retry pause; leaving it to them",
            self,
            entry_id,
        )
        return False

    def _ack_handled(self) -> None:
        # One XACK for the entries handled since the last one. An entry that
        # another consumer claimed and acknowledged meanwhile is not counted
        # by Redis: it ran twice.
        if not self._unacked:
            return
        ids = list(self._unacked)
        acked = int(self._client.xack(self.stream, self.worker_group, *ids))
        self._unacked.clear()
        late = len(ids) - acked
        if late:
            self.duplicates += late
            logger.warning(
                "%r: %d of the entries %s had already been acknowledged by another "
                "consumer (claimed after %d ms idle); they were handled more than "
                "once",
                self,
                late,
                ", ".join(ids),
                self.bus.claim_idle_ms,
            )

    def _dead_letter(
        self,
        change: EntityChanged,
        entry_id: str,
        fields: Fields,
        origin: str,
        attempts: int,
        error: str,
        exc: BaseException | None = None,
    ) -> None:
        failed_at = datetime.now(UTC)
        self._write_dead_letter(entry_id, fields, origin, attempts, error, failed_at)
        logger.error(
            "%r: dead letter %s/%s seq=%d (entry %s from %s) after %d attempts: %s",
            self,
            change.kind,
            change.id,
            change.seq,
            entry_id,
            origin,
            attempts,
            error,
            exc_info=exc,
        )

        if self._on_dead_letter is not None:
            letter = DeadLetter(
                self.worker_group, self.name, change, error, attempts, failed_at
            )
            try:
                self._on_dead_letter(letter)
            except Exception:
                logger.exception("%r: on_dead_letter raised for %s", self, entry_id)

    def _dead_letter_raw(
        self,
        entry_id: str,
        fields: Fields,
        origin: str,
        attempts: int,
        error: str,
    ) -> None:
        self._write_dead_letter(
            entry_id, fields, origin, attempts, error, datetime.now(UTC)
        )
        logger.error(
            "%r: dead letter entry %s from %s, which cannot be decoded: %s",
            self,
            entry_id,
            origin,
            error,
        )

    def _write_dead_letter(
        self,
        entry_id: str,
        fields: Fields,
        origin: str,
        attempts: int,
        error: str,
        failed_at: datetime,
    ) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.xadd(
            self.bus.dead_letter_key(self.worker_group),
            {
                "change": fields.get(b"change", b""),
                "origin": origin,
                "kind": self.kind,
                "entry_id": entry_id,
                "worker_group": self.worker_group,
                "subscriber": self.name,
                "consumer": self.consumer,
                "error": error,
                "attempts": attempts,
                "failed_at": failed_at.isoformat(),
            },
            maxlen=self.bus.maxlen,
            approximate=True,
        )
        pipe.xack(self.stream, self.worker_group, entry_id)
        pipe.execute()
        self.dead_lettered += 1


def _read_entries(reply: Any) -> list[tuple[str, Fields]]:
    # Flattens an XREAD / XREADGROUP reply (one stream) into (id, fields).
    return [
        (_text(raw_id), fields or {})
        for _stream, entries in reply or ()
        for raw_id, fields in entries
    ]


def _may_be_too_large(err: redis.RedisError) -> bool:
    # What a client sees when Redis refuses an argument over its limit: the
    # reply to the command, or the connection closed under the write.
    if isinstance(err, redis.ConnectionError | redis.TimeoutError):
        return True
    return isinstance(err, redis.ResponseError) and "Protocol error" in str(err)


def _failure(err: redis.RedisError) -> str:
    if isinstance(err, redis.ConnectionError | redis.TimeoutError):
        return "unreachable"
    return "refused a command"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _describe(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}/{kwargs.get('db', 0)}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
