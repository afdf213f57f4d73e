"""On-disk formats of a data directory: lock, snapshots and journal.

This module knows nothing about kinds, entities or the transition log. The
runtime hands it plain, JSON-compatible dicts (a snapshot payload, one journal
record per change) and gets the same dicts back.

A data directory holds:

- ``LOCK``: an ``flock``-ed file holding the owner's pid (:class:`DataDirLock`).
- ``snapshot-<seq, 20 digits>.snap``: complete, atomically written snapshots
  (:func:`write_snapshot`). Layout, big-endian::

      b"ERSNAP" | u16 version | u64 seq | u64 body length | u32 crc32 | body

  The crc32 covers the seq and length fields and the body, so a flipped bit in
  the header is caught too. ``body`` is the payload encoded as MessagePack.
- ``journal-<first seq, 20 digits>.log``: append-only record files
  (:class:`JournalWriter`). Layout::

      b"ERJRNL" | u16 version | frame | frame | ...
      frame = u32 body length | u32 crc32(length field + body) | body

- ``.snapshot-*.tmp``: a snapshot being written, or left by a crash while it
  was written. Never read; removed by :func:`prune_snapshots`.

Why MessagePack (via msgspec) and not JSON: it is several times faster to
encode and decode and smaller on disk, and it round-trips every supported value
bytes-exactly (floats are stored as IEEE doubles, not as decimal text, and
strings are length-prefixed UTF-8, so no escaping). Decoding it never runs code,
unlike pickle. Values are limited to the JSON-compatible set anyway (``dict``
with ``str`` keys, ``list``, ``str``, ``int``, ``float``, ``bool``, ``None``),
so the data stays convertible to JSON for inspection; NaN and the infinities
round-trip although JSON itself has no spelling for them.

Why crc32 and not sha256: the checksum guards against torn writes, bit rot and
truncation, not against an attacker (anyone who can write the data directory
can write a matching sha256 too). zlib's crc32 runs at several GB/s, detects
every burst error of up to 32 bits and misses random damage with probability
2**-32, which is ample for that job.

Logging contract: a torn journal tail that is dropped, a corrupt snapshot that
is skipped and a file cut back after a failed write are logged at WARNING; a
failure of the background fsync thread, which no caller sees directly, at
ERROR with the traceback. Every message names the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import msgspec

from runtime._errors import EntityRuntimeError
from runtime._schema import MAX_DEPTH, _shown

logger = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]
FsyncMode = Literal["always", "interval", "never"]
OnCorrupt = Literal["raise", "stop"]

SNAPSHOT_VERSION = 1
"""The newest snapshot format version this code writes and reads."""

JOURNAL_VERSION = 1
"""The newest journal format version this code writes and reads."""

LOCK_NAME = "LOCK"
"""Name of the lock file inside a data directory."""

_SNAPSHOT_MAGIC = b"ERSNAP"
_JOURNAL_MAGIC = b"ERJRNL"
_SNAPSHOT_HEADER = struct.Struct(">6sHQQI")
_JOURNAL_HEADER = struct.Struct(">6sH")
_FRAME_HEADER = struct.Struct(">II")
_LENGTH = struct.Struct(">I")
_SEQ_LENGTH = struct.Struct(">QQ")

_SNAPSHOT_RE = re.compile(r"^snapshot-(\d{20})\.snap$")
_JOURNAL_RE = re.compile(r"^journal-(\d{20})\.log$")
_SNAPSHOT_TMP_PREFIX = ".snapshot-"
_TMP_SUFFIX = ".tmp"

_MIN_INT = -(2**63)
_MAX_INT = 2**64 - 1
_MAX_SEQ = 2**64 - 1
_MAX_RECORD = 2**32 - 1
_FSYNC_MODES = ("always", "interval", "never")


class DataDirError(EntityRuntimeError, OSError):
    """The data directory or one of its files could not be created, written or read.

    ``path`` names the file or directory, ``reason`` says what failed, and
    ``errno`` is the operating system's error number when there was one (for
    example ``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, path: StrPath, reason: str, error: OSError | None = None):
        self.path = Path(path)
        self.reason = reason
        self.message = f"{self.path}: {reason}"
        super().__init__(self.message)
        self.errno = error.errno if error is not None else None
        self.strerror = error.strerror if error is not None else None
        self.filename = str(self.path)

    def __str__(self) -> str:
        return self.message


class DataDirLockedError(EntityRuntimeError, RuntimeError):
    """Another runtime (in this or another process) holds the data directory."""

    def __init__(self, path: StrPath, pid: int | None) -> None:
        self.path = Path(path)
        self.pid = pid
        if pid is None:
            owner = "another runtime (pid unknown)"
        elif pid == os.getpid():
            owner = f"this process (pid {pid}), through another lock object or runtime"
        else:
            owner = f"another runtime (pid {pid})"
        super().__init__(
            f"data directory {self.path} is locked by {owner}; only one runtime "
            "may use a data directory at a time: stop the other one or choose "
            "another directory"
        )


class CorruptFileError(EntityRuntimeError, ValueError):
    """A snapshot or journal file failed a check; ``path``, ``offset``, ``reason``.

    ``offset`` is the byte offset of the damaged part, or ``None`` when the
    damage concerns the whole file.
    """

    def __init__(self, path: StrPath, reason: str, offset: int | None = None):
        self.path = Path(path)
        self.reason = reason
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"corrupt file {self.path}{where}: {reason}")


class FormatVersionError(EntityRuntimeError, ValueError):
    """A file was written in a newer format than this code can read."""

    def __init__(self, path: StrPath, version: int, supported: int) -> None:
        self.path = Path(path)
        self.version = version
        self.supported = supported
        super().__init__(
            f"{self.path} has format version {version}, but this entity-runtime "
            f"reads versions up to {supported}; upgrade entity-runtime to read "
            "it (the file was left untouched)"
        )


