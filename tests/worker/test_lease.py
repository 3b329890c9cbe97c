"""The lease keeper (DESIGN §3.2) under a mock clock against the scripted control plane.

Each scenario runs one session the way the session supervisor composes it:
the keeper starts first and the runner only once it is ready; a
``LeaseLost`` from the keeper cancels the runner; the runner ending cancels
the keeper, which then sends the final stop. Every scenario is checked
against the contract from the recorded calls (``check_contract``), plus its
own expectations.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Unpack

import attrs
import pytest
import trio

from supervisor import ControlPlaneUnavailable, FatalError, LeaseLost, TransientError
from supervisor._worker._lease import DEADLINE_FRACTION, MeasureFrom, heartbeat_interval
from supervisor.controlplane import (
    NO_HEARTBEAT,
    FencingConflict,
    Gone,
    HeartbeatResult,
    NotFound,
    Outcome,
    OutcomeStatus,
    WorkState,
)
from supervisor.controlplane._protocol import LeasedClaim
from supervisor.lowlevel import KeeperOptions, Lease, LeaseKeeper
from supervisor.testing import HANG, Call, Regrant, Reply, ScriptedControlPlane, ScriptEntry

TTL = 9.0  # interval 3 s, deadline 7.2 s after each good send
EPS = 1e-9
COMPLETED = Outcome(OutcomeStatus.COMPLETED, exit_code=0, result="done", duration=1.0)
CANCELLED = Outcome(OutcomeStatus.CANCELLED, reason="stop requested")
DEFAULT_OUTCOME_STATUS = OutcomeStatus.FAILED


@attrs.define
class Trace:
    """What happened to one session, on the trio clock."""

    lease: Lease
    ready_at: float | None = None
    lost: LeaseLost | None = None
    lost_at: float | None = None
    keeper_cancelled: bool = False
    keeper_returned: bool = False
    runner_started_at: float | None = None
    runner_done_at: float | None = None
    runner_cancelled_at: float | None = None
    stop_seen_at: float | None = None
    cancelled_from_outside: bool = False
    ended_at: float | None = None

    @property
    def session_end(self) -> float | None:
        return self.runner_cancelled_at if self.runner_done_at is None else self.runner_done_at


async def claim(cp: ScriptedControlPlane, worker_id: str = "worker-a") -> str:
    await cp.submit("do the thing")
    item = await cp.poll(worker_id=worker_id)
    assert item is not None
    await cp.ack(item.id, worker_id=worker_id)
    return item.id


async def run_session(
    cp: ScriptedControlPlane,
    work_id: str,
    *,
    runner_seconds: float = math.inf,
    runner_until: float = math.inf,
    outcome: Outcome | None = COMPLETED,
    react_to_stop: float | None = None,
    cancel_at: float = math.inf,
    events: Sequence[tuple[float, Callable[[], object]]] = (),
    desired_ttl: float | None = None,
    **keeper_options: Unpack[KeeperOptions],
) -> Trace:
    """Run keeper + runner like the session supervisor does (ONE_FOR_ALL, ANY_SIGNIFICANT).

    Args:
        runner_seconds: how long the runner works before it ends with ``outcome``.
        runner_until: the same as a trio time (the earlier of both wins).
        react_to_stop: when set, the runner winds down this many seconds after
            a stop request (ending with ``CANCELLED``); otherwise it ignores it.
        cancel_at: cancel the whole session from outside at this time.
        events: ``(time, action)`` pairs applied to the fake while the session runs.
        desired_ttl, keeper_options: for the `LeaseKeeper` (its ``rng`` is seeded).
    """
    lease = Lease(work_id)
    options = KeeperOptions(rng=random.Random(7))
    options.update(keeper_options)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=desired_ttl, lease=lease, **options)
    trace = Trace(lease)

    async def keeper_child(*, task_status: trio.TaskStatus[Lease]) -> None:
        try:
            await keeper.run(task_status=task_status)
        except LeaseLost as exc:
            trace.lost, trace.lost_at = exc, trio.current_time()
            raise
        except trio.Cancelled:
            trace.keeper_cancelled = True
            raise
        trace.keeper_returned = True

    async def runner() -> None:
        trace.runner_started_at = trio.current_time()
        try:
            with trio.move_on_at(min(trace.runner_started_at + runner_seconds, runner_until)):
                if react_to_stop is None:
                    await trio.sleep_forever()
                await lease.stop_requested.wait()
                trace.stop_seen_at = trio.current_time()
                await trio.sleep(react_to_stop)
                lease.outcome = CANCELLED
                trace.runner_done_at = trio.current_time()
                return
            lease.outcome = outcome
            trace.runner_done_at = trio.current_time()
        except trio.Cancelled:
            trace.runner_cancelled_at = trio.current_time()
            raise

    for at, action in events:
        if at <= trio.current_time():
            action()  # due already: in place before the first heartbeat

    async def apply_events() -> None:
        for at, action in events:
            if at > trio.current_time():
                await trio.sleep_until(at)
                action()

    with trio.move_on_at(cancel_at) as outer:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(apply_events)
                await nursery.start(keeper_child)
                trace.ready_at = trio.current_time()
                await runner()
                nursery.cancel_scope.cancel()  # the runner is done: stop the keeper
        except* LeaseLost:
            pass
    trace.cancelled_from_outside = outer.cancelled_caught
    trace.ended_at = trio.current_time()
    return trace


def good_beats(calls: Sequence[Call]) -> list[Call]:
    return [c for c in calls if c.ok]


def check_contract(trace: Trace, cp: ScriptedControlPlane, work_id: str) -> None:
    """The §3.2 rules, checked from the recorded calls, for any scenario."""
    beats = cp.calls_to("heartbeat", work_id=work_id)
    stops = cp.calls_to("stop", work_id=work_id)
    assert not trace.keeper_returned, "the keeper never returns by itself"

    # Walk the heartbeats as the contract describes them.
    deadline = math.inf
    interval: float | None = None
    token = NO_HEARTBEAT
    first_send = beats[0].started_at if beats else None
    fatal_at: float | None = None
    for call in beats:
        assert fatal_at is None, "no heartbeat after a fatal answer"
        assert call.args["expected_last_heartbeat"] == token, "the fencing token is carried"
        assert call.started_at < deadline - EPS, "no heartbeat at or after the deadline"
        assert call.ended_at is not None
        assert call.ended_at <= deadline + EPS, "every call is bounded by the deadline"
        if interval is not None:
            assert call.ended_at - call.started_at <= interval + EPS, "bounded by the interval"
        if call.ok:
            result = call.result
            assert isinstance(result, HeartbeatResult)
            token = result.last_heartbeat
            if result.lease_extended or interval is None:
                deadline = call.started_at + DEADLINE_FRACTION * result.ttl_seconds
            interval = heartbeat_interval(result.ttl_seconds)
        elif isinstance(call.error, FatalError):
            fatal_at = call.ended_at

    # When it must have been lost, and when not.
    if fatal_at is not None:
        expected_lost_at: float | None = fatal_at
    elif interval is None:
        # Never confirmed: lost when the start budget ran out (if the run got that far).
        assert first_send is not None
        budget_end = first_send + min(30.0, 0.8 * TTL)
        expected_lost_at = budget_end if trace.ended_at and trace.ended_at >= budget_end else None
    else:
        end = trace.session_end if trace.session_end is not None else trace.ended_at
        assert end is not None
        expected_lost_at = deadline if end >= deadline - EPS else None
    if expected_lost_at is None:
        assert trace.lost is None, f"lost without cause: {trace.lost}"
    else:
        assert trace.lost is not None, f"must be lost at {expected_lost_at}"
        assert trace.lost_at == pytest.approx(expected_lost_at)
        assert trace.lease.lost == trace.lost.reason
        assert trace.lost.work_id == work_id

    # A session runs only on a confirmed lease and stops when the lease goes.
    if trace.runner_started_at is not None:
        assert trace.ready_at is not None
        assert beats and beats[0].started_at <= trace.ready_at
        started = trace.runner_started_at
        assert any(c.ok and c.ended_at is not None and c.ended_at <= started + EPS for c in beats)
    if trace.lost is not None and trace.runner_started_at is not None:
        assert trace.runner_cancelled_at == pytest.approx(trace.lost_at)

    # The server never re-granted while the session was alive.
    if trace.session_end is not None:
        for expired_id, at in cp.expirations:
            if expired_id == work_id:
                assert at > trace.session_end, "the server expired the lease under a live session"

    # The final stop: sent once with token and outcome, never after loss.
    if trace.lost is not None:
        assert stops == [], "no stop once the lease was lost"
    elif trace.ready_at is not None:
        assert len(stops) == 1, "exactly one final stop"
        (stop,) = stops
        assert stop.args["force"] is True
        assert stop.args["expected_last_heartbeat"] == token
        sent = stop.args["outcome"]
        assert isinstance(sent, Outcome)
        if trace.lease.outcome is not None:
            assert sent == trace.lease.outcome
        else:
            assert sent.status is DEFAULT_OUTCOME_STATUS
        assert stop.started_at < deadline, "the final stop is sent before the deadline"


@attrs.frozen
class Scenario:
    id: str
    script: tuple[ScriptEntry, ...] = ()
    desired_ttl: float | None = TTL
    runner_seconds: float = math.inf
    react_to_stop: float | None = None
    cancel_at: float = math.inf
    partition_at: float | None = None
    expect_ready: bool = True
    expect_lost_reason: str | None = None
    expect_lost_at: float | None = None
    expect_stop_reason: str | None = None
    expect_beats_at: tuple[float, ...] | None = None
    expect_stop_at: float | None = None


SCENARIOS = [
    Scenario(
        "healthy renewals follow a changing ttl, clamped to [0.5, 30]",
        script=(Reply(ttl=9), Reply(ttl=30), Reply(ttl=0.9), Reply(ttl=300), Reply(ttl=9)),
        runner_seconds=47.0,
        # 0 (ttl 9 -> 3 s), 3 (30 -> 10 s), 13 (0.9 -> 0.5 s), 13.5 (300 -> 30 s), 43.5 (9 -> 3 s)
        expect_beats_at=(0.0, 3.0, 13.0, 13.5, 43.5, 46.5),
        expect_stop_at=47.0,
    ),
    Scenario(
        "a run of 5xx recovers inside the deadline",
        script=(
            Reply(),
            TransientError("503 service unavailable", status_code=503),
            TransientError("502 bad gateway", status_code=502),
            ControlPlaneUnavailable("connection reset"),
            TransientError("429 slow down", status_code=429),
            Reply(),
        ),
        runner_seconds=20.0,
        expect_stop_at=20.0,
    ),
    Scenario(
        "a partition that never recovers is lost at t_send + 0.8 ttl",
        partition_at=4.0,
        # last good beat sent at 3: 3 + 0.8 * 9; the server would expire it at 12
        expect_lost_reason="deadline",
        expect_lost_at=3.0 + 0.8 * TTL,
    ),
    Scenario(
        "a 412 fencing conflict is lost at once",
        script=(Reply(), FencingConflict("stale token", status_code=412)),
        expect_lost_reason="412",
        expect_lost_at=3.0,
        expect_beats_at=(0.0, 3.0),
    ),
    Scenario(
        "a 404 is lost at once",
        script=(Reply(), Reply(), NotFound("no such item")),
        expect_lost_reason="NotFound",
        expect_lost_at=6.0,
    ),
    Scenario(
        "a 410 is lost at once, even in a run of transient errors",
        script=(Reply(), TransientError("503", status_code=503), Gone("removed")),
        expect_lost_reason="Gone",
    ),
    Scenario(
        "state stopping requests a clean stop and keeps beating while the runner winds down",
        script=(Reply(), Reply(state=WorkState.STOPPING)),
        react_to_stop=5.0,
        expect_stop_reason="stopping",
        expect_beats_at=(0.0, 3.0, 6.0),
        expect_stop_at=8.0,
    ),
    Scenario(
        "state stopped requests a clean stop",
        script=(Reply(), Reply(state=WorkState.STOPPED)),
        react_to_stop=1.0,
        expect_stop_reason="stopped",
        expect_stop_at=4.0,
    ),
    Scenario(
        "lease_extended false requests a stop; a runner that winds down in time is stopped",
        script=(Reply(), Reply(lease_extended=False)),
        react_to_stop=1.0,
        expect_stop_reason="did not extend",
        expect_stop_at=4.0,
    ),
    Scenario(
        "lease_extended false and a runner still running: lost at the old deadline",
        script=(Reply(), *[Reply(lease_extended=False)] * 5),
        expect_stop_reason="did not extend",
        expect_beats_at=(0.0, 3.0, 6.0),
        expect_lost_reason="deadline",
        expect_lost_at=0.8 * TTL,
    ),
    Scenario(
        "a hanging heartbeat is bounded by the interval and retried",
        script=(Reply(), HANG),
        runner_seconds=12.0,
        expect_stop_at=12.0,
    ),
    Scenario(
        "hanging heartbeats are bounded by the deadline, then lost",
        script=(Reply(), HANG, HANG, HANG),
        expect_lost_reason="deadline",
        expect_lost_at=0.8 * TTL,
    ),
    Scenario(
        "a slow answer counts from its send time",
        script=(Reply(answer_delay=2.0), Reply(answer_delay=2.5), HANG, HANG, HANG),
        expect_lost_reason="deadline",
        expect_lost_at=3.0 + 0.8 * TTL,
    ),
    Scenario(
        "ready only after the first beat succeeded (transient first beats retried)",
        script=(
            TransientError("503", status_code=503),
            ControlPlaneUnavailable("refused"),
            Reply(),
        ),
        runner_seconds=5.0,
    ),
    Scenario(
        "a fatal first beat never starts the session",
        script=(FencingConflict("another holder", status_code=412),),
        expect_ready=False,
        expect_lost_reason="first heartbeat refused",
        expect_lost_at=0.0,
    ),
    Scenario(
        "a first beat that never succeeds gives up within 0.8 x ttl of its send",
        partition_at=0.0,
        expect_ready=False,
        expect_lost_reason="first heartbeat did not succeed",
        expect_lost_at=0.8 * TTL,
    ),
    Scenario(
        "cancelled from outside: the final stop is still sent, shielded",
        cancel_at=5.0,
        expect_stop_at=5.0,
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
async def test_lease_scenario(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    scenario: Scenario,
) -> None:
    """Each scenario obeys the §3.2 contract and its own expectations."""
    caplog.set_level(logging.DEBUG, logger="supervisor")
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.script_heartbeats(scenario.script)
    events: list[tuple[float, Callable[[], object]]] = []
    if scenario.partition_at is not None:
        events.append((scenario.partition_at, lambda: cp.hang("*")))
    trace = await run_session(
        cp,
        work_id,
        runner_seconds=scenario.runner_seconds,
        react_to_stop=scenario.react_to_stop,
        cancel_at=scenario.cancel_at,
        events=events,
        desired_ttl=scenario.desired_ttl,
    )
    check_contract(trace, cp, work_id)

    assert (trace.ready_at is not None) == scenario.expect_ready
    if scenario.expect_lost_reason is None:
        assert trace.lost is None
    else:
        assert trace.lost is not None
        assert scenario.expect_lost_reason in trace.lost.reason
    if scenario.expect_lost_at is not None:
        assert trace.lost_at == pytest.approx(scenario.expect_lost_at)
    if trace.lost is not None and "deadline" in trace.lost.reason:
        server_expiry = cp.expires_at(work_id)
        assert server_expiry is not None
        assert trace.lost_at is not None
        assert trace.lost_at < server_expiry, "lost strictly before the server's own expiry"
    if scenario.expect_stop_reason is None:
        assert not trace.lease.stop_requested.is_set()
    else:
        assert trace.lease.stop_requested.is_set()
        assert trace.lease.stop_reason is not None
        assert scenario.expect_stop_reason in trace.lease.stop_reason
    if scenario.expect_beats_at is not None:
        sent = [c.started_at for c in cp.calls_to("heartbeat")]
        assert sent == pytest.approx(list(scenario.expect_beats_at))
    stops = cp.calls_to("stop")
    if scenario.expect_stop_at is not None:
        assert [s.started_at for s in stops] == pytest.approx([scenario.expect_stop_at])
    if scenario.cancel_at < math.inf:
        assert trace.cancelled_from_outside
        assert not trace.keeper_returned

    # No fencing token or session secret ever reaches a log line or a repr.
    results = [c.result for c in good_beats(cp.calls_to("heartbeat"))]
    assert all(isinstance(r, HeartbeatResult) for r in results)
    secrets = {r.last_heartbeat for r in results if isinstance(r, HeartbeatResult)}
    for record in caplog.records:
        for secret in secrets:
            assert secret not in record.getMessage()
    for secret in secrets:
        assert secret not in repr(trace.lease)
        assert secret not in str(trace.lost)


async def test_interval_is_a_third_of_the_ttl_clamped() -> None:
    """``heartbeat_interval`` is ttl/3 inside [0.5, 30], and safe on nonsense ttls."""
    assert heartbeat_interval(9) == 3
    assert heartbeat_interval(60) == 20
    assert heartbeat_interval(1.2) == 0.5
    assert heartbeat_interval(91) == 30
    assert heartbeat_interval(0) == 0.5
    assert heartbeat_interval(-5) == 0.5
    assert heartbeat_interval(math.nan) == 0.5
    assert heartbeat_interval(math.inf) == 30


async def test_ready_value_is_the_confirmed_lease(autojump_clock: trio.testing.MockClock) -> None:
    """``nursery.start(keeper.run)`` returns the shared Lease, confirmed, deadline from the send."""
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.script_heartbeats([Reply(request_delay=0.5, answer_delay=1.0)])
    shared = Lease(work_id)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL, lease=shared)
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(keeper.run)
        assert lease is shared
        assert trio.current_time() == pytest.approx(1.5)
        assert lease.confirmed
        assert lease.alive
        assert lease.deadline == pytest.approx(0.8 * TTL)  # from 0.0, the send
        assert lease.token == cp.token_of(work_id)
        assert cp.expires_at(work_id) == pytest.approx(0.5 + TTL)
        nursery.cancel_scope.cancel()


async def test_final_stop_is_shielded_and_cancellation_still_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slow final stop completes under cancellation; the Cancelled is re-raised after it."""
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.set_latency("stop", request=1.0, answer=1.0)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    returned = False
    with trio.move_on_after(4.0) as scope:
        async with trio.open_nursery() as nursery:
            lease = await nursery.start(keeper.run)
            lease.outcome = COMPLETED
            await trio.sleep(math.inf)
        returned = True
    assert scope.cancelled_caught
    assert not returned
    (stop,) = cp.calls_to("stop")
    assert stop.started_at == pytest.approx(4.0)
    assert stop.processed_at == pytest.approx(5.0)
    assert stop.ok
    assert trio.current_time() == pytest.approx(6.0)
    assert (await cp.get(work_id)).outcome == COMPLETED


