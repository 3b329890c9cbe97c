"""The wire codec: exact times, lossless model round trips, and field-named decoding errors."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, strategies as st

from supervisor.controlplane import (
    BadRequest,
    Delegation,
    DelegationStatus,
    HeartbeatResult,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    SessionData,
    SessionMessage,
    WorkerRecord,
    WorkerStatus,
    WorkItem,
    WorkState,
    WorkStats,
    _codec as codec,
)

# Years 1..9999 in POSIX seconds: the calendar's range.
_MIN_TIME = -62_135_596_800.0
_MAX_TIME = 253_402_300_799.0

times = st.floats(min_value=_MIN_TIME, max_value=_MAX_TIME, allow_nan=False)
maybe_times = st.none() | times
text = st.text(max_size=20)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}", fullmatch=True)
str_maps = st.dictionaries(text, text, max_size=3)
json_maps = st.dictionaries(
    text, st.none() | st.booleans() | st.integers() | text | st.lists(st.integers()), max_size=3
)

outcomes = st.builds(
    Outcome,
    status=st.sampled_from(OutcomeStatus),
    exit_code=st.none() | st.integers(-255, 255),
    result=st.none() | text,
    duration=st.none() | st.floats(0, 1e6),
    reason=st.none() | text,
)
work_items = st.builds(
    WorkItem,
    id=ids,
    environment_id=ids,
    state=st.sampled_from(WorkState),
    data=st.builds(SessionData, id=ids, prompt=text),
    metadata=str_maps,
    attempts=st.integers(0, 10),
    worker_id=st.none() | ids,
    created_at=maybe_times,
    acknowledged_at=maybe_times,
    started_at=maybe_times,
    latest_heartbeat_at=maybe_times,
    stop_requested_at=maybe_times,
    stopped_at=maybe_times,
    outcome=st.none() | outcomes,
    secret=st.none() | text,
)
worker_records = st.builds(
    WorkerRecord,
    worker_id=ids,
    environment_id=ids,
    status=st.sampled_from(WorkerStatus),
    registered_at=maybe_times,
    last_heartbeat_at=maybe_times,
    error_rate=st.floats(0, 1),
    sample_error=st.none() | text,
    active_tasks=st.integers(0, 100),
    current_task=st.none() | text,
    uptime_seconds=st.floats(0, 1e9),
    runtime_state=st.none() | text,
    runtime_metadata=json_maps,
)


def _wire(value: Any) -> Any:
    """Through real JSON bytes, as the HTTP layer does."""
    return codec.loads(codec.dumps(value))


@given(times)
def test_time_round_trips_exactly(value: float) -> None:
    """Any time in the calendar's range survives the wire bit for bit."""
    assert codec.decode_time(codec.encode_time(value), "t") == value


@pytest.mark.parametrize(
    ("seconds", "wire"),
    [
        (0.0, "1970-01-01T00:00:00Z"),
        (1.5, "1970-01-01T00:00:01.5Z"),
        (-0.5, "1969-12-31T23:59:59.5Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.25Z"),
    ],
)
def test_time_is_iso_8601_utc_on_the_wire(seconds: float, wire: str) -> None:
    """Times are written as ISO-8601 UTC strings with a 'Z'."""
    assert codec.encode_time(seconds) == wire


def test_time_with_an_offset_is_normalised_to_utc() -> None:
    """An explicit offset is honoured: 01:00+01:00 is midnight UTC."""
    assert codec.decode_time("2024-01-01T01:00:00+01:00", "t") == codec.decode_time(
        "2024-01-01T00:00:00Z", "t"
    )


@pytest.mark.parametrize(
    "value",
    [1700000000, None, "yesterday", "2024-01-01", "2024-01-01T00:00:00", "2024-02-30T00:00:00Z"],
)
def test_bad_time_is_a_bad_request_naming_the_field(value: object) -> None:
    """A number, a date without time or offset, or an impossible date names the field."""
    with pytest.raises(BadRequest, match=r"created_at"):
        codec.decode_time(value, "created_at")


