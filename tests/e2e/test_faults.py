"""FaultyControlPlane, MemoryWorkspaces, and the poller's ack bound the simulator called for.

The wrapper is a test double: its tests run it over the embedded control
plane (the ``plane`` fixture: store calls in the Trio thread, the store's time
Trio's), under ``autojump_clock``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from supervisor import ControlPlaneUnavailable, TransientError
from supervisor.controlplane import (
    NO_HEARTBEAT,
    ControlPlane,
    EmbeddedControlPlane,
    FencingConflict,
    LeasePolicy,
    Unauthorized,
    WorkItem,
    WorkState,
)
from supervisor.lowlevel import Poller, Slot
from supervisor.testing import CallRecord, Fault, FaultKind, FaultyControlPlane, MemoryWorkspaces


@pytest.fixture
def store_options() -> dict[str, Any]:
    return {"lease_policy": LeasePolicy(default_ttl=6.0, min_ttl=0.5)}


def link(
    plane: ControlPlane, *faults: Fault, records: list[CallRecord] | None = None
) -> FaultyControlPlane:
    observer = records.append if records is not None else None
    return FaultyControlPlane(
        plane, faults, worker=0, rng=random.Random(1), name="w0", observer=observer
    )


async def claimed(plane: ControlPlane) -> WorkItem:
    await plane.submit("task")
    item = await plane.poll(worker_id="w0")
    assert item is not None
    return await plane.ack(item.id, worker_id="w0")


async def test_faulty_control_plane_is_a_control_plane(plane: EmbeddedControlPlane) -> None:
    faulty = link(plane)
    assert isinstance(faulty, ControlPlane)
    assert faulty.environment_id == plane.environment_id
    with pytest.raises(AttributeError):
        faulty._private  # noqa: B018 - the lookup itself is the test


async def test_no_faults_passes_calls_through_and_reports_them(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    records: list[CallRecord] = []
    faulty = link(plane, records=records)
    item = await claimed(faulty)
    assert item.state is WorkState.STARTING
    assert [(r.op, r.processed, r.error) for r in records] == [
        ("submit", True, None),
        ("poll", True, None),
        ("ack", True, None),
    ]
    assert records[1].work_id == records[2].work_id == item.id  # the poll names what it got
    assert trio.current_time() == 0.0


async def test_latency_delays_the_request_and_the_answer(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    slow = Fault(FaultKind.LATENCY, 0, 0.0, duration=100.0, delay=(2, 2), response_delay=(3, 3))
    faulty = link(plane, slow)
    item = await faulty.submit("task")
    assert trio.current_time() == 5.0
    # The control plane recorded the item when the request arrived, not when the answer did.
    assert item.created_at == 1_700_000_000.0 + 2.0


async def test_latency_ends_with_its_window(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = link(plane, Fault(FaultKind.LATENCY, 0, 0.0, duration=1.0, delay=(5, 5)))
    await trio.sleep(1.0)
    await faulty.submit("task")
    assert trio.current_time() == 1.0


async def test_a_partition_holds_calls_until_it_heals(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = link(plane, Fault(FaultKind.PARTITION, 0, 1.0, duration=9.0))
    await trio.sleep(2.0)
    item = await faulty.submit("task")
    assert trio.current_time() == 10.0
    assert item.created_at == 1_700_000_000.0 + 10.0


async def test_a_partition_holds_an_answer_back_after_the_request_was_processed(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    records: list[CallRecord] = []
    faulty = link(
        plane,
        Fault(FaultKind.LATENCY, 0, 0.0, duration=5.0, response_delay=(1, 1)),
        Fault(FaultKind.PARTITION, 0, 0.5, duration=10.0),
        records=records,
    )
    with trio.move_on_after(3.0):
        await faulty.submit("task")
    assert records[-1].processed and records[-1].error == "cancelled"
    assert len(await plane.list_work()) == 1  # it happened; the caller never heard


async def test_a_killed_link_hangs_every_call_until_revived(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    records: list[CallRecord] = []
    faulty = link(plane, records=records)
    faulty.kill()
    assert faulty.dead
    with trio.move_on_after(1000.0) as scope:
        await faulty.submit("never arrives")
    assert scope.cancelled_caught
    assert await plane.list_work() == []
    assert records[-1].error == "cancelled" and not records[-1].processed
    faulty.revive()
    await faulty.submit("arrives")
    assert len(await plane.list_work()) == 1


async def test_errors_answer_503_without_processing(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = link(plane, Fault(FaultKind.ERRORS, 0, 0.0, duration=10.0, rate=1.0))
    with pytest.raises(TransientError) as caught:
        await faulty.submit("task")
    assert caught.value.status_code == 503
    assert await plane.list_work() == []
    assert faulty.injected == {"errors": 1}


async def test_error_rate_is_a_probability_per_call(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = link(plane, Fault(FaultKind.ERRORS, 0, 0.0, duration=10.0, rate=0.5))
    failures = 0
    for _ in range(200):
        try:
            await faulty.stats()
        except TransientError:
            failures += 1
    assert 60 < failures < 140


async def test_timeouts_answer_late_and_some_were_processed_anyway(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    records: list[CallRecord] = []
    timeouts = Fault(FaultKind.TIMEOUTS, 0, 0.0, duration=1e6, rate=1.0, timeout=4.0)
    faulty = link(plane, timeouts, records=records)
    for n in range(20):
        started = trio.current_time()
        with pytest.raises(ControlPlaneUnavailable):
            await faulty.submit(f"task {n}")
        assert trio.current_time() - started == 4.0
    processed = sum(r.processed for r in records)
    assert 0 < processed < 20
    assert len(await plane.list_work()) == processed  # the ambiguous case, both ways


async def test_fencing_fault_hits_only_lease_calls(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = link(plane, Fault(FaultKind.FENCING, 0, 0.0, count=1))
    item = await claimed(faulty)  # submit, poll and ack are not lease calls
    with pytest.raises(FencingConflict):
        await faulty.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    beat = await faulty.heartbeat(item.id, expected_last_heartbeat=NO_HEARTBEAT)
    assert beat.lease_extended  # the injected 412 never reached the control plane


async def test_unauthorized_burst_answers_the_next_calls_only(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = link(plane, Fault(FaultKind.UNAUTHORIZED, 0, 5.0, count=2))
    await faulty.stats()  # before the burst
    await trio.sleep(5.0)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await faulty.stats()
    await faulty.stats()
    assert faulty.injected == {"unauthorized": 2}


async def test_revoked_key_answers_401_for_good(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    faulty = link(plane, Fault(FaultKind.REVOKED, 0, 1.0))
    await faulty.stats()
    await trio.sleep(1.0)
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await faulty.poll(worker_id="w0")


async def test_faults_of_other_workers_do_not_apply(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    other = Fault(FaultKind.ERRORS, 1, 0.0, duration=10.0, rate=1.0)
    await link(plane, other).submit("task")
    assert len(await plane.list_work()) == 1


def test_fault_records_validate_and_describe_themselves() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - attrs names the field
        Fault(FaultKind.ERRORS, 0, 0.0, rate=1.5)
    with pytest.raises(ValueError, match="low <= high"):
        Fault(FaultKind.LATENCY, 0, 0.0, delay=(2, 1))
    window = Fault(FaultKind.PARTITION, 1, 2.0, duration=3.0)
    assert window.end == 5.0
    assert window.covers(2.0) and not window.covers(5.0)
    assert window.describe() == "partition w1 t=2.000 for 3.000s"
    assert Fault("fencing", 0, 1.0, count=1).describe() == "fencing w0 t=1.000 x1"
    assert Fault(FaultKind.KILL, 0, 1.0, duration=math.inf).end == math.inf


async def test_memory_workspaces_hand_out_unique_paths_and_touch_no_disk(
    tmp_path: Path,
) -> None:
    spaces = MemoryWorkspaces(root=tmp_path / "ws")
    async with spaces.open("../evil id") as first, spaces.open("../evil id") as second:
        assert first != second
        assert first.parent == tmp_path / "ws"
        assert ".." not in first.name
        assert spaces.active == 2
    assert not (tmp_path / "ws").exists()
    assert (spaces.opened, spaces.closed, spaces.active) == (2, 2, 0)


async def test_poller_abandons_a_claim_whose_ack_answers_after_ack_timeout(
    plane: EmbeddedControlPlane, autojump_clock: trio.testing.MockClock
) -> None:
    """An ack answered too late is dropped; the item comes back and another worker gets it."""
    handed: list[tuple[str, str, int]] = []

    def poller_on(cp: ControlPlane, worker_id: str) -> Poller:
        async def on_claim(item: WorkItem, slot: Slot) -> None:
            handed.append((worker_id, item.id, item.attempts))
            slot.release()

        return Poller(
            cp,
            worker_id=worker_id,
            slots=trio.CapacityLimiter(1),
            on_claim=on_claim,
            block_ms=500,
            ack_timeout=1.0,
            rng=random.Random(0),
        )

    slow_answers = Fault(FaultKind.LATENCY, 0, 0.0, duration=30.0, response_delay=(5, 5))
    slow = link(plane, slow_answers)
    item = await plane.submit("task")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller_on(slow, "w0").run)
        await trio.sleep(7.0)  # poll answered at 5 s, ack sent then and given up at 6 s
        nursery.cancel_scope.cancel()
    assert handed == []
    assert (await plane.get(item.id)).state is WorkState.STARTING  # acked, then abandoned
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller_on(plane, "w1").run)
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    # w1 got it once the abandoned claim's ack lease ran out (one attempt spent).
    assert handed == [("w1", item.id, 1)]


def test_poller_rejects_a_non_positive_ack_timeout() -> None:
    async def on_claim(item: WorkItem, slot: Slot) -> None:
        raise AssertionError

    with pytest.raises(ValueError, match="ack_timeout"):
        Poller(
            object(),  # type: ignore[arg-type]
            worker_id="w",
            slots=trio.CapacityLimiter(1),
            on_claim=on_claim,
            ack_timeout=0,
        )
