"""Wedge detection (DESIGN §3.5): the flag, the detectors, the circuit breaker, the requeue.

Unit tests under ``autojump_clock``; the worker end to end is in
``test_wedge_worker.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from supervisor import ConfigError, WedgeState, WorkerConfig
from supervisor._cli._settings import config_from_layers, read_environment, read_toml
from supervisor._worker._wedge import DEFAULT_WEDGE_PATTERNS, compile_wedge_patterns
from supervisor.controlplane import (
    NO_HEARTBEAT,
    HeartbeatResult,
    Outcome,
    OutcomeStatus,
    WorkItem,
    WorkState,
)
from supervisor.lowlevel import (
    ClaimGate,
    LeaseKeeper,
    Poller,
    SessionOutput,
    Slot,
    WedgeBreaker,
    WedgeDetector,
)
from supervisor.testing import ScriptedControlPlane

WEDGE_LINE = "Error: Control request timeout: initialize"


@attrs.define
class FakeRecord:
    """Stands in for a SessionRecord: remembers how it was cancelled."""

    work_id: str = "work-1"
    cancel_reason: OutcomeStatus | None = None
    cancel_detail: str | None = None
    cancels: int = 0

    def cancel(self, status: OutcomeStatus, detail: str) -> None:
        self.cancels += 1
        if self.cancel_reason is None:
            self.cancel_reason = status
            self.cancel_detail = detail


# --- WedgeState ---------------------------------------------------------------------------


async def test_mark_is_sticky_first_reason_wins_until_clear(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = WedgeState()
    assert not state.is_wedged
    await trio.sleep(5)
    assert state.mark("first") is True
    assert state.mark("second") is False
    assert (state.is_wedged, state.reason, state.since, state.marks) == (True, "first", 5.0, 1)
    assert state.clear() is True
    assert state.clear() is False
    assert (state.is_wedged, state.reason, state.since) == (False, None, None)
    assert state.mark("again") is True
    assert state.marks == 2


async def test_wait_changed_wakes_on_mark_and_on_clear() -> None:
    state = WedgeState()
    seen: list[bool] = []

    async def watch() -> None:
        for _ in range(2):
            await state.wait_changed()
            seen.append(state.is_wedged)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        state.mark("stuck")
        await trio.testing.wait_all_tasks_blocked()
        state.clear()
    assert seen == [True, False]


def test_a_wedge_needs_a_reason_and_may_be_marked_outside_trio() -> None:
    state = WedgeState()
    with pytest.raises(ValueError, match="reason"):
        state.mark("")
    assert state.mark("from a thread")
    assert state.since is None


def test_two_states_never_share_anything() -> None:
    """No module global: one worker's wedge is not another's."""
    a, b = WedgeState(), WedgeState()
    a.mark("stuck")
    assert not b.is_wedged


# --- output patterns -----------------------------------------------------------------------


def test_patterns_are_case_insensitive_regular_expressions() -> None:
    (default,) = compile_wedge_patterns(DEFAULT_WEDGE_PATTERNS)
    assert default.search(WEDGE_LINE)
    assert default.search("CONTROL REQUEST TIMEOUT")
    (custom,) = compile_wedge_patterns([r"stuck (forever|again)"])
    assert custom.search("Stuck Again!")
    assert not custom.search("stuck once")


@pytest.mark.parametrize("bad", ["(", "", "  "])
def test_a_bad_pattern_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match="wedge pattern"):
        compile_wedge_patterns([bad])


def test_a_matching_line_marks_the_worker_and_cancels_that_session_as_wedged() -> None:
    state = WedgeState()
    detector = WedgeDetector(state)
    quiet, stuck = FakeRecord("work-1"), FakeRecord("work-2")
    detector.on_line(quiet, "step 1/3")
    detector.on_line(stuck, WEDGE_LINE)
    assert quiet.cancels == 0
    assert (stuck.cancel_reason, stuck.cancel_detail) == (OutcomeStatus.WEDGED, WEDGE_LINE)
    assert (state.reason, detector.detections) == (WEDGE_LINE, 1)


def test_a_session_already_being_stopped_is_left_alone() -> None:
    state = WedgeState()
    detector = WedgeDetector(state)
    record = FakeRecord(cancel_reason=OutcomeStatus.CANCELLED)
    detector.on_line(record, WEDGE_LINE)
    assert (record.cancels, state.is_wedged, detector.detections) == (0, False, 0)


def test_a_second_wedge_keeps_the_first_reason_but_still_cancels_its_session() -> None:
    state = WedgeState()
    detector = WedgeDetector(state, patterns=["control request timeout", "panic"])
    first, second = FakeRecord("work-1"), FakeRecord("work-2")
    detector.on_line(first, WEDGE_LINE)
    detector.on_line(second, "PANIC: runtime gone")
    assert second.cancel_reason is OutcomeStatus.WEDGED
    assert second.cancel_detail == "PANIC: runtime gone"
    assert state.reason == WEDGE_LINE


def test_a_long_line_gives_a_short_reason() -> None:
    state = WedgeState()
    record = FakeRecord()
    WedgeDetector(state).on_line(record, WEDGE_LINE + " " + "x" * 5000)
    assert state.reason is not None
    assert len(state.reason) <= 300
    assert state.reason.startswith(WEDGE_LINE)


def test_no_patterns_turns_output_detection_off() -> None:
    state = WedgeState()
    record = FakeRecord()
    WedgeDetector(state, patterns=()).on_line(record, WEDGE_LINE)
    assert (record.cancels, state.is_wedged) == (0, False)


@pytest.mark.parametrize("timeout", [0, -1, math.inf, math.nan])
def test_the_silence_timeout_must_be_a_positive_number(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        WedgeDetector(WedgeState(), timeout=timeout)


# --- the silence watchdog ------------------------------------------------------------------


async def test_silence_for_wedge_timeout_cancels_the_session_as_wedged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Output every 10 s keeps it alive; after the last line, 60 s of silence wedges it."""
    state = WedgeState()
    detector = WedgeDetector(state, timeout=60.0)
    record = FakeRecord()
    output = SessionOutput()
    fired_at: list[float] = []
    last_output = 0.0

    async def agent() -> None:
        nonlocal last_output
        for n in range(10):  # 100 s of steady progress
            output.emit(f"step {n}")
            last_output = trio.current_time()
            await trio.sleep(10)
        await trio.sleep_forever()  # then nothing

    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent)
        await detector.watch(record, output)
        fired_at.append(trio.current_time())
        nursery.cancel_scope.cancel()
    assert record.cancel_reason is OutcomeStatus.WEDGED
    silence = fired_at[0] - last_output
    assert 60.0 <= silence <= 60.0 * 1.25
    assert state.reason is not None
    assert "no output" in state.reason
    assert "60" in state.reason


