"""The pure worker status function, row by row of the DESIGN §4 table."""

from __future__ import annotations

import attrs
import pytest

from supervisor.controlplane import PresenceReport, StatusPolicy, WorkerStatus
from supervisor.controlplane._status import Health, evaluate, new_worker, next_status

P = StatusPolicy()
S = WorkerStatus
T0 = 1000.0


def after(
    current: WorkerStatus,
    *,
    silent: float = 0.0,
    beat: Health | None = None,
    beaten_before: bool = True,
) -> WorkerStatus:
    """The status ``silent`` seconds after the last beat (or registration), then ``beat``."""
    return next_status(
        current,
        now=T0 + silent,
        registered_at=T0 if not beaten_before else T0 - 1,
        last_heartbeat_at=T0 if beaten_before else None,
        policy=P,
        heartbeat=beat,
    )


def test_the_default_thresholds_are_the_designed_ones() -> None:
    assert (P.offline_after, P.degrade_error_rate, P.recover_error_rate) == (90.0, 0.5, 0.1)
    assert P.provision_timeout > 0


def test_new_worker_is_provisioning() -> None:
    record = new_worker("w1", "default", now=T0, metadata={"capacity": 1})
    assert record.status is S.PROVISIONING
    assert record.registered_at == T0
    assert record.last_heartbeat_at is None
    assert record.runtime_metadata == {"capacity": 1}


@pytest.mark.parametrize(
    ("current", "beat", "expected"),
    [
        # provisioning -> online on the first heartbeat (degraded if that beat is unhealthy)
        (S.PROVISIONING, Health(), S.ONLINE),
        (S.PROVISIONING, Health(error_rate=0.6), S.DEGRADED),
        # online -> degraded on wedged or error_rate >= 0.5; stays online below
        (S.ONLINE, Health(runtime_state="wedged"), S.DEGRADED),
        (S.ONLINE, Health(error_rate=0.5), S.DEGRADED),
        (S.ONLINE, Health(error_rate=1.0), S.DEGRADED),
        (S.ONLINE, Health(error_rate=0.4999), S.ONLINE),
        (S.ONLINE, Health(error_rate=0.3), S.ONLINE),
        (S.ONLINE, Health(runtime_state="draining"), S.ONLINE),
        # degraded -> online only when error_rate < 0.1 and runtime_state cleared
        (S.DEGRADED, Health(error_rate=0.0999), S.ONLINE),
        (S.DEGRADED, Health(error_rate=0.0), S.ONLINE),
        (S.DEGRADED, Health(error_rate=0.1), S.DEGRADED),
        (S.DEGRADED, Health(error_rate=0.3), S.DEGRADED),
        (S.DEGRADED, Health(error_rate=0.0, runtime_state="wedged"), S.DEGRADED),
        (S.DEGRADED, Health(error_rate=0.0, runtime_state="draining"), S.DEGRADED),
        # offline -> online (or degraded) on a heartbeat, judged afresh
        (S.OFFLINE, Health(error_rate=0.3), S.ONLINE),
        (S.OFFLINE, Health(error_rate=0.5), S.DEGRADED),
        (S.OFFLINE, Health(runtime_state="wedged"), S.DEGRADED),
        # a late heartbeat revives a failed worker the same way
        (S.FAILED, Health(), S.ONLINE),
        # removed is terminal
        (S.REMOVED, Health(), S.REMOVED),
    ],
)
def test_heartbeat_rows(current: WorkerStatus, beat: Health, expected: WorkerStatus) -> None:
    assert after(current, beat=beat) is expected


@pytest.mark.parametrize(
    ("current", "silent", "expected"),
    [
        (S.ONLINE, 89.999, S.ONLINE),
        (S.ONLINE, 90.0, S.OFFLINE),
        (S.DEGRADED, 89.999, S.DEGRADED),
        (S.DEGRADED, 90.0, S.OFFLINE),
        (S.OFFLINE, 10_000.0, S.OFFLINE),
        (S.FAILED, 10_000.0, S.FAILED),
        (S.REMOVED, 10_000.0, S.REMOVED),
    ],
)
def test_silence_rows(current: WorkerStatus, silent: float, expected: WorkerStatus) -> None:
    assert after(current, silent=silent) is expected


def test_provisioning_fails_exactly_at_provision_timeout_without_a_heartbeat() -> None:
    timeout = P.provision_timeout
    assert after(S.PROVISIONING, silent=timeout - 0.001, beaten_before=False) is S.PROVISIONING
    assert after(S.PROVISIONING, silent=timeout, beaten_before=False) is S.FAILED


def test_silence_is_applied_before_the_heartbeat_that_ends_it() -> None:
    """A degraded worker silent past offline_after is judged afresh by its next beat."""
    band = Health(error_rate=0.3)
    assert after(S.DEGRADED, silent=89.0, beat=band) is S.DEGRADED
    assert after(S.DEGRADED, silent=90.0, beat=band) is S.ONLINE


def test_evaluate_merges_a_report_and_stamps_the_heartbeat_time() -> None:
    record = new_worker("w1", "default", now=T0)
    report = PresenceReport(
        worker_id="w1",
        error_rate=0.2,
        sample_error="e",
        active_tasks=3,
        current_task="work_x",
        uptime_seconds=5.0,
        runtime_metadata={"version": "1"},
    )
    updated = evaluate(record, now=T0 + 2, policy=P, report=report)
    assert updated.status is S.ONLINE
    assert updated.last_heartbeat_at == T0 + 2
    assert (updated.error_rate, updated.sample_error, updated.active_tasks) == (0.2, "e", 3)
    assert (updated.current_task, updated.uptime_seconds) == ("work_x", 5.0)
    assert updated.runtime_metadata == {"version": "1"}


def test_evaluate_without_a_report_changes_only_the_status_and_only_when_due() -> None:
    online = evaluate(new_worker("w1", "d", now=T0), now=T0, policy=P, report=PresenceReport("w1"))
    assert evaluate(online, now=T0 + 10, policy=P) is online
    offline = evaluate(online, now=T0 + 90, policy=P)
    assert offline.status is S.OFFLINE
    assert offline.last_heartbeat_at == online.last_heartbeat_at


def test_evaluate_leaves_a_removed_record_alone_even_with_a_report() -> None:
    online = evaluate(new_worker("w1", "d", now=T0), now=T0, policy=P, report=PresenceReport("w1"))
    removed = attrs.evolve(online, status=S.REMOVED)
    assert evaluate(removed, now=T0 + 5, policy=P, report=PresenceReport("w1")) is removed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"offline_after": 0},
        {"provision_timeout": -1},
        {"degrade_error_rate": 1.5},
        {"recover_error_rate": 0.6},  # above the degrade threshold: no hysteresis band
    ],
)
def test_an_inconsistent_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"rate|must be"):
        StatusPolicy(**kwargs)