class UnencodableValueError(EntityRuntimeError, ValueError):
    """A value to be written is not JSON-compatible or does not fit the format.

    ``where`` locates the value (e.g. ``record['after']['n']``); nothing was
    written.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}; nothing written")


class JournalClosedError(EntityRuntimeError, ValueError):
    """A closed :class:`JournalWriter` was used."""


# --- encoding ---------------------------------------------------------------


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_shown(value, 60)}"


def _where(root: str, steps: tuple[Any, ...] | None) -> str:
    keys: list[Any] = []
    while steps is not None:
        steps, key = steps
        keys.append(key)
    return root + "".join(f"[{key!r}]" for key in reversed(keys))


_LEFT = object()
"""Marks, on the located walk's stack, where the walk leaves a container."""


def _json_problem(value: Any) -> tuple[tuple[Any, ...] | None, str] | None:
    """Return (location, reason) of the first non-JSON-compatible part, or None.

    A container met again inside itself (a cycle) is such a part: the walk
    keeps the ids of the containers it is inside, so it ends on any value.
    """
    stack: list[tuple[Any, Any]] = [(value, None)]
    inside: set[int] = set()

    while stack:
        item, steps = stack.pop()
        if item is _LEFT:
            inside.discard(steps)
            continue
        kind = type(item)
        if kind is str or kind is float or kind is bool or item is None:
            continue
        if kind is int:
            if not _MIN_INT <= item <= _MAX_INT:
                return steps, (
                    f"int {item} does not fit in 64 bits (the format holds "
                    "-2**63 to 2**64-1); store it as a string instead"
                )
            continue
        if isinstance(item, dict | list):
            if id(item) in inside:
                return steps, (
                    f"is a {kind.__name__} that holds itself (a cycle), which "
                    "no encoding can represent"
                )
            inside.add(id(item))
            # Below the children: popped once the walk has left the container.
            stack.append((_LEFT, id(item)))
        if isinstance(item, dict):
            for key, child in item.items():
                if type(key) is not str:
                    return steps, f"has a key {_describe(key)}; keys must be str"
                stack.append((child, (steps, key)))
            continue
        if isinstance(item, list):
            stack.extend((child, (steps, index)) for index, child in enumerate(item))
            continue
        return steps, (
            f"{_describe(item)} is not JSON-compatible (use dict, list, str, "
            "int, float, bool or None)"
        )

    return None


_JSON_ATOMS = frozenset((str, float, bool, type(None)))
"""The scalar types that need no test beyond their type (ints need a range)."""

_DECODED_ATOMS = _JSON_ATOMS | {int}


def _json_clean(value: Any, *, ints_fit: bool = False) -> bool:
    """Whether ``value`` is JSON-compatible: :func:`_json_problem` finds nothing.

    The same check without locations, for the common case where every part
    passes: only containers go on the stack and scalars are tested where they
    sit, which makes it several times faster than the located walk. Callers
    walk again with :func:`_json_problem` to name the part that failed.

    ``ints_fit`` is for values just decoded from MessagePack: their ints always
    lie in ``-2**63 .. 2**64-1`` and they are trees (a decoder builds no
    cycles), so this walk tests neither. Other values go to
    :func:`_json_clean_any`, which also ends on a value that holds itself.
    """
    if not ints_fit:
        return _json_clean_any(value)

    atoms = _DECODED_ATOMS
    if type(value) in atoms:
        return True

    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        # Lists first: rows of changes make most of the containers.
        if type(item) is list or isinstance(item, list):
            for child in item:
                if type(child) not in atoms:
                    push(child)
        elif isinstance(item, dict):
            for key, child in item.items():
                if type(key) is not str:
                    return False
                if type(child) not in atoms:
                    push(child)
        else:
            return False

    return True


def _json_clean_any(value: Any) -> bool:
    """:func:`_json_clean` for values from anywhere, which may hold cycles.

    The stack keeps one iterator per container the walk is inside, so it
    never holds more than the value's depth, and its length is that depth.
    Past ``MAX_DEPTH`` levels (deeper than a state may nest, or a cycle) the
    located walk, which ends on cycles, decides instead.
    """
    atoms = _JSON_ATOMS
    stack: list[Iterator[Any]] = []
    push, pop = stack.append, stack.pop
    top: Iterator[Any] = iter((value,))
    while True:
        for child in top:
            kind = type(child)
            if kind in atoms:
                continue
            if kind is int:
                if _MIN_INT <= child <= _MAX_INT:
                    continue
                return False
            if kind is list or isinstance(child, list):
                push(top)
                top = iter(child)
                break
            if isinstance(child, dict):
                for key in child:
                    if type(key) is not str:
                        return False
                push(top)
                top = iter(child.values())
                break
            return False
        else:
            # The container is done: back to its parent, or to the end.
            if not stack:
                return True
            top = pop()
            continue

        if len(stack) > MAX_DEPTH:
            return _json_problem(value) is None


def encode_value(value: Any, *, what: str = "value") -> bytes:
    """Encode a JSON-compatible value as MessagePack.

    ``ReadOnlyDict`` and ``ReadOnlyList`` (and other ``dict``/``list``
    subclasses) are encoded as plain maps and arrays. The whole value is checked
    first, so nothing partial is ever produced.

    Args:
        value: ``dict`` with ``str`` keys, ``list``, ``str``, ``int``, ``float``,
            ``bool`` or ``None``, nested freely (up to the depth Python's
            recursion limit allows the encoder), but not holding itself.
        what: how error messages refer to the value, e.g. ``"record"``.

    Returns:
        The encoded bytes.

    Raises:
        UnencodableValueError: a part is not JSON-compatible (tuples, sets,
            bytes, datetimes, non-``str`` keys, ...) or is an int outside
            ``-2**63 .. 2**64-1``, which MessagePack cannot hold, or is a
            container holding itself (a cycle); the message names the part.
            Also when the value nests too deeply for the encoder.
    """
    if not _json_clean(value):
        steps, reason = _json_problem(value) or (None, "is not JSON-compatible")
        raise UnencodableValueError(_where(what, steps), reason)

    try:
        return msgspec.msgpack.encode(value)
    except RecursionError:
        raise UnencodableValueError(
            what, "nests too deeply to encode (deeper than Python's recursion limit)"
        ) from None


