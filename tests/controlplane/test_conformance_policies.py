"""Conformance lines of the work policies (DESIGN §4.2), run on every control plane.

Retry of failed sessions with backoff, the attempt history, the dead letter and
``retry``; the environment policies: backpressure (``max_queue_depth``), retention
(the purge sweep) and the default retry policy; lease expiries in the history.
Time is the `ManualClock` shared with the store, so a backoff is exact: an item is
not claimable a moment before its ``not_before``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    Conflict,
    NotFound,
    Outcome,
    OutcomeStatus,
    QueueFull,
    RetryPolicy,
    WorkItem,
    WorkState,
)
from supervisor.controlplane._http import HttpControlPlane

if TYPE_CHECKING:
    from controlplane.conformance import ConformanceTarget

W1 = "worker-1"
FAILED = Outcome(OutcomeStatus.FAILED, exit_code=1, reason="agent exited 1")


def approx(value: float | None) -> object:
    assert value is not None
    return pytest.approx(value, abs=1e-3)


async def run_once(t: ConformanceTarget, item_id: str, outcome: Outcome) -> WorkItem:
    """Claim ``item_id`` (it must be claimable now), beat once, and stop it with ``outcome``."""
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and polled.id == item_id
    await t.cp.ack(item_id, worker_id=W1)
    beat = await t.cp.heartbeat(item_id, expected_last_heartbeat=NO_HEARTBEAT)
    return await t.cp.stop(item_id, expected_last_heartbeat=beat.last_heartbeat, outcome=outcome)


async def test_a_failed_session_with_a_retry_policy_is_queued_again_after_its_backoff(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    policy = RetryPolicy(max_attempts=3, backoff=10.0, backoff_max=60.0)
    item = await t.cp.submit("flaky", retry=policy)
    assert item.retry == policy and item.history == () and not item.dead
    failed_at = t.clock.now
    again = await run_once(t, item.id, FAILED)
    assert (again.state, again.attempts, again.outcome, again.dead) == (
        WorkState.QUEUED,
        1,
        None,
        False,
    )
    # Equal jitter: at least half the first step, at most all of it.
    assert again.not_before is not None
    assert failed_at + 5.0 - 1e-3 <= again.not_before <= failed_at + 10.0 + 1e-3
    (first,) = again.history
    assert (first.attempt, first.outcome, first.worker_id) == (1, FAILED, W1)
    assert first.ended_at == approx(failed_at)
    assert first.retry_at == approx(again.not_before)
    t.clock.advance(again.not_before - t.clock.now - 0.01)
    assert await t.cp.poll(worker_id=W1) is None
    t.clock.advance(0.02)
    second = await run_once(t, item.id, FAILED)
    assert second.attempts == 2
    # The second wait is drawn from the doubled step: [10, 20] seconds.
    assert second.not_before is not None
    assert t.clock.now + 10.0 - 1e-3 <= second.not_before <= t.clock.now + 20.0 + 1e-3


async def test_a_retried_item_that_completes_keeps_every_attempt_in_its_history(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("flaky", retry=RetryPolicy(max_attempts=3, backoff=1.0))
    for _ in range(2):
        again = await run_once(t, item.id, FAILED)
        assert again.not_before is not None
        t.clock.advance(again.not_before - t.clock.now + 0.01)
    done = await run_once(t, item.id, Outcome(OutcomeStatus.COMPLETED, result="ok"))
    assert (done.state, done.dead, done.attempts) == (WorkState.STOPPED, False, 2)
    assert [a.outcome.status for a in done.history] == ["failed", "failed", "completed"]
    assert [a.attempt for a in done.history] == [1, 2, 3]
    assert done.history[0].retry_at is not None and done.history[2].retry_at is None
    assert done.history[0].retry_at <= done.history[1].ended_at
    assert await t.cp.list_work(dead=True) == []


async def test_out_of_attempts_the_item_lands_in_dead_letter_and_retry_brings_it_back(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("doomed", retry=RetryPolicy(max_attempts=2, backoff=1.0))
    other = await t.cp.submit("fine")
    again = await run_once(t, item.id, FAILED)
    assert again.not_before is not None
    t.clock.advance(2.0)
    last = Outcome(OutcomeStatus.FAILED, exit_code=3, reason="still broken")
    dead = await run_once(t, item.id, last)
    assert (dead.state, dead.dead, dead.outcome, dead.attempts) == (
        WorkState.STOPPED,
        True,
        last,
        2,
    )
    assert [a.outcome for a in dead.history] == [FAILED, last]
    assert [i.id for i in await t.cp.list_work(dead=True)] == [item.id]
    assert [i.id for i in await t.cp.list_work(state=WorkState.QUEUED)] == [other.id]
    back = await t.cp.retry(item.id)
    assert (back.state, back.dead, back.attempts, back.outcome, back.not_before) == (
        WorkState.QUEUED,
        False,
        0,
        None,
        None,
    )
    assert back.stopped_at is None and back.history == dead.history
    assert await t.cp.list_work(dead=True) == []
    # Fresh attempts: it fails once more and is retried, not dead at once. It keeps
    # its place in the queue (its creation time), ahead of the younger item.
    requeued = await run_once(t, item.id, FAILED)
    assert (requeued.state, requeued.attempts) == (WorkState.QUEUED, 1)


async def test_non_retryable_outcomes_are_final_at_once_and_not_dead_letter(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    policy = RetryPolicy(max_attempts=5, backoff=1.0, non_retryable_exit_codes=(2, 64))
    listed = await t.cp.submit("usage error", retry=policy)
    stopped = await run_once(t, listed.id, Outcome(OutcomeStatus.FAILED, exit_code=64))
    assert (stopped.state, stopped.dead, len(stopped.history)) == (WorkState.STOPPED, False, 1)
    for status in (OutcomeStatus.CANCELLED, OutcomeStatus.TIMEOUT, OutcomeStatus.COMPLETED):
        item = await t.cp.submit(f"ends {status}", retry=policy)
        ended = await run_once(t, item.id, Outcome(status))
        assert (ended.state, ended.dead, ended.outcome) == (
            WorkState.STOPPED,
            False,
            Outcome(status),
        )
    assert await t.cp.list_work(dead=True) == []


async def test_without_a_retry_policy_a_failure_is_final_and_recorded_in_history(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("once")
    assert item.retry is None
    ended = await run_once(t, item.id, FAILED)
    assert (ended.state, ended.dead, ended.outcome, ended.attempts) == (
        WorkState.STOPPED,
        False,
        FAILED,
        0,
    )
    assert [a.outcome for a in ended.history] == [FAILED]


async def test_a_failure_after_a_stop_request_is_not_retried(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("asked to stop", retry=RetryPolicy(max_attempts=3))
    await t.cp.poll(worker_id=W1)
    await t.cp.ack(item.id, worker_id=W1)
    beat = await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    await t.cp.request_stop(item.id)
    ended = await t.cp.stop(item.id, expected_last_heartbeat=beat.last_heartbeat, outcome=FAILED)
    assert (ended.state, ended.dead) == (WorkState.STOPPED, False)


async def test_an_items_max_attempts_also_bounds_its_lease_expiries(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("one shot", retry=RetryPolicy(max_attempts=1))
    await t.cp.poll(worker_id=W1)
    await t.cp.ack(item.id, worker_id=W1)
    await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=5)
    t.clock.advance(5)
    got = await t.cp.get(item.id)
    assert (got.state, got.dead, got.attempts) == (WorkState.STOPPED, True, 1)
    assert got.outcome is not None and got.outcome.reason == "lease expired"
    assert [i.id for i in await t.cp.list_work(dead=True)] == [item.id]


async def test_retry_answers_409_on_a_live_item_and_404_on_an_unknown_one(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("live")
    with pytest.raises(Conflict):
        await t.cp.retry(item.id)
    with pytest.raises(NotFound):
        await t.cp.retry("work-nope")


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(max_attempts=0),
        RetryPolicy(max_attempts=101),
        RetryPolicy(backoff=-1.0),
        RetryPolicy(backoff=math.inf),
        RetryPolicy(backoff_max=1e9),
        RetryPolicy(non_retryable_exit_codes=(300,)),
        RetryPolicy(non_retryable_exit_codes=tuple(range(65))),
    ],
    ids=["zero", "too-many", "negative", "infinite", "cap-too-long", "code", "too-many-codes"],
)
async def test_a_bad_retry_policy_is_refused_and_queues_nothing(
    control_plane: ConformanceTarget, policy: RetryPolicy
) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match="retry"):
        await t.cp.submit("never", retry=policy)
    assert await t.cp.list_work() == []


# --- priority and not_before -----------------------------------------------------------


async def test_a_higher_priority_overtakes_fifo_and_fifo_holds_within_a_priority(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    low = await t.cp.submit("low, oldest")
    first_high = await t.cp.submit("high, first", priority=5)
    negative = await t.cp.submit("below default", priority=-3)
    second_high = await t.cp.submit("high, second", priority=5)
    low_again = await t.cp.submit("low, younger")
    assert (first_high.priority, negative.priority, low.priority) == (5, -3, 0)
    order = []
    while (polled := await t.cp.poll(worker_id=W1)) is not None:
        order.append(polled.id)
    assert order == [first_high.id, second_high.id, low.id, low_again.id, negative.id]


async def test_a_delayed_item_is_not_claimed_before_its_time_and_others_pass_it(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    submitted_at = t.clock.now
    later = await t.cp.submit("in a minute", delay=60.0, priority=9)
    assert later.not_before == approx(submitted_at + 60.0)
    now = await t.cp.submit("now")
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and polled.id == now.id
    await t.cp.ack(now.id, worker_id=W1)
    t.clock.advance(59.9)
    assert await t.cp.poll(worker_id=W1) is None
    t.clock.advance(0.1)
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and polled.id == later.id


async def test_not_before_takes_a_time(control_plane: ConformanceTarget) -> None:
    t = control_plane
    at = t.clock.now + 3600.0
    item = await t.cp.submit("at nine", not_before=at)
    assert item.not_before == approx(at)
    t.clock.advance(3599.0)
    assert await t.cp.poll(worker_id=W1) is None
    t.clock.advance(1.0)
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and polled.id == item.id
    past = await t.cp.submit("already due", not_before=t.clock.now - 10)
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and polled.id == past.id


@pytest.mark.parametrize(
    "options",
    [
        {"priority": 1001},
        {"priority": -1001},
        {"delay": -1.0},
        {"delay": math.nan},
        {"delay": 31 * 86_400.0},
        {"delay": 5.0, "not_before": 1_700_000_000.0},
        {"not_before": math.inf},
    ],
    ids=["high", "low", "negative-delay", "nan-delay", "long-delay", "both", "inf-time"],
)
async def test_a_bad_priority_or_delay_is_refused_and_queues_nothing(
    control_plane: ConformanceTarget, options: dict[str, float]
) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match=r"priority|delay|not_before"):
        await t.cp.submit("never", **options)  # type: ignore[arg-type]
    assert await t.cp.list_work() == []


# --- idempotency keys ---------------------------------------------------------------------


async def test_a_second_submit_with_a_key_returns_the_first_item_and_queues_nothing(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    first = await t.cp.submit("build release 1.2", key="release-1.2")
    assert (first.key, first.duplicate) == ("release-1.2", False)
    again = await t.cp.submit("a different prompt", key="release-1.2", priority=9)
    assert again.duplicate
    assert (again.id, again.data, again.priority) == (first.id, first.data, 0)
    other = await t.cp.submit("build release 1.3", key="release-1.3")
    assert other.id != first.id and not other.duplicate
    unkeyed = [await t.cp.submit("no key"), await t.cp.submit("no key")]
    assert unkeyed[0].id != unkeyed[1].id
    assert len(await t.cp.list_work()) == 4
    # The key holds whatever became of the first item, stopped included.
    await t.cp.request_stop(first.id)
    still = await t.cp.submit("build release 1.2", key="release-1.2")
    assert (still.id, still.state, still.duplicate) == (first.id, WorkState.STOPPED, True)
    assert len(await t.cp.list_work()) == 4


@pytest.mark.parametrize("key", ["", "   ", "k" * 201], ids=["empty", "blank", "too-long"])
async def test_a_bad_key_is_refused_and_queues_nothing(
    control_plane: ConformanceTarget, key: str
) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match="key"):
        await t.cp.submit("never", key=key)
    assert await t.cp.list_work() == []


# --- environment policies ------------------------------------------------------------


async def configure(t: ConformanceTarget, **changes: int | float | None) -> None:
    """Set the environment's policies through the store, as its owner does."""
    await trio.to_thread.run_sync(
        lambda: t.store.configure_environment(t.cp.environment_id, changes, now=t.clock.now)
    )