def test_non_finite_time_cannot_be_encoded() -> None:
    """NaN/inf have no calendar form; encoding refuses instead of writing garbage."""
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode_time(math.inf)


@given(work_items)
def test_work_item_round_trips(item: WorkItem) -> None:
    """Every field of a work item, secret included, survives encode -> JSON -> decode."""
    assert codec.decode_work_item(_wire(codec.encode_work_item(item))) == item


def test_work_item_without_secret_has_no_secret_field() -> None:
    """Only the claiming poll carries a secret; other answers do not mention one."""
    item = WorkItem(id="w", environment_id="e", state="queued", data=SessionData("s", "p"))
    assert "secret" not in codec.encode_work_item(item)


@given(worker_records)
def test_worker_record_round_trips(record: WorkerRecord) -> None:
    """Worker records survive the wire unchanged."""
    assert codec.decode_worker_record(_wire(codec.encode_worker_record(record))) == record


@given(
    st.builds(
        PresenceReport,
        worker_id=ids,
        status=ids,
        error_rate=st.floats(0, 1),
        sample_error=st.none() | text,
        active_tasks=st.integers(0, 100),
        current_task=st.none() | text,
        uptime_seconds=st.floats(0, 1e9),
        runtime_state=st.none() | ids,
        runtime_metadata=json_maps,
    )
)
def test_presence_report_round_trips(report: PresenceReport) -> None:
    """Presence reports survive the wire unchanged (runtime_state only sent when set)."""
    body = _wire(codec.encode_presence_report(report))
    assert ("runtime_state" in body) == (report.runtime_state is not None)
    assert codec.decode_presence_report(body, worker_id=report.worker_id) == report


@given(
    st.builds(
        Delegation,
        id=ids,
        source_id=ids,
        work_id=ids,
        task=text,
        status=st.sampled_from(DelegationStatus),
        response_preview=st.none() | text,
        worker_id=st.none() | ids,
        created_at=maybe_times,
        completed_at=maybe_times,
    ),
    st.builds(SessionMessage, id=ids, session_id=ids, kind=ids, body=text, created_at=maybe_times),
    st.builds(
        HeartbeatResult,
        last_heartbeat=ids,
        ttl_seconds=st.floats(0, 1e5),
        state=st.sampled_from(WorkState),
        lease_extended=st.booleans(),
    ),
    st.builds(
        WorkStats,
        depth=st.integers(0, 10**6),
        pending=st.integers(0, 10**6),
        oldest_queued_at=maybe_times,
        workers_polling=st.integers(0, 100),
    ),
)
def test_other_models_round_trip(
    delegation: Delegation, message: SessionMessage, beat: HeartbeatResult, stats: WorkStats
) -> None:
    """Delegations, messages, heartbeat results and stats survive the wire unchanged."""
    assert codec.decode_delegation(_wire(codec.encode_delegation(delegation))) == delegation
    assert codec.decode_session_message(_wire(codec.encode_session_message(message))) == message
    assert codec.decode_heartbeat_result(_wire(codec.encode_heartbeat_result(beat))) == beat
    assert codec.decode_work_stats(_wire(codec.encode_work_stats(stats))) == stats


@given(st.builds(codec.SubmitRequest, prompt=text, session_id=st.none() | ids, metadata=str_maps))
def test_submit_request_round_trips(request: codec.SubmitRequest) -> None:
    """What the client encodes for submit is exactly what the server decodes."""
    assert codec.decode_submit_request(_wire(codec.encode_submit_request(request))) == request


@given(
    st.builds(
        codec.StopRequest,
        force=st.booleans(),
        expected_last_heartbeat=st.none() | ids,
        outcome=st.none() | outcomes,
    )
)
def test_stop_request_round_trips(request: codec.StopRequest) -> None:
    """What the client encodes for stop is exactly what the server decodes."""
    assert codec.decode_stop_request(_wire(codec.encode_stop_request(request))) == request


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": Infinity}', "Infinity is not valid JSON"),
    ],
)
def test_loads_refuses_what_is_not_json(raw: bytes, message: str) -> None:
    """Malformed bytes, non-UTF-8 and NaN/Infinity are a BadRequest saying why."""
    with pytest.raises(BadRequest, match=message):
        codec.loads(raw)


