"""The control-plane conformance suite (DESIGN §4), run against every implementation.

Each test names the line of the item lifecycle or the row of the worker
status table it checks. Time is a `ManualClock` shared with the store, so
expiry and ageing are exact and instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    Conflict,
    DelegationStatus,
    FencingConflict,
    Gone,
    NotFound,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    WorkerStatus,
    WorkItem,
    WorkState,
)

if TYPE_CHECKING:
    from controlplane.conformance import ConformanceTarget

W1 = "worker-1"
W2 = "worker-2"


def approx(value: float | None) -> object:
    """Times may travel as ISO-8601 text; a millisecond is exact enough."""
    assert value is not None
    return pytest.approx(value, abs=1e-3)


async def claimed(t: ConformanceTarget, *, worker: str = W1, prompt: str = "do it") -> WorkItem:
    """Submit, poll and ack one item: it is ``starting`` and bound to ``worker``."""
    item = await t.cp.submit(prompt)
    polled = await t.cp.poll(worker_id=worker)
    assert polled is not None
    assert polled.id == item.id
    return await t.cp.ack(item.id, worker_id=worker)


async def leased(
    t: ConformanceTarget, *, worker: str = W1, ttl: float | None = None
) -> tuple[WorkItem, str]:
    """An ``active`` item with a confirmed lease, and its current token."""
    item = await claimed(t, worker=worker)
    beat = await t.cp.heartbeat(
        item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=ttl
    )
    assert beat.state is WorkState.ACTIVE
    return item, beat.last_heartbeat


# --- submit -------------------------------------------------------------------------


async def test_submit_queues_an_item_with_every_field_of_the_contract(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("hello", metadata={"origin": "test"})
    assert item.type == "work"
    assert item.environment_id == t.cp.environment_id == "default"
    assert item.state is WorkState.QUEUED
    assert item.data.type == "session"
    assert item.data.prompt == "hello"
    assert item.data.id
    assert item.metadata == {"origin": "test"}
    assert item.attempts == 0
    assert item.created_at == approx(t.clock.now)
    assert item.worker_id is None
    assert item.acknowledged_at is None
    assert item.started_at is None
    assert item.latest_heartbeat_at is None
    assert item.stop_requested_at is None
    assert item.stopped_at is None
    assert item.outcome is None
    assert item.secret is None
    assert await t.cp.get(item.id) == item


async def test_submit_uses_the_given_session_id_and_refuses_a_duplicate(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("a", session_id="sess-1")
    assert item.data.id == "sess-1"
    with pytest.raises(Conflict):
        await t.cp.submit("b", session_id="sess-1")
    assert [i.id for i in await t.cp.list_work()] == [item.id]


@pytest.mark.parametrize("prompt", ["", "   \n"])
async def test_submit_refuses_an_empty_prompt_and_changes_nothing(
    control_plane: ConformanceTarget, prompt: str
) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match="prompt"):
        await t.cp.submit(prompt)
    assert list(await t.cp.list_work()) == []


async def test_submit_refuses_metadata_that_is_not_text(control_plane: ConformanceTarget) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match="metadata"):
        await t.cp.submit("x", metadata={"n": 1})  # type: ignore[dict-item]
    assert list(await t.cp.list_work()) == []


# --- poll ---------------------------------------------------------------------------


async def test_poll_on_an_empty_queue_returns_none(control_plane: ConformanceTarget) -> None:
    assert await control_plane.cp.poll(worker_id=W1) is None


async def test_poll_hands_out_the_oldest_queued_item_first(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    ids = []
    for n in range(4):
        ids.append((await t.cp.submit(f"p{n}")).id)
        t.clock.advance(1)
    got = [await t.cp.poll(worker_id=W1) for _ in range(4)]
    assert [i.id for i in got if i is not None] == ids
    assert await t.cp.poll(worker_id=W1) is None


async def test_poll_gives_the_session_secret_to_the_claimer_and_nowhere_else(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None
    assert polled.secret
    assert polled.secret not in repr(polled)
    assert (await t.cp.get(item.id)).secret is None
    assert all(i.secret is None for i in await t.cp.list_work())
    assert (await t.cp.ack(item.id, worker_id=W1)).secret is None


async def test_a_handed_out_item_is_not_handed_out_again_within_the_reclaim_window(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    assert (await t.cp.poll(worker_id=W1)) is not None
    t.clock.advance(t.lease.reclaim_older_than_ms / 1000 - 0.5)
    assert await t.cp.poll(worker_id=W2) is None
    assert await t.cp.poll(worker_id=W1) is None
    assert (await t.cp.get(item.id)).state is WorkState.QUEUED


async def test_an_unacked_item_is_handed_out_again_after_the_reclaim_window(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    first = await t.cp.poll(worker_id=W1)
    assert first is not None
    t.clock.advance(t.lease.reclaim_older_than_ms / 1000)
    again = await t.cp.poll(worker_id=W2)
    assert again is not None
    assert again.id == item.id
    assert again.secret != first.secret
    # the hand-out moved to W2: the first poller can no longer ack it
    with pytest.raises(Conflict):
        await t.cp.ack(item.id, worker_id=W1)
    assert (await t.cp.ack(item.id, worker_id=W2)).worker_id == W2


async def test_reclaim_older_than_ms_sets_the_window_of_each_poll(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    assert await t.cp.poll(worker_id=W1) is not None
    t.clock.advance(2.0)
    assert await t.cp.poll(worker_id=W2, reclaim_older_than_ms=2500) is None
    again = await t.cp.poll(worker_id=W2, reclaim_older_than_ms=2000)
    assert again is not None
    assert again.id == item.id


async def test_poll_hands_out_only_queued_items(control_plane: ConformanceTarget) -> None:
    t = control_plane
    await leased(t)
    t.clock.advance(t.lease.reclaim_older_than_ms / 1000 + 1)
    assert await t.cp.poll(worker_id=W2, reclaim_older_than_ms=1) is None


async def test_a_long_poll_on_an_empty_queue_waits_for_block_ms_then_returns_none(
    control_plane: ConformanceTarget,
) -> None:
    start = trio.current_time()
    assert await control_plane.cp.poll(worker_id=W1, block_ms=60) is None
    assert trio.current_time() - start >= 0.05


async def test_a_long_poll_receives_an_item_submitted_while_it_waits(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    got: list[WorkItem | None] = []

    async def poller() -> None:
        got.append(await t.cp.poll(worker_id=W1, block_ms=5000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller)
        await trio.sleep(0.05)
        item = await t.cp.submit("late")
    assert [g.id for g in got if g is not None] == [item.id]


async def test_poll_refuses_a_negative_block_ms(control_plane: ConformanceTarget) -> None:
    with pytest.raises(BadRequest, match="block_ms"):
        await control_plane.cp.poll(worker_id=W1, block_ms=-1)


# --- ack ----------------------------------------------------------------------------


async def test_ack_moves_queued_to_starting_and_binds_the_worker(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await t.cp.submit("x")
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None
    t.clock.advance(1)
    acked = await t.cp.ack(polled.id, worker_id=W1)
    assert acked.state is WorkState.STARTING
    assert acked.worker_id == W1
    assert acked.acknowledged_at == approx(t.clock.now)
    assert (await t.cp.get(polled.id)).state is WorkState.STARTING


async def test_a_second_ack_is_a_conflict(control_plane: ConformanceTarget) -> None:
    t = control_plane
    item = await claimed(t)
    with pytest.raises(Conflict):
        await t.cp.ack(item.id, worker_id=W1)
    with pytest.raises(Conflict):
        await t.cp.ack(item.id, worker_id=W2)
    assert (await t.cp.get(item.id)).worker_id == W1


async def test_ack_by_a_worker_the_item_was_not_handed_to_is_a_conflict(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    with pytest.raises(Conflict):
        await t.cp.ack(item.id, worker_id=W1)  # never handed out
    assert await t.cp.poll(worker_id=W1) is not None
    with pytest.raises(Conflict):
        await t.cp.ack(item.id, worker_id=W2)
    assert (await t.cp.get(item.id)).state is WorkState.QUEUED


async def test_an_ack_without_a_worker_binds_the_worker_the_poll_named(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    assert await t.cp.poll(worker_id=W1) is not None
    acked = await t.cp.ack(item.id)
    assert (acked.state, acked.worker_id) == (WorkState.STARTING, W1)


async def test_an_anonymous_poll_is_bound_by_the_ack_or_left_unbound(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    named, unnamed = await t.cp.submit("named at ack"), await t.cp.submit("never named")
    first = await t.cp.poll()
    assert first is not None and first.id == named.id
    acked = await t.cp.ack(named.id, worker_id=W2)
    assert (acked.state, acked.worker_id) == (WorkState.STARTING, W2)
    polled = await t.cp.poll()
    assert polled is not None and polled.id == unnamed.id
    acked = await t.cp.ack(unnamed.id)
    assert (acked.state, acked.worker_id) == (WorkState.STARTING, None)
    with pytest.raises(Conflict):
        await t.cp.ack(unnamed.id)  # a second ack, anonymous or not


# --- heartbeat ----------------------------------------------------------------------


async def test_the_first_heartbeat_activates_the_item_with_the_default_lease(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await claimed(t)
    t.clock.advance(2)
    beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert beat.state is WorkState.ACTIVE
    assert beat.lease_extended is True
    assert beat.ttl_seconds == t.lease.default_ttl == 60.0
    assert beat.last_heartbeat not in ("", NO_HEARTBEAT)
    got = await t.cp.get(item.id)
    assert got.state is WorkState.ACTIVE
    assert got.started_at == approx(t.clock.now)
    assert got.latest_heartbeat_at == approx(t.clock.now)


@pytest.mark.parametrize(
    ("desired", "granted"),
    [(0.001, 1.0), (1.0, 1.0), (45.5, 45.5), (3600.0, 3600.0), (1e7, 3600.0)],
)
async def test_the_store_clamps_the_desired_ttl_to_its_bounds(
    control_plane: ConformanceTarget, desired: float, granted: float
) -> None:
    t = control_plane
    item = await claimed(t)
    beat = await t.cp.heartbeat(
        item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=desired
    )
    assert beat.ttl_seconds == pytest.approx(granted)


@pytest.mark.parametrize("ttl", [-1.0, 0.0])
async def test_a_non_positive_ttl_is_a_bad_request_and_changes_nothing(
    control_plane: ConformanceTarget, ttl: float
) -> None:
    t = control_plane
    item = await claimed(t)
    with pytest.raises(BadRequest, match="ttl"):
        await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=ttl)
    assert (await t.cp.get(item.id)).state is WorkState.STARTING


async def test_every_heartbeat_returns_a_new_token_even_when_the_clock_stands_still(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t)
    tokens = [token]
    for _ in range(10):
        beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=tokens[-1])
        assert beat.lease_extended
        tokens.append(beat.last_heartbeat)
    assert len(set(tokens)) == len(tokens)


async def test_a_stale_token_is_a_fencing_conflict(control_plane: ConformanceTarget) -> None:
    t = control_plane
    item, old = await leased(t)
    new = (await t.cp.heartbeat(item.id, expected_last_heartbeat=old)).last_heartbeat
    for stale in (old, NO_HEARTBEAT, "made-up"):
        with pytest.raises(FencingConflict):
            await t.cp.heartbeat(item.id, expected_last_heartbeat=stale)
    # the failed attempts changed nothing: the current token still works
    assert (await t.cp.heartbeat(item.id, expected_last_heartbeat=new)).lease_extended


async def test_a_stale_token_of_the_same_lease_learns_the_current_one(
    control_plane: ConformanceTarget,
) -> None:
    """The holder one answer behind (a beat processed, its answer lost) is told the token.

    So a finished session still reports its outcome; a 412 for a token that is
    not of this lease names nothing.
    """
    t = control_plane
    item, old = await leased(t)
    new = (await t.cp.heartbeat(item.id, expected_last_heartbeat=old)).last_heartbeat
    for call in ("heartbeat", "stop", "requeue"):
        with pytest.raises(FencingConflict) as caught:
            if call == "heartbeat":
                await t.cp.heartbeat(item.id, expected_last_heartbeat=old)
            elif call == "stop":
                await t.cp.stop(item.id, force=True, expected_last_heartbeat=old)
            else:
                await t.cp.requeue(item.id, expected_last_heartbeat=old)
        assert caught.value.current_token == new, call
        assert new not in str(caught.value), "a token never goes into a message"
    for stranger in (NO_HEARTBEAT, "made-up", "hb.7.1.1.x"):
        with pytest.raises(FencingConflict) as caught:
            await t.cp.stop(item.id, force=True, expected_last_heartbeat=stranger)
        assert caught.value.current_token is None, stranger
    done = await t.cp.stop(item.id, force=True, expected_last_heartbeat=new)
    assert done.state is WorkState.STOPPED


async def test_the_token_of_an_earlier_lease_never_learns_the_new_holders(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, old = await leased(t, ttl=30)
    t.clock.advance(30)
    assert await t.cp.poll(worker_id=W2) is not None
    await t.cp.ack(item.id, worker_id=W2)
    await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    with pytest.raises(FencingConflict) as caught:
        await t.cp.stop(item.id, force=True, expected_last_heartbeat=old)
    assert caught.value.current_token is None
    assert (await t.cp.get(item.id)).state is WorkState.ACTIVE


@pytest.mark.parametrize("token", ["h\u00e9", "\u2603\u2603", "x\U0001f600"])
async def test_a_non_ascii_token_is_a_fencing_conflict_not_a_crash(
    control_plane: ConformanceTarget, token: str
) -> None:
    """Tokens are compared as bytes: ``compare_digest`` on non-ASCII ``str`` would raise."""
    t = control_plane
    item, current = await leased(t)
    with pytest.raises(FencingConflict):
        await t.cp.heartbeat(item.id, expected_last_heartbeat=token)
    with pytest.raises(FencingConflict):
        await t.cp.stop(item.id, force=True, expected_last_heartbeat=token)
    with pytest.raises(FencingConflict):
        await t.cp.requeue(item.id, expected_last_heartbeat=token)
    assert (await t.cp.heartbeat(item.id, expected_last_heartbeat=current)).lease_extended


async def test_a_heartbeat_before_ack_is_a_conflict(control_plane: ConformanceTarget) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    assert await t.cp.poll(worker_id=W1) is not None
    with pytest.raises(Conflict):
        await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert (await t.cp.get(item.id)).state is WorkState.QUEUED


async def test_a_heartbeat_renews_the_lease_from_the_time_of_the_beat(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t, ttl=60)
    t.clock.advance(50)
    token = (await t.cp.heartbeat(item.id, expected_last_heartbeat=token)).last_heartbeat
    t.clock.advance(59.5)  # 109.5 s after the first beat, 59.5 s after the renewal
    assert (await t.cp.get(item.id)).state is WorkState.ACTIVE
    t.clock.advance(0.5)  # exactly ttl after the renewal: expired
    assert (await t.cp.get(item.id)).state is WorkState.QUEUED


async def test_a_lease_renewed_in_time_never_expires(control_plane: ConformanceTarget) -> None:
    t = control_plane
    item, token = await leased(t, ttl=10)
    for _ in range(20):
        t.clock.advance(9)
        token = (await t.cp.heartbeat(item.id, expected_last_heartbeat=token)).last_heartbeat
    got = await t.cp.get(item.id)
    assert got.state is WorkState.ACTIVE
    assert got.attempts == 0


# --- lease expiry -----------------------------------------------------------------------


async def test_an_expired_lease_puts_the_item_back_to_queued_with_one_more_attempt(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, _ = await leased(t, ttl=30)
    t.clock.advance(30)
    got = await t.cp.get(item.id)
    assert got.state is WorkState.QUEUED
    assert got.attempts == 1
    assert got.worker_id is None
    assert got.outcome is None


async def test_the_token_of_an_expired_lease_is_stale_for_heartbeat_and_stop(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t, ttl=30)
    t.clock.advance(31)
    with pytest.raises(FencingConflict):
        await t.cp.heartbeat(item.id, expected_last_heartbeat=token)
    with pytest.raises(FencingConflict):
        await t.cp.stop(item.id, force=True, expected_last_heartbeat=token)
    assert (await t.cp.get(item.id)).state is WorkState.QUEUED


async def test_an_expired_item_is_claimable_again_at_once_by_another_worker(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, old = await leased(t, ttl=30)
    t.clock.advance(30)
    again = await t.cp.poll(worker_id=W2)
    assert again is not None
    assert again.id == item.id
    assert again.attempts == 1
    await t.cp.ack(item.id, worker_id=W2)
    beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert beat.state is WorkState.ACTIVE
    # the first holder's token stays stale under the new lease
    with pytest.raises(FencingConflict):
        await t.cp.heartbeat(item.id, expected_last_heartbeat=old)
    assert (await t.cp.get(item.id)).worker_id == W2


@pytest.mark.parametrize("call", ["poll", "heartbeat", "get", "list", "stats", "stop"])
async def test_expiry_is_evaluated_by_every_call_that_looks_at_items(
    control_plane: ConformanceTarget, call: str
) -> None:
    t = control_plane
    item, token = await leased(t, ttl=30)
    t.clock.advance(30)
    if call == "poll":
        polled = await t.cp.poll(worker_id=W2)
        assert polled is not None
        assert (polled.id, polled.attempts) == (item.id, 1)
    elif call == "heartbeat":
        with pytest.raises(FencingConflict):
            await t.cp.heartbeat(item.id, expected_last_heartbeat=token)
    elif call == "get":
        assert (await t.cp.get(item.id)).state is WorkState.QUEUED
    elif call == "list":
        assert [i.state for i in await t.cp.list_work()] == [WorkState.QUEUED]
    elif call == "stats":
        stats = await t.cp.stats()
        assert (stats.depth, stats.pending) == (1, 0)
    else:
        stopped = await t.cp.stop(item.id, force=True)  # operator stop of the requeued item
        assert (stopped.state, stopped.attempts) == (WorkState.STOPPED, 1)


async def test_after_max_attempts_the_item_stops_as_failed_lease_expired(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    assert t.lease.max_attempts == 3
    item = await t.cp.submit("doomed")
    for attempt in range(3):
        polled = await t.cp.poll(worker_id=W1)
        assert polled is not None
        assert (polled.id, polled.attempts) == (item.id, attempt)
        await t.cp.ack(item.id, worker_id=W1)
        await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=5)
        t.clock.advance(5)
    got = await t.cp.get(item.id)
    assert got.state is WorkState.STOPPED
    assert got.attempts == 3
    assert got.outcome is not None
    assert got.outcome.status is OutcomeStatus.FAILED
    assert got.outcome.reason == "lease expired"
    assert got.stopped_at is not None
    assert await t.cp.poll(worker_id=W1) is None


async def test_an_acked_item_whose_worker_never_beats_comes_back_after_the_default_ttl(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await claimed(t)
    t.clock.advance(t.lease.default_ttl - 1)
    assert (await t.cp.get(item.id)).state is WorkState.STARTING
    t.clock.advance(1)
    got = await t.cp.get(item.id)
    assert (got.state, got.attempts) == (WorkState.QUEUED, 1)


async def test_a_stopping_item_whose_lease_expires_is_stopped_not_requeued(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, _ = await leased(t, ttl=30)
    await t.cp.request_stop(item.id)
    t.clock.advance(30)
    got = await t.cp.get(item.id)
    assert got.state is WorkState.STOPPED
    assert got.outcome is not None
    assert got.outcome.status is OutcomeStatus.CANCELLED
    assert await t.cp.poll(worker_id=W2) is None


# --- request-stop -----------------------------------------------------------------------


async def test_request_stop_moves_active_to_stopping_and_the_next_heartbeat_says_so(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t)
    requested = await t.cp.request_stop(item.id)
    assert requested.state is WorkState.STOPPING
    assert requested.stop_requested_at == approx(t.clock.now)
    t.clock.advance(10)
    beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=token)
    assert beat.state is WorkState.STOPPING
    assert beat.lease_extended is True
    assert beat.ttl_seconds > 0
    # the lease really was extended: it outlives the original deadline
    t.clock.advance(55)
    assert (await t.cp.get(item.id)).state is WorkState.STOPPING


async def test_request_stop_on_a_starting_item_is_answered_by_its_first_heartbeat(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await claimed(t)
    assert (await t.cp.request_stop(item.id)).state is WorkState.STOPPING
    beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert beat.state is WorkState.STOPPING


async def test_request_stop_on_a_queued_item_cancels_it_at_once(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("never mind")
    stopped = await t.cp.request_stop(item.id)
    assert stopped.state is WorkState.STOPPED
    assert stopped.outcome is not None
    assert stopped.outcome.status is OutcomeStatus.CANCELLED
    assert await t.cp.poll(worker_id=W1) is None


async def test_request_stop_twice_is_harmless_and_on_a_stopped_item_is_a_conflict(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t)
    first = await t.cp.request_stop(item.id)
    assert await t.cp.request_stop(item.id) == first
    await t.cp.stop(item.id, expected_last_heartbeat=token)
    with pytest.raises(Conflict):
        await t.cp.request_stop(item.id)


# --- stop -----------------------------------------------------------------------------


async def test_stop_with_the_current_token_records_the_outcome(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t)
    t.clock.advance(3)
    outcome = Outcome(OutcomeStatus.COMPLETED, exit_code=0, result="done", duration=2.5)
    stopped = await t.cp.stop(item.id, force=True, expected_last_heartbeat=token, outcome=outcome)
    assert stopped.state is WorkState.STOPPED
    assert stopped.outcome == outcome
    assert stopped.stopped_at == approx(t.clock.now)
    assert await t.cp.get(item.id) == stopped


async def test_stopping_a_stopped_item_is_a_conflict(control_plane: ConformanceTarget) -> None:
    t = control_plane
    item, token = await leased(t)
    outcome = Outcome(OutcomeStatus.COMPLETED)
    await t.cp.stop(item.id, expected_last_heartbeat=token, outcome=outcome)
    with pytest.raises(Conflict):
        await t.cp.stop(item.id, expected_last_heartbeat=token)
    with pytest.raises(Conflict):
        await t.cp.stop(item.id, force=True)
    assert (await t.cp.get(item.id)).outcome == outcome


async def test_stop_with_a_stale_token_is_a_fencing_conflict_and_changes_nothing(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, old = await leased(t)
    await t.cp.heartbeat(item.id, expected_last_heartbeat=old)
    with pytest.raises(FencingConflict):
        await t.cp.stop(item.id, force=True, expected_last_heartbeat=old)
    assert (await t.cp.get(item.id)).state is WorkState.ACTIVE


async def test_stop_without_a_token_is_an_operator_force_stop(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t)
    outcome = Outcome(OutcomeStatus.CANCELLED, reason="operator")
    stopped = await t.cp.stop(item.id, force=True, outcome=outcome)
    assert (stopped.state, stopped.outcome) == (WorkState.STOPPED, outcome)
    # the holder learns it on its next heartbeat, which no longer extends the lease
    beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=token)
    assert beat.state is WorkState.STOPPED
    assert beat.lease_extended is False


@pytest.mark.parametrize("state", ["queued", "starting", "active", "stopping"])
async def test_stop_moves_every_live_state_to_stopped(
    control_plane: ConformanceTarget, state: str
) -> None:
    t = control_plane
    if state == "queued":
        item = await t.cp.submit("x")
    elif state == "starting":
        item = await claimed(t)
    else:
        item, _ = await leased(t)
        if state == "stopping":
            await t.cp.request_stop(item.id)
    assert (await t.cp.get(item.id)).state == state
    stopped = await t.cp.stop(item.id, force=True)
    assert stopped.state is WorkState.STOPPED
    assert stopped.outcome is not None  # a stop without an outcome records one anyway
    assert stopped.outcome.status is OutcomeStatus.CANCELLED


async def test_the_holder_may_stop_before_its_first_heartbeat_with_no_heartbeat(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await claimed(t)
    outcome = Outcome(OutcomeStatus.FAILED, reason="workspace setup failed")
    stopped = await t.cp.stop(item.id, expected_last_heartbeat=NO_HEARTBEAT, outcome=outcome)
    assert (stopped.state, stopped.outcome) == (WorkState.STOPPED, outcome)


# --- requeue (the holder gives an item back) ----------------------------------------------

WEDGED = Outcome(OutcomeStatus.WEDGED, reason="Error: Control request timeout: initialize")


async def test_requeue_puts_an_active_item_back_unbound_with_one_more_attempt(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t)
    got = await t.cp.requeue(item.id, expected_last_heartbeat=token, outcome=WEDGED)
    assert got.state is WorkState.QUEUED
    assert got.attempts == 1
    assert got.worker_id is None
    assert got.outcome is None  # an item only gets an outcome when it stops
    assert (got.acknowledged_at, got.started_at, got.latest_heartbeat_at) == (None, None, None)
    assert await t.cp.get(item.id) == got


async def test_a_requeued_item_is_claimable_at_once_by_another_worker(
    control_plane: ConformanceTarget,
) -> None:
    """No reclaim window and no ttl to wait for: the next poll gets it."""
    t = control_plane
    item, token = await leased(t)
    await t.cp.requeue(item.id, expected_last_heartbeat=token, outcome=WEDGED)
    again = await t.cp.poll(worker_id=W2)
    assert again is not None
    assert (again.id, again.attempts) == (item.id, 1)
    assert again.secret
    await t.cp.ack(item.id, worker_id=W2)
    beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert beat.state is WorkState.ACTIVE


async def test_requeue_voids_the_holders_token(control_plane: ConformanceTarget) -> None:
    t = control_plane
    item, token = await leased(t)
    await t.cp.requeue(item.id, expected_last_heartbeat=token)
    with pytest.raises(FencingConflict):
        await t.cp.heartbeat(item.id, expected_last_heartbeat=token)
    with pytest.raises(FencingConflict):
        await t.cp.stop(item.id, expected_last_heartbeat=token)
    with pytest.raises(FencingConflict):
        await t.cp.requeue(item.id, expected_last_heartbeat=token)
    assert (await t.cp.get(item.id)).state is WorkState.QUEUED


async def test_the_holder_may_requeue_before_its_first_heartbeat_with_no_heartbeat(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await claimed(t)
    got = await t.cp.requeue(item.id, expected_last_heartbeat=NO_HEARTBEAT, outcome=WEDGED)
    assert (got.state, got.attempts) == (WorkState.QUEUED, 1)


async def test_requeue_with_a_stale_token_is_a_fencing_conflict_and_changes_nothing(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, old = await leased(t)
    await t.cp.heartbeat(item.id, expected_last_heartbeat=old)
    with pytest.raises(FencingConflict):
        await t.cp.requeue(item.id, expected_last_heartbeat=old, outcome=WEDGED)
    got = await t.cp.get(item.id)
    assert (got.state, got.attempts, got.worker_id) == (WorkState.ACTIVE, 0, W1)


async def test_nobody_holds_a_queued_item_so_requeueing_it_is_a_fencing_conflict(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x")
    with pytest.raises(FencingConflict):
        await t.cp.requeue(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert (await t.cp.get(item.id)).attempts == 0


async def test_requeueing_a_stopped_item_is_a_conflict(control_plane: ConformanceTarget) -> None:
    t = control_plane
    item, token = await leased(t)
    await t.cp.stop(
        item.id, expected_last_heartbeat=token, outcome=Outcome(OutcomeStatus.COMPLETED)
    )
    with pytest.raises(Conflict):
        await t.cp.requeue(item.id, expected_last_heartbeat=token, outcome=WEDGED)
    assert (await t.cp.get(item.id)).outcome == Outcome(OutcomeStatus.COMPLETED)


async def test_requeueing_a_stopping_item_stops_it_with_the_outcome(
    control_plane: ConformanceTarget,
) -> None:
    """An operator's stop request wins over another try."""
    t = control_plane
    item, token = await leased(t)
    await t.cp.request_stop(item.id)
    got = await t.cp.requeue(item.id, expected_last_heartbeat=token, outcome=WEDGED)
    assert (got.state, got.outcome) == (WorkState.STOPPED, WEDGED)
    assert await t.cp.poll(worker_id=W2) is None


