"""The poller (DESIGN §3.3) under a mock clock against the scripted control plane."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from supervisor import ControlPlaneUnavailable, TransientError
from supervisor._worker._poller import OpenGate, PollerState, poll_backoff
from supervisor.controlplane import (
    BadRequest,
    Conflict,
    ControlPlane,
    EmbeddedControlPlane,
    NotFound,
    Unauthorized,
    WorkItem,
    WorkState,
)
from supervisor.lowlevel import ClaimGate, Poller, Slot
from supervisor.testing import ScriptedControlPlane


class Sessions:
    """Stands in for the sessions supervisor: records hand-overs, holds slots until told."""

    def __init__(self, cp: ScriptedControlPlane) -> None:
        self.cp = cp
        self.claimed: list[tuple[float, WorkItem, Slot]] = []

    async def on_claim(self, item: WorkItem, slot: Slot) -> None:
        # At hand-over the item is acknowledged for us and its slot is held.
        assert not slot.released
        assert item.state is WorkState.STARTING
        self.claimed.append((trio.current_time(), item, slot))
        await trio.lowlevel.checkpoint()

    def finish(self, index: int) -> None:
        self.claimed[index][2].release()


async def submit(cp: ScriptedControlPlane, n: int) -> list[str]:
    return [(await cp.submit(f"task {i}")).id for i in range(n)]


def poll_starts(cp: ScriptedControlPlane) -> list[float]:
    return [c.started_at for c in cp.calls_to("poll")]


async def test_backoff_sequence() -> None:
    """``poll_backoff`` is 1, 2, 4, ... capped at 60."""
    assert [poll_backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert poll_backoff(10_000) == 60


async def test_slot_is_taken_before_polling(autojump_clock: trio.testing.MockClock) -> None:
    """With every slot busy the poller does not poll at all; a freed slot lets one poll through."""
    cp = ScriptedControlPlane()
    await submit(cp, 5)
    slots = trio.CapacityLimiter(2)
    sessions = Sessions(cp)
    poller = Poller(cp, worker_id="w", slots=slots, on_claim=sessions.on_claim, block_ms=500)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        await trio.sleep(1000)
        assert len(sessions.claimed) == 2
        assert len(cp.calls_to("poll")) == 2, "no poll while both slots are busy"
        assert poller.statistics().state is PollerState.WAITING_FOR_SLOT
        # The three other items were never handed out: no lease on work we cannot start.
        queued = await cp.list_work(state=WorkState.QUEUED)
        assert len(queued) == 3
        sessions.finish(0)
        await trio.sleep(1000)
        assert len(sessions.claimed) == 3
        assert len(cp.calls_to("poll")) == 3
        nursery.cancel_scope.cancel()


async def test_no_poll_at_all_when_capacity_is_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Slots held elsewhere (e.g. draining sessions) mean no poll, however long we wait."""
    cp = ScriptedControlPlane()
    await submit(cp, 1)
    slots = trio.CapacityLimiter(1)
    held = object()
    await slots.acquire_on_behalf_of(held)
    sessions = Sessions(cp)
    poller = Poller(cp, worker_id="w", slots=slots, on_claim=sessions.on_claim)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        await trio.sleep(3600)
        assert cp.calls_to("poll") == []
        slots.release_on_behalf_of(held)
        await trio.sleep(1)
        assert [item.id for _, item, _ in sessions.claimed] == ["work-1"]
        nursery.cancel_scope.cancel()


async def test_never_more_claims_than_slots(autojump_clock: trio.testing.MockClock) -> None:
    """Sessions of random length: claimed-and-unfinished items never exceed the slots."""
    cp = ScriptedControlPlane()
    await submit(cp, 40)
    slots = trio.CapacityLimiter(3)
    rng = random.Random(3)
    running = 0
    peak = 0
    done = 0

    async def session(slot: Slot) -> None:
        nonlocal running, done
        try:
            await trio.sleep(rng.uniform(0.1, 20))
        finally:
            running -= 1
            done += 1
            slot.release()

    async with trio.open_nursery() as nursery:

        async def on_claim(item: WorkItem, slot: Slot) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            # Every acknowledged item is held in a slot the moment it is acknowledged.
            assert slots.borrowed_tokens == running
            nursery.start_soon(session, slot)

        poller = Poller(cp, worker_id="w", slots=slots, on_claim=on_claim, block_ms=500, rng=rng)
        nursery.start_soon(poller.run)
        while done < 40:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert peak == 3
    assert len(cp.calls_to("ack")) == 40
    assert slots.borrowed_tokens == 0