@pytest.mark.parametrize(
    ("decode", "body", "message"),
    [
        (codec.decode_submit_request, [], r"body must be a JSON object, got array"),
        (codec.decode_submit_request, {}, r"data is required"),
        (codec.decode_submit_request, {"data": {"prompt": 5}}, r"data\.prompt must be a string"),
        (codec.decode_submit_request, {"data": {}}, r"data\.prompt is required"),
        (
            codec.decode_submit_request,
            {"data": {"prompt": "p", "type": "shell"}},
            r"data\.type must be 'session'",
        ),
        (
            codec.decode_submit_request,
            {"data": {"prompt": "p"}, "metadata": {"k": 1}},
            r"metadata\.k must be a string",
        ),
        (
            codec.decode_submit_request,
            {"data": {"prompt": "p", "colour": "red"}},
            r"unknown field\(s\): data\.colour",
        ),
        (codec.decode_submit_request, {"data": {"prompt": "p"}, "x": 1}, r"unknown field\(s\): x"),
        (codec.decode_stop_request, {"force": "yes"}, r"force must be true or false"),
        (
            codec.decode_stop_request,
            {"outcome": {"status": "splendid"}},
            r"outcome\.status must be one of",
        ),
        (
            codec.decode_stop_request,
            {"outcome": {"status": "failed", "exit_code": True}},
            r"outcome\.exit_code must be an integer, got boolean",
        ),
        (codec.decode_ack_request, {"worker_id": ""}, r"worker_id must not be empty"),
        (codec.decode_delegate_request, {"task": None}, r"task is required"),
        (
            codec.decode_delegation_result_request,
            {"status": "done"},
            r"status must be one of pending, completed, failed",
        ),
        (codec.decode_message_request, {"body": ["hi"]}, r"body must be a string, got array"),
        (codec.decode_register_request, {"metadata": "x"}, r"metadata must be an object"),
    ],
)
def test_request_decoding_errors_name_the_field(decode: Any, body: object, message: str) -> None:
    """Each malformed request body is a BadRequest whose message names the offending field."""
    with pytest.raises(BadRequest, match=message):
        decode(body)


def test_presence_report_worker_id_must_match_the_url() -> None:
    """A presence body claiming another worker's id is refused, not silently re-addressed."""
    with pytest.raises(BadRequest, match="does not match the URL"):
        codec.decode_presence_report({"worker_id": "other"}, worker_id="me")


def test_presence_report_takes_worker_id_from_the_url() -> None:
    """The body may omit worker_id: the URL names the worker."""
    report = codec.decode_presence_report({"active_tasks": 2}, worker_id="me")
    assert report == PresenceReport(worker_id="me", active_tasks=2)


def test_response_decoding_ignores_unknown_fields() -> None:
    """A newer server may add fields; an older client still decodes the answer."""
    body = codec.encode_heartbeat_result(HeartbeatResult("tok", 60.0, "active"))
    body["added_later"] = {"anything": 1}
    assert codec.decode_heartbeat_result(body).last_heartbeat == "tok"


def test_integral_floats_are_accepted_as_integers() -> None:
    """3.0 is read as 3 (some encoders write every number as a float); 3.5 is refused."""
    stats = {"depth": 3.0, "pending": 0, "oldest_queued_at": None, "workers_polling": 0}
    assert codec.decode_work_stats(stats).depth == 3
    with pytest.raises(BadRequest, match="depth must be an integer"):
        codec.decode_work_stats({**stats, "depth": 3.5})


def test_dumps_is_compact_utf8_json() -> None:
    """The encoder writes compact UTF-8 (no ASCII escapes) that any JSON parser reads back."""
    raw = codec.dumps({"prompt": "héllo"})
    assert raw == '{"prompt":"héllo"}'.encode()
    assert json.loads(raw) == {"prompt": "héllo"}
