"""The control-plane store: work items, workers, delegations and messages in one SQLite file.

Design notes (the why):

* **Synchronous, with explicit time.** Every method takes ``now`` (wall-clock
  POSIX seconds) from its caller. The store never reads a clock, so the async
  wrapper, the reference server and the tests each decide the time source, and
  a test can move time by assignment instead of sleeping.
* **No background task.** Lease expiry is evaluated from ``now`` at the start of
  every call that looks at items (poll, ack, heartbeat, stop, request-stop, get,
  list, stats, delegate, ...). Worker status is re-evaluated on every read of a
  worker. Nothing is lost if nobody calls for a while: the next call catches up.
* **One writer at a time, always.** Every call is a single ``BEGIN IMMEDIATE``
  transaction (even reads, since a read may expire leases), so two pollers in
  different processes can never both see an item as claimable. Within one
  process calls are serialised on a lock before they reach SQLite: SQLite admits
  one writer anyway, and waiting on a Python lock is cheaper and fairer than
  SQLite's sleeping busy handler. Across processes ``busy_timeout`` arbitrates;
  a lock held longer than that surfaces as `TransientError`.
* **WAL journal, ``synchronous=NORMAL`` by default.** A commit survives the
  death of any process (including SIGKILL); pass ``synchronous="FULL"`` to also
  survive power loss, at the cost of an fsync per call.
* **Nothing is deleted.** Stopped items, removed workers, answered delegations
  and messages stay in the file; inspection calls page through them.
* **Secrets are stored hashed.** The per-claim session credential is returned
  once, to the claiming poller, and only its SHA-256 is kept (it is 256 random
  bits, so a plain hash is as strong as a slow one). It is valid while that
  claim is live and dies with the lease.

Lifecycle decisions the design leaves open, recorded here:

* ``ack`` is accepted only from the worker the item was last handed to, so a
  slow poller cannot ack an item that the reclaim window gave to someone else.
* ``ack`` starts a lease of the default TTL, so a worker that dies between ack
  and its first heartbeat does not strand the item in ``starting``. The first
  heartbeat (``NO_HEARTBEAT``) is fenced by state only, since the heartbeat call
  names no worker: the item must be bound and have no token yet. So a first beat
  that arrives after its ack lease ran out *and* after another worker re-acked
  the item would be taken for the new holder's; with a lease keeper that beats
  right after ack, against a 60 s ack lease, that needs a minute-long stall.
* ``request_stop`` on a ``queued`` item stops it at once (outcome
  ``cancelled``): no worker will ever heartbeat it. On ``starting`` it moves to
  ``stopping`` and the first heartbeat answers ``stopping``.
* A ``stopping`` item whose lease expires is stopped (``cancelled``), not
  requeued: an operator asked for it to stop.
* ``stop`` is always a hard stop (``force`` is accepted for wire compatibility);
  the graceful path is ``request_stop``. A stop without an outcome records
  ``cancelled``. The holder's token survives ``stop``, so its next heartbeat
  answers ``stopped`` with ``lease_extended=False`` and a second stop with it
  is a 409; a token voided by expiry answers 412.
* ``requeue`` is the holder's way to give an item back (its session wedged):
  like an expiry (``queued``, ``attempts + 1``, claimable at once) but without
  waiting for the ttl. A ``stopping`` item or one on its last attempt is
  stopped with the reported outcome instead.
* Session ids are unique within an environment (a duplicate submit is a 409):
  delegations and messages address sessions by id.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import attrs

from ._exceptions import (
    BadRequest,
    Conflict,
    ControlPlaneError,
    Gone,
    NotFound,
    TransientError,
)
from ._fencing import mint_token, stale_token, tokens_match
from ._models import (
    NO_HEARTBEAT,
    Delegation,
    DelegationStatus,
    HeartbeatResult,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    SessionData,
    SessionMessage,
    WorkerRecord,
    WorkerStatus,
    WorkItem,
    WorkState,
    WorkStats,
)
from ._status import StatusPolicy, evaluate, new_worker

__all__ = [
    "DEFAULT_ENVIRONMENT_ID",
    "RESPONSE_PREVIEW_CHARS",
    "SCHEMA_VERSION",
    "LeasePolicy",
    "SQLiteStore",
    "SubmitListener",
]

log = logging.getLogger("supervisor.controlplane")

#: The environment used when none is named.
DEFAULT_ENVIRONMENT_ID: Final = "default"

#: The schema this code writes and understands (kept in ``PRAGMA user_version``).
#: Version 2 added delegation results collected by their worker (``collected_at``).
SCHEMA_VERSION: Final = 2

#: The longest delegate output kept as a delegation's ``response_preview`` (characters).
RESPONSE_PREVIEW_CHARS: Final = 4000

#: Called after a submit commits, with the environment id; from whichever thread submitted.
SubmitListener = Callable[[str], None]

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
_MAX_LIMIT: Final = 1000
_MAX_PAGE: Final = 1_000_000
_MAX_BLOCK_OR_RECLAIM_MS: Final = 24 * 3600 * 1000
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6

_EXPIRED_OUTCOME: Final = json.dumps(
    {"status": OutcomeStatus.FAILED.value, "reason": "lease expired"}, sort_keys=True
)
_EXPIRED_WHILE_STOPPING_OUTCOME: Final = json.dumps(
    {"status": OutcomeStatus.CANCELLED.value, "reason": "lease expired after a stop request"},
    sort_keys=True,
)


def _finite_positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


@attrs.frozen
class LeasePolicy:
    """How the store hands out and times out leases.

    Attributes:
        default_ttl: lease seconds when a heartbeat asks for none; also the lease an ``ack``
            starts, so an item acked by a worker that then dies comes back.
        min_ttl: the shortest lease granted, whatever a worker asks for.
        max_ttl: the longest lease granted.
        max_attempts: attempts an item may lose, to lease expiry or to a ``requeue`` by its
            holder; the last loss stops it (``failed: lease expired``, or the outcome the
            requeue reported) instead of requeueing it.
        reclaim_older_than_ms: the default reclaim window of ``poll``: an item handed out but
            not acked within it is handed out again.
        polling_window: seconds a poll keeps a worker counted in ``workers_polling``.
    """

    default_ttl: float = attrs.field(default=60.0, validator=_finite_positive)
    min_ttl: float = attrs.field(default=1.0, validator=_finite_positive)
    max_ttl: float = attrs.field(default=3600.0, validator=_finite_positive)
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    reclaim_older_than_ms: int = attrs.field(default=30_000, validator=attrs.validators.ge(1))
    polling_window: float = attrs.field(default=60.0, validator=_finite_positive)

    def __attrs_post_init__(self) -> None:
        if not self.min_ttl <= self.default_ttl <= self.max_ttl:
            raise ValueError(
                "LeasePolicy needs min_ttl <= default_ttl <= max_ttl, got "
                f"{self.min_ttl} / {self.default_ttl} / {self.max_ttl}"
            )

    def clamp_ttl(self, desired: float | None) -> float:
        """The lease actually granted for a requested ``desired_ttl_seconds``."""
        if desired is None:
            return self.default_ttl
        return min(self.max_ttl, max(self.min_ttl, float(desired)))


_SCHEMA: Final = """
CREATE TABLE environments (
    id          TEXT PRIMARY KEY,
    created_at  REAL NOT NULL
);
CREATE TABLE work_items (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    environment_id      TEXT NOT NULL REFERENCES environments(id),
    state               TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    prompt              TEXT NOT NULL,
    metadata            TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    worker_id           TEXT,
    created_at          REAL NOT NULL,
    delivered_at        REAL,
    delivered_to        TEXT,
    acknowledged_at     REAL,
    started_at          REAL,
    latest_heartbeat_at REAL,
    lease_expires_at    REAL,
    token               TEXT,
    beats               INTEGER NOT NULL DEFAULT 0,
    stop_requested_at   REAL,
    stopped_at          REAL,
    outcome             TEXT,
    secret_hash         TEXT,
    UNIQUE (environment_id, session_id)
);
CREATE INDEX work_items_claim ON work_items (environment_id, state, created_at, seq);
CREATE INDEX work_items_lease ON work_items (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
CREATE TABLE pollers (
    environment_id  TEXT NOT NULL,
    worker_id       TEXT NOT NULL,
    last_poll_at    REAL NOT NULL,
    PRIMARY KEY (environment_id, worker_id)
);
CREATE TABLE workers (
    environment_id      TEXT NOT NULL REFERENCES environments(id),
    worker_id           TEXT NOT NULL,
    status              TEXT NOT NULL,
    registered_at       REAL NOT NULL,
    last_heartbeat_at   REAL,
    error_rate          REAL NOT NULL DEFAULT 0,
    sample_error        TEXT,
    active_tasks        INTEGER NOT NULL DEFAULT 0,
    current_task        TEXT,
    uptime_seconds      REAL NOT NULL DEFAULT 0,
    runtime_state       TEXT,
    runtime_metadata    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (environment_id, worker_id)
);
CREATE TABLE delegations (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT NOT NULL UNIQUE,
    environment_id      TEXT NOT NULL REFERENCES environments(id),
    source_id           TEXT NOT NULL,
    work_id             TEXT NOT NULL REFERENCES work_items(id),
    task                TEXT NOT NULL,
    status              TEXT NOT NULL,
    response_preview    TEXT,
    worker_id           TEXT,
    created_at          REAL NOT NULL,
    completed_at        REAL,
    collected_at        REAL
);
CREATE INDEX delegations_by_worker ON delegations (environment_id, worker_id, seq);
CREATE INDEX delegations_pending ON delegations (work_id) WHERE status = 'pending';
CREATE INDEX delegations_uncollected ON delegations (environment_id, worker_id, seq)
    WHERE collected_at IS NULL;
CREATE TABLE messages (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    environment_id  TEXT NOT NULL REFERENCES environments(id),
    session_id      TEXT NOT NULL,
    kind            TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      REAL NOT NULL
);
CREATE INDEX messages_by_session ON messages (environment_id, session_id, seq);
"""

#: Statements that bring a file of each older schema version up to the next one.
_MIGRATIONS: Final[Mapping[int, str]] = {
    1: """
ALTER TABLE delegations ADD COLUMN collected_at REAL;
CREATE INDEX delegations_pending ON delegations (work_id) WHERE status = 'pending';
CREATE INDEX delegations_uncollected ON delegations (environment_id, worker_id, seq)
    WHERE collected_at IS NULL;
""",
}


# --- input validation ---------------------------------------------------------


def _check_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise BadRequest(
            f"{what} must be 1-200 characters of letters, digits and ._:@- "
            f"(starting with a letter or digit), got {_preview(value)}"
        )
    return value


def _check_text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{what} must not be empty")
    return value


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{what} must be an integer between {low} and {high}, got {value!r}")
    return value


_E = TypeVar("_E", WorkState, DelegationStatus)


def _check_enum(what: str, value: object, enum: type[_E]) -> _E:
    if isinstance(value, str):
        try:
            return enum(value)
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum)
    raise BadRequest(f"{what} must be one of {allowed}; got {_preview(value)}")


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_metadata(value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest(f"metadata must be a mapping of strings, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise BadRequest(f"metadata keys and values must be strings, got {key!r}: {item!r}")
    return dict(value)


def _json_object(what: str, value: Mapping[str, Any] | None) -> str:
    try:
        return json.dumps(dict(value or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{what} must be JSON-serialisable: {exc}") from None


def _check_ttl(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"desired_ttl_seconds must be a number, got {_preview(value)}")
    if not math.isfinite(value) or value <= 0:
        raise BadRequest(f"desired_ttl_seconds must be a finite number > 0, got {value!r}")
    return float(value)


def _check_report(report: object) -> PresenceReport:
    if not isinstance(report, PresenceReport):
        raise BadRequest(f"a presence report is required, got {type(report).__name__}")
    _check_id("worker_id", report.worker_id)
    rate = report.error_rate
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise BadRequest(f"error_rate must be a number between 0 and 1, got {rate!r}")
    _check_int("active_tasks", report.active_tasks, 0, 1_000_000)
    uptime = report.uptime_seconds
    if isinstance(uptime, bool) or not isinstance(uptime, int | float) or not uptime >= 0:
        raise BadRequest(f"uptime_seconds must be a number >= 0, got {uptime!r}")
    for name in ("status", "sample_error", "current_task", "runtime_state"):
        field = getattr(report, name)
        if field is not None and not isinstance(field, str):
            raise BadRequest(f"{name} must be a string, got {type(field).__name__}")
    return report


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- sqlite errors ------------------------------------------------------------


def _translate(exc: sqlite3.Error, doing: str) -> ControlPlaneError:
    """Map a sqlite3 exception onto the package's tree (the caller chains it)."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    busy = (code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)) or (
        "locked" in text or "busy" in text
    )
    if busy:
        return TransientError(
            f"control-plane store busy while {doing} (another process holds the database "
            f"lock longer than the busy timeout): {text}",
            status_code=503,
        )
    return ControlPlaneError(f"control-plane store failed while {doing}: {text}", status_code=500)