def _close_file(fd: int, path: Path, quietly: bool = False) -> None:
    """Close a journal file's descriptor; a failure is a DataDirError naming it.

    ``quietly`` when the close follows a failure already on its way out (a
    failed fsync): a failing close is then left unreported, as the earlier
    error is the one that says what happened.
    """
    try:
        os.close(fd)
    except OSError as err:
        if quietly:
            return
        # Some file systems (NFS, FUSE) report a failed write-back only here.
        raise DataDirError(
            path,
            f"closing the file failed ({err.strerror or err}); records since the "
            "last successful fsync may not be on disk",
            err,
        ) from err


def _refuse_ext(code: int, data: memoryview) -> Any:
    raise ValueError(f"MessagePack extension type {code} is not allowed")


def decode_value(data: bytes | memoryview) -> Any:
    """Decode MessagePack written by :func:`encode_value`; maps and arrays as dict/list.

    Decoding never runs code. Anything outside the JSON-compatible set
    (binary, extension types, timestamps, non-``str`` keys) is refused.

    Raises:
        ValueError: the bytes are not a single valid, JSON-compatible
            MessagePack value; the message says why.
    """
    try:
        value = msgspec.msgpack.decode(data, ext_hook=_refuse_ext)
    except RecursionError:
        raise ValueError("MessagePack value is nested too deeply") from None

    if not _json_clean(value, ints_fit=True):
        steps, reason = _json_problem(value) or (None, "is not JSON-compatible")
        raise ValueError(f"{_where('value', steps)}: {reason}")

    return value


def _check_seq(seq: int, what: str = "seq") -> None:
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        raise ValueError(f"{what} must be an int from 0 to 2**64-1, got {seq!r}")


# --- file helpers -----------------------------------------------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _oserror_text(err: OSError) -> str:
    return err.strerror or str(err)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataDirError(path, f"could not read ({_oserror_text(err)})", err) from err


def _ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataDirError(
            directory,
            f"could not create the data directory ({_oserror_text(err)})",
            err,
        ) from err

    if not directory.is_dir():
        raise DataDirError(directory, "exists but is not a directory")


# --- lock -------------------------------------------------------------------


class DataDirLock:
    """Exclusive ownership of a data directory, held through ``<dir>/LOCK``.

    Two runtimes writing the same snapshots and journal would corrupt each
    other, so a runtime takes this lock before touching the directory. The lock
    is an ``flock`` on an open file descriptor: the kernel drops it when the
    descriptor is closed, including when the process dies from ``kill -9``, so a
    crash never leaves the directory locked. The file itself is never removed
    (removing it would let two processes lock two different files); it holds the
    owner's pid, shown when someone else tries to take the lock.

    The lock conflicts between processes and between two ``DataDirLock`` objects
    in one process. Methods are not thread-safe; use one object per owner.

    .. note:: ``flock`` is advisory and is not reliable on some network
       filesystems (NFS); keep data directories on a local filesystem. A process
       that forks without exec passes the lock to its child.

    Example:
        >>> with DataDirLock(path) as lock:  # doctest: +SKIP
        ...     ...
    """

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)
        """The data directory."""

        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without blocking, creating the directory if needed.

        Raises:
            DataDirLockedError: another owner holds it; the message names the
                directory and that owner's pid when it is known.
            DataDirError: the directory cannot be created, is not a directory or
                is not writable (the runtime must create files in it).
        """
        if self._fd is not None:
            raise DataDirLockedError(self.path, os.getpid())

        _ensure_dir(self.path)
        lock_path = self.path / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise DataDirError(
                self.path,
                f"data directory is not writable; could not open {LOCK_NAME} "
                f"({_oserror_text(err)})",
                err,
            ) from err

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._read_pid(fd)
            os.close(fd)
            raise DataDirLockedError(self.path, pid) from None
        except OSError as err:
            os.close(fd)
            raise DataDirError(
                lock_path, f"could not lock ({_oserror_text(err)})", err
            ) from err

        try:
            os.ftruncate(fd, 0)
            _write_all(fd, f"{os.getpid()}\n".encode())
            self._probe_writable()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

        logger.debug("locked data directory %s", self.path)

    def release(self) -> None:
        """Give the lock up; does nothing if it is not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return

        # NOTE: clear the pid while still holding the lock, so nobody reads
        # a stale pid; the file stays (see the class docstring).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

        logger.debug("unlocked data directory %s", self.path)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"DataDirLock({str(self.path)!r}, {state})"

    @staticmethod
    def _read_pid(fd: int) -> int | None:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _probe_writable(self) -> None:
        # LOCK may already exist and be writable in a directory that is not.
        try:
            fd, name = tempfile.mkstemp(
                prefix=".probe-", suffix=_TMP_SUFFIX, dir=self.path
            )
        except OSError as err:
            raise DataDirError(
                self.path,
                "data directory is not writable; the runtime needs to create "
                f"snapshot and journal files in it ({_oserror_text(err)})",
                err,
            ) from err
        os.close(fd)
        os.unlink(name)


# --- snapshots --------------------------------------------------------------


def snapshot_name(seq: int) -> str:
    """Return the file name of the snapshot taken at ``seq``."""
    return f"snapshot-{seq:020d}.snap"


def write_snapshot(
    directory: StrPath, seq: int, payload: Mapping[str, Any], *, trusted: bool = False
) -> Path:
    """Write a complete snapshot of ``payload`` taken at ``seq``, atomically.

    The bytes go to a temporary file in the same directory, which is fsynced,
    renamed over the final name with ``os.replace`` and made durable by
    fsyncing the directory. A crash at any point leaves either no new snapshot
    or the complete one, never a partial file under a snapshot name. Writing the
    same ``seq`` twice replaces the earlier file atomically. Snapshots are
    always fsynced, whatever the journal's fsync mode.

    Args:
        directory: the data directory (must exist).
        seq: the sequence number the payload reflects (0 to 2**64-1).
        payload: a dict of JSON-compatible values; see :func:`encode_value`.
        trusted: skip the JSON-compatibility check, for payloads built only
            from values that were already validated (the runtime's own).

    Returns:
        The path of the new snapshot.

    Raises:
        UnencodableValueError: ``payload`` is not a dict or holds a value the
            format cannot store; nothing was written.
        DataDirError: writing failed (e.g. ``ENOSPC`` on a full disk); the
            temporary file was removed and existing snapshots are untouched.
    """
    directory = Path(directory)
    _check_seq(seq)
    if not isinstance(payload, dict):
        raise UnencodableValueError(
            "payload", f"must be a dict, got {_describe(payload)}"
        )

    body = (
        msgspec.msgpack.encode(payload)
        if trusted
        else encode_value(payload, what="payload")
    )
    crc = zlib.crc32(body, zlib.crc32(_SEQ_LENGTH.pack(seq, len(body))))
    header = _SNAPSHOT_HEADER.pack(
        _SNAPSHOT_MAGIC, SNAPSHOT_VERSION, seq, len(body), crc
    )
    final = directory / snapshot_name(seq)

    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=_SNAPSHOT_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=directory
        )
    except OSError as err:
        raise DataDirError(
            final, f"could not create the snapshot ({_oserror_text(err)})", err
        ) from err

    try:
        try:
            _write_all(fd, header)
            _write_all(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, final)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise DataDirError(
            final,
            f"could not write the snapshot ({_oserror_text(err)}); no snapshot "
            "was written and earlier snapshots are untouched",
            err,
        ) from err

    try:
        _fsync_dir(directory)
    except OSError as err:
        raise DataDirError(
            directory,
            f"wrote {final.name} but could not fsync the directory "
            f"({_oserror_text(err)}); the snapshot may not survive a power loss",
            err,
        ) from err

    logger.debug("wrote snapshot %s (%d bytes)", final, len(header) + len(body))
    return final


