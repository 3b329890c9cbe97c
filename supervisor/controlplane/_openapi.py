"""The reference server's OpenAPI 3.1 document, written as data.

Kept by hand rather than derived from the handlers so that it reads as the
contract it is; a test checks that every route the server mounts appears here
with the same method, so the two cannot drift apart silently.
"""

from __future__ import annotations

import copy
from typing import Any, Final

__all__ = ["API_PREFIX", "openapi_document"]

API_PREFIX: Final = "/v1/environments/{environment_id}"

_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_OPT_STR: Final = {"type": ["string", "null"]}
_OPT_INT: Final = {"type": ["integer", "null"]}
_OPT_NUM: Final = {"type": ["number", "null"]}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable_ref(name: str) -> dict[str, Any]:
    return {"oneOf": [_ref(name), {"type": "null"}]}


def _list_of(name: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": _ref(name)}},
    }


#: One routing label (as `check_labels` accepts it).
_LABEL: Final[dict[str, Any]] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 100,
    "pattern": "^[A-Za-z0-9:._/-]{1,100}$",
}


_SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {
                    "type": {
                        "type": "string",
                        "description": "Stable machine-readable kind: invalid_request, "
                        "unauthorized, not_found, conflict, gone, fencing_conflict, "
                        "method_not_allowed, queue_full, transient, unavailable, internal.",
                    },
                    "message": {"type": "string"},
                    "current_token": {
                        "type": "string",
                        "description": "On a 412 only, and only when the stale token was "
                        "issued for the same lease (its holder missed an answer): the "
                        "current fencing token.",
                    },
                    "environment_id": {
                        "type": "string",
                        "description": "On a 429 queue_full only: the environment whose queue "
                        "is full.",
                    },
                    "depth": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "On a 429 queue_full only: the queued items the "
                        "environment held when the submit was refused.",
                    },
                    "max_queue_depth": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "On a 429 queue_full only: the environment's cap.",
                    },
                    "retry_after": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "On a 429 queue_full only: seconds worth waiting "
                        "before the next try (also the Retry-After header).",
                    },
                },
            }
        },
    },
    "SessionData": {
        "type": "object",
        "required": ["type", "id", "prompt"],
        "properties": {
            "type": {"const": "session"},
            "id": {"type": "string"},
            "prompt": {"type": "string"},
        },
    },
    "Outcome": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {
                "enum": ["completed", "failed", "timeout", "cancelled", "wedged", "lease_lost"]
            },
            "exit_code": _OPT_INT,
            "result": _OPT_STR,
            "duration": _OPT_NUM,
            "reason": _OPT_STR,
        },
    },
    "RetryPolicy": {
        "type": "object",
        "additionalProperties": False,
        "description": "How failed sessions of the item are retried: a 'failed' outcome goes "
        "back to queued after an exponential backoff with jitter (half to all of "
        "backoff_seconds * 2^(failures - 1), capped by backoff_max_seconds) until max_attempts "
        "attempts ran; the last failure puts the item in dead letter. Also bounds lease losses.",
        "properties": {
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
            "backoff_seconds": {"type": "number", "minimum": 0, "maximum": 86400, "default": 1},
            "backoff_max_seconds": {
                "type": "number",
                "minimum": 0,
                "maximum": 86400,
                "default": 300,
            },
            "non_retryable_exit_codes": {
                "type": "array",
                "maxItems": 64,
                "items": {"type": "integer", "minimum": -255, "maximum": 255},
                "description": "Agent exit codes whose failure is final at once.",
            },
        },
    },
    "Attempt": {
        "type": "object",
        "required": ["attempt", "ended_at", "outcome"],
        "properties": {
            "attempt": {"type": "integer", "minimum": 1},
            "worker_id": _OPT_STR,
            "started_at": _TIME,
            "ended_at": {"type": "string", "format": "date-time"},
            "outcome": _ref("Outcome"),
            "retry_at": {
                **_TIME,
                "description": "When the item became claimable again; null: it did not retry.",
            },
        },
    },
    "WorkItem": {
        "type": "object",
        "required": ["id", "type", "environment_id", "state", "data", "attempts"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "work"},
            "environment_id": {"type": "string"},
            "state": {"enum": ["queued", "starting", "active", "stopping", "stopped"]},
            "data": _ref("SessionData"),
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "attempts": {"type": "integer", "minimum": 0},
            "worker_id": _OPT_STR,
            "created_at": _TIME,
            "acknowledged_at": _TIME,
            "started_at": _TIME,
            "latest_heartbeat_at": _TIME,
            "stop_requested_at": _TIME,
            "stopped_at": _TIME,
            "outcome": _nullable_ref("Outcome"),
            "retry": _nullable_ref("RetryPolicy"),
            "history": {
                "type": "array",
                "items": _ref("Attempt"),
                "description": "Every attempt that recorded an outcome, oldest first.",
            },
            "not_before": {**_TIME, "description": "Not claimed before this time (a backoff)."},
            "priority": {"type": "integer", "description": "Higher is claimed first."},
            "key": {**_OPT_STR, "description": "The idempotency key it was submitted with."},
            "labels": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Routing labels a worker must all have to claim it (sorted).",
            },
            "timeout_seconds": {
                "type": ["number", "null"],
                "description": "Seconds of execution its session may take; null: the "
                "worker's session_timeout.",
            },
            "dead": {
                "type": "boolean",
                "description": "Stopped out of attempts (the dead letter); see POST retry.",
            },
            "secret": {
                "type": "string",
                "description": "Session credential; only in the answer to the claiming poll.",
            },
        },
    },
    "HeartbeatResult": {
        "type": "object",
        "required": ["last_heartbeat", "ttl_seconds", "state", "lease_extended"],
        "properties": {
            "last_heartbeat": {
                "type": "string",
                "description": "The new fencing token: send it with the next heartbeat and stop.",
            },
            "ttl_seconds": {"type": "number"},
            "state": {"enum": ["queued", "starting", "active", "stopping", "stopped"]},
            "lease_extended": {"type": "boolean"},
        },
    },
    "WorkStats": {
        "type": "object",
        "required": ["depth", "pending", "oldest_queued_at", "workers_polling"],
        "properties": {
            "depth": {"type": "integer"},
            "pending": {"type": "integer"},
            "oldest_queued_at": _TIME,
            "workers_polling": {"type": "integer"},
        },
    },
    "PresenceReport": {
        "type": "object",
        "properties": {
            "worker_id": {"type": "string", "description": "Optional; must match the URL."},
            "status": {"type": "string"},
            "error_rate": {"type": "number", "minimum": 0},
            "sample_error": _OPT_STR,
            "active_tasks": {"type": "integer", "minimum": 0},
            "current_task": _OPT_STR,
            "uptime_seconds": {"type": "number", "minimum": 0},
            "runtime_state": {
                "type": ["string", "null"],
                "description": "Only when abnormal, for example 'wedged'; absent means cleared.",
            },
            "runtime_metadata": {"type": "object"},
        },
        "additionalProperties": False,
    },
    "WorkerRecord": {
        "type": "object",
        "required": ["worker_id", "environment_id", "status"],
        "properties": {
            "worker_id": {"type": "string"},
            "environment_id": {"type": "string"},
            "status": {
                "enum": ["provisioning", "online", "degraded", "offline", "failed", "removed"]
            },
            "registered_at": _TIME,
            "last_heartbeat_at": _TIME,
            "error_rate": {"type": "number"},
            "sample_error": _OPT_STR,
            "active_tasks": {"type": "integer"},
            "current_task": _OPT_STR,
            "uptime_seconds": {"type": "number"},
            "runtime_state": _OPT_STR,
            "runtime_metadata": {"type": "object"},
        },
    },
    "Delegation": {
        "type": "object",
        "required": ["id", "source_id", "work_id", "task", "status"],
        "properties": {
            "id": {"type": "string"},
            "source_id": {"type": "string"},
            "work_id": {"type": "string"},
            "task": {"type": "string"},
            "status": {"enum": ["pending", "completed", "failed"]},
            "response_preview": {
                "type": ["string", "null"],
                "description": "The delegate's raw output: untrusted, never put it in a prompt.",
            },
            "worker_id": _OPT_STR,
            "created_at": _TIME,
            "completed_at": _TIME,
            "collected_at": {
                **_TIME,
                "description": "When the worker collected the result; null until then.",
            },
        },
    },
    "SessionMessage": {
        "type": "object",
        "required": ["id", "session_id", "kind", "body"],
        "properties": {
            "id": {"type": "string"},
            "session_id": {"type": "string"},
            "kind": {"enum": ["message", "notification"]},
            "body": {"type": "string"},
            "created_at": _TIME,
        },
    },
    "SubmitRequest": {
        "type": "object",
        "required": ["data"],
        "additionalProperties": False,
        "properties": {
            "data": {
                "type": "object",
                "required": ["prompt"],
                "additionalProperties": False,
                "properties": {
                    "type": {"const": "session"},
                    "id": {"type": "string", "description": "Session id; generated if absent."},
                    "prompt": {"type": "string"},
                },
            },
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "retry": {
                **_ref("RetryPolicy"),
                "description": "Retries of failed sessions; without it the item gets the "
                "environment's default retry policy (serve --max-attempts/--backoff/"
                "--backoff-max), if it has one. Given, it replaces the default whole.",
            },
            "priority": {
                "type": "integer",
                "minimum": -1000,
                "maximum": 1000,
                "default": 0,
                "description": "Higher is claimed first; FIFO within one priority.",
            },
            "delay_seconds": {
                "type": "number",
                "minimum": 0,
                "maximum": 2592000,
                "description": "Not claimed before this many seconds from now (the server's "
                "clock). Not with not_before.",
            },
            "not_before": {
                "type": "string",
                "format": "date-time",
                "description": "Not claimed before this time. Not with delay_seconds.",
            },
            "key": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "Idempotency key: when an item of the environment already has "
                "it, that item is answered with 200 and nothing is queued.",
            },
            "labels": {
                "type": "array",
                "maxItems": 32,
                "items": _LABEL,
                "description": "Routing labels: only a worker polling with every one of them "
                "claims the item. Duplicates are folded; stored sorted.",
            },
            "timeout_seconds": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 604800,
                "description": "Seconds of execution its session may take (not the wait for "
                "a slot), in place of the worker's session_timeout; the session then ends "
                "with outcome timeout.",
            },
        },
    },
    "AckRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"worker_id": {"type": "string"}},
    },
    "StopRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "force": {"type": "boolean", "default": False},
            "expected_last_heartbeat": {
                "type": ["string", "null"],
                "description": "Fencing token; a stale one answers 412.",
            },
            "outcome": _nullable_ref("Outcome"),
        },
    },
    "RequeueRequest": {
        "type": "object",
        "required": ["expected_last_heartbeat"],
        "additionalProperties": False,
        "properties": {
            "expected_last_heartbeat": {
                "type": "string",
                "description": "Fencing token of the holder; a stale one answers 412.",
            },
            "outcome": _nullable_ref("Outcome"),
        },
    },
    "RegisterRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"metadata": {"type": "object"}},
    },
    "DelegateRequest": {
        "type": "object",
        "required": ["task"],
        "additionalProperties": False,
        "properties": {"task": {"type": "string"}},
    },
    "DelegationResultRequest": {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {
            "status": {"enum": ["pending", "completed", "failed"]},
            "response_preview": _OPT_STR,
        },
    },
    "MessageRequest": {
        "type": "object",
        "required": ["body"],
        "additionalProperties": False,
        "properties": {"body": {"type": "string"}},
    },
    "WorkItemList": _list_of("WorkItem"),
    "WorkerRecordList": _list_of("WorkerRecord"),
    "DelegationList": _list_of("Delegation"),
    "SessionMessageList": _list_of("SessionMessage"),
}

