"""The lease keeper against a pure model of DESIGN §3.2, step by step.

A hypothesis ``RuleBasedStateMachine`` feeds the scripted control plane a
sequence of heartbeat answers (good with various ttls, transient errors,
fatal errors, 412, ``stopping``/``stopped``, ``lease_extended`` false, slow
answers, answers that never come) and moves the clock; one rule ends the
session. After every step the keeper's observable state must match what
:class:`LeaseModel` (plain Python, no Trio) derives from the heartbeats the
keeper actually made:

* each beat goes out exactly when the contract says (``t_send + ttl/3``
  clamped after a good beat, a bounded backoff after a failed one), carries
  the last token and is bounded by ``min(interval, time left)``;
* the keeper is lost exactly at a fatal answer or at ``t_send + 0.8 ttl`` of
  its last good beat, and never alive past it; the server's own expiry is
  always later while the keeper is alive (no split brain);
* a stop is requested exactly when an answer said so;
* after loss it makes no call at all, and the final stop is sent (once, with
  the token) exactly when the session ends before the deadline.

Trio runs on a background thread under a ``MockClock``. The clock moves only
inside the ``advance`` rule, which lets it autojump from timer to timer (so
every timer fires at its own instant, in order) and then stops it and waits
for all tasks to block before the model is compared.
"""

from __future__ import annotations

import math
import queue
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing
from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from supervisor import ControlPlaneUnavailable, FatalError, LeaseLost, TransientError
from supervisor.controlplane import (
    NO_HEARTBEAT,
    BadRequest,
    FencingConflict,
    Gone,
    HeartbeatResult,
    NotFound,
    Outcome,
    OutcomeStatus,
    Unauthorized,
    WorkState,
)
from supervisor.lowlevel import Lease, LeaseKeeper
from supervisor.testing import HANG, Call, Fail, Reply, ScriptedControlPlane, ScriptEntry

T = TypeVar("T")
EPS = 1e-6
RETRY_INITIAL = 0.25
RETRY_MAX = 5.0
STOP_STATES = {WorkState.STOPPING, WorkState.STOPPED}

# ------------------------------------------------------------------ strategies

ttls = st.sampled_from([0.3, 0.9, 1.5, 3.0, 9.0, 30.0, 60.0, 95.0, 120.0])
desired_ttls = st.sampled_from([1.5, 3.0, 9.0, 30.0, 60.0, 120.0])
short_delays = st.floats(min_value=0.05, max_value=2.0, allow_nan=False).map(lambda d: round(d, 2))
long_delays = st.floats(min_value=2.0, max_value=40.0, allow_nan=False).map(lambda d: round(d, 1))
transient_errors = st.sampled_from(
    [
        TransientError("503 unavailable", status_code=503),
        TransientError("429 too many requests", status_code=429),
        TransientError("408 request timeout", status_code=408),
        ControlPlaneUnavailable("connection reset"),
    ]
)
fatal_errors = st.sampled_from(
    [
        NotFound("no such item"),
        Gone("item removed"),
        Unauthorized("key revoked"),
        BadRequest("bad request"),
        FencingConflict("stale token"),
    ]
)
good = st.builds(Reply, ttl=ttls)
# Branches are drawn uniformly, so good answers are listed several times:
# most runs then live long enough to see many beats before something breaks.
answers: st.SearchStrategy[ScriptEntry] = st.one_of(
    good,
    good,
    good,
    st.builds(Reply, ttl=ttls, answer_delay=short_delays),
    st.builds(Reply, ttl=ttls, request_delay=short_delays),
    st.builds(Reply, ttl=ttls, answer_delay=long_delays),
    st.builds(Reply, ttl=ttls, state=st.sampled_from(sorted(STOP_STATES))),
    st.builds(Reply, ttl=ttls, lease_extended=st.just(False)),
    st.builds(Fail, transient_errors),
    st.builds(Fail, transient_errors),
    st.builds(Fail, transient_errors, delay=st.one_of(short_delays, long_delays)),
    st.builds(Fail, fatal_errors),
    st.just(HANG),
)
clock_steps = st.one_of(
    st.sampled_from([0.5, 1.0, 2.5, 3.0, 7.2, 10.0, 20.0, 31.0]),
    st.floats(min_value=0.01, max_value=60.0, allow_nan=False).map(lambda d: round(d, 2)),
)

