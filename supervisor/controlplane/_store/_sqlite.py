"""The SQLite engine of the control-plane store: one file, shared between processes.

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
* **Nothing is deleted by the lifecycle.** Stopped items, removed workers,
  answered delegations and messages stay in the file; inspection calls page
  through them. Only the retention sweep (`Store.purge`) deletes, and only
  what an environment's ``retention`` says has ended long enough ago.
* **Secrets are stored hashed.** The per-claim session credential is returned
  once, to the claiming poller, and only its SHA-256 is kept (it is 256 random
  bits, so a plain hash is as strong as a slow one). It is valid while that
  claim is live and dies with the lease.

The lifecycle itself is `Store`'s (``_items``, ``_workers``, ``_delegations``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from typing import Final

from .._exceptions import ControlPlaneError, TransientError
from .._status import StatusPolicy
from ._base import Store
from ._common import LeasePolicy
from ._sql import NO_TIME, SQLITE, Transaction

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

log = logging.getLogger("supervisor.controlplane")

#: The schema this code writes and understands (kept in ``PRAGMA user_version``).
#: Version 2 added delegation results collected by their worker (``collected_at``);
#: version 3 the retry policy, attempt history, priority, ``not_before`` and dead letter;
#: version 4 routing labels and a per-item timeout; version 5 the environment settings
#: (queue cap, retention, default retry policy) and the indexes of the retention sweep.
SCHEMA_VERSION: Final = 5

#: The version `_SCHEMA` describes; a new file gets it, then every later migration.
_SCHEMA_BASE_VERSION: Final = 4

_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6

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
    retry_policy        TEXT,
    max_attempts        INTEGER,
    history             TEXT NOT NULL DEFAULT '[]',
    not_before          REAL,
    dead                INTEGER NOT NULL DEFAULT 0,
    priority            INTEGER NOT NULL DEFAULT 0,
    idem_key            TEXT,
    labels              TEXT NOT NULL DEFAULT '[]',
    timeout_seconds     REAL,
    UNIQUE (environment_id, session_id)
);
CREATE INDEX work_items_claim ON work_items (environment_id, state, created_at, seq);
CREATE INDEX work_items_claim_by_priority
    ON work_items (environment_id, state, priority DESC, created_at, seq);
CREATE UNIQUE INDEX work_items_key ON work_items (environment_id, idem_key)
    WHERE idem_key IS NOT NULL;
CREATE INDEX work_items_claim_unlabelled
    ON work_items (environment_id, state, priority DESC, created_at, seq) WHERE labels = '[]';
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


def _without(schema: str, index: str, columns: tuple[str, ...]) -> str:
    """``schema`` less one version's index statements and ``work_items`` columns."""
    return "\n".join(
        line
        for line in schema.replace(index, "").splitlines()
        if line.split()[:1] not in ([c] for c in columns)
    )


#: The columns version 4 added to ``work_items``, and its statements on a version 3 file.
_ROUTING_COLUMNS: Final = ("labels", "timeout_seconds")
_ROUTING_INDEX: Final = """CREATE INDEX work_items_claim_unlabelled
    ON work_items (environment_id, state, priority DESC, created_at, seq) WHERE labels = '[]';
"""

#: Version 3 to 4 (both dialects): routing labels (a sorted JSON array, ``[]`` for
#: none; see ``_items.label_filter``) and the per-item execution timeout.
ROUTING_MIGRATION: Final = (
    """
ALTER TABLE work_items ADD COLUMN labels TEXT NOT NULL DEFAULT '[]';
ALTER TABLE work_items ADD COLUMN timeout_seconds REAL;
"""
    + _ROUTING_INDEX
)

#: The schema as version 3 created it.
SCHEMA_V3: Final = _without(_SCHEMA, _ROUTING_INDEX, _ROUTING_COLUMNS)

#: The columns version 3 added to ``work_items``.
_POLICY_COLUMNS: Final = (
    "retry_policy",
    "max_attempts",
    "history",
    "not_before",
    "dead",
    "priority",
    "idem_key",
)

_PRIORITY_INDEX: Final = """CREATE INDEX work_items_claim_by_priority
    ON work_items (environment_id, state, priority DESC, created_at, seq);
CREATE UNIQUE INDEX work_items_key ON work_items (environment_id, idem_key)
    WHERE idem_key IS NOT NULL;
"""

#: The schema as version 2 (and, but for its delegations, version 1) created it.
SCHEMA_BEFORE_POLICIES: Final = _without(SCHEMA_V3, _PRIORITY_INDEX, _POLICY_COLUMNS)

#: Version 2 to 3 (both dialects): the work policies of DESIGN §4.2.
POLICY_COLUMNS_MIGRATION: Final = """
ALTER TABLE work_items ADD COLUMN retry_policy TEXT;
ALTER TABLE work_items ADD COLUMN max_attempts INTEGER;
ALTER TABLE work_items ADD COLUMN history TEXT NOT NULL DEFAULT '[]';
ALTER TABLE work_items ADD COLUMN not_before REAL;
ALTER TABLE work_items ADD COLUMN dead INTEGER NOT NULL DEFAULT 0;
ALTER TABLE work_items ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE work_items ADD COLUMN idem_key TEXT;
CREATE INDEX work_items_claim_by_priority
    ON work_items (environment_id, state, priority DESC, created_at, seq);
CREATE UNIQUE INDEX work_items_key ON work_items (environment_id, idem_key)
    WHERE idem_key IS NOT NULL;
"""

#: Version 4 to 5 (both dialects): the environment settings of DESIGN §4.2 (one row per
#: environment, so every replica and worker sharing the database applies the same ones),
#: and what the retention sweep looks its rows up by.
ENVIRONMENT_SETTINGS_MIGRATION: Final = """
ALTER TABLE environments ADD COLUMN max_queue_depth INTEGER;
ALTER TABLE environments ADD COLUMN retention_seconds REAL;
ALTER TABLE environments ADD COLUMN max_attempts INTEGER;
ALTER TABLE environments ADD COLUMN backoff REAL;
ALTER TABLE environments ADD COLUMN backoff_max REAL;
CREATE INDEX work_items_stopped ON work_items (environment_id, stopped_at)
    WHERE state = 'stopped';
CREATE INDEX delegations_completed ON delegations (environment_id, completed_at)
    WHERE completed_at IS NOT NULL;
CREATE INDEX messages_by_time ON messages (environment_id, created_at);
"""

#: Statements that bring a file of each older schema version up to the next one.
_MIGRATIONS: Final[Mapping[int, str]] = {
    1: """
ALTER TABLE delegations ADD COLUMN collected_at REAL;
CREATE INDEX delegations_pending ON delegations (work_id) WHERE status = 'pending';
CREATE INDEX delegations_uncollected ON delegations (environment_id, worker_id, seq)
    WHERE collected_at IS NULL;
""",
    2: POLICY_COLUMNS_MIGRATION,
    3: ROUTING_MIGRATION,
    4: ENVIRONMENT_SETTINGS_MIGRATION,
}


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


class SQLiteStore(Store):
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
        super().__init__(lease_policy, status_policy)
        self._path = os.fspath(path)
        self._lock = threading.RLock()
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
                script, version = _SCHEMA, _SCHEMA_BASE_VERSION
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

    # --- transactions ---------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, doing: str, now: float | None = None) -> Iterator[Transaction]:
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
                yield Transaction(conn.execute, SQLITE, NO_TIME if now is None else now)
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