# --- rows to records ----------------------------------------------------------

_ITEM_COLUMNS: Final = (
    "id, environment_id, state, session_id, prompt, metadata, attempts, worker_id, created_at, "
    "acknowledged_at, started_at, latest_heartbeat_at, stop_requested_at, stopped_at, outcome"
)


def _outcome_to_json(outcome: Outcome) -> str:
    return json.dumps(attrs.asdict(outcome), sort_keys=True, allow_nan=False)


def _outcome_from_json(text: str | None) -> Outcome | None:
    if text is None:
        return None
    return Outcome(**json.loads(text))


def _item(row: sqlite3.Row, *, secret: str | None = None) -> WorkItem:
    return WorkItem(
        id=row["id"],
        environment_id=row["environment_id"],
        state=WorkState(row["state"]),
        data=SessionData(id=row["session_id"], prompt=row["prompt"]),
        metadata=json.loads(row["metadata"]),
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        created_at=row["created_at"],
        acknowledged_at=row["acknowledged_at"],
        started_at=row["started_at"],
        latest_heartbeat_at=row["latest_heartbeat_at"],
        stop_requested_at=row["stop_requested_at"],
        stopped_at=row["stopped_at"],
        outcome=_outcome_from_json(row["outcome"]),
        secret=secret,
    )