async def test_a_submit_beyond_max_queue_depth_is_refused_and_queues_nothing(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await configure(t, max_queue_depth=2)
    first = await t.cp.submit("one")
    await t.cp.submit("two")
    with pytest.raises(QueueFull) as refused:
        await t.cp.submit("three")
    full = refused.value
    assert (full.environment_id, full.depth, full.max_queue_depth) == ("default", 2, 2)
    assert full.status_code == 429 and full.retry_after == 5
    assert str(full) == (
        "queue full: environment default holds 2 queued items (max_queue_depth 2); retry in 5 s"
    )
    assert (await t.cp.stats()).depth == 2
    if isinstance(t.cp, HttpControlPlane):
        # On the wire: 429, Retry-After, and the JSON error shape with the figures.
        from controlplane.conformance import HTTP_KEY

        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{t.cp.base_url}/v1/environments/default/work",
                json={"data": {"type": "session", "prompt": "four"}},
                headers={"Authorization": f"Bearer {HTTP_KEY}"},
            )
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == "5"
        error = answer.json()["error"]
        assert error["type"] == "queue_full" and "max_queue_depth 2" in error["message"]
        assert (error["depth"], error["max_queue_depth"], error["retry_after"]) == (2, 2, 5)
    # A claimed item leaves the queue: there is room for one more.
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and polled.id == first.id
    await t.cp.ack(first.id, worker_id=W1)
    assert (await t.cp.submit("three")).state is WorkState.QUEUED
    with pytest.raises(QueueFull):
        await t.cp.submit("four")
    # Lifting the cap lets submits through again.
    await configure(t, max_queue_depth=None)
    await t.cp.submit("four")
    assert (await t.cp.stats()).depth == 3