async def test_a_requeue_on_the_last_attempt_stops_the_item_with_the_outcome(
    control_plane: ConformanceTarget,
) -> None:
    """A task that wedges every runtime does not circulate forever."""
    t = control_plane
    assert t.lease.max_attempts == 3
    item = await t.cp.submit("wedges everything")
    for attempt in range(3):
        polled = await t.cp.poll(worker_id=W1)
        assert polled is not None
        assert (polled.id, polled.attempts) == (item.id, attempt)
        await t.cp.ack(item.id, worker_id=W1)
        beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
        got = await t.cp.requeue(
            item.id, expected_last_heartbeat=beat.last_heartbeat, outcome=WEDGED
        )
    assert (got.state, got.attempts, got.outcome) == (WorkState.STOPPED, 3, WEDGED)
    assert got.stopped_at == approx(t.clock.now)
    assert await t.cp.poll(worker_id=W1) is None


async def test_requeue_of_an_unknown_item_is_not_found(control_plane: ConformanceTarget) -> None:
    with pytest.raises(NotFound):
        await control_plane.cp.requeue("work_missing", expected_last_heartbeat=NO_HEARTBEAT)


async def test_a_long_poll_receives_an_item_requeued_while_it_waits(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item, token = await leased(t)
    got: list[WorkItem | None] = []

    async def poller() -> None:
        got.append(await t.cp.poll(worker_id=W2, block_ms=5000))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller)
        await trio.sleep(0.05)
        await t.cp.requeue(item.id, expected_last_heartbeat=token, outcome=WEDGED)
    assert [g.id for g in got if g is not None] == [item.id]


