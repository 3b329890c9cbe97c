"""JSON <-> model conversion at the HTTP boundary, shared by the server and the client.

Decoding is explicit, field by field, instead of letting attrs validators act
as a parser: a wrong type anywhere becomes a ``BadRequest`` whose message
names the field (``data.prompt must be a string, got number``), and nothing
half-decoded ever reaches the store.

Times are POSIX seconds (``float``) in the models and ISO-8601 UTC strings on
the wire. The fractional part is written with exactly the digits of the
float's shortest ``repr``, so ``decode_time(encode_time(t)) == t`` for every
finite ``t`` in the calendar's range: a time read back over HTTP compares equal
to the one the store recorded.

Responses are decoded leniently (unknown fields are ignored, so a newer server
can add fields); request bodies strictly (an unknown field is an error, so a
typo never silently drops a value).
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Context, Decimal
from typing import Any, TypeVar

import attrs

from ._exceptions import BadRequest
from ._models import (
    Attempt,
    Delegation,
    DelegationStatus,
    HeartbeatResult,
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
    WorkStats,
)
from ._text import check_text, scrub_text

__all__ = [
    "AckRequest",
    "DelegateRequest",
    "DelegationResultRequest",
    "MessageRequest",
    "RegisterRequest",
    "RequeueRequest",
    "StopRequest",
    "SubmitRequest",
    "decode_ack_request",
    "decode_delegate_request",
    "decode_delegation",
    "decode_delegation_result_request",
    "decode_heartbeat_result",
    "decode_list",
    "decode_message_request",
    "decode_outcome",
    "decode_presence_report",
    "decode_register_request",
    "decode_requeue_request",
    "decode_session_message",
    "decode_stop_request",
    "decode_submit_request",
    "decode_time",
    "decode_work_item",
    "decode_work_stats",
    "decode_worker_record",
    "dumps",
    "encode_ack_request",
    "encode_delegate_request",
    "encode_delegation",
    "encode_delegation_result_request",
    "encode_heartbeat_result",
    "encode_list",
    "encode_message_request",
    "encode_outcome",
    "encode_presence_report",
    "encode_register_request",
    "encode_requeue_request",
    "encode_session_message",
    "encode_stop_request",
    "encode_submit_request",
    "encode_time",
    "encode_work_item",
    "encode_work_stats",
    "encode_worker_record",
    "loads",
]

JSON = Any
"""A decoded JSON value (``dict``/``list``/``str``/``int``/``float``/``bool``/``None``)."""

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Wide enough that splitting a float into whole seconds and a fraction (or joining
# them back) never rounds, down to the smallest subnormal.
_EXACT = Context(prec=800)
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,400}))?"
    r"(Z|z|[+-]\d{2}:\d{2})"
)


# --- raw JSON ----------------------------------------------------------------


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str, *, what: str = "request body") -> JSON:
    """Parse JSON text, refusing ``NaN``/``Infinity`` (not JSON, and poison for the store).

    Raises:
        BadRequest: the text is not UTF-8 or not valid JSON; the message says where.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value: JSON = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    # A "\udfff" escape is valid JSON but decodes to a lone surrogate.
    check_text(value, what)
    return value


