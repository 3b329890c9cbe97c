"""Work items: submit, claim, acknowledge, heartbeat, stop, requeue, inspect.

Lifecycle decisions the design leaves open, recorded here:

* ``ack`` is accepted only from the worker the item was last handed to, so a
  slow poller cannot ack an item that the reclaim window gave to someone else.
* ``ack`` starts a lease of the default TTL, so a worker that dies between ack
  and its first heartbeat does not strand the item in ``starting``. The first
  heartbeat (``NO_HEARTBEAT``) is fenced by state only, since the heartbeat call
  names no worker: the item must be bound and have no token yet. So a first beat
  that arrives after its ack lease ran out *and* after another worker re-acked
  the item would be taken for the new holder's; with a lease keeper that beats
  right after ack, against a 60 s ack lease, that needs a minute-long stall.
* ``request_stop`` on a ``queued`` item stops it at once (outcome
  ``cancelled``): no worker will ever heartbeat it. On ``starting`` it moves to
  ``stopping`` and the first heartbeat answers ``stopping``.
* A ``stopping`` item whose lease expires is stopped (``cancelled``), not
  requeued: an operator asked for it to stop.
* ``stop`` is always a hard stop (``force`` is accepted for wire compatibility);
  the graceful path is ``request_stop``. A stop without an outcome records
  ``cancelled``. The holder's token survives ``stop``, so its next heartbeat
  answers ``stopped`` with ``lease_extended=False`` and a second stop with it
  is a 409; a token voided by expiry answers 412.
* ``requeue`` is the holder's way to give an item back (its session wedged):
  like an expiry (``queued``, ``attempts + 1``, claimable at once) but without
  waiting for the ttl. A ``stopping`` item or one on its last attempt is
  stopped with the reported outcome instead.
* Session ids are unique within an environment (a duplicate submit is a 409):
  delegations and messages address sessions by id.
"""

from __future__ import annotations

import hmac
import json
import random
import secrets
from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from .._exceptions import BadRequest, Conflict, NotFound, QueueFull
from .._models import (
    NO_HEARTBEAT,
    Attempt,
    EnvironmentSettings,
    HeartbeatResult,
    Outcome,
    OutcomeStatus,
    RetryPolicy,
    WorkItem,
    WorkState,
    WorkStats,
)
from ._common import (
    ITEM_COLUMNS,
    MAX_BLOCK_OR_RECLAIM_MS,
    MAX_CLAIM_BATCH,
    MAX_LIMIT,
    MAX_PAGE,
    QUEUE_FULL_RETRY_AFTER,
    SETTINGS_COLUMNS,
    Row,
    attempt_to_dict,
    check_enum,
    check_id,
    check_int,
    check_key,
    check_labels,
    check_metadata,
    check_retry,
    check_schedule,
    check_settings,
    check_text,
    check_timeout,
    check_ttl,
    hash_secret,
    item_from_row,
    labels_to_json,
    new_id,
    outcome_to_json,
    retry_from_json,
    retry_to_json,
    settings_from_row,
)
from ._core import StoreCore
from ._sql import Transaction

_REQUEUE = (
    "state = 'queued', attempts = ?, worker_id = NULL, token = NULL, secret_hash = NULL, "
    "lease_expires_at = NULL, delivered_at = NULL, delivered_to = NULL, acknowledged_at = NULL, "
    "started_at = NULL, latest_heartbeat_at = NULL"
)

#: Jitter draws; module-level so a test may seed it (the model in the state machine
#: only relies on the bounds: half to all of the exponential step).
_JITTER = random.Random()


def backoff_delay(policy: RetryPolicy, failed_attempts: int) -> float:
    """Seconds to wait after the ``failed_attempts``-th failure: exponential, with jitter.

    The step doubles per failure from ``policy.backoff`` up to ``backoff_max``;
    the wait is drawn uniformly from the upper half of the step ("equal
    jitter"), so retries of many items failing together spread out while each
    still waits at least half its step.
    """
    step = min(policy.backoff_max, policy.backoff * 2.0 ** max(failed_attempts - 1, 0))
    return step * (0.5 + 0.5 * _JITTER.random())


@attrs.frozen
class StopDecision:
    """What a stop with an outcome does to an item (the retry rule of DESIGN §4.2).

    Attributes:
        requeue: the failure is retried: back to ``queued`` after `backoff_delay`.
        attempts: the item's attempt count afterwards.
        dead: the item stops in dead letter (out of attempts).
    """

    requeue: bool
    attempts: int
    dead: bool


def stop_decision(
    policy: RetryPolicy | None, state: WorkState | str, outcome: Outcome, attempts: int
) -> StopDecision:
    """The retry rule, pure: shared by the store and the in-memory test double.

    Only a ``failed`` outcome of an attempt that ran (``starting`` or
    ``active``; not ``stopping``, not a stop of a queued item) of an item with
    a policy counts, unless its exit code is listed as non-retryable; it is
    retried while attempts remain, else the item is dead.
    """
    failed = (
        outcome.status is OutcomeStatus.FAILED
        and state in (WorkState.STARTING, WorkState.ACTIVE)
        and policy is not None
        and outcome.exit_code not in policy.non_retryable_exit_codes
    )
    after = attempts + 1 if failed else attempts
    requeue = failed and policy is not None and after < policy.max_attempts
    return StopDecision(requeue=requeue, attempts=after, dead=failed and not requeue)


