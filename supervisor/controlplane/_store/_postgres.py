"""The PostgreSQL engine of the control-plane store: one database, any number of replicas.

The lifecycle is `Store`'s, line for line; this module says only how to reach
PostgreSQL and where it differs from SQLite:

* **Claims skip, never wait.** The claim query ends ``FOR UPDATE SKIP LOCKED``,
  so concurrent pollers (in any number of processes and machines) each take a
  different row, and a row being changed is read ``FOR UPDATE`` first. Every
  call is one transaction (``READ COMMITTED``); the fencing token is also part
  of each fenced ``UPDATE``'s ``WHERE``.
* **One time authority.** By default ``now`` is the database's
  ``clock_timestamp()``, read at the start of each transaction, whatever the
  caller passed: replicas with skewed clocks agree on every lease. A test may
  pass ``time_source="caller"`` to drive time with a manual clock.
* **Wake-ups across replicas.** A commit that makes work claimable sends
  ``NOTIFY`` on a channel named after the schema; every store with a listener
  keeps one connection in ``LISTEN`` (a thread of its own) and wakes its
  pollers, wherever the submit came from.
* **Versioned migrations under an advisory lock**, applied when a store opens
  (or by ``python -m supervisor migrate``): replicas starting together apply
  each version once, the others wait for the lock and find nothing to do.
* **Errors translated at the boundary.** Connection loss, a server shutting
  down, serialization failures, deadlocks and lock or pool timeouts are
  `TransientError` (retry); anything else is `ControlPlaneError`. No psycopg
  exception leaves this module, and no message carries the password.

psycopg is imported here and only here; nothing imports this module unless a
``postgresql://`` URL is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal

import psycopg
import psycopg.errors
import psycopg_pool
import trio
from psycopg import sql as pgsql
from psycopg.rows import dict_row

from .._exceptions import ControlPlaneError, TransientError
from .._status import StatusPolicy
from ._base import Store
from ._common import DEFAULT_ENVIRONMENT_ID, LeasePolicy
from ._dburl import DatabaseUrl, resolve_database_url
from ._sql import NO_TIME, POSTGRES, Transaction
from ._sqlite import (
    ENVIRONMENT_SETTINGS_MIGRATION,
    POLICY_COLUMNS_MIGRATION,
    ROUTING_MIGRATION,
    SCHEMA_BEFORE_POLICIES,
)

if TYPE_CHECKING:
    from .._embedded import EmbeddedControlPlane

__all__ = ["POSTGRES_SCHEMA_VERSION", "PostgresStore", "migrate", "open_postgres_control_plane"]

log = logging.getLogger("supervisor.controlplane")

TimeSource = Literal["database", "caller"]

#: SQLSTATE classes that mean "try again": connection exception, transaction rollback
#: (serialization failure, deadlock), insufficient resources, operator intervention
#: (admin shutdown, cancelled statement), plus lock_not_available.
_TRANSIENT_CLASSES: Final = ("08", "40", "53", "57")
_TRANSIENT_STATES: Final = ("55P03",)


def _postgres_ddl(sqlite_ddl: str) -> str:
    """SQLite's schema in PostgreSQL's spelling (one schema, two dialects).

    Environments and workers get an identity column called ``rowid``, so the
    shared queries that order by SQLite's implicit ``rowid`` work unchanged.
    """
    ddl = sqlite_ddl.replace(
        "INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    ).replace(" REAL", " DOUBLE PRECISION")
    for table in ("environments", "workers"):
        ddl = ddl.replace(
            f"CREATE TABLE {table} (\n",
            f"CREATE TABLE {table} (\n    rowid BIGINT GENERATED ALWAYS AS IDENTITY,\n",
        )
    return ddl


#: Each version's statements, applied in order, each version in one transaction.
_MIGRATIONS: Final[Mapping[int, str]] = {
    1: _postgres_ddl(SCHEMA_BEFORE_POLICIES),
    2: _postgres_ddl(POLICY_COLUMNS_MIGRATION),
    3: _postgres_ddl(ROUTING_MIGRATION),
    4: _postgres_ddl(ENVIRONMENT_SETTINGS_MIGRATION),
}

#: The newest schema version this code writes and understands.
POSTGRES_SCHEMA_VERSION: Final = max(_MIGRATIONS)


def _translate(exc: BaseException, doing: str) -> ControlPlaneError:
    """Map a psycopg (or pool) exception onto the package's tree (the caller chains it)."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return TransientError(
            f"control-plane database unreachable while {doing}: no connection within the "
            "pool timeout",
            status_code=503,
        )
    state = getattr(exc, "sqlstate", None) or ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    transient = (
        state[:2] in _TRANSIENT_CLASSES
        or state in _TRANSIENT_STATES
        or (not state and isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError))
    )
    if transient:
        return TransientError(
            f"control-plane database unavailable while {doing}: {text}", status_code=503
        )
    return ControlPlaneError(
        f"control-plane database failed while {doing}: {text}", status_code=500
    )