# ------------------------------------------------------------------ the model

# The contract's numbers, written out again on purpose: the model must not
# share them with the code it checks.
DEADLINE_FRACTION = 0.8


def heartbeat_interval(ttl: float) -> float:
    return min(30.0, max(0.5, ttl / 3)) if ttl > 0 else 0.5


@attrs.define
class LeaseModel:
    """What the contract says the keeper must do, given the beats it made.

    Plain data and arithmetic: it is fed the recorded heartbeat calls in
    order and answers "when must the keeper be lost", "must a stop have been
    requested", "when may the next beat go out".
    """

    desired_ttl: float
    token: str = NO_HEARTBEAT
    confirmed: bool = False
    ready: bool = False
    deadline: float = math.inf
    #: A slow answer can bring a deadline that already passed: noticed on arrival.
    noticed_at: float = -math.inf
    interval: float | None = None
    give_up_at: float | None = None
    failures: int = 0
    #: When the next beat may go out (inclusive bounds); ``None``: no beat expected.
    next_window: tuple[float, float] | None = (0.0, 0.0)
    fatal_at: float | None = None
    stop_requested: bool = False
    finished_at: float | None = None
    #: Heartbeat calls made before the session ended (in flight ones included).
    #: Counted, not timed: a beat sent at the very instant the session ended
    #: was sent before the cancellation, so it is in flight, not "after the end".
    beats_at_end: int | None = None
    #: Heartbeat calls checked so far.
    beats_seen: int = 0

    @property
    def start_timeout(self) -> float:
        return min(30.0, DEADLINE_FRACTION * self.desired_ttl)

    @property
    def first_bound(self) -> float:
        return heartbeat_interval(self.desired_ttl)

    @property
    def limit(self) -> float:
        """The instant the keeper must give up without a good answer."""
        if self.confirmed:
            return max(self.deadline, self.noticed_at)
        return self.give_up_at if self.give_up_at is not None else math.inf

    def loss_due(self) -> float | None:
        """When the keeper must be (or have been) lost, as things stand."""
        if self.fatal_at is not None:
            return self.fatal_at
        return self.limit if self.limit < math.inf else None

    def observe(self, call: Call) -> None:
        """Check one completed heartbeat against the contract and advance."""
        start, end = call.started_at, call.ended_at
        assert end is not None
        due = self.loss_due()
        assert self.fatal_at is None, "a heartbeat after a fatal answer"
        assert self.beats_at_end is None or self.beats_seen < self.beats_at_end, (
            f"heartbeat at {start} after the session ended"
        )
        assert self.finished_at is None or start <= self.finished_at
        self.beats_seen += 1
        assert due is None or start < due - EPS, f"heartbeat at {start}, deadline {due}"
        assert call.args["expected_last_heartbeat"] == self.token, "carries the last token"
        assert self.next_window is not None, f"unexpected heartbeat at {start}"
        lo, hi = self.next_window
        assert lo - EPS <= start <= hi + EPS, f"heartbeat at {start}, expected in [{lo}, {hi}]"
        if self.give_up_at is None:
            self.give_up_at = start + self.start_timeout
        bound = self.interval if self.confirmed else self.first_bound
        assert bound is not None
        assert end - start <= bound + EPS, f"call of {end - start}s exceeds the interval {bound}"
        assert end <= self.limit + EPS, "call runs past the deadline"

        if call.ok:
            result = call.result
            assert isinstance(result, HeartbeatResult)
            first = not self.confirmed
            self.confirmed = True
            self.token = result.last_heartbeat
            self.failures = 0
            if result.lease_extended or first:
                self.deadline = start + DEADLINE_FRACTION * max(result.ttl_seconds, 0.0)
            self.noticed_at = end if end >= self.deadline else -math.inf
            # Ready only on a lease that is still good when its answer arrives,
            # and only while the session lasts: an answer to a beat that was
            # in flight when it ended finds nobody waiting for the lease.
            self.ready = self.ready or (first and end < self.deadline and self.finished_at is None)
            self.interval = heartbeat_interval(result.ttl_seconds)
            if result.state in STOP_STATES or not result.lease_extended:
                self.stop_requested = True
            nxt = max(start + self.interval, end)
            self.next_window = (nxt, nxt) if nxt < self.deadline - EPS else None
        elif (
            isinstance(call.error, FencingConflict)
            and call.error.current_token not in (None, self.token)
            and self.confirmed
            and end < self.deadline
        ):
            # One answer behind (a beat processed after our bound gave up on
            # it): the server named the current token; beat again at once.
            self.token = call.error.current_token
            self.failures += 1
            self.next_window = (end, end) if end < self.limit - EPS else None
        elif isinstance(call.error, FatalError):
            self.fatal_at = end
            self.next_window = None
        else:  # a transient error, or our own bound ran out (the call was cancelled)
            self.failures += 1
            base = min(RETRY_MAX, bound, RETRY_INITIAL * 2.0 ** (self.failures - 1))
            lo, hi = end + base, end + 1.1 * base
            self.next_window = (lo, hi) if lo < self.limit - EPS else None


