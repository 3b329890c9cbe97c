"""Delegations (a session asks for another session) and the messages sent to sessions."""

from __future__ import annotations

import json

from .._exceptions import BadRequest, Conflict, NotFound
from .._models import Delegation, DelegationStatus, SessionMessage
from ._common import (
    Row,
    check_enum,
    check_id,
    check_text,
    delegation_from_row,
    message_from_row,
    new_id,
    preview,
)
from ._core import StoreCore
from ._sql import Transaction


class DelegationRecords(StoreCore):
    """The delegation and message half of the store contract."""

    @staticmethod
    def _delegation_row(
        tx: Transaction, environment_id: str, delegation_id: str, *, lock: bool = False
    ) -> Row:
        row = tx.one(
            "SELECT * FROM delegations WHERE id = ? AND environment_id = ?"
            + ("{for_update}" if lock else ""),
            (delegation_id, environment_id),
        )
        if row is None:
            raise NotFound(f"no delegation {delegation_id!r} in environment {environment_id!r}")
        return row

    @staticmethod
    def _read_delegation(tx: Transaction, delegation_id: str) -> Delegation:
        row = tx.one("SELECT * FROM delegations WHERE id = ?", (delegation_id,))
        assert row is not None
        return delegation_from_row(row)

    def delegate(self, environment_id: str, source_id: str, task: str, *, now: float) -> Delegation:
        """Queue a work item for ``task`` on behalf of session ``source_id``.

        The new item's metadata links it back (``delegation_id``, ``source_id``,
        ``source_work_id``); the delegation is attributed to the worker bound
        to the source session right now, whose delegation watcher will collect
        the result.

        Raises:
            BadRequest: empty task.
            NotFound: unknown source session.
        """
        check_id("environment_id", environment_id)
        check_id("source_id", source_id)
        check_text("task", task)
        delegation_id = new_id("dlg")
        work_id = new_id("work")
        with self._committing("delegating", now) as tx:
            self._expire_leases(tx)
            source = self._session_row(tx, environment_id, source_id)
            meta = {
                "delegation_id": delegation_id,
                "source_id": source_id,
                "source_work_id": source["id"],
            }
            tx.execute(
                "INSERT INTO work_items (id, environment_id, state, session_id, prompt, "
                "metadata, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (work_id, environment_id, new_id("sess"), task, json.dumps(meta), tx.now),
            )
            tx.execute(
                "INSERT INTO delegations (id, environment_id, source_id, work_id, task, status, "
                "worker_id, created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                (
                    delegation_id,
                    environment_id,
                    source_id,
                    work_id,
                    task,
                    source["worker_id"],
                    tx.now,
                ),
            )
            tx.announce(environment_id)
            return self._read_delegation(tx, delegation_id)

    def list_delegations(
        self,
        environment_id: str,
        worker_id: str,
        *,
        status: DelegationStatus | str | None = None,
        uncollected: bool = False,
    ) -> list[Delegation]:
        """Delegations attributed to ``worker_id``, oldest first.

        Args:
            environment_id: the environment.
            worker_id: the worker the delegations are attributed to.
            status: only delegations with this status.
            uncollected: leave out the results already collected (`collect_delegation`),
                so a watcher's poll costs what is new, not the whole history.
        """
        check_id("environment_id", environment_id)
        check_id("worker_id", worker_id)
        wanted = None if status is None else check_enum("status", status, DelegationStatus)
        if not isinstance(uncollected, bool):
            raise BadRequest(f"uncollected must be true or false, got {preview(uncollected)}")
        with self._transaction("listing delegations") as tx:
            sql = "SELECT * FROM delegations WHERE environment_id = ? AND worker_id = ?"
            params: list[object] = [environment_id, worker_id]
            if wanted is not None:
                sql += " AND status = ?"
                params.append(wanted.value)
            if uncollected:
                sql += " AND collected_at IS NULL"
            return [delegation_from_row(row) for row in tx.execute(sql + " ORDER BY seq", params)]

    def collect_delegation(
        self, environment_id: str, delegation_id: str, *, now: float
    ) -> Delegation:
        """Mark a delegation's result as collected by its worker; idempotent.

        A collected result is left out of ``list_delegations(..., uncollected=True)``.
        The worker collects a result only after it is safe in its own journal.

        Raises:
            NotFound: unknown delegation.
            Conflict: the delegation has no result yet.
        """
        check_id("environment_id", environment_id)
        with self._transaction("collecting a delegation result", now) as tx:
            row = self._delegation_row(tx, environment_id, delegation_id)
            if row["status"] == DelegationStatus.PENDING:
                raise Conflict(f"delegation {delegation_id!r} has no result to collect yet")
            tx.execute(
                "UPDATE delegations SET collected_at = COALESCE(collected_at, ?) WHERE id = ?",
                (tx.now, delegation_id),
            )
            return self._read_delegation(tx, delegation_id)

    def record_delegation_result(
        self,
        environment_id: str,
        delegation_id: str,
        *,
        status: DelegationStatus | str,
        now: float,
        response_preview: str | None = None,
    ) -> Delegation:
        """Record the one result of a delegation.

        Raises:
            BadRequest: ``status`` is not ``completed`` or ``failed``.
            NotFound: unknown delegation.
            Conflict: a result was already recorded.
        """
        check_id("environment_id", environment_id)
        result = check_enum("status", status, DelegationStatus)
        if result is DelegationStatus.PENDING:
            raise BadRequest("a delegation result must be completed or failed, not pending")
        if response_preview is not None and not isinstance(response_preview, str):
            raise BadRequest("response_preview must be a string when given")
        with self._transaction("recording a delegation result", now) as tx:
            row = self._delegation_row(tx, environment_id, delegation_id, lock=True)
            if row["status"] != DelegationStatus.PENDING:
                raise Conflict(
                    f"delegation {delegation_id!r} already has a result ({row['status']})"
                )
            tx.execute(
                "UPDATE delegations SET status = ?, response_preview = ?, completed_at = ? "
                "WHERE id = ?",
                (result.value, response_preview, tx.now, delegation_id),
            )
            return self._read_delegation(tx, delegation_id)

    # --- messages ----------------------------------------------------------------

    def _add_message(
        self, environment_id: str, session_id: str, body: str, kind: str, now: float
    ) -> SessionMessage:
        check_id("environment_id", environment_id)
        check_id("session_id", session_id)
        check_text("body", body)
        message_id = new_id("msg")
        with self._transaction(f"storing a {kind}", now) as tx:
            self._session_row(tx, environment_id, session_id)
            tx.execute(
                "INSERT INTO messages (id, environment_id, session_id, kind, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, environment_id, session_id, kind, body, tx.now),
            )
            row = tx.one("SELECT * FROM messages WHERE id = ?", (message_id,))
            assert row is not None
            return message_from_row(row)

    def post_message(
        self, environment_id: str, session_id: str, body: str, *, now: float
    ) -> SessionMessage:
        """Store a follow-up message for a session.

        Raises:
            BadRequest: empty body.
            NotFound: unknown session.
        """
        return self._add_message(environment_id, session_id, body, "message", now)

    def notify(
        self, environment_id: str, session_id: str, body: str, *, now: float
    ) -> SessionMessage:
        """Store a notification for a session (same rules as `post_message`)."""
        return self._add_message(environment_id, session_id, body, "notification", now)

    def list_messages(self, environment_id: str, session_id: str) -> list[SessionMessage]:
        """A session's messages and notifications, oldest first.

        Raises:
            NotFound: unknown session.
        """
        check_id("environment_id", environment_id)
        with self._transaction("listing messages") as tx:
            self._session_row(tx, environment_id, session_id)
            rows = tx.execute(
                "SELECT * FROM messages WHERE environment_id = ? AND session_id = ? ORDER BY seq",
                (environment_id, session_id),
            )
            return [message_from_row(row) for row in rows]