async def test_partial_lines_count_as_progress(autojump_clock: trio.testing.MockClock) -> None:
    """A progress bar without newlines is output too (any byte received counts)."""
    detector = WedgeDetector(WedgeState(), timeout=30.0)
    record = FakeRecord()
    output = SessionOutput()

    async def dots() -> None:
        while True:
            output.bytes_received += 1  # what the stream reader does for a chunk without "\n"
            await trio.sleep(20)

    with trio.move_on_after(300):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dots)
            await detector.watch(record, output)
    assert record.cancels == 0


async def test_without_a_timeout_the_watchdog_returns_at_once() -> None:
    detector = WedgeDetector(WedgeState())
    with trio.fail_after(1):
        await detector.watch(FakeRecord(), SessionOutput())


# --- the circuit breaker -------------------------------------------------------------------


async def test_the_breaker_is_a_claim_gate_that_is_open_while_healthy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = WedgeBreaker(WedgeState(), probe_interval=60)
    assert isinstance(breaker, ClaimGate)
    start = trio.current_time()
    for _ in range(3):
        await breaker.wait_for_permission()
        breaker.claim_result("work-x")
    assert trio.current_time() == start
    assert breaker.statistics().probes == 0


async def test_while_wedged_the_first_probe_comes_probe_interval_after_the_wedge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    await trio.sleep(7)
    state.mark("stuck")
    await trio.sleep(10)
    await breaker.wait_for_permission()
    assert trio.current_time() == 67
    breaker.claim_result("work-2")
    stats = breaker.statistics()
    assert (stats.open, stats.probes, stats.probe_work_id) == (True, 1, "work-2")


async def test_an_unused_probe_is_granted_again_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    state.mark("stuck")
    await breaker.wait_for_permission()
    breaker.claim_result(None)  # the queue was empty
    await breaker.wait_for_permission()
    assert trio.current_time() == 60
    assert breaker.statistics().probes == 0


async def test_no_second_probe_while_one_runs_nor_before_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    state.mark("stuck")
    await breaker.wait_for_permission()
    breaker.claim_result("probe-1")
    granted: list[float] = []

    async def claim_again() -> None:
        await breaker.wait_for_permission()
        granted.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim_again)
        await trio.sleep(500)
        assert granted == []  # the probe still runs
        breaker.session_ended("probe-1", OutcomeStatus.FAILED)  # at 560
        await trio.sleep(1)
        assert granted == [560]
    assert state.is_wedged