#: One round trip: open the transaction and read the one clock every lease is timed by.
_BEGIN_AND_READ_CLOCK: Final = "BEGIN; SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now"


def _rollback(conn: psycopg.Connection[Any]) -> None:
    if conn.broken or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute("ROLLBACK")


def _channel(schema: str) -> str:
    """The ``NOTIFY`` channel of one store (one per schema, so tests never wake each other)."""
    return "supervisor_work_" + hashlib.sha256(schema.encode()).hexdigest()[:16]


def _apply_migrations(conn: psycopg.Connection[Any], schema: str | None) -> int:
    """Bring the store's schema up to `POSTGRES_SCHEMA_VERSION`; return the version found.

    Runs under a transaction-scoped advisory lock keyed by the schema, so replicas
    that start together apply each version exactly once.
    """
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))",
            ("supervisor.migrate:" + (schema or ""),),
        )
        if schema is not None:
            conn.execute(
                pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(schema))
            )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS supervisor_schema ("
            "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        row = conn.execute(
            "SELECT COALESCE(MAX(version), 0) AS v FROM supervisor_schema"
        ).fetchone()
        found = int(row["v"]) if row is not None else 0
        if found > POSTGRES_SCHEMA_VERSION:
            raise ControlPlaneError(
                f"the database has control-plane schema version {found}; this release "
                f"understands version {POSTGRES_SCHEMA_VERSION}"
            )
        for version in range(found + 1, POSTGRES_SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement.encode())
            conn.execute("INSERT INTO supervisor_schema (version) VALUES (%s)", (version,))
            log.info("control-plane schema migrated to version %d", version)
    return found


