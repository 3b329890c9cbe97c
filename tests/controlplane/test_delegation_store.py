"""The SQLite store's delegation schema: a version-1 file is migrated in place, losing nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from supervisor.controlplane import DelegationStatus, SQLiteStore
from supervisor.controlplane._store import SCHEMA_BEFORE_POLICIES, SCHEMA_VERSION

NOW = 1_700_000_000.0


def version_one_schema() -> str:
    """The schema as version 1 wrote it: no ``collected_at``, no delegation indexes of v2."""
    text = SCHEMA_BEFORE_POLICIES.replace(
        "    completed_at        REAL,\n    collected_at        REAL\n",
        "    completed_at        REAL\n",
    )
    start = text.index("CREATE INDEX delegations_pending")
    end = text.index("CREATE TABLE messages")
    return text[:start] + text[end:]


def make_version_one_file(path: Path) -> None:
    raw = sqlite3.connect(path)
    try:
        raw.executescript(version_one_schema())
        raw.execute("PRAGMA user_version = 1")
        columns = [row[1] for row in raw.execute("PRAGMA table_info(delegations)")]
        assert "collected_at" not in columns and "completed_at" in columns
        raw.execute("INSERT INTO environments (id, created_at) VALUES ('default', ?)", (NOW,))
        raw.execute(
            "INSERT INTO work_items (id, environment_id, state, session_id, prompt, metadata, "
            "created_at, worker_id) VALUES ('work-a', 'default', 'active', 'sess-a', 'p', '{}', ?, "
            "'w1')",
            (NOW,),
        )
        raw.execute(
            "INSERT INTO work_items (id, environment_id, state, session_id, prompt, metadata, "
            "created_at) VALUES ('work-b', 'default', 'queued', 'sess-b', 'sub', '{}', ?)",
            (NOW,),
        )
        raw.execute(
            "INSERT INTO delegations (id, environment_id, source_id, work_id, task, status, "
            "worker_id, created_at, completed_at, response_preview) "
            "VALUES ('dlg-1', 'default', 'sess-a', 'work-b', 'sub', 'completed', 'w1', ?, ?, 'ok')",
            (NOW, NOW + 1),
        )
        raw.commit()
    finally:
        raw.close()


def test_a_version_one_file_is_migrated_and_keeps_its_delegations(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    make_version_one_file(path)
    store = SQLiteStore(path)
    try:
        (found,) = store.list_delegations("default", "w1", uncollected=True)
        assert (found.id, found.status, found.response_preview) == (
            "dlg-1",
            DelegationStatus.COMPLETED,
            "ok",
        )
        assert found.collected_at is None
        store.collect_delegation("default", "dlg-1", now=NOW + 5)
        assert store.list_delegations("default", "w1", uncollected=True) == []
    finally:
        store.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        indexes = {row[1] for row in raw.execute("PRAGMA index_list(delegations)")}
        assert {"delegations_pending", "delegations_uncollected"} <= indexes
    finally:
        raw.close()


def test_reopening_a_migrated_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    make_version_one_file(path)
    SQLiteStore(path).close()
    store = SQLiteStore(path)
    try:
        assert [d.id for d in store.list_delegations("default", "w1")] == ["dlg-1"]
    finally:
        store.close()
