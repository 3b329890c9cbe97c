"""The PostgreSQL server the tests use, and a private schema per test.

The server is ``SUPERVISOR_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). Every test that touches it gets
a schema of its own, created before and dropped after, so concurrent runs (and
the tests of one run) never see each other's rows or notifications.

Where no server answers, the tests that need one skip with one line saying how
to enable them; under ``CI=true`` they fail instead, so a CI machine without
its database cannot pass by skipping.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def database_url() -> str:
    return os.environ.get("SUPERVISOR_TEST_DATABASE_URL", DEFAULT_URL)


@functools.cache
def _unreachable_reason() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(database_url(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def require_postgres() -> str:
    """The server's URL; skips the test (fails it under ``CI=true``) when none answers."""
    reason = _unreachable_reason()
    if reason is not None:
        message = (
            f"PostgreSQL tests need a server: start one on 127.0.0.1:5432 or set "
            f"SUPERVISOR_TEST_DATABASE_URL ({reason})"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return database_url()


@contextmanager
def private_schema() -> Iterator[str]:
    """A ``postgresql://...?schema=t_...`` URL of a fresh schema, dropped afterwards."""
    import psycopg

    base = require_postgres()
    schema = f"t_{uuid.uuid4().hex[:20]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}schema={schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def apply_old_migrations(conn: Any, versions: Iterable[int]) -> None:
    """Bring the schema ``conn`` searches to ``versions`` by hand, the way an older
    release left it (for tests of the migrations that come after)."""
    from supervisor.controlplane._store._postgres import _MIGRATIONS

    conn.execute(
        "CREATE TABLE supervisor_schema (version INTEGER PRIMARY KEY, "
        "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    for version in versions:
        for statement in _MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement.encode())
        conn.execute("INSERT INTO supervisor_schema (version) VALUES (%s)", (version,))