class PostgresStore(Store):
    """The control plane's state in PostgreSQL, shared by any number of processes and hosts.

    Args:
        url: a ``postgresql://`` URL (see `resolve_database_url` for the password and
            ``?schema=``), or an already resolved `DatabaseUrl`.
        lease_policy: TTL bounds, attempts and reclaim window.
        status_policy: the worker status thresholds.
        time_source: ``"database"`` (the default: the server's clock is the one time
            authority) or ``"caller"`` (the ``now`` each call passes; for tests).
        pool_size: the most connections this store opens at once.
        connect_timeout: seconds a call waits for a connection before `TransientError`.
        lock_timeout: seconds a statement waits for a row lock before `TransientError`.

    Raises:
        ControlPlaneError: the database cannot be reached (`TransientError`) or has a
            schema newer than this code.
    """

    wakes_across_processes = True

    def __init__(
        self,
        url: str | DatabaseUrl,
        *,
        lease_policy: LeasePolicy | None = None,
        status_policy: StatusPolicy | None = None,
        time_source: TimeSource = "database",
        pool_size: int = 4,
        connect_timeout: float = 10.0,
        lock_timeout: float = 10.0,
    ) -> None:
        if time_source not in ("database", "caller"):
            raise ValueError(f"time_source must be 'database' or 'caller', got {time_source!r}")
        super().__init__(lease_policy, status_policy)
        self._url = url if isinstance(url, DatabaseUrl) else resolve_database_url(url)
        self._time_source = time_source
        self._closed = False
        self._lock_timeout_ms = int(lock_timeout * 1000)
        self._connect_timeout = connect_timeout
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._stopping = threading.Event()
        try:
            with self._connect() as conn:
                schema = self._url.schema
                _apply_migrations(conn, schema)
                row = conn.execute("SELECT current_schema() AS s").fetchone()
                self._schema = str(row["s"]) if row and row["s"] else (schema or "public")
        except psycopg.Error as exc:
            raise _translate(exc, f"opening {self._url.display}") from None
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = (
            psycopg_pool.ConnectionPool(
                self._url.conninfo,
                min_size=1,
                max_size=max(1, pool_size),
                kwargs=self._connection_kwargs(),
                configure=self._configure,
                timeout=connect_timeout,
                name="supervisor-store",
                open=True,
            )
        )

    def __repr__(self) -> str:
        return f"<PostgresStore {self._url.display} {'closed' if self._closed else 'open'}>"

    @property
    def path(self) -> str:
        """The database, password hidden."""
        return self._url.display

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def schema(self) -> str:
        """The schema the store's tables live in."""
        return self._schema

    # --- connections ------------------------------------------------------------

    def _connection_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,  # transactions are explicit: conn.transaction()
            "row_factory": dict_row,
            "connect_timeout": max(1, int(self._connect_timeout)),
            "application_name": "trio-supervisor",
        }

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        if self._url.schema is not None:
            conn.execute(
                pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self._url.schema))
            )
        conn.execute(pgsql.SQL("SET lock_timeout = {}").format(self._lock_timeout_ms))

    def _connect(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = psycopg.Connection.connect(
            self._url.conninfo, **self._connection_kwargs()
        )
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _transaction(self, doing: str, now: float | None = None) -> Iterator[Transaction]:
        if self._closed:
            raise ControlPlaneError(f"the control-plane store is closed ({doing})")
        try:
            conn, now = self._begin(now)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise _translate(exc, doing) from exc
        try:
            tx = Transaction(conn.execute, POSTGRES, NO_TIME if now is None else now)
            yield tx
            for environment_id in sorted(tx.announced):
                conn.execute("SELECT pg_notify(%s, %s)", (_channel(self._schema), environment_id))
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            _rollback(conn)
            raise _translate(exc, doing) from exc
        except BaseException:
            _rollback(conn)
            raise
        finally:
            self._pool.putconn(conn)

    def _begin(self, now: float | None) -> tuple[psycopg.Connection[Any], float | None]:
        """A pooled connection in a fresh transaction, and the transaction's time.

        ``BEGIN`` and the clock read go in one round trip. A pooled connection
        found dead (the server restarted while it sat idle) is dropped and the
        transaction begun once more on a new one: nothing was sent on it, so
        nothing can have happened twice. Checking every connection on the way
        out of the pool would cost a round trip per call instead.
        """
        read_clock = now is not None and self._time_source == "database"
        for attempt in (1, 2):
            conn = self._pool.getconn()
            try:
                if read_clock:
                    cursor = conn.execute(_BEGIN_AND_READ_CLOCK)
                    cursor.nextset()  # past BEGIN's result, to the clock's
                    row = cursor.fetchone()
                    assert row is not None
                    now = float(row["now"])
                else:
                    conn.execute("BEGIN")
            except psycopg.OperationalError:
                broken = conn.broken
                self._pool.putconn(conn)
                if broken and attempt == 1:
                    continue
                raise
            except BaseException:
                self._pool.putconn(conn)
                raise
            return conn, now
        raise AssertionError("unreachable")

    def database_time(self) -> float:
        """The database server's clock now, in POSIX seconds."""
        with self._transaction("reading the database clock", 0.0) as tx:
            if self._time_source == "database":
                return tx.now
            row = tx.one("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now")
            assert row is not None
            return float(row["now"])

    # --- LISTEN / NOTIFY ------------------------------------------------------------

    def add_submit_listener(self, listener: Callable[[str], None]) -> None:
        """As `Store.add_submit_listener`, for commits from any process on the database."""
        super().add_submit_listener(listener)
        with self._listener_lock:
            if self._listener is None and not self._closed:
                self._listener = threading.Thread(
                    target=self._listen, name="supervisor-store-listen", daemon=True
                )
                self._listener.start()

    def _listen(self) -> None:
        """Keep one connection in ``LISTEN`` and relay each notification to the listeners.

        A lost connection is reopened after a short pause; notifications sent
        meanwhile are lost, which costs a poller no more than its re-check interval.
        """
        channel = _channel(self._schema)
        pause = 0.1
        failures = 0
        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))
                    if failures:
                        log.info(
                            "control-plane LISTEN connection back after %d attempt(s)", failures
                        )
                        # What was sent meanwhile is lost: let every poller look once.
                        self._notify_all_environments()
                    pause, failures = 0.1, 0
                    # `close` wakes this loop with a notification; the timeout covers a
                    # close that came before the LISTEN did.
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if self._stopping.is_set():
                                return
                            self._notify_submitted([note.payload])
            except psycopg.Error as exc:
                if self._stopping.is_set():
                    return
                failures += 1
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "control-plane LISTEN connection lost, reconnecting: %s",
                    _translate(exc, "listening"),
                )
            self._stopping.wait(pause)
            pause = min(pause * 2, 2.0)

    def _notify_all_environments(self) -> None:
        try:
            environments = self.list_environments()
        except ControlPlaneError:
            return
        self._notify_submitted(environments)

    def close(self) -> None:
        """Stop listening and close every connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        listener = self._listener
        if listener is not None:
            # Wake the LISTEN loop: it sees the stop flag with the next notification.
            with (
                contextlib.suppress(psycopg.Error, psycopg_pool.PoolTimeout),
                self._pool.connection(timeout=2.0) as conn,
            ):
                conn.execute("SELECT pg_notify(%s, '')", (_channel(self._schema),))
            listener.join(timeout=5.0)
        self._pool.close(timeout=5.0)


def migrate(url: str | DatabaseUrl) -> tuple[int, int]:
    """Apply any pending migrations; return ``(version found, version now)``.

    Raises:
        ControlPlaneError: the database is unreachable or newer than this code.
    """
    resolved = url if isinstance(url, DatabaseUrl) else resolve_database_url(url)
    try:
        with psycopg.Connection.connect(
            resolved.conninfo, autocommit=True, row_factory=dict_row, connect_timeout=10
        ) as conn:
            if resolved.schema is not None:
                conn.execute(
                    pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(resolved.schema))
                )
            found = _apply_migrations(conn, resolved.schema)
    except psycopg.Error as exc:
        raise _translate(exc, f"migrating {resolved.display}") from None
    return found, POSTGRES_SCHEMA_VERSION


@asynccontextmanager
async def open_postgres_control_plane(
    url: str | DatabaseUrl,
    *,
    environment_id: str = DEFAULT_ENVIRONMENT_ID,
    clock: Callable[[], float] = time.time,
    poll_interval: float = 2.0,
    lease_policy: LeasePolicy | None = None,
    status_policy: StatusPolicy | None = None,
    time_source: TimeSource = "database",
) -> AsyncIterator[EmbeddedControlPlane]:
    """A `ControlPlane` that talks to PostgreSQL directly, for the block.

    The store is opened (and migrated) in a worker thread and closed in a
    shielded, bounded scope. A poll wakes on ``NOTIFY`` from any process;
    ``poll_interval`` is only the re-check for leases that expire meanwhile.
    """
    from .._embedded import EmbeddedControlPlane

    store = await trio.to_thread.run_sync(
        lambda: PostgresStore(
            url,
            lease_policy=lease_policy,
            status_policy=status_policy,
            time_source=time_source,
        )
    )
    try:
        async with EmbeddedControlPlane(
            store, environment_id=environment_id, clock=clock, poll_interval=poll_interval
        ) as control_plane:
            yield control_plane
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await trio.to_thread.run_sync(store.close)
