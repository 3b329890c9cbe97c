"""What both control-plane stores share: policies, input checks, rows to records.

Nothing here talks to a database. The lifecycle rules are in `_items`, `_workers`
and `_delegations`, written once against the small connection interface of `_sql`;
`_sqlite` and `_postgres` only say how to connect and which SQL dialect to speak.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import attrs

from .._exceptions import BadRequest
from .._models import (
    Attempt,
    Delegation,
    DelegationStatus,
    EnvironmentSettings,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    RetryPolicy,
    SessionData,
    SessionMessage,
    WorkerRecord,
    WorkerStatus,
    WorkItem,
    WorkState,
)

#: The environment used when none is named.
DEFAULT_ENVIRONMENT_ID: Final = "default"

#: The longest delegate output kept as a delegation's ``response_preview`` (characters).
RESPONSE_PREVIEW_CHARS: Final = 4000

#: Called after a submit commits, with the environment id; from whichever thread submitted.
SubmitListener = Callable[[str], None]

#: A row read back from either database, addressed by column name.
Row = Mapping[str, Any]

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
MAX_LIMIT: Final = 1000
MAX_PAGE: Final = 1_000_000
MAX_BLOCK_OR_RECLAIM_MS: Final = 24 * 3600 * 1000
#: The most items one `claim` hands out.
MAX_CLAIM_BATCH: Final = 100

EXPIRED_OUTCOME: Final = json.dumps(
    {"status": OutcomeStatus.FAILED.value, "reason": "lease expired"}, sort_keys=True
)
EXPIRED_WHILE_STOPPING_OUTCOME: Final = json.dumps(
    {"status": OutcomeStatus.CANCELLED.value, "reason": "lease expired after a stop request"},
    sort_keys=True,
)


def _finite_positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


@attrs.frozen
class LeasePolicy:
    """How the store hands out and times out leases.

    Attributes:
        default_ttl: lease seconds when a heartbeat asks for none; also the lease an ``ack``
            starts, so an item acked by a worker that then dies comes back.
        min_ttl: the shortest lease granted, whatever a worker asks for.
        max_ttl: the longest lease granted.
        max_attempts: attempts an item may lose, to lease expiry or to a ``requeue`` by its
            holder; the last loss stops it (``failed: lease expired``, or the outcome the
            requeue reported) instead of requeueing it.
        reclaim_older_than_ms: the default reclaim window of ``poll``: an item handed out but
            not acked within it is handed out again.
        polling_window: seconds a poll keeps a worker counted in ``workers_polling``.
    """

    default_ttl: float = attrs.field(default=60.0, validator=_finite_positive)
    min_ttl: float = attrs.field(default=1.0, validator=_finite_positive)
    max_ttl: float = attrs.field(default=3600.0, validator=_finite_positive)
    max_attempts: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    reclaim_older_than_ms: int = attrs.field(default=30_000, validator=attrs.validators.ge(1))
    polling_window: float = attrs.field(default=60.0, validator=_finite_positive)

    def __attrs_post_init__(self) -> None:
        if not self.min_ttl <= self.default_ttl <= self.max_ttl:
            raise ValueError(
                "LeasePolicy needs min_ttl <= default_ttl <= max_ttl, got "
                f"{self.min_ttl} / {self.default_ttl} / {self.max_ttl}"
            )

    def clamp_ttl(self, desired: float | None) -> float:
        """The lease actually granted for a requested ``desired_ttl_seconds``."""
        if desired is None:
            return self.default_ttl
        return min(self.max_ttl, max(self.min_ttl, float(desired)))


# --- input validation ---------------------------------------------------------


def check_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise BadRequest(
            f"{what} must be 1-200 characters of letters, digits and ._:@- "
            f"(starting with a letter or digit), got {preview(value)}"
        )
    return value


def check_text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{what} must not be empty")
    return value


def check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{what} must be an integer between {low} and {high}, got {value!r}")
    return value


_E = TypeVar("_E", WorkState, DelegationStatus)


def check_enum(what: str, value: object, enum: type[_E]) -> _E:
    if isinstance(value, str):
        try:
            return enum(value)
        except ValueError:
            pass
    allowed = ", ".join(member.value for member in enum)
    raise BadRequest(f"{what} must be one of {allowed}; got {preview(value)}")


def preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_metadata(value: Mapping[str, str] | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest(f"metadata must be a mapping of strings, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise BadRequest(f"metadata keys and values must be strings, got {key!r}: {item!r}")
    return dict(value)


def json_object(what: str, value: Mapping[str, Any] | None) -> str:
    try:
        return json.dumps(dict(value or {}), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"{what} must be JSON-serialisable: {exc}") from None


def check_ttl(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"desired_ttl_seconds must be a number, got {preview(value)}")
    if not math.isfinite(value) or value <= 0:
        raise BadRequest(f"desired_ttl_seconds must be a finite number > 0, got {value!r}")
    return float(value)


def check_report(report: object) -> PresenceReport:
    if not isinstance(report, PresenceReport):
        raise BadRequest(f"a presence report is required, got {type(report).__name__}")
    check_id("worker_id", report.worker_id)
    rate = report.error_rate
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise BadRequest(f"error_rate must be a number between 0 and 1, got {rate!r}")
    check_int("active_tasks", report.active_tasks, 0, 1_000_000)
    uptime = report.uptime_seconds
    if isinstance(uptime, bool) or not isinstance(uptime, int | float) or not uptime >= 0:
        raise BadRequest(f"uptime_seconds must be a number >= 0, got {uptime!r}")
    for name in ("status", "sample_error", "current_task", "runtime_state"):
        field = getattr(report, name)
        if field is not None and not isinstance(field, str):
            raise BadRequest(f"{name} must be a string, got {type(field).__name__}")
    return report


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- rows to records ----------------------------------------------------------

ITEM_COLUMNS: Final = (
    "id, environment_id, state, session_id, prompt, metadata, attempts, worker_id, created_at, "
    "acknowledged_at, started_at, latest_heartbeat_at, stop_requested_at, stopped_at, outcome, "
    "retry_policy, history, not_before, dead, priority, idem_key, labels, timeout_seconds"
)

#: Priorities an item may have (higher first), and the longest delay at submit (30 days).
MIN_PRIORITY: Final = -1000
MAX_PRIORITY: Final = 1000
MAX_DELAY: Final = 30 * 86_400.0


#: The longest idempotency key (characters).
MAX_KEY: Final = 200


def check_key(key: str | None) -> str | None:
    """An idempotency key: 1 to 200 characters of text (`BadRequest` otherwise)."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise BadRequest(f"key must be a string of 1 to {MAX_KEY} characters")
    check_text("key", key)
    return key


