"""What only the PostgreSQL store has: URLs and secrets, migrations, the database clock,
LISTEN/NOTIFY across replicas, claims from many processes, failover between replicas.

The lifecycle itself is checked by the conformance suites and the state machines,
which run on PostgreSQL too. Every test here gets a private schema (`postgres_db`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from postgres_db import apply_old_migrations, private_schema, require_postgres

from supervisor.controlplane import NO_HEARTBEAT, WorkState
from supervisor.controlplane._embedded import EmbeddedControlPlane
from supervisor.controlplane._exceptions import ControlPlaneError, TransientError
from supervisor.controlplane._http import HttpControlPlane
from supervisor.controlplane._server import open_control_plane_server
from supervisor.controlplane._store import LeasePolicy
from supervisor.controlplane._store._dburl import (
    DATABASE_URL_FILE_ENV,
    is_postgres_url,
    redact,
    resolve_database_url,
)

ENV = "default"
ROOT = Path(__file__).resolve().parents[2]
KEY = "postgres-test-key-0123456789"


@pytest.fixture
def url() -> Iterator[str]:
    with private_schema() as schema_url:
        yield schema_url


def _store(url: str, **kwargs: object):  # type: ignore[no-untyped-def]
    from supervisor.controlplane._store._postgres import PostgresStore

    return PostgresStore(url, **kwargs)  # type: ignore[arg-type]


# --- URLs and secrets (no server needed) ---------------------------------------------


def test_postgres_urls_are_told_apart_from_paths_and_http() -> None:
    assert is_postgres_url("postgresql://h/db")
    assert is_postgres_url("postgres://h/db")
    assert not is_postgres_url("http://h:1")
    assert not is_postgres_url("/var/lib/x.sqlite3")
    assert not is_postgres_url(None)


def test_a_password_is_never_shown() -> None:
    shown = redact("postgresql://fleet:hunter2@db.example:5432/sup?schema=a")
    assert "hunter2" not in shown
    assert shown.startswith("postgresql://fleet:***@db.example:5432/sup")
    assert "hunter2" not in redact("postgresql://db/sup?password=hunter2")


def test_the_url_file_supplies_what_the_flag_leaves_out(tmp_path: Path) -> None:
    secret = tmp_path / "db-url"
    secret.write_text("postgresql://fleet:hunter2@db.example:5432/sup\n")
    environ = {DATABASE_URL_FILE_ENV: str(secret)}
    bare = resolve_database_url("postgresql://", environ=environ)
    assert bare.conninfo == "postgresql://fleet:hunter2@db.example:5432/sup"
    assert "hunter2" not in bare.display and "hunter2" not in repr(bare)
    hosted = resolve_database_url("postgresql://fleet@other:6000/sup?schema=blue", environ=environ)
    assert hosted.conninfo == "postgresql://fleet:hunter2@other:6000/sup"
    assert hosted.schema == "blue"


def test_bad_schema_names_and_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match="schema must be"):
        resolve_database_url("postgresql://h/db?schema=Robert'); DROP")
    with pytest.raises(ControlPlaneError, match=DATABASE_URL_FILE_ENV):
        resolve_database_url(
            "postgresql://h/db", environ={DATABASE_URL_FILE_ENV: str(tmp_path / "missing")}
        )


def test_importing_the_package_does_not_import_psycopg() -> None:
    code = "import sys, supervisor, supervisor.controlplane; print('psycopg' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "False"


# --- connection and errors ------------------------------------------------------------


def test_an_unreachable_server_is_a_transient_error_without_psycopg_in_it() -> None:
    require_postgres()
    with pytest.raises(TransientError) as caught:
        _store("postgresql://nobody:hunter2@127.0.0.1:9/nothing", connect_timeout=2)
    assert "hunter2" not in str(caught.value)
    assert caught.value.__cause__ is None or "psycopg" not in type(caught.value).__module__


def test_killed_connections_are_replaced_and_the_store_carries_on(url: str) -> None:
    import psycopg

    store = _store(url)
    try:
        store.submit(ENV, "before", now=0.0)
        with psycopg.connect(require_postgres(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'trio-supervisor' AND pid <> pg_backend_pid() "
                "AND datname = current_database() AND query NOT LIKE '%%LISTEN%%'"
            )
        # Each failure is transient (never a psycopg exception); the pool reconnects.
        for _ in range(5):
            try:
                store.submit(ENV, "after", now=0.0)
                break
            except TransientError:
                continue
        assert [i.data.prompt for i in store.list_work(ENV, now=0.0)] == ["before", "after"]
    finally:
        store.close()


# --- migrations -------------------------------------------------------------------------


def test_replicas_starting_together_migrate_once(url: str) -> None:
    import psycopg

    from supervisor.controlplane._store._postgres import POSTGRES_SCHEMA_VERSION

    stores: list[object] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(_store(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        schema = resolve_database_url(url).schema
        with psycopg.connect(require_postgres()) as conn:
            rows = conn.execute(f"SELECT version FROM {schema}.supervisor_schema").fetchall()
        assert [r[0] for r in rows] == list(range(1, POSTGRES_SCHEMA_VERSION + 1))
    finally:
        for store in stores:
            store.close()  # type: ignore[attr-defined]


def test_a_schema_at_migration_two_gains_routing_labels_and_timeouts(url: str) -> None:
    """Migration 3 on a database that migrations 1 and 2 made: its items stay claimable."""
    import psycopg

    schema = resolve_database_url(url).schema
    with psycopg.connect(require_postgres(), autocommit=True) as conn:
        conn.execute(f"SET search_path TO {schema}")
        apply_old_migrations(conn, (1, 2))
        columns = {
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'work_items'",
                (schema,),
            )
        }
        assert "idem_key" in columns and "labels" not in columns
        conn.execute("INSERT INTO environments (id, created_at) VALUES ('default', 1.0)")
        conn.execute(
            "INSERT INTO work_items (id, environment_id, state, session_id, prompt, metadata, "
            "created_at, priority) VALUES ('work-old', 'default', 'queued', 'sess-old', 'old', "
            "'{}', 1.0, 3)"
        )
    store = _store(url, time_source="caller")
    try:
        old = store.get(ENV, "work-old", now=10.0)
        assert (old.labels, old.timeout, old.priority) == ((), None, 3)
        new = store.submit(ENV, "new", now=10.0, labels=["gpu", "repo:foo"], timeout=9)
        first = store.poll(ENV, worker_id="plain", now=11.0)
        assert first is not None and first.id == "work-old"
        assert store.poll(ENV, worker_id="plain", now=11.0) is None
        assert store.poll(ENV, worker_id="gpu", now=11.0, labels=["gpu"]) is None
        claimed = store.poll(ENV, worker_id="both", now=11.0, labels=["repo:foo", "gpu", "x"])
        assert claimed is not None and claimed.id == new.id and claimed.timeout == 9.0
    finally:
        store.close()
    with psycopg.connect(require_postgres()) as conn:
        rows = conn.execute(f"SELECT version FROM {schema}.supervisor_schema ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4]


def test_the_migrate_command_is_idempotent_and_never_prints_the_password(
    url: str, tmp_path: Path
) -> None:
    secret = tmp_path / "db-url"
    base = url.split("?")[0].replace("postgresql://postgres@", "postgresql://postgres:hunter2@")
    secret.write_text(base)
    env = {**os.environ, DATABASE_URL_FILE_ENV: str(secret), "PYTHONPATH": str(ROOT)}
    schema = resolve_database_url(url).schema
    outputs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "supervisor", "migrate", "--control-plane",
             f"postgresql://?schema={schema}"],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        outputs.append(done.stdout + done.stderr)
    assert "migrated from version 0 to 4" in outputs[0]
    assert "already at version 4" in outputs[1]
    assert all("hunter2" not in out and "***" in out for out in outputs)


# --- the database clock --------------------------------------------------------------


def test_the_database_clock_is_the_time_authority(url: str) -> None:
    """A caller whose clock runs far ahead cannot expire a lease early (nor backdate work)."""
    store = _store(url, lease_policy=LeasePolicy(default_ttl=60.0))
    try:
        db_now = store.database_time()
        item = store.submit(ENV, "job", now=db_now + 3600)
        assert abs(item.created_at - db_now) < 60
        claimed = store.poll(ENV, worker_id="w1", now=0.0)
        assert claimed is not None
        store.ack(ENV, claimed.id, worker_id="w1", now=0.0)
        beat = store.heartbeat(
            ENV, claimed.id, expected_last_heartbeat=NO_HEARTBEAT, now=0.0, desired_ttl_seconds=30
        )
        # A replica an hour (or 30 s) ahead sees the lease as live: nothing to reclaim.
        for skew in (30.0, 3600.0):
            assert store.poll(ENV, worker_id="w2", now=time.time() + skew) is None
            assert store.get(ENV, claimed.id, now=time.time() + skew).state is WorkState.ACTIVE
        again = store.heartbeat(
            ENV, claimed.id, expected_last_heartbeat=beat.last_heartbeat, now=time.time() + 3600
        )
        assert again.lease_extended
    finally:
        store.close()


# --- LISTEN / NOTIFY ------------------------------------------------------------------


def test_a_submit_on_one_replica_wakes_listeners_on_another(url: str) -> None:
    a, b = _store(url), _store(url)
    heard = threading.Event()
    try:
        a.add_submit_listener(lambda environment_id: heard.set())
        time.sleep(0.2)  # the LISTEN thread connects
        b.submit(ENV, "wake up", now=0.0)
        assert heard.wait(10), "the other replica's submit was never heard"
    finally:
        a.close()
        b.close()


def test_closing_at_once_leaves_no_listening_thread(url: str) -> None:
    """A close that beats the LISTEN (no notification can wake it) still ends the thread."""
    for _ in range(3):
        store = _store(url)
        store.add_submit_listener(lambda environment_id: None)
        store.close()
    assert not [t for t in threading.enumerate() if t.name == "supervisor-store-listen"]


async def test_a_long_poll_wakes_on_another_replicas_submit_without_rechecking(url: str) -> None:
    a, b = await trio.to_thread.run_sync(lambda: (_store(url), _store(url)))
    try:
        # poll_interval is longer than the test's deadline: only a notification can wake it.
        async with (
            EmbeddedControlPlane(a, poll_interval=600) as waiting,
            EmbeddedControlPlane(b, poll_interval=600) as other,
        ):
            await waiting.poll(worker_id="w0")  # binds the plane to this Trio run
            got: list[object] = []

            async def poll() -> None:
                got.append(await waiting.poll(worker_id="w1", block_ms=60_000))

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(poll)
                    await trio.sleep(0.3)
                    submitted = await other.submit("across replicas")
            assert [getattr(i, "id", None) for i in got] == [submitted.id]
    finally:
        await trio.to_thread.run_sync(a.close)
        await trio.to_thread.run_sync(b.close)


# --- claims from many processes ----------------------------------------------------------


@pytest.mark.slow
def test_eight_processes_claim_a_thousand_items_each_exactly_once(url: str, tmp_path: Path) -> None:
    store = _store(url)
    try:
        submitted = {store.submit(ENV, f"job {n}", now=0.0).id for n in range(1000)}
    finally:
        store.close()
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("pg_claim_process.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), url, f"claimer-{n}", str(go)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in range(8)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        claims: list[list[str]] = []
        for proc in procs:
            out, _ = proc.communicate(timeout=90)
            assert proc.returncode == 0
            claims.append(out.split())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    counts = Counter(item for one in claims for item in one)
    assert set(counts) == submitted
    assert max(counts.values()) == 1
    assert sum(1 for one in claims if one) >= 2, "the claims were not concurrent at all"


# --- served replicas -----------------------------------------------------------------------


@asynccontextmanager
async def _replica(url: str, skew: float = 0.0) -> AsyncIterator[str]:
    """A reference server over its own PostgresStore, its own clock ``skew`` seconds off."""
    store = await trio.to_thread.run_sync(lambda: _store(url))

    def environment(environment_id: str) -> EmbeddedControlPlane:
        return EmbeddedControlPlane(
            store, environment_id=environment_id, clock=lambda: time.time() + skew
        )

    try:
        async with open_control_plane_server(environment, key_provider=KEY) as base:
            yield base
    finally:
        await trio.to_thread.run_sync(store.close)


@pytest.mark.slow
async def test_two_replicas_with_skewed_clocks_never_expire_a_lease_early(url: str) -> None:
    async with (
        _replica(url) as honest,
        _replica(url, skew=30.0) as ahead,
        HttpControlPlane.open(honest, key=KEY) as on_honest,
        HttpControlPlane.open(ahead, key=KEY) as on_ahead,
    ):
        items = [await on_honest.submit(f"job {n}") for n in range(4)]
        tokens = {}
        for _ in items:
            claimed = await on_honest.poll(worker_id="w1")
            assert claimed is not None
            await on_honest.ack(claimed.id, worker_id="w1")
            beat = await on_honest.heartbeat(
                claimed.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=20
            )
            tokens[claimed.id] = beat.last_heartbeat
        # The replica 30 s ahead would see every 20 s lease as expired by its own clock.
        assert await on_ahead.poll(worker_id="w2", reclaim_older_than_ms=0) is None
        for item in items:
            assert (await on_ahead.get(item.id)).state is WorkState.ACTIVE
            # The holder's next beat may go through either replica.
            beat = await on_ahead.heartbeat(item.id, expected_last_heartbeat=tokens[item.id])
            assert beat.lease_extended
        assert (await on_ahead.stats()).pending == 4


async def test_a_worker_fails_over_to_the_next_replica(url: str) -> None:
    async with _replica(url) as first, _replica(url) as second:
        pass  # ``first`` is closed now: nothing listens on its port
    async with (
        _replica(url) as live,
        HttpControlPlane.open([first, second, live], key=KEY) as plane,
    ):
        item = await plane.submit("through whichever answers")
        assert plane.base_url == live
        assert plane.failovers == 2
        assert (await plane.get(item.id)).id == item.id


# --- without a server ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("true", "1 error")])
def test_without_a_server_the_tests_skip_with_how_to_enable_them_or_fail_in_ci(
    ci: str, outcome: str
) -> None:
    env = {
        **os.environ,
        "SUPERVISOR_TEST_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/nothing",
        "CI": ci,
    }
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
            "tests/controlplane/test_postgres_store.py", "-k", "database_clock",
        ],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert outcome in done.stdout, done.stdout
    assert "set SUPERVISOR_TEST_DATABASE_URL" in done.stdout


def test_a_worker_config_never_shows_the_database_password() -> None:
    from supervisor._worker._config import WorkerConfig

    config = WorkerConfig(control_plane="postgresql://fleet:hunter2@db/sup")
    assert "hunter2" not in repr(config)
    assert "postgresql://fleet:***@db/sup" in repr(config)


@pytest.mark.slow
def test_submit_status_cancel_work_directly_and_status_hides_the_password(url: str) -> None:
    """The password reaches libpq (trust auth ignores it) and no output line."""
    with_password = url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "supervisor", *args, "--control-plane", with_password],
            capture_output=True, text=True, env=env, check=True, cwd=ROOT,
        )  # fmt: skip
        assert "hunter2" not in done.stdout + done.stderr
        return done.stdout

    work_id = cli("submit", "via the database").strip()
    assert work_id.startswith("work_")
    status = cli("status", "--json")
    assert work_id in status and "postgresql://postgres:***@" in status
    cli("cancel", work_id)
    store = _store(url)
    try:
        assert store.get(ENV, work_id, now=0.0).state is WorkState.STOPPED
    finally:
        store.close()