# --- unknown ids and inspection ---------------------------------------------------------


@pytest.mark.parametrize("call", ["get", "ack", "heartbeat", "stop", "request_stop"])
async def test_unknown_work_ids_are_not_found(control_plane: ConformanceTarget, call: str) -> None:
    cp = control_plane.cp
    with pytest.raises(NotFound):
        if call == "get":
            await cp.get("work_missing")
        elif call == "ack":
            await cp.ack("work_missing", worker_id=W1)
        elif call == "heartbeat":
            await cp.heartbeat("work_missing", expected_last_heartbeat=NO_HEARTBEAT)
        elif call == "stop":
            await cp.stop("work_missing", force=True)
        else:
            await cp.request_stop("work_missing")


async def test_list_work_pages_through_items_oldest_first(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    ids = []
    for n in range(5):
        ids.append((await t.cp.submit(f"p{n}")).id)
        t.clock.advance(1)
    pages = [[i.id for i in await t.cp.list_work(limit=2, page=p)] for p in range(4)]
    assert pages == [ids[0:2], ids[2:4], ids[4:5], []]


async def test_list_work_filters_by_state(control_plane: ConformanceTarget) -> None:
    t = control_plane
    active, _ = await leased(t)
    queued = await t.cp.submit("waiting")
    assert [i.id for i in await t.cp.list_work(state=WorkState.QUEUED)] == [queued.id]
    assert [i.id for i in await t.cp.list_work(state=WorkState.ACTIVE)] == [active.id]
    assert list(await t.cp.list_work(state=WorkState.STOPPED)) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"state": "bogus"}, {"limit": 0}, {"limit": 1001}, {"limit": -5}, {"page": -1}],
)
async def test_list_work_refuses_bad_arguments(
    control_plane: ConformanceTarget, kwargs: dict[str, object]
) -> None:
    with pytest.raises(BadRequest):
        await control_plane.cp.list_work(**kwargs)  # type: ignore[arg-type]