def _check_snapshot(path: Path, data: bytes) -> tuple[int, memoryview]:
    """Verify a snapshot's header and checksum; return (seq, body)."""
    size = len(data)
    header_size = _SNAPSHOT_HEADER.size
    if size < header_size:
        if _SNAPSHOT_MAGIC.startswith(data[:6]):
            raise CorruptFileError(
                path,
                f"truncated: {size} bytes, shorter than the {header_size}-byte header",
            )
        raise CorruptFileError(path, "not a snapshot file (bad magic bytes)", 0)

    magic, version, seq, length, stored_crc = _SNAPSHOT_HEADER.unpack_from(data)
    if magic != _SNAPSHOT_MAGIC:
        raise CorruptFileError(
            path,
            f"not a snapshot file (magic {magic!r}, expected {_SNAPSHOT_MAGIC!r})",
            0,
        )
    if version > SNAPSHOT_VERSION:
        raise FormatVersionError(path, version, SNAPSHOT_VERSION)
    if version < 1:
        raise CorruptFileError(path, f"unknown format version {version}", 6)

    if length != size - header_size:
        raise CorruptFileError(
            path,
            f"length mismatch: the header announces {length} body bytes but the "
            f"file holds {size - header_size} (truncated or overwritten)",
        )
    body = memoryview(data)[header_size:]
    crc = zlib.crc32(body, zlib.crc32(_SEQ_LENGTH.pack(seq, length)))
    if crc != stored_crc:
        raise CorruptFileError(
            path, f"checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x})"
        )

    match = _SNAPSHOT_RE.match(path.name)
    if match is not None and int(match.group(1)) != seq:
        raise CorruptFileError(
            path,
            f"the header says seq {seq} but the file name says {int(match.group(1))}",
        )

    return seq, body


def read_snapshot(path: StrPath) -> tuple[int, dict[str, Any]]:
    """Read and fully verify one snapshot file.

    Checks, in order: magic bytes, format version, body length, crc32, that
    the seq matches the file name (when it has the standard name) and that the
    body decodes to a dict of JSON-compatible values. Loading never runs code.

    Returns:
        ``(seq, payload)`` with ``payload`` made of plain dicts and lists.

    Raises:
        CorruptFileError: any check failed; the message names the file and what
            was wrong.
        FormatVersionError: the file was written by a newer format version.
        DataDirError: the file could not be read.
    """
    path = Path(path)
    data = _read_file(path)

    seq, body = _check_snapshot(path, data)
    try:
        payload = decode_value(body)
    except ValueError as err:
        raise CorruptFileError(path, f"body does not decode: {err}") from None
    if not isinstance(payload, dict):
        raise CorruptFileError(path, f"body is a {type(payload).__name__}, not a dict")

    return seq, payload


def list_snapshots(directory: StrPath) -> list[Path]:
    """Return the snapshot files in ``directory``, newest (highest seq) first.

    Only standard names count: temporary files and anything else are ignored.
    Files are not opened, so a listed snapshot may still be corrupt. A missing
    directory has no snapshots.
    """
    return _numbered_files(Path(directory), _SNAPSHOT_RE, newest_first=True)


@dataclass(frozen=True)
class LoadedSnapshot:
    """The newest valid snapshot of a directory; see :func:`load_newest_snapshot`."""

    seq: int
    """The sequence number the snapshot reflects."""

    payload: dict[str, Any]
    """The decoded payload (plain dicts and lists)."""

    path: Path
    """The file it was read from."""

    skipped: tuple[CorruptFileError, ...] = ()
    """Newer snapshot files that were corrupt and passed over, newest first."""


def load_newest_snapshot(directory: StrPath) -> LoadedSnapshot | None:
    """Load the newest snapshot that passes every check, skipping corrupt ones.

    Each skipped file is logged at WARNING and reported in ``skipped``; files
    are never deleted here. When a newer snapshot was skipped, the caller must
    make sure the journal still covers the gap from the returned ``seq``.

    Returns:
        The loaded snapshot, or ``None`` if there is no valid one (or no
        directory).

    Raises:
        FormatVersionError: the newest readable candidate has a newer format;
            falling back to an older snapshot would silently drop newer data.
        DataDirError: a file could not be read.
    """
    skipped: list[CorruptFileError] = []

    for path in list_snapshots(directory):
        try:
            seq, payload = read_snapshot(path)
        except CorruptFileError as err:
            logger.warning("skipping corrupt snapshot %s: %s", path, err.reason)
            skipped.append(err)
            continue
        return LoadedSnapshot(seq, payload, path, tuple(skipped))

    return None