async def test_transient_errors_back_off_exponentially_then_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Failures pause 1, 2, 4, ..., 60 s (+ under 1 s of jitter); a success resets the count."""
    cp = ScriptedControlPlane()
    await submit(cp, 2)
    cp.fail_next("poll", TransientError("503", status_code=503), times=8)
    sessions = Sessions(cp)

    async def on_claim(item: WorkItem, slot: Slot) -> None:
        await sessions.on_claim(item, slot)
        slot.release()
        if len(sessions.claimed) == 1:
            cp.fail_next("poll", ControlPlaneUnavailable("connection refused"), times=3)

    poller = Poller(
        cp,
        worker_id="w",
        slots=trio.CapacityLimiter(1),
        on_claim=on_claim,
        block_ms=500,
        rng=random.Random(11),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        while len(sessions.claimed) < 2:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    starts = poll_starts(cp)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    first_run, second_run = gaps[:8], gaps[9:12]
    for gap, base in zip(first_run, [1, 2, 4, 8, 16, 32, 60, 60], strict=True):
        assert base <= gap < base + 1
    assert gaps[8] == 0, "right after the claim the next poll goes out at once"
    for gap, base in zip(second_run, [1, 2, 4], strict=True):
        assert base <= gap < base + 1
    assert len(set(gaps[:8]) - {1, 2, 4, 8, 16, 32, 60}) > 0, "jitter is applied"
    stats = poller.statistics()
    assert stats.errors == 11
    assert stats.consecutive_errors == 0
    assert stats.claims == 2


async def test_backoff_logs_one_warning_per_outage(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A long outage gives one warning (details at DEBUG) and one recovery line."""
    caplog.set_level(logging.DEBUG, logger="supervisor.poller")
    cp = ScriptedControlPlane()
    cp.fail_next("poll", TransientError("503", status_code=503), times=20)
    sessions = Sessions(cp)
    poller = Poller(cp, worker_id="w", slots=trio.CapacityLimiter(1), on_claim=sessions.on_claim)
    with trio.move_on_after(2000):
        await poller.run()
    assert [r.levelname for r in caplog.records if r.levelno >= logging.INFO] == [
        "WARNING",
        "INFO",
    ]


@pytest.mark.parametrize("block_ms", [0, 500])
async def test_empty_poll_pause(autojump_clock: trio.testing.MockClock, block_ms: int) -> None:
    """Empty: 1-3 s random pause without long poll; at once after a real long poll."""
    cp = ScriptedControlPlane()
    sessions = Sessions(cp)
    poller = Poller(
        cp,
        worker_id="w",
        slots=trio.CapacityLimiter(1),
        on_claim=sessions.on_claim,
        block_ms=block_ms,
        rng=random.Random(5),
    )
    with trio.move_on_after(100):
        await poller.run()
    calls = cp.calls_to("poll")
    assert len(calls) > 10
    for before, after in itertools.pairwise(calls):
        assert before.ended_at is not None
        pause = after.started_at - before.ended_at
        if block_ms:
            assert before.ended_at - before.started_at == pytest.approx(0.5)
            assert pause == 0
        else:
            assert 1 <= pause <= 3
    if not block_ms:
        assert len({round(c.started_at, 6) for c in calls}) == len(calls)
        assert poller.statistics().empty_polls >= 10


class ImpatientPlane(ScriptedControlPlane):
    """A control plane that ignores ``block_ms`` and answers empty polls at once."""

    async def poll(
        self,
        *,
        worker_id: str | None = None,
        block_ms: int = 0,
        reclaim_older_than_ms: int | None = None,
        labels: Sequence[str] | None = None,
    ) -> WorkItem | None:
        return await super().poll(
            worker_id=worker_id, reclaim_older_than_ms=reclaim_older_than_ms, labels=labels
        )