def _worker(row: sqlite3.Row) -> WorkerRecord:
    return WorkerRecord(
        worker_id=row["worker_id"],
        environment_id=row["environment_id"],
        status=WorkerStatus(row["status"]),
        registered_at=row["registered_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        error_rate=row["error_rate"],
        sample_error=row["sample_error"],
        active_tasks=row["active_tasks"],
        current_task=row["current_task"],
        uptime_seconds=row["uptime_seconds"],
        runtime_state=row["runtime_state"],
        runtime_metadata=json.loads(row["runtime_metadata"]),
    )


def _delegation(row: sqlite3.Row) -> Delegation:
    return Delegation(
        id=row["id"],
        source_id=row["source_id"],
        work_id=row["work_id"],
        task=row["task"],
        status=DelegationStatus(row["status"]),
        response_preview=row["response_preview"],
        worker_id=row["worker_id"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        collected_at=row["collected_at"],
    )


def _message(row: sqlite3.Row) -> SessionMessage:
    return SessionMessage(
        id=row["id"],
        session_id=row["session_id"],
        kind=row["kind"],
        body=row["body"],
        created_at=row["created_at"],
    )


# --- the store ----------------------------------------------------------------


class SQLiteStore:
    """The control plane's state in one SQLite file, safe to share between processes.

    Every public method is synchronous, runs in one transaction, takes the
    current time as ``now`` and raises only the package's exceptions. An async
    caller runs the methods in a worker thread (see `EmbeddedControlPlane`);
    the instance may be shared by any number of threads.

    Args:
        path: the database file (created with its schema on first open), or
            ``":memory:"`` for a private throw-away store.
        lease_policy: TTL bounds, attempts and reclaim window.
        status_policy: the worker status thresholds.
        busy_timeout: seconds to wait for another process's write lock before a
            call fails with `TransientError`.
        synchronous: SQLite's ``synchronous`` pragma (``"NORMAL"`` or ``"FULL"``).

    Raises:
        ControlPlaneError: the file cannot be opened, is not a database, or has a
            schema newer than this code.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease_policy: LeasePolicy | None = None,
        status_policy: StatusPolicy | None = None,
        busy_timeout: float = 5.0,
        synchronous: str = "NORMAL",
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        if not (math.isfinite(busy_timeout) and busy_timeout >= 0):
            raise ValueError(f"busy_timeout must be a finite number >= 0, got {busy_timeout!r}")
        self._path = os.fspath(path)
        self.lease_policy = lease_policy or LeasePolicy()
        self.status_policy = status_policy or StatusPolicy()
        self._lock = threading.RLock()
        self._listeners: list[SubmitListener] = []
        self._counter = 0
        self._conn: sqlite3.Connection | None = self._connect(busy_timeout, synchronous.upper())

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<SQLiteStore {self._path!r} {state}>"

    @property
    def path(self) -> str:
        """The database file this store opened."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _connect(self, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=busy_timeout,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # shared by threads, serialised on self._lock
            )
        except sqlite3.Error as exc:
            raise _translate(exc, f"opening {self._path!r}") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            version = self._install_schema(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, f"opening {self._path!r}") from exc
        except BaseException:
            conn.close()
            raise
        if version != SCHEMA_VERSION:
            conn.close()
            raise ControlPlaneError(
                f"{self._path!r} has control-plane schema version {version}; "
                f"this release understands version {SCHEMA_VERSION}"
            )
        return conn

    @staticmethod
    def _install_schema(conn: sqlite3.Connection) -> int:
        """Create the schema in a fresh file, or migrate an older one; return its version.

        Runs under ``BEGIN IMMEDIATE`` so two processes opening a new (or old)
        file at once do not both create (or migrate) it.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            script = None
            if version == 0:
                script, version = _SCHEMA, SCHEMA_VERSION
            while script is not None or version in _MIGRATIONS:
                if script is None:
                    script, version = _MIGRATIONS[version], version + 1
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
                script = None
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return version

    def close(self) -> None:
        """Close the database; idempotent. Later calls raise `ControlPlaneError`."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise _translate(exc, f"closing {self._path!r}") from exc

    # --- listeners ----------------------------------------------------------

    def add_submit_listener(self, listener: SubmitListener) -> None:
        """Call ``listener(environment_id)`` after each submit through this instance commits.

        Long-pollers in the same process use it to wake at once instead of
        waiting for their next re-check. The listener runs in the submitting
        thread and must be quick and thread-safe; an exception from it is
        logged and ignored (the submit already happened). Submits from other
        processes are not seen: pollers re-check on their own schedule.
        """
        with self._lock:
            self._listeners.append(listener)

    def remove_submit_listener(self, listener: SubmitListener) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify_submitted(self, environment_id: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(environment_id)
            except Exception:
                log.exception("submit listener %r failed", listener)

    # --- transactions ---------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; rolled back on any exception.

        A `ControlPlaneError` raised inside (a 404, a 409...) therefore changes
        nothing, and a sqlite3 error is translated on the way out.
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                raise ControlPlaneError(f"the control-plane store is closed ({doing})")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _translate(exc, doing) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn)
                raise _translate(exc, doing) from exc
            except BaseException:
                self._rollback(conn)
                raise

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("rollback failed; SQLite rolls back on its own", exc_info=True)

    def _next_token(self, attempts: int, beats: int) -> str:
        self._counter += 1
        return mint_token(attempts, beats, self._counter)

    # --- expiry ----------------------------------------------------------------

    def _expire_leases(self, conn: sqlite3.Connection, now: float) -> None:
        """Apply every lease expiry due at ``now``; the old tokens and secrets die here."""
        # Nearly every call finds nothing due: one indexed probe is cheaper than three UPDATEs.
        due = conn.execute(
            "SELECT 1 FROM work_items WHERE lease_expires_at <= ? LIMIT 1", (now,)
        ).fetchone()
        if due is None:
            return
        # An operator asked these to stop: do not run them again.
        conn.execute(
            "UPDATE work_items SET state = 'stopped', attempts = attempts + 1, "
            "stopped_at = lease_expires_at, outcome = ?, token = NULL, secret_hash = NULL, "
            "lease_expires_at = NULL WHERE lease_expires_at <= ? AND state = 'stopping'",
            (_EXPIRED_WHILE_STOPPING_OUTCOME, now),
        )
        conn.execute(
            "UPDATE work_items SET state = 'stopped', attempts = attempts + 1, "
            "stopped_at = lease_expires_at, outcome = ?, token = NULL, secret_hash = NULL, "
            "lease_expires_at = NULL WHERE lease_expires_at <= ? "
            "AND state IN ('starting', 'active') AND attempts + 1 >= ?",
            (_EXPIRED_OUTCOME, now, self.lease_policy.max_attempts),
        )
        self._settle_delegations(conn)
        conn.execute(
            "UPDATE work_items SET state = 'queued', attempts = attempts + 1, worker_id = NULL, "
            "token = NULL, secret_hash = NULL, lease_expires_at = NULL, delivered_at = NULL, "
            "delivered_to = NULL, acknowledged_at = NULL, started_at = NULL, "
            "latest_heartbeat_at = NULL WHERE lease_expires_at <= ? "
            "AND state IN ('starting', 'active')",
            (now,),
        )

    def _item_row(self, conn: sqlite3.Connection, environment_id: str, work_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM work_items WHERE id = ? AND environment_id = ?",
            (work_id, environment_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no work item {work_id!r} in environment {environment_id!r}")
        return row

    def _read_item(self, conn: sqlite3.Connection, work_id: str) -> WorkItem:
        row = conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM work_items WHERE id = ?", (work_id,)
        ).fetchone()
        return _item(row)

    @staticmethod
    def _ensure_environment(conn: sqlite3.Connection, environment_id: str, now: float) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO environments (id, created_at) VALUES (?, ?)",
            (environment_id, now),
        )

    # --- work ------------------------------------------------------------------

    def submit(
        self,
        environment_id: str,
        prompt: str,
        *,
        now: float,
        session_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> WorkItem:
        """Queue a new session work item; the environment is created on first use.

        Raises:
            BadRequest: empty prompt, malformed ids or metadata.
            Conflict: ``session_id`` is already used in this environment.
        """
        _check_id("environment_id", environment_id)
        _check_text("prompt", prompt)
        if session_id is not None:
            _check_id("session_id", session_id)
        meta = json.dumps(_check_metadata(metadata), sort_keys=True)
        work_id = _new_id("work")
        session = session_id or _new_id("sess")
        with self._transaction("submitting work") as conn:
            self._ensure_environment(conn, environment_id, now)
            clash = conn.execute(
                "SELECT id FROM work_items WHERE environment_id = ? AND session_id = ?",
                (environment_id, session),
            ).fetchone()
            if clash is not None:
                raise Conflict(
                    f"session {session!r} already exists in environment {environment_id!r} "
                    f"(work item {clash['id']!r})"
                )
            conn.execute(
                "INSERT INTO work_items (id, environment_id, state, session_id, prompt, "
                "metadata, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (work_id, environment_id, session, prompt, meta, now),
            )
            item = self._read_item(conn, work_id)
        self._notify_submitted(environment_id)
        return item

    def poll(
        self,
        environment_id: str,
        *,
        worker_id: str,
        now: float,
        reclaim_older_than_ms: int | None = None,
    ) -> WorkItem | None:
        """Claim the oldest claimable queued item for ``worker_id``, or ``None``.

        Claimable: ``queued`` and not handed out within the last
        ``reclaim_older_than_ms`` (default from the lease policy). The claim
        records the hand-out and mints a fresh session secret, returned here
        and nowhere else.
        """
        _check_id("environment_id", environment_id)
        _check_id("worker_id", worker_id)
        window_ms = (
            self.lease_policy.reclaim_older_than_ms
            if reclaim_older_than_ms is None
            else _check_int(
                "reclaim_older_than_ms", reclaim_older_than_ms, 0, _MAX_BLOCK_OR_RECLAIM_MS
            )
        )
        cutoff = now - window_ms / 1000.0
        secret = secrets.token_urlsafe(32)
        with self._transaction("polling for work") as conn:
            self._ensure_environment(conn, environment_id, now)
            self._expire_leases(conn, now)
            conn.execute(
                "INSERT INTO pollers (environment_id, worker_id, last_poll_at) VALUES (?, ?, ?) "
                "ON CONFLICT (environment_id, worker_id) DO UPDATE SET "
                "last_poll_at = excluded.last_poll_at",
                (environment_id, worker_id, now),
            )
            row = conn.execute(
                "SELECT id FROM work_items WHERE environment_id = ? AND state = 'queued' "
                "AND (delivered_at IS NULL OR delivered_at <= ?) "
                "ORDER BY created_at, seq LIMIT 1",
                (environment_id, cutoff),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE work_items SET delivered_at = ?, delivered_to = ?, secret_hash = ? "
                "WHERE id = ?",
                (now, worker_id, _hash_secret(secret), row["id"]),
            )
            return _item(
                conn.execute(
                    f"SELECT {_ITEM_COLUMNS} FROM work_items WHERE id = ?", (row["id"],)
                ).fetchone(),
                secret=secret,
            )

    def ack(self, environment_id: str, work_id: str, *, worker_id: str, now: float) -> WorkItem:
        """``queued -> starting``, binding the item to the worker it was handed to.

        Raises:
            NotFound: unknown item.
            Conflict: the item is not queued (a second ack), or was last handed
                to another worker (or to nobody).
        """
        _check_id("environment_id", environment_id)
        _check_id("worker_id", worker_id)
        with self._transaction("acknowledging work") as conn:
            self._expire_leases(conn, now)
            row = self._item_row(conn, environment_id, work_id)
            if row["state"] != WorkState.QUEUED:
                raise Conflict(
                    f"work item {work_id!r} is {row['state']}, not queued: it was already "
                    "acknowledged"
                )
            if row["delivered_to"] != worker_id:
                holder = "nobody" if row["delivered_to"] is None else "another worker"
                raise Conflict(
                    f"work item {work_id!r} was last handed out to {holder}, not {worker_id!r}: "
                    "poll for it first"
                )
            conn.execute(
                "UPDATE work_items SET state = 'starting', worker_id = ?, acknowledged_at = ?, "
                "lease_expires_at = ? WHERE id = ?",
                (worker_id, now, now + self.lease_policy.default_ttl, work_id),
            )
            return self._read_item(conn, work_id)

    def heartbeat(
        self,
        environment_id: str,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        now: float,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        """Renew the lease if ``expected_last_heartbeat`` is the current token.

        The first beat of a lease sends `NO_HEARTBEAT` and moves ``starting ->
        active`` (or keeps ``stopping`` if a stop was requested meanwhile).
        Every successful beat mints a new token. A beat on a stopped item with
        its last token answers ``stopped`` and ``lease_extended=False``.

        Raises:
            BadRequest: a non-positive or non-finite TTL.
            NotFound: unknown item.
            Conflict: the item is still ``queued`` (not acknowledged).
            FencingConflict: the token is stale (the lease expired or moved on).
        """
        _check_id("environment_id", environment_id)
        if not isinstance(expected_last_heartbeat, str) or not expected_last_heartbeat:
            raise BadRequest("expected_last_heartbeat must be a non-empty string")
        ttl = self.lease_policy.clamp_ttl(_check_ttl(desired_ttl_seconds))
        with self._transaction("heartbeating work") as conn:
            self._expire_leases(conn, now)
            row = self._item_row(conn, environment_id, work_id)
            state = WorkState(row["state"])
            token: str | None = row["token"]
            first = expected_last_heartbeat == NO_HEARTBEAT
            if state is WorkState.QUEUED and first:
                raise Conflict(f"work item {work_id!r} is queued: acknowledge it first")
            if state is WorkState.STOPPED:
                if not tokens_match(token, expected_last_heartbeat):
                    raise stale_token(
                        work_id,
                        presented=expected_last_heartbeat,
                        current=token,
                        attempts=row["attempts"],
                    )
                new = self._next_token(row["attempts"], row["beats"] + 1)
                conn.execute(
                    "UPDATE work_items SET token = ?, beats = beats + 1 WHERE id = ?",
                    (new, work_id),
                )
                return HeartbeatResult(new, 0.0, WorkState.STOPPED, lease_extended=False)
            if token is None:
                ok = first and state in (WorkState.STARTING, WorkState.STOPPING)
            else:
                ok = tokens_match(token, expected_last_heartbeat)
            if not ok:
                raise stale_token(
                    work_id,
                    presented=expected_last_heartbeat,
                    current=token,
                    attempts=row["attempts"],
                )
            new_state = WorkState.ACTIVE if state is WorkState.STARTING else state
            new = self._next_token(row["attempts"], row["beats"] + 1)
            conn.execute(
                "UPDATE work_items SET state = ?, token = ?, beats = beats + 1, "
                "latest_heartbeat_at = ?, lease_expires_at = ?, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?",
                (new_state.value, new, now, now + ttl, now, work_id),
            )
            return HeartbeatResult(new, ttl, new_state, lease_extended=True)

    def stop(
        self,
        environment_id: str,
        work_id: str,
        *,
        now: float,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        """Move a live item to ``stopped`` and record its outcome.

        Without a token this is an operator's force-stop and always allowed on
        a live item; with one, the token must be current (`NO_HEARTBEAT` is
        current for an acknowledged item that has not beaten yet).

        Raises:
            NotFound: unknown item.
            FencingConflict: the token is stale.
            Conflict: the item is already stopped.
        """
        del force  # every stop is a hard stop; request_stop is the graceful path
        _check_id("environment_id", environment_id)
        if outcome is not None and not isinstance(outcome, Outcome):
            raise BadRequest(f"outcome must be an Outcome, got {type(outcome).__name__}")
        if expected_last_heartbeat is not None and (
            not isinstance(expected_last_heartbeat, str) or not expected_last_heartbeat
        ):
            raise BadRequest("expected_last_heartbeat must be a non-empty string when given")
        recorded = outcome or Outcome(OutcomeStatus.CANCELLED, reason="stopped without an outcome")
        with self._transaction("stopping work") as conn:
            self._expire_leases(conn, now)
            row = self._item_row(conn, environment_id, work_id)
            state = WorkState(row["state"])
            if expected_last_heartbeat is not None:
                token: str | None = row["token"]
                if token is None:
                    ok = expected_last_heartbeat == NO_HEARTBEAT and state in (
                        WorkState.STARTING,
                        WorkState.STOPPING,
                    )
                else:
                    ok = tokens_match(token, expected_last_heartbeat)
                if not ok:
                    raise stale_token(
                        work_id,
                        presented=expected_last_heartbeat,
                        current=token,
                        attempts=row["attempts"],
                    )
            if state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id!r} is already stopped")
            conn.execute(
                "UPDATE work_items SET state = 'stopped', stopped_at = ?, outcome = ?, "
                "lease_expires_at = NULL, secret_hash = NULL WHERE id = ?",
                (now, _outcome_to_json(recorded), work_id),
            )
            self._settle_delegations(conn, work_id)
            return self._read_item(conn, work_id)

    def requeue(
        self,
        environment_id: str,
        work_id: str,
        *,
        now: float,
        expected_last_heartbeat: str,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        """The holder gives a live item back, so another worker may try it.

        What a worker does with an item its runtime could not serve (a wedged
        session): the item goes back to ``queued`` with ``attempts + 1``,
        unbound and claimable at once, exactly as if its lease had expired,
        but without making everyone wait for the ttl. The holder's token and
        the session secret die here. The outcome of the failed attempt is not
        kept on a requeued item (``outcome`` stays ``None`` until it stops).

        Two cases stop the item instead, recording ``outcome`` (``cancelled``
        when none is given): it is ``stopping`` (an operator asked for a stop,
        which wins), or this was its last attempt (``max_attempts``), so a
        task that wedges every runtime does not circulate forever.

        Raises:
            BadRequest: an empty token or a malformed outcome.
            NotFound: unknown item.
            FencingConflict: the token is not the current one (also for a
                queued item: nobody holds it).
            Conflict: the item is already stopped.
        """
        _check_id("environment_id", environment_id)
        if outcome is not None and not isinstance(outcome, Outcome):
            raise BadRequest(f"outcome must be an Outcome, got {type(outcome).__name__}")
        if not isinstance(expected_last_heartbeat, str) or not expected_last_heartbeat:
            raise BadRequest("expected_last_heartbeat must be a non-empty string")
        recorded = outcome or Outcome(OutcomeStatus.CANCELLED, reason="requeued without an outcome")
        requeued = False
        with self._transaction("requeueing work") as conn:
            self._expire_leases(conn, now)
            row = self._item_row(conn, environment_id, work_id)
            state = WorkState(row["state"])
            if state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id!r} is already stopped")
            token: str | None = row["token"]
            if token is None:
                ok = expected_last_heartbeat == NO_HEARTBEAT and state in (
                    WorkState.STARTING,
                    WorkState.STOPPING,
                )
            else:
                ok = tokens_match(token, expected_last_heartbeat)
            if not ok:
                raise stale_token(
                    work_id,
                    presented=expected_last_heartbeat,
                    current=token,
                    attempts=row["attempts"],
                )
            attempts = row["attempts"] + 1
            if state is WorkState.STOPPING or attempts >= self.lease_policy.max_attempts:
                conn.execute(
                    "UPDATE work_items SET state = 'stopped', attempts = ?, stopped_at = ?, "
                    "outcome = ?, lease_expires_at = NULL, secret_hash = NULL WHERE id = ?",
                    (attempts, now, _outcome_to_json(recorded), work_id),
                )
                self._settle_delegations(conn, work_id)
            else:
                requeued = True
                conn.execute(
                    "UPDATE work_items SET state = 'queued', attempts = ?, worker_id = NULL, "
                    "token = NULL, secret_hash = NULL, lease_expires_at = NULL, "
                    "delivered_at = NULL, delivered_to = NULL, acknowledged_at = NULL, "
                    "started_at = NULL, latest_heartbeat_at = NULL WHERE id = ?",
                    (attempts, work_id),
                )
            item = self._read_item(conn, work_id)
        if requeued:
            self._notify_submitted(environment_id)
        return item

    def request_stop(self, environment_id: str, work_id: str, *, now: float) -> WorkItem:
        """Operator cancel: the holder's next heartbeat answers ``stopping``.

        A ``queued`` item has no holder, so it is stopped at once with a
        ``cancelled`` outcome. Asking twice is harmless.

        Raises:
            NotFound: unknown item.
            Conflict: the item is already stopped.
        """
        _check_id("environment_id", environment_id)
        with self._transaction("requesting a stop") as conn:
            self._expire_leases(conn, now)
            row = self._item_row(conn, environment_id, work_id)
            state = WorkState(row["state"])
            if state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id!r} is already stopped")
            if state is WorkState.QUEUED:
                cancelled = Outcome(
                    OutcomeStatus.CANCELLED, reason="stop requested before it was claimed"
                )
                conn.execute(
                    "UPDATE work_items SET state = 'stopped', stop_requested_at = ?, "
                    "stopped_at = ?, outcome = ?, secret_hash = NULL WHERE id = ?",
                    (now, now, _outcome_to_json(cancelled), work_id),
                )
                self._settle_delegations(conn, work_id)
            elif state is not WorkState.STOPPING:
                conn.execute(
                    "UPDATE work_items SET state = 'stopping', stop_requested_at = ? WHERE id = ?",
                    (now, work_id),
                )
            return self._read_item(conn, work_id)

    def get(self, environment_id: str, work_id: str, *, now: float) -> WorkItem:
        """One item, without its secret.

        Raises:
            NotFound: unknown item (or an item of another environment).
        """
        _check_id("environment_id", environment_id)
        with self._transaction("reading work") as conn:
            self._expire_leases(conn, now)
            self._item_row(conn, environment_id, work_id)
            return self._read_item(conn, work_id)

    def list_work(
        self,
        environment_id: str,
        *,
        now: float,
        state: WorkState | str | None = None,
        limit: int = 100,
        page: int = 0,
    ) -> list[WorkItem]:
        """Items oldest first, ``limit`` (1-1000) per zero-based ``page``; no secrets."""
        _check_id("environment_id", environment_id)
        wanted = None if state is None else _check_enum("state", state, WorkState)
        _check_int("limit", limit, 1, _MAX_LIMIT)
        _check_int("page", page, 0, _MAX_PAGE)
        with self._transaction("listing work") as conn:
            self._expire_leases(conn, now)
            sql = f"SELECT {_ITEM_COLUMNS} FROM work_items WHERE environment_id = ?"
            params: list[object] = [environment_id]
            if wanted is not None:
                sql += " AND state = ?"
                params.append(wanted.value)
            sql += " ORDER BY created_at, seq LIMIT ? OFFSET ?"
            params += [limit, limit * page]
            return [_item(row) for row in conn.execute(sql, params)]

    def stats(self, environment_id: str, *, now: float) -> WorkStats:
        """Queue depth, items in flight, the oldest queued item, and recent pollers."""
        _check_id("environment_id", environment_id)
        with self._transaction("reading stats") as conn:
            self._expire_leases(conn, now)
            row = conn.execute(
                "SELECT "
                "COUNT(*) FILTER (WHERE state = 'queued') AS depth, "
                "COUNT(*) FILTER (WHERE state IN ('starting', 'active', 'stopping')) "
                "AS pending, "
                "MIN(created_at) FILTER (WHERE state = 'queued') AS oldest "
                "FROM work_items WHERE environment_id = ?",
                (environment_id,),
            ).fetchone()
            polling = conn.execute(
                "SELECT COUNT(*) FROM pollers WHERE environment_id = ? AND last_poll_at > ?",
                (environment_id, now - self.lease_policy.polling_window),
            ).fetchone()[0]
            return WorkStats(
                depth=row["depth"],
                pending=row["pending"],
                oldest_queued_at=row["oldest"],
                workers_polling=polling,
            )

    def verify_session_secret(
        self, environment_id: str, session_id: str, secret: str, *, now: float
    ) -> bool:
        """Whether ``secret`` is the live session credential of ``session_id``.

        True only while the claim that minted it holds: a requeue, a re-claim
        or a stop voids it. The comparison is constant-time, and an unknown
        session costs the same comparison, so timing tells nothing.
        """
        with self._transaction("verifying a session credential") as conn:
            self._expire_leases(conn, now)
            row = conn.execute(
                "SELECT secret_hash FROM work_items WHERE environment_id = ? AND session_id = ?",
                (environment_id, session_id),
            ).fetchone()
        stored = row["secret_hash"] if row is not None else None
        candidate = _hash_secret(secret)
        matches = hmac.compare_digest(stored or "0" * len(candidate), candidate)
        return stored is not None and matches

    def list_environments(self) -> list[str]:
        """Every environment used so far, in order of first use."""
        with self._transaction("listing environments") as conn:
            return [r["id"] for r in conn.execute("SELECT id FROM environments ORDER BY rowid")]

    # --- workers ---------------------------------------------------------------

    def _worker_row(
        self, conn: sqlite3.Connection, environment_id: str, worker_id: str
    ) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM workers WHERE environment_id = ? AND worker_id = ?",
            (environment_id, worker_id),
        ).fetchone()
        return row

    def _known_worker_row(
        self, conn: sqlite3.Connection, environment_id: str, worker_id: str
    ) -> sqlite3.Row:
        row = self._worker_row(conn, environment_id, worker_id)
        if row is None:
            raise NotFound(f"no worker {worker_id!r} in environment {environment_id!r}")
        return row

    def _save_worker(self, conn: sqlite3.Connection, record: WorkerRecord) -> None:
        conn.execute(
            "INSERT INTO workers (environment_id, worker_id, status, registered_at, "
            "last_heartbeat_at, error_rate, sample_error, active_tasks, current_task, "
            "uptime_seconds, runtime_state, runtime_metadata) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (environment_id, worker_id) DO UPDATE SET "
            "status = excluded.status, registered_at = excluded.registered_at, "
            "last_heartbeat_at = excluded.last_heartbeat_at, error_rate = excluded.error_rate, "
            "sample_error = excluded.sample_error, active_tasks = excluded.active_tasks, "
            "current_task = excluded.current_task, uptime_seconds = excluded.uptime_seconds, "
            "runtime_state = excluded.runtime_state, "
            "runtime_metadata = excluded.runtime_metadata",
            (
                record.environment_id,
                record.worker_id,
                record.status.value,
                record.registered_at,
                record.last_heartbeat_at,
                record.error_rate,
                record.sample_error,
                record.active_tasks,
                record.current_task,
                record.uptime_seconds,
                record.runtime_state,
                _json_object("runtime_metadata", record.runtime_metadata),
            ),
        )

    def _evaluated_worker(
        self, conn: sqlite3.Connection, row: sqlite3.Row, now: float
    ) -> WorkerRecord:
        record = _worker(row)
        updated = evaluate(record, now=now, policy=self.status_policy)
        if updated is not record:
            conn.execute(
                "UPDATE workers SET status = ? WHERE environment_id = ? AND worker_id = ?",
                (updated.status.value, updated.environment_id, updated.worker_id),
            )
        return updated

    def register_worker(
        self,
        environment_id: str,
        worker_id: str,
        *,
        now: float,
        metadata: Mapping[str, object] | None = None,
    ) -> WorkerRecord:
        """Register a worker (``provisioning``), or refresh a known one's metadata.

        A known worker keeps its evaluated status, except that a ``failed``
        one (it never beat in time) starts provisioning again.

        Raises:
            Gone: the worker was deregistered; removal is terminal.
        """
        _check_id("environment_id", environment_id)
        _check_id("worker_id", worker_id)
        meta = json.loads(_json_object("metadata", metadata))
        with self._transaction("registering a worker") as conn:
            self._ensure_environment(conn, environment_id, now)
            row = self._worker_row(conn, environment_id, worker_id)
            if row is None:
                record = new_worker(worker_id, environment_id, now=now, metadata=meta)
            else:
                record = self._evaluated_worker(conn, row, now)
                if record.status is WorkerStatus.REMOVED:
                    raise Gone(f"worker {worker_id!r} was deregistered")
                if record.status is WorkerStatus.FAILED:
                    record = new_worker(worker_id, environment_id, now=now, metadata=meta)
                elif metadata is not None:
                    record = attrs.evolve(record, runtime_metadata=meta)
            self._save_worker(conn, record)
            return record

    def worker_heartbeat(
        self, environment_id: str, report: PresenceReport, *, now: float
    ) -> WorkerRecord:
        """Store a presence report and return the worker's evaluated record.

        A worker not seen before is registered by its first heartbeat.

        Raises:
            BadRequest: a malformed report.
            Gone: the worker was deregistered.
        """
        _check_id("environment_id", environment_id)
        _check_report(report)
        _json_object("runtime_metadata", report.runtime_metadata)
        with self._transaction("recording worker presence") as conn:
            self._ensure_environment(conn, environment_id, now)
            row = self._worker_row(conn, environment_id, report.worker_id)
            if row is None:
                record = new_worker(report.worker_id, environment_id, now=now)
            else:
                record = _worker(row)
                if record.status is WorkerStatus.REMOVED:
                    raise Gone(f"worker {report.worker_id!r} was deregistered")
            record = evaluate(record, now=now, policy=self.status_policy, report=report)
            self._save_worker(conn, record)
            return record

    def get_worker(self, environment_id: str, worker_id: str, *, now: float) -> WorkerRecord:
        """A worker's record, its status evaluated at ``now``.

        Raises:
            NotFound: unknown worker.
        """
        _check_id("environment_id", environment_id)
        with self._transaction("reading a worker") as conn:
            row = self._known_worker_row(conn, environment_id, worker_id)
            return self._evaluated_worker(conn, row, now)

    def list_workers(self, environment_id: str, *, now: float) -> list[WorkerRecord]:
        """Every worker of the environment (removed ones included), in registration order."""
        _check_id("environment_id", environment_id)
        with self._transaction("listing workers") as conn:
            rows = conn.execute(
                "SELECT * FROM workers WHERE environment_id = ? ORDER BY registered_at, rowid",
                (environment_id,),
            ).fetchall()
            return [self._evaluated_worker(conn, row, now) for row in rows]

    def deregister_worker(self, environment_id: str, worker_id: str, *, now: float) -> WorkerRecord:
        """Mark a worker ``removed`` for good; asking again returns the same record.

        Raises:
            NotFound: unknown worker.
        """
        _check_id("environment_id", environment_id)
        with self._transaction("deregistering a worker") as conn:
            row = self._known_worker_row(conn, environment_id, worker_id)
            record = attrs.evolve(_worker(row), status=WorkerStatus.REMOVED)
            self._save_worker(conn, record)
            return record

    # --- delegations ---------------------------------------------------------

    def _session_row(
        self, conn: sqlite3.Connection, environment_id: str, session_id: str
    ) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            "SELECT id, worker_id FROM work_items WHERE environment_id = ? AND session_id = ?",
            (environment_id, session_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"no session {session_id!r} in environment {environment_id!r}")
        return row

    def delegate(self, environment_id: str, source_id: str, task: str, *, now: float) -> Delegation:
        """Queue a work item for ``task`` on behalf of session ``source_id``.

        The new item's metadata links it back (``delegation_id``, ``source_id``,
        ``source_work_id``); the delegation is attributed to the worker bound
        to the source session right now, whose delegation watcher will collect
        the result.

        Raises:
            BadRequest: empty task.
            NotFound: unknown source session.
        """
        _check_id("environment_id", environment_id)
        _check_id("source_id", source_id)
        _check_text("task", task)
        delegation_id = _new_id("dlg")
        work_id = _new_id("work")
        with self._transaction("delegating") as conn:
            self._expire_leases(conn, now)
            source = self._session_row(conn, environment_id, source_id)
            meta = {
                "delegation_id": delegation_id,
                "source_id": source_id,
                "source_work_id": source["id"],
            }
            conn.execute(
                "INSERT INTO work_items (id, environment_id, state, session_id, prompt, "
                "metadata, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (work_id, environment_id, _new_id("sess"), task, json.dumps(meta), now),
            )
            conn.execute(
                "INSERT INTO delegations (id, environment_id, source_id, work_id, task, status, "
                "worker_id, created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                (delegation_id, environment_id, source_id, work_id, task, source["worker_id"], now),
            )
            row = conn.execute("SELECT * FROM delegations WHERE id = ?", (delegation_id,))
            delegation = _delegation(row.fetchone())
        self._notify_submitted(environment_id)
        return delegation

    @staticmethod
    def _settle_delegations(conn: sqlite3.Connection, work_id: str | None = None) -> None:
        """Record the result of every pending delegation whose delegate item has stopped.

        Called in the same transaction as each move to ``stopped`` (stop, a stop
        request on a queued item, a final lease expiry), so a delegate's result is
        recorded exactly when its item ends, whichever way it ends and whichever
        worker (or none) ran it. The delegate's own output (``result``, else the
        outcome's ``reason``) becomes the ``response_preview``, truncated.

        With ``work_id`` only that item's delegation is looked at (one probe of
        the partial index of pending delegations); without, every pending one.
        """
        sql = (
            "SELECT d.id, w.outcome, w.stopped_at FROM delegations d "
            "JOIN work_items w ON w.id = d.work_id "
            "WHERE d.status = 'pending' AND w.state = 'stopped'"
        )
        params: tuple[str, ...] = ()
        if work_id is not None:
            sql += " AND d.work_id = ?"
            params = (work_id,)
        rows = conn.execute(sql, params).fetchall()
        for row in rows:
            outcome = _outcome_from_json(row["outcome"])
            completed = outcome is not None and outcome.status is OutcomeStatus.COMPLETED
            text = None
            if outcome is not None:
                text = outcome.result if outcome.result is not None else outcome.reason
            conn.execute(
                "UPDATE delegations SET status = ?, response_preview = ?, completed_at = ? "
                "WHERE id = ?",
                (
                    (DelegationStatus.COMPLETED if completed else DelegationStatus.FAILED).value,
                    None if text is None else text[:RESPONSE_PREVIEW_CHARS],
                    row["stopped_at"],
                    row["id"],
                ),
            )

    def list_delegations(
        self,
        environment_id: str,
        worker_id: str,
        *,
        status: DelegationStatus | str | None = None,
        uncollected: bool = False,
    ) -> list[Delegation]:
        """Delegations attributed to ``worker_id``, oldest first.

        Args:
            environment_id: the environment.
            worker_id: the worker the delegations are attributed to.
            status: only delegations with this status.
            uncollected: leave out the results already collected (`collect_delegation`),
                so a watcher's poll costs what is new, not the whole history.
        """
        _check_id("environment_id", environment_id)
        _check_id("worker_id", worker_id)
        wanted = None if status is None else _check_enum("status", status, DelegationStatus)
        if not isinstance(uncollected, bool):
            raise BadRequest(f"uncollected must be true or false, got {_preview(uncollected)}")
        with self._transaction("listing delegations") as conn:
            sql = "SELECT * FROM delegations WHERE environment_id = ? AND worker_id = ?"
            params: list[object] = [environment_id, worker_id]
            if wanted is not None:
                sql += " AND status = ?"
                params.append(wanted.value)
            if uncollected:
                sql += " AND collected_at IS NULL"
            return [_delegation(row) for row in conn.execute(sql + " ORDER BY seq", params)]

    def collect_delegation(
        self, environment_id: str, delegation_id: str, *, now: float
    ) -> Delegation:
        """Mark a delegation's result as collected by its worker; idempotent.

        A collected result is left out of ``list_delegations(..., uncollected=True)``.
        The worker collects a result only after it is safe in its own journal.

        Raises:
            NotFound: unknown delegation.
            Conflict: the delegation has no result yet.
        """
        _check_id("environment_id", environment_id)
        with self._transaction("collecting a delegation result") as conn:
            row = conn.execute(
                "SELECT status FROM delegations WHERE id = ? AND environment_id = ?",
                (delegation_id, environment_id),
            ).fetchone()
            if row is None:
                raise NotFound(f"no delegation {delegation_id!r} in environment {environment_id!r}")
            if row["status"] == DelegationStatus.PENDING:
                raise Conflict(f"delegation {delegation_id!r} has no result to collect yet")
            conn.execute(
                "UPDATE delegations SET collected_at = COALESCE(collected_at, ?) WHERE id = ?",
                (now, delegation_id),
            )
            updated = conn.execute("SELECT * FROM delegations WHERE id = ?", (delegation_id,))
            return _delegation(updated.fetchone())

    def record_delegation_result(
        self,
        environment_id: str,
        delegation_id: str,
        *,
        status: DelegationStatus | str,
        now: float,
        response_preview: str | None = None,
    ) -> Delegation:
        """Record the one result of a delegation.

        Raises:
            BadRequest: ``status`` is not ``completed`` or ``failed``.
            NotFound: unknown delegation.
            Conflict: a result was already recorded.
        """
        _check_id("environment_id", environment_id)
        result = _check_enum("status", status, DelegationStatus)
        if result is DelegationStatus.PENDING:
            raise BadRequest("a delegation result must be completed or failed, not pending")
        if response_preview is not None and not isinstance(response_preview, str):
            raise BadRequest("response_preview must be a string when given")
        with self._transaction("recording a delegation result") as conn:
            row = conn.execute(
                "SELECT * FROM delegations WHERE id = ? AND environment_id = ?",
                (delegation_id, environment_id),
            ).fetchone()
            if row is None:
                raise NotFound(f"no delegation {delegation_id!r} in environment {environment_id!r}")
            if row["status"] != DelegationStatus.PENDING:
                raise Conflict(
                    f"delegation {delegation_id!r} already has a result ({row['status']})"
                )
            conn.execute(
                "UPDATE delegations SET status = ?, response_preview = ?, completed_at = ? "
                "WHERE id = ?",
                (result.value, response_preview, now, delegation_id),
            )
            updated = conn.execute("SELECT * FROM delegations WHERE id = ?", (delegation_id,))
            return _delegation(updated.fetchone())

    # --- messages ----------------------------------------------------------------

    def _add_message(
        self, environment_id: str, session_id: str, body: str, kind: str, now: float
    ) -> SessionMessage:
        _check_id("environment_id", environment_id)
        _check_id("session_id", session_id)
        _check_text("body", body)
        message_id = _new_id("msg")
        with self._transaction(f"storing a {kind}") as conn:
            self._session_row(conn, environment_id, session_id)
            conn.execute(
                "INSERT INTO messages (id, environment_id, session_id, kind, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, environment_id, session_id, kind, body, now),
            )
            row = conn.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
            return _message(row)

    def post_message(
        self, environment_id: str, session_id: str, body: str, *, now: float
    ) -> SessionMessage:
        """Store a follow-up message for a session.

        Raises:
            BadRequest: empty body.
            NotFound: unknown session.
        """
        return self._add_message(environment_id, session_id, body, "message", now)

    def notify(
        self, environment_id: str, session_id: str, body: str, *, now: float
    ) -> SessionMessage:
        """Store a notification for a session (same rules as `post_message`)."""
        return self._add_message(environment_id, session_id, body, "notification", now)

    def list_messages(self, environment_id: str, session_id: str) -> list[SessionMessage]:
        """A session's messages and notifications, oldest first.

        Raises:
            NotFound: unknown session.
        """
        _check_id("environment_id", environment_id)
        with self._transaction("listing messages") as conn:
            self._session_row(conn, environment_id, session_id)
            rows = conn.execute(
                "SELECT * FROM messages WHERE environment_id = ? AND session_id = ? ORDER BY seq",
                (environment_id, session_id),
            )
            return [_message(row) for row in rows]
