"""Delegation results on every `ControlPlane` implementation (conformance, DESIGN §3.7 and §4).

A delegate's result is recorded by the control plane itself when the
delegate's work item stops, whichever way it stops; a worker collects a result
once it is safe in its journal, and a collected result leaves its list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from supervisor.controlplane import (
    NO_HEARTBEAT,
    Conflict,
    Delegation,
    DelegationStatus,
    NotFound,
    Outcome,
    OutcomeStatus,
    WorkItem,
    WorkState,
)
from supervisor.controlplane._store import RESPONSE_PREVIEW_CHARS

if TYPE_CHECKING:
    from controlplane.conformance import ConformanceTarget

SOURCE_WORKER = "worker-source"
DELEGATE_WORKER = "worker-delegate"


async def running_source(t: ConformanceTarget) -> WorkItem:
    """A source session claimed by ``SOURCE_WORKER`` with a confirmed lease."""
    item = await t.cp.submit("source task")
    polled = await t.cp.poll(worker_id=SOURCE_WORKER)
    assert polled is not None and polled.id == item.id
    await t.cp.ack(item.id, worker_id=SOURCE_WORKER)
    # A long lease: the delegate's leases may expire in a test, the source's not.
    await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=3600)
    return item


async def delegated(t: ConformanceTarget, task: str = "sub task") -> Delegation:
    source = await running_source(t)
    return await t.cp.delegate(source.data.id, task)


async def claim_delegate(t: ConformanceTarget, delegation: Delegation) -> str:
    """The delegate worker claims the delegate item; returns its lease token."""
    polled = await t.cp.poll(worker_id=DELEGATE_WORKER)
    assert polled is not None and polled.id == delegation.work_id
    await t.cp.ack(polled.id, worker_id=DELEGATE_WORKER)
    beat = await t.cp.heartbeat(polled.id, expected_last_heartbeat=NO_HEARTBEAT)
    return beat.last_heartbeat


async def only_delegation(t: ConformanceTarget) -> Delegation:
    (found,) = await t.cp.list_delegations(SOURCE_WORKER)
    return found


async def test_a_completed_delegate_records_a_completed_result_with_its_output(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    token = await claim_delegate(t, delegation)
    t.clock.advance(5)
    await t.cp.stop(
        delegation.work_id,
        expected_last_heartbeat=token,
        outcome=Outcome(OutcomeStatus.COMPLETED, exit_code=0, result="42 files"),
    )
    found = await only_delegation(t)
    assert found.status is DelegationStatus.COMPLETED
    assert found.response_preview == "42 files"
    assert found.completed_at is not None
    assert found.collected_at is None


@pytest.mark.parametrize(
    ("outcome", "preview"),
    [
        (Outcome(OutcomeStatus.FAILED, exit_code=3, result="stack trace"), "stack trace"),
        (Outcome(OutcomeStatus.TIMEOUT, reason="session timeout"), "session timeout"),
        (Outcome(OutcomeStatus.WEDGED, reason="no output"), "no output"),
    ],
)
async def test_any_other_outcome_records_a_failed_result(
    control_plane: ConformanceTarget, outcome: Outcome, preview: str
) -> None:
    t = control_plane
    delegation = await delegated(t)
    token = await claim_delegate(t, delegation)
    await t.cp.stop(delegation.work_id, expected_last_heartbeat=token, outcome=outcome)
    found = await only_delegation(t)
    assert found.status is DelegationStatus.FAILED
    assert found.response_preview == preview


async def test_the_recorded_output_is_truncated_to_the_preview_length(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    token = await claim_delegate(t, delegation)
    long = "x" * (RESPONSE_PREVIEW_CHARS + 500)
    await t.cp.stop(
        delegation.work_id,
        expected_last_heartbeat=token,
        outcome=Outcome(OutcomeStatus.COMPLETED, result=long),
    )
    assert (await only_delegation(t)).response_preview == long[:RESPONSE_PREVIEW_CHARS]


async def test_a_delegate_cancelled_before_it_was_claimed_records_a_failed_result(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    await t.cp.request_stop(delegation.work_id)
    assert (await only_delegation(t)).status is DelegationStatus.FAILED


async def test_a_delegate_whose_leases_all_expire_records_a_failed_result(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    for _ in range(t.lease.max_attempts):
        await claim_delegate(t, delegation)
        assert (await only_delegation(t)).status is DelegationStatus.PENDING
        t.clock.advance(t.lease.default_ttl + 1)
    item = await t.cp.get(delegation.work_id)
    assert item.state is WorkState.STOPPED
    found = await only_delegation(t)
    assert found.status is DelegationStatus.FAILED
    assert found.response_preview == "lease expired"


async def test_a_requeued_delegate_stays_pending_until_its_last_attempt_stops(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    wedged = Outcome(OutcomeStatus.WEDGED, reason="wedged")
    for attempt in range(1, t.lease.max_attempts + 1):
        token = await claim_delegate(t, delegation)
        item = await t.cp.requeue(delegation.work_id, expected_last_heartbeat=token, outcome=wedged)
        expected = DelegationStatus.FAILED if attempt == t.lease.max_attempts else None
        status = (await only_delegation(t)).status
        if expected is None:
            assert item.state is WorkState.QUEUED
            assert status is DelegationStatus.PENDING
        else:
            assert item.state is WorkState.STOPPED
            assert status is expected


async def test_an_explicitly_recorded_result_is_not_overwritten_when_the_item_stops(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    token = await claim_delegate(t, delegation)
    await t.cp.record_delegation_result(
        delegation.id, status=DelegationStatus.COMPLETED, response_preview="early"
    )
    await t.cp.stop(
        delegation.work_id,
        expected_last_heartbeat=token,
        outcome=Outcome(OutcomeStatus.FAILED, result="late"),
    )
    found = await only_delegation(t)
    assert (found.status, found.response_preview) == (DelegationStatus.COMPLETED, "early")


async def test_stopping_an_ordinary_item_records_no_delegation(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    source_id = (await t.cp.list_work(state=WorkState.ACTIVE))[0].id
    await t.cp.stop(source_id, outcome=Outcome(OutcomeStatus.COMPLETED, result="done"))
    assert (await only_delegation(t)).status is DelegationStatus.PENDING
    assert (await t.cp.get(delegation.work_id)).state is WorkState.QUEUED


async def test_a_collected_result_leaves_the_uncollected_list_only(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    first = await delegated(t, "one")
    source_id = first.source_id
    second = await t.cp.delegate(source_id, "two")
    for delegation in (first, second):
        await t.cp.record_delegation_result(delegation.id, status=DelegationStatus.COMPLETED)
    t.clock.advance(3)
    collected = await t.cp.collect_delegation(first.id)
    assert collected.collected_at is not None
    assert [d.id for d in await t.cp.list_delegations(SOURCE_WORKER)] == [first.id, second.id]
    remaining = await t.cp.list_delegations(SOURCE_WORKER, uncollected=True)
    assert [d.id for d in remaining] == [second.id]
    done = await t.cp.list_delegations(
        SOURCE_WORKER, status=DelegationStatus.COMPLETED, uncollected=True
    )
    assert [d.id for d in done] == [second.id]


async def test_collecting_twice_keeps_the_first_collection_time(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    await t.cp.record_delegation_result(delegation.id, status=DelegationStatus.FAILED)
    first = await t.cp.collect_delegation(delegation.id)
    t.clock.advance(10)
    again = await t.cp.collect_delegation(delegation.id)
    assert again.collected_at == first.collected_at


async def test_a_pending_delegation_cannot_be_collected_and_an_unknown_one_is_not_found(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    delegation = await delegated(t)
    with pytest.raises(Conflict):
        await t.cp.collect_delegation(delegation.id)
    with pytest.raises(NotFound):
        await t.cp.collect_delegation("dlg_missing")
    assert (await only_delegation(t)).collected_at is None