def prune_snapshots(directory: StrPath, keep: int = 2) -> list[Path]:
    """Delete old snapshots, keeping the ``keep`` newest valid ones.

    Candidates are checked newest first (header and crc32, without decoding).
    Everything older than the ``keep``-th valid snapshot is deleted, whether
    valid or not; corrupt or newer-version files newer than that are left for
    inspection and logged at WARNING. The newest valid snapshot is therefore
    never deleted. Leftover ``.snapshot-*.tmp`` files from interrupted writes
    are deleted too.

    .. note:: Do not run this concurrently with :func:`write_snapshot` on the
       same directory: it would delete the other call's temporary file.

    Args:
        directory: the data directory.
        keep: how many valid snapshots to keep, at least 1.

    Returns:
        The deleted paths.

    Raises:
        ValueError: ``keep`` is less than 1.
        DataDirError: a file could not be read or deleted.
    """
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be an int of at least 1, got {keep!r}")
    directory = Path(directory)
    doomed: list[Path] = []
    valid = 0

    for path in list_snapshots(directory):
        if valid >= keep:
            doomed.append(path)
            continue
        try:
            _check_snapshot(path, _read_file(path))
        except (CorruptFileError, FormatVersionError) as err:
            logger.warning(
                "keeping unreadable snapshot %s for inspection: %s", path, err
            )
            continue
        valid += 1

    with contextlib.suppress(FileNotFoundError):
        doomed.extend(
            directory / name
            for name in os.listdir(directory)
            if name.startswith(_SNAPSHOT_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)
        )

    for path in doomed:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise DataDirError(
                path, f"could not delete ({_oserror_text(err)})", err
            ) from err
    if doomed:
        with contextlib.suppress(OSError):
            _fsync_dir(directory)
        logger.debug("pruned %d files from %s", len(doomed), directory)

    return doomed


# --- journal: reading -------------------------------------------------------


def journal_name(first_seq: int) -> str:
    """Return the file name of the journal whose first record has ``first_seq``."""
    return f"journal-{first_seq:020d}.log"


def list_journals(directory: StrPath) -> list[Path]:
    """Return the journal files in ``directory`` in replay order (oldest first).

    A missing directory has no journals.
    """
    return _numbered_files(Path(directory), _JOURNAL_RE, newest_first=False)


def file_seq(path: Path) -> int:
    """The seq in a snapshot's or journal's standard file name.

    A snapshot's is the last seq it holds, a journal's the first it may hold.
    """
    found = _SNAPSHOT_RE.match(path.name) or _JOURNAL_RE.match(path.name)
    if found is None:
        raise ValueError(f"{path.name} is not a snapshot or journal file name")
    return int(found.group(1))