def dumps(value: JSON) -> bytes:
    """Compact UTF-8 JSON; ``allow_nan=False`` so a bad float fails here, not at the peer.

    A lone surrogate (only from a store written before text was checked at
    the door) is sent as U+FFFD rather than failing the whole answer.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return scrub_text(text).encode()


# --- times ---------------------------------------------------------------------


def encode_time(value: float) -> str:
    """POSIX seconds -> ``YYYY-MM-DDTHH:MM:SS[.fraction]Z``, exact to the float.

    Raises:
        ValueError: ``value`` is not finite or outside years 1..9999.
    """
    if not math.isfinite(value):
        raise ValueError(f"cannot encode non-finite time {value!r}")
    exact = Decimal(repr(float(value)))
    whole = int(exact.to_integral_value(rounding=ROUND_FLOOR))
    fraction = _EXACT.subtract(exact, Decimal(whole))
    try:
        moment = _EPOCH + timedelta(seconds=whole)
    except OverflowError:
        raise ValueError(f"time {value!r} is outside the calendar's range") from None
    digits = format(fraction, "f").partition(".")[2].rstrip("0")
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
        + (f".{digits}" if digits else "")
        + "Z"
    )


def decode_time(value: object, field: str) -> float:
    """An ISO-8601 date-time with an explicit offset -> POSIX seconds.

    Raises:
        BadRequest: not a string, not ISO-8601 with seconds and an offset, or not a real date.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be an ISO-8601 date-time string, got {_kind(value)}")
    match = _ISO.fullmatch(value)
    if match is None:
        raise BadRequest(
            f"{field} must be an ISO-8601 date-time like 2024-05-01T12:00:00Z, got {value!r}"
        )
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, offset = match.group(7) or "", match.group(8)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise BadRequest(f"{field} is not a valid date-time ({exc}): {value!r}") from None
    delta = moment - _EPOCH
    whole = delta.days * 86_400 + delta.seconds
    if offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise BadRequest(f"{field} has an invalid UTC offset: {value!r}")
        whole -= sign * (hours * 3600 + minutes * 60)
    return float(_EXACT.add(Decimal(whole), Decimal(f"0.{fraction or '0'}")))


def _time_or_none(value: float | None) -> str | None:
    return None if value is None else encode_time(value)