@attrs.define
class Observed:
    """The keeper's side, read inside the Trio thread after the loop settled."""

    now: float
    calls: list[Call]
    ready_at: float | None
    lost_at: float | None
    lost: LeaseLost | None
    cancelled: bool
    returned: bool
    lease_lost: str | None
    stop_requested: bool
    alive: bool
    server_expiry: float | None


# ------------------------------------------------------------------ the Trio side


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


class KeeperWorld:
    """One Trio loop on a helper thread with a keeper serving one claimed item."""

    def __init__(self, desired_ttl: float, first_answers: list[ScriptEntry]) -> None:
        self.clock = trio.testing.MockClock()
        self.cp = ScriptedControlPlane(default_ttl=desired_ttl)
        self.desired_ttl = desired_ttl
        self.first_answers = first_answers
        self.lease: Lease | None = None
        self.keeper: LeaseKeeper | None = None
        self.ready_at: float | None = None
        self.lost_at: float | None = None
        self.lost: LeaseLost | None = None
        self.cancelled = False
        self.returned = False
        self.work_id = ""
        self._keeper_scope = trio.CancelScope()
        self._error: BaseException | None = None
        ready: queue.Queue[trio.lowlevel.TrioToken | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(ready,), daemon=True)
        self._thread.start()
        token = ready.get(timeout=30)
        if token is None:
            raise RuntimeError("the trio loop did not start") from self._error
        self._token = token
        self.call(self._settle)

    def _main(self, ready: queue.Queue[trio.lowlevel.TrioToken | None]) -> None:
        try:
            trio.run(self._serve, ready, clock=self.clock)
        except BaseException as exc:  # reported to the test thread by close()
            self._error = exc
            ready.put(None)

    async def _serve(self, ready: queue.Queue[trio.lowlevel.TrioToken | None]) -> None:
        item = await self.cp.submit("model check")
        assert await self.cp.poll(worker_id="model") is not None
        await self.cp.ack(item.id, worker_id="model")
        self.work_id = item.id
        self.cp.script_heartbeats(self.first_answers)
        self.lease = Lease(item.id)
        self.keeper = LeaseKeeper(
            self.cp,
            item.id,
            desired_ttl=self.desired_ttl,
            lease=self.lease,
            retry_initial=RETRY_INITIAL,
            retry_max=RETRY_MAX,
            rng=random.Random(0),
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._run_keeper)
            ready.put(trio.lowlevel.current_trio_token())
            await trio.sleep_forever()

    async def _run_keeper(self) -> None:
        assert self.keeper is not None
        with self._keeper_scope:
            try:
                async with trio.open_nursery() as inner:
                    await inner.start(self.keeper.run)
                    self.ready_at = trio.current_time()
            except* LeaseLost as group:
                (lost,) = leaves(group)
                assert isinstance(lost, LeaseLost)
                self.lost, self.lost_at = lost, trio.current_time()
            except* trio.Cancelled:
                self.cancelled = True
                raise
            else:
                self.returned = True

    async def _settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()

    async def _advance(self, seconds: float) -> None:
        self.clock.autojump_threshold = 0
        try:
            await trio.sleep(seconds)
        finally:
            self.clock.autojump_threshold = math.inf
        await trio.testing.wait_all_tasks_blocked()

    async def _finish(self, outcome: Outcome) -> None:
        assert self.lease is not None
        self.lease.outcome = outcome
        self._keeper_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()

    async def _observe(self) -> Observed:
        await trio.lowlevel.checkpoint()
        assert self.lease is not None
        return Observed(
            now=trio.current_time(),
            calls=list(self.cp.calls),
            ready_at=self.ready_at,
            lost_at=self.lost_at,
            lost=self.lost,
            cancelled=self.cancelled,
            returned=self.returned,
            lease_lost=self.lease.lost,
            stop_requested=self.lease.stop_requested.is_set(),
            alive=self.lease.alive,
            server_expiry=self.cp.expires_at(self.work_id),
        )

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def script(self, entry: ScriptEntry) -> None:
        trio.from_thread.run_sync(self.cp.script_heartbeats, [entry], trio_token=self._token)

    def advance(self, seconds: float) -> None:
        self.call(self._advance, seconds)

    def finish(self, outcome: Outcome) -> None:
        self.call(self._finish, outcome)

    def observe(self) -> Observed:
        return self.call(self._observe)

    def _stop(self) -> None:
        # A heartbeat in flight is shielded until its bound: let the clock get there.
        self.clock.autojump_threshold = 0
        self._nursery.cancel_scope.cancel()

    def close(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop, trio_token=self._token)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the trio loop did not stop"
        if self._error is not None:
            raise self._error