def _numbered_files(
    directory: Path, pattern: re.Pattern[str], newest_first: bool
) -> list[Path]:
    """The files of ``directory`` whose whole name ``pattern`` matches, by number.

    The number is the pattern's first group. A missing directory has none.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise DataDirError(
            directory, f"could not list ({_oserror_text(err)})", err
        ) from err

    found = [(int(m.group(1)), m.group(0)) for m in map(pattern.match, names) if m]
    found.sort(reverse=newest_first)
    return [directory / name for _, name in found]


def _first_seq(path: Path) -> int:
    match = _JOURNAL_RE.match(path.name)
    assert match is not None
    return int(match.group(1))


@dataclass(frozen=True)
class TornTail:
    """An incomplete record at the end of the newest journal file, dropped on read.

    It is what a crash in the middle of an append leaves behind; such a record
    was never acknowledged with ``fsync="always"``.
    """

    path: Path
    """The journal file."""

    offset: int
    """Byte offset where the incomplete record starts."""

    dropped: int
    """How many bytes were dropped (from ``offset`` to the end of the file)."""

    reason: str
    """What was incomplete."""


@dataclass
class _FileScan:
    records: list[dict[str, Any]]
    valid_end: int
    torn: TornTail | None = None
    corrupt: CorruptFileError | None = None


def _scan_journal(path: Path, data: bytes, *, last: bool) -> _FileScan:
    """Parse one journal file, stopping at the first damage.

    Incomplete data at the end of the ``last`` file is a torn tail; anything
    else that fails a check is corruption.
    """
    size = len(data)
    scan = _FileScan([], 0)

    def damage(offset: int, reason: str, *, may_be_torn: bool) -> _FileScan:
        if last and (may_be_torn or not any(data[offset:])):
            if not may_be_torn:
                reason = (
                    "zero bytes where a record should be (preallocated, never written)"
                )
            scan.torn = TornTail(path, offset, size - offset, reason)
        else:
            scan.corrupt = CorruptFileError(path, reason, offset)
        return scan

    if size == 0:
        return scan
    header_size = _JOURNAL_HEADER.size
    if size < header_size:
        prefix_ok = _JOURNAL_MAGIC.startswith(data[:6])
        return damage(
            0, f"incomplete file header ({size} bytes)", may_be_torn=prefix_ok
        )
    magic, version = _JOURNAL_HEADER.unpack_from(data)
    if magic != _JOURNAL_MAGIC:
        return damage(
            0,
            f"not a journal file (magic {magic!r}, expected {_JOURNAL_MAGIC!r})",
            may_be_torn=False,
        )
    if version > JOURNAL_VERSION:
        raise FormatVersionError(path, version, JOURNAL_VERSION)
    if version < 1:
        return damage(6, f"unknown format version {version}", may_be_torn=False)

    offset = scan.valid_end = header_size
    view = memoryview(data)
    while offset < size:
        remaining = size - offset
        if remaining < _FRAME_HEADER.size:
            return damage(
                offset,
                f"incomplete record header ({remaining} bytes)",
                may_be_torn=True,
            )
        length, stored_crc = _FRAME_HEADER.unpack_from(data, offset)
        if length == 0:
            return damage(offset, "record of length 0", may_be_torn=False)
        end = offset + _FRAME_HEADER.size + length
        if end > size:
            return damage(
                offset,
                f"incomplete record (announces {length} bytes, "
                f"{remaining - _FRAME_HEADER.size} present)",
                may_be_torn=True,
            )
        body = view[offset + _FRAME_HEADER.size : end]
        crc = zlib.crc32(body, zlib.crc32(view[offset : offset + _LENGTH.size]))
        if crc != stored_crc:
            return damage(
                offset,
                f"record checksum mismatch (stored {stored_crc:#010x}, "
                f"computed {crc:#010x})",
                may_be_torn=False,
            )
        try:
            record = decode_value(body)
        except ValueError as err:
            return damage(offset, f"record does not decode: {err}", may_be_torn=False)
        if not isinstance(record, dict):
            return damage(
                offset,
                f"record is a {type(record).__name__}, not a dict",
                may_be_torn=False,
            )
        scan.records.append(record)
        offset = scan.valid_end = end

    return scan


def _warn_torn(torn: TornTail) -> None:
    logger.warning(
        "journal %s: dropping an incomplete last record at byte %d (%d bytes: %s); "
        "it was never completely written",
        torn.path,
        torn.offset,
        torn.dropped,
        torn.reason,
    )


@dataclass
class JournalReplay:
    """What :func:`read_journal` found: the records and any damage.

    Iterating yields the records in journal order.
    """

    records: list[dict[str, Any]]
    """Every valid record, in order (the valid prefix when reading stopped)."""

    files: list[Path]
    """The journal files that were read, in order."""

    torn_tail: TornTail | None = None
    """The incomplete last record that was dropped, if any."""

    corruption: CorruptFileError | None = None
    """Where reading stopped (only with ``on_corrupt="stop"``), else ``None``."""

    unread_files: list[Path] = field(default_factory=list)
    """Later journal files not read because reading stopped at ``corruption``."""

    @property
    def complete(self) -> bool:
        """Whether every journal file was read to its end (a torn tail aside)."""
        return self.corruption is None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def read_journal(
    directory: StrPath,
    *,
    on_corrupt: OnCorrupt = "raise",
    after_seq: int | None = None,
) -> JournalReplay:
    """Read every journal file in ``directory``, in order, verifying each record.

    With ``after_seq``, files whose records all have a seq at or below it (the
    next file starts at or below ``after_seq + 1``) are not read at all, so
    damage in a file that a snapshot already covers cannot hide later files.

    - An incomplete record (or file header) at the end of the newest file, as a
      crash mid-append leaves it, is dropped and logged at WARNING with the file
      and byte offset; every record before it is returned.
    - Anything else that fails a check (bad magic, checksum mismatch, a record
      that does not decode, an incomplete record in an older file) is
      corruption. With ``on_corrupt="raise"`` it raises; with ``"stop"`` the
      records before it are returned, ``corruption`` says where and why, later
      files are listed in ``unread_files`` and a WARNING is logged. Records
      after the damage are never returned, so a replay has no gaps.
    - Empty files, a missing directory and a directory without journals give
      no records.

    Each file is read whole into memory; memory is proportional to the
    journal's size since the last snapshot.

    Raises:
        CorruptFileError: with ``on_corrupt="raise"``, naming file and offset.
        FormatVersionError: a file has a newer format version (whatever
            ``on_corrupt`` says: the rest cannot be interpreted).
        DataDirError: a file could not be read.
        ValueError: ``on_corrupt`` is not ``"raise"`` or ``"stop"``.
    """
    if on_corrupt not in ("raise", "stop"):
        raise ValueError(f"on_corrupt must be 'raise' or 'stop', got {on_corrupt!r}")
    paths = list_journals(directory)
    if after_seq is not None:
        paths = [
            path
            for index, path in enumerate(paths)
            if index + 1 == len(paths) or _first_seq(paths[index + 1]) > after_seq + 1
        ]
    replay = JournalReplay([], [])

    for index, path in enumerate(paths):
        scan = _scan_journal(path, _read_file(path), last=index == len(paths) - 1)
        replay.files.append(path)
        replay.records.extend(scan.records)
        if scan.torn is not None:
            _warn_torn(scan.torn)
            replay.torn_tail = scan.torn
        if scan.corrupt is not None:
            if on_corrupt == "raise":
                raise scan.corrupt
            replay.corruption = scan.corrupt
            replay.unread_files = paths[index + 1 :]
            logger.warning(
                "journal %s: stopped reading: %s; kept %d records before it, "
                "%d later files not read",
                path,
                scan.corrupt,
                len(replay.records),
                len(replay.unread_files),
            )
            break

    return replay


# --- journal: writing -------------------------------------------------------


class JournalWriter:
    """Appends records to the journal files of a data directory.

    Each record is one frame (length, crc32, MessagePack body) written with a
    single ``write`` call sequence; records are appended in call order. The
    ``fsync`` mode sets what an acknowledged :meth:`append` guarantees:

    - ``"always"``: the record is written and fsynced before ``append``
      returns, so it survives ``kill -9`` and power loss.
    - ``"interval"``: the record is handed to the operating system before
      ``append`` returns (it survives ``kill -9``) and a background thread
      fsyncs at most ``interval`` seconds later (plus the fsync's own time), so
      a power loss loses at most that window. Handing each record over at once,
      rather than buffering it in the process, costs one ``write`` call but
      makes this mode never weaker than ``"never"``.
    - ``"never"``: written to the operating system, never fsynced by
      ``append``; survives ``kill -9`` but not power loss.

    :meth:`flush` and :meth:`close` fsync in every mode.

    If a write fails (e.g. the disk is full), the file is cut back to its last
    whole record and :class:`DataDirError` is raised: the record was not
    recorded and the writer stays usable. If cutting back or an fsync fails,
    the writer refuses every further call except :meth:`close`, since it can no
    longer vouch for the file; a new writer repairs it.

    Opening: with ``first_seq=None`` the newest existing journal file is
    continued (or ``journal-000…0.log`` created); with a ``first_seq`` that
    file is continued or created. Before appending to an existing file, or
    when starting a newer one, an incomplete last record left by a crash is cut
    off (logged at WARNING), so only the newest file can ever end torn.

    All methods are thread-safe. ``append`` never waits for the background
    fsync.
    """

    def __init__(
        self,
        directory: StrPath,
        *,
        first_seq: int | None = None,
        fsync: FsyncMode = "always",
        interval: float = 0.05,
    ) -> None:
        """Open or create the journal file to append to.

        Args:
            directory: the data directory (created if missing).
            first_seq: the seq of the first record of the file to write, or
                ``None`` to continue the newest file.
            fsync: ``"always"``, ``"interval"`` or ``"never"``; see the class.
            interval: the longest delay, in seconds, before a background fsync
                with ``fsync="interval"``.

        Raises:
            ValueError: a bad ``fsync``, ``interval`` or ``first_seq``, or a
                ``first_seq`` lower than the newest existing journal's.
            CorruptFileError: the file to continue is corrupt before its end;
                pass a newer ``first_seq`` to start a fresh file.
            FormatVersionError: the file to continue has a newer format.
            DataDirError: the directory or file could not be created or written.
        """
        if fsync not in _FSYNC_MODES:
            raise ValueError(f"fsync must be one of {_FSYNC_MODES}, got {fsync!r}")
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise ValueError(f"interval must be a number of seconds, got {interval!r}")
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        if first_seq is not None:
            _check_seq(first_seq, "first_seq")

        self.directory = Path(directory)
        """The data directory."""

        self.fsync: FsyncMode = fsync
        """The durability mode."""

        self.interval = float(interval)
        """Background fsync delay with ``fsync="interval"``."""

        # NOTE: lock order is _sync_lock, then _lock. append takes only _lock,
        # so it never waits for a background fsync.
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._fd: int | None = None
        self._path = self.directory / journal_name(first_seq or 0)
        self._size = 0
        self._dirty = False
        self._closed = False
        self._failed: DataDirError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        _ensure_dir(self.directory)
        self._open_initial(first_seq)

        if fsync == "interval":
            self._thread = threading.Thread(
                target=self._sync_loop,
                name=f"journal-fsync:{self.directory}",
                daemon=True,
            )
            self._thread.start()

    @property
    def path(self) -> Path:
        """The journal file currently appended to."""
        return self._path

    @property
    def first_seq(self) -> int:
        """The ``first_seq`` of the current file."""
        return _first_seq(self._path)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def failed(self) -> DataDirError | None:
        """The write or fsync failure that stopped the writer, if any."""
        return self._failed

    def append(
        self, record: Mapping[str, Any], *, trusted: bool = False, sync: bool = True
    ) -> None:
        """Append one record; see the class docstring for what returning means.

        Args:
            record: a dict of JSON-compatible values (see :func:`encode_value`).
            trusted: skip the JSON-compatibility check, for records built only
                from values that were already validated (the runtime's own);
                tuples are then written as arrays.
            sync: with ``fsync="always"``, fsync before returning. Pass False
                to append several records and make them durable together with
                one :meth:`sync` (group commit); the records are then not
                durable until ``sync`` returns.

        Raises:
            UnencodableValueError: the record cannot be stored; nothing written.
            DataDirError: the write (or, with ``"always"``, the fsync) failed;
                the message says whether the file could be repaired.
            JournalClosedError: the writer was closed.
        """
        if not isinstance(record, dict):
            raise UnencodableValueError(
                "record", f"must be a dict, got {_describe(record)}"
            )
        body = (
            msgspec.msgpack.encode(record)
            if trusted
            else encode_value(record, what="record")
        )
        if len(body) > _MAX_RECORD:
            raise UnencodableValueError(
                "record", f"encodes to {len(body)} bytes; 2**32-1 max"
            )
        length = _LENGTH.pack(len(body))
        crc = zlib.crc32(body, zlib.crc32(length))
        frame = b"".join((length, _LENGTH.pack(crc), body))

        with self._lock:
            self._check_usable()
            self._write_frame(frame)
            if self.fsync == "always" and sync:
                self._fsync_locked()
            else:
                self._dirty = True

    def flush(self) -> None:
        """Fsync everything appended so far, whatever the mode.

        Raises:
            DataDirError: the fsync failed; the writer refuses further appends.
            JournalClosedError: the writer was closed.
        """
        with self._sync_lock, self._lock:
            self._check_usable()
            self._fsync_locked()

    def sync(self) -> None:
        """Make every record appended so far durable, without blocking appends.

        The fsync runs outside the append lock, so other threads keep
        appending meanwhile; a record appended before this call is on disk
        when it returns, whichever thread's fsync covered it. Does nothing
        with ``fsync="never"``.

        Raises:
            DataDirError: the fsync failed; the writer refuses further appends.
            JournalClosedError: the writer was closed.
        """
        if self.fsync == "never":
            return
        with self._lock:
            self._check_usable()
        self._background_sync()

    def rotate(self, first_seq: int) -> Path:
        """Finish the current file and append to a new one from now on.

        Call it right after taking a snapshot at seq ``S`` with
        ``first_seq=S + 1``, before any record with a higher seq is appended,
        then :meth:`remove_journals_before` to drop the files the snapshot
        covers. The old file is fsynced and closed (unless ``fsync="never"``);
        the new file is created, with its header, before the old one is closed,
        so a failure leaves the writer on the old file. Rotating to the current
        file's ``first_seq`` does nothing.

        Returns:
            The new file's path.

        Raises:
            ValueError: ``first_seq`` is lower than the current file's.
            DataDirError: the new file could not be created, or the old one
                could not be fsynced.
            JournalClosedError: the writer was closed.
        """
        _check_seq(first_seq, "first_seq")

        with self._sync_lock, self._lock:
            self._check_usable()
            current = self.first_seq
            if first_seq == current:
                return self._path
            if first_seq < current:
                raise ValueError(
                    f"journal files must start at increasing seqs: the current file "
                    f"{self._path.name} starts at {current}, asked for {first_seq}"
                )
            new_path = self.directory / journal_name(first_seq)
            new_fd, new_size = self._open_file(new_path)
            old_fd = self._fd

            old_path = self._path
            failed = True
            try:
                if self.fsync != "never" and old_fd is not None:
                    self._fsync_locked()
                failed = False
            finally:
                # The new file is in use before the old one is closed, so a
                # failing close leaves the writer usable.
                self._fd, self._path, self._size = new_fd, new_path, new_size
                self._dirty = False
                if old_fd is not None:
                    _close_file(old_fd, old_path, quietly=failed)

        logger.debug("journal rotated to %s", new_path)
        return new_path

    def remove_journals_before(self, seq: int) -> list[Path]:
        """Delete the journal files whose records all have a seq below ``seq``.

        A file's records run from its own ``first_seq`` to the next file's
        ``first_seq`` minus one, so a file is deleted when the next file starts
        at or below ``seq``. The newest file and the current file are never
        deleted. After a snapshot at ``S`` and ``rotate(S + 1)``, pass
        ``S + 1``.

        Returns:
            The deleted paths.

        Raises:
            DataDirError: a file could not be deleted.
        """
        _check_seq(seq)

        with self._lock:
            paths = list_journals(self.directory)
            doomed = [
                path
                for path, following in itertools.pairwise(paths)
                if _first_seq(following) <= seq and path != self._path
            ]
            for path in doomed:
                try:
                    path.unlink(missing_ok=True)
                except OSError as err:
                    raise DataDirError(
                        path, f"could not delete ({_oserror_text(err)})", err
                    ) from err
            if doomed and self.fsync != "never":
                with contextlib.suppress(OSError):
                    _fsync_dir(self.directory)

        logger.debug("removed %d journal files before seq %d", len(doomed), seq)
        return doomed

    def close(self) -> None:
        """Stop the background thread, fsync and close the file; idempotent.

        Raises:
            DataDirError: the final fsync failed (the file is closed anyway).
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

        with self._sync_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is None:
                return
            failed = True
            try:
                if self._failed is None:
                    self._fsync_fd(fd)
                failed = False
            finally:
                _close_file(fd, self._path, quietly=failed)

        logger.debug("journal %s closed", self._path)

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "failed" if self._failed else "open"
        return f"JournalWriter({str(self._path)!r}, fsync={self.fsync!r}, {state})"

    # -- internals -----------------------------------------------------------

    def _open_initial(self, first_seq: int | None) -> None:
        existing = list_journals(self.directory)
        newest = existing[-1] if existing else None

        if first_seq is None:
            target = newest or self.directory / journal_name(0)
        else:
            target = self.directory / journal_name(first_seq)
            if newest is not None and _first_seq(newest) > first_seq:
                raise ValueError(
                    f"first_seq {first_seq} is lower than the newest journal file "
                    f"{newest}; journal files must start at increasing seqs"
                )
            if newest is not None and newest != target:
                self._repair_tail(newest)

        self._fd, self._size = self._open_file(target)
        self._path = target

    def _repair_tail(self, path: Path) -> None:
        """Cut an incomplete last record off ``path``; leave corruption alone."""
        scan = _scan_journal(path, _read_file(path), last=True)
        if scan.torn is None:
            return

        _warn_torn(scan.torn)
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, scan.valid_end)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise DataDirError(
                path,
                f"could not cut off the incomplete record ({_oserror_text(err)})",
                err,
            ) from err

    def _open_file(self, path: Path) -> tuple[int, int]:
        """Open ``path`` for appending, creating it or repairing its tail."""
        if path.exists():
            scan = _scan_journal(path, _read_file(path), last=True)
            if scan.corrupt is not None:
                raise scan.corrupt
            if scan.torn is not None:
                self._repair_tail(path)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            except OSError as err:
                raise DataDirError(
                    path, f"could not open for appending ({_oserror_text(err)})", err
                ) from err
            if scan.valid_end > 0:
                return fd, scan.valid_end
            # An empty file, or one cut back to nothing: it needs a header.
            return fd, self._write_header(fd, path, created=False)

        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600
            )
        except OSError as err:
            raise DataDirError(
                path, f"could not create the journal file ({_oserror_text(err)})", err
            ) from err
        return fd, self._write_header(fd, path, created=True)

    def _write_header(self, fd: int, path: Path, *, created: bool) -> int:
        header = _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, JOURNAL_VERSION)
        try:
            os.ftruncate(fd, 0)
            _write_all(fd, header)
            if self.fsync != "never":
                os.fsync(fd)
                if created:
                    _fsync_dir(path.parent)
        except OSError as err:
            _close_file(fd, path, quietly=True)
            if created:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise DataDirError(
                path, f"could not write the journal header ({_oserror_text(err)})", err
            ) from err
        return len(header)

    def _check_usable(self) -> None:
        if self._closed:
            raise JournalClosedError(f"journal writer for {self._path} is closed")
        if self._failed is not None:
            raise DataDirError(
                self._path,
                f"refusing to append after an earlier failure ({self._failed.reason}); "
                "close this writer and open a new one",
            ) from self._failed

    def _write_frame(self, frame: bytes) -> None:
        assert self._fd is not None
        start = self._size

        try:
            _write_all(self._fd, frame)
        except OSError as err:
            self._undo_partial_write(start, err)
        self._size = start + len(frame)

    def _undo_partial_write(self, start: int, err: OSError) -> NoReturn:
        assert self._fd is not None
        what = f"could not append a record at byte {start} ({_oserror_text(err)})"

        try:
            os.ftruncate(self._fd, start)
        except OSError as trunc_err:
            self._failed = DataDirError(
                self._path,
                f"{what}, and could not cut the file back "
                f"({_oserror_text(trunc_err)}); the partial record will be "
                "dropped as a torn tail when the journal is read",
                err,
            )
            raise self._failed from err

        logger.warning("journal %s: %s; cut back to byte %d", self._path, what, start)
        raise DataDirError(
            self._path,
            f"{what}; the record was not recorded and the file was "
            "cut back to its last whole record",
            err,
        ) from err

    def _fsync_locked(self) -> None:
        assert self._fd is not None
        self._fsync_fd(self._fd)
        self._dirty = False

    def _fsync_fd(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as err:
            self._failed = DataDirError(
                self._path,
                f"fsync failed ({_oserror_text(err)}); records since the last "
                "successful fsync may not be on disk",
                err,
            )
            raise self._failed from err

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._background_sync()
            except DataDirError:
                logger.exception(
                    "journal %s: background fsync failed; appends are refused "
                    "from now on",
                    self._path,
                )
                return
            except Exception:
                logger.exception(
                    "journal %s: background fsync thread crashed", self._path
                )
                return

    def _background_sync(self) -> None:
        with self._sync_lock:
            with self._lock:
                if not self._dirty or self._closed or self._failed or self._fd is None:
                    return
                fd = self._fd
                self._dirty = False

            # _sync_lock keeps fd open: close and rotate need it first.
            try:
                os.fsync(fd)
            except OSError as err:
                with self._lock:
                    self._failed = DataDirError(
                        self._path,
                        f"background fsync failed ({_oserror_text(err)}); records "
                        "since the last successful fsync may not be on disk",
                        err,
                    )
                raise self._failed from err