async def test_a_key_already_used_returns_its_item_even_when_the_queue_is_full(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await configure(t, max_queue_depth=1)
    first = await t.cp.submit("keyed", key="k-1")
    again = await t.cp.submit("keyed", key="k-1")
    assert (again.id, again.duplicate) == (first.id, True)
    with pytest.raises(QueueFull):
        await t.cp.submit("another key", key="k-2")
    assert [i.id for i in await t.cp.list_work()] == [first.id]


async def test_concurrent_submits_at_the_edge_never_exceed_the_cap(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await configure(t, max_queue_depth=5)
    for n in range(4):
        await t.cp.submit(f"filler {n}")
    accepted: list[str] = []
    refused: list[QueueFull] = []

    async def one(n: int) -> None:
        try:
            accepted.append((await t.cp.submit(f"racer {n}")).id)
        except QueueFull as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(one, n)
    assert (len(accepted), len(refused)) == (1, 7)
    # The store itself, from several threads at once (PostgreSQL: several connections).
    await configure(t, max_queue_depth=7)

    def direct(n: int) -> str | None:
        try:
            return t.store.submit(t.cp.environment_id, f"thread {n}", now=t.clock.now).id
        except QueueFull:
            return None

    results: list[str | None] = []

    async def threaded(n: int) -> None:
        results.append(await trio.to_thread.run_sync(direct, n))

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(threaded, n)
    assert sum(r is not None for r in results) == 2
    assert (await t.cp.stats()).depth == 7


async def test_the_environment_retry_policy_applies_unless_the_item_brings_its_own(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await configure(t, max_attempts=2, backoff=10.0, backoff_max=20.0)
    plain = await t.cp.submit("uses the default")
    assert plain.retry == RetryPolicy(max_attempts=2, backoff=10.0, backoff_max=20.0)
    failed_at = t.clock.now
    again = await run_once(t, plain.id, FAILED)
    assert (again.state, again.attempts) == (WorkState.QUEUED, 1)
    assert again.not_before is not None
    assert failed_at + 5.0 - 1e-3 <= again.not_before <= failed_at + 10.0 + 1e-3
    t.clock.advance(10.0)
    last = await run_once(t, plain.id, FAILED)
    assert (last.state, last.dead, len(last.history)) == (WorkState.STOPPED, True, 2)
    # A per-item policy overrides the default whole.
    own = RetryPolicy(max_attempts=1)
    mine = await t.cp.submit("brings its own", retry=own)
    assert mine.retry == own
    ended = await run_once(t, mine.id, FAILED)
    assert (ended.state, ended.dead) == (WorkState.STOPPED, True)
    # Without a default, a failure is final again.
    await configure(t, max_attempts=None, backoff=None, backoff_max=None)
    bare = await t.cp.submit("no policy")
    assert bare.retry is None
    assert (await run_once(t, bare.id, FAILED)).dead is False


async def test_bad_environment_settings_are_refused_and_change_nothing(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    await configure(t, max_queue_depth=3)
    for bad in (
        {"max_queue_depth": 0},
        {"max_queue_depth": True},
        {"retention": -1.0},
        {"retention": math.inf},
        {"max_attempts": 0},
        {"backoff": math.nan},
        {"backoff_max": 1e9},
        {"priority": 1},
    ):
        with pytest.raises(BadRequest):
            await configure(t, **bad)
    settings = await trio.to_thread.run_sync(
        lambda: t.store.environment_settings(t.cp.environment_id, now=t.clock.now)
    )
    assert settings.max_queue_depth == 3 and settings.retention is None


async def test_a_lease_expiry_adds_an_attempt_to_the_history(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("abandoned")
    ttl = t.lease.default_ttl
    for attempt in range(1, t.lease.max_attempts + 1):
        polled = await t.cp.poll(worker_id=W1, reclaim_older_than_ms=0)
        assert polled is not None and polled.id == item.id
        await t.cp.ack(item.id, worker_id=W1)
        await t.cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
        started = t.clock.now
        t.clock.advance(ttl + 1)
        got = await t.cp.get(item.id)
        assert len(got.history) == attempt
        entry = got.history[-1]
        assert entry.attempt == attempt and entry.worker_id == W1
        assert entry.outcome == Outcome(OutcomeStatus.FAILED, reason="lease expired")
        assert entry.started_at == approx(started)
        assert entry.ended_at == approx(started + ttl)
        if attempt < t.lease.max_attempts:
            assert got.state is WorkState.QUEUED and entry.retry_at is not None
        else:
            assert (got.state, got.dead, entry.retry_at) == (WorkState.STOPPED, True, None)


async def test_retention_purges_what_ended_long_ago_and_never_a_live_item(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    env = t.cp.environment_id
    await configure(t, retention=100.0)
    # Ends now: a completed item (keyed, with a message), a dead letter, a delegate.
    done = await t.cp.submit("done", key="k-done")
    await t.cp.post_message(done.data.id, "a follow-up")
    await run_once(t, done.id, Outcome(OutcomeStatus.COMPLETED))
    dead = await t.cp.submit("dead", retry=RetryPolicy(max_attempts=1))
    assert (await run_once(t, dead.id, FAILED)).dead
    # Live: an active item (its old message stays with it) that delegated, and a queued one.
    active = await t.cp.submit("active")
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and polled.id == active.id
    await t.cp.ack(active.id, worker_id=W1)
    beat = await t.cp.heartbeat(
        active.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=1000.0
    )
    await t.cp.post_message(active.data.id, "for a live session")
    delegation = await t.cp.delegate(active.data.id, "a sub-task")
    await run_once(t, delegation.work_id, Outcome(OutcomeStatus.COMPLETED, result="ok"))
    queued = await t.cp.submit("queued")

    def purge(limit: int) -> int:
        return t.store.purge_expired(now=t.clock.now, limit=limit)

    # Younger than the retention (a young dead letter included): nothing goes.
    t.clock.advance(99.0)
    assert await trio.to_thread.run_sync(purge, 100) == 0
    t.clock.advance(2.0)
    # Bounded: 2 rows a call. Due: 3 items, 1 delegation, 1 message = 5 rows.
    assert [await trio.to_thread.run_sync(purge, 2) for _ in range(4)] == [2, 2, 1, 0]
    left = {i.id for i in await t.cp.list_work()}
    assert left == {active.id, queued.id}
    with pytest.raises(NotFound):
        await t.cp.get(done.id)
    assert await t.cp.list_delegations(W1) == []
    assert [m.body for m in await t.cp.list_messages(active.data.id)] == ["for a live session"]
    assert (await t.cp.list_work(dead=True)) == []
    # The purged item's key is free again.
    fresh = await t.cp.submit("done again", key="k-done")
    assert not fresh.duplicate and fresh.id != done.id
    # Without a retention nothing is purged, however old.
    await configure(t, retention=None)
    await t.cp.stop(active.id, expected_last_heartbeat=beat.last_heartbeat)
    t.clock.advance(10 * 365 * 86_400.0)
    assert await trio.to_thread.run_sync(purge, 100) == 0
    await trio.to_thread.run_sync(
        lambda: t.store.purge(env, older_than=t.clock.now, limit=100, now=t.clock.now)
    )
    assert {i.id for i in await t.cp.list_work()} == {queued.id, fresh.id}


# --- routing labels -----------------------------------------------------------------------


async def test_a_labelled_item_waits_for_a_poller_with_every_label_it_requires(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    routed = await t.cp.submit("train", labels=["repo:foo", "gpu"])
    plain = await t.cp.submit("lint")
    assert (routed.labels, plain.labels) == (("gpu", "repo:foo"), ())
    # A poller without labels passes over it to the unlabelled item behind it ...
    polled = await t.cp.poll(worker_id="plain")
    assert polled is not None and polled.id == plain.id
    assert await t.cp.poll(worker_id="plain") is None
    # ... and so does one that has only some of its labels.
    assert await t.cp.poll(worker_id="gpu-only", labels=["gpu"]) is None
    assert await t.cp.poll(worker_id="other", labels=["repo:foo", "cpu"]) is None
    # A superset of its labels claims it.
    polled = await t.cp.poll(worker_id="big", labels=["cpu", "gpu", "repo:foo", "repo:bar"])
    assert polled is not None and polled.id == routed.id
    assert polled.labels == ("gpu", "repo:foo")
    acked = await t.cp.ack(routed.id, worker_id="big")
    assert acked.worker_id == "big"


async def test_a_poller_with_labels_still_takes_unlabelled_work_in_priority_order(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    old_gpu = await t.cp.submit("old gpu", labels=["gpu"])
    await t.cp.submit("urgent cpu", labels=["cpu"], priority=5)  # never eligible below
    urgent_gpu = await t.cp.submit("urgent gpu", labels=["gpu"], priority=5)
    urgent_plain = await t.cp.submit("urgent plain", priority=5)
    plain = await t.cp.submit("plain")
    delayed_gpu = await t.cp.submit("later gpu", labels=["gpu"], priority=9, delay=30.0)
    order = []
    while (polled := await t.cp.poll(worker_id=W1, labels=["gpu"])) is not None:
        order.append(polled.id)
        await t.cp.ack(polled.id, worker_id=W1)
    assert order == [urgent_gpu.id, urgent_plain.id, old_gpu.id, plain.id]
    t.clock.advance(30.0)
    polled = await t.cp.poll(worker_id=W1, labels=["gpu"])
    assert polled is not None and polled.id == delayed_gpu.id
    assert await t.cp.poll(worker_id=W1, labels=["gpu"]) is None


async def test_an_unacknowledged_labelled_item_comes_back_only_to_a_poller_that_may_take_it(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("train", labels=["gpu"])
    polled = await t.cp.poll(worker_id="first", labels=["gpu"])
    assert polled is not None and polled.id == item.id
    t.clock.advance(t.lease.reclaim_older_than_ms / 1000.0 + 1.0)
    assert await t.cp.poll(worker_id="plain") is None
    polled = await t.cp.poll(worker_id="second", labels=["gpu", "big-disk"])
    assert polled is not None and polled.id == item.id


async def test_labels_are_stored_sorted_with_duplicates_folded_and_read_back(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("x", labels=["b", "a:1", "b", "A.x/y-z_0"])
    assert item.labels == ("A.x/y-z_0", "a:1", "b")
    assert (await t.cp.get(item.id)).labels == item.labels
    (listed,) = await t.cp.list_work()
    assert listed.labels == item.labels
    assert (await t.cp.submit("none", labels=[])).labels == ()


@pytest.mark.parametrize(
    "labels",
    [
        [""],
        ["has space"],
        ["semi;colon"],
        ["é"],
        ["x" * 101],
        [f"l{n}" for n in range(33)],
        "gpu",
        [7],
    ],
    ids=["empty", "space", "semicolon", "non-ascii", "too-long", "too-many", "a-string", "number"],
)
async def test_bad_labels_are_refused_and_queue_nothing(
    control_plane: ConformanceTarget, labels: object
) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match="label"):
        await t.cp.submit("never", labels=labels)  # type: ignore[arg-type]
    assert await t.cp.list_work() == []
    await t.cp.submit("queued")
    with pytest.raises(BadRequest, match="label"):
        await t.cp.poll(worker_id=W1, labels=labels)  # type: ignore[arg-type]
    (still,) = await t.cp.list_work()
    assert still.state is WorkState.QUEUED


async def test_thirty_two_labels_of_a_hundred_characters_are_accepted(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    labels = [f"{n:02d}" + "x" * 98 for n in range(32)]
    item = await t.cp.submit("wide", labels=labels)
    assert item.labels == tuple(labels)
    polled = await t.cp.poll(worker_id=W1, labels=labels)
    assert polled is not None and polled.id == item.id


# --- per-item timeout -------------------------------------------------------------------


async def test_an_items_timeout_is_kept_and_handed_to_the_claiming_worker(
    control_plane: ConformanceTarget,
) -> None:
    t = control_plane
    item = await t.cp.submit("bounded", timeout=90.5)
    plain = await t.cp.submit("unbounded")
    assert (item.timeout, plain.timeout) == (90.5, None)
    assert (await t.cp.get(item.id)).timeout == 90.5
    polled = await t.cp.poll(worker_id=W1)
    assert polled is not None and (polled.id, polled.timeout) == (item.id, 90.5)
    assert (await t.cp.submit("a week", timeout=7 * 86_400)).timeout == 7 * 86_400.0


@pytest.mark.parametrize(
    "timeout",
    [0, -1.0, math.nan, math.inf, 7 * 86_400 + 1, True],
    ids=["zero", "negative", "nan", "inf", "over-a-week", "bool"],
)
async def test_a_bad_timeout_is_refused_and_queues_nothing(
    control_plane: ConformanceTarget, timeout: float
) -> None:
    t = control_plane
    with pytest.raises(BadRequest, match="timeout"):
        await t.cp.submit("never", timeout=timeout)
    assert await t.cp.list_work() == []