async def test_stats_count_depth_pending_the_oldest_queued_and_recent_pollers(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    empty = await t.cp.stats()
    assert (empty.depth, empty.pending, empty.oldest_queued_at) == (0, 0, None)
    await leased(t, worker=W1)  # one pending (and W1 polled)
    t.clock.advance(5)
    oldest = await t.cp.submit("a")
    t.clock.advance(5)
    await t.cp.submit("b")
    assert await t.cp.poll(worker_id=W2) is not None  # handed out, still queued
    stats = await t.cp.stats()
    assert stats.depth == 2
    assert stats.pending == 1
    assert stats.oldest_queued_at == approx(oldest.created_at)
    assert stats.workers_polling == 2
    t.clock.advance(t.lease.polling_window)
    assert (await t.cp.stats()).workers_polling == 0


async def test_nothing_is_ever_deleted(control_plane: ConformanceTarget) -> None:
    t = control_plane
    a, token = await leased(t)
    await t.cp.stop(a.id, expected_last_heartbeat=token, outcome=Outcome(OutcomeStatus.COMPLETED))
    b = await t.cp.submit("cancelled")
    await t.cp.request_stop(b.id)
    c, _ = await leased(t, ttl=5)
    t.clock.advance(1000)
    items = {i.id: i.state for i in await t.cp.list_work()}
    assert items == {a.id: WorkState.STOPPED, b.id: WorkState.STOPPED, c.id: WorkState.QUEUED}


# --- workers: the status table ----------------------------------------------------------


def report(
    worker: str = W1, *, error_rate: float = 0.0, runtime_state: str | None = None, **fields: object
) -> PresenceReport:
    return PresenceReport(
        worker_id=worker,
        error_rate=error_rate,
        runtime_state=runtime_state,
        **fields,  # type: ignore[arg-type]
    )


async def test_a_registered_worker_is_provisioning(control_plane: ConformanceTarget) -> None:
    t = control_plane
    record = await t.cp.register_worker(W1, metadata={"capacity": 2})
    assert record.status is WorkerStatus.PROVISIONING
    assert record.registered_at == approx(t.clock.now)
    assert record.last_heartbeat_at is None
    assert record.runtime_metadata == {"capacity": 2}
    assert (await t.cp.get_worker(W1)).status is WorkerStatus.PROVISIONING


async def test_provisioning_goes_online_on_the_first_heartbeat(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await t.cp.register_worker(W1)
    t.clock.advance(10)
    record = await t.cp.worker_heartbeat(report())
    assert record.status is WorkerStatus.ONLINE
    assert record.last_heartbeat_at == approx(t.clock.now)


async def test_provisioning_fails_without_a_heartbeat_within_provision_timeout(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await t.cp.register_worker(W1)
    t.clock.advance(t.status.provision_timeout - 0.5)
    assert (await t.cp.get_worker(W1)).status is WorkerStatus.PROVISIONING
    t.clock.advance(0.5)
    assert (await t.cp.get_worker(W1)).status is WorkerStatus.FAILED
    assert [w.status for w in await t.cp.list_workers()] == [WorkerStatus.FAILED]


async def test_online_degrades_on_a_wedged_heartbeat(control_plane: ConformanceTarget) -> None:
    t = control_plane
    await t.cp.worker_heartbeat(report())
    record = await t.cp.worker_heartbeat(
        report(runtime_state="wedged", sample_error="control request timeout")
    )
    assert record.status is WorkerStatus.DEGRADED
    assert record.runtime_state == "wedged"
    assert record.sample_error == "control request timeout"


@pytest.mark.parametrize(
    ("rate", "status"),
    [(0.0, WorkerStatus.ONLINE), (0.49, WorkerStatus.ONLINE), (0.5, WorkerStatus.DEGRADED)],
)
async def test_online_degrades_at_an_error_rate_of_one_half(
    control_plane: ConformanceTarget, rate: float, status: WorkerStatus
) -> None:
    t = control_plane
    await t.cp.worker_heartbeat(report())
    assert (await t.cp.worker_heartbeat(report(error_rate=rate))).status is status


async def test_online_stays_online_between_the_two_thresholds(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await t.cp.worker_heartbeat(report())
    for rate in (0.1, 0.3, 0.49):
        assert (await t.cp.worker_heartbeat(report(error_rate=rate))).status is (
            WorkerStatus.ONLINE
        )


async def test_degraded_recovers_only_below_one_tenth_with_runtime_state_cleared(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await t.cp.worker_heartbeat(report())
    assert (await t.cp.worker_heartbeat(report(error_rate=0.7))).status is WorkerStatus.DEGRADED
    for still_degraded in (
        report(error_rate=0.3),  # inside the band: stays degraded
        report(error_rate=0.1),  # the boundary is not below it
        report(error_rate=0.0, runtime_state="wedged"),  # runtime state not cleared
    ):
        record = await t.cp.worker_heartbeat(still_degraded)
        assert record.status is WorkerStatus.DEGRADED, still_degraded
    assert (await t.cp.worker_heartbeat(report(error_rate=0.05))).status is WorkerStatus.ONLINE


@pytest.mark.parametrize("before", [WorkerStatus.ONLINE, WorkerStatus.DEGRADED])
async def test_online_and_degraded_go_offline_after_offline_after_seen_on_reads(
    control_plane: ConformanceTarget, before: WorkerStatus
) -> None:
    t = control_plane
    rate = 0.0 if before is WorkerStatus.ONLINE else 0.9
    assert (await t.cp.worker_heartbeat(report(error_rate=rate))).status is before
    t.clock.advance(t.status.offline_after - 0.5)
    assert (await t.cp.get_worker(W1)).status is before
    t.clock.advance(0.5)
    assert (await t.cp.get_worker(W1)).status is WorkerStatus.OFFLINE
    assert [w.status for w in await t.cp.list_workers()] == [WorkerStatus.OFFLINE]


async def test_offline_is_seen_by_list_workers_alone(control_plane: ConformanceTarget) -> None:
    t = control_plane
    await t.cp.worker_heartbeat(report(W1))
    t.clock.advance(60)
    await t.cp.worker_heartbeat(report(W2))
    t.clock.advance(30)
    statuses = {w.worker_id: w.status for w in await t.cp.list_workers()}
    assert statuses == {W1: WorkerStatus.OFFLINE, W2: WorkerStatus.ONLINE}


@pytest.mark.parametrize(
    ("beat", "status"),
    [
        ({"error_rate": 0.3}, WorkerStatus.ONLINE),
        ({"error_rate": 0.5}, WorkerStatus.DEGRADED),
        ({"runtime_state": "wedged"}, WorkerStatus.DEGRADED),
    ],
)
async def test_offline_comes_back_on_a_heartbeat_judged_afresh(
    control_plane: ConformanceTarget, beat: dict[str, object], status: WorkerStatus
) -> None:
    t = control_plane
    await t.cp.worker_heartbeat(report(error_rate=0.9))  # degraded before going silent
    t.clock.advance(t.status.offline_after)
    assert (await t.cp.get_worker(W1)).status is WorkerStatus.OFFLINE
    assert (await t.cp.worker_heartbeat(report(**beat))).status is status  # type: ignore[arg-type]


async def test_a_deregistered_worker_is_removed_for_good(control_plane: ConformanceTarget) -> None:
    t = control_plane
    await t.cp.worker_heartbeat(report())
    removed = await t.cp.deregister_worker(W1)
    assert removed.status is WorkerStatus.REMOVED
    with pytest.raises(Gone):
        await t.cp.worker_heartbeat(report())
    with pytest.raises(Gone):
        await t.cp.register_worker(W1)
    t.clock.advance(10_000)
    assert (await t.cp.get_worker(W1)).status is WorkerStatus.REMOVED
    assert [w.status for w in await t.cp.list_workers()] == [WorkerStatus.REMOVED]
    assert (await t.cp.deregister_worker(W1)).status is WorkerStatus.REMOVED


async def test_a_presence_heartbeat_stores_every_reported_field(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    sent = report(
        error_rate=0.25,
        sample_error="boom",
        active_tasks=2,
        current_task="work_1",
        uptime_seconds=12.5,
        status="busy",
        runtime_metadata={"version": "1.0", "capabilities": ["git"]},
    )
    record = await t.cp.worker_heartbeat(sent)
    stored = await t.cp.get_worker(W1)
    assert record == stored
    assert stored.error_rate == pytest.approx(0.25)
    assert stored.sample_error == "boom"
    assert stored.active_tasks == 2
    assert stored.current_task == "work_1"
    assert stored.uptime_seconds == pytest.approx(12.5)
    assert stored.runtime_state is None
    assert stored.runtime_metadata == {"version": "1.0", "capabilities": ["git"]}


async def test_a_heartbeat_from_an_unknown_worker_registers_it(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    record = await t.cp.worker_heartbeat(report(W2))
    assert record.status is WorkerStatus.ONLINE
    assert [w.worker_id for w in await t.cp.list_workers()] == [W2]


@pytest.mark.parametrize("rate", [-0.1, 1.5])
async def test_a_presence_report_with_an_impossible_error_rate_is_a_bad_request(
    control_plane: ConformanceTarget, rate: float
) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match="error_rate"):
        await t.cp.worker_heartbeat(report(error_rate=rate))
    assert list(await t.cp.list_workers()) == []


async def test_unknown_workers_are_not_found(control_plane: ConformanceTarget) -> None:
    with pytest.raises(NotFound):
        await control_plane.cp.get_worker("nobody")
    with pytest.raises(NotFound):
        await control_plane.cp.deregister_worker("nobody")


# --- delegations --------------------------------------------------------------------------


async def test_delegate_queues_a_linked_item_attributed_to_the_source_worker(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    source, _ = await leased(t, worker=W1)
    delegation = await t.cp.delegate(source.data.id, "write the tests")
    assert delegation.source_id == source.data.id
    assert delegation.task == "write the tests"
    assert delegation.status is DelegationStatus.PENDING
    assert delegation.worker_id == W1
    assert delegation.created_at == approx(t.clock.now)
    item = await t.cp.get(delegation.work_id)
    assert item.state is WorkState.QUEUED
    assert item.data.prompt == "write the tests"
    assert item.metadata["delegation_id"] == delegation.id
    assert item.metadata["source_id"] == source.data.id
    polled = await t.cp.poll(worker_id=W2)
    assert polled is not None
    assert polled.id == delegation.work_id


async def test_delegate_refuses_an_unknown_session_and_an_empty_task(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    with pytest.raises(NotFound):
        await t.cp.delegate("sess-missing", "task")
    source, _ = await leased(t)
    with pytest.raises(BadRequest, match="task"):
        await t.cp.delegate(source.data.id, "  ")
    assert len(await t.cp.list_work()) == 1


async def test_list_delegations_by_worker_and_status(control_plane: ConformanceTarget) -> None:
    t = control_plane
    s1, _ = await leased(t, worker=W1)
    s2, _ = await leased(t, worker=W2)
    d1 = await t.cp.delegate(s1.data.id, "one")
    d2 = await t.cp.delegate(s1.data.id, "two")
    d3 = await t.cp.delegate(s2.data.id, "three")
    await t.cp.record_delegation_result(d2.id, status=DelegationStatus.COMPLETED)
    assert [d.id for d in await t.cp.list_delegations(W1)] == [d1.id, d2.id]
    assert [d.id for d in await t.cp.list_delegations(W2)] == [d3.id]
    pending = await t.cp.list_delegations(W1, status=DelegationStatus.PENDING)
    assert [d.id for d in pending] == [d1.id]
    done = await t.cp.list_delegations(W1, status=DelegationStatus.COMPLETED)
    assert [d.id for d in done] == [d2.id]
    assert list(await t.cp.list_delegations("worker-without-delegations")) == []


async def test_a_delegation_result_is_recorded_once(control_plane: ConformanceTarget) -> None:
    t = control_plane
    source, _ = await leased(t)
    delegation = await t.cp.delegate(source.data.id, "task")
    t.clock.advance(7)
    done = await t.cp.record_delegation_result(
        delegation.id, status=DelegationStatus.FAILED, response_preview="it broke"
    )
    assert done.status is DelegationStatus.FAILED
    assert done.response_preview == "it broke"
    assert done.completed_at == approx(t.clock.now)
    with pytest.raises(Conflict):
        await t.cp.record_delegation_result(delegation.id, status=DelegationStatus.COMPLETED)
    assert list(await t.cp.list_delegations(W1)) == [done]


async def test_a_delegation_result_needs_a_known_id_and_a_final_status(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    with pytest.raises(NotFound):
        await t.cp.record_delegation_result("dlg_missing", status=DelegationStatus.COMPLETED)
    source, _ = await leased(t)
    delegation = await t.cp.delegate(source.data.id, "task")
    with pytest.raises(BadRequest):
        await t.cp.record_delegation_result(delegation.id, status=DelegationStatus.PENDING)
    assert (await t.cp.list_delegations(W1))[0].status is DelegationStatus.PENDING


# --- messages -----------------------------------------------------------------------------


async def test_messages_and_notifications_are_kept_in_order(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x", session_id="sess-a")
    m1 = await t.cp.post_message("sess-a", "first")
    t.clock.advance(1)
    n1 = await t.cp.notify("sess-a", "results are in")
    m2 = await t.cp.post_message("sess-a", "second")
    assert (m1.kind, n1.kind, m2.kind) == ("message", "notification", "message")
    assert m1.session_id == item.data.id == "sess-a"
    assert n1.created_at == approx(t.clock.now)
    assert list(await t.cp.list_messages("sess-a")) == [m1, n1, m2]
    assert len({m1.id, n1.id, m2.id}) == 3


async def test_messages_need_a_known_session_and_a_body(control_plane: ConformanceTarget) -> None:
    t = control_plane
    with pytest.raises(NotFound):
        await t.cp.post_message("sess-missing", "hi")
    with pytest.raises(NotFound):
        await t.cp.notify("sess-missing", "hi")
    with pytest.raises(NotFound):
        await t.cp.list_messages("sess-missing")
    await t.cp.submit("x", session_id="sess-a")
    with pytest.raises(BadRequest, match="body"):
        await t.cp.post_message("sess-a", "")
    assert list(await t.cp.list_messages("sess-a")) == []