_ERRORS: Final = {
    "400": "Malformed JSON, a wrong type or an unknown field; the message names it.",
    "401": "Missing or wrong environment key.",
    "404": "Unknown environment or id.",
    "413": "Request body larger than the server's limit.",
}


def _query(name: str, schema: dict[str, Any], description: str, *, required: bool = False) -> Any:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _operation(
    operation_id: str,
    summary: str,
    answer: str | None,
    *,
    status: str = "200",
    body: str | None = None,
    body_required: bool = True,
    parameters: tuple[dict[str, Any], ...] = (),
    errors: tuple[str, ...] = (),
    session_token: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if answer is not None:
        responses[status] = {
            "description": "OK",
            "content": {"application/json": {"schema": _ref(answer)}},
        }
    for code in ("400", "401", "404", *errors):
        description = _ERRORS.get(code, "See the error message.")
        responses[code] = {
            "description": description,
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": responses,
    }
    if parameters:
        operation["parameters"] = list(parameters)
    if session_token:
        # The session's own credential is accepted here too (and nowhere else).
        operation["security"] = [{"environmentKey": []}, {"sessionToken": []}]
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
        operation["responses"].setdefault(
            "413",
            {
                "description": _ERRORS["413"],
                "content": {"application/json": {"schema": _ref("Error")}},
            },
        )
    return operation


def _with_response(operation: dict[str, Any], status: str, description: str) -> dict[str, Any]:
    operation["responses"][status] = {"description": description}
    return operation


def _with_queue_full(operation: dict[str, Any]) -> dict[str, Any]:
    """The backpressure answer of a submit (DESIGN §4.2): 429 with ``Retry-After``."""
    operation["responses"]["429"] = {
        "description": "The environment's queue holds max_queue_depth items already: nothing "
        "was queued (a key already used still answers 200 with its item). Try again after "
        "Retry-After seconds.",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before submitting again.",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    return operation


_WORK = f"{API_PREFIX}/work"
_WORKERS = f"{API_PREFIX}/workers"
_SESSIONS = f"{API_PREFIX}/sessions"

_PATHS: Final[dict[str, Any]] = {
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "Liveness probe; needs no key.",
            "security": [],
            "responses": {"200": {"description": "The server is up."}},
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {"200": {"description": "The OpenAPI document."}},
        }
    },
    _WORK: {
        "post": _with_queue_full(
            _with_response(
                _operation(
                    "submitWork",
                    "Queue a session work item.",
                    "WorkItem",
                    status="201",
                    body="SubmitRequest",
                ),
                "200",
                "The key was already used in this environment: the item it names; nothing queued.",
            )
        ),
        "get": _operation(
            "listWork",
            "List items, oldest first.",
            "WorkItemList",
            parameters=(
                _query(
                    "state",
                    {"enum": ["queued", "starting", "active", "stopping", "stopped"]},
                    "Only items in this state.",
                ),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "Items per page.",
                ),
                _query("page", {"type": "integer", "minimum": 0, "default": 0}, "Page number."),
                _query(
                    "dead",
                    {"type": "string", "enum": ["true", "false"], "default": "false"},
                    "true: only the dead letter (stopped out of attempts).",
                ),
            ),
        ),
    },
    f"{_WORK}/poll": {
        "get": _with_response(
            _operation(
                "pollWork",
                "Claim the oldest claimable item, long-polling up to block_ms.",
                "WorkItem",
                parameters=(
                    _query(
                        "worker_id",
                        {"type": "string"},
                        "The polling worker (or the Anthropic-Worker-ID header). Optional: "
                        "an anonymous poll is bound to a worker at ack.",
                    ),
                    {
                        "name": "Anthropic-Worker-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The polling worker, instead of worker_id=.",
                    },
                    _query(
                        "block_ms",
                        {"type": "integer", "minimum": 0, "maximum": 60000, "default": 0},
                        "How long to wait for an item.",
                    ),
                    _query(
                        "reclaim_older_than_ms",
                        {"type": "integer", "minimum": 0},
                        "Hand out again an item delivered but not acked this long ago.",
                    ),
                    {
                        **_query(
                            "labels",
                            {"type": "array", "maxItems": 32, "items": _LABEL},
                            "The polling worker's routing labels, one parameter each "
                            "(labels=gpu&labels=repo:foo): only items whose labels are all "
                            "among them are handed out; without any, only unlabelled items.",
                        ),
                        "style": "form",
                        "explode": True,
                    },
                ),
            ),
            "204",
            "Nothing to claim within block_ms.",
        )
    },
    f"{_WORK}/stats": {
        "get": _operation("workStats", "Queue figures.", "WorkStats"),
    },
    f"{_WORK}/{{work_id}}": {
        "get": _operation("getWork", "One item.", "WorkItem", parameters=(_path("work_id"),)),
    },
    f"{_WORK}/{{work_id}}/ack": {
        "post": _operation(
            "ackWork",
            "queued -> starting, bound to the worker the poll named (or the one named here).",
            "WorkItem",
            body="AckRequest",
            body_required=False,
            parameters=(_path("work_id"),),
            errors=("409",),
        ),
    },
    f"{_WORK}/{{work_id}}/heartbeat": {
        "post": _operation(
            "heartbeatWork",
            "Renew the lease: compare-and-swap on the fencing token.",
            "HeartbeatResult",
            parameters=(
                _path("work_id"),
                _query(
                    "expected_last_heartbeat",
                    {"type": "string"},
                    "The last token received, or NO_HEARTBEAT for the first beat.",
                    required=True,
                ),
                _query(
                    "desired_ttl_seconds",
                    {"type": "number", "exclusiveMinimum": 0},
                    "Requested lease length; the server clamps it.",
                ),
            ),
            errors=("409", "412"),
        ),
    },
    f"{_WORK}/{{work_id}}/stop": {
        "post": _operation(
            "stopWork",
            "Move a live item to stopped with its outcome.",
            "WorkItem",
            body="StopRequest",
            body_required=False,
            parameters=(_path("work_id"),),
            errors=("409", "412"),
        ),
    },
    f"{_WORK}/{{work_id}}/requeue": {
        "post": _operation(
            "requeueWork",
            "The holder gives the item back: queued again with one more attempt "
            "(stopped instead when stopping or on its last attempt).",
            "WorkItem",
            body="RequeueRequest",
            parameters=(_path("work_id"),),
            errors=("409", "412"),
        ),
    },
    f"{_WORK}/{{work_id}}/request-stop": {
        "post": _operation(
            "requestStopWork",
            "Operator cancel: the next heartbeat answers state 'stopping'.",
            "WorkItem",
            parameters=(_path("work_id"),),
            errors=("409",),
        ),
    },
    f"{_WORK}/{{work_id}}/retry": {
        "post": _operation(
            "retryWork",
            "Put a stopped item (out of dead letter) back to queued with fresh attempts.",
            "WorkItem",
            parameters=(_path("work_id"),),
            errors=("409",),
        ),
    },
    _WORKERS: {
        "get": _operation("listWorkers", "All workers, status evaluated now.", "WorkerRecordList"),
    },
    f"{_WORKERS}/{{worker_id}}": {
        "get": _operation(
            "getWorker", "One worker.", "WorkerRecord", parameters=(_path("worker_id"),)
        ),
        "delete": _operation(
            "deregisterWorker",
            "Mark the worker removed (terminal).",
            "WorkerRecord",
            parameters=(_path("worker_id"),),
        ),
    },
    f"{_WORKERS}/{{worker_id}}/register": {
        "post": _operation(
            "registerWorker",
            "Register (or re-register) a worker.",
            "WorkerRecord",
            body="RegisterRequest",
            body_required=False,
            parameters=(_path("worker_id"),),
            errors=("410",),
        ),
    },
    f"{_WORKERS}/{{worker_id}}/heartbeat": {
        "post": _operation(
            "workerHeartbeat",
            "Presence report; answers the evaluated status.",
            "WorkerRecord",
            body="PresenceReport",
            parameters=(_path("worker_id"),),
            errors=("410",),
        ),
    },
    f"{_WORKERS}/{{worker_id}}/delegations": {
        "get": _operation(
            "listDelegations",
            "Delegations whose source session this worker served.",
            "DelegationList",
            parameters=(
                _path("worker_id"),
                _query(
                    "status",
                    {"enum": ["pending", "completed", "failed"]},
                    "Only delegations with this status.",
                ),
                _query(
                    "uncollected",
                    {"type": "boolean", "default": False},
                    "Leave out results the worker already collected.",
                ),
            ),
        ),
    },
    f"{_SESSIONS}/{{session_id}}/delegate": {
        "post": _operation(
            "delegate",
            "Create a delegation (a new work item linked to the session).",
            "Delegation",
            status="201",
            body="DelegateRequest",
            parameters=(_path("session_id"),),
            session_token=True,
        ),
    },
    f"{API_PREFIX}/delegations/{{delegation_id}}/result": {
        "post": _operation(
            "recordDelegationResult",
            "Record a delegation's result.",
            "Delegation",
            body="DelegationResultRequest",
            parameters=(_path("delegation_id"),),
            errors=("409",),
        ),
    },
    f"{API_PREFIX}/delegations/{{delegation_id}}/collect": {
        "post": _operation(
            "collectDelegation",
            "Mark a delegation's result as collected by its worker (idempotent).",
            "Delegation",
            parameters=(_path("delegation_id"),),
            errors=("409",),
        ),
    },
    f"{_SESSIONS}/{{session_id}}/messages": {
        "post": _operation(
            "postMessage",
            "Send a follow-up message to a session.",
            "SessionMessage",
            status="201",
            body="MessageRequest",
            parameters=(_path("session_id"),),
            session_token=True,
        ),
        "get": _operation(
            "listMessages",
            "Messages and notifications for a session, oldest first.",
            "SessionMessageList",
            parameters=(_path("session_id"),),
            session_token=True,
        ),
    },
    f"{_SESSIONS}/{{session_id}}/notify": {
        "post": _operation(
            "notifySession",
            "Send a notification to a session.",
            "SessionMessage",
            status="201",
            body="MessageRequest",
            parameters=(_path("session_id"),),
        ),
    },
}

_DOCUMENT: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "trio-supervisor reference control plane",
        "version": "1",
        "description": (
            "Work leases, worker presence, delegations and session messages for "
            "self-hosted agent workers. Every path under /v1/environments/{environment_id} "
            "needs 'Authorization: Bearer <environment key>'; the delegate and message routes "
            "of a session also accept that session's own credential (the secret handed to the "
            "worker that claimed it) in its place. Times are ISO-8601 UTC strings. "
            'Errors are {"error": {"type", "message"}}.'
        ),
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "environmentKey": {"type": "http", "scheme": "bearer"},
            "sessionToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "A session's own credential; valid only on that session's "
                "delegate and message routes, and only while its claim is live.",
            },
        },
    },
    "security": [{"environmentKey": []}],
    "paths": {
        path: {
            "parameters": [_path("environment_id")] if path.startswith(API_PREFIX) else [],
            **operations,
        }
        for path, operations in _PATHS.items()
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may not mutate the shared one)."""
    return copy.deepcopy(_DOCUMENT)
