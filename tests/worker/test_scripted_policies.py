"""The in-memory `ScriptedControlPlane` follows the store's policy rules (DESIGN §4.2).

Retry with backoff (the same pure rule as the store), dead letter, the history of
every ended attempt (expiries too), priority then age, ``not_before``, idempotency
keys and the queue cap; all under MockClock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from supervisor.controlplane import (
    NO_HEARTBEAT,
    Outcome,
    OutcomeStatus,
    QueueFull,
    RetryPolicy,
    WorkState,
)
from supervisor.testing import ScriptedControlPlane

FAILED = Outcome(OutcomeStatus.FAILED, exit_code=1)


async def run_once(cp: ScriptedControlPlane, outcome: Outcome) -> str:
    item = await cp.poll(worker_id="w1")
    assert item is not None
    await cp.ack(item.id, worker_id="w1")
    beat = await cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    await cp.stop(item.id, expected_last_heartbeat=beat.last_heartbeat, outcome=outcome)
    return item.id


async def test_a_failure_is_retried_after_its_backoff_then_dead_lettered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane()
    submitted = await cp.submit("flaky", retry=RetryPolicy(max_attempts=2, backoff=10.0))
    await run_once(cp, FAILED)
    again = await cp.get(submitted.id)
    assert (again.state, again.attempts, len(again.history)) == (WorkState.QUEUED, 1, 1)
    assert again.not_before is not None
    assert 5.0 <= again.not_before - trio.current_time() <= 10.0
    assert await cp.poll(worker_id="w1") is None  # not before its backoff
    await trio.sleep(10.0)
    await run_once(cp, FAILED)
    dead = await cp.get(submitted.id)
    assert (dead.state, dead.dead, len(dead.history)) == (WorkState.STOPPED, True, 2)
    assert [i.id for i in await cp.list_work(dead=True)] == [submitted.id]


async def test_priority_then_age_and_not_before_decide_the_claim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane()
    old = await cp.submit("old")
    later = await cp.submit("later", priority=5, delay=30.0)
    urgent = await cp.submit("urgent", priority=5)
    order = []
    for _ in range(2):
        item = await cp.poll(worker_id="w1")
        assert item is not None
        order.append(item.id)
    assert order == [urgent.id, old.id]
    assert await cp.poll(worker_id="w1") is None
    await trio.sleep(30.0)
    item = await cp.poll(worker_id="w1")
    assert item is not None and item.id == later.id


async def test_keys_and_the_queue_cap(autojump_clock: trio.testing.MockClock) -> None:
    cp = ScriptedControlPlane(max_queue_depth=1)
    first = await cp.submit("one", key="k")
    again = await cp.submit("one again", key="k")
    assert (again.id, again.duplicate) == (first.id, True)
    with pytest.raises(QueueFull) as refused:
        await cp.submit("two")
    assert (refused.value.depth, refused.value.retry_after) == (1, 5)


async def test_a_lease_expiry_is_kept_in_the_history(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane(default_ttl=10.0, max_attempts=2)
    submitted = await cp.submit("abandoned")
    for _ in range(2):
        item = await cp.poll(worker_id="w1", reclaim_older_than_ms=0)
        assert item is not None
        await cp.ack(item.id, worker_id="w1")
        await cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
        await trio.sleep(11.0)
    ended = await cp.get(submitted.id)
    assert (ended.state, ended.dead) == (WorkState.STOPPED, True)
    assert [a.outcome.reason for a in ended.history] == ["lease expired"] * 2
    assert ended.history[0].retry_at is not None and ended.history[1].retry_at is None
