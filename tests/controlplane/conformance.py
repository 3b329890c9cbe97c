"""The conformance targets: one suite, run against every `ControlPlane` implementation.

The ``control_plane`` fixture (``conftest.py`` beside this module) yields a
`ConformanceTarget`: the implementation under test plus the `ManualClock` its
store reads, so a test moves time with
``target.clock.advance(seconds)`` and lease expiry or worker ageing happens at
once, deterministically, with no sleeping.

Adding an implementation (this is where the HTTP variant plugs in): write an
async context manager ``factory(tmp_path, clock, lease_policy, status_policy)``
that yields a ready `ControlPlane` whose store uses *that* clock and *those*
policies, and add it to `IMPLEMENTATIONS` below. For ``"http"``: open a
`SQLiteStore` in ``tmp_path`` with the policies, start the reference server on
``127.0.0.1`` port 0 over it with ``clock=clock``, and yield an
``HttpControlPlane`` pointed at the bound URL; close both on exit.

The PostgreSQL planes (``postgres``: the store called directly; ``http-postgres``:
the reference server over it) put each test in a schema of its own and run the
store on the test's clock (``time_source="caller"``); without a server they skip
(fail under ``CI=true``), see ``tests/postgres_db.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import attrs
import trio
from postgres_db import private_schema

from supervisor.controlplane import (
    ControlPlane,
    EmbeddedControlPlane,
    HttpControlPlane,
    LeasePolicy,
    SQLiteStore,
    StatusPolicy,
    open_control_plane_server,
)
from supervisor.controlplane._store import Store
from supervisor.testing import ManualClock

#: Policies every implementation runs with (the defaults, spelled out so tests can use them).
LEASE_POLICY = LeasePolicy(
    default_ttl=60.0,
    min_ttl=1.0,
    max_ttl=3600.0,
    max_attempts=3,
    reclaim_older_than_ms=30_000,
    polling_window=60.0,
)
STATUS_POLICY = StatusPolicy(
    provision_timeout=300.0, offline_after=90.0, degrade_error_rate=0.5, recover_error_rate=0.1
)


@attrs.frozen
class ConformanceTarget:
    """What a conformance test gets: the control plane and the clock behind it."""

    cp: ControlPlane
    clock: ManualClock
    implementation: str
    #: The store behind the plane: environment settings and the retention sweep are its
    #: owner's calls (the server's, the worker's), not calls of the protocol.
    store: Store
    lease: LeasePolicy = LEASE_POLICY
    status: StatusPolicy = STATUS_POLICY


Factory = Callable[
    [Path, ManualClock, LeasePolicy, StatusPolicy],
    AbstractAsyncContextManager[tuple[ControlPlane, Store]],
]


@asynccontextmanager
async def _embedded(
    tmp_path: Path, clock: ManualClock, lease: LeasePolicy, status: StatusPolicy
) -> AsyncIterator[tuple[ControlPlane, Store]]:
    async with EmbeddedControlPlane(
        tmp_path / "controlplane.sqlite3",
        clock=clock,
        threaded=True,
        poll_interval=0.02,
        lease_policy=lease,
        status_policy=status,
    ) as cp:
        yield cp, cp.store


@asynccontextmanager
async def _embedded_inline(
    tmp_path: Path, clock: ManualClock, lease: LeasePolicy, status: StatusPolicy
) -> AsyncIterator[tuple[ControlPlane, Store]]:
    async with EmbeddedControlPlane(
        tmp_path / "controlplane.sqlite3",
        clock=clock,
        threaded=False,
        poll_interval=0.02,
        lease_policy=lease,
        status_policy=status,
    ) as cp:
        yield cp, cp.store


#: The environment key the "http" implementation's server and client share.
HTTP_KEY = "conformance-key-0123456789"


@asynccontextmanager
async def _served(store: Store, clock: ManualClock) -> AsyncIterator[ControlPlane]:
    def environment(environment_id: str) -> ControlPlane:
        return EmbeddedControlPlane(
            store, environment_id=environment_id, clock=clock, poll_interval=0.02
        )

    async with (
        open_control_plane_server(environment, key_provider=HTTP_KEY) as url,
        HttpControlPlane.open(url, key=HTTP_KEY) as cp,
    ):
        yield cp


@asynccontextmanager
async def _http(
    tmp_path: Path, clock: ManualClock, lease: LeasePolicy, status: StatusPolicy
) -> AsyncIterator[tuple[ControlPlane, Store]]:
    store = SQLiteStore(tmp_path / "controlplane.sqlite3", lease_policy=lease, status_policy=status)
    try:
        async with _served(store, clock) as cp:
            yield cp, store
    finally:
        store.close()


@asynccontextmanager
async def _postgres_store(lease: LeasePolicy, status: StatusPolicy) -> AsyncIterator[Store]:
    """A `PostgresStore` in a private schema, on the caller's (manual) clock."""
    from supervisor.controlplane._store._postgres import PostgresStore

    with private_schema() as url:
        store = await trio.to_thread.run_sync(
            lambda: PostgresStore(
                url, lease_policy=lease, status_policy=status, time_source="caller"
            )
        )
        try:
            yield store
        finally:
            await trio.to_thread.run_sync(store.close)


@asynccontextmanager
async def _postgres(
    tmp_path: Path, clock: ManualClock, lease: LeasePolicy, status: StatusPolicy
) -> AsyncIterator[tuple[ControlPlane, Store]]:
    async with (
        _postgres_store(lease, status) as store,
        EmbeddedControlPlane(store, clock=clock, poll_interval=0.02) as cp,
    ):
        yield cp, store


@asynccontextmanager
async def _http_postgres(
    tmp_path: Path, clock: ManualClock, lease: LeasePolicy, status: StatusPolicy
) -> AsyncIterator[tuple[ControlPlane, Store]]:
    async with _postgres_store(lease, status) as store, _served(store, clock) as cp:
        yield cp, store


IMPLEMENTATIONS: dict[str, Factory] = {
    "embedded": _embedded,  # store calls in worker threads (the default)
    "embedded-inline": _embedded_inline,  # store calls in the Trio thread (MockClock mode)
    "http": _http,  # the reference server on 127.0.0.1 (port 0) + HttpControlPlane
    "postgres": _postgres,  # PostgresStore in a private schema, called directly
    "http-postgres": _http_postgres,  # the reference server over that PostgresStore
}
