"""What every record kind of the store leans on: transactions, expiry, fencing, wake-ups.

`StoreCore` is the part of the store that is neither an engine nor one kind of
record. An engine (`SQLiteStore`, `PostgresStore`) supplies `_transaction`;
the record kinds (`_items`, `_workers`, `_delegations`) are written against
this class only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .._exceptions import FencingConflict, NotFound
from .._fencing import mint_token, stale_token, tokens_match
from .._models import (
    NO_HEARTBEAT,
    Attempt,
    DelegationStatus,
    EnvironmentSettings,
    OutcomeStatus,
    WorkState,
)
from .._status import StatusPolicy
from ._common import (
    EXPIRED_OUTCOME,
    EXPIRED_WHILE_STOPPING_OUTCOME,
    ITEM_COLUMNS,
    RESPONSE_PREVIEW_CHARS,
    SETTINGS_COLUMNS,
    LeasePolicy,
    Row,
    SubmitListener,
    attempt_to_dict,
    item_from_row,
    outcome_from_json,
)
from ._sql import Transaction

if TYPE_CHECKING:
    from .._models import WorkItem

log = logging.getLogger("supervisor.controlplane")


class StoreCore:
    """Listeners, tokens, lease expiry and the fencing check, shared by every engine."""

    lease_policy: LeasePolicy
    status_policy: StatusPolicy
    #: The settings an environment is created with (a ``serve`` replica sets its flags
    #: here, so environments first used after it started get them too).
    environment_defaults: EnvironmentSettings = EnvironmentSettings()
    #: Whether submit listeners hear commits made by other processes too.
    wakes_across_processes: bool = False

    def __init__(
        self, lease_policy: LeasePolicy | None, status_policy: StatusPolicy | None
    ) -> None:
        self.lease_policy = lease_policy or LeasePolicy()
        self.status_policy = status_policy or StatusPolicy()
        self._listeners_lock = threading.Lock()
        self._listeners: list[SubmitListener] = []
        self._counter = 0
        self._counter_lock = threading.Lock()

    # --- what an engine supplies ------------------------------------------------

    def _transaction(
        self, doing: str, now: float | None = None
    ) -> contextlib.AbstractContextManager[Transaction]:
        """One transaction: committed when the block ends, rolled back on any exception.

        ``now`` is the caller's time; an engine with its own time authority may
        replace it. A `ControlPlaneError` raised inside (a 404, a 409...) changes
        nothing, and a driver error is translated on the way out.
        """
        raise NotImplementedError

    @property
    def path(self) -> str:
        """Where the store keeps its data, safe to print (no password)."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- listeners ----------------------------------------------------------------

    def add_submit_listener(self, listener: SubmitListener) -> None:
        """Call ``listener(environment_id)`` when an environment gains claimable work.

        Long-pollers use it to wake at once instead of waiting for their next
        re-check. The listener runs in whichever thread learnt of the work and
        must be quick and thread-safe; an exception from it is logged and
        ignored (the work is already there). What a store learns of depends on
        its engine: SQLite sees the commits made through this instance,
        PostgreSQL every commit to the database (``LISTEN``/``NOTIFY``).
        """
        with self._listeners_lock:
            self._listeners.append(listener)

    def remove_submit_listener(self, listener: SubmitListener) -> None:
        with self._listeners_lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify_submitted(self, environment_ids: Sequence[str] | set[str]) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for environment_id in environment_ids:
            for listener in listeners:
                try:
                    listener(environment_id)
                except Exception:
                    log.exception("submit listener %r failed", listener)

    @contextlib.contextmanager
    def _committing(self, doing: str, now: float | None = None) -> Iterator[Transaction]:
        """`_transaction`, then wake the pollers of every environment it announced."""
        with self._transaction(doing, now) as tx:
            yield tx
        if tx.announced:
            self._notify_submitted(tx.announced)

    def _next_token(self, attempts: int, beats: int) -> str:
        # The counter keeps tokens distinct even if two beats land in the same
        # clock tick; the random tail keeps them unguessable and unique across
        # processes. Callers treat the whole string as opaque.
        with self._counter_lock:
            self._counter += 1
            counter = self._counter
        return mint_token(attempts, beats, counter)

    # --- rows ---------------------------------------------------------------------

    def _ensure_environment(self, tx: Transaction, environment_id: str) -> None:
        defaults = self.environment_defaults
        columns = ", ".join(SETTINGS_COLUMNS.values())
        tx.execute(
            f"INSERT INTO environments (id, created_at, {columns}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                environment_id,
                tx.now,
                *(getattr(defaults, name) for name in SETTINGS_COLUMNS),
            ),
        )

    @staticmethod
    def _item_row(tx: Transaction, environment_id: str, work_id: str) -> Row:
        """The item's whole row, locked against other writers until the transaction ends."""
        row = tx.one(
            "SELECT * FROM work_items WHERE id = ? AND environment_id = ?{for_update}",
            (work_id, environment_id),
        )
        if row is None:
            raise NotFound(f"no work item {work_id!r} in environment {environment_id!r}")
        return row

    @staticmethod
    def _read_item(tx: Transaction, work_id: str, *, secret: str | None = None) -> WorkItem:
        row = tx.one(f"SELECT {ITEM_COLUMNS} FROM work_items WHERE id = ?", (work_id,))
        assert row is not None
        return item_from_row(row, secret=secret)

    @staticmethod
    def _session_row(tx: Transaction, environment_id: str, session_id: str) -> Row:
        row = tx.one(
            "SELECT id, worker_id FROM work_items WHERE environment_id = ? AND session_id = ?",
            (environment_id, session_id),
        )
        if row is None:
            raise NotFound(f"no session {session_id!r} in environment {environment_id!r}")
        return row

    # --- the fencing check ----------------------------------------------------------

    @staticmethod
    def _check_fence(row: Row, expected: str, work_id: str) -> None:
        """Raise `FencingConflict` unless ``expected`` is the item's current token.

        `NO_HEARTBEAT` is current for an item that was acknowledged (or asked to
        stop) but has not beaten yet; a token voided by expiry or requeue is never
        current again.
        """
        token: str | None = row["token"]
        if token is None:
            ok = expected == NO_HEARTBEAT and row["state"] in (
                WorkState.STARTING,
                WorkState.STOPPING,
            )
        else:
            ok = tokens_match(token, expected)  # as bytes: any characters, never TypeError
        if not ok:
            # names the current token to a stale one of the same lease (see _fencing)
            raise stale_token(work_id, presented=expected, current=token, attempts=row["attempts"])

    @staticmethod
    def _fenced_update(
        tx: Transaction, row: Row, assignments: str, params: Sequence[object]
    ) -> None:
        """``UPDATE work_items SET assignments`` on ``row``'s item, fenced by its token.

        The token ``row`` was read with is part of the ``WHERE``, so the change
        lands only if no other writer moved the item on since: a stale holder
        gets `FencingConflict`, never a half-applied change.
        """
        changed = tx.execute(
            f"UPDATE work_items SET {assignments} WHERE id = ? AND token {{same}} ?",
            (*params, row["id"], row["token"]),
        ).rowcount
        if changed != 1:
            raise FencingConflict(f"stale fencing token for work item {row['id']!r}")

    # --- expiry ---------------------------------------------------------------------

    def _expire_leases(self, tx: Transaction) -> None:
        """Apply every lease expiry due at ``tx.now``; the old tokens and secrets die here.

        Each expiry ends an attempt, kept in the item's ``history`` like one its
        holder stopped: ``failed: lease expired`` (retried at once, or final on
        the last attempt: dead letter), or ``cancelled`` for a ``stopping`` item,
        which is never run again.
        """
        now = tx.now
        # Nearly every call finds nothing due: one indexed probe is cheaper than a scan.
        if (
            tx.one("SELECT 1 AS due FROM work_items WHERE lease_expires_at <= ? LIMIT 1", (now,))
            is None
        ):
            return
        due = tx.execute(
            "SELECT id, state, attempts, max_attempts, worker_id, started_at, history, "
            "lease_expires_at FROM work_items WHERE lease_expires_at <= ? "
            "AND state IN ('starting', 'active', 'stopping') ORDER BY seq{for_update}",
            (now,),
        ).fetchall()
        for row in due:
            stopping = row["state"] == WorkState.STOPPING
            attempts = row["attempts"] + 1
            final = stopping or attempts >= (row["max_attempts"] or self.lease_policy.max_attempts)
            recorded = EXPIRED_WHILE_STOPPING_OUTCOME if stopping else EXPIRED_OUTCOME
            ended = row["lease_expires_at"]
            outcome = outcome_from_json(recorded)
            assert outcome is not None
            entries = json.loads(row["history"] or "[]")
            entries.append(
                attempt_to_dict(
                    Attempt(
                        attempt=attempts,
                        outcome=outcome,
                        ended_at=ended,
                        worker_id=row["worker_id"],
                        started_at=row["started_at"],
                        retry_at=None if final else now,
                    )
                )
            )
            history = json.dumps(entries, sort_keys=True, allow_nan=False)
            if final:
                tx.execute(
                    "UPDATE work_items SET state = 'stopped', attempts = ?, stopped_at = ?, "
                    "outcome = ?, token = NULL, secret_hash = NULL, lease_expires_at = NULL, "
                    "dead = ?, history = ? WHERE id = ?",
                    (attempts, ended, recorded, int(not stopping), history, row["id"]),
                )
            else:
                tx.execute(
                    "UPDATE work_items SET state = 'queued', attempts = ?, worker_id = NULL, "
                    "token = NULL, secret_hash = NULL, lease_expires_at = NULL, "
                    "delivered_at = NULL, delivered_to = NULL, acknowledged_at = NULL, "
                    "started_at = NULL, latest_heartbeat_at = NULL, history = ? WHERE id = ?",
                    (attempts, history, row["id"]),
                )
        self._settle_delegations(tx)

    @staticmethod
    def _settle_delegations(tx: Transaction, work_id: str | None = None) -> None:
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
        for row in tx.execute(sql, params).fetchall():
            outcome = outcome_from_json(row["outcome"])
            completed = outcome is not None and outcome.status is OutcomeStatus.COMPLETED
            text = None
            if outcome is not None:
                text = outcome.result if outcome.result is not None else outcome.reason
            tx.execute(
                "UPDATE delegations SET status = ?, response_preview = ?, completed_at = ? "
                "WHERE id = ?",
                (
                    (DelegationStatus.COMPLETED if completed else DelegationStatus.FAILED).value,
                    None if text is None else text[:RESPONSE_PREVIEW_CHARS],
                    row["stopped_at"],
                    row["id"],
                ),
            )