def _history_with(row: Mapping[str, object], attempt: Attempt) -> str:
    entries = json.loads(str(row["history"] or "[]"))
    entries.append(attempt_to_dict(attempt))
    return json.dumps(entries, sort_keys=True, allow_nan=False)


def _attempt(
    row: Mapping[str, object], outcome: Outcome, now: float, retry_at: float | None
) -> Attempt:
    attempts = row["attempts"]
    assert isinstance(attempts, int)
    worker = row["worker_id"]
    started = row["started_at"]
    return Attempt(
        attempt=attempts + 1,
        outcome=outcome,
        ended_at=now,
        worker_id=worker if isinstance(worker, str) else None,
        started_at=float(started) if isinstance(started, int | float) else None,
        retry_at=retry_at,
    )


def label_filter(labels: tuple[str, ...]) -> tuple[str, tuple[object, ...]]:
    """The routing test of a claim, as a condition on a ``work_items`` row and its parameters.

    An item is eligible for a poller when the labels it requires are a subset
    of the poller's ``labels`` (already checked and sorted): an item without
    labels is eligible for everyone, a poller without labels gets only those.
    The unlabelled case is a plain comparison with the stored ``[]``; the
    subset test itself is the dialect's ``labels_within`` (``json_each`` on
    SQLite, ``jsonb`` containment on PostgreSQL). AND it into any claim query.
    """
    if not labels:
        return "work_items.labels = '[]'", ()
    return "(work_items.labels = '[]' OR {labels_within})", (labels_to_json(labels),)


def _check_outcome(outcome: Outcome | None) -> None:
    if outcome is not None and not isinstance(outcome, Outcome):
        raise BadRequest(f"outcome must be an Outcome, got {type(outcome).__name__}")


#: What `ItemRecords.purge` deletes, in this order, each with (environment, older
#: than, at most): settled delegations, messages of sessions no longer live, then
#: stopped items no delegation refers to.
_PURGES: Final = (
    "DELETE FROM delegations WHERE id IN (SELECT id FROM delegations "
    "WHERE environment_id = ? AND status <> 'pending' AND completed_at < ? "
    "ORDER BY completed_at LIMIT ?{skip_locked})",
    "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m "
    "WHERE m.environment_id = ? AND m.created_at < ? AND NOT EXISTS ("
    "SELECT 1 FROM work_items w WHERE w.environment_id = m.environment_id "
    "AND w.session_id = m.session_id AND w.state <> 'stopped') "
    "ORDER BY m.created_at LIMIT ?{skip_locked})",
    "DELETE FROM work_items WHERE id IN (SELECT w.id FROM work_items w "
    "WHERE w.environment_id = ? AND w.state = 'stopped' AND w.stopped_at < ? "
    "AND NOT EXISTS (SELECT 1 FROM delegations d WHERE d.work_id = w.id) "
    "ORDER BY w.stopped_at LIMIT ?{skip_locked})",
)