async def test_empty_poll_that_did_not_wait_still_pauses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """block_ms > 0 but the server answered at once: the pause applies (no busy loop)."""
    cp = ImpatientPlane()
    poller = Poller(
        cp, worker_id="w", slots=trio.CapacityLimiter(1), on_claim=Sessions(cp).on_claim
    )
    with trio.move_on_after(30):
        await poller.run()
    assert 10 <= len(cp.calls_to("poll")) <= 31


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(Unauthorized("invalid environment key"), id="401"),
        pytest.param(NotFound("unknown environment 'prod'"), id="404"),
        pytest.param(BadRequest("block_ms out of range"), id="400"),
    ],
)
async def test_fatal_poll_error_raises_once_with_a_clear_message(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    """A fatal 4xx stops the poller at once, logged once even across restarts; slot given back."""
    caplog.set_level(logging.DEBUG, logger="supervisor.poller")
    cp = ScriptedControlPlane()
    slots = trio.CapacityLimiter(1)
    poller = Poller(cp, worker_id="w", slots=slots, on_claim=Sessions(cp).on_claim)
    for _restart in range(3):
        cp.fail_next("poll", error)
        with pytest.raises(type(error)) as info:
            await poller.run()
        assert info.value is error
        assert slots.borrowed_tokens == 0
    assert len(cp.calls_to("poll")) == 3, "no retry of a fatal poll"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert str(error) in message
    assert type(error).__name__ in message
    assert "environment key" in message
    assert poller.statistics().state is PollerState.STOPPED


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(Conflict("already acknowledged"), id="409"),
        pytest.param(NotFound("no such item"), id="404"),
    ],
)
async def test_refused_ack_skips_the_item_and_frees_the_slot(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """An ack refused for that item: logged, skipped, slot released, next item claimed."""
    cp = ScriptedControlPlane()
    await submit(cp, 2)
    cp.fail_next("ack", error)
    slots = trio.CapacityLimiter(1)
    sessions = Sessions(cp)
    poller = Poller(cp, worker_id="w", slots=slots, on_claim=sessions.on_claim, block_ms=500)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [item.id for _, item, _ in sessions.claimed] == ["work-2"]
    assert slots.borrowed_tokens == 1  # held by the one session only
    assert poller.statistics().skipped == 1
    assert any("work-1" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


async def test_transient_ack_error_backs_off_and_gives_the_slot_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed ack releases the slot, backs off, and the item is claimed after reclaim."""
    cp = ScriptedControlPlane(reclaim_ms=5_000)
    await submit(cp, 1)
    cp.fail_next("ack", TransientError("502", status_code=502))
    slots = trio.CapacityLimiter(1)
    sessions = Sessions(cp)
    poller = Poller(cp, worker_id="w", slots=slots, on_claim=sessions.on_claim, block_ms=500)
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        await trio.sleep(0.9)
        assert slots.borrowed_tokens == 1  # holding the slot through the backoff
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    (claimed_at, item, _slot) = sessions.claimed[0]
    assert item.id == "work-1"
    assert claimed_at >= 5.0, "handed out again only after the reclaim window"


class LostAckAnswer(ScriptedControlPlane):
    """The first ack takes effect, but its answer is lost (the server died before replying)."""

    lost = 0

    async def ack(self, work_id: str, *, worker_id: str | None = None) -> WorkItem:
        item = await super().ack(work_id, worker_id=worker_id)
        if self.lost == 0:
            self.lost += 1
            raise ControlPlaneUnavailable("server disconnected without sending a response")
        return item


async def test_an_ack_that_landed_although_its_answer_was_lost_is_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Ours (starting, bound to us): handed over at once, no reclaim, no attempt lost."""
    cp = LostAckAnswer(reclaim_ms=5_000)
    await submit(cp, 1)
    sessions = Sessions(cp)
    poller = Poller(cp, worker_id="w", slots=trio.CapacityLimiter(1), on_claim=sessions.on_claim)
    with trio.move_on_after(30):
        await poller.run()
    assert cp.lost == 1
    [(claimed_at, item, _slot)] = sessions.claimed
    assert item.id == "work-1" and item.worker_id == "w"
    assert item.secret == "scripted-secret-work-1"
    assert claimed_at < 1.0, "taken at once, not after the reclaim window"


async def test_fatal_ack_error_raises(autojump_clock: trio.testing.MockClock) -> None:
    """An ack refused for a reason that concerns every item (401) stops the poller."""
    cp = ScriptedControlPlane()
    await submit(cp, 1)
    cp.fail_next("ack", Unauthorized("key revoked"))
    slots = trio.CapacityLimiter(1)
    poller = Poller(cp, worker_id="w", slots=slots, on_claim=Sessions(cp).on_claim)
    with pytest.raises(Unauthorized):
        await poller.run()
    assert slots.borrowed_tokens == 0


async def test_hand_over_passes_the_acknowledged_item_with_its_secret(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """on_claim gets the item as acknowledged (starting, ours) with the poll's session secret."""
    cp = ScriptedControlPlane()
    await submit(cp, 1)
    sessions = Sessions(cp)
    poller = Poller(cp, worker_id="w-1", slots=trio.CapacityLimiter(1), on_claim=sessions.on_claim)
    with trio.move_on_after(5):
        await poller.run()
    (_, item, _) = sessions.claimed[0]
    assert item.state is WorkState.STARTING
    assert item.worker_id == "w-1"
    assert item.secret == "scripted-secret-work-1"
    assert "scripted-secret" not in repr(item)


async def test_on_claim_failure_releases_the_slot_and_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If the hand-over raises, the poller gives the slot back and crashes with that error."""
    cp = ScriptedControlPlane()
    await submit(cp, 1)
    slots = trio.CapacityLimiter(1)

    async def broken(item: WorkItem, slot: Slot) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("sessions supervisor is gone")

    poller = Poller(cp, worker_id="w", slots=slots, on_claim=broken)
    with pytest.raises(RuntimeError, match="sessions supervisor"):
        await poller.run()
    assert slots.borrowed_tokens == 0


@pytest.mark.parametrize("where", ["waiting for the gate", "polling", "in the empty pause"])
async def test_cancel_without_claim_releases_the_slot(
    autojump_clock: trio.testing.MockClock, where: str
) -> None:
    """Cancelled while holding a slot but no item: the slot is returned."""
    cp = ScriptedControlPlane()
    slots = trio.CapacityLimiter(1)
    gate = ManualGate(is_open=where != "waiting for the gate")
    poller = Poller(
        cp,
        worker_id="w",
        slots=slots,
        on_claim=Sessions(cp).on_claim,
        gate=gate,
        block_ms=0 if where == "in the empty pause" else 10_000,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        await trio.sleep(0.5)
        assert slots.borrowed_tokens == 1
        nursery.cancel_scope.cancel()
    assert slots.borrowed_tokens == 0


async def test_slot_release_is_idempotent() -> None:
    """Releasing a slot twice gives back one token, not two (and does not raise)."""
    slots = trio.CapacityLimiter(2)
    slot = Slot(slots)
    await slot.acquire()
    other = Slot(slots)
    await other.acquire()
    slot.release()
    slot.release()
    assert slot.released
    assert slots.borrowed_tokens == 1
    other.release()


class ManualGate:
    """A gate a test opens and closes; records what the poller reports back."""

    def __init__(self, *, is_open: bool = True) -> None:
        self._open = trio.Event()
        if is_open:
            self._open.set()
        self.permissions = 0
        self.results: list[str | None] = []

    def open(self) -> None:
        self._open.set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    async def wait_for_permission(self) -> None:
        await self._open.wait()
        self.permissions += 1

    def claim_result(self, work_id: str | None) -> None:
        self.results.append(work_id)


class ProbeGate:
    """A tripped breaker: one probe claim per ``probe_interval``, re-granted if unused."""

    def __init__(self, probe_interval: float) -> None:
        self.probe_interval = probe_interval
        self._next_probe = 0.0

    async def wait_for_permission(self) -> None:
        await trio.sleep_until(self._next_probe)
        self._next_probe = trio.current_time() + self.probe_interval

    def claim_result(self, work_id: str | None) -> None:
        if work_id is None:
            self._next_probe = trio.current_time()  # the probe claimed nothing: try again


async def test_gates_satisfy_the_protocol() -> None:
    """The default gate and the test gates are ClaimGates."""
    for gate in (OpenGate(), ManualGate(), ProbeGate(1.0)):
        assert isinstance(gate, ClaimGate)


async def test_closed_gate_pauses_claims(autojump_clock: trio.testing.MockClock) -> None:
    """While the gate is closed nothing is polled; opening it resumes claiming."""
    cp = ScriptedControlPlane()
    await submit(cp, 3)
    gate = ManualGate(is_open=False)
    sessions = Sessions(cp)

    async def on_claim(item: WorkItem, slot: Slot) -> None:
        await sessions.on_claim(item, slot)
        slot.release()
        gate.close()  # e.g. this session turned out wedged

    poller = Poller(
        cp,
        worker_id="w",
        slots=trio.CapacityLimiter(4),
        on_claim=on_claim,
        gate=gate,
        block_ms=500,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        await trio.sleep(600)
        assert cp.calls_to("poll") == []
        assert poller.statistics().state is PollerState.PAUSED
        gate.open()
        await trio.sleep(600)
        assert len(sessions.claimed) == 1
        assert len(cp.calls_to("poll")) == 1
        gate.open()
        await trio.sleep(1)
        assert len(sessions.claimed) == 2
        nursery.cancel_scope.cancel()
    assert gate.results == ["work-1", "work-2"]


async def test_probe_gate_allows_one_claim_per_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Through a probing breaker, claims are spaced by the probe interval; empty probes retry."""
    cp = ScriptedControlPlane()
    await submit(cp, 3)
    sessions = Sessions(cp)

    async def on_claim(item: WorkItem, slot: Slot) -> None:
        await sessions.on_claim(item, slot)
        slot.release()

    poller = Poller(
        cp,
        worker_id="w",
        slots=trio.CapacityLimiter(4),
        on_claim=on_claim,
        gate=ProbeGate(probe_interval=60),
        block_ms=500,
    )
    with trio.move_on_after(200):
        await poller.run()
    assert [t for t, _, _ in sessions.claimed] == [0, 60, 120]
    # After the queue ran dry, the unused probe is granted again at once (long polls).
    late = [c.started_at for c in cp.calls_to("poll") if c.started_at > 120]
    assert late
    assert late[0] == 180


async def test_poller_validates_options() -> None:
    """Negative block_ms or reclaim window is refused."""
    cp = ScriptedControlPlane()
    slots = trio.CapacityLimiter(1)
    with pytest.raises(ValueError, match="block_ms"):
        Poller(cp, worker_id="w", slots=slots, on_claim=Sessions(cp).on_claim, block_ms=-1)
    with pytest.raises(ValueError, match="reclaim_older_than_ms"):
        Poller(
            cp,
            worker_id="w",
            slots=slots,
            on_claim=Sessions(cp).on_claim,
            reclaim_older_than_ms=-5,
        )


class CountingClaims:
    """The real embedded plane (SQLite file, inline calls), counting its claim calls."""

    def __init__(self, inner: EmbeddedControlPlane) -> None:
        self.inner = inner
        self.claims: list[int] = []  # items each claim call returned
        self.limits: list[int] = []  # slots each claim call was made for
        self.polls = 0

    @property
    def environment_id(self) -> str:
        return self.inner.environment_id

    async def claim(self, **kwargs: Any) -> list[WorkItem]:
        self.limits.append(kwargs["limit"])
        items: list[WorkItem] = await self.inner.claim(**kwargs)
        self.claims.append(len(items))
        return items

    async def poll(self, **kwargs: Any) -> WorkItem | None:
        self.polls += 1
        return await self.inner.poll(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def run_for(poller: Poller, seconds: float) -> None:
    """Run ``poller`` for ``seconds`` (on the mock clock), then stop it."""
    with trio.move_on_after(seconds):
        await poller.run()


async def test_a_batch_claim_fills_every_free_slot_in_one_call(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Slots first, then one claim for all of them; unused slots go back at once."""
    async with EmbeddedControlPlane(tmp_path / "cp.sqlite3", threaded=False) as inner:
        cp = CountingClaims(inner)
        for n in range(7):
            await inner.submit(f"task {n}")
        slots = trio.CapacityLimiter(3)
        held: list[Slot] = []
        seen: list[int] = []

        async def on_claim(item: WorkItem, slot: Slot) -> None:
            assert item.state is WorkState.STARTING and item.secret is not None
            held.append(slot)
            seen.append(slots.borrowed_tokens)
            await trio.lowlevel.checkpoint()

        poller = Poller(
            cast(ControlPlane, cp),
            worker_id="w",
            slots=slots,
            on_claim=on_claim,
            block_ms=500,
            max_batch=3,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run)
            await trio.sleep(1)
            assert cp.claims[0] == 3 and len(held) == 3  # one call, every slot
            assert slots.borrowed_tokens == 3
            for slot in held[:2]:
                slot.release()
            await trio.sleep(1)
            assert len(held) == 5  # the two freed slots, refilled together
            for slot in held[2:]:
                slot.release()
            await trio.sleep(1)
            assert len(held) == 7
            # two sessions hold theirs; the poller holds the third for its next claim
            assert slots.borrowed_tokens == 3
            nursery.cancel_scope.cancel()
        assert cp.polls == 0
        assert cp.claims[:3] == [3, 2, 2]
        # The third claim was made for three slots and got two items: the unused
        # slot went back, so the next claim could only be made for one.
        assert cp.limits[:4] == [3, 2, 3, 1]
        assert poller.statistics().claims == 7
        assert max(seen) <= 3


async def test_a_gate_that_grants_single_claims_gets_one_item_per_permission(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A circuit breaker's probe (any gate without ``permitted_claims``) claims one item."""
    async with EmbeddedControlPlane(tmp_path / "cp.sqlite3", threaded=False) as inner:
        cp = CountingClaims(inner)
        for n in range(3):
            await inner.submit(f"task {n}")
        slots = trio.CapacityLimiter(3)
        gate = ManualGate()
        got: list[WorkItem] = []

        async def on_claim(item: WorkItem, slot: Slot) -> None:
            got.append(item)
            await trio.lowlevel.checkpoint()

        poller = Poller(
            cast(ControlPlane, cp),
            worker_id="w",
            slots=slots,
            on_claim=on_claim,
            block_ms=500,
            gate=gate,
            max_batch=3,
        )
        await run_for(poller, 1.0)
        assert len(got) == 3
        assert cp.claims[:3] == [1, 1, 1]
        assert gate.results[:3] == [item.id for item in got]


async def test_max_batch_1_keeps_to_poll_and_ack(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with EmbeddedControlPlane(tmp_path / "cp.sqlite3", threaded=False) as inner:
        cp = CountingClaims(inner)
        await inner.submit("task")
        got: list[WorkItem] = []

        async def on_claim(item: WorkItem, slot: Slot) -> None:
            got.append(item)
            await trio.lowlevel.checkpoint()

        poller = Poller(
            cast(ControlPlane, cp),
            worker_id="w",
            slots=trio.CapacityLimiter(3),
            on_claim=on_claim,
            block_ms=500,
        )
        await run_for(poller, 1.0)
        assert len(got) == 1 and got[0].state is WorkState.STARTING
        assert cp.claims == [] and cp.polls >= 1
    with pytest.raises(ValueError, match="max_batch"):
        Poller(
            cast(ControlPlane, cp),
            worker_id="w",
            slots=trio.CapacityLimiter(1),
            on_claim=on_claim,
            max_batch=0,
        )


@pytest.mark.parametrize("max_batch", [1, 3])
async def test_with_claim_leases_each_slot_carries_its_items_grant(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, max_batch: int
) -> None:
    """A store in this process grants each first lease in the claim: the items come
    ``active``, and the slot of each carries the grant its lease keeper starts from."""
    async with EmbeddedControlPlane(tmp_path / "cp.sqlite3", threaded=False) as inner:
        cp = CountingClaims(inner)
        for n in range(4):
            await inner.submit(f"task {n}")
        got: list[tuple[WorkItem, Slot]] = []

        async def on_claim(item: WorkItem, slot: Slot) -> None:
            got.append((item, slot))
            await trio.lowlevel.checkpoint()

        poller = Poller(
            cast(ControlPlane, cp),
            worker_id="w",
            slots=trio.CapacityLimiter(4),
            on_claim=on_claim,
            block_ms=500,
            max_batch=max_batch,
            claim_leases=True,
            lease_ttl=20.0,
        )
        await run_for(poller, 1.0)
        assert len(got) == 4
        for item, slot in got:
            assert item.state is WorkState.ACTIVE
            assert slot.grant is not None and slot.grant.item.id == item.id
            assert slot.grant.heartbeat.ttl_seconds == 20.0
        assert cp.polls == 0 and cp.limits == []  # leased claims only


async def test_every_poll_carries_the_workers_labels_and_the_fake_routes_by_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The scripted fake hands a labelled item only to a poller with all its labels."""
    cp = ScriptedControlPlane()
    routed = await cp.submit("on the gpu", labels=["repo:foo", "gpu"])
    plain = await cp.submit("anywhere")
    assert routed.labels == ("gpu", "repo:foo")
    taken = await cp.poll(worker_id="half", labels=["gpu"])
    assert taken is not None and taken.id == plain.id
    await cp.ack(plain.id, worker_id="half")
    assert await cp.poll(worker_id="half", labels=["gpu"]) is None
    with pytest.raises(BadRequest, match="bad label"):
        await cp.poll(worker_id="bad", labels=["a b"])
    sessions = Sessions(cp)
    poller = Poller(
        cp,
        worker_id="w",
        slots=trio.CapacityLimiter(2),
        on_claim=sessions.on_claim,
        block_ms=500,
        labels=("gpu", "repo:foo"),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(poller.run)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert [item.id for _, item, _ in sessions.claimed] == [routed.id]
    mine = [c for c in cp.calls_to("poll") if c.args["worker_id"] == "w"]
    assert mine and all(c.args["labels"] == ("gpu", "repo:foo") for c in mine)