#: Routing labels: how many an item or a worker may have, how long one may be, and
#: the characters one is made of (letters, digits and ``:._/-``, e.g. ``repo:foo``).
MAX_LABELS: Final = 32
MAX_LABEL: Final = 100
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9:._/-]{1,100}", re.ASCII)


def check_labels(labels: object, name: str = "labels") -> tuple[str, ...]:
    """Routing labels, sorted with duplicates folded (`BadRequest` names the bad one).

    Each label is 1 to 100 characters of letters, digits and ``:._/-``; at
    most 32 distinct labels. ``None`` is no labels. A lone string is refused
    (it is not a list of one label by accident of iteration).
    """
    if labels is None:
        return ()
    if isinstance(labels, str | bytes) or not isinstance(labels, list | tuple | set | frozenset):
        raise BadRequest(f"{name} must be a list of strings, got {type(labels).__name__}")
    folded: set[str] = set()
    for label in labels:
        if not isinstance(label, str):
            raise BadRequest(f"{name} must be a list of strings, got a {type(label).__name__}")
        if _LABEL_RE.fullmatch(label) is None:
            shown = label if len(label) <= 40 else label[:40] + "..."
            raise BadRequest(
                f"bad label {shown!r} in {name}: 1 to {MAX_LABEL} characters of letters, "
                "digits and :._/-"
            )
        folded.add(label)
    if len(folded) > MAX_LABELS:
        raise BadRequest(f"{name} takes at most {MAX_LABELS} labels, got {len(folded)}")
    return tuple(sorted(folded))


def labels_to_json(labels: tuple[str, ...]) -> str:
    """The stored form: a compact JSON array, sorted (``[]`` for none)."""
    return json.dumps(list(labels), separators=(",", ":"))