class ItemRecords(StoreCore):
    """The work-item half of the store contract (see the module notes for its decisions)."""

    def submit(
        self,
        environment_id: str,
        prompt: str,
        *,
        now: float,
        session_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        delay: float | None = None,
        not_before: float | None = None,
        key: str | None = None,
        labels: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> WorkItem:
        """Queue a new session work item; the environment is created on first use.

        ``labels``: only a worker that has all of them claims the item (routing).
        ``timeout``: seconds of execution its session may take, in place of the
        worker's ``session_timeout``.

        ``key`` makes the submit idempotent: when an item of this environment
        already has it, that item is returned (``duplicate=True``) and nothing
        is queued, whatever its state. Two concurrent submits of one key queue
        one item (a unique index arbitrates; the loser reads the winner's).

        ``priority``: higher is claimed first, FIFO within one priority.
        ``delay`` (seconds from now, on the store's clock) or ``not_before`` (a
        POSIX time): the item is not claimed before then.

        ``retry`` makes failed sessions of this item retry (see `RetryPolicy`);
        without it the item gets the environment's default retry policy
        (`EnvironmentSettings`), and without that a failure is final and lease
        losses are bounded by the store's ``LeasePolicy.max_attempts``.

        Backpressure: when the environment has a ``max_queue_depth`` and
        already holds that many queued items, the submit is refused with
        `QueueFull` (after the key lookup: a key already used still answers
        its item). The count and the insert are one transaction, the
        environment's row locked, so concurrent submits never overfill it.

        Raises:
            BadRequest: empty prompt, malformed ids or metadata.
            Conflict: ``session_id`` is already used in this environment.
            QueueFull: the environment's queue is at its ``max_queue_depth``.
        """
        check_id("environment_id", environment_id)
        check_text("prompt", prompt)
        if session_id is not None:
            check_id("session_id", session_id)
        meta = json.dumps(check_metadata(metadata), sort_keys=True)
        policy = check_retry(retry)
        check_schedule(priority, delay, not_before)
        check_key(key)
        required = check_labels(labels)
        limit = check_timeout(timeout)
        work_id = new_id("work")
        session = session_id or new_id("sess")
        with self._committing("submitting work", now) as tx:
            self._ensure_environment(tx, environment_id)
            if key is not None:
                first = self._keyed(tx, environment_id, key)
                if first is not None:
                    return first
            settings = self._admit(tx, environment_id)
            if policy is None:
                policy = settings.retry_policy()
            clash = tx.one(
                "SELECT id FROM work_items WHERE environment_id = ? AND session_id = ?",
                (environment_id, session),
            )
            if clash is not None:
                raise Conflict(
                    f"session {session!r} already exists in environment {environment_id!r} "
                    f"(work item {clash['id']!r})"
                )
            inserted = tx.execute(
                "INSERT INTO work_items (id, environment_id, state, session_id, prompt, "
                "metadata, created_at, retry_policy, max_attempts, priority, not_before, "
                "idem_key, labels, timeout_seconds) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (environment_id, idem_key) WHERE idem_key IS NOT NULL DO NOTHING",
                (
                    work_id,
                    environment_id,
                    session,
                    prompt,
                    meta,
                    tx.now,
                    retry_to_json(policy),
                    None if policy is None else policy.max_attempts,
                    priority,
                    tx.now + delay if delay is not None else not_before,
                    key,
                    labels_to_json(required),
                    limit,
                ),
            ).rowcount
            if inserted == 0 and key is not None:
                # Another submit of this key committed between our look and our insert.
                first = self._keyed(tx, environment_id, key)
                assert first is not None
                return first
            tx.announce(environment_id)
            return self._read_item(tx, work_id)

    def _admit(self, tx: Transaction, environment_id: str) -> EnvironmentSettings:
        """The environment's settings, once its queue has room for one more item.

        Uncapped environments are not locked (submits stay concurrent); a
        capped one's row is locked for the rest of the transaction and re-read,
        so the depth counted below cannot change until this submit commits.

        Raises:
            QueueFull: the queue holds ``max_queue_depth`` items already.
        """
        columns = ", ".join(SETTINGS_COLUMNS.values())
        sql = f"SELECT {columns} FROM environments WHERE id = ?"
        settings = settings_from_row(tx.one(sql, (environment_id,)))
        if settings.max_queue_depth is None:
            return settings
        settings = settings_from_row(tx.one(sql + "{for_update}", (environment_id,)))
        cap = settings.max_queue_depth
        if cap is not None:
            self._expire_leases(tx)  # an expired lease is a queued item again: count it
            row = tx.one(
                "SELECT COUNT(*) AS depth FROM work_items "
                "WHERE environment_id = ? AND state = 'queued'",
                (environment_id,),
            )
            assert row is not None
            if row["depth"] >= cap:
                raise QueueFull(environment_id, row["depth"], cap, QUEUE_FULL_RETRY_AFTER)
        return settings

    def environment_settings(self, environment_id: str, *, now: float) -> EnvironmentSettings:
        """The environment's policies (`EnvironmentSettings`); it is created on first use."""
        check_id("environment_id", environment_id)
        with self._transaction("reading environment settings", now) as tx:
            self._ensure_environment(tx, environment_id)
            columns = ", ".join(SETTINGS_COLUMNS.values())
            return settings_from_row(
                tx.one(f"SELECT {columns} FROM environments WHERE id = ?", (environment_id,))
            )

    def configure_environment(
        self, environment_id: str, changes: Mapping[str, object], *, now: float
    ) -> EnvironmentSettings:
        """Change some of an environment's policies; returns all of them.

        ``changes`` maps `EnvironmentSettings` field names to new values
        (``None`` clears one); fields not named keep their stored value. The
        settings live in the database, so every replica and worker sharing it
        sees the change at its next call. A new default retry policy applies to
        items submitted from then on; a new cap to submits from then on (items
        already queued stay, even above it).

        Raises:
            BadRequest: an unknown field or a value out of range.
        """
        check_id("environment_id", environment_id)
        checked = check_settings(changes)
        with self._transaction("configuring an environment", now) as tx:
            self._ensure_environment(tx, environment_id)
            if checked:
                assignments = ", ".join(f"{SETTINGS_COLUMNS[name]} = ?" for name in checked)
                tx.execute(
                    f"UPDATE environments SET {assignments} WHERE id = ?",
                    (*checked.values(), environment_id),
                )
            columns = ", ".join(SETTINGS_COLUMNS.values())
            return settings_from_row(
                tx.one(f"SELECT {columns} FROM environments WHERE id = ?", (environment_id,))
            )

    def purge(self, environment_id: str, *, older_than: float, limit: int, now: float) -> int:
        """Delete at most ``limit`` records of the environment that ended before ``older_than``.

        One short transaction. What goes, each by its own end time: settled
        delegations (``completed_at``), messages (``created_at``) of sessions
        that are not live, and stopped items (``stopped_at``; history, dead
        letter and idempotency key with them, so the key is free again). An
        item still named by a delegation that is not old enough waits for it.
        A live item (queued, starting, active, stopping) is never deleted.

        Returns:
            How many rows were deleted (``limit`` means there may be more).

        Raises:
            BadRequest: a malformed ``older_than`` or ``limit``.
        """
        check_id("environment_id", environment_id)
        check_int("limit", limit, 1, 100_000)
        if (
            isinstance(older_than, bool)
            or not isinstance(older_than, int | float)
            or not older_than == older_than  # NaN
        ):
            raise BadRequest(f"older_than must be a POSIX time, got {older_than!r}")
        with self._transaction("purging old records", now) as tx:
            left = limit
            for statement in _PURGES:
                if left <= 0:
                    break
                left -= tx.execute(statement, (environment_id, older_than, left)).rowcount
            return limit - left

    def purge_expired(self, *, now: float, limit: int) -> int:
        """One bounded batch of the retention sweep, over every environment with a ``retention``.

        Each environment's batch is a `purge` of what ended more than its
        ``retention`` before ``now``; at most ``limit`` rows in all.

        Returns:
            How many rows were deleted (``limit`` means there may be more).
        """
        check_int("limit", limit, 1, 100_000)
        with self._transaction("reading retention settings", now) as tx:
            kept = [
                (row["id"], row["retention_seconds"])
                for row in tx.execute(
                    "SELECT id, retention_seconds FROM environments "
                    "WHERE retention_seconds IS NOT NULL ORDER BY rowid"
                )
            ]
            now = tx.now  # the database's clock, when it is the time authority
        deleted = 0
        for environment_id, retention in kept:
            if deleted >= limit:
                break
            deleted += self.purge(
                environment_id, older_than=now - retention, limit=limit - deleted, now=now
            )
        return deleted

    @staticmethod
    def _keyed(tx: Transaction, environment_id: str, key: str) -> WorkItem | None:
        found = tx.one(
            f"SELECT {ITEM_COLUMNS} FROM work_items WHERE environment_id = ? AND idem_key = ?",
            (environment_id, key),
        )
        return None if found is None else attrs.evolve(item_from_row(found), duplicate=True)

    def poll(
        self,
        environment_id: str,
        *,
        worker_id: str | None = None,
        now: float,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        """Claim the oldest claimable queued item for ``worker_id``, or ``None``.

        The highest priority first, the oldest first within one priority.
        Claimable: ``queued``, past its ``not_before`` (a delay or a retry's
        backoff), requiring no label the poller lacks (``labels``; see
        `label_filter`), and
        not handed out within the last ``reclaim_older_than_ms`` (default from
        the lease policy). The claim
        records the hand-out and mints a fresh session secret, returned here
        and nowhere else. A row another claim holds is skipped, not waited for.
        An anonymous poll (``worker_id=None``) records a hand-out to nobody in
        particular; the ack binds it.
        """
        check_id("environment_id", environment_id)
        if worker_id is not None:
            check_id("worker_id", worker_id)
        window_ms = self._reclaim_window(reclaim_older_than_ms)
        wanted = check_labels(labels)
        secret = secrets.token_urlsafe(32)
        with self._transaction("polling for work", now) as tx:
            self._open_claim(tx, environment_id, worker_id)
            claimable = self._claimable(tx, environment_id, window_ms, limit=1, labels=wanted)
            if not claimable:
                return None
            row = claimable[0]
            tx.execute(
                "UPDATE work_items SET delivered_at = ?, delivered_to = ?, secret_hash = ? "
                "WHERE id = ?",
                (tx.now, worker_id, hash_secret(secret), row["id"]),
            )
            return self._read_item(tx, row["id"], secret=secret)

    def _reclaim_window(self, reclaim_older_than_ms: int | None) -> float:
        """How long (ms) a handed-out, unacknowledged item stays out of reach."""
        if reclaim_older_than_ms is None:
            return self.lease_policy.reclaim_older_than_ms
        return check_int("reclaim_older_than_ms", reclaim_older_than_ms, 0, MAX_BLOCK_OR_RECLAIM_MS)

    def _open_claim(self, tx: Transaction, environment_id: str, worker_id: str | None) -> None:
        """What every poll and claim does first: the environment exists, due lease
        expiries are applied, and a named poller is recorded as polling now."""
        self._ensure_environment(tx, environment_id)
        self._expire_leases(tx)
        if worker_id is not None:
            tx.execute(
                "INSERT INTO pollers (environment_id, worker_id, last_poll_at) "
                "VALUES (?, ?, ?) ON CONFLICT (environment_id, worker_id) DO UPDATE SET "
                "last_poll_at = excluded.last_poll_at",
                (environment_id, worker_id, tx.now),
            )

    @staticmethod
    def _claimable(
        tx: Transaction,
        environment_id: str,
        window_ms: float,
        *,
        limit: int,
        labels: tuple[str, ...] = (),
    ) -> list[Row]:
        """The ids of the next ``limit`` items a poll or a claim may hand out, in order.

        The one definition of "claimable" and of the claim order, shared by
        `poll` and `claim`: highest priority first, oldest first within one;
        ``queued``, past ``not_before``, not handed out within ``window_ms``,
        requiring no label the claimer's checked ``labels`` lack (`label_filter`).
        Rows other claims hold are skipped, never waited for.
        """
        routing, routing_params = label_filter(labels)
        rows: list[Row] = tx.execute(
            "SELECT id, attempts, beats FROM work_items WHERE environment_id = ? "
            "AND state = 'queued' "
            "AND (delivered_at IS NULL OR delivered_at <= ?) "
            "AND (not_before IS NULL OR not_before <= ?) "
            f"AND {routing} "
            "ORDER BY priority DESC, created_at, seq LIMIT ?{skip_locked}",
            (environment_id, tx.now - window_ms / 1000.0, tx.now, *routing_params, limit),
        ).fetchall()
        return rows

    def claim(
        self,
        environment_id: str,
        *,
        worker_id: str,
        limit: int,
        now: float,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[WorkItem]:
        """`poll` and `ack` of up to ``limit`` items for ``worker_id``, in one transaction.

        The items come back ``starting``, bound to ``worker_id``, each with a
        fresh session secret (returned here and nowhere else), in claim order.
        Exactly what a `poll` then an `ack` of each would have done, with one
        commit instead of two per item: for a worker with several free session
        slots (DESIGN §3.3: a slot is held before its item is claimed, so
        ``limit`` is the number of slots the caller holds).

        ``labels`` are the claimer's routing labels, as for `poll`.

        Raises:
            BadRequest: ``limit`` outside 1-100, a bad id or label.
        """
        claimed = self._claim(
            environment_id, worker_id, limit, now, reclaim_older_than_ms, labels, ttl=None
        )
        return [item for item, _ in claimed]

    def claim_leased(
        self,
        environment_id: str,
        *,
        worker_id: str,
        limit: int,
        now: float,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
        desired_ttl_seconds: float | None = None,
    ) -> list[tuple[WorkItem, HeartbeatResult]]:
        """`claim`, and the first heartbeat of each item, in the same transaction.

        Each item comes back ``active`` with its lease granted, as a `heartbeat`
        with `NO_HEARTBEAT` right after the claim would have left it, paired
        with that beat's answer (the fencing token to renew with, and the ttl,
        clamped as for `heartbeat`). For a worker that starts each session as
        soon as it holds the item (its slot was held before the claim): one
        commit per batch instead of one more per item.

        Raises:
            BadRequest: as for `claim`, or a non-positive or non-finite TTL.
        """
        ttl = self.lease_policy.clamp_ttl(check_ttl(desired_ttl_seconds))
        claimed = self._claim(
            environment_id, worker_id, limit, now, reclaim_older_than_ms, labels, ttl=ttl
        )
        return [(item, grant) for item, grant in claimed if grant is not None]

    def _claim(
        self,
        environment_id: str,
        worker_id: str,
        limit: int,
        now: float,
        reclaim_older_than_ms: int | None,
        labels: Sequence[str] | None,
        *,
        ttl: float | None,
    ) -> list[tuple[WorkItem, HeartbeatResult | None]]:
        """The claim; with a ``ttl``, each item's first heartbeat too."""
        check_id("environment_id", environment_id)
        check_id("worker_id", worker_id)
        limit = check_int("limit", limit, 1, MAX_CLAIM_BATCH)
        wanted = check_labels(labels)
        window_ms = self._reclaim_window(reclaim_older_than_ms)
        claimed: list[tuple[str, str, HeartbeatResult | None]] = []
        with self._transaction("claiming work", now) as tx:
            self._open_claim(tx, environment_id, worker_id)
            rows = self._claimable(tx, environment_id, window_ms, limit=limit, labels=wanted)
            lease_until = tx.now + self.lease_policy.default_ttl
            for row in rows:
                secret = secrets.token_urlsafe(32)
                values: tuple[object, ...] = (
                    tx.now,
                    worker_id,
                    hash_secret(secret),
                    worker_id,
                    tx.now,
                )
                grant: HeartbeatResult | None = None
                if ttl is None:
                    tx.execute(
                        "UPDATE work_items SET state = 'starting', delivered_at = ?, "
                        "delivered_to = ?, secret_hash = ?, worker_id = ?, acknowledged_at = ?, "
                        "lease_expires_at = ? WHERE id = ?",
                        (*values, lease_until, row["id"]),
                    )
                else:
                    # The first beat of a fresh claim: ``starting -> active`` (a queued
                    # item has no stop request to keep), token minted, lease granted.
                    token = self._next_token(row["attempts"], row["beats"] + 1)
                    tx.execute(
                        "UPDATE work_items SET state = 'active', delivered_at = ?, "
                        "delivered_to = ?, secret_hash = ?, worker_id = ?, acknowledged_at = ?, "
                        "token = ?, beats = beats + 1, latest_heartbeat_at = ?, "
                        "lease_expires_at = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                        (*values, token, tx.now, tx.now + ttl, tx.now, row["id"]),
                    )
                    grant = HeartbeatResult(token, ttl, WorkState.ACTIVE, lease_extended=True)
                claimed.append((row["id"], secret, grant))
            return [
                (self._read_item(tx, work_id, secret=secret), grant)
                for work_id, secret, grant in claimed
            ]

    def ack(
        self, environment_id: str, work_id: str, *, worker_id: str | None = None, now: float
    ) -> WorkItem:
        """``queued -> starting``, binding the item to the worker it was handed to.

        The worker is the one the poll named; after an anonymous poll, the one
        this ack names (``None`` leaves the item unbound).

        Raises:
            NotFound: unknown item.
            Conflict: the item is not queued (a second ack), was never handed out,
                or was last handed to another worker than ``worker_id``.
        """
        check_id("environment_id", environment_id)
        if worker_id is not None:
            check_id("worker_id", worker_id)
        with self._transaction("acknowledging work", now) as tx:
            self._expire_leases(tx)
            row = self._item_row(tx, environment_id, work_id)
            if row["state"] != WorkState.QUEUED:
                raise Conflict(
                    f"work item {work_id!r} is {row['state']}, not queued: it was already "
                    "acknowledged"
                )
            holder = row["delivered_to"]
            if row["delivered_at"] is None:
                raise Conflict(
                    f"work item {work_id!r} was last handed out to nobody: poll for it first"
                )
            if worker_id is not None and holder is not None and holder != worker_id:
                raise Conflict(
                    f"work item {work_id!r} was last handed out to another worker, not "
                    f"{worker_id!r}: poll for it first"
                )
            tx.execute(
                "UPDATE work_items SET state = 'starting', worker_id = ?, acknowledged_at = ?, "
                "lease_expires_at = ? WHERE id = ?",
                (holder or worker_id, tx.now, tx.now + self.lease_policy.default_ttl, work_id),
            )
            return self._read_item(tx, work_id)

    def heartbeat(
        self,
        environment_id: str,
        work_id: str,
        *,
        expected_last_heartbeat: str,
        now: float,
        desired_ttl_seconds: float | None = None,
    ) -> HeartbeatResult:
        """Renew the lease if ``expected_last_heartbeat`` is the current token.

        The first beat of a lease sends `NO_HEARTBEAT` and moves ``starting ->
        active`` (or keeps ``stopping`` if a stop was requested meanwhile).
        Every successful beat mints a new token. A beat on a stopped item with
        its last token answers ``stopped`` and ``lease_extended=False``.

        Raises:
            BadRequest: a non-positive or non-finite TTL.
            NotFound: unknown item.
            Conflict: the item is still ``queued`` (not acknowledged).
            FencingConflict: the token is stale (the lease expired or moved on).
        """
        check_id("environment_id", environment_id)
        if not isinstance(expected_last_heartbeat, str) or not expected_last_heartbeat:
            raise BadRequest("expected_last_heartbeat must be a non-empty string")
        ttl = self.lease_policy.clamp_ttl(check_ttl(desired_ttl_seconds))
        with self._transaction("heartbeating work", now) as tx:
            self._expire_leases(tx)
            row = self._item_row(tx, environment_id, work_id)
            state = WorkState(row["state"])
            if state is WorkState.QUEUED and expected_last_heartbeat == NO_HEARTBEAT:
                raise Conflict(f"work item {work_id!r} is queued: acknowledge it first")
            self._check_fence(row, expected_last_heartbeat, work_id)
            new = self._next_token(row["attempts"], row["beats"] + 1)
            if state is WorkState.STOPPED:
                self._fenced_update(tx, row, "token = ?, beats = beats + 1", (new,))
                return HeartbeatResult(new, 0.0, WorkState.STOPPED, lease_extended=False)
            new_state = WorkState.ACTIVE if state is WorkState.STARTING else state
            self._fenced_update(
                tx,
                row,
                "state = ?, token = ?, beats = beats + 1, latest_heartbeat_at = ?, "
                "lease_expires_at = ?, started_at = COALESCE(started_at, ?)",
                (new_state.value, new, tx.now, tx.now + ttl, tx.now),
            )
            return HeartbeatResult(new, ttl, new_state, lease_extended=True)

    def stop(
        self,
        environment_id: str,
        work_id: str,
        *,
        now: float,
        force: bool = False,
        expected_last_heartbeat: str | None = None,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        """Move a live item to ``stopped`` and record its outcome.

        The retry rule of DESIGN §4.2 is decided here: a ``failed`` outcome of
        a running attempt (``starting`` or ``active``: not ``stopping``, not an
        operator's stop of a queued item) on an item with a `RetryPolicy`,
        exit code not listed as non-retryable, goes back to ``queued`` with ``attempts + 1`` and
        ``not_before`` = now + `backoff_delay`, unless that was its last
        attempt: then it stops in dead letter (``dead``). Every outcome
        recorded here is appended to the item's ``history``.

        Without a token this is an operator's force-stop and always allowed on
        a live item; with one, the token must be current (`NO_HEARTBEAT` is
        current for an acknowledged item that has not beaten yet).

        Raises:
            NotFound: unknown item.
            FencingConflict: the token is stale.
            Conflict: the item is already stopped.
        """
        del force  # every stop is a hard stop; request_stop is the graceful path
        check_id("environment_id", environment_id)
        _check_outcome(outcome)
        if expected_last_heartbeat is not None and (
            not isinstance(expected_last_heartbeat, str) or not expected_last_heartbeat
        ):
            raise BadRequest("expected_last_heartbeat must be a non-empty string when given")
        recorded = outcome or Outcome(OutcomeStatus.CANCELLED, reason="stopped without an outcome")
        with self._committing("stopping work", now) as tx:
            self._expire_leases(tx)
            row = self._item_row(tx, environment_id, work_id)
            if expected_last_heartbeat is not None:
                self._check_fence(row, expected_last_heartbeat, work_id)
            if row["state"] == WorkState.STOPPED:
                raise Conflict(f"work item {work_id!r} is already stopped")
            policy = retry_from_json(row["retry_policy"])
            decision = stop_decision(policy, row["state"], recorded, row["attempts"])
            attempts = decision.attempts
            if decision.requeue and policy is not None:
                retry_at = tx.now + backoff_delay(policy, attempts)
                history = _history_with(row, _attempt(row, recorded, tx.now, retry_at))
                self._fenced_update(
                    tx,
                    row,
                    _REQUEUE + ", history = ?, not_before = ?",
                    (attempts, history, retry_at),
                )
                tx.announce(environment_id)
                return self._read_item(tx, work_id)
            history = _history_with(row, _attempt(row, recorded, tx.now, None))
            self._fenced_update(
                tx,
                row,
                "state = 'stopped', stopped_at = ?, outcome = ?, lease_expires_at = NULL, "
                "secret_hash = NULL, attempts = ?, history = ?, dead = ?",
                (
                    tx.now,
                    outcome_to_json(recorded),
                    attempts,
                    history,
                    int(decision.dead),
                ),
            )
            self._settle_delegations(tx, work_id)
            return self._read_item(tx, work_id)

    def requeue(
        self,
        environment_id: str,
        work_id: str,
        *,
        now: float,
        expected_last_heartbeat: str,
        outcome: Outcome | None = None,
    ) -> WorkItem:
        """The holder gives a live item back, so another worker may try it.

        What a worker does with an item its runtime could not serve (a wedged
        session): the item goes back to ``queued`` with ``attempts + 1``,
        unbound and claimable at once, exactly as if its lease had expired,
        but without making everyone wait for the ttl. The holder's token and
        the session secret die here. The outcome of the failed attempt is kept
        in the item's ``history`` (``outcome`` stays ``None`` until it stops).

        Two cases stop the item instead, recording ``outcome`` (``cancelled``
        when none is given): it is ``stopping`` (an operator asked for a stop,
        which wins), or this was its last attempt (``max_attempts``), so a
        task that wedges every runtime does not circulate forever.

        Raises:
            BadRequest: an empty token or a malformed outcome.
            NotFound: unknown item.
            FencingConflict: the token is not the current one (also for a
                queued item: nobody holds it).
            Conflict: the item is already stopped.
        """
        check_id("environment_id", environment_id)
        _check_outcome(outcome)
        if not isinstance(expected_last_heartbeat, str) or not expected_last_heartbeat:
            raise BadRequest("expected_last_heartbeat must be a non-empty string")
        recorded = outcome or Outcome(OutcomeStatus.CANCELLED, reason="requeued without an outcome")
        with self._committing("requeueing work", now) as tx:
            self._expire_leases(tx)
            row = self._item_row(tx, environment_id, work_id)
            state = WorkState(row["state"])
            if state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id!r} is already stopped")
            self._check_fence(row, expected_last_heartbeat, work_id)
            attempts = row["attempts"] + 1
            limit = row["max_attempts"] or self.lease_policy.max_attempts
            if state is WorkState.STOPPING or attempts >= limit:
                history = _history_with(row, _attempt(row, recorded, tx.now, None))
                self._fenced_update(
                    tx,
                    row,
                    "state = 'stopped', attempts = ?, stopped_at = ?, outcome = ?, "
                    "lease_expires_at = NULL, secret_hash = NULL, dead = ?, history = ?",
                    (
                        attempts,
                        tx.now,
                        outcome_to_json(recorded),
                        int(state is not WorkState.STOPPING),
                        history,
                    ),
                )
                self._settle_delegations(tx, work_id)
            else:
                history = _history_with(row, _attempt(row, recorded, tx.now, tx.now))
                self._fenced_update(tx, row, _REQUEUE + ", history = ?", (attempts, history))
                tx.announce(environment_id)
            return self._read_item(tx, work_id)

    def request_stop(self, environment_id: str, work_id: str, *, now: float) -> WorkItem:
        """Operator cancel: the holder's next heartbeat answers ``stopping``.

        A ``queued`` item has no holder, so it is stopped at once with a
        ``cancelled`` outcome. Asking twice is harmless.

        Raises:
            NotFound: unknown item.
            Conflict: the item is already stopped.
        """
        check_id("environment_id", environment_id)
        with self._transaction("requesting a stop", now) as tx:
            self._expire_leases(tx)
            row = self._item_row(tx, environment_id, work_id)
            state = WorkState(row["state"])
            if state is WorkState.STOPPED:
                raise Conflict(f"work item {work_id!r} is already stopped")
            if state is WorkState.QUEUED:
                cancelled = Outcome(
                    OutcomeStatus.CANCELLED, reason="stop requested before it was claimed"
                )
                tx.execute(
                    "UPDATE work_items SET state = 'stopped', stop_requested_at = ?, "
                    "stopped_at = ?, outcome = ?, secret_hash = NULL WHERE id = ?",
                    (tx.now, tx.now, outcome_to_json(cancelled), work_id),
                )
                self._settle_delegations(tx, work_id)
            elif state is not WorkState.STOPPING:
                tx.execute(
                    "UPDATE work_items SET state = 'stopping', stop_requested_at = ? WHERE id = ?",
                    (tx.now, work_id),
                )
            return self._read_item(tx, work_id)

    def retry(self, environment_id: str, work_id: str, *, now: float) -> WorkItem:
        """Put a stopped item back to ``queued`` with fresh attempts (out of dead letter).

        The item keeps its id, session, policy and history; its outcome, stop
        times, attempt count, backoff and dead-letter mark are cleared, so it
        is claimable at once and has its whole ``max_attempts`` again.

        Raises:
            NotFound: unknown item.
            Conflict: the item is not stopped (a live item needs no retry).
        """
        check_id("environment_id", environment_id)
        with self._committing("retrying work", now) as tx:
            self._expire_leases(tx)
            row = self._item_row(tx, environment_id, work_id)
            if row["state"] != WorkState.STOPPED:
                raise Conflict(
                    f"work item {work_id!r} is {row['state']}, not stopped: only a stopped "
                    "item can be retried"
                )
            tx.execute(
                f"UPDATE work_items SET {_REQUEUE}, outcome = NULL, stopped_at = NULL, "
                "stop_requested_at = NULL, not_before = NULL, dead = 0 WHERE id = ?",
                (0, work_id),
            )
            tx.announce(environment_id)
            return self._read_item(tx, work_id)

    def get(self, environment_id: str, work_id: str, *, now: float) -> WorkItem:
        """One item, without its secret.

        Raises:
            NotFound: unknown item (or an item of another environment).
        """
        check_id("environment_id", environment_id)
        with self._transaction("reading work", now) as tx:
            self._expire_leases(tx)
            found = tx.one(
                f"SELECT {ITEM_COLUMNS} FROM work_items WHERE id = ? AND environment_id = ?",
                (work_id, environment_id),
            )
            if found is None:
                raise NotFound(f"no work item {work_id!r} in environment {environment_id!r}")
            return item_from_row(found)

    def list_work(
        self,
        environment_id: str,
        *,
        now: float,
        state: WorkState | str | None = None,
        limit: int = 100,
        page: int = 0,
        dead: bool = False,
    ) -> list[WorkItem]:
        """Items oldest first, ``limit`` (1-1000) per zero-based ``page``; no secrets.

        ``dead=True`` lists only the dead letter: stopped items out of attempts.
        """
        check_id("environment_id", environment_id)
        wanted = None if state is None else check_enum("state", state, WorkState)
        check_int("limit", limit, 1, MAX_LIMIT)
        check_int("page", page, 0, MAX_PAGE)
        with self._transaction("listing work", now) as tx:
            self._expire_leases(tx)
            sql = f"SELECT {ITEM_COLUMNS} FROM work_items WHERE environment_id = ?"
            params: list[object] = [environment_id]
            if wanted is not None:
                sql += " AND state = ?"
                params.append(wanted.value)
            if dead:
                sql += " AND dead = 1"
            sql += " ORDER BY created_at, seq LIMIT ? OFFSET ?"
            params += [limit, limit * page]
            return [item_from_row(row) for row in tx.execute(sql, params)]

    def stats(self, environment_id: str, *, now: float) -> WorkStats:
        """Queue depth, items in flight, the oldest queued item, and recent pollers."""
        check_id("environment_id", environment_id)
        with self._transaction("reading stats", now) as tx:
            self._expire_leases(tx)
            row = tx.one(
                "SELECT "
                "COUNT(*) FILTER (WHERE state = 'queued') AS depth, "
                "COUNT(*) FILTER (WHERE state IN ('starting', 'active', 'stopping')) "
                "AS pending, "
                "MIN(created_at) FILTER (WHERE state = 'queued') AS oldest "
                "FROM work_items WHERE environment_id = ?",
                (environment_id,),
            )
            polling = tx.one(
                "SELECT COUNT(*) AS polling FROM pollers "
                "WHERE environment_id = ? AND last_poll_at > ?",
                (environment_id, tx.now - self.lease_policy.polling_window),
            )
            assert row is not None and polling is not None
            return WorkStats(
                depth=row["depth"],
                pending=row["pending"],
                oldest_queued_at=row["oldest"],
                workers_polling=polling["polling"],
            )

    def verify_session_secret(
        self, environment_id: str, session_id: str, secret: str, *, now: float
    ) -> bool:
        """Whether ``secret`` is the live session credential of ``session_id``.

        True only while the claim that minted it holds: a requeue, a re-claim
        or a stop voids it. The comparison is constant-time, and an unknown
        session costs the same comparison, so timing tells nothing.
        """
        with self._transaction("verifying a session credential", now) as tx:
            self._expire_leases(tx)
            row = tx.one(
                "SELECT secret_hash FROM work_items WHERE environment_id = ? AND session_id = ?",
                (environment_id, session_id),
            )
        stored = row["secret_hash"] if row is not None else None
        candidate = hash_secret(secret)
        matches = hmac.compare_digest(stored or "0" * len(candidate), candidate)
        return stored is not None and matches

    def list_environments(self) -> list[str]:
        """Every environment used so far, in order of first use."""
        with self._transaction("listing environments") as tx:
            return [r["id"] for r in tx.execute("SELECT id FROM environments ORDER BY rowid")]
