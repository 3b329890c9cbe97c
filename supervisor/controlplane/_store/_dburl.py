"""Database URLs: recognising them, completing them from a secret file, printing them safely.

This module imports no driver, so the command line can tell a ``postgresql://``
control plane from a path or an ``http(s)://`` one, and show it, without
loading psycopg.

Where the password comes from (never the command line, which ``ps`` shows to
every user of the machine):

* ``SUPERVISOR_DATABASE_URL_FILE`` names a file holding a whole URL, password
  included (a mounted secret). Its parts fill in whatever the URL given on the
  command line leaves out, so ``--control-plane postgresql://`` alone is enough;
* or libpq's own ``PGPASSFILE`` (``~/.pgpass`` by default), which libpq reads
  itself when the URL has no password.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final, TypeGuard
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._exceptions import ControlPlaneError

__all__ = [
    "DATABASE_URL_FILE_ENV",
    "DatabaseUrl",
    "is_postgres_url",
    "redact",
    "resolve_database_url",
]

#: The environment variable naming a file that holds the database URL with its password.
DATABASE_URL_FILE_ENV: Final = "SUPERVISOR_DATABASE_URL_FILE"

_SCHEMES: Final = ("postgresql", "postgres")
_SCHEMA_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def is_postgres_url(target: object) -> TypeGuard[str]:
    """Whether ``target`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return (
        isinstance(target, str)
        and target.split("://", 1)[0].lower() in _SCHEMES
        and ("://" in target)
    )


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``: the only form that is ever printed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database url>"
    if parts.password is None:
        query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(parts._replace(query=urlencode(query, safe="/:@")))
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class DatabaseUrl:
    """A resolved PostgreSQL URL: what to hand libpq, and the schema the store lives in.

    Attributes:
        conninfo: the URL libpq gets (may hold the password: never print it).
        schema: the schema of the store's tables (``?schema=`` in the URL; ``None`` is the
            connection's default, normally ``public``).
        display: the URL with the password hidden, for messages and ``status``.
    """

    __slots__ = ("conninfo", "display", "schema")

    def __init__(self, conninfo: str, schema: str | None) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.display = redact(conninfo) + (f" (schema {schema})" if schema else "")

    def __repr__(self) -> str:
        return f"<DatabaseUrl {self.display}>"


def resolve_database_url(url: str, *, environ: dict[str, str] | None = None) -> DatabaseUrl:
    """Complete ``url`` from ``SUPERVISOR_DATABASE_URL_FILE`` and take out ``?schema=``.

    Raises:
        ControlPlaneError: not a PostgreSQL URL, an unreadable secret file, or a bad schema name.
    """
    env = os.environ if environ is None else environ
    if not is_postgres_url(url):
        raise ControlPlaneError(f"not a PostgreSQL URL: {redact(url)}")
    given = urlsplit(url)
    secret_file = env.get(DATABASE_URL_FILE_ENV)
    if secret_file:
        try:
            stored = Path(secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ControlPlaneError(
                f"cannot read {DATABASE_URL_FILE_ENV}={secret_file!r}: {exc.strerror}"
            ) from None
        if not is_postgres_url(stored):
            raise ControlPlaneError(
                f"{DATABASE_URL_FILE_ENV}={secret_file!r} does not hold a postgresql:// URL"
            )
        base = urlsplit(stored)
        netloc = given.netloc or base.netloc
        if given.netloc and "@" not in given.netloc and base.username:
            netloc = f"{base.netloc.rpartition('@')[0]}@{given.netloc}"
        elif given.netloc and given.password is None and base.password is not None:
            user, _, host = given.netloc.rpartition("@")
            if user == (base.username or ""):
                netloc = f"{user}:{base.password}@{host}"
        query = dict(parse_qsl(base.query))
        query.update(parse_qsl(given.query))
        given = given._replace(
            netloc=netloc,
            path=given.path if given.path not in ("", "/") else base.path,
            query=urlencode(query),
        )
    query_pairs = parse_qsl(given.query)
    schema = None
    kept = []
    for key, value in query_pairs:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    if schema is not None and not _SCHEMA_RE.fullmatch(schema):
        raise ControlPlaneError(
            f"schema must be 1-63 lowercase letters, digits or _ (not starting with a digit), "
            f"got {schema!r}"
        )
    conninfo = urlunsplit(given._replace(scheme="postgresql", query=urlencode(kept)))
    return DatabaseUrl(conninfo, schema)