async def test_a_failed_probe_keeps_the_wedge_and_the_next_waits_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    state.mark("stuck")
    await breaker.wait_for_permission()  # t=60
    breaker.claim_result("probe-1")
    await trio.sleep(5)
    breaker.session_ended("probe-1", OutcomeStatus.WEDGED)
    await breaker.wait_for_permission()
    assert trio.current_time() == 120
    assert state.reason == "stuck"


async def test_a_completed_probe_clears_the_wedge_and_claims_flow_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    state.mark("stuck")
    await breaker.wait_for_permission()
    breaker.claim_result("probe-1")
    waiting: list[float] = []

    async def claim() -> None:
        await breaker.wait_for_permission()
        waiting.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim)
        await trio.sleep(3)
        breaker.session_ended("probe-1", OutcomeStatus.COMPLETED)
    assert not state.is_wedged
    assert waiting == [63]  # at once, not at the next probe time
    stats = breaker.statistics()
    assert (stats.open, stats.cleared, stats.next_probe_at) == (False, 1, None)
    for _ in range(3):  # full capacity: no more waiting
        await breaker.wait_for_permission()
        breaker.claim_result("work-n")
    assert trio.current_time() == 63


async def test_only_a_probe_clears_the_wedge(autojump_clock: trio.testing.MockClock) -> None:
    """A session that ran before the wedge proves nothing about starting new ones."""
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    state.mark("stuck")
    breaker.session_ended("older-session", OutcomeStatus.COMPLETED)
    assert state.is_wedged


async def test_a_wedge_cleared_elsewhere_reopens_claims_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    state.mark("stuck")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.wait_for_permission)
        await trio.sleep(10)
        state.clear()
    assert trio.current_time() == 10


async def test_a_new_wedge_restarts_the_probe_clock(autojump_clock: trio.testing.MockClock) -> None:
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    state.mark("first")
    await breaker.wait_for_permission()  # t=60
    breaker.claim_result("probe-1")
    breaker.session_ended("probe-1", OutcomeStatus.COMPLETED)
    await trio.sleep(100)  # t=160
    state.mark("second")
    await breaker.wait_for_permission()
    assert trio.current_time() == 220


@pytest.mark.parametrize("interval", [0, -1, math.inf])
def test_the_probe_interval_must_be_a_positive_number(interval: float) -> None:
    with pytest.raises(ValueError, match="probe_interval"):
        WedgeBreaker(WedgeState(), probe_interval=interval)


