"""Records exchanged with the control plane.

All are frozen attrs classes. Times are POSIX seconds (``float``) in Python;
on the wire they are ISO-8601 UTC strings (see ``_codec``). The fencing token
(``last_heartbeat``) is an opaque string: compare it, never parse it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = [
    "NO_HEARTBEAT",
    "Attempt",
    "Delegation",
    "DelegationStatus",
    "EnvironmentSettings",
    "HeartbeatResult",
    "Outcome",
    "OutcomeStatus",
    "PresenceReport",
    "RetryPolicy",
    "SessionData",
    "SessionMessage",
    "WorkItem",
    "WorkState",
    "WorkStats",
    "WorkerRecord",
    "WorkerStatus",
]

#: The fencing token a worker sends with the first heartbeat of a lease.
NO_HEARTBEAT = "NO_HEARTBEAT"


class WorkState(enum.StrEnum):
    """Where a work item is in its lifecycle."""

    QUEUED = "queued"
    STARTING = "starting"
    ACTIVE = "active"
    STOPPING = "stopping"
    STOPPED = "stopped"


class OutcomeStatus(enum.StrEnum):
    """How a session ended."""

    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    WEDGED = "wedged"
    LEASE_LOST = "lease_lost"


class WorkerStatus(enum.StrEnum):
    """A worker's status as the control plane sees it (DESIGN §4 table)."""

    PROVISIONING = "provisioning"
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"
    FAILED = "failed"
    REMOVED = "removed"


class DelegationStatus(enum.StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value) if value else {}


@attrs.frozen
class Outcome:
    """What a session produced; what ``stop`` records on the item.

    Attributes:
        status: how it ended.
        exit_code: the agent process's exit code, when there was a process.
        result: the agent's result (the last JSON ``result`` on stdout, else the output tail).
        duration: seconds of execution (never the wait for a slot).
        reason: a short explanation for anything but ``completed``.
    """

    status: OutcomeStatus = attrs.field(converter=OutcomeStatus)
    exit_code: int | None = None
    result: str | None = None
    duration: float | None = None
    reason: str | None = None


def _int_tuple(value: Iterable[int] | None) -> tuple[int, ...]:
    return tuple(value) if value else ()


def _attempt_tuple(value: Iterable[Attempt] | None) -> tuple[Attempt, ...]:
    return tuple(value) if value else ()


@attrs.frozen
class RetryPolicy:
    """How a failed session of one item is retried (set at submit, DESIGN §4.2).

    A ``failed`` outcome stopped by its holder puts the item back to ``queued``
    with ``not_before`` pushed out by an exponential backoff with jitter, until
    ``max_attempts`` attempts have run; the last failure lands the item in dead
    letter (``stopped``, ``dead``). ``cancelled``, ``timeout``, ``completed`` and
    a failure whose exit code is listed in ``non_retryable_exit_codes`` are
    final at once. The same ``max_attempts`` bounds lease losses and requeues
    of the item, in place of the environment's default.

    Attributes:
        max_attempts: attempts in all, the first included (1-100).
        backoff: seconds before the second attempt; each further one doubles it.
        backoff_max: the cap on one wait.
        non_retryable_exit_codes: agent exit codes that mean "do not try again".
    """

    max_attempts: int = 3
    backoff: float = 1.0
    backoff_max: float = 300.0
    non_retryable_exit_codes: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)


@attrs.frozen
class Attempt:
    """One finished attempt of an item, as kept in its ``history``.

    Attributes:
        attempt: 1 for the first attempt.
        worker_id: the worker that ran it, if one was bound.
        started_at: when its lease started (first heartbeat), if it did.
        ended_at: when its outcome was recorded.
        outcome: how it ended.
        retry_at: when the item became claimable again (``None``: it did not retry).
    """

    attempt: int
    outcome: Outcome
    ended_at: float
    worker_id: str | None = None
    started_at: float | None = None
    retry_at: float | None = None


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class EnvironmentSettings:
    """The policies of one environment (DESIGN §4.2), kept with the environment itself.

    Stored in the control plane's database, so every ``serve`` replica and
    every worker sharing it applies the same values. ``None`` everywhere is
    the built-in behaviour: no queue cap, nothing purged, failed sessions not
    retried (lease losses bounded by the store's ``LeasePolicy.max_attempts``).

    Attributes:
        max_queue_depth: the most ``queued`` items the environment holds; a
            submit beyond it is refused (`QueueFull`, HTTP 429).
        retention: seconds a stopped item, a message or a settled delegation is
            kept after it ended; then the retention sweep deletes it.
        max_attempts: the default retry policy's attempts, for items submitted
            without a `RetryPolicy` (a per-item policy overrides it whole).
        backoff: the default retry policy's first backoff, in seconds.
        backoff_max: the default retry policy's longest backoff, in seconds.
    """

    max_queue_depth: int | None = None
    retention: float | None = None
    max_attempts: int | None = None
    backoff: float | None = None
    backoff_max: float | None = None

    def retry_policy(self) -> RetryPolicy | None:
        """The retry policy an item submitted without one gets (``None``: no retries).

        Any of the three retry fields set makes one; the others take
        `RetryPolicy`'s defaults.
        """
        if self.max_attempts is None and self.backoff is None and self.backoff_max is None:
            return None
        default = RetryPolicy()
        return RetryPolicy(
            max_attempts=default.max_attempts if self.max_attempts is None else self.max_attempts,
            backoff=default.backoff if self.backoff is None else self.backoff,
            backoff_max=default.backoff_max if self.backoff_max is None else self.backoff_max,
        )