def labels_from_json(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


#: The longest per-item timeout at submit (7 days of execution).
MAX_TIMEOUT: Final = 7 * 86_400.0


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """A per-item execution timeout: seconds in (0, 7 days], or ``None``."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise BadRequest(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
    return float(timeout)


def check_schedule(priority: int, delay: float | None, not_before: float | None) -> None:
    """Validate an item's priority and its delay (seconds) or ``not_before`` (POSIX time)."""
    check_int("priority", priority, MIN_PRIORITY, MAX_PRIORITY)
    if delay is not None and not_before is not None:
        raise BadRequest("give a delay or not_before, not both")
    if delay is not None and (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not math.isfinite(delay)
        or not 0 <= delay <= MAX_DELAY
    ):
        raise BadRequest(f"delay must be a number of seconds in [0, {MAX_DELAY:g}]")
    if not_before is not None and (
        isinstance(not_before, bool)
        or not isinstance(not_before, int | float)
        or not math.isfinite(not_before)
        or not 0 <= not_before < 1e11
    ):
        raise BadRequest("not_before must be a finite POSIX time")


#: The most attempts an item may ask for, and the longest backoff (one day).
MAX_ATTEMPTS: Final = 100
MAX_BACKOFF: Final = 86_400.0
MAX_EXIT_CODES: Final = 64


def check_retry(policy: RetryPolicy | None) -> RetryPolicy | None:
    """Validate a submitter's retry policy (`BadRequest` names the bad field)."""
    if policy is None:
        return None
    if not isinstance(policy, RetryPolicy):
        raise BadRequest(f"retry must be a RetryPolicy, got {type(policy).__name__}")
    check_int("retry.max_attempts", policy.max_attempts, 1, MAX_ATTEMPTS)
    for name, value in (("backoff", policy.backoff), ("backoff_max", policy.backoff_max)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= MAX_BACKOFF
        ):
            raise BadRequest(f"retry.{name} must be a number of seconds in [0, {MAX_BACKOFF:g}]")
    if len(policy.non_retryable_exit_codes) > MAX_EXIT_CODES:
        raise BadRequest(f"retry.non_retryable_exit_codes takes at most {MAX_EXIT_CODES} codes")
    for code in policy.non_retryable_exit_codes:
        check_int("retry.non_retryable_exit_codes[]", code, -255, 255)
    return policy


def retry_to_json(policy: RetryPolicy | None) -> str | None:
    if policy is None:
        return None
    return json.dumps(
        {
            "max_attempts": policy.max_attempts,
            "backoff": policy.backoff,
            "backoff_max": policy.backoff_max,
            "non_retryable_exit_codes": list(policy.non_retryable_exit_codes),
        },
        sort_keys=True,
    )


def retry_from_json(text: str | None) -> RetryPolicy | None:
    return None if text is None else RetryPolicy(**json.loads(text))


def attempt_to_dict(attempt: Attempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "outcome": attrs.asdict(attempt.outcome),
        "ended_at": attempt.ended_at,
        "worker_id": attempt.worker_id,
        "started_at": attempt.started_at,
        "retry_at": attempt.retry_at,
    }


def history_from_json(text: str | None) -> tuple[Attempt, ...]:
    if not text:
        return ()
    return tuple(
        Attempt(**{**entry, "outcome": Outcome(**entry["outcome"])}) for entry in json.loads(text)
    )


def outcome_to_json(outcome: Outcome) -> str:
    return json.dumps(attrs.asdict(outcome), sort_keys=True, allow_nan=False)


def outcome_from_json(text: str | None) -> Outcome | None:
    if text is None:
        return None
    return Outcome(**json.loads(text))


def item_from_row(row: Row, *, secret: str | None = None) -> WorkItem:
    return WorkItem(
        id=row["id"],
        environment_id=row["environment_id"],
        state=WorkState(row["state"]),
        data=SessionData(id=row["session_id"], prompt=row["prompt"]),
        metadata=json.loads(row["metadata"]),
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        created_at=row["created_at"],
        acknowledged_at=row["acknowledged_at"],
        started_at=row["started_at"],
        latest_heartbeat_at=row["latest_heartbeat_at"],
        stop_requested_at=row["stop_requested_at"],
        stopped_at=row["stopped_at"],
        outcome=outcome_from_json(row["outcome"]),
        secret=secret,
        retry=retry_from_json(row["retry_policy"]),
        history=history_from_json(row["history"]),
        not_before=row["not_before"],
        dead=bool(row["dead"]),
        priority=row["priority"],
        key=row["idem_key"],
        labels=labels_from_json(row["labels"]),
        timeout=row["timeout_seconds"],
    )


def worker_from_row(row: Row) -> WorkerRecord:
    return WorkerRecord(
        worker_id=row["worker_id"],
        environment_id=row["environment_id"],
        status=WorkerStatus(row["status"]),
        registered_at=row["registered_at"],
        last_heartbeat_at=row["last_heartbeat_at"],
        error_rate=row["error_rate"],
        sample_error=row["sample_error"],
        active_tasks=row["active_tasks"],
        current_task=row["current_task"],
        uptime_seconds=row["uptime_seconds"],
        runtime_state=row["runtime_state"],
        runtime_metadata=json.loads(row["runtime_metadata"]),
    )


def delegation_from_row(row: Row) -> Delegation:
    return Delegation(
        id=row["id"],
        source_id=row["source_id"],
        work_id=row["work_id"],
        task=row["task"],
        status=DelegationStatus(row["status"]),
        response_preview=row["response_preview"],
        worker_id=row["worker_id"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        collected_at=row["collected_at"],
    )


def message_from_row(row: Row) -> SessionMessage:
    return SessionMessage(
        id=row["id"],
        session_id=row["session_id"],
        kind=row["kind"],
        body=row["body"],
        created_at=row["created_at"],
    )


# --- environment settings -----------------------------------------------------

#: The largest queue cap an environment may set, and the longest retention (100 years).
MAX_QUEUE_DEPTH: Final = 100_000_000
MAX_RETENTION: Final = 100 * 365 * 86_400.0

#: Seconds a refused submit is told to wait (``Retry-After``): long enough for a
#: busy fleet to claim some items, short enough that a client does not idle.
QUEUE_FULL_RETRY_AFTER: Final = 5

#: The environments table's column of each `EnvironmentSettings` field.
SETTINGS_COLUMNS: Final = {
    "max_queue_depth": "max_queue_depth",
    "retention": "retention_seconds",
    "max_attempts": "max_attempts",
    "backoff": "backoff",
    "backoff_max": "backoff_max",
}


def _check_seconds(what: str, value: object, low: float, high: float, *, open_low: bool) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (low < value if open_low else low <= value)
        and value <= high
    )
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise BadRequest(f"{what} must be a number of seconds {bound} and <= {high:g}")
    assert isinstance(value, int | float)
    return float(value)


def check_settings(changes: Mapping[str, object]) -> dict[str, int | float | None]:
    """Validate a change of environment settings (`BadRequest` names the field).

    Each key is an `EnvironmentSettings` field; ``None`` clears it.
    """
    if not isinstance(changes, Mapping):
        raise BadRequest(f"settings must be a mapping, got {type(changes).__name__}")
    checked: dict[str, int | float | None] = {}
    for name, value in changes.items():
        if name not in SETTINGS_COLUMNS:
            raise BadRequest(
                f"unknown environment setting {name!r}; known: {', '.join(SETTINGS_COLUMNS)}"
            )
        if value is None:
            checked[name] = None
        elif name == "max_queue_depth":
            checked[name] = check_int(name, value, 1, MAX_QUEUE_DEPTH)
        elif name == "max_attempts":
            checked[name] = check_int(name, value, 1, MAX_ATTEMPTS)
        elif name == "retention":
            checked[name] = _check_seconds(name, value, 0, MAX_RETENTION, open_low=True)
        else:
            checked[name] = _check_seconds(name, value, 0, MAX_BACKOFF, open_low=False)
    return checked


def settings_from_row(row: Row | None) -> EnvironmentSettings:
    if row is None:
        return EnvironmentSettings()
    return EnvironmentSettings(**{name: row[column] for name, column in SETTINGS_COLUMNS.items()})


_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"45s"``, ``"30m"``, ``"12h"``, ``"7d"`` or ``"2w"``.

    Raises:
        ValueError: anything else (the caller names the setting).
    """
    match = _DURATION_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected a duration such as 90, 45s, 30m, 12h, 7d or 2w, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