async def test_a_wedged_poller_makes_one_probe_claim_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The poller with the breaker: no poll while wedged but for the probes."""
    cp = ScriptedControlPlane()
    for n in range(3):
        await cp.submit(f"task {n}")
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    claimed: list[tuple[float, str]] = []

    async def on_claim(item: WorkItem, slot: Slot) -> None:
        claimed.append((trio.current_time(), item.id))
        slot.release()
        # The probe session could not even start (it ends inside the hand-over).
        breaker.session_ended(item.id, OutcomeStatus.FAILED)

    state.mark("stuck")
    poller = Poller(
        cp, worker_id="w", slots=trio.CapacityLimiter(4), on_claim=on_claim, gate=breaker
    )
    with trio.move_on_after(150):
        await poller.run()
    assert [t for t, _ in claimed] == [60, 120]
    assert all(c.started_at >= 60 for c in cp.calls_to("poll"))
    assert state.is_wedged


async def test_a_probe_that_completes_inside_the_hand_over_clears_the_wedge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane()
    for n in range(3):
        await cp.submit(f"task {n}")
    state = WedgeState()
    breaker = WedgeBreaker(state, probe_interval=60)
    claimed: list[float] = []

    async def on_claim(item: WorkItem, slot: Slot) -> None:
        claimed.append(trio.current_time())
        slot.release()
        breaker.session_ended(item.id, OutcomeStatus.COMPLETED)

    state.mark("stuck")
    poller = Poller(
        cp, worker_id="w", slots=trio.CapacityLimiter(4), on_claim=on_claim, gate=breaker
    )
    with trio.move_on_after(150):
        await poller.run()
    assert claimed == [60, 60, 60]
    assert not state.is_wedged


# --- the requeue: a wedged session's item goes back to the queue ---------------------------


async def _lease_for(cp: ScriptedControlPlane) -> tuple[WorkItem, LeaseKeeper]:
    item = await cp.submit("x")
    await cp.poll(worker_id="w")
    await cp.ack(item.id, worker_id="w")
    return item, LeaseKeeper(cp, item.id, desired_ttl=30)


async def test_a_wedged_session_is_requeued_not_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cp = ScriptedControlPlane()
    item, keeper = await _lease_for(cp)
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(keeper.run)
        await trio.sleep(20)
        lease.outcome = Outcome(OutcomeStatus.WEDGED, reason=WEDGE_LINE)
        nursery.cancel_scope.cancel()
    assert cp.calls_to("stop") == []
    (requeue,) = cp.calls_to("requeue")
    assert requeue.ok
    last_beat = [c.result for c in cp.calls_to("heartbeat") if c.ok][-1]
    assert isinstance(last_beat, HeartbeatResult)
    assert requeue.args["expected_last_heartbeat"] == last_beat.last_heartbeat
    got = await cp.get(item.id)
    assert (got.state, got.attempts, got.worker_id) == (WorkState.QUEUED, 1, None)


async def test_other_outcomes_still_stop_the_item(autojump_clock: trio.testing.MockClock) -> None:
    cp = ScriptedControlPlane()
    item, keeper = await _lease_for(cp)
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(keeper.run)
        lease.outcome = Outcome(OutcomeStatus.FAILED, exit_code=1)
        nursery.cancel_scope.cancel()
    assert cp.calls_to("requeue") == []
    assert (await cp.get(item.id)).state is WorkState.STOPPED


async def test_no_requeue_once_the_lease_was_lost(autojump_clock: trio.testing.MockClock) -> None:
    """Like the final stop: the item may belong to another worker by then."""
    cp = ScriptedControlPlane()
    _, keeper = await _lease_for(cp)
    async with trio.open_nursery() as nursery:
        lease = await nursery.start(keeper.run)
        lease.outcome = Outcome(OutcomeStatus.WEDGED, reason=WEDGE_LINE)
        lease.lost = "the lease moved on"
        nursery.cancel_scope.cancel()
    assert cp.calls_to("requeue") == []
    assert cp.calls_to("stop") == []


async def test_the_scripted_double_requeues_like_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Fenced, one more attempt, stopped on the last attempt."""
    cp = ScriptedControlPlane(max_attempts=2)
    item = await cp.submit("x")
    await cp.poll(worker_id="w")
    await cp.ack(item.id, worker_id="w")
    first = await cp.requeue(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert (first.state, first.attempts) == (WorkState.QUEUED, 1)
    assert await cp.poll(worker_id="w2") is not None
    await cp.ack(item.id, worker_id="w2")
    beat = await cp.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    wedged = Outcome(OutcomeStatus.WEDGED, reason=WEDGE_LINE)
    last = await cp.requeue(item.id, expected_last_heartbeat=beat.last_heartbeat, outcome=wedged)
    assert (last.state, last.attempts, last.outcome) == (WorkState.STOPPED, 2, wedged)


# --- settings ---------------------------------------------------------------------------------


def test_wedge_settings_come_from_toml_and_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "worker.toml"
    toml.write_text(
        'wedge_patterns = ["control request timeout", "session (lost|gone)"]\n'
        "wedge_timeout = 300\nprobe_interval = 45\n"
    )
    env = read_environment(
        {"SUPERVISOR_WEDGE_PATTERNS": "stuck,frozen", "SUPERVISOR_PRESENCE_INTERVAL": "15"}
    )
    from_file = config_from_layers(read_toml(toml))
    assert from_file.wedge_patterns == ("control request timeout", "session (lost|gone)")
    assert (from_file.wedge_timeout, from_file.probe_interval) == (300.0, 45.0)
    both = config_from_layers(read_toml(toml), env)
    assert both.wedge_patterns == ("stuck", "frozen")  # comma-separated, the later layer wins
    assert both.presence_interval == 15.0
    defaults = WorkerConfig()
    assert defaults.wedge_patterns == DEFAULT_WEDGE_PATTERNS
    assert (defaults.wedge_timeout, defaults.probe_interval, defaults.presence_interval) == (
        None,
        60.0,
        30.0,
    )


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"wedge_patterns": ["("]}, "wedge_patterns"),
        ({"wedge_patterns": [""]}, "wedge_patterns"),
        ({"wedge_timeout": 0}, "wedge_timeout"),
        ({"probe_interval": -5}, "probe_interval"),
        ({"presence_interval": math.inf}, "presence_interval"),
    ],
)
def test_bad_wedge_settings_are_errors_naming_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_layers(values)
    assert caught.value.key == key


def test_a_single_pattern_string_is_one_pattern() -> None:
    assert WorkerConfig(wedge_patterns="stuck").wedge_patterns == ("stuck",)