@pytest.mark.parametrize(
    ("stop_timeout", "ends_at"),
    [
        pytest.param(2.0, 4.0, id="bounded by stop_timeout"),
        pytest.param(10.0, 7.2, id="bounded by the lease deadline"),
    ],
)
async def test_hanging_final_stop_is_bounded(
    autojump_clock: trio.testing.MockClock, stop_timeout: float, ends_at: float
) -> None:
    """A final stop that never answers ends at min(stop_timeout, time left to the deadline)."""
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.hang("stop")
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL, stop_timeout=stop_timeout)
    with trio.move_on_after(2.0):  # before the second beat (t=3) is in flight
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            cp.hang("heartbeat")  # so the deadline stays at 0 + 7.2
    assert trio.current_time() == pytest.approx(ends_at)
    (stop,) = cp.calls_to("stop")
    assert stop.cancelled
    assert stop.ended_at == pytest.approx(ends_at)
    assert keeper.lease.lost is None


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(FencingConflict("stale", status_code=412), id="412"),
        pytest.param(TransientError("503", status_code=503), id="503"),
        pytest.param(RuntimeError("a defect in the control plane"), id="unexpected"),
    ],
)
async def test_final_stop_failures_are_logged_not_raised(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """A failing final stop is logged once, without the token, and does not replace the exit."""
    caplog.set_level(logging.DEBUG, logger="supervisor.lease")
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    with trio.move_on_after(1.0) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            token = keeper.lease.token
            cp.fail_next("stop", type(error)(f"{error} (token {token})"))
    assert scope.cancelled_caught
    messages = [r.getMessage() for r in caplog.records if "final stop" in r.getMessage()]
    assert len(messages) == 1
    assert token not in messages[0]
    assert "<token>" in messages[0]


async def test_already_stopped_on_final_stop_is_fine(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A 409 on the final stop (the item was stopped meanwhile) is not a warning."""
    caplog.set_level(logging.DEBUG, logger="supervisor.lease")
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    with trio.move_on_after(1.0):
        async with trio.open_nursery() as nursery:
            lease = await nursery.start(keeper.run)
            await cp.stop(work_id, expected_last_heartbeat=lease.token)
    assert [c.error.status_code for c in cp.calls_to("stop") if c.error] == [409]  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_no_final_stop_when_cancelled_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled at the very instant the deadline passes: the lease counts as lost, no stop."""
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    async with trio.open_nursery() as outer:
        lease = await outer.start(keeper.run)
        cp.hang("heartbeat")
        with trio.move_on_at(lease.deadline):
            await trio.sleep_forever()
        outer.cancel_scope.cancel()
    assert cp.calls_to("stop") == []
    assert lease.lost is not None
    assert "deadline" in lease.lost


async def test_cancelled_before_the_first_beat_answered_stops_with_no_heartbeat(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled while confirming: never ready; the stop carries NO_HEARTBEAT (412 if it raced)."""
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.script_heartbeats([HANG])
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    with trio.move_on_after(1.0):
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            pytest.fail("never ready")  # pragma: no cover
    (stop,) = cp.calls_to("stop")
    assert stop.args["expected_last_heartbeat"] == NO_HEARTBEAT
    assert not keeper.lease.confirmed


async def test_a_stop_before_the_first_answer_ends_with_the_start_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled while confirming: the NO_HEARTBEAT stop is retried only within the start budget.

    Past that budget (0.8 x ttl from the first send) the keeper counts such a
    lease as lost: a grant it never heard of may have expired and another
    worker acknowledged the item, whose token is still NO_HEARTBEAT too.
    """
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.script_heartbeats([HANG])  # bounded by the interval: ends at 3
    cp.fail_next("stop", TransientError("503", status_code=503), times=1000)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    with trio.move_on_after(1.0):
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper.run)
            pytest.fail("never ready")  # pragma: no cover
    stops = cp.calls_to("stop")
    assert stops and stops[0].started_at == pytest.approx(3.0)
    assert all(s.args["expected_last_heartbeat"] == NO_HEARTBEAT for s in stops)
    assert stops[-1].started_at < 0.8 * TTL
    assert trio.current_time() == pytest.approx(0.8 * TTL)
    # Cancelled at the end of that budget: no stop at all, and the lease counts as lost.
    cp2 = ScriptedControlPlane(default_ttl=TTL)
    work_id2 = await claim(cp2)
    t0 = trio.current_time()
    cp2.script_heartbeats([HANG, HANG, HANG, HANG])
    keeper2 = LeaseKeeper(cp2, work_id2, desired_ttl=TTL, rng=random.Random(0))
    with trio.move_on_after(7.0):  # beats at 0, ~3.3 and ~6.8, the last one cut at 7.2
        async with trio.open_nursery() as nursery:
            await nursery.start(keeper2.run)
            pytest.fail("never ready")  # pragma: no cover
    assert [b.started_at - t0 for b in cp2.calls_to("heartbeat")] == pytest.approx(
        [0.0, 3.25, 6.76], abs=0.05
    )
    assert cp2.calls_to("heartbeat")[-1].ended_at == pytest.approx(t0 + 0.8 * TTL)
    assert cp2.calls_to("stop") == []
    assert keeper2.lease.lost is not None and "first heartbeat" in keeper2.lease.lost


@pytest.mark.parametrize(
    ("desired_ttl", "start_timeout", "expected"),
    [
        pytest.param(9.0, None, 7.2, id="0.8 x desired ttl"),
        pytest.param(None, None, 30.0, id="no ttl asked: 30 s"),
        pytest.param(600.0, None, 30.0, id="at most 30 s"),
        pytest.param(9.0, 2.0, 2.0, id="explicit"),
    ],
)
async def test_start_budget_default(
    desired_ttl: float | None, start_timeout: float | None, expected: float
) -> None:
    """The first beat is retried at most min(30 s, 0.8 x ttl) unless told otherwise."""
    keeper = LeaseKeeper(
        ScriptedControlPlane(), "w", desired_ttl=desired_ttl, start_timeout=start_timeout
    )
    assert keeper.start_timeout == pytest.approx(expected)


@pytest.mark.parametrize(
    ("start_timeout", "hijacks"),
    [pytest.param(None, False, id="default budget"), pytest.param(30.0, True, id="30 s budget")],
)
async def test_first_beat_retries_end_before_an_unanswered_grant_expires(
    autojump_clock: trio.testing.MockClock, start_timeout: float | None, hijacks: bool
) -> None:
    """A first beat granted but unanswered, then retried: by default the retries stop in time.

    The first beat carries no token. Retried after the grant it started has
    expired and another worker acknowledged the item, it would be taken as
    that worker's first beat. The default budget (0.8 x ttl from the first
    send) ends before the server-side expiry; a longer one shows the hazard.
    """
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    # Processed at 0 (a lease until 9) but answered far too late; then errors.
    cp.script_heartbeats([Reply(answer_delay=100.0), *[TransientError("503")] * 20])
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL, start_timeout=start_timeout)

    async def another_worker() -> None:
        await trio.sleep(TTL + 0.5)  # the unanswered grant expired at 9
        item = await cp.poll(worker_id="worker-b")
        assert item is not None
        await cp.ack(item.id, worker_id="worker-b")
        cp.clear_script()  # ...and the network is fine again

    lost: LeaseLost | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(another_worker)
        try:
            await nursery.start(keeper.run)
        except LeaseLost as exc:
            lost = exc
        ended_at = trio.current_time()
        nursery.cancel_scope.cancel()
    if hijacks:
        # The keeper now holds the lease that worker B acknowledged.
        assert lost is None
        assert ended_at > TTL
        assert (await cp.get(work_id)).worker_id == "worker-b"
    else:
        assert lost is not None
        assert "first heartbeat did not succeed" in lost.reason
        assert ended_at == pytest.approx(0.8 * TTL)


async def test_options_are_validated() -> None:
    """Nonsense timing options and a lease for another item are refused at construction."""
    cp = ScriptedControlPlane()
    with pytest.raises(ValueError, match="desired_ttl"):
        LeaseKeeper(cp, "w", desired_ttl=0)
    with pytest.raises(ValueError, match="stop_timeout"):
        LeaseKeeper(cp, "w", stop_timeout=-1)
    with pytest.raises(ValueError, match="lease is for"):
        LeaseKeeper(cp, "w", lease=Lease("other"))
    with pytest.raises(ValueError, match="'sideways'"):
        LeaseKeeper(cp, "w", measure_from="sideways")


async def test_repr_hides_the_token_and_outcome() -> None:
    """Neither the Lease nor the keeper shows the fencing token in its repr."""
    lease = Lease("work-1", token="hb-secret-42")
    lease.outcome = Outcome(OutcomeStatus.COMPLETED, result="private output")
    keeper = LeaseKeeper(ScriptedControlPlane(), "work-1", lease=lease)
    for text in (repr(lease), repr(keeper)):
        assert "hb-secret-42" not in text
        assert "private output" not in text
        assert "work-1" in text


# --- split brain ------------------------------------------------------------------


def split_brain_violations(
    trace: Trace, cp: ScriptedControlPlane, work_id: str, regrant: Regrant | None
) -> list[str]:
    """Everything worker A did at or after the instant the item became worker B's."""
    if regrant is None:
        return ["the item was never re-granted"]
    problems = []
    end = trace.session_end
    if end is None or end >= regrant.at:
        problems.append(f"A's session still ran at the re-grant ({regrant.at:g}); ended at {end}")
    late = [c for c in cp.calls if c.args.get("work_id") == work_id and c.started_at >= regrant.at]
    problems += [f"A called {c.method} at {c.started_at:g}" for c in late]
    return problems


async def split_brain_run(measure_from: MeasureFrom) -> list[str]:
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    # Every beat is processed on arrival but answered 2.5 s later (a slow round trip).
    cp.set_latency("heartbeat", answer=2.5)
    regrants: list[Regrant | None] = []

    async def server_side() -> None:
        regrants.append(await cp.regrant_at_expiry(work_id, worker_id="worker-b"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        trace = await run_session(
            cp,
            work_id,
            # The runner would finish shortly after the server's expiry (15).
            runner_until=15.2,
            events=[(7.0, lambda: cp.hang("heartbeat"))],  # then the network drops
            desired_ttl=TTL,
            measure_from=measure_from,
        )
    (regrant,) = regrants
    assert regrant is not None
    assert regrant.at == pytest.approx(6.0 + TTL)  # processed at 6, expires at 6 + ttl
    return split_brain_violations(trace, cp, work_id, regrant)


async def test_split_brain_session_cancelled_strictly_before_regrant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server re-grants at its expiry; our session was cancelled before, no stop follows."""
    assert await split_brain_run(MeasureFrom.SEND) == []


async def test_split_brain_check_catches_deadline_from_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With the classic bug planted (deadline from the answer) the same check fails."""
    problems = await split_brain_run(MeasureFrom.ANSWER)
    assert any("still ran at the re-grant" in p for p in problems)
    assert any("called stop" in p for p in problems)  # the stale stop of defect 2


async def test_a_stop_request_cancels_the_scopes_registered_for_it() -> None:
    """What the runner uses instead of a task waiting on ``stop_requested``."""
    lease = Lease("w1")
    before = trio.CancelScope()
    lease.cancel_on_stop_request(before)
    called_before_the_request = before.cancel_called
    lease.request_stop("control plane state is stopping")
    lease.request_stop("a second reason is not kept")
    assert not called_before_the_request
    assert before.cancel_called
    assert lease.stop_reason == "control plane state is stopping"
    after = trio.CancelScope()
    lease.cancel_on_stop_request(after)  # already requested: cancelled at once
    assert after.cancel_called


# --- the final stop after a beat in flight (issue 15, item 3) ---------------------------


async def test_final_stop_after_an_in_flight_beat_carries_the_token_it_earned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The session ends while a beat is in flight: the keeper waits for its answer (shielded).

    The server minted a new token for that beat; a stop with the old one would
    get 412 and the finished session would be run again after the expiry.
    """
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.set_latency("heartbeat", request=0.25, answer=0.25)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    with trio.move_on_after(3.1):  # the second beat left at 3.0, its answer comes at 3.5
        async with trio.open_nursery() as nursery:
            lease = await nursery.start(keeper.run)
            lease.outcome = COMPLETED
    beats = cp.calls_to("heartbeat")
    assert len(beats) == 2 and beats[1].ok and not beats[1].cancelled
    assert beats[1].ended_at == pytest.approx(3.5)
    (stop,) = cp.calls_to("stop")
    assert stop.ok
    assert stop.started_at == pytest.approx(3.5)
    earned = beats[1].result
    assert isinstance(earned, HeartbeatResult)
    assert stop.args["expected_last_heartbeat"] == earned.last_heartbeat
    assert (await cp.get(work_id)).outcome == COMPLETED
    assert keeper.lease.reported


async def test_a_stop_refused_for_a_missed_answer_is_sent_again_with_the_named_token(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A beat processed after its bound gave up: the stop gets 412 naming the token, and retries."""
    caplog.set_level(logging.DEBUG, logger="supervisor.lease")
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.script_heartbeats([Reply(), Reply(answer_delay=5.0)])  # the second: processed, unheard
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    with trio.move_on_after(6.1):  # the bound gave up at 6.0; no retry yet
        async with trio.open_nursery() as nursery:
            lease = await nursery.start(keeper.run)
            lease.outcome = COMPLETED
    first, second = cp.calls_to("stop")
    assert isinstance(first.error, FencingConflict)
    assert first.error.current_token == cp.token_of(work_id)
    assert second.ok
    assert second.args["expected_last_heartbeat"] == cp.token_of(work_id)
    assert (await cp.get(work_id)).outcome == COMPLETED
    assert keeper.lease.lost is None and keeper.lease.reported
    token = cp.token_of(work_id)
    assert token is not None
    assert all(token not in r.getMessage() for r in caplog.records)


async def test_a_beat_one_answer_behind_continues_with_the_named_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lost heartbeat answer no longer costs the lease: the 412 names the token; beat on."""
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    cp.script_heartbeats([Reply(), Reply(answer_delay=5.0)])
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL, rng=random.Random(0))
    with trio.move_on_after(12.0):
        async with trio.open_nursery() as nursery:
            lease = await nursery.start(keeper.run)
            lease.outcome = COMPLETED
    beats = cp.calls_to("heartbeat")
    refused = [b for b in beats if isinstance(b.error, FencingConflict)]
    assert len(refused) == 1
    after = beats[beats.index(refused[0]) + 1]
    assert after.started_at == pytest.approx(refused[0].ended_at)  # at once
    assert after.ok
    assert keeper.lease.lost is None
    (stop,) = cp.calls_to("stop")
    assert stop.ok
    assert (await cp.get(work_id)).outcome == COMPLETED


async def test_a_named_token_of_a_stale_lease_is_never_taken_after_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 412 naming a token after our deadline passed: lost as before (it may be another's)."""
    cp = ScriptedControlPlane(default_ttl=TTL)
    work_id = await claim(cp)
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL)
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(keeper.run)
        lease.deadline = trio.current_time()  # as if our clock said the lease is gone
        named = FencingConflict("stale", current_token="hb-somebody")
        assert not keeper._adopt_named_token(named, "heartbeat")
        lease.deadline = math.inf
        assert not keeper._adopt_named_token(FencingConflict("stale"), "heartbeat")
        assert keeper._adopt_named_token(named, "heartbeat")
        assert lease.token == "hb-somebody"
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- leases granted with the claim


async def granted(cp: ScriptedControlPlane, asked_at: float) -> LeasedClaim:
    """A claim whose first lease came with it (the first beat made here, as a store would)."""
    work_id = await claim(cp)
    beat = await cp.heartbeat(work_id, expected_last_heartbeat=NO_HEARTBEAT)
    return LeasedClaim(await cp.get(work_id), beat, asked_at)


async def test_a_granted_lease_is_ready_at_once_and_renewed_with_its_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane(default_ttl=TTL)
    grant = await granted(cp, asked_at=0.0)
    work_id = grant.item.id
    beats_before = len(cp.calls_to("heartbeat"))
    keeper = LeaseKeeper(cp, work_id, desired_ttl=TTL, grant=grant)
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(keeper.run)
        assert trio.current_time() == 0.0  # no heartbeat of its own
        assert lease.confirmed and lease.alive
        assert lease.token == grant.heartbeat.last_heartbeat
        assert lease.deadline == pytest.approx(0.8 * TTL)  # from when the claim was asked for
        await trio.sleep(heartbeat_interval(TTL) + 0.1)
        renewals = cp.calls_to("heartbeat")[beats_before:]
        assert [c.args["expected_last_heartbeat"] for c in renewals] == [
            grant.heartbeat.last_heartbeat
        ]
        nursery.cancel_scope.cancel()
    (stop,) = cp.calls_to("stop")
    assert stop.args["expected_last_heartbeat"] == cp.token_of(work_id)
    assert stop.error is None


async def test_a_keeper_cancelled_at_once_still_stops_with_the_granted_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane(default_ttl=TTL)
    grant = await granted(cp, asked_at=0.0)
    keeper = LeaseKeeper(cp, grant.item.id, desired_ttl=TTL, grant=grant)
    with trio.CancelScope() as scope:
        scope.cancel()
        await keeper.run()
    (stop,) = cp.calls_to("stop")
    assert stop.args["expected_last_heartbeat"] == grant.heartbeat.last_heartbeat
    assert stop.error is None
    assert (await cp.get(grant.item.id)).state is WorkState.STOPPED


async def test_a_grant_past_its_deadline_is_refused_and_nothing_is_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane(default_ttl=TTL)
    grant = await granted(cp, asked_at=0.0)
    await trio.sleep(0.8 * TTL)  # the hand-over took as long as the lease may be trusted
    keeper = LeaseKeeper(cp, grant.item.id, desired_ttl=TTL, grant=grant)
    with pytest.raises(LeaseLost, match="after its deadline"):
        await keeper.run()
    assert cp.calls_to("stop") == []


async def test_a_grant_for_another_item_is_refused() -> None:
    cp = ScriptedControlPlane(default_ttl=TTL)
    grant = await granted(cp, asked_at=0.0)
    with pytest.raises(ValueError, match="grant is for"):
        LeaseKeeper(cp, "another-item", grant=grant)
