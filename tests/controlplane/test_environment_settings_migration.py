"""Upgrading a store from before the environment settings (SQLite 3 -> 4, PostgreSQL 2 -> 3).

The items, keys and histories of an older store survive; every environment gets
the settings columns, unset (no cap, keep forever, no default retries), and the
new policies work at once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from postgres_db import apply_old_migrations, private_schema, require_postgres

from supervisor.controlplane import EnvironmentSettings, QueueFull, SQLiteStore
from supervisor.controlplane._store import _SCHEMA, SCHEMA_VERSION
from supervisor.controlplane._store._dburl import resolve_database_url

NOW = 1_000_000.0


def test_a_version_four_file_is_migrated_and_keeps_its_items(tmp_path: Path) -> None:
    path = tmp_path / "v4.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(_SCHEMA)  # the schema as version 4 wrote it
    raw.execute("INSERT INTO environments (id, created_at) VALUES ('default', 1.0)")
    raw.execute(
        "INSERT INTO work_items (id, environment_id, state, session_id, prompt, metadata, "
        "created_at, stopped_at, idem_key, history) VALUES ('work_old', 'default', 'stopped', "
        "'sess_old', 'from version 4', '{}', 1.0, 2.0, 'k-old', '[]')"
    )
    raw.execute("PRAGMA user_version = 4")
    raw.commit()
    raw.close()
    store = SQLiteStore(path)
    try:
        assert store.environment_settings("default", now=NOW) == EnvironmentSettings()
        (item,) = store.list_work("default", now=NOW)
        assert (item.id, item.key, item.data.prompt) == ("work_old", "k-old", "from version 4")
        store.configure_environment("default", {"max_queue_depth": 1, "retention": 10.0}, now=NOW)
        store.submit("default", "new", now=NOW)
        with pytest.raises(QueueFull):
            store.submit("default", "one too many", now=NOW)
        assert store.purge_expired(now=NOW, limit=10) == 1  # the old stopped item
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        indexes = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"work_items_stopped", "delegations_completed", "messages_by_time"} <= indexes
    finally:
        raw.close()


def test_a_new_file_has_the_same_tables_as_a_migrated_one(tmp_path: Path) -> None:
    def columns(path: Path) -> dict[str, list[str]]:
        raw = sqlite3.connect(path)
        try:
            tables = [
                r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            return {t: sorted(r[1] for r in raw.execute(f"PRAGMA table_info({t})")) for t in tables}
        finally:
            raw.close()

    old = tmp_path / "old.sqlite3"
    raw = sqlite3.connect(old)
    raw.executescript(_SCHEMA)
    raw.execute("PRAGMA user_version = 4")
    raw.close()
    SQLiteStore(old).close()
    SQLiteStore(tmp_path / "new.sqlite3").close()
    assert columns(old) == columns(tmp_path / "new.sqlite3")


def test_a_postgres_schema_at_version_two_is_migrated() -> None:
    import psycopg

    from supervisor.controlplane._store._postgres import PostgresStore

    require_postgres()
    with private_schema() as url:
        resolved = resolve_database_url(url)
        schema = resolved.schema
        with psycopg.connect(resolved.conninfo, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {schema}")
            apply_old_migrations(conn, (1, 2))
            conn.execute("INSERT INTO environments (id, created_at) VALUES ('default', 1.0)")
            conn.execute(
                "INSERT INTO work_items (id, environment_id, state, session_id, prompt, "
                "metadata, created_at) VALUES ('work_old', 'default', 'queued', 's', "
                "'from version 2', '{}', 1.0)"
            )
        store = PostgresStore(url, time_source="caller")
        try:
            assert store.environment_settings("default", now=NOW) == EnvironmentSettings()
            store.configure_environment("default", {"max_queue_depth": 1}, now=NOW)
            with pytest.raises(QueueFull):
                store.submit("default", "one too many", now=NOW)
            assert [i.id for i in store.list_work("default", now=NOW)] == ["work_old"]
        finally:
            store.close()
        with psycopg.connect(resolved.conninfo) as conn:
            versions = conn.execute(f"SELECT version FROM {schema}.supervisor_schema").fetchall()
        assert [v[0] for v in versions] == [1, 2, 3, 4]