# ------------------------------------------------------------------ the machine


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world: KeeperWorld | None = None
        self.model: LeaseModel | None = None
        self.seen = 0  # heartbeat calls fed to the model so far
        self.outcome: Outcome | None = None
        self.steps = 0

    @initialize(desired_ttl=desired_ttls, first=st.lists(answers, max_size=4))
    def start(self, desired_ttl: float, first: list[ScriptEntry]) -> None:
        self.model = LeaseModel(desired_ttl=desired_ttl)
        self.world = KeeperWorld(desired_ttl, first)

    def teardown(self) -> None:
        if self.world is not None:
            self.world.close()

    @rule(batch=st.lists(answers, min_size=1, max_size=4))
    def queue_answers(self, batch: list[ScriptEntry]) -> None:
        assert self.world is not None
        self.steps += 1
        for answer in batch:
            self.world.script(answer)

    @rule(seconds=clock_steps)
    def advance(self, seconds: float) -> None:
        assert self.world is not None
        self.steps += 1
        self.world.advance(seconds)

    @rule()
    def until_next_beat(self) -> None:
        """Move the clock just past the next heartbeat the model expects."""
        assert self.world is not None
        assert self.model is not None
        self.steps += 1
        observed = self.sync_model()
        window = self.model.next_window
        target = window[1] + 0.01 if window is not None else observed.now + 1.0
        self.world.advance(max(0.01, target - observed.now))

    # Late in a run only, so that most runs get to see many heartbeats first.
    @precondition(lambda self: self.outcome is None and self.steps >= 12)
    @rule(status=st.sampled_from([OutcomeStatus.COMPLETED, OutcomeStatus.CANCELLED]))
    def session_ends(self, status: OutcomeStatus) -> None:
        """The runner is done: the session supervisor cancels the keeper."""
        assert self.world is not None
        assert self.model is not None
        observed = self.sync_model()  # everything before this instant
        self.outcome = Outcome(status, reason="model")
        self.model.finished_at = observed.now
        self.model.beats_at_end = sum(c.method == "heartbeat" for c in observed.calls)
        self.world.finish(self.outcome)

    def sync_model(self) -> Observed:
        assert self.world is not None
        assert self.model is not None
        observed = self.world.observe()
        beats = [c for c in observed.calls if c.method == "heartbeat"]
        for call in beats[self.seen :]:
            if call.ended_at is None:
                break  # still in flight (also past the session's end: it is shielded)
            self.model.observe(call)
            self.seen += 1
        return observed

    def final_stop_at(self, observed: Observed) -> float | None:
        """When the final stop goes out: at the end, or when the beat then in flight ended.

        ``None`` while that beat is still in flight. Which beats were made
        before the end is counted (`LeaseModel.beats_at_end`), not read from
        their send times: one sent at the very instant the session ended is
        in flight too, and the keeper waits for it.
        """
        assert self.model is not None
        end = self.model.finished_at
        before_end = self.model.beats_at_end
        assert end is not None
        assert before_end is not None
        beats = [c for c in observed.calls if c.method == "heartbeat"]
        for call in beats[:before_end]:
            if call.ended_at is None:
                return None
            end = max(end, call.ended_at)
        return end

    @invariant()
    def keeper_matches_the_model(self) -> None:
        if self.world is None or self.model is None:
            return
        observed = self.sync_model()
        model = self.model
        now = observed.now
        assert not observed.returned, "the keeper never returns by itself"

        # Ready exactly once the first beat succeeded in time, and only then.
        assert (observed.ready_at is not None) == model.ready

        # Lost exactly when the model says, never before, never later.
        due = model.loss_due()
        ended_first = model.finished_at is not None and (due is None or model.finished_at < due)
        if due is not None and now >= due + EPS and not ended_first:
            assert observed.lost is not None, f"must have been lost at {due} (now {now})"
        if observed.lost is not None:
            assert due is not None, f"lost without cause: {observed.lost.reason}"
            assert observed.lost_at is not None
            assert abs(observed.lost_at - due) <= EPS, f"lost at {observed.lost_at}, due {due}"
            assert observed.lease_lost == observed.lost.reason
        if due is None or now < due - EPS:
            assert observed.lost is None

        # Never alive past the deadline; the server's own expiry is later still.
        if observed.alive:
            assert now < model.deadline
            assert observed.server_expiry is None or observed.server_expiry > now, "split brain"

        # A stop was requested exactly when an answer asked for one.
        assert observed.stop_requested == model.stop_requested

        # No beat was skipped: the next one is overdue only if the keeper ended.
        if (
            model.next_window is not None
            and observed.lost is None
            and model.finished_at is None
            and now > model.next_window[1] + EPS
        ):
            in_flight = [c for c in observed.calls[-1:] if c.method == "heartbeat"]
            assert in_flight and in_flight[0].ended_at is None, (
                f"a heartbeat was due by {model.next_window[1]} (now {now})"
            )

        # The final stop: never after loss; once, with the token, when ended in time.
        stops = [c for c in observed.calls if c.method == "stop"]
        if observed.lost is not None or model.finished_at is None:
            assert stops == []
        else:
            end = self.final_stop_at(observed)
            if end is None:
                assert stops == [], "no stop while a beat is in flight"
            elif end < model.limit - EPS:
                assert 1 <= len(stops) <= 2, "one final stop (two when one answer behind)"
                first, last = stops[0], stops[-1]
                assert first.started_at == end
                assert first.args["expected_last_heartbeat"] == model.token
                if len(stops) == 2:
                    assert isinstance(first.error, FencingConflict)
                    assert first.error.current_token is not None
                    assert last.started_at == first.ended_at
                    assert last.args["expected_last_heartbeat"] == first.error.current_token
                    assert not isinstance(last.error, FencingConflict), "a refused stop retried"
                for stop in stops:
                    assert stop.ended_at is not None
                    assert not stop.cancelled, "the final stop is shielded from the cancellation"
                    assert stop.args["outcome"] == self.outcome
                    assert stop.args["force"] is True
            elif end > model.limit + EPS:
                assert stops == [], "no stop at or after the deadline"


