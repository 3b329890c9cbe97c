"""Batch claims (``claim``): a poll and an ack of several items in one transaction.

Run on every plane that offers it: the embedded SQLite store (threaded and
inline) and PostgreSQL called directly. The HTTP client keeps to ``poll`` and
``ack`` (a lost answer must not strand a batch), which the last test pins down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import trio
from controlplane.conformance import IMPLEMENTATIONS, LEASE_POLICY, STATUS_POLICY

from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    Conflict,
    EmbeddedControlPlane,
    FencingConflict,
    Outcome,
    OutcomeStatus,
    WorkItem,
    WorkState,
)
from supervisor.controlplane._protocol import ClaimsBatches, ClaimsLeases
from supervisor.testing import ManualClock

W1, W2 = "worker-1", "worker-2"
BATCH_PLANES = ("embedded", "embedded-inline", "postgres")


@pytest.fixture(params=BATCH_PLANES)
async def target(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[EmbeddedControlPlane, ManualClock]]:
    clock = ManualClock()
    factory = IMPLEMENTATIONS[request.param]
    async with factory(tmp_path, clock, LEASE_POLICY, STATUS_POLICY) as (cp, _store):
        assert isinstance(cp, ClaimsBatches)
        yield cast(EmbeddedControlPlane, cp), clock


async def test_a_claim_hands_out_up_to_limit_items_in_claim_order_acknowledged(
    target: tuple[EmbeddedControlPlane, ManualClock],
) -> None:
    cp, clock = target
    low = [await cp.submit(f"low {n}") for n in range(3)]
    clock.advance(1.0)
    high = await cp.submit("urgent", priority=5)
    items = await cp.claim(worker_id=W1, limit=3)
    assert [i.id for i in items] == [high.id, low[0].id, low[1].id]
    assert {i.state for i in items} == {WorkState.STARTING}
    assert {i.worker_id for i in items} == {W1}
    assert all(i.acknowledged_at == pytest.approx(clock.now) for i in items)
    secrets = [i.secret for i in items]
    assert None not in secrets and len(set(secrets)) == 3
    # Each is a real claim: the first beat grants its lease; a second ack is refused.
    beat = await cp.heartbeat(items[0].id, expected_last_heartbeat=NO_HEARTBEAT)
    assert beat.state is WorkState.ACTIVE
    with pytest.raises(Conflict):
        await cp.ack(items[1].id, worker_id=W1)
    rest = await cp.claim(worker_id=W2, limit=5)
    assert [i.id for i in rest] == [low[2].id]
    assert await cp.claim(worker_id=W2, limit=5) == []


async def test_a_claim_skips_delayed_items_and_never_hands_one_item_twice(
    target: tuple[EmbeddedControlPlane, ManualClock],
) -> None:
    cp, clock = target
    later = await cp.submit("later", delay=30.0)
    now = [await cp.submit(f"now {n}") for n in range(20)]
    got: list[str] = []

    async def claimer(worker_id: str) -> None:
        while batch := await cp.claim(worker_id=worker_id, limit=3):
            got.extend(i.id for i in batch)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(claimer, f"w{n}")
    assert sorted(got) == sorted(i.id for i in now)
    assert len(got) == len(set(got))
    clock.advance(30.0)
    assert [i.id for i in await cp.claim(worker_id=W1, limit=3)] == [later.id]


async def test_a_claimed_item_never_beaten_comes_back_after_its_ack_lease(
    target: tuple[EmbeddedControlPlane, ManualClock],
) -> None:
    cp, clock = target
    item = await cp.submit("stranded")
    (claimed,) = await cp.claim(worker_id=W1, limit=4)
    clock.advance(LEASE_POLICY.default_ttl + 1)
    (again,) = await cp.claim(worker_id=W2, limit=4)
    assert again.id == item.id == claimed.id
    assert (again.worker_id, again.attempts) == (W2, 1)
    assert again.secret != claimed.secret


@pytest.mark.parametrize("limit", [0, -1, 101, True])
async def test_a_claim_refuses_a_limit_outside_1_to_100(
    target: tuple[EmbeddedControlPlane, ManualClock], limit: int
) -> None:
    cp, _ = target
    await cp.submit("kept")
    with pytest.raises(BadRequest, match="limit"):
        await cp.claim(worker_id=W1, limit=limit)
    assert (await cp.stats()).depth == 1  # nothing was claimed


@pytest.mark.parametrize("leased", [False, True])
async def test_an_empty_claim_waits_for_block_ms_and_wakes_on_a_submit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, leased: bool
) -> None:
    async with EmbeddedControlPlane(tmp_path / "cp.sqlite3", threaded=False) as cp:
        asked_at: list[float] = []

        async def claim(block_ms: int) -> list[WorkItem]:
            if not leased:
                return await cp.claim(worker_id=W1, limit=2, block_ms=block_ms)
            claims = await cp.claim_leased(worker_id=W1, limit=2, block_ms=block_ms)
            asked_at.extend(c.asked_at for c in claims)
            return [c.item for c in claims]

        started = trio.current_time()
        assert await claim(500) == []
        assert trio.current_time() - started == pytest.approx(0.5, abs=0.01)

        async def submit_soon() -> None:
            await trio.sleep(0.1)
            await cp.submit("arrives")

        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            nursery.start_soon(submit_soon)
            items = await claim(5_000)
        assert [i.data.prompt for i in items] == ["arrives"]
        assert trio.current_time() - started < 0.5
        if leased:  # dated from the look that found the item, not from the first look
            assert asked_at and asked_at[0] >= started + 0.1


def test_the_http_client_does_not_claim_in_batches() -> None:
    from supervisor.controlplane import HttpControlPlane

    assert not hasattr(HttpControlPlane, "claim")


async def test_a_claim_routes_by_the_claimers_labels_like_a_poll(
    target: tuple[EmbeddedControlPlane, ManualClock],
) -> None:
    cp, _clock = target
    gpu = await cp.submit("gpu", labels=["gpu"])
    both = await cp.submit("gpu and repo", labels=["gpu", "repo:foo"], priority=3)
    cpu = await cp.submit("cpu", labels=["cpu"])
    plain = await cp.submit("plain")
    unlabelled = await cp.claim(worker_id=W1, limit=5)
    assert [i.id for i in unlabelled] == [plain.id]
    routed = await cp.claim(worker_id=W2, limit=5, labels=["repo:foo", "gpu"])
    assert [i.id for i in routed] == [both.id, gpu.id]
    assert await cp.claim(worker_id=W2, limit=5, labels=["gpu"]) == []
    with pytest.raises(BadRequest, match="bad label"):
        await cp.claim(worker_id=W2, limit=5, labels=["a b"])
    last = await cp.claim(worker_id=W2, limit=5, labels=["cpu"])
    assert [i.id for i in last] == [cpu.id]


# ---------------------------------------------------------------- leased claims


async def test_a_leased_claim_grants_each_first_lease_in_the_claim(
    target: tuple[EmbeddedControlPlane, ManualClock],
) -> None:
    """What a claim and then a first heartbeat of each item would have done, in one call."""
    cp, clock = target
    assert isinstance(cp, ClaimsLeases)
    items = [await cp.submit(f"job {n}") for n in range(3)]
    asked = trio.current_time()
    claims = await cp.claim_leased(worker_id=W1, limit=2, desired_ttl_seconds=30.0)
    assert [c.item.id for c in claims] == [items[0].id, items[1].id]
    for claim in claims:
        assert claim.asked_at >= asked
        assert claim.item.state is WorkState.ACTIVE
        assert claim.item.worker_id == W1
        assert claim.item.secret
        assert claim.item.started_at == pytest.approx(clock.now)
        assert claim.heartbeat.state is WorkState.ACTIVE and claim.heartbeat.lease_extended
        assert claim.heartbeat.ttl_seconds == 30.0
    assert claims[0].heartbeat.last_heartbeat != claims[1].heartbeat.last_heartbeat
    first = claims[0]
    # The lease is fenced by the granted token: a first beat is stale, the token renews.
    with pytest.raises(FencingConflict):
        await cp.heartbeat(first.item.id, expected_last_heartbeat=NO_HEARTBEAT)
    beat = await cp.heartbeat(first.item.id, expected_last_heartbeat=first.heartbeat.last_heartbeat)
    assert beat.lease_extended and beat.last_heartbeat != first.heartbeat.last_heartbeat
    # ...and the stop with the token of the second records its outcome.
    second = claims[1]
    stopped = await cp.stop(
        second.item.id,
        expected_last_heartbeat=second.heartbeat.last_heartbeat,
        outcome=Outcome(OutcomeStatus.COMPLETED, result="done"),
    )
    assert stopped.state is WorkState.STOPPED
    assert (await cp.stats()).depth == 1  # the third is still queued


async def test_a_leased_claim_clamps_the_ttl_and_lets_an_unrenewed_lease_expire(
    target: tuple[EmbeddedControlPlane, ManualClock],
) -> None:
    cp, clock = target
    item = await cp.submit("job")
    (claim,) = await cp.claim_leased(worker_id=W1, limit=1, desired_ttl_seconds=10_000.0)
    assert claim.heartbeat.ttl_seconds == LEASE_POLICY.max_ttl
    clock.advance(LEASE_POLICY.max_ttl + 1)
    again = await cp.get(item.id)
    assert (again.state, again.attempts) == (WorkState.QUEUED, 1)  # an expiry, as any lease's
    with pytest.raises(BadRequest, match="ttl"):
        await cp.claim_leased(worker_id=W1, limit=1, desired_ttl_seconds=-1.0)
    assert (await cp.get(item.id)).state is WorkState.QUEUED  # the refused claim took nothing