# --- field reader --------------------------------------------------------------


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Fields:
    """Typed access to one JSON object's fields, with errors that name the field.

    ``strict`` readers call ``done()`` at the end, which rejects any field that
    was never read (an unknown field in a request body).
    """

    def __init__(self, value: object, where: str, *, strict: bool = False) -> None:
        if not isinstance(value, dict):
            raise BadRequest(f"{where or 'body'} must be a JSON object, got {_kind(value)}")
        self._obj: dict[str, object] = value
        self._where = where
        self._strict = strict
        self._seen: set[str] = set()

    def path(self, name: str) -> str:
        return _join(self._where, name)

    def raw(self, name: str) -> object:
        self._seen.add(name)
        return self._obj.get(name)

    def has(self, name: str) -> bool:
        return self._obj.get(name) is not None

    def _missing(self, name: str) -> BadRequest:
        return BadRequest(f"{self.path(name)} is required")

    def _wrong(self, name: str, expected: str, value: object) -> BadRequest:
        return BadRequest(f"{self.path(name)} must be {expected}, got {_kind(value)}")

    def opt_str(self, name: str, *, non_empty: bool = False) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._wrong(name, "a string", value)
        if non_empty and not value:
            raise BadRequest(f"{self.path(name)} must not be empty")
        return value

    def req_str(self, name: str, *, non_empty: bool = False) -> str:
        value = self.opt_str(name, non_empty=non_empty)
        if value is None:
            raise self._missing(name)
        return value

    def opt_int(self, name: str, *, minimum: int | None = None) -> int | None:
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            # 3.0 is accepted as 3: some JSON encoders write every number as a float.
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise self._wrong(name, "an integer", value)
        if minimum is not None and value < minimum:
            raise BadRequest(f"{self.path(name)} must be >= {minimum}, got {value}")
        return value

    def req_int(self, name: str, *, minimum: int | None = None, default: int | None = None) -> int:
        value = self.opt_int(name, minimum=minimum)
        if value is None:
            if default is None:
                raise self._missing(name)
            return default
        return value

    def opt_float(self, name: str, *, minimum: float | None = None) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(name, "a number", value)
        number = float(value)
        if not math.isfinite(number):
            raise BadRequest(f"{self.path(name)} must be a finite number")
        if minimum is not None and number < minimum:
            raise BadRequest(f"{self.path(name)} must be >= {minimum:g}, got {number:g}")
        return number

    def req_float(
        self, name: str, *, minimum: float | None = None, default: float | None = None
    ) -> float:
        value = self.opt_float(name, minimum=minimum)
        if value is None:
            if default is None:
                raise self._missing(name)
            return default
        return value

    def flag(self, name: str, *, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._wrong(name, "true or false", value)
        return value

    def opt_time(self, name: str) -> float | None:
        value = self.raw(name)
        return None if value is None else decode_time(value, self.path(name))

    def str_map(self, name: str) -> dict[str, str]:
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._wrong(name, "an object of strings", value)
        for key, item in value.items():
            if not isinstance(item, str):
                raise BadRequest(f"{self.path(name)}.{key} must be a string, got {_kind(item)}")
        return dict(value)

    def str_list(self, name: str) -> list[str] | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self._wrong(name, "an array of strings", value)
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise BadRequest(f"{self.path(name)}[{index}] must be a string, got {_kind(item)}")
        return list(value)

    def json_map(self, name: str) -> dict[str, Any]:
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._wrong(name, "an object", value)
        return dict(value)

    def obj(self, name: str) -> _Fields | None:
        value = self.raw(name)
        if value is None:
            return None
        return _Fields(value, self.path(name), strict=self._strict)

    def enum(self, name: str, kind: type[_E], *, default: _E | None = None) -> _E:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self._missing(name)
            return default
        if not isinstance(value, str):
            raise self._wrong(name, "a string", value)
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(member.value for member in kind)
            raise BadRequest(f"{self.path(name)} must be one of {allowed}; got {value!r}") from None

    def done(self) -> None:
        if not self._strict:
            return
        unknown = sorted(set(self._obj) - self._seen)
        if unknown:
            names = ", ".join(_join(self._where, name) for name in unknown)
            raise BadRequest(f"unknown field(s): {names}")


# --- response models --------------------------------------------------------------


def encode_outcome(outcome: Outcome) -> dict[str, JSON]:
    return {
        "status": outcome.status.value,
        "exit_code": outcome.exit_code,
        "result": outcome.result,
        "duration": outcome.duration,
        "reason": outcome.reason,
    }


def _read_outcome(fields: _Fields) -> Outcome:
    outcome = Outcome(
        status=fields.enum("status", OutcomeStatus),
        exit_code=fields.opt_int("exit_code"),
        result=fields.opt_str("result"),
        duration=fields.opt_float("duration", minimum=0.0),
        reason=fields.opt_str("reason"),
    )
    fields.done()
    return outcome


def decode_outcome(value: object, where: str = "outcome") -> Outcome:
    return _read_outcome(_Fields(value, where))


def encode_retry_policy(policy: RetryPolicy) -> dict[str, JSON]:
    return {
        "max_attempts": policy.max_attempts,
        "backoff_seconds": policy.backoff,
        "backoff_max_seconds": policy.backoff_max,
        "non_retryable_exit_codes": list(policy.non_retryable_exit_codes),
    }


def _read_retry_policy(fields: _Fields) -> RetryPolicy:
    codes = fields.raw("non_retryable_exit_codes")
    if codes is None:
        codes = []
    if not isinstance(codes, list) or not all(
        isinstance(code, int) and not isinstance(code, bool) for code in codes
    ):
        raise BadRequest(f"{fields.path('non_retryable_exit_codes')} must be an array of integers")
    policy = RetryPolicy(
        max_attempts=fields.req_int("max_attempts", minimum=1, default=3),
        backoff=fields.req_float("backoff_seconds", minimum=0.0, default=1.0),
        backoff_max=fields.req_float("backoff_max_seconds", minimum=0.0, default=300.0),
        non_retryable_exit_codes=tuple(codes),
    )
    fields.done()
    return policy


def encode_attempt(attempt: Attempt) -> dict[str, JSON]:
    return {
        "attempt": attempt.attempt,
        "worker_id": attempt.worker_id,
        "started_at": _time_or_none(attempt.started_at),
        "ended_at": encode_time(attempt.ended_at),
        "outcome": encode_outcome(attempt.outcome),
        "retry_at": _time_or_none(attempt.retry_at),
    }


def _decode_history(fields: _Fields) -> tuple[Attempt, ...]:
    raw = fields.raw("history")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise fields._wrong("history", "an array", raw)
    attempts = []
    for index, entry in enumerate(raw):
        one = _Fields(entry, fields.path(f"history[{index}]"))
        outcome = one.obj("outcome")
        if outcome is None:
            raise BadRequest(f"{one.path('outcome')} is required")
        ended = one.opt_time("ended_at")
        if ended is None:
            raise BadRequest(f"{one.path('ended_at')} is required")
        attempts.append(
            Attempt(
                attempt=one.req_int("attempt", minimum=1),
                worker_id=one.opt_str("worker_id"),
                started_at=one.opt_time("started_at"),
                ended_at=ended,
                outcome=_read_outcome(outcome),
                retry_at=one.opt_time("retry_at"),
            )
        )
    return tuple(attempts)


def encode_work_item(item: WorkItem) -> dict[str, JSON]:
    """The item's wire form; ``secret`` only appears when the item carries one (poll)."""
    body: dict[str, JSON] = {
        "id": item.id,
        "type": item.type,
        "environment_id": item.environment_id,
        "state": item.state.value,
        "data": {"type": item.data.type, "id": item.data.id, "prompt": item.data.prompt},
        "metadata": dict(item.metadata),
        "attempts": item.attempts,
        "worker_id": item.worker_id,
        "created_at": _time_or_none(item.created_at),
        "acknowledged_at": _time_or_none(item.acknowledged_at),
        "started_at": _time_or_none(item.started_at),
        "latest_heartbeat_at": _time_or_none(item.latest_heartbeat_at),
        "stop_requested_at": _time_or_none(item.stop_requested_at),
        "stopped_at": _time_or_none(item.stopped_at),
        "outcome": None if item.outcome is None else encode_outcome(item.outcome),
        "retry": None if item.retry is None else encode_retry_policy(item.retry),
        "history": [encode_attempt(attempt) for attempt in item.history],
        "not_before": _time_or_none(item.not_before),
        "dead": item.dead,
        "priority": item.priority,
        "key": item.key,
        "labels": list(item.labels),
        "timeout_seconds": item.timeout,
    }
    if item.secret is not None:
        body["secret"] = item.secret
    return body


def decode_work_item(value: object, where: str = "") -> WorkItem:
    fields = _Fields(value, where)
    data = fields.obj("data")
    if data is None:
        raise BadRequest(f"{fields.path('data')} is required")
    outcome = fields.obj("outcome")
    retry = fields.obj("retry")
    return WorkItem(
        id=fields.req_str("id"),
        environment_id=fields.req_str("environment_id"),
        state=fields.enum("state", WorkState),
        data=SessionData(
            id=data.req_str("id"),
            prompt=data.req_str("prompt"),
            type=data.opt_str("type") or "session",
        ),
        metadata=fields.str_map("metadata"),
        attempts=fields.req_int("attempts", minimum=0, default=0),
        worker_id=fields.opt_str("worker_id"),
        created_at=fields.opt_time("created_at"),
        acknowledged_at=fields.opt_time("acknowledged_at"),
        started_at=fields.opt_time("started_at"),
        latest_heartbeat_at=fields.opt_time("latest_heartbeat_at"),
        stop_requested_at=fields.opt_time("stop_requested_at"),
        stopped_at=fields.opt_time("stopped_at"),
        outcome=None if outcome is None else _read_outcome(outcome),
        secret=fields.opt_str("secret"),
        type=fields.opt_str("type") or "work",
        retry=None if retry is None else _read_retry_policy(retry),
        history=_decode_history(fields),
        not_before=fields.opt_time("not_before"),
        dead=fields.flag("dead", default=False),
        priority=fields.req_int("priority", default=0),
        key=fields.opt_str("key"),
        labels=tuple(fields.str_list("labels") or []),
        timeout=fields.opt_float("timeout_seconds"),
    )


def encode_heartbeat_result(result: HeartbeatResult) -> dict[str, JSON]:
    return {
        "last_heartbeat": result.last_heartbeat,
        "ttl_seconds": result.ttl_seconds,
        "state": result.state.value,
        "lease_extended": result.lease_extended,
    }


def decode_heartbeat_result(value: object) -> HeartbeatResult:
    fields = _Fields(value, "")
    return HeartbeatResult(
        last_heartbeat=fields.req_str("last_heartbeat"),
        ttl_seconds=fields.req_float("ttl_seconds", minimum=0.0),
        state=fields.enum("state", WorkState),
        lease_extended=fields.flag("lease_extended", default=True),
    )


def encode_work_stats(stats: WorkStats) -> dict[str, JSON]:
    return {
        "depth": stats.depth,
        "pending": stats.pending,
        "oldest_queued_at": _time_or_none(stats.oldest_queued_at),
        "workers_polling": stats.workers_polling,
    }


def decode_work_stats(value: object) -> WorkStats:
    fields = _Fields(value, "")
    return WorkStats(
        depth=fields.req_int("depth", minimum=0),
        pending=fields.req_int("pending", minimum=0),
        oldest_queued_at=fields.opt_time("oldest_queued_at"),
        workers_polling=fields.req_int("workers_polling", minimum=0),
    )


def encode_presence_report(report: PresenceReport) -> dict[str, JSON]:
    body: dict[str, JSON] = {
        "worker_id": report.worker_id,
        "status": report.status,
        "error_rate": report.error_rate,
        "sample_error": report.sample_error,
        "active_tasks": report.active_tasks,
        "current_task": report.current_task,
        "uptime_seconds": report.uptime_seconds,
        "runtime_metadata": dict(report.runtime_metadata),
    }
    # Sent only when set (DESIGN §3.6): its absence is what "cleared" means.
    if report.runtime_state is not None:
        body["runtime_state"] = report.runtime_state
    return body


def decode_presence_report(value: object, *, worker_id: str | None = None) -> PresenceReport:
    """Decode a presence body; ``worker_id`` (from the URL) fills or must match the body's."""
    fields = _Fields(value, "", strict=True)
    body_worker = fields.opt_str("worker_id", non_empty=True)
    if worker_id is not None and body_worker is not None and body_worker != worker_id:
        raise BadRequest(
            f"worker_id in the body ({body_worker!r}) does not match the URL ({worker_id!r})"
        )
    resolved = body_worker if body_worker is not None else worker_id
    if resolved is None:
        raise BadRequest("worker_id is required")
    report = PresenceReport(
        worker_id=resolved,
        status=fields.opt_str("status") or "idle",
        error_rate=fields.req_float("error_rate", minimum=0.0, default=0.0),
        sample_error=fields.opt_str("sample_error"),
        active_tasks=fields.req_int("active_tasks", minimum=0, default=0),
        current_task=fields.opt_str("current_task"),
        uptime_seconds=fields.req_float("uptime_seconds", minimum=0.0, default=0.0),
        runtime_state=fields.opt_str("runtime_state"),
        runtime_metadata=fields.json_map("runtime_metadata"),
    )
    fields.done()
    return report


def encode_worker_record(record: WorkerRecord) -> dict[str, JSON]:
    return {
        "worker_id": record.worker_id,
        "environment_id": record.environment_id,
        "status": record.status.value,
        "registered_at": _time_or_none(record.registered_at),
        "last_heartbeat_at": _time_or_none(record.last_heartbeat_at),
        "error_rate": record.error_rate,
        "sample_error": record.sample_error,
        "active_tasks": record.active_tasks,
        "current_task": record.current_task,
        "uptime_seconds": record.uptime_seconds,
        "runtime_state": record.runtime_state,
        "runtime_metadata": dict(record.runtime_metadata),
    }


def decode_worker_record(value: object, where: str = "") -> WorkerRecord:
    fields = _Fields(value, where)
    return WorkerRecord(
        worker_id=fields.req_str("worker_id"),
        environment_id=fields.req_str("environment_id"),
        status=fields.enum("status", WorkerStatus),
        registered_at=fields.opt_time("registered_at"),
        last_heartbeat_at=fields.opt_time("last_heartbeat_at"),
        error_rate=fields.req_float("error_rate", minimum=0.0, default=0.0),
        sample_error=fields.opt_str("sample_error"),
        active_tasks=fields.req_int("active_tasks", minimum=0, default=0),
        current_task=fields.opt_str("current_task"),
        uptime_seconds=fields.req_float("uptime_seconds", minimum=0.0, default=0.0),
        runtime_state=fields.opt_str("runtime_state"),
        runtime_metadata=fields.json_map("runtime_metadata"),
    )


def encode_delegation(delegation: Delegation) -> dict[str, JSON]:
    return {
        "id": delegation.id,
        "source_id": delegation.source_id,
        "work_id": delegation.work_id,
        "task": delegation.task,
        "status": delegation.status.value,
        "response_preview": delegation.response_preview,
        "worker_id": delegation.worker_id,
        "created_at": _time_or_none(delegation.created_at),
        "completed_at": _time_or_none(delegation.completed_at),
        "collected_at": _time_or_none(delegation.collected_at),
    }


def decode_delegation(value: object, where: str = "") -> Delegation:
    fields = _Fields(value, where)
    return Delegation(
        id=fields.req_str("id"),
        source_id=fields.req_str("source_id"),
        work_id=fields.req_str("work_id"),
        task=fields.req_str("task"),
        status=fields.enum("status", DelegationStatus),
        response_preview=fields.opt_str("response_preview"),
        worker_id=fields.opt_str("worker_id"),
        created_at=fields.opt_time("created_at"),
        completed_at=fields.opt_time("completed_at"),
        collected_at=fields.opt_time("collected_at"),
    )


def encode_session_message(message: SessionMessage) -> dict[str, JSON]:
    return {
        "id": message.id,
        "session_id": message.session_id,
        "kind": message.kind,
        "body": message.body,
        "created_at": _time_or_none(message.created_at),
    }


def decode_session_message(value: object, where: str = "") -> SessionMessage:
    fields = _Fields(value, where)
    return SessionMessage(
        id=fields.req_str("id"),
        session_id=fields.req_str("session_id"),
        kind=fields.req_str("kind"),
        body=fields.req_str("body"),
        created_at=fields.opt_time("created_at"),
    )


def encode_list(items: Sequence[_T], encode: Callable[[_T], JSON]) -> dict[str, JSON]:
    """Lists travel as ``{"data": [...]}`` so fields (paging, totals) can be added later."""
    return {"data": [encode(item) for item in items]}


def decode_list(value: object, decode: Callable[[object, str], _T]) -> list[_T]:
    fields = _Fields(value, "")
    data = fields.raw("data")
    if not isinstance(data, list):
        raise BadRequest(f"data must be an array, got {_kind(data)}")
    return [decode(entry, f"data[{index}]") for index, entry in enumerate(data)]


# --- request bodies ------------------------------------------------------------------


@attrs.frozen
class SubmitRequest:
    """``POST /work``: ``{"data": {"type": "session", "id"?, "prompt"}, "metadata"?, "retry"?}``."""

    prompt: str
    session_id: str | None = None
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    retry: RetryPolicy | None = None
    priority: int = 0
    delay: float | None = None
    not_before: float | None = None
    key: str | None = None
    labels: tuple[str, ...] = ()
    timeout: float | None = None


def encode_submit_request(request: SubmitRequest) -> dict[str, JSON]:
    data: dict[str, JSON] = {"type": "session", "prompt": request.prompt}
    if request.session_id is not None:
        data["id"] = request.session_id
    body: dict[str, JSON] = {"data": data, "metadata": dict(request.metadata)}
    if request.retry is not None:
        body["retry"] = encode_retry_policy(request.retry)
    if request.priority:
        body["priority"] = request.priority
    if request.delay is not None:
        body["delay_seconds"] = request.delay
    if request.not_before is not None:
        body["not_before"] = encode_time(request.not_before)
    if request.key is not None:
        body["key"] = request.key
    if request.labels:
        body["labels"] = list(request.labels)
    if request.timeout is not None:
        body["timeout_seconds"] = request.timeout
    return body


def decode_submit_request(value: object) -> SubmitRequest:
    fields = _Fields(value, "", strict=True)
    data = fields.obj("data")
    if data is None:
        raise BadRequest("data is required")
    kind = data.opt_str("type")
    if kind not in (None, "session"):
        raise BadRequest(f"data.type must be 'session', got {kind!r}")
    request = SubmitRequest(
        prompt=data.req_str("prompt"),
        session_id=data.opt_str("id", non_empty=True),
        metadata=fields.str_map("metadata"),
        priority=fields.req_int("priority", default=0),
        delay=fields.opt_float("delay_seconds", minimum=0.0),
        not_before=fields.opt_time("not_before"),
        key=fields.opt_str("key", non_empty=True),
        labels=tuple(fields.str_list("labels") or []),
        timeout=fields.opt_float("timeout_seconds"),
    )
    retry = fields.obj("retry")
    if retry is not None:
        request = attrs.evolve(request, retry=_read_retry_policy(retry))
    data.done()
    fields.done()
    return request


@attrs.frozen
class AckRequest:
    """``POST /work/{id}/ack``: ``{"worker_id"?}``; the body itself is optional."""

    worker_id: str | None = None


def encode_ack_request(request: AckRequest) -> dict[str, JSON]:
    return {} if request.worker_id is None else {"worker_id": request.worker_id}


def decode_ack_request(value: object) -> AckRequest:
    fields = _Fields(value, "", strict=True)
    request = AckRequest(worker_id=fields.opt_str("worker_id", non_empty=True))
    fields.done()
    return request


@attrs.frozen
class StopRequest:
    """``POST /work/{id}/stop``: ``{"force"?, "expected_last_heartbeat"?, "outcome"?}``."""

    force: bool = False
    expected_last_heartbeat: str | None = None
    outcome: Outcome | None = None


def encode_stop_request(request: StopRequest) -> dict[str, JSON]:
    return {
        "force": request.force,
        "expected_last_heartbeat": request.expected_last_heartbeat,
        "outcome": None if request.outcome is None else encode_outcome(request.outcome),
    }


def decode_stop_request(value: object) -> StopRequest:
    fields = _Fields(value, "", strict=True)
    outcome = fields.obj("outcome")
    request = StopRequest(
        force=fields.flag("force", default=False),
        expected_last_heartbeat=fields.opt_str("expected_last_heartbeat", non_empty=True),
        outcome=None if outcome is None else _read_outcome(outcome),
    )
    fields.done()
    return request


@attrs.frozen
class RequeueRequest:
    """``POST /work/{id}/requeue``: ``{"expected_last_heartbeat", "outcome"?}``."""

    expected_last_heartbeat: str
    outcome: Outcome | None = None


def encode_requeue_request(request: RequeueRequest) -> dict[str, JSON]:
    return {
        "expected_last_heartbeat": request.expected_last_heartbeat,
        "outcome": None if request.outcome is None else encode_outcome(request.outcome),
    }


def decode_requeue_request(value: object) -> RequeueRequest:
    fields = _Fields(value, "", strict=True)
    outcome = fields.obj("outcome")
    request = RequeueRequest(
        expected_last_heartbeat=fields.req_str("expected_last_heartbeat", non_empty=True),
        outcome=None if outcome is None else _read_outcome(outcome),
    )
    fields.done()
    return request


@attrs.frozen
class RegisterRequest:
    """``POST /workers/{id}/register``: ``{"metadata"?}`` (any JSON object)."""

    metadata: Mapping[str, Any] = attrs.field(factory=dict)


def encode_register_request(request: RegisterRequest) -> dict[str, JSON]:
    return {"metadata": dict(request.metadata)}


def decode_register_request(value: object) -> RegisterRequest:
    fields = _Fields(value, "", strict=True)
    request = RegisterRequest(metadata=fields.json_map("metadata"))
    fields.done()
    return request


@attrs.frozen
class DelegateRequest:
    """``POST /sessions/{id}/delegate``: ``{"task"}``."""

    task: str


def encode_delegate_request(request: DelegateRequest) -> dict[str, JSON]:
    return {"task": request.task}


def decode_delegate_request(value: object) -> DelegateRequest:
    fields = _Fields(value, "", strict=True)
    request = DelegateRequest(task=fields.req_str("task", non_empty=True))
    fields.done()
    return request


@attrs.frozen
class DelegationResultRequest:
    """``POST /delegations/{id}/result``: ``{"status", "response_preview"?}``."""

    status: DelegationStatus
    response_preview: str | None = None


def encode_delegation_result_request(request: DelegationResultRequest) -> dict[str, JSON]:
    return {"status": request.status.value, "response_preview": request.response_preview}


def decode_delegation_result_request(value: object) -> DelegationResultRequest:
    fields = _Fields(value, "", strict=True)
    request = DelegationResultRequest(
        status=fields.enum("status", DelegationStatus),
        response_preview=fields.opt_str("response_preview"),
    )
    fields.done()
    return request


@attrs.frozen
class MessageRequest:
    """``POST /sessions/{id}/messages`` and ``/notify``: ``{"body"}``."""

    body: str


def encode_message_request(request: MessageRequest) -> dict[str, JSON]:
    return {"body": request.body}


def decode_message_request(value: object) -> MessageRequest:
    fields = _Fields(value, "", strict=True)
    request = MessageRequest(body=fields.req_str("body"))
    fields.done()
    return request