TestLeaseMachine = LeaseMachine.TestCase
# max_examples comes from the hypothesis profile (tests/conftest.py): 100 by default.
TestLeaseMachine.settings = settings(stateful_step_count=40, deadline=None)


def test_model_flags_a_late_heartbeat() -> None:
    """The model itself rejects a beat sent at the deadline (it is not vacuous)."""
    model = LeaseModel(desired_ttl=9.0)
    ok = Call(
        method="heartbeat",
        args={"expected_last_heartbeat": NO_HEARTBEAT},
        started_at=0.0,
        ended_at=0.0,
        result=HeartbeatResult("hb-1", 9.0, WorkState.ACTIVE),
    )
    model.observe(ok)
    assert model.deadline == 0.8 * 9.0
    late = Call(
        method="heartbeat",
        args={"expected_last_heartbeat": "hb-1"},
        started_at=7.2,
        ended_at=7.2,
        result=HeartbeatResult("hb-2", 9.0, WorkState.ACTIVE),
    )
    with pytest.raises(AssertionError, match="deadline"):
        model.observe(late)


def test_a_session_ending_as_the_first_beat_leaves_waits_for_that_beat() -> None:
    """The falsifying example of a run, replayed step by step, then carried on.

    The session ends at 0, the instant its first beat went out (granted 0.3 s,
    answered only after 1 s). That beat is in flight: the keeper waits for it
    within its bound (``ttl/3`` of the desired 1.5 s, clamped to 0.5 s) and
    sends the final stop at 0.5 with ``NO_HEARTBEAT`` (refused: the short
    grant expired at 0.3). The model once took a beat sent at the end's own
    instant for one sent after it and demanded the stop at 0.
    """
    machine = LeaseMachine()
    try:
        machine.start(desired_ttl=1.5, first=[Reply(ttl=0.3, answer_delay=1.0)])
        machine.keeper_matches_the_model()
        for _ in range(12):  # what lets the session end (the rule's precondition)
            machine.queue_answers(batch=[Reply(ttl=0.3)])
            machine.keeper_matches_the_model()
        machine.session_ends(status=OutcomeStatus.COMPLETED)
        machine.keeper_matches_the_model()
        world = machine.world
        assert world is not None
        assert world.cp.calls_to("stop") == [], "no stop while the first beat is in flight"
        machine.advance(1.0)
        machine.keeper_matches_the_model()
        (beat,) = world.cp.calls_to("heartbeat")
        assert beat.started_at == 0.0 and beat.cancelled and beat.ended_at == pytest.approx(0.5)
        (stop,) = world.cp.calls_to("stop")
        assert stop.started_at == pytest.approx(0.5)
        assert stop.args["expected_last_heartbeat"] == NO_HEARTBEAT
        assert isinstance(stop.error, FencingConflict) and not stop.cancelled
        assert world.ready_at is None and world.lost is None and world.cancelled
    finally:
        machine.teardown()


def test_a_first_answer_after_the_session_ended_makes_nothing_ready() -> None:
    """The session ends while its first beat is in flight; the answer comes after.

    Found by a run near the first case: nobody waits for the lease any more, so
    the keeper is never ready (the model once said it must be); its final
    stop waits for that answer and carries the token it brought.
    """
    machine = LeaseMachine()
    try:
        machine.start(desired_ttl=1.5, first=[Reply(ttl=0.3, answer_delay=0.14)])
        machine.advance(0.1)
        machine.keeper_matches_the_model()
        machine.session_ends(status=OutcomeStatus.COMPLETED)
        machine.keeper_matches_the_model()
        machine.advance(1.0)
        machine.keeper_matches_the_model()
        world = machine.world
        assert world is not None
        (beat,) = world.cp.calls_to("heartbeat")
        assert beat.ok and beat.ended_at == pytest.approx(0.14)
        assert isinstance(beat.result, HeartbeatResult)
        (stop,) = world.cp.calls_to("stop")
        assert stop.ok and stop.started_at == pytest.approx(0.14)
        assert stop.args["expected_last_heartbeat"] == beat.result.last_heartbeat
        assert world.ready_at is None and world.lost is None and world.cancelled
    finally:
        machine.teardown()
