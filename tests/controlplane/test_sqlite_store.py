"""What only the SQLite store itself promises: durability, its schema, error translation,
session credentials, environments, input validation and submit listeners.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path

import pytest

from supervisor import ControlPlaneError, FatalError, TransientError
from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    DelegationStatus,
    LeasePolicy,
    NotFound,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    SQLiteStore,
    StatusPolicy,
    WorkState,
)
from supervisor.controlplane._store import SCHEMA_V3, SCHEMA_VERSION

ENV = "default"
T0 = 1_700_000_000.0


def lease(store: SQLiteStore, worker: str = "w1", now: float = T0) -> tuple[str, str, str]:
    """Submit, claim, ack and beat once; return (work id, session id, token)."""
    item = store.submit(ENV, "x", now=now)
    polled = store.poll(ENV, worker_id=worker, now=now)
    assert polled is not None
    store.ack(ENV, item.id, worker_id=worker, now=now)
    beat = store.heartbeat(ENV, item.id, expected_last_heartbeat=NO_HEARTBEAT, now=now)
    return item.id, item.data.id, beat.last_heartbeat


# --- durability and schema -----------------------------------------------------------


def test_everything_survives_closing_and_reopening_the_file(store_path: Path) -> None:
    first = SQLiteStore(store_path)
    work_id, session_id, token = lease(first)
    queued = first.submit(ENV, "later", now=T0, metadata={"k": "v"})
    delegation = first.delegate(ENV, session_id, "sub-task", now=T0)
    first.record_delegation_result(
        ENV, delegation.id, status=DelegationStatus.COMPLETED, response_preview="ok", now=T0
    )
    message = first.post_message(ENV, session_id, "hello", now=T0)
    first.worker_heartbeat(ENV, PresenceReport(worker_id="w1", error_rate=0.7), now=T0)
    first.close()

    again = SQLiteStore(store_path)
    try:
        assert again.get(ENV, work_id, now=T0 + 1).state is WorkState.ACTIVE
        assert again.get(ENV, queued.id, now=T0 + 1).metadata == {"k": "v"}
        # the lease and its token survived too
        assert again.heartbeat(ENV, work_id, expected_last_heartbeat=token, now=T0 + 1)
        assert again.list_delegations(ENV, "w1")[0].response_preview == "ok"
        assert again.list_messages(ENV, session_id) == [message]
        assert again.get_worker(ENV, "w1", now=T0 + 1).error_rate == pytest.approx(0.7)
    finally:
        again.close()


def test_a_new_file_gets_wal_and_the_current_schema_version(store_path: Path) -> None:
    SQLiteStore(store_path).close()
    raw = sqlite3.connect(store_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()


def test_a_version_three_file_gains_routing_labels_and_timeouts_keeping_its_items(
    store_path: Path,
) -> None:
    raw = sqlite3.connect(store_path)
    try:
        raw.executescript(SCHEMA_V3)
        raw.execute("PRAGMA user_version = 3")
        columns = [row[1] for row in raw.execute("PRAGMA table_info(work_items)")]
        assert "labels" not in columns and "timeout_seconds" not in columns
        assert "idem_key" in columns  # a real version 3 file, not an older one
        raw.execute("INSERT INTO environments (id, created_at) VALUES (?, ?)", (ENV, T0))
        raw.execute(
            "INSERT INTO work_items (id, environment_id, state, session_id, prompt, metadata, "
            "created_at, priority, idem_key) "
            "VALUES ('work-old', ?, 'queued', 'sess-old', 'old', '{}', ?, 5, 'k1')",
            (ENV, T0),
        )
        raw.commit()
    finally:
        raw.close()
    store = SQLiteStore(store_path)
    try:
        old = store.get(ENV, "work-old", now=T0 + 1)
        assert (old.labels, old.timeout, old.priority, old.key) == ((), None, 5, "k1")
        new = store.submit(ENV, "new", now=T0 + 1, labels=["gpu"], timeout=30)
        assert store.poll(ENV, worker_id="plain", now=T0 + 2) is not None  # the old one
        assert store.poll(ENV, worker_id="plain", now=T0 + 2) is None
        claimed = store.poll(ENV, worker_id="gpu", now=T0 + 2, labels=["gpu"])
        assert claimed is not None and claimed.id == new.id
        assert (claimed.labels, claimed.timeout) == (("gpu",), 30.0)
    finally:
        store.close()
    raw = sqlite3.connect(store_path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    finally:
        raw.close()
    SQLiteStore(store_path).close()  # reopening a migrated file changes nothing


def test_a_file_with_a_newer_schema_is_refused_with_a_clear_error(store_path: Path) -> None:
    SQLiteStore(store_path).close()
    raw = sqlite3.connect(store_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(ControlPlaneError, match="schema version"):
        SQLiteStore(store_path)


def test_a_file_that_is_not_a_database_is_a_control_plane_error_from_sqlite(
    store_path: Path,
) -> None:
    store_path.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(ControlPlaneError) as caught:
        SQLiteStore(store_path)
    assert not isinstance(caught.value, TransientError)
    assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_a_directory_where_the_file_should_be_is_a_control_plane_error(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError) as caught:
        SQLiteStore(tmp_path)
    assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_a_lock_held_past_the_busy_timeout_is_a_transient_error(store_path: Path) -> None:
    store = SQLiteStore(store_path, busy_timeout=0.05)
    other = sqlite3.connect(store_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(TransientError, match="busy") as caught:
            store.submit(ENV, "x", now=T0)
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        other.execute("ROLLBACK")
        assert store.submit(ENV, "x", now=T0).state is WorkState.QUEUED
    finally:
        other.close()
        store.close()


def test_calls_after_close_raise_control_plane_error_and_close_is_idempotent(
    store_path: Path,
) -> None:
    store = SQLiteStore(store_path)
    store.close()
    store.close()
    assert store.closed
    with pytest.raises(ControlPlaneError, match="closed"):
        store.submit(ENV, "x", now=T0)


def test_a_failed_call_changes_nothing(store: SQLiteStore) -> None:
    """A 4xx raised mid-transaction rolls the whole call back."""
    store.submit(ENV, "x", now=T0, session_id="s1")
    with pytest.raises(ControlPlaneError):
        store.submit(ENV, "y", now=T0, session_id="s1")
    assert [i.data.prompt for i in store.list_work(ENV, now=T0)] == ["x"]


# --- session credentials ---------------------------------------------------------------


def test_the_session_secret_verifies_only_while_its_claim_is_live(store: SQLiteStore) -> None:
    item = store.submit(ENV, "x", now=T0)
    polled = store.poll(ENV, worker_id="w1", now=T0)
    assert polled is not None
    assert polled.secret is not None
    secret = polled.secret
    assert store.verify_session_secret(ENV, item.data.id, secret, now=T0)
    assert not store.verify_session_secret(ENV, item.data.id, secret + "x", now=T0)
    assert not store.verify_session_secret(ENV, "sess-unknown", secret, now=T0)
    assert not store.verify_session_secret("other-env", item.data.id, secret, now=T0)
    store.ack(ENV, item.id, worker_id="w1", now=T0)
    assert store.verify_session_secret(ENV, item.data.id, secret, now=T0)
    # the ack lease expires: the item is requeued and the credential dies with the claim
    assert not store.verify_session_secret(ENV, item.data.id, secret, now=T0 + 60)


def test_a_re_claim_mints_a_new_secret_and_voids_the_old(store: SQLiteStore) -> None:
    item = store.submit(ENV, "x", now=T0)
    first = store.poll(ENV, worker_id="w1", now=T0)
    second = store.poll(ENV, worker_id="w2", now=T0 + 30)
    assert first is not None
    assert second is not None
    assert first.secret is not None
    assert second.secret is not None
    assert not store.verify_session_secret(ENV, item.data.id, first.secret, now=T0 + 30)
    assert store.verify_session_secret(ENV, item.data.id, second.secret, now=T0 + 30)


def test_a_stop_voids_the_session_secret(store: SQLiteStore) -> None:
    item = store.submit(ENV, "x", now=T0)
    polled = store.poll(ENV, worker_id="w1", now=T0)
    assert polled is not None
    assert polled.secret is not None
    store.stop(ENV, item.id, now=T0)
    assert not store.verify_session_secret(ENV, item.data.id, polled.secret, now=T0)


def test_the_secret_is_stored_only_as_a_hash(store: SQLiteStore, store_path: Path) -> None:
    store.submit(ENV, "x", now=T0)
    polled = store.poll(ENV, worker_id="w1", now=T0)
    assert polled is not None
    assert polled.secret is not None
    assert polled.secret.encode() not in store_path.read_bytes()
    wal = store_path.with_name(store_path.name + "-wal")
    assert not wal.exists() or polled.secret.encode() not in wal.read_bytes()


# --- environments ------------------------------------------------------------------------


def test_environments_are_created_on_first_use_and_kept_apart(store: SQLiteStore) -> None:
    assert store.list_environments() == []
    a = store.submit("env-a", "for a", now=T0)
    store.submit("env-b", "for b", now=T0)
    assert store.list_environments() == ["env-a", "env-b"]
    assert store.poll("env-b", worker_id="w1", now=T0) is not None
    assert store.poll("env-b", worker_id="w1", now=T0) is None
    with pytest.raises(NotFound):
        store.get("env-b", a.id, now=T0)
    assert [i.id for i in store.list_work("env-a", now=T0)] == [a.id]
    assert store.stats("env-a", now=T0).depth == 1


def test_the_same_session_id_may_exist_in_two_environments(store: SQLiteStore) -> None:
    store.submit("env-a", "x", session_id="s1", now=T0)
    assert store.submit("env-b", "x", session_id="s1", now=T0).data.id == "s1"


# --- validation at the boundary ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad_id", ["", "has space", "slash/inside", "-leading-dash", "x" * 201, "new\nline", 7]
)
def test_malformed_ids_are_bad_requests(store: SQLiteStore, bad_id: object) -> None:
    with pytest.raises(BadRequest):
        store.submit(bad_id, "x", now=T0)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        store.submit(ENV, "x", session_id=bad_id, now=T0)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        store.poll(ENV, worker_id=bad_id, now=T0)  # type: ignore[arg-type]
    assert store.list_work(ENV, now=T0) == []


@pytest.mark.parametrize("ttl", [math.nan, math.inf, -5.0, 0, True, "60"])
def test_unusable_ttls_are_bad_requests(store: SQLiteStore, ttl: object) -> None:
    work_id = store.submit(ENV, "x", now=T0).id
    store.poll(ENV, worker_id="w1", now=T0)
    store.ack(ENV, work_id, worker_id="w1", now=T0)
    with pytest.raises(BadRequest, match="desired_ttl_seconds"):
        store.heartbeat(
            ENV,
            work_id,
            expected_last_heartbeat=NO_HEARTBEAT,
            desired_ttl_seconds=ttl,  # type: ignore[arg-type]
            now=T0,
        )


@pytest.mark.parametrize("window", [-1, 1.5, True])
def test_an_unusable_reclaim_window_is_a_bad_request(store: SQLiteStore, window: object) -> None:
    with pytest.raises(BadRequest, match="reclaim_older_than_ms"):
        store.poll(ENV, worker_id="w1", now=T0, reclaim_older_than_ms=window)  # type: ignore[arg-type]


def test_bad_request_messages_say_what_was_wrong(store: SQLiteStore) -> None:
    with pytest.raises(BadRequest, match="limit must be an integer between 1 and 1000"):
        store.list_work(ENV, now=T0, limit=5000)
    with pytest.raises(BadRequest, match="state must be one of queued, starting"):
        store.list_work(ENV, now=T0, state="running")
    with pytest.raises(BadRequest, match="status must be one of"):
        store.list_delegations(ENV, "w1", status="done")
    with pytest.raises(BadRequest, match="prompt must not be empty"):
        store.submit(ENV, "", now=T0)
    with pytest.raises(BadRequest, match="prompt must be a string"):
        store.submit(ENV, None, now=T0)  # type: ignore[arg-type]


def test_bad_requests_are_fatal_errors_with_status_400(store: SQLiteStore) -> None:
    with pytest.raises(BadRequest) as caught:
        store.submit(ENV, "", now=T0)
    assert isinstance(caught.value, FatalError)
    assert caught.value.status_code == 400


def test_runtime_metadata_must_be_json(store: SQLiteStore) -> None:
    with pytest.raises(BadRequest, match="JSON"):
        store.worker_heartbeat(
            ENV, PresenceReport(worker_id="w1", runtime_metadata={"x": object()}), now=T0
        )
    with pytest.raises(NotFound):
        store.get_worker(ENV, "w1", now=T0)


def test_an_outcome_round_trips_every_field(store: SQLiteStore) -> None:
    work_id, _, token = lease(store)
    outcome = Outcome(
        OutcomeStatus.TIMEOUT, exit_code=-9, result="tail\nof output", duration=1.25, reason="slow"
    )
    store.stop(ENV, work_id, expected_last_heartbeat=token, outcome=outcome, now=T0)
    assert store.get(ENV, work_id, now=T0).outcome == outcome


# --- policies and listeners ----------------------------------------------------------------


def test_the_lease_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="min_ttl <= default_ttl <= max_ttl"):
        LeasePolicy(default_ttl=5.0, min_ttl=10.0)
    with pytest.raises(ValueError, match="max_attempts"):
        LeasePolicy(max_attempts=0)
    with pytest.raises(ValueError, match="default_ttl"):
        LeasePolicy(default_ttl=math.nan)


def test_policies_given_to_the_store_are_applied(store_path: Path) -> None:
    store = SQLiteStore(
        store_path,
        lease_policy=LeasePolicy(default_ttl=10.0, max_ttl=20.0, max_attempts=1),
        status_policy=StatusPolicy(offline_after=5.0),
    )
    try:
        work_id, _, token = lease(store)
        beat = store.heartbeat(
            ENV, work_id, expected_last_heartbeat=token, desired_ttl_seconds=99, now=T0
        )
        assert beat.ttl_seconds == 20.0
        failed = store.get(ENV, work_id, now=T0 + 20)  # one attempt only: stopped at once
        assert failed.state is WorkState.STOPPED
        assert failed.outcome == Outcome(OutcomeStatus.FAILED, reason="lease expired")
        store.worker_heartbeat(ENV, PresenceReport(worker_id="w1"), now=T0)
        assert store.get_worker(ENV, "w1", now=T0 + 5).status == "offline"
    finally:
        store.close()


def test_submit_listeners_hear_every_commit_and_a_failing_one_is_contained(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[tuple[str, str]] = []

    def listener(environment_id: str) -> None:
        heard.append((environment_id, threading.current_thread().name))

    def broken(environment_id: str) -> None:
        raise RuntimeError("listener bug")

    store.add_submit_listener(broken)
    store.add_submit_listener(listener)
    item = store.submit("env-a", "x", now=T0)
    store.delegate("env-a", item.data.id, "sub-task", now=T0)
    with pytest.raises(BadRequest):
        store.submit("env-a", "", now=T0)  # not committed: nobody is told
    assert [env for env, _ in heard] == ["env-a", "env-a"]
    assert "listener" in caplog.text
    store.remove_submit_listener(listener)
    store.remove_submit_listener(listener)  # twice is harmless
    store.submit("env-a", "y", now=T0)
    assert len(heard) == 2


def test_repr_names_the_file_and_never_a_secret(store: SQLiteStore, store_path: Path) -> None:
    store.submit(ENV, "x", now=T0)
    polled = store.poll(ENV, worker_id="w1", now=T0)
    assert polled is not None
    assert polled.secret is not None
    assert str(store_path) in repr(store)
    assert polled.secret not in repr(store)
    assert polled.secret not in repr(polled)