@attrs.frozen
class SessionData:
    """The ``data`` of a session work item."""

    id: str
    prompt: str
    type: str = "session"


@attrs.frozen
class WorkItem:
    """A work item as the control plane stores it.

    ``secret`` is the session-scoped credential handed to the claiming worker
    (``None`` elsewhere); it never appears in ``repr``.
    """

    id: str
    environment_id: str
    state: WorkState = attrs.field(converter=WorkState)
    data: SessionData
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_mapping)
    attempts: int = 0
    worker_id: str | None = None
    created_at: float | None = None
    acknowledged_at: float | None = None
    started_at: float | None = None
    latest_heartbeat_at: float | None = None
    stop_requested_at: float | None = None
    stopped_at: float | None = None
    outcome: Outcome | None = None
    secret: str | None = attrs.field(default=None, repr=False)
    type: str = "work"
    retry: RetryPolicy | None = None
    history: tuple[Attempt, ...] = attrs.field(default=(), converter=_attempt_tuple)
    not_before: float | None = None
    dead: bool = False
    priority: int = 0
    key: str | None = None
    #: Routing labels a worker must have to claim it (sorted, no duplicates).
    labels: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    #: Seconds of execution its session may take (``None``: the worker's ``session_timeout``).
    timeout: float | None = None
    #: Set on the answer to a submit whose ``key`` was already used: this is that item.
    duplicate: bool = attrs.field(default=False, eq=False)


@attrs.frozen
class HeartbeatResult:
    """The answer to a lease heartbeat.

    Attributes:
        last_heartbeat: the new fencing token; send it with the next heartbeat and with ``stop``.
        ttl_seconds: how long the server keeps the lease from when it processed this beat.
        state: the item's state (``stopping`` means an operator asked it to stop).
        lease_extended: ``False`` when the server did not extend the lease.
    """

    last_heartbeat: str
    ttl_seconds: float
    state: WorkState = attrs.field(converter=WorkState)
    lease_extended: bool = True


@attrs.frozen
class WorkStats:
    """Queue inspection figures.

    Attributes:
        depth: items waiting in ``queued``.
        pending: items handed out and not yet stopped (``starting``/``active``/``stopping``).
        oldest_queued_at: creation time of the oldest queued item, if any.
        workers_polling: distinct workers that polled recently.
    """

    depth: int
    pending: int
    oldest_queued_at: float | None
    workers_polling: int


@attrs.frozen
class PresenceReport:
    """The body of a worker presence heartbeat (DESIGN §3.6)."""

    worker_id: str
    status: str = "idle"
    error_rate: float = 0.0
    sample_error: str | None = None
    active_tasks: int = 0
    current_task: str | None = None
    uptime_seconds: float = 0.0
    runtime_state: str | None = None
    runtime_metadata: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)


@attrs.frozen
class WorkerRecord:
    """A worker as the control plane sees it."""

    worker_id: str
    environment_id: str
    status: WorkerStatus = attrs.field(converter=WorkerStatus)
    registered_at: float | None = None
    last_heartbeat_at: float | None = None
    error_rate: float = 0.0
    sample_error: str | None = None
    active_tasks: int = 0
    current_task: str | None = None
    uptime_seconds: float = 0.0
    runtime_state: str | None = None
    runtime_metadata: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)


@attrs.frozen
class Delegation:
    """A task one session handed to another agent, and its result once known.

    Attributes:
        id: the delegation id (the de-duplication key).
        source_id: the session that delegated.
        work_id: the work item created for the delegate.
        task: what was asked.
        status: ``pending`` until a result is recorded.
        response_preview: the delegate's raw output (untrusted: never put it in a prompt).
        worker_id: the worker that owned the source session when the delegation was made.
        completed_at: when the result was recorded.
        collected_at: when the worker collected the result (``None`` until then).
    """

    id: str
    source_id: str
    work_id: str
    task: str
    status: DelegationStatus = attrs.field(converter=DelegationStatus)
    response_preview: str | None = None
    worker_id: str | None = None
    created_at: float | None = None
    completed_at: float | None = None
    collected_at: float | None = None


@attrs.frozen
class SessionMessage:
    """A follow-up message or notification addressed to a session."""

    id: str
    session_id: str
    kind: str  # "message" | "notification"
    body: str
    created_at: float | None = None
