"""The delegation journal: a worker's durable memory of delegation results.

An append-only JSON-lines file under the state directory, one per worker
(``STATE_DIR/delegations/<worker id>.jsonl``). Three kinds of line:

``{"kind": "session", "session_id", "work_id", "at"}``
    this worker claimed that session (written before the session starts), so
    a result for it is recognised as this worker's even after a restart;
``{"kind": "result", "delegation_id", "source_id", "work_id", "status", "response_preview", ...}``
    a delegation result accepted by the watcher, written (flushed and fsynced)
    **before** the result is collected on the control plane or delivered;
``{"kind": "delivered", "delegation_id", "via", "at"}``
    the result reached its session (``inbox``, ``message``) or cannot
    (``undeliverable``); a result without this line is delivered again after
    a restart (at least once: a crash between a delivery and its line repeats it).

The file is the memory; what is kept in memory is bounded and rebuilt from the
file on every start (`DelegationJournal.open`): the ids of the last
``lru_size`` results (an LRU, so the ids forgotten are always the oldest,
never an arbitrary slice), the last ``lru_size`` sessions, and the results not
yet delivered. A line torn by a crash mid-write (only the last line can be)
is ignored, and the next append starts on a fresh line.

Writes are synchronous (``os.write`` of whole lines on an ``O_APPEND``
descriptor, then ``os.fsync``), done in the Trio thread: a few small appends
per poll cycle, and a deterministic run under ``MockClock``. Session lines are
the exception: they are written at once but fsynced in groups (`sync`, which
the watcher calls every cycle), so no session waits for the disk to start.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from ..controlplane._models import Delegation, DelegationStatus
from ._workspace import safe_name

__all__ = [
    "VIA_INBOX",
    "VIA_MESSAGE",
    "VIA_UNDELIVERABLE",
    "DelegationJournal",
    "JournalledResult",
    "append_session_line",
    "journal_path",
]

logger = logging.getLogger("supervisor.delegations")

#: Delivery routes recorded in ``delivered`` lines.
VIA_INBOX: Final = "inbox"
VIA_MESSAGE: Final = "message"
VIA_UNDELIVERABLE: Final = "undeliverable"


def journal_path(state_dir: Path, worker_id: str) -> Path:
    """Where ``worker_id``'s journal lives in ``state_dir`` (one file per worker id).

    The file name is a sanitised form of the id, with a short hash of the
    exact id when sanitising changed it, so two ids never share a file.
    """
    name = safe_name(worker_id, max_length=80)
    if name != worker_id:
        name += "-" + hashlib.sha256(worker_id.encode()).hexdigest()[:10]
    return state_dir / "delegations" / f"{name}.jsonl"


@attrs.frozen
class JournalledResult:
    """A delegation result as the journal holds it.

    ``response_preview`` is the delegate's output: untrusted, kept out of reprs.
    """

    delegation_id: str
    source_id: str
    work_id: str
    status: DelegationStatus = attrs.field(converter=DelegationStatus)
    response_preview: str | None = attrs.field(default=None, repr=False)
    completed_at: float | None = None

    @classmethod
    def from_delegation(cls, delegation: Delegation) -> JournalledResult:
        return cls(
            delegation_id=delegation.id,
            source_id=delegation.source_id,
            work_id=delegation.work_id,
            status=delegation.status,
            response_preview=delegation.response_preview,
            completed_at=delegation.completed_at,
        )

    def to_line(self, at: float) -> dict[str, Any]:
        return {
            "kind": "result",
            "delegation_id": self.delegation_id,
            "source_id": self.source_id,
            "work_id": self.work_id,
            "status": self.status.value,
            "response_preview": self.response_preview,
            "completed_at": self.completed_at,
            "at": at,
        }


def _remember(lru: collections.OrderedDict[str, None], key: str, size: int) -> None:
    lru[key] = None
    lru.move_to_end(key)
    while len(lru) > size:
        lru.popitem(last=False)


class DelegationJournal:
    """An open journal: bounded memory in front of the append-only file.

    Use `DelegationJournal.open`; call `close` when done (the watcher does,
    in a ``finally``).
    """

    def __init__(self, path: Path, *, lru_size: int) -> None:
        if lru_size < 1:
            raise ValueError(f"lru_size must be >= 1, got {lru_size!r}")
        self.path = path
        # Sessions are journalled from worker threads (off the event loop, since each
        # append fsyncs) while the watcher appends from the Trio thread.
        self._lock = threading.Lock()
        self.lru_size = lru_size
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._sessions: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._pending: dict[str, JournalledResult] = {}
        self._fd: int | None = None
        #: Lines were written since the last fsync (session lines, and lines
        #: appended by `append_session_line` while the journal was closed).
        self._unsynced = True
        #: Lines skipped on replay because they were not valid journal lines.
        self.skipped_lines = 0

    def __repr__(self) -> str:
        return (
            f"<DelegationJournal {str(self.path)!r} seen={len(self._seen)} "
            f"pending={len(self._pending)}>"
        )

    # --- opening --------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, lru_size: int) -> DelegationJournal:
        """Open (creating it if needed) and replay the journal at ``path``.

        Raises:
            OSError: the file or its directory cannot be created or read.
        """
        journal = cls(path, lru_size=lru_size)
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if created:
                _fsync_directory(path.parent)
            journal._replay()
            journal._fd = fd
            journal._end_torn_line()
        except BaseException:
            os.close(fd)
            journal._fd = None
            raise
        return journal

    def _replay(self) -> None:
        for record in self._read_records():
            kind = record.get("kind")
            try:
                if kind == "session":
                    _remember(self._sessions, str(record["session_id"]), self.lru_size)
                elif kind == "result":
                    result = JournalledResult(
                        delegation_id=str(record["delegation_id"]),
                        source_id=str(record["source_id"]),
                        work_id=str(record["work_id"]),
                        status=record["status"],
                        response_preview=record.get("response_preview"),
                        completed_at=record.get("completed_at"),
                    )
                    _remember(self._seen, result.delegation_id, self.lru_size)
                    self._pending[result.delegation_id] = result
                elif kind == "delivered":
                    self._pending.pop(str(record["delegation_id"]), None)
                else:
                    self.skipped_lines += 1
            except (KeyError, TypeError, ValueError):
                self.skipped_lines += 1
        if self.skipped_lines:
            logger.warning(
                "delegation journal %s: skipped %d unreadable line(s)",
                self.path,
                self.skipped_lines,
            )

    def _read_records(self) -> Iterator[Mapping[str, Any]]:
        with self.path.open("rb") as file:
            for raw in file:
                if not raw.endswith(b"\n"):
                    return  # torn by a crash mid-append: never acknowledged, so never relied on
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    self.skipped_lines += 1
                    continue
                if isinstance(record, dict):
                    yield record
                else:
                    self.skipped_lines += 1

    def _end_torn_line(self) -> None:
        """Start the next append on a fresh line if the file ends mid-line."""
        if _ends_mid_line(self.path):
            self._write([b""])  # a lone newline closes the torn line

    # --- state ------------------------------------------------------------------

    def seen(self, delegation_id: str) -> bool:
        """Whether this result is already in the journal (within the LRU's memory)."""
        return delegation_id in self._seen

    def knows_session(self, session_id: str) -> bool:
        """Whether the journal recorded that this worker claimed ``session_id``."""
        return session_id in self._sessions

    def pending(self) -> list[JournalledResult]:
        """Results journalled but not yet delivered, oldest first."""
        return list(self._pending.values())

    @property
    def memory_size(self) -> int:
        """Entries held in memory: the bound `lru_size` applies to each LRU."""
        return len(self._seen) + len(self._sessions) + len(self._pending)

    @property
    def seen_count(self) -> int:
        return len(self._seen)

    # --- appends ------------------------------------------------------------------

    def record_session(self, session_id: str, work_id: str, *, at: float) -> None:
        """Note that this worker claimed ``session_id``, without waiting for the disk.

        The line is written (so it survives the death of this process) but not
        fsynced: the next `sync`, or the fsync of any later append, makes it
        durable, so sessions starting together share one fsync and none waits
        for one before its agent starts. Only a crash of the machine itself can
        lose an unsynced line, and that crash ends the session's agent too.
        """
        line = {"kind": "session", "session_id": session_id, "work_id": work_id, "at": at}
        with self._lock:
            self._append([line], sync=False)
            _remember(self._sessions, session_id, self.lru_size)

    def sync(self) -> None:
        """Make every line written so far durable (one fsync, only if one is owed)."""
        with self._lock:
            if self._unsynced and self._fd is not None:
                os.fsync(self._fd)
                self._unsynced = False

    def record_results(self, results: Iterable[JournalledResult], *, at: float) -> None:
        """Durably append results (one fsync for all); then they count as seen and pending."""
        batch = list(results)
        if not batch:
            return
        with self._lock:
            self._append([result.to_line(at) for result in batch])
            for result in batch:
                _remember(self._seen, result.delegation_id, self.lru_size)
                self._pending[result.delegation_id] = result

    def touch(self, delegation_id: str) -> None:
        """Refresh a seen id in the LRU (it came back: keep remembering it)."""
        if delegation_id in self._seen:
            self._seen.move_to_end(delegation_id)

    def record_delivered(self, delegation_ids: Iterable[str], via: str, *, at: float) -> None:
        """Durably note that results reached their session (or never can)."""
        ids = [i for i in delegation_ids if i in self._pending]
        if not ids:
            return
        with self._lock:
            self._append(
                [{"kind": "delivered", "delegation_id": i, "via": via, "at": at} for i in ids]
            )
            for delegation_id in ids:
                del self._pending[delegation_id]

    def _append(self, records: list[dict[str, Any]], *, sync: bool = True) -> None:
        self._write(
            [json.dumps(r, ensure_ascii=False, allow_nan=False).encode("utf-8") for r in records],
            sync=sync,
        )

    def _write(self, lines: list[bytes], *, sync: bool = True) -> None:
        fd = self._fd
        if fd is None:
            raise ValueError(f"the delegation journal {str(self.path)!r} is closed")
        data = b"".join(line + b"\n" for line in lines)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if sync:
            os.fsync(fd)
        self._unsynced = not sync

    def close(self) -> None:
        """Make the lines durable, then close the file; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if self._unsynced:
                    os.fsync(fd)
            finally:
                os.close(fd)


def append_session_line(path: Path, session_id: str, work_id: str, *, at: float) -> None:
    """Append a ``session`` line without opening (replaying) the journal.

    For the worker to note a claim while its watcher is between runs; appends
    on ``O_APPEND`` descriptors from one process never interleave. Not fsynced,
    as in `DelegationJournal.record_session`: the watcher's next start syncs it.
    """
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"kind": "session", "session_id": session_id, "work_id": work_id, "at": at}
    data = json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if created:
            _fsync_directory(path.parent)
        elif _ends_mid_line(path):
            data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _ends_mid_line(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb") as file:
        file.seek(size - 1)
        return file.read(1) != b"\n"


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable too (a crash right after creation)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
