"""The one seam between the store's logic and a database: a transaction and a dialect.

The lifecycle rules are written once, as SQL in SQLite's spelling (``?``
placeholders) with a few named holes for what the engines spell differently.
A `Dialect` fills the holes and the placeholders once per statement (cached);
a `Transaction` runs the statements on whichever connection the store opened,
carries the transaction's ``now`` (the caller's clock, or the database's), and
collects the environments whose pollers should wake when it commits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs

from ._common import Row

__all__ = ["POSTGRES", "SQLITE", "Cursor", "Dialect", "Transaction"]


class Cursor(Protocol):
    """What both drivers' cursors offer (rows addressed by column name)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


#: Runs one statement with its parameters on the transaction's connection.
Execute = Callable[[str, Sequence[object]], Cursor]


@attrs.frozen
class Dialect:
    """How one engine spells what the shared SQL leaves open.

    Attributes:
        name: the engine, for messages.
        placeholder: the parameter marker the driver wants in place of ``?``.
        for_update: appended to a read of a row the transaction is about to change, so a
            concurrent writer waits instead of acting on a stale copy (SQLite needs none: its
            ``BEGIN IMMEDIATE`` already admits one writer).
        skip_locked: appended to the claim query, so a claim never waits on another claim.
        same: a NULL-safe equality operator (the fencing check compares a token that may be
            NULL).
        labels_within: a condition on a ``work_items`` row, true when every label its
            ``labels`` column (a JSON array as text) names is in the JSON array bound to
            its one ``?`` (the routing test of a claim; see ``_items.label_filter``).
    """

    name: str
    placeholder: str
    for_update: str
    skip_locked: str
    same: str
    labels_within: str
    _cache: dict[str, str] = attrs.field(factory=dict, eq=False, repr=False)

    def render(self, sql: str) -> str:
        """``sql`` in this engine's spelling."""
        text = self._cache.get(sql)
        if text is None:
            text = sql.format(
                for_update=self.for_update,
                skip_locked=self.skip_locked,
                same=self.same,
                labels_within=self.labels_within,
            )
            if self.placeholder != "?":
                text = text.replace("?", self.placeholder)
            self._cache[sql] = text
        return text


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    for_update="",
    skip_locked="",
    same="IS",
    labels_within=(
        "NOT EXISTS (SELECT 1 FROM json_each(work_items.labels) AS need "
        "WHERE need.value NOT IN (SELECT value FROM json_each(?)))"
    ),
)
POSTGRES = Dialect(
    name="postgresql",
    placeholder="%s",
    for_update=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    same="IS NOT DISTINCT FROM",
    # jsonb containment of arrays: every element on the left is on the right.
    labels_within="work_items.labels::jsonb <@ ?::jsonb",
)


class Transaction:
    """One open transaction, as the shared store logic sees it.

    Attributes:
        now: the transaction's time in POSIX seconds; NaN for a call that reads no time.
        announced: environments that gained claimable work in this transaction.
    """

    __slots__ = ("_dialect", "_execute", "announced", "now")

    def __init__(self, execute: Execute, dialect: Dialect, now: float) -> None:
        self._execute = execute
        self._dialect = dialect
        self.now = now
        self.announced: set[str] = set()

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        """Run one statement written in the shared spelling."""
        return self._execute(self._dialect.render(sql), params)

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        """The first row of a query, or ``None``."""
        row: Row | None = self.execute(sql, params).fetchone()
        return row

    def announce(self, environment_id: str) -> None:
        """Wake the pollers of ``environment_id`` once this transaction commits."""
        self.announced.add(environment_id)


NO_TIME = math.nan
